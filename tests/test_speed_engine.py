"""ONNX Runtime for the frozen part: parity is checked and reported, torch takes over when it must."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

from transferkit.engine import runtime
from transferkit.engine.runtime import FrozenEngine, FrozenPart

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


@pytest.fixture
def frozen():
    torch.manual_seed(0)
    return FrozenPart(TinyNet().eval(), "fc")


def test_frozen_part_returns_the_input_of_the_point(frozen):
    x = torch.randn(3, 3, 16, 16)
    net = frozen.model
    expected = torch.flatten(net.pool(torch.relu(net.bn(net.conv(x)))), 1)
    assert torch.allclose(frozen(x), expected)


def test_onnxruntime_is_used_when_in_parity_and_the_diff_is_reported(frozen, tmp_path):
    engine = FrozenEngine(frozen, CPU, "onnxruntime", tmp_path / "frozen.onnx")  # by name: not timed
    x = torch.randn(4, 3, 16, 16)
    first = engine(x)
    assert engine.info["engine"] == "onnxruntime"
    assert 0 <= engine.info["parity_max_abs_diff"] < 1e-4
    assert (tmp_path / "frozen-16x16.onnx").exists()
    # Later batches (another batch size too) come from ONNX Runtime and still match eager torch.
    y = torch.randn(7, 3, 16, 16)
    assert torch.allclose(engine(y), frozen(y), atol=1e-4)
    assert torch.allclose(first, frozen(x), atol=1e-5)


def test_an_export_removed_once_its_session_loaded_it_is_no_traceback(frozen, tmp_path, monkeypatch):
    """`transferkit cache clear` during a run removed the frozen part's ONNX file between its session's load and
    the checksum the engine choice records: a FileNotFoundError traceback ended the run. The chosen session runs
    on; the choice is saved without the checksum, so the next run checks its export again."""
    import json

    real_export = runtime.export_onnx

    def export_then_cleared(module, example, path):
        made = real_export(module, example, path)
        real_session = runtime.OrtEngine.__init__

        def load_then_clear(self, *args, **kwargs):
            real_session(self, *args, **kwargs)
            made.unlink(missing_ok=True)

        monkeypatch.setattr(runtime.OrtEngine, "__init__", load_then_clear)
        return made

    monkeypatch.setattr(runtime, "export_onnx", export_then_cleared)
    engine = FrozenEngine(frozen, CPU, "auto", tmp_path / "frozen.onnx")
    x = torch.randn(8, 3, 16, 16)
    assert torch.allclose(engine(x), frozen(x), atol=1e-4)
    chosen = json.loads((tmp_path / "engine-choice.json").read_text())
    assert all("onnx_sha256" not in entry for entry in chosen.values())


def test_falls_back_to_torch_when_onnxruntime_cannot_be_imported(frozen, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    engine = FrozenEngine(frozen, CPU, "auto", tmp_path / "frozen.onnx")
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(engine(x), frozen(x))
    assert engine.info["engine"] == "torch"
    assert "not installed" in engine.info["fallback_reason"]
    assert not list(tmp_path.glob("*.onnx"))


def test_falls_back_to_torch_when_parity_fails(frozen, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "PARITY_RTOL", -1.0)  # no difference can pass
    engine = FrozenEngine(frozen, CPU, "onnxruntime", tmp_path / "frozen.onnx")
    x = torch.randn(2, 3, 16, 16)
    engine(x)
    assert engine.info["engine"] == "torch"
    assert "parity" in engine.info["fallback_reason"]
    assert engine.active is engine.torch_engine


def test_a_candidate_out_of_parity_is_named_on_the_choice_line_alone(frozen, tmp_path, monkeypatch, caplog):
    """Measured among several, a candidate that misses parity is said once, on the line that gives the choice
    (a run's console is not a list of refusals); asked for by name, it is a warning (test above)."""
    monkeypatch.setattr(runtime, "PARITY_RTOL", -1.0)  # no ONNX Runtime difference can pass
    engine = FrozenEngine(frozen, CPU, "auto", tmp_path / "frozen.onnx")
    with caplog.at_level("INFO", logger=runtime.log.name):
        engine(torch.randn(2, 3, 16, 16))
    infos = [r.getMessage() for r in caplog.records if r.levelname in ("INFO", "WARNING")]
    assert engine.info["engine"] == "torch"
    assert not any("not used" in m for m in infos)
    (choice,) = [m for m in infos if m.startswith("frozen part runs on torch")]
    assert "onnxruntime out of parity (off fp32 by up to" in choice


def test_torch_engine_exports_nothing(frozen, tmp_path):
    engine = FrozenEngine(frozen, CPU, "torch", tmp_path / "frozen.onnx")
    engine(torch.randn(2, 3, 16, 16))
    assert engine.info["engine"] == "torch" and not list(tmp_path.glob("*.onnx"))


def test_out_dtype_is_applied(frozen, tmp_path):
    engine = FrozenEngine(frozen, CPU, "torch", None, out_dtype=torch.float16)
    assert engine(torch.randn(2, 3, 16, 16)).dtype == torch.float16


def test_onnxruntime_lanes_give_the_one_pass_outputs_in_order(frozen, tmp_path):
    """The side-by-side layout cuts a batch into slices run on their own threads: every row must come
    back in its place, with the numbers of one pass over the whole batch."""
    path = runtime.export_onnx(frozen, torch.randn(1, 3, 16, 16), tmp_path / "frozen.onnx")
    one_pass, lanes = runtime.OrtEngine(path), runtime.OrtEngine(path, lanes=2)
    assert (one_pass.name, lanes.name) == ("onnxruntime", "onnxruntime-lanes")
    for rows in (1, 2, 7):  # within one slice, whole slices, and a short last slice
        x = torch.randn(rows, 3, 16, 16)
        torch.testing.assert_close(lanes(x), one_pass(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lanes(x), frozen(x), atol=1e-4, rtol=1e-4)
