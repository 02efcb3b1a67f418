"""Per-block ranks and LR weights (kohya's block_dims / down/mid/up_lr_weight)."""

from __future__ import annotations

import pytest
import torch

from lora_train_ext.core.config import RunConfig
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.networks import build_network
from lora_train_ext.core.networks.targets import block_value, parse_block_values
from lora_train_ext.core.preflight import check_settings
from lora_train_ext.core.trainer import Trainer, train
from lora_train_ext.demo import demo_config


def test_parse_and_lookup():
    values = parse_block_values("IN:4, MID:8 OUT04:16; out:2", "f", integer=True)
    assert values == {"IN": 4, "MID": 8, "OUT04": 16, "OUT": 2}
    assert block_value("IN07", values, 1) == 4
    assert block_value("OUT04", values, 1) == 16 and block_value("OUT05", values, 1) == 2
    assert block_value("", values, 9) == 9
    for bad in ("IN", "IN:x", "SIDE:2", "IN:0", "IN:1.5"):
        with pytest.raises(UserError, match="network.block_ranks"):
            parse_block_values(bad, "network.block_ranks", integer=True)


def test_block_ranks_shape_the_network(sd1_bundle):
    cfg = RunConfig().network
    cfg.rank, cfg.block_ranks = 8, "IN:2, OUT05:16"
    net = build_network(sd1_bundle.trainable_roots(), "sd1", cfg, seed=0)
    ranks = {a.name: a.rank for a in net}
    assert ranks["lora_unet_down_blocks_0_attentions_0_proj_in"] == 2  # IN01
    assert ranks["lora_unet_up_blocks_1_attentions_2_proj_in"] == 16  # OUT05
    assert ranks["lora_unet_up_blocks_1_attentions_1_proj_in"] == 8  # OUT04: default
    assert ranks["lora_unet_mid_block_attentions_0_proj_in"] == 8
    assert ranks["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == 8


def test_block_lr_weights_split_the_unet_group(sd1_bundle, tmp_path, demo_dataset):
    cfg = demo_config(str(tmp_path), steps=2, seed=0, rank=4, alpha=None, lr=1e-3, batch_size=1,
                      grad_accum=1)
    cfg.network.block_lr_weights = "IN:0.5, MID:0, OUT:2"
    trainer = Trainer(sd1_bundle, cfg)
    result = trainer.run()
    lrs = sorted(g["lr"] for g in trainer.optimizer.param_groups)
    assert lrs == [5e-4, 1e-3, 2e-3]  # IN, text encoder, OUT; MID (0) is not trained
    tensors, meta = load_lora(result.path)
    mid = tensors["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"]
    assert torch.count_nonzero(mid) == 0
    assert torch.count_nonzero(tensors["lora_unet_up_blocks_1_attentions_2_proj_in.lora_up.weight"]) > 0
    assert meta["ss_block_lr_weights"] == "IN:0.5, MID:0, OUT:2"


def test_adaptive_optimizers_refuse_block_lr_weights():
    cfg = RunConfig()
    cfg.optim.optimizer, cfg.optim.lr = "Prodigy", 1.0
    cfg.network.block_lr_weights = "OUT:2"
    pytest.importorskip("prodigyopt")
    with pytest.raises(UserError, match="network.block_lr_weights"):
        check_settings(cfg)
