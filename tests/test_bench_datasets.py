"""benchmarks/datasets.py: the packaged datasets land as stratified, reproducible train/val folders."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "datasets.py"
_spec = importlib.util.spec_from_file_location("bench_datasets", _PATH)
bench_datasets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_datasets)


def _counts(root: Path) -> dict:
    return {split: {c.name: len(list(c.glob("*.png"))) for c in sorted((root / split).iterdir())}
            for split in ("train", "val")}


def test_digits_capped_stratified_and_idempotent(tmp_path):
    out = tmp_path / "digits"
    summary = bench_datasets.materialize_digits(out, seed=0, max_per_class=12)
    counts = _counts(out)
    assert counts == summary["counts"]
    assert sorted(counts["train"]) == [str(d) for d in range(10)]
    for digit in counts["train"]:
        assert counts["train"][digit] + counts["val"][digit] == 12
        assert counts["val"][digit] >= 1
    again = bench_datasets.materialize_digits(out, seed=0, max_per_class=12)
    assert again["created"] is False and again["counts"] == summary["counts"]
    with pytest.raises(ValueError, match="does not hold digits"):
        bench_datasets.materialize_digits(out, seed=1, max_per_class=12)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    names = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        bench_datasets.materialize_digits(tmp_path / label, seed=seed, max_per_class=6)
        names[label] = sorted(p.name for p in (tmp_path / label / "val").rglob("*.png"))
    assert names["a"] == names["b"]
    assert names["a"] != names["c"]


def test_texture_val_tiles_come_from_other_rows_than_train(tmp_path):
    pytest.importorskip("skimage")
    summary = bench_datasets.materialize_textures(tmp_path / "t")
    assert summary["counts"]["val"] == {"brick": 16, "grass": 16, "gravel": 16}
    def tile_rows(split):  # files are named textures_<index>.png, 64 tiles (8 rows of 8) a photo
        return {int(p.stem.split("_")[1]) % 64 // 8 for p in (tmp_path / "t" / split).rglob("*.png")}

    assert tile_rows("train") == set(range(6))
    assert tile_rows("val") == {6, 7}


def test_cli_refuses_a_foreign_folder_with_one_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "other.txt").write_text("not a dataset")
    assert bench_datasets.main(["digits", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
