"""The Forge host against a stand-in of Forge's module surface (tests/fake_forge.py, every fact
named there with the Forge source file it was read in)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fake_forge
from conftest import model_outputs, state_sha256
from lora_train_ext.core.errors import UserError, UserErrors
from lora_train_ext.demo import demo_config
from lora_train_ext.runs import RunManager

COUNTS = {"sd1": {"unet": 192, "te": 72}, "sd2": {"unet": 192, "te": 138},
          "sdxl": {"unet": 722, "te1": 72, "te2": 192}}


def _cfg(dataset, steps=4, name="forged", algo="lora"):
    cfg = demo_config("", steps=steps, seed=0, rank=4, alpha=None, lr=2e-3, batch_size=2,
                      grad_accum=1, dataset=dataset, algo=algo)
    cfg.save.output_dir = ""
    cfg.save.output_name = name
    return cfg


def _run(host, cfg):
    manager = RunManager(host)
    record = manager.create(cfg)
    with host.exclusive("test"):
        manager.execute(record)
    return record


def _roots_sha(m) -> str:
    return state_sha256(*fake_forge.roots(m))


@pytest.fixture()
def forge(monkeypatch, tmp_path):
    fake = fake_forge.install("sd1", monkeypatch, tmp_path)
    from lora_train_ext.host.forge import ForgeHost

    return fake, ForgeHost()


def _lora_file(fake, name: str, seed: int, rank: int = 2, scale: float = 0.5) -> str:
    """A LoRA file for a few linear modules of the UNet and the text encoder."""
    m = fake.shared.sd_model
    fo = m.forge_objects_original
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    picked = {"unet": 0, "clip": 0}
    for kohya, (where, key) in fake_forge.key_map(m).items():
        root = fo.unet.model if where == "unet" else fo.clip.cond_stage_model
        w = fake_forge.get_attr(root, key)
        if w.dim() != 2 or picked[where] >= 3:
            continue
        picked[where] += 1
        tensors[f"{kohya}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * scale
        tensors[f"{kohya}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * scale
        tensors[f"{kohya}.alpha"] = torch.tensor(float(rank))
    path = os.path.join(fake.shared.cmd_opts.lora_dir, f"{name}.safetensors")
    save_file(tensors, path)
    return path


def _generate(host, prompt):
    return host.generate([prompt], "", 1, 2, 64, 64, 7.0)[0]


# -- choosing the host ---------------------------------------------------------------------------
def test_select_picks_forge_when_its_backend_is_there(monkeypatch, tmp_path):
    from lora_train_ext.host import forge_backend_available, select
    from lora_train_ext.host.forge import ForgeHost
    from lora_train_ext.host.webui import WebUIHost

    for name in ("backend", "backend.memory_management", "backend.diffusion_engine.base",
                 "modules_forge"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    host = select()
    assert type(host) is WebUIHost and not forge_backend_available()
    # Forge's tree on the path: found without importing it
    (tmp_path / "backend" / "diffusion_engine").mkdir(parents=True)
    (tmp_path / "backend" / "memory_management.py").write_text("raise RuntimeError('imported')\n")
    (tmp_path / "modules_forge").mkdir()
    (tmp_path / "modules_forge" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert forge_backend_available()
    assert "backend.memory_management" not in sys.modules
    assert isinstance(select(), ForgeHost)


def test_the_webui_script_registers_the_forge_host(monkeypatch, tmp_path):
    from test_api import _load_script

    from lora_train_ext.host.forge import ForgeHost

    fake_forge.install("sd1", monkeypatch, tmp_path)
    script = _load_script(monkeypatch)
    assert isinstance(script.host, ForgeHost) and script.manager.host is script.host


# -- targets -------------------------------------------------------------------------------------
def test_forge_layers_are_found_by_what_they_are(monkeypatch, tmp_path):
    from lora_train_ext.core.models.tiny import build_bundle
    from lora_train_ext.core.networks.base import module_kind
    from lora_train_ext.core.networks.targets import find_targets

    with fake_forge.using_forge_operations():
        linear, conv1, conv3 = nn.Linear(4, 3), nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 3)
    assert not isinstance(linear, nn.Linear) and isinstance(linear, fake_forge.ForgeLinear)
    assert [module_kind(x) for x in (linear, conv1, conv3)] == ["linear", "conv1x1", "conv3x3"]
    for other in (nn.Embedding(5, 3), nn.LayerNorm(3), nn.ConvTranspose2d(4, 3, 3),
                  nn.Conv1d(4, 3, 3), nn.Conv2d(4, 4, 3, groups=2), nn.MultiheadAttention(4, 2)):
        assert module_kind(other) == ("conv3x3" if type(other) is nn.Conv2d else "")

    class Looks(nn.Module):  # in / out features, but a weight of another shape (quantised)
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 4, 3
            self.weight = nn.Parameter(torch.zeros(6, 1))

    assert module_kind(Looks()) == ""
    # every arch: the same modules and kohya names as the tiny models with torch's classes
    for arch in ("sd1", "sd2", "sdxl"):
        engine = fake_forge.FakeForgeEngine(arch)
        clip = engine.forge_objects.clip.cond_stage_model
        roots = {"unet": engine.forge_objects.unet.model.diffusion_model}
        if arch == "sdxl":
            roots.update(te1=clip.clip_l.transformer, te2=clip.clip_g.transformer)
        else:
            roots["te"] = (clip.clip_h if arch == "sd2" else clip.clip_l).transformer
        found = find_targets(roots, arch)
        counts = {}
        for t in found:
            counts[t.part] = counts.get(t.part, 0) + 1
        assert counts == COUNTS[arch]
        assert any(isinstance(t.module, fake_forge.ForgeLinear) for t in found)
        reference = build_bundle(arch, "tiny", seed=0)
        assert [t.name for t in found if t.part == "unet"] == \
            [t.name for t in find_targets(reference.trainable_roots(), arch) if t.part == "unet"]
        if arch == "sd1":
            assert [t.name for t in found] == \
                [t.name for t in find_targets(reference.trainable_roots(), arch)]


# -- the bundle ------------------------------------------------------------------------------------
def test_the_bundle_reads_the_model_as_the_tiny_bundle_does(forge):
    """The fake SD1 engine holds the tiny SD1 bundle's weights in Forge's classes: conditioning,
    UNet output and (deterministic) latents must be the same bits."""
    from lora_train_ext.core.models.tiny import build_bundle

    fake, host = forge
    reference = build_bundle("sd1", "tiny", seed=0)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with host.prepared_model() as bundle:
        assert (bundle.arch, bundle.prediction) == ("sd1", "epsilon")
        for (a, b) in zip(model_outputs(bundle), model_outputs(reference)):
            assert torch.equal(a, b)
        assert torch.equal(bundle.encode(images), reference.encode(images))
        assert torch.equal(bundle.encode(images), bundle.encode(images))  # no sampling
        assert torch.equal(bundle.alphas_cumprod.float(), reference.alphas_cumprod.float())
        with torch.no_grad():
            assert not bundle.condition(["a"]).requires_grad  # the caller's grad mode kept
            with torch.inference_mode():  # even from inference mode: tensors autograd can save
                assert not bundle.condition(["a"]).is_inference()


def test_sdxl_conditioning_is_forges_with_each_images_sizes(monkeypatch, tmp_path):
    fake = fake_forge.install("sdxl", monkeypatch, tmp_path)
    from lora_train_ext.host.forge import ForgeHost

    host = ForgeHost()
    m = fake.shared.sd_model
    own = m.get_learned_conditioning(["a red circle"] * 2)  # Forge's, at 64 x 64, no crop
    with host.prepared_model() as bundle:
        cond = bundle.condition(["a red circle", "a red circle"],
                                sizes=[(64, 64, 0, 0, 64, 64), (96, 80, 8, 4, 64, 64)])
    assert torch.equal(cond["crossattn"][0], own["crossattn"][0])
    assert torch.equal(cond["vector"][0], own["vector"][0])
    assert torch.equal(cond["crossattn"][1], cond["crossattn"][0])
    assert not torch.equal(cond["vector"][1], cond["vector"][0])
    assert cond["vector"].shape == (2, 128)


# -- runs ------------------------------------------------------------------------------------------
def test_inference_weights_train_and_forges_objects_come_back_bit_identical(forge, demo_dataset):
    fake, host = forge
    m = fake.shared.sd_model
    objects = fake_forge.slots(m)
    assert all(t.is_inference() for t in objects.values())  # as Forge builds them
    before = _roots_sha(m)
    during = {}

    def look(event):
        if event.kind == "step" and not during:
            now = fake_forge.slots(m)
            during["aliases"] = all(not t.is_inference() for t in now.values())
            during["shared"] = all(now[k].data_ptr() == objects[k].data_ptr() for k in now
                                   if objects[k].numel())
            during["attention"] = fake.backend_unet.attention_function
    manager = RunManager(host)
    record = manager.create(_cfg(demo_dataset, steps=6))
    record.control.add_listener(look)
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "finished", record.error
    assert during == {"aliases": True, "shared": True,
                      "attention": fake.attention.attention_pytorch}  # no copy, SDP attention
    after = fake_forge.slots(m)
    assert after.keys() == objects.keys() and all(after[k] is objects[k] for k in objects)
    assert all(t.is_inference() for t in after.values())
    assert _roots_sha(m) == before
    assert fake.backend_unet.attention_function is fake.attention.attention_split
    assert m.text_processing_engine.clip_skip == 1
    from safetensors.torch import load_file

    tensors = load_file(record.files[0])
    te_up = [v for k, v in tensors.items() if k.startswith("lora_te_") and "lora_up" in k]
    unet_up = [v for k, v in tensors.items() if k.startswith("lora_unet_") and "lora_up" in k]
    assert len(te_up) == 72 and len(unet_up) == 192
    assert any(v.abs().sum() > 0 for v in te_up)  # the text encoder got gradients
    assert any(v.abs().sum() > 0 for v in unet_up)
    assert fake.processing.StableDiffusionProcessing.cached_c == [None, None, None]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_forges_in_place_blocks_train_and_get_their_forward_back(checkpointing, forge,
                                                                 demo_dataset):
    """Forge's transformer blocks add in place (`x += n`, backend/nn/unet.py); autograd refuses
    that unless the run makes it out of place, with gradient checkpointing's recomputation too."""
    fake, host = forge
    m = fake.shared.sd_model
    unet = m.forge_objects_original.unet.model.diffusion_model
    blocks = [b for b in unet.modules() if isinstance(b, fake_forge.ForgeTransformerBlock)]
    assert blocks
    before = _roots_sha(m)
    seen = {}

    def look(event):
        if event.kind == "step" and not seen:
            seen["wrapped"] = sum("forward" in b.__dict__ for b in blocks)
    cfg = _cfg(demo_dataset, steps=3)
    cfg.train.gradient_checkpointing = checkpointing
    manager = RunManager(host)
    record = manager.create(cfg)
    record.control.add_listener(look)
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "finished", record.error
    assert seen["wrapped"] == len(blocks)
    assert not any("forward" in b.__dict__ for b in blocks)  # Forge's own forward back
    assert _roots_sha(m) == before
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():  # and Forge's in-place forward still runs as before
        cond = m.get_learned_conditioning(["a"])
        assert torch.isfinite(unet(x, torch.tensor([10]), context=cond)).all()


def test_the_placeholder_is_loaded_when_a_run_starts(monkeypatch, tmp_path, demo_dataset):
    fake = fake_forge.install("sd1", monkeypatch, tmp_path, placeholder=True)
    from lora_train_ext.host.forge import ForgeHost

    host = ForgeHost()
    info = host.model_info()  # read from the chosen file's header, nothing loaded
    assert (info.name, info.arch, info.problem) == ("fake_forge_sd1", "sd1", "")
    assert fake.sd_models.reloads == 0
    record = _run(host, _cfg(demo_dataset, steps=2))
    assert record.state == "finished", record.error
    assert fake.sd_models.reloads == 1
    assert isinstance(fake.shared.sd_model, fake_forge.FakeForgeEngine)


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_sd2_and_sdxl_runs(arch, monkeypatch, tmp_path, demo_dataset):
    fake = fake_forge.install(arch, monkeypatch, tmp_path)
    from lora_train_ext.host.forge import ForgeHost

    host = ForgeHost()
    m = fake.shared.sd_model
    info = host.model_info()
    assert (info.arch, info.prediction) == (arch, "v" if arch == "sd2" else "epsilon")
    before = _roots_sha(m)
    record = _run(host, _cfg(demo_dataset, steps=2))
    assert record.state == "finished", record.error
    assert _roots_sha(m) == before
    from safetensors.torch import load_file

    names = {k.split(".")[0] for k in load_file(record.files[0])}
    prefixes = {n.split("_")[1] for n in names}
    assert prefixes == ({"unet", "te"} if arch == "sd2" else {"unet", "te1", "te2"})
    assert len(names) == sum(COUNTS[arch].values())


# -- Forge's LoRAs and caches ----------------------------------------------------------------------
def test_forges_merged_loras_are_taken_out_and_applied_again_after(forge, demo_dataset):
    fake, host = forge
    m = fake.shared.sd_model
    clean = _roots_sha(m)
    _lora_file(fake, "other", seed=1)
    _generate(host, "a <lora:other:1>")
    merged = _roots_sha(m)
    assert merged != clean and m.current_lora_hash != str([])
    seen = {}
    manager = RunManager(host)
    record = manager.create(_cfg(demo_dataset, steps=2))
    record.control.add_listener(
        lambda e: seen.setdefault("sha", _roots_sha(m)) if e.kind == "step" else None)
    with host.exclusive("test"):
        manager.execute(record)
    assert record.state == "finished", record.error
    assert seen["sha"] == clean  # trained on the model without the LoRA
    assert _roots_sha(m) == clean and m.current_lora_hash == str([])
    assert all(t.is_inference() for t in fake_forge.slots(m).values())
    _generate(host, "a <lora:other:1>")  # Forge applies it again, from the same originals
    assert _roots_sha(m) == merged
    _generate(host, "a plain prompt")
    assert _roots_sha(m) == clean


def test_hot_load_makes_forge_read_a_rewritten_file(forge):
    from safetensors.torch import load_file

    fake, host = forge
    m = fake.shared.sd_model
    clean = _roots_sha(m)
    kohya, (where, key) = next((k, v) for k, v in fake_forge.key_map(m).items()
                               if v[0] == "unet" and fake_forge.get_attr(
                                   m.forge_objects_original.unet.model, v[1]).dim() == 2)
    weight = fake_forge.get_attr(m.forge_objects_original.unet.model, key).detach().clone()
    path = _lora_file(fake, "mine", seed=1)
    _generate(host, "x <lora:mine:1>")
    first = _roots_sha(m)
    _lora_file(fake, "mine", seed=2)  # retrained into the same name
    _generate(host, "x <lora:mine:1>")
    assert _roots_sha(m) == first  # Forge alone keeps the old file (cache and hash)
    objects = fake_forge.slots(m)
    fake.processing.StableDiffusionProcessing.cached_c = ["stale", "stale", {}]
    host.hot_load([path])
    assert fake_forge.slots(m) == objects and _roots_sha(m) == first  # no weight touched
    assert fake.networks.load_lora_state_dict.cache_info().currsize == 0
    assert m.current_lora_hash == str([])
    assert fake.processing.StableDiffusionProcessing.cached_c == [None, None, None]
    _generate(host, "x <lora:mine:1>")
    assert _roots_sha(m) not in (first, clean)
    new = load_file(path)  # what Forge merged is the rewritten file
    patch = ("lora", (new[f"{kohya}.lora_up.weight"], new[f"{kohya}.lora_down.weight"],
                      float(new[f"{kohya}.alpha"]), None, None))
    expected = fake_forge.merge_lora_to_weight([[1.0, patch, 1.0, None, None]], weight)
    assert torch.equal(fake_forge.get_attr(m.forge_objects_original.unet.model, key), expected)
    _generate(host, "x plain")
    assert _roots_sha(m) == clean

def test_a_new_file_is_listed_at_once(forge):
    fake, host = forge
    path = _lora_file(fake, "brand_new", seed=3)
    assert "brand_new" not in fake.networks.available_networks
    host.hot_load([path])
    assert fake.networks.available_networks["brand_new"] == path


# -- pause and samples -------------------------------------------------------------------------------
def test_a_pause_lends_forge_its_own_objects_and_takes_them_back(forge):
    from lora_train_ext.core.guard import fingerprint

    fake, host = forge
    m = fake.shared.sd_model
    clean = _roots_sha(m)
    originals = fake_forge.slots(m)
    snapshot = _lora_file(fake, "run-step00000002", seed=4)
    lock = host.gpu_lock()
    lock.acquire()
    try:
        with host.prepared_model() as bundle:
            aliases = fake_forge.slots(m)
            prints = fingerprint(bundle.base_modules())
            token = host.lend_model(snapshot)
            now = fake_forge.slots(m)
            assert all(now[k] is originals[k] for k in originals)  # Forge's own objects
            assert fake.backend_unet.attention_function is fake.attention.attention_split
            _generate(host, "test <lora:run-step00000002:1>")  # merges into Forge's weights
            assert _roots_sha(m) != clean
            host.take_model_back(token)
            now = fake_forge.slots(m)
            assert all(now[k] is aliases[k] for k in aliases)
            assert fingerprint(bundle.base_modules()) == prints  # the guard sees no change
            assert fake.backend_unet.attention_function is fake.attention.attention_pytorch
    finally:
        lock.release()
    assert _roots_sha(m) == clean
    assert all(t is originals[k] for k, t in fake_forge.slots(m).items())


def test_take_back_refuses_weights_with_other_values(forge):
    fake, host = forge
    m = fake.shared.sd_model
    snapshot = _lora_file(fake, "snap", seed=5)
    lock = host.gpu_lock()
    lock.acquire()
    try:
        with host.prepared_model():
            token = host.lend_model(snapshot)
            w = m.forge_objects_original.unet.model.diffusion_model.out[2]
            with torch.inference_mode():  # someone writes into Forge's weight
                w.weight = nn.Parameter(w.weight + 1, requires_grad=False)
            with pytest.raises(UserError, match="other values"):
                host.take_model_back(token)
    finally:
        lock.release()


def test_samples_and_snapshots_during_a_run(forge, demo_dataset):
    fake, host = forge
    m = fake.shared.sd_model
    before = _roots_sha(m)
    cfg = _cfg(demo_dataset, steps=4, name="sampled")
    cfg.sample.prompts = "shp style, red circle"
    cfg.sample.every_steps = 2
    cfg.sample.steps = 2
    cfg.save.save_every_steps = 2  # a snapshot's hot-load mid-run touches no weight
    record = _run(host, cfg)
    assert record.state == "finished", record.error
    assert fake.processing.generations.count("shp style, red circle") >= 2
    assert [os.path.basename(p) for p in record.files] == ["sampled.safetensors",
                                                           "sampled-step00000002.safetensors"]
    assert _roots_sha(m) == before


# -- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["ia3", "oft", "boft"])
def test_algorithms_forge_cannot_load_are_refused(algo, forge, demo_dataset):
    fake, host = forge
    with pytest.raises((UserError, UserErrors)) as err:
        RunManager(host).create(_cfg(demo_dataset, algo=algo))
    assert "Forge" in str(err.value) and algo.upper() in str(err.value)
    assert RunManager(host).create(_cfg(demo_dataset, algo="dora"))  # DoRA is read by Forge


def test_ia3_is_still_offered_in_the_webui(sd1_bundle, monkeypatch, demo_dataset):
    import fake_webui
    from lora_train_ext.host.webui import WebUIHost

    fake_webui.install(sd1_bundle, monkeypatch)
    WebUIHost().check_config(_cfg(demo_dataset, algo="ia3"))


def test_streamed_quantised_or_scattered_models_are_refused(forge):
    fake, host = forge
    m = fake.shared.sd_model
    objects = fake_forge.slots(m)
    fake.memory_management.stream_next_load = True
    with pytest.raises(UserError, match="GPU Weights"):
        with host.prepared_model():
            pass
    assert fake_forge.slots(m) == objects  # nothing was changed
    fake.memory_management.current_loaded_models.clear()
    for module in m.forge_objects_original.unet.model.modules():
        if hasattr(module, "prev_parameters_manual_cast"):
            module.parameters_manual_cast = module.prev_parameters_manual_cast
            del module.prev_parameters_manual_cast
    kmodel = m.forge_objects_original.unet.model
    kmodel.storage_dtype = torch.float8_e4m3fn
    assert "Diffusion in Low Bits" in host.model_info().problem
    with pytest.raises(UserError, match="Diffusion in Low Bits"):
        with host.prepared_model():
            pass
    kmodel.storage_dtype = torch.float32
    fake.memory_management.get_torch_device = lambda: torch.device("meta")  # Forge's device
    with pytest.raises(UserError, match="keeps the UNet on cpu, not on meta.*one device"):
        with host.prepared_model():
            pass
    assert fake_forge.slots(m) == objects


def test_models_forge_loads_but_cannot_be_trained(forge):
    fake, host = forge
    m = fake.shared.sd_model
    m.is_inpaint = True
    assert "inpainting" in host.model_info().problem
    m.is_inpaint = False
    m.is_sd1, m.is_sd3 = False, True
    assert "cannot be trained" in host.model_info().problem
    m.is_sd1, m.is_sd3 = True, False
    m.forge_objects_original.unet.model.predictor.prediction_type = "edm"
    assert "prediction type (edm)" in host.model_info().problem


# -- DoRA against Forge's math -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["linear", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora_delta_is_what_forge_merges(shape, strength):
    """Forge merges a file's DoRA module with `weight_decompose` (backend/patcher/lora.py), which
    reads the norm axis from `dora_scale`'s shape: ours is (1, in[, 1, 1]), so the input axis."""
    from lora_train_ext.core.networks.dora import DoRAModule, dora_delta_from_file

    g = torch.Generator().manual_seed(7)
    with fake_forge.using_forge_operations():
        base = {"linear": lambda: nn.Linear(12, 10), "conv1x1": lambda: nn.Conv2d(6, 5, 1),
                "conv3x3": lambda: nn.Conv2d(6, 5, 3, padding=1)}[shape]()
    adapter = DoRAModule("lora_unet_x", base, rank=3, alpha=2.0)
    with torch.no_grad():
        for p in (adapter.lora_down.weight, adapter.lora_up.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapter.dora_scale.mul_(1 + 0.2 * torch.rand(adapter.dora_scale.shape, generator=g))
    adapter.multiplier = strength
    assert adapter.dora_scale.shape[0] == 1 != base.weight.shape[0]  # Forge: input axis
    tensors = {n: t.detach() for n, t in adapter.state_dict().items()}
    patch = ("lora", (tensors["lora_up.weight"], tensors["lora_down.weight"],
                      float(tensors["alpha"]), None, tensors["dora_scale"]))
    forge = fake_forge.merge_lora_to_weight([[strength, patch, 1.0, None, None]],
                                            base.weight.detach())
    ours = base.weight.detach() + adapter.delta_weight()
    assert torch.allclose(ours, forge, atol=2e-6, rtol=1e-5), (ours - forge).abs().max()
    from_file = base.weight.detach() + strength * dora_delta_from_file(tensors, base.weight.detach())
    assert torch.allclose(from_file, forge, atol=2e-6, rtol=1e-5)
    # the hooked forward is the merged forward
    x = torch.randn(2, 12) if shape == "linear" else torch.randn(2, 6, 4, 4)
    adapter.attach()
    try:
        with torch.no_grad():
            hooked = base(x)
    finally:
        adapter.detach()
    merged = nn.functional.linear(x, forge, base.bias) if shape == "linear" else \
        nn.functional.conv2d(x, forge, base.bias, base.stride, base.padding)
    assert torch.allclose(hooked, merged, atol=1e-5)
