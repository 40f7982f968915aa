"""The fastest runtime for the frozen part, chosen by measurement on this machine.

The frozen part is any module whose forward maps an image batch to what the trainable part consumes
(the input of the registry's cache point, or the output of a prefix of layer groups). `FrozenEngine`
is a callable: image batch in, CPU tensor out. On the first batch it times each candidate the options
allow (eager torch fp32; torch with bf16 autocast where the device has native bf16; ONNX Runtime fp32 on
the exported part, as one pass over all cores and as single-threaded lanes side by side), checks each
against fp32 eager torch (PARITY_RTOL, or precision.BF16_PARITY_RTOL for bf16), and keeps the fastest that
passes. The decision is cached beside the .onnx file (one folder per network: features.engine_folder)
under this machine's key and the input size, so later runs measure nothing.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import inference
from ..io import atomic_write, read_json_object, update_json_object
from ..threads import named_pool
from . import precision as precisions
from .environment import machine_key

log = logging.getLogger(__name__)

# Max abs difference allowed between ONNX Runtime and eager PyTorch, relative to the output's scale.
PARITY_RTOL = 1e-3
# What onnx_export writes; part of the engine folder's key (features.engine_folder), so a machine's exports
# from before a change are made again. 2: TF-'same' pads as constants (with_static_same_padding).
EXPORT_VERSION = 2


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
    """Eager PyTorch in eval mode (channels_last on CPU, inference_mode), fp32 or under bf16 autocast."""

    def __init__(self, module: nn.Module, device: torch.device, channels_last: bool = True,
                 precision: str = "fp32"):
        self.module, self.device, self.precision = module.eval(), device, precision
        self.channels_last = channels_last and device.type == "cpu"
        self.name = "torch" if precision == "fp32" else f"torch-{precision}"

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with precisions.autocast(self.device, self.precision):
            out = self.module(x)
        return out.float().cpu().contiguous()


class OrtEngine:
    """An ONNX Runtime session over the exported frozen part, on CPU: one pass over the batch with one thread
    per core, or (`lanes` > 1) the batch cut into slices that single-threaded passes run side by side, one
    per core. The lanes do not wait for each other at every layer as a pass's threads do, and a slice of a
    few images keeps its activations in the core's cache (2-core EPYC, lite0: 2 lanes ~290 images/s
    against ~230 for one two-thread pass; benchmarks/serve.py). Which layout runs is measured (FrozenEngine)."""

    SLICE_ROWS = 2  # images per lane call: past a few, the activations leave a core's cache

    def __init__(self, onnx_path: Path, threads: int | None = None, lanes: int = 1):
        self.name = "onnxruntime-lanes" if lanes > 1 else "onnxruntime"
        # torch's thread count: under torchrun each rank gets its share of the cores, not all of them.
        # Idle pool threads sleep instead of spinning: the cores are shared with the decode threads
        # feeding the next batch (and often with other programs). 2-core EPYC, lite0, batch 64, beside
        # other jobs: 9.6-11.1 CPU ms per image without spinning, 11.7-12.7 with it, and no slower.
        cores = threads or ort_lanes()
        self.session = inference.ort_session(onnx_path, 1 if lanes > 1 else cores, spinning=False)
        self.input_name = self.session.get_inputs()[0].name
        # ONNX Runtime's run() may be called from several threads at once and releases the GIL.
        self._lanes = named_pool(lanes, "transferkit-ort") if lanes > 1 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous().numpy()
        if self._lanes is None or len(x) <= self.SLICE_ROWS:
            return torch.from_numpy(self._run(x))
        slices = [x[i:i + self.SLICE_ROWS] for i in range(0, len(x), self.SLICE_ROWS)]
        return torch.from_numpy(np.concatenate(list(self._lanes.map(self._run, slices))))

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def onnx_export(module: nn.Module, example: torch.Tensor, path, input_name: str = "images",
                output_name: str = "features", opset: int = 17) -> None:
    """torch.onnx.export with a dynamic batch axis. The legacy (TorchScript-based) exporter goes first: on a
    2-core CPU it takes ~16 s for efficientnet_lite0 where the torch.export-based one takes ~150 s, and it
    traces the frozen part's early-stop hook. Where a torch release has removed it, use the new one."""
    names = {"input_names": [input_name], "output_names": [output_name], "opset_version": opset}
    module = with_static_same_padding(module, example)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns that it is deprecated
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=False,
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, **names)
        except (TypeError, NotImplementedError, RuntimeError) as exc:
            log.info("legacy ONNX exporter unavailable (%s); using torch.export", str(exc).splitlines()[0])
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **names)


def with_static_same_padding(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """`module`, or a copy of it whose TensorFlow-style 'same' convolutions (timm's Conv2dSame, in the tf_*
    EfficientNets' strided layers) pad by constants worked out for `example`'s spatial size.

    Conv2dSame computes its padding from the input's size on every call, so the exported graph carries a
    Shape -> arithmetic -> Pad chain per layer. Our exports fix the spatial size, so the pads are constants;
    and ONNX Runtime's static quantizer mis-handles that chain (it quantizes its arithmetic: the int8 graph
    of efficientnet_lite0 computed 6×6 maps where fp32 computes 7×7, so its features were off by 0.3-0.9 of
    their scale whatever the calibration, benchmarks/int8.py). The values computed are the same. (timm's own
    Conv2dSameExport fixes the pads at its first call, which is wrong for a layer called at two sizes, and is
    chosen only when the model is built under timm's exportable setting; the models here are built once.)"""
    try:
        from timm.layers import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:  # no timm: no such layers
        return module
    same = [name for name, m in module.named_modules() if isinstance(m, Conv2dSame)]
    if not same:
        return module
    static = copy.deepcopy(module).eval()  # the exporters export eval mode; and no BN statistics move here
    sizes = _input_sizes(static, same, example[:1])
    for name in same:
        conv = static.get_submodule(name)
        pads = {tuple(pad_same_arg(list(size), list(conv.kernel_size), list(conv.stride), list(conv.dilation)))
                for size in sizes[name]}
        if len(pads) == 1:  # else not run, or run at sizes that pad differently (a two-scale probe): left dynamic
            parent, _, leaf = name.rpartition(".")
            setattr(static.get_submodule(parent) if parent else static, leaf,
                    nn.Sequential(nn.ZeroPad2d(pads.pop()), _unpadded_copy(conv)))
    return static


def _input_sizes(module: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, set]:
    """The spatial sizes each named submodule is called at in one forward of `example`."""
    sizes: dict[str, set] = {name: set() for name in names}

    def record(name):  # a pre-hook that returns something replaces the input: this one returns None
        return lambda _module, args: sizes[name].add(tuple(args[0].shape[-2:]))

    hooks = [module.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        with torch.inference_mode(False), torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def _unpadded_copy(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain Conv2d with `conv`'s settings and parameters (shared), padding 0."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                      conv.groups, bias=conv.bias is not None)
    plain.weight, plain.bias = conv.weight, conv.bias
    return plain


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export the frozen part once; reuse the file afterwards."""
    if path.exists():
        return path
    t0 = time.perf_counter()
    example = example[:1].detach().cpu().float().contiguous()
    atomic_write(path, lambda tmp: onnx_export(module.eval(), example, tmp))
    log.info("exported the frozen part to %s in %.1fs", path, time.perf_counter() - t0)
    return path


def parity(reference: torch.Tensor, candidate: torch.Tensor, rtol: float | None = None) -> tuple[float, bool]:
    """inference.parity's max abs difference, and whether it is within `rtol` (default PARITY_RTOL) of the
    reference's scale."""
    result = inference.parity(reference.detach().float().cpu(), candidate.detach().float().cpu(), logits=False)
    return result["max_abs_diff"], result["relative_diff"] <= (PARITY_RTOL if rtol is None else rtol)


def ort_lanes() -> int:
    """Lanes for ONNX Runtime's side-by-side layout: one per core torch may use (a torchrun rank's share)."""
    return torch.get_num_threads() or os.cpu_count() or 1


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class FrozenEngine:
    """Runs the frozen part on the fastest engine that passes parity; decides on the first batch.

    `engine`: auto (measure every candidate), torch, or onnxruntime (ONNX Runtime unless unusable).
    `precision`: auto (bf16 candidates where the device has native bf16), fp32, or bf16. Nothing is
    exported or timed until a batch actually needs computing, so a fully cached rerun costs nothing.
    `info` records the decision, the rates and the parity for the run's metrics.json."""

    # Rows of the first batch every candidate is checked (parity) and timed on. Eager fp32 torch, the parity
    # reference, is the slowest engine on a CPU (2-core EPYC, lite0: ~40 images/s against ~250 for ONNX
    # Runtime): choosing on whole 64-row batches cost a cold 397-image run ~7 s of its 19. 16 rows: the
    # choice and a 64-row first batch took 3.2-4.7 s; 8 rows: 2.1-2.4 s, the same engine chosen at the same
    # rates (throwaway script, alternated runs, lite0 at 224 px).
    TRIAL_ROWS = 8
    # Timed calls per candidate, in turns, the fastest kept (_rates): one 8-row call takes 50-150 ms, and a slow
    # spell of a shared box over one candidate's single timed call made slower engines win twice in
    # benchmarks/extraction.py (ONNX Runtime's lanes measured at 83 images/s on the trial, ~150 sustained).
    # The choice is kept for the machine, so it is worth a second call (~0.35 s of a first run, lite0 224 px).
    TIMED_CALLS = 2

    def __init__(self, module: nn.Module, device: torch.device, engine: str = "auto",
                 onnx_path: Path | None = None, channels_last: bool = True, out_dtype=None,
                 precision: str = "fp32"):
        self.precision = precisions.resolve(precision, device)
        self.torch_engine = TorchEngine(module, device, channels_last)
        self.module, self.device, self.requested = module, device, engine
        self.channels_last = channels_last
        self.onnx_path, self.out_dtype = onnx_path, out_dtype
        self.active = None
        self._engines: dict = {}  # candidates that passed parity, by name
        self.info: dict = {"engine": "none (all cached)", "requested": engine, "precision": precision}
        # The kept choice, until _check_sustained has checked it (its key in the choice file and the candidates'
        # trial rates), and the kept engine's time so far.
        self._to_check: tuple[str, dict] | None = None
        self._ran = [0.0, 0]  # seconds, rows after the first batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            out = self._choose(x)
        else:
            t0 = time.perf_counter()
            out = self.active(x)
            self._ran[0] += time.perf_counter() - t0
            self._ran[1] += len(x)
            self._check_sustained()
        return out if self.out_dtype is None else out.to(self.out_dtype)

    # A kept engine whose sustained rate falls below this share of another candidate's trial rate was chosen on
    # a bad timing (or runs whole batches far slower than the trial's 8 rows): the machine's next runs use the
    # faster one. Busy batches run slower than the trial (decoding beside them: ~5-20%), so only a gross miss
    # counts.
    SUSTAINED_SHARE = 0.6
    SUSTAINED_ROWS = 256  # rows after the first batch before the check (once per engine)

    def _check_sustained(self) -> None:
        seconds, rows = self._ran
        if self._to_check is None or rows < self.SUSTAINED_ROWS:
            return
        (key, rates), self._to_check = self._to_check, None  # once
        rate, name = round(rows / max(seconds, 1e-9), 1), self.info["engine"]
        self.info["sustained_images_per_s"] = rate
        others = {n: r for n, r in rates.items() if n != name and isinstance(r, (int, float))}
        if not others or rate >= self.SUSTAINED_SHARE * max(others.values()):
            return
        best = max(others, key=others.get)
        log.info("the frozen part ran at %.0f images/s on %s, against %.0f measured for %s when it was chosen; "
                 "the next runs on this machine use %s", rate, name, others[best], best, best)
        self._save_choice(key, best, {**rates, name: rate}, demoted=name)

    def _choose(self, x: torch.Tensor) -> torch.Tensor:
        """Sets `active` to the engine kept (fp32 torch where no candidate can run or pass parity) and
        returns its output for the first batch: a row's features do not depend on where it fell."""
        trial = x[: self.TRIAL_ROWS]
        names = self._candidates()
        if len(names) > 1 and self._reuse_checked(names, trial):
            return self.active(x)
        reference = self.torch_engine(trial)  # also the warm-up of torch's kernels for the timing
        self.active, self.info["engine"] = self.torch_engine, "torch"
        self._outputs = {"torch": reference}
        if len(names) == 1 and names != ["torch"]:  # asked for by name: no measurement
            if not self._keep(names[0], trial, reference, activate=True) and names == ["torch-bf16"]:
                # --precision bf16 whose features are out of parity: fp32 then, on the fastest fp32 engine
                # (eager torch is the slowest: 25-40 images/s against ~250 for ONNX Runtime's lanes here)
                fp32 = self._candidates(fp32=True)
                if len(fp32) > 1 and not self._reuse_checked(fp32, trial):
                    self._pick(fp32, trial, reference)
        elif len(names) > 1:
            self._pick(names, trial, reference)
        out = self._outputs.get(self.info["engine"]) if len(trial) == len(x) else None
        self._outputs, self._engines = {}, {}  # the candidates not kept are freed
        return out if out is not None else self.active(x)

    def _reuse_checked(self, names: list[str], x: torch.Tensor) -> bool:
        """An ONNX Runtime engine chosen here before, over the very file it was checked on (its sha256),
        runs without the check against eager torch: fp32 against fp32, its parity does not depend on the
        images (~1e-5 of their scale), and the eager reference's first call cost an engine-known run ~0.5 s
        of its 5.6 (2-core EPYC). A torch-bf16 choice is checked every run: its error depends on the data
        (ELPV: 0.66 of the scale, random inputs: 0.11)."""
        from ..data.folders import file_sha256

        key = self._choice_key(x, names)
        entry = self._cached_entry(key)
        name = entry.get("engine")
        if name not in names or not str(name).startswith("onnxruntime") or "onnx_sha256" not in entry:
            return False
        path = self._sized_path(x)
        if not path.is_file():
            return False
        if file_sha256(path) != entry["onnx_sha256"]:  # damaged since: exported and checked again
            log.warning("%s changed since its engine was chosen (damaged?); exporting it again", path)
            path.unlink(missing_ok=True)
            return False
        try:
            self.active = self._build(name, x)
        except Exception as exc:  # noqa: BLE001 - the full choice runs instead, and says what failed
            log.debug("cached engine %s could not start (%s)", name, exc)
            return False
        self.info.update(engine=name, choice="cached", parity_max_abs_diff=entry.get("parity_max_abs_diff"),
                         parity_checked=f"when chosen, {entry.get('when')}, on the same file")
        self._to_check = (key, entry.get("rates") or {})
        return True

    def _pick(self, names: list[str], x: torch.Tensor, reference: torch.Tensor) -> None:
        key = self._choice_key(x, names)
        entry = self._cached_entry(key)
        cached = entry.get("engine")
        if cached in names and (cached == "torch" or self._keep(cached, x, reference, activate=True)):
            self.info["choice"] = "cached"
            self._to_check = (key, entry.get("rates") or {})
            checked = self._checked(cached, x)
            if checked and entry.get("onnx_sha256") != checked["onnx_sha256"]:  # exported again: record its file
                self._save_choice(key, cached, entry.get("rates", {}), **checked)
            return
        kept = [name for name in names[1:] if self._keep(name, x, reference, activate=False)]
        rates = self.info["rates"] = self._rates({"torch": self.torch_engine, **self._engines}, x)
        best = max(["torch", *kept], key=rates.get)
        self.active, self.info["engine"], self.info["choice"] = self._engines.get(best, self.torch_engine), best, \
            "measured"
        diffs = self.info.get("parity_max_abs_diff_by_engine", {})
        refused = [f"{name} out of parity (off fp32 by up to {diffs[name]:.3g})"
                   for name in names[1:] if name not in kept and name in diffs]
        log.info("frozen part runs on %s (%s)", best, "; ".join(
            [", ".join(f"{n} {r:.0f} images/s" for n, r in rates.items()), *refused]))
        self._save_choice(key, best, rates, **self._checked(best, x))
        self._to_check = (key, rates)

    def _checked(self, name: str, x: torch.Tensor) -> dict:
        """What lets the next run skip an ONNX Runtime engine's parity check (_reuse_checked): the file it
        was checked on and the result."""
        if not name.startswith("onnxruntime"):
            return {}
        from ..data.folders import file_sha256

        try:
            sha = file_sha256(self._sized_path(x))
        except OSError:  # removed since its session loaded it (`transferkit cache clear` meanwhile): checked again
            return {}
        return {"onnx_sha256": sha, "parity_max_abs_diff": self.info["parity_max_abs_diff_by_engine"][name]}

    def _candidates(self, fp32: bool = False) -> list[str]:
        """Engines the options allow (fp32: as if --precision fp32 was asked); "torch" (fp32, the parity
        reference) first where allowed."""
        asked = "fp32" if fp32 else self.info["precision"]
        if asked == "bf16":
            torch_names = ["torch-bf16"]
        else:  # fp32, or auto: bf16 joins where the device has it natively
            torch_names = ["torch", "torch-bf16"] if self.precision == "bf16" and not fp32 else ["torch"]
        if self.requested == "torch":
            return torch_names
        reason = "ONNX Runtime runs fp32 and --precision bf16 was asked for" if asked == "bf16" else \
            self._ort_unusable()
        if reason:
            if self.requested == "onnxruntime":
                log.warning("--engine onnxruntime: %s; using torch", reason)
            self.info.setdefault("fallback_reason", reason)  # a bf16 parity failure before it stays the reason
            return torch_names
        ort_names = ["onnxruntime", "onnxruntime-lanes"] if ort_lanes() > 1 else ["onnxruntime"]
        return ["onnxruntime"] if self.requested == "onnxruntime" else [*torch_names, *ort_names]

    def _keep(self, name: str, x: torch.Tensor, reference: torch.Tensor, activate: bool) -> bool:
        """Build candidate `name` and check its parity on the first batch: True if usable. activate: it
        becomes the active engine; else it joins the candidates _pick times."""
        try:
            engine = self._build(name, x)
            candidate = engine(x)  # also the warm-up: sessions and kernels are set up on the first call
        except Exception as exc:  # noqa: BLE001 - any export/runtime failure leaves the other engines
            log.warning("%s could not run the frozen part (%s); not used", name, exc)
            self.info["fallback_reason"] = f"{name}: export or session failed: {type(exc).__name__}"
            return False
        rtol = precisions.BF16_PARITY_RTOL if name.endswith("bf16") else PARITY_RTOL
        diff, ok = parity(reference, candidate, rtol)
        self.info.setdefault("parity_max_abs_diff_by_engine", {})[name] = diff
        if name.startswith("onnxruntime"):
            self.info["parity_max_abs_diff"] = diff
        if not ok:  # a warning where the engine was asked for by name; else _pick's line names it
            asked = self.requested == name or (name == "torch-bf16" and self.info["precision"] == "bf16")
            (log.warning if asked else log.debug)(
                "%s not used for the frozen part: on the first batch its features are off fp32 torch's by up to %.3g, "
                "beyond its tolerance (%g%% of their scale)", name, diff, 100 * rtol)
            self.info["fallback_reason"] = f"{name}: parity {diff:.3g} above tolerance"
            return False
        self._engines[name], self._outputs[name] = engine, candidate
        if activate:
            self.active, self.info["engine"] = engine, name
        return True

    def _sized_path(self, x: torch.Tensor) -> Path:
        # One file per input size: the export fixes the spatial size, which lets ONNX Runtime plan for it.
        return self.onnx_path.with_name(f"{self.onnx_path.stem}-{'x'.join(map(str, x.shape[2:]))}.onnx")

    def _build(self, name: str, x: torch.Tensor):
        if name.startswith("onnxruntime"):
            path = export_onnx(self.module, x, self._sized_path(x))
            return OrtEngine(path, lanes=ort_lanes() if name.endswith("lanes") else 1)
        if name == "torch-bf16":
            return TorchEngine(self.module, self.device, self.channels_last, "bf16")
        return self.torch_engine

    def _rates(self, engines: dict, trial: torch.Tensor) -> dict[str, float]:
        """Images/s of each engine on the trial rows (the parity call before was its warm-up): TIMED_CALLS
        rounds, one call of each engine per round, and each engine's fastest call. In turns, so that a slow
        spell of a shared box slows every engine's call in that round, not all of one engine's."""
        seconds = {name: [] for name in engines}
        for _ in range(self.TIMED_CALLS):
            for name, engine in engines.items():
                t0 = time.perf_counter()
                engine(trial)
                seconds[name].append(time.perf_counter() - t0)
        return {name: round(len(trial) / max(min(times), 1e-9), 1) for name, times in seconds.items()}

    def _choice_key(self, x: torch.Tensor, names: list[str]) -> str:
        # The candidates are part of the key: a release that adds one measures again.
        return (f"{machine_key(self.device)} | input={list(x.shape[1:])} | {self.requested}/{self.info['precision']}"
                f" | {','.join(names)}")

    def _choice_file(self) -> Path | None:
        return self.onnx_path.with_name("engine-choice.json") if self.onnx_path is not None else None

    def _cached_entry(self, key: str) -> dict:
        path = self._choice_file()
        entry = read_json_object(path).get(key) if path else None
        return entry if isinstance(entry, dict) else {}

    def _save_choice(self, key: str, engine: str, rates: dict, **checked) -> None:
        path = self._choice_file()
        entry = {"engine": engine, "rates": rates, "when": time.strftime("%Y-%m-%d %H:%M:%S"), **checked}
        if path is not None and not update_json_object(path, key, lambda _: entry):
            log.debug("engine choice not saved in %s", path)

    def _ort_unusable(self) -> str | None:
        if self.device.type != "cpu":
            return f"device is {self.device.type}; ONNX Runtime is used for CPU runs"
        if self.onnx_path is None:
            return "no place to cache the ONNX file"
        if not onnxruntime_available():
            return "onnxruntime is not installed"
        return None
