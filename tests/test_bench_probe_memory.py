"""benchmarks/probe_memory.py, probe_threads.py and probe_tolerance.py: they measure the probe's fit and CV in
processes of their own and print their tables."""

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
        # the table rounds to 4 significant digits
        assert abs(features_mb - 400 * 2 * 256 * 4 / 1e6) < 1e-3 and abs(total - 1 - extra) < 1e-3 * total


def test_the_probe_threads_benchmark_times_both_thread_policies():
    out = subprocess.run([sys.executable, str(_BENCH / "probe_threads.py"), "--shapes", "60x1x2", "--features", "64",
                          "--repeats", "1", "--conditions", "idle", "--no-record"],
                         capture_output=True, text=True, timeout=300, check=True)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| idle |")]
    assert len(rows) == 1 and rows[0][1] == "60 × 1 × 2"
    one, default, ratio = map(float, rows[0][2:5])
    assert one > 0 and default > 0 and abs(ratio - default / one) < 0.01 * ratio + 1e-3


def test_the_probe_tolerance_benchmark_runs_a_nested_cv_per_tolerance_on_saved_calls(tmp_path):
    """Saved cross_validate calls are replayed (no search runs); of two calls on the same features only the one
    with more columns is kept, and each tolerance gets its accuracy, seconds and one C per outer fold."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = rng.standard_normal((90, 2, 40)).astype(np.float32)
    x[:, :, :5] += y[:, None, None].astype(np.float32)  # a class signal the probe can find
    saved = tmp_path / "probe_tolerance" / "tiny"
    saved.mkdir(parents=True)
    for i, columns in enumerate([np.arange(20), np.arange(40)]):
        np.savez(saved / f"{i}.npz", x=x, y=y, columns=columns, n_classes=3, grid=np.array([0.01, 0.1, 1.0]))
    out = subprocess.run([sys.executable, str(_BENCH / "probe_tolerance.py"), "--work", str(tmp_path), "--sets", "tiny",
                          "--tols", "sklearn@1e-3,1e-6", "--outer", "3", "--no-record"],
                         capture_output=True, text=True, timeout=300, check=True)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| tiny")]
    assert len(rows) == 1 and rows[0][:2] == ["tiny (1)", "90 × 2 × 40"]
    for acc, seconds, chosen in (rows[0][2:5], rows[0][5:8]):
        assert 0.6 < float(acc) <= 1 and float(seconds) > 0
        assert len(chosen.split()) == 3 and {float(c) for c in chosen.split()} <= {0.0001, 0.0003, 0.001, 0.003, 0.01, 0.1, 1.0}
    assert "tol 1e-6 against sklearn@1e-3: accuracy" in out.stdout
