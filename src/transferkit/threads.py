"""Thread pools whose threads the operating system can tell apart.

Python names its threads for itself only (before 3.14), so `top -H`, `ps -L`, profilers and /proc show
every thread of a run or a server as "python". The pools here also give each thread its Python name at
the OS level (Linux: prctl PR_SET_NAME, 15 bytes), so one can see, and a benchmark can measure, how much
CPU the decode threads take beside the inference lanes (benchmarks/serve.py, benchmarks/extraction.py).
"""

from __future__ import annotations

import ctypes
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
