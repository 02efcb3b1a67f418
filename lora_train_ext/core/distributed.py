"""Training with several processes: `torchrun --nproc_per_node N -m lora_train_ext train ...`.

torch.distributed with gloo on the CPU and nccl on GPUs (process `LOCAL_RANK` on
`cuda:LOCAL_RANK`), set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Only the headless `train` command runs this way; the WebUI host never
does. How a run of N processes equals one of one process:

- The global batch is train.batch_size x N. Every process plans the same epochs (same seed) with
  the global batch size and reads only its share of each global batch (`TrainData.shard`, a
  balanced split in rank order); a sample keeps its slot in the global batch, so its crop, flip
  and caption are the ones one process would draw.
- Noise, timesteps and input perturbation are drawn for the whole global batch from the run's
  generator on every process (`noise_like`), and each takes the rows of its samples: N processes
  with batch B draw what one process with batch N x B draws, and their generators stay equal.
- Each process's loss (the mean over its samples) is weighted by its share of the global batch
  (samples / global batch), so the sum over the processes is the global batch's mean. A share
  with no sample (the last, smaller batch of a bucket) still draws the noise and takes part with
  zero gradients.
- Once per optimizer step one all-reduce (SUM) of one flat fp32 buffer carries the adapter's
  gradients, which parameters have one, the step's loss and the stop flags (`sync_step`), before
  clipping: every process then takes the same optimizer step on the same weights. Weights are
  broadcast from rank 0 once at the start (`set_up`).
- Only rank 0 writes files (adapter, snapshots, state, history, config, samples) and prints;
  the others do everything else the same way (schedule-free optimizers switch to their eval
  point for a snapshot on every process, so the weights stay equal everywhere).
- A stop asked on any process (Ctrl-C, --stop-after) is a flag in that all-reduce: every
  process stops at the same step, and the step being taken is not taken (as with one process).
  A process that fails ends its process; the others' next collective fails and they end with
  a one-line error (torchrun also ends them once one has failed).
- The saved state records the number of processes and each process's own python / numpy /
  torch RNGs (dropout draws from them); a resume with another number of processes is refused.

Differences from one process: with dropout (network dropout, rank_dropout, module_dropout) each
process draws its own masks, so the weights are not those of one process (still a valid run).
An image that becomes unreadable during the run counts as a sample with no loss in its global
batch (one process drops it from the batch and averages over the rest).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from .bundle import Progress, TrainControl
from .errors import TrainingError, UserError

if TYPE_CHECKING:
    from .data.dataset import BatchPart
    from .trainer import Trainer

# every model this trainer knows encodes (B, 3, H, W) images to (B, 4, H/8, W/8) latents
# (ModelBundle.encode); a process with no sample draws noise of that shape
LATENT_CHANNELS, LATENT_FACTOR = 4, 8
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """This process's place in a distributed run."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def writes(self) -> bool:
        """Rank 0 writes the files and prints."""
        return self.rank == 0


def world_size(dist: Dist | None) -> int:
    return 1 if dist is None else dist.world


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not run by torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError("WORLD_SIZE", f"{os.environ.get('WORLD_SIZE')!r} is not a number of "
                                      "processes") from None


def device_for(name: str, local_rank: int) -> torch.device:
    """The device of process LOCAL_RANK: 'auto' is cuda:LOCAL_RANK when there are GPUs, else
    the CPU; 'cuda' is cuda:LOCAL_RANK; 'cpu' the CPU. 'cuda:N' is refused (every process would
    take the same GPU)."""
    name = name or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise UserError("--device", f"{name!r} with torchrun: give auto, cpu or cuda (process "
                                    "LOCAL_RANK uses cuda:LOCAL_RANK)")
    if not torch.cuda.is_available():
        raise UserError("--device", "no CUDA GPU is available here; use cpu")
    if local_rank >= torch.cuda.device_count():
        raise UserError("--device", f"process LOCAL_RANK {local_rank} has no GPU: "
                                    f"{torch.cuda.device_count()} here; give torchrun "
                                    "--nproc_per_node at most that many")
    return torch.device("cuda", local_rank)


@contextmanager
def launched(device: str = "auto") -> Iterator[Dist | None]:
    """Join the process group torchrun's environment describes (None when WORLD_SIZE is 1 or
    unset: one process, nothing set up); leave it on the way out. gloo on the CPU, nccl on
    cuda:LOCAL_RANK."""
    world = env_world_size()
    if world == 1:
        yield None
        return
    import torch.distributed as tdist

    missing = [k for k in ENV if not os.environ.get(k)]
    if missing:
        raise UserError("torchrun", f"WORLD_SIZE is {world} but {', '.join(missing)} not set: "
                                    "start with torchrun --nproc_per_node N -m lora_train_ext "
                                    "train ...")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    dev = device_for(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tdist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    yield Dist(rank, world, local_rank, dev, backend)
    # (not after an error: a failing process leaves without a collective, its peers may be
    # inside one; its exit closes the connections, which ends theirs with an error)
    tdist.destroy_process_group()


def _collective(dist: Dist, what: str, fn: Callable[[], Any]) -> Any:
    """Run a collective; another process that failed or left makes it a TrainingError."""
    try:
        return fn()
    except RuntimeError as e:  # DistBackendError and gloo's connection errors among them
        raise TrainingError(f"process {dist.rank} of {dist.world}: another process of the run "
                            f"stopped ({what}: {str(e).splitlines()[0] if str(e) else e!r})"
                            ) from None


# -- the control --------------------------------------------------------------------------------
class DistributedControl(TrainControl):
    """Stop requests of one process, agreed with the others at each step's all-reduce: a stop
    asked on any process (Ctrl-C, --stop-after) stops every process at the same step.

    `stop_requested` is the agreed stop (the same on every process at the same point of the
    loop); `request_stop` (and `poll_stop`) only ask. A reason starting with 'interrupted' is an
    interrupt (Ctrl-C): `interrupted` tells whether any process was interrupted. A distributed
    run does not pause (pause and test is the WebUI's, which never runs distributed)."""

    def __init__(self, on_progress: Callable[[Progress], None] | None = None):
        super().__init__(on_progress)
        self._asked = ""  # this process's request, until agreed
        self._agreed = False
        self.interrupted = False

    def request_stop(self, reason: str = "stopped by user") -> None:
        if not self._asked:
            self._asked = reason or "stopped by user"

    @property
    def stop_requested(self) -> bool:
        return self._agreed

    @property
    def pause_requested(self) -> bool:
        return False

    def flags(self) -> tuple[float, float]:
        """(stop asked here, interrupt asked here) for the step's all-reduce."""
        if not self._asked and self.poll_stop is not None and self.poll_stop():
            self._asked = "interrupted"
        return float(bool(self._asked)), float(self._asked.startswith("interrupted"))

    def agree(self, interrupted: bool) -> None:
        """Some process asked to stop: every process stops now."""
        self.interrupted = interrupted
        reason = self._asked or ("interrupted on another process" if interrupted
                                 else "stopped by another process")
        self._agreed = True
        super().request_stop(reason)


# -- the data and the noise -----------------------------------------------------------------------
def shard(data: Any, dist: Dist) -> None:
    """Make `data` (built with the global batch size) read this process's share."""
    if not callable(getattr(data, "shard", None)):
        raise TrainingError(f"{type(data).__name__} cannot be split between processes "
                            "(a distributed run needs TrainData)")
    data.shard(dist.rank, dist.world)


def noise_like(part: BatchPart, device: torch.device) -> torch.Tensor:
    """A tensor of the global batch's latent shape (no memory of its own) to draw the noise of
    the whole global batch for: (global batch, 4, H/8, W/8)."""
    w, h = part.bucket
    shape = (part.size, LATENT_CHANNELS, h // LATENT_FACTOR, w // LATENT_FACTOR)
    return torch.zeros((), device=device, dtype=torch.float32).expand(shape)


def rows(part: BatchPart, latents: torch.Tensor, *drawn: torch.Tensor) -> tuple:
    """This process's rows of what was drawn for the whole global batch."""
    if drawn and drawn[0].dim() == 4 and tuple(latents.shape[1:]) != tuple(drawn[0].shape[1:]):
        raise TrainingError(f"latents of shape {tuple(latents.shape[1:])}: a distributed run "
                            f"needs {LATENT_CHANNELS} x H/{LATENT_FACTOR} x W/{LATENT_FACTOR}")
    index = torch.tensor(part.slots, dtype=torch.long, device=latents.device)
    return tuple(t.index_select(0, index.to(t.device)) for t in drawn)


def weight(part: BatchPart) -> float:
    """This process's share of the global batch: its loss (a mean over its samples) times this
    summed over the processes is the mean over the global batch."""
    return len(part.slots) / max(1, part.size)


def empty_loss(device: torch.device) -> torch.Tensor:
    """The loss of a share with no sample: zero, with a backward that reaches no weight."""
    return torch.zeros((), device=device, requires_grad=True)


# -- the step -----------------------------------------------------------------------------------
def sync_step(dist: Dist, params: list[torch.Tensor], step_loss: torch.Tensor,
              control: TrainControl) -> bool:
    """Sum the adapter's gradients, the step's loss and the stop flags over the processes, in
    one all-reduce of one flat fp32 buffer. A parameter no process has a gradient for keeps
    none (as with one process: the optimizer skips it). `step_loss` becomes the global batch's
    loss. True when some process asked to stop (the step is then not taken)."""
    device = step_loss.device
    pieces, has = [], []
    for p in params:
        has.append(0.0 if p.grad is None else 1.0)
        pieces.append(torch.zeros(p.numel(), device=device, dtype=torch.float32) if p.grad is None
                      else p.grad.detach().reshape(-1).to(device=device, dtype=torch.float32))
    stop, interrupt = control.flags() if isinstance(control, DistributedControl) else (0.0, 0.0)
    pieces.append(step_loss.detach().reshape(1).to(torch.float32))
    pieces.append(torch.tensor([*has, stop, interrupt], device=device, dtype=torch.float32))
    flat = torch.cat(pieces)
    import torch.distributed as tdist

    _collective(dist, "gradients", lambda: tdist.all_reduce(flat))
    offset = 0
    tail = flat[-(len(params) + 3):].tolist()
    for p, any_grad in zip(params, tail[1:1 + len(params)]):
        n = p.numel()
        if any_grad > 0:
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        else:
            p.grad = None
        offset += n
    step_loss.copy_(torch.tensor(tail[0], device=step_loss.device, dtype=step_loss.dtype))
    if tail[-2] > 0:
        if isinstance(control, DistributedControl):
            control.agree(tail[-1] > 0)
        return True
    return False


# -- set-up, state ------------------------------------------------------------------------------
def set_up(dist: Dist, run: Trainer, state: dict | None) -> None:
    """After the trainer's set-up: every process takes rank 0's adapter weights, and its own
    process RNGs (dropout): a resumed run the ones its process saved, a new one rank 0 the
    run's seed and the others one derived from (seed, rank)."""
    from .run_state import seed_process_rngs, set_process_rng_states

    tensors = [t for t in run.network.state_dict().values() if t.is_floating_point()]
    if tensors:
        flat = torch.cat([t.detach().reshape(-1).to(dist.device, torch.float32) for t in tensors])
        import torch.distributed as tdist

        _collective(dist, "weights", lambda: tdist.broadcast(flat, src=0))
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
    saved = (state or {}).get("process_rngs")
    if saved:
        set_process_rng_states(saved[dist.rank])
    elif dist.rank:
        seed = int(run.cfg.train.seed) % (2**32)
        seed_process_rngs(int(np.random.SeedSequence([seed, dist.rank]).generate_state(1)[0]))


def gather_objects(dist: Dist, obj: Any) -> list | None:
    """`obj` of every process, in rank order, on rank 0 (None elsewhere)."""
    import torch.distributed as tdist

    out = [None] * dist.world if dist.rank == 0 else None
    _collective(dist, "state", lambda: tdist.gather_object(obj, out, dst=0))
    return out


def saved_world_size(folder: str) -> int | None:
    """The number of processes that saved the state in `folder` (None when it cannot be read:
    the trainer names the problem), read before any model is loaded."""
    from .run_state import STATE_FILE, load_state_file

    try:
        state = load_state_file(os.path.join(folder, STATE_FILE), mmap=True)
        return int(state.get("world_size", 1))
    except Exception:  # noqa: BLE001 - read_state reports it
        return None


def check_resume(saved_world: int, world: int, folder: str) -> None:
    """A state resumes with the number of processes that saved it."""
    if saved_world == world:
        return

    def runs(n: int) -> str:
        return "one process" if n == 1 else f"{n} processes (torchrun --nproc_per_node {n})"
    how = ("python -m lora_train_ext train" if saved_world == 1 else
           f"torchrun --nproc_per_node {saved_world} -m lora_train_ext train")
    raise UserError("resume", f"the state in {folder} was saved by a run of {runs(saved_world)}; "
                              f"this run has {runs(world)}. Resume with the same number: "
                              f"{how} --resume {folder}")


class NoLog:
    """The history files of a process that writes none (rank > 0)."""

    tensorboard_dir = ""

    def write(self, history: list) -> str:
        return ""

    def step(self, entry: dict) -> None:
        pass

    def close(self) -> None:
        pass
