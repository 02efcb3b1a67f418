"""Importing kohya configs: a kohya_ss GUI JSON, an sd-scripts config TOML with its dataset
config, and a dataset config alone (fixtures in tests/data written from the documented fields).
Every key lands in `mapped` or `unsupported`; values are converted; the config is valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_train_ext import cli
from lora_train_ext.core.config import SETTINGS, RunConfig, read_config_file
from lora_train_ext.core.errors import UserError
from lora_train_ext.core.kohya_import import DATASET, GUI, SD_SCRIPTS, import_kohya, is_inert

DATA = Path(__file__).resolve().parent / "data"
GUI_FILE, SD_FILE, DATASET_FILE = (str(DATA / n) for n in (
    "kohya_ss_gui.json", "sd_scripts.toml", "dataset.toml"))


def flat_keys(path: str) -> set[str]:
    """The keys kohya reads from a GUI / sd-scripts config (tables read as flat keys)."""
    if path.endswith(".json"):
        return set(json.loads(Path(path).read_text(encoding="utf-8")))
    raw = read_config_file(path)
    return {k for key, v in raw.items() for k in (v if isinstance(v, dict) else [key])}


def check_complete(result, keys: set[str]) -> None:
    """Every key in one of the two lists, none in both; every mapped path a setting."""
    both = set(result.mapped) & set(result.unsupported)
    assert not both, both
    missing = keys - set(result.mapped) - set(result.unsupported)
    assert not missing, missing
    for key, paths in result.mapped.items():
        for path in paths.split(", "):
            assert path in SETTINGS, (key, path)
    result.config.validate()


# -- kohya_ss GUI --------------------------------------------------------------------------------
def test_gui_json_values():
    cfg, mapped, unsupported = result = import_kohya(GUI_FILE)
    assert result.kind == GUI
    check_complete(result, flat_keys(GUI_FILE))
    n, o, d, t, s, l = cfg.network, cfg.optim, cfg.data, cfg.train, cfg.save, cfg.loss
    assert (n.algo, n.rank, n.alpha, n.conv_rank, n.conv_alpha, n.dropout) == \
        ("locon", 32, 16.0, 8, 4.0, 0.1)  # Kohya LoCon: conv_dim / conv_alpha apply
    assert (o.optimizer, o.optimizer_args) == ("AdamW8bit", "weight_decay=0.01 betas=0.9,0.99")
    assert (o.lr, o.unet_lr, o.te_lr) == (1e-4, 1e-4, 5e-5)
    assert (o.scheduler, o.scheduler_cycles, o.warmup_steps, o.warmup_ratio) == \
        ("cosine_with_restarts", 3, 0, 0.1)  # lr_warmup is a percentage of the run
    assert (o.max_grad_norm, o.scale_weight_norms) == (1.0, 1.0)
    assert (t.epochs, t.batch_size, t.grad_accum, t.seed, t.dtype) == (10, 2, 1, 1234, "fp16")
    assert t.gradient_checkpointing and n.train_on == "both"
    assert (d.dataset_dir, d.reg_dir, d.resolution, d.max_token_length) == \
        ("img", "", "768x512", 225)  # "768,512" is width,height
    assert (d.enable_buckets, d.min_bucket_side, d.max_bucket_side, d.bucket_step,
            d.no_upscale) == (True, 256, 1024, 64, True)
    assert (d.shuffle_tags, d.keep_tokens, d.caption_dropout, d.caption_extension) == \
        (True, 1, 0.05, ".txt")
    assert d.cache_latents and not d.cache_to_disk and not d.flip
    assert (s.output_dir, s.output_name, s.save_dtype, s.save_every_epochs, s.keep_last) == \
        ("output", "sks_character", "fp16", 2, 3)
    assert s.comment == "sks character, trigger: sks woman"
    # noise type Multires: the multires options apply, noise_offset does not (as in kohya_ss)
    assert (l.multires_noise_iterations, l.multires_noise_discount, l.noise_offset) == (6, 0.3, 0.0)
    assert mapped["noise_offset"] == "loss.noise_offset"
    assert any("noise_offset = 0.05 not applied" in note for note in result.notes)
    assert (l.loss, l.min_snr_gamma, l.huber_delta) == ("mse", 5.0, 0.1)
    assert mapped["optimizer"] == "optim.optimizer" and mapped["max_resolution"] == \
        "data.resolution"
    assert mapped["epoch"] == "train.epochs" and mapped["lr_warmup"] == "optim.warmup_ratio"
    # what we have no setting for is listed, set or not
    for key in ("clip_skip", "xformers", "pretrained_model_name_or_path",
                "full_fp16", "weighted_captions", "stop_text_encoder_training"):
        assert key in unsupported, key
    assert unsupported["clip_skip"] == "2" and not is_inert(unsupported["clip_skip"])
    assert is_inert(unsupported["full_fp16"])
    assert result.given["max_resolution"] == "768,512"
    # samples: the GUI holds the prompt lines; kohya's sampler name as the WebUI's
    assert cfg.sample.prompts == "photo of sks woman, smiling --n lowres --w 512 --h 768"
    assert (cfg.sample.every_epochs, cfg.sample.every_steps, cfg.sample.sampler) == \
        (1, 0, "Euler a")


def _gui(tmp_path, **changes) -> tuple:
    data = json.loads(Path(GUI_FILE).read_text(encoding="utf-8"))
    data.update(changes)
    path = tmp_path / "gui.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    result = import_kohya(str(path))
    check_complete(result, set(data))
    return result


@pytest.mark.parametrize("lora_type, algo, conv", [
    ("Standard", "lora", 0), ("LyCORIS/LoHa", "loha", 8), ("LyCORIS/LoKr", "lokr", 8),
    ("LyCORIS/iA3", "ia3", 8), ("LyCORIS/Native Fine-Tuning", "full", 8),
])
def test_gui_lora_types(lora_type, algo, conv, tmp_path):
    cfg = _gui(tmp_path, LoRA_type=lora_type).config
    assert cfg.network.algo == algo and cfg.network.conv_rank == conv


def test_gui_lokr_options_and_dora(tmp_path):
    cfg = _gui(tmp_path, LoRA_type="LyCORIS/LoKr", factor=4, decompose_both=True,
               use_cp=True).config
    assert (cfg.network.lokr_factor, cfg.network.decompose_both, cfg.network.use_tucker) == \
        (4, True, True)
    assert _gui(tmp_path, LoRA_type="LyCORIS/LoCon", dora_wd=True).config.network.algo == "dora"


def test_gui_network_type_we_do_not_have_is_unsupported(tmp_path):
    result = _gui(tmp_path, LoRA_type="LyCORIS/GLoRA")
    assert result.unsupported["LoRA_type"] == "LyCORIS/GLoRA"
    assert any("GLoRA" in n for n in result.notes)


@pytest.mark.parametrize("unet, te, train_on, unet_lr, te_lr", [
    (1e-4, 0, "unet", 1e-4, None),  # kohya_ss: only the UNet has an LR -> UNet only
    (0, 5e-5, "te", None, 5e-5),
    (0, 0, "both", None, None),  # neither: both at learning_rate
    ("", "", "both", None, None),
])
def test_gui_learning_rates(unet, te, train_on, unet_lr, te_lr, tmp_path):
    cfg = _gui(tmp_path, unet_lr=unet, text_encoder_lr=te).config
    assert (cfg.network.train_on, cfg.optim.unet_lr, cfg.optim.te_lr) == (train_on, unet_lr, te_lr)


def test_gui_steps_epochs_warmup_noise_seed(tmp_path):
    r = _gui(tmp_path, max_train_steps="800", lr_warmup=10, lr_warmup_steps=50, seed="",
             noise_offset_type="Original", noise_offset=0.05, noise_offset_random_strength=True)
    cfg = r.config
    assert (cfg.train.max_steps, cfg.train.epochs) == (800, 0)  # steps given: epoch unused
    assert (cfg.optim.warmup_steps, cfg.optim.warmup_ratio) == (50, 0.0)  # steps override %
    assert (cfg.loss.noise_offset, cfg.loss.noise_offset_random_strength) == (0.05, True)
    assert cfg.loss.multires_noise_iterations == 0
    assert cfg.train.seed == 0 and any("random seed" in n for n in r.notes)
    cfg = _gui(tmp_path, epoch=0, max_train_steps="", max_train_epochs="").config
    assert (cfg.train.max_steps, cfg.train.epochs) == (1600, 0)  # kohya's default length


def test_gui_block_weights_and_dims(tmp_path):
    dims = ",".join(["0", *["4"] * 11, "8", *["16"] * 6, *["0"] * 6])
    cfg = _gui(tmp_path, LoRA_type="Standard", block_dims=dims, block_alphas="",
               down_lr_weight="0,0.5,0.5,0.5,0.5,0.5,0.5,1,1,1,1,1", mid_lr_weight="1",
               up_lr_weight="1,1,1,1,1,1,1,1,1,1,1,1").config
    n = cfg.network
    assert n.block_ranks.startswith("IN01:4, IN02:4") and "MID:8" in n.block_ranks
    assert "OUT05:16" in n.block_ranks and "OUT06" not in n.block_ranks
    assert n.block_filter.split()[-1] == "OUT05"  # kohya makes no adapter in a block of dim 0
    assert "IN01:0.5" in n.block_lr_weights and "OUT11:1" in n.block_lr_weights
    r = _gui(tmp_path, LoRA_type="Standard", down_lr_weight="sine", mid_lr_weight="1")
    assert "down_lr_weight" in r.unsupported and r.config.network.block_lr_weights == ""


def test_gui_values_we_cannot_take_are_unsupported_and_the_rest_kept(tmp_path):
    r = _gui(tmp_path, network_dim=100000, lr_scheduler="adafactor", optimizer="PagedAdamW8bit",
             output_name="bad/name", max_resolution="500,500")
    for key in ("network_dim", "lr_scheduler", "optimizer", "output_name", "max_resolution"):
        assert key in r.unsupported, key
    cfg = r.config
    assert (cfg.network.rank, cfg.optim.scheduler, cfg.optim.optimizer) == (8, "constant", "AdamW")
    assert cfg.network.alpha == 16.0  # the rest is imported


# -- sd-scripts config + dataset config ------------------------------------------------------------
def test_sd_scripts_toml_with_its_dataset_config():
    cfg, mapped, unsupported = result = import_kohya(SD_FILE)
    assert result.kind == SD_SCRIPTS
    check_complete(result, flat_keys(SD_FILE))
    n, o, d, t, s, l = cfg.network, cfg.optim, cfg.data, cfg.train, cfg.save, cfg.loss
    # lycoris.kohya with algo=lokr and its network_args
    assert (n.algo, n.rank, n.alpha, n.conv_rank, n.conv_alpha, n.lokr_factor, n.rank_dropout) \
        == ("lokr", 16, 8.0, 4, 2.0, 8, 0.1)
    assert n.train_on == "unet"
    assert mapped["network_args.factor"] == "network.lokr_factor"
    assert "network_args.train_norm" in unsupported
    assert (o.optimizer, o.lr, o.unet_lr, o.te_lr, o.scheduler) == \
        ("Prodigy", 1.0, 1.0, 1.0, "cosine")  # text_encoder_lr [1.0, 1.0]: one value
    assert o.optimizer_args == ("decouple=True weight_decay=0.01 d_coef=2 "
                                "use_bias_correction=True safeguard_warmup=True")
    assert (o.warmup_steps, o.warmup_ratio) == (0, 0.05)  # a float < 1 is a ratio
    assert (t.max_steps, t.grad_accum, t.seed, t.dtype, t.adapter_dtype) == \
        (1500, 2, 42, "bf16", "bf16")  # full_bf16
    assert t.batch_size == 2  # the dataset config's batch_size wins over train_batch_size
    assert (s.save_dtype, s.save_every_steps, s.keep_last, s.save_state) == ("bf16", 250, 3, True)
    assert (s.output_dir, s.output_name, s.comment) == ("output", "style_lokr", "painterly style")
    assert (l.loss, l.huber_delta, l.huber_schedule, l.min_snr_gamma, l.noise_offset,
            l.input_perturbation) == ("smooth_l1", 0.2, "exponential", 5.0, 0.0357, 0.1)
    assert d.cache_latents and d.cache_to_disk and d.cache_text
    assert d.max_token_length == 225
    # from dataset.toml
    assert (d.dataset_dir, d.repeats, d.reg_dir, d.default_caption) == \
        ("train/sks_woman", 10, "reg/woman", "sks woman")
    assert (d.resolution, d.min_bucket_side, d.max_bucket_side, d.bucket_step) == \
        ("1024", 512, 2048, 64)
    assert d.caption_extension == ".txt"  # given by the dataset config, not kohya's .caption
    for key in ("xformers", "no_half_vae", "pretrained_model_name_or_path"):
        assert key in unsupported, key
    # sample_prompts names a file of prompt lines beside the config
    assert cfg.sample.prompts.splitlines() == [
        "painterly style, a lighthouse at dusk --n blurry, lowres --w 1024 --h 1024 --d 1 --l 7 "
        "--s 28", "painterly style, portrait of an old sailor --d 2"]
    assert (cfg.sample.every_steps, cfg.sample.sampler) == (250, "Euler a")


def test_dataset_toml_alone():
    cfg, mapped, unsupported = result = import_kohya(DATASET_FILE)
    assert result.kind == DATASET
    raw = read_config_file(DATASET_FILE)
    keys = {f"general.{k}" for k in raw["general"]}
    ds = raw["datasets"][0]
    keys |= {f"datasets[0].{k}" for k in ds if k != "subsets"}
    keys |= {f"datasets[0].subsets[{i}].{k}" for i, sub in enumerate(ds["subsets"]) for k in sub}
    check_complete(result, keys)
    d = cfg.data
    assert (d.dataset_dir, d.repeats, d.reg_dir, d.default_caption, d.caption_prefix) == \
        ("train/sks_woman", 10, "reg/woman", "sks woman", "photo, ")
    assert (d.keep_tokens, d.shuffle_tags, d.flip, d.caption_dropout, d.tag_dropout) == \
        (2, True, True, 0.05, 0.1)  # the subset's keep_tokens over [general]'s
    assert mapped["general.keep_tokens"] == "data.keep_tokens"
    assert any("general.keep_tokens = 1 not applied" in n for n in result.notes)
    assert (d.resolution, d.enable_buckets, d.no_upscale, cfg.train.batch_size) == \
        ("1024", True, True, 2)
    assert mapped["datasets[0].subsets[1].keep_tokens"] == "data.keep_tokens"  # same as ours
    assert unsupported == {"datasets[0].subsets[0].cache_info": True,
                           "datasets[0].subsets[1].class_tokens": "woman",
                           "datasets[0].subsets[1].num_repeats": 1}


def test_sd_scripts_defaults_apply_where_a_key_is_left_out(tmp_path):
    path = tmp_path / "min.toml"
    path.write_text('network_module = "networks.lora"\nnetwork_dim = 8\n'
                    'network_args = ["conv_dim=4", "conv_alpha=1", "loraplus_lr_ratio=16"]\n'
                    'learning_rate = 1e-4\ntrain_data_dir = "img"\nresolution = "512,512"\n'
                    'optimizer_type = "AdamW"\ntext_encoder_lr = [5e-5, 2e-5]\n', encoding="utf-8")
    cfg, mapped, unsupported = result = import_kohya(str(path))
    check_complete(result, flat_keys(str(path)))
    assert cfg.network.algo == "locon" and cfg.network.conv_rank == 4  # networks.lora + conv_dim
    assert cfg.network.loraplus_ratio == 16.0
    assert (cfg.train.max_steps, cfg.data.caption_extension, cfg.data.enable_buckets,
            cfg.data.cache_latents, cfg.train.dtype, cfg.save.save_dtype) == \
        (1600, ".caption", False, False, "fp32", "fp32")
    assert "text_encoder_lr" in unsupported and cfg.optim.te_lr is None  # two different LRs


@pytest.mark.parametrize("text, message", [
    ("not = [valid", "cannot parse"),
    ("", None),
])
def test_broken_or_empty_files(text, message, tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(text, encoding="utf-8")
    if message:
        with pytest.raises(UserError, match=message):
            import_kohya(str(path))
    else:
        assert import_kohya(str(path)).config.validate()
    with pytest.raises(UserError, match="not found"):
        import_kohya(str(tmp_path / "missing.json"))


# -- the command -----------------------------------------------------------------------------------
def test_import_config_command_prints_the_mapping_and_writes_our_toml(tmp_path, capsys):
    out = tmp_path / "config.toml"
    assert cli.main(["import-config", GUI_FILE, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max_resolution = '768,512' -> data.resolution = '768x512'" in printed
    assert "not supported, ignored" in printed and "clip_skip = '2'" in printed
    assert "off or empty in this file" in printed
    cfg = RunConfig.read(str(out))
    assert cfg == import_kohya(GUI_FILE).config
    # an existing file is kept unless --force
    assert cli.main(["import-config", GUI_FILE, "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["import-config", SD_FILE, "--out", str(out), "--force", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == SD_SCRIPTS and data["mapped"]["network_dim"] == "network.rank"
    assert RunConfig.read(str(out)).network.algo == "lokr"


def test_import_config_with_a_missing_file_exits_2(tmp_path, capsys):
    assert cli.main(["import-config", str(tmp_path / "nope.json"), "--out", "-"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err
