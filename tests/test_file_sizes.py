"""The size table's arithmetic (`lora_train_ext.bench.file_sizes`) against files really written by
`save_lora`, for every algorithm; and the real-size module counts it reports."""

from __future__ import annotations

import os

import pytest

from lora_train_ext.bench.file_sizes import (measure, real_roots, safetensors_file_bytes,
                                             saved_tensor_specs)
from lora_train_ext.core.config import NetworkConfig
from lora_train_ext.core.lora_file import LoraInfo, read_metadata, save_lora
from lora_train_ext.core.models.tiny import build_bundle
from lora_train_ext.core.networks import SUPPORTED_ALGOS, build_network


@pytest.fixture(scope="module")
def sd2_roots():
    return build_bundle("sd2", "tiny", seed=0).trainable_roots()


@pytest.mark.parametrize("save_dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("algo", SUPPORTED_ALGOS)
def test_computed_size_equals_the_written_file(algo, save_dtype, sd2_roots, tmp_path):
    network = build_network(sd2_roots, "sd2", NetworkConfig(algo=algo, rank=4, alpha=2.0),
                            seed=0)
    path = str(tmp_path / f"{algo}.safetensors")
    save_lora(network.kohya_state_dict(), LoraInfo(arch="sd2", algo=algo, rank=4, alpha=2.0),
              path, save_dtype=save_dtype, sidecar=False)
    state = {k[len("adapters."):]: v for k, v in network.state_dict().items()}
    specs = saved_tensor_specs(state, save_dtype)
    assert safetensors_file_bytes(specs, read_metadata(path)) == os.path.getsize(path)


def test_real_size_module_counts():
    roots = real_roots("sdxl")
    assert measure(roots, "sdxl", "locon", rank=16)["modules"] == \
        {"unet": 788, "te1": 72, "te2": 192}
    row = measure(roots, "sdxl", "lora", rank=16)
    assert row["modules"] == {"unet": 722, "te1": 72, "te2": 192}
    assert row["tensors"] == 3 * row["module_count"]  # down, up, alpha


def test_oft_and_boft_defaults_per_arch():
    from lora_train_ext.bench.file_sizes import oft_table

    rows = {(r["arch"], r["algo"]): r for r in oft_table(arches=("sd1", "sdxl"))}
    assert rows["sd1", "oft"]["modules"] == rows["sd1", "boft"]["modules"] == \
        {"unet": 192, "te": 72}  # the linear layers, as LoRA's
    assert rows["sdxl", "oft"]["modules"] == {"unet": 722, "te1": 72, "te2": 192}
    for r in rows.values():
        assert r["tensors"] == 2 * r["module_count"] and r["block_size"] == 16  # blocks, alpha
    # README's table: SD1 OFT 9.8 MiB, BOFT 54.6 MiB; SDXL 57.9 / 332.8 MiB (fp16)
    assert (rows["sd1", "oft"]["params"], rows["sd1", "boft"]["params"]) == (5121288, 28601096)
    assert rows["sdxl", "boft"]["file_bytes"] > 5 * rows["sdxl", "oft"]["file_bytes"]
