"""Shared by the benchmarks: the ELPV folders they run on and the RESULTS.md they write to."""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from transferkit.data.builtin import materialize_elpv
from transferkit.engine.environment import describe_environment

RESULTS = Path(__file__).with_name("RESULTS.md")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Where the benchmarks materialize ELPV and their other folders unless told otherwise: one place, so that a second
# benchmark reuses the first one's data.
SHARED_WORK = Path(tempfile.gettempdir()) / "transferkit-bench"


def benchmark_parser(doc: str, work: Path | None = SHARED_WORK,
                     work_help: str = "folder for the data, runs and caches (shared with the other benchmarks)",
                     model: bool = False) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its docstring's first line as description and the `--work` folder every
    benchmark takes (required where `work` is None), as a Path; `model` adds `--model` (default
    efficientnet_lite0) for the benchmarks that time one backbone."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if work is None:
        ap.add_argument("--work", type=Path, required=True, help=work_help)
    else:
        ap.add_argument("--work", type=Path, default=work, help=f"{work_help}; default {work}")
    if model:
        ap.add_argument("--model", default="efficientnet_lite0")
    return ap


def elpv(out: Path, classes: int = 2) -> Path:
    materialize_elpv(out, classes=classes, seed=0)
    return out


def stratified_subset(src: Path, dst: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """A smaller copy of an ImageFolder split (hard links), each class keeping its share."""
    if (dst / "train").is_dir():
        return dst
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        by_class = {c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                    for c in sorted((src / split).iterdir()) if c.is_dir()}
        total = sum(len(v) for v in by_class.values())
        for name, files in by_class.items():
            (dst / split / name).mkdir(parents=True, exist_ok=True)
            for f in rng.sample(files, round(n * len(files) / total)):
                os.link(f, dst / split / name / f.name)
    return dst


def cold_env(cache: str | Path, **extra: str) -> dict:
    """The environment of a cold `transferkit` run: an empty feature cache of its own (`cache`) and no scan record,
    as a user's first run on a folder; `extra` on top."""
    return {**os.environ, "TRANSFERKIT_FEATURE_CACHE": str(cache), "TRANSFERKIT_SCAN_CACHE": "off", **extra}


def run_cli(args: list[str], cache: str | Path, env: dict | None = None) -> tuple[float, resource.struct_rusage]:
    """`python -m transferkit ARGS` as a user runs it, in a fresh process (start-up and imports counted) with the
    feature cache `cache`: its wall seconds and its own resource usage (os.wait4: CPU time and peak RSS of this
    child alone). Its stderr goes to a file, not a pipe, so a chatty run cannot fill the pipe and stall; a failed
    run ends the benchmark with that stderr's tail."""
    env = {**cold_env(cache, **(env or {})), "TRANSFERKIT_QUIET": "1"}
    cmd = [sys.executable, "-m", "transferkit", *args]
    with tempfile.TemporaryFile() as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            stderr.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr.read().decode(errors='replace')[-3000:]}")
    return wall, usage


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers): less sensitive than wall
    time to the other jobs sharing the box."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def proc_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a Linux /proc stat file: /proc/PID/stat (a process, all its threads) or
    /proc/PID/task/TID/stat (one thread)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_by_role(pid: int, roles: dict[str, str], rest: str) -> dict[str, float]:
    """CPU seconds so far of a process's threads, summed by role: `roles` maps an OS-level thread name prefix
    (transferkit/threads.py names its pools' threads so, e.g. "tk-decode") to a role; every other thread
    counts as `rest`. Linux /proc/PID/task."""
    totals = dict.fromkeys([*roles.values(), rest], 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, seconds = (task / "comm").read_text().strip(), proc_cpu_seconds(task / "stat")
        except OSError:  # a thread that ended meanwhile
            continue
        totals[next((r for prefix, r in roles.items() if name.startswith(prefix)), rest)] += seconds
    return totals


def environment_line(device=None) -> str:
    """The machine a benchmark ran on, for its RESULTS.md section (the GPU too when `device` is CUDA)."""
    env = describe_environment(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f"{env['gpu']} (CUDA {torch.version.cuda}) with " if "gpu" in env else ""
    return (f"{gpu}{env['cpu']}, {env['cores']} cores (torch threads {env['torch_threads']}), torch {env['torch']}, "
            f"load average at start {load:.1f}; {datetime.now():%Y-%m-%d %H:%M}")


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) one benchmark's section of RESULTS.md, leaving the others alone."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# transferkit benchmarks\n"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def publish(name: str, markdown: str, record: bool = True) -> None:
    """Print a benchmark's section and, where `record` (no --no-record), put it into RESULTS.md."""
    print(markdown)
    if record:
        write_section(name, markdown)


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
