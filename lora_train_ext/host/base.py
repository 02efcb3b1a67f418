"""What the tab, the API and the run manager need from whoever holds the model.

Two hosts implement it: `webui.WebUIHost` (the resident `shared.sd_model`, the WebUI's queue lock,
progress bar, txt2img and Lora extension) and `standalone.StandaloneHost` (a tiny model made in
code, its own lock and a small sampler: `python -m lora_train_ext preview`). The UI and API only
talk to this interface.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator

from ..core.bundle import ModelBundle, Progress


@dataclass
class ModelInfo:
    name: str
    arch: str  # 'sd1', 'sd2', 'sdxl' or '' when unsupported / none loaded
    prediction: str = "epsilon"
    hash: str = ""
    problem: str = ""  # why training is not possible now ('' = it is)
    default_resolution: int = 512
    default_dtype: str = "fp32"  # the training precision that suits this model and device

    @property
    def label(self) -> str:
        text = f"{self.name} ({self.arch or 'unknown'}" + (", v-prediction" if self.prediction == "v" else "") + ")"
        return text + (f" — {self.problem}" if self.problem else "")


class Host:
    """Base class; subclasses override what differs."""

    name = "host"

    def __init__(self):
        self._lock = threading.Lock()

    # -- model ------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        raise NotImplementedError

    @contextlib.contextmanager
    def prepared_model(self) -> Iterator[ModelBundle]:
        """Yield a ModelBundle of the resident model, ready for training; undo everything after."""
        raise NotImplementedError
        yield  # pragma: no cover

    def device(self):
        """The torch device the model trains on (None: not known, no device checks)."""
        return None

    def model_parts(self):
        """(arch, unet, text encoders by kohya part, vae) of the resident model as it is, for
        the memory estimate (nothing is changed); None when the host cannot tell."""
        return None

    def check_config(self, cfg) -> None:
        """Refuse settings this host's model cannot train with (raise UserError)."""

    # -- exclusive access (never at the same time as a generation) -------------------------
    @contextlib.contextmanager
    def exclusive(self, job: str) -> Iterator[None]:
        """Hold the host's GPU lock for a job that did not come through a wrapped UI call."""
        with self.gpu_lock():
            yield

    def gpu_lock(self):
        """The lock every GPU job holds (a run holds it from start to end, except while paused)."""
        return self._lock

    # -- pause and test ---------------------------------------------------------------------
    def lend_model(self, snapshot: str) -> dict:
        """A paused run hands the model over: hot-load its snapshot and let generations run
        (the run's thread holds the lock and lets go of it here). Returns what `take_model_back`
        needs to tell the same model from another one."""
        self.hot_load([snapshot])
        token = {"model": self.model_info().hash or self.model_info().name}
        self.gpu_lock().release()
        return token

    def take_model_back(self, token: dict) -> None:
        """Wait for the lock (a generation in progress finishes first), then check the model is
        still the run's; raise UserError when it was switched."""
        self.gpu_lock().acquire()
        now = self.model_info().hash or self.model_info().name
        if now != token["model"]:
            from ..core.errors import UserError

            raise UserError("model", f"the model was switched to {now} while the run was "
                                     f"paused; its state is saved: load {token['model']} again "
                                     "and resume the run from its state folder")

    def free_memory(self) -> None:
        """Give back what a finished run held (between queued runs)."""
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- progress ---------------------------------------------------------------------------
    def on_progress(self, event: Progress) -> None:
        """Mirror a training event into the host's own progress display."""

    def interrupt_requested(self) -> bool:
        return False

    # -- files ------------------------------------------------------------------------------
    def lora_dir(self) -> str:
        raise NotImplementedError

    def output_dir(self) -> str:
        return self.lora_dir()

    def run_dir(self) -> str:
        """Where runs keep their own files (state, history, samples, caches): not the Lora
        folder, which holds only what the Lora cards show."""
        raise NotImplementedError

    def write_roots(self) -> list[str]:
        """The folders a run asked for over HTTP may write in (and below): the output folder,
        the Lora folder and the run folder."""
        roots: list[str] = []
        for get in (self.output_dir, self.lora_dir, self.run_dir):
            try:
                folder = get()
            except NotImplementedError:
                continue
            if folder and folder not in roots:
                roots.append(folder)
        return roots

    def hot_load(self, paths: list[str]) -> None:
        """Make new or rewritten adapter files usable at once (no restart)."""

    def list_loras(self) -> list[str]:
        folder = self.output_dir()
        out = []
        for root, _, files in os.walk(folder):
            for f in files:
                if f.endswith(".safetensors"):
                    out.append(os.path.join(root, f))
        return sorted(out, key=lambda p: os.path.getmtime(p), reverse=True)

    # -- merging into the loaded model ----------------------------------------------------------
    def find_lora(self, name: str) -> str:
        for path in self.list_loras():
            if os.path.splitext(os.path.basename(path))[0] == name:
                return path
        raise FileNotFoundError(f"LoRA {name!r} not found in {self.output_dir()}")

    def checkpoint_state(self) -> dict:
        """The resident model's tensors under checkpoint key names, as views: writing into
        them writes into the model."""
        raise NotImplementedError

    def checkpoint_written(self, state: dict) -> None:
        """After tensors of a `checkpoint_state()` were written: a host whose state holds copies
        (not views) of some tensors copies them back."""

    def save_state(self, changed=()) -> dict:
        """Every tensor Save writes as a checkpoint, under checkpoint names (`changed`: the
        keys a merge changed, which must be among them)."""
        return dict(self.checkpoint_state())

    def release_networks(self) -> None:
        """Before weights are changed or restored in place: undo and forget what the host's
        own LoRA loader baked in (its backups would otherwise bring old weights back)."""

    def model_changed(self) -> None:
        """After weights changed in place: drop caches computed from the old ones."""

    def clear_conditioning_cache(self) -> None:
        """After a run, whatever its end: the host's cached prompt conditioning was computed
        with the run's adapter in the text encoder."""

    def checkpoint_dir(self) -> str:
        raise NotImplementedError

    def vae_dir(self) -> str:
        """Where the host keeps VAE files (the API's file merge bakes one in by name)."""
        return os.path.join(os.path.dirname(os.path.abspath(self.checkpoint_dir())), "VAE")

    def refresh_checkpoints(self) -> None:
        """List a new checkpoint file without a restart."""

    # -- generation (test panel) ------------------------------------------------------------
    def generate(self, prompts: list[str], negative: str, seed: int, steps: int, width: int,
                 height: int, cfg_scale: float, sampler_name: str = "") -> list:
        """One PIL image per prompt, same seed for each. Called with the lock held."""
        raise NotImplementedError

    def sampler(self, save):
        """A TrainControl.sampler that makes samples with this host's own generation, on the
        model as the run holds it (the adapter hooked in, at its current weights)."""
        from ..core.sampling import sampler_for

        def one(p):
            return self.generate([p.prompt], p.negative, p.seed, p.steps, p.width, p.height,
                                 p.cfg_scale, sampler_name=p.sampler)[0]
        return sampler_for(one, save)

    def save_grid(self, image, prompt: str) -> str:
        """Save a grid image where the host saves grids; return its path."""
        raise NotImplementedError
