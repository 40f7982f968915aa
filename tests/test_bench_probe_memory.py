"""benchmarks/probe_memory.py: it measures the fit and the CV in processes of their own and prints their table."""

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
