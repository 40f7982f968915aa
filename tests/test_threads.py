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


def test_prefetch_imports_the_named_modules_on_a_thread_once_and_ignores_failures(tmp_path, monkeypatch):
    """threads.prefetch_modules/start_prefetch (the feature extraction starts it after its first batch): the
    modules named and not imported yet are imported on a daemon thread; a module that fails to import is left
    for the command's own import to report; a second start imports nothing again."""
    from transferkit import threads

    # the module waits for the test's go, so the thread is still alive when the test looks for it (without the
    # gate it could finish first on a busy machine: a CI run once found no thread)
    (tmp_path / "tk_prefetch_gate.py").write_text("import threading\nGO = threading.Event()\n")
    (tmp_path / "tk_prefetch_ok.py").write_text("import threading\nimport tk_prefetch_gate\n"
                                                "tk_prefetch_gate.GO.wait(30)\n"
                                                "THREAD = threading.current_thread().name\n")
    (tmp_path / "tk_prefetch_bad.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("tk_prefetch_ok", "tk_prefetch_bad", "tk_prefetch_gate"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import tk_prefetch_gate

    threads.prefetch_modules("tk_prefetch_bad", "tk_prefetch_ok", "tk_prefetch_ok", "sys")
    threads.start_prefetch()
    prefetching = [t for t in threading.enumerate() if t.name == "transferkit-prefetch"]
    tk_prefetch_gate.GO.set()
    assert len(prefetching) == 1 and prefetching[0].daemon
    prefetching[0].join(30)
    assert sys.modules["tk_prefetch_ok"].THREAD == "transferkit-prefetch"
    assert "tk_prefetch_bad" not in sys.modules
    threads.start_prefetch()  # the list was used up: no second thread
    assert not [t for t in threading.enumerate() if t.name == "transferkit-prefetch"]
    with pytest.raises(RuntimeError, match="broken on purpose"):
        __import__("tk_prefetch_bad")


def test_a_fork_waits_for_the_prefetch_so_the_child_never_inherits_a_half_imported_module(tmp_path, monkeypatch):
    """A child forked while the prefetch thread is inside a module's import would hang on that module's
    import lock (its owner thread does not exist in the child): the fork waits for the prefetch instead."""
    import multiprocessing
    import time

    from transferkit import threads

    (tmp_path / "tk_prefetch_slow.py").write_text("import time\ntime.sleep(1.5)\nREADY = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tk_prefetch_slow", raising=False)
    threads.prefetch_modules("tk_prefetch_slow")
    threads.start_prefetch()
    time.sleep(0.3)  # the thread is inside the module's import now
    child = multiprocessing.get_context("fork").Process(target=_import_slow_module_and_exit)
    child.start()  # waits for the prefetch (os.register_at_fork)
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0


def _import_slow_module_and_exit() -> None:
    import tk_prefetch_slow

    raise SystemExit(0 if tk_prefetch_slow.READY else 1)


def test_threads_imports_where_the_os_cannot_fork(monkeypatch):
    """os.register_at_fork exists on POSIX only: on Windows the module (and so transferkit) must still import."""
    import importlib
    import os

    from transferkit import threads

    monkeypatch.delattr(os, "register_at_fork")
    reloaded = importlib.reload(threads)
    assert callable(reloaded.start_prefetch)
