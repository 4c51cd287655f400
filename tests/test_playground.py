"""The playground page at ``/`` in a real browser (headless chromium) against a real server.

One server (uvicorn, the local backend with the bundled SmolLM2 model, short chunks so a
two-page PDF has chunks on each page) and one browser serve the module; each test opens the
page afresh. What is asserted is what a person sees: text in the page. Screenshots of each
step go to the folder printed at the start (``PLAYGROUND_SCREENSHOTS=DIR`` chooses it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from rag_service.settings import Settings
from tests.browser import PHONE, Screenshots, make_driver
from tests.files import make_pdf
from tests.support import free_port, running_server
from tests.test_adapters import make_adapter

PAGE_ONE = (
    "Employee Handbook\n"
    "Welcome to Acme. Office hours are nine to five on weekdays.\n"
    "The cafeteria serves lunch from noon to two, and coffee all day.\n"
    "Desks are assigned by the facilities team on your first morning.\n"
    "Badges open the front door and the parking garage after six.\n"
    "Meeting rooms are booked through the calendar; release them when plans change."
)
PAGE_TWO = (
    "Money Matters\n"
    "Salaries are paid on the last working day of each month.\n"
    "Pension contributions start after the probation period ends.\n"
    "Payslips are in the staff portal from the first of the month.\n"
    "Bonuses are decided in March and paid in April.\n"
    "Travel expenses are reimbursed within thirty days of the trip.\n"
    "The vault access code is 7421. Only managers may use the vault."
)


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    chrome = make_driver()  # first, so a missing browser skips before the server starts
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Screenshots:
    found = Screenshots.for_session(tmp_path_factory)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nplayground screenshots: {found.folder}")
    return found


@pytest.fixture(scope="module")
def server(
    driver: WebDriver,
    tmp_path_factory: pytest.TempPathFactory,
    embedder: Any,
    bundled_model_dir: Path,
) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("playground-data"),
        port=free_port(),
        backend="local",
        local_model=str(bundled_model_dir),
        max_new_tokens=40,
        chunk_tokens=40,
        chunk_overlap=8,
        rag_top_k=3,
    )
    with running_server(settings, embedder) as url:
        yield url


def by_testid(testid: str) -> str:
    return f'[data-testid="{testid}"]'


def wait_for(
    driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 30, what: str = ""
) -> Any:
    # The page re-renders lists (the collection select after a refresh, search results): an
    # element found a moment ago may be gone, so a condition that meets a stale one is retried.
    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    ).until(condition, what)


def text_of(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url + "/")
    wait_for(driver, lambda d: text_of(d, "status-text").startswith("Ready"), what="status")


def console_errors(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def upload_item(driver: WebDriver, filename: str, states: set[str]) -> WebElement:
    """The upload list's row of ``filename`` once its state is one of ``states``."""

    def settled(d: WebDriver) -> WebElement | None:
        for row in d.find_elements(By.CSS_SELECTOR, by_testid("upload-item")):
            if row.get_attribute("data-filename") == filename:
                state = row.find_element(By.CSS_SELECTOR, by_testid("upload-state")).text
                return row if state.lower() in states else None
        return None

    return wait_for(driver, settled, 60, f"upload of {filename}")


def test_upload_search_chat_and_sources(
    driver: WebDriver, shots: Screenshots, server: str, tmp_path: Path
) -> None:
    open_page(driver, server)
    driver.get_log("browser")  # start the console record here
    with shots.on_failure(driver, "flow"):
        # A collection, created from the page, becomes the selected one.
        driver.find_element(By.ID, "new-collection-name").send_keys("handbook")
        driver.find_element(By.ID, "new-collection-create").click()
        wait_for(driver, lambda d: select_text(d).startswith("handbook ("))
        assert "0 docs" in wait_for(driver, select_text)

        # A two-page PDF through the file input: stored, with its document and chunks.
        pdf = tmp_path / "handbook.pdf"
        pdf.write_bytes(make_pdf([PAGE_ONE, PAGE_TWO], title="Employee Handbook"))
        driver.find_element(By.ID, "file-input").send_keys(str(pdf))
        row = upload_item(driver, "handbook.pdf", {"stored", "failed"})
        detail = row.find_element(By.CSS_SELECTOR, by_testid("upload-detail")).text
        assert row.find_element(By.CSS_SELECTOR, by_testid("upload-state")).text == "STORED", detail
        assert re.fullmatch(r"handbook\.pdf · \d+ chunks · created", detail), detail
        wait_for(driver, lambda d: "1 document" in text_of(d, "collection-stats"))
        shots.take(driver, "uploaded")

        # Search a word of page 2: the top result says so and marks the word.
        driver.find_element(By.ID, "tab-search").click()
        driver.find_element(By.CSS_SELECTOR, "label[for=mode-hybrid]").click()
        query = driver.find_element(By.ID, "search-query")
        query.send_keys("Is the VAULT code for managers?")
        query.send_keys(Keys.ENTER)
        results = wait_for(
            driver, lambda d: d.find_elements(By.CSS_SELECTOR, by_testid("search-result"))
        )
        top = results[0]
        assert top.find_element(By.CSS_SELECTOR, by_testid("result-page")).text == "p. 2"
        assert top.find_element(By.CSS_SELECTOR, by_testid("result-document")).text == (
            "handbook.pdf"
        )
        assert re.fullmatch(
            r"\d\.\d{3}", top.find_element(By.CSS_SELECTOR, by_testid("result-score")).text
        )
        assert "dense" in top.find_element(By.CSS_SELECTOR, by_testid("result-scores")).text
        marks = [m.text for m in top.find_elements(By.TAG_NAME, "mark")]
        assert {"vault", "code", "managers"} <= set(marks), marks
        assert "is" not in marks and "the" not in marks  # short and common words stay plain
        assert "title: Employee Handbook" in top.text
        shots.take(driver, "search")

        # Chat: the answer streams in, token by token, with its sources under it.
        driver.find_element(By.ID, "tab-chat").click()
        driver.execute_script(
            """window.answerLengths = [];
            new MutationObserver(() => {
              const a = document.querySelector('[data-testid="answer"]');
              if (a) window.answerLengths.push(a.textContent.length);
            }).observe(document.getElementById('chat-log'),
                       {childList: true, subtree: true, characterData: true});"""
        )
        box = driver.find_element(By.ID, "chat-input")
        box.send_keys("What is the vault access code?")
        box.send_keys(Keys.ENTER)
        assert "What is the vault access code?" in wait_for(
            driver, lambda d: d.find_element(By.CSS_SELECTOR, by_testid("user-message")).text
        )
        chips = wait_for(
            driver, lambda d: d.find_elements(By.CSS_SELECTOR, by_testid("source-chip")), 90
        )
        answer = driver.find_element(By.CSS_SELECTOR, by_testid("answer")).text
        assert answer.strip() and answer != "(empty answer)"
        lengths = driver.execute_script("return window.answerLengths")
        assert len(set(lengths)) > 3, lengths  # rendered as it arrived, not at the end
        labels = [c.text for c in chips]
        assert all(re.fullmatch(r"\[\d\] handbook\.pdf, pp?\. [\d-]+", t) for t in labels), labels
        assert labels[0].startswith("[1] handbook.pdf")
        shots.take(driver, "chat")

        # A source opens the panel: its passage, page and a way to the whole document.
        vault = next(c for c in chips if c.text.endswith("p. 2"))
        vault.click()
        panel = driver.find_element(By.ID, "source-panel")
        wait_for(driver, lambda d: panel.is_displayed())
        assert "7421" in text_of(driver, "source-text")
        assert panel.find_element(By.CSS_SELECTOR, by_testid("source-page")).text == "p. 2"
        assert text_of(driver, "source-title") == "handbook.pdf"
        shots.take(driver, "source")
        driver.find_element(By.ID, "source-load-document").click()
        document = wait_for(
            driver,
            lambda d: (
                d.find_element(By.ID, "source-document").is_displayed()
                and d.find_element(By.ID, "source-document")
            ),
        )
        assert "Welcome to Acme" in document.text and "vault access code" in document.text
        assert "7421" in document.find_element(By.TAG_NAME, "mark").text  # the passage, marked
        driver.find_element(By.ID, "source-close").click()
        wait_for(driver, lambda d: not panel.is_displayed())

        # The same page at phone width: one column, no horizontal scroll, the chat box at hand.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 2, "mobile": True},
        )
        try:
            width = wait_for(
                driver, lambda d: d.execute_script("return window.innerWidth") == PHONE[0]
            )
            assert width
            overflow = driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{overflow}px of horizontal scroll at {PHONE[0]}px"
            box = driver.find_element(By.ID, "chat-input")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
            assert box.is_displayed()
            rect = box.rect
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= PHONE[0], rect
            shots.take(driver, "phone")
        finally:
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        assert console_errors(driver) == []


def test_unsupported_file_shows_why(
    driver: WebDriver, shots: Screenshots, server: str, tmp_path: Path
) -> None:
    httpx.post(f"{server}/v1/collections", json={"name": "inbox"}).raise_for_status()
    open_page(driver, server)
    with shots.on_failure(driver, "unsupported"):
        wait_for(
            driver,
            lambda d: any(
                o.text.startswith("inbox")
                for o in Select(d.find_element(By.ID, "collection-select")).options
            ),
        )
        wait_for(
            driver,
            lambda d: (
                Select(d.find_element(By.ID, "collection-select")).select_by_value("inbox") or True
            ),
        )
        exe = tmp_path / "notes.exe"
        exe.write_bytes(b"MZ\x90\x00\x03\x00\x00\x00" * 64)
        driver.find_element(By.ID, "file-input").send_keys(str(exe))
        row = upload_item(driver, "notes.exe", {"stored", "failed"})
        assert row.find_element(By.CSS_SELECTOR, by_testid("upload-state")).text == "FAILED"
        message = row.find_element(By.CSS_SELECTOR, by_testid("upload-detail")).text
        assert "notes.exe" in message and "unsupported" in message.lower(), message
        shots.take(driver, "unsupported-file")

        # A file dropped on the zone (a real drop event, as a file manager sends) is uploaded.
        driver.execute_script(
            """const files = new DataTransfer();
            files.items.add(new File(['# Notes\\n\\nDropped files are stored too.'], 'dropped.md',
                                     {type: 'text/markdown'}));
            const zone = document.getElementById('drop-zone');
            for (const type of ['dragenter', 'dragover', 'drop']) {
              zone.dispatchEvent(new DragEvent(type, {dataTransfer: files, bubbles: true}));
            }"""
        )
        row = upload_item(driver, "dropped.md", {"stored", "failed"})
        detail = row.find_element(By.CSS_SELECTOR, by_testid("upload-detail")).text
        assert detail == "dropped.md · 1 chunk · created", detail
        wait_for(driver, lambda d: select_text(d) == "inbox (1 doc, 1 chunk)")


def test_key_prompt_then_collections(
    driver: WebDriver,
    shots: Screenshots,
    tmp_path: Path,
    embedder: Any,
    fake_server: Any,
) -> None:
    key = "playground-secret-key"
    settings = Settings(
        data_dir=tmp_path / "data", port=free_port(), api_key=key, upstream_url=fake_server.url
    )
    with running_server(settings, embedder) as url:
        auth = {"Authorization": f"Bearer {key}"}
        httpx.post(f"{url}/v1/collections", json={"name": "secrets"}, headers=auth)
        open_page(driver, url)  # the page itself needs no key
        with shots.on_failure(driver, "key"):
            dialog = driver.find_element(By.ID, "key-dialog")
            wait_for(driver, lambda d: dialog.is_displayed(), what="key prompt")
            assert "needs an API key" in text_of(driver, "key-message")
            shots.take(driver, "key-prompt")

            driver.find_element(By.ID, "key-input").send_keys("wrong-key")
            driver.find_element(By.ID, "key-save").click()
            wait_for(driver, lambda d: "refused the stored key" in text_of(d, "key-message"))

            driver.find_element(By.ID, "key-input").send_keys(key)
            driver.find_element(By.ID, "key-save").click()
            wait_for(driver, lambda d: not dialog.is_displayed())
            wait_for(driver, lambda d: select_text(d).startswith("secrets ("))

            # Kept in the browser: a new visit asks nothing; forgetting it asks again.
            open_page(driver, url)
            wait_for(driver, lambda d: select_text(d).startswith("secrets ("))
            assert not driver.find_element(By.ID, "key-dialog").is_displayed()
            driver.find_element(By.ID, "key-button").click()
            driver.find_element(By.ID, "key-forget").click()
            wait_for(driver, lambda d: "needs an API key" in text_of(d, "key-message"))
            assert (
                driver.execute_script("return localStorage.getItem('rag-service.api-key')") is None
            )


def test_citation_markers_adapters_and_stream_errors(
    driver: WebDriver,
    shots: Screenshots,
    tmp_path: Path,
    embedder: Any,
    fake_upstream: Any,
    bundled_model_dir: Path,
) -> None:
    """With an OpenAI-compatible upstream: the answer's [1] opens its source (a document id
    with a "/"); a loaded adapter is listed and can be chosen as the model; an upstream
    failure before or during the stream shows the service's message."""
    adapters = tmp_path / "adapters"
    make_adapter(bundled_model_dir, adapters / "alpha", seed=1, r=4)
    settings = Settings(
        data_dir=tmp_path / "data",
        port=free_port(),
        upstream_url=fake_upstream.url,
        adapters_dir=adapters,
    )
    with running_server(settings, embedder) as url:
        loaded = httpx.post(f"{url}/v1/adapters", json={"name": "alpha", "path": "alpha"})
        assert loaded.status_code == 201, loaded.text
        doc = {
            "id": "geo/france.txt",
            "text": "Paris is the capital of France. It lies on the Seine.",
            "metadata": {"title": "France"},
        }
        httpx.post(
            f"{url}/v1/collections/facts/documents", json={"documents": [doc]}
        ).raise_for_status()
        open_page(driver, url)
        with shots.on_failure(driver, "citations"):
            wait_for(driver, lambda d: select_text(d).startswith("facts ("))
            adapter = wait_for(
                driver, lambda d: d.find_elements(By.CSS_SELECTOR, by_testid("adapter"))
            )
            assert [a.text.split() for a in adapter] == [["alpha", "r=4"]]
            models = Select(driver.find_element(By.ID, "model-select"))
            assert [o.text for o in models.options] == ["fake-llm", "alpha"]  # base model first
            ask(driver, "What is the capital of France?")
            cite = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, by_testid("cite")))
            answer = driver.find_element(By.CSS_SELECTOR, by_testid("answer")).text
            assert answer.strip() == "Paris is the capital of France [1].", answer
            chip = driver.find_element(By.CSS_SELECTOR, by_testid("source-chip"))
            assert chip.text == "[1] geo/france.txt"
            cite[0].click()
            panel = driver.find_element(By.ID, "source-panel")
            wait_for(driver, lambda d: panel.is_displayed())
            assert text_of(driver, "source-title") == "geo/france.txt"
            assert "Paris is the capital of France." in text_of(driver, "source-text")
            driver.find_element(By.ID, "source-load-document").click()
            wait_for(driver, lambda d: "the Seine" in text_of(d, "source-document"))
            driver.find_element(By.ID, "source-close").click()
            wait_for(driver, lambda d: not panel.is_displayed())

            fake_upstream.mode = "error500"  # refused before the stream starts: a non-200
            ask(driver, "And of Spain?")
            error = wait_for(driver, lambda d: error_text(d, 1))
            direct = httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "x"}], "stream": True},
            )
            assert direct.status_code >= 500 and error == direct.json()["error"]["message"]

            fake_upstream.mode = "bad_sse_mid"  # fails after the first words
            ask(driver, "And of Italy?")
            assert wait_for(driver, lambda d: error_text(d, 2))
            shots.take(driver, "chat-errors")
            # A failed question is left out of the conversation the next request sends; the
            # model chosen is the one asked.
            fake_upstream.mode = "ok"
            models.select_by_visible_text("alpha")
            ask(driver, "Thanks")
            wait_for(
                driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, by_testid("cite"))) == 2
            )
            sent = [
                m["content"] for m in fake_upstream.requests[-1]["messages"] if m["role"] == "user"
            ]
            assert sent[0] == "What is the capital of France?" and sent[-1].endswith("Thanks")
            assert not any("Spain" in m or "Italy" in m for m in sent), sent
            assert fake_upstream.requests[-1]["model"] == "alpha@1"


def ask(driver: WebDriver, question: str) -> None:
    box = driver.find_element(By.ID, "chat-input")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)


def error_text(driver: WebDriver, count: int) -> str | None:
    """The text of the ``count``-th chat error, once there are that many."""
    errors = driver.find_elements(By.CSS_SELECTOR, by_testid("chat-error"))
    return str(errors[count - 1].text) if len(errors) >= count else None


def select_text(driver: WebDriver) -> str:
    return str(Select(driver.find_element(By.ID, "collection-select")).first_selected_option.text)


def test_page_and_files_are_served_with_their_policy(make_client: Any) -> None:
    """Without a browser: the page is public even with a key, under a strict CSP, and names
    its files by content hash so they can be cached."""
    client = make_client(api_key="k" * 24)
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["cache-control"] == "no-cache"
    assets = re.findall(r'"(/playground/[\w.]+\?v=[0-9a-f]{12})"', page.text)
    assert {a.split("?")[0] for a in assets} == {
        "/playground/app.js",
        "/playground/style.css",
        "/playground/icon.svg",
    }
    assert "<script>" not in page.text  # no inline script: the CSP would refuse it
    for asset in assets:
        resp = client.get(asset)
        assert resp.status_code == 200, asset
        assert "max-age=86400" in resp.headers["cache-control"]
    assert (
        client.get("/playground/app.js")
        .headers["content-type"]
        .startswith(("text/javascript", "application/javascript"))
    )
    assert client.get("/playground/missing.js").status_code == 404
    assert client.get("/v1/collections").status_code == 401  # the API still needs the key
    assert "/" not in client.get("/schema/openapi.json").json()["paths"]
