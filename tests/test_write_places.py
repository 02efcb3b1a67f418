"""A run writes only under its configured folders: the Lora (output) folder gets what the Lora
cards show, the run folder the run's own files (state, history, samples, latent cache), the
dataset folder nothing; checked by listing the whole tree around a run."""

from __future__ import annotations

import os
import shutil

from lora_train_ext.core.config import RunConfig
from lora_train_ext.host.standalone import StandaloneHost
from lora_train_ext.runs import RunManager


def _tree(root) -> set[str]:
    out = set()
    for folder, _, files in os.walk(root):
        for f in files:
            out.add(os.path.relpath(os.path.join(folder, f), root))
    return out


def test_files_go_to_the_lora_folder_or_the_run_folder_and_nowhere_else(tmp_path, demo_dataset):
    data = tmp_path / "my_images"
    shutil.copytree(demo_dataset, data)
    host = StandaloneHost(str(tmp_path / "webui"))
    manager = RunManager(host)
    before = _tree(tmp_path)
    cfg = RunConfig.from_dict({
        "data": {"dataset_dir": str(data), "resolution": "64", "enable_buckets": False,
                 "cache_to_disk": True},
        "train": {"max_steps": 4, "dtype": "fp32", "batch_size": 2}, "optim": {"lr": 0.01},
        "network": {"rank": 2},
        "save": {"output_name": "placed", "save_every_steps": 2, "save_state": True},
        "sample": {"prompts": "shp style --s 2", "every_steps": 2}})
    record = manager.execute(manager.create(cfg))
    assert record.state == "finished", record.error
    new = _tree(tmp_path) - before
    lora = {p for p in new if p.startswith(os.path.join("webui", "Lora") + os.sep)}
    runs = {p for p in new if p.startswith(os.path.join("webui", "runs") + os.sep)}
    assert new == lora | runs, sorted(new - lora - runs)  # nothing in the dataset or elsewhere
    assert {os.path.basename(p) for p in lora} == {
        "placed.safetensors", "placed.json", "placed.preview.png",
        "placed-step00000002.safetensors", "placed-step00000002.json"}
    names = {os.path.relpath(p, os.path.join("webui", "runs")) for p in runs}
    assert "placed.history.json" in names
    assert os.path.join("placed-state", "training_state.pth") in names
    assert any(n.startswith("samples" + os.sep) and n.endswith(".png") for n in names)
    assert any(n.startswith("latent_cache" + os.sep) for n in names)


def test_a_shared_file_names_no_folder_of_the_machine(tmp_path, demo_dataset):
    """The LoRA file's metadata holds the run's settings, but no path of the machine it was
    trained on: folders cut to their last name, the folders written to left out."""
    import json

    from lora_train_ext.core.lora_file import load_lora

    host = StandaloneHost(str(tmp_path / "webui"))
    manager = RunManager(host)
    cfg = RunConfig.from_dict({
        "data": {"dataset_dir": demo_dataset, "resolution": "64", "enable_buckets": False},
        "train": {"max_steps": 1, "dtype": "fp32", "batch_size": 2},
        "network": {"rank": 2}, "save": {"output_name": "private"}})
    record = manager.execute(manager.create(cfg))
    assert record.state == "finished", record.error
    _, meta = load_lora(record.files[0])
    for value in meta.values():
        assert str(tmp_path) not in value and os.path.dirname(demo_dataset) not in value
    embedded = json.loads(meta["lora_train_ext.config"])
    assert embedded["data"]["dataset_dir"] == os.path.basename(demo_dataset)
    assert embedded["save"]["output_dir"] == "" and embedded["save"]["run_dir"] == ""
