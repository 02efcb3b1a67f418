"""Registers lora-train-ext with the WebUI: the Train LoRA tab, its settings and its API. The host
is Forge's when Forge's `backend/` is there (`host.select()`), else the WebUI's."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules import call_queue, script_callbacks, shared  # noqa: E402

from lora_train_ext.host import select  # noqa: E402
from lora_train_ext.host.webui import API_OPTION, SETTINGS_SECTION, api_requested  # noqa: E402
from lora_train_ext.runs import RunManager  # noqa: E402

host = select()
manager = RunManager(host)


def on_ui_tabs():
    from lora_train_ext.ui.tab import build_tab

    def wrap_gpu(fn, extra_outputs):
        return call_queue.wrap_gradio_gpu_call(fn, extra_outputs=extra_outputs)

    return [(build_tab(host, manager, wrap_gpu), "Train LoRA", "lora_train")]


def on_ui_settings():
    shared.opts.add_option("lora_train_output_dir", shared.OptionInfo(
        "", "Folder for trained LoRA files (empty: the WebUI's Lora folder)",
        section=SETTINGS_SECTION))
    shared.opts.add_option("lora_train_run_dir", shared.OptionInfo(
        "", "Folder for runs' own files: state, history, samples, latent cache "
            "(empty: outputs/lora-train)", section=SETTINGS_SECTION))
    info = shared.OptionInfo(
        False, "HTTP API under /lora-train/v1/ without --api (honours --api-auth)",
        section=SETTINGS_SECTION)
    if hasattr(info, "needs_restart"):
        info = info.needs_restart()  # the routes are added once, when the app starts
    shared.opts.add_option(API_OPTION, info)


def on_app_started(_demo, app):
    if not api_requested():
        print("lora-train-ext: HTTP API off (start the WebUI with --api, or turn on "
              "Settings > Train LoRA > HTTP API and restart)")
        return
    from lora_train_ext.api import add_routes, parse_api_auth

    add_routes(app, host, manager, credentials=parse_api_auth(shared.cmd_opts.api_auth))


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
