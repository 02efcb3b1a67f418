"""A host without the WebUI: the tiny in-code model, its own lock, progress and a small sampler.

`python -m lora_train_ext preview` serves the same tab with this host, for development,
screenshots and browser tests. Generation parses `<lora:NAME:te=A:unet=B>` like the WebUI's
Lora extension and applies the file with the given text-encoder and UNet strengths.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..core.bundle import ModelBundle, Progress
from ..core.device import preferred_dtype
from ..core.lora_file import load_lora
from ..core.models.tiny import build_bundle
from ..core.networks.from_file import network_from_tensors
from .base import Host, ModelInfo

LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]+)*)>")


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """Strip `<lora:...>` tags; return (clean prompt, [(name, te, unet)]).

    Forms as the WebUI reads them: `<lora:n>`, `<lora:n:W>` (both), `<lora:n:TE:UNET>`,
    `<lora:n:te=A:unet=B>`.
    """
    found = []
    for m in LORA_TAG.finditer(prompt):
        name = m.group(1)
        args = [a for a in m.group(2).split(":") if a]
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        te = float(named.get("te", positional[0] if positional else 1.0))
        unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        found.append((name, te, unet))
    return LORA_TAG.sub("", prompt).strip(" ,"), found


class StandaloneHost(Host):
    name = "standalone"

    def __init__(self, out_dir: str, arch: str = "sd1", seed: int = 0):
        super().__init__()
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(os.path.join(self.out_dir, "Lora"), exist_ok=True)
        self.bundle = build_bundle(arch, "tiny", seed=seed)
        self.state = {"job": "", "step": 0, "total": 0, "text": ""}
        self.interrupt = threading.Event()

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=self.bundle.model_name, arch=self.bundle.arch,
                         prediction=self.bundle.prediction, hash=self.bundle.model_hash,
                         default_resolution=64,
                         default_dtype=preferred_dtype(self.bundle.device))

    def device(self) -> torch.device:
        return self.bundle.device

    def model_parts(self):
        b = self.bundle
        return b.arch, b.unet, dict(b.text_encoders), b.vae

    @contextlib.contextmanager
    def prepared_model(self) -> Iterator[ModelBundle]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny model: threads cost more than they give
        try:
            yield self.bundle
        finally:
            torch.set_num_threads(threads)

    @contextlib.contextmanager
    def exclusive(self, job: str):
        with self._lock:
            self.interrupt.clear()
            self.state.update(job=job, step=0, total=0, text="")
            try:
                yield
            finally:
                self.state["job"] = ""

    def on_progress(self, event: Progress) -> None:
        if event.kind == "step":
            self.state.update(step=event.step, total=event.total,
                              text=f"step {event.step}/{event.total} loss {event.loss:.4f}")

    def interrupt_requested(self) -> bool:
        return self.interrupt.is_set()

    def lora_dir(self) -> str:
        return os.path.join(self.out_dir, "Lora")

    def run_dir(self) -> str:
        return os.path.join(self.out_dir, "runs")

    def hot_load(self, paths: list[str]) -> None:
        """Nothing is cached: every generation reads the file afresh, like a refreshed WebUI."""

    def _find_lora(self, name: str) -> str:
        return self.find_lora(name)

    def checkpoint_state(self) -> dict:
        from ..core.models.tiny import checkpoint_state_dict

        return checkpoint_state_dict(self.bundle)  # views of the CPU model's tensors

    def checkpoint_dir(self) -> str:
        folder = os.path.join(self.out_dir, "Stable-diffusion")
        os.makedirs(folder, exist_ok=True)
        return folder

    @torch.no_grad()
    def generate(self, prompts, negative, seed, steps, width, height, cfg_scale,
                 sampler_name: str = ""):
        """DDIM whatever `sampler_name` says (the tiny model has one sampler)."""
        images = []
        b = self.bundle
        for prompt in prompts:
            text, loras = parse_lora_tags(prompt)
            networks = []
            for name, te, unet in loras:
                tensors, _ = load_lora(self._find_lora(name))
                net = network_from_tensors(b.trainable_roots(), b.arch, tensors)
                for part in net.parts():
                    net.set_multiplier(unet if part == "unet" else te, part)
                net.attach()
                networks.append(net)
            try:
                images.append(self._sample(text, negative, seed, steps, width, height, cfg_scale))
            finally:
                for net in networks:
                    net.detach()
        return images

    def _sample(self, prompt, negative, seed, steps, width, height, cfg_scale) -> Image.Image:
        return sample_image(self.bundle, prompt, negative, seed, steps, width, height, cfg_scale)

    def save_grid(self, image, prompt: str) -> str:
        folder = os.path.join(self.out_dir, "grids")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"grid-{time.strftime('%Y%m%d-%H%M%S')}.png")
        image.save(path)
        return path


@torch.no_grad()
def sample_image(bundle: ModelBundle, prompt: str, negative: str, seed: int, steps: int,
                 width: int, height: int, cfg_scale: float) -> Image.Image:
    """DDIM (eta 0) with classifier-free guidance, then the VAE decoder; the model's own
    prediction type (epsilon or v)."""
    b = bundle
    ac = b.alphas_cumprod.float().cpu()
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(1, 4, height // 8, width // 8, generator=gen).to(b.device)
    cond = b.condition([prompt])
    uncond = b.condition([negative or ""])
    ts = torch.linspace(999, 0, max(1, int(steps))).round().long()
    for i, t in enumerate(ts):
        tt = t.reshape(1).to(b.device)
        out_c = b.denoise(x, tt, cond).float()
        out_u = b.denoise(x, tt, uncond).float()
        out = out_u + cfg_scale * (out_c - out_u)
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        if b.prediction == "v":  # v = sqrt(a) eps - sqrt(1 - a) x0
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = (1 - a_t).sqrt() * x + a_t.sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    scale = b.extras.get("vae_scale", 0.18215)
    img = b.vae.decode(x / scale).clamp(-1, 1).float().cpu()
    arr = ((img[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    return Image.fromarray(arr)
