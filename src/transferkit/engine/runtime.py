"""A fast runtime for the frozen part: export it to ONNX once, run it with ONNX Runtime.

The frozen part is any module whose forward maps an image batch to what the trainable part consumes
(the input of the registry's cache point, or the output of a prefix of layer groups). `FrozenEngine`
is a callable: image batch in, CPU tensor out. With `engine="auto"` or `"onnxruntime"` the first batch runs through both eager PyTorch and ONNX Runtime;
ONNX Runtime is kept only if the outputs agree within a tolerance, otherwise the run falls back to
eager PyTorch with a warning. The .onnx file is cached beside the feature store it feeds.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..io import atomic_write

log = logging.getLogger(__name__)

# Max abs difference allowed between ONNX Runtime and eager PyTorch, relative to the output's scale.
PARITY_RTOL = 1e-3


class _Stop(Exception):
    """Raised by the hook to end the forward pass at the cache point (nothing above it runs)."""

    def __init__(self, value):
        super().__init__()
        self.value = value


class FrozenPart(nn.Module):
    """The network up to the input of `point`: forward returns what `point` would receive."""

    def __init__(self, model: nn.Module, point: str):
        super().__init__()
        self.model, self.point = model, point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def stop(module, inputs):
            raise _Stop(inputs[0])

        handle = self.model.get_submodule(self.point).register_forward_pre_hook(stop)
        try:
            self.model(x)
        except _Stop as captured:
            return captured.value
        finally:
            handle.remove()
        raise RuntimeError(f"{self.point} was never called by the model's forward")


class TorchEngine:
    """Eager PyTorch in eval mode (channels_last on CPU, inference_mode)."""

    name = "torch"

    def __init__(self, module: nn.Module, device: torch.device, channels_last: bool = True):
        self.module, self.device = module.eval(), device
        self.channels_last = channels_last and device.type == "cpu"

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x).float().cpu().contiguous()


class OrtEngine:
    """An ONNX Runtime session over the exported frozen part, on CPU with one thread per core."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # torch's thread count: under torchrun each rank gets its share of the cores, not all of them.
        options.intra_op_num_threads = threads or torch.get_num_threads() or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous()
        (out,) = self.session.run(None, {self.input_name: x.numpy()})
        return torch.from_numpy(out)


def onnx_export(module: nn.Module, example: torch.Tensor, path, input_name: str = "images",
                output_name: str = "features", opset: int = 17) -> None:
    """torch.onnx.export with a dynamic batch axis. The legacy (TorchScript-based) exporter goes first: on a
    2-core CPU it takes ~16 s for efficientnet_lite0 where the torch.export-based one takes ~150 s, and it
    traces the frozen part's early-stop hook. Where a torch release has removed it, use the new one."""
    names = {"input_names": [input_name], "output_names": [output_name], "opset_version": opset}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns that it is deprecated
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=False,
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, **names)
        except (TypeError, NotImplementedError, RuntimeError) as exc:
            log.info("legacy ONNX exporter unavailable (%s); using torch.export", str(exc).splitlines()[0])
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **names)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export the frozen part once; reuse the file afterwards."""
    if path.exists():
        return path
    t0 = time.perf_counter()
    example = example[:1].detach().cpu().float().contiguous()
    atomic_write(path, lambda tmp: onnx_export(module.eval(), example, tmp))
    log.info("exported the frozen part to %s in %.1fs", path, time.perf_counter() - t0)
    return path


def parity(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, bool]:
    """Max abs difference, and whether it is within PARITY_RTOL of the reference's scale."""
    if reference.shape != candidate.shape:
        return float("inf"), False
    diff = (reference.float() - candidate.float()).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    return diff, diff <= PARITY_RTOL * scale


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class FrozenEngine:
    """Runs the frozen part with the configured engine; decides ONNX Runtime vs torch on the first batch.

    Nothing is exported until a batch actually needs computing, so a fully cached rerun costs nothing.
    `info` records the decision for the run's metrics.json."""

    def __init__(self, module: nn.Module, device: torch.device, engine: str = "auto",
                 onnx_path: Path | None = None, channels_last: bool = True, out_dtype=None):
        self.torch_engine = TorchEngine(module, device, channels_last)
        self.module, self.device, self.requested = module, device, engine
        self.onnx_path, self.out_dtype = onnx_path, out_dtype
        self.active = None
        self.info: dict = {"engine": "none (all cached)", "requested": engine}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            out = self._choose(x)
        else:
            out = self.active(x)
        return out if self.out_dtype is None else out.to(self.out_dtype)

    def _choose(self, x: torch.Tensor) -> torch.Tensor:
        reference = self.torch_engine(x)
        self.active = self.torch_engine
        self.info["engine"] = "torch"
        reason = self._ort_unusable()
        if reason:
            if self.requested == "onnxruntime":
                log.warning("--engine onnxruntime: %s; using torch", reason)
            self.info["fallback_reason"] = reason
            return reference
        try:
            ort_engine = OrtEngine(export_onnx(self.module, x, self.onnx_path))
            candidate = ort_engine(x)
        except Exception as exc:  # noqa: BLE001 - any export/runtime failure falls back to torch
            log.warning("ONNX Runtime could not run the frozen part (%s); using torch", exc)
            self.info["fallback_reason"] = f"export or session failed: {type(exc).__name__}"
            return reference
        diff, ok = parity(reference, candidate)
        self.info["parity_max_abs_diff"] = diff
        if not ok:
            log.warning("ONNX Runtime differs from torch by %.3g (max abs) on the first batch; using torch", diff)
            self.info["fallback_reason"] = f"parity {diff:.3g} above tolerance"
            return reference
        log.info("frozen part runs on ONNX Runtime (parity max abs diff %.2g)", diff)
        self.active = ort_engine
        self.info["engine"] = "onnxruntime"
        return reference

    def _ort_unusable(self) -> str | None:
        if self.requested == "torch":
            return "torch requested"
        if self.device.type != "cpu":
            return f"device is {self.device.type}; ONNX Runtime is used for CPU runs"
        if self.onnx_path is None:
            return "no place to cache the ONNX file"
        if not onnxruntime_available():
            return "onnxruntime is not installed"
        return None

