"""The decoded-image cache (data/decoded.py): images decoded once, keyed by content and resize, broken
files skipped with a warning, the same eval tensors as decoding the file, and a finetune run on it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

import transferkit.data.decoded as decoded
from transferkit.cli import build_parser
from transferkit.config import TrainConfig
from transferkit.data.dataset import ImageListDataset
from transferkit.data.decoded import DecodedDataset, decode_missing, open_store
from transferkit.data.transforms import eval_transform, train_transform
from transferkit.engine.fit import fit, make_source, prepare
from transferkit.models.registry import Preprocessing

PRE = Preprocessing(224, 256, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
FINETUNE = dict(model="resnet18", pretrained=False, image_size=32, mode="finetune", epochs=1, batch_size=4,
                lr=0.01, workers=0)


def _images(folder: Path, sizes) -> list[str]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def counted_decodes(monkeypatch):
    """Counts load_rgb calls of the store builder (workers=0: it runs in this process)."""
    calls = []

    def counting(path, **kwargs):
        calls.append(path)
        return decoded_load(path, **kwargs)

    decoded_load = decoded.load_rgb
    monkeypatch.setattr(decoded, "load_rgb", counting)
    return calls


def test_rerun_hits_the_store_and_decodes_nothing(tmp_path, counted_decodes):
    paths = _images(tmp_path / "img", [(300, 300), (120, 80), (260, 400)])
    keys, stats = decode_missing(open_store(tmp_path / "cache", PRE), paths, None, PRE)
    assert stats["decoded"] == 3 and stats["hits"] == 0 and len(counted_decodes) == 3
    store = open_store(tmp_path / "cache", PRE)  # a new process: the index is read from disk
    again, stats = decode_missing(store, paths, None, PRE)
    assert again == keys and stats["decoded"] == 0 and stats["hits"] == 3 and len(counted_decodes) == 3
    # Shorter side reduced to the resize size, aspect kept, uint8 CHW; a smaller image stays as it is.
    shapes = [tuple(store.get(k).shape) for k in keys]
    assert shapes == [(3, 256, 256), (3, 120, 80), (3, 256, 393)]
    assert store.get(keys[0]).dtype == torch.uint8
    assert not list(store.root.glob(".*.tmp"))  # temp files renamed into place


def test_changed_file_is_decoded_again_alone(tmp_path, counted_decodes):
    paths = _images(tmp_path / "img", [(64, 64), (64, 64), (64, 64)])
    keys, _ = decode_missing(open_store(tmp_path / "cache", PRE), paths, None, PRE)
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(paths[1])
    counted_decodes.clear()
    store = open_store(tmp_path / "cache", PRE)
    new_keys, stats = decode_missing(store, paths, None, PRE)
    assert counted_decodes == [paths[1]] and stats["decoded"] == 1 and stats["hits"] == 2
    assert new_keys[1] != keys[1] and new_keys[0] == keys[0]
    assert int(store.get(new_keys[1]).max()) == 0


def test_scan_digests_are_used_instead_of_hashing(tmp_path, monkeypatch):
    paths = _images(tmp_path / "img", [(40, 40)])
    monkeypatch.setattr(decoded, "file_sha256", lambda p: pytest.fail("re-hashed a file the scan hashed"))
    keys, _ = decode_missing(open_store(tmp_path / "cache", PRE), paths, {paths[0]: "ab" * 32}, PRE)
    assert keys == ["ab" * 32]


def test_other_resize_size_interpolation_or_16_bit_white_is_another_store(tmp_path, counted_decodes):
    paths = _images(tmp_path / "img", [(300, 200), (90, 90)])
    decode_missing(open_store(tmp_path / "cache", PRE), paths, None, PRE)
    assert open_store(tmp_path / "cache", PRE.reading(65535)).root == open_store(tmp_path / "cache", PRE).root
    for pre in (PRE.at_size(160), Preprocessing(224, 256, "bilinear", PRE.mean, PRE.std), PRE.reading(4095)):
        counted_decodes.clear()
        store = open_store(tmp_path / "cache", pre)
        keys, stats = decode_missing(store, paths, None, pre)
        assert stats["decoded"] == 2 and len(counted_decodes) == 2
        assert min(store.get(keys[0]).shape[1:]) == min(pre.resize_size, 200)  # never enlarged
    assert len(list((tmp_path / "cache" / "decoded").iterdir())) == 4


def test_broken_and_vanished_files_are_skipped_with_a_warning(tmp_path, caplog):
    paths = _images(tmp_path / "img", [(50, 50), (60, 40)])
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(Image.open(paths[0]).tobytes()[:100])  # not an image
    vanished = str(tmp_path / "img" / "gone.png")
    with caplog.at_level(logging.WARNING):
        keys, stats = decode_missing(open_store(tmp_path / "cache", PRE), paths + [str(broken), vanished],
                                     None, PRE)
    assert all(keys[:2]) and keys[2:] == [None, None]
    assert stats["failed"] == 2 and stats["decoded"] == 2
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "2 image(s) could not be decoded" in warning and str(broken) in warning and vanished in warning
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_output_equals_decoding_the_file(tmp_path, interpolation):
    pre = Preprocessing(224, 256, interpolation, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    paths = _images(tmp_path / "img", [(300, 300), (100, 60), (500, 333), (257, 1000), (256, 224)])
    store = open_store(tmp_path / "cache", pre)
    keys, _ = decode_missing(store, paths, None, pre)
    items = [(p, i % 2) for i, p in enumerate(paths)]
    from_store = DecodedDataset(items, keys, store, eval_transform(pre))
    from_file = ImageListDataset(items, eval_transform(pre))
    for i in range(len(items)):
        (a, ya, ia), (b, yb, ib) = from_store[i], from_file[i]
        assert (ya, ia) == (yb, ib) and a.shape == b.shape == (3, 224, 224) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_train_crops_match_the_pil_path_where_the_file_is_already_at_resize_size(tmp_path):
    # Shorter side = resize size: the stored image is the file's own pixels, so the same seed picks the
    # same crop box and flip; only the resampling implementation (tensor vs PIL) differs.
    paths = _images(tmp_path / "img", [(256, 320)])
    store = open_store(tmp_path / "cache", PRE)
    keys, _ = decode_missing(store, paths, None, PRE)
    tf = train_transform(PRE, "standard")
    from_store = DecodedDataset([(paths[0], 0)], keys, store, tf)
    from_file = ImageListDataset([(paths[0], 0)], tf)
    for seed in range(5):
        torch.manual_seed(seed)
        a = from_store[0][0]
        torch.manual_seed(seed)
        b = from_file[0][0]
        assert a.shape == b.shape == (3, 224, 224)
        assert (a - b).abs().mean() < 0.02  # normalized units (std 0.5): about 1/400 of the range


def test_no_decoded_cache_flag():
    args = build_parser().parse_args(["train", "data", "--no-decoded-cache"])
    assert args.decoded_cache is False
    assert not hasattr(build_parser().parse_args(["train", "data"]), "decoded_cache")  # the config decides
    assert TrainConfig(data="d").decoded_cache is True


@pytest.mark.slow
def test_finetune_trains_on_the_store_and_a_rerun_decodes_nothing(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=6, n_val=3, size=40)
    m = fit(TrainConfig(data=str(data), out=str(tmp_path / "run1"), **FINETUNE))
    stats = m["source"]["decoded_cache"]
    assert m["source"]["kind"] == "image-batches" and m["epochs_run"] == 1
    assert stats["decoded"] == 18 and stats["failed"] == 0
    (root,) = (Path(os.environ["TRANSFERKIT_FEATURE_CACHE"]) / "decoded").iterdir()
    assert len(list(root.glob("shard-*.u8"))) == 1 and len(list(root.glob("shard-*.json"))) == 1

    m = fit(TrainConfig(data=str(data), out=str(tmp_path / "run2"), **FINETUNE))
    assert m["source"]["decoded_cache"]["decoded"] == 0 and m["source"]["decoded_cache"]["hits"] == 18

    m = fit(TrainConfig(data=str(data), out=str(tmp_path / "off"), decoded_cache=False, **FINETUNE))
    assert m["source"]["decoded_cache"] is None


def test_unwritable_cache_falls_back_to_decoding_every_epoch(tiny_folder, tmp_path, monkeypatch, caplog):
    import transferkit.engine.sources as sources

    def refuse(*_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sources, "open_store", refuse)
    source = make_source(prepare(TrainConfig(data=str(tiny_folder), out=str(tmp_path / "run"), **FINETUNE)))
    with caplog.at_level(logging.WARNING):
        source.prepare()
    assert type(source.train_loader.dataset) is ImageListDataset
    assert "decoded-image cache not used" in caplog.text


def test_building_the_store_leaves_the_global_rng_alone(tmp_path):
    paths = _images(tmp_path / "img", [(40, 40)])
    torch.manual_seed(0)
    decode_missing(open_store(tmp_path / "cache", PRE), paths, None, PRE)
    after_build = torch.rand(1)
    torch.manual_seed(0)
    decode_missing(open_store(tmp_path / "cache", PRE), paths, None, PRE)  # a hit: nothing runs
    assert torch.equal(after_build, torch.rand(1))


def test_loader_workers_with_the_store():
    from transferkit.engine.sources import _auto_workers

    assert _auto_workers(100, decoded=True, cpu=True) == 0  # tiny folder: start-up costs more than it saves
    assert _auto_workers(5000, decoded=True, cpu=True) == 0  # cheap crops: made in this process
    assert _auto_workers(5000, decoded=True, cpu=False) == _auto_workers(5000) >= 1  # an accelerator: all


@pytest.mark.slow
def test_eval_crops_stream_from_the_files_and_random_views_fill_the_store_that_finetune_reuses(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=6, n_val=3, size=40)
    decoded_root = Path(os.environ["TRANSFERKIT_FEATURE_CACHE"]) / "decoded"
    # Eval crops and their symmetries are cut once: nothing is kept but the features.
    fe = {**FINETUNE, "mode": "feature-extract", "views": 2}
    m = fit(TrainConfig(data=str(data), out=str(tmp_path / "fe"), **fe))
    assert m["source"]["kind"] == "cached-features" and m["source"]["train"]["computed"] == 12 * 2
    assert not list(decoded_root.glob("*/shard-*"))
    # Random views re-crop the image: its pixels are stored, and finetune reads them again.
    m = fit(TrainConfig(data=str(data), out=str(tmp_path / "fr"), **fe, view_kind="random"))
    assert m["source"]["train"]["computed"] == 12  # view 0 was cached by the first run
    assert len(list(decoded_root.glob("*/shard-*.u8"))) == 1
    m = fit(TrainConfig(data=str(data), out=str(tmp_path / "ft"), **FINETUNE))
    assert m["source"]["decoded_cache"]["decoded"] == 6 and m["source"]["decoded_cache"]["hits"] == 12


def test_batches_made_in_this_process_use_one_thread_and_give_the_threads_back(tmp_path):
    # With the model on all cores, a transform on several intra-op threads stalls whenever another process
    # runs; the main-process loader makes each batch on one thread and then restores the model's count.
    data = make_image_folder(tmp_path / "data", n_train=6, n_val=3, size=40)
    state = prepare(TrainConfig(data=str(data), out=str(tmp_path / "run"), **FINETUNE))
    source = make_source(state)
    seen = []
    recording = source.train_tf

    def transform(image):
        seen.append(torch.get_num_threads())
        return recording(image)

    source.train_tf = transform
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        source.prepare()
        assert source.train_loader.num_workers == 0
        batches = list(source.train_batches(1))
        assert sum(len(y) for _, y in batches) == len(source.train_items)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_small_and_grey_images_are_stored_at_their_own_size_and_crop_as_the_file_does(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / "grey.png")  # mode L
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(folder / "colour.png")
    paths = [str(folder / "grey.png"), str(folder / "colour.png")]
    store = open_store(tmp_path / "cache", PRE)
    keys, stats = decode_missing(store, paths, None, PRE)
    assert stats["store_bytes"] == 28 * 28 + 30 * 20 * 3  # the decoded source pixels, nothing more
    grey = store.get(keys[0])
    assert grey.shape == (3, 28, 28) and torch.equal(grey[0], grey[2])
    items = [(p, 0) for p in paths]
    for transform in (eval_transform(PRE),):
        from_store = DecodedDataset(items, keys, store, transform)
        from_file = ImageListDataset(items, transform)
        for i in range(2):
            torch.testing.assert_close(from_store[i][0], from_file[i][0], atol=1e-6, rtol=0)


def test_the_size_cap_evicts_least_recently_used_shards_but_never_this_runs(tmp_path, monkeypatch, caplog):
    from transferkit import caches

    monkeypatch.setattr(caches, "RECHECK_SECONDS", 0.0)  # three stores' writes seconds apart: each checks the cap
    paths = _images(tmp_path / "img", [(64, 64)] * 4)
    old = open_store(tmp_path / "cache", PRE.at_size(32))
    decode_missing(old, paths, None, PRE.at_size(32))
    for shard in old.root.glob("shard-*.u8"):  # last used an hour ago
        os.utime(shard, (shard.stat().st_atime - 3600, shard.stat().st_mtime - 3600))
    monkeypatch.setenv("TRANSFERKIT_CACHE_MAX", "20K")  # room for one store of 4 × 64×64×3, not two
    new = open_store(tmp_path / "cache", PRE)
    keys, stats = decode_missing(new, paths, None, PRE)
    assert stats["evicted_entries"] == 1 and not list(old.root.glob("shard-*"))
    index_bytes = sum(p.stat().st_size for p in new.root.glob("shard-*.json"))  # counted with their shards
    assert stats["store_bytes"] == 4 * 64 * 64 * 3 and stats["cache_bytes"] == stats["store_bytes"] + index_bytes
    assert stats["cache_cap_bytes"] == 20 * 1024
    monkeypatch.setenv("TRANSFERKIT_CACHE_MAX", "1K")  # smaller than this run's own images: kept, said
    with caplog.at_level(logging.WARNING):
        _, stats = decode_missing(open_store(tmp_path / "cache", PRE), paths, None, PRE)
    assert stats["evicted_entries"] == 0 and stats["hits"] == 4 and "over their cap" in caplog.text


def test_decoded_pixels_are_writable_so_torch_wraps_them_without_a_warning(tmp_path):
    # Pillow's np.asarray view is read-only: torch.from_numpy then printed a UserWarning in users' runs
    # (once per process, which is why this checks the array rather than the warning).
    [colour] = _images(tmp_path, [(40, 30)])
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((40, 30), dtype=np.uint8)).save(grey)
    for path in (colour, str(grey)):
        pixels = decoded.stored_pixels(Image.open(path).convert("RGB"), 256, lambda image: image)
        assert pixels.flags.writeable
