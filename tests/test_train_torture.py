"""Messy data end to end: the torture folder trains, imbalance is reported and handled, and a file that
breaks after the scan is skipped, not fatal."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from torture import make_torture_folder

from transferkit import cli
from transferkit.config import TrainConfig
from transferkit.engine import trainer as trainer_module
from transferkit.engine.callbacks import Callback
from transferkit.engine.fit import fit
from transferkit.engine.sources import CachedFeatureSource

SCRATCH_FINETUNE = dict(model="resnet18", pretrained=False, image_size=32, mode="finetune", batch_size=4)


@pytest.mark.slow
def test_torture_folder_trains_and_summarises_every_problem_kind(tmp_path, capsys, caplog):
    made = make_torture_folder(tmp_path / "torture")
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert cli.main(["train", str(made["root"]), "--recipe", "tutorial", "--out", str(run), "--epochs", "1", "--batch-size", "8"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    err = caplog.text  # the CLI logs to stderr; caplog sees it however often logging was configured
    report = json.loads((run / "data_report.json").read_text())
    assert set(made["problems"]) <= set(report["problems"])
    for line in report["summary"]:
        assert line in err  # one line per problem kind, printed as the run starts
    assert len(report["summary"]) >= len(set(made["problems"]) - {"dataset_manifest"})  # that one has no line
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == made["classes"] and metrics["epochs_run"] == 1
    assert metrics["train_images"] == sum(len(v) for v in made["good"]["train"].values())


def _imbalanced_folder(root, big=16, small=4):
    make_image_folder(root, n_train=small, n_val=2)
    ants = root / "train" / "ants"
    for i in range(big - small):
        shutil.copy(ants / f"ants_train_{i % small}.png", ants / f"extra_{i}.png")
    return root


@pytest.mark.slow
def test_large_imbalance_suggests_balanced_accuracy(tmp_path, caplog):
    data = _imbalanced_folder(tmp_path / "data")
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), epochs=1, class_weights="auto",
                      balanced_sampler=True)
    with caplog.at_level("WARNING"):
        fit(cfg)
    assert "imbalanced" in caplog.text and "--best-metric balanced_accuracy" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        fit(TrainConfig(data=str(data), out=str(tmp_path / "run2"), epochs=1, best_metric="balanced_accuracy"))
    assert "consider --best-metric" not in caplog.text


@pytest.mark.slow
def test_class_weights_auto_weights_the_loss_by_inverse_frequency():
    labels = [0] * 12 + [1] * 3
    state = SimpleNamespace(cfg=TrainConfig(data="x", class_weights="auto"), device=torch.device("cpu"),
                            scan=SimpleNamespace(train=[("x", y) for y in labels], classes=["a", "b"]))
    weights = trainer_module._class_weights(state)
    assert weights.tolist() == pytest.approx([15 / 24, 15 / 6])
    state.cfg.class_weights = "none"
    assert trainer_module._class_weights(state) is None


def _cached_source(balanced: bool, labels: list[int]) -> CachedFeatureSource:
    """A feature source with features already in memory (no network, no images)."""
    cfg = SimpleNamespace(seed=0, batch_size=8, balanced_sampler=balanced)
    state = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), scan=SimpleNamespace(classes=["a", "b"]))
    source = CachedFeatureSource.__new__(CachedFeatureSource)
    source.state, source.train_items = state, [(f"{i}.png", y) for i, y in enumerate(labels)]
    source.train_x = torch.zeros(len(labels), 1, 4)
    source.train_y = torch.tensor(labels)
    source.head = torch.nn.Linear(4, 2)  # what trains: a linear head, as in feature-extract
    return source


@pytest.mark.slow
@pytest.mark.parametrize("balanced, low, high", [(False, 0.199, 0.201), (True, 0.4, 0.6)])
def test_balanced_sampler_draws_classes_evenly(balanced, low, high):
    source = _cached_source(balanced, [0] * 80 + [1] * 20)
    drawn = torch.cat([y for epoch in range(1, 11) for _, y in source.train_batches(epoch)])
    minority = float((drawn == 1).float().mean())
    assert low <= minority <= high


class TruncateOneFile(Callback):
    """Before the batch source reads anything: a half-copied file that passed the scan fails to decode now."""

    def on_fit_start(self, trainer):
        with open(trainer.state.scan.train[0][0], "r+b") as fh:
            fh.truncate(20)


@pytest.mark.slow
def test_file_broken_after_the_scan_is_skipped_and_counted(tiny_folder, tmp_path):
    metrics = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "run"), epochs=1, **SCRATCH_FINETUNE),
                  callbacks=[TruncateOneFile()])
    assert metrics["skipped_during_training"] == 1
    assert np.isfinite(metrics["history"][0]["train_loss"])
