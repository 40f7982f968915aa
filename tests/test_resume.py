"""Resumable runs: a killed or interrupted run continues from `last` and ends exactly like an
uninterrupted one with the same seed (CPU)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import wait_for_epoch
from transferkit import cli
from transferkit.config import TrainConfig
from transferkit.engine import callbacks, signals
from transferkit.engine.callbacks import Callback
from transferkit.engine.checkpoint import read_meta
from transferkit.engine.fit import fit

FE = dict(epochs=4, batch_size=4, optimizer="adam", scheduler="cosine", seed=3)
FINETUNE = dict(model="resnet18", pretrained=False, image_size=32, mode="finetune", epochs=2, batch_size=4,
                optimizer="sgd", scheduler="step", step_size=1, seed=5)
COMPARED = ("train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_accuracy", "val_macro_f1", "lr")


def _cli_args(data: Path, out: Path, opts: dict) -> list[str]:
    args = ["train", str(data), "--recipe", "tutorial", "--out", str(out)]
    for key, value in opts.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _history_epochs(run: Path) -> list[int]:
    with open(run / "history.csv", newline="") as fh:
        return [int(row["epoch"]) for row in csv.DictReader(fh)]


def _assert_same_run(resumed: dict, reference: dict, run: Path) -> None:
    epochs = list(range(1, len(reference["history"]) + 1))
    assert [r["epoch"] for r in resumed["history"]] == epochs
    assert _history_epochs(run) == epochs
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())["history"]] == epochs
    for got, want in zip(resumed["history"], reference["history"]):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["epoch"], key)
    for key in ("best_epoch", "best_val_acc", "best_val_balanced_accuracy", "best_val_macro_f1"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key


def _start_cli(data: Path, run: Path, opts: dict) -> subprocess.Popen:
    env = {**os.environ, signals.BATCH_DELAY_ENV: "0.4"}  # test-only: makes mid-epoch kills observable
    return subprocess.Popen([sys.executable, "-m", "transferkit", *_cli_args(data, run, opts)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resume(run: Path) -> dict:
    assert cli.main(["train", "--resume", str(run)]) == 0
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_killed_and_terminated_runs_resume_exactly(tiny_folder, tmp_path, capsys):
    reference = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "ref"), **FE))

    killed = tmp_path / "killed"
    proc = _start_cli(tiny_folder, killed, FE)
    wait_for_epoch(killed, proc, 1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = read_meta(killed / "last.safetensors")["epoch"]
    assert 1 <= done < FE["epochs"] and not (killed / "metrics.json").exists()
    _assert_same_run(_resume(killed), reference, killed)

    stopped = tmp_path / "stopped"
    proc = _start_cli(tiny_folder, stopped, FE)
    wait_for_epoch(stopped, proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("transferkit: interrupted at epoch ")
    assert last_line.endswith(f"resume with: transferkit train --resume {stopped}")
    assert "Traceback" not in err
    _assert_same_run(_resume(stopped), reference, stopped)


class CtrlCInEpoch2(Callback):
    """As if Ctrl-C arrived during the second batch of epoch 2 (the signal stop callback runs after this one)."""

    def on_batch_end(self, trainer, step):
        if (step.epoch, step.batch) == (2, 2):
            signals._requested.append(signal.SIGINT)


@pytest.mark.slow
def test_finetune_interrupted_in_process_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    reference = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "ref"), **FINETUNE))
    run = tmp_path / "run"
    # Every epoch written, as for epochs of real images (this tiny one is quicker than writing resnet18).
    monkeypatch.setattr(callbacks, "CHECKPOINT_SHARE", 1e9)
    with pytest.raises(signals.Interrupted, match="interrupted at epoch 2; resume with") as info:
        fit(TrainConfig(data=str(tiny_folder), out=str(run), **FINETUNE), callbacks=[CtrlCInEpoch2()])
    assert info.value.exit_code == 130
    signals._requested.clear()
    assert read_meta(run / "last.safetensors")["epoch"] == 1
    _assert_same_run(_resume(run), reference, run)


def _count_writes(monkeypatch) -> list[int]:
    """The epochs `last` is written for, in order."""
    written = []
    real = callbacks.save_last

    def counting(state, meta, *args):
        written.append(meta["epoch"])
        return real(state, meta, *args)

    monkeypatch.setattr(callbacks, "save_last", counting)
    return written


@pytest.mark.slow
def test_short_epochs_are_checkpointed_every_few_seconds_and_the_last_always(tiny_folder, tmp_path, monkeypatch):
    written = _count_writes(monkeypatch)
    opts = {**FE, "epochs": 12}
    metrics = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "fast"), **opts))
    # Epochs on cached features take milliseconds, a write tens: written before training and after the last.
    assert written[0] == 0 and written[-1] == 12 and len(written) < 12
    assert read_meta(tmp_path / "fast" / "best.safetensors")["epoch"] == metrics["best_epoch"]
    assert read_meta(tmp_path / "fast" / "last.safetensors")["resume"]["best"]["epoch"] == metrics["best_epoch"]

    written.clear()  # epochs long against a write: every one is written
    monkeypatch.setattr(callbacks, "CHECKPOINT_SHARE", 1e9)
    fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "slow"), **opts))
    assert written == list(range(13))

    written.clear()  # a run that stops early writes the epoch it stopped after
    monkeypatch.setattr(callbacks, "CHECKPOINT_SHARE", 0.1)
    stopped = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "early"), **{**opts, "lr": 1e-12, "patience": 2}))
    assert stopped["epochs_run"] < 12 and written[-1] == stopped["epochs_run"]


@pytest.mark.slow
def test_last_checkpoint_holds_resume_state_without_pickle(tiny_folder, tmp_path):
    run = tmp_path / "run"
    fit(TrainConfig(data=str(tiny_folder), out=str(run), **{**FE, "epochs": 1}))
    meta = read_meta(run / "last.safetensors")
    resume = meta["resume"]
    assert meta["epoch"] == 1 and resume["best"]["epoch"] == 1
    assert resume["freeze"]["mode"] == "feature-extract" and resume["freeze"]["trainable_groups"] == ["head"]
    assert resume["scheduler"]["last_epoch"] > 0 and len(resume["history"]) == 1
    tensors = load_file(str(run / "last.safetensors"))
    assert {"resume.rng.torch", "resume.rng.numpy", "resume.best.val.probs"} <= set(tensors)
    assert any(k.startswith("resume.optim.state.0.exp_avg") for k in tensors)
    import hashlib

    assert resume["split_sha256"] == hashlib.sha256((run / "split.csv").read_bytes()).hexdigest()
    # `last` still loads as a plain model checkpoint (predict/evaluate ignore the resume tensors).
    from transferkit.engine.checkpoint import load_checkpoint

    model, _ = load_checkpoint(run / "last.safetensors")
    assert isinstance(model, torch.nn.Module)


def test_resume_refuses_changed_split_and_other_options(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    fit(TrainConfig(data=str(tiny_folder), out=str(run), **{**FE, "epochs": 1}))
    (run / "metrics.json").unlink()  # pretend it was interrupted
    assert cli.main(["train", "--resume", str(run), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--lr (saved: 0.001)" in err and len(err.strip().splitlines()) == 1
    with open(run / "split.csv", "a") as fh:
        fh.write("train/ants/ants_train_0.png,ants,train\n")  # a duplicate row: another split
    assert cli.main(["train", "--resume", str(run)]) == 5
    assert "split.csv changed" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path / "nope")]) == 5  # a missing run folder: exit 5, as for predict


def test_a_run_stopped_before_its_first_epoch_resumes_from_epoch_1_and_says_so(tiny_folder, tmp_path, caplog):
    run = tmp_path / "run"
    fit(TrainConfig(data=str(tiny_folder), out=str(run), **{**FE, "epochs": 1}))
    for name in ("metrics.json", "last.safetensors"):  # as if stopped before the first epoch's checkpoint
        (run / name).unlink()
    with caplog.at_level("INFO", logger="transferkit"):
        assert cli.main(["train", "--resume", str(run)]) == 0
    assert "has no last.safetensors (the run stopped before its first epoch); training from epoch 1" in caplog.text
    assert (run / "metrics.json").is_file()


def test_a_run_trained_on_a_relative_data_folder_resumes_from_another_folder(tiny_folder, tmp_path, monkeypatch):
    """config.yaml kept DATA as given (`data: data`), so --resume, evaluate of split.csv and export's check run
    from another working folder found no data folder there, or another folder of that name."""
    monkeypatch.chdir(tiny_folder.parent)
    fit(TrainConfig(data=tiny_folder.name, out=str(tmp_path / "run"), **{**FE, "epochs": 1}))
    (tmp_path / "run" / "metrics.json").unlink()  # pretend it was interrupted
    monkeypatch.chdir(tmp_path / "run")
    assert TrainConfig.from_yaml("config.yaml").data == str(tiny_folder)
    assert cli.main(["train", "--resume", "."]) == 0


def test_a_resume_removes_the_export_of_the_interrupted_run(tiny_folder, tmp_path, caplog):
    """RUN/export made from an interrupted run's best checkpoint stayed after the resume replaced that checkpoint:
    `predict RUN --engine onnx` and `serve` gave the old model's answers for the finished run's."""
    run = tmp_path / "run"
    fit(TrainConfig(data=str(tiny_folder), out=str(run), **{**FE, "epochs": 1}))
    (run / "metrics.json").unlink()  # pretend it was interrupted, then exported
    (run / "export").mkdir()
    (run / "export" / "model.onnx").write_bytes(b"the interrupted run's model")
    with caplog.at_level("WARNING", logger="transferkit"):
        assert cli.main(["train", "--resume", str(run)]) == 0
    assert not (run / "export").exists() and f"removed {run / 'export'}" in caplog.text


def test_a_damaged_last_or_a_missing_best_says_how_to_go_on(tiny_folder, tmp_path, capsys):
    """A missing best.safetensors said "no checkpoint at RUN/best.safetensors (pass a run folder ...)" to a
    command that had passed the run folder; a damaged `last` said only that it was damaged."""
    run = tmp_path / "run"
    fit(TrainConfig(data=str(tiny_folder), out=str(run), **{**FE, "epochs": 1}))
    (run / "metrics.json").unlink()  # pretend it was interrupted
    (run / "best.safetensors").rename(tmp_path / "best.safetensors")
    assert cli.main(["train", "--resume", str(run)]) == 5
    assert "best epoch so far (epoch 1), is missing or damaged" in capsys.readouterr().err
    (tmp_path / "best.safetensors").rename(run / "best.safetensors")
    (run / "last.safetensors").write_bytes(b"\0" * 100)
    assert cli.main(["train", "--resume", str(run)]) == 5
    assert "remove it to train the run again from epoch 1 with --resume" in capsys.readouterr().err


class CtrlCInEpoch3(Callback):
    def on_batch_end(self, trainer, step):
        if step.epoch == 3:
            signals._requested.append(signal.SIGINT)


@pytest.mark.slow
def _interrupted_in_epoch_3(data: Path, tmp_path: Path, monkeypatch) -> tuple[dict, Path]:
    """An uninterrupted run's metrics, and the run folder of the same run stopped by Ctrl-C in epoch 3."""
    reference = fit(TrainConfig(data=str(data), out=str(tmp_path / "ref"), **FE))
    run = tmp_path / "run"
    monkeypatch.setattr(callbacks, "CHECKPOINT_SHARE", 1e9)  # every epoch written, as for epochs of images
    with pytest.raises(signals.Interrupted):
        fit(TrainConfig(data=str(data), out=str(run), **FE), callbacks=[CtrlCInEpoch3()])
    signals._requested.clear()
    return reference, run


def test_tk_resume_continues_an_interrupted_run_and_refuses_other_options(tiny_folder, tmp_path, monkeypatch):
    import transferkit as tk
    from transferkit.errors import CheckpointError, UsageError

    reference, run = _interrupted_in_epoch_3(tiny_folder, tmp_path, monkeypatch)
    assert read_meta(run / "last.safetensors")["epoch"] == 2
    with pytest.raises(UsageError, match=r"^resume continues .* drop or match epochs \(saved: 4\)$"):
        tk.resume(run, epochs=9)
    clf = tk.resume(run)
    _assert_same_run(clf.metrics_, reference, run)
    assert clf.run_dir_ == run and len(clf.predict([str(tiny_folder / "val")])) == 8
    with pytest.raises(CheckpointError, match="already finished"):
        tk.resume(run)


def test_a_run_whose_data_folder_moved_resumes_from_its_place_now(tiny_folder, tmp_path, monkeypatch):
    import shutil

    import transferkit as tk
    from transferkit.errors import UsageError

    data = shutil.copytree(tiny_folder, tmp_path / "data-copy")
    reference, run = _interrupted_in_epoch_3(data, tmp_path, monkeypatch)
    with pytest.raises(UsageError, match=r"drop or match data \(saved: "):
        tk.resume(run, data=str(tiny_folder))  # another folder, while the run's own is still there
    moved = data.rename(tmp_path / "moved")
    with pytest.raises(UsageError, match=r"data folder \S+/data-copy does not exist any more; if it has moved, give"):
        tk.resume(run)  # not told where: the message says how
    with pytest.raises(UsageError, match=r"^DATA folder \S+/nowhere does not exist$"):
        tk.resume(run, data=str(tmp_path / "nowhere"))
    clf = tk.resume(run, data=str(moved))
    _assert_same_run(clf.metrics_, reference, run)  # the same images, by content: the same run
    assert TrainConfig.from_yaml(run / "config.yaml").data == str(moved)  # later commands find them there


@pytest.mark.slow
def test_a_best_checkpoint_newer_than_last_resumes(tiny_folder, tmp_path, monkeypatch, caplog):
    """best.safetensors written after `last` (killed between the two writes, or kept when the run stopped):
    the resumed epochs redo its epoch and the run ends as an uninterrupted one."""
    from transferkit.engine.checkpoint import save_checkpoint

    reference, run = _interrupted_in_epoch_3(tiny_folder, tmp_path, monkeypatch)
    assert read_meta(run / "last.safetensors")["epoch"] == 2
    meta = read_meta(run / "best.safetensors")
    weights = load_file(str(run / "best.safetensors"))
    save_checkpoint(run / "best.safetensors", weights, {**meta, "epoch": 3})  # as if epoch 3 had won
    with caplog.at_level("INFO"):
        _assert_same_run(_resume(run), reference, run)
    assert "from epoch 3, after the last checkpoint" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "best" in r.getMessage()]


def test_a_run_folder_in_use_by_another_process_is_refused_in_one_line(tiny_folder, tmp_path, capsys):
    """A second `train --out RUN` (with --overwrite or not) or `train --resume RUN` while another process trains
    into RUN: both wrote into the folder at once, and the second was told the running run was "interrupted". Now
    one line naming the process; once that process is gone (killed: no clean-up), RUN is free again."""
    from transferkit.run_folder import claimed

    run = tmp_path / "run"
    train = ["train", str(tiny_folder), "--out", str(run), "--recipe", "tutorial", "--mode", "feature-extract",
             "--epochs", "1"]
    assert cli.main(train) == 0
    (run / "metrics.json").unlink()  # as the running run's folder looks: config, split, last checkpoint
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from transferkit.run_folder import claimed\n"
         f"with claimed({str(run)!r}):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv in (train, [*train, "--overwrite"], ["train", "--resume", str(run)]):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1] == (f"transferkit: error: --out {run} is in use by another transferkit run (process "
                               f"{holder.pid}); wait for it to end, or choose another --out")
        assert (run / "last.safetensors").is_file() and not (run / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    with claimed(run), claimed(run):  # nested claims of one process share the lock
        pass
    assert cli.main([*train, "--overwrite"]) == 0 and (run / "metrics.json").is_file()


def test_a_run_folder_in_use_by_another_thread_is_refused(tmp_path):
    """tk.train from two threads into one folder (with overwrite=True): the claims of one process were one shared
    claim, so both runs wrote into the folder at once. Nested claims share it on their own thread only."""
    import threading

    from transferkit.errors import UsageError
    from transferkit.run_folder import claimed

    run, held, done = tmp_path / "run", threading.Event(), threading.Event()

    def hold():
        with claimed(run):
            held.set()
            done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        with pytest.raises(UsageError, match=f"^--out {run} is in use by another transferkit run"):
            with claimed(run):
                pass
    finally:
        done.set()
        holder.join()
    with claimed(run), claimed(run):  # free again, and nested claims of one thread still share the lock
        pass


def test_a_file_system_without_locks_does_not_stop_a_run(tmp_path, monkeypatch):
    """flock fails with ENOLCK on some network mounts: that is no other run, so the claim goes on unguarded (only
    a lock held by another process refuses the folder)."""
    import errno
    import fcntl

    from transferkit.run_folder import claimed

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with claimed(tmp_path / "run"):
        (tmp_path / "run" / "config.yaml").write_text("x")
    assert (tmp_path / "run" / "config.yaml").is_file()
