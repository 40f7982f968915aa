"""The images of a POST /predict request, read within the server's limits.

Three ways in: multipart/form-data (every file part, in order), JSON
{"images": [{"name": "a.jpg", "data": "<base64>"}, ...]}, or one image as the raw body (Content-Type image/* or
application/octet-stream: `curl --data-binary @cat.jpg`, TorchServe's way, with nothing to encode or parse).
A request the server will not take raises `RequestError` with its HTTP status and a one-line reason; the body
is never read past the limit, and each image's size is read from its header before anything is decoded
(decompression bombs).
An image that is present but unreadable is not a request error: its row says why (as `predict` does).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import warnings
from concurrent.futures import Executor
from typing import NamedTuple

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from . import ServeOptions

# What a client's name for an image must not carry into a one-line error or the log: control characters
# (a "\n" in ?name= forged a log line) and lone surrogates (JSON allows "\ud800", which has no UTF-8, so the
# answer echoing it was a 500; json.loads joins the valid pairs).
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
JSON_SHAPE = '{"images": [{"name": "a.jpg", "data": "<base64>"}, ...]}'


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Upload(NamedTuple):
    name: str
    data: bytes


async def read_uploads(request: Request, options: ServeOptions, executor: Executor | None = None) -> list[Upload]:
    """The request's images, refused (RequestError) past a limit; the headers are read in `executor`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = capped(request, options.max_request_bytes)
    if kind == "multipart/form-data":
        uploads = await _multipart(body, options)
    elif kind == "application/json":
        uploads = _json(await body.body(), options)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        data = await body.body()
        uploads = [Upload(printable(request.query_params.get("name") or "image-0"), data)] if data else []
    else:
        raise RequestError(415, f"Content-Type must be multipart/form-data (files), application/json "
                                f"({JSON_SHAPE}) or image/* (one image as the body), not {kind or 'none'}")
    if not uploads:
        raise RequestError(400, f"no images in the request: send multipart files, JSON {JSON_SHAPE} or one "
                                "image as the body")
    # In a thread, not on the event loop: Pillow walks some headers byte by byte (a JPEG of 10 MB of
    # empty markers before its size took 4.5 s), and the loop must keep answering everyone else meanwhile.
    await asyncio.get_running_loop().run_in_executor(executor, _refuse_oversized, uploads, options)
    return uploads


def capped(request: Request, limit: int) -> Request:
    """The request, but reading more than `limit` body bytes raises 413 (Content-Length is not trusted:
    a chunked body has none, and a client may lie)."""
    too_large = RequestError(413, f"request body exceeds the limit of {limit} bytes (--max-request-bytes)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    seen = 0

    async def receive():
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise too_large
        return message

    return Request(request.scope, receive)


async def _multipart(request: Request, options: ServeOptions) -> list[Upload]:
    try:
        form = await request.form(max_files=options.max_files, max_fields=options.max_files)
    except HTTPException as exc:  # Starlette's multipart errors: malformed body, too many parts
        raise RequestError(400, f"cannot read the multipart body: {exc.detail}") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        return [Upload(printable(f.filename or f"image-{i}"), await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


def _json(body: bytes, options: ServeOptions) -> list[Upload]:
    try:
        payload = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and bad UTF-8 alike
        raise RequestError(400, f"malformed JSON: {exc}") from None
    except RecursionError:  # [[[[... nested deeper than the parser's stack
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list):
        raise RequestError(400, f"JSON must be {JSON_SHAPE}")
    if len(images) > options.max_files:
        raise RequestError(400, f"too many images: {len(images)} (at most {options.max_files} a request, "
                                "--max-files)")
    return [_json_image(i, item) for i, item in enumerate(images)]


def _json_image(i: int, item) -> Upload:
    if not isinstance(item, dict) or not isinstance(item.get("data"), str):
        raise RequestError(400, f'images[{i}] must be an object with a base64 "data" string ({JSON_SHAPE})')
    try:
        data = base64.b64decode(item["data"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"images[{i}].data is not valid base64") from None
    name = item.get("name")
    return Upload(printable(name) if isinstance(name, str) and name else f"image-{i}", data)


def printable(text: str) -> str:
    """`text` with UNPRINTABLE characters as U+FFFD (as undecodable bytes in ?name= already are)."""
    return UNPRINTABLE.sub("\ufffd", text)


def _refuse_oversized(uploads: list[Upload], options: ServeOptions) -> None:
    for upload in uploads:
        if len(upload.data) > options.max_image_bytes:
            raise RequestError(413, f"{upload.name}: {len(upload.data)} bytes exceeds the limit of "
                                    f"{options.max_image_bytes} bytes per image (--max-image-bytes)")
        try:
            size = header_size(upload.data)
        except Image.DecompressionBombError as exc:  # over Pillow's own guard, hence over ours too
            raise RequestError(413, f"{upload.name}: {exc}") from None
        if size and size[0] * size[1] > options.max_image_pixels:
            raise RequestError(413, f"{upload.name}: {size[0]}×{size[1]} pixels exceeds the limit of "
                                    f"{options.max_image_pixels} pixels per image (--max-image-pixels)")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header, without decoding pixels; None if Pillow cannot tell
    (the decoder then reports why in the image's row). Pillow's DecompressionBombError passes through."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except Image.DecompressionBombError:
        raise
    except Exception:  # noqa: BLE001 - not an image, or a header Pillow chokes on
        return None
