"""--ema-epochs: a moving average of the weights is what each epoch evaluates, keeps and writes; the
training steps go on from the raw weights, and an interrupted run resumes exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from transferkit.config import TrainConfig
from transferkit.engine import callbacks, signals
from transferkit.engine.averaging import WARMUP_STEPS, WeightAverage
from transferkit.engine.callbacks import Callback
from transferkit.engine.checkpoint import read_meta
from transferkit.engine.fit import fit

from test_resume import FINETUNE, CtrlCInEpoch2, _assert_same_run, _resume

AVERAGED = {**FINETUNE, "ema_epochs": 1.0}


def test_the_average_follows_the_weights_at_its_decay_and_is_swapped_in_only_while_applied():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(0.0)
    average = WeightAverage(model, horizon_epochs=2.0, steps_per_epoch=50)  # decay 0.99 after the warm-up
    expected = 0.0
    for step in range(1, 201):
        with torch.no_grad():
            model.weight.fill_(float(step))
        average.update()
        decay = min(0.99, (1 + step) / (WARMUP_STEPS + step))
        expected = decay * expected + (1 - decay) * step
    with average.applied():
        assert model.weight[0, 0].item() == pytest.approx(expected, rel=1e-5)
        assert 150 < expected < 200  # lags the last weights by about the horizon
    assert model.weight[0, 0].item() == 200.0  # training weights back


class KeepEpochWeights(Callback):
    """What the model holds while each epoch is written, and the training weights beside it."""

    def __init__(self):
        self.written, self.training = {}, {}

    def on_epoch_end(self, trainer, row, val):
        model = trainer.state.model
        self.written[row["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        names += [n for n, b in model.named_buffers() if b.is_floating_point()]
        self.training[row["epoch"]] = dict(zip(names, [t.clone() for t in trainer.averaging.training_weights]))


@pytest.mark.slow
def test_the_averaged_weights_are_the_ones_evaluated_kept_and_written(tiny_folder, tmp_path):
    seen = KeepEpochWeights()
    metrics = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "ema"), **AVERAGED), callbacks=[seen])
    plain = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "plain"), **FINETUNE))
    best = load_file(str(tmp_path / "ema" / "best.safetensors"))
    kept = seen.written[metrics["best_epoch"]]
    assert all(torch.equal(best[k], kept[k]) for k in best)
    # The written weights are the average, not the training weights of that epoch.
    training = seen.training[metrics["best_epoch"]]
    assert not torch.allclose(kept["fc.weight"], training["fc.weight"])
    # Training itself is the same steps: the first epoch's training loss does not depend on the average.
    assert metrics["history"][0]["train_loss"] == pytest.approx(plain["history"][0]["train_loss"], abs=1e-6)
    assert metrics["history"][-1]["val_loss"] != pytest.approx(plain["history"][-1]["val_loss"], abs=1e-6)


@pytest.mark.slow
def test_an_averaged_run_interrupted_in_process_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    reference = fit(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "ref"), **AVERAGED))
    run = tmp_path / "run"
    monkeypatch.setattr(callbacks, "CHECKPOINT_SHARE", 1e9)  # every epoch written
    with pytest.raises(signals.Interrupted):
        fit(TrainConfig(data=str(tiny_folder), out=str(run), **AVERAGED), callbacks=[CtrlCInEpoch2()])
    signals._requested.clear()
    assert read_meta(run / "last.safetensors")["resume"]["averaging_steps"] > 0
    _assert_same_run(_resume(run), reference, run)
