"""`transferkit serve`: a trained run or an exported ONNX model behind an HTTP API and a page to try it.

    POST /predict   images (multipart files, or JSON {"images": [{"name", "data": base64}]}) -> rows
    GET  /health    liveness and batching counters
    GET  /model     the model card: classes, architecture, preprocessing, export parity, training metrics
    GET  /          a self-contained page to drop images and see their top-k

Images are fetched only from the request itself: the server never downloads a URL it is given (a server
that fetches URLs for its callers can be pointed at the private network behind it).

This module is imported by the CLI to build its parser, so it imports neither torch nor the web stack
(Starlette and uvicorn come with the optional `serve` extra and are imported when a server starts).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Callable

from ..errors import UsageError

log = logging.getLogger(__name__)

ENGINES = ("onnx", "torch")
PRECISIONS = ("auto", "fp32", "bf16")  # engine/precision.py, which imports torch
# On SIGTERM, how long requests in flight may take before they are cut off. Without a bound a client that
# stops sending in the middle of its body holds the shutdown forever (until the process manager's SIGKILL);
# a request whose body has arrived takes a forward pass. Under `docker stop`'s 10 s before its SIGKILL.
GRACEFUL_SHUTDOWN_S = 8


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the announced URL names it)
    engine: str | None = None  # None: onnx for an ONNX model (by content), torch for a run or checkpoint
    # Images in one forward pass. On a CPU, batches past a few images stop paying: the activations
    # leave the cache. With a lane per core the bare engine is fastest at 1-2 images, and 16 clients were
    # served as fast at 2 as at 4 and faster than at 1 or 8 (2-core EPYC; benchmarks/serve.py --sweep,
    # RESULTS.md). Raise it on a GPU.
    max_batch: int = 2
    max_wait_ms: float = 5.0  # how long an open batch waits for more images
    max_files: int = 16  # images in one request
    max_image_bytes: int = 10 * 2**20
    max_request_bytes: int = 32 * 2**20  # the whole body, multipart or JSON (base64 adds a third)
    max_image_pixels: int = 40_000_000  # width × height, read from the header before decoding
    threads: int | None = None  # ONNX Runtime intra-op threads per lane (None: 1, or all cores with --lanes 1)
    lanes: int | None = None  # forward passes run side by side (None: ONNX engine, one per `threads` cores)
    precision: str = "auto"  # torch engine: as `transferkit predict --precision` (engine/precision.py)
    # A line on stdout per request. Off by default, as gunicorn has it (a proxy in front usually keeps that
    # log): on a 2-core CPU the logging is a fifth of the event loop's CPU per request, which the forward
    # passes need (benchmarks/serve.py). Refused requests (4xx) and failures are logged either way.
    access_log: bool = False

    def validate(self) -> "ServeOptions":
        from PIL import Image

        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.engine not in (None, *ENGINES):
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        for name in ("max_batch", "max_files", "max_image_bytes", "max_request_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be ≥ 1, not {getattr(self, name)}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise UsageError(f"--max-wait-ms must be between 0 and 10000, not {self.max_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, not {self.port}")
        for name in ("threads", "lanes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name} must be ≥ 1, not {getattr(self, name)}")
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if pillow_limit and self.max_image_pixels > pillow_limit:
            raise UsageError(f"--max-image-pixels must be at most Pillow's own guard of {pillow_limit}")
        return self


def run_server(model: str, options: ServeOptions, announce: Callable[[str], None] = log.info) -> None:
    """Load the model, listen, and serve until SIGINT/SIGTERM (uvicorn finishes requests in flight)."""
    options.validate()
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise UsageError(f"`transferkit serve` needs the serve extra ({exc.name} is not installed): "
                         "pip install 'transferkit[serve]'") from None
    from .model import load_served_model

    served = load_served_model(model, options.engine, options.threads, options.precision, options.lanes)
    sock = listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(served, options), log_level="info", server_header=False,
                                           access_log=options.access_log,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {served.card['architecture']} ({len(served.card['classes'])} classes, {served.engine} "
             f"engine) from {served.path} at http://{shown}:{port}/")
    server.run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, opened before the server starts so that a busy port is one clear error
    (and clients that connect at once queue in the backlog instead of being refused)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
