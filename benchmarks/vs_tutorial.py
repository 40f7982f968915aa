"""transferkit vs the seed tutorial's `train_model` loop, on the same seed-sized ELPV subset.

    python benchmarks/vs_tutorial.py [--work DIR] [--views 2] [--fe-epochs 15] [--ft-epochs 2] [--precisions bf16,fp32]

The tutorial side re-implements the seed loop faithfully (ImageFolder, batch 8, 4 workers, SGD 0.001/0.9,
StepLR(7, 0.1), RandomResizedCrop(224)+flip / Resize(256)+CenterCrop(224), model.train() in the train
phase, the whole frozen network run every epoch); its model is transferkit's efficientnet_lite0 with
the classifier replaced, normalised with lite0's own mean = std = 0.5. The transferkit side is one
`transferkit.api.train` call with a cold feature cache, once per --precisions entry (bf16 and fp32
side by side; bf16 is left out where the CPU has no native bf16). Both sides run back to back in this
process. Prints, and writes its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).parent))
from common import elpv, environment_line, stratified_subset, table, write_section  # noqa: E402

from transferkit.api import train  # noqa: E402
from transferkit.models.adapt import build_model  # noqa: E402
from transferkit.models.registry import get_spec  # noqa: E402

MODEL = "efficientnet_lite0"
LITE_MEAN = LITE_STD = [0.5, 0.5, 0.5]


def tutorial_loaders(data: Path) -> dict:
    tf = {
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), transforms.Normalize(LITE_MEAN, LITE_STD)]),
        "val": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                   transforms.ToTensor(), transforms.Normalize(LITE_MEAN, LITE_STD)]),
    }
    sets = {x: datasets.ImageFolder(str(data / x), tf[x]) for x in ("train", "val")}
    return {x: torch.utils.data.DataLoader(sets[x], batch_size=8, shuffle=True, num_workers=4) for x in sets}


def tutorial_train_model(model, dataloaders, criterion, optimizer, scheduler, num_epochs):
    """The seed's train_model, minus its prints: returns (model with best weights, best val acc, seconds
    in its epoch loop)."""
    since = time.perf_counter()  # the seed's own timer
    best_model_wts = copy.deepcopy(model.state_dict())
    best_acc = 0.0
    for _ in range(num_epochs):
        for phase in ["train", "val"]:
            model.train() if phase == "train" else model.eval()
            running_corrects = 0
            for inputs, labels in dataloaders[phase]:
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
    loop_s = time.perf_counter() - since
    model.load_state_dict(best_model_wts)
    return model, best_acc, loop_s


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers): less sensitive than wall
    time to the other jobs sharing the box."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_tutorial(data: Path, mode: str, epochs: int) -> dict:
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), cpu_seconds()
    loaders = tutorial_loaders(data)
    model = build_model(get_spec(MODEL), len(loaders["train"].dataset.classes), pretrained=True)
    if mode == "feature-extract":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    _, best, loop_s = tutorial_train_model(model, loaders, nn.CrossEntropyLoss(), optimizer, scheduler, epochs)
    del loaders  # reap the workers so their CPU time is counted
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "loop_s": loop_s, "best_val_acc": best}


def run_transferkit(data: Path, out: Path, mode: str, epochs: int, recipe: dict, precision: str) -> dict:
    # A cold cache: feature extraction (and the engine choice, the ONNX export) is part of the measured time.
    os.environ["TRANSFERKIT_FEATURE_CACHE"] = tempfile.mkdtemp(prefix="tk-bench-cache-")
    t0, c0 = time.perf_counter(), cpu_seconds()
    # recipe="tutorial": the fixed recipe given here, not the auto search (search.py), is what is timed.
    clf = train(data, model=MODEL, mode=mode, epochs=epochs, out=str(out), precision=precision, recipe="tutorial",
                **recipe)
    m = clf.metrics_
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0,
            "loop_s": sum(row["seconds"] for row in m["history"]), "best_val_acc": m["best_val_acc"],
            "engine": m["source"].get("engine", "torch (image batches)"), "run": str(out)}


def recipes(views: int) -> list[tuple[str, dict]]:
    """(mode, recipe) pairs; finetune twice: BatchNorm on batch statistics as the tutorial, and frozen
    (folded into the convolutions, models/batchnorm.py)."""
    finetune = dict(optimizer="adamw", lr=3e-4, weight_decay=1e-2, scheduler="cosine", batch_size=32)
    return [
        ("feature-extract", dict(views=views, optimizer="adamw", lr=3e-3, weight_decay=1e-2, scheduler="cosine",
                                 batch_size=32, label_smoothing=0.1)),
        ("finetune", finetune),
        ("finetune", {**finetune, "batchnorm": "frozen"}),
    ]


def result_rows(mode, epochs, n_train, tut, tk, recipe, precision, rows) -> list[dict]:
    """The tutorial's row (once per mode), transferkit's, and their ratio."""
    out = []
    for side, r in (("tutorial loop", tut), ("transferkit", tk)):
        if side == "tutorial loop" and any(row["mode"] == mode and row["side"] == side for row in rows):
            continue
        out.append({"mode": mode, "side": side, "precision": precision if side == "transferkit" else "fp32",
                    "epochs": epochs, "wall s": r["wall_s"], "cpu s": r["cpu_s"],
                    "images/s": n_train * epochs / r["wall_s"], "loop s": r["loop_s"],
                    "loop images/s": n_train * epochs / r["loop_s"], "best val acc": r["best_val_acc"],
                    "engine": r.get("engine", "torch eager")})
    out.append({"mode": mode, "side": "ratio (transferkit / tutorial)", "precision": precision,
                "wall s": tk["wall_s"] / tut["wall_s"], "cpu s": tk["cpu_s"] / tut["cpu_s"],
                "images/s": tut["wall_s"] / tk["wall_s"], "loop s": tk["loop_s"] / tut["loop_s"],
                "loop images/s": tut["loop_s"] / tk["loop_s"],
                "best val acc": f"{100 * (tk['best_val_acc'] - tut['best_val_acc']):+.1f} points",
                "engine": "recipe: " + ", ".join(f"{k}={v}" for k, v in recipe.items())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "transferkit-bench"))
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--fe-epochs", type=int, default=15)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--modes", default="feature-extract,finetune")
    ap.add_argument("--precisions", default="bf16,fp32")
    args = ap.parse_args()
    from transferkit.engine.precision import native_bf16

    precisions = [p for p in args.precisions.split(",") if p != "bf16" or native_bf16(torch.device("cpu"))]
    work = Path(args.work)
    data = stratified_subset(elpv(work / "elpv2", 2), work / "elpv2-seed-sized", 244, 153)
    n_train = sum(1 for _ in (data / "train").rglob("*.png"))
    env = environment_line()
    rows, tutorial = [], {}
    for i, (mode, recipe) in enumerate(r for r in recipes(args.views) if r[0] in args.modes.split(",")):
        epochs = args.fe_epochs if mode == "feature-extract" else args.ft_epochs
        if mode not in tutorial:  # one tutorial run per mode serves each transferkit recipe
            tutorial[mode] = run_tutorial(data, mode, epochs)
            print(f"tutorial    {mode}: {tutorial[mode]}", flush=True)
        tut = tutorial[mode]
        for precision in precisions:
            tk = run_transferkit(data, work / f"run-{i}-{mode}-{precision}", mode, epochs, recipe, precision)
            print(f"transferkit {mode} {precision}: {tk}", flush=True)
            rows += result_rows(mode, epochs, n_train, tut, tk, recipe, precision, rows)
    text = (f"## transferkit vs the tutorial loop\n\n{env}. Data: seed-sized stratified ELPV subset "
            f"({n_train} train / {sum(1 for _ in (data / 'val').rglob('*.png'))} val, 2 classes). "
            f"Command: `python benchmarks/vs_tutorial.py --views {args.views} --precisions {','.join(precisions)}"
            + (f" --modes {args.modes}" if args.modes != "feature-extract,finetune" else "") + "`.\n\n"
            + "wall s: the whole call (transferkit: data scan, caches, training, report and figures; tutorial: "
            "loaders, model, its loop). loop s: the epochs alone (tutorial: its train_model loop; transferkit: "
            "the epoch times in history.csv, train + val). images/s = train images × epochs / seconds.\n\n"
            + table(rows, ["mode", "side", "precision", "epochs", "wall s", "cpu s", "images/s", "loop s",
                           "loop images/s", "best val acc", "engine"]))
    print(text)
    write_section("vs_tutorial" + ("" if args.modes == "feature-extract,finetune" else "_" + args.modes.replace(",", "_")),
                  text)


if __name__ == "__main__":
    main()
