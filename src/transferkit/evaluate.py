"""Evaluate a trained run on labelled images: a class-folder tree, a data root's val/, or a run's
split.csv. Writes evaluation.json (metrics, top losses with paths), confusion.png and top_losses.png.

Test-time augmentation averages softmax over views of each image: the horizontal flip, or all eight
symmetries of the square when the run declared them safe for its data (dihedral views in training).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import DataError, UsageError
from .io import atomic_write_json
from .run_folder import RunFolder

log = logging.getLogger(__name__)

TTA_CHOICES = ("auto", "flip", "dihedral")
# Indices into data.transforms.dihedral: 0 is the image itself, 4 its horizontal mirror.
TTA_VIEWS = {"none": (0,), "flip": (0, 4), "dihedral": tuple(range(8))}


def folder_items(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) for every image under FOLDER/<class>/, labels in the checkpoint's class order. A class folder
    with no images is skipped with a warning, as training drops it; one with images of a class the model does
    not know is refused."""
    from .data.folders import TEST_DIR_NAMES, TRAIN_DIR_NAMES, case_twins, holds_runs

    # A run folder (train DATA --out DATA/run) is no class: training's scan skipped it too
    subdirs = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and _is_folder(e)
                     and not holds_runs(Path(e.path)))
    if not subdirs:
        raise DataError(f"{folder} has no class subfolders; evaluation needs {folder}/<class>/<image>")
    found = {name: _images_in(folder / name) for name in subdirs}
    unknown = [name for name in subdirs if name not in classes and found[name]]
    if unknown:
        renames = [f"{name} → {known}" for name, known in case_twins(unknown, classes).items()]
        hint = f"; rename {', '.join(renames)} (class names are case-sensitive)" if renames else ""
        splits = [name for name in unknown if name.lower() in TEST_DIR_NAMES]  # Training/ and Testing/: a data root
        trains = [name for name in unknown if name.lower() in TRAIN_DIR_NAMES]  # DATA/train alone: no val/ here
        if splits and not renames:
            hint = f"; to score the held-out split, pass {folder / splits[0]}"
        elif trains and not renames:
            hint = (f"; {folder} has no val/ folder: pass {folder / trains[0]} to score its images the run did not "
                    "train on (its val split, where the run drew one from it)")
        raise DataError(f"class folder(s) {', '.join(unknown)} in {folder} are not classes of this model "
                        f"({', '.join(classes)}){hint}")
    empty = [name for name in subdirs if not found[name]]
    if empty:
        log.warning("skipped class folder(s) with no images in %s: %s", folder, ", ".join(empty))
    items = [(path, classes.index(name)) for name in subdirs if found[name] for path in found[name]]
    if not items:
        raise DataError(f"no images found under {folder}")
    return items


def _is_folder(entry: os.DirEntry) -> bool:
    """entry.is_dir(), where a symlink that loops (is_dir raises ELOOP for it) is no folder, as for the data scan."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _images_in(folder: Path) -> list[str]:
    from .inference import expand_inputs

    try:
        return expand_inputs([str(folder)])
    except DataError:  # no image files in it
        return []


def manifest_items(manifest: Path, classes: list[str], split: str = "val", data_root: str | None = None,
                   moved_to: str | Path | None = None) -> list[tuple[str, int]]:
    """The samples of one split of a run's split.csv, relative to the data root that run trained on (or
    `moved_to`: where that folder is now)."""
    from .config import TrainConfig
    from .data.folders import read_manifest

    config = RunFolder(manifest.parent).config
    root = moved_to or (TrainConfig.from_yaml(config).data if config.is_file() else data_root)
    if root is None:
        raise DataError(f"cannot tell which data folder {manifest} refers to (no config.yaml with data: beside it)")
    scan = read_manifest(manifest, root)
    extra = sorted(set(scan.classes) - set(classes))
    if extra:
        raise DataError(f"{manifest} names class(es) {', '.join(extra)} that this model does not know")
    samples = scan.val if split == "val" else scan.train
    # This split's missing files alone (train and val are read one at a time), named, not just counted
    missing = [p["path"] for p in scan.problems.get("missing", []) if p.get("split") == split]
    if missing:
        log.warning("%d %s files listed in %s are missing (skipped): %s", len(missing), split, manifest,
                    ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return [(path, classes.index(scan.classes[label])) for path, label in samples]


def resolve_items(target: str | Path, classes: list[str], meta: dict) -> tuple[list[tuple[str, int]], str]:
    """What DATA_OR_SPLIT means: a split.csv (its val split), a data root with a val folder (as training finds
    it: data/folders/walk.py split_folders), or class folders."""
    from .data.folders import split_folders

    target = Path(target)
    if target.is_file() and target.suffix.lower() == ".csv":
        return manifest_items(target, classes, "val", meta.get("config", {}).get("data")), f"{target} (val)"
    if target.is_dir():
        folder = split_folders(target).get("val", target)
        return folder_items(folder, classes), str(folder)
    raise UsageError(f"{target} is neither an image folder nor a split.csv")


def view_probs(predictor, paths: list[str], views: tuple[int, ...], batch_size: int = 32):
    """Softmax per view, shape (V, N, C), and per-path read errors (NaN rows)."""
    import torch

    from .data.transforms import dihedral
    from .inference import batched_proba

    n_classes = len(predictor.classes)

    def infer(tensors):
        x = torch.stack(tensors)
        return np.concatenate([predictor.probs_of(list(dihedral(x, k))) for k in views], axis=1)

    with torch.inference_mode():
        flat, errors = batched_proba(paths, n_classes * len(views), predictor.preprocess, infer, batch_size,
                                     desc="evaluating")
    return flat.reshape(len(paths), len(views), n_classes).transpose(1, 0, 2), errors


def tta_kind(tta: str | None, config: dict) -> str:
    """`auto` takes all eight symmetries only where the run declared them safe for its data (cached dihedral
    views, or the dihedral augmentation), else the flip."""
    if tta in (None, "none"):
        return "none"
    if tta not in TTA_CHOICES:
        raise UsageError(f"--tta must be one of {', '.join(TTA_CHOICES)}, not {tta!r}")
    if tta == "auto":
        declared = ((config.get("view_kind") == "dihedral" and int(config.get("views", 1)) > 1)
                    or config.get("augment") == "dihedral" or config.get("probe_views") == "dihedral"
                    or bool(config.get("rotation_safe")))
        return "dihedral" if declared else "flip"
    return tta


def views_in_model(meta: dict) -> tuple[int, ...]:
    """The dihedral views a model averages its logits over itself (a probe's --probe-views), else (0,)."""
    return tuple(int(v) for v in (meta.get("probe") or {}).get("views", (0,)))


def _absorbs(model_views: tuple[int, ...], tta_views: tuple[int, ...]) -> bool:
    """True where test-time views cannot change the model's own average: each maps the model's views onto
    themselves (the mirror of a probe over the image and its mirror, any view of one over all eight), so every
    TTA view would score the same probabilities again, at the model's cost each."""
    from .data.transforms import dihedral_after

    own = set(model_views)
    return all({dihedral_after(j, k) for j in own} == own for k in tta_views)


def evaluate_run(run: str | Path, target: str | Path, tta: str | None = None, out: str | Path | None = None,
                 batch_size: int = 32, include_train: bool = False) -> dict:
    """Metrics of RUN's best checkpoint on TARGET; written to OUT (default: the run folder).
    Images the run trained on are left out unless include_train (ev["trained_on"] says how many)."""
    from .engine.checkpoint import resolve_checkpoint
    from .predict import Predictor
    from .results.metrics import classification_metrics, evaluation_summary

    checkpoint = resolve_checkpoint(run)
    predictor = Predictor(checkpoint)
    classes = predictor.classes
    items, source = resolve_items(target, classes, predictor.meta)
    items, trained_on = _without_training_images(items, checkpoint, predictor.meta, include_train)
    if not items:
        raise DataError(f"every image in {source} was used to train this run; evaluate on other images "
                        "(e.g. RUN/split.csv for its val split) or pass --include-train")
    kind = tta_kind(tta, predictor.meta.get("config", {}))
    in_model = views_in_model(predictor.meta)
    absorbed = kind if kind != "none" and _absorbs(in_model, TTA_VIEWS[kind]) else None
    if absorbed:
        log.info("--tta %s: the model already averages over its %d views, which %s views leave as they are; "
                 "scored once", absorbed, len(in_model), absorbed)
        kind = "none"
    paths = [p for p, _ in items]
    cached = cached_view_probs(predictor, paths, TTA_VIEWS[kind])
    per_view, errors, features = cached or (*view_probs(predictor, paths, TTA_VIEWS[kind], batch_size), None)
    ok = np.array([e is None for e in errors])
    if not ok.any():
        raise DataError(f"none of the {len(paths)} images in {source} could be read")
    y = np.array([label for _, label in items])[ok]
    kept = [p for p, good in zip(paths, ok) if good]
    folder = Path(out) if out else checkpoint.parent
    ev = evaluation_summary(y, per_view[:, ok].mean(axis=0), classes, paths=kept, split=source,
                            checkpoint=_as_seen_from(folder, checkpoint), trained_on=trained_on, features=features,
                            skipped=[{"path": p, "error": e} for p, e in zip(paths, errors) if e is not None],
                            tta={"kind": kind, "views": len(TTA_VIEWS[kind]),
                                 **({"in_model": absorbed, "model_views": len(in_model)} if absorbed else {})})
    if kind != "none":
        plain = classification_metrics(y, per_view[0, ok], classes)
        ev["tta"].update(accuracy_without=plain["accuracy"], accuracy_with=ev["accuracy"],
                         gain=ev["accuracy"] - plain["accuracy"],
                         balanced_accuracy_without=plain["balanced_accuracy"])
    ev["sixteen_bit_white"] = predictor.preprocessing.sixteen_bit_white  # the thumbnails read images so
    _write(ev, classes, folder)
    return ev


def _as_seen_from(folder: Path, path: Path) -> str:
    """`path` relative to `folder` where it lies inside it (the run folder may move), else as it is."""
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def _without_training_images(items, checkpoint: Path, meta: dict, include_train: bool):
    """Items minus those the run trained on (its split.csv's train rows, matched by resolved path, else by
    content: a copy or moved copy of the data folder holds them under other paths): scoring them would flatter
    the model. Returns the items kept and the counts for the report."""
    manifest = RunFolder(checkpoint.parent).split
    trained = []
    if manifest.is_file():
        try:
            trained = [os.path.realpath(p) for p, _ in
                       manifest_items(manifest, meta["classes"], "train", meta.get("config", {}).get("data"))]
        except DataError as exc:
            log.warning("cannot tell which images the run trained on (%s); none are left out", exc)
    by_path = set(trained)
    seen = [os.path.realpath(p) in by_path for p, _ in items]
    if trained and not any(seen) and not _under(items, meta.get("config", {}).get("data")):
        # another folder than the run's data: maybe a copy of it, whose files only their bytes tell
        by_content = _same_content(trained, [p for p, _ in items])
        seen = [p in by_content for p, _ in items]
    n = sum(seen)
    if include_train or not n:
        return items, {"left_out": 0, "included": n, "known": bool(trained)}
    return [it for it, s in zip(items, seen) if not s], {"left_out": n, "included": 0, "known": True}


def _under(items, root) -> bool:
    """Whether the images are in the run's data folder (its test/ or val/ as the run saw it): matched by path."""
    if not root or not items:
        return False
    top = os.path.realpath(root)
    return os.path.realpath(items[0][0]).startswith(top.rstrip(os.sep) + os.sep)


def _same_content(trained: list[str], paths: list[str]) -> set[str]:
    """The paths whose bytes equal a training file's. Only files of a size that some training file has are
    hashed (a stat each otherwise), so a folder of other images costs no more than before."""
    from .data.folders import file_sha256

    def sizes(files):
        out = {}
        for f in files:
            try:
                out[f] = os.path.getsize(f)
            except OSError:  # gone meanwhile: cannot match
                pass
        return out

    def digest(f):
        try:
            return file_sha256(f)
        except OSError:
            return None

    train_sizes, sizes_here = sizes(trained), sizes(paths)
    shared = set(train_sizes.values()) & set(sizes_here.values())
    hashes = {digest(f) for f, n in train_sizes.items() if n in shared} - {None}
    return {f for f, n in sizes_here.items() if n in shared and digest(f) in hashes}


def cached_view_probs(predictor, paths: list[str], views: tuple[int, ...]):
    """view_probs from the feature cache, for a feature-extract or linear-probe run that cached its features
    (the predictor's FrozenSplit): its backbone is the cached one, untouched by training, so only what was trained
    runs on what is cached (the run's own val features are there), and missing features are computed once and
    cached. A probe averages its own views: view j of test-time view k is the cached view dihedral_after(j, k).
    None where that does not hold (the caller runs the whole network)."""
    import torch

    from .data.transforms import dihedral_after
    from .engine.features import View, cached_features, store_for

    split, engine = predictor.split, predictor.frozen_engine
    if engine is None:
        return None
    store = store_for(split.identity)
    # Missing features are computed as training computed them: on the engine chosen for this machine (the
    # export and the choice are the run's where they are still cached), eager fp32 torch only as its reference.
    needed = sorted({dihedral_after(j, k) for k in views for j in split.views})
    with torch.inference_mode():
        features, ok, stats = cached_features(engine, store, paths, [View(m) for m in needed],
                                              predictor.preprocessing, desc="evaluation features",
                                              left_out_of="the evaluation")
        per_view = np.full((len(views), len(paths), len(predictor.classes)), np.nan, dtype=np.float32)
        if features is not None:
            for v, k in enumerate(views):
                own = [features[:, needed.index(dihedral_after(j, k))] for j in split.views]
                logits = split.logits(split.head_inputs(own))
                per_view[v, np.flatnonzero(ok)] = torch.softmax(logits.float(), dim=1).numpy()
    # Each skipped file's own reason, as predict's rows and the uncached path give it (was "cannot be read" for all)
    why = stats.get("errors", {})
    errors = [None if good else f"{path}: {why[path]}" if path in why else "cannot be read"
              for path, good in zip(paths, ok)]
    return per_view, errors, {"cached": stats["hits"], "computed": stats["computed"]}


def _write(ev: dict, classes: list[str], folder: Path) -> None:
    from .results import plots

    atomic_write_json(RunFolder(folder).evaluation, ev)
    plots.plot_evaluation(ev, classes, folder)
    ev["written_to"] = str(folder)
