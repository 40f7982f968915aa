"""Export: ONNX and TorchScript parity with the eager model, int8 agreement, torch-free ONNX prediction."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from tiny_run import train_tiny

from transferkit import export as ex
from transferkit.cli import main
from transferkit.data.images import load_rgb
from transferkit.data.transforms import eval_transform
from transferkit.errors import ExportError
from transferkit.models.registry import Preprocessing
from transferkit.onnx_predict import preprocess_pil
from transferkit.predict import Predictor


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def onnx_export(tiny_run, tmp_path_factory):
    return ex.export_run(tiny_run[1], "onnx", quantize="int8", out=tmp_path_factory.mktemp("onnx"))


def test_onnx_matches_eager_and_carries_its_metadata(onnx_export, tiny_run):
    p = onnx_export["parity"]
    assert p["images"] == 12  # 6 val images × 2 classes, all of them
    assert p["max_abs_prob_diff"] <= ex.PROB_TOLERANCE and p["top1_agreement"] == 1.0
    model = onnx.load(onnx_export["path"])
    props = {e.key: e.value for e in model.metadata_props}
    assert json.loads(props["classes"]) == ["ants", "bees"]
    assert json.loads(props["preprocessing"])["input_size"] == 96
    assert props["architecture"] == "efficientnet_lite0"
    assert model.opset_import[0].version >= ex.OPSET
    session = ort.InferenceSession(onnx_export["path"], providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        out = session.run(None, {"image": np.zeros((batch, 3, 96, 96), np.float32)})[0]
        assert out.shape == (batch, 2)
    saved = json.loads((Path(onnx_export["path"]).parent / "export.json").read_text())
    assert saved["parity"] == p and saved["int8"]["top1_agreement"] == onnx_export["int8"]["top1_agreement"]


def test_int8_agrees_with_float_on_the_tiny_set(onnx_export):
    q = onnx_export["int8"]
    assert q["top1_agreement"] >= 0.98
    assert q["size_ratio"] < 0.5  # weights went from 4 bytes to 1
    assert q["images"] == 12 and abs(q["accuracy_change"]) <= 0.02 + 1e-9
    assert ort.InferenceSession(q["path"]).get_modelmeta().custom_metadata_map["architecture"]


@pytest.mark.slow
def test_torchscript_matches_eager_and_keeps_classes(tiny_run, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onnx_first = ex.export_run(tiny_run[1], "onnx", out=tmp_path)  # both formats in one folder
        result = ex.export_run(tiny_run[1], "torchscript", out=tmp_path)
    # PyTorch's TorchScript deprecation warnings (trace, save, load) become one log line, not four warnings
    assert not [w for w in caught if "torch.jit" in str(w.message)]
    assert result["parity"]["max_abs_prob_diff"] <= ex.PROB_TOLERANCE
    assert result["parity"]["top1_agreement"] == 1.0
    extra = {"classes.json": "", "preprocessing.json": ""}
    loaded = torch.jit.load(result["path"], _extra_files=extra)
    assert json.loads(extra["classes.json"]) == ["ants", "bees"]
    assert loaded(torch.zeros(3, 3, 96, 96)).shape == (3, 2)
    record = json.loads((tmp_path / "export.json").read_text())
    assert record["format"] == "torchscript"
    # The ONNX file's check is kept beside the later export's: serve's model card of model.onnx still shows it
    assert record["earlier"]["onnx"]["parity"] == onnx_first["parity"]
    from transferkit.serve.model import _parity_of

    assert _parity_of(record, Path(onnx_first["path"]))["format"] == "onnx"
    assert _parity_of(record, Path(result["path"]))["format"] == "torchscript"
    Path(onnx_first["path"]).unlink()  # a format whose file is gone is not carried on
    ex.export_run(tiny_run[1], "torchscript", out=tmp_path)
    assert "earlier" not in json.loads((tmp_path / "export.json").read_text())


def test_a_run_whose_data_has_moved_exports_with_its_place_now(tiny_run, tmp_path):
    import shutil

    import yaml

    data, run = tiny_run
    moved = shutil.copytree(run, tmp_path / "run")
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"] = str(tmp_path / "where-it-was")  # the data folder is gone from where the run saw it
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ex.ExportError, match="has moved, give its place now with --data DIR$"):
        ex.export_run(moved, "onnx", out=tmp_path / "refused")
    result = ex.export_run(moved, "onnx", out=tmp_path / "export", data=data)
    assert result["parity"]["images"] > 0 and result["parity"]["top1_agreement"] == 1.0


def test_an_export_that_disagrees_is_refused():
    logits = np.array([[2.0, -1.0], [0.3, 0.1], [-1.0, 1.0]])
    ex._require_parity(ex.parity(logits, logits + 1e-6), "onnx")  # within tolerance: accepted
    with pytest.raises(ExportError, match="disagrees with the eager model"):
        ex._require_parity(ex.parity(logits, logits + np.array([[0.0, 0.5]])), "onnx")


def test_cli_rejects_bad_format_and_quantized_torchscript(tiny_run, capsys):
    assert main(["export", str(tiny_run[1]), "--format", "tflite"]) == 2
    assert main(["export", str(tiny_run[1]), "--format", "torchscript", "--quantize", "int8"]) == 2
    assert "onnx only" in capsys.readouterr().err
    assert main(["export", str(tiny_run[1]), "--quantize", "int4"]) == 2  # was told int8 needs onnx, as it had
    assert capsys.readouterr().err.strip().endswith("--quantize must be int8, not 'int4'")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(61, 37), (37, 61), (50, 50)])
def test_numpy_preprocessing_matches_torchvision(interpolation, size):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pre = Preprocessing(32, 37, interpolation, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ours = preprocess_pil(img, pre.to_dict())
    theirs = eval_transform(pre)(img).numpy()
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(61, 37), (37, 61), (300, 300)])
def test_a_grey_image_preprocesses_exactly_as_its_rgb_conversion(interpolation, size, tmp_path):
    """ONNX prediction and `serve` keep 8-bit grey images as one band (a third of the resizing): the
    model must still see the very numbers the RGB conversion gives, and torchvision's within rounding."""
    rng = np.random.default_rng(2)
    grey = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8))
    grey.save(tmp_path / "grey.png")
    kept = load_rgb(tmp_path / "grey.png", keep_gray=True)
    assert kept.mode == "L" and load_rgb(tmp_path / "grey.png").mode == "RGB"
    pre = Preprocessing(32, 37, interpolation, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ours = preprocess_pil(kept, pre.to_dict())
    assert np.array_equal(ours, preprocess_pil(grey.convert("RGB"), pre.to_dict()))
    assert np.abs(ours - eval_transform(pre)(grey.convert("RGB")).numpy()).max() < 1e-5


def test_onnx_prediction_runs_without_torch_and_matches_torch_labels(onnx_export, tiny_run):
    data, run = tiny_run
    code = (
        "import json, sys\n"
        "from transferkit.onnx_predict import predict_rows\n"
        f"rows = predict_rows({onnx_export['path']!r}, [{str(data / 'val')!r}], top_k=2)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps(rows))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    onnx_rows = json.loads(proc.stdout)
    torch_rows = Predictor(run).predict_rows([r["path"] for r in onnx_rows], top_k=2)
    assert len(onnx_rows) == 12
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(onnx_rows, torch_rows)) < 1e-3
    assert set(onnx_rows[0]) == set(torch_rows[0])


def test_predict_engine_onnx_with_a_run_folder_uses_its_export(tiny_run, tmp_path, capsys):
    """As serve does: `predict RUN --engine onnx` reads RUN/export/model.onnx (it said there was no ONNX model at
    RUN), and says to export first where there is none."""
    data, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    image = str(sorted((data / "val").rglob("*.png"))[0])
    assert main(["predict", str(copy), image, "--engine", "onnx"]) == 5  # CheckpointError's exit code
    assert f"no exported model at {copy / 'export' / 'model.onnx'}; run `transferkit export {copy}`" in \
        capsys.readouterr().err
    assert main(["export", str(copy)]) == 0
    capsys.readouterr()
    assert main(["predict", str(copy), image, "--engine", "onnx", "--format", "json"]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert main(["predict", str(copy / "export" / "model.onnx"), image, "--format", "json"]) == 0
    assert by_folder == json.loads(capsys.readouterr().out) and by_folder[0]["label"] in ("ants", "bees")
    # the export folder given for the run: it said "no checkpoint at RUN/export/best.safetensors"
    assert main(["predict", str(copy / "export"), image]) == 5
    assert f"{copy / 'export'} holds an exported model, not a run: pass {copy / 'export' / 'model.onnx'}" in \
        capsys.readouterr().err


# ---- an unreadable file in the middle of a batch shifts no label (predict, evaluate, export's check) ----


@pytest.fixture
def val_with_a_bad_file(tiny_run, tmp_path):
    """A copy of the val folder with a file that is not an image sorted among the ants (4th of 13)."""
    folder = tmp_path / "val"
    shutil.copytree(tiny_run[0] / "val", folder)
    (folder / "ants" / "ants_val_2b.png").write_bytes(b"not an image")
    return folder


def test_predict_keeps_rows_aligned_around_an_unreadable_file(tiny_run, val_with_a_bad_file):
    paths = sorted(str(p) for p in val_with_a_bad_file.rglob("*.png"))
    bad = paths.index(str(val_with_a_bad_file / "ants" / "ants_val_2b.png"))
    assert bad == 3
    predictor = Predictor(tiny_run[1])
    rows = predictor.predict_rows(paths, top_k=2)
    clean = predictor.predict_rows(paths[:bad] + paths[bad + 1:], top_k=2)
    assert rows[bad]["error"] and rows[bad]["label"] is None
    assert rows[:bad] + rows[bad + 1:] == clean


def test_evaluate_keeps_labels_aligned_around_an_unreadable_file(tiny_run, val_with_a_bad_file, tmp_path):
    from transferkit.evaluate import evaluate_run

    with_bad = evaluate_run(tiny_run[1], val_with_a_bad_file, out=tmp_path / "a")
    clean = evaluate_run(tiny_run[1], tiny_run[0] / "val", out=tmp_path / "b")
    assert with_bad["n"] == clean["n"] == 12
    assert [s["path"] for s in with_bad["skipped"]] == [str(val_with_a_bad_file / "ants" / "ants_val_2b.png")]
    assert with_bad["confusion_matrix"] == clean["confusion_matrix"]
    for key in ("accuracy", "balanced_accuracy", "log_loss"):
        assert with_bad[key] == pytest.approx(clean[key]), key


def test_the_export_check_keeps_labels_aligned_around_an_unreadable_file(onnx_export, tiny_run, tmp_path):
    from transferkit.onnx_predict import OnnxClassifier

    run = tiny_run[1]
    meta = Predictor(run).meta
    items = ex._split_items(run / "best.safetensors", meta, "val")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    # Chunks of 5: the bad file is the 4th item of the first, labelled as the other class.
    with_bad = items[:3] + [(str(bad), 1 - items[3][1])] + items[3:]
    report = ex.compare_onnx(Path(onnx_export["path"]), Path(onnx_export["path"]), with_bad, meta, batch=5)
    clf = OnnxClassifier(onnx_export["path"])
    probs, errors = clf.predict_proba([p for p, _ in items])
    expected = float((probs.argmax(1) == np.array([label for _, label in items])).mean())
    assert report["images"] == 12 and not any(errors)
    assert report["accuracy_fp32"] == pytest.approx(expected)


def _same_padding_net() -> torch.nn.Module:
    """Strided TF-'same' convolutions (timm's Conv2dSame, as in the tf_* EfficientNets) with BatchNorm."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    return torch.nn.Sequential(Conv2dSame(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                               Conv2dSame(8, 8, 5, stride=2, groups=8), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())


@pytest.mark.parametrize("size", [224, 225])
def test_same_padding_is_exported_as_constants_and_matches_eager(size, tmp_path):
    """The pads TF-'same' layers compute from the input's size become constants for the export's fixed
    size: no Shape-driven chain in the graph (ONNX Runtime's static quantizer mangled it into 6×6 maps where
    fp32 has 7×7), the same outputs, and the caller's module untouched (its mode, its BN statistics)."""
    from transferkit.engine.runtime import OrtEngine, onnx_export

    net = _same_padding_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, size, size)
    path = tmp_path / "same.onnx"
    onnx_export(net, x[:1], path)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Shape" not in ops and "Conv" in ops
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        expected = net.eval()(x)
    assert torch.allclose(OrtEngine(path)(x), expected, atol=1e-5)


class _TwoSizes(torch.nn.Module):
    """One TF-'same' layer run at two input sizes that pad differently (80 px: 1 pixel, 57 px: 2), as a
    two-scale probe runs its backbone."""

    def __init__(self):
        super().__init__()
        from timm.layers import Conv2dSame

        self.conv = Conv2dSame(3, 4, 3, stride=2)

    def forward(self, x):
        small = torch.nn.functional.interpolate(x, size=(57, 57), mode="bilinear", align_corners=False)
        return torch.cat([self.conv(x).mean((2, 3)), self.conv(small).mean((2, 3))], 1)


def test_a_same_padding_layer_run_at_two_sizes_keeps_its_dynamic_pads(tmp_path):
    from transferkit.engine.runtime import OrtEngine, onnx_export

    torch.manual_seed(0)
    net, x = _TwoSizes().eval(), torch.randn(3, 3, 80, 80)
    onnx_export(net, x[:1], tmp_path / "two.onnx")
    with torch.no_grad():
        assert torch.allclose(OrtEngine(tmp_path / "two.onnx")(x), net(x), atol=1e-5)


def test_export_out_that_is_a_file_is_one_line_and_a_refused_check_leaves_no_folder(tiny_run, tmp_path, capsys):
    a_file = tmp_path / "model.onnx"
    a_file.write_text("keep me")
    assert main(["export", str(tiny_run[1]), "--out", str(a_file)]) == 2  # was a FileExistsError traceback
    assert capsys.readouterr().err.strip().endswith(f"--out {a_file} is a file; expected a folder for the "
                                                    "exported model")
    assert main(["export", str(tiny_run[1]), "--out", str(a_file / "sub")]) == 8  # NotADirectoryError
    assert "Traceback" not in capsys.readouterr().err and a_file.read_text() == "keep me"
    assert main(["export", str(tiny_run[1]), "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none")]) == 7
    assert not (tmp_path / "x").exists()


def test_a_run_still_training_is_exported_only_as_a_snapshot_elsewhere(tmp_path, capsys):
    """Exported while training went on, RUN/export kept that epoch's model after the run ended, passing for the
    finished run's (predict RUN --engine onnx, serve, a copied model.onnx); --out elsewhere is a snapshot."""
    from transferkit.run_folder import claimed

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"\0" * 16)  # refused before it is read
    with claimed(run):  # as the training process holds it
        assert main(["export", str(run)]) == 2
        assert f"{run} is still training (process " in capsys.readouterr().err
        assert main(["export", str(run), "--out", str(tmp_path / "snapshot")]) == 5  # read: this one is no checkpoint
    assert main(["export", str(run)]) == 5  # the run has ended: exported (were it a checkpoint)


@pytest.mark.parametrize("key, value, words", [
    ("classes", "{bad json", "Expecting property name"),  # was a JSONDecodeError traceback
    ("preprocessing", "{}", "preprocessing must name input_size"),  # was a KeyError in every image's row
])
def test_an_onnx_model_with_damaged_metadata_is_a_one_line_error(onnx_export, tiny_run, tmp_path, capsys, key,
                                                                  value, words):
    model = onnx.load(onnx_export["path"])
    next(p for p in model.metadata_props if p.key == key).value = value
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    image = next((tiny_run[0] / "val").rglob("*.png"))
    assert main(["predict", str(damaged), str(image)]) == 5
    err = capsys.readouterr().err.strip()
    assert "damaged transferkit metadata" in err and words in err and len(err.splitlines()) == 1, err
