"""A/B of the training loop between two revisions of the source: the same runs, alternated in fresh
processes, their epoch seconds (history.csv: train + val, no data scan or feature extraction) compared as
ratios measured in one sitting. Made for the Trainer/callbacks redesign (issue 12): the loop must do the
same work per step. The cached-feature head run is the sensitive case: its steps take well under a
millisecond, so anything added per step shows there first. fit s is the whole fit() call (after the
imports): the epochs plus what surrounds them (checkpoints, evaluation, figures, report), where a run of
short epochs spent most of its time writing checkpoints until they were written by their cost (session 12).

    python benchmarks/loop_ab.py --base main --rounds 5
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (benchmark_parser, cold_env, elpv, environment_line, stratified_subset, table,  # noqa: E402
                    write_section)

HEAD_SRC = Path(__file__).resolve().parents[1] / "src"
RUNS = {  # name -> TrainConfig options (the tutorial recipe, no search)
    "feature-extract (cached head, batch 8, 40 epochs)": dict(mode="feature-extract", epochs=40, batch_size=8,
                                                               optimizer="adam", scheduler="cosine"),
    "finetune (lite0 at 96 px, batch 16, 1 epoch)": dict(mode="finetune", epochs=1, batch_size=16, image_size=96,
                                                         batchnorm="frozen"),
    # The depthwise gradients' dtype choice (engine/depthwise.py, session 21) shows at the backbone's own size.
    "finetune (lite0 at 224 px, batch 32, BN frozen, 2 epochs)": dict(mode="finetune", epochs=2, batch_size=32,
                                                                      batchnorm="frozen"),
    # A large checkpoint (532 MB): random weights, so nothing is downloaded; the loop does not care.
    "feature-extract vgg11_bn (cached head, 15 epochs)": dict(mode="feature-extract", model="vgg11_bn",
                                                              pretrained=False),
}
CHILD = """
import json, sys, time
from transferkit.config import TrainConfig
from transferkit.engine.fit import fit
t = time.perf_counter()
m = fit(TrainConfig(**json.loads(sys.argv[1])))
print(json.dumps({"loop_s": sum(r["seconds"] for r in m["history"]), "fit_s": time.perf_counter() - t,
                  "best_val_acc": m["best_val_acc"]}))
"""


def export_revision(rev: str, work: Path) -> Path:
    """src/ of git revision `rev`, unpacked under work/ (once per revision)."""
    sha = subprocess.check_output(["git", "rev-parse", "--short", rev], text=True).strip()
    out = work / f"src-{sha}"
    if not out.is_dir():
        out.mkdir(parents=True)
        archive = subprocess.Popen(["git", "archive", rev, "src"], stdout=subprocess.PIPE)
        subprocess.check_call(["tar", "-x", "-C", str(out)], stdin=archive.stdout)
        archive.wait()
    return out / "src"


def run_side(src: Path, options: dict, out: Path, cache: Path) -> dict:
    env = cold_env(cache, PYTHONPATH=str(src))
    config = {**options, "out": str(out), "overwrite": True, "recipe": "tutorial"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--base", default="main", help="git revision to compare this tree's src/ with")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", default="feature-extract", help="comma-separated prefixes of the runs to time")
    args = ap.parse_args()
    work = Path(args.work)
    data = stratified_subset(elpv(work / "elpv2", 2), work / "elpv2-seed-sized", 244, 153)
    sides = {args.base: export_revision(args.base, work), "this tree": HEAD_SRC}
    env, rows = environment_line(), []
    for name, options in RUNS.items():
        if not any(name.startswith(p) for p in args.runs.split(",")):
            continue
        options = {**options, "data": str(data)}
        cache = work / "loop-ab-cache"
        run_side(HEAD_SRC, options, work / "loop-ab-warm", cache)  # features/decoded images cached once, untimed
        times, fits = {side: [] for side in sides}, {side: [] for side in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate who goes first
            for side in order:
                result = run_side(sides[side], options, work / f"loop-ab-{len(times[side])}", cache)
                times[side].append(result["loop_s"])
                fits[side].append(result["fit_s"])
                print(f"{name} | {side}: loop {result['loop_s']:.2f}s, fit {result['fit_s']:.2f}s, "
                      f"best val {result['best_val_acc']:.4f}", flush=True)
        row = {"run": name}
        for what, by_side in (("loop", times), ("fit", fits)):
            base, head = by_side[args.base], by_side["this tree"]
            ratios = [h / b for h, b in zip(head, base)]
            row.update({f"{args.base} {what} s (median)": statistics.median(base),
                        f"this tree {what} s (median)": statistics.median(head),
                        f"{what} ratio this/base (median of pairs)": statistics.median(ratios),
                        f"{what} ratio range": f"{min(ratios):.3f}-{max(ratios):.3f}"})
        rows.append(row)
    text = (f"## Training loop A/B: this tree vs {args.base}\n\n{env}. Data: seed-sized stratified ELPV subset "
            f"(244 train / 153 val, 2 classes). Command: `python benchmarks/loop_ab.py --base {args.base} --rounds "
            f"{args.rounds} --runs {args.runs}`. Each side in a fresh process, alternated, {args.rounds} pairs; "
            "loop s = the epochs in history.csv (train + val); fit s = the whole fit() call after the imports "
            "(epochs, checkpoints, evaluation, figures, report); caches warm.\n\n"
            + table(rows, list(rows[0]) if rows else ["run"]))
    print(text)
    write_section("loop_ab", text)


if __name__ == "__main__":
    main()
