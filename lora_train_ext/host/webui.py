"""The WebUI as a host: the only module that imports `modules.*` (and the Lora extension).

Facts used here were checked in the WebUI's v1.10.1 source:
- `modules.call_queue.queue_lock` (a FIFO lock, not reentrant) guards every GPU job;
  `shared.state.begin/end`, `job_count`, `sampling_step(s)`, `textinfo`, `interrupted`, `skipped`
  feed `/internal/progress` (modules/progress.py) and the Interrupt / Skip buttons.
- The Lora extension (`extensions-builtin/Lora/networks.py`) bakes networks into weights, keeps
  backups in `network_weights_backup` / `network_bias_backup`, tracks `network_current_names`,
  and restores with `network_restore_weights_from_backup(module)`; `loaded_networks`,
  `networks_in_memory` (re-read only when the file's mtime is newer) and
  `list_available_networks()` hold its caches.
- Conditioning caches are class attributes: `StableDiffusionProcessing.cached_c / cached_uc`
  and `StableDiffusionProcessingTxt2Img.cached_hr_c / cached_hr_uc`.
- Model flags `is_sd1`, `is_sd2`, `is_sdxl` (modules/sd_models.py `set_model_type`),
  `parameterization` ('v' for v-prediction), `alphas_cumprod`, `scale_factor`.
- SDXL embedders run under no_grad unless `is_trainable`, and drop their output for a random part
  of the batch with probability `ucg_rate` (sgm GeneralConditioner, AbstractEmbModel.ucg_rate);
  the WebUI's own SDXL `get_learned_conditioning` (modules/sd_models_xl.py) sets it to 0.0, so a
  hijack wrapper that never conditioned may lack the attribute.
- `modules.sd_vae.loaded_vae_file`: the path of the VAE file in use, None for the checkpoint's own.
- Attention optimisations are class-level forwards set by `sd_hijack.apply_optimizations()`.
- --medvram / --lowvram (modules/lowvram.py `setup_for_low_vram`, applied by
  modules/sd_models.py `send_model_to_device` before the hijack): the model gets `lowvram = True`;
  the text encoder (SD1 `cond_stage_model.transformer`, later `.wrapped.transformer`, moved with
  its parent; SD2 `cond_stage_model.model` and its `token_embedding`; SDXL the `conditioner`), the
  VAE (`first_stage_model`, whose `encode` / `decode` become instance-level wrappers) and, with
  --medvram, `model` (the UNet's wrapper) or, with --lowvram, the UNet's `time_embed`, each input
  block, the middle block and each output block stay on the CPU, each with a forward pre-hook (a
  function named `send_me_to_gpu`) that moves it to the GPU and the module there before it back
  to the CPU; `lowvram.module_in_gpu` is the one on the GPU, `send_everything_to_cpu()` moves it
  back. --medvram-sdxl does the same for SDXL models only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from typing import Iterator

import torch

from ..core.bundle import ModelBundle, Progress
from .base import Host, ModelInfo

SETTINGS_SECTION = ("lora_train", "Train LoRA")
API_OPTION = "lora_train_api"  # the setting that offers the HTTP API without --api
TRAIN_SAFE_ATTENTION = ("sdp", "sdp-no-mem", "xformers")
_ABSENT = object()


def _lora_networks_module():
    """The built-in Lora extension's `networks` module, if it is loaded."""
    mod = sys.modules.get("networks")
    return mod if mod is not None and hasattr(mod, "loaded_networks") else None


def _unet_in_channels(m) -> int:
    """Latent channels the UNet takes: 4 for text-to-image; 9 (inpainting) or 5 (depth) else."""
    first = m.model.diffusion_model.input_blocks[0][0]
    return getattr(first, "in_channels", 4)


def _sdxl_text_encoders(m) -> dict[str, torch.nn.Module] | None:
    """{'te1': CLIP-L, 'te2': open_clip bigG} of an SDXL base-type model (the WebUI's hijack wraps
    each sgm embedder: `.wrapped` is sgm's FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder2); None
    for other conditioners (the refiner has bigG only)."""
    embedders = list(getattr(getattr(m, "conditioner", None), "embedders", None) or [])
    if len(embedders) < 2:
        return None
    te1 = getattr(getattr(embedders[0], "wrapped", None), "transformer", None)
    te2 = getattr(getattr(embedders[1], "wrapped", None), "model", None)
    if te1 is None or te2 is None or not hasattr(getattr(te2, "transformer", None), "resblocks"):
        return None
    return {"te1": te1, "te2": te2}


def _sdxl_condition(m, captions: list[str], sizes, resolution: int) -> dict:
    """{'crossattn', 'vector'} from the sgm conditioner, as the WebUI's SDXL
    `get_learned_conditioning` (modules/sd_models_xl.py) builds it, but with each image's own
    original size, crop and target size (sizes: (orig_h, orig_w, crop_top, crop_left, target_h,
    target_w) per caption; none: `resolution` square, no crop) where the WebUI's takes one width /
    height for the batch and the crop from its settings."""
    from modules import devices, prompt_parser

    rows = [tuple(s) for s in sizes] if sizes else \
        [(resolution, resolution, 0, 0, resolution, resolution)] * len(captions)
    table = torch.tensor(rows, device=devices.device, dtype=devices.dtype)
    text = prompt_parser.SdConditioning(list(captions), width=int(rows[0][5]),
                                        height=int(rows[0][4]))
    batch = {"txt": text, "original_size_as_tuple": table[:, 0:2],
             "crop_coords_top_left": table[:, 2:4], "target_size_as_tuple": table[:, 4:6]}
    # the embedders' ucg_rate is 0.0 here: `prepared_model` sets it for the run and gives it back
    return m.conditioner(batch)


def _encoder_sha256(vae: torch.nn.Module, scale_factor) -> str:
    """sha256 over what decides a latent: the names, dtypes, shapes and bytes of the VAE's
    encoder and quant_conv tensors (the whole VAE where it has no such parts), and the latent scale.
    The decoder is left out, so a VAE with only its decoder fine-tuned shares its latents. An SD
    VAE encoder is ~34M parameters: hashing its 68 MB (fp16) takes ~40 ms on a CPU with SHA
    instructions, once per run."""
    state = vae.state_dict()
    parts = {k: t for k, t in state.items() if k.startswith(("encoder.", "quant_conv."))} or state
    h = hashlib.sha256(f"scale={float(scale_factor)!r}".encode())
    for name in sorted(parts):
        t = parts[name].detach()
        h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def api_requested() -> bool:
    """Whether to add the /lora-train/v1/ routes: only when the user asked for an API, with
    `--api` (or `--nowebui`, where the API is all the WebUI serves) or with this extension's
    setting. The option is read with a default: under --nowebui no settings page registers it."""
    from modules import shared

    cmd_opts = shared.cmd_opts
    if getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False):
        return True
    try:
        return bool(getattr(shared.opts, API_OPTION, False))
    except Exception:  # an Options object without the key and without a default
        return False


class _LowVramSuspended:
    """--medvram / --lowvram for the length of a run. The WebUI keeps all but one part of the
    model on the CPU and moves parts in forward pre-hooks; a training step needs the UNet's
    blocks (and the text encoder, the VAE while caching) on the GPU at once, and a hook moving a
    block away between the forward and the backward would break the backward. So for the run:
    where every tensor is, which module is on the GPU, the `send_me_to_gpu` hooks and the VAE's
    encode / decode wrappers are recorded; the hooks and wrappers are taken out and the whole
    model goes onto the device. `exit()` puts every tensor back where it was, the hooks back in
    their places and order, the wrappers and `lowvram.module_in_gpu` as they were, so the
    WebUI's next generation runs in its low-VRAM mode as before. Nothing happens for a model
    without `lowvram`."""

    HOOK_NAME = "send_me_to_gpu"

    def __init__(self, m):
        self.m = m
        self.active = bool(getattr(m, "lowvram", False))
        self.placement = None
        self.in_gpu = None
        self.hooks: list[tuple[torch.nn.Module, list]] = []  # (module, its pre-hooks in order)
        self.wrappers: list[tuple[object, str, object]] = []

    def enter(self) -> None:
        if not self.active:
            return
        from modules import devices, lowvram

        from ..core.offload import Placement, move_tensors

        m = self.m
        self.placement = Placement([m])
        self.in_gpu = lowvram.module_in_gpu
        for sub in m.modules():
            hooks = list(sub._forward_pre_hooks.items())
            if any(getattr(h, "__name__", "") == self.HOOK_NAME for _, h in hooks):
                self.hooks.append((sub, hooks))
                for key, h in hooks:
                    if getattr(h, "__name__", "") == self.HOOK_NAME:
                        del sub._forward_pre_hooks[key]
        vae = getattr(m, "first_stage_model", None)
        for name in ("encode", "decode"):
            if vae is not None and name in vae.__dict__:
                self.wrappers.append((vae, name, vae.__dict__.pop(name)))
        lowvram.module_in_gpu = None
        move_tensors(m, devices.device)

    def exit(self) -> None:
        if not self.active or self.placement is None:
            return
        from modules import devices, lowvram

        self.placement.restore()
        for sub, hooks in self.hooks:
            now = dict(sub._forward_pre_hooks)
            sub._forward_pre_hooks.clear()
            for key, h in hooks:  # the recorded order; hooks added since stay, after them
                if getattr(h, "__name__", "") == self.HOOK_NAME:
                    sub._forward_pre_hooks[key] = h
                elif key in now:
                    sub._forward_pre_hooks[key] = now.pop(key)
            sub._forward_pre_hooks.update(now)
        for obj, name, fn in self.wrappers:
            setattr(obj, name, fn)
        lowvram.module_in_gpu = self.in_gpu
        self.placement = None
        self.hooks.clear()
        self.wrappers.clear()
        devices.torch_gc()


class WebUIHost(Host):
    name = "webui"

    def __init__(self):
        super().__init__()
        self._saved_attention = None

    # -- model ------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        from modules import shared

        m = shared.sd_model
        if m is None:
            return ModelInfo(name="(none)", arch="", problem="no checkpoint is loaded")
        info = getattr(m, "sd_checkpoint_info", None)
        name = getattr(info, "name_for_extra", None) or getattr(info, "title", "") or "checkpoint"
        arch = "sdxl" if getattr(m, "is_sdxl", False) else "sd2" if getattr(m, "is_sd2", False) \
            else "sd1" if getattr(m, "is_sd1", False) else ""
        if getattr(m, "is_ssd", False) or getattr(m, "is_sd3", False):
            arch = ""
        prediction = "v" if getattr(m, "parameterization", "eps") == "v" else "epsilon"
        problem = ""
        opts = shared.cmd_opts
        if not arch:
            problem = "this model type cannot be trained (SD1.x, SD2.x and SDXL can)"
        elif arch != "sd1" and (getattr(m, "is_sdxl_inpaint", False) or _unet_in_channels(m) != 4):
            problem = "inpainting and depth models cannot be trained; load a text-to-image model"
        elif arch == "sdxl" and _sdxl_text_encoders(m) is None:
            problem = ("this SDXL model lacks the CLIP-L + OpenCLIP bigG text encoder pair (a "
                       "refiner?); only SDXL base-type models can be trained")
        return ModelInfo(name=name, arch=arch, prediction=prediction,
                         hash=getattr(info, "shorthash", "") or "", problem=problem,
                         default_resolution=1024 if arch == "sdxl" else 768 if prediction == "v" else 512,
                         default_dtype=self._default_dtype(m))

    @staticmethod
    def _default_dtype(m) -> str:
        """What the device runs fast (`core.device.preferred_dtype`): bf16 where the GPU has it,
        fp16 on older GPUs, on the CPU fp32 unless its bf16 is clearly faster; a half-precision
        model on the CPU can only train in bf16 (`check_config` refuses fp32 there)."""
        from ..core.device import preferred_dtype

        weights = next(m.model.diffusion_model.parameters())
        if getattr(m, "lowvram", False):  # the UNet waits on the CPU; the run uses the GPU
            from ..core.device import preferred_dtype
            from modules import devices

            return preferred_dtype(devices.device)
        if weights.device.type == "cpu" and weights.dtype != torch.float32:
            return "bf16"
        return preferred_dtype(weights.device)

    def free_memory(self) -> None:
        from modules import devices

        devices.torch_gc()

    def device(self) -> torch.device | None:
        from modules import shared

        if shared.sd_model is None:
            return None
        if getattr(shared.sd_model, "lowvram", False):  # --medvram / --lowvram: parts wait on
            from modules import devices                  # the CPU; the run moves them

            return torch.device(devices.device)
        return next(shared.sd_model.model.diffusion_model.parameters()).device

    def model_parts(self):
        from modules import shared

        m = shared.sd_model
        info = self.model_info()
        if m is None or not info.arch:
            return None
        if info.arch == "sdxl":
            tes = _sdxl_text_encoders(m) or {}
        elif info.arch == "sd2":
            tes = {"te": m.cond_stage_model.wrapped.model}
        else:
            tes = {"te": m.cond_stage_model.wrapped.transformer}
        return info.arch, m.model.diffusion_model, tes, m.first_stage_model

    def weights_dtype(self) -> torch.dtype:
        from modules import shared

        return next(shared.sd_model.model.diffusion_model.parameters()).dtype

    def check_config(self, cfg) -> None:
        from ..core.errors import UserError

        if cfg.train.dtype == "fp32" and self.weights_dtype() != torch.float32:
            raise UserError("train.dtype", "the loaded model is in half precision (the WebUI's "
                                           "default): use bf16 or fp16, or start the WebUI with "
                                           "--no-half to train in fp32")

    @contextlib.contextmanager
    def prepared_model(self) -> Iterator[ModelBundle]:
        from modules import devices, shared

        m = shared.sd_model
        info = self.model_info()
        if info.problem:
            from ..core.errors import UserError

            raise UserError("model", info.problem)
        self.unload_baked_networks()
        self._use_training_attention()
        saved = []  # (embedder, attribute, value before the run or _ABSENT)
        low = _LowVramSuspended(m)
        try:
            low.enter()
            bundle = self._bundle(m, info)
            # SDXL: gradients through the text encoders, no random caption dropout
            for emb in getattr(getattr(m, "conditioner", None), "embedders", []) or []:
                for name, value in (("is_trainable", True), ("ucg_rate", 0.0)):
                    saved.append((emb, name, getattr(emb, name, _ABSENT)))
                    setattr(emb, name, value)
            yield bundle
        finally:
            for emb, name, value in reversed(saved):
                if value is not _ABSENT:
                    setattr(emb, name, value)
                elif hasattr(emb, name):
                    delattr(emb, name)
            low.exit()
            self._restore_attention()
            devices.torch_gc()

    def _bundle(self, m, info: ModelInfo) -> ModelBundle:
        """The resident model as a bundle. Text encoders (roots whose module paths the targets
        expect): SD1 the HF CLIPTextModel (`cond_stage_model.wrapped.transformer`); SD2 the
        open_clip model inside ldm's FrozenOpenCLIPEmbedder (`cond_stage_model.wrapped.model`,
        paths `transformer.resblocks.N...`); SDXL the sgm conditioner's embedders, CLIP-L
        (`embedders[0].wrapped.transformer`) and open_clip bigG (`embedders[1].wrapped.model`).
        SDXL conditions through the conditioner with per-image sizes (`_sdxl_condition`) and
        denoises with `y` = the conditioning's vector."""
        from modules import devices

        unet = m.model.diffusion_model
        device = devices.device
        vae = m.first_stage_model
        if info.arch == "sdxl":
            text_encoders = _sdxl_text_encoders(m)
        elif info.arch == "sd2":
            text_encoders = {"te": m.cond_stage_model.wrapped.model}
        else:
            text_encoders = {"te": m.cond_stage_model.wrapped.transformer}

        def encode(images: torch.Tensor) -> torch.Tensor:
            x = images.to(device=device, dtype=next(vae.parameters()).dtype)
            if info.arch == "sdxl":
                # sgm's encode_first_stage returns a sample; the posterior's mean (its mode, as
                # for SD1/SD2) keeps cached latents reproducible
                with torch.no_grad():
                    latents = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0] * m.scale_factor
            else:
                posterior = m.encode_first_stage(x)
                latents = posterior if isinstance(posterior, torch.Tensor) else \
                    posterior.mode() * m.scale_factor
            latents = latents.float()
            if not torch.isfinite(latents).all():
                from ..core.errors import UserError

                raise UserError("model", "the VAE gave NaN/inf latents (a half-precision VAE "
                                         "overflowing?): start the WebUI with --no-half-vae or use "
                                         "an fp16-fixed VAE")
            return latents

        if info.arch == "sdxl":
            def condition(captions: list[str], sizes=None):
                return _sdxl_condition(m, captions, sizes, info.default_resolution)
        else:
            def condition(captions: list[str], sizes=None):
                return m.get_learned_conditioning(list(captions))

        def denoise(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
            dtype = next(unet.parameters()).dtype
            cast = not torch.is_autocast_enabled() and dtype != torch.float32
            if info.arch == "sdxl":
                context, y = cond["crossattn"], cond["vector"]
                if cast:
                    x, context, y = x.to(dtype), context.to(dtype), y.to(dtype)
                return unet(x, t, context=context, y=y)
            if cast:
                x = x.to(dtype)
                cond = cond.to(dtype)
            return unet(x, t, context=cond)

        # the schedule as trained: the WebUI may rescale `alphas_cumprod` for sampling (zero
        # terminal SNR option) and keeps the original beside it
        original = getattr(m, "alphas_cumprod_original", None)
        alphas = original if original is not None else m.alphas_cumprod
        return ModelBundle(
            arch=info.arch, unet=unet, text_encoders=text_encoders, vae=vae,
            encode=encode, condition=condition, denoise=denoise, prediction=info.prediction,
            alphas_cumprod=alphas.detach().double().cpu(), model_name=info.name,
            model_hash=info.hash, resolution=info.default_resolution, device=device,
            vae_id=self._vae_id(info, vae, m.scale_factor),
        )

    @staticmethod
    def _vae_id(info: ModelInfo, vae: torch.nn.Module, scale_factor) -> str:
        """The VAE's identity in latent-cache keys: the checkpoint's hash and the WebUI's loaded
        VAE file ('checkpoint' for the checkpoint's own VAE); where either is unknown, a sha256
        of the encoder's weights (`_encoder_sha256`), so two VAEs never share an id."""
        try:
            from modules import sd_vae

            name = sd_vae.loaded_vae_file or "checkpoint"
        except Exception:
            name = ""
        if name and info.hash:
            return f"{info.hash}:{name}"
        return "weights:" + _encoder_sha256(vae, scale_factor)

    # -- the Lora extension's state -----------------------------------------------------------
    def unload_baked_networks(self) -> int:
        """Restore every module the Lora extension changed; forget what it applied.

        Returns how many modules were restored. Without this a run would train on a model with
        someone's LoRA baked in.
        """
        from modules import shared

        networks = _lora_networks_module()
        if networks is None or shared.sd_model is None:
            return 0
        networks.loaded_networks.clear()
        restored = 0
        with torch.no_grad():
            for module in shared.sd_model.modules():
                # only what holds a network now: a module whose current names are empty has
                # its own weights already (the backups stay, as the Lora extension keeps them),
                # and writing them again would change nothing but the tensors' version counters
                if not getattr(module, "network_current_names", ()):
                    continue
                if getattr(module, "network_weights_backup", None) is not None or \
                        getattr(module, "network_bias_backup", None) is not None:
                    networks.network_restore_weights_from_backup(module)
                    restored += 1
                module.network_current_names = ()
        return restored

    def hot_load(self, paths: list[str]) -> None:
        """New files are listed at once; rewritten ones are re-read and re-applied."""
        networks = _lora_networks_module()
        if networks is not None:
            networks.list_available_networks()
            for path in paths:
                name = os.path.splitext(os.path.basename(path))[0]
                networks.networks_in_memory.pop(name, None)
            self.unload_baked_networks()
        self.clear_conditioning_cache()

    def clear_conditioning_cache(self) -> None:
        """The WebUI keeps the last prompt's conditioning across generations (class attributes):
        stale once a run changed the text encoder's output, or an adapter was taken out."""
        from modules import processing

        processing.StableDiffusionProcessing.cached_c = [None, None]
        processing.StableDiffusionProcessing.cached_uc = [None, None]
        processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
        processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]

    # -- merging into the loaded model ----------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """shared.sd_model's tensors under checkpoint names: the WebUI's hijack wraps the text
        encoders (`cond_stage_model.wrapped.transformer`, `...token_embedding.wrapped`), which
        checkpoints do not name."""
        from modules import shared

        return {re.sub(r"\.wrapped(?=\.)", "", k): v
                for k, v in shared.sd_model.state_dict().items()}

    def release_networks(self) -> None:
        """Restore what the Lora extension baked in, then drop its backups: after an in-memory
        merge (or revert) they hold weights the model no longer has."""
        from modules import shared

        self.unload_baked_networks()
        for module in shared.sd_model.modules():
            for name in ("network_weights_backup", "network_bias_backup"):
                if getattr(module, name, None) is not None:
                    setattr(module, name, None)

    def model_changed(self) -> None:
        self.hot_load([])  # the conditioning caches and the Lora extension's state

    def checkpoint_dir(self) -> str:
        from modules import sd_models, shared

        return getattr(shared.cmd_opts, "ckpt_dir", None) or sd_models.model_path

    def vae_dir(self) -> str:
        from modules import shared

        folder = getattr(shared.cmd_opts, "vae_dir", None)
        if folder:
            return folder
        try:
            from modules import sd_vae

            return sd_vae.vae_path
        except (ImportError, AttributeError):
            return super().vae_dir()

    def refresh_checkpoints(self) -> None:
        from modules import sd_models

        sd_models.list_models()

    # -- attention ------------------------------------------------------------------------------
    def _use_training_attention(self) -> None:
        """Train with SDP attention unless the chosen optimisation is known to backprop well."""
        from modules import sd_hijack

        current = getattr(sd_hijack, "current_optimizer", None)
        name = getattr(current, "name", "")
        self._saved_attention = None
        if name in TRAIN_SAFE_ATTENTION:
            return
        sdp = next((o for o in getattr(sd_hijack, "optimizers", []) if o.name == "sdp"), None)
        if sdp is None or not sdp.is_available():
            return
        sdp.apply()
        self._saved_attention = name or "none"

    def _restore_attention(self) -> None:
        if self._saved_attention is None:
            return
        from modules import sd_hijack

        sd_hijack.apply_optimizations()
        self._saved_attention = None

    # -- lock and progress ------------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self, job: str):
        from modules import call_queue, shared

        with call_queue.queue_lock:
            shared.state.begin(job=job)
            try:
                yield
            finally:
                shared.state.end()

    def on_progress(self, event: Progress) -> None:
        from modules import shared

        state = shared.state
        if event.kind in ("start", "step"):
            state.job_count = 1
            state.job_no = 0
            state.sampling_steps = max(1, event.total)
            state.sampling_step = event.step
        if event.kind == "step":
            lr = ", ".join(f"{k} {v:.2e}" for k, v in event.lr.items())
            eta = f", ETA {event.eta:.0f}s" if event.eta is not None else ""
            state.textinfo = (f"Training LoRA: step {event.step}/{event.total}, loss "
                              f"{event.loss:.4f} (avg {event.loss_avg:.4f}), lr {lr}{eta}")
        elif event.kind == "end":
            state.textinfo = (f"Training {event.message} at step {event.step}, loss "
                              f"{event.loss:.4f}: saved {os.path.basename(event.path)}")
        elif event.message:
            state.textinfo = event.message

    def gpu_lock(self):
        from modules import call_queue

        return call_queue.queue_lock

    def lend_model(self, snapshot: str) -> dict:
        """Paused: the WebUI's own attention back for generations, the snapshot hot-loaded, the
        queue lock let go (txt2img, the test grid and other extensions' jobs run)."""
        from modules import shared

        self._restore_attention()
        token = super().lend_model(snapshot)  # hot-load, remember the model, release the lock
        token["model_object"] = id(shared.sd_model)
        shared.state.textinfo = f"Training LoRA: paused; test <lora:{os.path.splitext(os.path.basename(snapshot))[0]}>"
        return token

    def take_model_back(self, token: dict) -> None:
        """Retake the queue lock (after a generation in progress), refuse another model, undo
        what generations baked into the weights, and go back to training attention."""
        from modules import shared

        super().take_model_back(token)
        if id(shared.sd_model) != token.get("model_object"):
            from ..core.errors import UserError

            raise UserError("model", "the WebUI loaded another model object while the run was "
                                     "paused; its state is saved: resume it from its state folder")
        self.unload_baked_networks()
        self._use_training_attention()
        shared.state.interrupted = False  # an Interrupt of a generation during the pause
        shared.state.skipped = False

    def interrupt_requested(self) -> bool:
        from modules import shared

        return bool(shared.state.interrupted or shared.state.skipped)

    # -- files --------------------------------------------------------------------------------
    def lora_dir(self) -> str:
        from modules import shared

        return shared.cmd_opts.lora_dir

    def output_dir(self) -> str:
        from modules import shared

        return getattr(shared.opts, "lora_train_output_dir", "") or self.lora_dir()

    def run_dir(self) -> str:
        """Settings -> Train LoRA, else outputs/lora-train in the WebUI's data folder (where
        its other outputs go): state, history, samples and caches, never the Lora folder."""
        from modules import paths_internal, shared

        return getattr(shared.opts, "lora_train_run_dir", "") or \
            os.path.join(paths_internal.data_path, "outputs", "lora-train")

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompts, negative, seed, steps, width, height, cfg_scale,
                 sampler_name: str = ""):
        from modules import processing, shared

        images = []
        for prompt in prompts:
            self.clear_conditioning_cache()  # the text encoder may have changed since (training)
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=shared.sd_model, prompt=prompt, negative_prompt=negative, seed=int(seed),
                steps=int(steps), width=int(width), height=int(height), cfg_scale=float(cfg_scale),
                batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True,
                **({"sampler_name": sampler_name} if sampler_name else {}))
            try:
                processed = processing.process_images(p)
            finally:
                p.close()
            images.append(processed.images[0])
        return images

    def save_grid(self, image, prompt: str) -> str:
        from modules import images, shared

        folder = shared.opts.outdir_grids or shared.opts.outdir_txt2img_grids
        path, _ = images.save_image(image, folder, "lora-test", prompt=prompt,
                                    extension=shared.opts.grid_format, grid=True)
        return path
