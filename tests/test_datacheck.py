"""`transferkit data check` on a folder of real images (ELPV cells, mono vs poly) with planted problems,
and on the same folder untouched; the group-aware split; the hint `train` prints.

Planted (each kind three or more times): byte copies renamed across the split, copies re-encoded as
JPEG across the split, mild crops / resizes of train images in val, flipped labels, images of an
unrelated kind (scikit-image's photographs), and a byte copy filed under the other class."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

from transferkit.cli import EXIT_CHECK_FAILED, main
from transferkit.data.builtin import _elpv_data_dir, _read_elpv_labels
from transferkit.data.folders import scan_dataset
from transferkit.datacheck import Thresholds, run_check, train_hint

skimage_data = pytest.importorskip("skimage.data")

PER_CLASS = {"train": 24, "val": 8}
N_PLANTED = 3


def _base_folder(root, seed=0):
    """ELPV cells judged functional (p = 0), split by cell type: mono / poly; {split: {class: [paths]}}."""
    data_dir = _elpv_data_dir()
    records = [r for r in _read_elpv_labels(data_dir / "labels.csv") if r["probability"] == 0]
    rng = np.random.default_rng(seed)
    files = {}
    for cell_type in ("mono", "poly"):
        pool = [r["file"] for r in records if r["type"] == cell_type]
        chosen = rng.choice(pool, PER_CLASS["train"] + PER_CLASS["val"], replace=False)
        for split, part in (("train", chosen[:PER_CLASS["train"]]), ("val", chosen[PER_CLASS["train"]:])):
            folder = root / split / cell_type
            folder.mkdir(parents=True, exist_ok=True)
            for rel in part:
                shutil.copyfile(data_dir / rel, folder / rel.split("/")[-1])
            files.setdefault(split, {})[cell_type] = sorted(folder.iterdir())
    return files


def _save_jpeg(img, path, quality=85):
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, "JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())


def _plant(root, files):
    """Plant every kind of problem; return what was planted, as paths relative to root."""
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    train = files["train"]
    planted = {"copies": [], "near": [], "flipped": [], "unrelated": [], "conflict": []}
    for k in range(N_PLANTED):
        src = train["mono"][k]  # byte copy, renamed, in val
        dst = root / "val" / "mono" / f"renamed_{k}.png"
        shutil.copyfile(src, dst)
        planted["copies"].append((rel(src), rel(dst)))
    for k in range(N_PLANTED):  # re-encoded copies: JPEG, other name, in val
        src = train["poly"][k]
        dst = root / "val" / "poly" / f"reencoded_{k}.jpg"
        _save_jpeg(Image.open(src), dst)
        planted["near"].append((rel(src), rel(dst)))
    crops = [(0.06, 0.03, 1.0, 1.0), (0.0, 0.0, 0.93, 0.95), (0.04, 0.04, 0.96, 0.96)]
    for k, (x0, y0, x1, y1) in enumerate(crops):  # mild crops and resizes of train images in val
        src = train["mono"][N_PLANTED + k]
        img = Image.open(src)
        w, h = img.size
        cropped = img.crop((int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h))).resize((int(0.8 * w), int(0.8 * h)))
        dst = root / "val" / "mono" / f"crop_{k}.png"
        cropped.save(dst)
        planted["near"].append((rel(src), rel(dst)))
    for k in range(N_PLANTED):  # flipped labels: mono cells filed as poly (spread over the class:
        src = train["mono"][8 + 6 * k]  # neighbouring cell numbers come from one module and look alike)
        dst = root / "train" / "poly" / src.name
        shutil.move(src, dst)
        planted["flipped"].append(rel(dst))
    for k, name in enumerate(("astronaut", "coffee", "chelsea")):  # another kind of picture entirely
        dst = root / "train" / ("mono", "poly", "mono")[k] / f"{name}.png"
        Image.fromarray(getattr(skimage_data, name)()).resize((300, 300)).save(dst)
        planted["unrelated"].append(rel(dst))
    src = train["poly"][-1]  # one byte copy filed under the other class
    dst = root / "train" / "mono" / "copy_of_poly.png"
    shutil.copyfile(src, dst)
    planted["conflict"].append((rel(src), rel(dst)))
    return planted


@pytest.fixture(scope="module")
def checked(tmp_path_factory):  # about 30 s on a 2-core CPU: two checks, one extraction of ~150 images
    """(planted report, what was planted, untouched report, data folders); one check each."""
    root = tmp_path_factory.mktemp("check")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERKIT_FEATURE_CACHE", str(root / "feature-cache"))
        clean = root / "clean"
        _base_folder(clean)
        dirty = root / "dirty"
        planted = _plant(dirty, _base_folder(dirty))
        clean_report = run_check(clean, root / "clean-check")
        dirty_report = run_check(dirty, root / "dirty-check", thresholds=Thresholds(top=1000))
    return dirty_report, planted, clean_report, {"clean": clean, "dirty": dirty, "root": root}


def _pairs(report, kinds=("exact_duplicates", "near_duplicates")):
    return {frozenset((p["a"]["path"], p["b"]["path"])): p for kind in kinds for p in report[kind]}


def _recall(found, planted) -> float:
    return sum(1 for item in planted if item in found) / len(planted)


@pytest.mark.slow
def test_planted_copies_crops_and_conflicts_are_found(checked):
    report, planted, _, _ = checked
    exact = _pairs(report, ("exact_duplicates",))
    near = _pairs(report, ("near_duplicates",))
    copies = [frozenset(pair) for pair in planted["copies"]]
    assert _recall(exact, copies) >= 0.9
    assert all(exact[p]["relation"] == "leakage" for p in copies if p in exact)
    near_planted = [frozenset(pair) for pair in planted["near"]]
    assert _recall(near, near_planted) >= 0.9, sorted(near)
    assert all(near[p]["relation"] == "leakage" for p in near_planted if p in near)
    conflict = frozenset(planted["conflict"][0])
    assert exact[conflict]["relation"] == "conflict"
    counts = report["counts"]
    assert counts["leakage_pairs"] >= 2 * N_PLANTED and counts["conflict_pairs"] >= 1
    # Best pixel agreement first: the planted ones are in the top 2 × planted (look-alike cells of one
    # module come next; see the untouched folder's test).
    top = {frozenset((p["a"]["path"], p["b"]["path"])) for p in report["near_duplicates"][:2 * len(near_planted)]}
    assert _recall(top, near_planted) >= 0.9


@pytest.mark.slow
def test_planted_label_errors_and_outliers_rank_near_the_top(checked):
    report, planted, _, _ = checked
    # Unrelated pictures and the copy filed under the other class carry a wrong label too.
    k = len(planted["flipped"]) + len(planted["unrelated"]) + len(planted["conflict"]) + N_PLANTED
    label_top = [r["path"] for r in report["label_errors"][:k]]
    assert _recall(label_top, planted["flipped"]) >= 0.9, report["label_errors"][:k]
    flipped = {r["path"]: r for r in report["label_errors"]}
    for path in planted["flipped"]:
        if path in flipped:
            assert flipped[path]["suggested"] == "mono" and len(flipped[path]["neighbours_of_suggested"]) == 3
    outlier_top = [r["path"] for r in report["outliers"][:2 * N_PLANTED]]
    assert _recall(outlier_top, planted["unrelated"]) >= 0.9, report["outliers"][:2 * N_PLANTED]


@pytest.mark.slow
def test_untouched_folder_has_few_false_alarms(checked):
    """The rates on 64 real cells with nothing planted: near-duplicate pairs ≤ 5 % of the images (the
    ones found are neighbouring cells of one module, which do look alike: 3 pairs when this was
    written), label issues ≤ 5 %, probe disagreements ≤ 10 %, outliers ≤ 5 %."""
    _, _, clean, _ = checked
    n = clean["summary"]["images"]
    counts = clean["counts"]
    assert n == 2 * sum(PER_CLASS.values())
    assert counts["exact_duplicate_pairs"] == 0 and counts["near_duplicate_pairs"] / n <= 0.05, clean["near_duplicates"]
    assert counts["label_errors"] / n <= 0.05 and counts["label_disagreements"] / n <= 0.1, clean["label_errors"]
    assert counts["outliers"] / n <= 0.05, clean["outliers"]


@pytest.mark.slow
def test_report_files_summary_and_thresholds(checked):
    report, _, clean, dirs = checked
    out = dirs["root"] / "dirty-check"
    saved = json.loads((out / "check.json").read_text())
    assert saved["counts"] == report["counts"] and saved["thresholds"]["near_pixel"] == Thresholds().near_pixel
    html = (out / "check.html").read_text()
    n_images = html.count("data:image/png;base64,")
    pairs = report["counts"]["exact_duplicate_pairs"] + report["counts"]["near_duplicate_pairs"]
    assert n_images >= 2 * pairs + report["counts"]["outliers"]
    summary = report["summary"]
    assert summary["sizes"]["width"]["max"] == 300 and summary["counts"]["train"]["poly"] > 0
    assert report["features"]["computed"] > 0
    assert clean["features"]["model"] == "efficientnet_lite0"


@pytest.mark.slow
def test_cli_strict_exit_codes_and_no_second_extraction(checked, capsys, monkeypatch):
    _, _, _, dirs = checked
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(dirs["root"] / "feature-cache"))
    code = main(["data", "check", str(dirs["dirty"]), "--out", str(dirs["root"] / "cli-dirty"), "--strict"])
    captured = capsys.readouterr()
    assert code == EXIT_CHECK_FAILED, captured.err
    assert "leakage" in captured.err and "near-duplicates:" in captured.out
    assert "0 computed" in captured.out  # the features came from the cache the first check filled
    # The untouched cells: the look-alike neighbouring cells fall below a stricter pixel threshold.
    code = main(["data", "check", str(dirs["clean"]), "--out", str(dirs["root"] / "cli-clean"), "--strict",
                 "--near-pixel", "0.999"])
    assert code == 0, capsys.readouterr().err
    assert "thumbnail correlation >= 0.999" in capsys.readouterr().out
    assert main(["data", "check", str(dirs["clean"]), "--near-pixel", "2"]) == 2
    assert "--near-pixel must be between -1 and 1" in capsys.readouterr().err


@pytest.mark.slow
def test_check_html_renders_in_headless_chromium(checked, tmp_path):
    from test_report import find_chromium

    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (install the Debian package 'chromium' to run this test)")
    _, _, _, dirs = checked
    shot = tmp_path / "check.png"
    page = (dirs["root"] / "dirty-check" / "check.html").resolve()
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (rc={result.returncode}): {result.stderr[-2000:]!r}"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10, "screenshot is blank"


def test_check_html_keeps_a_long_class_name_inside_the_page(tmp_path):
    """A 210-character class name in a label-error row ran over its pictures and past the page's right edge;
    the row's text and captions now wrap, and its pictures keep their width."""
    from test_report import LONG, overflow_px

    from transferkit.results.check_html import write_check_html

    data = make_image_folder(tmp_path / "data", n_train=2, n_val=1, classes=(LONG, "b"))

    def item(split, name, i):
        return {"path": f"{split}/{name}/{name}_{split}_{i}.png", "class": name, "split": split}

    row = {**item("train", LONG, 0), "self_confidence": 0.01, "suggested": "b", "suggested_probability": 0.9,
           "confident": True, "neighbours_of_suggested": [item("train", "b", 0), item("train", "b", 1)]}
    counts = {"train": {LONG: 2, "b": 2}, "val": {LONG: 1, "b": 1}}
    report = {"data": str(data), "classes": [LONG, "b"], "split_source": "folders", "seconds": 1.0,
              "thresholds": {"near_cosine": 0.9, "near_pixel": 0.99, "outlier_z": 5.0, "folds": 2, "top": 50},
              "features": {"model": "efficientnet_lite0"}, "summary": {"images": 6, "counts": counts},
              "exact_duplicates": [], "near_duplicates": [], "label_errors": [row], "outliers": [],
              "unusable_files": [], "counts": {"label_errors": 1, "label_disagreements": 1, "outliers": 0,
                                               "exact_duplicate_pairs": 0, "near_duplicate_pairs": 0}}
    page = write_check_html(report, tmp_path / "check.html")
    assert LONG in page.read_text(encoding="utf-8") and page.read_text(encoding="utf-8").count("<img") == 3
    assert overflow_px(page, tmp_path) <= 0
    widths = overflow_px(page, tmp_path, script="return [...document.querySelectorAll('.row figure')]"
                                                ".map(f => f.getBoundingClientRect().width)")
    assert widths == [180] * 3  # figure{width:180px}: not squeezed by the text beside them


def test_the_summary_of_many_classes_stays_one_line_of_a_screen():
    """60 classes made the summary's first line 1,700 characters, each class and its counts; past a dozen it
    gives their number and the range of their sizes."""
    from transferkit.datacheck import summary_lines

    def report(n):
        classes = [f"class_{i:02d}_longish_name" for i in range(n)]
        counts = {"train": {c: 2 + i % 3 for i, c in enumerate(classes)}, "val": dict.fromkeys(classes, 1)}
        zero = dict.fromkeys(["exact_duplicate_pairs", "near_duplicate_pairs", "leakage_pairs", "conflict_pairs",
                              "within_class_pairs", "val_images_with_train_copy", "label_errors",
                              "label_disagreements", "outliers", "unusable_files"], 0)
        return {"data": "d", "classes": classes, "split_source": "folders", "seconds": 1.0, "counts": zero,
                "thresholds": {"near_cosine": 0.9, "near_pixel": 0.99, "outlier_z": 5.0, "folds": 3},
                "features": {"model": "m", "hits": 0, "computed": 1},
                "summary": {"images": 4 * n, "counts": counts, "imbalance": 2.0},
                "label_errors": [], "outliers": [], "unusable_files": []}

    first = summary_lines(report(60))[0]
    assert len(first) < 200 and "60 classes of 2-4 train / 1 val images (check.html lists each)" in first
    assert "train/val per class: class_00_longish_name 2/1, class_01_longish_name 3/1" in summary_lines(report(3))[0]


# ---------------------------------------------------------------- group-aware split and the train hint


def _flat_folder_with_copies(root):
    """A flat folder of ELPV cells (random split) where 6 cells each have 3 copies: a byte copy, a
    JPEG re-encoding and a half-size JPEG."""
    files = _base_folder(root / "tmp")
    flat = root / "flat"
    groups = []
    for name in ("mono", "poly"):
        (flat / name).mkdir(parents=True)
        for src in files["train"][name] + files["val"][name]:
            shutil.copyfile(src, flat / name / src.name)
        for src in sorted((flat / name).iterdir())[:3]:
            copies = [flat / name / f"{src.stem}_copy.png", flat / name / f"{src.stem}_q90.jpg",
                      flat / name / f"{src.stem}_small.jpg"]
            shutil.copyfile(src, copies[0])
            _save_jpeg(Image.open(src), copies[1], quality=90)
            _save_jpeg(Image.open(src).resize((150, 150)), copies[2], quality=90)
            groups.append([str(src)] + [str(c) for c in copies])
    return flat, groups


def _straddling(scan, groups) -> int:
    val = {p for p, _ in scan.val}
    return sum(1 for g in groups if 0 < sum(p in val for p in g) < len(g))


def test_group_aware_split_keeps_copies_on_one_side(tmp_path):
    flat, groups = _flat_folder_with_copies(tmp_path)
    plain = [scan_dataset(flat, seed=s, group_duplicates=False) for s in range(3)]
    assert sum(_straddling(scan, groups) for scan in plain) > 0  # without grouping copies do straddle
    for seed in range(3):
        scan = scan_dataset(flat, seed=seed)
        assert _straddling(scan, groups) == 0
        assert scan.grouping["groups"] == len(groups) and scan.grouping["images_in_groups"] == 4 * len(groups)
        assert len(scan.train) + len(scan.val) == 2 * (sum(PER_CLASS.values()) + 3 * 3)
        assert "same_picture_across_splits" not in scan.problems
    straddling = next(scan for scan in plain if _straddling(scan, groups))
    assert straddling.problems.get("same_picture_across_splits") or straddling.problems.get("duplicate_across_splits")


def test_train_group_duplicates_flag(tmp_path, capsys):
    from transferkit.cli import build_parser

    args = build_parser().parse_args(["train", "d", "--no-group-duplicates"])
    assert args.group_duplicates is False
    assert build_parser().parse_args(["train", "d", "--group-duplicates"]).group_duplicates is True
    assert not hasattr(build_parser().parse_args(["train", "d"]), "group_duplicates")  # config decides


@pytest.mark.slow
def test_train_prints_one_hint_line_on_leakage(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_train=6, n_val=3, size=40)
    leaked = sorted((data / "train" / "ants").iterdir())[0]
    shutil.copyfile(leaked, data / "val" / "ants" / "leaked.png")
    code = main(["train", str(data), "--epochs", "1", "--image-size", "64", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    hints = [line for line in out.splitlines() if "transferkit data check" in line]
    assert len(hints) == 1 and "1 val images are copies of train images" in hints[0]
    assert hints[0].endswith(f"run `transferkit data check {data}` to see them")  # the folder, ready to paste
    assert train_hint(tmp_path / "nowhere") is None


def test_train_after_a_check_costs_no_backbone_time(tiny_folder, tmp_path):
    from transferkit.config import TrainConfig
    from transferkit.engine.fit import fit

    report = run_check(tiny_folder, tmp_path / "check")
    assert report["features"]["computed"] == report["summary"]["images"]
    m = fit(TrainConfig(data=str(tiny_folder), epochs=1, out=str(tmp_path / "run")))
    source = m["source"]
    assert source["train"]["computed"] == 0 and source["val"]["computed"] == 0
    assert source["train"]["hits"] + source["val"]["hits"] == report["summary"]["images"]


def test_same_picture_pairs_do_not_depend_on_the_comparison_block(monkeypatch):
    """Buckets are compared in row blocks (memory grows with a bucket, not its square): any block size,
    one that splits every bucket included, must find the same pairs with the same correlations."""
    import numpy as np
    from PIL import Image

    from transferkit.data import fingerprint as fp

    rng = np.random.default_rng(0)
    base = [rng.integers(0, 256, (48, 48), dtype=np.uint8) for _ in range(4)]
    images = {}
    for i, pixels in enumerate(base):  # each picture, a resized copy and a slightly noisy copy
        img = Image.fromarray(pixels)
        images[f"{i}-a.png"] = img
        images[f"{i}-b.png"] = img.resize((40, 40), Image.BILINEAR)
        noisy = np.clip(pixels.astype(int) + rng.integers(-3, 4, pixels.shape), 0, 255).astype(np.uint8)
        images[f"{i}-c.png"] = Image.fromarray(noisy)
    prints = {name: fp.fingerprint(img) for name, img in images.items()}
    whole = fp.same_picture_pairs(prints)
    monkeypatch.setattr(fp, "COMPARE_BLOCK", 2)
    blocked = fp.same_picture_pairs(prints)
    assert [(a, b) for a, b, _ in blocked] == [(a, b) for a, b, _ in whole]
    assert np.allclose([c for *_, c in blocked], [c for *_, c in whole])
    assert {(a[0], b[0]) for a, b, _ in whole} >= {(str(i), str(i)) for i in range(4)}  # copies found


def test_the_k_d_tree_search_of_a_large_folder_finds_the_pairs_the_buckets_find(monkeypatch):
    """A large folder's look-alike pairs come from a k-d tree of the thumbnails' principal coordinates
    (fingerprint._pairs_near) instead of dHash buckets: on smooth pictures, their resized and noisy copies and
    different pictures that look alike, it finds every pair the buckets find, with the same correlations, in any
    block size, and nothing below the threshold."""
    import numpy as np
    from PIL import Image

    from transferkit.data import fingerprint as fp

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:48] / 48.0
    images = {}
    for i in range(60):  # smooth pictures, many alike: a few random waves each
        f = rng.uniform(0.5, 3, 4)
        pixels = 128 + 60 * np.sin(f[0] * 6 * xx + f[1]) * np.cos(f[2] * 6 * yy + f[3]) + rng.normal(0, 2, xx.shape)
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        images[f"{i:02d}-a.png"] = img
        if i % 3 == 0:
            images[f"{i:02d}-b.png"] = img.resize((40, 40), Image.BILINEAR)
            noisy = np.asarray(img).astype(int) + rng.integers(-2, 3, (48, 48))
            images[f"{i:02d}-c.png"] = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    prints = {name: fp.fingerprint(img) for name, img in images.items()}
    copies = {(f"{i:02d}", f"{i:02d}") for i in range(0, 60, 3)}
    for threshold in (fp.SAME_PICTURE_CORRELATION, 0.99):
        buckets = fp.same_picture_pairs(prints, threshold)
        assert {(a[:2], b[:2]) for a, b, _ in buckets} >= copies
        monkeypatch.setattr(fp, "NEAR_SEARCH_FROM", 2)
        near = {(a, b): c for a, b, c in fp.same_picture_pairs(prints, threshold)}
        monkeypatch.setattr(fp, "COMPARE_BLOCK", 7)
        assert fp.same_picture_pairs(prints, threshold) == sorted((a, b, c) for (a, b), c in near.items())
        monkeypatch.undo()
        assert {(a, b) for a, b, _ in buckets} <= set(near) and min(near.values()) >= threshold
        assert np.allclose([near[a, b] for a, b, _ in buckets], [c for *_, c in buckets], atol=1e-5)


def test_train_hint_counts_only_wrong_predictions(tmp_path):
    """evaluation.json's top losses are the highest-loss val images, right ones included where few are wrong:
    a confident right answer is no mistake (a run at val accuracy 1.0 was told 10 images were misclassified)."""
    def row(true, predicted, p):
        return {"true": true, "predicted": predicted, "probability_of_predicted": p, "path": f"{true}.png"}

    (tmp_path / "data_report.json").write_text(json.dumps({"problems": {}}))
    right = [row("a", "a", 0.99)] * 10
    (tmp_path / "evaluation.json").write_text(json.dumps({"top_losses": right}))
    assert train_hint(tmp_path) is None
    wrong = [row("a", "b", 0.97)] * 5
    (tmp_path / "evaluation.json").write_text(json.dumps({"top_losses": wrong + right}))
    assert "data: 5 val images are misclassified" in train_hint(tmp_path)
    (tmp_path / "evaluation.json").write_text(json.dumps({"top_losses": wrong}))  # every listed loss a mistake
    assert "at least 5 val images are misclassified" in train_hint(tmp_path)
    assert train_hint(tmp_path).endswith("run `transferkit data check DATA` to see them")  # a report without its root
    (tmp_path / "data_report.json").write_text(json.dumps({"problems": {}, "root": str(tmp_path / "my data")}))
    assert train_hint(tmp_path).endswith(f"run `transferkit data check '{tmp_path / 'my data'}'` to see them")


@pytest.mark.parametrize("options, words", [
    (["--image-size", "5"], "--image-size must be ≥ 32, not 5"),  # taken, as --crop-fraction 7 was, unlike train
    (["--image-size", "100000"], "--image-size must be ≤ 2048 pixels, not 100000"),
    (["--crop-fraction", "7"], "--crop-fraction must be between 0.3 and 1, not 7.0"),
    (["--model", "resnt18"], "unknown model 'resnt18'; did you mean resnet18?"),  # was said after the scan
    (["--outlier-z", "nan"], "--outlier-z must be > 0, not nan"),  # was taken: no image was ever an outlier
])
def test_bad_check_options_are_refused_as_train_refuses_them_before_the_scan(tiny_folder, tmp_path, capsys,
                                                                              options, words):
    out = tmp_path / "check"
    assert main(["data", "check", str(tiny_folder), "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert words in err and "scanned" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_folds_beyond_the_smallest_class_are_said_and_recorded_as_used(tmp_path, capsys, caplog):
    data = make_image_folder(tmp_path / "data", n_train=3, n_val=1)  # 4 images a class: at most 4 folds
    out = tmp_path / "check"
    assert main(["data", "check", str(data), "--out", str(out), "--folds", "10", "--image-size", "32"]) == 0
    captured = capsys.readouterr()
    assert "(4-fold linear probe)" in captured.out and "10-fold" not in captured.out  # said 10-fold, fitted 4
    assert "label-error probe: 4 folds, not 10" in caplog.text
    assert json.loads((out / "check.json").read_text())["label_error_folds"] == 4
    assert "4-fold linear probe" in (out / "check.html").read_text()
    for extra in [*(data / "val" / "bees").iterdir(), *sorted((data / "train" / "bees").iterdir())[1:]]:
        extra.unlink()  # bees: 1 image, no fold can hold it out
    assert main(["data", "check", str(data), "--out", str(out), "--image-size", "32"]) == 0
    assert "(not searched: a class has only 1 image)" in capsys.readouterr().out  # said "a 1-fold linear probe"
    assert json.loads((out / "check.json").read_text())["label_error_folds"] is None


def test_a_class_whose_every_file_is_unusable_is_named_in_the_summary(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_train=3, n_val=1, with_val=False)
    (data / "train" / "wasps").mkdir()
    (data / "train" / "wasps" / "0.png").write_bytes(b"not a png")
    assert main(["data", "check", str(data), "--out", str(tmp_path / "check"), "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 class folder with no usable image: train/wasps (their files are listed under unusable files)" in out
