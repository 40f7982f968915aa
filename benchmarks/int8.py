"""int8 for the frozen part: ONNX Runtime dynamic and static quantization against fp32 ONNX Runtime.

    python benchmarks/int8.py [--work DIR] [--model efficientnet_lite0] [--repeats 3]

The frozen part (the network up to its classifier, as feature extraction runs it) is exported once and
quantized with onnxruntime.quantization in the VNNI-friendly settings issue 15 lists (variants()):
dynamic (weights int8, activations quantized per batch at run time; QInt8 / QUInt8 weights,
per-channel or not, reduce_range or not) and static (activations calibrated on 64 ELPV training crops;
QOperator vs QDQ format, per-channel or not, reduce_range or not; MinMax, percentile or entropy calibration;
the first and last or the depthwise convolutions left in fp32; only the convolutions quantized). Each variant is timed against fp32 in alternation
(batch 64, the session settings feature extraction uses) on the seed-sized ELPV subset's crops, and
checked for parity the way it would be used: a logistic-regression probe fitted on the fp32 features of
the 244 training images predicts the 153 validation images from each variant's features; agreement
with its fp32 predictions must be ≥ export.INT8_MIN_AGREEMENT, and the features' max abs difference is
reported relative to their scale. A variant is worth keeping only where it is faster AND agrees.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, elpv, environment_line, stratified_subset, table, write_section  # noqa: E402

from transferkit.data.images import load_rgb  # noqa: E402
from transferkit.data.transforms import eval_transform  # noqa: E402
from transferkit.engine.runtime import FrozenPart, OrtEngine, export_onnx  # noqa: E402
from transferkit.export import INT8_MIN_AGREEMENT, _quiet_root_logging  # noqa: E402
from transferkit.models.adapt import build_model  # noqa: E402
from transferkit.models.registry import get_spec  # noqa: E402

BATCH = 64
CALIBRATION = 64


def crops(folder: Path, pre) -> tuple[np.ndarray, np.ndarray]:
    paths = sorted(folder.rglob("*.png"))
    tf = eval_transform(pre)
    x = torch.stack([tf(load_rgb(p)) for p in paths]).numpy()
    return x, np.array([p.parent.name for p in paths])


def variants() -> list[tuple[str, dict]]:
    """Eight of the 16 format combinations, chosen to vary one setting at a time from two starting points
    (dynamic QInt8 per-channel, static QDQ per-channel: what export --quantize int8 uses), then five
    calibration and coverage variants of the static one."""
    dynamic = [("QInt8", True, False), ("QInt8", False, False), ("QUInt8", False, True)]
    static = [("QDQ", True, False), ("QDQ", False, False), ("QDQ", True, True), ("QOperator", True, False),
              ("QOperator", True, True)]
    # Session 11: what session 4 left untried, from static QDQ per-channel: histogram calibration (percentile,
    # entropy), the first and last convolutions left in fp32, only the convolutions quantized, and those
    # without the depthwise ones (the usual suspects in MobileNet-like networks).
    calibrated = [("Percentile", None, None), ("Entropy", None, None), ("MinMax", "ends", None),
                  ("MinMax", None, "Conv"), ("Percentile", "depthwise", "Conv")]
    return ([(f"dynamic {w} per_channel={pc} reduce_range={rr}",
              dict(kind="dynamic", weight=w, per_channel=pc, reduce_range=rr)) for w, pc, rr in dynamic]
            + [(f"static {f} per_channel={pc} reduce_range={rr}",
                dict(kind="static", format=f, per_channel=pc, reduce_range=rr)) for f, pc, rr in static]
            + [(f"static QDQ per_channel=True {method}" + (f", {ops} only" if ops else "")
                + (f", {KEPT_FP32[exclude]} convolutions in fp32" if exclude else ""),
                dict(kind="static", format="QDQ", per_channel=True, reduce_range=False, method=method,
                     exclude=exclude, ops=ops)) for method, exclude, ops in calibrated])


KEPT_FP32 = {"ends": "first and last", "depthwise": "depthwise"}


def excluded_nodes(model_path: Path, which: str | None) -> list[str]:
    """Names of the convolutions kept in fp32: the first and last ("ends") or the depthwise ones."""
    import onnx

    convs = [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type == "Conv"]
    if which == "ends":
        return [convs[0], convs[-1]]
    return [name for name in convs if "conv_dw" in name] if which == "depthwise" else []


def quantize(fp32: Path, out: Path, v: dict, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".prepared.onnx")
    with _quiet_root_logging():
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        if v["kind"] == "dynamic":
            quantize_dynamic(str(prepared), str(out), weight_type=getattr(QuantType, v["weight"]),
                             per_channel=v["per_channel"], reduce_range=v["reduce_range"])
        else:
            batches = iter([{"images": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

            class Reader:
                def get_next(self):
                    return next(batches, None)

            quantize_static(str(prepared), str(out), Reader(), quant_format=getattr(QuantFormat, v["format"]),
                            per_channel=v["per_channel"], reduce_range=v["reduce_range"],
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, v.get("method", "MinMax")),
                            nodes_to_exclude=excluded_nodes(prepared, v.get("exclude")),
                            op_types_to_quantize=[v["ops"]] if v.get("ops") else None)
    prepared.unlink(missing_ok=True)


def features(engine: OrtEngine, x: np.ndarray) -> np.ndarray:
    return np.concatenate([engine(torch.from_numpy(x[i:i + BATCH])).numpy().reshape(min(BATCH, len(x) - i), -1)
                           for i in range(0, len(x), BATCH)])


def rate(engine: OrtEngine, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    features(engine, x)
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = benchmark_parser(__doc__, model=True)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    env = environment_line()
    data = stratified_subset(elpv(Path(args.work) / "elpv2", 2), Path(args.work) / "elpv2-seed-sized", 244, 153)
    spec = get_spec(args.model)
    pre = spec.preprocessing
    train_x, train_y = crops(data / "train", pre)
    val_x, _ = crops(data / "val", pre)
    tmp = Path(tempfile.mkdtemp(prefix="tk-int8-"))
    model = build_model(spec, 2, pretrained=True).eval()
    fp32_path = export_onnx(FrozenPart(model, spec.cache_point), torch.from_numpy(train_x[:1]), tmp / "fp32.onnx")
    fp32 = OrtEngine(fp32_path)
    ref_train, ref_val = features(fp32, train_x), features(fp32, val_x)
    scaler = StandardScaler().fit(ref_train)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(ref_train), train_y)
    ref_pred = probe.predict(scaler.transform(ref_val))
    scale = max(1.0, float(np.abs(ref_val).max()))
    rows = []
    for label, v in variants():
        path = tmp / f"{label.replace(' ', '_').replace('=', '')}.onnx"
        try:
            quantize(fp32_path, path, v, train_x[np.linspace(0, len(train_x) - 1, CALIBRATION).astype(int)])
            engine = OrtEngine(path)
            got = features(engine, val_x)
        except Exception as exc:  # noqa: BLE001 - a variant ONNX Runtime cannot build or run is a result too
            rows.append({"variant": label, "kept": f"no: failed ({type(exc).__name__}: {str(exc)[:80]})"})
            print(rows[-1], flush=True)
            continue
        agreement = float((probe.predict(scaler.transform(got)) == ref_pred).mean())
        pairs = [(rate(fp32, val_x), rate(engine, val_x)) for _ in range(args.repeats)]  # alternated
        speedup = statistics.median(q / f for f, q in pairs)
        ok = agreement >= INT8_MIN_AGREEMENT and speedup > 1.0
        rows.append({"variant": label, "fp32 images/s": statistics.median(f for f, _ in pairs),
                     "int8 images/s": statistics.median(q for _, q in pairs), "int8 / fp32": speedup,
                     "max abs diff / scale": float(np.abs(got - ref_val).max()) / scale,
                     "probe agreement": agreement, "size MB": path.stat().st_size / 1e6,
                     "kept": "yes" if ok else "no: " + ("slower" if speedup <= 1.0 else "disagrees")})
        print(rows[-1], flush=True)
    kept = [r["variant"] for r in rows if r["kept"] == "yes"]
    text = (f"## int8 for the frozen part (ONNX Runtime)\n\n{env}. {args.model} frozen part "
            f"({fp32_path.stat().st_size / 1e6:.1f} MB fp32), batch {BATCH}, {torch.get_num_threads()} threads, "
            f"{len(val_x)} seed-sized ELPV val crops; static calibration on {CALIBRATION} train crops. "
            f"Command: `python benchmarks/int8.py --repeats {args.repeats}`. Parity: a logistic probe fitted "
            f"on fp32 features of the {len(train_x)} train crops must agree on ≥ {INT8_MIN_AGREEMENT} of the val "
            f"predictions; int8 / fp32 is the median of {args.repeats} alternated pairs.\n\n"
            + table(rows, ["variant", "fp32 images/s", "int8 images/s", "int8 / fp32", "max abs diff / scale",
                           "probe agreement", "size MB", "kept"])
            + "\n\n" + (f"Faster and in parity: {', '.join(kept)}." if kept else
                        "No variant is both faster than fp32 and in parity: the frozen part stays fp32 "
                        "(engine/runtime.py does not offer int8)."))
    print(text)
    write_section("int8", text)
    shutil.rmtree(tmp, ignore_errors=True)  # the fp32 export and every quantized variant (~60 MB)


if __name__ == "__main__":
    main()
