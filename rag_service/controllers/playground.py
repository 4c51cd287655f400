"""The playground: a page for a person at ``/`` and its files under ``/playground/``.

The page is plain HTML, CSS and one JavaScript module shipped inside the package
(``rag_service/playground/``): no build step, no CDN, nothing fetched from elsewhere, so it
works on a machine without internet access, like the API docs at /schema. It is public, as
/schema is; every call it makes to /v1 carries the API key the person enters (kept in the
browser's localStorage).

Caching: the page itself is ``no-cache`` and names its files with a content hash
(``/playground/app.js?v=1a2b3c4d5e6f``), so the files can be cached for a day and a new
version of the service is picked up on the next load. The page's Content-Security-Policy
allows scripts, styles and connections to this origin only (no inline scripts or styles).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from litestar import Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

__all__ = ["ASSETS_PATH", "PLAYGROUND_DIR", "playground_router"]

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
ASSETS_PATH = "/playground"

_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_ASSET_REF = re.compile(rf'"{ASSETS_PATH}/([\w.-]+)"')


def _versioned(html: str) -> str:
    """``"/playground/app.js"`` -> ``"/playground/app.js?v=<hash of the file>"``."""

    def stamp(match: re.Match[str]) -> str:
        asset = PLAYGROUND_DIR / match.group(1)
        if not asset.is_file():
            return match.group(0)
        digest = hashlib.sha256(asset.read_bytes()).hexdigest()[:12]
        return f'"{ASSETS_PATH}/{match.group(1)}?v={digest}"'

    return _ASSET_REF.sub(stamp, html)


@get("/", include_in_schema=False, sync_to_thread=True, name="playground")
def playground_page() -> Response[str]:
    # Read on each load (a few KB): an edited or upgraded file is served at once.
    html = _versioned((PLAYGROUND_DIR / "index.html").read_text(encoding="utf-8"))
    return Response(html, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


def playground_router() -> Router:
    """``GET /`` (the page) and ``GET /playground/<file>`` (its script, styles and icon)."""
    assets = create_static_files_router(
        path=ASSETS_PATH,
        directories=[PLAYGROUND_DIR],
        include_in_schema=False,
        name="playground-assets",
        cache_control=CacheControlHeader(public=True, max_age=86400),
    )
    return Router(path="/", route_handlers=[playground_page, assets])
