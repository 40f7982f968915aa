"""The `transferkit` program with its malloc settings (transferkit/malloc.py) against glibc's defaults.

    python benchmarks/malloc.py [--work DIR] [--repeats 2] [--epochs 2] [--data ELPV2_FOLDER]

On the seed-sized ELPV subset (244 train / 153 val images), `transferkit train` in a fresh process, the two
settings alternated (TRANSFERKIT_MALLOC=default keeps glibc's): finetune with the tutorial recipe (batch 32,
fp32) and a cold feature-extract run. Records seconds per finetune epoch (history.csv), wall time, system CPU time
and peak RSS per run. Prints, and writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import csv
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (SHARED_WORK, benchmark_parser, elpv, environment_line, run_cli, stratified_subset,  # noqa: E402
                    table, write_section)

SETTINGS = {"kept (the program's)": {}, "glibc defaults": {"TRANSFERKIT_MALLOC": "default"}}


def run(data: Path, out: Path, options: list[str], env: dict) -> dict:
    """One `transferkit train` (common.run_cli) with a cold feature cache: its wall, system CPU seconds and peak
    RSS, and its epochs' seconds."""
    cache = tempfile.mkdtemp(prefix="tk-bench-cache-")
    try:
        wall, usage = run_cli(["train", str(data), "--out", str(out), "--overwrite", *options], cache, env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    with open(out / "history.csv", newline="") as f:
        epochs = [float(row["seconds"]) for row in csv.DictReader(f)]
    return {"wall_s": wall, "sys_s": usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024, "epochs_s": epochs}


def main() -> None:
    ap = benchmark_parser(__doc__, work=SHARED_WORK.with_name("transferkit-bench-malloc"),
                          work_help="a folder of its own for the data and runs, whose caches must start cold")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data", type=Path, help="an ELPV 2-class folder made elsewhere")
    args = ap.parse_args()
    work = Path(args.work)
    machine = environment_line()
    full = args.data or elpv(work / "elpv2")
    data = stratified_subset(full, work / "seed", 244, 153)
    jobs = {"finetune": ["--recipe", "tutorial", "--mode", "finetune", "--epochs", str(args.epochs),
                         "--precision", "fp32"],
            "feature-extract": ["--recipe", "tutorial", "--mode", "feature-extract", "--precision", "fp32"]}
    results = {(job, name): [] for job in jobs for name in SETTINGS}
    for _ in range(args.repeats):
        for job, options in jobs.items():
            for name, env in SETTINGS.items():  # alternated: a slow spell of the box hits both settings
                results[job, name].append(run(data, work / "run", options, env))
    rows = []
    for (job, name), runs in results.items():
        epochs = [s for r in runs for s in r["epochs_s"]]
        rows.append({"run": job, "malloc": name, "runs": len(runs),
                     "median epoch s": statistics.median(epochs) if job == "finetune" else "",
                     "median wall s": statistics.median(r["wall_s"] for r in runs),
                     "median system CPU s": statistics.median(r["sys_s"] for r in runs),
                     "max peak RSS MB": max(r["peak_rss_mb"] for r in runs)})
    ft = {r["malloc"]: r["median epoch s"] for r in rows if r["run"] == "finetune"}
    speedup = ft["glibc defaults"] / ft["kept (the program's)"]
    text = table(rows, list(rows[0]))
    summary = f"Finetune epoch with the kept blocks: {speedup:.2f}x faster than with glibc's defaults."
    print(text, summary, sep="\n\n")
    write_section("malloc", "\n\n".join([
        "## malloc: large freed blocks kept in the process vs glibc's defaults",
        f"Machine: {machine}. Command: `python benchmarks/malloc.py --repeats {args.repeats} --epochs {args.epochs}` "
        "(seed-sized ELPV subset, 244 train / 153 val images; `transferkit train` in a fresh process per run, cold "
        "feature cache, the settings alternated; finetune: `--recipe tutorial --mode finetune --precision fp32`, "
        "batch 32; feature-extract: `--recipe tutorial --mode feature-extract --precision fp32`).",
        text, summary]))
    shutil.rmtree(work / "run", ignore_errors=True)


if __name__ == "__main__":
    main()
