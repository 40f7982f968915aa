"""Thread pools whose threads the operating system can tell apart.

Python names its threads for itself only (before 3.14), so `top -H`, `ps -L`, profilers and /proc show
every thread of a run or a server as "python". The pools here also give each thread its Python name at
the OS level (Linux: prctl PR_SET_NAME, 15 bytes), so one can see, and a benchmark can measure, how much
CPU the decode threads take beside the inference lanes (benchmarks/serve.py, benchmarks/extraction.py).

`in_one_blas_thread` runs a function with BLAS (numpy's and scipy's OpenBLAS) in one thread: the probes' fits.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

_PR_SET_NAME = 15
OS_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last one the terminating zero


def os_thread_name(name: str) -> str:
    """The OS-level name of a transferkit thread: its Python name, "transferkit-" shortened to "tk-"."""
    return name.replace("transferkit-", "tk-", 1).encode()[:OS_NAME_BYTES].decode(errors="ignore")


def name_os_thread() -> None:
    """Give the calling thread its Python name at the OS level; best effort, nothing where it cannot."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, os_thread_name(threading.current_thread().name).encode(),
                                                0, 0, 0)
    except (OSError, AttributeError):  # no libc to load, or no prctl in it
        pass


def named_pool(workers: int, prefix: str) -> ThreadPoolExecutor:
    """A ThreadPoolExecutor whose threads carry `prefix`_N at the OS level too."""
    return ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=name_os_thread)


# Modules a command will need after its CPU-heavy phase (prefetch_modules), imported on a thread once that
# phase starts (start_prefetch). Importing is single-threaded Python (scikit-learn's metrics ~0.8 s, matplotlib's
# pyplot ~0.3 s, 2-core EPYC); done between the feature extraction and the epochs, it leaves the other core idle,
# while beside the extraction, which keeps both cores busy, it costs about half its time: cold 397-image
# feature-extract runs, scikit-learn no longer imported by the data scan in either, went from 7.8-8.1 to 7.4-8.0 s.
_prefetch: list[str] = []
_prefetching: threading.Thread | None = None


def prefetch_modules(*names: str) -> None:
    """Name modules to import on a thread when start_prefetch is called (each once)."""
    _prefetch.extend(name for name in names if name not in _prefetch)


def start_prefetch() -> None:
    """Import the modules prefetch_modules named, not imported yet, on a daemon thread (the command's own
    import of one waits for it, Python's import lock, or raises its error itself: failures are ignored here).
    Call it where the work that follows keeps the cores busy for a while and no timing is being taken."""
    global _prefetching
    names = [name for name in _prefetch if name not in sys.modules]
    _prefetch.clear()
    if names:
        _prefetching = threading.Thread(target=_import_quietly, args=(names,), name="transferkit-prefetch",
                                        daemon=True)
        _prefetching.start()


def _finish_prefetch_before_fork() -> None:
    """A fork (DataLoader workers, multiprocessing) waits for the prefetch: a child forked mid-import inherits
    that module half-initialized and its import lock held by a thread the child does not have, so its first
    import of the module (or of one the module was importing, such as a Pillow plugin) would hang for ever."""
    thread = _prefetching
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=120)


if hasattr(os, "register_at_fork"):  # POSIX only; Windows starts its processes without forking
    os.register_at_fork(before=_finish_prefetch_before_fork)


def _import_quietly(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the command imports it again and reports what is wrong
            pass


@functools.cache
def _blas_pools():
    from threadpoolctl import ThreadpoolController  # (scikit-learn's own dependency)

    # Load scipy's BLAS (L-BFGS-B's), which the controller must see. scipy.linalg is what loads it; this imported
    # sklearn.linear_model until the probe's fits left scikit-learn (session 47): 1.0 s against 0.2 s in a fresh
    # process, 29 against 8 ms where a run has imported scikit-learn's metrics and model selection already.
    importlib.import_module("scipy.linalg")
    return ThreadpoolController()


def in_one_blas_thread(fn):
    """Runs fn (a probe's fits and CV: QR, projections, L-BFGS; engine/probe.py, datacheck.py) with one BLAS
    thread. Their products are thin (many rows by a few columns of weights, or by a basis of a few hundred rows),
    work a second thread barely speeds up, and OpenBLAS's threads stall on each other when another process holds
    a core. 3-fold CVs over the C grid, 2-core EPYC, two runs of benchmarks/probe_threads.py (benchmarks/RESULTS.md,
    probe-threads and the notes of session 42): idle, the library's 2 threads took 0.91-1.38 times as long as one
    thread; beside a process busy on both cores, 1.24-10.4 times (128 rows: 3.3-8.5 s against 0.8-1.1 s)."""
    @functools.wraps(fn)
    def limited(*args, **kwargs):
        with _blas_pools().limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)
    return limited
