"""The tab inside a real AUTOMATIC1111 WebUI (run when A1111_DIR points at a 1.10.1 checkout; skipped otherwise).

Seen with AUTOMATIC1111 1.10.1 (`fetch kklouzal/stable-diffusion-webui`, commit 82a973c0) and a venv beside it
(torch 2.13.0 CPU, its requirements_versions.txt, openai-clip, diffusers/peft as our install.py picks them), with
its repositories/ (assets, stable-diffusion-stability-ai, generative-models, k-diffusion, BLIP) in place. The python
is $A1111_PYTHON, else $A1111_DIR/venv/bin/python. The WebUI runs headless on the CPU with
--skip-prepare-environment in a temporary --data-dir (our repo symlinked into its extensions/, models/ and
cache.json fresh), so nothing is written into the checkout except the cached random-weight SD1.5 checkpoint
(models/Stable-diffusion/, made once). The CLIP tokenizer and text-encoder config the WebUI asks the hub for come
from our bundled configs in a temporary HF_HOME (offline).

What it checks (issue #14), in headless Chromium (Playwright, /usr/bin/chromium) and over HTTP:
  1. first launch with a never-hashed checkpoint: the tab's Start training trains (2 steps, 64 px) after the
     WebUI has hashed the checkpoint (its title became `name [hash]` after the tab was built);
  2. the extra networks' Lora cards list the new LoRA without a click on their refresh button, while the user
     waits on txt2img (the LoRA Train tab not shown when the run ends);
  3. Settings -> Reload UI (WebUI started without --api) returns within a minute with the tab working;
  4. ui-config.json holds distinct defaults for the LR finder's and the Test section's steps (100 / 20) and no
     value naming a LoRA (the test prompt / tag of the last run);
  5. a second launch with --api: txt2img with `<lora:NAME:0.8>` applies it (no unmatched keys in the DEBUG log,
     "Lora hashes" in the infotext) and its picture differs from the one without the LoRA.
Set LORA_TRAIN_REAL_KEEP=1 to keep the data directory and logs for inspection.
"""
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A1111 = os.environ.get("A1111_DIR", "")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from real_hosts import CHROMIUM, CHROMIUM_ARGS as ARGS, SD15_NAME  # noqa: E402  (shared by the real-host tests)
from real_hosts import free_port as _free_port, http_json as _http, sd15_checkpoint as _sd15_checkpoint  # noqa: E402

pytestmark = [pytest.mark.frontend,
              pytest.mark.skipif(not A1111, reason="set A1111_DIR to an AUTOMATIC1111 checkout with its venv to run")]
LORA_NAME = "real_a1111"


def say(*a):
    print("[real-a1111]", *a, flush=True)


def _fake_hf_home(path):
    """The hub cache entry `openai/clip-vit-large-patch14` that ldm's FrozenCLIPEmbedder asks for: our bundled
    tokenizer files and SD1.5 text-encoder config (the WebUI's weights come from the checkpoint)."""
    from lora_train.models.single_file import bundled_config_dir

    repo = os.path.join(path, "hub", "models--openai--clip-vit-large-patch14")
    rev = "0" * 40
    snap = os.path.join(repo, "snapshots", rev)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(rev)
    tok = os.path.join(os.path.dirname(bundled_config_dir("sd15")), "clip_tokenizer")
    for f in os.listdir(tok):
        shutil.copy(os.path.join(tok, f), snap)
    shutil.copy(os.path.join(bundled_config_dir("sd15"), "text_encoder", "config.json"), snap)
    return path


class WebUI:
    def __init__(self, data, hf_home, extra, tag):
        self.py = os.environ.get("A1111_PYTHON") or os.path.join(A1111, "venv", "bin", "python")
        assert os.path.isfile(os.path.join(A1111, "launch.py")), f"{A1111} is not an AUTOMATIC1111 checkout"
        assert os.path.isfile(self.py), f"no python for the WebUI at {self.py}: set A1111_PYTHON"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(data, f"webui-{tag}.log")
        self.logf = open(self.log_path, "w")
        cmd = [self.py, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check",
               "--use-cpu", "all", "--no-half", "--precision", "full", "--server-name", "127.0.0.1",
               "--port", str(self.port), "--data-dir", data] + extra
        env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        say("starting:", " ".join(cmd))
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=A1111, stdout=self.logf, stderr=subprocess.STDOUT, env=env)

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def wait_log(self, pattern, timeout, start=0):
        """Waits for a regex in the log (from character `start`); returns the match."""
        t0 = time.time()
        while True:
            m = re.search(pattern, self.log()[start:])
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"the WebUI exited ({self.proc.returncode}):\n" + self.log()[-5000:])
            if time.time() - t0 > timeout:
                raise AssertionError(f"no {pattern!r} in the WebUI log after {timeout} s:\n" + self.log()[-5000:])
            time.sleep(1)

    def wait_up(self, timeout=900):
        self.wait_log(r"Startup time: ", timeout)
        say(f"WebUI up on port {self.port} after {time.time() - self.t0:.0f} s")
        m = self.wait_log(r"Model loaded in [0-9.]+s", timeout)
        say(f"model loaded ({m.group(0)}) {time.time() - self.t0:.0f} s after the start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.logf.close()


@pytest.fixture(scope="module")
def env():

    t0 = time.time()
    ckpt = _sd15_checkpoint(os.path.join(A1111, "models", "Stable-diffusion", SD15_NAME))
    say(f"SD1.5-architecture random checkpoint: {ckpt} ({os.path.getsize(ckpt) / 1e9:.2f} GB, {time.time() - t0:.0f} s)")
    data = tempfile.mkdtemp(prefix="a1111_data_")
    for d in ("extensions", "models/Stable-diffusion", "models/Lora"):
        os.makedirs(os.path.join(data, d), exist_ok=True)
    os.symlink(ROOT, os.path.join(data, "extensions", "lora_train"))
    os.symlink(ckpt, os.path.join(data, "models", "Stable-diffusion", SD15_NAME))  # no cache.json: never hashed
    from lora_train.data.demo import write_demo_dataset

    dataset = write_demo_dataset(os.path.join(data, "lora_train_dataset"), n=2, size=64)
    hf = _fake_hf_home(os.path.join(data, "hf_home"))

    class Env:
        pass

    e = Env()
    e.data, e.dataset, e.hf, e.servers = data, dataset, hf, []
    yield e
    for s in e.servers:
        s.stop()
    if os.environ.get("LORA_TRAIN_REAL_KEEP"):
        say("kept", data)
    else:
        shutil.rmtree(data, ignore_errors=True)


def _need_browser():
    import importlib.util

    if importlib.util.find_spec("playwright") is None or not os.path.isfile(CHROMIUM):
        pytest.fail(f"A1111_DIR is set but playwright or Chromium ({CHROMIUM}) is missing: "
                    f"apt-get install -y chromium; pip install playwright")


def q(page, sel):
    """First match: gradio 3 puts a Markdown's elem_id on two nested elements."""
    return page.locator(sel).first


LABEL_JS = "el => (el.querySelector('[data-testid=block-info]') || el.querySelector('label span') || el).textContent.trim()"


def tab(page, scope, name):
    """Clicks the tab button named exactly `name` in the tab bar(s) under `scope`."""
    page.locator(f"{scope} .tab-nav button").filter(has_text=re.compile(rf"^\s*{re.escape(name)}\s*$")).first.click()


def _ui_config(data):
    with open(os.path.join(data, "ui-config.json"), encoding="utf-8") as fh:
        return {k: v for k, v in json.load(fh).items() if k.startswith("lora_train/")}


def test_real_a1111_tab_train_cards_reload_uiconfig(env):
    _need_browser()
    from playwright.sync_api import expect, sync_playwright

    s = WebUI(env.data, env.hf, [], "ui")
    env.servers.append(s)
    s.wait_up()
    log = s.log()
    assert "Calculating sha256 for " in log, "the checkpoint was hashed before: not a first launch"
    title = re.search(r"Loading weights \[([0-9a-f]{10})\]", log).group(1)
    say(f"checkpoint hashed after the UI was built: title now '{SD15_NAME} [{title}]'")
    assert "[lora_train]" not in log or "could not be built" not in log, log[-4000:]

    problems = []  # every item is checked even when an earlier one fails (each is a separate defect)

    def check(ok, what):
        if not ok:
            problems.append(what)
            say("PROBLEM:", what)
        return ok

    finder_steps = gen_steps = finder_after = gen_after = None
    labels = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.set_default_timeout(120_000)
            expect.set_options(timeout=120_000)
            page.goto(s.url)
            tab(page, "#tabs >", "LoRA Train")

            # ---- item 1: dataset, small settings, Start training with the Base model field as built
            q(page, "#lora_train_folder textarea").fill(env.dataset)
            q(page, "#lora_train_load").click()
            expect(q(page, "#lora_train_ds_status")).to_contain_text("2 image(s)")
            tab(page, "#tab_lora_train", "Settings")
            base = q(page, "#lora_train_base input").input_value()
            say(f"Base model field (built before the hash was known): {base!r}")
            q(page, "#lora_train_name textarea").fill(LORA_NAME)
            for sel, value in (("#lora_train_max_steps input", "2"), ("#lora_train_lr input", "0.01"),
                               ("#lora_train_warmup input", "0"), ("#lora_train_save_every input", "0"),
                               ("#lora_train_batch input", "1"), ("#lora_train_accum input", "1"),
                               ("#lora_train_resolution input", "64")):
                q(page, sel).fill(value)
                q(page, sel).press("Tab")
            tab(page, "#tab_lora_train", "Train")
            t0 = time.time()
            q(page, "#lora_train_start").click()
            msg = q(page, "#lora_train_train_msg")
            expect(msg).to_contain_text(re.compile("Started training|Cannot do that|Error"))
            say("Start training:", msg.inner_text().strip()[:400])
            if not check(f"Started training {LORA_NAME}" in msg.inner_text(),
                         f"item 1: Start training with Base model {base!r} refused: {msg.inner_text().strip()[:300]}"):
                # go on with the hashed title typed in, to check the other items
                tab(page, "#tab_lora_train", "Settings")
                q(page, "#lora_train_base input").fill(f"{SD15_NAME} [{title}]")
                q(page, "#lora_train_base input").press("Enter")
                q(page, "#lora_train_base input").press("Tab")
                say("Base model field now:", repr(q(page, "#lora_train_base input").input_value()))
                tab(page, "#tab_lora_train", "Train")
                t0 = time.time()
                q(page, "#lora_train_start").click()
                expect(msg).to_contain_text(f"Started training {LORA_NAME}")
            lora = os.path.join(env.data, "models", "Lora", LORA_NAME + ".safetensors")

            # ---- item 4: the user waits on txt2img's Lora cards while it trains; no refresh click
            tab(page, "#tabs >", "txt2img")
            tab(page, "#txt2img_extra_tabs", "Lora")
            card = page.locator(f"#txt2img_lora_cards .card[data-name='{LORA_NAME}']")
            deadline = time.time() + 900
            while not os.path.isfile(lora) and time.time() < deadline and s.proc.poll() is None:
                time.sleep(2)
            say(f"{LORA_NAME}.safetensors published {time.time() - t0:.0f} s after Start")
            deadline = time.time() + 30
            while card.count() == 0 and time.time() < deadline:
                time.sleep(1)
            names = page.locator("#txt2img_lora_cards .card").evaluate_all("els => els.map(e => e.dataset.name)")
            say(f"Lora cards shown in txt2img 30 s later (no refresh click, LoRA Train tab not visited): {names}")
            cards_ok = check(card.count() == 1, f"item 4: the Lora cards do not list {LORA_NAME} (the user waited "
                                                f"on txt2img, no refresh click): {names}")

            # ---- back in the tab: the run is done
            tab(page, "#tabs >", "LoRA Train")
            tab(page, "#tab_lora_train", "Train")
            expect(q(page, "#lora_train_status")).to_contain_text(re.compile(r"done|failed|error"),
                                                                   timeout=900_000)
            status = q(page, "#lora_train_status").inner_text().strip()
            say(f"training status {time.time() - t0:.0f} s after Start: {status[:400]}")
            assert "done" in status, status
            assert os.path.isfile(lora), os.listdir(os.path.join(env.data, "models", "Lora"))
            from safetensors import safe_open

            with safe_open(lora, framework="pt") as fh:
                keys, meta = list(fh.keys()), fh.metadata()
            say(f"saved {lora}: {len(keys)} tensors, ss_steps={meta.get('ss_steps')}, "
                f"unet modules {sum(k.startswith('lora_unet_') and k.endswith('.alpha') for k in keys)}, "
                f"te modules {sum(k.startswith('lora_te_') and k.endswith('.alpha') for k in keys)}")
            if not cards_ok:  # diagnosis: does a visit to the tab refresh them?
                time.sleep(5)
                tab(page, "#tabs >", "txt2img")
                tab(page, "#txt2img_extra_tabs", "Lora")
                time.sleep(5)
                names = page.locator("#txt2img_lora_cards .card").evaluate_all("els => els.map(e => e.dataset.name)")
                say(f"Lora cards after a visit to the LoRA Train tab: {names}")
                tab(page, "#tabs >", "LoRA Train")

            # ---- item 3 (first build): the two steps fields show their own defaults
            tab(page, "#tab_lora_train", "Settings")
            finder_steps = q(page, "#lora_train_finder_steps input").input_value()
            labels["finder"] = q(page, "#lora_train_finder_steps").evaluate(LABEL_JS)
            tab(page, "#tab_lora_train", "Test")
            gen_steps = q(page, "#lora_train_gen_steps input").input_value()
            labels["test"] = q(page, "#lora_train_gen_steps").evaluate(LABEL_JS)
            say(f"steps fields as built: LR finder {finder_steps} (label {labels['finder']!r}), "
                f"Test {gen_steps} (label {labels['test']!r})")
            check((finder_steps, gen_steps) == ("100", "20"),
                  f"item 3: steps fields as built show LR finder {finder_steps}, Test {gen_steps} (want 100, 20)")

            # ---- item 2: Settings -> Reload UI returns within a minute, the tab works
            mark = len(s.log())
            tab(page, "#tabs >", "Settings")
            t0 = time.time()
            page.locator("#settings_restart_gradio").click()
            try:
                s.wait_log(r"Startup time: ", 180, start=mark)
                reload_s = time.time() - t0
            except AssertionError:
                tail = s.log()[mark:][-1500:]
                check(False, f"item 2: Reload UI: no new start within 180 s; log since the click:\n{tail}")
                reload_s = None
            if reload_s is not None:
                say(f"Reload UI: the WebUI started again {reload_s:.1f} s after the click")
                check(reload_s < 60, f"item 2: Reload UI took {reload_s:.0f} s")
                page.wait_for_selector("#tabs > .tab-nav button:has-text('LoRA Train')", timeout=120_000)
                tab(page, "#tabs >", "LoRA Train")
                tab(page, "#tab_lora_train", "Train")
                expect(q(page, "#lora_train_status")).to_contain_text(f"{LORA_NAME}: done", timeout=60_000)
                tab(page, "#tab_lora_train", "Dataset")
                q(page, "#lora_train_folder textarea").fill(env.dataset)
                q(page, "#lora_train_load").click()
                expect(q(page, "#lora_train_ds_status")).to_contain_text("2 image(s)", timeout=60_000)
                say("after Reload UI: the tab shows the finished run and loads the dataset")
                tab(page, "#tab_lora_train", "Settings")
                finder_after = q(page, "#lora_train_finder_steps input").input_value()
                tab(page, "#tab_lora_train", "Test")
                gen_after = q(page, "#lora_train_gen_steps input").input_value()
                say(f"steps fields after Reload UI: LR finder {finder_after}, Test {gen_after}")
                check((finder_after, gen_after) == ("100", "20"),
                      f"item 3: after Reload UI the steps fields show {finder_after}, {gen_after} (want 100, 20)")
        except BaseException:
            if os.environ.get("LORA_TRAIN_REAL_KEEP"):
                page.screenshot(path=os.path.join(env.data, "failure.png"), full_page=True)
            raise
        finally:
            browser.close()

    # ---- item 3: ui-config.json (written at each UI build: the first launch and the Reload UI after the run)
    cfg = _ui_config(env.data)
    say("ui-config.json lora_train values:", json.dumps({k: v for k, v in cfg.items() if k.endswith("/value")}))
    # the WebUI's key is `<tab id>/<label>/value` (elem_id plays no part): the two fields need their own labels
    keys = {k: f"lora_train/{labels.get(k)}/value" for k in ("finder", "test")}
    saved = {k: cfg.get(v) for k, v in keys.items()}
    say(f"ui-config.json: {keys['finder']} = {saved['finder']}, {keys['test']} = {saved['test']}")
    check(keys["finder"] != keys["test"] and saved == {"finder": 100, "test": 20},
          f"item 3: ui-config.json steps defaults {saved} under {keys} (want 100 and 20 under distinct keys)")
    volatile = {k: v for k, v in cfg.items() if isinstance(v, str) and "<lora:" in v}
    check(not volatile, f"item 3: ui-config.json holds values naming a LoRA: {volatile}")
    assert not problems, "\n".join(problems)


def test_real_a1111_txt2img_applies_the_lora(env):
    lora = os.path.join(env.data, "models", "Lora", LORA_NAME + ".safetensors")
    if not os.path.isfile(lora):
        pytest.skip("the tab's training did not leave a LoRA (see the test above)")
    for s in env.servers:
        s.stop()
    s = WebUI(env.data, env.hf, ["--api", "--loglevel", "DEBUG"], "api")
    env.servers.append(s)
    s.wait_up()
    loras = _http(s.url + "/sdapi/v1/loras")
    assert LORA_NAME in [x["name"] for x in loras], loras
    from PIL import Image

    def gen(prompt):
        r = _http(s.url + "/sdapi/v1/txt2img", dict(prompt=prompt, negative_prompt="", steps=2, width=64, height=64,
                                                    seed=1, cfg_scale=5, sampler_name="Euler", batch_size=1),
                  timeout=900)
        img = Image.open(io.BytesIO(base64.b64decode(r["images"][0]))).convert("RGB")
        return img, json.loads(r["info"])

    mark = len(s.log())
    t0 = time.time()
    plain, _ = gen("zq, a house")
    with_lora, info = gen(f"zq, a house <lora:{LORA_NAME}:0.8>")
    log = s.log()[mark:]
    say(f"txt2img without / with <lora:{LORA_NAME}:0.8>: {time.time() - t0:.0f} s; infotext: "
        f"{info.get('infotexts', [''])[0][-300:]!r}")
    bad = [ln for ln in log.splitlines() if "didn't match keys" in ln or "Lora not found" in ln
           or "Networks with errors" in ln or "loading network" in ln]
    assert not bad, bad[:5]
    assert "Lora hashes" in json.dumps(info), info
    diff = sum(abs(a - b) for pa, pb in zip(plain.getdata(), with_lora.getdata()) for a, b in zip(pa, pb))
    say(f"sum of |pixel differences| with vs without the LoRA: {diff}")
    assert diff > 0, "the LoRA changed nothing"
