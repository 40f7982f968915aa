"""benchmarks/scan.py: every way of scanning gives the same folder, and its table holds what it measured."""

import subprocess
import sys
from pathlib import Path

_BENCH = Path(__file__).parents[1] / "benchmarks"


def test_the_scan_benchmark_runs_both_ways_and_prints_their_table(tmp_path):
    out = subprocess.run([sys.executable, str(_BENCH / "scan.py"), "--work", str(tmp_path), "--images", "300",
                          "--repeats", "1", "--no-record"], capture_output=True, text=True, timeout=300, check=True)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 300 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    before, after, speed_up = float(cells[1]), float(cells[2]), float(cells[3])
    assert before > 0 and after > 0 and abs(speed_up - before / after) < 0.01 * speed_up + 0.01
    again, again_speed_up = float(cells[4]), float(cells[5])
    assert again > 0 and abs(again_speed_up - after / again) < 0.01 * again_speed_up + 0.01
    assert cells[8] == "0 / 0"  # generated gratings under noise: no two alike, either way
    assert "300 before" in out.stdout and "'images': 300" in out.stdout
    assert "'recorded': 300" in out.stdout  # the re-scan's record holds every file
