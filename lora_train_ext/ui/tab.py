"""The `Train LoRA` tab (gradio 3.41 and 4.x).

Simple by default: the loaded model, dataset folder, output name, preset and Train. Everything
else sits in accordions. The form is one table of fields (config path, widget, label, tooltip);
the Train handler turns the values into one RunConfig before anything else sees them.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..core.config import (ALGOS, DTYPES, LOSSES, RESIZE_MODES, SAVE_DTYPES, SCHEDULERS,
                           TARGETS, RunConfig)
from ..core.errors import UserError
from ..runs import RunManager, parse_strengths, strength_grid
from .chart import loss_chart_svg

PRESET_DEFAULT = "default (AdamW, rank 8)"


@dataclass
class Field:
    path: str  # "section.field" of RunConfig
    kind: str  # text, number, int, slider, check, choice
    label: str
    info: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None


SIMPLE_FIELDS = [
    Field("data.dataset_dir", "text", "Dataset folder",
          "A folder of images with .txt captions, or of N_name sub-folders (each image repeated N times)"),
    Field("save.output_name", "text", "Output name",
          "File name of the LoRA (no extension); it appears under this name in the Lora tab"),
    Field("data.trigger_word", "text", "Trigger word",
          "Optional: put at the start of every caption, and into the card's activation text"),
]

ADVANCED = {
    "Network": [
        Field("network.algo", "choice", "Algorithm", "lora: transformer blocks (LierLa); locon: also the 3x3 convs", ALGOS),
        Field("network.rank", "int", "Rank (dim)", "Size of the adapter; 8-32 for a character or style, 64-128 for more detail", minimum=1, maximum=1024),
        Field("network.alpha", "number", "Alpha", "Scale = alpha / rank; 1 with adaptive optimizers (guide's advice), rank/2 or rank otherwise", minimum=0),
        Field("network.conv_rank", "int", "Conv rank", "LoCon: rank of the 3x3 conv layers (0 = none)", minimum=0, maximum=1024),
        Field("network.conv_alpha", "number", "Conv alpha", "LoCon: alpha of the 3x3 conv layers", minimum=0),
        Field("network.train_on", "choice", "Train", "UNet and text encoder, or only one of them", TARGETS),
        Field("network.block_filter", "text", "Blocks", "Only these UNet blocks, e.g. IN,MID,OUT or OUT03 OUT04 (empty = all)"),
        Field("network.block_ranks", "text", "Per-block rank", "UNet blocks with their own rank, e.g. IN:4, MID:8, OUT:16 or OUT04:32 (empty = Rank everywhere)"),
        Field("network.block_lr_weights", "text", "Per-block LR weights", "UNet LR multipliers per block, e.g. IN:0.5, MID:1, OUT:1 (0 freezes a block)"),
        Field("network.dropout", "number", "Dropout", "Neuron dropout on the adapter (0-1)", minimum=0, maximum=1),
        Field("network.existing_lora", "text", "Continue from file", "Path of a LoRA to continue training (same arch, algorithm and rank)"),
    ],
    "Optimizer and learning rate": [
        Field("optim.optimizer", "choice", "Optimizer", "AdamW is a safe default; DAdaptAdam / Prodigy find the LR themselves (set LR 1)", ()),
        Field("optim.optimizer_args", "text", "Optimizer arguments", "key=value pairs as kohya takes them, e.g. weight_decay=0.01 betas=0.9,0.999"),
        Field("optim.lr", "number", "Learning rate", "1e-4 for AdamW; 1.0 for DAdaptation / Prodigy", minimum=0),
        Field("optim.unet_lr", "number", "UNet learning rate", "Empty or 0 = the learning rate above", minimum=0),
        Field("optim.te_lr", "number", "Text encoder learning rate", "Empty or 0 = the learning rate above; often half of the UNet's", minimum=0),
        Field("optim.scheduler", "choice", "Scheduler", "How the LR changes over the run; constant is right for adaptive optimizers", SCHEDULERS),
        Field("optim.warmup_steps", "int", "Warmup steps", "Steps of linear warmup from 0", minimum=0),
        Field("optim.max_grad_norm", "number", "Max grad norm", "Clip gradients to this norm (0 = off)", minimum=0),
    ],
    "Training": [
        Field("train.max_steps", "int", "Steps", "Optimizer steps in total", minimum=1, maximum=100000),
        Field("train.epochs", "int", "Epochs", "If > 0: train this many passes over the dataset instead of Steps", minimum=0),
        Field("train.batch_size", "int", "Batch size", "Images per step; more needs more VRAM", minimum=1, maximum=10000),
        Field("train.grad_accum", "int", "Gradient accumulation", "Steps of gradients summed before one update (a larger batch without the VRAM)", minimum=1, maximum=1024),
        Field("train.seed", "int", "Seed", "Same seed + same data = same weights on the same device", minimum=0),
        Field("train.dtype", "choice", "Training precision", "bf16 on recent GPUs; fp16 on older ones; fp32 needs the WebUI started with --no-half", DTYPES),
        Field("train.gradient_checkpointing", "check", "Gradient checkpointing", "Less VRAM, about 20-30% slower"),
    ],
    "Dataset options": [
        Field("data.resolution", "text", "Resolution", "512 for SD1.5, 768 for SD2-v, 1024 for SDXL; or WxH"),
        Field("data.enable_buckets", "check", "Aspect-ratio buckets", "Keep each image's aspect ratio (recommended)"),
        Field("data.repeats", "int", "Repeats (flat folder)", "How often each image is seen per epoch when the folder has no N_name sub-folders", minimum=1),
        Field("data.caption_extension", "text", "Caption extension", ".txt or .caption"),
        Field("data.default_caption", "text", "Default caption", "For images without a caption file"),
        Field("data.shuffle_tags", "check", "Shuffle tags", "Shuffle comma-separated tags each time (keep the first ones with Keep tokens)"),
        Field("data.keep_tokens", "int", "Keep tokens", "Tags kept in place at the start when shuffling", minimum=0),
        Field("data.caption_dropout", "number", "Caption dropout", "Chance to train an image with an empty caption", minimum=0, maximum=1),
        Field("data.resize_mode", "choice", "Resize mode", "How images are fitted to their bucket", RESIZE_MODES),
        Field("data.flip", "check", "Flip augmentation", "Random horizontal flips (not for asymmetric subjects)"),
    ],
    "Loss and noise": [
        Field("loss.loss", "choice", "Loss", "MSE is standard; Huber / SmoothL1 are robust to outliers", LOSSES),
        Field("loss.min_snr_gamma", "number", "Min-SNR gamma", "5 is the usual value; 0 = off", minimum=0),
        Field("loss.noise_offset", "number", "Noise offset", "0.05-0.1 helps very dark / bright images; 0 = off", minimum=0),
        Field("loss.timestep_min", "int", "Min timestep", "Train only timesteps from this", minimum=0, maximum=999),
        Field("loss.timestep_max", "int", "Max timestep", "... up to this (exclusive)", minimum=1, maximum=1000),
    ],
    "Saving": [
        Field("save.save_every_steps", "int", "Save every N steps", "A snapshot file every N steps (0 = only at the end)", minimum=0),
        Field("save.keep_last", "int", "Keep last snapshots", "Delete older snapshots (0 = keep all)", minimum=0),
        Field("save.save_dtype", "choice", "Save precision", "fp16 is what most LoRA files use", SAVE_DTYPES),
        Field("save.output_dir", "text", "Output folder", "Empty = the WebUI's Lora folder (Settings → Train LoRA)"),
        Field("save.comment", "text", "Comment", "Stored in the file's metadata"),
    ],
}

ALL_FIELDS = SIMPLE_FIELDS + [f for group in ADVANCED.values() for f in group]


def _get(cfg: RunConfig, path: str) -> Any:
    section, name = path.split(".")
    return getattr(getattr(cfg, section), name)


def form_values(cfg: RunConfig) -> list[Any]:
    out = []
    for f in ALL_FIELDS:
        v = _get(cfg, f.path)
        out.append("" if v is None and f.kind in ("text", "number") else v)
    return out


def config_from_form(values: list[Any], base: RunConfig | None = None) -> RunConfig:
    """Form values (in ALL_FIELDS order) -> a validated-later RunConfig; errors name the field."""
    data: dict[str, dict[str, Any]] = {}
    for f, value in zip(ALL_FIELDS, values):
        section, name = f.path.split(".")
        if f.path in ("optim.unet_lr", "optim.te_lr") and value in ("", None, 0, 0.0):
            value = None
        if f.kind == "text" and value is None:
            value = ""
        data.setdefault(section, {})[name] = value
    cfg = RunConfig.from_dict(data)
    if base is not None:  # keep settings the form does not show (from a preset)
        merged = base.to_dict()
        for section, values_ in data.items():
            merged[section].update({k: getattr(getattr(cfg, section), k) for k in values_})
        cfg = RunConfig.from_dict(merged)
    return cfg


def preset_config(name: str, info=None) -> RunConfig:
    """A preset's settings on top of the defaults that suit the loaded model (`info`)."""
    from ..core.optim import PRESETS

    cfg = RunConfig.from_dict(PRESETS[name]) if name in PRESETS else RunConfig()
    if info is not None:
        if name not in PRESETS:
            cfg.data.resolution = str(info.default_resolution)
        cfg.train.dtype = info.default_dtype
    return cfg


def status_html(manager: RunManager) -> str:
    run = manager.latest()
    if run is None:
        return "<div class='lora-train-status'>No run yet. Choose a dataset folder and press Train.</div>"
    parts = [f"<b>{html.escape(run.config.save.output_name)}</b>: {run.state}"]
    if run.total:
        parts.append(f"step {run.step}/{run.total}")
    if run.loss is not None:
        parts.append(f"loss {run.loss:.4f} (avg {run.loss_avg or 0:.4f})")
    if run.lr:
        parts.append("lr " + ", ".join(f"{k} {v:.2e}" for k, v in run.lr.items()))
    if run.eta is not None and run.state == "running":
        parts.append(f"ETA {run.eta:.0f}s")
    body = " · ".join(parts)
    if run.error:
        body += f"<div class='lora-train-error'>{html.escape(run.error)}</div>"
    elif run.message:
        body += f"<div class='lora-train-message'>{html.escape(run.message)}</div>"
    if run.files:
        body += "<div class='lora-train-files'>Saved: " + ", ".join(
            html.escape(os.path.basename(p)) for p in run.files) + "</div>"
    chart = loss_chart_svg(run.history) if run.history else ""
    return f"<div class='lora-train-status' data-state='{run.state}'>{body}{chart}</div>"


def error_html(message: str) -> str:
    return f"<div class='lora-train-status'><div class='lora-train-error'>{html.escape(message)}</div></div>"


def build_tab(host, manager: RunManager, wrap_gpu: Callable[[Callable], Callable]):
    """The tab's gr.Blocks.

    `wrap_gpu(fn, extra_outputs)` wraps handlers that need the GPU lock; their first argument is
    a task id (the WebUI's progress bar follows it) and their last output is HTML;
    `extra_outputs` fill the other outputs when the handler fails.
    """
    import gradio as gr

    from ..core.optim import PRESETS, available_optimizers

    js_kw = "_js" if int(gr.__version__.split(".")[0]) < 4 else "js"
    optimizers = tuple(available_optimizers())
    info = host.model_info()
    defaults = preset_config(PRESET_DEFAULT, info)
    widgets = {}

    def widget(f: Field, value):
        kw = dict(label=f.label, info=f.info, elem_id="lora_train_" + f.path.replace(".", "_"))
        if f.kind == "check":
            return gr.Checkbox(value=bool(value), **kw)
        if f.kind == "choice":
            choices = list(optimizers if f.path == "optim.optimizer" else f.choices)
            return gr.Dropdown(choices=choices, value=value, **kw)
        if f.kind == "int":
            return gr.Number(value=value, precision=0, **kw)
        if f.kind == "number":
            return gr.Number(value=value if value is not None else 0, **kw)
        return gr.Textbox(value=value or "", lines=1, **kw)

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            gr.Markdown(f"**Model:** {html.escape(info.label)}", elem_id="lora_train_model")
        with gr.Row():
            with gr.Column(scale=3):
                for f in SIMPLE_FIELDS:
                    widgets[f.path] = widget(f, _get(defaults, f.path))
                with gr.Row():
                    preset = gr.Dropdown(choices=[PRESET_DEFAULT, *PRESETS], value=PRESET_DEFAULT,
                                         label="Preset", elem_id="lora_train_preset",
                                         info="Starting settings; the easy-* ones are the guide's adaptive-optimizer settings")
                for title, fields in ADVANCED.items():
                    with gr.Accordion(title, open=False):
                        for f in fields:
                            widgets[f.path] = widget(f, _get(defaults, f.path))
            with gr.Column(scale=2):
                with gr.Row():
                    check = gr.Button("Check dataset", elem_id="lora_train_check")
                    train = gr.Button("Train", variant="primary", elem_id="lora_train_start")
                    stop = gr.Button("Stop", elem_id="lora_train_stop")
                task_id = gr.Textbox(visible=False, elem_id="lora_train_task_id")
                gr.HTML("<div id='lora_train_progress_anchor'></div>")
                status = gr.HTML(status_html(manager), elem_id="lora_train_status")
                dataset_report = gr.Textbox(label="Dataset check", lines=6, interactive=False,
                                            elem_id="lora_train_dataset_report")
                dataset_preview = gr.Gallery(label="What the model will see (bucketed, cropped)",
                                             elem_id="lora_train_dataset_preview", columns=4,
                                             height="auto")
                with gr.Accordion("Test the LoRA (txt2img with TE / UNet strengths)", open=True):
                    with gr.Row():
                        lora = gr.Dropdown(choices=_lora_names(host), label="LoRA",
                                           elem_id="lora_train_test_lora",
                                           info="Files in the output folder, newest first")
                        refresh = gr.Button("↻", elem_id="lora_train_test_refresh",
                                            elem_classes=["lora-train-tool"])
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="lora_train_test_prompt",
                                        info="The LoRA tag is added for each cell")
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="lora_train_test_negative")
                    with gr.Row():
                        te_strengths = gr.Textbox(value="0, 1", label="TE strengths (rows)",
                                                  elem_id="lora_train_test_te",
                                                  info="Text-encoder multipliers, comma separated")
                        unet_strengths = gr.Textbox(value="0, 1", label="UNet strengths (columns)",
                                                    elem_id="lora_train_test_unet",
                                                    info="UNet multipliers, comma separated")
                    with gr.Row():
                        seed = gr.Number(value=1234, precision=0, label="Seed", elem_id="lora_train_test_seed")
                        steps = gr.Number(value=20, precision=0, label="Sampling steps", elem_id="lora_train_test_steps")
                        size = gr.Number(value=info.default_resolution, precision=0, label="Size",
                                         elem_id="lora_train_test_size")
                    test_button = gr.Button("Generate grid", variant="primary", elem_id="lora_train_test_run")
                    test_image = gr.Image(label="Grid", type="pil", interactive=False,
                                          elem_id="lora_train_test_grid")
                    test_info = gr.HTML(elem_id="lora_train_test_info")

        form = [widgets[f.path] for f in ALL_FIELDS]

        def on_train(task, *values):
            try:
                cfg = config_from_form(list(values))
                record = manager.create(cfg)
            except UserError as e:
                return [gr.update(), error_html(str(e))]
            manager.execute(record)
            newest = os.path.splitext(os.path.basename(record.files[0]))[0] if record.files else None
            return [gr.update(choices=_lora_names(host), value=newest), status_html(manager)]

        def on_check(*values):
            from ..core.data import TrainData

            try:
                cfg = config_from_form(list(values))
                cfg.validate()
                if not cfg.data.dataset_dir:
                    raise UserError("data.dataset_dir", "give the folder with your training images")
                data = TrainData(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                 arch=info.arch or "sd1", require_images=False)
                samples = data.preview(count=4) if data.report.ok else []
                return [data.report.summary_text(), [(img, caption) for img, caption in samples]]
            except UserError as e:
                return [f"error: {e}", []]

        def on_stop():
            run = manager.latest()
            if run is not None and run.state in ("queued", "running"):
                manager.stop(run.id)
            return status_html(manager)

        def on_preset(name):
            return form_values(preset_config(name, host.model_info()))

        def on_test(task, name, prompt_, negative_, seed_, steps_, size_, te_text, unet_text):
            try:
                te = parse_strengths(te_text, "TE strengths")
                unet = parse_strengths(unet_text, "UNet strengths")
                side = int(size_ or 512)
                if side < 64 or side % 8:
                    raise UserError("Size", "give a multiple of 8, at least 64")
                grid, _, prompts = strength_grid(host, name, prompt_, negative_, int(seed_ or 0), te, unet,
                                             steps=int(steps_ or 20), width=side, height=side)
                path = host.save_grid(grid, prompt_)
            except UserError as e:
                return [None, error_html(str(e))]
            except FileNotFoundError as e:
                return [None, error_html(str(e))]
            cells = len(prompts)
            return [grid, f"<div class='lora-train-message'>{cells} images, rows TE {te}, columns UNet {unet}; saved {html.escape(path)}</div>"]

        train_kw = {js_kw: _submit_js("loraTrainSubmit")}
        # the WebUI's wrapper appends timing to the last output: it must be the HTML one
        train.click(wrap_gpu(on_train, [gr.update()]), inputs=[task_id, *form], outputs=[lora, status],
                    **train_kw)
        check.click(on_check, inputs=form, outputs=[dataset_report, dataset_preview])
        stop.click(on_stop, inputs=[], outputs=[status])
        preset.change(on_preset, inputs=[preset], outputs=form)
        refresh.click(lambda: gr.update(choices=_lora_names(host)), inputs=[], outputs=[lora])
        test_kw = {js_kw: _submit_js("loraTrainTestSubmit")}
        test_button.click(wrap_gpu(on_test, [None]), inputs=[task_id, lora, prompt, negative, seed, steps, size,
                                                       te_strengths, unet_strengths],
                          outputs=[test_image, test_info], **test_kw)
        tab.load(lambda: status_html(manager), inputs=[], outputs=[status], every=1,
                 show_progress="hidden")
    return tab


def _submit_js(function: str) -> str:
    """Call javascript/lora_train.js's submit function (the WebUI loads it); where that file is
    not loaded (the standalone preview), still put a task id into the first argument."""
    return ("(...args) => { if (typeof %s === 'function') return %s(...args); "
            "args[0] = 'task(' + Math.random().toString(36).slice(2, 12) + ')'; return args; }"
            % (function, function))


def _lora_names(host) -> list[str]:
    try:
        return [os.path.splitext(os.path.basename(p))[0] for p in host.list_loras()]
    except OSError:
        return []
