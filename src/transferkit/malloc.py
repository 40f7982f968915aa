"""glibc malloc settings for the `transferkit` program: large freed blocks stay in the process for reuse.

By default glibc serves a block above its mmap threshold (adjusted at run time, at most 32 MB) with a fresh
mmap() and unmaps it at free(). A CPU forward or backward pass at batch 32 allocates activations of 25-150 MB per
layer (efficientnet_lite0 at 224 px), so every step maps hundreds of MB of new pages and the kernel faults each
one in again. 2-core EPYC, lite0 training steps at batch 32 on random tensors (a throwaway script, session 25):
14.6 images/s and 8.6 s of system time per 5 steps with the defaults, 27.9 images/s and 0.9 s with blocks up to
1 GiB served from the heap and kept there once freed; inference at batch 32: 79 -> 131 images/s. Whole
`transferkit train --mode finetune` epochs, which also wait on data loading: 1.27x faster, peak RSS +15%
(benchmarks/malloc.py, RESULTS.md section malloc). PyTorch's CPU performance guide suggests jemalloc or
tcmalloc for the same reason; this gets the effect without preloading a library.

The cost: up to TRIM_THRESHOLD of freed memory stays mapped in the process until it exits (a run's largest
step's worth, which its next step needs again). Set TRANSFERKIT_MALLOC=default to keep glibc's defaults. Only the
program sets this (cli.entry): `transferkit.cli.main` or the Python API called inside someone's process leaves
their allocator as it was. No effect off glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 30  # blocks below this come from the heap, not from their own mmap()
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top beyond this goes back to the OS
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters, from glibc's malloc.h


def keep_freed_blocks() -> bool:
    """Apply the settings above to this process (and the workers it forks); True if glibc took them."""
    if os.environ.get("TRANSFERKIT_MALLOC", "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this Python runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("glibc refused the malloc settings; its defaults stay")
    return ok
