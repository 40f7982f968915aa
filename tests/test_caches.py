"""`transferkit cache`: what the caches hold after a run, and `clear` removing transferkit's entries only; the size
cap over the caches that grow with the data (TRANSFERKIT_CACHE_MAX)."""

import logging
import os

import pytest
import torch

from transferkit import caches, cli
from transferkit.config import TrainConfig
from transferkit.data import scan_record
from transferkit.engine.features import FeatureStore, View, cached_features
from transferkit.errors import UsageError
from transferkit.preprocessing import Preprocessing
from transferkit.search import train
from conftest import make_image_folder


def _run(data, out):
    return train(TrainConfig(data=str(data), out=str(out), recipe="tutorial", mode="feature-extract", epochs=1,
                             image_size=64), given={"image_size"})


def _sizes(capsys) -> dict[str, tuple[float, int]]:
    assert cli.main(["cache"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:] if line and not line.startswith(" ")]
    return {row[0]: (float(row[1]), int(row[3])) for row in rows if row[0] in caches.NAMES}


def test_cache_lists_a_runs_caches_and_clear_removes_only_transferkits_entries(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "home-cache"))
    monkeypatch.setenv(scan_record.CACHE_ENV, str(tmp_path / "scans"))
    monkeypatch.setattr(scan_record, "RACY_S", 0.0)
    features = tmp_path / "feature-cache"  # conftest's TRANSFERKIT_FEATURE_CACHE
    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2, size=40)
    first = _run(data, tmp_path / "run1")
    weights = tmp_path / "home-cache" / "weights"
    weights.mkdir(parents=True, exist_ok=True)  # the run converted its weights there too
    (weights / "some_model.safetensors").write_bytes(b"\0" * 1000)
    mine = features / "notes.txt"  # a user's file in a folder they pointed the cache at
    mine.write_text("keep me")
    (features / "mydata").mkdir()

    sizes = _sizes(capsys)
    assert set(sizes) == {"features", "decoded", "engines", "scans", "weights"}
    n_weights = sizes["weights"][1]
    assert sizes["features"][1] >= 1 and sizes["scans"][1] == 1 and n_weights >= 1

    assert cli.main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert out.count("cleared ") == 4 and "cleared weights" not in out
    sizes = _sizes(capsys)
    assert all(sizes[name][1] == 0 for name in ("features", "decoded", "engines", "scans"))
    assert sizes["weights"][1] == n_weights and mine.read_text() == "keep me" and (features / "mydata").is_dir()

    again = _run(data, tmp_path / "run2")  # everything recomputed
    assert again["best_val_acc"] == first["best_val_acc"]
    assert cli.main(["cache", "clear", "weights"]) == 0
    assert not list(weights.glob("*.safetensors"))


def test_cache_names_are_checked(capsys):
    assert cli.main(["cache", "clear", "everything"]) == 2
    assert "unknown cache everything" in capsys.readouterr().err
    assert cli.main(["cache", "list", "features"]) == 2


def test_clear_keeps_a_users_folder_that_only_has_a_stores_name(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "home-cache"))
    features = tmp_path / "feature-cache"  # conftest's TRANSFERKIT_FEATURE_CACHE, pointed at the user's folder
    theirs = features / "0123456789abcdef0123"  # 20 hex digits: a store's name, but the user's files
    theirs.mkdir(parents=True)
    (theirs / "identity.json").write_text("{}")
    (theirs / "thesis.txt").write_text("keep me")
    store = features / "fedcba9876543210fedc"  # a store as engine/features.py writes one, interrupted mid-write
    store.mkdir()
    for name in ("identity.json", "shard-0a1b2c.safetensors", "shard-0a1b2c.json", ".shard-0a1b2c.json.x1y2.tmp"):
        (store / name).write_bytes(b"\0" * 10)
    (features / "00112233445566778899").write_text("a file of the user's with a store's name")
    assert cli.main(["cache", "clear", "features"]) == 0
    assert (theirs / "thesis.txt").read_text() == "keep me" and (theirs / "identity.json").is_file()  # was rmtree'd
    assert (features / "00112233445566778899").is_file()  # was unlinked
    assert not store.exists()
    assert f"kept {theirs}: it holds thesis.txt" in caplog.text


def _age(paths, seconds: float = 3600) -> None:
    for path in paths:
        info = path.stat()
        os.utime(path, (info.st_atime - seconds, info.st_mtime - seconds))


def test_the_size_cap_evicts_the_least_recently_used_features_and_records_never_a_runs_own(
        tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv(scan_record.CACHE_ENV, str(tmp_path / "scans"))
    monkeypatch.setattr(scan_record, "RACY_S", 0.0)
    monkeypatch.setattr(caches, "RECHECK_SECONDS", 0.0)  # runs seconds apart in one process: every write checks
    first = make_image_folder(tmp_path / "first", n_train=6, n_val=2, size=40, seed=1)
    second = make_image_folder(tmp_path / "second", n_train=6, n_val=2, size=40, seed=2)
    before = _run(first, tmp_path / "run1")
    old = caches.capped_entries()
    assert any(p.suffix == ".safetensors" for _, _, p in old) and any(p.suffix == ".npz" for _, _, p in old)
    _age([p for _, _, p in old])  # the first folder's run was an hour ago
    one_run = sum(size for _, size, _ in old)
    monkeypatch.setenv(caches.CAP_ENV, str(int(1.5 * one_run)))  # room for one run's entries, not two

    _run(second, tmp_path / "run2")
    now = {p for _, _, p in caches.capped_entries()}
    evicted = [p for _, _, p in old if p not in now]
    assert evicted and sum(size for _, size, _ in caches.capped_entries()) <= 1.5 * one_run
    assert all(not p.with_suffix(".json").exists() for p in evicted if p.name.startswith("shard-"))
    assert len(now) > len(old) - len(evicted)  # the second run's own entries all stayed

    assert cli.main(["cache"]) == 0
    assert f"cap {1.5 * one_run / 1e6:.1f} MB ({caches.CAP_ENV})" in capsys.readouterr().out

    with caplog.at_level(logging.WARNING):
        again = _run(first, tmp_path / "run3")  # what was evicted is computed again, with no warning
    assert again["best_val_acc"] == before["best_val_acc"] and "damaged" not in caplog.text


def test_a_run_over_the_cap_keeps_its_own_features_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(caches.CAP_ENV, "1K")
    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2, size=40)
    with caplog.at_level(logging.WARNING):
        _run(data, tmp_path / "run")
    assert caplog.text.count("over their cap of 0.0 MB") == 1  # once, though train and val extract apart
    assert any(p.suffix == ".safetensors" for _, _, p in caches.capped_entries())


def test_features_evicted_under_an_open_store_are_computed_again(tmp_path, caplog):
    images = make_image_folder(tmp_path / "data", n_train=3, n_val=0, size=32)
    paths = sorted(str(p) for p in (images / "train").rglob("*.png"))
    pre = Preprocessing(resize_size=32, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    calls = []

    def extract(x):
        calls.append(len(x))
        return x.float().mean(dim=(2, 3))

    (tmp_path / "cache" / "0123456789abcdef0123").mkdir(parents=True)
    store = FeatureStore(tmp_path / "cache" / "0123456789abcdef0123")
    first, ok, _ = cached_features(extract, store, paths, [View(0)], pre)
    assert all(ok) and sum(calls) == len(paths)
    for path in store.shard_paths(store.index):  # another run's size cap, while this store is open
        caches._evict(path)
    with caplog.at_level(logging.WARNING):
        again, _, stats = cached_features(extract, store, paths, [View(0)], pre)
    assert stats["computed"] == len(paths) and torch.equal(again, first) and not caplog.text

    real_get, failures = store.get, [KeyError("shard gone")]

    def get_once_failing(keys):  # evicted between the check and the read
        if failures:
            raise failures.pop()
        return real_get(keys)

    store.get = get_once_failing
    third, _, _ = cached_features(extract, store, paths, [View(0)], pre)
    assert torch.equal(third, first)


def test_a_cap_that_is_not_a_size_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(caches.CAP_ENV, "lots")
    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2, size=40)
    assert cli.main(["train", str(data), "--out", str(tmp_path / "run")]) == 2
    assert "TRANSFERKIT_CACHE_MAX must be a size such as 500M or 20G, not 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not caches.capped_entries()  # nothing scanned, extracted or written


def test_a_process_checks_a_caches_cap_at_most_every_few_seconds(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    (root / "0123456789abcdef0123").mkdir(parents=True)
    assert caches.evict_to_cap(root)["cache_bytes"] == 0  # the first check of this cache in the process
    assert caches.evict_to_cap(root) == {}  # a search's next extraction, seconds later: not checked again
    monkeypatch.setattr(caches, "RECHECK_SECONDS", 0.0)
    assert "cache_bytes" in caches.evict_to_cap(root)


def test_the_default_cap_of_a_cache_not_made_yet_is_a_share_of_its_disk(tmp_path, monkeypatch):
    """A fresh machine has no feature cache folder yet: its cap comes from the disk it will be made on (it was
    unbounded, and `transferkit cache` printed a cap of 4.6 billion MB)."""
    import shutil

    monkeypatch.delenv(caches.CAP_ENV, raising=False)
    cap = caches.cache_cap(tmp_path / "not" / "made" / "yet", used=0)
    expected = caches.DEFAULT_CAP_FRACTION * shutil.disk_usage(tmp_path).free
    assert abs(cap - expected) < 1 << 24  # within 16 MB: other programs write to the disk meanwhile


def test_an_infinite_or_negative_cap_is_refused_in_one_line(monkeypatch, capsys):
    for text in ("inf", "1e400", "-5G"):  # inf was an OverflowError traceback; -5G a cap that evicted everything
        monkeypatch.setenv(caches.CAP_ENV, text)
        assert cli.main(["cache"]) == 2
        captured = capsys.readouterr()
        assert f"TRANSFERKIT_CACHE_MAX must be a size such as 500M or 20G, not '{text}'" in captured.err
        assert captured.out == ""  # refused before the table, not after it


def test_a_cap_written_with_bytes_in_its_unit_is_read_as_written(monkeypatch):
    """"5GB" and "5 GiB" (as people write sizes) were refused, only "5G" read."""
    for text, size in (("5GB", 5 << 30), ("5 GiB", 5 << 30), ("500 mb", 500 << 20), ("5G", 5 << 30),
                       ("1.5t", int(1.5 * (1 << 40))), ("100B", 100), ("100", 100)):
        monkeypatch.setenv(caches.CAP_ENV, text)
        assert caches.cap_setting() == size, text
    for text in ("GB", "5 G B", "5GiBs", "10%"):
        monkeypatch.setenv(caches.CAP_ENV, text)
        with pytest.raises(UsageError, match="must be a size such as 500M or 20G"):
            caches.cap_setting()


def test_cache_folders_given_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", "~/features")  # quoted in a shell: no ~ expanded there
    assert caches.feature_root() == tmp_path / "features"  # was ./~/features
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", "")
    monkeypatch.setenv("TRANSFERKIT_CACHE", "~/tk")
    assert caches.feature_root() == tmp_path / "tk" / "features"
    assert caches.caches()["weights"].folder == tmp_path / "tk" / "weights"


def test_a_feature_cache_that_is_a_file_costs_speed_not_the_command(tmp_path, monkeypatch):
    from transferkit.engine.features import frozen_onnx_path, store_for

    (tmp_path / "oops").write_text("a file, not a folder")
    monkeypatch.setenv("TRANSFERKIT_FEATURE_CACHE", str(tmp_path / "oops"))
    identity = {"model": "efficientnet_lite0", "preprocessing": {"input_size": 32}}
    assert frozen_onnx_path(identity).name == "frozen.onnx"  # was NotADirectoryError: a traceback in data check
    assert store_for(identity)._in_memory is not None  # the features are kept in memory instead


def test_a_cache_named_twice_is_cleared_and_said_once(capsys):
    assert cli.main(["cache", "clear", "decoded", "decoded"]) == 0
    assert capsys.readouterr().out.count("cleared decoded") == 1
