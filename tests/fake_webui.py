"""A stand-in for the parts of the WebUI (v1.10.1) that `lora_train_ext.host.webui` uses.

Each fact below was checked in the WebUI's source (paths relative to its root):
- modules/call_queue.py: `queue_lock` is a module-level FIFO lock (a plain lock here).
- modules/shared_state.py: `State.begin(job)`, `end()`, fields `job_count`, `job_no`,
  `sampling_step`, `sampling_steps`, `textinfo`, `interrupted`, `skipped`.
- modules/sd_models.py `set_model_type`: flags `is_sd1`, `is_sd2`, `is_sdxl`, `is_ssd`, `is_sd3`.
- ldm LatentDiffusion: `model.diffusion_model`, `first_stage_model`, `cond_stage_model`,
  `encode_first_stage(x)` -> posterior with `.mode()`, `scale_factor`, `alphas_cumprod`,
  `parameterization` ('eps' / 'v'), `get_learned_conditioning(prompts)`; the WebUI wraps the SD1
  text encoder so that `cond_stage_model.wrapped.transformer` is the HF CLIPTextModel
  (modules/sd_hijack_clip.py).
- extensions-builtin/Lora/networks.py: `loaded_networks` (list), `networks_in_memory` (dict),
  `list_available_networks()`, `network_restore_weights_from_backup(module)` copying
  `network_weights_backup` / `network_bias_backup` back; modules carry `network_current_names`.
- modules/processing.py: conditioning caches are class attributes `cached_c`, `cached_uc` of
  StableDiffusionProcessing and `cached_hr_c`, `cached_hr_uc` of
  StableDiffusionProcessingTxt2Img.
- modules/sd_hijack.py: `optimizers` (objects with `name`, `is_available()`, `apply()`),
  `current_optimizer`, `apply_optimizations()`.
- modules/script_callbacks.py: `on_ui_tabs(fn)`, `on_ui_settings(fn)`, `on_app_started(fn)`
  register callbacks; `app_started_callback(demo, app)` calls the app-started ones (webui.py calls
  it with demo=None under --nowebui). modules/options.py: `OptionInfo(default, label,
  section=...)` with `needs_restart()` returning itself; `opts.add_option(key, info)`; reading an
  option gives the stored value or its default. cmd_opts has `api`, `nowebui`, `api_auth`.
- modules/lowvram.py (--medvram / --lowvram; `apply_lowvram` below): `setup_for_low_vram` sets
  `sd_model.lowvram = True`, registers forward pre-hooks that are functions named
  `send_me_to_gpu` (move the hooked module, or its recorded parent, to `devices.device` and the
  module now in `module_in_gpu` back to the CPU) on the SD1 text encoder
  `cond_stage_model.transformer` (parent: that `cond_stage_model`; the hijack later wraps it, so
  it is `cond_stage_model.wrapped.transformer` then: modules/sd_models.py `load_model` calls
  `send_model_to_device` before `model_hijack.hijack`), on `first_stage_model` (whose `encode`
  and `decode` are replaced by instance-level wrappers that call the hook first), and with
  --medvram on `model` (the UNet's wrapper), with --lowvram on the UNet's `time_embed`, each of
  `input_blocks`, `middle_block` and each of `output_blocks`. `send_everything_to_cpu()` moves
  `module_in_gpu` to the CPU and sets it to None. Here `moves` records each hook's move.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
import types
from contextlib import contextmanager

import torch


class State:
    def __init__(self):
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.interrupted = False
        self.skipped = False
        self.begun = 0

    def begin(self, job="(unknown)"):
        self.begun += 1
        self.job = job
        self.interrupted = False
        self.skipped = False

    def end(self):
        self.job = ""
        self.job_count = 0


class Posterior:
    def __init__(self, p):
        self.p = p

    def mode(self):
        return self.p.mode()


class FakeLatentDiffusion(torch.nn.Module):
    """The tiny SD1 model dressed as the WebUI's resident LatentDiffusion."""

    def __init__(self, bundle):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = bundle.unet
        self.first_stage_model = bundle.vae
        self.cond_stage_model = torch.nn.Module()
        self.cond_stage_model.wrapped = torch.nn.Module()
        self.cond_stage_model.wrapped.transformer = bundle.text_encoders["te"]
        self.scale_factor = bundle.extras["vae_scale"]
        self.register_buffer("alphas_cumprod", bundle.alphas_cumprod.float())
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2, self.is_sdxl = True, False, False
        self.sd_checkpoint_info = types.SimpleNamespace(name_for_extra="fake_sd15",
                                                        title="fake_sd15.safetensors",
                                                        shorthash="abcdef1234")
        self._condition = bundle.condition

    def encode_first_stage(self, x):
        return Posterior(self.first_stage_model.encode(x))

    def get_learned_conditioning(self, prompts):
        return self._condition(list(prompts))


def _data_root() -> str:
    """A temp folder for one fake WebUI's user data, removed when the test process exits."""
    path = tempfile.mkdtemp(prefix="fake-webui-")
    atexit.register(shutil.rmtree, path, True)
    return path


def install(bundle, monkeypatch):
    """Put fake `modules.*` and `networks` modules into sys.modules; return them."""
    modules = types.ModuleType("modules")
    shared = types.ModuleType("modules.shared")
    shared.sd_model = FakeLatentDiffusion(bundle)
    shared.state = State()
    shared.cmd_opts = types.SimpleNamespace(lora_dir="", medvram=False, lowvram=False,
                                            medvram_sdxl=False, api_auth=None, api=False,
                                            nowebui=False)
    shared.opts = types.SimpleNamespace(lora_train_output_dir="", lora_train_run_dir="",
                                        outdir_grids="", outdir_txt2img_grids="",
                                        grid_format="png", data_labels={})

    class OptionInfo:
        def __init__(self, default=None, label="", component=None, component_args=None,
                     onchange=None, section=None, **_):
            self.default, self.label, self.section = default, label, section
            self.restart = False

        def needs_restart(self):
            self.restart = True
            return self

    def add_option(key, info):
        shared.opts.data_labels[key] = info
        if not hasattr(shared.opts, key):
            setattr(shared.opts, key, info.default)

    shared.OptionInfo = OptionInfo
    shared.opts.add_option = add_option
    script_callbacks = types.ModuleType("modules.script_callbacks")
    script_callbacks.registered = {"ui_tabs": [], "ui_settings": [], "app_started": []}
    for kind in script_callbacks.registered:
        setattr(script_callbacks, f"on_{kind}", script_callbacks.registered[kind].append)
    script_callbacks.app_started_callback = lambda demo, app: [
        fn(demo, app) for fn in script_callbacks.registered["app_started"]]
    # modules/paths_internal.py: data_path, the folder of the WebUI's user data (--data-dir)
    paths_internal = types.ModuleType("modules.paths_internal")
    paths_internal.data_path = os.path.join(_data_root(), "data")
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = threading.Lock()
    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")
    devices.torch_gc = lambda: None
    processing = types.ModuleType("modules.processing")

    class StableDiffusionProcessing:
        cached_c = [None, None]
        cached_uc = [None, None]

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        cached_hr_c = [None, None]
        cached_hr_uc = [None, None]

    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    sd_hijack = types.ModuleType("modules.sd_hijack")
    sd_hijack.optimizers = []
    sd_hijack.current_optimizer = types.SimpleNamespace(name="sdp")
    sd_hijack.apply_optimizations = lambda option=None: ""
    sd_vae = types.ModuleType("modules.sd_vae")
    sd_vae.loaded_vae_file = None

    lowvram = types.ModuleType("modules.lowvram")
    lowvram.module_in_gpu = None
    lowvram.moves = []

    def send_everything_to_cpu():
        if lowvram.module_in_gpu is not None:
            lowvram.module_in_gpu.to(torch.device("cpu"))
        lowvram.module_in_gpu = None

    lowvram.send_everything_to_cpu = send_everything_to_cpu
    lowvram.is_enabled = lambda m: m.lowvram
    networks = types.ModuleType("networks")
    networks.loaded_networks = []
    networks.networks_in_memory = {}
    networks.listed = 0

    def list_available_networks():
        networks.listed += 1

    def network_restore_weights_from_backup(module):
        backup = getattr(module, "network_weights_backup", None)
        if backup is not None:
            module.weight.copy_(backup)
        bias = getattr(module, "network_bias_backup", None)
        if bias is not None:
            module.bias.copy_(bias)

    networks.list_available_networks = list_available_networks
    networks.network_restore_weights_from_backup = network_restore_weights_from_backup

    for name, mod in (("modules", modules), ("modules.shared", shared),
                      ("modules.call_queue", call_queue), ("modules.devices", devices),
                      ("modules.processing", processing), ("modules.sd_hijack", sd_hijack),
                      ("modules.sd_vae", sd_vae), ("modules.paths_internal", paths_internal),
                      ("modules.script_callbacks", script_callbacks),
                      ("modules.lowvram", lowvram),
                      ("networks", networks)):
        monkeypatch.setitem(sys.modules, name, mod)
        if "." in name:
            setattr(modules, name.split(".", 1)[1], mod)
    return types.SimpleNamespace(shared=shared, networks=networks, processing=processing,
                                 call_queue=call_queue, sd_hijack=sd_hijack,
                                 script_callbacks=script_callbacks, lowvram=lowvram,
                                 devices=devices)


def apply_lowvram(fake, medvram: bool) -> list[tuple[torch.nn.Module, object]]:
    """The WebUI's low-VRAM set-up on the fake SD1 model, as modules/lowvram.py does it (see the
    module's notes); returns (module, hook) for every hook registered."""
    m, lowvram, devices = fake.shared.sd_model, fake.lowvram, fake.devices
    fake.shared.cmd_opts.medvram, fake.shared.cmd_opts.lowvram = medvram, not medvram
    m.lowvram = True
    parents = {}

    def send_me_to_gpu(module, _):
        module = parents.get(module, module)
        if lowvram.module_in_gpu is module:
            return
        if lowvram.module_in_gpu is not None:
            lowvram.module_in_gpu.to(torch.device("cpu"))
        module.to(devices.device)
        lowvram.module_in_gpu = module
        lowvram.moves.append(module)

    vae = m.first_stage_model
    encode, decode = vae.encode, vae.decode

    def encode_wrap(x):
        send_me_to_gpu(vae, None)
        return encode(x)

    def decode_wrap(z):
        send_me_to_gpu(vae, None)
        return decode(z)

    te = m.cond_stage_model.wrapped.transformer
    parents[te] = m.cond_stage_model.wrapped
    hooked = [te, vae]
    unet = m.model.diffusion_model
    if medvram:
        hooked.append(m.model)
    else:
        hooked += [unet.time_embed, *unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for module in hooked:
        module.register_forward_pre_hook(send_me_to_gpu)
    vae.encode, vae.decode = encode_wrap, decode_wrap
    return [(module, send_me_to_gpu) for module in hooked]


@contextmanager
def baked_lora(model: torch.nn.Module, networks, scale: float = 0.1):
    """Imitate the Lora extension having baked a network into every Linear (with backups)."""
    changed = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.network_weights_backup = module.weight.detach().clone()
                module.network_bias_backup = None
                module.weight.add_(scale)
                module.network_current_names = (("someone_else", 1.0, 1.0, None),)
                changed.append(module)
    networks.loaded_networks.append(object())
    yield changed
