"""benchmarks/probe_memory.py and probe_threads.py: they measure the probe's fit and CV in processes of their
own and print their tables."""

import subprocess
import sys
from pathlib import Path

_BENCH = Path(__file__).parents[1] / "benchmarks"


def test_the_probe_memory_benchmark_measures_fit_and_cv(tmp_path):
    out = subprocess.run([sys.executable, str(_BENCH / "probe_memory.py"), "--shapes", "400x2x3", "--features", "256",
                          "--no-record"], capture_output=True, text=True, timeout=300, check=True)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith(("| fit |", "| cv |"))]
    assert [r[0] for r in rows] == ["fit", "cv"] and all(r[1] == "400 × 2 × 3" for r in rows)
    for row in rows:
        features_mb, extra, total = float(row[2]), float(row[4]), float(row[5])
        assert abs(features_mb - 400 * 2 * 256 * 4 / 1e6) < 1e-3 and abs(total - 1 - extra) < 1e-3


def test_the_probe_threads_benchmark_times_both_thread_policies():
    out = subprocess.run([sys.executable, str(_BENCH / "probe_threads.py"), "--shapes", "60x1x2", "--features", "64",
                          "--repeats", "1", "--conditions", "idle", "--no-record"],
                         capture_output=True, text=True, timeout=300, check=True)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| idle |")]
    assert len(rows) == 1 and rows[0][1] == "60 × 1 × 2"
    one, default, ratio = map(float, rows[0][2:5])
    assert one > 0 and default > 0 and abs(ratio - default / one) < 0.01 * ratio + 1e-3
