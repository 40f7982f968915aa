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


def test_decoding_takes_the_cores_the_network_leaves_free(monkeypatch):
    from transferkit.engine import features

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(features.os, "cpu_count", lambda: 16)
    assert features.default_workers() == 4  # the network runs on these cores too
    assert features.default_workers(accelerator=True) == 15  # the network is on the GPU: all cores but one
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on this node share its 16 cores
    assert features.default_workers(accelerator=True) == 3
    monkeypatch.setattr(features.os, "cpu_count", lambda: 2)
    assert features.default_workers() == 2 and features.default_workers(accelerator=True) == 1
