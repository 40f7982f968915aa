"""evaluate: metrics equal scikit-learn's on the same predictions, TTA, inputs, figures, CLI; --tensorboard."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score
from tiny_run import train_tiny

from transferkit.cli import main
from transferkit.errors import DataError
from transferkit.evaluate import TTA_VIEWS, evaluate_run, tta_kind, view_probs
from transferkit.predict import Predictor


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("evaluate"), tensorboard=True)


def test_metrics_equal_sklearn_on_the_same_predictions(tiny_run, tmp_path):
    data, run = tiny_run
    ev = evaluate_run(run, data, out=tmp_path)
    paths = [r["path"] for r in ev["top_losses"]]  # all 12 images (fewer than 16 top losses)
    assert ev["n"] == 12 and sorted(paths) == sorted(str(p) for p in (data / "val").rglob("*.png"))
    probs, _ = Predictor(run).predict_proba(paths)
    y = np.array([0 if "/ants/" in p else 1 for p in paths])
    pred = probs.argmax(1)
    assert ev["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert ev["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert ev["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert ev["roc_auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-6)
    assert ev["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert ev["tta"] == {"kind": "none", "views": 1}
    for name in ("evaluation.json", "confusion.png", "top_losses.png"):
        assert (tmp_path / name).stat().st_size > 1000 or name == "evaluation.json"
    assert json.loads((tmp_path / "evaluation.json").read_text())["accuracy"] == ev["accuracy"]


def test_training_and_evaluate_write_evaluation_json_in_one_shape(tiny_run, tmp_path):
    data, run = tiny_run
    trained = json.loads((run / "evaluation.json").read_text())
    evaluate_run(run, data / "val", out=tmp_path)
    evaluated = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(trained) == set(evaluated)
    assert trained["split"] == "val" and trained["checkpoint"] == "best.safetensors"  # beside evaluation.json
    assert evaluated["checkpoint"] == str(run / "best.safetensors")  # written elsewhere: the path as given
    assert trained["skipped"] == [] and trained["tta"] == evaluated["tta"] == {"kind": "none", "views": 1}
    # the same model on the same images: the best epoch's val predictions are what evaluate computes
    assert trained["n"] == evaluated["n"] == 12 and trained["accuracy"] == pytest.approx(evaluated["accuracy"])


def test_tta_averages_the_views_and_reports_the_gain(tiny_run, tmp_path):
    data, run = tiny_run
    ev = evaluate_run(run, data / "val", tta="dihedral", out=tmp_path)
    plain = evaluate_run(run, data / "val", out=tmp_path)
    tta = ev["tta"]
    assert tta["kind"] == "dihedral" and tta["views"] == 8
    assert tta["accuracy_without"] == pytest.approx(plain["accuracy"])
    assert tta["gain"] == pytest.approx(ev["accuracy"] - plain["accuracy"])
    predictor = Predictor(run)
    paths = sorted(str(p) for p in (data / "val").rglob("*.png"))[:3]
    per_view, _ = view_probs(predictor, paths, TTA_VIEWS["flip"])
    flipped = [predictor.probs_of([predictor.preprocess(p).flip(-1)])[0] for p in paths]
    np.testing.assert_allclose(per_view[1], np.stack(flipped), atol=1e-5)


def test_the_predictor_feeds_the_network_what_the_eval_transform_gives(tiny_run, tmp_path):
    """Prediction crops uint8 on reader threads and normalizes whole batches: bit for bit the eval transform's
    input, for a colour file, a grey file and a PIL image in memory."""
    import torch
    from PIL import Image

    from transferkit.data.images import load_rgb
    from transferkit.data.transforms import eval_transform, normalize_batch

    data, run = tiny_run
    predictor = Predictor(run)
    colour = sorted((data / "val").rglob("*.png"))[0]
    Image.open(colour).convert("L").resize((70, 45)).save(tmp_path / "grey.png")
    reference = eval_transform(predictor.preprocessing)
    for item in (str(colour), str(tmp_path / "grey.png"), Image.open(colour)):
        crop = predictor.preprocess(item)
        assert crop.dtype == torch.uint8 and crop.shape[0] == 3
        image = item.convert("RGB") if isinstance(item, Image.Image) else load_rgb(item)
        expected = reference(image)
        assert torch.equal(normalize_batch(crop[None], predictor.preprocessing)[0], expected)
        with torch.inference_mode():
            assert np.array_equal(predictor.probs_of([crop]), predictor.probs_of([expected]))


def test_a_class_folder_named_in_another_case_is_refused_with_the_rename(tmp_path):
    from transferkit.evaluate import folder_items

    for name in ("Ants", "bees", "wasps"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"are not classes of this model \(ants, bees\); rename Ants → ants "
                                        r"\(class names are case-sensitive\)$"):
        folder_items(tmp_path, ["ants", "bees"])


def test_a_symlink_loop_beside_the_class_folders_is_no_class(tmp_path):
    """A loop (l1 -> l2 -> l1) among the class folders raised OSError (ELOOP) out of evaluate: a traceback."""
    import os

    from transferkit.evaluate import folder_items

    (tmp_path / "ants").mkdir()
    (tmp_path / "ants" / "a.png").write_bytes(b"")
    os.symlink("l2", tmp_path / "l1")
    os.symlink("l1", tmp_path / "l2")
    assert folder_items(tmp_path, ["ants", "bees"]) == [(str(tmp_path / "ants" / "a.png"), 0)]


def test_a_data_root_of_training_and_testing_points_at_its_test_folder(tmp_path):
    from transferkit.evaluate import folder_items

    for name in ("Training", "Testing"):
        (tmp_path / name / "ants").mkdir(parents=True)
        (tmp_path / name / "ants" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=f"to score the held-out split, pass {tmp_path / 'Testing'}$"):
        folder_items(tmp_path, ["ants", "bees"])


def test_a_data_root_of_a_train_folder_alone_points_at_it(tmp_path):
    """DATA/train/<class>/* without val/ (a run draws its val split from it): `evaluate RUN DATA` said only that
    `train` is no class of the model."""
    from transferkit.evaluate import folder_items

    (tmp_path / "train" / "ants").mkdir(parents=True)
    (tmp_path / "train" / "ants" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=f"has no val/ folder: pass {tmp_path / 'train'} to score its images the "
                                        "run did not train on"):
        folder_items(tmp_path, ["ants", "bees"])


def test_test_time_views_that_a_probe_already_averages_over_are_not_scored_again():
    from transferkit.data.transforms import dihedral, dihedral_after
    from transferkit.evaluate import _absorbs

    x = np.random.default_rng(0).random((2, 5, 5))
    for j in range(8):
        for k in range(8):
            np.testing.assert_array_equal(dihedral(dihedral(x, k), j), dihedral(x, dihedral_after(j, k)))
    flip, turns, every = TTA_VIEWS["flip"], (0, 4, 1, 5), TTA_VIEWS["dihedral"]
    assert _absorbs(flip, flip) and _absorbs(turns, flip) and _absorbs(every, every) and _absorbs(every, flip)
    assert not _absorbs((0,), flip) and not _absorbs(flip, every) and not _absorbs(turns, every)


def test_auto_tta_uses_dihedral_views_only_where_the_run_declared_them():
    assert tta_kind("auto", {"view_kind": "dihedral", "views": 4}) == "dihedral"
    assert tta_kind("auto", {"view_kind": "dihedral", "views": 1}) == "flip"
    assert tta_kind("auto", {"view_kind": "random", "views": 4}) == "flip"
    assert tta_kind("auto", {"views": 1, "augment": "dihedral"}) == "dihedral"  # finetune on dihedral crops
    assert tta_kind("auto", {"views": 1, "augment": "standard"}) == "flip"
    assert tta_kind(None, {}) == "none"


def test_split_csv_and_class_checks(tiny_run, tmp_path):
    data, run = tiny_run
    ev = evaluate_run(run, run / "split.csv", out=tmp_path)
    assert ev["n"] == 12 and "split.csv" in ev["split"]
    odd = tmp_path / "odd"
    shutil.copytree(data / "val", odd)
    (odd / "wasps").mkdir()
    shutil.copy(next((odd / "ants").iterdir()), odd / "wasps" / "w.png")
    with pytest.raises(DataError, match="wasps"):
        evaluate_run(run, odd, out=tmp_path)
    (odd / "wasps" / "w.png").unlink()  # an empty folder, as training drops it: skipped with a warning
    (odd / "wasps" / "notes.txt").write_text("no images here")
    assert evaluate_run(run, odd, out=tmp_path)["n"] == len(list(odd.rglob("*.png")))
    shutil.rmtree(odd / "wasps")
    shutil.rmtree(odd / "bees")  # a subset of the classes is fine
    assert evaluate_run(run, odd, out=tmp_path)["per_class"][1]["support"] == 0


def test_training_images_are_recognised_in_a_copy_of_the_data_folder(tiny_run, tmp_path):
    """Matched by path alone, a copy's training images were scored as new ones (0 left out, a flattering score)."""
    data, run = tiny_run
    flat = shutil.copytree(data / "train", tmp_path / "flat")  # train and val images side by side, other paths
    for cls in ("ants", "bees"):
        for image in (data / "val" / cls).iterdir():
            shutil.copy(image, flat / cls / image.name)
    ev = evaluate_run(run, flat, out=tmp_path)
    assert ev["trained_on"] == {"left_out": 16, "included": 0, "known": True} and ev["n"] == 12
    copy = shutil.copytree(data, tmp_path / "copy")
    with pytest.raises(DataError, match="every image"):
        evaluate_run(run, copy / "train", out=tmp_path)


def test_a_run_folder_inside_the_data_folder_is_no_class(tiny_run, tmp_path):
    """train DATA --out DATA/run: training's scan skips the run folder, and so does evaluate."""
    data, run = tiny_run
    folder = shutil.copytree(data / "val", tmp_path / "flat")
    shutil.copytree(run, folder / "myrun")
    assert evaluate_run(run, folder, out=tmp_path)["n"] == 12



def test_unreadable_files_are_skipped_with_their_reasons_not_said_to_leave_training(tiny_run, tmp_path, caplog):
    """A feature-extract run scores from the feature cache: its skipped files said "cannot be read" each in
    evaluation.json, and the log said they "are left out of training", from evaluate."""
    data, run = tiny_run
    folder = shutil.copytree(data / "val", tmp_path / "photos")
    (folder / "ants" / "empty.png").write_bytes(b"")
    (folder / "bees" / "cut.png").write_bytes(sorted((folder / "bees").iterdir())[0].read_bytes()[:100])
    assert Predictor(run).frozen_engine is not None  # the cached path (cached_view_probs)
    with caplog.at_level("WARNING", logger="transferkit"):
        ev = evaluate_run(run, folder, out=tmp_path)
    assert ev["n"] == 12
    empty, cut = str(folder / "ants" / "empty.png"), str(folder / "bees" / "cut.png")
    skipped = {s["path"]: s["error"] for s in ev["skipped"]}
    assert sorted(skipped) == [empty, cut]
    assert skipped[empty] == f"{empty}: empty file (0 bytes)"
    assert skipped[cut].startswith(f"{cut}: corrupt or truncated image")
    assert ev["features"]["cached"] + ev["features"]["computed"] == 12  # the two that failed were counted as computed
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "left out of training" not in warned and "left out of the evaluation" in warned

def test_missing_manifest_files_are_named_once_per_split_read(tiny_run, tmp_path, caplog):
    from transferkit.evaluate import manifest_items

    data, run = tiny_run
    copy = shutil.copytree(data, tmp_path / "data")
    shutil.copy(run / "split.csv", tmp_path / "split.csv")  # no config.yaml beside it: the root is given
    gone = next((copy / "val" / "bees").iterdir())
    gone.unlink()
    with caplog.at_level("WARNING", logger="transferkit"):
        train = manifest_items(tmp_path / "split.csv", ["ants", "bees"], "train", data_root=str(copy))
        val = manifest_items(tmp_path / "split.csv", ["ants", "bees"], "val", data_root=str(copy))
    assert len(val) == 11 and len(train) > 0
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("1 val files listed in") and f"val/bees/{gone.name}" in warned[0]


def test_cli_prints_the_table_and_the_tta_gain(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    assert main(["evaluate", str(run), str(data), "--tta", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "balanced accuracy" in out and "TTA (flip, 2 views)" in out
    assert main(["evaluate", str(run), str(tmp_path / "missing")]) == 2


def test_tensorboard_gets_one_scalar_per_epoch(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run[1] / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("accuracy/val")] == [1, 2]
    assert len(acc.Scalars("loss/train")) == 2
