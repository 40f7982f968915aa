"""What a newcomer trips over in the first hour (issue 16), each checked the way a user meets it: the
command line as a subprocess (one line, exit code, no traceback), the API as called from Python."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import make_image_folder
from PIL import Image

import transferkit as tk
from transferkit import cli
from transferkit.config import TrainConfig
from transferkit.engine import signals
from transferkit.engine.fit import fit
from transferkit.errors import CheckpointError, DataError, UsageError
from transferkit.predict import Predictor

SMALL = ["--epochs", "2", "--lr", "0.01", "--image-size", "96"]


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    """A run trained on a flat class-folder tree (the split is made by transferkit), and its cache."""
    root = tmp_path_factory.mktemp("first-hour")
    data = make_image_folder(root / "made", n_train=6, n_val=4, size=48, with_val=False) / "train"
    cache = root / "feature-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_FEATURE_CACHE", str(cache))
        metrics = fit(TrainConfig(data=str(data), out=str(root / "run"), epochs=2, lr=0.01, image_size=96))
    return SimpleNamespace(data=data, run=root / "run", cache=cache, metrics=metrics, root=root)


def tk_cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transferkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def foreign_image(path: Path) -> Path:
    """Nothing like the training images (noisy colour blocks with stripes): a dark digit-like stroke on white."""
    img = np.full((64, 64, 3), 255, np.uint8)
    img[14:50, 28:36] = 0
    img[14:20, 20:36] = 0
    Image.fromarray(img).save(path)
    return path


# ---- 1, 9: evaluate leaves out what the run trained on, and reads cached features ----------------------


@pytest.mark.slow
def test_evaluate_leaves_out_the_training_images_and_uses_the_feature_cache(flat_run):
    env = {"TRANSFERKIT_FEATURE_CACHE": str(flat_run.cache)}
    n_train, n_val = flat_run.metrics["train_images"], flat_run.metrics["val_images"]
    proc = tk_cli("evaluate", flat_run.run, flat_run.data, "--out", flat_run.root / "ev1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"left out {n_train} images the run trained on (--include-train scores them)" in proc.stdout
    assert f"evaluated {n_val} images" in proc.stdout
    # The val images' features were cached in training: only the head runs.
    assert f"features: {n_val} from the cache, 0 computed" in proc.stdout
    ev = json.loads((flat_run.root / "ev1" / "evaluation.json").read_text())
    assert ev["n"] == n_val and ev["trained_on"] == {"left_out": n_train, "included": 0, "known": True}
    # The cached path gives what the whole network gives (the cached features come from the runtime training
    # chose, ONNX Runtime in parity with torch, so probabilities agree to a few thousandths).
    full = Predictor(flat_run.run).predict_proba([r["path"] for r in ev["top_losses"]])[0]
    cached = [r["probability_of_predicted"] for r in ev["top_losses"]]
    np.testing.assert_allclose(full.max(1), cached, atol=5e-3)
    assert [flat_run.metrics["classes"][i] for i in full.argmax(1)] == [r["predicted"] for r in ev["top_losses"]]

    proc = tk_cli("evaluate", flat_run.run, flat_run.data, "--include-train", "--out", flat_run.root / "ev2", env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"included {n_train} images the run trained on" in proc.stdout
    assert f"evaluated {n_train + n_val} images" in proc.stdout


# ---- 2: no silent overwrite, no half-made run folder ---------------------------------------------------


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_without_overwrite(flat_run, tmp_path):
    before = (flat_run.run / "metrics.json").read_bytes()
    proc = tk_cli("train", flat_run.data, "--out", flat_run.run, *SMALL)
    one_line_error(proc, 2, f"--out {flat_run.run} holds a finished run", "--overwrite")
    assert (flat_run.run / "metrics.json").read_bytes() == before

    copy = tmp_path / "again"
    fit(TrainConfig(data=str(flat_run.data), out=str(copy), epochs=1, image_size=96))
    first = json.loads((copy / "metrics.json").read_text())["wall_seconds"]
    metrics = fit(TrainConfig(data=str(flat_run.data), out=str(copy), epochs=1, image_size=96, overwrite=True))
    assert json.loads((copy / "metrics.json").read_text())["wall_seconds"] == metrics["wall_seconds"] != first

    # What the replaced run left that the new one does not write (an exported model, which `serve RUN --engine
    # onnx` would have served, a search record, curves a probe does not draw, a checkpoint to resume) goes; a
    # file of the user's stays.
    for stale in ("export/model.onnx", "search.json", "last.safetensors", "tensorboard/events"):
        (copy / stale).parent.mkdir(exist_ok=True)
        (copy / stale).write_text("old run")
    (copy / "notes.txt").write_text("mine")
    fit(TrainConfig(data=str(flat_run.data), out=str(copy), mode="linear-probe", image_size=96, overwrite=True))
    assert not any((copy / name).exists() for name in ("export", "search.json", "curves.png", "last.safetensors",
                                                         "tensorboard"))
    assert (copy / "notes.txt").read_text() == "mine" and (copy / "metrics.json").is_file()

    # A replacing run refused on its way (its data folder holds one class) leaves the old run: the folder was
    # cleared as the run started, before its scan, and the old run was lost with no new one in its place.
    one_class = make_image_folder(tmp_path / "one", n_train=4, classes=("ants",), with_val=False) / "train"
    for recipe in ("tutorial", "auto"):
        with pytest.raises(DataError, match="need at least 2"):
            tk.train(one_class, out=str(copy), recipe=recipe, overwrite=True, verbose=False)
        assert (copy / "metrics.json").is_file() and (copy / "best.safetensors").is_file()


@pytest.mark.slow
def test_an_interrupted_run_is_pointed_at_resume(flat_run, tmp_path):
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "last.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError, match=f"holds an interrupted run; continue it with `transferkit train --resume {run}`"):
        fit(TrainConfig(data=str(flat_run.data), out=str(run)))


@pytest.mark.slow
def test_a_run_that_fails_validation_leaves_no_folder(flat_run, tmp_path):
    run = tmp_path / "never"
    proc = tk_cli("train", flat_run.data, "--out", run, "--mode", "partial", "--unfreeze", "99", *SMALL)
    one_line_error(proc, 2, "--unfreeze must be between 1 and")  # before the scan and the recipe search
    assert not run.exists()


# ---- 3, 10: predict recognises an .onnx model by content; novelty flags a foreign image ----------------


@pytest.mark.slow
def test_predict_picks_the_engine_by_content_and_flags_a_foreign_image(flat_run, tmp_path):
    from transferkit.export import export_run

    model = Path(export_run(flat_run.run, "onnx", out=tmp_path / "export")["path"])
    renamed = tmp_path / "model.bin"  # the content decides, not the name
    renamed.write_bytes(model.read_bytes())
    foreign = foreign_image(tmp_path / "digit.png")
    val = [p for p in sorted(flat_run.data.rglob("*.png")) if str(p) not in
           {x for x, _ in _train_items(flat_run.run)}]
    rows_file = tmp_path / "rows.json"
    proc = tk_cli("predict", renamed, foreign, *val, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    onnx_rows = json.loads(proc.stdout)
    assert onnx_rows[0]["label"] in ("ants", "bees") and onnx_rows[0]["novelty"] is None

    proc = tk_cli("predict", flat_run.run, foreign, *val, "--format", "json", "--out", rows_file)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {len(val) + 1} rows to {rows_file}"
    rows = json.loads(rows_file.read_text())
    assert set(onnx_rows[0]) == set(rows[0])  # one row shape for every engine
    assert [r["label"] for r in rows] == [r["label"] for r in onnx_rows]
    assert rows[0]["novel"] is True
    assert rows[0]["novelty"] > max(r["novelty"] for r in rows[1:])
    assert sum(r["novel"] for r in rows[1:]) <= 1  # the threshold is the val scores' 99th percentile

    one_line_error(tk_cli("predict", model, foreign, "--engine", "torch"), 2, "is an ONNX model", "--engine onnx")
    pt = tmp_path / "model.pt"
    from transferkit.export import export_torchscript
    from transferkit.engine.checkpoint import load_checkpoint

    net, meta = load_checkpoint(flat_run.run)
    export_torchscript(net, meta, pt, torch.zeros(1, 3, 96, 96))
    one_line_error(tk_cli("predict", pt, foreign), 5, "TorchScript", "--format onnx")


def _train_items(run: Path):
    from transferkit.evaluate import manifest_items

    return manifest_items(run / "split.csv", ["ants", "bees"], "train")


@pytest.mark.slow
def test_predict_exit_code_1_when_a_file_is_unreadable(flat_run, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    good = next(flat_run.data.rglob("*.png"))
    proc = tk_cli("predict", flat_run.run, good, broken)
    assert proc.returncode == 1 and "1 of 2 files could not be read" in proc.stderr
    assert proc.stdout.splitlines()[0] == "path,label,probability,top_k,error,novelty,novel"


# ---- 4: a refused int8 model is quiet, removed and recorded ---------------------------------------------


@pytest.mark.slow
def test_a_refused_int8_export_is_quiet_removed_and_recorded(flat_run, tmp_path):
    out = tmp_path / "export"
    code = ("import sys, transferkit.export as ex\n"
            "ex.INT8_MIN_AGREEMENT = 1.01  # no int8 model can pass: the refusal path\n"
            "from transferkit.cli import main\n"
            f"sys.exit(main(['export', {str(flat_run.run)!r}, '--quantize', 'int8', '--out', {str(out)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = one_line_error(proc, 7, "int8 model agrees with float on only", "removed")
    assert "Increased scale" not in proc.stderr, line
    assert (out / "model.onnx").is_file() and not (out / "model.int8.onnx").exists()
    assert proc.stdout.startswith("exported onnx to ") and "top-1 agreement" in proc.stdout  # the float model's check
    recorded = json.loads((out / "export.json").read_text())["int8"]
    assert recorded["refused"] in line and recorded["path"] is None and recorded["images"] > 0


# ---- 5: Ctrl-C during feature extraction stops within a batch, keeps the cache, says how to resume --------


@pytest.mark.slow
def test_ctrl_c_during_feature_extraction_stops_promptly_and_resumes(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", n_train=96, n_val=8, size=32)  # 192 train images: 3 batches
    cache, run = tmp_path / "cache", tmp_path / "run"
    env = {**os.environ, "TRANSFERKIT_FEATURE_CACHE": str(cache), signals.BATCH_DELAY_ENV: "2"}
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", "train", str(data), "--out", str(run), "--epochs",
                             "1", "--image-size", "64", "--recipe", "tutorial"], env=env, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 180
    # The runtime for the frozen part is chosen (and recorded) on the first batch; extraction goes on from there.
    while not list(cache.glob("engines/*/engine-choice.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("transferkit: interrupted during train features")
    assert last.endswith(f"resume with: transferkit train --resume {run}") and "Traceback" not in err
    kept = sum(len(json.loads(p.read_text())["keys"]) for p in cache.glob("*/shard-*.json"))
    # What was extracted is in the cache, and the stop came within a batch or two (64 images a batch), not
    # after all three (the first batch may take a while: the extractor is exported and checked first).
    assert 0 < kept <= 128, err.splitlines()[-1]

    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(cache))
    assert cli.main(["train", "--resume", str(run)]) == 0
    source = json.loads((run / "metrics.json").read_text())["source"]
    assert source["train"]["hits"] == kept and source["train"]["computed"] == 192 - kept


# ---- 6, 8: labels and discoverability ------------------------------------------------------------------


def test_one_line_errors_help_defaults_and_version(capsys):
    one_line_error(tk_cli("predict", "run", "x.png", "--top-k", "0"), 2, "--top-k", "must be ≥ 1")
    proc = tk_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"transferkit {tk.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--epochs EPOCHS (default: 15)", "(default: 0.001)", "--batch-size BATCH_SIZE (default: 32)",
                  "(default: feature-extract)", "--overwrite"):
        assert shown in text, shown
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    for flag in ("--lr", "--optimizer", "--seed", "--val-fraction", "(default: 15)"):
        assert flag in text, flag
    with pytest.raises(UsageError, match="--top-k must be ≥ 1"):
        from transferkit.inference import rows_from_probs

        rows_from_probs(["a"], np.ones((1, 2)), [None], ["a", "b"], top_k=0)


def test_compare_passes_the_training_options(monkeypatch, tmp_path, capsys):
    import transferkit.compare as compare_module

    seen = {}

    def fake_compare(data, model, out, epochs, **options):
        seen.update(options, epochs=epochs)
        return {"runs": {}, "figure": "f.png"}

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    assert cli.main(["compare", str(tmp_path), "--lr", "0.01", "--optimizer", "adam", "--seed", "3",
                     "--val-fraction", "0.3", "--epochs", "2"]) == 0
    assert seen == {"lr": 0.01, "optimizer": "adam", "seed": 3, "val_fraction": 0.3, "epochs": 2}


@pytest.mark.slow
def test_the_log_and_report_name_a_stratified_split_and_what_training_saw(flat_run):
    from transferkit.data.transforms import eval_transform
    from transferkit.engine.fit import _as_seen_in_training
    from transferkit.engine.sources import CachedFeatureSource

    report = json.loads((flat_run.run / "data_report.json").read_text())
    assert report["split_source"] == "stratified"
    cfg = TrainConfig(data="x", views=1)
    pre = Predictor(flat_run.run).preprocessing
    state = SimpleNamespace(cfg=cfg, pre=pre)
    image = Image.open(next(flat_run.data.rglob("*.png"))).convert("RGB")
    seen = _as_seen_in_training(state, object.__new__(CachedFeatureSource), __import__("random").Random(0))
    # One cached view: training saw the eval crop, not random-resized crops.
    assert torch.equal(seen(image), eval_transform(pre)(image))


# ---- 7: the Python API ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_api_names_arguments_suggests_close_names_and_tells_the_run_folder(flat_run, tmp_path):
    with pytest.raises(UsageError, match="unknown argument epoch=3; did you mean epochs="):
        tk.train(flat_run.data, epoch=3)
    with pytest.raises(UsageError, match="^epochs must be ≥ 1, not 0$"):
        tk.train(flat_run.data, epochs=0, out=str(tmp_path / "r"))
    with pytest.raises(UsageError, match="pass overwrite=True"):
        tk.train(flat_run.data, out=str(flat_run.run))
    # Path("") is the working folder: its every subfolder was trained on as a class
    with pytest.raises(UsageError, match="^data must name the data folder, not ''$"):
        tk.train("", recipe="tutorial", out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    # the library's other errors in argument names too, of their own class: "--resume: RUN already finished"
    with pytest.raises(CheckpointError, match=f"^resume: {flat_run.run} already finished"):
        tk.resume(flat_run.run)
    with pytest.raises(DataError, match="^data folder .*/my--data does not exist"):  # a path's -- is no flag
        tk.train(tmp_path / "my--data", recipe="tutorial")
    assert tk.load(flat_run.run).run_dir_ == flat_run.run


@pytest.mark.slow
def test_a_loaded_run_says_what_it_is_evaluates_and_exports(flat_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(flat_run.cache))
    clf = tk.load(flat_run.run)
    saved = json.loads((flat_run.run / "metrics.json").read_text())
    assert clf.metrics_ == saved  # a loaded run knows how its training went, as a trained one does
    assert f"val_acc={saved['best_val_acc']:.4f}" in repr(clf) and repr(clf.classes_) in repr(clf)
    # evaluate: the CLI's, in Python; the flat folder's training images are left out, its val split scored.
    ev = clf.evaluate(flat_run.data, out=tmp_path / "ev")
    assert ev["trained_on"]["left_out"] == saved["train_images"] and ev["n"] == saved["val_images"]
    assert ev["accuracy"] == pytest.approx(saved["best_val_acc"], abs=1.01 / ev["n"])
    assert (tmp_path / "ev" / "evaluation.json").exists()
    # tta=True as the CLI's bare --tta (auto: the mirror here), False as none; True was refused
    with_tta = clf.evaluate(flat_run.data, tta=True, out=tmp_path / "ev")["tta"]
    assert with_tta["kind"] != "none" and with_tta == clf.evaluate(flat_run.data, tta="auto", out=tmp_path / "ev")["tta"]
    assert clf.evaluate(flat_run.data, tta=False, out=tmp_path / "ev")["accuracy"] == ev["accuracy"]
    result = clf.export("onnx", out=tmp_path / "export")
    assert Path(result["path"]).is_file() and result["parity"]["top1_agreement"] == 1.0
    with pytest.raises(UsageError, match="^format must be one of onnx, torchscript, not 'tflite'$"):
        clf.export("tflite")
    assert tk.load(flat_run.run / "last.safetensors").metrics_ is None  # not the checkpoint metrics.json describes
    # The export loads too, and predicts with ONNX Runtime alone what the run predicts (files and images in memory).
    exported = tk.load(result["path"])
    assert "format='onnx'" in repr(exported) and exported.classes_ == clf.classes_
    files = sorted(str(p) for p in flat_run.data.rglob("*.png"))[:4]
    images = [Image.open(files[0]), np.zeros((40, 30), dtype=np.uint8)]
    for items in (files, images):
        np.testing.assert_allclose(exported.predict_proba(items), clf.predict_proba(items), atol=1e-4)
    assert [row["path"] for row in exported.predict_table(images)] == ["<image 0>", "<image 1>"]
    # Pickled (joblib, multiprocessing) as where it loads from: the engine and ONNX Runtime's session did not pickle.
    for model in (clf, exported):
        again = pickle.loads(pickle.dumps(model))
        assert again.classes_ == model.classes_ and again.metrics_ == model.metrics_
        np.testing.assert_allclose(again.predict_proba(files), model.predict_proba(files), atol=1e-6)
    with pytest.raises(UsageError, match="^evaluate needs the run folder or its .safetensors checkpoint"):
        exported.evaluate(flat_run.data)


@pytest.mark.slow
def test_the_api_names_an_argument_of_the_wrong_kind_in_one_line(flat_run, tmp_path, monkeypatch):
    """Each was a TypeError or torch's RuntimeError from inside, or silently wrong: a 3×H×W torch tensor was three
    grey images, an H×W×3 one H images; a 0×0 image was classified; include_train="no" scored the training
    images; top_k=np.int64(2) was "must be ≥ 1"."""
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(flat_run.cache))
    for call, words in ((lambda: tk.load(None), "^run_or_checkpoint must be a path"),
                        (lambda: tk.load(flat_run.run, device=None), "^device must be text"),
                        (lambda: tk.load(flat_run.run, device="gpu"), "^device must be auto, cpu, cuda or cuda:N"),
                        # devices torch knows and transferkit does not run on: torch's RuntimeError from inside
                        (lambda: tk.load(flat_run.run, device="mps"), "^device must be auto, cpu, cuda or cuda:N"),
                        (lambda: tk.load(flat_run.run, device="meta"), "^device must be auto, cpu, cuda or cuda:N"),
                        (lambda: tk.load(flat_run.run, device="cuda"), "^device cuda: no CUDA GPU is available")):
        with pytest.raises(UsageError, match=words):
            call()
    torchscript = tmp_path / "model.pt"  # as export(format="torchscript") writes it: a zip holding code/
    with zipfile.ZipFile(torchscript, "w") as zf:
        zf.writestr("model/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match="model.pt is a TorchScript export .*torch.jit.load"):
        tk.load(torchscript)  # was "not a safetensors checkpoint (... header too large)"
    clf = tk.load(flat_run.run)
    files = sorted(str(p) for p in flat_run.data.rglob("*.png"))[:2]
    pixels = np.array(Image.open(files[0]).convert("RGB"))
    for images, words in ((None, "^images must be a path, a PIL image, a numpy array or a list of them, not None"),
                          ([files[0], None], "^images holds a path, a PIL image or a numpy array each, not NoneType"),
                          (Path(files[0]).read_bytes(), r"not bytes \(a file's bytes: PIL.Image.open"),
                          (np.zeros((0, 0), np.uint8), r"^an image array has no pixels: shape \(0, 0\)"),
                          (Image.new("L", (0, 0)), "^an image has no pixels: size 0×0"),
                          ("", "^images holds an empty path ''$"),  # was the working folder, walked for images
                          ([files[0], ""], "^images holds an empty path ''$"),
                          (torch.from_numpy(pixels).permute(2, 0, 1), "channels last"),
                          (torch.zeros(8, 8, 3, requires_grad=True), r"tensor.detach\(\).cpu\(\).numpy\(\)")):
        with pytest.raises(UsageError, match=words):
            clf.predict(images)
    assert np.allclose(clf.predict_proba(torch.from_numpy(pixels)), clf.predict_proba(pixels), atol=1e-6)
    assert np.array_equal(clf.predict_proba(np.array(files)), clf.predict_proba(files))  # df["path"].values
    assert len(clf.predict_table(files[0], top_k=np.int64(2))[0]["top_k"]) == 2
    with pytest.raises(UsageError, match="^top_k must be a whole number, not 1.0$"):
        clf.predict_table(files[0], top_k=1.0)
    for call, words in ((lambda: clf.evaluate(None), "^data must be a path"),
                        (lambda: clf.evaluate(flat_run.data, out=5), "^out must be a path"),
                        (lambda: clf.evaluate(flat_run.data, include_train="no"), "^include_train must be True or"),
                        (lambda: tk.train(flat_run.data, verbose="no"), "^verbose must be True or False"),
                        (lambda: clf.export("onnx", out=5), "^out must be a path")):
        with pytest.raises(UsageError, match=words):
            call()


@pytest.mark.slow
def test_a_16_bit_grey_array_is_predicted_as_its_file(flat_run, tmp_path, monkeypatch):
    """An H×W uint16 array (cv2.IMREAD_UNCHANGED, tifffile) was refused above 255 and taken for 8-bit below: it is
    16-bit grey, read against the run's 16-bit white as its PNG is."""
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(flat_run.cache))
    clf = tk.load(flat_run.run)
    rng = np.random.default_rng(0)
    for peak in (200, 40000):
        values = rng.integers(0, peak + 1, (48, 48)).astype(np.uint16)
        Image.fromarray(values).save(tmp_path / f"{peak}.png")
        from_file = clf.predict_proba(str(tmp_path / f"{peak}.png"))
        for array in (values, values.astype(">u2")):
            np.testing.assert_allclose(clf.predict_proba(array), from_file, atol=1e-6)


@pytest.mark.slow
def test_one_lazily_opened_image_given_many_times_is_decoded_once(flat_run, tmp_path, monkeypatch):
    """Image.open decodes on first use: the reader threads decoding one image object at once raced on its file, and
    a row or two of [image] * 100 came back an error with no words (Pillow's bare AssertionError)."""
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(flat_run.cache))
    clf = tk.load(flat_run.run)
    path = tmp_path / "large.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(path)
    once = clf.predict_proba(Image.open(path))
    for _ in range(2):
        rows = clf.predict_table([Image.open(path)] * 100)
        assert [row["error"] for row in rows] == [None] * 100
        assert all(row["probability"] == pytest.approx(float(once.max()), abs=1e-6) for row in rows)


@pytest.mark.slow
def test_tk_train_says_what_it_does_unless_told_not_or_the_program_has_set_up_logging(flat_run, tmp_path):
    def started(name: str, setup: str, call: str) -> subprocess.Popen:
        code = (f"import logging, transferkit as tk\n{setup}\n"
                f"tk.train({str(flat_run.data)!r}, recipe='tutorial', epochs=1, image_size=96, "
                f"out={str(tmp_path / name)!r}, overwrite=True{call})")
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "TRANSFERKIT_FEATURE_CACHE": str(flat_run.cache)})

    def stderr_of(process: subprocess.Popen) -> str:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        return err

    # Three scripts side by side (each mostly imports, one core's work): a plain script or notebook with no
    # logging set up, one that says verbose=False, and a program with its own logging.
    plain, quiet, own = (started("plain", "", ""), started("quiet", "", ", verbose=False"),
                         started("own", "logging.basicConfig(level=logging.WARNING)", ""))
    said = stderr_of(plain)  # as the CLI would say it
    assert "scanned " in said and "epoch 1/1" in said and f"run folder: {tmp_path / 'plain'}" in said
    assert "best val acc " in said
    assert "scanned " not in stderr_of(quiet)
    # A program with its own logging keeps it: its WARNING level hides our INFO lines, and no handler is added.
    assert "scanned " not in stderr_of(own)


@pytest.mark.slow
def test_a_config_is_not_changed_by_the_runs_that_read_it(flat_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run without `out` goes to ./runs/<name>
    cfg = TrainConfig(data=str(flat_run.data), recipe="tutorial", epochs=3, image_size=96)
    before = cfg.to_dict()
    metrics = fit(cfg)
    assert cfg.to_dict() == before and cfg.out is None
    assert Path(metrics["run_dir"]).resolve().parent == (tmp_path / "runs").resolve()
    # tk.train: keyword options override the given config's fields; the config itself stays as it was.
    clf = tk.train(config=cfg, epochs=1, out=str(tmp_path / "r"))
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["epochs"] == 1 and clf.metrics_["epochs_run"] == 1 and saved["image_size"] == 96
    assert cfg.to_dict() == before
    with pytest.raises(UsageError, match="unknown argument epoch=1; did you mean epochs="):
        tk.train(config=cfg, epoch=1)
