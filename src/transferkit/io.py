"""Atomic file writes: a temp file in the same folder, fsync, then rename. A crash, a full disk or a
read-only folder never leaves a half-written file under the final name."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import TransferkitError


class RunFolderError(TransferkitError):
    exit_code = 8


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The mode a file made by open() gets: mkstemp's temp files are 0600, and renamed into place they left every
# checkpoint, config, report and predict --out readable by their owner alone (a teammate, `serve` under a service
# account). Read once, at import: setting the umask to read it is not safe beside threads creating files.
FILE_MODE = 0o666 & ~_umask()


def why_not_writable(folder: Path, exc: OSError) -> str:
    """The reason to show for a folder that could not be made or written in: a file standing where the folder
    or one of its parents should be is named (the OS says only "File exists" or "Not a directory")."""
    for place in (folder, *folder.parents):
        if place.exists():
            return f"{place} is a file, not a folder" if not place.is_dir() else (exc.strerror or str(exc))
    return exc.strerror or str(exc)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` to produce the file, then move it into place atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise RunFolderError(f"cannot write in {path.parent}: {why_not_writable(path.parent, exc)}") from None
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        failed = os_error_of(exc)
        if failed is None:
            raise
        why = "the disk is full" if failed.errno == errno.ENOSPC else (failed.strerror or str(failed))
        raise RunFolderError(f"could not write {path}: {why}; nothing was left half-written") from None
    return path


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating system's error behind a failed read or write: an OSError, or the I/O error of a library
    written in Rust (safetensors raises SafetensorError "... No space left on device (os error 28)"); None for
    any other failure."""
    if isinstance(exc, OSError):
        return exc
    found = _RUST_OS_ERROR.search(str(exc)) if isinstance(exc, Exception) else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def atomic_write_text(path, text: str) -> Path:
    def write(tmp):
        # surrogateescape: a file name that is not UTF-8 (a Latin-1 zip's café.jpg, read by Python as caf\udce9.jpg)
        # is written as the bytes it has on disk, as `ls > file` does, where it was a UnicodeEncodeError traceback
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)

    return atomic_write(path, write)


def atomic_write_json(path, obj) -> Path:
    text = json.dumps(obj, indent=2, default=str, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # such a file name: escaped (\udce9), valid JSON that json.loads gives back as it was
        text = json.dumps(obj, indent=2, default=str)
    return atomic_write_text(path, text + "\n")


def read_json_object(path) -> dict:
    """A JSON object file's content; {} where it is missing, unreadable, damaged or not an object (what a
    cache of measured choices treats as nothing known: measured again)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def update_json_object(path, key: str, value_of: Callable[[object], object]) -> bool:
    """Set `key` of a JSON object file to value_of(its value now, or None), keeping the other keys as other
    processes may have written them meanwhile; atomic. False where it could not be written (a read-only cache
    costs a measurement next time, no more)."""
    known = read_json_object(path)
    known[key] = value_of(known.get(key))
    try:
        atomic_write_json(path, known)
    except (RunFolderError, OSError):
        return False
    return True


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a staging folder next to OUT (an empty or missing folder) that replaces OUT when the
    block ends, or is deleted if it raises: an interrupted run leaves no half-filled OUT."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the final folder
    try:
        yield staging
        if out.exists():
            out.rmdir()  # the caller has checked that it is empty
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def pasteable_path(path: str | os.PathLike) -> str:
    """A path for a command line the user is told to run: relative to the working folder where it lies inside
    it, and quoted for the shell (a folder name with spaces)."""
    import shlex

    path, here = Path(path), Path.cwd()
    return shlex.quote(str(path.relative_to(here) if path.is_absolute() and path.is_relative_to(here) else path))
