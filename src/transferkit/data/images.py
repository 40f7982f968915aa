"""Decode any image file Pillow can read into 8-bit RGB, or say clearly why not.

Every image that reaches a model goes through `load_rgb`, so the scanner (which calls it
once per file before training) and the training loader agree on what is usable.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import stat
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.errors import DataError
from transferkit.preprocessing import SIXTEEN_BIT_WHITE

logger = logging.getLogger(__name__)


def _pillow_reads_avif() -> bool:
    """Whether this Pillow has its AVIF decoder (recent wheels ship it), told without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec("PIL._avif") is not None
    except (ImportError, ValueError):
        return False


# .jfif is what browsers on Windows name a downloaded JPEG, .pbm/.pnm are Netpbm's siblings of .ppm/.pgm, and .avif
# is a phone's and the web's photo format where this Pillow reads it: left out, a folder of them read as "non-image
# files" in training and predict and evaluate walked past them, while the same file named on the command line was
# predicted.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "jfif", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pbm",
                              "pnm"} | ({"avif"} if _pillow_reads_avif() else set()))

# An iPhone's photos: Pillow decodes them only with a plugin (pillow-heif) that transferkit does not load.
HEIF_EXTENSIONS = frozenset({"heic", "heif"})
HEIF_WORDS = "a HEIC/HEIF photo, which Pillow here cannot decode; convert it to JPEG or PNG"


def has_image_extension(name: str) -> bool:
    """Whether a file name ends in one of IMAGE_EXTENSIONS (any case)."""
    return os.path.splitext(name)[1].lower().lstrip(".") in IMAGE_EXTENSIONS


_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# A JPEG can be decoded at 1/2, 1/4 or 1/8 scale inside its inverse DCT, for a fraction of the work (a 12-MP
# camera JPEG: ~180 → ~38 ms here, benchmarks/large_photos.py). A caller that shrinks the image anyway passes
# `shorter_side`, the size it resizes the shorter side to; the decoder keeps at least DRAFT_MARGIN times that,
# so the caller's own antialiased resize still makes the last step. The resized pixels then differ from those
# of a full decode by a fraction of a grey level (a 4032×3024 photo resized to 256: 0.2 on average, 3 at most).
DRAFT_MARGIN = 2
_DCT_FORMATS = {"JPEG", "MPO"}  # MPO: a phone camera's JPEG with extra frames (Pillow reads the first)


class ImageDecodeError(DataError):
    """One file cannot be used as an image; `kind` names the problem for the data report."""

    def __init__(self, path, kind: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.kind = kind
        self.reason = reason


def load_rgb(path, keep_gray: bool = False, shorter_side: int | None = None,
             sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> Image.Image:
    """Open `path`, apply its EXIF orientation and return a fully decoded 8-bit RGB image.

    `keep_gray`: a plain 8-bit grey image (mode L) comes back as it is, for a caller that resizes one
    band and broadcasts it to three (Pillow resamples every band alike, so the numbers are those of
    its RGB conversion, for a third of the work).

    `shorter_side`: the caller resizes the shorter side down to this; a large JPEG may then come back
    smaller, still at least DRAFT_MARGIN times that (see DRAFT_MARGIN).

    `sixteen_bit_white`: the value that is white in a 16-bit grey image (4095 for a 12-bit camera's frames;
    the data set's, see data/folders sixteen_bit_white); larger values read as white.

    Raises ImageDecodeError with `kind` one of: empty_file, unreadable, not_an_image,
    decompression_bomb, corrupt.
    """
    return read_rgb(path, keep_gray, shorter_side, sixteen_bit_white)[0]


def read_rgb(path, keep_gray: bool = False, shorter_side: int | None = None,
             sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> tuple[Image.Image, tuple[int, int]]:
    """`load_rgb`, and the width and height of the picture as stored (EXIF-oriented), which a JPEG decoded
    at a reduced scale no longer has."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            # Opening a FIFO or device would block or read forever.
            raise ImageDecodeError(path, "unreadable", "not a regular file")
        if info.st_size == 0:
            raise ImageDecodeError(path, "empty_file", "empty file (0 bytes)")
        with open(path, "rb") as fp, quiet_pillow():
            # Orient and convert while the file is open: some plugins read EXIF lazily.
            img, size = _decode(fp, path, shorter_side)
            decoded = img.size
            img = to_rgb(img, path, keep_gray, sixteen_bit_white)
            turned = img.size != decoded  # an EXIF orientation that swaps width and height
            return img, (size[::-1] if turned else size)
    except PermissionError as exc:
        raise ImageDecodeError(path, "unreadable", f"cannot read file: {exc.strerror}") from None
    except FileNotFoundError:
        raise ImageDecodeError(path, "unreadable", "file not found (deleted or broken symlink)") from None
    except OSError as exc:  # ELOOP, EIO, a FIFO that vanished, ...
        raise ImageDecodeError(path, "unreadable", f"cannot read file: {exc.strerror or exc}") from None


RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# An image enlarged to a longer side over this many times the resize size: center_crop resamples the crop's square
# alone (see there).
MAX_CROP_ASPECT = 64


def center_crop(image: Image.Image, resize_size: int, input_size: int, interpolation: str) -> Image.Image:
    """The eval crop's geometry on a PIL image: shorter side to `resize_size` (the longer side as torchvision rounds
    it), then the centre `input_size` square; torchvision's Resize + CenterCrop pixel for pixel wherever
    resize_size ≥ input_size (tests/test_eval_crop.py), but for a strip enlarged past MAX_CROP_ASPECT. A square
    image is resized and cut in one Pillow call that computes only the pixels the crop keeps (a 300 px ELPV cell:
    0.39 ms instead of 0.52, benchmarks/eval_crop.py)."""
    box = _square_crop_box(image, resize_size, input_size)
    if box is not None:
        return image.resize((input_size, input_size), RESAMPLE[interpolation], box=box)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize_size * long / short)  # torchvision's rounding of the longer side
    size = (resize_size, new_long) if w <= h else (new_long, resize_size)
    left, top = int(round((size[0] - input_size) / 2.0)), int(round((size[1] - input_size) / 2.0))
    if short < resize_size and new_long > MAX_CROP_ASPECT * resize_size and resize_size >= input_size:
        # A strip (8×60,000 px, a 4 KB PNG) enlarged whole was 256×1,920,000 px: 2.2 GB and 4.6 s to predict it,
        # and 8×1,000,000 ran out of memory. Only the square the crop keeps is resampled, from where it lies in the
        # file's pixels: the same kernels at the same centres; Pillow may run its two passes in the other order,
        # so a pixel can round otherwise (a grey level, more at sharp edges). Every path crops PIL images
        # here (the decoded store hands out an image under the resize size as one), so they agree.
        sx, sy = w / size[0], h / size[1]
        return image.resize((input_size, input_size), RESAMPLE[interpolation],
                            box=(left * sx, top * sy, (left + input_size) * sx, (top + input_size) * sy))
    if size != image.size:
        image = image.resize(size, RESAMPLE[interpolation])
    return image.crop((left, top, left + input_size, top + input_size))


def _square_crop_box(image: Image.Image, resize_size: int, input_size: int) -> tuple[float, ...] | None:
    """The source square the crop covers, where one Pillow resize of it gives the very pixels of resize-then-cut;
    None elsewhere. Pillow takes the box as float32 and places each output pixel from the box's ends, so the ends
    must be exact in float32 (for a square they are: side/256 has few bits); and it may run its two passes in
    either order, which a square box on a square image leaves as the full resize runs them."""
    if image.width != image.height or image.width == resize_size or resize_size < input_size:
        return None
    start = int(round((resize_size - input_size) / 2.0))  # torchvision's CenterCrop offset
    scale = image.width / resize_size
    low, high = start * scale, (start + input_size) * scale
    if float(np.float32(low)) != low or float(np.float32(high)) != high or (high - low) / input_size != scale:
        return None
    return (low, low, high, high)


def read_for_model(item, shorter_side: int, sixteen_bit_white: int = SIXTEEN_BIT_WHITE,
                   name: str = "<upload>") -> Image.Image:
    """A file path, an image already in memory (a PIL image: the Python API) or an image file's bytes (an upload
    called `name`), as a run reads new images to predict them (8-bit grey kept as one band; its preprocessing's
    shorter side and 16-bit white)."""
    if isinstance(item, Image.Image):
        with quiet_pillow():
            return to_rgb(item, keep_gray=True, sixteen_bit_white=sixteen_bit_white)
    if isinstance(item, (bytes, bytearray)):
        return load_rgb_bytes(item, name, keep_gray=True, shorter_side=shorter_side,
                              sixteen_bit_white=sixteen_bit_white)
    return load_rgb(item, keep_gray=True, shorter_side=shorter_side, sixteen_bit_white=sixteen_bit_white)


def load_thumbnail(path, size: int, sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> Image.Image:
    """The picture as a viewer shows it (EXIF orientation applied) fitted within size × size, for reports and
    figures; a large JPEG is decoded at a reduced scale. Raises as `load_rgb`."""
    img = load_rgb(path, shorter_side=size, sixteen_bit_white=sixteen_bit_white)
    img.thumbnail((size, size))
    return img


def load_rgb_bytes(data: bytes, name: str, keep_gray: bool = False, shorter_side: int | None = None,
                   sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> Image.Image:
    """`load_rgb` for an image held in memory (an upload), with the same checks and error kinds."""
    if not data:
        raise ImageDecodeError(name, "empty_file", "empty file (0 bytes)")
    with io.BytesIO(data) as fp, quiet_pillow():
        return to_rgb(_decode(fp, name, shorter_side)[0], name, keep_gray, sixteen_bit_white)


def _decode(fp, path, shorter_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """The image, fully decoded (at a reduced scale where `_draft` allows), and its stored size."""
    try:
        img = Image.open(fp)
    except UnidentifiedImageError:
        if os.path.splitext(str(path))[1].lower().lstrip(".") in HEIF_EXTENSIONS:  # predict named one
            raise ImageDecodeError(path, "not_an_image", HEIF_WORDS) from None
        raise ImageDecodeError(path, "not_an_image", "not an image file (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, "decompression_bomb", _bomb_reason(exc)) from None
    except Exception as exc:  # a malformed header can raise almost anything inside a Pillow plugin
        raise ImageDecodeError(path, "corrupt", f"corrupt image header: {_reason(exc)}") from None
    _refuse_bomb(img, path)
    size = img.size
    try:
        _draft(img, shorter_side)
        # Full decode now, so truncated or damaged files fail here and not mid-training (a reduced-scale
        # decode still reads every byte of the file).
        img.load()
    except Exception as exc:  # decoder errors are OSError, SyntaxError, ValueError, zlib.error, ...
        raise ImageDecodeError(path, "corrupt", f"corrupt or truncated image: {_reason(exc)}") from None
    return img, size


@contextmanager
def quiet_pillow() -> Iterator[None]:
    """Pillow's warnings about one file stay out of the user's terminal, where they read as Python warnings with
    Pillow's source lines (`TiffImagePlugin.py:982: UserWarning: Corrupt EXIF data...`, once per file and thread):
    a damaged EXIF block or TIFF tag ("Metadata Warning") costs nothing but that metadata, and the file is used or
    refused with its own one-line reason. The pixel limit's warning (1× to 2× the limit) is refused below with the
    real size."""
    with warnings.catch_warnings():  # one per file: catch_warnings is not thread-safe, so it filters Pillow's alone
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
        yield


def _draft(img: Image.Image, shorter_side: int | None) -> None:
    """Ask a JPEG decoder for the smallest DCT scale whose shorter side stays ≥ DRAFT_MARGIN × shorter_side."""
    if not shorter_side or img.format not in _DCT_FORMATS:
        return
    width, height = img.size
    keep = DRAFT_MARGIN * shorter_side / min(width, height)
    if keep <= 0.5:  # Pillow picks the largest of 1/2, 1/4, 1/8 that leaves at least the size asked for
        img.draft(None, (math.ceil(width * keep), math.ceil(height * keep)))


def _refuse_bomb(img: Image.Image, path) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise ImageDecodeError(path, "decompression_bomb", _bomb_words(f"{width}×{height}", limit))


def _bomb_words(pixels: str, limit) -> str:
    return (f"decompression bomb: {pixels} pixels exceeds Pillow's limit of {limit} pixels (Image.MAX_IMAGE_PIXELS); "
            "downscale the image if it is genuine")


def _bomb_reason(exc: Exception) -> str:
    """Pillow's own refusal, over twice its limit, in the words of _refuse_bomb: it said "Image size (2500000000
    pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS attack.", twice the limit that the
    next file's reason names."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return _bomb_words(found.group(1), Image.MAX_IMAGE_PIXELS) if found else f"decompression bomb: {exc}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def to_rgb(img: Image.Image, path="<image>", keep_gray: bool = False,
           sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> Image.Image:
    """EXIF-orient and convert a decoded image of any mode to 8-bit RGB (8-bit grey kept: `load_rgb`)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # broken EXIF blocks should not cost the user the image
        logger.debug("ignoring unusable EXIF orientation in %s: %s", path, exc)
    try:
        return _convert(img, keep_gray, sixteen_bit_white)
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(path, "corrupt", f"cannot convert mode {img.mode} to RGB: {_reason(exc)}") from None


def _convert(img: Image.Image, keep_gray: bool = False, sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> Image.Image:
    mode = img.mode
    if mode == "RGB" or (keep_gray and mode == "L" and "transparency" not in img.info):
        return img
    if mode in SIXTEEN_BIT_MODES:
        return _gray_array_to_rgb(np.asarray(img).astype(np.float64) / (sixteen_bit_white / 255.0))
    if mode == "I":
        return _gray_array_to_rgb(_scale_int32(np.asarray(img), sixteen_bit_white))
    if mode == "F":
        return _gray_array_to_rgb(_scale_float(np.asarray(img)))
    if mode == "P":
        # Palette transparency only survives through RGBA; straight to RGB would show the key colour.
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in _ALPHA_MODES:
        return _composite_on_white(img)
    if mode == "L" and "transparency" in img.info:
        return _composite_on_white(img.convert("RGBA"))
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV and RGB with a transparency key


def _composite_on_white(img: Image.Image) -> Image.Image:
    # Transparent areas are undefined colour; white matches how viewers display them.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_int32(arr: np.ndarray, sixteen_bit_white: int = SIXTEEN_BIT_WHITE) -> np.ndarray:
    """Mode "I" carries no bit depth: values within 0..255 are 8-bit, within 0..65535 are
    16-bit (PNG/TIFF; `sixteen_bit_white` is white), anything else is stretched over its own range. Where the
    data set's white is known (not 65535), it holds for a dark image within 0..255 too."""
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 255 and sixteen_bit_white == SIXTEEN_BIT_WHITE:
        return arr.astype(np.float64)
    if lo >= 0 and hi <= 65535:
        return arr.astype(np.float64) / (sixteen_bit_white / 255.0)
    return _stretch(arr.astype(np.float64))


def _scale_float(arr: np.ndarray) -> np.ndarray:
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr * 255.0
    if lo >= 0.0 and hi <= 255.0:
        return arr
    return _stretch(arr)


def _stretch(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr)
    return (arr - lo) * (255.0 / (hi - lo))


def _gray_array_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")  # a 2-D uint8 array is mode "L"
