"""OS-level thread names: what lets a profile or a benchmark tell decode threads from inference lanes."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from transferkit.threads import named_pool, os_thread_name


def test_os_names_shorten_the_prefix_and_fit_the_kernels_15_bytes():
    assert os_thread_name("transferkit-decode_0") == "tk-decode_0"
    assert os_thread_name("transferkit-infer_12") == "tk-infer_12"
    assert len(os_thread_name("transferkit-a-very-long-name_3").encode()) == 15
    assert os_thread_name("MainThread") == "MainThread"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")
def test_a_named_pools_threads_carry_their_names_at_the_os_level():
    def comm() -> str:
        return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    with named_pool(2, "transferkit-decode") as pool:
        names = {pool.submit(comm).result() for _ in range(8)}
    assert names and names <= {"tk-decode_0", "tk-decode_1"}
    assert comm() != "tk-decode_0"  # the calling thread keeps its own name
