"""The command line: parse, call the library, print. User mistakes become one line and an exit code."""

from __future__ import annotations

import argparse
import atexit
import csv
import gc
import json
import logging
import os
import sys
import threading
from dataclasses import fields
from pathlib import Path

from . import __version__
from .errors import TransferkitError

log = logging.getLogger("transferkit")

EXIT_USAGE = 2
EXIT_CHECK_FAILED = 9  # data check --strict: train/val leakage or cross-class duplicates
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a program killed by it (`yes | head`)
# Installed by the `train` extra only (pyproject.toml); the base install predicts with ONNX Runtime.
TRAIN_EXTRA_MODULES = {"torch", "torchvision", "timm", "safetensors", "sklearn", "matplotlib", "tqdm", "onnx",
                       "onnxscript"}

TRAIN_HELP = {
    "recipe": "auto: search for the best recipe within --time-budget, choosing on training images only "
              "(flags given fix their piece); tutorial: no search, the seed tutorials' values for what is not given",
    "time_budget": "auto recipe: the whole run's time, e.g. 90s, 10m, 1h; given with --recipe tutorial, the run stops "
                   "before an epoch that would end past it",
    "rotation_safe": "the images have no 'up' (cells, tiles, micrographs): the search may use all 8 dihedral views",
    "head_init": "probe: start the head from a CV-tuned linear probe before fine-tuning (LP-FT)",
    "probe_stages": "linear-probe: pool the top N stages (default: every stage the backbone taps)",
    "probe_pooling": "linear-probe: channel means, or means and maxima",
    "probe_views": "linear-probe: train on and average over no extra view, the mirror, the image and its mirror "
                   "turned by 90° too, or all 8 dihedral views",
    "probe_c": "linear-probe: inverse L2 strength of the logistic regression (default: 3-fold CV on train)",
    "probe_scale": "linear-probe: also read each image at this smaller size inside the model and average a "
                   "second probe fitted there (a two-scale ensemble; --image-size sets the larger)",
    "probe_scale_c": "linear-probe: --probe-c of the --probe-scale probe (default: 3-fold CV on train)",
    "train_subsample": "train on a seeded stratified random N of the training images (the recipe search's "
                       "reproduce command names it where its budget allowed fewer than all)",
    "probe_head": "linear-probe: the head on the pooled features: logistic regression, or one hidden layer of "
                  "256 ReLU units (the auto recipe tries it where time allows and keeps it where it wins the CV)",
    "probe_pixels": "linear-probe: also the image's raw pixels (grey, 32×32) as features, for images much smaller "
                    "than the network's input",
    "model": "backbone (see `transferkit models`); with the auto recipe and no --model, the search may move to a "
             "stronger one of the same family (efficientnet_lite1/lite2) where it wins the CV",
    "unfreeze": "partial mode: number of top layer groups that train with the head",
    "lr": "learning rate (seed tutorial: 0.001 with SGD)",
    "scheduler": "step (StepLR, --step-size/--gamma), cosine (with --warmup-epochs), onecycle, none",
    "ema_epochs": "evaluate, keep and export an exponential moving average of the weights over about this many "
                  "epochs of steps (0 = off; the auto recipe's fine-tuning runs without it unless given)",
    "lower_lr_factor": "each layer group below the head trains at this × the lr of the group above",
    "views": "feature-extract: cached views per training image (1 = the eval crop only)",
    "view_kind": "extra views: dihedral (flips/rotations, for rotation-safe data) or random augmentations",
    "image_size": "input resolution, 32-2048 px (default: the backbone's own)",
    "crop_fraction": "eval crop as a fraction of the resize (default: the backbone's; 1.0 keeps the whole frame)",
    "bit_depth": "bits the values of 16-bit grey images use: 12 reads 4095 as white (default: found from a sample "
                 "of the training images)",
    "weights": "a .safetensors or .pth file of backbone weights to start from",
    "best_metric": "metric that picks the best epoch (balanced_accuracy, macro_f1: also what a probe's CV and "
                   "the recipe search choose by)",
    "patience": "early stopping after this many epochs without improvement (0 = off)",
    "class_weights": "auto = weight the loss (and a probe's fit) by inverse class frequency",
    "engine": "runtime for the frozen part when it is cached: auto (the fastest in parity, measured once per "
              "machine), torch, onnxruntime",
    "precision": "auto (bf16 autocast where the CPU/GPU has native bf16, else fp32), fp32, bf16; weights stay fp32",
    "cache_dtype": "partial mode: dtype of the cached activations of the frozen groups",
    "out": "run folder (default runs/<timestamp>-<model>-<mode>)",
    "overwrite": "replace the run already in --out (without it, a finished run is never overwritten)",
    "batchnorm": "train (batch statistics, as the seeds) or frozen (ImageNet statistics; γ, β still learn; "
                 "folded into the convolutions: faster on CPU)",
    "scale_lr": "several processes: linear = lr × number of data-parallel processes, none = lr as given",
}
BOOLEAN_OFF = {"pretrained": "train from scratch (random weights)", "cache": "do not cache features",
               "decoded_cache": "decode images every epoch instead of once into the decoded-image cache",
               "channels_last": "keep NCHW memory layout on CPU"}
BOOLEAN_BOTH = {"group_duplicates": "a split made here keeps copies of one picture (same bytes, or re-encoded/"
                                    "resized) on one side (default; --no-group-duplicates: plain stratified split)"}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default (where it has one worth showing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None or default is False
                or default is True or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad value is one line naming the option and what is valid, exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        sys.stderr.write(f"transferkit: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, not {text}")
    return value


def _with_default(help_text: str | None, default) -> str:
    """Train options keep argparse's default SUPPRESSed (see below), so --help names TrainConfig's."""
    if default is None or isinstance(default, bool):
        return help_text or ""
    return f"{help_text or ''} (default: {default})".strip()


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from .config import SENSOR_BITS, TrainConfig, option_choices
    from .modes import mode_help

    helps = {**TRAIN_HELP, "mode": mode_help()}
    choices = {**option_choices(), "bit_depth": SENSOR_BITS}
    for f in fields(TrainConfig):
        if f.name == "data":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in BOOLEAN_BOTH:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=BOOLEAN_BOTH[f.name])
        elif f.name in BOOLEAN_OFF:
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                           default=argparse.SUPPRESS, help=BOOLEAN_OFF[f.name])
        elif f.type in ("bool", bool):  # SUPPRESS: an absent flag must not override --config/--resume
            p.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS,
                           help=helps.get(f.name))
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=kind, choices=choices.get(f.name),
                           default=argparse.SUPPRESS, help=_with_default(helps.get(f.name), f.default))


USER_DESCRIPTION = """Turn a folder of labelled images into a good, exported image classifier by transfer learning from
ImageNet-pretrained CNNs. `train` searches for the best recipe within a time budget, choosing on the
training images only, and scores the val split once."""

QUICK_START = """quick start:
  transferkit data elpv data/elpv --classes 2    # a real built-in data set (or bring DATA/train/<class>/*)
  transferkit train data/elpv                    # the recipe search: within 5 minutes on a 2-core CPU
  transferkit predict runs/<name> image.png      # then: evaluate, export, serve
see `transferkit COMMAND --help` for each command's options"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="transferkit", description=USER_DESCRIPTION, epilog=QUICK_START,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("train", help="train a classifier on an image folder")
    p.add_argument("data", nargs="?", help="DATA/train/<class>/*, DATA/val/<class>/* (or DATA/<class>/*)")
    p.add_argument("--config", help="YAML config (command-line options override it)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from RUN/last.safetensors with "
                   "the options saved in RUN/config.yaml (other options given must equal the saved ones)")
    _add_train_options(p)
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (one per GPU, or CPU): re-launches itself under torchrun")

    sub.add_parser("models", help="list the backbones, their size, input and weights availability")

    p = sub.add_parser("predict", help="classify images or folders with a trained run or checkpoint")
    p.add_argument("checkpoint", help="run folder, .safetensors checkpoint or exported .onnx model")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=_positive_int, default=3, help="labels listed per image")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="output format")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto: onnx for an .onnx model, torch for a run folder or .safetensors (told by content)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="torch engine: auto = the precision the run scored its val images in (bf16 autocast only where "
                        "it trained and scored in bf16 and this CPU/GPU has native bf16), else fp32")
    p.add_argument("--device", default="cpu",
                   help="torch engine: where the network runs: cpu, cuda, cuda:N or auto (a GPU where there is one)")
    p.add_argument("--out", metavar="FILE", help="write the rows to FILE instead of standard output")

    _add_serve_command(sub)

    p = sub.add_parser("data", help="materialize built-in datasets as image folders")
    dsub = p.add_subparsers(dest="dataset", required=True, parser_class=OneLineParser)
    e = dsub.add_parser("elpv", help="ELPV solar cells (installed PyPI elpv-dataset)")
    e.add_argument("out")
    e.add_argument("--classes", type=int, choices=(2, 4), default=2)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--group-duplicates", action=argparse.BooleanOptionalAction, default=True,
                   help="keep look-alike images on one side of the split (at the default correlation ELPV has "
                        "none, so the split is the plain stratified one)")
    e.add_argument("--group-correlation", type=float, default=None,
                   help="thumbnail correlation that makes two images one group (default 0.999: re-encoded or "
                        "resized copies)")
    _add_check_command(dsub)
    h = dsub.add_parser("hymenoptera", help="the seed tutorials' bees/ants (downloads)")
    h.add_argument("out")
    _add_results_commands(sub)
    _add_cache_command(sub)
    return parser


def entry() -> int:
    """The program's command (`program` runs it): `main` with the garbage collector set for a process that
    ends with the command.

    Importing torch, timm, scikit-learn and matplotlib creates ~0.5 million objects that live until the exit;
    on the default schedule the cyclic collector walks them again and again as they are created (~1 s of a cold
    `transferkit train`, 2-core EPYC) and once more at the exit (~1.3 s). Here it runs rarely, skips the
    imported heap once the command has it (imports_done), and the exit's last collection skips everything (the
    run's files are written and closed by then). Freed large blocks stay in the process (malloc.py: CPU training
    steps no longer fault in fresh pages for every activation). `main` itself, called in a Python process,
    leaves gc and malloc alone."""
    from .malloc import keep_freed_blocks

    global _PROGRAM
    _PROGRAM = True
    gc.set_threshold(100_000, 50, 100)
    keep_freed_blocks()
    try:
        return main()
    finally:
        gc.freeze()


def program() -> None:
    """The `transferkit` script and `python -m transferkit`: `entry`, then an exit that skips the interpreter's
    teardown. After a training command, Python's own exit (unloading every module of torch, timm, scikit-learn
    and their C++ libraries' static destructors) took 0.29 s of a 8.6 s cold feature-extract run, against
    ~0.09 s for this one (2-core EPYC): freeing memory the operating system takes back anyway. What an exit must
    still do is done first: the atexit handlers (logging's flush, temporary folders, multiprocessing's workers)
    and the standard streams' flush. A thread still working (a non-daemon thread other than this one) gets the
    ordinary exit, which waits for it, and so does a run under a profiler or tracer (`python -m cProfile -m
    transferkit` writes its file after the program returns)."""
    code = entry()
    working = any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread())
    if working or sys.getprofile() is not None or sys.gettrace() is not None:
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`transferkit ... | head`): nothing left to deliver
            pass
    os._exit(code or 0)  # as SystemExit(None): a command that returns nothing succeeded


_PROGRAM = False


def imports_done() -> None:
    """The command's heavy modules are imported: in the program, later collections skip what exists now."""
    if _PROGRAM:
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for re-launching under torchrun
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s" if args.verbose else "%(message)s",
                        stream=sys.stderr)
    if args.verbose:  # ours only: Pillow and matplotlib at DEBUG print a line per PNG chunk and per font tried
        logging.getLogger("transferkit").setLevel(logging.DEBUG)
    try:
        return COMMANDS[args.command](args)
    except TransferkitError as exc:
        sys.stderr.write(f"transferkit: {getattr(exc, 'prefix', 'error: ')}{exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("transferkit: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `transferkit models | head`: the reader is gone, so is what was left to print
        # The standard output points at /dev/null from here, so no later flush (the exit's) fails again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_PIPE
    except ModuleNotFoundError as exc:  # a deployment install (no torch) asked for a training command
        if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        sys.stderr.write(f"transferkit: error: `transferkit {args.command}` needs the train extra ({exc.name} is "
                         "not installed): pip install 'transferkit[train]' (a .onnx model predicts without it: "
                         "--engine onnx)\n")
        return EXIT_USAGE


def cmd_train(args) -> int:
    from .errors import UsageError
    from .search import train

    from .engine import distributed, fit  # noqa: F401 - the training stack (torch, timm), imported here
    imports_done()

    options = {k: v for k, v in vars(args).items()
               if k not in ("command", "verbose", "config", "data", "nproc", "argv", "resume")}
    several = args.nproc != 1 or distributed.launched()
    if several and not (args.resume or args.config) and options.get("recipe", "auto") == "auto":
        raise UsageError("--nproc trains one configured recipe in several processes; add --recipe tutorial with the "
                         "recipe's flags (the recipe search runs in one process: see its reproduce command)")
    if args.nproc != 1 and not distributed.launched():
        distributed.check_gpu_count(args.nproc, _device_asked(args, options))
        return distributed.launch(distributed.torchrun_command(args.nproc, args.argv))
    if not distributed.is_main():  # one rank speaks; errors still print on every rank
        for name in ("", "transferkit"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if args.resume and args.config:
        raise UsageError(f"--resume continues {args.resume} with the options in its config.yaml; drop --config")
    if not (args.resume or args.config or args.data):
        raise UsageError("train needs a DATA folder (or --config FILE)")
    from .engine.signals import stop_on_signals

    with stop_on_signals():  # Ctrl-C/SIGTERM: finish the batch, keep `last`, exit 130/143
        metrics = _resume(args, options) if args.resume else train(*_config(args, options))
    if metrics.get("written", True):
        _print_train_summary(metrics)
        from .datacheck import train_hint

        hint = train_hint(metrics["run_dir"])
        if hint:
            print(hint)
    return 0


def _device_asked(args, options: dict) -> str:
    """The --device the processes will train on: the flag, else the --config or --resume run's, else auto."""
    if "device" in options:
        return options["device"]
    from .config import TrainConfig

    source = args.config or (Path(args.resume) / "config.yaml" if args.resume else None)
    try:
        return TrainConfig.from_yaml(source).device if source else "auto"
    except Exception:  # noqa: BLE001 - each process reports a bad config in its own words
        return "auto"


def _config(args, options: dict):
    """The TrainConfig the command line describes (--config FILE's fields, then DATA and the flags given), and the
    options given: the flags and the fields the file sets (_set_in_file)."""
    from dataclasses import replace

    from .config import TrainConfig

    if args.config:
        in_file = TrainConfig.read_yaml(args.config)
        cfg = replace(TrainConfig.from_dict(in_file), **options)
        cfg = replace(cfg, data=args.data or cfg.data)
        given = {**_set_in_file(in_file), **options}
    else:
        cfg, given = TrainConfig(data=args.data, **options), options
    cfg.check_paths()
    return cfg, given


def _set_in_file(in_file: dict) -> dict:
    """The fields a --config file sets: given, as flags are, so each fixes its piece of the auto recipe (a YAML
    `probe_views: flip` was searched over) and is named where the mode does not read it. A file that lists every
    field (a run's saved config.yaml) gives only those away from their defaults: the rest leave the search free."""
    from dataclasses import fields

    from .config import TrainConfig

    default = TrainConfig(data=None)
    names = [f.name for f in fields(TrainConfig) if f.name not in ("data", "out")]
    every_field = set(names) <= set(in_file)
    return {name: in_file[name] for name in names if name in in_file
            and (not every_field or in_file[name] != getattr(default, name))}


def _resume(args, options: dict) -> dict:
    """`train --resume RUN` is the API's resume (api.py); DATA beside it must equal the saved one."""
    from .api import resume_run

    return resume_run(args.resume, {**options, **({"data": args.data} if args.data else {})})


def _print_train_summary(m: dict) -> None:
    wall = m["search"]["wall_seconds"] if m.get("search") else m["wall_seconds"]
    minutes, seconds = divmod(round(wall), 60)  # 179.6 s is 3m 0s, not 2m 60s
    print(f"Training complete in {minutes}m {seconds}s")
    from .results.metrics import format_interval  # sklearn and scipy are loaded by the training already

    interval = m.get("best_val_acc_interval")
    spread = (f"{interval['confidence']:.0%} interval {format_interval(interval)} on {interval['images']} images; "
              if interval else "")
    # a linear probe is one fit scored once, not a best epoch
    when = "one fit" if m.get("mode") == "linear-probe" else f"epoch {m['best_epoch']} of {m['epochs_run']}"
    print(f"Best val Acc: {m['best_val_acc']:.4f} ({spread}{when}; "
          f"balanced acc {m['best_val_balanced_accuracy']:.4f}, macro-F1 {m['best_val_macro_f1']:.4f})")
    if m.get("best_chosen_on_val"):
        print(f"note: the best of {m['epochs_run']} epochs was chosen on the val images it is scored on, so "
              f"its accuracy is optimistic; the last epoch scored {m['last_val_acc']:.4f} (`--best-metric last` "
              "scores val once, after the last epoch)")
    print(f"params to learn: {m['trainable_params']:,} of {m['total_params']:,} "
          f"({', '.join(m['trainable_groups'])})")
    if m.get("skipped_during_training"):
        print(f"skipped {m['skipped_during_training']} unreadable files during training")
    if m.get("search"):
        print(f"recipe search: chose {m['search']['chosen']} ({m['search']['wall_seconds']:.0f}s in all; "
              f"every candidate in search.json); the same run without the search:")
        print(f"  {m['search']['reproduce']}")
        subsample, needs = m["search"].get("train_subsample"), m["search"].get("all_images_memory_bytes_estimate")
        if subsample and needs:
            print(f"  the memory held the features of {subsample} training images; without --train-subsample that "
                  f"command needs about {needs / 1e9:.1f} GB of memory for all of them")
        elif subsample and m["search"].get("all_images_seconds_estimate"):
            all_minutes = max(1, round(m["search"]["all_images_seconds_estimate"] / 60))
            print(f"  the budget fitted the model on {subsample} training images; without "
                  f"--train-subsample that command fits all of them in about {all_minutes} min")
    _print_test_folders(m["run_dir"])
    print(f"run folder: {m['run_dir']}")


def _print_test_folders(run_dir: str) -> None:
    """The command that scores the run on the data's held-out test/ folder, which nothing in the run read."""
    from .io import pasteable_path, read_json_object
    from .run_folder import RunFolder

    report = read_json_object(RunFolder(run_dir).data_report)
    for problem in report.get("problems", {}).get("test_folder", []):
        test = Path(report["root"]) / problem["path"]
        print("held-out test folder, not read by this run: score it once with "
              f"`transferkit evaluate {pasteable_path(run_dir)} {pasteable_path(test)}`")


def cmd_models(args) -> int:
    from .models.registry import list_specs
    from .models.weights import weights_available
    from .models.zoo import DEFAULT_MODEL

    print(f"{'model':<20}{'params':>10}  {'input':>7}  {'pretrained weights here?'}")
    for spec in list_specs():  # no network is built: listing needs no torch (tests check spec.params)
        n = spec.params or 0
        ok, where = weights_available(spec)
        mark = " (default)" if spec.name == DEFAULT_MODEL else ""
        print(f"{spec.name:<20}{n / 1e6:>9.1f}M  {spec.input_size:>7}  "
              f"{'yes' if ok else 'no '} {where}{mark}")
    return 0


def cmd_predict(args) -> int:
    if args.out:
        _check_rows_out(Path(args.out))
    engine = _predict_engine(args.checkpoint, args.engine)
    if engine == "onnx":
        from . import onnx_predict
        from .errors import UsageError
        from .run_folder import onnx_model_path

        if args.device != "cpu":
            raise UsageError(f"--device {args.device} is for the torch engine; an ONNX model runs on ONNX Runtime's "
                             "CPU provider (predict with the run folder or its .safetensors for a GPU)")
        rows = onnx_predict.predict_rows(onnx_model_path(args.checkpoint), args.paths, top_k=args.top_k)
    else:
        from .engine.environment import pick_device
        from .predict import Predictor, expand_inputs

        device = str(pick_device(args.device))  # one line for a device that is not there or not a device
        predictor = Predictor(args.checkpoint, device=device, precision=args.precision)
        rows = predictor.predict_rows(expand_inputs(args.paths), top_k=args.top_k)
    text = _format_rows(rows, args.format)
    if args.out:
        stream = _write_rows(Path(args.out), text)
        print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr if stream else sys.stdout)
    else:
        sys.stdout.write(text)
    unreadable = sum(r["error"] is not None for r in rows)
    if unreadable:
        log.warning("%d of %d files could not be read (their rows carry the error; exit code 1)",
                    unreadable, len(rows))
    return 0 if not unreadable else 1


def _check_rows_out(out: Path) -> None:
    """An existing --out is replaced only where it holds text (an earlier predict's rows): `--out photo.jpg`, a
    slip for an input, replaced the photo with CSV, and so would it a checkpoint or an ONNX model."""
    from .errors import UsageError

    if not out.is_file():  # new; a folder, /dev/stdout or a pipe (never read: that blocks): as written
        return
    try:
        with open(out, "rb") as fh:
            binary = b"\0" in fh.read(8192)
    except OSError:  # unreadable: atomic_write_text says whether it can be written
        return
    if binary:
        raise UsageError(f"--out {out} is an existing binary file (an image or a model?), not earlier rows; "
                         "predict writes its rows as text: choose another file (e.g. predictions.csv)")


def _write_rows(out: Path, text: str) -> bool:
    """Write the rows to --out; True where it is a stream. A file is replaced atomically; /dev/stdout, /dev/fd/N
    (a shell's `>(...)`), a pipe or a symlink are written into, as a shell's `>` does: replaced, the link or
    device became a plain file (as root: /dev/stdout itself) or its folder (/dev) could not be written."""
    from .io import RunFolderError, atomic_write_text

    if not out.is_symlink() and (out.is_file() or not out.exists()):
        atomic_write_text(out, text)
        return False
    try:
        with open(out, "w", encoding="utf-8", errors="surrogateescape") as fh:  # as atomic_write_text
            fh.write(text)
    except OSError as exc:
        raise RunFolderError(f"could not write {out}: {exc.strerror or exc}") from None
    return not out.is_file()


def _predict_engine(checkpoint: str, engine: str) -> str:
    """auto: told by the file's content, not its name; a TorchScript file gets a pointer to what works."""
    from .errors import CheckpointError, UsageError
    from .inference import model_kind

    if not Path(checkpoint).exists():
        raise CheckpointError(f"no such model: {checkpoint} (a run folder, .safetensors checkpoint or .onnx model)")
    kind = model_kind(checkpoint)
    if kind == "torchscript":
        raise CheckpointError(f"{checkpoint} is a TorchScript model; predict takes a run folder, a .safetensors "
                              f"checkpoint or an .onnx model (`transferkit export RUN --format onnx`)")
    if engine == "auto":
        return "onnx" if kind == "onnx" else "torch"
    if engine == "torch" and kind == "onnx":
        raise UsageError(f"{checkpoint} is an ONNX model; use --engine onnx (or leave --engine out)")
    return engine


def _format_rows(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "probability", "top_k", "error", "novelty", "novel"])
    for r in rows:
        top = ";".join(f"{t['label']}:{t['probability']:.4f}" for t in r["top_k"])
        prob = f"{r['probability']:.4f}" if r["probability"] is not None else ""
        novelty = f"{r['novelty']:.4f}" if r.get("novelty") is not None else ""
        novel = "" if r.get("novel") is None else str(r["novel"]).lower()
        writer.writerow([r["path"], r["label"] or "", prob, top, r["error"] or "", novelty, novel])
    return buf.getvalue()


def _add_serve_command(sub) -> None:
    from .serve import ENGINES, PRECISIONS, ServeOptions

    d = ServeOptions()
    p = sub.add_parser("serve", help="serve a run or an exported .onnx model over HTTP: predictions API and a page")
    p.add_argument("model", help="run folder, .safetensors checkpoint or exported .onnx model")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=d.port, help="0 picks a free port (the printed URL names it)")
    p.add_argument("--engine", choices=ENGINES, default=d.engine,
                   help="onnx (no torch; a run folder means RUN/export/model.onnx) or torch "
                        "(default: onnx for an ONNX model, torch otherwise, told by content)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images in one forward pass")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a batch waits for images from other requests")
    p.add_argument("--max-files", type=int, default=d.max_files, help="images in one request")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help="bytes per image")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="bytes per request body")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="width × height per image, read from its header (decompression bombs)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="ONNX Runtime threads per forward pass (default: 1, or all cores with --lanes 1)")
    p.add_argument("--lanes", type=int, default=d.lanes,
                   help="forward passes run side by side (default: ONNX engine, cores / threads; torch engine, 1)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="torch engine: as `transferkit predict --precision` (auto: the run's own precision)")
    p.add_argument("--access-log", action="store_true", default=d.access_log,
                   help="print a line per request (off: the logging costs CPU the forward passes need; refused "
                        "requests and failures are logged either way)")


def cmd_serve(args) -> int:
    from .serve import ServeOptions, run_server

    options = ServeOptions(**{f.name: getattr(args, f.name) for f in fields(ServeOptions)})
    run_server(args.model, options, announce=lambda line: print(line, flush=True))
    return 0


def cmd_data(args) -> int:
    from .data import builtin

    if args.dataset == "check":
        return cmd_data_check(args)
    if args.dataset == "elpv":
        if args.group_correlation is not None and not args.group_duplicates:  # was taken and silently unused
            from .errors import UsageError

            raise UsageError("--group-correlation sets how alike images are grouped, and --no-group-duplicates "
                             "turns the grouping off: drop one of them")
        grouping = {} if args.group_correlation is None else {"group_correlation": args.group_correlation}
        summary = builtin.materialize_elpv(args.out, classes=args.classes, seed=args.seed,
                                           group_duplicates=args.group_duplicates, **grouping)
        print(json.dumps(summary, indent=2, default=str))
    else:
        path = builtin.download_hymenoptera(args.out)
        print(f"bees/ants data in {path}")
    return 0


def _add_cache_command(sub) -> None:
    p = sub.add_parser("cache", help="what transferkit keeps between runs, and how big it is; `cache clear` frees it")
    p.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="clear: features, decoded, engines, scans, weights (default: all but weights, which may "
                        "need a download to get back)")


def cmd_cache(args) -> int:
    from .caches import (CAP_ENV, DEFAULT_CAP_FRACTION, DERIVED, NAMES, WHAT, cache_cap, cap_setting, caches,
                         capped_entries, feature_root)
    from .errors import UsageError

    unknown = sorted(set(args.names) - set(NAMES))
    if unknown or (args.names and args.action != "clear"):
        raise UsageError(f"cache {args.action}: unknown cache {', '.join(unknown)}; one of {', '.join(NAMES)}"
                         if unknown else "cache list takes no names; `transferkit cache clear NAME...` clears some")
    setting = cap_setting()  # a bad TRANSFERKIT_CACHE_MAX: its one line before any output, not after the table
    found = caches()
    if args.action == "clear":
        for name in dict.fromkeys(args.names or DERIVED):  # each once, in the order given
            freed = found[name].clear()
            print(f"cleared {name}: {freed / 1e6:.1f} MB freed ({found[name].folder})")
        return 0
    print(f"{'cache':<10}{'size':>10}  {'entries':>7}  where / what")
    for name, cache in found.items():
        print(f"{name:<10}{cache.size / 1e6:>7.1f} MB  {len(cache.entries):>7}  {cache.folder}\n"
              f"{'':<31}{WHAT[name]}")
    used = sum(size for _, size, _ in capped_entries())
    how = CAP_ENV if setting is not None else \
        f"{CAP_ENV} unset: {DEFAULT_CAP_FRACTION:.0%} of their size + the free disk"
    print(f"\nfeatures, decoded and scans: {used / 1e6:.1f} MB, cap {cache_cap(feature_root(), used) / 1e6:.1f} MB "
          f"({how})\n{'':<31}the least recently used entries are evicted first")
    return 0


COMMANDS = {"train": cmd_train, "models": cmd_models, "predict": cmd_predict, "serve": cmd_serve, "data": cmd_data,
            "cache": cmd_cache}


COMPARE_OPTIONS = {"batch_size": int, "image_size": int, "lr": float, "optimizer": str, "seed": int,
                   "val_fraction": float}


def _train_default(name: str):
    from .config import TrainConfig

    return TrainConfig.__dataclass_fields__[name].default


def _add_results_commands(sub) -> None:
    """evaluate, compare, export, report: looking at a trained run and shipping it."""
    from .evaluate import TTA_CHOICES  # torch-free; export's choices are checked by export_run (it imports torch)

    p = sub.add_parser("evaluate", help="metrics, confusion matrix and worst mistakes of a run on labelled images")
    p.add_argument("run", help="run folder or .safetensors checkpoint")
    p.add_argument("data", help="folder of class folders, a data root with val/, or a run's split.csv (val)")
    p.add_argument("--tta", nargs="?", const="auto", choices=TTA_CHOICES,
                   help="average over flips (auto: all 8 dihedral views if the run trained on them)")
    p.add_argument("--out", help="folder for evaluation.json and figures (default: the run folder)")
    p.add_argument("--include-train", action="store_true",
                   help="also score images the run trained on (left out by default: they flatter the model)")

    p = sub.add_parser("compare", help="pretrained feature-extract vs finetune vs scratch on the same split")
    p.add_argument("data")
    p.add_argument("--model", default=None, help="backbone (see `transferkit models`)")
    p.add_argument("--epochs", type=int, default=15, help="epochs per run")
    for name, kind in COMPARE_OPTIONS.items():  # shared by the three runs; defaults as for `train`
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                       help=_with_default(TRAIN_HELP.get(name), _train_default(name)))
    p.add_argument("--out", help="folder for the three runs, compare.json and compare.png")
    p.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier compare in --out")

    p = sub.add_parser("export", help="export a run to ONNX or TorchScript, checked against the eager model")
    p.add_argument("run", help="run folder or .safetensors checkpoint (its split.csv gives the check images)")
    p.add_argument("--format", default="onnx", help="onnx or torchscript")
    p.add_argument("--quantize", help="int8: also write an int8 ONNX model (static, QDQ, per-channel)")
    p.add_argument("--out", help="folder (default RUN/export)")
    p.add_argument("--data", metavar="DIR", help="the run's data folder where it is now, if it has moved since the "
                   "run (the check images are its val split; default: the folder in RUN/config.yaml)")

    p = sub.add_parser("report", help="(re)write RUN/report.html from the run folder")
    p.add_argument("run")


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run
    from .results.metrics import format_metrics_table

    ev = evaluate_run(args.run, args.data, tta=args.tta, out=args.out, include_train=args.include_train)
    if ev["trained_on"]["left_out"]:
        print(f"left out {ev['trained_on']['left_out']} images the run trained on (--include-train scores them)")
    elif ev["trained_on"]["included"]:
        print(f"included {ev['trained_on']['included']} images the run trained on (--include-train)")
    print(f"evaluated {ev['n']} images from {ev['split']}")
    if ev["features"]:
        print(f"features: {ev['features']['cached']} from the cache, {ev['features']['computed']} computed")
    print(format_metrics_table(ev))
    tta = ev["tta"]
    if tta["kind"] != "none":
        print(f"TTA ({tta['kind']}, {tta['views']} views): accuracy {tta['accuracy_with']:.4f} vs "
              f"{tta['accuracy_without']:.4f} without ({tta['gain']:+.4f})")
    elif tta.get("in_model"):
        print(f"TTA ({tta['in_model']}): already in the model, which averages over its {tta['model_views']} views; "
              "scored once")
    for row in ev.get("top_losses", [])[:5]:
        print(f"worst: {row['path']}  true {row['true']}  predicted {row['predicted']} "
              f"({row['probability_of_predicted']:.3f})")
    if ev["skipped"]:
        print(f"skipped {len(ev['skipped'])} unreadable files")
    from .run_folder import RunFolder

    print(f"wrote {ev['written_to']}/{RunFolder.EVALUATION}, {RunFolder.CONFUSION}, {RunFolder.TOP_LOSSES}")
    return 0


def cmd_compare(args) -> int:
    from datetime import datetime

    from .compare import compare, format_compare_table
    from .models.zoo import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    out = args.out or f"runs/compare-{model}-{datetime.now():%Y%m%d-%H%M%S}"
    options = {k: getattr(args, k) for k in COMPARE_OPTIONS if hasattr(args, k)}
    if args.overwrite:
        options["overwrite"] = True
    from .engine.signals import stop_on_signals

    with stop_on_signals():  # Ctrl-C/SIGTERM: the batch finishes, its run keeps `last`, the same command goes on
        result = compare(args.data, model, out, epochs=args.epochs, **options)
    print(format_compare_table(result))
    print(f"figure: {result['figure']}")
    return 0


def cmd_export(args) -> int:
    from .errors import ExportError
    from .export import export_run, format_export

    try:
        result = export_run(args.run, args.format, quantize=args.quantize, out=args.out, data=args.data)
    except ExportError as exc:
        if exc.result:  # a refused int8 model: the float model it was made from is exported
            print(format_export({**exc.result, "int8": None}))
        raise
    print(format_export(result))
    return 0


def cmd_report(args) -> int:
    from .results.report import write_report

    print(write_report(_report_folder(args.run)))
    return 0


def _report_folder(given: str) -> Path:
    """The run folder `report RUN` writes report.html in: RUN, or the folder of a file in it (RUN/best.safetensors).
    Only a run's folder: the folder of any file (`report notes.txt`) got a report.html, replacing one there."""
    from .errors import CheckpointError
    from .run_folder import RunFolder

    path = Path(given)
    if not path.exists():
        raise CheckpointError(f"no run folder at {path}; pass the folder a training run wrote")
    folder = path if path.is_dir() else path.parent
    if not RunFolder(folder).is_run():
        what = "a transferkit run folder" if path.is_dir() else "a file in a transferkit run folder"
        raise CheckpointError(f"{path} is not {what} (no config.yaml with the run's split or metrics); pass the "
                              "folder a training run wrote")
    return folder


COMMANDS.update(evaluate=cmd_evaluate, compare=cmd_compare, export=cmd_export, report=cmd_report)


def _add_check_command(dsub) -> None:
    from .config import Thresholds

    d = Thresholds()
    c = dsub.add_parser("check", help="duplicates, train/val leakage, likely label errors, outliers, sizes")
    c.add_argument("data", help="DATA/train/<class>/*, DATA/val/<class>/* (or DATA/<class>/*)")
    c.add_argument("--model", default="efficientnet_lite0", help="backbone whose cached features are used")
    c.add_argument("--image-size", type=int, help="as in train: the features of that resolution are used")
    c.add_argument("--crop-fraction", type=float, help="as in train (1.0 keeps the whole frame)")
    c.add_argument("--out", help="folder for check.json and check.html (default runs/check-<DATA name>)")
    c.add_argument("--strict", action="store_true",
                   help=f"exit {EXIT_CHECK_FAILED} when train/val leakage or cross-class duplicates are found")
    c.add_argument("--near-cosine", type=float, default=d.near_cosine, help="embedding cosine of a near-duplicate")
    c.add_argument("--near-pixel", type=float, default=d.near_pixel,
                   help="thumbnail correlation (best mild crop) that confirms a near-duplicate")
    c.add_argument("--outlier-z", type=float, default=d.outlier_z, help="robust z-score of an outlier's kNN distance")
    c.add_argument("--folds", type=int, default=d.folds, help="folds of the label-error probe")
    c.add_argument("--top", type=int, default=d.top, help="findings of each kind listed in check.json/html")


def cmd_data_check(args) -> int:
    from .datacheck import Thresholds, run_check, strict_failures, summary_lines
    from .errors import UsageError

    data = Path(args.data)
    if not data.is_dir():
        raise UsageError(f"DATA {data} is not a folder; expected a folder of class folders (DATA/<class>/*.jpg)")
    thresholds = Thresholds(args.near_cosine, args.near_pixel, args.outlier_z, args.folds, args.top)
    out = args.out or str(Path("runs") / f"check-{data.resolve().name}")
    report = run_check(data, out, args.model, thresholds, args.image_size, args.crop_fraction)
    for line in summary_lines(report):
        print(line)
    print(f"wrote {report['written_to']}/check.json and check.html")
    failures = strict_failures(report)
    if args.strict and failures:
        sys.stderr.write(f"transferkit: data check --strict: {', '.join(failures)}\n")
        return EXIT_CHECK_FAILED
    return 0
