"""The page in a real browser: headless Chromium loads the app, generates, and sees the image and the timing
panel; the image the browser downloads is the PNG with its parameters chunk.

SILICON_DIFFUSION_SCREENSHOTS=<folder> also saves a screenshot of every tab there (assets/screenshots/),
and SILICON_DIFFUSION_DEFAULT_MODEL picks the model they show (the tiny random model otherwise).
"""
import io
import os
import socket
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
sync_api = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tiny_pipelines, tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["SILICON_DIFFUSION_HOME"] = str(tmp_path_factory.mktemp("home"))
    model = os.environ.get("SILICON_DIFFUSION_DEFAULT_MODEL") or str(tiny_pipelines("sd1")[1])
    import app as webapp
    demo, address = webapp.launch(webapp.App(model), port=free_port(), prevent_thread_lock=True, quiet=True)
    yield address
    demo.close()


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
        page.goto(url)
        page.wait_for_selector("#generate-btn", timeout=30_000)
        yield page
        browser.close()


def test_generate_shows_image_and_timings(page, url, tmp_path):
    page.click("#generate-btn")
    page.wait_for_selector("#stats .sd-stats", timeout=60_000)
    stats = page.inner_text("#stats")
    assert "TIME PER STAGE" in stats.upper() and "PEAK MEMORY" in stats.upper() and "WHY THIS ENGINE" in stats.upper()
    assert "Done in" in page.inner_text("#progress")
    src = page.get_attribute("#result img", "src")
    assert src
    with urllib.request.urlopen(src if src.startswith("http") else url.rstrip("/") + "/" + src.lstrip("/")) as r:
        png = Image.open(io.BytesIO(r.read()))
    assert png.format == "PNG" and "Seed: " in png.text["parameters"]  # lossless and reproducible
    page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
    assert (tmp_path / "generate.png").stat().st_size > 10_000


def test_ctrl_enter_generates(page):
    page.wait_for_selector("#stats .sd-stats", timeout=60_000)
    before = page.inner_text("#stats")
    page.fill("#prompt textarea", "a small blue square")
    page.locator("#prompt textarea").press("Control+Enter")
    page.wait_for_function(f"document.querySelector('#stats').innerText !== {before!r} && "
                           "document.querySelector('#progress').innerText.includes('Done in')", timeout=60_000)
    assert "SEED" in page.inner_text("#stats").upper()


def test_compute_units_are_off_where_core_ml_cannot_run_and_say_why(page):
    import sys
    if sys.platform == "darwin":
        pytest.skip("Core ML runs here")
    units = page.locator("#units")
    assert "Core ML prediction needs macOS" in units.inner_text()
    assert units.locator("input").first.is_disabled()


def test_the_api_link_is_visible(page):
    link = page.get_by_text("Use via API").first
    link.scroll_into_view_if_needed()
    assert link.is_visible()


def test_download_button_keeps_the_parameters_chunk(page, tmp_path):
    page.wait_for_selector("#result img")
    with page.expect_download(timeout=15_000) as info:
        page.locator("#result").get_by_label("Download").first.click()
    saved = tmp_path / "downloaded.png"
    info.value.save_as(saved)
    image = Image.open(saved)
    assert image.format == "PNG" and "parameters" in image.text


def test_a_mask_painted_in_the_browser_inpaints(page, tmp_path):
    """Upload a start image, paint over its middle with the brush, generate: the run is an inpainting whose
    PNG records the start image and the painted mask by hash."""
    start = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (30, 60, 200)).save(start)
    page.get_by_text("Start image and inpainting").click()
    page.locator("#init-editor input[type=file]").first.set_input_files(str(start))
    page.wait_for_timeout(1500)
    page.locator("#init-editor").get_by_label("Brush").first.click()
    box = page.locator("#init-editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 40, cy - 40)
    page.mouse.down()
    for dx, dy in ((40, -40), (40, 40), (-40, 40), (-40, -40), (0, 0)):
        page.mouse.move(cx + dx, cy + dy, steps=8)
    page.mouse.up()
    page.wait_for_timeout(500)
    before = page.evaluate("(document.querySelector('#result img') || {}).src || ''")
    page.click("#generate-btn")
    page.wait_for_function(f"((document.querySelector('#result img') || {{}}).src || '') !== {before!r} && "
                           "document.querySelector('#progress').innerText.includes('Done in')", timeout=60_000)
    src = page.get_attribute("#result img", "src")
    url = page.url.rstrip("/") + "/" + src.lstrip("/") if not src.startswith("http") else src
    from backend.png import read_parameters
    with urllib.request.urlopen(url) as r:
        (tmp_path / "inpainted.png").write_bytes(r.read())
    params = read_parameters(tmp_path / "inpainted.png")
    assert params["init_image"] and params["mask"] and params["strength"] == 0.8  # the slider's value
    page.get_by_text("Start image and inpainting").click()  # folded again for the screenshots


def test_screenshots_of_every_tab(page):
    folder = os.environ.get("SILICON_DIFFUSION_SCREENSHOTS")
    if not folder:
        pytest.skip("set SILICON_DIFFUSION_SCREENSHOTS=<folder> to save a screenshot of each tab")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    page.wait_for_selector("#stats .sd-stats", timeout=60_000)
    page.screenshot(path=str(out / "generate.png"), full_page=True)

    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_function("document.querySelector('#compare-status').innerText.includes('rendered with seed')",
                           timeout=120_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "compare.png"), full_page=True)

    page.get_by_role("tab", name="Presenter").click()
    page.get_by_role("button", name="Run warm").click()
    page.wait_for_function("document.querySelector('#presenter-status').innerText.includes('warm runs')",
                           timeout=120_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(out / "presenter.png"), full_page=True)

    page.get_by_role("tab", name="Models").click()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(out / "models.png"), full_page=True)
