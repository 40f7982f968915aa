"""`transferkit cache`: what the caches hold after a run, and `clear` removing transferkit's entries only."""

from transferkit import cli
from transferkit.config import TrainConfig
from transferkit.data import scan_record
from transferkit.search import train
from conftest import make_image_folder


def _run(data, out):
    return train(TrainConfig(data=str(data), out=str(out), recipe="tutorial", mode="feature-extract", epochs=1,
                             image_size=64), given={"image_size"})


def _sizes(capsys) -> dict[str, tuple[float, int]]:
    assert cli.main(["cache"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:] if line and not line.startswith(" ")]
    return {row[0]: (float(row[1]), int(row[3])) for row in rows}


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
