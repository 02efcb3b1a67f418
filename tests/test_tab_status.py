"""What the tab shows while runs train: the run that is training (not the newest queued one), a
message that follows the run, charts with axes, labels and legends, unique labels (the WebUI's
ui-config.json keys its saved defaults by label), and the test panel's LoRA list at page load."""

from __future__ import annotations

import collections
import re

import pytest

from lora_train_ext.core.bundle import Progress
from lora_train_ext.core.config import RunConfig
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import RunManager, RunRecord
from lora_train_ext.ui import tab
from lora_train_ext.ui.chart import line_chart_svg, loss_chart_svg


def _record(manager, name, state, created):
    cfg = RunConfig()
    cfg.save.output_name = name
    record = RunRecord(id=name, config=cfg, state=state, created=created)
    manager.runs[record.id] = record
    return record


def test_status_shows_the_run_that_trains_not_the_newest_queued(tmp_path):
    manager = RunManager(StandaloneHost(str(tmp_path)))
    _record(manager, "old_done", "finished", 1.0)
    running = _record(manager, "training_now", "running", 2.0)
    _record(manager, "waiting", "queued", 3.0)
    manager._on_event(running, Progress("step", step=3, total=10, loss=0.5, loss_avg=0.5,
                                        lr={"unet": 1e-4}, elapsed=3.0, eta=7.0))
    assert manager.current() is running
    html = tab.status_html(manager)
    assert "<b>training_now</b>: running" in html and "step 3/10" in html
    assert "1 more queued" in html and "waiting</b>" not in html
    running.state = "finished"
    assert manager.current().id == "waiting"  # then the queued one, before older ones


def test_the_message_follows_the_run_after_caching(tmp_path):
    manager = RunManager(StandaloneHost(str(tmp_path)))
    record = _record(manager, "r", "running", 1.0)
    manager._on_event(record, Progress("log", message="caching latents 8/8"))
    assert record.message == "caching latents 8/8"
    manager._on_event(record, Progress("step", step=1, total=4, loss=1.0, loss_avg=1.0,
                                       lr={"unet": 1e-3}, elapsed=2.0))
    assert record.message == "training" and record.to_json()["message"] == "training"


def test_step_events_feed_speed_lr_and_memory_charts(tmp_path):
    manager = RunManager(StandaloneHost(str(tmp_path)))
    record = _record(manager, "r", "running", 1.0)
    record.config.train.batch_size, record.config.train.grad_accum = 2, 3
    for step, elapsed in ((1, 2.0), (2, 4.0), (3, 5.0)):
        manager._on_event(record, Progress("step", step=step, total=3, loss=1.0 / step,
                                           loss_avg=1.0, lr={"unet": 1e-3 * step, "te": 5e-4},
                                           elapsed=elapsed))
    assert record.speed_history == [(1, 3.0), (2, 3.0), (3, 6.0)]  # 6 images per step
    assert [s for s, _ in record.memory_history] == [1, 2, 3]
    assert all(m > 0 for _, m in record.memory_history)
    html = tab.run_charts_html(record)
    assert html.count("<svg") == 4
    for title in ("Loss", "Learning rate", "Speed", "Memory"):
        assert f">{title}" in html
    names = re.findall(r"class='legend'[^>]*>([^<]+)<", html)
    assert {"raw", "smoothed", "unet", "te", "images/s", "MiB"} <= set(names)


def test_chart_has_axes_labels_legend_and_scales_to_its_data():
    svg = line_chart_svg("Loss", {"a": [(0, 1.0), (10, 3.0)], "b": [(0, 2.0), (10, float("nan"))]},
                         x_label="step", y_label="loss")
    assert ">step<" in svg and ">loss<" in svg and ">Loss<" in svg
    assert ">3<" in svg and ">1<" in svg  # the y range is the data's
    assert svg.count("class='legend'") == 2
    points = re.findall(r"data-name='b'[^>]*points='([^']*)'", svg)[0].split()
    assert len(points) == 1  # the NaN point is left out
    assert loss_chart_svg([]) == ""


def test_tab_labels_are_unique_and_the_lora_list_is_read_at_page_load(tmp_path):
    pytest.importorskip("gradio")
    host = StandaloneHost(str(tmp_path))
    blocks = tab.build_tab(host, RunManager(host), lambda fn, extra=None: fn)
    labels = [b.label for b in blocks.blocks.values()
              if getattr(b, "label", None) and type(b).__name__ not in ("Button", "Accordion")]
    repeated = [label for label, n in collections.Counter(labels).items() if n > 1]
    assert not repeated, f"labels used twice (the WebUI's ui-config.json would mix them): {repeated}"
    ids = {b._id: getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    load_outputs = [ids.get(o) for dep in blocks.config["dependencies"]
                    if any((t[1] if isinstance(t, (list, tuple)) else None) == "load"
                           for t in dep["targets"]) or dep.get("trigger") == "load"
                    for o in dep["outputs"]]
    assert "lora_train_test_lora" in load_outputs
    assert "lora_train_model" in load_outputs  # the model line too (Forge chooses it later)


def test_the_model_line_follows_the_host(monkeypatch, tmp_path):
    """Forge builds the tab while no checkpoint is chosen; the line reads the model when asked."""
    import fake_forge
    from lora_train_ext.host.forge import ForgeHost

    fake = fake_forge.install("sd1", monkeypatch, tmp_path, placeholder=True)
    host = ForgeHost()
    params = fake.sd_models.model_data.forge_loading_parameters
    chosen = params["checkpoint_info"]
    params["checkpoint_info"] = None
    assert tab.model_line(host) == "**Model:** (none) (unknown) — no checkpoint is chosen"
    params["checkpoint_info"] = chosen
    assert tab.model_line(host) == "**Model:** fake_forge_sd1 (sd1)"
    fake.sd_models.forge_model_reload()
    assert tab.model_line(host) == "**Model:** fake_forge_sd1 (sd1)"
    fake.shared.sd_model.is_inpaint = True
    assert "inpainting and depth models cannot be trained" in tab.model_line(host)


def test_pause_button_says_resume_for_a_run_paused_elsewhere(tmp_path):
    """A run paused through the API (or a page reloaded during a pause): the button the tab
    refreshes every second reads Resume, and Pause and test again once the run goes on."""
    manager = RunManager(StandaloneHost(str(tmp_path)))
    assert tab.pause_label(manager) == "Pause and test"  # no run at all
    run = _record(manager, "r", "running", 1.0)
    assert tab.pause_label(manager) == "Pause and test"
    run.control.request_pause()  # the API's /pause: pausing at the next step
    assert tab.pause_label(manager) == "Resume"
    run.state = "paused"
    assert tab.pause_label(manager) == "Resume"
    run.control.request_resume()
    run.state = "running"
    assert tab.pause_label(manager) == "Pause and test"
    run.state = "finished"
    assert tab.pause_label(manager) == "Pause and test"
