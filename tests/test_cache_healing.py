"""Caches that heal: a feature shard, an activation shard or a decoded-image shard damaged as a user's disk
would do it (truncated, zero-filled, a flipped bit, its index entry deleted) is found, dropped and
recomputed with one warning line; the next run gives the clean run's metrics and recomputes only what
the damaged shard held. Concurrent writers and readers of one store never see each other's half-writes."""

from __future__ import annotations

import logging
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

import transferkit.data.decoded as decoded
from transferkit.config import TrainConfig
from transferkit.data.decoded import DecodedStore
from transferkit.engine.features import FeatureStore
from transferkit.engine.fit import fit

RUNS = {
    # cache kind: (run options, glob of the shards to damage in the cache folder)
    "features": (dict(model="efficientnet_lite0", image_size=64, engine="torch"), "*/shard-*.safetensors"),
    "activations": (dict(model="efficientnet_lite0", image_size=64, engine="torch", mode="partial", unfreeze=1,
                         cache_dtype="float32"), "*/shard-*.safetensors"),
    "decoded": (dict(model="resnet18", pretrained=False, image_size=32, mode="finetune", batch_size=4),
                "decoded/*/shard-*.u8"),
}
COMMON = dict(epochs=1, workers=0, lr=0.01, seed=0)
# Shards are the unit of damage and recompute; small decoded shards (~4 images here) give the run several.
SMALL_SHARD_BYTES = 16000


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_fill(path: Path) -> None:  # a lost block: size kept, 4 KiB of zeros in the middle
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start:start + 4096] = bytes(len(data[start:start + 4096]))
    path.write_bytes(bytes(data))


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10
    path.write_bytes(bytes(data))


def delete_index(path: Path) -> None:
    path.with_suffix(".json").unlink()


def _train(data: Path, out: Path, cache: Path, kind: str, monkeypatch) -> dict:
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(cache))
    monkeypatch.setattr(decoded, "SHARD_BYTES", SMALL_SHARD_BYTES)
    return fit(TrainConfig(data=str(data), out=str(out), **COMMON, **RUNS[kind][0]))


def _counts(metrics: dict) -> tuple[int, int]:
    """(entries computed, entries found) by the run's cache."""
    src = metrics["source"]
    if src["kind"] == "image-batches":
        return src["decoded_cache"]["decoded"], src["decoded_cache"]["hits"]
    return (src["train"]["computed"] + src["val"]["computed"], src["train"]["hits"] + src["val"]["hits"])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Per cache kind: the data, a clean run's metrics and its filled cache (made once, copied per test)."""
    root = tmp_path_factory.mktemp("healing")
    data = make_image_folder(root / "data", n_train=6, n_val=3, size=40)
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        for kind in RUNS:
            metrics = _train(data, root / f"{kind}-run", root / f"{kind}-cache", kind, mp)
            made[kind] = (metrics, root / f"{kind}-cache")
    return data, made


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate, zero_fill, flip_bit, delete_index], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", list(RUNS))
def test_a_damaged_shard_is_dropped_and_recomputed_with_one_warning(clean, kind, damage, tmp_path, monkeypatch,
                                                                      caplog):
    data, made = clean
    metrics, clean_cache = made[kind]
    cache = tmp_path / "cache"
    shutil.copytree(clean_cache, cache)
    # The largest shard (the training images'): the other stays and must still be used.
    shard = max(cache.glob(RUNS[kind][1]), key=lambda p: p.stat().st_size)
    all_entries = sum(_counts(metrics))
    damage(shard)
    with caplog.at_level(logging.WARNING):
        again = _train(data, tmp_path / "run", cache, kind, monkeypatch)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "cache" in r.getMessage()]
    assert len(warnings) == 1 and "1 damaged shard(s) dropped" in warnings[0] and shard.stem in warnings[0]
    assert "Traceback" not in caplog.text
    computed, hits = _counts(again)
    assert 0 < computed < all_entries and computed + hits == all_entries  # only the damaged shard's share
    for key in ("best_val_acc", "best_val_balanced_accuracy", "epochs_run"):
        assert again[key] == metrics[key], key
    assert again["history"][0]["val_loss"] == pytest.approx(metrics["history"][0]["val_loss"], abs=1e-6)
    # Healed: a third run finds everything and warns about nothing.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = _train(data, tmp_path / "run3", cache, kind, monkeypatch)
    assert _counts(third) == (0, all_entries) and "damaged" not in caplog.text


def test_a_foreign_shard_is_dropped(tmp_path, caplog):
    store = FeatureStore(tmp_path)
    store.put(["a", "b"], torch.ones(2, 3))
    other = tmp_path.parent / "other-store"
    other.mkdir()
    FeatureStore(other).put(["c"], torch.zeros(1, 3))
    for path in other.iterdir():  # a shard copied in from another store keeps that store's name
        shutil.copy(path, tmp_path / path.name)
    with caplog.at_level(logging.WARNING):
        again = FeatureStore(tmp_path)
        again.verify(["a", "c"])
    assert "a" in again and "c" not in again and "foreign index entry" in caplog.text
    assert torch.equal(again.get(["a", "b"]), torch.ones(2, 3))


def test_a_write_in_progress_is_neither_read_nor_dropped(tmp_path, caplog):
    # put() writes the index entry before the data: a reader between the two sees a shard without data,
    # which is another process's write in progress, not damage.
    store = FeatureStore(tmp_path)
    store.put(["a"], torch.ones(1, 3))
    data = next(tmp_path.glob("shard-*.safetensors"))
    held = data.read_bytes()
    data.unlink()
    with caplog.at_level(logging.WARNING):
        reader = FeatureStore(tmp_path)
        reader.verify(["a"])
    assert "a" not in reader and not caplog.text and data.with_suffix(".json").exists()
    data.write_bytes(held)  # the writer finishes
    assert torch.equal(FeatureStore(tmp_path).get(["a"]), torch.ones(1, 3))


def _write_feature_shards(root: str, tag: str, n: int) -> None:
    store = FeatureStore(Path(root))
    for i in range(n):
        store.put([f"{tag}{i}-{j}" for j in range(50)], torch.full((50, 256), float(i)))


def _write_decoded_shards(root: str, tag: str, n: int) -> None:
    import numpy as np

    from transferkit.data.decoded import _ShardWriter

    store = DecodedStore(Path(root))
    for i in range(n):
        writer = _ShardWriter(store)
        writer.add(f"{tag}{i}", np.full((64, 64, 3), i, np.uint8))
        writer.close()


@pytest.mark.slow
@pytest.mark.parametrize("writer, store_type", [(_write_feature_shards, FeatureStore),
                                                (_write_decoded_shards, DecodedStore)])
def test_concurrent_writers_and_readers_share_a_store_safely(tmp_path, caplog, writer, store_type):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=writer, args=(str(tmp_path), tag, 30)) for tag in ("x", "y")]
    for p in procs:
        p.start()
    seen = 0
    with caplog.at_level(logging.WARNING):
        while any(p.is_alive() for p in procs) or seen == 0:
            store = store_type(tmp_path)
            assert store.damaged == []  # never a half-written shard taken for a damaged one
            keys = list(store.index)
            store.verify(keys)
            seen = max(seen, len(keys))
            if store_type is FeatureStore and keys:
                store.get(keys)  # every indexed key reads
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert not caplog.text
    final = store_type(tmp_path)
    assert len(final.index) == (2 * 30 * 50 if store_type is FeatureStore else 2 * 30)
