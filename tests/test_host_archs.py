"""The WebUI host on SD2 and SDXL: the tiny bundles dressed as the WebUI's resident models.

Stand-ins (facts checked in the WebUI v1.10.1 source and its repositories/):
- SD2 (ldm LatentDiffusion; modules/sd_hijack.py wraps the text encoder in
  FrozenOpenCLIPEmbedderWithCustomWords): `cond_stage_model.wrapped` is ldm's
  FrozenOpenCLIPEmbedder, whose `.model` is the open_clip model (`transformer.resblocks.N`);
  `get_learned_conditioning(prompts)`; `parameterization` 'v' for SD2.1-768;
  `encode_first_stage` -> a posterior with `.mode()`.
- SDXL (sgm DiffusionEngine; modules/sd_models_xl.py): `conditioner.embedders` are the hijack's
  wrappers (`.wrapped` = sgm FrozenCLIPEmbedder with `.transformer`, FrozenOpenCLIPEmbedder2 with
  `.model`), then the size embedders keyed `original_size_as_tuple`, `crop_coords_top_left`,
  `target_size_as_tuple`; the GeneralConditioner runs an embedder under no_grad unless its
  `is_trainable`, returns {'crossattn', 'vector'}; `encode_first_stage` returns a scaled sample
  (AutoencoderKLInferenceWrapper); the UNet takes `y`; `alphas_cumprod` and
  `alphas_cumprod_original` (modules/sd_models.py); flags `is_sdxl`, `is_sdxl_inpaint`, `is_ssd`.
- sgm GeneralConditioner (sgm/modules/encoders/modules.py): each embedder carries `ucg_rate`
  (AbstractEmbModel.ucg_rate, set from the embedder's config, default 0.0); `forward` zeroes an
  embedder's output for a random part of the batch with that probability (when its
  `legacy_ucg_val` is None). The hijack's text-encoder wrappers are plain modules that get the
  attribute only when the WebUI's SDXL `get_learned_conditioning` (modules/sd_models_xl.py) sets it
  to 0.0, so before the first generation it may be absent.
- modules/prompt_parser.py `SdConditioning`: a list of prompts with width / height.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

import pytest
import torch
from torch import nn

import fake_webui
from conftest import requires_grad_flags, state_sha256
from lora_train_ext.core import keys
from lora_train_ext.core.lora_file import load_lora
from lora_train_ext.core.models.tiny import build_bundle
from lora_train_ext.core.networks.targets import find_targets
from lora_train_ext.demo import demo_config
from lora_train_ext.runs import RunManager

CAPTIONS = ["shp style, red circle", "blue square, black background"]
COUNTS = {"sd2": {"unet": 192, "te": 138}, "sdxl": {"unet": 722, "te1": 72, "te2": 192}}


def _checkpoint_info(name: str):
    return types.SimpleNamespace(name_for_extra=name, title=f"{name}.safetensors",
                                 shorthash="0123abcd45")


class FakeSD2(nn.Module):
    """The tiny SD2 bundle as the WebUI's SD2.1-768 LatentDiffusion."""

    def __init__(self, bundle):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = bundle.unet
        self.first_stage_model = bundle.vae
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.wrapped = nn.Module()
        self.cond_stage_model.wrapped.model = bundle.text_encoders["te"]
        self.scale_factor = bundle.extras["vae_scale"]
        self.register_buffer("alphas_cumprod", bundle.alphas_cumprod.float())
        self.parameterization = "v"
        self.is_sd1, self.is_sd2, self.is_sdxl = False, True, False
        self.sd_checkpoint_info = _checkpoint_info("fake_sd21_768")
        self._condition = bundle.condition

    def encode_first_stage(self, x):
        return fake_webui.Posterior(self.first_stage_model.encode(x))

    def get_learned_conditioning(self, prompts):
        return self._condition(list(prompts))


class FakeEmbedder(nn.Module):
    """One of the hijack's wrappers in `conditioner.embedders`."""

    def __init__(self, input_key: str, inner: str | None = None, module: nn.Module | None = None):
        super().__init__()
        if inner:
            self.wrapped = nn.Module()
            setattr(self.wrapped, inner, module)
        self.input_key = input_key
        self.is_trainable = False
        self.ucg_rate = 0.1  # sgm AbstractEmbModel.ucg_rate: random caption dropout unless 0


class FakeConditioner(nn.Module):
    """sgm's GeneralConditioner over the tiny bundle's SDXL conditioning."""

    def __init__(self, bundle, text_pair: bool = True):
        super().__init__()
        text = [FakeEmbedder("txt", "transformer", bundle.text_encoders["te1"]),
                FakeEmbedder("txt", "model", bundle.text_encoders["te2"])] if text_pair else \
            [FakeEmbedder("txt", "model", bundle.text_encoders["te2"])]
        sizes = [FakeEmbedder(k) for k in ("original_size_as_tuple", "crop_coords_top_left",
                                           "target_size_as_tuple")]
        self.embedders = nn.ModuleList(text + sizes)
        self._condition = bundle.condition

    def forward(self, batch: dict) -> dict:
        if any(e.ucg_rate > 0 for e in self.embedders):  # AttributeError when absent, as in sgm
            raise AssertionError("conditioning with random caption dropout")
        sizes = [tuple(int(v) for v in (*o, *c, *t)) for o, c, t in zip(
            batch["original_size_as_tuple"], batch["crop_coords_top_left"],
            batch["target_size_as_tuple"])]
        assert len(sizes) == len(batch["txt"])
        trainable = all(e.is_trainable for e in self.embedders[:2])
        with contextlib.nullcontext() if trainable else torch.no_grad():
            return self._condition(list(batch["txt"]), sizes)


class FakeSDXL(nn.Module):
    """The tiny SDXL bundle as the WebUI's SDXL base DiffusionEngine."""

    def __init__(self, bundle, text_pair: bool = True):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = bundle.unet
        self.first_stage_model = bundle.vae
        self.conditioner = FakeConditioner(bundle, text_pair)
        self.scale_factor = bundle.extras["vae_scale"]
        self.register_buffer("alphas_cumprod_original", bundle.alphas_cumprod.float())
        # a sampling-only rescale (the WebUI's zero-terminal-SNR option) the host must not train on
        self.register_buffer("alphas_cumprod", bundle.alphas_cumprod.float().sqrt())
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl = False, False, True
        self.is_ssd, self.is_sdxl_inpaint = False, False
        self.sd_checkpoint_info = _checkpoint_info("fake_sdxl_base")

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).sample() * self.scale_factor


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None):
        super().__init__(prompts)
        self.is_negative_prompt = is_negative_prompt
        self.width, self.height = width, height


def _install(arch: str, bundle, monkeypatch, tmp_path, **dress):
    monkeypatch.setattr(fake_webui, "FakeLatentDiffusion", lambda _bundle: None)
    fake = fake_webui.install(bundle, monkeypatch)
    fake.shared.sd_model = (FakeSD2 if arch == "sd2" else FakeSDXL)(bundle, **dress)
    fake.shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
    os.makedirs(fake.shared.cmd_opts.lora_dir, exist_ok=True)
    sys.modules["modules.devices"].dtype = torch.float32
    prompt_parser = types.ModuleType("modules.prompt_parser")
    prompt_parser.SdConditioning = SdConditioning
    monkeypatch.setitem(sys.modules, "modules.prompt_parser", prompt_parser)
    monkeypatch.setattr(sys.modules["modules"], "prompt_parser", prompt_parser, raising=False)
    from lora_train_ext.host.webui import WebUIHost

    return fake, WebUIHost()


@pytest.fixture(scope="module")
def bundles():
    return {arch: build_bundle(arch, "tiny", seed=0) for arch in ("sd2", "sdxl")}


@pytest.mark.parametrize("arch, prediction, resolution", [("sd2", "v", 768),
                                                          ("sdxl", "epsilon", 1024)])
def test_model_info(arch, prediction, resolution, bundles, monkeypatch, tmp_path):
    _, host = _install(arch, bundles[arch], monkeypatch, tmp_path)
    info = host.model_info()
    assert (info.arch, info.prediction, info.problem) == (arch, prediction, "")
    assert info.default_resolution == resolution


def test_refuses_refiner_and_inpaint_not_medvram_sdxl(bundles, monkeypatch, tmp_path):
    fake, host = _install("sdxl", bundles["sdxl"], monkeypatch, tmp_path, text_pair=False)
    assert "refiner" in host.model_info().problem
    fake.shared.sd_model = FakeSDXL(bundles["sdxl"])
    fake.shared.sd_model.is_sdxl_inpaint = True
    assert "inpainting" in host.model_info().problem
    fake.shared.sd_model.is_sdxl_inpaint = False
    fake.shared.cmd_opts.medvram_sdxl = True  # supported since low-VRAM modes are suspended
    assert host.model_info().problem == ""


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_hosted_bundle_computes_what_the_tiny_bundle_does(arch, bundles, monkeypatch, tmp_path):
    bundle = bundles[arch]
    fake, host = _install(arch, bundle, monkeypatch, tmp_path)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    sizes = [(80, 64, 8, 0, 64, 64), (64, 96, 0, 16, 64, 64)]
    with host.prepared_model() as hosted:
        assert hosted.arch == arch and hosted.prediction == bundle.prediction
        assert set(hosted.text_encoders) == set(bundle.text_encoders)
        assert all(hosted.text_encoders[k] is bundle.text_encoders[k] for k in bundle.text_encoders)
        targets = find_targets(hosted.trainable_roots(), arch, "both", conv=False)
        counts: dict[str, int] = {}
        for target in targets:
            counts[target.part] = counts.get(target.part, 0) + 1
        assert counts == COUNTS[arch]
        assert torch.equal(hosted.alphas_cumprod, bundle.alphas_cumprod.float().double())
        with torch.no_grad():
            assert torch.equal(hosted.encode(images), bundle.encode(images))
            # no sizes: the host's default resolution (SDXL 1024) square, no crop
            square = [(hosted.resolution, hosted.resolution, 0, 0, hosted.resolution,
                       hosted.resolution)] * len(CAPTIONS) if arch == "sdxl" else []
            for s, expected in (([], square), (sizes, sizes)):
                ours, theirs = hosted.condition(CAPTIONS, s), bundle.condition(CAPTIONS, expected)
                for a, b in zip(*(v.values() if isinstance(v, dict) else [v]
                                  for v in (ours, theirs))):
                    assert torch.equal(a, b)
                assert torch.equal(hosted.denoise(x, t, ours), bundle.denoise(x, t, theirs))
        if arch == "sdxl":
            embedders = fake.shared.sd_model.conditioner.embedders
            assert all(e.is_trainable for e in embedders)  # gradients reach the text encoders
    if arch == "sdxl":
        assert not any(e.is_trainable for e in embedders)


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_short_run_trains_restores_and_saves_every_module(arch, bundles, monkeypatch, tmp_path,
                                                          demo_dataset):
    fake, host = _install(arch, bundles[arch], monkeypatch, tmp_path)
    model = fake.shared.sd_model
    before = state_sha256(model)
    flags = requires_grad_flags(model)
    cfg = demo_config("", steps=2, seed=0, rank=4, alpha=None, lr=1e-2, batch_size=1,
                      grad_accum=1, dataset=demo_dataset)
    cfg.save.output_name = f"hosted_{arch}"
    manager = RunManager(host)
    record = manager.create(cfg)
    assert record.config.model.arch == arch
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "finished", record.error
    lora_dir = fake.shared.cmd_opts.lora_dir
    assert record.files == [os.path.join(lora_dir, f"hosted_{arch}.safetensors")]
    assert state_sha256(model) == before  # bit-identical weights after the run
    assert requires_grad_flags(model) == flags
    tensors, meta = load_lora(record.files[0])
    moved: dict[str, list[bool]] = {}
    for key, value in tensors.items():
        if key.endswith(".lora_up.weight"):
            part = keys.split_kohya_name(key.split(".")[0])[0]
            moved.setdefault(part, []).append(bool(torch.count_nonzero(value)))
    assert {part: len(v) for part, v in moved.items()} == COUNTS[arch]
    assert all(any(v) for v in moved.values())  # every part learned, text encoders included
    assert meta["ss_base_model_version"] == ("sd_v2" if arch == "sd2" else "sdxl_base_v1-0")
    assert meta["ss_v_parameterization"] == str(arch == "sd2")
    assert meta["ss_sd_model_name"] == model.sd_checkpoint_info.name_for_extra
    if arch == "sdxl":
        assert not any(e.is_trainable for e in model.conditioner.embedders)


UCG_RATES = [0.1, 0.25, None, 0.1, 0.0]  # None: the attribute is absent (a wrapper never used)


def _set_ucg_rates(embedders, rates):
    for e, rate in zip(embedders, rates):
        if rate is None:
            del e.ucg_rate
        else:
            e.ucg_rate = rate


def _ucg_rates(embedders):
    return [getattr(e, "ucg_rate", None) for e in embedders]


@pytest.mark.parametrize("ending", ["finished", "stopped", "failed"])
def test_sdxl_run_gives_the_embedders_ucg_rate_back(ending, bundles, monkeypatch, tmp_path,
                                                    demo_dataset):
    """Caption dropout is off while training (the stand-in conditioner refuses a rate > 0) and
    each embedder's own ucg_rate is back after the run, however it ends."""
    fake, host = _install("sdxl", bundles["sdxl"], monkeypatch, tmp_path)
    embedders = fake.shared.sd_model.conditioner.embedders
    _set_ucg_rates(embedders, UCG_RATES)
    cfg = demo_config("", steps=4, seed=0, rank=2, alpha=None, lr=1e-2, batch_size=1,
                      grad_accum=1, dataset=demo_dataset)
    cfg.save.output_name = f"ucg_{ending}"
    manager = RunManager(host)
    record = manager.create(cfg)
    seen = []

    def listener(event):
        if event.kind == "step":
            seen.append(_ucg_rates(embedders))
            if event.step == 2 and ending == "stopped":
                fake.shared.state.interrupted = True
            if event.step == 2 and ending == "failed":
                raise RuntimeError("injected failure")

    record.control.add_listener(listener)
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == ending, record.error
    assert seen and all(rates == [0.0] * len(UCG_RATES) for rates in seen)
    assert _ucg_rates(embedders) == UCG_RATES
    assert not hasattr(embedders[2], "ucg_rate")
