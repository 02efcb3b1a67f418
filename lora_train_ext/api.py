"""HTTP API under /lora-train/v1/: the same operations as the tab, for scripts.

Routes: GET /settings (the settings table); POST /runs (a RunConfig as JSON, partial allowed)
-> {id}, or 422 with every problem found by the preflight check; GET /runs; GET /runs/{id};
POST /runs/{id}/stop; GET /model; GET /loras; POST /test (a TE x UNet grid, PNG as base64).
When the WebUI has `--api-auth`, every route needs the same HTTP basic credentials.
The routes exist only when asked for: the WebUI started with `--api` (or `--nowebui`), or the
setting "Train LoRA > HTTP API" on (host/webui.py `api_requested`).

POST bodies are JSON objects of at most MAX_BODY_BYTES: a bigger one gets 413, anything else
(invalid JSON, an array, a number) 422, both as {"error", "field": "body"}.
"""


import base64
import io
import json
import secrets
from typing import Any, Callable

from .core.config import RunConfig, settings_json
from .core.errors import UserError
from .runs import RunManager, parse_strengths, strength_grid

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
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from starlette.concurrency import run_in_threadpool

    basic = HTTPBasic(auto_error=False)

    def auth(creds: HTTPBasicCredentials | None = Depends(basic)):
        if not credentials:
            return
        if creds is None or not check_credentials(credentials, creds.username, creds.password):
            raise HTTPException(status_code=401, detail="incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

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

    def json_route(work: Callable[[dict[str, Any]], Any]):
        """An async handler that reads the body within the limits, then does `work(body)` in a
        worker thread (it may wait for the GPU lock or scan a dataset)."""
        async def handler(request: Request):
            try:
                body = await read_json_object(request)
            except BodyError as e:
                return e.response()
            return await run_in_threadpool(work, body)
        handler.__name__ = work.__name__
        handler.__doc__ = work.__doc__
        return handler

    def start_run(body: dict[str, Any]):
        try:
            cfg = RunConfig.from_dict(body.get("config", body))
            record = manager.start_background(cfg)
        except UserError as e:
            return user_error(e)
        return {"id": record.id, "state": record.state}

    app.post(PREFIX + "/runs", dependencies=deps)(json_route(start_run))

    @app.get(PREFIX + "/runs", dependencies=deps)
    def list_runs():
        return {"runs": [r.to_json() for r in manager.list()]}

    def known_run(run_id: str):
        try:
            return manager.get(run_id)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no run {run_id}") from None

    @app.get(PREFIX + "/runs/{run_id}", dependencies=deps)
    def run_status(run_id: str):
        return known_run(run_id).to_json()

    @app.post(PREFIX + "/runs/{run_id}/stop", dependencies=deps)
    def stop_run(run_id: str):
        return manager.stop(known_run(run_id).id).to_json()

    @app.get(PREFIX + "/loras", dependencies=deps)
    def loras():
        return {"loras": host.list_loras()}

    def test(body: dict[str, Any]):
        try:
            te = parse_strengths(str(body.get("te_strengths", "0, 1")), "te_strengths")
            unet = parse_strengths(str(body.get("unet_strengths", "0, 1")), "unet_strengths")
            size = int(body.get("size", host.model_info().default_resolution))
            if size < 64 or size % 8:
                raise UserError("size", "give a multiple of 8, at least 64")
            with (exclusive or host.exclusive)("lora-train test grid"):
                grid, images, prompts = strength_grid(
                    host, str(body.get("lora", "")), str(body.get("prompt", "")),
                    str(body.get("negative_prompt", "")), int(body.get("seed", 1234)), te, unet,
                    steps=int(body.get("steps", 20)), width=size, height=size,
                    cfg_scale=float(body.get("cfg_scale", 7.0)))
                path = host.save_grid(grid, str(body.get("prompt", "")))
        except UserError as e:
            return user_error(e)
        except (TypeError, ValueError) as e:
            return JSONResponse(status_code=422, content={"error": str(e), "field": "body"})
        except FileNotFoundError as e:
            return JSONResponse(status_code=404, content={"error": str(e), "field": "lora"})
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        return {"grid_png_base64": base64.b64encode(buf.getvalue()).decode("ascii"),
                "prompts": prompts, "path": path, "rows": te, "columns": unet}

    app.post(PREFIX + "/test", dependencies=deps)(json_route(test))
