"""Sample images while training: which prompts, when, and where the images go.

The prompts are one per line, in kohya's sample-prompt form: the prompt, then any of `--n
negative prompt`, `--w width`, `--h height`, `--d seed`, `--l CFG scale`, `--s steps`,
`--ss sampler`. What a line leaves out comes from the `sample` settings. The images are made by
the host (the WebUI's own txt2img, or the standalone sampler) with the adapter as it is at that
step, hooked in, the base untouched; the trainer asks for them through `TrainControl.sampler`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import UserError

OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "l": "cfg_scale",
           "s": "steps", "ss": "sampler"}


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int = 1234
    cfg_scale: float = 7.0
    steps: int = 20
    sampler: str = "Euler a"


def parse_sample_prompts(text: str, defaults: SamplePrompt, field: str = "sample.prompts"
                         ) -> list[SamplePrompt]:
    """One SamplePrompt per non-empty line ('#' starts a comment line)."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s--(?=[a-z]{1,2}\s)", " " + line)
        values = {"prompt": parts[0].strip()}
        for part in parts[1:]:
            key, _, value = part.partition(" ")
            if key not in OPTIONS:
                raise UserError(field, f"line {number}: unknown option --{key}; use "
                                       + ", ".join(f"--{k} ({v})" for k, v in OPTIONS.items()))
            values[OPTIONS[key]] = value.strip()
        if not values["prompt"]:
            raise UserError(field, f"line {number} has options but no prompt")
        out.append(_typed(values, defaults, field, number))
    return out


def _typed(values: dict, defaults: SamplePrompt, field: str, number: int) -> SamplePrompt:
    kw = {}
    for name, raw in values.items():
        if name in ("prompt", "negative", "sampler"):
            kw[name] = raw
            continue
        try:
            value = float(raw) if name == "cfg_scale" else int(raw)
        except ValueError:
            raise UserError(field, f"line {number}: --{_flag(name)} {raw!r} is not a number") \
                from None
        if name in ("width", "height") and (value < 64 or value > 4096 or value % 8):
            raise UserError(field, f"line {number}: --{_flag(name)} {value} must be a multiple "
                                   "of 8 in 64..4096")
        if name == "steps" and not 1 <= value <= 1000:
            raise UserError(field, f"line {number}: --s {value} must be in 1..1000")
        if name == "seed" and value < 0:
            raise UserError(field, f"line {number}: --d {value} must be >= 0")
        kw[name] = value
    return SamplePrompt(**{**defaults.__dict__, **kw})


def _flag(name: str) -> str:
    return next(k for k, v in OPTIONS.items() if v == name)


def prompts_for(cfg) -> list[SamplePrompt]:
    """The run's sample prompts with the `sample` settings as defaults (0 size: the training
    resolution)."""
    from .config import parse_resolution

    s = cfg.sample
    width, height = parse_resolution(cfg.data.resolution)
    defaults = SamplePrompt(prompt="", negative=s.negative_prompt, width=s.width or width,
                            height=s.height or height, seed=s.seed, cfg_scale=s.cfg_scale,
                            steps=s.steps, sampler=s.sampler)
    return parse_sample_prompts(s.prompts, defaults)


def sample_due(cfg, step: int, epoch_ended: int | None, total: int) -> bool:
    """With sample prompts set, sampling is due at step 0 (the baseline, when asked), every N
    steps, every N epochs, and at the last step."""
    s = cfg.sample
    if not s.prompts.strip():
        return False
    if step == 0:
        return s.at_start
    if step == total:
        return True
    if s.every_steps and step % s.every_steps == 0:
        return True
    return bool(s.every_epochs and epoch_ended and epoch_ended % s.every_epochs == 0)


def sample_path(run_dir: str, name: str, step: int, index: int) -> str:
    """RUN/samples/NAME-step00000100-00.png"""
    return os.path.join(run_dir, "samples", f"{name}-step{step:08d}-{index:02d}.png")



def sampler_for(generate, save):
    """A `TrainControl.sampler`: `generate(SamplePrompt) -> PIL image` for each prompt, saved
    as RUN/samples/NAME-stepN-I.png (atomically); the first one also becomes NAME.preview.png
    beside the LoRA, the Lora card's picture. `save`: the run's SaveConfig. Returns the paths
    written."""
    from .run_files import run_folder

    run_dir, out_dir, name = run_folder(save), save.output_dir or ".", save.output_name
    from .fsio import atomic_write

    def sample(step: int, prompts: list[SamplePrompt]) -> list[str]:
        paths = []
        for index, prompt in enumerate(prompts):
            image = generate(prompt)
            path = sample_path(run_dir, name, step, index)
            atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
            if index == 0:
                atomic_write(os.path.join(out_dir, f"{name}.preview.png"),
                             lambda tmp: image.save(tmp, format="PNG"))
            paths.append(path)
        return paths
    return sample
