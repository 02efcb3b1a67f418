"""`python -m lora_train_ext preview`: the Train LoRA tab on plain gradio with the tiny model.

The standalone host stands in for the WebUI behind the same interface (its own lock, progress
and sampler), so the tab, the run manager and the API are exercised exactly as in the WebUI.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading

from .host.standalone import StandaloneHost
from .runs import RunManager, describe_failure


def make_app(out_dir: str):
    import gradio as gr

    from .ui.tab import build_tab, error_html

    host = StandaloneHost(out_dir)
    manager = RunManager(host)

    def wrap_gpu(fn, extra_outputs):
        def handler(task, *args):
            with host.exclusive(str(task)):
                try:
                    return fn(task, *args)
                except Exception as e:  # shown in the tab, as the WebUI's wrapper does
                    return [*extra_outputs, error_html(describe_failure(e))]
        return handler

    with gr.Blocks(title="Train LoRA (preview)", analytics_enabled=False,
                   css=open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "style.css")).read()) as demo:
        with gr.Tab("Train LoRA"):
            build_tab(host, manager, wrap_gpu)
    return demo, host, manager


def serve(port: int, out_dir: str, block: bool = True):
    """Our own FastAPI app with the API routes, the gradio tab mounted at '/'."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from .api import add_routes

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo, host, manager = make_app(out_dir)
    if int(gr.__version__.split(".")[0]) < 4:
        demo.queue(concurrency_count=4)
    else:
        demo.queue(default_concurrency_limit=4)
    app = FastAPI()
    add_routes(app, host, manager)
    app = gr.mount_gradio_app(app, demo, path="/")
    options = dict(host="127.0.0.1", port=port, log_level="warning")
    if "timeout_graceful_shutdown" in inspect.signature(uvicorn.Config).parameters:
        # a stop (Ctrl-C, SIGTERM) does not wait for the page's open event streams
        options["timeout_graceful_shutdown"] = 2
    server = uvicorn.Server(uvicorn.Config(app, **options))
    print(f"Train LoRA preview on http://127.0.0.1:{port} (outputs in {os.path.abspath(out_dir)})",
          file=sys.stderr, flush=True)
    if block:
        server.run()
        return None
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, host, manager
