"""Faults in the loop: non-finite loss, CUDA out-of-memory, full disk, read-only run folder.
Each ends in one line and an exit code, and leaves the checkpoints of finished epochs intact."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from transferkit import cli, io
from transferkit.engine.callbacks import Callback, extra_callbacks
from transferkit.engine.checkpoint import load_checkpoint, read_meta, save_checkpoint
from transferkit.engine.signals import oom_as_training_error
from transferkit.errors import TrainingError

FAST = ["--recipe", "tutorial", "--epochs", "3", "--batch-size", "4"]  # 16 training images: 4 batches per epoch


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


class ExplodeInEpoch2(Callback):
    """The 5th training batch is epoch 2, batch 1: its loss becomes what a far too high lr makes of it."""

    def __init__(self):
        self.calls = 0

    def on_loss(self, trainer, step):
        self.calls += 1
        if self.calls == 5:
            step.loss = step.loss * float("inf")


class OutOfMemoryInForward(Callback):
    def on_loss(self, trainer, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.slow
def test_non_finite_loss_stops_with_epoch_batch_and_keeps_checkpoints(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    with extra_callbacks(ExplodeInEpoch2()):
        assert cli.main(["train", str(tiny_folder), "--out", str(run), *FAST]) == TrainingError.exit_code
    line = _one_line(capsys)
    assert "loss became inf at epoch 2, batch 1" in line and "lower --lr" in line
    assert read_meta(run / "best.safetensors")["epoch"] == 1  # kept when the loss blew up
    # `last` is written every few seconds of training (epochs on cached features take milliseconds)
    assert read_meta(run / "last.safetensors")["epoch"] in (0, 1)
    load_checkpoint(run)  # the best checkpoint still loads
    assert not (run / "metrics.json").exists() and not _leftovers(run)
    assert cli.main(["train", "--resume", str(run)]) == 0  # and the run continues from `last`
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 3


@pytest.mark.slow
def test_cuda_out_of_memory_names_the_batch_size_and_suggests_half(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    with extra_callbacks(OutOfMemoryInForward()):
        assert cli.main(["train", str(tiny_folder), "--out", str(run), *FAST]) == TrainingError.exit_code
    line = _one_line(capsys)
    assert "out of GPU memory in epoch 1 with --batch-size 4; try --batch-size 2" in line
    assert (run / "last.safetensors").exists()  # the epoch-0 state: --resume still works


def test_oom_translation_for_batch_size_one():
    cfg = type("Cfg", (), {"batch_size": 1})()
    with pytest.raises(TrainingError, match="--batch-size 1; try a smaller --image-size"):
        with oom_as_training_error(cfg, 3, "run"):
            raise torch.cuda.OutOfMemoryError("boom")


def _refuse_replace(real, folder):
    """os.replace that fails like a full disk for checkpoints written into `folder`."""

    def replace(src, dst):
        if str(dst).startswith(str(folder)) and str(dst).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    return replace


def test_disk_full_leaves_no_half_written_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(io.os, "replace", _refuse_replace(os.replace, tmp_path))
    model = torch.nn.Linear(3, 2)
    with pytest.raises(io.RunFolderError, match="the disk is full; nothing was left half-written"):
        save_checkpoint(tmp_path / "best.safetensors", model, {"architecture": "x"})
    assert not (tmp_path / "best.safetensors").exists() and not _leftovers(tmp_path)


def test_disk_full_inside_safetensors_is_the_same_one_line_error(tmp_path, monkeypatch):
    """safetensors writes in Rust: a full disk reaches Python as SafetensorError("... (os error 28)"), not as an
    OSError, and ended a real run on a full disk in that traceback. It is the same RunFolderError now; any other
    failure of the write still passes through as it is."""
    from safetensors import SafetensorError

    from transferkit.engine import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(io.RunFolderError, match="best.safetensors: the disk is full; nothing was left half-written"):
        save_checkpoint(tmp_path / "best.safetensors", torch.nn.Linear(3, 2), {"architecture": "x"})
    assert not list(tmp_path.iterdir())
    assert io.os_error_of(SafetensorError("I/O error: Permission denied (os error 13)")).errno == errno.EACCES
    with pytest.raises(ValueError, match="not an OS error"):
        io.atomic_write(tmp_path / "x.bin", lambda tmp: (_ for _ in ()).throw(ValueError("not an OS error")))
    assert not list(tmp_path.iterdir())


def test_atomic_writes_get_the_mode_of_an_ordinary_file(tmp_path):
    """mkstemp makes 0600 files: renamed into place, every checkpoint, config.yaml, metrics.json, report.html and
    predict --out was readable by its owner alone, whatever the umask (a teammate, `serve` under another user)."""
    old = os.umask(0o022)
    os.umask(old)
    save_checkpoint(tmp_path / "best.safetensors", torch.nn.Linear(3, 2), {"architecture": "x"})
    io.atomic_write_text(tmp_path / "rows.csv", "path\n")
    for name in ("best.safetensors", "best.json", "rows.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~old, name


def test_a_file_name_that_is_not_utf8_is_written_as_it_is_on_disk(tmp_path):
    """A Latin-1 zip's café.png reaches Python as caf\\udce9.png: predict --out and evaluate's evaluation.json
    ended in a UnicodeEncodeError traceback. Rows keep the name's bytes; JSON escapes it and reads back the same."""
    name = os.fsdecode(b"caf\xe9.png")
    io.atomic_write_text(tmp_path / "rows.csv", f"path\n{name}\n")
    assert (tmp_path / "rows.csv").read_bytes() == b"path\ncaf\xe9.png\n"
    io.atomic_write_json(tmp_path / "evaluation.json", {"path": name, "class": "é"})
    assert json.loads((tmp_path / "evaluation.json").read_text(encoding="utf-8")) == {"path": name, "class": "é"}


def test_a_feature_cache_that_cannot_be_written_keeps_the_features_in_memory(tmp_path, monkeypatch, caplog):
    """A full or read-only cache disk costs the run its cache, not the run: one warning for the folder, the
    features kept in memory for this run, nothing left on the disk (it ended the run in a one-line error, and
    before that in a traceback)."""
    import logging

    from transferkit.engine import features
    from transferkit.engine.features import View, cached_features, store_for
    from transferkit.preprocessing import Preprocessing
    from conftest import make_image_folder

    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(tmp_path / "cache"))
    paths = sorted(str(p) for p in (make_image_folder(tmp_path / "data", n_train=3, n_val=0, size=32) / "train")
                   .rglob("*.png"))
    pre = Preprocessing(resize_size=32, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")

    def extract(x):
        return x.float().mean(dim=(2, 3))

    expected, _, _ = cached_features(extract, features.FeatureStore(tmp_path / "fresh" / "store"), paths,
                                     [View(0)], pre)

    def refuse(path, *args):
        raise io.RunFolderError(f"could not write {path}: the disk is full; nothing was left half-written")

    monkeypatch.setattr(features, "atomic_write", refuse)
    monkeypatch.setattr(features, "atomic_write_json", refuse)
    with caplog.at_level(logging.WARNING):
        for identity in ({"backbone": "a"}, {"backbone": "b"}):  # two stores of one cache folder: one warning
            store = store_for(identity)
            got, ok, stats = cached_features(extract, store, paths, [View(0)], pre)
            assert all(ok) and stats["computed"] == len(paths) and torch.equal(got, expected)
            again, _, stats = cached_features(extract, store, paths, [View(0)], pre)
            assert stats["computed"] == 0 and torch.equal(again, expected)  # from memory
    assert caplog.text.count("feature cache not written") == 1 and "the disk is full" in caplog.text
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@pytest.mark.slow
def test_disk_full_during_training_is_one_line(tiny_folder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(io.os, "replace", _refuse_replace(os.replace, run))
    assert cli.main(["train", str(tiny_folder), "--out", str(run), *FAST]) == io.RunFolderError.exit_code
    line = _one_line(capsys)
    assert "last.safetensors: the disk is full" in line
    assert not list(run.glob("*.safetensors")) and not _leftovers(run)
    assert json.loads((run / "data_report.json").read_text())["classes"] == ["ants", "bees"]


def test_read_only_run_folder_is_one_line(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        probe = run / "probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("this user can write to read-only folders (root); the disk-full tests cover it")
        assert cli.main(["train", str(tiny_folder), "--out", str(run), *FAST]) == io.RunFolderError.exit_code
        assert "cannot write in" in _one_line(capsys)
        assert not list(run.iterdir())
    finally:
        run.chmod(0o755)


def test_a_file_in_the_way_of_a_folder_is_named(tmp_path):
    """Where a file stands in the place of a folder to write in, or of one of its parents, the message names
    that file; the OS says only "File exists" (mkdir of the file itself) or "Not a directory" (below it)."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("mine")
    for target in (blocker / "evaluation.json", blocker / "deeper" / "evaluation.json"):
        with pytest.raises(io.RunFolderError) as caught:
            io.atomic_write_json(target, {"a": 1})
        assert str(caught.value) == f"cannot write in {target.parent}: {blocker} is a file, not a folder"
    assert blocker.read_text() == "mine"
