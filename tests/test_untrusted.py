"""Files from elsewhere: opening them never runs code, and paths never leave the data folder."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from transferkit import cli
from transferkit.config import TrainConfig
from transferkit.engine.checkpoint import load_checkpoint
from transferkit.errors import CheckpointError, DataError, UsageError, WeightsError
from transferkit.models.weights import load_state_file


class _Evil:
    """Unpickling this object runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _evil_files(tmp_path) -> tuple[list[Path], Path]:
    marker = tmp_path / "PWNED"
    payload = {"conv.weight": torch.zeros(2), "trap": _Evil(marker)}
    zipped = tmp_path / "evil.pth"
    torch.save(payload, zipped)  # torch's zip format
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps(payload))  # a bare pickle
    # Sanity: the trap is real — plain unpickling would run it.
    pickle.loads(legacy.read_bytes())
    assert marker.exists()
    marker.unlink()
    return [zipped, legacy], marker


def _last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    return lines[-1]


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny_folder, capsys):
    files, marker = _evil_files(tmp_path)
    for path in files:
        with pytest.raises(WeightsError, match="never unpickles code"):
            load_state_file(path)
        run = tmp_path / f"run-{path.stem}"
        code = cli.main(["train", str(tiny_folder), "--recipe", "tutorial", "--weights", str(path), "--out", str(run), "--epochs", "1"])
        assert code == WeightsError.exit_code == 4
        assert _last_line(capsys).startswith(f"transferkit: error: refusing to load {path}")
        assert cli.main(["predict", str(path), str(tiny_folder)]) == CheckpointError.exit_code
        assert "is not a safetensors checkpoint" in _last_line(capsys)
    assert not marker.exists()


def _safetensors_with(path: Path, metadata: dict | None) -> Path:
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("metadata, message", [
    (None, "has no transferkit metadata"),
    ({"transferkit": "{not json"}, "not a transferkit checkpoint"),
    ({"transferkit": json.dumps({"format": "someone-else"})}, "not a transferkit checkpoint"),
    ({"transferkit": json.dumps({"format": "transferkit-checkpoint", "classes": "ab"})}, "broken metadata"),
])
def test_checkpoint_with_wrong_metadata_is_refused(tmp_path, capsys, metadata, message):
    path = _safetensors_with(tmp_path / "ckpt.safetensors", metadata)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    assert cli.main(["predict", str(path), str(path)]) == CheckpointError.exit_code
    assert message in _last_line(capsys)


def _checkpoint_naming(path: Path, source: str) -> Path:
    meta = {"format": "transferkit-checkpoint", "architecture": "x", "architecture_source": source,
            "classes": ["a", "b"], "preprocessing": {}}
    return _safetensors_with(path, {"transferkit": json.dumps(meta)})


def test_a_checkpoint_cannot_choose_library_code_to_run(tmp_path, capsys, monkeypatch):
    """A checkpoint names a plugin's backbone by import path; one naming a function of the standard library or an
    installed package (imported and called with no arguments: tempfile.mkdtemp made a folder) is refused before it
    is imported, unless the user trusts it."""
    import tempfile

    calls = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: calls.append(1))
    path = _checkpoint_naming(tmp_path / "ckpt.safetensors", "tempfile:mkdtemp")
    with pytest.raises(CheckpointError, match="TRANSFERKIT_TRUSTED_BACKBONES=tempfile:mkdtemp"):
        load_checkpoint(path)
    assert cli.main(["predict", str(path), str(path)]) == CheckpointError.exit_code
    assert "must not choose code to run" in _last_line(capsys)
    for source in ("os:abort", "timm.models:create_model", "transferkit.cli:program"):
        with pytest.raises(CheckpointError, match="standard library or an installed package"):
            load_checkpoint(_checkpoint_naming(tmp_path / "other.safetensors", source))
    assert calls == []
    # the user's word follows it (and the function's answer, not a backbone, is refused as ever)
    monkeypatch.setenv("TRANSFERKIT_TRUSTED_BACKBONES", "json, tempfile:mkdtemp")
    with pytest.raises(UsageError, match="not a transferkit BackboneSpec"):
        load_checkpoint(path)
    assert calls == [1]


def _fake_run(tmp_path, data: Path, manifest_rows: list[str]) -> Path:
    """A run folder as an interrupted run leaves it, with a hand-edited split.csv."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(TrainConfig(data=str(data), out=str(run)).to_yaml())
    (run / "split.csv").write_text("\n".join(["path,class,split", *manifest_rows]) + "\n")
    _safetensors_with(run / "last.safetensors", None)
    return run


@pytest.mark.parametrize("row", ["../outside/cat.png,ants,train", "/etc/passwd,ants,train",
                                 "train/../../outside.png,bees,val"])
def test_resume_refuses_manifest_paths_outside_the_data_folder(tmp_path, tiny_folder, capsys, row):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "cat.png").write_bytes((tiny_folder / "train/ants/ants_train_0.png").read_bytes())
    run = _fake_run(tmp_path, tiny_folder, ["train/ants/ants_train_0.png,ants,train", row])
    assert cli.main(["train", "--resume", str(run)]) == DataError.exit_code
    line = _last_line(capsys)
    assert "points outside the data folder" in line and "refusing" in line


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, tiny_folder, capsys):
    assert cli.main(["train", "--resume", str(tiny_folder)]) == CheckpointError.exit_code
    assert "not a resumable transferkit run" in _last_line(capsys)
    # a file, not a run folder: exit 5 as for a missing one (README's table), not 2
    assert cli.main(["train", "--resume", str(tiny_folder / "train/ants/ants_train_0.png")]) == CheckpointError.exit_code
    line = _last_line(capsys)
    assert "--resume" in line and "is not a folder" in line
