"""The `Train LoRA` tab (gradio 3.41 and 4.x).

Simple by default: the loaded model, dataset folder, output name, preset and Train. Everything
else sits in accordions. The widgets, labels, tooltips and groups come from the settings table
(core/config.py SETTINGS); the Train handler turns the values into one RunConfig, on top of the
chosen preset, before anything else sees them. The tab reaches the core through the run manager.
"""

from __future__ import annotations

import html
import os
from typing import Any, Callable

from ..core.config import GROUPS, SETTINGS, RunConfig, Spec
from ..core.errors import UserError
from ..runs import (RunManager, parse_strengths, snapshot_grid, snapshots_of, strength_grid)
from .chart import histogram_svg, line_chart_svg, loss_chart_svg

PRESET_DEFAULT = "default (AdamW, rank 8)"

# the tab's fields in order: the simple ones first, then each accordion's
ALL_FIELDS: list[Spec] = [spec for group in GROUPS for spec in SETTINGS.values()
                          if spec.group == group]
SIMPLE_FIELDS = [f for f in ALL_FIELDS if f.group == ""]
ADVANCED: dict[str, list[Spec]] = {g: [f for f in ALL_FIELDS if f.group == g]
                                   for g in GROUPS if g}


def widget_kind(spec: Spec) -> str:
    if spec.kind is bool:
        return "check"
    if spec.choices or spec.path == "optim.optimizer":
        return "choice"
    if spec.optional:
        return "text"  # a number field cannot be left empty: gradio sends 0, which means else
    return {int: "int", float: "number", str: "text"}[spec.kind]


def info_text(spec: Spec) -> str:
    """The tooltip: the help and, for numbers, the valid range (from the settings table)."""
    if spec.kind in (int, float) and not spec.choices:
        return f"{spec.help} [{spec.range_text()}]"
    return spec.help


def form_values(cfg: RunConfig) -> list[Any]:
    out = []
    for f in ALL_FIELDS:
        v = cfg.get(f.path)
        if widget_kind(f) == "text":
            v = "" if v is None else str(v)
        out.append(v)
    return out


def config_from_form(values: list[Any], base: RunConfig | None = None) -> RunConfig:
    """Form values (in ALL_FIELDS order) over `base` (the chosen preset; default: the defaults):
    settings the form does not show keep the base's values. Every problem is reported at once,
    each naming its setting."""
    data: dict[str, dict[str, Any]] = {}
    for f, value in zip(ALL_FIELDS, values):
        if f.kind is str and value is None:
            value = ""
        data.setdefault(f.section, {})[f.name] = value
    return RunConfig.from_dict(data, base=base)


def status_html(manager: RunManager) -> str:
    run = manager.current()
    if run is None:
        return "<div class='lora-train-status'>No run yet. Choose a dataset folder and press Train.</div>"
    parts = [f"<b>{html.escape(run.config.save.output_name)}</b>: {run.state}"]
    if run.total:
        unit = "step" if run.kind == "train" else run.progress.get("unit", "step")
        parts.append(f"{unit} {run.step}/{run.total}")
    if run.loss is not None:
        parts.append(f"loss {run.loss:.4f} (avg {run.loss_avg or 0:.4f})")
    if run.lr:
        parts.append("lr " + ", ".join(f"{k} {v:.2e}" for k, v in run.lr.items()))
    if run.images_per_s is not None and run.state == "running":
        parts.append(f"{run.images_per_s:.2f} images/s")
    if run.eta is not None and run.state == "running":
        parts.append(f"ETA {run.eta:.0f}s")
    queued = [r for r in manager.list() if r.state == "queued" and r is not run]
    if queued:
        parts.append(f"{len(queued)} more queued")
    body = " · ".join(parts)
    if run.state == "paused" and run.paused_snapshot:
        name = os.path.splitext(os.path.basename(run.paused_snapshot))[0]
        body += (f"<div class='lora-train-message'>Paused: the model is free. Test "
                 f"<code>&lt;lora:{html.escape(name)}:1&gt;</code> in txt2img or the test grid, "
                 "then press Resume.</div>")
    if run.error:
        body += f"<div class='lora-train-error'>{html.escape(run.error)}</div>"
    elif run.message:
        body += f"<div class='lora-train-message'>{html.escape(run.message)}</div>"
    first = run.startup.get("click_to_first_step_s")
    if first is not None:
        body += (f"<div class='lora-train-files'>First step {first:.1f} s after Train "
                 f"(latent caching {run.startup.get('cache_s', 0.0):.1f} s and step-0 "
                 f"samples {run.startup.get('baseline_s', 0.0):.1f} s apart)</div>")
    if run.files:
        body += "<div class='lora-train-files'>Saved: " + ", ".join(
            html.escape(os.path.basename(p)) for p in run.files) + "</div>"
    chart = run_charts_html(run)
    return f"<div class='lora-train-status' data-state='{run.state}'>{body}{chart}</div>"


def pause_label(manager: RunManager) -> str:
    """'Resume' while the current run is paused or pausing, 'Pause and test' otherwise."""
    run = manager.current()
    if run is not None and run.state in ("running", "paused") and run.control.pause_requested:
        return "Resume"
    return "Pause and test"


def tag_table_html(names: list[str], strengths: list[float], tags: list[str], path: str) -> str:
    """The grid's cells as a table of their `<lora:...>` tags; a click copies a tag."""
    head = "".join(f"<th>{s:g}</th>" for s in strengths)
    rows = []
    for r, name in enumerate(names):
        cells = []
        for c in range(len(strengths)):
            tag = html.escape(tags[r * len(strengths) + c])
            cells.append(f"<td><button class='lora-train-tag' title='copy' onclick=\"navigator."
                         f"clipboard.writeText(this.textContent)\">{tag}</button></td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return (f"<div class='lora-train-message'>saved {html.escape(path)}; click a tag to copy it"
            f"</div><table class='lora-train-tags'><tr><th></th>{head}</tr>{''.join(rows)}</table>")


def merge_state_html(merger) -> str:
    state = merger.state
    if not state.backups:
        return "<div class='lora-train-message'>Nothing is merged: the model has its own weights.</div>"
    rows = ", ".join(html.escape(f"{os.path.basename(s.path)}:{s.strength:g}") for s in state.specs)
    return (f"<div class='lora-train-message'>Merged into {html.escape(state.model)}: {rows} "
            f"({len(state.backups)} tensors; Revert restores them exactly)</div>")


def queue_choices(manager: RunManager) -> list[str]:
    return [f"{r.id} {r.config.save.output_name}" for r in manager.queued()]


def queue_table_html(manager: RunManager) -> str:
    """The queued runs in order, and the last few that ended with their state."""
    rows = [f"<li>{i}. <b>{html.escape(r.config.save.output_name)}</b> ({r.id}) queued</li>"
            for i, r in enumerate(manager.queued(), 1)]
    running = [r for r in manager.list() if r.state == "running"]
    ended = [r for r in manager.list() if r.state not in ("queued", "running")][:5]
    head = "".join(f"<li>running: <b>{html.escape(r.config.save.output_name)}</b> step "
                   f"{r.step}/{r.total}</li>" for r in running)
    tail = "".join(f"<li>{html.escape(r.config.save.output_name)}: {r.state}"
                   + (f" ({html.escape(r.error)})" if r.error else "") + "</li>" for r in ended)
    if not (rows or head or tail):
        return "<div class='lora-train-queue'>The queue is empty. Runs added with Add to queue train one after another.</div>"
    return f"<div class='lora-train-queue'><ul>{head}{''.join(rows)}{tail}</ul></div>"


def sample_gallery(manager: RunManager, limit: int = 16) -> list[tuple[str, str]]:
    """The shown run's samples, newest first, captioned with their step."""
    run = manager.current()
    if run is None:
        return []
    return [(path, f"step {step}") for step, path in reversed(run.samples[-limit:])
            if os.path.isfile(path)]


def run_charts_html(run) -> str:
    """Loss (raw and smoothed), effective LR per part, images/s and memory, as the run goes."""
    charts = [loss_chart_svg(run.history, validation=run.val_history)]
    groups = sorted({g for _, lrs in run.lr_history for g in lrs})
    if groups:
        charts.append(line_chart_svg(
            "Learning rate (effective: d x lr for adaptive optimizers)",
            {g: [(s, lrs[g]) for s, lrs in run.lr_history if g in lrs] for g in groups},
            y_label="lr"))
    if run.speed_history:
        charts.append(line_chart_svg("Speed", {"images/s": run.speed_history}, y_label="images/s"))
    if run.memory_history:
        charts.append(line_chart_svg("Memory", {"MiB": run.memory_history}, y_label="MiB"))
    return "".join(c for c in charts if c)


# the settings the timestep preview follows, in the order its handler takes them
TIMESTEP_FIELDS = ("loss.timestep_min", "loss.timestep_max", "loss.timestep_sampling",
                   "loss.logit_mean", "loss.logit_std", "loss.mode_scale")
TIMESTEP_PREVIEW_DRAWS = 20000
TIMESTEP_PREVIEW_BINS = 20


def timestep_preview_html(*values) -> str:
    """The timestep distribution the form's settings (TIMESTEP_FIELDS, in order) train with:
    a histogram of TIMESTEP_PREVIEW_DRAWS draws (seeded, the same each time), and the share
    of draws in the middle half of the range. A bad value gives an error naming its setting."""
    from ..core.loss import timestep_histogram

    data: dict[str, dict[str, Any]] = {}
    for path, value in zip(TIMESTEP_FIELDS, values):
        section, name = path.split(".")
        if SETTINGS[path].kind is str and value is None:
            value = ""
        data.setdefault(section, {})[name] = value
    try:
        cfg = RunConfig.from_dict(data)
        problems = [p for p in cfg.problems() if p.field in TIMESTEP_FIELDS]
        if problems:
            raise problems[0]
        hist = timestep_histogram(cfg, bins=TIMESTEP_PREVIEW_BINS, n=TIMESTEP_PREVIEW_DRAWS)
    except UserError as e:
        return f"<div class='lora-train-timesteps'><div class='lora-train-error'>" \
               f"{html.escape(str(e))}</div></div>"
    n = len(hist.counts)
    middle = sum(hist.counts[n // 4: n - n // 4]) / max(1, sum(hist.counts))
    lc = cfg.loss
    svg = histogram_svg(f"Timesteps drawn: {lc.timestep_sampling}", hist.counts, hist.edges,
                        x_label="timestep")
    return (f"<div class='lora-train-timesteps' data-middle-share='{middle:.4f}'>{svg}"
            f"<div class='lora-train-message'>{100 * middle:.0f}% of the steps train timesteps "
            f"in the middle half of {lc.timestep_min}-{lc.timestep_max} (uniform: 50%)</div>"
            "</div>")


def algo_loaders_html(algo: str) -> str:
    """Which programs read a file of the chosen algorithm (core/inspect.py's table, the one
    `inspect` uses for a file), and what they drop."""
    from ..core.inspect import LOADER_NOTES, algo_loader_verdicts

    try:
        verdicts = algo_loader_verdicts(algo or "lora")
    except KeyError:
        return ""
    rows = "".join(f"<li data-loader='{k}'><b>{html.escape(LOADER_NAMES.get(k, k))}</b>: "
                   f"{html.escape(v)}</li>" for k, v in verdicts.items())
    note = LOADER_NOTES.get(algo or "lora", "")
    note_html = f"<div class='lora-train-message'>{html.escape(note)}</div>" if note else ""
    return (f"<div class='lora-train-loaders' data-algo='{html.escape(algo or 'lora')}'>"
            f"Who reads a {html.escape(algo or 'lora')} file:<ul>{rows}</ul>{note_html}</div>")


LOADER_NAMES = {"webui": "WebUI (A1111)", "forge": "Forge", "sdnext": "SD.Next",
                "comfyui": "ComfyUI", "diffusers": "diffusers", "kohya": "kohya sd-scripts"}


def error_html(message: str) -> str:
    return f"<div class='lora-train-status'><div class='lora-train-error'>{html.escape(message)}</div></div>"


def build_tab(host, manager: RunManager, wrap_gpu: Callable[[Callable], Callable]):
    """The tab's gr.Blocks.

    `wrap_gpu(fn, extra_outputs)` wraps handlers that need the GPU lock; their first argument is
    a task id (the WebUI's progress bar follows it) and their last output is HTML;
    `extra_outputs` fill the other outputs when the handler fails.
    """
    import gradio as gr

    js_kw = "_js" if int(gr.__version__.split(".")[0]) < 4 else "js"
    optimizers = tuple(manager.optimizer_choices())
    info = host.model_info()
    defaults = manager.preset_config(PRESET_DEFAULT)
    widgets = {}

    def widget(f: Spec, value):
        kw = dict(label=f.label, info=info_text(f),
                  elem_id="lora_train_" + f.path.replace(".", "_"))
        kind = widget_kind(f)
        if kind == "check":
            return gr.Checkbox(value=bool(value), **kw)
        if kind == "choice":
            choices = list(optimizers if f.path == "optim.optimizer" else f.choices)
            return gr.Dropdown(choices=choices, value=value, **kw)
        if kind == "int":
            return gr.Number(value=value, precision=0, **kw)
        if kind == "number":
            return gr.Number(value=value, **kw)
        text = "" if value is None else str(value)
        return gr.Textbox(value=text, lines=1, **kw)

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            model_md = gr.Markdown(model_line(host), elem_id="lora_train_model")
        with gr.Row():
            with gr.Column(scale=3):
                for f in SIMPLE_FIELDS:
                    widgets[f.path] = widget(f, defaults.get(f.path))
                with gr.Accordion("Presets and config files", open=False):
                    with gr.Row():
                        preset_name = gr.Textbox(label="Preset name", elem_id="lora_train_preset_name",
                                                 info="Save the form as a named preset (or delete one)")
                        preset_save = gr.Button("Save preset", elem_id="lora_train_preset_save")
                        preset_delete = gr.Button("Delete preset", elem_id="lora_train_preset_delete")
                    with gr.Row():
                        config_path = gr.Textbox(label="Config file", elem_id="lora_train_config_path",
                                                 info="Our NAME.config.toml / .json, a kohya_ss GUI "
                                                      "JSON or an sd-scripts TOML: fills the form")
                        config_load = gr.Button("Load config", elem_id="lora_train_config_load")
                    config_info = gr.HTML(elem_id="lora_train_config_info")
                with gr.Row():
                    preset = gr.Dropdown(choices=[PRESET_DEFAULT, *manager.presets()],
                                         value=PRESET_DEFAULT,
                                         label="Preset", elem_id="lora_train_preset",
                                         info="Starting settings; the easy-* ones are the guide's adaptive-optimizer settings")
                for title, fields in ADVANCED.items():
                    with gr.Accordion(title, open=False):
                        for f in fields:
                            widgets[f.path] = widget(f, defaults.get(f.path))
                            if f.path == "network.algo":
                                algo_loaders = gr.HTML(
                                    algo_loaders_html(defaults.get(f.path)),
                                    elem_id="lora_train_algo_loaders")
                            elif f.path == TIMESTEP_FIELDS[-1]:
                                timestep_preview = gr.HTML(
                                    timestep_preview_html(*(defaults.get(p)
                                                            for p in TIMESTEP_FIELDS)),
                                    elem_id="lora_train_timestep_preview")
            with gr.Column(scale=2):
                with gr.Row():
                    check = gr.Button("Check dataset", elem_id="lora_train_check")
                    train = gr.Button("Train", variant="primary", elem_id="lora_train_start")
                    enqueue = gr.Button("Add to queue", elem_id="lora_train_enqueue")
                    pause = gr.Button("Pause and test", elem_id="lora_train_pause")
                    stop = gr.Button("Stop", elem_id="lora_train_stop")
                task_id = gr.Textbox(visible=False, elem_id="lora_train_task_id")
                gr.HTML("<div id='lora_train_progress_anchor'></div>")
                status = gr.HTML(status_html(manager), elem_id="lora_train_status")
                with gr.Accordion("Queue", open=False):
                    queue_html = gr.HTML(queue_table_html(manager), elem_id="lora_train_queue")
                    with gr.Row():
                        queue_pick = gr.Dropdown(choices=queue_choices(manager), label="Queued run",
                                                 elem_id="lora_train_queue_pick")
                        up = gr.Button("↑", elem_id="lora_train_queue_up",
                                       elem_classes=["lora-train-tool"])
                        down = gr.Button("↓", elem_id="lora_train_queue_down",
                                         elem_classes=["lora-train-tool"])
                        cancel = gr.Button("Cancel", elem_id="lora_train_queue_cancel")
                samples = gr.Gallery(label="Samples while training (newest first)",
                                     elem_id="lora_train_samples", columns=4, height="auto")
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
                        seed = gr.Number(value=1234, precision=0, label="Grid seed", elem_id="lora_train_test_seed")
                        steps = gr.Number(value=20, precision=0, label="Sampling steps", elem_id="lora_train_test_steps")
                        size = gr.Number(value=info.default_resolution, precision=0, label="Grid size",
                                         elem_id="lora_train_test_size")
                    test_button = gr.Button("Generate grid", variant="primary", elem_id="lora_train_test_run")
                    with gr.Accordion("Pick the best snapshot (snapshots x strengths)", open=False):
                        snaps = gr.Dropdown(choices=[], multiselect=True, label="Snapshots",
                                            elem_id="lora_train_snapshots",
                                            info="The chosen LoRA's snapshots and final file; "
                                                 "empty = all of them")
                        grid_strengths = gr.Textbox(value="0.5, 0.75, 1", label="Strengths (columns)",
                                                    elem_id="lora_train_snapshot_strengths")
                        snap_button = gr.Button("Snapshot grid", elem_id="lora_train_snapshot_run")
                    with gr.Accordion("Merge into the loaded model (A/B, revert, save)",
                                      open=False):
                        merge_pick = gr.Dropdown(choices=_lora_names(host), label="Add a LoRA",
                                                 elem_id="lora_train_merge_pick",
                                                 info="Adds NAME:1 to the list below")
                        merge_lines = gr.Textbox(label="LoRAs to merge", lines=3,
                                                 elem_id="lora_train_merge_lines",
                                                 info="NAME[:STRENGTH[:TE:UNET]] [blocks=IN:0.5,OUT:1], "
                                                      "one per line")
                        with gr.Row():
                            merge_button = gr.Button("Merge", variant="primary",
                                                     elem_id="lora_train_merge_run")
                            compare_button = gr.Button("A/B", elem_id="lora_train_merge_ab")
                            revert_button = gr.Button("Revert", elem_id="lora_train_merge_revert")
                        with gr.Row():
                            save_name = gr.Textbox(label="Checkpoint name", elem_id="lora_train_merge_name")
                            save_precision = gr.Dropdown(choices=["fp16", "bf16", "fp32"], value="fp16",
                                                         label="Checkpoint precision",
                                                         elem_id="lora_train_merge_precision")
                            save_vae = gr.Textbox(label="Bake VAE file (optional)",
                                                  elem_id="lora_train_merge_vae")
                            save_button = gr.Button("Save as checkpoint",
                                                    elem_id="lora_train_merge_save")
                        merge_info = gr.HTML(elem_id="lora_train_merge_info")
                        with gr.Row():
                            image_a = gr.Image(label="A: original weights", type="pil",
                                               interactive=False, elem_id="lora_train_merge_a")
                            image_b = gr.Image(label="B: merged", type="pil", interactive=False,
                                               elem_id="lora_train_merge_b")
                    test_image = gr.Image(label="Grid", type="pil", interactive=False,
                                          elem_id="lora_train_test_grid")
                    test_info = gr.HTML(elem_id="lora_train_test_info")

        form = [widgets[f.path] for f in ALL_FIELDS]

        def on_train(task, preset_name, *values):
            try:
                cfg = config_from_form(list(values), base=manager.preset_config(preset_name))
                record = manager.create(cfg)
            except UserError as e:
                return [gr.update(), error_html(str(e))]
            manager.execute(record)
            newest = os.path.splitext(os.path.basename(record.files[0]))[0] if record.files else None
            return [gr.update(choices=_lora_names(host), value=newest), status_html(manager)]

        def on_check(preset_name, *values):
            try:
                cfg = config_from_form(list(values), base=manager.preset_config(preset_name))
                text, samples = manager.check_dataset(cfg, samples=4)
                return [text, [(img, caption) for img, caption in samples]]
            except UserError as e:
                return [f"error: {e}", []]

        def on_enqueue(preset_name, *values):
            try:
                cfg = config_from_form(list(values), base=manager.preset_config(preset_name))
                record = manager.enqueue(cfg)
            except UserError as e:
                return [error_html(str(e)), queue_table_html(manager), gr.update()]
            message = (f"<div class='lora-train-message'>queued {html.escape(record.config.save.output_name)}"
                       f" (position {manager.position(record.id) or 'next'})</div>")
            if record.memory_estimate:
                message += (f"<div class='lora-train-message' id='lora_train_memory'>"
                            f"{html.escape(record.memory_estimate['text'])}</div>")
            return [message + status_html(manager), queue_table_html(manager),
                    gr.update(choices=queue_choices(manager))]

        def on_queue(action, pick):
            run_id = (pick or "").split(" ")[0]
            try:
                if action == "cancel":
                    manager.cancel(run_id)
                else:
                    manager.move(run_id, -1 if action == "up" else 1)
            except KeyError:
                pass  # it started or left the queue meanwhile
            choices = queue_choices(manager)
            return [queue_table_html(manager),
                    gr.update(choices=choices, value=pick if pick in choices else None)]

        def on_snapshot_grid(task, name, picked, prompt_, negative_, seed_, steps_, size_, text):
            try:
                strengths = parse_strengths(text, "Strengths")
                side = int(size_ or 512)
                if side < 64 or side % 8:
                    raise UserError("Grid size", "give a multiple of 8, at least 64")
                names = list(picked or []) or snapshots_of(host, name or "")
                grid, tags = snapshot_grid(host, names, strengths, prompt_, negative_,
                                           int(seed_ or 0), steps=int(steps_ or 20),
                                           width=side, height=side)
                path = host.save_grid(grid, prompt_)
            except (UserError, FileNotFoundError) as e:
                return [None, error_html(str(e))]
            return [grid, tag_table_html(names, strengths, tags, path)]

        def on_pause():
            """Pause (a running run) or resume (a paused one): one button."""
            run = manager.current()
            try:
                if run is not None and run.state == "paused":
                    manager.resume(run.id)
                elif run is not None and run.state == "running":
                    manager.pause(run.id)
            except UserError as e:
                return [error_html(str(e)), gr.update()]
            return [status_html(manager), gr.update(value=pause_label(manager))]

        def on_merge(task, action, lines, name, precision, vae, prompt_, negative_, seed_, steps_,
                     size_):
            from ..merging import parse_merge_lines

            merger = manager.merger
            a = b = None
            try:
                if action == "merge":
                    merger.merge(parse_merge_lines(lines or "", host.find_lora))
                elif action == "revert":
                    merger.revert()
                elif action == "compare":
                    a, b = merger.compare(prompt_, negative_, int(seed_ or 0),
                                          int(steps_ or 20), int(size_ or 512))
                elif action == "save":
                    path = merger.save_checkpoint(name or "", precision or "fp16", vae or "")
                    return [None, None, f"<div class='lora-train-message'>saved "
                                        f"{html.escape(path)}; it is in the checkpoint list</div>"]
            except (UserError, FileNotFoundError) as e:
                return [None, None, error_html(str(e))]
            return [a, b, merge_state_html(merger)]

        def on_preset_file(action, name, path, preset_name_, *values):
            """Save / delete a preset, or load a config file into the form."""
            keep = [gr.update() for _ in values]
            choices = gr.update()
            try:
                if action == "save":
                    cfg = config_from_form(list(values), base=manager.preset_config(preset_name_))
                    where = manager.save_preset(name or "", cfg)
                    text = f"saved preset {name} ({os.path.basename(where)})"
                    choices = gr.update(choices=[PRESET_DEFAULT, *manager.presets()], value=name)
                elif action == "delete":
                    manager.delete_preset(name or "")
                    text = f"deleted preset {name}"
                    choices = gr.update(choices=[PRESET_DEFAULT, *manager.presets()],
                                        value=PRESET_DEFAULT)
                else:
                    cfg, notes = manager.load_config_file(path or "")
                    keep = form_values(cfg)
                    text = "loaded " + os.path.basename(path) + ("; " + "; ".join(notes) if notes else "")
            except UserError as e:
                return [*keep, choices, error_html(str(e))]
            return [*keep, choices, f"<div class='lora-train-message'>{html.escape(text)}</div>"]

        def on_stop():
            run = manager.current()
            if run is not None and run.state in ("queued", "running"):
                manager.stop(run.id)
            return status_html(manager)

        def on_preset(name):
            return form_values(manager.preset_config(name))

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
        train.click(wrap_gpu(on_train, [gr.update()]), inputs=[task_id, preset, *form],
                    outputs=[lora, status],
                    **train_kw)
        check.click(on_check, inputs=[preset, *form], outputs=[dataset_report, dataset_preview])
        stop.click(on_stop, inputs=[], outputs=[status])
        merge_pick.change(lambda name, text: ((text or "").rstrip("\n") + "\n" + f"{name}:1").strip()
                          if name else text, inputs=[merge_pick, merge_lines], outputs=[merge_lines])
        merge_inputs = [task_id, merge_lines, save_name, save_precision, save_vae, prompt,
                        negative, seed, steps, size]
        for button, action in ((merge_button, "merge"), (revert_button, "revert"),
                               (compare_button, "compare"), (save_button, "save")):
            button.click(wrap_gpu(lambda task, *args, a=action: on_merge(task, a, *args),
                                  [None, None]),
                         inputs=merge_inputs, outputs=[image_a, image_b, merge_info],
                         **{js_kw: _submit_js("loraTrainTestSubmit")})
        pause.click(on_pause, inputs=[], outputs=[status, pause])
        enqueue.click(on_enqueue, inputs=[preset, *form], outputs=[status, queue_html, queue_pick])
        for button, action in ((up, "up"), (down, "down"), (cancel, "cancel")):
            button.click(lambda pick, a=action: on_queue(a, pick), inputs=[queue_pick],
                         outputs=[queue_html, queue_pick])
        preset.change(on_preset, inputs=[preset], outputs=form)
        timestep_inputs = [widgets[p] for p in TIMESTEP_FIELDS]
        for w in timestep_inputs:  # a preset or a loaded config changes them too
            w.change(timestep_preview_html, inputs=timestep_inputs, outputs=[timestep_preview],
                     show_progress="hidden")
        widgets["network.algo"].change(algo_loaders_html, inputs=[widgets["network.algo"]],
                                       outputs=[algo_loaders], show_progress="hidden")
        for button, action in ((preset_save, "save"), (preset_delete, "delete"),
                               (config_load, "load")):
            button.click(lambda name, path, pname, *values, a=action:
                         on_preset_file(a, name, path, pname, *values),
                         inputs=[preset_name, config_path, preset, *form],
                         outputs=[*form, preset, config_info])
        refresh.click(lambda: gr.update(choices=_lora_names(host)), inputs=[], outputs=[lora])
        lora.change(lambda name: gr.update(choices=snapshots_of(host, name or ""), value=[]),
                    inputs=[lora], outputs=[snaps])
        snap_kw = {js_kw: _submit_js("loraTrainTestSubmit")}
        snap_button.click(wrap_gpu(on_snapshot_grid, [None]),
                          inputs=[task_id, lora, snaps, prompt, negative, seed, steps, size,
                                  grid_strengths], outputs=[test_image, test_info], **snap_kw)
        # the list is read when the page loads, not only when the tab was built
        tab.load(lambda: gr.update(choices=_lora_names(host)), inputs=[], outputs=[lora])
        test_kw = {js_kw: _submit_js("loraTrainTestSubmit")}
        test_button.click(wrap_gpu(on_test, [None]), inputs=[task_id, lora, prompt, negative, seed, steps, size,
                                                       te_strengths, unet_strengths],
                          outputs=[test_image, test_info], **test_kw)
        # the model is read at page load and every few seconds: Forge builds the tab before it
        # chooses (or loads) a checkpoint, and a user may switch checkpoints at any time
        tab.load(lambda: model_line(host), inputs=[], outputs=[model_md], every=5,
                 show_progress="hidden")
        # the Pause button's label follows the run too: a run paused through the API, or a page
        # opened (or reloaded) while the run is paused, shows Resume
        tab.load(lambda: [status_html(manager), sample_gallery(manager), queue_table_html(manager),
                          gr.update(value=pause_label(manager))],
                 inputs=[], outputs=[status, samples, queue_html, pause], every=1,
                 show_progress="hidden")
    return tab


def model_line(host) -> str:
    """The tab's first line: the host's model now (name, arch, why it cannot train)."""
    try:
        label = host.model_info().label
    except Exception as e:  # the line must not break the page's polling
        label = f"(unknown) — {e}"
    return f"**Model:** {html.escape(label)}"


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
