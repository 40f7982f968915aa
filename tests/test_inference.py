"""The inference layer on its own (no model): batches keep labels aligned, parity, the ORT session."""

from __future__ import annotations

import numpy as np
import pytest

from transferkit.errors import CheckpointError
from transferkit.inference import batched_proba, ort_session, parity, read_batch, read_batches


def _preprocess(item):
    if item.startswith("bad"):
        raise OSError(f"cannot read {item}")
    return float(item[1:])


def test_a_bad_item_in_the_middle_keeps_the_labels_of_the_others():
    items = ["a1", "a2", "bad3", "a4", "a5"]
    labels = [10, 20, 30, 40, 50]
    batch = read_batch(items, _preprocess)
    assert batch.inputs == [1.0, 2.0, 4.0, 5.0]
    assert batch.kept(labels) == [10, 20, 40, 50]
    assert batch.errors == [None, None, "cannot read bad3", None, None]


def test_an_error_without_words_is_named_by_its_kind():
    """Pillow raises a bare AssertionError on some damaged files: the row's error was empty, as if it had none."""
    def preprocess(item):
        if item == "x":
            raise AssertionError  # bare, as Pillow's
        return 1.0

    assert read_batch(["a", "x"], preprocess).errors == [None, "AssertionError"]


def test_chunks_put_each_row_where_its_file_was():
    items = ["a1", "bad2", "a3", "a4", "bad5", "a6", "a7"]

    def infer(inputs):  # one column: the input itself, so a row shows which file it came from
        return np.array(inputs, dtype=np.float32)[:, None]

    probs, errors = batched_proba(items, 1, _preprocess, infer, batch_size=3)
    np.testing.assert_array_equal(probs[:, 0], [1, np.nan, 3, 4, np.nan, 6, 7])
    assert [e is not None for e in errors] == [False, True, False, False, True, False, False]
    starts = [start for start, _ in read_batches(items, _preprocess, batch_size=3)]
    assert starts == [0, 3, 6]


def test_reading_ahead_on_threads_gives_the_batches_of_reading_in_turn():
    import threading

    items = [f"{'bad' if i % 7 == 3 else 'a'}{i}" for i in range(50)]
    readers = set()

    def preprocess(item):
        readers.add(threading.current_thread().name)
        return _preprocess(item)

    serial = list(read_batches(items, preprocess, batch_size=8, threads=1))
    assert readers == {threading.current_thread().name}
    ahead = list(read_batches(items, preprocess, batch_size=8, threads=3))
    assert any(name.startswith("transferkit-read") for name in readers)  # the chunks were read on threads
    assert [(start, b.inputs, b.rows, b.errors) for start, b in ahead] == \
           [(start, b.inputs, b.rows, b.errors) for start, b in serial]


def test_a_reader_stopped_early_leaves_nothing_queued():
    import time

    read = []

    def slow(item):
        time.sleep(0.01)
        read.append(item)
        return 0.0

    batches = read_batches([f"a{i}" for i in range(400)], slow, batch_size=4, threads=2, ahead=2)
    next(batches)
    batches.close()  # a caller that stops (an error in its network, Ctrl-C) cancels what was queued
    time.sleep(0.1)
    assert len(read) <= 4 * 4  # the chunk given, the two read ahead and the one queued as it was taken


def test_a_large_prediction_shows_its_progress_in_images(monkeypatch, capsys):
    from transferkit.engine import progress

    monkeypatch.setattr(progress, "_quiet", lambda: False)  # as on a terminal

    def infer(inputs):
        return np.zeros((len(inputs), 2), dtype=np.float32)

    items = [f"a{i}" for i in range(40)]
    batched_proba(items, 2, _preprocess, infer, batch_size=8, desc="predicting")
    shown = capsys.readouterr().err
    assert "predicting:" in shown and "/40 " in shown  # a bar over the 40 images (cleared when done)
    batched_proba(items, 2, _preprocess, infer, batch_size=8)  # no desc (a library caller): no bar
    batched_proba(items[:8], 2, _preprocess, infer, batch_size=8, desc="predicting")  # one batch: no bar
    assert capsys.readouterr().err == ""


def test_bars_show_on_a_terminal_and_in_a_notebook_only(monkeypatch):
    import sys
    import types

    from transferkit.engine import progress

    monkeypatch.delenv("TRANSFERKIT_QUIET", raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert progress._quiet()  # pytest's stderr is no terminal: a CI log
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # a Jupyter kernel runs us
    assert not progress._quiet()
    monkeypatch.setenv("TRANSFERKIT_QUIET", "1")
    assert progress._quiet()


def test_parity_of_logits_and_of_features():
    logits = np.array([[2.0, -1.0], [0.3, 0.1], [-1.0, 1.0]])
    same = parity(logits, logits + 1e-6)
    assert same["images"] == 3 and same["top1_agreement"] == 1.0 and same["clear_disagreements"] == 0
    assert same["max_abs_diff"] == pytest.approx(1e-6)
    flipped = parity(logits, logits + np.array([[0.0, 5.0]]))
    assert flipped["top1_agreement"] < 1.0 and flipped["clear_disagreements"] >= 1
    features = parity(np.full((2, 4), 10.0), np.full((2, 4), 10.05), logits=False)
    assert features["relative_diff"] == pytest.approx(0.005) and "top1_agreement" not in features
    assert parity(np.zeros((2, 3)), np.zeros((2, 4)), logits=False)["max_abs_diff"] == float("inf")


def test_a_file_that_is_not_onnx_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08 not a model")
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        ort_session(path)



def test_a_folder_is_walked_for_the_images_training_would_use(tmp_path):
    """Symlinked folders followed (each once, none that points back up), an extensionless image kept, and an
    extensionless text or pipe and a run folder skipped, as the data scan does; predict and evaluate dropped the
    first two and classified a run's figures."""
    import os

    from PIL import Image

    from transferkit.inference import expand_inputs

    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (photos / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "linked.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "beside.png")  # beside photos/: no image of it
    Image.new("RGB", (8, 8)).save(photos / "camera_dump", format="JPEG")
    (photos / "README").write_text("not an image\n")
    os.mkfifo(photos / "PIPE")  # opening it to look would block
    os.symlink(elsewhere, photos / "link")
    os.symlink(elsewhere, photos / "sub" / "again")  # the same folder twice: its images once
    os.symlink("..", photos / "sub" / "up")  # back up to photos
    os.symlink(tmp_path, elsewhere / "top")  # photos/link/top: the parent of photos and elsewhere
    run = photos / "run"  # a run folder trained from here: its figures are no photos (as the data scan skips it)
    run.mkdir()
    for name in ("config.yaml", "split.csv"):
        (run / name).write_text("x\n")
    Image.new("RGB", (8, 8)).save(run / "curves.png")
    assert expand_inputs([str(photos)]) == [str(photos / "camera_dump"), str(photos / "link" / "linked.png")]


def test_an_extensionless_image_over_the_pixel_limit_is_listed_to_be_refused(tmp_path):
    """A file without an extension over Pillow's pixel limit was dropped from predict's folder walk unsaid (over twice
    the limit), or listed with Pillow's DecompressionBombWarning in the terminal (under twice): its row says why."""
    import warnings

    from torture import bomb_png

    from transferkit.data.images import ImageDecodeError, load_rgb
    from transferkit.inference import expand_inputs

    (tmp_path / "huge").write_bytes(bomb_png(20000, 10000))  # 200 MP: over twice the limit
    (tmp_path / "large").write_bytes(bomb_png(12000, 8000))  # 96 MP: between the limit and twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = expand_inputs([str(tmp_path)])
    assert found == [str(tmp_path / "huge"), str(tmp_path / "large")]
    assert [str(w.message) for w in caught] == []
    for path in found:
        with pytest.raises(ImageDecodeError, match="decompression bomb"):
            load_rgb(path)
