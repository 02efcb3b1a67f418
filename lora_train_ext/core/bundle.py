"""The seams between the training core and whoever hosts it.

`ModelBundle` is what the trainer gets: the WebUI host builds it from the resident model, tests and
the command line build it from tiny in-code models. `TrainControl` is how a UI, API or command
line steers a run (stop, pause) and hears from it (progress events). `TrainingData` is everything
the trainer asks of its dataset (`data.TrainData` is the one it builds itself).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generator, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from .data.dataset import Batch


@dataclass
class ModelBundle:
    """A diffusion model seen as the parts a trainer needs.

    arch: 'sd1' | 'sd2' | 'sdxl'.
    unet: the LDM UNet (`input_blocks`, `middle_block`, `output_blocks`, module paths as in the
        WebUI's checkpoint under `model.diffusion_model.`).
    text_encoders: kohya prefix part -> module, in the order the file names them: SD1/SD2
        {'te': ...}, SDXL {'te1': CLIP-L, 'te2': OpenCLIP bigG}.
    vae: the autoencoder (frozen, never trained).
    encode: images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8).
    condition: (captions, sizes) -> conditioning object passed to `denoise` unchanged; it must run
        with gradients when text encoders are trained. `sizes` is a list of
        (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for SDXL, ignored otherwise.
    denoise: (noisy latents, timesteps (B,) long, conditioning) -> model output, same shape.
    prediction: 'epsilon' | 'v'.
    alphas_cumprod: (1000,) float64 noise schedule.
    """

    arch: str
    unet: nn.Module
    text_encoders: dict[str, nn.Module]
    vae: nn.Module
    encode: Callable[[torch.Tensor], torch.Tensor]
    condition: Callable[..., Any]
    denoise: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    prediction: str
    alphas_cumprod: torch.Tensor
    model_name: str = ""
    model_hash: str = ""
    resolution: int = 512
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    vae_id: str = ""  # identity of the VAE's weights for latent-cache keys
    extras: dict[str, Any] = field(default_factory=dict)

    def trainable_roots(self) -> dict[str, nn.Module]:
        """'unet' plus the text encoders, by kohya prefix part."""
        return {"unet": self.unet, **self.text_encoders}

    def base_modules(self) -> list[nn.Module]:
        return [self.unet, *self.text_encoders.values(), self.vae]


@dataclass
class Progress:
    """One progress event. `kind`: 'start', 'step', 'log', 'snapshot', 'sample', 'validation'
    (the validation loss in `loss`), 'end'."""

    kind: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    loss_avg: float | None = None
    lr: dict[str, float] = field(default_factory=dict)
    epoch: int = 0
    elapsed: float = 0.0
    eta: float | None = None
    message: str = ""
    path: str = ""
    # on the first step a run takes: where the time before it went, in seconds (guard_s, set_up_s,
    # cache_s, baseline_s, first_step_s; see Trainer.run)
    timings: dict[str, float] = field(default_factory=dict)


class TrainControl:
    """Stop / pause requests in, progress events out. Safe to use from other threads."""

    def __init__(self, on_progress: Callable[[Progress], None] | None = None):
        self._stop = threading.Event()
        self._resume = threading.Event()
        self._resume.set()
        self._listeners: list[Callable[[Progress], None]] = []
        if on_progress is not None:
            self._listeners.append(on_progress)
        self.stop_reason = ""
        self.paused_at: float | None = None
        # the host's sample maker: (step, prompts) -> paths of the images written; None = none
        self.sampler: Callable[[int, list], list[str]] | None = None
        # pause and test: the host takes the model (its lock, the paused snapshot hot-loaded)
        # and gives it back; on_resume raises when the run cannot go on (model switched)
        self.on_pause: Callable[[str], None] | None = None
        self.on_resume: Callable[[], None] | None = None
        # the host's stop button, read whenever the trainer asks whether to stop (mid-step too)
        self.poll_stop: Callable[[], bool] | None = None

    # requests (from the UI / API thread)
    def request_stop(self, reason: str = "stopped by user") -> None:
        self.stop_reason = reason
        self._stop.set()
        self._resume.set()

    def request_pause(self) -> None:
        self._resume.clear()

    def request_resume(self) -> None:
        self._resume.set()

    # queries (from the training thread)
    @property
    def stop_requested(self) -> bool:
        """A stop was asked here, or the host's own stop (the WebUI's Interrupt) is set."""
        if not self._stop.is_set() and self.poll_stop is not None and self.poll_stop():
            self.request_stop("interrupted")
        return self._stop.is_set()

    @property
    def pause_requested(self) -> bool:
        return not self._resume.is_set()

    def wait_while_paused(self, poll: float = 0.1) -> None:
        """Block the training thread while paused; returns at once when stopped."""
        if self._resume.is_set():
            return
        self.paused_at = time.time()
        while not self._resume.wait(poll):
            if self._stop.is_set():
                break
        self.paused_at = None

    def add_listener(self, fn: Callable[[Progress], None]) -> None:
        self._listeners.append(fn)

    def emit(self, event: Progress) -> None:
        for fn in list(self._listeners):
            fn(event)


@runtime_checkable
class TrainingData(Protocol):
    """What the trainer uses of a dataset, and nothing more.

    The data order must follow from (seed, epoch) alone, so that a run resumed at (epoch, batch
    index) sees the batches an uninterrupted run would have.
    """

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one epoch (batches that come back empty counted)."""
        ...

    @property
    def num_images(self) -> int:
        """Training images (without repeats or regularization images): ss_num_train_images."""
        ...

    def batches(self, epoch: int, start: int = 0) -> Generator[Batch, None, None]:
        """The batches of `epoch` in order, from batch index `start`; the trainer may close the
        generator before its end."""
        ...

    def state_dict(self) -> dict:
        """The data position: {"epoch", "batch_index"} (batches handed out of that epoch),
        optionally a "fingerprint" of the dataset that a resumed run compares."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Take back a saved position; `batches(epoch, start=...)` does the skipping."""
        ...

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], vae_id: str,
                      progress: Callable[[int, int], None] | None = None) -> None:
        """Encode every image once with the frozen VAE; batches then carry latents."""
        ...

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """folder -> tag -> images whose caption has it (ss_tag_frequency)."""
        ...

    def dataset_dirs_meta(self) -> dict[str, dict[str, int]]:
        """folder -> {"n_repeats", "img_count"} (ss_dataset_dirs)."""
        ...
