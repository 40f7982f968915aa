"""Several processes under torchrun (gloo on CPU): one run folder, metrics equal to a single-process
evaluation of the saved checkpoint, and sharded feature extraction equal to a single-process one."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder, wait_for_epoch
from tiny_run import evaluate_on_cpu
from transferkit import cli
from transferkit.config import TrainConfig
from transferkit.engine import distributed
from transferkit.engine.features import FeatureStore
from transferkit.engine.fit import fit

# 3 classes × 3 val images = 9: two ranks get 5 each, one of them a padding repeat of sample 0.
CLASSES = ("ants", "bees", "wasps")


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data", n_train=4, n_val=3, size=32, classes=CLASSES)


def _run(args: list[str], cwd: Path, cache: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRANSFERKIT_FEATURE_CACHE": str(cache), "TRANSFERKIT_DIST_TIMEOUT_MIN": "2"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # two torch processes plus torchrun start up: ~25 s of CPU each
def test_finetune_with_nproc_2_writes_one_run_whose_metrics_match_one_process(odd_folder, tmp_path):
    args = [sys.executable, "-m", "transferkit", "train", str(odd_folder), "--recipe", "tutorial", "--mode", "finetune", "--epochs", "1",
            "--no-pretrained", "--batch-size", "4", "--lr", "0.01", "--out", "run", "--nproc", "2",
            "--precision", "fp32"]  # compared with an fp32 evaluation to 1e-4
    proc = _run(args, tmp_path, tmp_path / "feature-cache")
    assert proc.stdout.count("Best val Acc") == 1  # one rank speaks
    # One run folder; the decoded-image cache went to the cache folder the test gave.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["data", "feature-cache", "run"]
    run = tmp_path / "run"
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [h["epoch"] for h in history] == ["1"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_images"] == 9
    acc, loss = evaluate_on_cpu(run, odd_folder)
    assert metrics["best_val_acc"] == pytest.approx(acc, abs=1e-9)
    assert float(history[0]["val_loss"]) == pytest.approx(loss, rel=1e-4)
    # Padding dropped: the report covers each val image exactly once.
    ev = json.loads((run / "evaluation.json").read_text())
    assert int(np.sum(ev["confusion_matrix"])) == 9


@pytest.mark.slow  # two torch processes plus torchrun start up: ~25 s of CPU each
def test_torchrun_sharded_extraction_equals_single_process_cache(odd_folder, tmp_path, monkeypatch):
    dist_cache, single_cache = tmp_path / "cache-2proc", tmp_path / "cache-1proc"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "transferkit", "train", str(odd_folder), "--recipe", "tutorial", "--epochs", "2", "--views", "2", "--engine", "torch",
            "--precision", "fp32", "--out", "run"]
    _run(args, tmp_path, dist_cache)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["source"]["kind"] == "cached-features"
    # Each rank computed its half of the 12 train × 2 views + 9 val items.
    assert metrics["source"]["train"]["computed"] == 12 and metrics["source"]["val"]["computed"] == 5

    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(single_cache))
    fit(TrainConfig(data=str(odd_folder), epochs=1, views=2, engine="torch", precision="fp32",
                    out=str(tmp_path / "single")))
    # The feature store's folder (the decoded-image store, decoded/, and the frozen part's exports, engines/,
    # sit beside it).
    (two,), (one,) = ([d for d in cache.iterdir() if d.name not in ("decoded", "engines")]
                      for cache in (dist_cache, single_cache))
    assert two.name == one.name  # same backbone identity
    assert not (dist_cache / "decoded").exists()  # eval crops and their symmetries stream from the files
    a, b = FeatureStore(two), FeatureStore(one)
    assert set(a.index) == set(b.index) and len(a.index) == 12 * 2 + 9
    keys = sorted(a.index)
    torch.testing.assert_close(a.get(keys), b.get(keys), rtol=1e-4, atol=1e-5)
    assert len(list(two.glob("shard-*.safetensors"))) == 4  # 2 ranks × (train, val), uniquely named


@pytest.mark.slow  # two torch processes plus torchrun start up: ~25 s of CPU each
def test_a_time_budget_under_torchrun_stops_every_rank_at_the_same_epoch(odd_folder, tmp_path):
    """--time-budget with --recipe tutorial under torchrun: rank 0's clock decides when the run stops
    (callbacks.Deadline), so both ranks leave the loop after the same epoch and the run ends, written once."""
    args = [sys.executable, "-m", "transferkit", "train", str(odd_folder), "--recipe", "tutorial", "--epochs", "40",
            "--time-budget", "8s", "--engine", "torch", "--precision", "fp32", "--out", "run", "--nproc", "2"]
    proc = _run(args, tmp_path, tmp_path / "feature-cache")
    assert proc.stdout.count("Best val Acc") == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and len(metrics["history"]) == 2


def test_gather_eval_in_one_process_sorts_and_drops_repeats():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    labels, indices = torch.tensor([0, 1, 0, 0]), torch.tensor([2, 0, 1, 2])
    p, y, idx, loss = distributed.gather_eval(probs, labels, indices, torch.tensor([0.1, 0.2, 0.3, 0.1]))
    assert idx.tolist() == [0, 1, 2] and y.tolist() == [1, 0, 0]
    np.testing.assert_allclose(p[:, 0], [0.2, 0.6, 0.9])
    np.testing.assert_allclose(loss, [0.2, 0.3, 0.1])


@pytest.mark.slow  # two runs of two processes under torchrun
def test_sigterm_to_the_nproc_launcher_stops_its_workers_and_the_run_resumes(odd_folder, tmp_path):
    """SIGTERM to `train --nproc 2` (kill PID, a scheduler) ended that process alone: torchrun and the workers
    trained on unseen. Now they stop after the batch, keep `last`, and the launcher exits 143 without a traceback."""
    import signal

    from transferkit.run_folder import RunFolder

    args = [sys.executable, "-m", "transferkit", "train", str(odd_folder), "--recipe", "tutorial", "--mode",
            "finetune", "--epochs", "4", "--no-pretrained", "--batch-size", "2", "--out", "run", "--nproc", "2",
            "--precision", "fp32"]
    env = {**os.environ, "TRANSFERKIT_FEATURE_CACHE": str(tmp_path / "cache"), "TRANSFERKIT_DIST_TIMEOUT_MIN": "2",
           "TRANSFERKIT_TEST_BATCH_DELAY": "0.3"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epoch(tmp_path / "run", proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert "resume with: transferkit train --resume run --nproc 2" in err  # one process: half the global batch
    assert RunFolder(tmp_path / "run").training_process() is None  # no worker trains on
    assert not (tmp_path / "run" / "metrics.json").exists()
    _run([sys.executable, "-m", "transferkit", "train", "--resume", "run", "--nproc", "2"], tmp_path,
         tmp_path / "cache")
    history = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [h["epoch"] for h in history] == ["1", "2", "3", "4"]


@pytest.mark.slow  # two torch processes start
def test_a_rank_s_one_line_error_ends_the_nproc_job_with_its_exit_code_and_no_traceback(tmp_path):
    """torchrun answered a worker's DataError with exit code 1, a traceback and a failure report."""
    make_image_folder(tmp_path / "one", n_train=3, n_val=0, size=32, classes=("ants",), with_val=False)
    proc = subprocess.run([sys.executable, "-m", "transferkit", "train", str(tmp_path / "one" / "train"), "--recipe",
                           "tutorial", "--out", str(tmp_path / "run"), "--nproc", "2"], cwd=tmp_path,
                          env={**os.environ, "TRANSFERKIT_FEATURE_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3 and "need at least 2" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_the_resume_command_of_a_stopped_rank_keeps_its_processes(monkeypatch):
    from transferkit.engine.signals import resume_command

    assert resume_command("run") == "transferkit train --resume run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command("run") == "transferkit train --resume run --nproc 2"
    monkeypatch.setenv("WORLD_SIZE", "16")  # two machines of 8: only torchrun starts that again
    assert resume_command("run").endswith("under the same torchrun command")


def test_torchrun_command_drops_nproc_and_checks_it():
    cmd = distributed.torchrun_command(3, ["-v", "train", "D", "--nproc", "3", "--epochs", "2", "--nproc=3"])
    assert cmd[1:6] == ["-m", "transferkit.engine.launcher", "--standalone", "--nproc_per_node", "3"]
    assert cmd[6:] == ["-m", "transferkit", "-v", "train", "D", "--epochs", "2"]
    with pytest.raises(distributed.UsageError):
        distributed.torchrun_command(0, [])


def test_linear_lr_scaling_only_with_several_data_parallel_ranks():
    cfg = TrainConfig(data="d", lr=0.01, scale_lr="linear")
    assert distributed.scaled(cfg).lr == 0.01  # one process: nothing to scale
    with pytest.raises(Exception, match="scale-lr"):
        TrainConfig(data="d", scale_lr="sqrt").validate()


def test_a_lost_or_stalled_peer_is_one_clear_training_error(tmp_path):
    @distributed.session
    def stalled(cfg):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                           "6000ms for recv operation to complete")

    with pytest.raises(distributed.TrainingError, match="lost contact with the other processes") as info:
        stalled(TrainConfig(data="d"))
    assert "resume with" not in str(info.value)  # no run folder yet
    from transferkit.engine import signals

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.safetensors").write_bytes(b"")
    signals.note_run_dir(tmp_path / "run")  # a rank killed midway: the run goes on from `last`
    with pytest.raises(distributed.TrainingError, match=f"minutes; resume with: transferkit train --resume "
                                                        f"{tmp_path / 'run'}$"):
        stalled(TrainConfig(data="d"))
    signals._run_dir.clear()

    @distributed.session
    def bug(cfg):
        raise RuntimeError("shape mismatch")  # not a communication failure: left alone

    with pytest.raises(RuntimeError, match="shape mismatch"):
        bug(TrainConfig(data="d"))


def test_more_cuda_processes_than_gpus_is_one_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.UsageError, match="2 processes on CUDA need 2 GPUs, and this machine has 1"):
        distributed.check_gpu_count(2, "auto")
    distributed.check_gpu_count(1, "cuda")  # one process per GPU
    distributed.check_gpu_count(4, "cpu")  # CPU processes: gloo, any number


def test_nproc_counts_gpus_for_the_device_the_processes_will_use(tmp_path, monkeypatch, capsys):
    """The flag, else --config's or the resumed run's device, else auto: a config saying cpu needs no GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda cmd: launched.append(cmd) or 0)
    config = tmp_path / "cpu.yaml"
    config.write_text(f"data: {tmp_path}\nrecipe: tutorial\ndevice: cpu\n")
    assert cli.main(["train", "--config", str(config), "--nproc", "2"]) == 0 and launched
    assert cli.main(["train", str(tmp_path), "--recipe", "tutorial", "--nproc", "2"]) != 0  # auto: the GPU
    assert "2 processes on CUDA need 2 GPUs" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path), "--recipe", "tutorial", "--nproc", "2", "--device", "cpu"]) == 0
    assert len(launched) == 2
