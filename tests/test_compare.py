"""compare: three runs on one split and epochs, the table and the figure."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import make_image_folder, wait_for_epoch

from transferkit.cli import main
from transferkit.compare import VARIANTS


@pytest.mark.slow
def test_compare_writes_three_runs_a_table_and_the_figure(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2, size=40)
    out = tmp_path / "cmp"
    assert main(["compare", str(data), "--model", "efficientnet_lite0", "--epochs", "1", "--image-size", "64",
                 "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    assert list(result["runs"]) == list(VARIANTS)
    for name, run in result["runs"].items():
        assert (out / name / "best.safetensors").is_file() and name in printed
        interval = run["best_val_acc_interval"]  # 4 val images: a wide interval, printed beside the accuracy
        assert interval["images"] == 4 and f"{interval['low']:.3f}-{interval['high']:.3f}" in printed
        assert len(run["val_acc"]) == 1
        config = (out / name / "config.yaml").read_text()
        assert "epochs: 1" in config and f"pretrained: {str(VARIANTS[name]['pretrained']).lower()}" in config
    runs = result["runs"]
    assert runs["pretrained-feature-extract"]["trainable_params"] == 1280 * 2 + 2
    assert runs["pretrained-finetune"]["trainable_params"] == runs["scratch-finetune"]["trainable_params"] > 10**6
    splits = {(out / name / "split.csv").read_text() for name in VARIANTS}
    assert len(splits) == 1  # the same split for every run
    assert (out / "compare.png").stat().st_size > 5000

    # Again into the same folder: refused in one line, which names --overwrite, an option compare now has.
    args = ["compare", str(data), "--epochs", "1", "--image-size", "64", "--batch-size", "4", "--out", str(out)]
    assert main(args) == 2
    assert "holds a finished run; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((out / "compare.json").read_text())["runs"].keys() == result["runs"].keys()


def test_compare_refuses_a_bad_option_before_its_first_run(tmp_path, capsys, caplog):
    """--epochs 0 is the user's mistake: one line and exit 2 before any training, not after the first run."""
    data = make_image_folder(tmp_path / "data", n_train=2, n_val=1, size=40)
    out = tmp_path / "cmp"
    caplog.set_level(logging.INFO)
    assert main(["compare", str(data), "--epochs", "0", "--out", str(out)]) == 2
    assert "--epochs must be ≥ 1, not 0" in capsys.readouterr().err
    assert not [r for r in caplog.records if "compare: training" in r.getMessage()]
    assert not any(out.glob("*/best.safetensors"))
    run = tmp_path / "a-run"  # a training run's folder is not compare's to fill
    run.mkdir()
    (run / "config.yaml").write_text("data: x\n")
    assert main(["compare", str(data), "--epochs", "1", "--out", str(run)]) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


@pytest.mark.slow
def test_a_stopped_compare_goes_on_with_the_same_command(tmp_path, capsys):
    """SIGTERM during the second run killed compare at once, and the same command then refused the finished
    first run (--overwrite trained all three again). Now the batch finishes, the exit code is 143, and the same
    command keeps the finished run, resumes the stopped one and trains the last."""
    import os
    import signal
    import subprocess
    import sys

    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2, size=40)
    out = tmp_path / "cmp"
    args = ["compare", str(data), "--epochs", "3", "--image-size", "64", "--batch-size", "4", "--out", str(out)]
    env = {**os.environ, "TRANSFERKIT_TEST_BATCH_DELAY": "0.4"}
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_epoch(out / "pretrained-finetune", proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].endswith("run the same compare command again to continue it "
                                                 "(finished runs are kept)")
    first = (out / "pretrained-feature-extract" / "metrics.json").stat().st_mtime_ns
    assert not (out / "pretrained-finetune" / "metrics.json").exists()
    assert main(args) == 0
    assert (out / "pretrained-feature-extract" / "metrics.json").stat().st_mtime_ns == first  # kept, not retrained
    result = json.loads((out / "compare.json").read_text())
    assert [len(run["val_acc"]) for run in result["runs"].values()] == [3, 3, 3]
