"""Shared fixtures: tiny image folders made on the fly (no network, no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFERKIT_QUIET", "1")
# Scans record what they found in the user's cache (data/scan_record.py); the tests' throwaway folders must not,
# and a test sees a scan that checks every file unless it turns recording on in a folder of its own.
os.environ["TRANSFERKIT_SCAN_CACHE"] = "off"


def make_image_folder(root: Path, n_train: int = 8, n_val: int = 4, size: int = 40,
                      classes=("ants", "bees"), seed: int = 0, with_val: bool = True) -> Path:
    """Classes are told apart by colour and a stripe pattern, with noise, so a head can learn them."""
    rng = np.random.default_rng(seed)
    splits = {"train": n_train, "val": n_val} if with_val else {"train": n_train + n_val}
    for split, n in splits.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
                img[..., c % 3] += 150
                if c % 2:
                    img[::4] = 255
                Image.fromarray(img).save(folder / f"{name}_{split}_{i}.png")
    return root


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(autouse=True)
def _no_gpu_unless_marked(request, monkeypatch):
    """The suite states the CPU's behaviour (CI has no GPU; `--device auto` means the GPU where there is
    one): on a machine with a GPU, every test not marked `cuda` sees none, in this process and in the
    processes it starts."""
    if request.node.get_closest_marker("cuda"):
        return
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Feature caches go to a per-test folder; converted pretrained weights are shared (read-only use)."""
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(tmp_path / "feature-cache"))


def wait_for_epoch(run: Path, proc, epoch: int, timeout: float = 240) -> None:
    """Until the training process `proc` has written RUN/last.json for `epoch` (then a test stops it mid-run)."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if json.loads((run / "last.json").read_text())["epoch"] >= epoch:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no last checkpoint for epoch {epoch} within {timeout}s")
