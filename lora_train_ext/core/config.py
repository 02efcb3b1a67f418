"""The run's settings, declared once.

Every setting is a dataclass field made with `setting(...)`: its type and default are the field's,
and its metadata holds what every entry point needs: valid range or choices, unit, help text,
the tab's label and group, the command line's flag. `SETTINGS` lists them in order; the CLI flags
(`cli.py`), the tab's widgets and tooltips (`ui/tab.py`), the API's validation and the README's
settings table (`settings_markdown()`) are all made from it, so a range or a help text is
changed in one place.

`RunConfig.problems()` checks every field and the rules between fields and returns every
problem at once (each a UserError naming `section.field`); `validate()` raises them. The check
that also looks at folders, the dataset, packages and the model is `core/preflight.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError, UserErrors
from .fsio import atomic_write_text

CONFIG_VERSION = 1

ARCHES = ("sd1", "sd2", "sdxl")
PREDICTIONS = ("auto", "epsilon", "v")
ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "dora", "full", "oft", "boft")
TARGETS = ("both", "unet", "te")
DTYPES = ("fp32", "bf16", "fp16")
BASE_DTYPES = ("auto", "fp32", "fp16", "bf16")
ADAPTER_DTYPES = ("fp32", "bf16")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
LOSSES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)
RESIZE_MODES = ("crop", "stretch", "pad", "none")
CROP_MODES = ("center", "random")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "cosmap")
TOKEN_LENGTHS = (75, 150, 225)
MAX_RANK = 1024
# the longest suffix a run adds to the output name: "-step00001234-ema.safetensors" (a snapshot's
# EMA twin) / ".history.json"
NAME_SUFFIX_MAX = len("-step00000000-ema.safetensors")
MAX_NAME_BYTES = 255 - NAME_SUFFIX_MAX - 2  # most filesystems allow 255 bytes per name
RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                  *(f"lpt{i}" for i in range(1, 10))}

# tab groups, in the order the accordions appear; "" = the simple fields shown at the top
MODES = ("images", "slider", "difference")
SLIDER_ACTIONS = ("slider", "enhance", "erase")
GROUPS = ("", "Training mode", "Network", "Optimizer and learning rate", "Training", "Dataset", "Captions",
          "Loss and noise", "Samples", "Saving")


@dataclass(frozen=True)
class Spec:
    """What one setting accepts and how it is shown. `kind`: bool, int, float, str."""
    path: str
    kind: type
    default: Any
    help: str
    label: str
    group: str | None  # the tab's group; None: not in the tab
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not valid (> low)
    choices: tuple = ()
    unit: str = ""
    optional: bool = False  # None (empty) is valid: it means what `help` says
    check: Callable[[Any], Any] | None = None  # extra check; raises UserError
    normalize: Callable[[str], str] | None = None  # the canonical spelling ('prodigy' -> 'Prodigy')
    flag: str = ""  # the command line flag; "" -> --field-name
    aliases: tuple[str, ...] = ()
    not_built: str = ""  # set: any value but the default is refused with this reason

    @property
    def section(self) -> str:
        return self.path.split(".")[0]

    @property
    def name(self) -> str:
        return self.path.split(".")[1]

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        """The valid values in words: `1..1024`, `> 0`, `one of a, b`, `a number in 0..1`."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        if self.low is None and self.high is None:
            return "text" if self.kind is str else "any number"
        num = "a whole number" if self.kind is int else "a number"
        if self.high is None:
            op = ">" if self.low_open else ">="
            return f"{num} {op} {_fmt(self.low)}"
        if self.low_open:
            return f"{num} in ({_fmt(self.low)}, {_fmt(self.high)}]"
        return f"{num} in {_fmt(self.low)}..{_fmt(self.high)}"

    def problem(self, value: Any) -> UserError | None:
        """The first thing wrong with `value` (already of the right type), or None."""
        if value is None:
            return None if self.optional else UserError(self.path, "must not be empty")
        if self.not_built and value != self.default:
            shown = "empty" if self.default in ("", None) else _fmt(self.default)
            return UserError(self.path, f"{self.not_built}; leave it {shown}")
        if self.choices and value not in self.choices:
            return UserError(self.path, f"{value!r} is not valid; choose one of "
                                        f"{', '.join(map(str, self.choices))}")
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (isinstance(value, float) and not math.isfinite(value)):
                return UserError(self.path, f"{value!r} is not valid; give {self.range_text()}")
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and value > self.high
            if too_low or too_high:
                return UserError(self.path, f"{value!r} is not valid; give {self.range_text()}")
        if self.check is not None:
            try:
                self.check(value)
            except UserError as e:
                return UserError(self.path, e.message)
        return None


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v)) if abs(v) < 1e6 else f"{v:g}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10**6:
        exp = math.log10(v)
        return f"10^{int(exp)}" if exp.is_integer() else str(v)
    return str(v)


def setting(default: Any, help: str, label: str = "", group: str | None = None, **kw) -> Any:
    """A dataclass field carrying its Spec (completed with path and kind in `_specs`)."""
    meta = dict(help=help, label=label, group=group, **kw)
    return field(default=default, metadata={"spec": meta})


def _ok_resolution(v: str) -> None:
    parse_resolution(v)


def _ok_optimizer(v: str) -> str:
    from .optim import canonical_name

    return canonical_name(v)


def _ok_optimizer_args(v: str) -> None:
    from .optim import parse_optimizer_args

    parse_optimizer_args(v)


def _ok_blocks(v: str) -> None:
    from .networks.targets import parse_block_filter

    parse_block_filter(v)


def _ok_block_values(integer: bool):
    def check(v: str) -> None:
        from .networks.targets import parse_block_values

        values = parse_block_values(v, "value", integer=integer)
        if integer and any(r > MAX_RANK for r in values.values()):
            raise UserError("value", f"a block's rank is over {MAX_RANK}")
    return check


def _ok_colour(v: str) -> None:
    from .data.images import parse_color

    parse_color(v)


def _ok_extension(v: str) -> None:
    if not re.fullmatch(r"\.[A-Za-z0-9_.-]{1,16}", v):
        raise UserError("value", f"{v!r} is not a file extension; give e.g. .txt or .caption")


def check_output_name(name: str) -> None:
    """A plain file name that works on Linux, macOS and Windows, with room for the suffixes a
    run adds (`-step00001234.safetensors`)."""
    bad = set('/\\:*?"<>|') | {chr(i) for i in range(32)}
    if not name or not name.strip(". "):
        raise UserError("value", "give a file name, e.g. my_lora")
    if any(c in bad for c in name):
        raise UserError("value", "must be a plain file name without / \\ : * ? \" < > | or "
                                 "control characters")
    if name != name.strip() or name.endswith("."):
        raise UserError("value", "must not start or end with a space, or end with a dot")
    if name.split(".")[0].lower() in RESERVED_NAMES:
        raise UserError("value", f"{name!r} is a reserved device name on Windows; choose another")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise UserError("value", f"is {len(name.encode('utf-8'))} bytes long; at most "
                                 f"{MAX_NAME_BYTES} (file names hold 255 bytes, and a snapshot "
                                 f"adds up to {NAME_SUFFIX_MAX})")


@dataclass
class ModelConfig:
    arch: str = setting("sd1", "The model's architecture; in the WebUI it is the loaded model's",
                        "Architecture", None, choices=ARCHES)
    prediction: str = setting(
        "auto", "What the UNet predicts: auto takes the model's own (v for SD2-768 models)",
        "Prediction", "Training", choices=PREDICTIONS)
    checkpoint: str = setting(
        "", "Headless `train` only: the checkpoint file to train on (SD1.x, SD2.x or SDXL base, "
            "one .safetensors file as the WebUI loads it); the tab and the API train the loaded "
            "model", "Checkpoint", None)
    vae: str = setting(
        "", "Headless `train` only: a VAE file to use instead of the checkpoint's own (empty = "
            "the checkpoint's)", "VAE file", None)
    base_dtype: str = setting(
        "auto", "Headless `train` only: precision the base model's weights are kept in (auto = "
                "fp32 on the CPU, the training precision on a GPU; fp16 / bf16 halve the memory "
                "and need that training precision)", "Base model precision", None,
        choices=BASE_DTYPES)
    zero_terminal_snr: bool = setting(
        False, "Rescale the noise schedule to zero SNR at the last step (for v-prediction models)",
        "Zero terminal SNR", "Loss and noise")


@dataclass
class NetworkConfig:
    algo: str = setting(
        "lora", "lora: attention and feed-forward layers; locon: also the 3x3 convs; loha, lokr, "
        "ia3, dora, full, oft (diag-OFT), boft (butterfly OFT): the LyCORIS kinds. ia3 files "
        "load in the WebUI, not in ComfyUI, Forge or diffusers; diffusers misreads dora's "
        "magnitude and WebUI releases before 1.9 drop it; oft and boft load in the WebUI 1.10 and ComfyUI, not in Forge or diffusers",
        "Algorithm", "Network",
        choices=ALGOS)
    rank: int = setting(8, "Size of the adapter (dim); 8-32 for a character or style, 64-128 "
                           "for more detail", "Rank (dim)", "Network", low=1, high=MAX_RANK)
    alpha: float = setting(1.0, "Scale = alpha / rank; 1 with adaptive optimizers, rank/2 or "
                                "rank otherwise", "Alpha", "Network", low=0)
    conv_rank: int = setting(0, "LoCon and LyCORIS kinds: rank of the 3x3 convs (0 = none)",
                             "Conv rank", "Network", low=0, high=MAX_RANK)
    conv_alpha: float = setting(1.0, "Alpha of the 3x3 convs", "Conv alpha", "Network", low=0)
    dropout: float = setting(0.0, "Neuron dropout on the adapter's input", "Dropout", "Network",
                             low=0, high=1)
    rank_dropout: float = setting(0.0, "Chance to drop each rank of the adapter per step",
                                  "Rank dropout", "Network", low=0, high=1)
    module_dropout: float = setting(0.0, "Chance to skip a whole adapter module per step",
                                    "Module dropout", "Network", low=0, high=1)
    train_on: str = setting("both", "Train the UNet and the text encoder, or only one of them",
                            "Train", "Network", choices=TARGETS)
    block_filter: str = setting(
        "", "Only these UNet blocks, e.g. IN,MID,OUT or OUT03 OUT04 (empty = all)", "Blocks",
        "Network", check=_ok_blocks)
    block_ranks: str = setting(
        "", "UNet blocks with their own rank, e.g. IN:4, MID:8, OUT:16 or OUT04:32 "
            "(empty = Rank everywhere)", "Per-block rank", "Network", check=_ok_block_values(True))
    block_lr_weights: str = setting(
        "", "UNet LR multipliers per block, e.g. IN:0.5, MID:1, OUT:1 (0 freezes a block)",
        "Per-block LR weights", "Network", check=_ok_block_values(False))
    loraplus_ratio: float = setting(
        1.0, "LoRA+: the up weights learn this many times faster (16 is typical; 1 = off)",
        "LoRA+ ratio", "Network", low=0, low_open=True, high=1000)
    existing_lora: str = setting(
        "", "A LoRA file to continue training (same arch, algorithm and rank)",
        "Continue from file", "Network")
    init_seed: int | None = setting(
        None, "Seed of the adapter's initial weights (empty = the run's seed)", "Init seed", None,
        low=0, high=2**63 - 1, optional=True)
    lokr_factor: int = setting(
        -1, "LoKr: the split factor of each weight (-1 = the most balanced split)",
        "LoKr factor", "Network", low=-1, high=100000,
        check=lambda v: _raise_if(v == 0, "give -1 or a factor >= 1"))
    decompose_both: bool = setting(False, "LoKr: also make the small factor low-rank",
                                   "LoKr: decompose both", "Network")
    full_matrix: bool = setting(False, "LoKr: no low-rank factor at all (large files)",
                                "LoKr: full matrix", "Network")
    use_tucker: bool = setting(False, "LoHa / LoKr: CP/Tucker cores for the 3x3 convs",
                               "Tucker decomposition", "Network")
    oft_block_size: int = setting(
        16, "OFT / BOFT: size of the rotation blocks (LyCORIS's dim for these). OFT: a divisor "
            "of each layer's channels, at most their square root (LyCORIS's split: 320 channels "
            "with 32 give blocks of 10); BOFT: the largest even size up to this whose block "
            "count is a power of two. conv_rank > 0 adds the convs", "OFT block size",
        "Network", low=2, high=MAX_RANK)
    oft_constraint: float = setting(
        0.0, "OFT / BOFT: COFT constraint, the norm of the rotation's Q at most this x "
             "channels (0 = none; saved as alpha). ComfyUI bounds the norm by alpha itself; "
             "SD.Next and WebUI before 1.10 apply nothing at 0", "OFT constraint", "Network",
        low=0)
    oft_rescaled: bool = setting(
        False, "OFT / BOFT: also learn a scale per output channel (LyCORIS's rescaled); ComfyUI "
               "ignores it for oft", "OFT rescaled", "Network")


@dataclass
class DataConfig:
    dataset_dir: str = setting(
        "", "A folder of images with .txt captions, or of N_name sub-folders (each image "
            "repeated N times)", "Dataset folder", "", flag="--dataset")
    reg_dir: str = setting("", "Regularization images (class images), same layout",
                           "Regularization folder", "Dataset")
    prior_loss_weight: float = setting(1.0, "Loss weight of the regularization images",
                                       "Prior loss weight", "Dataset", low=0)
    repeats: int = setting(1, "How often each image is seen per epoch when the folder has no "
                              "N_name sub-folders", "Repeats (flat folder)", "Dataset",
                           low=1, high=100000)
    caption_extension: str = setting(".txt", "Caption files' extension", "Caption extension",
                                     "Captions", check=_ok_extension)
    default_caption: str = setting("", "Caption for images without a caption file",
                                   "Default caption", "Captions")
    trigger_word: str = setting(
        "", "Optional: put at the start of every caption, and into the card's activation text",
        "Trigger word", "")
    caption_prefix: str = setting("", "Text put before every caption", "Caption prefix",
                                  "Captions")
    caption_suffix: str = setting("", "Text put after every caption", "Caption suffix",
                                  "Captions")
    shuffle_tags: bool = setting(False, "Shuffle comma-separated tags each time (keep the first "
                                        "ones with Keep tokens)", "Shuffle tags", "Captions")
    keep_tokens: int = setting(0, "Tags kept in place at the start when shuffling",
                               "Keep tokens", "Captions", low=0, high=1000)
    caption_dropout: float = setting(0.0, "Chance to train an image with an empty caption",
                                     "Caption dropout", "Captions", low=0, high=1)
    tag_dropout: float = setting(0.0, "Chance to drop each tag", "Tag dropout", "Captions",
                                 low=0, high=1)
    max_token_length: int = setting(75, "Longest caption in tokens (75, 150 or 225)",
                                    "Max token length", "Captions", choices=TOKEN_LENGTHS,
                                    unit="tokens")
    resolution: str = setting("512", "512 for SD1.5, 768 for SD2-v, 1024 for SDXL; or WxH",
                              "Resolution", "Dataset", check=_ok_resolution, unit="px")
    enable_buckets: bool = setting(True, "Keep each image's aspect ratio (recommended)",
                                   "Aspect-ratio buckets", "Dataset")
    min_bucket_side: int = setting(256, "Shortest bucket side", "Min bucket side", "Dataset",
                                   low=64, high=8192, unit="px")
    max_bucket_side: int = setting(1024, "Longest bucket side", "Max bucket side", "Dataset",
                                   low=64, high=8192, unit="px")
    bucket_step: int = setting(64, "Bucket sides are multiples of this (a multiple of 8)",
                               "Bucket step", "Dataset", low=8, high=1024, unit="px",
                               check=lambda v: _raise_if(v % 8, "must be a multiple of 8"))
    no_upscale: bool = setting(False, "Never enlarge small images (they get smaller buckets)",
                               "No upscale", "Dataset")
    resize_mode: str = setting("crop", "How images are fitted to their bucket", "Resize mode",
                               "Dataset", choices=RESIZE_MODES)
    crop: str = setting("center", "Where the crop is taken", "Crop", "Dataset",
                        choices=CROP_MODES)
    flip: bool = setting(False, "Random horizontal flips (not for asymmetric subjects)",
                         "Flip augmentation", "Dataset")
    color_aug: bool = setting(False, "Small random colour changes (not applied while latents are cached)",
                              "Colour augmentation", "Dataset")
    background: str = setting("#ffffff", "Transparent pixels are composited on this colour (#rrggbb or a name)",
                              "Background colour", "Dataset", check=_ok_colour)
    cache_latents: bool = setting(True, "Encode each image once (much faster)", "Cache latents",
                                  "Dataset")
    cache_to_disk: bool = setting(False, "Keep cached latents on disk between runs",
                                  "Cache to disk", "Dataset")
    cache_dir: str = setting("", "Folder for the disk cache (empty = latent_cache in the run folder)",
                             "Cache folder", "Dataset")
    cache_text: bool = setting(True, "Encode each caption once while the text encoder is not "
                                     "trained", "Cache text conditioning", "Dataset")
    masked_loss: bool = setting(False, "Train only where a mask is white: mask_dir/<stem>.png, "
                                       "else the image's alpha channel", "Masked loss", "Dataset")
    mask_dir: str = setting("", "Grey masks named like the images (white = train, black = "
                                "ignore)", "Mask folder", "Dataset")
    validation_count: int = setting(
        0, "Hold this many training images out of training (picked by the seed) and measure the "
           "validation loss on them (0 = none)", "Validation images held out", "Dataset",
        low=0, high=10**6)
    validation_dir: str = setting(
        "", "A folder of validation images (same layout as the dataset) to measure the "
            "validation loss on, instead of holding images out", "Validation folder", "Dataset")


@dataclass
class OptimConfig:
    optimizer: str = setting(
        "AdamW", "AdamW is a safe default; DAdaptAdam / Prodigy find the LR themselves (set LR 1)",
        "Optimizer", "Optimizer and learning rate", check=_ok_optimizer, normalize=_ok_optimizer)
    optimizer_args: str = setting(
        "", "key=value pairs as kohya takes them, e.g. weight_decay=0.01 betas=0.9,0.999",
        "Optimizer arguments", "Optimizer and learning rate", check=_ok_optimizer_args)
    lr: float = setting(1e-4, "1e-4 for AdamW; 1.0 for DAdaptation / Prodigy", "Learning rate",
                        "Optimizer and learning rate", low=0)
    unet_lr: float | None = setting(
        None, "Empty = the learning rate above; 0 = do not train the UNet", "UNet learning rate",
        "Optimizer and learning rate", low=0, optional=True)
    te_lr: float | None = setting(
        None, "Empty = the learning rate above; 0 = do not train the text encoder; often half "
              "of the UNet's", "Text encoder learning rate", "Optimizer and learning rate",
        low=0, optional=True)
    scheduler: str = setting("constant", "How the LR changes over the run; constant is right "
                                         "for adaptive optimizers", "Scheduler",
                             "Optimizer and learning rate", choices=SCHEDULERS)
    warmup_steps: int = setting(0, "Steps of linear warmup from 0", "Warmup steps",
                                "Optimizer and learning rate", low=0, high=10**7, unit="steps")
    warmup_ratio: float = setting(0.0, "Warmup as a fraction of the run (used when warmup "
                                       "steps is 0)", "Warmup ratio",
                                  "Optimizer and learning rate", low=0, high=1)
    scheduler_cycles: int = setting(1, "Restarts of cosine_with_restarts", "Scheduler cycles",
                                    "Optimizer and learning rate", low=1, high=10000)
    scheduler_power: float = setting(1.0, "Power of the polynomial scheduler", "Scheduler power",
                                     "Optimizer and learning rate", low=0, low_open=True,
                                     high=100)
    max_grad_norm: float = setting(1.0, "Clip gradients to this norm (0 = off)", "Max grad norm",
                                   "Optimizer and learning rate", low=0)
    scale_weight_norms: float = setting(
        0.0, "Scale each adapter down so its weight change's norm stays under this (0 = off)",
        "Scale weight norms", "Optimizer and learning rate", low=0)


@dataclass
class LossConfig:
    loss: str = setting("mse", "MSE is standard; Huber / SmoothL1 are robust to outliers", "Loss",
                        "Loss and noise", choices=LOSSES)
    huber_delta: float = setting(0.1, "Huber: where the loss turns from squared to linear",
                                 "Huber delta", "Loss and noise", low=0, low_open=True)
    huber_schedule: str = setting("snr", "Huber: how delta follows the timestep",
                                  "Huber schedule", "Loss and noise", choices=HUBER_SCHEDULES)
    min_snr_gamma: float = setting(0.0, "5 is the usual value; 0 = off", "Min-SNR gamma",
                                   "Loss and noise", low=0)
    debiased_estimation: bool = setting(False, "Weight the loss by 1/sqrt(SNR)",
                                        "Debiased estimation", "Loss and noise")
    noise_offset: float = setting(0.0, "0.05-0.1 helps very dark / bright images; 0 = off",
                                  "Noise offset", "Loss and noise", low=0, high=1)
    noise_offset_random_strength: bool = setting(False, "A random noise offset up to the value",
                                                 "Random noise offset", "Loss and noise")
    multires_noise_iterations: int = setting(0, "Pyramid noise levels, 6-10 typical (0 = off)",
                                             "Multires noise iterations", "Loss and noise",
                                             low=0, high=10)
    multires_noise_discount: float = setting(0.3, "Pyramid noise: weight of each lower level",
                                             "Multires noise discount", "Loss and noise",
                                             low=0, high=1)
    input_perturbation: float = setting(0.0, "Extra noise on the input only, e.g. 0.1 (0 = off)",
                                        "Input perturbation", "Loss and noise", low=0, high=1)
    timestep_min: int = setting(0, "Train only timesteps from this", "Min timestep",
                                "Loss and noise", low=0, high=999)
    timestep_max: int = setting(1000, "... up to this (exclusive)", "Max timestep",
                                "Loss and noise", low=1, high=1000)
    timestep_sampling: str = setting(
        "uniform", "How timesteps are drawn: uniform, every step alike; logit_normal, the middle "
                   "favoured (logit mean / std); mode, SD3's mode sampling (mode scale); cosmap, "
                   "SD3's CosMap (the middle favoured, long tails)", "Timestep sampling",
        "Loss and noise", choices=TIMESTEP_SAMPLING)
    logit_mean: float = setting(0.0, "logit_normal: mean", "Logit mean", "Loss and noise",
                                low=-10, high=10)
    logit_std: float = setting(1.0, "logit_normal: standard deviation", "Logit std",
                               "Loss and noise", low=0, low_open=True, high=10)
    mode_scale: float = setting(
        1.29, "mode: how strongly the middle steps are favoured (SD3's mode sampling; 0 = "
              "uniform, negative favours both ends)", "Mode scale", "Loss and noise",
        low=-1, high=1.75)
    masked_loss_unmasked_weight: float = setting(
        0.0, "Masked loss: weight of the area outside the mask (0 = ignored, 1 = as much as the "
             "masked area)", "Unmasked area weight", "Loss and noise", low=0, high=1)


@dataclass
class TrainConfig:
    max_steps: int = setting(200, "Optimizer steps in total", "Steps", "Training", low=1,
                             high=10**7, unit="steps", aliases=("--steps",))
    epochs: int = setting(0, "If > 0: train this many passes over the dataset instead of Steps",
                          "Epochs", "Training", low=0, high=10**6)
    batch_size: int = setting(1, "Images per step; more needs more VRAM", "Batch size",
                              "Training", low=1, high=10000)
    grad_accum: int = setting(1, "Steps of gradients summed before one update (a larger batch "
                                 "without the VRAM)", "Gradient accumulation", "Training",
                              low=1, high=1024)
    seed: int = setting(0, "Same seed + same data = same weights on the same device",
                        "Training seed",
                        "Training", low=0, high=2**63 - 1)
    dtype: str = setting("bf16", "Compute precision: bf16 on recent GPUs, fp16 on older ones, "
                                 "fp32 on CPUs (the adapter's weights stay fp32)",
                         "Training precision", "Training", choices=DTYPES)
    adapter_dtype: str = setting("fp32", "Precision the adapter's own weights are kept in",
                                 "Adapter precision", "Training", choices=ADAPTER_DTYPES)
    gradient_checkpointing: bool = setting(False, "Less VRAM, about 20-30% slower",
                                           "Gradient checkpointing", "Training")
    offload_frozen: bool = setting(
        False, "Less VRAM: keep the VAE in CPU memory once the latents are cached, and the text "
               "encoders once their outputs are (not when a text encoder is trained); back on "
               "the device for samples, pauses and the run's end", "Offload frozen parts",
        "Training")
    ema: bool = setting(False, "Keep an exponential moving average of the adapter's weights, "
                               "saved beside the file as NAME-ema.safetensors", "EMA", "Training")
    ema_decay: float = setting(0.999, "EMA decay per step: 0.999 averages about the last 1000 "
                                      "steps, 0.99 the last 100 (for short runs)", "EMA decay",
                               "Training", low=0, high=1)
    ema_start_step: int = setting(0, "The average starts after this many steps; until then the "
                                     "EMA copy equals the weights", "EMA start step", "Training",
                                  low=0, high=10**7, unit="steps")
    ema_on_cpu: bool = setting(False, "Keep the EMA copy in CPU memory instead of the GPU's",
                               "EMA on the CPU", "Training")
    validate_every_steps: int = setting(
        0, "Validation loss every N steps (0 = only at the start and the end); needs validation "
           "images held out or a validation folder", "Validate every N steps", "Training",
        low=0, high=10**7, unit="steps")
    validation_timesteps: int = setting(
        4, "Fixed timesteps, spread over the timestep range, each validation image is measured "
           "at (more: steadier, slower)", "Validation timesteps", "Training", low=1, high=100)


@dataclass
class SaveConfig:
    output_dir: str = setting("", "Where files go; empty = the WebUI's Lora folder",
                              "Output folder", "Saving", flag="--out")
    run_dir: str = setting(
        "", "Folder for the run's own files: training state, history, samples, run config, "
            "latent cache (empty = the output folder on the command line; in the WebUI the "
            "extension's runs folder, so the Lora folder holds only what the Lora cards show)",
        "Run folder", "Saving")
    output_name: str = setting("my_lora", "File name of the LoRA (no extension); it appears "
                                          "under this name in the Lora tab", "Output name", "",
                               check=check_output_name)
    save_dtype: str = setting("fp16", "fp16 is what most LoRA files use", "Save precision",
                              "Saving", choices=SAVE_DTYPES)
    save_every_steps: int = setting(0, "A snapshot file every N steps (0 = only at the end)",
                                    "Save every N steps", "Saving", low=0, high=10**7,
                                    unit="steps", aliases=("--save-every",))
    save_every_epochs: int = setting(0, "A snapshot file every N epochs (0 = off)",
                                     "Save every N epochs", "Saving", low=0, high=10**6,
                                     unit="epochs")
    keep_last: int = setting(0, "Delete older snapshots (0 = keep all)", "Keep last snapshots",
                             "Saving", low=0, high=10**6)
    save_state: bool = setting(False, "Also save the full training state, to resume from",
                               "Save training state", "Saving")
    comment: str = setting("", "Stored in the file's metadata", "Comment", "Saving")


def _ok_sample_prompts(v: str) -> None:
    from .sampling import SamplePrompt, parse_sample_prompts

    parse_sample_prompts(v, SamplePrompt(prompt=""), field="value")


def _ok_pair_suffix(v: str) -> None:
    _raise_if(not v.strip(), "must not be empty (e.g. _after)")
    _raise_if(any(c in v for c in '/\\:*?"<>|'),
              'must be part of a file name: no / \\ : * ? " < > |')


def _multiple_of_8(v: int) -> None:
    _raise_if(v % 8, "must be a multiple of 8")


@dataclass
class ModeConfig:
    kind: str = setting(
        "images", "What the LoRA learns from: images (a captioned dataset), slider (prompts "
                  "only: a concept slider / LECO, no images) or difference (image pairs: what "
                  "changes from NAME.png to NAME_after.png)", "Training mode", "Training mode",
        choices=MODES, flag="--mode")
    target: str = setting("", "Slider: the prompt the LoRA acts on, e.g. 'a photo of a person'",
                          "Slider target prompt", "Training mode", flag="--slider-target")
    positive: str = setting("", "Slider: where +1 goes, e.g. 'a photo of a smiling person'",
                            "Slider positive prompt", "Training mode", flag="--slider-positive")
    negative: str = setting("", "Slider: where -1 goes (empty = the empty prompt)",
                            "Slider negative prompt", "Training mode", flag="--slider-negative")
    neutral: str = setting("", "Slider: the prediction the change starts from (empty = the "
                               "target prompt)", "Slider neutral prompt", "Training mode",
                           flag="--slider-neutral")
    action: str = setting(
        "slider", "slider: +s toward the positive, -s toward the negative; enhance: the "
                  "positive concept stronger; erase: the positive concept removed",
        "Slider action", "Training mode", choices=SLIDER_ACTIONS, flag="--slider-action")
    guidance: float = setting(1.0, "Slider: how far one unit of strength moves (the target is "
                                   "neutral + guidance x (positive - negative))",
                              "Slider guidance", "Training mode", low=0, low_open=True, high=100,
                              flag="--slider-guidance")
    denoise_steps: int = setting(
        3, "Slider: steps of the frozen model from noise to the trained timestep, so the "
           "latents look like what that timestep sees (0 = pure noise)", "Slider denoise steps",
        "Training mode", low=0, high=50, flag="--slider-denoise-steps")
    pair_suffix: str = setting(
        "_after", "Difference: the second image of a pair is NAME<suffix> beside NAME in the "
                  "dataset folder (not used when a second-images folder is given)",
        "Pair suffix", "Training mode", check=_ok_pair_suffix, flag="--pair-suffix")
    after_dir: str = setting(
        "", "Difference: a folder with the second images, named like the first ones in the "
            "dataset folder (empty = NAME<suffix> pairs in the dataset folder)",
        "Second-images folder", "Training mode", flag="--after-dir")


@dataclass
class SampleConfig:
    prompts: str = setting(
        "", "Sample prompts, one per line; options as kohya takes them: --n negative --w width "
            "--h height --d seed --l CFG --s steps --ss sampler (empty = no samples)",
        "Sample prompts", "Samples", check=_ok_sample_prompts, flag="--sample-prompts",
        aliases=("--sample-prompt",))
    every_steps: int = setting(0, "Samples every N steps (0 = only at the start and the end)",
                               "Sample every N steps", "Samples", low=0, high=10**7,
                               unit="steps", flag="--sample-every-steps",
                               aliases=("--sample-every",))
    every_epochs: int = setting(0, "Samples every N epochs (0 = off)", "Sample every N epochs",
                                "Samples", low=0, high=10**6, unit="epochs",
                                flag="--sample-every-epochs")
    at_start: bool = setting(True, "A set before the first step: the baseline to compare with",
                             "Sample at the start", "Samples", flag="--sample-at-start")
    negative_prompt: str = setting("", "Negative prompt for lines without --n",
                                   "Sample negative prompt", "Samples", flag="--sample-negative")
    width: int = setting(0, "Sample width (0 = the training resolution's)", "Sample width",
                         "Samples", low=0, high=4096, unit="px", check=_multiple_of_8,
                         flag="--sample-width")
    height: int = setting(0, "Sample height (0 = the training resolution's)", "Sample height",
                          "Samples", low=0, high=4096, unit="px", check=_multiple_of_8,
                          flag="--sample-height")
    steps: int = setting(20, "Sampling steps", "Sample steps", "Samples", low=1, high=1000,
                         flag="--sample-steps")
    cfg_scale: float = setting(7.0, "Classifier-free guidance scale", "Sample CFG scale",
                               "Samples", low=1, high=30, flag="--sample-cfg")
    seed: int = setting(1234, "Seed of every sample (the same each time, so samples compare)",
                        "Sample seed", "Samples", low=0, high=2**32 - 1, flag="--sample-seed")
    sampler: str = setting("Euler a", "The WebUI's sampler for samples (the standalone host "
                                      "always uses DDIM)", "Sampler", "Samples",
                           flag="--sample-sampler")


def _raise_if(bad: Any, message: str) -> None:
    if bad:
        raise UserError("value", message)


SECTIONS = {"model": ModelConfig, "network": NetworkConfig, "data": DataConfig,
            "optim": OptimConfig, "loss": LossConfig, "train": TrainConfig, "save": SaveConfig,
            "sample": SampleConfig, "mode": ModeConfig}


def _specs() -> dict[str, Spec]:
    out: dict[str, Spec] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata["spec"])
            kind = {"bool": bool, "int": int, "float": float, "str": str}[
                str(f.type).split("|")[0].strip()]
            if not meta.get("label"):
                meta["label"] = f.name.replace("_", " ").capitalize()
            out[f"{section}.{f.name}"] = Spec(path=f"{section}.{f.name}", kind=kind,
                                              default=f.default, **meta)
    return out


SETTINGS: dict[str, Spec] = _specs()


def _cross_field_problems(cfg: "RunConfig") -> list[UserError]:
    """Rules between fields (each field's own range is checked by its Spec)."""
    out = []
    d, l = cfg.data, cfg.loss
    mode = cfg.mode
    if mode.kind == "slider":
        for name in ("target", "positive"):
            if isinstance(getattr(mode, name), str) and not getattr(mode, name).strip():
                out.append(UserError(f"mode.{name}", f"a slider needs a {name} prompt"))
    if mode.kind in ("slider", "difference"):  # the validation loss is the images mode's
        if d.validation_dir:
            out.append(UserError("data.validation_dir", f"the validation loss is measured on "
                                                        f"captioned images; leave it empty "
                                                        f"with mode.kind {mode.kind}"))
        if isinstance(d.validation_count, int) and d.validation_count > 0:
            out.append(UserError("data.validation_count", f"the validation loss is measured on "
                                                          f"captioned images; leave it 0 with "
                                                          f"mode.kind {mode.kind}"))
    if isinstance(d.max_bucket_side, int) and isinstance(d.min_bucket_side, int) and \
            d.max_bucket_side < d.min_bucket_side:
        out.append(UserError("data.max_bucket_side", f"{d.max_bucket_side} is below "
                                                     f"data.min_bucket_side {d.min_bucket_side}"))
    if isinstance(l.timestep_max, int) and isinstance(l.timestep_min, int) and \
            l.timestep_max <= l.timestep_min:
        out.append(UserError("loss.timestep_max", f"{l.timestep_max} must be above "
                                                  f"loss.timestep_min {l.timestep_min}"))
    m, t = cfg.model, cfg.train
    if m.base_dtype in ("fp16", "bf16") and t.dtype in DTYPES and t.dtype != m.base_dtype:
        out.append(UserError("model.base_dtype", f"{m.base_dtype} base weights need training "
                                                 f"precision {m.base_dtype} (train.dtype is "
                                                 f"{t.dtype}); use auto or fp32, or set "
                                                 f"train.dtype {m.base_dtype}"))
    if d.validation_dir and isinstance(d.validation_count, int) and d.validation_count > 0:
        out.append(UserError("data.validation_dir", "give a validation folder or a number of "
                                                    "images held out (data.validation_count), "
                                                    "not both"))
    return out


@dataclass
class RunConfig:
    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)

    # -- values by path ----------------------------------------------------------------------
    def get(self, path: str) -> Any:
        section, name = path.split(".")
        return getattr(getattr(self, section), name)

    def set(self, path: str, value: Any) -> None:
        """Set one setting from any accepted form ('8', 8.0, 'true'...); UserError naming it."""
        spec = SETTINGS.get(path)
        if spec is None:
            raise UserError(path, "unknown setting")
        section, name = path.split(".")
        setattr(getattr(self, section), name, coerce(spec, value))

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "RunConfig | None" = None,
                  validate: bool = False) -> "RunConfig":
        """Settings from a (possibly partial) dict of sections over `base` (default: the
        defaults); unknown sections or keys and values of the wrong type are errors naming them
        (all of them at once, with every range problem too when `validate`)."""
        if not isinstance(data, dict):
            raise UserError("config", "must be a JSON/TOML object of sections")
        data = migrate(dict(data))
        cfg = cls.from_dict(base.to_dict()) if base is not None else cls()
        problems: list[UserError] = []
        for name, value in data.items():
            if name == "version":
                continue
            if name not in SECTIONS:
                problems.append(UserError(name, "unknown config section; valid: "
                                                + ", ".join(SECTIONS)))
                continue
            if not isinstance(value, dict):
                problems.append(UserError(name, "must be an object of settings"))
                continue
            for key, v in value.items():
                path = f"{name}.{key}"
                if path not in SETTINGS:
                    valid = ", ".join(f.name for f in dataclasses.fields(SECTIONS[name]))
                    problems.append(UserError(path, f"unknown setting; valid: {valid}"))
                    continue
                try:
                    cfg.set(path, v)
                except UserError as e:
                    problems.append(e)
        if validate:
            seen = {p.field for p in problems}
            problems += [p for p in cfg.problems() if p.field not in seen]
        if problems:
            raise UserErrors(problems)
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def write(self, path: str) -> None:
        """Write JSON (.json) or TOML (.toml) atomically."""
        text = to_toml(self.to_dict()) if path.endswith(".toml") else self.to_json() + "\n"
        atomic_write_text(path, text)

    @classmethod
    def read(cls, path: str, base: "RunConfig | None" = None) -> "RunConfig":
        return cls.from_dict(read_config_file(path), base)

    def changed(self) -> dict[str, Any]:
        """{path: value} of the settings that differ from the defaults."""
        default = RunConfig()
        return {p: self.get(p) for p in SETTINGS if self.get(p) != default.get(p)}

    # -- derived values ----------------------------------------------------------------------
    @property
    def unet_lr(self) -> float:
        return self.optim.lr if self.optim.unet_lr is None else self.optim.unet_lr

    @property
    def te_lr(self) -> float:
        return self.optim.lr if self.optim.te_lr is None else self.optim.te_lr

    # -- checks ------------------------------------------------------------------------------
    def problems(self) -> list[UserError]:
        """Every setting outside its range or choices, and every rule between settings broken."""
        out = [p for spec in SETTINGS.values() if (p := spec.problem(self.get(spec.path)))]
        return out + _cross_field_problems(self)

    def validate(self) -> "RunConfig":
        """Raise UserErrors (all problems, the first one's field) or return self."""
        problems = self.problems()
        if problems:
            raise UserErrors(problems)
        return self


def coerce(spec: Spec, value: Any) -> Any:
    """`value` as the setting's type: '8' -> 8, 'true' -> True, '' -> None where optional."""
    if value is None or (spec.optional and isinstance(value, str) and not value.strip()):
        if spec.optional:
            return None
        raise UserError(spec.path, "must not be empty")
    kind = spec.kind
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, str):
                text = value.strip()
                # "8" exactly (no float rounding of large seeds); "8.0" and "1e3" as numbers
                value = int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            out = float(value.strip() if isinstance(value, str) else value)
            if math.isnan(out):
                raise ValueError(value)
            return out
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(value)
        text = str(value)
        for choice in spec.choices:  # choices are matched without regard to case
            if text.strip().lower() == str(choice).lower():
                return choice
        if spec.normalize is not None:
            try:
                return spec.normalize(text)
            except UserError:
                pass  # problem() names it
        return text
    except (TypeError, ValueError, OverflowError):
        wanted = {bool: "true or false", str: "text"}.get(kind) or spec.range_text()
        raise UserError(spec.path, f"{value!r} is not valid; give {wanted}") from None


def parse_resolution(text: str | int) -> tuple[int, int]:
    """'512' -> (512, 512); '768x512' -> (768, 512) as (width, height)."""
    raw = str(text).lower().replace(" ", "").replace(",", "x")
    parts = raw.split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or any(v < 64 or v > 8192 or v % 8 for v in values):
        raise UserError("data.resolution",
                        f"{text!r} is not valid; give one side or WxH, multiples of 8 in 64..8192")
    return values[0], values[1]


# Steps that bring a config dict from version N to N + 1, by N. Version 1 is the first and the
# current one, so there are none yet; a change that renames or re-means a setting bumps
# CONFIG_VERSION and adds its step here (with a test that the older file still loads).
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a config dict of an older version up to CONFIG_VERSION. A dict without `version` is
    taken as the current version; a newer or unknown version is refused (UserError)."""
    version = data.get("version", CONFIG_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError("version", f"{version!r} is not a config version; versions are whole "
                                   f"numbers 1..{CONFIG_VERSION}")
    if version > CONFIG_VERSION:
        raise UserError("version", f"config version {version!r} was written by a newer "
                                   f"lora-train-ext; this one reads versions 1..{CONFIG_VERSION} "
                                   "(update the extension)")
    while version < CONFIG_VERSION:
        data = MIGRATIONS[version](dict(data))
        version += 1
        data["version"] = version
    return data


def read_config_file(path: str) -> dict[str, Any]:
    """The raw sections of a JSON or TOML config file (nothing checked but the syntax)."""
    import os

    if not os.path.isfile(path):
        raise UserError("config", f"file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
        data = _load_toml(text) if path.endswith(".toml") else json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError("config", f"cannot parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError("config", f"{path} must hold an object of sections")
    return data


# -- the settings table in words (README, `settings` command) ------------------------------------
def settings_markdown() -> str:
    """One row per setting: key, default, valid values, help. The README holds this table."""
    rows = ["| setting | default | valid | what it does |", "| --- | --- | --- | --- |"]
    for spec in SETTINGS.values():
        default = "(empty)" if spec.default in ("", None) else _fmt(spec.default)
        valid = spec.range_text() + (f" ({spec.unit})" if spec.unit else "")
        if spec.optional:
            valid += ", or empty"
        help_text = spec.help + (f" *Not available yet.*" if spec.not_built else "")
        rows.append(f"| `{spec.path}` | `{default}` | {valid} | {help_text.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def settings_json() -> list[dict[str, Any]]:
    """The settings table as data (the API's GET /settings, `settings --json`)."""
    out = []
    for spec in SETTINGS.values():
        out.append({"key": spec.path, "type": spec.kind.__name__, "default": spec.default,
                    "valid": spec.range_text(), "low": spec.low, "high": spec.high,
                    "choices": list(spec.choices), "unit": spec.unit, "optional": spec.optional,
                    "help": spec.help, "label": spec.label, "flag": spec.cli_flag,
                    "available": not spec.not_built})
    return out


def to_toml(data: dict[str, Any]) -> str:
    """Sections of scalars only, which is all a RunConfig holds."""
    lines = [f"version = {data.get('version', CONFIG_VERSION)}"]
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            if value is None:
                continue  # TOML has no null: absent means default (None)
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # a TOML basic string: JSON's escapes are TOML's, but TOML also wants DEL escaped
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _load_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python 3.11+
        return tomllib.loads(text)
    except ImportError:
        pass
    try:
        import toml  # the WebUI (Python 3.10) ships it
    except ImportError:
        raise UserError("config", "reading TOML needs Python 3.11 or the 'toml' package; use JSON") from None
    return toml.loads(text)
