"""Every bad command line ends in one line on stderr naming the option, exit code 2, no traceback,
and nothing written."""

from __future__ import annotations

import pytest
import torch

from transferkit import cli

# (arguments after `train DATA`, words the one line must contain)
BAD_TRAIN_OPTIONS = [
    (["--epochs", "-1"], ["--epochs", "≥ 1"]),
    (["--epochs", "0"], ["--epochs", "≥ 1"]),
    (["--epochs", "abc"], ["--epochs", "invalid int"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--lr", "-0.1"], ["--lr", "> 0"]),
    (["--lr", "nan"], ["--lr", "> 0"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--batch-size", "0"], ["--batch-size", "≥ 1"]),
    (["--val-fraction", "1.5"], ["--val-fraction", "between 0 and 1"]),
    (["--workers", "-2"], ["--workers", "≥ 0"]),
    (["--views", "9"], ["--views", "between 1 and 8"]),
    (["--image-size", "8"], ["--image-size", "≥ 32"]),
    (["--patience", "-3"], ["--patience", "≥ 0"]),
    (["--label-smoothing", "1"], ["--label-smoothing", "[0, 1)"]),
    (["--ema-epochs", "-1"], ["--ema-epochs", "≥ 0"]),
    (["--mode", "linear-probe", "--ema-epochs", "1"], ["--ema-epochs", "one fit"]),
    (["--mode", "bogus"], ["--mode", "invalid choice", "finetune"]),
    (["--optimizer", "rmsprop"], ["--optimizer", "invalid choice", "adamw"]),
    (["--best-metric", "f2"], ["--best-metric", "balanced_accuracy"]),
    (["--class-weights", "balanced"], ["--class-weights", "auto"]),
    (["--model", "resnt18"], ["unknown model", "did you mean resnet18"]),
    (["--device", "tpu"], ["--device"]),
    (["--no-such-option"], ["unrecognized arguments", "--no-such-option"]),
    (["--seed", "-1"], ["--seed", "2**32 - 1"]),  # were numpy's ValueError tracebacks
    (["--seed", "4294967296"], ["--seed", "2**32 - 1"]),
    (["--momentum", "1.5"], ["--momentum", "[0, 1)"]),
    (["--weight-decay", "nan"], ["--weight-decay", "finite"]),  # nan passed a `< 0` check
    (["--ema-epochs", "inf"], ["--ema-epochs", "finite"]),
    (["--gamma", "0"], ["--gamma", "> 0"]),
    (["--train-subsample", "1"], ["--train-subsample 1", "fewer training images than there are classes (2)"]),
    (["--recipe", "tutorial", "--train-subsample", "1"], ["--train-subsample 1", "than there are classes"]),
    # were used as every stage the backbone taps (6), while config.yaml said 99
    (["--mode", "linear-probe", "--probe-stages", "99"], ["--probe-stages", "between 1 and 6", "efficientnet_lite0"]),
    (["--probe-stages", "7"], ["--probe-stages", "between 1 and 6"]),
    (["--model", "alexnet", "--mode", "linear-probe", "--probe-stages", "2"], ["--probe-stages", "between 1 and 1"]),
]


def _run(argv) -> int:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors leave through OneLineParser.error
        code = exc.code
    return code


def _check_one_line(capsys, code, words) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("options, words", BAD_TRAIN_OPTIONS, ids=[" ".join(o) for o, _ in BAD_TRAIN_OPTIONS])
def test_bad_train_option(tiny_folder, tmp_path, capsys, options, words):
    run = tmp_path / "run"
    code = _run(["train", str(tiny_folder), "--recipe", "tutorial", "--out", str(run), *options])
    _check_one_line(capsys, code, words)
    assert not run.exists()  # refused before anything was written


def test_bad_paths(tiny_folder, tmp_path, capsys):
    a_file = tiny_folder / "train" / "ants" / "ants_train_0.png"
    (tmp_path / "data.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("{{{: [")
    cases = [
        (["train", str(tmp_path / "missing")], ["DATA folder", "does not exist"]),
        (["train", str(a_file)], ["is a file", "expected a folder"]),
        (["train", str(tmp_path / "data.zip")], ["is an archive: unpack it and pass the folder"]),
        (["train", str(tiny_folder), "--out", str(a_file)], ["--out", "is a file"]),
        (["train", str(tiny_folder), "--weights", str(tmp_path / "none.pth")], ["--weights", "not a file"]),
        (["train", str(tiny_folder), "--config", str(tmp_path / "none.yaml")], ["cannot read config"]),
        (["train", str(tiny_folder), "--config", str(a_file)], ["cannot read config", "not a UTF-8 text"]),  # was a
        # UnicodeDecodeError traceback; PyYAML's five-line message is one line naming the spot:
        (["train", str(tiny_folder), "--config", str(bad_yaml)], ["cannot read config", "(line 1, column 4)"]),
        (["train"], ["needs a DATA folder"]),
        (["predict"], ["the following arguments are required"]),
        (["frobnicate"], ["invalid choice", "train"]),
    ]
    for argv, words in cases:
        _check_one_line(capsys, _run(argv), words)


def test_a_missing_model_or_run_folder_is_exit_5_for_every_command(tmp_path, capsys):
    """README's table: 5 is "a checkpoint or run folder that is missing"; predict and train --resume said 2."""
    gone = str(tmp_path / "gone")
    for argv, words in [(["predict", gone, str(tmp_path)], ["no such model"]),
                        (["train", "--resume", gone], ["--resume", "not a folder"]),
                        (["evaluate", gone, str(tmp_path)], []), (["export", gone], [])]:
        code = _run(argv)
        err = capsys.readouterr().err
        assert code == 5 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, code, err)
        assert all(word in err for word in words), (argv, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(tiny_folder, tmp_path, capsys):
    out = tmp_path / "runs" / "a" / "run"
    code = _run(["train", str(tiny_folder), "--recipe", "tutorial", "--out", str(out), "--device", "cuda"])
    _check_one_line(capsys, code, ["--device cuda", "no CUDA GPU"])
    assert not (tmp_path / "runs").exists()  # the folders made to hold the run folder's lock went again


def test_config_file_is_validated_too(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {tiny_folder}\nepochs: -5\nlearning_rate: 3\n")
    _check_one_line(capsys, _run(["train", "--config", str(bad)]), ["unknown config keys", "learning_rate"])
    bad.write_text(f"data: {tiny_folder}\nepochs: -5\n")
    _check_one_line(capsys, _run(["train", "--config", str(bad)]), ["--epochs", "≥ 1"])
    bad.write_text(f"data: {tiny_folder}\nepochs: three\n")  # was a TypeError comparing 'three' with 1
    _check_one_line(capsys, _run(["train", "--config", str(bad)]), ["--epochs must be a whole number, not 'three'"])
    bad.write_text(f"data: {tiny_folder}\noptimizer: rmsprop\n")  # no argparse choices on this path
    _check_one_line(capsys, _run(["train", "--config", str(bad)]),
                    ["--optimizer must be one of sgd, adam, adamw, not 'rmsprop'"])


def test_a_config_file_s_odd_keys_are_named_in_one_line(tiny_folder, tmp_path, capsys):
    """A key that is not text (`1: 2`, `null: x`) was a TypeError traceback listing the unknown keys; a key given
    twice was taken silently, the last one winning (`epochs: 1` then `epochs: 20` trained 20 epochs)."""
    bad = tmp_path / "bad.yaml"
    for text, words in ((f"data: {tiny_folder}\n1: 2\n", ["unknown config keys: 1 "]),
                        (f"data: {tiny_folder}\nnull: 2\n", ["unknown config keys: None "]),
                        (f"data: {tiny_folder}\nepochs: 1\nepochs: 20\n",
                         ["cannot read config", "duplicate key 'epochs' (line 3, column 1)"])):
        bad.write_text(text)
        _check_one_line(capsys, _run(["train", "--config", str(bad), "--out", str(tmp_path / "run")]), words)
    assert not (tmp_path / "run").exists()


def test_a_config_without_data_takes_data_from_the_command_line_or_says_it_is_missing(tiny_folder, tmp_path, capsys):
    config = tmp_path / "options.yaml"
    config.write_text("epochs: 1\n")  # no data: key: was a TypeError (TrainConfig missing 'data')
    out = tmp_path / "run"
    _check_one_line(capsys, _run(["train", "--config", str(config), "--out", str(out)]),
                    ["train needs a DATA folder", "data: in the config"])
    for text in ("data: ''\n", "data: 5\n"):  # '' was the working folder as DATA; 5 a TypeError
        config.write_text(text)
        _check_one_line(capsys, _run(["train", "--config", str(config), "--out", str(out)]),
                        ["DATA folder" if "''" in text else "--data must be text, not 5"])
    assert not out.exists()
    config.write_text("epochs: 1\nrecipe: tutorial\nimage_size: 64\n")
    assert _run(["train", str(tiny_folder), "--config", str(config), "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file()


def test_the_option_tables_name_train_options_whose_defaults_pass():
    """option_choices (validate's and the CLI's choices) and WHOLE_NUMBER_MINIMUMS name TrainConfig fields: a
    renamed field would otherwise fail only where the table is read, and a default outside its own choices would
    refuse every run that leaves it alone."""
    from dataclasses import fields

    from transferkit.config import WHOLE_NUMBER_MAXIMUMS, WHOLE_NUMBER_MINIMUMS, TrainConfig, option_choices
    from transferkit.errors import UsageError

    kinds = {f.name: str(f.type) for f in fields(TrainConfig)}
    defaults = TrainConfig(data="x")
    for name, allowed in option_choices().items():
        assert getattr(defaults, name) in allowed, name
    assert {kinds[name] for name in WHOLE_NUMBER_MINIMUMS} == {"int", "int | None"}
    for name, low in WHOLE_NUMBER_MINIMUMS.items():
        assert getattr(defaults, name) is None or getattr(defaults, name) >= low, name
    for name, high in WHOLE_NUMBER_MAXIMUMS.items():
        assert kinds[name] in ("int", "int | None") and high > WHOLE_NUMBER_MINIMUMS[name], name
        with pytest.raises(UsageError, match=f"^--{name.replace('_', '-')} must be ≤ {high} pixels, not {high + 1}$"):
            TrainConfig(data="x", **{name: high + 1}).validate()  # 100000 px: 11 GB in one convolution
    assert defaults.validate() is defaults


def test_an_out_folder_of_someone_else_s_files_is_refused_and_left_as_it_was(tiny_folder, tmp_path, capsys):
    """`--out .` in a home folder wrote the run's fifteen files among the user's; an empty folder is fine."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "letter.txt").write_text("mine")
    for recipe in ("tutorial", "auto"):
        code = _run(["train", str(tiny_folder), "--recipe", recipe, "--out", str(docs)])
        _check_one_line(capsys, code, [f"--out {docs} holds other files (letter.txt)", "a new or empty folder"])
        assert sorted(p.name for p in docs.iterdir()) == ["letter.txt"]  # not even the lock file stays


def test_a_config_file_s_numbers_without_a_dot_are_numbers(tiny_folder, tmp_path):
    """YAML 1.1 reads `lr: 1e-3` as the text "1e-3"; an option that holds a number takes it as one."""
    from transferkit.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text(f"data: {tiny_folder}\nlr: 1e-3\nweight_decay: 5e-4\nmode: linear-probe\n")
    cfg = TrainConfig.from_yaml(path).validate()
    assert (cfg.lr, cfg.weight_decay, cfg.mode) == (0.001, 0.0005, "linear-probe")


@pytest.mark.parametrize("options, words", [
    ({"epochs": "3"}, "epochs must be a whole number, not '3'"),
    ({"lr": "0.1"}, "lr must be a number, not '0.1'"),
    ({"seed": 1.5}, "seed must be a whole number, not 1.5"),
    ({"batch_size": True}, "batch_size must be a whole number, not True"),
    ({"mode": 3}, "mode must be text, not 3"),
])
def test_the_api_names_an_option_of_the_wrong_kind(tiny_folder, tmp_path, options, words):
    """Options of the wrong kind through the Python API (or a config file) ended in a TypeError traceback."""
    import transferkit as tk
    from transferkit.errors import UsageError

    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        tk.train(tiny_folder, recipe="tutorial", out=tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()


def test_the_api_takes_paths_and_numpy_numbers_and_names_a_config_or_data_of_the_wrong_kind(tiny_folder, tmp_path):
    """out=Path(...) passed validation and then failed writing config.yaml (yaml's RepresenterError); numpy numbers
    (a sweep over np.arange) were "must be a whole number, not np.int64(1)"; config={...} was dataclasses'
    TypeError; data=5 was looked for as the folder "5"."""
    import numpy as np
    import yaml

    import transferkit as tk
    from transferkit.config import TrainConfig
    from transferkit.errors import UsageError

    clf = tk.train(tiny_folder, recipe="tutorial", epochs=np.int64(1), lr=np.float64(0.01), cache=np.bool_(True),
                   out=tmp_path / "run", verbose=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert clf.run_dir_ == tmp_path / "run" and saved["out"] == str(tmp_path / "run")
    assert (type(saved["epochs"]), saved["lr"], saved["cache"]) == (int, 0.01, True)
    with pytest.raises(UsageError, match=r"^config must be a transferkit.TrainConfig \(TrainConfig.from_yaml"):
        tk.train(tiny_folder, config={"epochs": 1})
    with pytest.raises(UsageError, match="^data must be text, not 5$"):
        tk.train(5, recipe="tutorial")
    with pytest.raises(UsageError, match="^run must be a path"):
        tk.resume(None)
    cfg = TrainConfig(data=tiny_folder, recipe="tutorial", epochs=1, out=tmp_path / "again")
    tk.train(config=cfg, verbose=False)  # a config's paths too
    assert yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())["data"] == str(tiny_folder)


def test_collector_settings_belong_to_the_program_not_to_main(tmp_path):
    """`transferkit` (entry) collects rarely and freezes the imported heap (~2 s of a cold run); `cli.main`
    called inside someone's Python process leaves their garbage collector as it was."""
    import gc
    import subprocess
    import sys

    before = gc.get_threshold(), gc.get_freeze_count()
    assert cli.main(["models"]) == 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
    probe = ("import gc, sys; sys.argv = ['transferkit', 'models']; from transferkit.cli import entry; "
             "code = entry(); print(code, gc.get_threshold()[0], gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "0 100000 True"


def test_verbose_shows_our_debug_lines_not_every_library_s():
    """-v is for transferkit's own debug lines; at DEBUG, Pillow logs every PNG chunk it reads and matplotlib
    every font it scores (thousands of lines for one small run)."""
    import subprocess
    import sys

    probe = ("import logging; from transferkit import cli; cli.main(['-v', 'models']); "
             "logging.getLogger('PIL.PngImagePlugin').debug('STREAM IDAT'); "
             "logging.getLogger('transferkit.engine.fit').debug('ours')")
    err = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stderr
    assert "DEBUG ours" in err and "STREAM" not in err


def test_top_level_help_tells_a_user_what_the_tool_does_and_how_to_start(capsys):
    """`transferkit --help` is a user's first screen: what the tool does and the first commands to run, not the
    CLI module's docstring for developers."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "exported image classifier" in out and "quick start:" in out
    assert "transferkit train data/elpv" in out and "transferkit predict" in out
    assert cli.__doc__.strip() not in out


@pytest.mark.parametrize("command", ["train", "models", "predict", "serve", "data", "data check", "evaluate",
                                     "compare", "export", "report", "cache"])
def test_help_shows_no_default_it_does_not_have(command, capsys):
    """`transferkit serve --help` ended options that say their default in words with "(default: None)" too:
    "--threads ... (default: 1, or all cores with --lanes 1) (default: None)"."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command.split(), "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "--help" in text
    assert "(default: None)" not in text and ") (default: False)" not in text


def test_the_train_summary_gives_the_val_accuracy_with_its_interval(capsys):
    metrics = {"wall_seconds": 161.0, "best_val_acc": 561 / 656, "best_epoch": 1, "epochs_run": 1,
               "best_val_balanced_accuracy": 0.81, "best_val_macro_f1": 0.82, "trainable_params": 8098,
               "total_params": 3379106, "trainable_groups": ["head"], "run_dir": "runs/x", "val_images": 656,
               "best_val_acc_interval": {"confidence": 0.95, "low": 0.8262, "high": 0.8800, "images": 656}}
    cli._print_train_summary(metrics)
    assert "Best val Acc: 0.8552 (95% interval 0.8262-0.8800 on 656 images; epoch 1 of 1;" in capsys.readouterr().out
    del metrics["best_val_acc_interval"]  # a run folder written before the interval was recorded
    cli._print_train_summary(metrics)
    out = capsys.readouterr().out
    assert "Best val Acc: 0.8552 (epoch 1 of 1;" in out and "optimistic" not in out
    cli._print_train_summary({**metrics, "epochs_run": 15, "best_chosen_on_val": True, "last_val_acc": 0.84})
    assert "the best of 15 epochs was chosen on the val images it is scored on" in capsys.readouterr().out
    cli._print_train_summary({**metrics, "mode": "linear-probe"})
    assert "Best val Acc: 0.8552 (one fit;" in capsys.readouterr().out


def test_predict_on_a_device_that_is_not_there_or_with_an_onnx_model_is_one_line(tmp_path, capsys):
    from tiny_run import export_tiny

    data, run, onnx_model = export_tiny(tmp_path)
    image = str(data / "val" / "ants" / "ants_val_0.png")
    _check_one_line(capsys, _run(["predict", str(onnx_model), image, "--device", "cuda"]),
                    ["--device cuda is for the torch engine", "ONNX Runtime"])
    _check_one_line(capsys, _run(["predict", str(run), image, "--device", "tpu"]), ["--device"])
    if not torch.cuda.is_available():
        _check_one_line(capsys, _run(["predict", str(run), image, "--device", "cuda"]), ["no CUDA GPU"])
    assert _run(["predict", str(run), image, "--device", "cpu"]) == 0
    assert "ants" in capsys.readouterr().out
    # '' is the working folder to Path: every image under it was predicted
    _check_one_line(capsys, _run(["predict", str(run), image, ""]), ["empty path", "names no file or folder"])


def test_predict_out_never_replaces_an_image_and_writes_into_links_and_pipes(tmp_path, capsys):
    """`predict RUN photo.png --out photo.png` replaced the photo with CSV (checked before the model loads); --out
    a symlink replaced the link with a file, and /dev/stdout (a link to a pipe) was replaced itself as root."""
    import os
    import threading

    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    before = photo.read_bytes()
    _check_one_line(capsys, _run(["predict", str(tmp_path / "no-run"), str(photo), "--out", str(photo)]),
                    ["--out", "existing binary file", "choose another file"])
    assert photo.read_bytes() == before
    (tmp_path / "rows.csv").write_text("earlier rows\n")  # text: an earlier predict's, replaced
    os.symlink("rows.csv", tmp_path / "link.csv")
    assert cli._write_rows(tmp_path / "link.csv", "new rows\n") is False
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "rows.csv").read_text() == "new rows\n"
    os.mkfifo(tmp_path / "pipe")
    read = []
    reader = threading.Thread(target=lambda: read.append((tmp_path / "pipe").read_text()))
    reader.start()
    assert cli._write_rows(tmp_path / "pipe", "piped rows\n") is True  # a stream: its "wrote" line to stderr
    reader.join(30)
    assert read == ["piped rows\n"] and not (tmp_path / "pipe").is_file()


def test_program_skips_the_teardown_but_not_what_an_exit_owes(tmp_path):
    """`transferkit` (cli.program) ends with os._exit after the command: the exit code and every line of
    output still arrive, atexit handlers still run, and a thread still working, or a profiler, makes it take
    the ordinary exit, which waits for that thread (and lets the profiler write its file)."""
    import subprocess
    import sys

    def program(before: str, *argv: str) -> subprocess.CompletedProcess:
        code = (f"import atexit, sys, threading, time\n{before}\n"
                f"sys.argv = ['transferkit', *{list(argv)!r}]\nfrom transferkit.cli import program\nprogram()")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    marker, late = tmp_path / "atexit-ran", tmp_path / "thread-finished"
    listed = program(f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))", "models")
    assert listed.returncode == 0 and marker.read_text() == "yes"
    assert "efficientnet_lite0" in listed.stdout and listed.stdout.endswith("\n")
    wrong = program("", "train", str(tmp_path / "no-such-folder"))
    assert wrong.returncode == cli.EXIT_USAGE and wrong.stderr.startswith("transferkit: ") and "Traceback" not in wrong.stderr
    worker = (f"threading.Thread(target=lambda: (time.sleep(1.0), open({str(late)!r}, 'w').write('done'))).start()")
    assert program(worker, "models").returncode == 0 and late.read_text() == "done"
    stats = tmp_path / "profile.out"  # a profiler writes its file after the program returns: it must return
    profiled = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "transferkit", "models"],
                              capture_output=True, text=True, timeout=120)
    assert profiled.returncode == 0 and stats.stat().st_size > 0


def test_a_reader_that_closed_the_pipe_ends_the_command_quietly():
    # `transferkit models | head -2`: the reader went away before the listing was written; was a traceback.
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the command writes anything: its first write fails, every time
    try:
        proc = subprocess.run([sys.executable, "-m", "transferkit", "models"], stdout=write_end,
                              stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == cli.EXIT_CLOSED_PIPE and proc.stderr == b""
