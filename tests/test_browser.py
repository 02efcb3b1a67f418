"""The tab in a real browser (Debian's chromium, headless, driven by playwright) against
`python -m lora_train_ext preview`: fill in the demo dataset, train, watch progress, see the
file, run a 2x2 TE/UNet grid.

Every wait is for a state (the page answers, a text appears, the run ends) with one generous
bound, WAIT_S: on a busy 2-core machine the grid alone took over 180 s. Nothing races a short
fixed timeout, playwright's own 5 s / 30 s defaults included."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WAIT_S = 600  # the bound of every wait below: generous, since each ends as soon as its state is
WAIT_MS = WAIT_S * 1000
ERROR_WATCH = """() => {
  window.__loraTrainErrors = [];
  const keep = () => document.querySelectorAll('#lora_train_status .lora-train-error').forEach(
    (e) => { if (!window.__loraTrainErrors.includes(e.innerText)) window.__loraTrainErrors.push(e.innerText); });
  new MutationObserver(keep).observe(document.body, {subtree: true, childList: true,
                                                     characterData: true});
}"""


def _need(condition: bool, why: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(why + " (CI must install it: see .ci/setup)")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def preview(tmp_path):
    _need(CHROMIUM is not None, "chromium is not installed")
    try:
        import gradio  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as e:
        _need(False, f"{e.name} is not installed")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "preview.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lora_train_ext", "preview", "--port", str(port),
                             "--out", str(tmp_path / "out")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=30)  # one poll; a busy machine renders slowly
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    else:
        proc.kill()
    if proc.poll() is not None:
        pytest.fail("preview did not start:\n" + (tmp_path / "preview.log").read_text())
    yield url, tmp_path / "out"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _log_tail(out: Path, lines: int = 40) -> str:
    """The end of the preview server's log, for a failure message."""
    try:
        return "\n--- preview log ---\n" + "\n".join(
            (out.parent / "preview.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _set(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(value)
    box.press("Tab")


def test_train_then_grid_in_the_browser(preview):
    from playwright.sync_api import expect, sync_playwright

    url, out = preview
    dataset = str(ROOT / "lora_train_ext" / "demo_data")
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)  # fill / click / inner_text wait for their element
        page.set_default_navigation_timeout(WAIT_MS)
        page.goto(url)
        expect(page.locator("#lora_train_model").first).to_contain_text("tiny-sd1")

        _set(page, "lora_train_data_dataset_dir", dataset)
        _set(page, "lora_train_save_output_name", "browser_lora")
        page.get_by_text("Training", exact=True).click()
        _set(page, "lora_train_train_max_steps", "30")
        page.get_by_text("Optimizer and learning rate", exact=True).click()
        _set(page, "lora_train_optim_lr", "0.01")
        page.get_by_text("Samples", exact=True).click()
        _set(page, "lora_train_sample_prompts", "shp style, red circle --s 2")
        _set(page, "lora_train_sample_every_steps", "10")
        page.get_by_text("Saving", exact=True).click()
        _set(page, "lora_train_save_save_every_steps", "10")

        page.locator("#lora_train_check").click()
        report = page.locator("#lora_train_dataset_report textarea")
        expect(report).to_have_value(re.compile(r"readable image|error"))  # the check's answer
        assert "8 readable image(s)" in report.input_value(), report.input_value()

        # a refused start shows its error in the status only until the next refresh (1 s): keep
        # every error that appears there, so that the wait ends on it instead of the bound
        page.evaluate(ERROR_WATCH)
        page.locator("#lora_train_start").click()
        status = page.locator("#lora_train_status").first
        seen_step = False
        errors: list[str] = []
        deadline = time.time() + WAIT_S
        while time.time() < deadline:
            text = status.inner_text()
            seen_step = seen_step or ("step " in text and "running" in text)
            errors = page.evaluate("window.__loraTrainErrors")
            if "finished" in text or "failed" in text or errors:
                break
            time.sleep(0.3)
        text = status.inner_text()
        assert not errors, f"the run was refused or failed: {errors}" + _log_tail(out)
        assert "finished" in text, text + _log_tail(out)
        assert seen_step, "no live progress was shown while training"
        assert "browser_lora.safetensors" in text
        assert (out / "Lora" / "browser_lora.safetensors").is_file()
        charts = page.locator("#lora_train_status svg")
        assert charts.count() == 4, charts.count()  # loss, learning rate, speed, memory
        assert "Loss" in charts.first.inner_html()
        # samples made while training: at the start, every 10 steps and at the end
        expect(page.locator("#lora_train_samples img").nth(3)).to_be_attached()
        assert len(list((out / "runs" / "samples").glob("browser_lora-step*.png"))) == 4

        expect(page.locator("#lora_train_test_lora input").first).to_have_value("browser_lora")
        _set(page, "lora_train_test_prompt", "shp style, red circle")
        _set(page, "lora_train_test_steps", "3")
        _set(page, "lora_train_test_size", "64")
        page.locator("#lora_train_test_run").click()
        info = page.locator("#lora_train_test_info").first
        # the grid's answer or its error (while it works, gradio shows "processing | ...")
        expect(page.locator("#lora_train_test_info .lora-train-message, "
                            "#lora_train_test_info .lora-train-error").first).to_be_visible()
        assert "4 images" in info.inner_text(), info.inner_text() + _log_tail(out)
        expect(info).to_contain_text("rows TE [0.0, 1.0], columns UNet [0.0, 1.0]")
        img = page.locator("#lora_train_test_grid img").first
        src = img.get_attribute("src")
        if src.startswith("data:"):
            data = base64.b64decode(src.split(",", 1)[1])
        else:
            data = urllib.request.urlopen(src if src.startswith("http") else url + src).read()
        from PIL import Image

        grid = Image.open(io.BytesIO(data))
        assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64  # 2x2 cells plus labels

        # pick the best snapshot: snapshots (rows) x strengths (columns), tags to copy
        page.get_by_text("Pick the best snapshot (snapshots x strengths)", exact=True).click()
        _set(page, "lora_train_snapshot_strengths", "0.5, 1")
        page.locator("#lora_train_snapshot_run").click()
        expect(page.locator("#lora_train_test_info .lora-train-tags, "
                            "#lora_train_test_info .lora-train-error").first).to_be_visible()
        tags = page.locator("#lora_train_test_info button.lora-train-tag")
        assert tags.count() == 6, info.inner_text() + _log_tail(out)  # 3 files x 2 strengths
        assert "<lora:browser_lora-step00000010:0.5>" in tags.first.inner_text()
        page.screenshot(path=str(out / "tab.png"), full_page=True)
        browser.close()


def _choose(page, elem_id: str, value: str) -> None:
    """Pick `value` in a gradio dropdown: open it, click the option (3.41: a
    data-testid='dropdown-option' item; 4.x: role='option'), both labelled with the value."""
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f"#{elem_id} [data-testid='dropdown-option'][aria-label='{value}'], "
                 f"#{elem_id} [role='option'][aria-label='{value}']").first.click()


def test_timestep_preview_and_loader_note_follow_the_form(preview):
    """The histogram under the timestep settings is redrawn when the distribution changes,
    and the note under the algorithm choice when the algorithm does: in the browser, through
    gradio's own events."""
    from playwright.sync_api import expect, sync_playwright

    url, out = preview
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.set_default_navigation_timeout(WAIT_MS)
        page.goto(url)
        expect(page.locator("#lora_train_model").first).to_contain_text("tiny-sd1")
        page.get_by_text("Loss and noise", exact=True).click()
        preview_box = page.locator("#lora_train_timestep_preview").first
        expect(preview_box).to_contain_text("50% of the steps")  # uniform, the default
        _choose(page, "lora_train_loss_timestep_sampling", "logit_normal")
        expect(preview_box).to_contain_text("73% of the steps")
        bars = preview_box.locator("rect.bar")
        assert bars.count() == 20
        heights = [float(bars.nth(i).get_attribute("height")) for i in range(20)]
        assert heights[10] > 2 * heights[0] and heights[10] > 2 * heights[19], heights
        page.get_by_text("Network", exact=True).click()
        loaders = page.locator("#lora_train_algo_loaders").first
        expect(loaders).to_contain_text("Who reads a lora file")
        _choose(page, "lora_train_network_algo", "ia3")
        expect(loaders).to_contain_text("Who reads a ia3 file")
        assert "ComfyUI: no" in loaders.inner_text(), loaders.inner_text()
        page.screenshot(path=str(out.parent / "previews.png"), full_page=True)
        browser.close()
