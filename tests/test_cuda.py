"""The CUDA paths, where a GPU is present (skipped elsewhere; CI has none): bf16 autocast with fp32 weights,
pinned host memory, the frozen engine on the GPU, resume with the GPU's random state, out-of-memory as one
line, the NCCL collectives, the recipe search and a parity-checked export of a GPU-trained run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_image_folder
from tiny_run import evaluate_on_cpu
from transferkit import cli
from transferkit.config import TrainConfig
from transferkit.engine import signals, sources
from transferkit.engine.callbacks import Callback
from transferkit.engine.fit import fit
from transferkit.errors import TrainingError

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = dict(image_size=96, batch_size=4, recipe="tutorial", seed=1)
SMALL_FROM_SCRATCH = dict(model="resnet18", pretrained=False, image_size=32, mode="finetune", epochs=3,
                          batch_size=4, recipe="tutorial", optimizer="sgd", scheduler="step", step_size=1, seed=5)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_finetune_on_the_gpu_autocasts_bf16_keeps_fp32_weights_and_pins_batches(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", n_train=8, n_val=6, size=48)
    pinned = []
    real_loader = sources.DataLoader

    def recording_loader(*args, **kwargs):
        pinned.append(kwargs.get("pin_memory"))
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(sources, "DataLoader", recording_loader)
    run = tmp_path / "run"
    fit(TrainConfig(data=str(data), out=str(run), device="cuda", mode="finetune", epochs=2, **TINY))
    m = _metrics(run)
    assert m["environment"]["device"].startswith("cuda") and m["environment"]["gpu"]
    bf16 = torch.cuda.get_device_capability() >= (8, 0)
    assert m["precision"]["resolved"] == ("bf16" if bf16 else "fp32")
    assert pinned and all(pinned)  # host batches page-locked, so the copies to the GPU overlap compute
    weights = load_file(str(run / "best.safetensors"))
    assert {t.dtype for name, t in weights.items() if t.is_floating_point()} == {torch.float32}
    # The GPU's val loss at the best epoch holds on the CPU in fp32, within bf16's rounding.
    best = m["history"][m["best_epoch"] - 1]
    assert evaluate_on_cpu(run, data)[1] == pytest.approx(best["val_loss"], rel=0.05, abs=0.02)


def test_feature_extract_on_the_gpu_matches_the_cpu(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=8, n_val=6, size=48)
    runs = {}
    for device in ("cuda", "cpu"):
        fit(TrainConfig(data=str(data), out=str(tmp_path / device), device=device, precision="fp32",
                        mode="feature-extract", epochs=3, **TINY))
        runs[device] = _metrics(tmp_path / device)
    assert "cuda" in runs["cuda"]["environment"]["device"]
    # fp32 on the GPU still rounds convolutions to TF32 (cuDNN's default): 1% of a loss is far above that
    # and far below what a wrong layout, normalization or weight would change.
    for gpu, cpu in zip(runs["cuda"]["history"], runs["cpu"]["history"]):
        assert gpu["val_loss"] == pytest.approx(cpu["val_loss"], rel=0.01)
        assert gpu["train_loss"] == pytest.approx(cpu["train_loss"], rel=0.01)


def test_predict_on_the_gpu_gives_the_cpus_probabilities(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_train=8, n_val=6, size=48)
    run = tmp_path / "run"
    fit(TrainConfig(data=str(data), out=str(run), device="cuda", mode="finetune", epochs=1, **TINY))
    rows = {}
    for device in ("cuda", "cpu"):
        assert cli.main(["predict", str(run), str(data / "val"), "--device", device, "--precision", "fp32",
                         "--format", "json"]) == 0
        rows[device] = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows["cuda"]] == [r["path"] for r in rows["cpu"]] and len(rows["cpu"]) == 12
    for gpu, cpu in zip(rows["cuda"], rows["cpu"]):  # TF32 convolutions on the GPU: close, not equal
        assert gpu["error"] is None and cpu["error"] is None
        assert ({t["label"]: pytest.approx(t["probability"], abs=0.02) for t in gpu["top_k"]}
                == {t["label"]: t["probability"] for t in cpu["top_k"]})


class _InterruptInEpoch2(Callback):
    def on_batch_end(self, trainer, step):
        if (step.epoch, step.batch) == (2, 2):
            signals._requested.append(2)  # SIGINT, as Ctrl-C would


def test_an_interrupted_gpu_run_resumes_with_the_gpus_random_state(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=8, n_val=6, size=32)
    reference = fit(TrainConfig(data=str(data), out=str(tmp_path / "ref"), device="cuda", **SMALL_FROM_SCRATCH))
    run = tmp_path / "run"
    with pytest.raises(signals.Interrupted):
        fit(TrainConfig(data=str(data), out=str(run), device="cuda", **SMALL_FROM_SCRATCH),
            callbacks=[_InterruptInEpoch2()])
    signals._requested.clear()
    assert any(k.startswith("resume.rng.cuda.") for k in load_file(str(run / "last.safetensors")))
    assert cli.main(["train", "--resume", str(run)]) == 0
    resumed = _metrics(run)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    # cuDNN's backward kernels may sum in another order from run to run: close, not bit-equal as on the CPU.
    for got, want in zip(resumed["history"], reference["history"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=0.02)


def test_out_of_gpu_memory_is_one_line_naming_the_batch_size(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=48, n_val=4, size=48)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(300e6 / total)  # room for the model, not for 96 images' activations
    try:
        with pytest.raises(TrainingError, match=r"out of GPU memory in epoch 1 with --batch-size 96; "
                                                r"try --batch-size 48"):
            fit(TrainConfig(data=str(data), out=str(tmp_path / "run"), device="cuda", mode="finetune", epochs=1,
                            image_size=224, batch_size=96, recipe="tutorial", precision="fp32"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


NCCL_SCRIPT = """
import torch, torch.distributed as dist
from transferkit.engine import distributed
torch.cuda.set_device(0)
dist.init_process_group("nccl")
distributed.active = lambda: True  # one GPU here: run the collectives a multi-GPU job runs, on one rank
assert distributed._collective_device().type == "cuda"
assert distributed.all_true(True) and not distributed.all_true(False)
assert distributed.sum_across(1.0, 2.5) == (1.0, 2.5)
assert distributed.share_from_main(lambda: "run-folder") == "run-folder"
p, y, idx, loss = distributed.gather_eval(torch.tensor([[0.2, 0.8], [0.9, 0.1]]), torch.tensor([1, 0]),
                                          torch.tensor([1, 0]), torch.tensor([0.3, 0.1]))
assert idx.tolist() == [0, 1] and y.tolist() == [0, 1]
distributed.barrier()
dist.destroy_process_group()
print("nccl ok")
"""


def test_the_nccl_collectives_run_on_the_gpu(tmp_path):
    script = tmp_path / "nccl_check.py"
    script.write_text(textwrap.dedent(NCCL_SCRIPT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           str(script)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stderr[-3000:]


def test_more_processes_than_gpus_is_a_usage_error(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2, size=32)
    n = torch.cuda.device_count() + 1
    code = cli.main(["train", str(data), "--recipe", "tutorial", "--device", "cuda", "--nproc", str(n),
                     "--out", str(tmp_path / "run")])
    assert code != 0
    err = capsys.readouterr().err
    assert f"{n} processes on CUDA need {n} GPUs" in err and "Traceback" not in err


def test_the_recipe_search_on_the_gpu_gives_a_run_whose_export_passes_parity(tmp_path):
    from transferkit.export import export_run

    data = make_image_folder(tmp_path / "data", n_train=16, n_val=8, size=48)
    run = tmp_path / "run"
    start = time.monotonic()
    assert cli.main(["train", str(data), "--device", "cuda", "--time-budget", "60s", "--out", str(run)]) == 0
    assert time.monotonic() - start < 60 * 1.1
    search = json.loads((run / "search.json").read_text())
    assert search["chosen"] and "--device cuda" in search["reproduce"]
    parity = export_run(run, "onnx")["parity"]  # raises where the export disagrees with the eager model
    assert parity["images"] == 16 and parity["top1_agreement"] == 1.0
