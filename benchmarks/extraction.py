"""Feature-extraction throughput vs the bare ONNX Runtime forward, in the same run.

    python benchmarks/extraction.py [--work DIR] [--images 244] [--batch 64]

Extraction = transferkit's cached_features over real ELPV files with cold stores (decode + resize into
the decoded-image store on all cores, then crop, normalize, ONNX Runtime forward, feature-store write).
Bare = the same ONNX Runtime session on random tensors of the same shape and batch size. Alternated
`--repeats` times (the box may be shared); reports each pair and the median fraction.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import elpv, environment_line, stratified_subset, table, write_section  # noqa: E402

from transferkit.engine.features import FeatureStore, View, cached_features, default_workers  # noqa: E402
from transferkit.engine.runtime import FrozenEngine, FrozenPart  # noqa: E402
from transferkit.models.adapt import build_model  # noqa: E402
from transferkit.models.registry import get_spec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "transferkit-bench"))
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true",
                    help="all 1968 ELPV train images instead of the 244 of the seed-sized subset (fixed costs "
                         "such as worker start-up and fsync weigh less)")
    args = ap.parse_args()
    work = Path(args.work)
    data = elpv(work / "elpv2", 2) if args.full else stratified_subset(elpv(work / "elpv2", 2),
                                                                       work / "elpv2-seed-sized", 244, 153)
    paths = sorted(str(p) for p in (data / "train").rglob("*.png"))
    spec = get_spec(args.model)
    model = build_model(spec, 2, pretrained=True).eval()
    pre = spec.preprocessing
    tmp = Path(tempfile.mkdtemp(prefix="tk-extract-"))
    engine = FrozenEngine(FrozenPart(model, spec.cache_point), torch.device("cpu"), "onnxruntime",
                          tmp / "frozen.onnx")
    engine(torch.randn(2, 3, pre.input_size, pre.input_size))  # export + parity outside the timing
    assert engine.info["engine"] == "onnxruntime", engine.info
    ort = engine.active
    x = torch.randn(args.batch, 3, pre.input_size, pre.input_size)
    ort(x)  # warm-up
    rows = []
    for rep in range(args.repeats):  # interleaved: if the box is shared, the load drifts
        t0 = time.perf_counter()
        for start in range(0, len(paths), args.batch):
            ort(x[: min(args.batch, len(paths) - start)])
        bare = len(paths) / (time.perf_counter() - t0)
        os.environ["TRANSFERKIT_FEATURE_CACHE"] = str(tmp / f"cache{rep}")  # a cold decoded-image store too
        store = FeatureStore(tmp / f"store{rep}")
        t0 = time.perf_counter()
        cached_features(engine, store, paths, [View(0)], pre, batch_size=args.batch, workers=default_workers())
        real = len(paths) / (time.perf_counter() - t0)
        rows.append({"repeat": rep + 1, "bare ORT images/s": bare, "extraction images/s": real,
                     "fraction": real / bare})
        print(rows[-1], flush=True)
    median = statistics.median(r["fraction"] for r in rows)
    text = (f"## Extraction throughput vs bare ONNX Runtime\n\n{environment_line()}. {args.model}, "
            f"{len(paths)} ELPV images at {pre.input_size}px, batch {args.batch}, "
            f"{default_workers()} decode workers, ORT intra-op threads = {os.cpu_count()}. "
            f"Parity max abs diff {engine.info['parity_max_abs_diff']:.2g}. "
            f"Command: `python benchmarks/extraction.py{' --full' if args.full else ''}`. Target: fraction ≥ 0.70.\n\n"
            + table(rows, ["repeat", "bare ORT images/s", "extraction images/s", "fraction"])
            + f"\n\nMedian fraction: **{median:.2f}**.")
    print(text)
    write_section("extraction_full" if args.full else "extraction", text)


if __name__ == "__main__":
    main()
