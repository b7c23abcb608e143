"""The web page at `/` in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
Selenium) against a real server: fill the form, submit, wait for the image, check it is a PNG of the asked
size and that the page showed progress and timings; a wrong API key shows the server's message. With a
video model (a tiny random Wan pipeline), the page makes a clip and plays it: a <video> of the asked
size and duration whose time advances and whose frames are not blank.

DISTRIFUSION_SCREENSHOT=1 also saves docs/serve_web_page.png (a 128x128 image of 20 steps then)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_serve import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver on PATH (apt-get install chromium chromium-driver)",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "page-key"
WAIT_S = 120  # one small job on 2 busy cores, with the page polling every 200 ms
SCREENSHOT = os.environ.get("DISTRIFUSION_SCREENSHOT") == "1"
SCREENSHOT_PATH = Path(__file__).resolve().parents[1] / "docs" / "serve_web_page.png"

# Every text #status shows, in order: the page replaces it between polls, so the test records it.
RECORD_STATUS = """
window.statuses = [];
new MutationObserver(() => window.statuses.push(document.getElementById("status").textContent))
  .observe(document.getElementById("status"), {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--max-pixels", "16384", "--max-steps", "50", "--mode", "sync")
    yield s
    s.close()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=820,900"):
        options.add_argument(flag)
    # The Debian chromedriver, named: Selenium Manager (which would download one) is never run.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()  # ends chromedriver and every chromium process it started


def fill(driver, key: str, width: int, height: int, steps: int, seed: int) -> None:
    """Type into the form as a user would."""
    for field, value in (("width", width), ("height", height), ("steps", steps), ("seed", seed), ("key", key)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))


def test_the_page_generates_an_image_of_the_asked_size(server, browser):
    width, height, steps = (128, 128, 20) if SCREENSHOT else (48, 32, 3)
    browser.get(server.url + "/")
    assert browser.title == "distrifusion"
    prompt = Select(browser.find_element(By.ID, "prompt"))
    classes = [option.get_attribute("value") for option in prompt.options]
    assert "gravel" in classes and len(classes) > 1, classes  # the embedded model's texture classes
    prompt.select_by_value("gravel")
    Select(browser.find_element(By.ID, "mode")).select_by_value("displaced")
    fill(browser, KEY, width, height, steps, seed=3)
    browser.execute_script(RECORD_STATUS)
    browser.find_element(By.ID, "submit").click()

    image = browser.find_element(By.ID, "image")
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, WAIT_S, poll_frequency=0.25).until(lambda _: image.get_attribute("src") or error.text)
    assert error.text == ""
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,"), src[:80]
    png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    png.load()
    assert png.format == "PNG" and png.size == (width, height)
    # Chromium decoded and shows it too.
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return arguments[0].complete", image))
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [
        width,
        height,
    ]
    assert image.is_displayed()

    # Progress while it ran, then a summary and the timings.
    statuses = browser.execute_script("return window.statuses")
    progress = [s for s in statuses if s == "waiting in the queue…" or re.fullmatch(rf"step \d+ of {steps}", s)]
    assert progress, statuses
    status = browser.find_element(By.ID, "status").text
    assert status == f"done: {width}x{height}, {steps} steps, seed 3, displaced", status
    timings = browser.find_element(By.ID, "timings").text
    assert re.search(r"denoising \d+\.\d\d s", timings) and re.search(r"total \d+\.\d\d s", timings), timings
    assert browser.find_element(By.ID, "submit").is_enabled()
    assert not browser.find_element(By.ID, "progress").is_displayed()

    if SCREENSHOT:
        assert browser.save_screenshot(str(SCREENSHOT_PATH)), SCREENSHOT_PATH


@pytest.fixture(scope="module")
def video_server(tmp_path_factory):
    import torch
    from wan_helpers import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny_wan_page")
    tiny_pipeline("t2v", dtype=torch.float32).save_pretrained(folder)
    flags = ["--model", str(folder), "--api-key", KEY, "--max-pixels", "8192", "--max-frames", "33", "--mode", "sync"]
    s = Server(*flags)
    yield s
    s.close()


# The <video>'s state, and its current frame drawn on a canvas: how far its pixels vary.
VIDEO_STATE = """
const v = arguments[0];
const canvas = document.createElement("canvas");
canvas.width = v.videoWidth; canvas.height = v.videoHeight;
let spread = 0;
if (v.videoWidth) {
  const ctx = canvas.getContext("2d");
  ctx.drawImage(v, 0, 0);
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let lo = 255, hi = 0;
  for (let i = 0; i < data.length; i += 4) { lo = Math.min(lo, data[i]); hi = Math.max(hi, data[i]); }
  spread = hi - lo;
}
return {ready: v.readyState, width: v.videoWidth, height: v.videoHeight, duration: v.duration,
        time: v.currentTime, paused: v.paused, error: v.error && v.error.code, spread: spread};
"""


def test_the_page_plays_a_clip_of_the_asked_size(video_server, browser):
    width, height, frames, fps, steps = 48, 80, 17, 16, 3
    browser.get(video_server.url + "/")
    assert browser.find_element(By.ID, "frames").is_displayed()
    assert browser.find_element(By.ID, "submit").text == "Generate video"
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a red cat")
    Select(browser.find_element(By.ID, "mode")).select_by_value("sync")
    fill(browser, KEY, width, height, steps, seed=1)
    for field, value in (("frames", frames), ("fps", fps)):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))
    browser.execute_script(RECORD_STATUS)
    browser.find_element(By.ID, "submit").click()

    video = browser.find_element(By.ID, "video")
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, WAIT_S, poll_frequency=0.25).until(lambda _: video.get_attribute("src") or error.text)
    assert error.text == ""
    assert video.get_attribute("src").startswith("blob:")  # fetched with the API key, then played
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(VIDEO_STATE, video)["ready"] >= 2)
    state = browser.execute_script(VIDEO_STATE, video)
    assert (state["width"], state["height"], state["error"]) == (width, height, None), state
    assert abs(state["duration"] - frames / fps) < 0.1, state
    assert state["spread"] > 0, state  # a decoded frame, not a blank one
    # It plays: autoplay (muted), its time moves on.
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(VIDEO_STATE, video)["time"] > 0.2)
    assert not browser.execute_script(VIDEO_STATE, video)["paused"]
    assert video.is_displayed() and not browser.find_element(By.ID, "image").is_displayed()

    statuses = browser.execute_script("return window.statuses")
    progress = [s for s in statuses if s == "waiting in the queue…" or re.fullmatch(rf"step \d+ of {steps}", s)]
    assert progress, statuses
    status = browser.find_element(By.ID, "status").text
    assert status == f"done: {width}x{height}, {frames} frames at {fps} fps, {steps} steps, seed 1, sync", status
    assert re.search(r"encode \d+\.\d\d s", browser.find_element(By.ID, "timings").text)


def test_a_refused_request_shows_the_server_message(server, browser):
    browser.get(server.url + "/")
    fill(browser, "wrong-key", 48, 32, 3, seed=0)
    browser.find_element(By.ID, "submit").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda _: error.text)
    assert "API key" in error.text, error.text
    assert browser.find_element(By.ID, "image").get_attribute("src") in (None, "")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "submit").is_enabled())


def test_an_answer_that_is_not_json_is_reported_as_such(server, browser):
    """/metrics answers plain text: the page's `call` says what came back instead of a JSON parse error."""
    browser.get(server.url + "/")
    fill(browser, KEY, 48, 32, 3, seed=0)
    message = browser.execute_async_script(
        'const done = arguments[arguments.length - 1]; call("/metrics").then(() => done(""), (e) => done(e.message));'
    )
    assert message.startswith("200 OK") and "distrifusion_" in message, message
