"""The Starlette application: routes, the batcher's lifetime, and errors as one-line JSON."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from ..inference import read_batch
from ..threads import named_pool
from . import ServeOptions
from .batching import DynamicBatcher, InferenceFailed
from .model import ServedModel
from .uploads import RequestError, Upload, read_uploads

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 3  # as `transferkit predict`


def create_app(served: ServedModel, options: ServeOptions) -> Starlette:
    batcher = DynamicBatcher(served.classifier.table_of, options.max_batch, options.max_wait_ms / 1000, served.lanes)
    # Decoding gets half the cores: more decoding threads than that only preempt the inference threads
    # (a parallel forward pass waits for its slowest thread) without making images arrive sooner.
    decoder = named_pool(max(1, (os.cpu_count() or 2) // 2), "transferkit-decode")
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        decoder.shutdown(wait=True)

    async def predict(request: Request) -> JSONResponse:
        top_k = _top_k(request)
        uploads = await read_uploads(request, options, decoder)
        rows = await classify(served, batcher, decoder, uploads, top_k)
        if all(row["error"] for row in rows):
            first = rows[0]["error"]
            more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
            return JSONResponse({"error": f"no image could be read: {first}{more}", "predictions": rows}, 422)
        return JSONResponse({"predictions": rows})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "engine": served.engine, "queued": batcher.queued, **batcher.stats})

    async def model(request: Request) -> JSONResponse:
        limits = {k: v for k, v in dataclasses.asdict(options).items() if k.startswith("max_")}
        return JSONResponse({**served.card, "limits": limits})

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    routes = [Route("/", index), Route("/health", health), Route("/model", model),
              Route("/predict", predict, methods=["POST"])]
    handlers = {RequestError: _refused, HTTPException: _http_error, ClientDisconnect: _gone,
                InferenceFailed: _failed_batch, Exception: _bug}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


async def classify(served: ServedModel, batcher: DynamicBatcher, decoder: ThreadPoolExecutor,
                   uploads: list[Upload], top_k: int) -> list[dict]:
    """The rows `transferkit predict --format json` gives, named by upload: decoded in the decoding
    threads, then one forward pass shared with other requests."""
    clf = served.classifier

    def preprocess(upload: Upload):
        return clf.preprocess_bytes(upload.data, upload.name)

    loop = asyncio.get_running_loop()
    batch = await loop.run_in_executor(decoder, read_batch, uploads, preprocess)
    table = np.full((len(uploads), clf.table_width), np.nan, dtype=np.float32)
    if batch.inputs:
        table[batch.rows] = await batcher.submit(batch.inputs)
    return clf.rows_of_table([u.name for u in uploads], table, batch.errors, top_k)


def _top_k(request: Request) -> int:
    text = request.query_params.get("top_k", str(DEFAULT_TOP_K))
    digits = text.lstrip("0")
    if not (text.isascii() and text.isdigit()) or not digits:  # "²".isdigit(), but int("²") fails
        raise RequestError(400, f"top_k must be a whole number ≥ 1, not {text!r}")
    # More than there are classes: all of them, as `predict --top-k`. Past 9 digits every value means
    # that, and int() refuses a string of over 4300 digits (a ValueError, which was a 500).
    return int(digits) if len(digits) <= 9 else 10**9


async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    # One line per refused request, also without --access-log: what an operator looks for in the log.
    log.info("refused %s %s: %d %s", request.method, request.url.path, exc.status, exc.reason)
    return JSONResponse({"error": exc.reason}, exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code,
                        headers=exc.headers)


async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
    # The client closed the connection before its body was all sent: nothing to answer and nothing wrong
    # here, so one line (not a traceback and a 500). The answer goes nowhere; 499 as nginx logs it.
    log.info("client went away during %s %s before its body was read", request.method, request.url.path)
    return JSONResponse({"error": "client closed the connection before the body was read"}, 499)


async def _failed_batch(request: Request, exc: InferenceFailed) -> JSONResponse:
    # Its traceback is in the log once, from the batcher, however many requests shared the batch.
    log.error("%s %s failed: %s", request.method, request.url.path, exc)
    return _internal_error(exc.__cause__ or exc)


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    # Starlette raises the error on after this answer, and the ASGI server logs its traceback: one line here.
    log.error("%s %s failed: %s: %s (traceback follows)", request.method, request.url.path, type(exc).__name__, exc)
    return _internal_error(exc)


def _internal_error(exc: BaseException) -> JSONResponse:
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, 500)
