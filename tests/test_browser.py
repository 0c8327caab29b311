"""Acceptance 7: a real browser (Debian's chromium, headless, via playwright) generates an image on the
web page and sees it appear in the gallery, and sends an inpainting mask drawn with the pointer.
Install the browser with scripts/install-browser.sh."""

from __future__ import annotations

import io
import sqlite3
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server_support import start_server

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
needs_browser = pytest.mark.skipif(not CHROMIUM.exists(), reason="run scripts/install-browser.sh")


@contextmanager
def web_page(data_dir: Path, step_delay: float):
    """The web page of a fresh server (fake engine), loaded in headless chromium -> (page, errors).
    On exit the page must have raised no JavaScript error."""
    proc, url = start_server(data_dir, step_delay=step_delay)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("#sampler option", state="attached")
            yield page
            assert not errors, errors
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)


@needs_browser
def test_generate_in_browser(tmp_path):
    with web_page(tmp_path, step_delay=0.05) as page:
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


@needs_browser
def test_inpaint_mask_drawn_in_browser_reaches_the_server(tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(init)
    with web_page(tmp_path, step_delay=0.01) as page:
        page.fill("#prompt", "a green star")
        page.select_option("#mode", "inpaint")
        page.set_input_files("#init", str(init))
        page.wait_for_function("document.getElementById('init-canvas').width === 64")
        canvas = page.locator("#mask-canvas")
        canvas.scroll_into_view_if_needed()  # below the fold of the default viewport
        box = canvas.bounding_box()
        y = box["y"] + box["height"] / 2  # a stroke across the left quarter, at mid height
        page.mouse.move(box["x"] + box["width"] * 0.2, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.3, y, steps=5)
        page.mouse.up()
        page.click("#generate")
        page.wait_for_selector("#gallery li img", timeout=30_000)
    with sqlite3.connect(tmp_path / "ember.db") as db:
        kind, mask_png, init_png = db.execute("SELECT kind, mask, init FROM jobs").fetchone()
    assert kind == "inpaint"
    mask = np.asarray(Image.open(io.BytesIO(mask_png)).convert("L"))
    assert mask.shape == (64, 64)
    assert mask[32, 16] == 255 and mask[32, 48] == 0 and mask[5, 16] == 0
    assert 0.02 < (mask > 127).mean() < 0.2  # the stroke, not the whole canvas
    sent = np.asarray(Image.open(io.BytesIO(init_png)).convert("RGB"))
    assert tuple(sent[10, 10]) == (200, 40, 40)
