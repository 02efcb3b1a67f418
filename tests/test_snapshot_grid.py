"""Pick the best snapshot: the run's snapshots in order, a grid of snapshots x strengths made
through the host's generation (saved like its grids), and the tags of its cells."""

from __future__ import annotations

import numpy as np

from lora_train_ext.core.config import RunConfig
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import RunManager, lora_tag, snapshot_grid, snapshots_of
from lora_train_ext.ui.tab import tag_table_html


def test_snapshot_grid_rows_are_snapshots_and_cells_differ(tmp_path, demo_dataset):
    host = StandaloneHost(str(tmp_path))
    manager = RunManager(host)
    cfg = RunConfig.from_dict({
        "data": {"dataset_dir": demo_dataset, "resolution": "64", "enable_buckets": False},
        "train": {"max_steps": 4, "dtype": "fp32", "batch_size": 2}, "optim": {"lr": 0.02},
        "network": {"rank": 4}, "save": {"output_name": "best", "save_every_steps": 2}})
    record = manager.execute(manager.create(cfg))
    assert record.state == "finished", record.error
    names = snapshots_of(host, "best")
    assert names == ["best-step00000002", "best"]  # oldest first, the final file last
    grid, tags = snapshot_grid(host, names, [0.0, 1.0], "shp style, red circle", "", 7,
                               steps=3, width=64, height=64)
    assert tags == ["<lora:best-step00000002:0>", "<lora:best-step00000002:1>",
                    "<lora:best:0>", "<lora:best:1>"]
    cells = np.asarray(grid.convert("RGB"), dtype=np.int16)
    w, h = 64, 64
    label_w, label_h, pad = max(60, w // 3), max(18, h // 8), 4

    def cell(r, c):
        x, y = label_w + c * (w + pad), label_h + r * (h + pad)
        return cells[y:y + h, x:x + w]

    assert np.array_equal(cell(0, 0), cell(1, 0))  # strength 0: the base model in both rows
    assert np.abs(cell(0, 1) - cell(0, 0)).mean() > 0.5  # the snapshot changes the image
    assert np.abs(cell(1, 1) - cell(0, 1)).mean() > 0.1  # later weights draw differently
    html = tag_table_html(names, [0.0, 1.0], tags, "grid.png")
    assert html.count("class='lora-train-tag'") == 4 and "&lt;lora:best:1&gt;" in html
    assert lora_tag("x", 0.5, te=0.0, unet=1.0) == "<lora:x:te=0:unet=0.5>"


def test_grids_take_negative_strengths_for_sliders():
    """A slider's grid runs from -2 to +2: the strength lists and the tags keep the sign (the
    WebUI's Lora extension reads `<lora:NAME:-2>` and `unet=-2` as negative multipliers)."""
    from lora_train_ext.runs import lora_prompt, parse_strengths

    assert parse_strengths("-2, -1, 0, 1, 2", "strengths") == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert parse_strengths("-0.5;+1.5", "strengths") == [-0.5, 1.5]
    assert lora_tag("slider", -2.0) == "<lora:slider:-2>"
    # a negative strength with a TE split of 0 is "te=0", not "te=-0"
    assert lora_tag("slider", -1.5, te=0.0, unet=1.0) == "<lora:slider:te=0:unet=-1.5>"
    assert lora_prompt("slider", 0.0, -2.0) == "<lora:slider:te=0:unet=-2>"
