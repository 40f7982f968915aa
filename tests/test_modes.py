"""The mode registry: one place names every mode, torch-free, and config and CLI take their choices from it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from transferkit.config import TrainConfig
from transferkit.errors import UsageError
from transferkit.modes import BUILTIN, _ADDED, get_mode, make_mode, mode_names, register_mode


def test_names_config_and_cli_choices_come_from_the_registry_without_torch():
    code = ("import sys; from transferkit.modes import mode_names; from transferkit.cli import build_parser\n"
            "parser = build_parser(); train = parser._subparsers._group_actions[0].choices['train']\n"
            "mode = next(a for a in train._actions if a.dest == 'mode')\n"
            "assert tuple(mode.choices) == mode_names(), (mode.choices, mode_names())\n"
            "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(mode_names()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().split(",")[:4] == ["feature-extract", "finetune", "partial", "linear-probe"]


@pytest.mark.parametrize("name", list(BUILTIN))
def test_each_builtin_class_carries_its_registered_name(name):
    assert get_mode(name).name == name


def test_a_mode_registered_in_process_is_a_valid_choice(tiny_folder):
    from transferkit.modes.finetune import Finetune

    @register_mode
    class TopGroupOnly(Finetune):
        name = "top-group-only"

        def first_trainable_group(self, n_groups, spec):
            return n_groups - 1

    try:
        cfg = TrainConfig(data=str(tiny_folder), mode="top-group-only").validate()
        assert isinstance(make_mode(cfg), TopGroupOnly) and "top-group-only" in mode_names()
    finally:
        _ADDED.pop("top-group-only")
    with pytest.raises(UsageError, match="--mode must be one of"):
        TrainConfig(data=str(tiny_folder), mode="top-group-only").validate()


def test_a_linear_probe_says_what_of_the_epoch_options_it_does_not_use(tiny_folder, tmp_path, caplog):
    """--tensorboard and --balanced-sampler with a linear probe (asked for, or chosen by the search) changed
    nothing and said nothing: one line each now (--class-weights auto weighs the probe's fit)."""
    import logging

    pytest.importorskip("tensorboard")
    from transferkit import cli

    with caplog.at_level(logging.INFO):
        assert cli.main(["train", str(tiny_folder), "--recipe", "tutorial", "--mode", "linear-probe", "--tensorboard",
                         "--class-weights", "auto", "--balanced-sampler", "--out", str(tmp_path / "run")]) == 0
    assert "--tensorboard: a linear probe is one fit, with no epochs to log" in caplog.text
    assert "--balanced-sampler: the linear probe sees every image once" in caplog.text
    assert "--class-weights" not in caplog.text.split("--balanced-sampler:")[0]
    assert not (tmp_path / "run" / "tensorboard").exists()
