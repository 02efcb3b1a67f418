"""HTTP API under /lora-train/v1/: the same operations as the tab, for scripts.

Routes: GET /settings (the settings table); POST /runs (a RunConfig as JSON, partial allowed)
-> {id, position in the queue, memory (the run's memory estimate)}, or 422 with every problem
found by the preflight check; POST /estimate (the same body) -> {memory, warnings}: the memory
estimate without queueing (peak, parts, free memory, the options that make it fit);
GET /runs; GET /runs/{id}; GET /queue; POST /runs/{id}/stop, /pause, /resume, /cancel,
/move {"by": N};
GET /model; GET /loras; POST /test (a TE x UNet grid, PNG as base64); GET/POST /merge,
POST /merge/revert, /merge/compare, /merge/save (LoRAs merged into the loaded model);
POST /merge-file, /merge-loras, /extract, /resize (file_jobs.py: the command line's file tools
as queued runs, watched with GET /runs/{id}: state, progress, result).
When the WebUI has `--api-auth`, every route needs the same HTTP basic credentials. A run asked for
here writes only inside the host's folders (`Host.write_roots()`: output, Lora and run folder):
save.output_dir, save.run_dir and data.cache_dir elsewhere get 422 naming the setting.
The routes exist only when asked for: the WebUI started with `--api` (or `--nowebui`), or the
setting "Train LoRA > HTTP API" on (host/webui.py `api_requested`).

POST bodies are JSON objects of at most MAX_BODY_BYTES: a bigger one gets 413, anything else
(invalid JSON, an array, a number) 422, both as {"error", "field": "body"}.
"""


import base64
import io
import json
import math
import secrets
from typing import Any, Callable

from .core.config import RunConfig, settings_json
from .core.errors import UserError
from .runs import RunManager, parse_strengths, snapshot_grid, snapshots_of, strength_grid

PREFIX = "/lora-train/v1"
MAX_BODY_BYTES = 1 << 20  # a run's settings are a few KiB; a grid request less


class BodyError(Exception):
    """A POST body the routes cannot take: too big (413) or not a JSON object (422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(status_code=self.status,
                            content={"error": self.message, "field": "body"})


async def read_json_object(request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's body as a JSON object, reading no more than `limit` bytes (a declared
    Content-Length over it is refused before reading; a chunked body once it passes it)."""
    too_big = BodyError(413, f"the body is larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_big
        except ValueError:
            raise BodyError(422, "Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise BodyError(422, "the body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BodyError(422, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BodyError(422, f"the body must be a JSON object, not {_json_kind(body)}")
    return body


class ApiError(Exception):
    """A refusal in the extension's error shape, {"error", "field"} (with FastAPI's "detail"
    too), for what FastAPI would answer as {"detail"}: an unknown run (404), credentials (401).
    Its handler is added for this class alone, so the WebUI's other routes answer as before."""

    def __init__(self, status: int, message: str, field: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(status_code=self.status, headers=self.headers,
                            content={"error": self.message, "field": self.field,
                                     "detail": self.message})


async def _api_error_response(request, exc: ApiError):
    return exc.response()


# what a generation request may ask for (the WebUI's own txt2img limits)
STEPS_RANGE = (1, 150)
SIZE_RANGE = (64, 2048)
CFG_RANGE = (0.0, 30.0)
SEED_RANGE = (0, 2**32 - 1)


def whole_number(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    """body[key] as a whole number in low..high (default when absent); UserError naming key."""
    value = body.get(key, default)
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    elif isinstance(value, str):
        try:
            value, ok = int(value.strip()), True
        except ValueError:
            ok = False
    if not ok or not low <= value <= high:
        raise UserError(key, f"{value!r} is not valid; give a whole number in {low}..{high}")
    return value


def real_number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    """body[key] as a finite number in low..high (default when absent); UserError naming key."""
    value = body.get(key, default)
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number) or not low <= number <= high:
        raise UserError(key, f"{value!r} is not valid; give a number in {low:g}..{high:g}")
    return number


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def check_credentials(credentials: dict[str, str], username: str | None, password: str | None) -> bool:
    """Constant-time comparison against every allowed user."""
    if username is None or password is None or username not in credentials:
        return False
    return secrets.compare_digest(credentials[username].encode(), password.encode())


def parse_api_auth(text: str | None) -> dict[str, str]:
    """The WebUI's --api-auth format: 'user:pass,user2:pass2'."""
    out = {}
    for item in (text or "").split(","):
        if ":" in item:
            user, password = item.split(":", 1)
            out[user.strip()] = password
    return out


def add_routes(app, host, manager: RunManager, credentials: dict[str, str] | None = None,
               exclusive: Callable | None = None) -> None:
    from fastapi import Depends, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from starlette.concurrency import run_in_threadpool

    basic = HTTPBasic(auto_error=False)
    app.add_exception_handler(ApiError, _api_error_response)

    def auth(creds: HTTPBasicCredentials | None = Depends(basic)):
        if not credentials:
            return
        if creds is None or not check_credentials(credentials, creds.username, creds.password):
            raise ApiError(401, "incorrect username or password (the WebUI's --api-auth)",
                           "auth", headers={"WWW-Authenticate": "Basic"})

    def user_error(e: UserError) -> JSONResponse:
        """422 naming the (first) field; `problems` lists every problem found at once."""
        problems = [p.to_json() for p in getattr(e, "problems", [e])]
        return JSONResponse(status_code=422, content={"error": str(e), "field": e.field,
                                                      "problems": problems})

    deps = [Depends(auth)]

    @app.get(PREFIX + "/model", dependencies=deps)
    def model():
        info = host.model_info()
        return {"name": info.name, "arch": info.arch, "prediction": info.prediction,
                "hash": info.hash, "problem": info.problem}

    @app.get(PREFIX + "/settings", dependencies=deps)
    def settings():
        """The settings table: what POST /runs accepts, with ranges, defaults and help."""
        return {"settings": settings_json()}

    def post_json(path: str):
        """Register `work(body=..., **path parameters)` as POST PREFIX+path behind an async
        handler that reads the body within the limits (413 / 422 otherwise), then runs the work
        in a worker thread (it may wait for the GPU lock or scan a dataset)."""
        def register(work: Callable[..., Any]):
            async def handler(request: Request):
                try:
                    body = await read_json_object(request)
                except BodyError as e:
                    return e.response()
                return await run_in_threadpool(lambda: work(body=body, **request.path_params))
            handler.__name__ = work.__name__
            handler.__doc__ = work.__doc__
            app.post(PREFIX + path, dependencies=deps)(handler)
            return work
        return register

    @post_json("/runs")
    def start_run(body: dict[str, Any]):
        try:
            cfg = RunConfig.from_dict(body.get("config", body))
            record = manager.enqueue(cfg, confine=True)  # writes only in the host's folders
        except UserError as e:
            return user_error(e)
        return {"id": record.id, "state": record.state,
                "position": manager.position(record.id), "memory": record.memory_estimate}

    @post_json("/estimate")
    def memory_estimate(body: dict[str, Any]):
        """The run's memory estimate before it starts (the same check as POST /runs, nothing
        queued): peak, parts, the device's free memory, and the options that make it fit."""
        try:
            cfg = manager.prepare_config(RunConfig.from_dict(body.get("config", body)))
        except UserError as e:
            return user_error(e)
        est = manager.last_estimate
        return {"memory": est.to_dict() if est is not None else None,
                "warnings": list(manager.last_warnings)}

    @app.get(PREFIX + "/queue", dependencies=deps)
    def queue():
        """The queued runs in the order they will run (the running one is not in it)."""
        return {"queue": [dict(r.to_json(), position=i + 1)
                          for i, r in enumerate(manager.queued())]}

    @app.get(PREFIX + "/runs", dependencies=deps)
    def list_runs():
        return {"runs": [r.to_json() for r in manager.list()]}

    def known_run(run_id: str):
        try:
            return manager.get(run_id)
        except KeyError:
            raise ApiError(404, f"no run {run_id}; GET {PREFIX}/runs lists them",
                           "run_id") from None

    @app.get(PREFIX + "/runs/{run_id}", dependencies=deps)
    def run_status(run_id: str):
        return known_run(run_id).to_json()

    @app.post(PREFIX + "/runs/{run_id}/stop", dependencies=deps)
    def stop_run(run_id: str):
        return manager.stop(known_run(run_id).id).to_json()

    @app.post(PREFIX + "/runs/{run_id}/pause", dependencies=deps)
    def pause_run(run_id: str):
        """Pause at the next step: NAME-stepN is written and hot-loaded, the model free for
        txt2img and /test until /resume."""
        try:
            return manager.pause(known_run(run_id).id).to_json()
        except UserError as e:
            return JSONResponse(status_code=409, content={"error": str(e), "field": "run_id"})

    @app.post(PREFIX + "/runs/{run_id}/resume", dependencies=deps)
    def resume_run(run_id: str):
        return manager.resume(known_run(run_id).id).to_json()

    @app.post(PREFIX + "/runs/{run_id}/cancel", dependencies=deps)
    def cancel_run(run_id: str):
        """A queued run leaves the queue; a running one stops (its state is saved)."""
        return manager.cancel(known_run(run_id).id).to_json()

    @post_json("/runs/{run_id}/move")
    def move_run(run_id: str, body: dict[str, Any]):
        """{"by": -1} moves a queued run one place earlier."""
        known_run(run_id)
        try:
            by = int(body.get("by", 0))
            queue = manager.move(run_id, by)
        except (TypeError, ValueError):
            return JSONResponse(status_code=422, content={"error": "by: give a whole number",
                                                          "field": "by"})
        except KeyError:
            return JSONResponse(status_code=409, content={"error": f"run {run_id} is not queued",
                                                          "field": "run_id"})
        return {"queue": [r.id for r in queue]}

    @app.get(PREFIX + "/loras", dependencies=deps)
    def loras():
        return {"loras": host.list_loras()}

    @app.get(PREFIX + "/runs/{run_id}/snapshots", dependencies=deps)
    def run_snapshots(run_id: str):
        record = known_run(run_id)
        return {"snapshots": snapshots_of(host, record.config.save.output_name)}

    def generation(body: dict[str, Any]) -> dict[str, Any]:
        """seed, steps, size (and cfg_scale) of a generation request, checked before the lock is
        waited for: UserError naming the field."""
        size = whole_number(body, "size", host.model_info().default_resolution, *SIZE_RANGE)
        if size % 8:
            raise UserError("size", f"{size} is not a multiple of 8; give one in "
                                    f"{SIZE_RANGE[0]}..{SIZE_RANGE[1]}")
        return {"seed": whole_number(body, "seed", 1234, *SEED_RANGE),
                "steps": whole_number(body, "steps", 20, *STEPS_RANGE), "size": size,
                "cfg_scale": real_number(body, "cfg_scale", 7.0, *CFG_RANGE)}

    def grid_call(job: str, make, missing_field: str):
        """Make a grid under the host's lock: (grid image, extra JSON) -> the JSON answer with
        the PNG as base64; a user error as 422, a missing file as 404 naming `missing_field`."""
        try:
            with (exclusive or host.exclusive)(job):
                grid, extra = make()
        except UserError as e:
            return user_error(e)
        except (TypeError, ValueError) as e:
            return JSONResponse(status_code=422, content={"error": str(e), "field": "body"})
        except FileNotFoundError as e:
            return JSONResponse(status_code=404, content={"error": str(e),
                                                          "field": missing_field})
        return {"grid_png_base64": png64(grid), **extra}

    def png64(image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")

    @post_json("/snapshot-grid")
    def best_snapshot_grid(body: dict[str, Any]):
        """Snapshots (rows) x strengths (columns) through the host's txt2img; body: snapshots
        (names) or run (id), strengths "0.5, 1", prompt, negative_prompt, seed, steps, size."""
        try:
            gen = generation(body)
            strengths = parse_strengths(str(body.get("strengths", "0.5, 0.75, 1")), "strengths")
            names = body.get("snapshots")
            if names is not None and (not isinstance(names, list)
                                      or not all(isinstance(n, str) for n in names)):
                raise UserError("snapshots", "give a list of snapshot names, e.g. "
                                             '["my_lora-step00000100", "my_lora"]')
        except UserError as e:
            return user_error(e)

        def make():
            chosen = names
            if not chosen and body.get("run"):
                chosen = snapshots_of(host, known_run(str(body["run"])).config.save.output_name)
            grid, tags = snapshot_grid(
                host, list(chosen or []), strengths, str(body.get("prompt", "")),
                str(body.get("negative_prompt", "")), gen["seed"], steps=gen["steps"],
                width=gen["size"], height=gen["size"])
            return grid, {"tags": tags, "path": host.save_grid(grid, str(body.get("prompt", "")))}
        return grid_call("lora-train snapshot grid", make, "snapshots")

    # -- merging into the loaded model ---------------------------------------------------------
    def merge_call(fn):
        try:
            with (exclusive or host.exclusive)("lora-train merge"):
                return fn()
        except UserError as e:
            return user_error(e)
        except (TypeError, ValueError) as e:
            return JSONResponse(status_code=422, content={"error": str(e), "field": "body"})

    @app.get(PREFIX + "/merge", dependencies=deps)
    def merge_state():
        return manager.merger.state.to_json()

    @post_json("/merge")
    def merge_in_memory(body: dict[str, Any]):
        """{"loras": "NAME:0.8\nOTHER:1:0.5:1 blocks=IN:0,OUT:1"} (or a list of such lines):
        merged into the loaded model; what was merged before is reverted first."""
        from .merging import parse_merge_lines

        loras = body.get("loras", "")
        text = "\n".join(loras) if isinstance(loras, list) else str(loras)
        return merge_call(lambda: manager.merger.merge(
            parse_merge_lines(text, host.find_lora)).to_json())

    @app.post(PREFIX + "/merge/revert", dependencies=deps)
    def merge_revert():
        return merge_call(lambda: {"reverted": manager.merger.revert(),
                                   **manager.merger.state.to_json()})

    @post_json("/merge/compare")
    def merge_compare(body: dict[str, Any]):
        """A (original weights) and B (merged) at the same prompt and seed, PNG as base64."""
        try:
            gen = generation(body)
        except UserError as e:
            return user_error(e)

        def run():
            a, b = manager.merger.compare(
                str(body.get("prompt", "")), str(body.get("negative_prompt", "")),
                gen["seed"], gen["steps"], gen["size"])
            return {"a_png_base64": png64(a), "b_png_base64": png64(b)}
        return merge_call(run)

    @post_json("/merge/save")
    def merge_save(body: dict[str, Any]):
        """{"name": "my_merged", "precision": "fp16", "vae": ""}: a checkpoint in the WebUI's
        checkpoint folder, listed at once."""
        return merge_call(lambda: {"path": manager.merger.save_checkpoint(
            str(body.get("name", "")), str(body.get("precision", "fp16")),
            str(body.get("vae", "")))})

    # -- merge / extract / resize on files: queued as runs ------------------------------------
    def file_job_route(kind: str):
        def work(body: dict[str, Any]):
            from .file_jobs import build_job

            try:
                job = build_job(kind, host, body)
            except UserError as e:
                return user_error(e)
            record = manager.enqueue_job(job)
            return {"id": record.id, "kind": kind, "state": record.state,
                    "position": manager.position(record.id), "out": job.out}
        work.__name__ = "file_job_" + kind.replace("-", "_")
        work.__doc__ = (f"Queue a {kind} job (file_jobs.py); 422 with every problem of the "
                        "body; watch it with GET /runs/{id}")
        post_json("/" + kind)(work)

    from .file_jobs import JOB_KINDS

    for kind in JOB_KINDS:
        file_job_route(kind)

    @post_json("/test")
    def test(body: dict[str, Any]):
        try:
            gen = generation(body)
            te = parse_strengths(str(body.get("te_strengths", "0, 1")), "te_strengths")
            unet = parse_strengths(str(body.get("unet_strengths", "0, 1")), "unet_strengths")
        except UserError as e:
            return user_error(e)

        def make():
            grid, images, prompts = strength_grid(
                host, str(body.get("lora", "")), str(body.get("prompt", "")),
                str(body.get("negative_prompt", "")), gen["seed"], te, unet,
                steps=gen["steps"], width=gen["size"], height=gen["size"],
                cfg_scale=gen["cfg_scale"])
            path = host.save_grid(grid, str(body.get("prompt", "")))
            return grid, {"prompts": prompts, "path": path, "rows": te, "columns": unet}
        return grid_call("lora-train test grid", make, "lora")
