"""The `transferkit` program keeps large freed blocks for reuse (malloc.py); inside someone else's Python process,
and with TRANSFERKIT_MALLOC=default, glibc's defaults stay."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Page faults of allocating, filling and freeing 100 MB a second time (the first call warms up), straight through
# the C library's malloc and free. glibc's defaults map such a block afresh at every malloc (25,600 faults of 4 KB
# pages); a kept block faults no page.
PROBE = """
import ctypes, resource, sys

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]

{setup}

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(100 * 2**20)
    ctypes.memset(block, 1, 100 * 2**20)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
print(faults())
"""


def _faults(setup: str, **env) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout
    return int(out.split()[-1])


def test_the_program_reuses_large_freed_blocks():
    program = "sys.argv = ['transferkit', 'models']\nfrom transferkit.cli import entry\nentry()"
    assert _faults(program) < 1000
    assert _faults(program, TRANSFERKIT_MALLOC="default") > 20_000


def test_main_inside_a_python_process_leaves_the_allocator_alone():
    assert _faults("from transferkit import cli\ncli.main(['models'])") > 20_000
