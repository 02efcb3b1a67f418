"""The tab's previews, through the real gradio wiring: the timestep histogram beside the timestep
settings follows the chosen distribution, the loss chart carries a run's validation points, and
the note beside the algorithm choice says which loaders read such a file (the same verdicts
`inspect` gives for a file of that algorithm)."""

from __future__ import annotations

import inspect
import re

import pytest

from lora_train_ext.core.bundle import Progress
from lora_train_ext.core.config import RunConfig
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import RunManager, RunRecord
from lora_train_ext.ui import tab


@pytest.fixture(scope="module")
def wired(tmp_path_factory):
    """(host, manager, blocks, {elem_id: block id}) of a real tab."""
    pytest.importorskip("gradio")
    host = StandaloneHost(str(tmp_path_factory.mktemp("host")))
    manager = RunManager(host)
    blocks = tab.build_tab(host, manager, lambda fn, extra=None: fn)
    ids = {b._id: getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    return host, manager, blocks, ids


def _handlers(wired, output_id: str):
    """[(trigger elem_ids, input elem_ids, fn)] of every event whose outputs include
    `output_id`."""
    _, _, blocks, ids = wired
    out = []
    for i, dep in enumerate(blocks.config["dependencies"]):
        if output_id in [ids.get(o) for o in dep["outputs"]]:
            triggers = [ids.get(t[0] if isinstance(t, (list, tuple)) else t)
                        for t in dep["targets"]]
            out.append((triggers, [ids.get(j) for j in dep["inputs"]], blocks.fns[i].fn))
    return out


def _counts(html: str) -> list[int]:
    return [int(c) for c in re.findall(r"data-count='(\d+)'", html)]


TIMESTEP_IDS = ["lora_train_" + p.replace(".", "_") for p in tab.TIMESTEP_FIELDS]


def _preview(wired, **values):
    """Call the timestep preview's handler as gradio would, with the defaults and `values`
    (by setting name) as the form's values."""
    handlers = _handlers(wired, "lora_train_timestep_preview")
    # every timestep setting triggers it, with all of them as its inputs
    assert sorted(t for trig, _, _ in handlers for t in trig) == sorted(TIMESTEP_IDS)
    _, inputs, fn = handlers[0]
    assert inputs == TIMESTEP_IDS
    base = RunConfig()
    args = [values.get(p.split(".")[1], base.get(p)) for p in tab.TIMESTEP_FIELDS]
    return fn(*args)


def test_timestep_histogram_follows_the_distribution(wired):
    uniform = _counts(_preview(wired, timestep_sampling="uniform"))
    logit = _counts(_preview(wired, timestep_sampling="logit_normal"))
    n = tab.TIMESTEP_PREVIEW_DRAWS
    assert len(uniform) == len(logit) == tab.TIMESTEP_PREVIEW_BINS
    assert sum(uniform) == sum(logit) == n
    # uniform: each of the 20 bins near n / 20 (binomial sd ~31 at n = 20000)
    assert all(abs(c - n / 20) < 0.1 * n / 20 for c in uniform), uniform
    # logit-normal (mean 0, std 1): the middle half holds P(|z| < logit(0.75)) = 73%
    middle = slice(5, 15)
    assert sum(logit[middle]) / n == pytest.approx(0.729, abs=0.02)
    assert sum(uniform[middle]) / n == pytest.approx(0.5, abs=0.02)
    assert logit[10] > 2 * logit[0] and logit[10] > 2 * logit[19]
    # a shifted mean moves the mass: logit mean 1 favours the high timesteps
    shifted = _counts(_preview(wired, timestep_sampling="logit_normal", logit_mean=1.0))
    assert sum(shifted[10:]) > 0.75 * n
    # mode sampling at scale 0 is uniform
    mode0 = _counts(_preview(wired, timestep_sampling="mode", mode_scale=0.0))
    assert all(abs(c - n / 20) < 0.1 * n / 20 for c in mode0), mode0


def test_timestep_histogram_follows_the_range_and_names_a_bad_setting(wired):
    html = _preview(wired, timestep_min=200, timestep_max=400)
    assert ">200<" in html and ">400<" in html  # the x axis is the chosen range
    assert ">1000<" in _preview(wired)  # a whole timestep, not 1.00e+03
    assert sum(_counts(html)) == tab.TIMESTEP_PREVIEW_DRAWS
    bad = _preview(wired, timestep_min=500, timestep_max=400)
    assert "loss.timestep_max" in bad and "lora-train-error" in bad and not _counts(bad)
    bad = _preview(wired, timestep_sampling="logit_normal", logit_std=0)
    assert "loss.logit_std" in bad and not _counts(bad)


def _chart_points(html: str, name: str) -> list[tuple[float, float]]:
    found = re.findall(rf"<polyline[^>]*data-name='{name}'[^>]*points='([^']*)'", html)
    assert len(found) == 1, (name, len(found))
    return [tuple(float(v) for v in p.split(",")) for p in found[0].split()]


def test_loss_chart_shows_the_validation_points_of_a_run(wired, demo_dataset):
    """A real (tiny) run measuring the validation loss; the tab's status refresh (the handler
    gradio calls every second) charts those values beside the training loss."""
    host, manager, _, _ = wired
    cfg = RunConfig.from_dict({
        "data": {"dataset_dir": demo_dataset, "resolution": "64", "enable_buckets": False,
                 "validation_count": 1},
        "train": {"max_steps": 3, "dtype": "fp32", "batch_size": 2, "validate_every_steps": 1},
        "optim": {"lr": 0.01}, "network": {"rank": 2}, "save": {"output_name": "val_chart"}})
    record = manager.execute(manager.create(cfg))
    assert record.state == "finished", record.error
    assert [s for s, _ in record.val_history] == [0, 1, 2, 3]
    refresh = [fn for trig, inputs, fn in _handlers(wired, "lora_train_status") if not inputs]
    assert refresh, "no status refresh handler"
    out = refresh[-1]()
    if inspect.isgenerator(out):  # gradio runs `every=1` handlers as a loop: take one turn
        out = next(out)
    status = out[0]
    val = _chart_points(status, "validation")
    raw = _chart_points(status, "raw")
    assert len(val) == 4 and len(raw) == 3
    assert status.count("class='point' data-name='validation'") == 4
    # the same axes: x in step order, y (downwards) ordered as the values
    xs = [x for x, _ in val]
    assert xs == sorted(xs) and xs[0] < raw[0][0]  # step 0 comes before the first step
    values = [v for _, v in record.val_history]
    order = sorted(range(4), key=lambda i: values[i])
    assert sorted(range(4), key=lambda i: -val[i][1]) == order
    assert "validation<" in status  # the legend names it


def test_chart_without_validation_has_no_validation_series(tmp_path):
    manager = RunManager(StandaloneHost(str(tmp_path)))
    record = RunRecord(id="r", config=RunConfig(), state="running")
    manager.runs["r"] = record
    for step in (1, 2):
        manager._on_event(record, Progress("step", step=step, total=2, loss=1.0 / step,
                                           loss_avg=1.0, lr={"unet": 1e-3}, elapsed=step))
    html = tab.run_charts_html(record)
    assert "data-name='raw'" in html and "data-name='validation'" not in html
    manager._on_event(record, Progress("validation", step=2, total=2, loss=0.25))
    assert len(_chart_points(tab.run_charts_html(record), "validation")) == 1


@pytest.mark.parametrize("algo,no,yes", [
    ("ia3", ("comfyui", "forge", "diffusers"), ("webui", "sdnext")),
    ("dora", ("diffusers",), ("webui", "comfyui", "forge")),
    ("boft", ("forge", "sdnext", "diffusers"), ("webui", "comfyui")),
    ("lora", (), ("webui", "forge", "sdnext", "comfyui", "diffusers", "kohya")),
])
def test_the_algorithm_choice_says_which_loaders_read_the_file(wired, algo, no, yes):
    (triggers, inputs, fn), = _handlers(wired, "lora_train_algo_loaders")
    assert triggers == inputs == ["lora_train_network_algo"]
    html = fn(algo)
    verdicts = dict(re.findall(r"data-loader='(\w+)'><b>[^<]*</b>: ([^<]*)</li>", html))
    for loader in no:
        assert verdicts[loader].startswith("no"), (algo, loader, verdicts[loader])
    for loader in yes:
        assert verdicts[loader].startswith("yes"), (algo, loader, verdicts[loader])
    if algo == "dora":
        assert "dora_scale" in html and "before 1.9" in html  # the magnitude some drop
    if algo == "ia3":
        assert "IA3" in html and "ComfyUI" in html


def test_the_tab_and_inspect_give_one_verdict(tmp_path):
    """The note beside the choice and `inspect` of a trained file of each algorithm agree."""
    import torch

    from lora_train_ext.core.config import NetworkConfig
    from lora_train_ext.core.inspect import algo_loader_verdicts, describe, format_report
    from lora_train_ext.core.lora_file import LoraInfo, save_lora
    from lora_train_ext.core.models.tiny import build_bundle
    from lora_train_ext.core.networks import build_network

    roots = build_bundle("sd1", "tiny", seed=0).trainable_roots()
    for algo in ("lora", "ia3", "dora", "loha"):
        cfg = NetworkConfig(algo=algo, rank=2, alpha=1.0, block_filter="MID", train_on="unet")
        net = build_network(roots, "sd1", cfg, seed=1)
        path = str(tmp_path / f"{algo}.safetensors")
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01)
        save_lora(net.kohya_state_dict(), LoraInfo(arch="sd1", algo=algo, rank=2, alpha=1.0),
                  path, save_dtype="fp32", sidecar=False)
        report = describe(path)
        assert report["loaders"] == algo_loader_verdicts(algo), algo
        text = format_report(report)
        for loader, verdict in report["loaders"].items():  # one line per loader
            assert re.search(rf"^  {loader}:\s+{re.escape(verdict)}$", text, re.M), (algo, loader)
