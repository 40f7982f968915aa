"""A tiny trained run shared by the evaluate/export tests (module-scoped: trained once per module)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_image_folder

from transferkit.config import TrainConfig
from transferkit.engine.fit import fit

IMAGE_SIZE = 96  # small input keeps export, quantization and TTA fast


def train_tiny(root: Path, **options) -> tuple[Path, Path]:
    """(data folder, run folder): efficientnet_lite0, pretrained, feature-extract, 2 epochs."""
    data = make_image_folder(root / "data", n_train=8, n_val=6, size=48)
    run = root / "run"
    cfg = {"epochs": 2, "lr": 0.01, "image_size": IMAGE_SIZE, **options}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_FEATURE_CACHE", str(root / "feature-cache"))
        fit(TrainConfig(data=str(data), out=str(run), **cfg))
    assert (run / "best.safetensors").is_file(), os.listdir(run)
    return data, run


def export_tiny(root: Path) -> tuple[Path, Path, Path]:
    """(data folder, run folder, RUN/export/model.onnx): the tiny run, exported for deployment."""
    from transferkit.export import export_run

    data, run = train_tiny(root)
    return data, run, Path(export_run(run, "onnx")["path"])


def evaluate_on_cpu(run: Path, data: Path) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of RUN/best.safetensors on RUN/split.csv's val rows: one process,
    on the CPU in fp32, whatever trained it."""
    from transferkit.data.folders import read_manifest
    from transferkit.data.images import load_rgb
    from transferkit.data.transforms import eval_transform
    from transferkit.engine.checkpoint import load_checkpoint, preprocessing_of

    model, meta = load_checkpoint(run)
    tf = eval_transform(preprocessing_of(meta))
    scan = read_manifest(run / "split.csv", data)
    x = torch.stack([tf(load_rgb(path)) for path, _ in scan.val])
    y = torch.tensor([meta["classes"].index(scan.classes[label]) for _, label in scan.val])
    with torch.inference_mode():
        logits = model.cpu().float()(x)
    return int((logits.argmax(1) == y).sum()) / len(y), float(F.cross_entropy(logits, y))
