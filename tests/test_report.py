import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.errors import CheckpointError
from transferkit.results.metrics import evaluation_summary
from transferkit.results.report import write_report

EVIL = "<script>alert('x')</script>"
CLASSES = ["cat", "dog", EVIL]
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "lr"]
# A src/href attribute pointing off the page: http(s) or protocol-relative.
EXTERNAL_REF = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", re.IGNORECASE)


def make_history(epochs=4):
    return [
        {
            "epoch": e,
            "train_loss": round(1.0 / e, 4),
            "train_acc": round(1 - 0.4 / e, 4),
            "val_loss": round(1.1 / e, 4),
            "val_acc": round(1 - 0.5 / e, 4),
            "seconds": 10.0 + e,
            "lr": 0.001,
        }
        for e in range(1, epochs + 1)
    ]


def write_images(folder, n):
    rng = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"img_{i}&<b>.png"  # hostile file name too
        Image.fromarray(rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run-001"
    run.mkdir()
    history = make_history()
    (run / "config.yaml").write_text("model: resnet18\nmode: finetune\nepochs: 4\noptim:\n  lr: 0.001\n")
    with (run / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(history)
    metrics = {
        "best_val_acc": 0.875,
        "best_epoch": 4,
        "wall_seconds": 75.5,
        "classes": CLASSES,
        "history": history,
        "model": "resnet18",
        "mode": "finetune",
        "trainable_params": 1000,
        "total_params": 11_000_000,
        "environment": {"python": "3.11", "torch": "2.x", "platform": "Linux", "cpu": "x86", "cores": 2, "device": "cpu"},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    data_report = {
        "classes": CLASSES,
        "counts": {"train": {"cat": 10, "dog": 12, EVIL: 3}, "val": {"cat": 3, "dog": 4, EVIL: 1}},
        "problems": {"unreadable": [{"path": "data/cat/<broken>.jpg", "detail": "cannot identify image"}], "duplicate": [],
                     "dataset_manifest": [{"path": "elpv.json", "detail": "written by `transferkit data`"}]},
        "split_source": "folders",
    }
    (run / "data_report.json").write_text(json.dumps(data_report))
    paths = write_images(tmp_path / "images", 6)
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]])
    (run / "evaluation.json").write_text(json.dumps(evaluation_summary(y, probs, CLASSES, paths=paths, split="val")))
    return run


def test_report_is_self_contained_and_escaped(run_dir):
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    html = out.read_text(encoding="utf-8")

    assert (run_dir / "curves.png").is_file()  # generated from history because it was missing
    assert (run_dir / "confusion.png").is_file()
    assert not EXTERNAL_REF.search(html)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower()
    assert "&lt;script&gt;" in html
    assert "&lt;broken&gt;.jpg" in html and "img_0&amp;&lt;b&gt;.png" in html
    for heading in ("Headline", "Config", "Data", "Training curves", "History", "Confusion matrix", "Top losses", "Timing", "Environment"):
        assert heading in html
    assert "87.50%" in html  # best val acc
    assert "<details>" in html and "unreadable: 1 file(s)" in html
    assert "dataset_manifest" not in html and "elpv.json" not in html  # the tool's own file is not a problem
    assert html.count("data:image/png;base64,") >= 2 + 6  # curves + confusion + thumbnails
    assert "resnet18" in html and "finetune" in html
    assert "not available" not in html


def test_report_copes_with_an_empty_run_folder(tmp_path):
    html = write_report(tmp_path).read_text(encoding="utf-8")
    assert html.count("not available") >= 6
    assert not EXTERNAL_REF.search(html)


def test_report_falls_back_to_metrics_history_and_top_losses_png(run_dir):
    (run_dir / "history.csv").unlink()
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    for item in evaluation["top_losses"]:
        item["path"] = str(run_dir / "gone.png")  # images moved away since evaluation
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation))
    Image.new("RGB", (40, 30), (200, 10, 10)).save(run_dir / "top_losses.png")
    (run_dir / "config.yaml").write_text("model: [unclosed\n")  # bad YAML is shown raw

    html = write_report(run_dir).read_text(encoding="utf-8")
    assert (run_dir / "curves.png").is_file()
    assert "<pre>model: [unclosed" in html
    assert 'alt="top losses"' in html
    assert "train_loss" in html  # history table from metrics.json


def test_report_missing_run_folder_is_a_user_error(tmp_path):
    with pytest.raises(CheckpointError):
        write_report(tmp_path / "nope")


def find_chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (install the Debian package 'chromium' to run this test)")
    report = write_report(run_dir)
    shot = tmp_path / "shot.png"
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        report.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), f"chromium wrote no screenshot (rc={result.returncode}): {result.stderr[-2000:]!r}"
    with Image.open(shot) as img:
        assert img.size == (1200, 1600)
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10, "screenshot is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


LONG = "L" * 210  # a class folder name with no place to break a line


def overflow_px(page, tmp_path, width=1200,
                script="return document.documentElement.scrollWidth - window.innerWidth"):
    """How many pixels `page` is wider than a `width`-px window in headless chromium (or what else `script`
    returns there), through selenium; the test skips without chromium and chromium-driver."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = find_chromium(), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (`make browser` installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={width},1000",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        session.get(Path(page).resolve().as_uri())
        return session.execute_script(script)
    finally:
        session.quit()


def test_a_long_class_name_wraps_inside_the_page(run_dir, tmp_path):
    """A 210-character class name pushed the class table's counts and the per-class metrics off the page's
    right edge (the table grew to the name's width): names and captions now wrap anywhere, numbers never."""
    for name in ("metrics.json", "data_report.json", "evaluation.json"):
        path = run_dir / name
        path.write_text(path.read_text().replace(json.dumps(EVIL)[1:-1], LONG))
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert LONG in html
    assert overflow_px(run_dir / "report.html", tmp_path) <= 0


def test_bidi_controls_in_names_are_shown_not_obeyed(run_dir):
    """A class folder named "\u202eevil" showed as "live" in the report, and without its closing control turned
    the rest of a caption around: the controls are written as their code points."""
    for name in ("metrics.json", "data_report.json", "evaluation.json"):
        path = run_dir / name
        path.write_text(path.read_text().replace("dog", "\\u202edog"))
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "\u202e" not in html and "[U+202E]dog" in html


def test_a_searched_probe_run_reads_as_one(run_dir):
    """An auto run: the search right after the headline (with its own wall time), the config as the settings
    that differ from the defaults (the recipe shown as the search's, not the reproduce command's
    `tutorial`), every setting in a fold; a one-epoch probe draws no single-point curves."""
    (run_dir / "config.yaml").write_text("data: d\nrecipe: tutorial\nmode: linear-probe\nprobe_c: 0.01\n"
                                         "momentum: 0.9\nepochs: 15\n")
    history = make_history(epochs=1)
    metrics = {**json.loads((run_dir / "metrics.json").read_text()), "history": history, "best_epoch": 1,
               "wall_seconds": 2.0}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with (run_dir / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(history)
    search = {"wall_seconds": 125.0, "budget_seconds": 240.0, "chosen": "probe crop=1.0 views=flip",
              "reproduce": "transferkit train d --recipe tutorial --mode linear-probe", "selection": "3-fold CV",
              "candidates": [{"name": "probe crop=1.0 views=flip", "score": 0.9, "status": "ran", "settings": {}}]}
    (run_dir / "search.json").write_text(json.dumps(search))
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert html.index("<h2>Headline") < html.index("<h2>Search") < html.index("<h2>Config")
    assert "2m 05s" in html and "wall time (search)" in html
    # the reproduce command wraps at its spaces rather than running off the page
    command = '<pre class="command"><span>transferkit</span> <span>train</span> <span>d</span> <span>--recipe</span>'
    assert command in html and "pre.command{white-space:pre-wrap}" in html
    changed = html[html.index("<h2>Config"):html.index("<details>", html.index("<h2>Config"))]
    assert "auto: the recipe search chose" in changed and "linear-probe" in changed and "0.01" in changed
    assert "momentum" not in changed and "epochs" not in changed  # the defaults' values: in the fold only
    assert "all 6 settings" in html
    assert "One epoch: nothing to draw" in html and not (run_dir / "curves.png").exists()


def test_report_command_writes_only_in_a_run_folder(run_dir, tmp_path, capsys):
    from transferkit.cli import main

    assert main(["report", str(run_dir)]) == 0  # no best.safetensors (an interrupted run): was "no checkpoint"
    assert (run_dir / "report.html").is_file()
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "report.html").write_text("my own report")
    capsys.readouterr()
    assert main(["report", str(mine / "notes.txt")]) == CheckpointError.exit_code  # wrote notes/report.html
    assert "is not a file in a transferkit run folder" in capsys.readouterr().err
    assert main(["report", str(mine)]) == CheckpointError.exit_code
    assert (mine / "report.html").read_text() == "my own report"


def test_report_of_damaged_files_shows_the_rest(run_dir, caplog):
    (run_dir / "history.csv").write_bytes("epoch,train_loss\n1,0.5\n".encode("utf-16"))  # saved again by a spreadsheet
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    evaluation.update(per_class="x", top_losses=[1, 2], classes=5, confusion_matrix=5)  # valid JSON, wrong shapes
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["best_val_acc_interval"] = {"low": 0.5}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    html = write_report(run_dir).read_text(encoding="utf-8")
    damaged = "not available: a file of the run it is drawn from is damaged"
    assert html.count(damaged) == 3  # the headline, the confusion matrix and the top losses
    assert "Environment" in html and "train_loss" in html  # the history from metrics.json
    assert "section Top losses not available" in caplog.text
