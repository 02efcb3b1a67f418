"""Hosts: who holds the model (see base.py). `select()` picks the one for the WebUI this
extension was loaded into."""

from __future__ import annotations

import importlib.util
import os
import sys

# Forge's 2024+ backend (lllyasviel/stable-diffusion-webui-forge): a top-level `backend` package
# with `memory_management.py` and `diffusion_engine/`, next to `modules_forge`.
FORGE_BACKEND_MODULES = ("backend.memory_management", "backend.diffusion_engine.base")


def forge_backend_available() -> bool:
    """Whether Forge's `backend/` rewrite is what runs here: already imported (Forge imports it
    before any extension), or findable on the path, without importing anything."""
    if any(name in sys.modules for name in FORGE_BACKEND_MODULES):
        return True
    try:
        spec = importlib.util.find_spec("backend")
        forge = importlib.util.find_spec("modules_forge")
    except (ImportError, ValueError):
        return False
    if spec is None or forge is None or not spec.submodule_search_locations:
        return False
    return any(os.path.isfile(os.path.join(folder, "memory_management.py"))
               and os.path.isdir(os.path.join(folder, "diffusion_engine"))
               for folder in spec.submodule_search_locations)


def select():
    """The host for this process: `ForgeHost` when Forge's backend is there, else `WebUIHost`
    (AUTOMATIC1111's WebUI, and forks that kept its ldm / sgm models)."""
    if forge_backend_available():
        from .forge import ForgeHost

        return ForgeHost()
    from .webui import WebUIHost

    return WebUIHost()
