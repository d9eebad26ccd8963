"""The chat page at `GET /` and its assets under `/web/`: static files shipped in the package (`server/web/`), no
build step and nothing fetched from elsewhere, so it works offline. The page talks to this server's own OpenAI
endpoints from the browser, with the user's API key when the server has one; the page itself needs no key, since a
browser cannot send one before it has loaded the page that asks for it, and it holds nothing but code.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response

from .errors import APIError

WEB_DIR = Path(__file__).parent / "web"

_MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".html": "text/html; charset=utf-8"}

# Everything the page loads comes from this origin; images may be data: URLs (attachments) or blob: previews.
# Model output is rendered as text nodes and whitelisted tags only, so no inline script is ever needed.
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
}


def _load_assets() -> dict[str, tuple[bytes, str]]:
    assets = {}
    for path in sorted(WEB_DIR.iterdir()):
        if path.suffix in _MEDIA_TYPES and path.name != "index.html":
            assets[path.name] = (path.read_bytes(), _MEDIA_TYPES[path.suffix])
    return assets


def mount_web_ui(app: FastAPI, multimodal: bool) -> None:
    """GET / (the page; `multimodal` shows its image button) and GET /web/NAME (its scripts and styles), read
    once here: they are a few tens of kB."""
    index_path = WEB_DIR / "index.html"
    if not index_path.is_file():
        raise FileNotFoundError(f"the web UI's files are missing from {WEB_DIR} (a broken install?); "
                                "reinstall ernie45 or pass --no-web-ui")
    page = index_path.read_text(encoding="utf-8").replace("{{multimodal}}", "true" if multimodal else "false")
    assets = _load_assets()

    @app.get("/", include_in_schema=False)
    async def web_ui_page() -> Response:
        return Response(page, media_type=_MEDIA_TYPES[".html"], headers=_HEADERS)

    @app.get("/web/{name}", include_in_schema=False)
    async def web_ui_asset(name: str) -> Response:
        if name not in assets:
            raise APIError(404, f"no web UI file {name!r}")
        body, media_type = assets[name]
        return Response(body, media_type=media_type, headers=_HEADERS)
