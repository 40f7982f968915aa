"""A backbone and a training mode from outside the package, each one definition in a module of its own,
registered by entry points (a dist-info folder on the path, as an installed plugin package has): the CLI
trains with them, saves, loads, predicts and exports, and a fresh process without the plugin's metadata
rebuilds the backbone from the import path stored in the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

PLUGIN = '''
"""A toy backbone and a toy training mode, as a third-party package would write them."""
from collections import OrderedDict

import torch.nn as nn

from transferkit.models.spec import BackboneSpec, WeightsSource, named_groups
from transferkit.modes.base import Mode


def _build():
    block = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(OrderedDict(stem=block(3, 8), body=block(8, 16),
                                     pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), fc=nn.Linear(16, 1000)))


TOY_NET = BackboneSpec(
    name="toy-net", build=_build, weights=WeightsSource("none"), head="fc", groups=named_groups(["stem"], ["body"]),
    pretrained_cfg={"input_size": (3, 32, 32), "crop_pct": 0.875, "interpolation": "bilinear",
                    "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
    family="plugin", description="a toy CNN")


class NormsOnly(Mode):
    """The head and every BatchNorm's scale and shift train; the convolutions stay as they are."""

    name = "norms-only"
    trains_backbone = True

    def freeze(self, model, spec):
        plan = super().freeze(model, spec)  # the head only
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(True)
        return plan
'''

ENTRY_POINTS = """[transferkit.backbones]
toy-net = toy_plugin:TOY_NET

[transferkit.modes]
norms-only = toy_plugin:NormsOnly
"""


@pytest.fixture
def plugin(tmp_path) -> dict:
    code, meta = tmp_path / "plugin_src", tmp_path / "plugin_meta" / "toy_plugin-0.1.dist-info"
    code.mkdir()
    meta.mkdir(parents=True)
    (code / "toy_plugin.py").write_text(PLUGIN)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text(ENTRY_POINTS)
    return {"code": str(code), "meta": str(meta.parent)}


def _cli(*args, path: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *path])}
    proc = subprocess.run([sys.executable, "-m", "transferkit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_backbone_and_a_mode_from_outside_train_save_load_predict_and_export(plugin, tiny_folder, tmp_path):
    both = [plugin["code"], plugin["meta"]]
    run = tmp_path / "run"
    proc = _cli("train", tiny_folder, "--model", "toy-net", "--mode", "norms-only", "--recipe", "tutorial",
                "--no-pretrained", "--epochs", "2", "--batch-size", "4", "--out", run, path=both)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "toy-net" and metrics["mode"] == "norms-only"
    # The mode's freeze plan, not a built-in one: BatchNorm scale/shift (2×8 + 2×16) and the head (16×2 + 2).
    assert metrics["trainable_params"] == 48 + 34
    assert metrics["trainable_groups"] == ["group0", "group1", "head"]
    assert metrics["history"][-1]["epoch"] == 2

    # A fresh process with only the plugin's code on the path (no entry points): the checkpoint names it.
    proc = _cli("predict", run, tiny_folder / "val", "--format", "json", path=[plugin["code"]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert len(rows) == 8 and {r["label"] for r in rows} <= {"ants", "bees"} and not any(r["error"] for r in rows)

    proc = _cli("export", run, path=[plugin["code"]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    onnx = run / "export" / "model.onnx"
    assert json.loads((run / "export" / "export.json").read_text())
    proc = _cli("predict", onnx, tiny_folder / "val", "--format", "json", path=[])  # ONNX: no plugin needed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["label"] for r in json.loads(proc.stdout)] == [r["label"] for r in rows]


def test_cli_lists_the_plugins_mode_and_backbone(plugin):
    proc = _cli("train", "--help", path=[plugin["code"], plugin["meta"]])
    assert "norms-only" in proc.stdout
    proc = _cli("models", path=[plugin["code"], plugin["meta"]])
    assert "toy-net" in proc.stdout


def test_a_backbone_named_by_import_path_trains_in_process(plugin, tiny_folder, tmp_path, monkeypatch):
    from transferkit.config import TrainConfig
    from transferkit.engine.checkpoint import load_checkpoint, read_meta
    from transferkit.engine.fit import fit

    monkeypatch.syspath_prepend(plugin["code"])
    run = tmp_path / "run"
    fit(TrainConfig(data=str(tiny_folder), model="toy_plugin:TOY_NET", mode="finetune", recipe="tutorial",
                    pretrained=False, epochs=1, batch_size=4, out=str(run)))
    meta = read_meta(run)
    assert meta["architecture"] == "toy-net" and meta["architecture_source"] == "toy_plugin:TOY_NET"
    assert meta["preprocessing"]["input_size"] == 32 and meta["preprocessing"]["resize_size"] == 36
    model, _ = load_checkpoint(run)
    assert model.fc.out_features == 2
