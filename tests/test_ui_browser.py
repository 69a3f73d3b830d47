"""The standalone app (`python -m lora_train ui`, tiny model) driven in a real headless Chromium by Playwright:
set a dataset, edit a caption, press Suggest, train a few steps, watch the loss plot, run the Test grid.

Skips only when playwright / Chromium / gradio are missing AND LORA_TRAIN_REQUIRE_BROWSER is unset (CI sets it).
A screenshot of each section goes to test-artifacts/.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
CHROMIUM = os.environ.get("LORA_TRAIN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 120_000
pytestmark = [pytest.mark.slow, pytest.mark.frontend]  # gradio + a browser: not part of the WebUI-versions core run


def _need(what: str, ok: bool) -> None:
    if ok:
        return
    if os.environ.get("LORA_TRAIN_REQUIRE_BROWSER"):
        pytest.fail(f"LORA_TRAIN_REQUIRE_BROWSER is set but {what} is missing: apt-get install -y chromium; "
                    f"pip install playwright gradio")
    pytest.skip(f"{what} is missing (set LORA_TRAIN_REQUIRE_BROWSER=1 to make this a failure)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tmp_path):
    from lora_train.data.demo import write_demo_dataset

    data = write_demo_dataset(str(tmp_path / "data"), n=5, size=64)
    loras = tmp_path / "loras"
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "app.log", "w+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "lora_train", "ui", "--port", str(port), "--lora-dir", str(loras)],
                            cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the ui command exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"the app did not answer on {url} within 180 s:\n{log.read()[-4000:]}")
            time.sleep(1)
        yield url, data, str(loras), log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_standalone_app_in_chromium(app):
    _need("gradio", shutil.which("true") is not None and _importable("gradio"))
    _need("playwright (pip install playwright)", _importable("playwright"))
    _need(f"Chromium at {CHROMIUM}", os.path.isfile(CHROMIUM))
    from playwright.sync_api import expect, sync_playwright

    from lora_train.data.demo import DEMO_TRIGGER

    url, data, loras, log = app
    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.goto(url)

            # ---- Dataset: load, thumbnails, edit + save a caption
            page.locator("#lora_train_folder textarea").fill(data)
            page.locator("#lora_train_load").click()
            expect(page.locator("#lora_train_ds_status")).to_contain_text("5 image(s), 5 with a caption")
            expect(page.locator("#lora_train_gallery img").first).to_be_visible()
            assert page.locator("#lora_train_gallery img").count() >= 5
            cap = page.locator("#lora_train_caption textarea")
            expect(cap).to_have_value(f"{DEMO_TRIGGER}, a red circle on a blue background")
            cap.fill(f"{DEMO_TRIGGER}, a red circle, edited in the browser")
            page.locator("#lora_train_save_caption").click()
            expect(page.locator("#lora_train_caption_msg")).to_contain_text("saved the caption of img_000.png")
            with open(os.path.join(data, "img_000.txt"), encoding="utf-8") as fh:
                assert fh.read() == f"{DEMO_TRIGGER}, a red circle, edited in the browser"
            expect(page.locator("#lora_train_tags")).to_contain_text("edited in the browser")
            page.screenshot(path=os.path.join(ARTIFACTS, "ui_dataset.png"), full_page=True)

            # ---- Settings: Suggest fills the fields with reasons
            page.get_by_role("tab", name="Settings").click()
            lr = page.locator("#lora_train_lr input")
            lr.fill("0.0777")
            page.locator("#lora_train_suggest").click()
            expect(page.locator("#lora_train_suggest_md")).to_contain_text("5 image(s)")
            expect(page.locator("#lora_train_suggest_md")).to_contain_text("learning_rate")
            expect(lr).not_to_have_value("0.0777")
            expect(page.locator("#lora_train_resolution input")).to_have_value("64")
            # a short run: 24 optimizer steps, lr high enough for the random tiny model
            for sel, value in (("#lora_train_max_steps input", "24"), ("#lora_train_lr input", "0.002"),
                               ("#lora_train_warmup input", "0"), ("#lora_train_save_every input", "0"),
                               ("#lora_train_batch input", "1"), ("#lora_train_accum input", "1")):
                page.locator(sel).fill(value)
                page.locator(sel).press("Tab")
            page.screenshot(path=os.path.join(ARTIFACTS, "ui_settings.png"), full_page=True)

            # ---- Train: start, live status and loss plot
            page.get_by_role("tab", name="Train").click()
            page.locator("#lora_train_start").click()
            expect(page.locator("#lora_train_train_msg")).to_contain_text("Started training my_lora")
            plot = page.locator("#lora_train_loss img")
            expect(plot).to_be_visible()
            first_src = plot.get_attribute("src")
            expect(page.locator("#lora_train_status")).to_contain_text("done")
            expect(page.locator("#lora_train_status")).to_contain_text("step 24/24")
            # the plot the poll shows at the end is not the first one it showed, unless the run fit in one poll
            deadline = time.time() + 30
            while plot.get_attribute("src") == first_src and time.time() < deadline:
                time.sleep(0.5)
            final_src = plot.get_attribute("src")
            assert final_src, "no loss plot"
            expect(page.locator("#lora_train_diagnosis")).to_contain_text("Diagnosis")
            assert os.path.isfile(os.path.join(loras, "my_lora.safetensors"))
            page.screenshot(path=os.path.join(ARTIFACTS, "ui_train.png"), full_page=True)

            # a second start gets a new file name
            page.locator("#lora_train_start").click()
            expect(page.locator("#lora_train_train_msg")).to_contain_text("Started training my_lora_v2")
            # a second start while it runs is refused (or, on a very fast machine, it has ended: _v3)
            page.locator("#lora_train_start").click()
            expect(page.locator("#lora_train_train_msg")).to_contain_text(re.compile(
                r"training 'my_lora_v2' is running|Started training my_lora_v3"))
            refused = "is running" in page.locator("#lora_train_train_msg").inner_text()
            last = "my_lora_v2" if refused else "my_lora_v3"
            # the job lives in Python: a page opened now (a reopened tab) shows it too
            other = browser.new_page(viewport={"width": 1280, "height": 800})
            other.set_default_timeout(TIMEOUT_MS)
            other.goto(url)
            expect(other.locator("#lora_train_folder textarea")).to_have_value(data)  # remembered
            other.get_by_role("tab", name="Train").click()
            expect(other.locator("#lora_train_status")).to_contain_text(last)
            expect(page.locator("#lora_train_status")).to_contain_text(f"{last}: done")
            expect(other.locator("#lora_train_status")).to_contain_text(f"{last}: done")
            other.close()
            assert plot.get_attribute("src") != first_src, "the loss plot did not change for a new run"

            # ---- Test: grid with the base column
            page.get_by_role("tab", name="Test").click()
            expect(page.locator("#lora_train_tag textarea")).to_have_value(f"<lora:{last}:0.8>")
            for sel, value in (("#lora_train_gen_steps input", "2"), ("#lora_train_seeds textarea", "1"),
                               ("#lora_train_strengths textarea", "1")):
                page.locator(sel).fill(value)
                page.locator(sel).press("Tab")
            page.locator("#lora_train_grid").click()
            expect(page.locator("#lora_train_grid_msg")).to_contain_text("1 row(s) x 2 column(s)")
            expect(page.locator("#lora_train_grid_img img")).to_be_visible()
            box = page.locator("#lora_train_grid_img img").bounding_box()
            assert box and box["width"] > 50 and box["height"] > 20
            page.screenshot(path=os.path.join(ARTIFACTS, "ui_test.png"), full_page=True)
        finally:
            browser.close()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("version", ["3.41.2", "4.40.0"])
def test_send_to_txt2img_js_under_host_gradio(version, tmp_path):
    """The hosts' gradio frontends: the tab served by gradio 3.41.2 (A1111) / 4.40.0 (Forge) with a WebUI-like
    host; "Send to txt2img" calls the page's `loraTrainSendToTxt2img(tag)` (javascript/ of the extension)
    with the `<lora:name:0.8>` tag, and the status poll of the extension's page script runs."""
    _need("playwright (pip install playwright)", _importable("playwright"))
    _need(f"Chromium at {CHROMIUM}", os.path.isfile(CHROMIUM))
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import gradio_venvs
    from playwright.sync_api import expect, sync_playwright

    py = gradio_venvs.ensure(version)
    os.makedirs(ARTIFACTS, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    log = open(tmp_path / "serve.log", "w+", encoding="utf-8")
    proc = subprocess.Popen([py, os.path.join(ROOT, "tests", "webui_build_check.py"), "a1111", "--serve", str(port)],
                            cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"gradio {version} app did not come up:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(60_000)
                # the WebUI loads every file of the extension's javascript/: our poll and card refresh live there
                page.add_init_script(path=os.path.join(ROOT, "javascript", "lora_train.js"))
                page.add_init_script("window.loraTrainSendToTxt2img = function (tag) { window.__sent = tag; };")
                page.goto(url)
                page.locator("button", has_text="Test").first.click()
                expect(page.locator("#lora_train_tag textarea")).to_have_value("<lora:old_style:0.8>")
                page.locator("#lora_train_send").click()
                page.wait_for_function("window.__sent !== undefined")
                assert page.evaluate("window.__sent") == "<lora:old_style:0.8>"
                page.locator("button", has_text="Train").first.click()
                # in the WebUIs the page's script polls (it clicks the hidden #lora_train_poll button, no server
                # timer) and the job held in Python is rendered
                expect(page.locator("#lora_train_status").first).to_contain_text("fake_run: done")
                expect(page.locator("#lora_train_loss img").first).to_be_visible()
                page.screenshot(path=os.path.join(ARTIFACTS, f"ui_gradio_{version}.png"), full_page=True)
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
