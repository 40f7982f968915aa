"""`--tensorboard`: each epoch's history row as scalars in RUN/tensorboard (view with
`tensorboard --logdir RUN/tensorboard`). history.csv is always written; this is the optional extra."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import UsageError
from ..run_folder import RunFolder

SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
           "val_acc": "accuracy/val", "val_balanced_accuracy": "balanced_accuracy/val",
           "val_macro_f1": "macro_f1/val", "lr": "lr", "seconds": "seconds_per_epoch"}


def require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")


def log_epoch(run_dir: str | Path, row: dict) -> None:
    """Append one epoch. A writer per call keeps no state across epochs or resumed runs; TensorBoard
    reads every event file in the folder."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(Path(run_dir) / RunFolder.TENSORBOARD)) as writer:
        for key, tag in SCALARS.items():
            if row.get(key) is not None:
                writer.add_scalar(tag, float(row[key]), global_step=int(row["epoch"]))
