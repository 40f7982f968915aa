"""transferkit vs the seed tutorial's `train_model` loop, on the same seed-sized ELPV subset.

    python benchmarks/vs_tutorial.py [--work DIR] [--fe-epochs 15] [--ft-epochs 2] [--precisions bf16,fp32]
                                     [--modes feature-extract,finetune] [--rows tutorial,auto,frozen]
                                     [--device cpu|cuda] [--data ELPV2_FOLDER]

The tutorial side re-implements the seed loop faithfully (ImageFolder, batch 8, 4 workers, SGD 0.001/0.9,
StepLR(7, 0.1), RandomResizedCrop(224)+flip / Resize(256)+CenterCrop(224), model.train() in the train
phase, the whole frozen network run every epoch); its model is transferkit's efficientnet_lite0 with
the classifier replaced, normalised with lite0's own mean = std = 0.5. The transferkit side is the CLI,
`transferkit train DATA ...` in a fresh process with a cold feature cache, once per --precisions entry
(bf16 and fp32 side by side; bf16 is left out where the CPU has no native bf16): feature-extract with
`--recipe tutorial` and with the default recipe (auto), finetune with the tutorial recipe (see recipes()).
With --device cuda both sides run on the GPU (the tutorial loop moves each batch there, as the seed does).
--data: an ELPV 2-class folder made elsewhere (a machine without the elpv-dataset package), any image suffix.
Prints, and writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).parent))
from common import (IMAGE_SUFFIXES, benchmark_parser, cpu_seconds, elpv, environment_line, run_cli,  # noqa: E402
                    stratified_subset, table, write_section)

from transferkit.models.adapt import build_model  # noqa: E402
from transferkit.models.registry import get_spec  # noqa: E402

MODEL = "efficientnet_lite0"
LITE_MEAN = LITE_STD = [0.5, 0.5, 0.5]
TUTORIAL_BATCH = 8  # the "Finetuning Torchvision Models" seed's batch_size (transferkit's tutorial recipe: 32)


def tutorial_loaders(data: Path) -> dict:
    tf = {
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), transforms.Normalize(LITE_MEAN, LITE_STD)]),
        "val": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                   transforms.ToTensor(), transforms.Normalize(LITE_MEAN, LITE_STD)]),
    }
    sets = {x: datasets.ImageFolder(str(data / x), tf[x]) for x in ("train", "val")}
    return {x: torch.utils.data.DataLoader(sets[x], batch_size=TUTORIAL_BATCH, shuffle=True, num_workers=4) for x in sets}


def tutorial_train_model(model, dataloaders, criterion, optimizer, scheduler, num_epochs, device):
    """The seed's train_model, minus its prints: returns (model with best weights, best val acc, seconds
    in its epoch loop, seconds of each epoch)."""
    since = time.perf_counter()  # the seed's own timer
    best_model_wts = copy.deepcopy(model.state_dict())
    best_acc = 0.0
    epoch_s = []
    for _ in range(num_epochs):
        epoch_start = time.perf_counter()
        for phase in ["train", "val"]:
            model.train() if phase == "train" else model.eval()
            running_corrects = 0
            for inputs, labels in dataloaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    _, preds = torch.max(outputs, 1)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                running_corrects += torch.sum(preds == labels.data)
            if phase == "train":
                scheduler.step()
            epoch_acc = running_corrects.double() / len(dataloaders[phase].dataset)
            if phase == "val" and epoch_acc > best_acc:
                best_acc = epoch_acc.item()
                best_model_wts = copy.deepcopy(model.state_dict())
        if device.type == "cuda":
            torch.cuda.synchronize()  # the epoch's GPU work finished before its time is read
        epoch_s.append(time.perf_counter() - epoch_start)
    loop_s = time.perf_counter() - since
    model.load_state_dict(best_model_wts)
    return model, best_acc, loop_s, epoch_s


def run_tutorial(data: Path, mode: str, epochs: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), cpu_seconds()
    loaders = tutorial_loaders(data)
    model = build_model(get_spec(MODEL), len(loaders["train"].dataset.classes), pretrained=True).to(device)
    if mode == "feature-extract":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    _, best, loop_s, epoch_s = tutorial_train_model(model, loaders, nn.CrossEntropyLoss(), optimizer, scheduler,
                                                    epochs, device)
    del loaders  # reap the workers so their CPU time is counted
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "loop_s": loop_s, "best_val_acc": best,
            "later_epoch_s": _later_epochs(epoch_s)}


def _later_epochs(seconds: list[float]) -> float | None:
    """Median seconds of the epochs after the first (the first also pays for kernel set-up: one-time costs
    that weigh half of a 2-epoch run and a fifteenth of the seeds' 15)."""
    return statistics.median(seconds[1:]) if len(seconds) > 1 else None


def run_transferkit(data: Path, out: Path, options: list[str], precision: str, device: str,
                    engine_known: bool = False) -> dict:
    """`transferkit train DATA OPTIONS` as a user types it: a fresh process (start-up and imports counted)
    and a cold cache (feature extraction, the engine choice and the ONNX export are part of the time).
    engine_known: the machine's second data set instead of its first: the backbone's ONNX export and engine
    choice are in the cache (from an untimed run on the same images), every feature shard is deleted."""
    cache = tempfile.mkdtemp(prefix="tk-bench-cache-")
    args = ["train", str(data), *options, "--precision", precision, "--device", device, "--out", str(out), "--overwrite"]
    try:
        if engine_known:
            run_cli(args, cache)
            for shard in Path(cache).glob("*/shard-*"):
                shard.unlink()
        wall, usage = run_cli(args, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    m = json.loads((out / "metrics.json").read_text())
    src = m.get("source", {})
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "loop_s": sum(row["seconds"] for row in m["history"]), "epochs_run": len(m["history"]),
            "later_epoch_s": _later_epochs([row["seconds"] for row in m["history"]]),
            "best_val_acc": m["best_val_acc"], "engine": src.get("engine", "torch (image batches)"),
            "chosen": m.get("mode", ""), "run": str(out)}


def recipes(ft_epochs: int) -> list[tuple[str, str, list[str]]]:
    """(mode, what the row is, options). `transferkit train` defaults to --recipe auto (a search within
    --time-budget, default 4m) since the recipe search landed, so feature-extract is timed both ways:
    the seed tutorial's own recipe (15 epochs, SGD 0.001/0.9, StepLR 7) and the default auto search
    limited to the feature-extract family (it fits linear probes on cached features and refits the one
    it picks). finetune runs the tutorial recipe, BatchNorm training as the tutorial and frozen."""
    finetune = ["--recipe", "tutorial", "--mode", "finetune", "--epochs", str(ft_epochs)]
    extract = ["--recipe", "tutorial", "--mode", "feature-extract"]
    loop_batch = [*extract, "--batch-size", str(TUTORIAL_BATCH)]
    return [
        ("feature-extract", "--recipe tutorial", extract),
        ("feature-extract", "--recipe tutorial, engine known", extract),
        ("feature-extract", f"--recipe tutorial --batch-size {TUTORIAL_BATCH}", loop_batch),
        ("feature-extract", f"--recipe tutorial --batch-size {TUTORIAL_BATCH}, engine known", loop_batch),
        ("feature-extract", "default (--recipe auto)", ["--mode", "feature-extract"]),
        ("finetune", "--recipe tutorial", finetune),
        ("finetune", "--recipe tutorial --batchnorm frozen", [*finetune, "--batchnorm", "frozen"]),
    ]


def result_rows(mode, label, epochs, n_train, tut, tk, precision, rows) -> list[dict]:
    """The tutorial's row (once per mode), transferkit's, and their ratio. Per-epoch rates compare
    finetune runs; feature-extract compares whole runs (the auto search runs no fixed epoch count)."""
    out = []
    for side, r in (("tutorial loop", tut), (f"transferkit {label}", tk)):
        if side == "tutorial loop" and any(row["mode"] == mode and row["side"] == side for row in rows):
            continue
        n_epochs = r.get("epochs_run", epochs)
        out.append({"mode": mode, "side": side, "precision": precision if side != "tutorial loop" else "fp32",
                    "epochs": n_epochs, "wall s": r["wall_s"], "cpu s": r["cpu_s"], "loop s": r["loop_s"],
                    "s / epoch": r["loop_s"] / max(n_epochs, 1), "s / later epoch": r.get("later_epoch_s"),
                    "best val acc": r["best_val_acc"],
                    "engine": r.get("engine", "torch eager"), "wall range": r.get("wall_range", "")})
    tk_epoch = tk["loop_s"] / max(tk["epochs_run"], 1)
    out.append({"mode": mode, "side": f"ratio: tutorial / transferkit {label}", "precision": precision,
                "wall s": tut["wall_s"] / tk["wall_s"], "cpu s": tut["cpu_s"] / tk["cpu_s"],
                "s / epoch": (tut["loop_s"] / epochs) / tk_epoch,
                "s / later epoch": (tut["later_epoch_s"] / tk["later_epoch_s"]
                                    if tut.get("later_epoch_s") and tk.get("later_epoch_s") else None),
                "best val acc": f"{100 * (tk['best_val_acc'] - tut['best_val_acc']):+.1f} points"})
    return out


def main() -> None:
    ap = benchmark_parser(__doc__)
    ap.add_argument("--fe-epochs", type=int, default=15, help="the tutorial's feature-extract epochs")
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--modes", default="feature-extract,finetune")
    ap.add_argument("--rows", default="", help="only the transferkit rows whose label contains one of these "
                    "comma-separated words (e.g. 'tutorial', 'auto', 'frozen'); default all")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--repeats", type=int, default=1, help="transferkit runs per row; the median by wall is kept")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--data", type=Path, help="an ELPV 2-class folder (default: made from the elpv-dataset package)")
    args = ap.parse_args()
    from transferkit.engine.precision import native_bf16

    device = torch.device(args.device)
    precisions = [p for p in args.precisions.split(",") if p != "bf16" or native_bf16(device)]
    work = Path(args.work)
    full = args.data or elpv(work / "elpv2", 2)
    data = stratified_subset(full, work / f"elpv2-seed-sized-{full.name}", 244, 153)
    n_train, n_val = (sum(1 for f in (data / split).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
                      for split in ("train", "val"))
    env = environment_line(device)
    wanted = [w for w in args.rows.split(",") if w]
    rows, tutorial = [], {}
    chosen = [(i, mode, label, options) for i, (mode, label, options) in enumerate(recipes(args.ft_epochs))
              if mode in args.modes.split(",") and (not wanted or any(w in label for w in wanted))]

    def epochs(mode: str) -> int:
        return args.fe_epochs if mode == "feature-extract" else args.ft_epochs

    for mode in dict.fromkeys(mode for _, mode, _, _ in chosen):  # one tutorial run per mode serves its rows
        tutorial[mode] = run_tutorial(data, mode, epochs(mode), device)
        print(f"tutorial    {mode}: {tutorial[mode]}", flush=True)
    # The repeats go round the rows (every row's first run, then every row's second...), so a slow spell of a
    # shared box falls on several rows instead of on all of one row's runs.
    runs = {(i, precision): [] for i, *_ in chosen for precision in precisions}
    for _ in range(args.repeats):
        for i, mode, label, options in chosen:
            for precision in precisions:
                runs[i, precision].append(run_transferkit(data, work / f"vs-tutorial-{i}-{precision}", options,
                                                          precision, args.device,
                                                          engine_known="engine known" in label))
    for i, mode, label, options in chosen:
        for precision in precisions:
            ordered = sorted(runs[i, precision], key=lambda r: r["wall_s"])
            tk = ordered[len(ordered) // 2]  # the median run by wall time (a 10 s run moves by ±1-2 s on this box)
            tk["wall_range"] = f"{ordered[0]['wall_s']:.1f}-{ordered[-1]['wall_s']:.1f}" if len(ordered) > 1 else ""
            print(f"transferkit {mode} {label} {precision}: {tk}", flush=True)
            rows += result_rows(mode, label, epochs(mode), n_train, tutorial[mode], tk, precision, rows)
    command = (f"python benchmarks/vs_tutorial.py --precisions {','.join(precisions)}"
               + (f" --modes {args.modes}" if args.modes != "feature-extract,finetune" else "")
               + (f" --rows {args.rows}" if args.rows else "") + f" --ft-epochs {args.ft_epochs}"
               + (f" --repeats {args.repeats}" if args.repeats != 1 else "")
               + (f" --device {args.device}" if args.device != "cpu" else "")
               + (f" --data {args.data}" if args.data else ""))
    text = (f"## transferkit vs the tutorial loop{' (' + args.modes + ')' if args.modes != 'feature-extract,finetune' else ''}\n\n"
            f"{env}. Data: seed-sized stratified ELPV subset "
            f"({n_train} train / {n_val} val, 2 classes{', from ' + str(args.data) if args.data else ''}). "
            f"Command: `{command}`.\n\n"
            "transferkit side: `python -m transferkit train DATA OPTIONS --precision P` in a fresh process with a "
            "cold feature cache, as a user runs it; wall s includes Python start-up, imports, the data scan, "
            "extraction (engine choice and ONNX export included), training, report and figures; rows marked "
            "'engine known' are the machine's second data set: the backbone's ONNX export and engine choice "
            "already cached (by an untimed run), no features cached. Tutorial side: "
            "the seed's train_model loop in this process (torch already imported), loaders + model + loop. "
            "loop s: the epochs alone (history.csv for transferkit); s / later epoch: the median epoch after the first "
            "(the first also sets up the kernels, a one-time cost). With --repeats N, each transferkit row is the "
            "median of N runs by wall time (wall range: the fastest and slowest; the repeats go round the rows). "
            "Ratios are tutorial / transferkit (above 1: transferkit faster). Targets (issue 15): feature-extract ≥ 25× wall at ≥ the tutorial's "
            "best val accuracy; finetune ≥ 2.5× per epoch within one point.\n\n"
            + table(rows, ["mode", "side", "precision", "epochs", "wall s", "wall range", "cpu s", "loop s",
                           "s / epoch", "s / later epoch", "best val acc", "engine"]))
    print(text)
    section = "vs_tutorial" + "".join("_" + part for part in (args.modes, args.rows) if part and
                                      part != "feature-extract,finetune").replace(",", "_")
    section += "_cuda" if args.device == "cuda" else ""
    write_section(section, text)


if __name__ == "__main__":
    main()
