"""End-to-end training on tiny generated folders: run folder contents, modes, checkpoints, API, CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_image_folder

import transferkit as tk
from transferkit.cli import main
from transferkit.config import TrainConfig
from transferkit.engine.checkpoint import load_checkpoint, read_meta
from transferkit.engine.fit import fit


def _train(data, out, **kw):
    return fit(TrainConfig(data=str(data), out=str(out), **{"epochs": 1, "lr": 0.01, **kw}))


@pytest.mark.slow
def test_feature_extract_run_folder_is_complete(tiny_folder, tmp_path):
    m = _train(tiny_folder, tmp_path / "run", epochs=2)
    run = tmp_path / "run"
    for name in ["config.yaml", "history.csv", "metrics.json", "split.csv", "data_report.json",
                 "best.safetensors", "best.json", "last.safetensors", "evaluation.json", "report.html"]:
        assert (run / name).exists(), name
    saved = json.loads((run / "metrics.json").read_text())
    for key in ["best_val_acc", "best_epoch", "wall_seconds", "classes", "history"]:
        assert key in saved
    assert saved["classes"] == ["ants", "bees"]
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert set(saved["history"][0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    assert m["source"]["kind"] == "cached-features" and m["trainable_params"] == 1280 * 2 + 2
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert len(rows) == 2
    assert 0.0 <= m["best_val_acc"] <= 1.0
    # The best val accuracy comes with its 95% interval on the val images, in metrics.json and the report.
    interval = saved["best_val_acc_interval"]
    assert interval["images"] == m["val_images"] and interval["low"] <= m["best_val_acc"] <= interval["high"]
    assert "95% interval" in (run / "report.html").read_text()
    # The seeds' recipe keeps the best of its epochs by val accuracy: chosen on val, and the run says so.
    assert saved["best_chosen_on_val"] and saved["last_val_acc"] == saved["history"][-1]["val_acc"]
    assert "chosen on the val images it is scored on" in (run / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("mode,extra", [("finetune", {}), ("partial", {"unfreeze": 1})])
def test_one_epoch_in_each_trainable_mode(tiny_folder, tmp_path, mode, extra):
    m = _train(tiny_folder, tmp_path / mode, mode=mode, **extra)
    assert m["epochs_run"] == 1 and m["trainable_groups"][-1] == "head"
    if mode == "partial":
        assert m["trainable_groups"] == ["group8", "head"]


@pytest.mark.slow
def test_inception_trains_both_heads_with_aux_loss(tmp_path):
    data = make_image_folder(tmp_path / "d", n_train=2, n_val=1, size=80)
    m = _train(data, tmp_path / "run", model="inception_v3", pretrained=False, cache=False, batch_size=4)
    assert m["trainable_params"] == (2048 * 2 + 2) + (768 * 2 + 2)  # fc + AuxLogits.fc


@pytest.mark.slow
def test_flat_folder_gets_a_reproducible_stratified_split(tmp_path):
    flat = tmp_path / "flat"
    make_image_folder(tmp_path / "tmp", n_train=10, n_val=0, with_val=False)
    (tmp_path / "tmp" / "train").rename(flat)
    _train(flat, tmp_path / "r1", val_fraction=0.2, seed=3)
    _train(flat, tmp_path / "r2", val_fraction=0.2, seed=3)
    first = (tmp_path / "r1" / "split.csv").read_text()
    assert first == (tmp_path / "r2" / "split.csv").read_text()
    rows = list(csv.DictReader(first.splitlines()))
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 4 and {r["class"] for r in val} == {"ants", "bees"}


@pytest.mark.slow
def test_same_seed_same_result_on_cpu(tiny_folder, tmp_path):
    a = _train(tiny_folder, tmp_path / "a", mode="finetune", seed=1)
    b = _train(tiny_folder, tmp_path / "b", mode="finetune", seed=1)
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert a["history"][0]["val_loss"] == b["history"][0]["val_loss"]


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_predictions(tiny_folder, tmp_path):
    clf = tk.train(tiny_folder, recipe="tutorial", out=str(tmp_path / "run"), epochs=2, lr=0.01)
    images = sorted(str(p) for p in (tiny_folder / "val").rglob("*.png"))
    again = tk.load(tmp_path / "run" / "best.safetensors")
    assert np.array_equal(clf.predict_proba(images), again.predict_proba(images))
    meta = read_meta(tmp_path / "run")
    assert meta["architecture"] == "efficientnet_lite0" and meta["classes"] == ["ants", "bees"]
    assert meta["preprocessing"]["interpolation"] == "bicubic" and meta["preprocessing"]["mean"] == [0.5] * 3
    model, _ = load_checkpoint(tmp_path / "run")
    assert not model.training


@pytest.mark.slow
def test_the_api_classifies_images_held_in_memory_as_it_does_their_files(tiny_folder, tmp_path):
    """PIL images and numpy arrays (grey, RGB, RGBA, floats in 0-1, a N×H×W×C batch), alone or mixed with paths
    and folders: the probabilities of the same pictures read from files (they were a TypeError and an OSError
    "File name too long"). An array that is no image is a one-line UsageError."""
    from PIL import Image

    from transferkit.errors import UsageError

    clf = tk.train(tiny_folder, recipe="tutorial", mode="linear-probe", out=str(tmp_path / "run"))
    files = sorted((tiny_folder / "val").rglob("*.png"))
    expected = clf.predict_proba(files[:2])
    rgb = [np.asarray(Image.open(f)) for f in files[:2]]
    for images in ([Image.open(f) for f in files[:2]], rgb, np.stack(rgb), [r / 255.0 for r in rgb],
                   [np.dstack([r, np.full(r.shape[:2], 255, np.uint8)]) for r in rgb], [files[0], rgb[1]]):
        assert np.allclose(clf.predict_proba(images), expected, atol=1e-6)
    grey = np.asarray(Image.open(files[0]).convert("L"))
    assert np.allclose(clf.predict_proba(grey), clf.predict_proba(np.dstack([grey] * 3)), atol=1e-6)
    rows = clf.predict_table([rgb[0], tiny_folder / "val"], top_k=1)
    assert [r["path"] for r in rows[:2]] == ["<image 0>", str(files[0])] and len(rows) == 1 + len(files)
    for bad, why in ((np.zeros((3, 40, 40), np.uint8), "channels last"), (rgb[0] * 2.0, "spans"),
                     (rgb[0] > 9, "not bool"),
                     # NaN pixels were read as black, and an all-NaN image "spanned nan to nan"
                     (np.where(rgb[0] > 128, np.nan, rgb[0] / 255.0), "NaN or infinite values"),
                     (np.full((8, 8), np.nan), "holds 64 NaN or infinite values of 64")):
        with pytest.raises(UsageError, match=why):
            clf.predict(bad)


@pytest.mark.slow
def test_checkpoint_has_no_pickle(tiny_folder, tmp_path):
    _train(tiny_folder, tmp_path / "run")
    head = (tmp_path / "run" / "best.safetensors").read_bytes()[:8]
    n = int.from_bytes(head, "little")
    header = json.loads((tmp_path / "run" / "best.safetensors").read_bytes()[8:8 + n])
    assert json.loads(header["__metadata__"]["transferkit"])["format"] == "transferkit-checkpoint"


@pytest.mark.slow
def test_predict_cli_csv_and_json(tiny_folder, tmp_path, capsys):
    _train(tiny_folder, tmp_path / "run", epochs=3)
    assert main(["predict", str(tmp_path / "run"), str(tiny_folder / "val"), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,label,probability,top_k,error,novelty,novel" and len(lines) == 1 + 8
    assert main(["predict", str(tmp_path / "run"), str(tiny_folder / "val" / "bees"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(len(r["top_k"]) == 2 for r in rows)
    assert abs(sum(t["probability"] for t in rows[0]["top_k"]) - 1) < 1e-5


@pytest.mark.parametrize("argv,needle", [
    pytest.param(["train", "{data}", "--model", "resnt18"], "did you mean resnet18", marks=pytest.mark.slow),
    (["train", "{data}", "--mode", "fine-tune"], "--mode"),
    (["train", "{missing}"], "does not exist"),
    pytest.param(["train", "{data}", "--epochs", "0"], "--epochs", marks=pytest.mark.slow),
])
def test_cli_user_errors_are_one_line(tiny_folder, tmp_path, argv, needle):
    argv = [a.format(data=tiny_folder, missing=tmp_path / "nope") for a in argv]
    proc = subprocess.run([sys.executable, "-m", "transferkit", *argv, "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_models_cli_lists_every_backbone(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ["resnet18", "inception_v3", "efficientnet_lite0", "squeezenet1_0"]:
        assert name in out
    assert "efficientnet_lite0" in [l.split()[0] for l in out.splitlines() if "yes" in l]


def test_large_jpegs_predict_as_they_were_scored_in_training(tmp_path):
    """Camera-sized JPEGs are decoded at a reduced scale for the run's features (data/images.py DRAFT_MARGIN):
    predict (torch) and the exported ONNX model read them the same way, so each val image's probability
    equals the one the run scored it with."""
    from PIL import Image

    from transferkit.export import export_run
    from transferkit.onnx_predict import OnnxClassifier

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:900, 0:1200].astype(np.float32)
    for c, name in enumerate(("ants", "bees")):
        for split, n in (("train", 4), ("val", 3)):
            for i in range(n):
                stripes = 128 + 90 * np.sin((xx if c else yy) / (9 + 3 * i))
                rgb = np.stack([stripes, np.roll(stripes, 7 * i, 0), np.full_like(stripes, 60 + 120 * c)], -1)
                rgb += rng.normal(0, 6, rgb.shape)
                path = tmp_path / "data" / split / name / f"{name}{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    run = tmp_path / "run"
    _train(tmp_path / "data", run, recipe="tutorial", mode="feature-extract", image_size=96, epochs=2)
    scored = {r["path"]: r["probability_of_true"]
              for r in json.loads((run / "evaluation.json").read_text())["top_losses"]}
    paths = sorted(scored)
    assert len(paths) == 6
    truth = [0 if "/ants/" in p else 1 for p in paths]
    probs = tk.load(run / "best.safetensors").predict_proba(paths)
    onnx = OnnxClassifier(export_run(run, "onnx")["path"]).predict_proba(paths)[0]
    for p, t, torch_row, onnx_row in zip(paths, truth, probs, onnx):
        # same pixels: equal to float rounding (a full decode in predict moved them by ~2e-3)
        assert torch_row[t] == pytest.approx(scored[p], abs=1e-4)
        assert onnx_row[t] == pytest.approx(scored[p], abs=1e-4)


@pytest.mark.parametrize("mode", ["finetune", "partial"])
def test_a_last_batch_of_one_image_is_left_out_where_batchnorm_trains(mode, tmp_path):
    """9 training images in batches of 4 leave a last batch of one: BatchNorm in training mode cannot normalize
    one image on the 1×1 maps of a 32 px input, and the run ended in "Expected more than 1 value per channel"
    (inception_v3's auxiliary head does the same at its own 299 px). That image is left out of the epoch."""
    data = make_image_folder(tmp_path / "data", n_train=3, n_val=1, classes=("a", "b", "c"))
    m = _train(data, tmp_path / "run", recipe="tutorial", mode=mode, image_size=32, batch_size=4, epochs=2)
    assert [row["epoch"] for row in m["history"]] == [1, 2]


def test_only_a_lone_last_image_with_batchnorm_is_left_out():
    import torch.nn as nn

    from transferkit.engine.sources import drops_a_lone_image

    with_bn, without = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.Linear(4, 2)
    assert drops_a_lone_image(9, 4, with_bn) and drops_a_lone_image(33, 32, with_bn)
    assert not drops_a_lone_image(9, 4, without)  # a linear head normalizes nothing: every image trains
    assert not any(drops_a_lone_image(n, 4, with_bn) for n in (1, 4, 8, 10, 11))  # never the only batch


@pytest.mark.parametrize("mode", ["finetune", "partial"])
def test_batch_size_one_where_batchnorm_trains_on_1x1_maps_is_a_usage_error(mode, tmp_path):
    """--batch-size 1 makes every batch one image: at 32 px BatchNorm in training mode sees 1×1 maps and torch's
    "Expected more than 1 value per channel" ended the run in a traceback. One line now names what to change."""
    from transferkit.errors import UsageError

    data = make_image_folder(tmp_path / "data", n_train=2, n_val=1)
    with pytest.raises(UsageError, match="--batch-size 1: BatchNorm .*--batchnorm frozen"):
        _train(data, tmp_path / "run", recipe="tutorial", mode=mode, image_size=32, batch_size=1)


def test_the_history_records_the_heads_learning_rate(tmp_path):
    """With --lower-lr-factor the groups' rates differ: history.csv's lr is --lr as scheduled (the head's), not
    the lowest group's (a finetune at factor 0.5 recorded 1.95e-06 for --lr 0.001)."""
    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2)
    m = _train(data, tmp_path / "run", recipe="tutorial", mode="finetune", image_size=64, batch_size=4,
               lower_lr_factor=0.5, scheduler="none", lr=0.001)
    assert m["history"][0]["lr"] == pytest.approx(0.001)
