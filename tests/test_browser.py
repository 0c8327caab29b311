"""Acceptance 7: a real browser (Debian's chromium, headless, via playwright) generates an image on the
web page and sees it appear in the gallery. Install the browser with scripts/install-browser.sh."""

from __future__ import annotations

from pathlib import Path

import pytest

from server_support import start_server

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.mark.skipif(not CHROMIUM.exists(), reason="run scripts/install-browser.sh")
def test_generate_in_browser(tmp_path):
    proc, url = start_server(tmp_path, step_delay=0.05)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("#sampler option", state="attached")
            page.fill("#prompt", "a blue square")
            page.fill("#steps", "12")
            page.fill("#seed", "1234")
            page.click("#generate")
            page.wait_for_function("document.getElementById('progress').value > 0")
            page.wait_for_selector("#gallery li img", timeout=30_000)
            info = page.inner_text("#gallery li pre")
            assert "a blue square" in info and "Seed: 1234" in info
            natural = page.eval_on_selector("#gallery li img", "img => img.naturalWidth")
            assert natural == 64  # the PNG really loaded
            page.fill("#prompt", "")
            page.click("#gallery li button")
            assert page.input_value("#prompt") == "a blue square"
            assert page.input_value("#seed") == "1234"
            assert not errors, errors
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
