"""Latent cache, in memory or on disk.

A key is the sha256 of everything that decides the latent: the image file's bytes (sha256), the
VAE's identity, the bucket size and placement (resize mode, scaled size, crop window, padding),
the flip, and the background colour used for transparency. Any change gives a new key, so a
stale entry is never read; old files are just left unused (`prune` removes them).

On disk each entry is `<cache_dir>/<key[:2]>/<key>.safetensors` holding the tensor "latent" and
the key's parts as metadata, written to a temporary file and renamed into place so a killed run
never leaves a half-written entry under a valid name.
"""

from __future__ import annotations

import hashlib
import os
import threading

import torch

from ..fsio import atomic_write

LATENT_NAME = "latent"
CACHE_FORMAT = "lora_train_ext.latent.v1"


def latent_key(image_sha256: str, vae_id: str, placement_signature: str, flip: bool,
               background: tuple[int, int, int] | str = "") -> str:
    parts = [CACHE_FORMAT, image_sha256, str(vae_id), placement_signature,
             f"flip={int(bool(flip))}", f"bg={background}"]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


class LatentCache:
    """get / put of (C, h, w) latents by key. directory=None keeps them in memory."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self._memory: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        if directory:
            os.makedirs(directory, exist_ok=True)

    def _path(self, key: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, key[:2], key + ".safetensors")

    def __contains__(self, key: str) -> bool:
        if self.directory is None:
            return key in self._memory
        return self._valid_file(key)

    def _valid_file(self, key: str) -> bool:
        """The file exists, its header parses (safetensors checks the data length against it)
        and it names this key; tensors are not read."""
        from safetensors import safe_open

        path = self._path(key)
        if not os.path.isfile(path):
            return False
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return (f.metadata() or {}).get("key") == key and LATENT_NAME in f.keys()
        except Exception:
            return False

    def get(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            value = self._memory.get(key)
        else:
            value = self._load(key)
        with self._lock:
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
        return value

    def _load(self, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self._path(key)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or LATENT_NAME not in f.keys():
                    return None
                return f.get_tensor(LATENT_NAME)
        except Exception:  # a damaged file is a miss; it is rewritten on the next put
            return None

    def put(self, key: str, latent: torch.Tensor) -> None:
        latent = latent.detach().to("cpu").contiguous()
        if self.directory is None:
            with self._lock:
                self._memory[key] = latent
            return
        from safetensors.torch import save_file

        # a cache can be rebuilt: no fsync (thousands of small files); a full disk names the
        # setting that moves the cache
        atomic_write(self._path(key), lambda tmp: save_file(
            {LATENT_NAME: latent}, tmp, metadata={"key": key, "format": CACHE_FORMAT}),
            field="data.cache_dir", durable=False)

    def nbytes(self) -> int:
        if self.directory is None:
            return sum(t.numel() * t.element_size() for t in self._memory.values())
        total = 0
        for base, _, names in os.walk(self.directory):
            total += sum(os.path.getsize(os.path.join(base, n)) for n in names
                         if n.endswith(".safetensors"))
        return total

    def __len__(self) -> int:
        if self.directory is None:
            return len(self._memory)
        return sum(1 for _, _, names in os.walk(self.directory)
                   for n in names if n.endswith(".safetensors"))

    def prune(self, keep: set[str]) -> int:
        """Remove entries whose key is not in `keep`; return how many were removed."""
        removed = 0
        if self.directory is None:
            for key in [k for k in self._memory if k not in keep]:
                del self._memory[key]
                removed += 1
            return removed
        for base, _, names in os.walk(self.directory):
            for name in names:
                if name.endswith(".safetensors") and name[:-len(".safetensors")] not in keep:
                    os.remove(os.path.join(base, name))
                    removed += 1
        return removed
