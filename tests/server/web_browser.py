"""Headless Debian chromium driven by Playwright, for the web UI tests; they skip, saying how to install both, when
either is missing (Playwright's own browser download cannot work offline, so it is pointed at the system browser)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("ERNIE45_CHROMIUM", "/usr/bin/chromium"))
INSTALL = ("install them with `apt-get install -y chromium` (Debian's browser; Playwright's browser download needs "
           "the network) and `pip install -e '.[dev]'` (the dev extra has playwright), or point ERNIE45_CHROMIUM "
           "at another chromium binary")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser():
    """sync_playwright, or a skip (of the module when called at import, else of the test) that names the missing
    piece and the install commands."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"the web UI browser tests need the playwright package and chromium: {INSTALL}",
                    allow_module_level=True)
    if not CHROMIUM.is_file():
        pytest.skip(f"the web UI browser tests need chromium at {CHROMIUM}: {INSTALL}", allow_module_level=True)
    return sync_playwright


@contextmanager
def launched_chromium():
    sync_playwright = require_browser()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
