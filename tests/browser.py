"""A real browser for the playground tests: Debian's chromium and chromedriver, driven headless
by selenium.

* :func:`find_browser` locates both programs, or skips the calling test with the packages
  to install (a skip with its reason, never a silent pass);
* :func:`make_driver` starts a headless chromium at desktop size;
* :class:`Screenshots` saves PNGs into one folder per session (its path is printed at the
  start; ``PLAYGROUND_SCREENSHOTS=DIR`` chooses the folder) and, through
  :meth:`Screenshots.on_failure`, one of the page as it was when a test failed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

__all__ = ["DESKTOP", "PHONE", "Screenshots", "find_browser", "make_driver"]

DESKTOP = (1280, 900)
PHONE = (390, 844)
_SAFE = re.compile(r"[^\w.-]+")
_MISSING = (
    "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
)


def find_browser() -> tuple[str, str]:
    """``(chromium, chromedriver)`` paths; skips the test when either is missing."""
    browser = next(
        (
            found
            for found in (
                "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None,
                shutil.which("chromium"),
                shutil.which("chromium-browser"),
                shutil.which("google-chrome"),
            )
            if found
        ),
        None,
    )
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else None
    )
    if browser is None or driver is None:
        pytest.skip(_MISSING)
    return browser, driver


def make_driver() -> webdriver.Chrome:
    """A headless chromium at :data:`DESKTOP` size (the caller quits it)."""
    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        "--force-prefers-reduced-motion",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console, for the tests
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_page_load_timeout(30)
    return chrome


class Screenshots:
    """PNG screenshots of a driver's page, numbered in the order they were taken."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    @classmethod
    def for_session(cls, tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
        chosen = os.environ.get("PLAYGROUND_SCREENSHOTS")
        folder = Path(chosen) if chosen else tmp_path_factory.mktemp("playground-screenshots")
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder)

    def take(self, driver: webdriver.Chrome, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{_SAFE.sub('-', name)}.png"
        driver.save_screenshot(str(path))
        return path

    @contextmanager
    def on_failure(self, driver: webdriver.Chrome, name: str) -> Iterator[None]:
        """Save a screenshot named ``failed-<name>`` when the block raises."""
        try:
            yield
        except BaseException:
            try:
                print(f"screenshot of the failure: {self.take(driver, f'failed-{name}')}")
            except Exception as exc:  # the browser itself may be what failed
                print(f"no screenshot of the failure: {exc}")
            raise
