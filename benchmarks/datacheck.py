"""`transferkit data check` on ELPV (2 classes): what it finds, how long it takes warm, and whether a
group-aware split changes the val accuracy of a cheap feature-extract recipe.

    python benchmarks/datacheck.py [--data /tmp/elpv2] [--work DIR] [--no-train]

1. Materializes ELPV (`transferkit data elpv DATA --classes 2`) if missing, runs `transferkit data check`
   twice (the first may extract features; the second is the warm timing), and reads check.json.
2. Relates the findings to ELPV's own labels (elpv.json): the label is a defect probability of 0, 1/3,
   2/3 or 1 (experts unsure at 1/3 and 2/3), so flagged label errors are compared with that.
3. Makes a group-aware ELPV split that keeps look-alike cells (thumbnail correlation >= 0.995) on one side
   (`transferkit data elpv DIR --classes 2 --group-correlation 0.995`), and trains the same recipe, same
   seed on both splits: `transferkit train DIR --recipe tutorial --mode feature-extract --epochs 15`.
Records counts and timings (section datacheck) and both accuracies (section datacheck_split) in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_WORK, benchmark_parser, environment_line, table, write_section  # noqa: E402

GROUP_CORRELATION = "0.995"
RECIPE = ["--recipe", "tutorial", "--mode", "feature-extract", "--epochs", "15"]  # no recipe search: one fixed run


def transferkit(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transferkit", *args], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = benchmark_parser(__doc__, work=SHARED_WORK / "datacheck")
    ap.add_argument("--data", default="/tmp/elpv2")
    ap.add_argument("--no-train", action="store_true", help="skip the two training runs (section datacheck_split)")
    ap.add_argument("--no-check", action="store_true", help="skip the check runs (section datacheck)")
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    if not (data / "train").is_dir():
        transferkit("data", "elpv", str(data), "--classes", "2")
    if not args.no_check:
        _check(data, work)
    if not args.no_train:
        lines = [f"Machine: {environment_line()} (box shared with other engineers' jobs).", ""]
        lines += _split_experiment(data, work)
        write_section("datacheck_split", "## Group-aware ELPV split: val accuracy\n\n" + "\n".join(lines))
        print("\n".join(lines))


def _check(data: Path, work: Path) -> None:
    machine = environment_line()
    check_out = work / "check"
    first = transferkit("data", "check", str(data), "--out", str(check_out))
    warm = transferkit("data", "check", str(data), "--out", str(check_out))
    timed = json.loads((check_out / "check.json").read_text())
    # Every finding listed (a large check.html), for the counts at other thresholds below.
    transferkit("data", "check", str(data), "--out", str(work / "check-all"), "--top", "100000")
    report = json.loads((work / "check-all" / "check.json").read_text())
    lines = [f"Machine: {machine} (box shared with other engineers' jobs).", "",
             f"`transferkit data check {data}`: first run {first:.1f} s wall; warm run {warm:.1f} s wall "
             f"({timed['features']['hits']} features cached, {timed['features']['computed']} computed), of which "
             f"{timed['seconds']:.1f} s inside the check (process start and imports excluded).", ""]
    lines += _findings(report, data)
    write_section("datacheck", "## Data check on ELPV (2 classes)\n\n" + "\n".join(lines))
    print("\n".join(lines))


def _findings(report: dict, data: Path) -> list[str]:
    c, th = report["counts"], report["thresholds"]
    near = report["near_duplicates"]
    by_pixel = [{"thumbnail correlation >=": t, "near-duplicate pairs": sum(p["pixel"] >= t for p in near),
                 "across train/val": sum(p["pixel"] >= t and p["relation"] == "leakage" for p in near),
                 "val images with a train look-alike": len({p["b"]["path"] for p in near
                                                            if p["pixel"] >= t and p["relation"] == "leakage"}),
                 "across classes": sum(p["pixel"] >= t and p["relation"] == "conflict" for p in near)}
                for t in (th["near_pixel"], 0.995, 0.998, 0.999)]
    probability = _elpv_probabilities(data)
    flagged = [r for r in report["label_errors"] if r["confident"]]
    soft = lambda rows: sum(probability.get(Path(r["path"]).name) in (1 / 3, 2 / 3) for r in rows)  # noqa: E731
    everyone = [{"path": p} for p in probability]
    outlier_classes = Counter(r["class"] for r in report["outliers"])
    closest = [p for p in near if p["pixel"] >= 0.998]
    return [
        f"Exact duplicates (sha256): {c['exact_duplicate_pairs']} pairs. Near-duplicates (embedding cosine >= "
        f"{th['near_cosine']} among 5 nearest neighbours, confirmed by thumbnail correlation under mild crops):",
        "", table(by_pixel, list(by_pixel[0])), "",
        f"The {len(closest)} most alike pairs (thumbnail correlation >= 0.998) at full resolution: mean absolute "
        f"grey difference {_full_resolution_differences(data, closest)} of 255, against "
        f"{_reencoding_differences(data, closest)} between each pair's first cell and its own JPEG (quality 90) "
        f"re-encoding; cell numbers {_numbering_gaps(closest)} apart.", "",
        f"Likely label errors: {c['label_errors']} by confident learning ({c['label_disagreements']} images where the "
        f"{th['folds']}-fold probe favours the other class). Of the {len(flagged)} confident ones, {soft(flagged)} "
        f"({soft(flagged) / max(len(flagged), 1):.0%}) carry a defect probability of 1/3 or 2/3, against "
        f"{soft(everyone) / len(everyone):.0%} of all ELPV cells.",
        f"Outliers (kNN distance, robust z >= {th['outlier_z']}): {c['outliers']} "
        f"({', '.join(f'{n} {k}' for k, n in outlier_classes.most_common())}). Unusable files: {c['unusable_files']}.",
    ]


def _grey(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


def _span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if values else "n/a"


def _full_resolution_differences(data: Path, pairs: list[dict]) -> str:
    grey = [(_grey(data / p["a"]["path"]), _grey(data / p["b"]["path"])) for p in pairs]
    return _span([float(np.abs(a - b).mean()) for a, b in grey if a.shape == b.shape])


def _reencoding_differences(data: Path, pairs: list[dict]) -> str:
    import io

    from PIL import Image

    diffs = []
    for p in pairs:
        buffer = io.BytesIO()
        Image.open(data / p["a"]["path"]).convert("L").save(buffer, "JPEG", quality=90)
        diffs.append(float(np.abs(_grey(data / p["a"]["path"]) - _grey(buffer)).mean()))
    return _span(diffs)


def _numbering_gaps(pairs: list[dict]) -> str:
    def number(side):  # cellNNNN.png
        return int("".join(ch for ch in Path(side["path"]).stem if ch.isdigit()))

    gaps = sorted(abs(number(p["a"]) - number(p["b"])) for p in pairs)
    return f"{gaps[0]}-{gaps[-1]} (median {gaps[len(gaps) // 2]})" if gaps else "n/a"


def _elpv_probabilities(data: Path) -> dict[str, float]:
    manifest = json.loads((data / "elpv.json").read_text())
    return {Path(f["file"]).name: round(f["probability"] * 3) / 3 for f in manifest["files"]}


def _split_experiment(plain: Path, work: Path) -> list[str]:
    grouped = work / "elpv2-grouped"
    if not (grouped / "train").is_dir():
        transferkit("data", "elpv", str(grouped), "--classes", "2", "--group-correlation", GROUP_CORRELATION)
    grouping = json.loads((grouped / "elpv.json").read_text())["duplicate_grouping"]
    rows = []
    for name, folder in (("default ELPV split", plain), (f"group-aware (correlation >= {GROUP_CORRELATION})", grouped)):
        run = work / f"run-{folder.name}"
        wall = transferkit("train", str(folder), *RECIPE, "--out", str(run))
        m = json.loads((run / "metrics.json").read_text())
        rows.append({"split": name, "train / val": f"{m['train_images']} / {m['val_images']}",
                     "best val acc": m["best_val_acc"], "balanced": m["best_val_balanced_accuracy"],
                     "best epoch": m["best_epoch"], "wall s": wall})
    return [
        f"Group-aware split: {grouping['groups']} groups of look-alike cells ({grouping['images_in_groups']} images), "
        f"{grouping['moved']} images moved to the side most of their group was on. Recipe: "
        f"`transferkit train DIR {' '.join(RECIPE)}` (seed 0, defaults otherwise), features from the cache:", "",
        table(rows, list(rows[0])),
    ]


if __name__ == "__main__":
    main()
