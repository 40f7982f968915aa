"""A run folder's files: their names and layouts in one place (torch-free: serving reads run folders too).

    RUN/config.yaml          the TrainConfig the run trained with (TrainConfig.to_yaml)
    RUN/split.csv            the train/val split (data/folders/manifest.py write_manifest)
    RUN/data_report.json     what the data scan found and skipped
    RUN/history.csv          one row per epoch
    RUN/metrics.json         the finished run's summary; its presence marks a run as finished
    RUN/evaluation.json      metrics of the best model on a labelled split, one shape for training and
                             `evaluate` (results/metrics.py evaluation_summary)
    RUN/best.safetensors     the best epoch's model (+ best.json, its metadata); last.* to resume
    RUN/novelty.safetensors  the novelty reference (novelty.py), where the run made one
    RUN/curves.png, confusion.png, top_losses.png, batch_grid.png, report.html
    RUN/search.json          the recipe search's candidates (search/)
    RUN/export/              model.onnx / model.pt (+ model.int8.onnx) and export.json (export.py)
    RUN/.lock                held by the process training into RUN (`claimed`)
"""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Iterator

from .errors import CheckpointError, UsageError

log = logging.getLogger(__name__)


class RunFolder:
    """`RunFolder(path).metrics` is RUN/metrics.json, and so on; the names are class constants."""

    CONFIG: ClassVar[str] = "config.yaml"
    SPLIT: ClassVar[str] = "split.csv"
    DATA_REPORT: ClassVar[str] = "data_report.json"
    HISTORY: ClassVar[str] = "history.csv"
    METRICS: ClassVar[str] = "metrics.json"
    EVALUATION: ClassVar[str] = "evaluation.json"
    BEST: ClassVar[str] = "best.safetensors"
    LAST: ClassVar[str] = "last.safetensors"
    NOVELTY: ClassVar[str] = "novelty.safetensors"
    CURVES: ClassVar[str] = "curves.png"
    CONFUSION: ClassVar[str] = "confusion.png"
    TOP_LOSSES: ClassVar[str] = "top_losses.png"
    BATCH_GRID: ClassVar[str] = "batch_grid.png"
    REPORT: ClassVar[str] = "report.html"
    SEARCH: ClassVar[str] = "search.json"
    EXPORT: ClassVar[str] = "export"
    EXPORT_RECORD: ClassVar[str] = "export.json"  # in the export folder, as the models are
    ONNX_MODEL: ClassVar[str] = "model.onnx"
    INT8_MODEL: ClassVar[str] = "model.int8.onnx"
    TORCHSCRIPT_MODEL: ClassVar[str] = "model.pt"
    TENSORBOARD: ClassVar[str] = "tensorboard"  # --tensorboard's event files
    # The files a run (and `evaluate`) writes at the top of its folder; best.json and last.json: the checkpoints'
    # metadata.
    WRITTEN: ClassVar[tuple[str, ...]] = (CONFIG, SPLIT, DATA_REPORT, HISTORY, METRICS, EVALUATION, BEST, "best.json",
                                          LAST, "last.json", NOVELTY, CURVES, CONFUSION, TOP_LOSSES, BATCH_GRID,
                                          REPORT, SEARCH)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ---- the files --------------------------------------------------------------------------------

    config = property(lambda self: self.path / self.CONFIG)
    split = property(lambda self: self.path / self.SPLIT)
    data_report = property(lambda self: self.path / self.DATA_REPORT)
    history = property(lambda self: self.path / self.HISTORY)
    metrics = property(lambda self: self.path / self.METRICS)
    evaluation = property(lambda self: self.path / self.EVALUATION)
    best = property(lambda self: self.path / self.BEST)
    last = property(lambda self: self.path / self.LAST)
    novelty = property(lambda self: self.path / self.NOVELTY)
    curves = property(lambda self: self.path / self.CURVES)
    confusion = property(lambda self: self.path / self.CONFUSION)
    top_losses = property(lambda self: self.path / self.TOP_LOSSES)
    batch_grid = property(lambda self: self.path / self.BATCH_GRID)
    report = property(lambda self: self.path / self.REPORT)
    search = property(lambda self: self.path / self.SEARCH)
    export_dir = property(lambda self: self.path / self.EXPORT)
    export_record = property(lambda self: self.path / self.EXPORT / self.EXPORT_RECORD)
    onnx_model = property(lambda self: self.path / self.EXPORT / self.ONNX_MODEL)

    # ---- what the files say -----------------------------------------------------------------------

    def finished(self) -> bool:
        return self.metrics.is_file()

    def is_run(self) -> bool:
        """Whether the folder is a run's (its config is written first, then the scan's report and split)."""
        return self.config.is_file() and any(p.is_file() for p in (self.data_report, self.split, self.metrics))

    def training_process(self) -> str | None:
        """The process id of a run training into this folder now (RUN/.lock held: `claimed`), else None."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): nothing is locked, nothing to tell
            return None
        try:
            fd = os.open(self.path / ".lock", os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by the close
            return None
        except BlockingIOError:
            return os.read(fd, 32).decode(errors="replace").strip() or "?"
        except OSError:  # a file system without locks
            return None
        finally:
            os.close(fd)

    def holds_run_files(self) -> bool:
        """Whether anything a run, its evaluations or its exports write is here."""
        return any((self.path / name).exists() for name in (*self.WRITTEN, self.EXPORT))

    def clear(self) -> None:
        """Remove what a run, its evaluations and its exports wrote here (`train --overwrite`), so that nothing of
        the run replaced (an exported model, a search record, curves a probe does not draw) passes for the new
        run's; other files in the folder stay."""
        import shutil

        for name in self.WRITTEN:
            (self.path / name).unlink(missing_ok=True)
        for name in (self.EXPORT, self.TENSORBOARD):
            shutil.rmtree(self.path / name, ignore_errors=True)

    @staticmethod
    def read_json(path: Path) -> dict | None:
        """A JSON object file of the run, or None where it is missing (a partial or copied run) or unreadable
        (logged)."""
        try:
            value = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s (%s)", path, exc)
            return None
        return value if isinstance(value, dict) else None

    def resumable_config(self) -> Path:
        """RUN/config.yaml, after checking the folder holds an interrupted run (a run stopped before its first
        epoch has no `last` and starts afresh; a finished one has nothing to resume)."""
        if not self.path.is_dir():
            raise CheckpointError(f"--resume: {self.path} is not a folder (pass the run folder of an interrupted run)")
        for path in (self.config, self.split):
            if not path.is_file():
                raise CheckpointError(f"--resume: {self.path} has no {path.name}; it is not a resumable "
                                      "transferkit run")
        if self.finished():
            raise CheckpointError(f"--resume: {self.path} already finished ({self.METRICS} exists); "
                                  "nothing to resume")
        return self.config


def onnx_model_path(path: str | Path) -> Path:
    """An .onnx file as given; a run folder means the model `transferkit export RUN` wrote into it (predict and
    serve with --engine onnx)."""
    path = Path(path)
    if path.is_dir():
        exported = RunFolder(path).onnx_model
        if not exported.is_file():
            raise CheckpointError(f"no exported model at {exported}; run `transferkit export {path}` first")
        return exported
    return path


# Run folders this process trains into, by folder and claiming thread: the lock's file descriptor, how many nested
# claims hold it (the search's claim and its final run's), the first folder of the path the first claim made (None:
# it made none), and whether it made the lock file.
_HELD: dict[tuple[Path, int], list] = {}


@contextmanager
def claimed(out: Path) -> Iterator[None]:
    """Hold RUN/.lock for the block, so that no other process trains into RUN meanwhile: a second `train --out
    RUN` (with --overwrite or not) or `train --resume RUN` while a run is writing there is refused in one line
    (both wrote into the folder at once). An advisory lock of the operating system (flock), released when the
    block ends or the process dies; nested claims of one thread share it (another thread is refused, as another
    process is). Where there is no flock (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    out = Path(out)
    # per thread: a claim nests within its own thread's (the search's, then its final run's); two threads training
    # into one folder (tk.train on a thread pool) both wrote into it, as two processes did
    key = (out.resolve(), threading.get_ident())
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        made = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
        lock_made = not (out / ".lock").exists()
        _HELD[key] = [_lock(out, fcntl), 1, made, lock_made]
    try:
        yield
    finally:
        held = _HELD[key]
        held[1] -= 1
        if not held[1]:
            del _HELD[key]
            os.close(held[0])  # closing the descriptor releases the lock; the file stays (see _lock)
            if held[3]:
                _undo_claim(out, held[2])


def _undo_claim(out: Path, made: Path | None) -> None:
    """A run refused before its first file (a bad option, a busy GPU, a folder of someone else's files) leaves
    nothing behind: the lock file this claim made goes, and so do the folders it made (`made` and those below it,
    down to `out`) where they are empty."""
    if RunFolder(out).holds_run_files():
        return
    try:
        (out / ".lock").unlink()
        for folder in [out, *out.parents] if made is not None else []:
            folder.rmdir()
            if folder == made:
                break
    except OSError:  # another process wrote there meanwhile: its folder now
        pass


def _lock(out: Path, fcntl) -> int:
    """The locked descriptor of OUT/.lock. The file stays with the run (a process that opened it just before a
    deletion would lock a file no one else sees); it goes only where the run wrote nothing (_undo_claim)."""
    from .io import RunFolderError, why_not_writable

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a run folder (new or existing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunFolderError(f"cannot write in {out}: {why_not_writable(out, exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UsageError(f"--out {out} is in use by another transferkit run (process {holder}); wait for it to "
                         "end, or choose another --out") from None
    except OSError as exc:  # a file system without locks (some network mounts): the run goes on unguarded
        log.debug("no lock on %s (%s)", out / ".lock", exc.strerror or exc)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
