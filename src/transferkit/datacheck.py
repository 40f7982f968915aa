"""`transferkit data check`: what is wrong with a dataset before anyone trusts a score on it.

Everything comes from two passes that training makes anyway: the data scan (sha256 and a picture
fingerprint of every file, data/folders/) and the cached backbone embedding of every image
(engine/embeddings.py, the feature cache `train` shares). From them:

- exact duplicates (same sha256) and near-duplicates (embedding cosine ≥ near_cosine among each image's
  nearest neighbours, confirmed by thumbnail correlation under mild crops ≥ near_pixel), each pair
  labelled within a class, across classes (a conflict) or across train/val (leakage);
- likely label errors: out-of-fold probabilities of a k-fold logistic-regression probe on the
  standardized embeddings; every image the probe puts in another class, ranked by self-confidence,
  with confident learning's label issues marked (another class's probability reaches that class's
  mean self-confidence);
- outliers: mean cosine distance to the k nearest neighbours, flagged at a robust z-score;
- class balance and image sizes, and the files the scan could not use.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .data.fingerprint import CROP_SOURCE_SIDE, aligned_similarity, crop_thumbnails
from .config import Thresholds  # torch-free: the CLI parser reads its defaults
from .data.folders import CHECK_FILES, INFORMATIONAL_KINDS, DataScan, scan_dataset
from .data.images import load_rgb
from .preprocessing import SIXTEEN_BIT_WHITE
from .threads import in_one_blas_thread
from .errors import DataError
from .io import atomic_write_json

log = logging.getLogger(__name__)

# Kinds of finding that make `data check --strict` fail.
STRICT_KINDS = ("leakage", "conflict")
NEIGHBOURS = 5  # k of the kNN used for near-duplicate candidates and outlier distances
LABEL_NEIGHBOURS = 3  # images of the suggested class shown beside a likely label error


@dataclass
class Items:
    """The usable images in one order (path, class index, split) and their unit embeddings (rows of z)."""

    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    splits: list[str]
    z: np.ndarray
    sixteen_bit_white: int | None = None  # the scan's, for 16-bit grey images (data/folders sixteen_bit_white)

    def describe(self, i: int) -> dict:
        return {"path": Path(os.path.relpath(self.paths[i], self.root)).as_posix(),
                "class": self.classes[self.labels[i]], "split": self.splits[i]}


def run_check(data, out, model: str = "efficientnet_lite0", thresholds: Thresholds | None = None,
              image_size: int | None = None, crop_fraction: float | None = None) -> dict:
    """Check the folder `data`; write OUT/check.json and OUT/check.html; return check.json's content."""
    from .engine.embeddings import embed_images  # torch: imported only when a check runs
    from .results.check_html import write_check_html

    from .config import TrainConfig
    from .models.registry import get_spec

    t0 = time.perf_counter()
    th = (thresholds or Thresholds()).validate()
    # Checked as train checks them, before the scan: --crop-fraction 7 or --image-size 5 was taken and embedded
    # at a size no run trains at, and an unknown model was reported after the scan.
    TrainConfig(data=str(data), model=model, image_size=image_size, crop_fraction=crop_fraction).validate()
    get_spec(model)
    scan = scan_dataset(data)
    samples = scan.train + scan.val
    splits = ["train"] * len(scan.train) + ["val"] * len(scan.val)
    x, ok, stats = embed_images([p for p, _ in samples], scan.digests, model, image_size, crop_fraction,
                                sixteen_bit_white=scan.sixteen_bit_white)
    if x is None:
        raise DataError(f"no image in {data} could be read for the check")
    kept = [i for i, good in enumerate(ok) if good]
    items = Items(scan.root, scan.classes, [samples[i][0] for i in kept],
                  np.array([samples[i][1] for i in kept]), [splits[i] for i in kept], _unit_rows(x),
                  scan.sixteen_bit_white)
    neighbours = _nearest(items.z, NEIGHBOURS)
    report = {
        "data": str(scan.root),
        "classes": scan.classes,
        "split_source": scan.split_source,
        "thresholds": asdict(th),
        "features": {k: stats[k] for k in ("model", "hits", "computed", "seconds", "cache")},
        "summary": _summary(scan, items),
        "sixteen_bit_white": scan.sixteen_bit_white,  # how 16-bit grey images were read (None: none sampled)
        "exact_duplicates": _exact_duplicates(items, scan.digests),
        "near_duplicates": _near_duplicates(items, neighbours, scan.digests, th),
        "label_errors": _label_errors(items, th),
        "label_error_folds": probe_folds(items.labels, th.folds),  # fewer than --folds where a class is smaller
        "outliers": _outliers(items, neighbours, th),
        "unusable_files": _unusable(scan),
    }
    report["counts"] = _counts(report)
    report["listed"] = th.top
    for kind in ("exact_duplicates", "near_duplicates", "label_errors", "outliers"):
        report[kind] = report[kind][:th.top]
    report["seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(out)
    report_json, report_html = (out / name for name in CHECK_FILES)  # a scan of a folder holding OUT skips it
    atomic_write_json(report_json, report)
    write_check_html(report, report_html)
    return {**report, "written_to": str(out)}


def strict_failures(report: dict) -> list[str]:
    """What makes --strict fail: pairs across train/val (leakage) or across classes (conflict)."""
    counts = report["counts"]
    return [f"{counts[f'{kind}_pairs']} {kind} pairs" for kind in STRICT_KINDS if counts[f"{kind}_pairs"]]


# ---------------------------------------------------------------- neighbours


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _nearest(z: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines) of each row's k nearest other rows, best first; blockwise to bound memory."""
    k = min(k, len(z) - 1)
    idx = np.zeros((len(z), k), dtype=np.int64)
    cos = np.zeros((len(z), k), dtype=np.float32)
    if k < 1:
        return idx, cos
    for start in range(0, len(z), block):
        sims = z[start:start + block] @ z.T
        rows = np.arange(sims.shape[0])
        sims[rows, rows + start] = -np.inf  # not its own neighbour
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        idx[start:start + block] = np.take_along_axis(part, order, 1)
        cos[start:start + block] = np.take_along_axis(sims, idx[start:start + block], 1)
    return idx, cos


def _pair(items: Items, i: int, j: int, **scores) -> dict:
    """A duplicate pair; leakage (train vs val) before conflict (two classes) before within_class."""
    if items.splits[i] == "val" and items.splits[j] == "train":
        i, j = j, i  # train first: "this val image is a copy of that train image"
    if items.splits[i] != items.splits[j]:
        relation = "leakage"
    else:
        relation = "conflict" if items.labels[i] != items.labels[j] else "within_class"
    return {"relation": relation, "a": items.describe(i), "b": items.describe(j), **scores}


RELATIONS = ("leakage", "conflict", "within_class")


# ---------------------------------------------------------------- duplicates


def _exact_duplicates(items: Items, digests: dict[str, str]) -> list[dict]:
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, path in enumerate(items.paths):
        if digests.get(path):
            by_sha[digests[path]].append(i)
    pairs = [_pair(items, group[0], other, sha256=digests[items.paths[group[0]]][:16])
             for group in by_sha.values() for other in group[1:]]
    return sorted(pairs, key=lambda p: RELATIONS.index(p["relation"]))


def _near_duplicates(items: Items, neighbours, digests: dict[str, str], th: Thresholds) -> list[dict]:
    """Embedding neighbours at near_cosine or more whose pixels agree at near_pixel (under mild crops);
    byte copies are left to _exact_duplicates. Best pixel agreement first."""
    idx, cos = neighbours
    candidates: dict[tuple[int, int], float] = {}
    for i, row in enumerate(idx):
        for j, c in zip(row, cos[i]):
            a, b = sorted((i, int(j)))
            if c >= th.near_cosine and digests.get(items.paths[a], a) != digests.get(items.paths[b], b):
                candidates[(a, b)] = float(c)
    thumbs = _crop_thumbnails(items, sorted({k for pair in candidates for k in pair}))
    found = []
    for (a, b), c in candidates.items():
        if a in thumbs and b in thumbs:
            pixel = aligned_similarity(thumbs[a], thumbs[b])
            if pixel >= th.near_pixel:
                found.append(_pair(items, a, b, cosine=round(c, 4), pixel=round(pixel, 4)))
    return sorted(found, key=lambda p: (-p["pixel"], -p["cosine"]))


def _crop_thumbnails(items: Items, which: list[int]) -> dict[int, np.ndarray]:
    white = items.sixteen_bit_white or SIXTEEN_BIT_WHITE

    def one(i):
        try:
            return i, crop_thumbnails(load_rgb(items.paths[i], shorter_side=CROP_SOURCE_SIDE, sixteen_bit_white=white))
        except Exception:  # noqa: BLE001 - a file that changed since the scan just drops out
            return i, None

    # Pillow releases the GIL while decoding and resizing: threads use every core.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return {i: t for i, t in pool.map(one, which) if t is not None}


# ---------------------------------------------------------------- label errors


def _label_errors(items: Items, th: Thresholds) -> list[dict]:
    """Images whose out-of-fold probabilities favour another class, ranked by self-confidence p[i, y]
    (lowest first). `confident` marks confident learning's label issues: the most probable class j
    among those with p[i, j] ≥ t_j (t_j = mean p[k, j] over images labelled j) is not the label."""
    probs = out_of_fold_probabilities(items.z, items.labels, len(items.classes), th.folds)
    if probs is None:
        return []
    n, n_classes = probs.shape
    thresholds = np.array([probs[items.labels == j, j].mean() if (items.labels == j).any() else 1.0
                           for j in range(n_classes)])
    above = np.where(probs >= thresholds, probs, -1.0)
    confident = (above.max(1) >= 0) & (above.argmax(1) != items.labels)
    others = probs.copy()
    others[np.arange(n), items.labels] = -1.0
    believed = others.argmax(1)  # the most probable class other than the label
    disagree = probs[np.arange(n), believed] > probs[np.arange(n), items.labels]
    rows = []
    for i in np.nonzero(confident | disagree)[0]:
        y, j = int(items.labels[i]), int(believed[i])
        rows.append({**items.describe(i), "self_confidence": round(float(probs[i, y]), 4),
                     "suggested": items.classes[j], "suggested_probability": round(float(probs[i, j]), 4),
                     "confident": bool(confident[i]), "neighbours_of_suggested": _neighbours_in_class(items, i, j)})
    return sorted(rows, key=lambda r: r["self_confidence"])


@in_one_blas_thread  # (thin products, like the probes')
def out_of_fold_probabilities(z: np.ndarray, labels: np.ndarray, n_classes: int, folds: int) -> np.ndarray | None:
    """(n, n_classes) probabilities, each from a probe that did not see the image; None when a class
    has fewer than 2 images (no fold could hold it out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_splits = probe_folds(labels, folds)
    if n_splits is None:
        log.warning("label-error search skipped: a class has only 1 image")
        return None
    if n_splits < folds:
        log.warning("label-error probe: %d folds, not %d: the smallest class has %d images", n_splits, folds, n_splits)
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=0)
    # Strong regularisation: on ELPV C=0.01 is both faster to fit and more accurate out of fold than 0.1.
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=300))
    present = np.unique(labels)
    probs = np.zeros((len(labels), n_classes))
    probs[:, present] = cross_val_predict(probe, z, labels, cv=cv, method="predict_proba")
    return probs


def probe_folds(labels: np.ndarray, folds: int) -> int | None:
    """The folds the label-error probe uses: --folds, or fewer where the smallest class has fewer images (each
    fold must hold one of its images out); None where a class has only 1 image (no search)."""
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min()) if len(labels) else 0
    return min(folds, smallest) if smallest >= 2 else None


def label_error_method(report: dict) -> str:
    """How the label errors were searched, for the summary and check.html."""
    folds = report.get("label_error_folds", report["thresholds"]["folds"])  # a check.json from before: --folds
    return f"{folds}-fold linear probe" if folds else "not searched: a class has only 1 image"


def _neighbours_in_class(items: Items, i: int, label: int) -> list[dict]:
    members = np.nonzero(items.labels == label)[0]
    members = members[members != i]
    best = members[np.argsort(-(items.z[members] @ items.z[i]))[:LABEL_NEIGHBOURS]]
    return [items.describe(int(k)) for k in best]


# ---------------------------------------------------------------- outliers and summary


def _outliers(items: Items, neighbours, th: Thresholds) -> list[dict]:
    """Images far from all others: mean cosine distance to the k nearest, robust z ≥ outlier_z."""
    idx, cos = neighbours
    if idx.shape[1] == 0:
        return []
    distance = 1.0 - cos.mean(1)
    median = float(np.median(distance))
    spread = 1.4826 * float(np.median(np.abs(distance - median))) or 1e-12  # MAD as a standard deviation
    z = (distance - median) / spread
    rows = [{**items.describe(i), "knn_distance": round(float(distance[i]), 4), "robust_z": round(float(z[i]), 2),
             "nearest_class": items.classes[int(np.bincount(items.labels[idx[i]]).argmax())]}
            for i in np.nonzero(z >= th.outlier_z)[0]]
    return sorted(rows, key=lambda r: -r["robust_z"])


def _summary(scan: DataScan, items: Items) -> dict:
    sizes = [scan.fingerprints[p].size for p in items.paths if p in scan.fingerprints]
    widths, heights = (np.array([s[k] for s in sizes]) for k in (0, 1))
    common = Counter(sizes).most_common(3)
    return {
        "images": len(items.paths),
        "counts": scan.class_counts(),
        "imbalance": round(scan.imbalance_ratio(), 3),
        "sizes": {
            "width": _range(widths), "height": _range(heights), "distinct": len(set(sizes)),
            "most_common": [{"size": f"{w}x{h}", "images": n} for (w, h), n in common],
        } if sizes else {},
    }


def _range(values: np.ndarray) -> dict:
    return {"min": int(values.min()), "median": int(np.median(values)), "max": int(values.max())}


def _unusable(scan: DataScan) -> list[dict]:
    return [{"kind": kind, **row} for kind, rows in scan.problems.items()
            if kind not in INFORMATIONAL_KINDS for row in rows]


def _counts(report: dict) -> dict:
    pairs = report["exact_duplicates"] + report["near_duplicates"]
    by_relation = Counter(p["relation"] for p in pairs)
    return {
        "exact_duplicate_pairs": len(report["exact_duplicates"]),
        "near_duplicate_pairs": len(report["near_duplicates"]),
        **{f"{r}_pairs": by_relation.get(r, 0) for r in RELATIONS},
        "val_images_with_train_copy": len({p["b"]["path"] for p in pairs if p["relation"] == "leakage"}),
        "label_errors": sum(r["confident"] for r in report["label_errors"]),
        "label_disagreements": len(report["label_errors"]),
        "outliers": len(report["outliers"]),
        "unusable_files": len(report["unusable_files"]),
    }


SUMMARY_CLASSES = 12  # classes named one by one in the summary's first line; past them, the range of their sizes


def summary_lines(report: dict) -> list[str]:
    """The one-screen terminal summary."""
    c, th, s = report["counts"], report["thresholds"], report["summary"]
    counts = s["counts"]
    if len(report["classes"]) <= SUMMARY_CLASSES:
        per_class = "train/val per class: " + ", ".join(f"{name} {counts['train'][name]}/{counts['val'][name]}"
                                                        for name in report["classes"])
    else:  # 60 classes made this line 1,700 characters: a screen of its own
        train, val = ([counts[split][name] for name in report["classes"]] for split in ("train", "val"))
        span = [f"{min(n)}" if min(n) == max(n) else f"{min(n)}-{max(n)}" for n in (train, val)]
        per_class = f"{len(train)} classes of {span[0]} train / {span[1]} val images (check.html lists each)"
    feats = report["features"]
    lines = [
        f"checked {s['images']} images in {report['data']} ({report['split_source']} split; "
        f"{per_class}; largest/smallest class {s['imbalance']:.2f})",
        f"features: {feats['model']}, {feats['hits']} cached, {feats['computed']} computed; "
        f"check took {report['seconds']:.1f}s",
    ]
    if s.get("sizes"):
        w, h = s["sizes"]["width"], s["sizes"]["height"]
        lines.append(f"image sizes: width {w['min']}-{w['max']} (median {w['median']}), height {h['min']}-{h['max']} "
                     f"(median {h['median']}), {s['sizes']['distinct']} distinct")
    lines += [
        f"exact duplicates: {c['exact_duplicate_pairs']} pairs (same sha256)",
        f"near-duplicates:  {c['near_duplicate_pairs']} pairs (embedding cosine >= {th['near_cosine']}, "
        f"thumbnail correlation >= {th['near_pixel']} under mild crops)",
        f"  of all duplicate pairs: {c['leakage_pairs']} across train/val (leakage, {c['val_images_with_train_copy']} "
        f"val images), {c['conflict_pairs']} across classes (conflict), {c['within_class_pairs']} within a class",
        f"likely label errors: {c['label_errors']} by confident learning, {c['label_disagreements']} where the "
        f"linear probe favours another class ({label_error_method(report)})",
        f"outliers: {c['outliers']} (kNN distance robust z >= {th['outlier_z']}); unusable files: {c['unusable_files']}",
    ]
    dropped = [row["path"] for row in report["unusable_files"] if row["kind"] == "empty_class"]
    if dropped:  # a class that is gone is easy to miss in the per-class counts
        lines.append(f"dropped {len(dropped)} class folder{'s' * (len(dropped) > 1)} with no usable image: "
                     f"{', '.join(dropped)} (their files are listed under unusable files)")
    for kind, title in (("label_errors", "worst label error"), ("outliers", "worst outlier")):
        if report[kind]:
            row = report[kind][0]
            extra = f", looks like {row['suggested']}" if kind == "label_errors" else ""
            lines.append(f"{title}: {row['path']} ({row['class']}{extra})")
    return lines


# ---------------------------------------------------------------- the hint `train` prints

LEAKAGE_KINDS = ("duplicate_across_splits", "same_picture_across_splits")
CONFIDENT_MISTAKE = 0.95  # a val image the model gets wrong with this much confidence may be mislabelled
MANY_CONFIDENT_MISTAKES = 5


def train_hint(run_dir) -> str | None:
    """One line for `train` to print when its run shows leakage (copies of train images in val, from the
    scan) or many confident mistakes on val (likely label errors); None when neither."""
    from .run_folder import RunFolder

    run = RunFolder(run_dir)
    report, evaluation = RunFolder.read_json(run.data_report), RunFolder.read_json(run.evaluation)
    if report is None or evaluation is None:
        return None
    problems, losses = report.get("problems", {}), evaluation.get("top_losses", [])
    leaked = sum(len(problems.get(kind, ())) for kind in LEAKAGE_KINDS)
    # top_losses holds the val images with the highest loss, right ones too where few are wrong
    confident = sum(1 for row in losses if row.get("predicted") != row.get("true")
                    and row.get("probability_of_predicted", 0) >= CONFIDENT_MISTAKE)
    found = []
    if leaked:
        found.append(f"{leaked} val images are copies of train images (leakage: val accuracy is optimistic)")
    if confident >= MANY_CONFIDENT_MISTAKES:
        more = "at least " if confident == len(losses) else ""  # the list is capped (16): there may be more
        found.append(f"{more}{confident} val images are misclassified with ≥{CONFIDENT_MISTAKE:.0%} confidence "
                     "(possible label errors)")
    if not found:
        return None
    from .io import pasteable_path

    folder = pasteable_path(report["root"]) if report.get("root") else "DATA"
    return f"data: {'; '.join(found)}; run `transferkit data check {folder}` to see them"
