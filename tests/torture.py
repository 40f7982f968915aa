"""Build a small dataset folder full of the things real folders contain: broken files,
odd image modes, junk, links, duplicates. Tests import `make_torture_folder`.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ALPHA = "alpha"
BETA = "bêta ants"  # unicode and a space in a class name


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit black PNG: tiny on disk, huge in pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    rows_per_block = max(1, (1 << 20) // len(row))
    block = row * rows_per_block
    parts = []
    for _ in range(height // rows_per_block):
        parts.append(packer.compress(block))
    parts.append(packer.compress(row * (height % rows_per_block)))
    parts.append(packer.flush())
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


def random_rgb(seed: int, size=(32, 32), tint=(0, 0, 0)) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 160, size=(size[1], size[0], 3)) + np.array(tint)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def exif_rotated_jpeg(width=40, height=24) -> bytes:
    """A landscape JPEG whose EXIF says "rotate 90° clockwise" (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(random_rgb(7, (width, height)), "JPEG", exif=exif.tobytes())


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_torture_folder(root) -> dict:
    """Create ROOT/train/{alpha, bêta ants, empty}/ and ROOT/val/{alpha, bêta ants, gamma}/.

    Returns {"root", "classes", "good": {split: {class: [paths]}}, "problems": {kind: [paths]},
    "notes": {...}} with absolute paths, so tests can check each file landed where it should.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()  # the scanner reports resolved paths
    good: dict[str, dict[str, list[str]]] = {"train": {ALPHA: [], BETA: []}, "val": {ALPHA: [], BETA: []}}
    problems: dict[str, list[str]] = {}

    def ok(split, cls, name, data):
        good[split][cls].append(str(_write(root / split / cls / name, data)))

    def bad(kind, rel, data=None):
        path = root / rel
        if data is not None:
            _write(path, data)
        problems.setdefault(kind, []).append(str(path))
        return path

    tints = {ALPHA: (90, 0, 0), BETA: (0, 0, 90)}
    for split, n in (("train", 6), ("val", 3)):
        for cls in (ALPHA, BETA):
            for i in range(n):
                seed = zlib.crc32(f"{split}/{cls}/{i}".encode())
                fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
                ok(split, cls, f"good_{i}.{ext}", encode(random_rgb(seed, tint=tints[cls]), fmt))

    # Unusual but valid images: all kept.
    a = root / "train" / ALPHA
    ok("train", ALPHA, "cmyk.jpg", encode(random_rgb(11).convert("CMYK"), "JPEG"))
    ok("train", ALPHA, "sixteen_bit.png", encode(Image.fromarray(np.full((16, 16), 40000, np.uint16)), "PNG"))
    ok("train", ALPHA, "palette.png", encode(random_rgb(12).convert("P"), "PNG"))
    pal = random_rgb(13).convert("P")
    ok("train", ALPHA, "palette_transparent.png", encode(pal, "PNG", transparency=0))
    ok("train", ALPHA, "rgba.png", encode(random_rgb(14).convert("RGBA"), "PNG"))
    ok("train", ALPHA, "la.png", encode(random_rgb(15).convert("LA"), "PNG"))
    ok("train", ALPHA, "rotated_exif.jpg", exif_rotated_jpeg())
    ok("train", ALPHA, "café ünï 画像 with spaces.png", encode(random_rgb(16), "PNG"))
    ok("train", ALPHA, "nested/deeper/inner.png", encode(random_rgb(17), "PNG"))
    ok("train", ALPHA, "thin_8x120.png", encode(random_rgb(18, (8, 120)), "PNG"))
    no_ext = str(_write(a / "no_extension", encode(random_rgb(19), "PNG")))
    good["train"][ALPHA].append(no_ext)
    problems["no_extension"] = [no_ext]

    # Broken or unusable files.
    jpeg = encode(random_rgb(20, (64, 64)), "JPEG")
    png = encode(random_rgb(21, (64, 64)), "PNG")
    idat = png.find(b"IDAT")
    mangled = bytearray(png)
    for k in range(idat + 10, idat + 60):
        mangled[k] ^= 0x5A
    bad("corrupt", f"train/{ALPHA}/truncated.jpg", jpeg[: len(jpeg) // 2])
    bad("corrupt", f"train/{ALPHA}/truncated.png", png[: len(png) // 2])
    bad("corrupt", f"train/{BETA}/mangled.png", bytes(mangled))
    bad("empty_file", f"train/{ALPHA}/zero_bytes.jpg", b"")
    bad("non_image", f"train/{ALPHA}/notes.txt", b"not an image\n")
    bad("non_image", f"train/{BETA}/README", b"no extension, not an image\n")
    bad("not_an_image", f"train/{BETA}/text_pretending.jpg", b"this is text, not a JPEG\n")
    bad("os_junk", f"train/{ALPHA}/.DS_Store", b"\x00\x00\x00\x01Bud1")
    bad("os_junk", f"train/{BETA}/Thumbs.db", b"\xd0\xcf\x11\xe0")
    bad("too_small", f"train/{ALPHA}/one_pixel.png", encode(random_rgb(22, (1, 1)), "PNG"))
    bad("too_small", f"train/{BETA}/thin_3x200.png", encode(random_rgb(23, (3, 200)), "PNG"))
    # 12000×8000 ≈ 96 M pixels: over Pillow's default 89 M limit, ~15 kB on disk.
    bad("decompression_bomb", f"train/{BETA}/bomb.png", bomb_png(12000, 8000))
    bad("hidden", f"train/{ALPHA}/.hidden_folder")
    _write(root / "train" / ALPHA / ".hidden_folder" / "inside.png", encode(random_rgb(24), "PNG"))
    bad("hidden", f"train/{BETA}/.hidden_file.png", encode(random_rgb(25), "PNG"))
    bad("outside_class_folder", "README.txt", b"about this dataset\n")
    bad("dataset_manifest", "elpv.json", b'{"format": 1}\n')  # what `transferkit data` writes beside train/

    locked = _write(a / "locked.jpg", encode(random_rgb(26), "JPEG"))
    locked.chmod(0)
    # root can read any file, so there it stays a good image.
    if os.geteuid() == 0:
        good["train"][ALPHA].append(str(locked))
    else:
        problems.setdefault("unreadable", []).append(str(locked))
    os.mkfifo(root / "train" / BETA / "pipe.jpg")  # opening it would block forever
    problems.setdefault("unreadable", []).append(str(root / "train" / BETA / "pipe.jpg"))

    os.symlink("self_loop.jpg", a / "self_loop.jpg")
    problems.setdefault("symlink_loop", []).append(str(a / "self_loop.jpg"))
    os.symlink("..", a / "nested" / "up")  # a folder loop: nested/up -> alpha
    problems["symlink_loop"].append(str(a / "nested" / "up"))
    os.symlink("does_not_exist.png", a / "dangling.png")
    problems.setdefault("broken_symlink", []).append(str(a / "dangling.png"))

    (root / "train" / "empty").mkdir()
    problems["empty_class"] = [str(root / "train" / "empty")]
    gamma = _write(root / "val" / "gamma" / "g.png", encode(random_rgb(27), "PNG"))
    problems["val_class_not_in_train"] = [str(gamma)]

    # The same bytes in train and val: leakage.
    leak = Path(good["train"][BETA][0]).read_bytes()
    dup = root / "val" / BETA / "leaked_copy.jpg"
    good["val"][BETA].append(str(_write(dup, leak)))
    problems["duplicate_across_splits"] = [str(dup)]

    return {
        "root": root,
        "classes": sorted([ALPHA, BETA]),
        "good": good,
        "problems": problems,
        "notes": {"exif_rotated": str(a / "rotated_exif.jpg"), "locked": str(locked), "running_as_root": os.geteuid() == 0},
    }
