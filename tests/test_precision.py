"""--precision and the measured engine choice: bf16 only where asked or native, within its stated bound of
fp32 eager; the fastest engine in parity is kept, recorded and reused on the same machine."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_image_folder
from safetensors.torch import load_file

from transferkit.cli import build_parser
from transferkit.config import TrainConfig
from transferkit.engine import precision, runtime
from transferkit.engine.fit import fit
from transferkit.engine.runtime import FrozenEngine, FrozenPart
from transferkit.errors import UsageError
from transferkit.models.adapt import build_model
from transferkit.models.registry import get_spec

CPU = torch.device("cpu")


@pytest.fixture
def lite0_frozen():
    spec = get_spec("efficientnet_lite0")
    model = build_model(spec, 2, pretrained=True).eval().to(memory_format=torch.channels_last)
    return FrozenPart(model, spec.cache_point)


def test_auto_resolves_to_bf16_only_where_the_device_has_it(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve("auto", CPU) == "fp32" and precision.resolve("bf16", CPU) == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve("auto", CPU) == "bf16" and precision.resolve("fp32", CPU) == "fp32"
    assert precision.autocast(CPU, "fp32").__class__.__name__ == "nullcontext"


def test_precision_option_is_validated_and_parsed():
    with pytest.raises(UsageError, match="--precision must be one of auto, fp32, bf16"):
        TrainConfig(data="d", precision="fp16").validate()
    assert build_parser().parse_args(["train", "d", "--precision", "bf16"]).precision == "bf16"
    assert build_parser().parse_args(["predict", "run", "x.png"]).precision == "auto"


def test_bf16_features_are_within_the_stated_bound_of_fp32(lite0_frozen):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 96, 96)
    fp32 = runtime.TorchEngine(lite0_frozen, CPU)(x)
    bf16 = runtime.TorchEngine(lite0_frozen, CPU, precision="bf16")(x)
    diff, ok = runtime.parity(fp32, bf16, precision.BF16_PARITY_RTOL)
    assert ok and diff > 0  # it did run in bf16, and stayed within the bound
    assert not runtime.parity(fp32, bf16)[1]  # the fp32 engines' bound would (rightly) reject it


def _fake_rates(monkeypatch, rates: dict):
    monkeypatch.setattr(FrozenEngine, "_rates", lambda self, engines, x: {n: rates[e.name] for n, e in engines.items()})


def test_the_fastest_engine_in_parity_is_kept_recorded_and_reused(lite0_frozen, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(runtime, "ort_lanes", lambda: 2)
    rates = {"torch": 50.0, "torch-bf16": 180.0, "onnxruntime": 150.0, "onnxruntime-lanes": 120.0}
    _fake_rates(monkeypatch, rates)
    x = torch.randn(4, 3, 64, 64)
    engine = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="auto")
    first = engine(x)
    assert engine.info["engine"] == "torch-bf16" and engine.info["choice"] == "measured"
    assert engine.info["rates"] == rates
    assert set(engine.info["parity_max_abs_diff_by_engine"]) == {"torch-bf16", "onnxruntime", "onnxruntime-lanes"}
    # The first batch is the kept engine's output too: a row's features do not depend on its batch.
    torch.testing.assert_close(first, engine(x))
    saved = json.loads((tmp_path / "engine-choice.json").read_text())
    assert [v["engine"] for v in saved.values()] == ["torch-bf16"]

    monkeypatch.setattr(FrozenEngine, "_rates", lambda *a: pytest.fail("a cached choice is not measured again"))
    again = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="auto")
    again(x)
    assert again.info["engine"] == "torch-bf16" and again.info["choice"] == "cached"
    # Another input size is another decision; here ONNX Runtime's side-by-side lanes are the fastest.
    _fake_rates(monkeypatch, {"torch": 50.0, "torch-bf16": 80.0, "onnxruntime": 150.0, "onnxruntime-lanes": 190.0})
    other = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="auto")
    other(torch.randn(2, 3, 96, 96))
    assert other.info["engine"] == "onnxruntime-lanes" and other.info["choice"] == "measured"
    assert other.active.name == "onnxruntime-lanes"
    # A release that adds a candidate measures again rather than trusting a choice made without it.
    monkeypatch.setattr(runtime, "ort_lanes", lambda: 1)
    fewer = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="auto")
    fewer(torch.randn(2, 3, 96, 96))
    assert fewer.info["engine"] == "onnxruntime" and fewer.info["choice"] == "measured"


def test_a_faster_engine_out_of_parity_is_not_kept(lite0_frozen, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(precision, "BF16_PARITY_RTOL", -1.0)  # no bf16 output can pass
    _fake_rates(monkeypatch, {"torch": 50.0, "torch-bf16": 180.0, "onnxruntime": 40.0, "onnxruntime-lanes": 40.0})
    engine = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="auto")
    engine(torch.randn(2, 3, 64, 64))
    assert engine.info["engine"] == "torch" and "torch-bf16: parity" in engine.info["fallback_reason"]
    assert "torch-bf16" not in engine.info["rates"]


def test_fp32_precision_never_tries_bf16_and_bf16_never_tries_onnxruntime(lite0_frozen, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(runtime, "ort_lanes", lambda: 1)
    torch.manual_seed(0)  # bf16 on unseeded noise fell outside its parity bound about one run in three
    _fake_rates(monkeypatch, {"torch": 50.0, "torch-bf16": 180.0, "onnxruntime": 40.0})
    fp32 = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="fp32")
    fp32(torch.randn(2, 3, 64, 64))
    assert set(fp32.info["rates"]) == {"torch", "onnxruntime"} and fp32.info["engine"] == "torch"
    bf16 = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "other.onnx", precision="bf16")
    bf16(torch.randn(2, 3, 64, 64))
    assert bf16.info["engine"] == "torch-bf16" and "rates" not in bf16.info
    assert not list(tmp_path.glob("other*.onnx"))


def test_bf16_out_of_parity_falls_back_to_the_fastest_fp32_engine(lite0_frozen, tmp_path, monkeypatch):
    """--precision bf16 whose features miss the bound: fp32 features, from the fastest fp32 engine measured
    (not eager torch, the slowest), and the choice is kept for the next run."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(precision, "BF16_PARITY_RTOL", -1.0)  # no bf16 output can pass
    monkeypatch.setattr(runtime, "ort_lanes", lambda: 1)
    _fake_rates(monkeypatch, {"torch": 50.0, "torch-bf16": 180.0, "onnxruntime": 150.0})
    x = torch.randn(2, 3, 64, 64)
    engine = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="bf16")
    out = engine(x)
    assert engine.info["engine"] == "onnxruntime" and engine.info["choice"] == "measured"
    assert set(engine.info["rates"]) == {"torch", "onnxruntime"}
    assert "torch-bf16: parity" in engine.info["fallback_reason"]
    torch.testing.assert_close(out, runtime.TorchEngine(lite0_frozen, CPU)(x), rtol=1e-4, atol=1e-4)
    again = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="bf16")
    again(x)
    assert again.info["engine"] == "onnxruntime" and again.info["choice"] == "cached"


def test_bf16_finetune_keeps_fp32_master_weights_and_records_the_precision(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2, size=32)
    m = fit(TrainConfig(data=str(data), out=str(tmp_path / "run"), model="resnet18", pretrained=False,
                        image_size=32, mode="finetune", epochs=1, batch_size=4, workers=0, precision="bf16"))
    assert m["precision"]["requested"] == "bf16" and m["precision"]["resolved"] == "bf16"
    assert m["source"]["precision"] == "bf16"
    weights = load_file(str(tmp_path / "run" / "best.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["precision"]["resolved"] == "bf16"


def test_a_cached_onnxruntime_choice_skips_the_eager_check_until_its_file_changes(lite0_frozen, tmp_path,
                                                                                   monkeypatch, caplog):
    """The engine-known run: ONNX Runtime over the file its parity was checked on runs without eager torch's
    reference pass; a file changed since (a damaged cache) is exported and checked again."""
    monkeypatch.setattr(runtime, "ort_lanes", lambda: 1)
    _fake_rates(monkeypatch, {"torch": 50.0, "onnxruntime": 150.0})
    x = torch.randn(2, 3, 64, 64)
    expected = runtime.TorchEngine(lite0_frozen, CPU)(x)
    first = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="fp32")
    first(x)
    assert first.info["engine"] == "onnxruntime" and first.info["choice"] == "measured"

    def no_eager(*args):
        pytest.fail("the checked engine's file is unchanged: no eager reference pass")

    with monkeypatch.context() as m:
        m.setattr(runtime.TorchEngine, "__call__", no_eager)
        again = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="fp32")
        out = again(x)
    assert again.info["engine"] == "onnxruntime" and again.info["choice"] == "cached"
    assert again.info["parity_max_abs_diff"] == first.info["parity_max_abs_diff"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    onnx_file = next(tmp_path.glob("frozen-*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight byte flipped, as a failing disk would
    onnx_file.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        healed = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="fp32")
        out = healed(x)
    assert healed.info["engine"] == "onnxruntime" and "parity_max_abs_diff_by_engine" in healed.info  # checked
    assert "changed since its engine was chosen" in caplog.text
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    caplog.clear()
    with monkeypatch.context() as m:  # the new file is the checked one now
        m.setattr(runtime.TorchEngine, "__call__", no_eager)
        FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="fp32")(x)
    assert "changed since" not in caplog.text


def test_candidates_are_timed_in_turns_and_each_keeps_its_fastest_call():
    """A slow spell of a shared box over one call must not decide the engine the machine keeps: the calls go
    in turns (a, b, a, b) and each engine's rate is its fastest."""
    import time

    calls = []

    def engine(name, slow_first):
        def call(x):
            calls.append(name)
            time.sleep(0.3 if slow_first and calls.count(name) == 1 else 0.01)
        return call

    engines = {"a": engine("a", slow_first=True), "b": engine("b", slow_first=False)}
    rates = FrozenEngine._rates(FrozenEngine.__new__(FrozenEngine), engines, torch.zeros(8, 3, 4, 4))
    assert FrozenEngine.TIMED_CALLS >= 2 and calls == ["a", "b"] * FrozenEngine.TIMED_CALLS
    assert rates["a"] > 8 / 0.1 and rates["b"] > 8 / 0.1  # the fast calls' rates (the slow one's: ~27 images/s)


def _checked_after_8_rows(monkeypatch, lite0_frozen, tmp_path, rates: dict):
    """An engine choice measured at these (fake) trial rates, its sustained rate checked after 8 rows; and
    the 4-row batch it was chosen on. ONNX Runtime candidates are fp32, always within parity (a bf16 one may
    not be, on random inputs), so the tests make one of them the fastest."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(runtime, "ort_lanes", lambda: 2)
    monkeypatch.setattr(FrozenEngine, "SUSTAINED_ROWS", 8)
    _fake_rates(monkeypatch, rates)
    return FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="auto"), torch.randn(4, 3, 64, 64)


def _saved_choice(tmp_path) -> dict:
    return next(iter(json.loads((tmp_path / "engine-choice.json").read_text()).values()))


def test_a_kept_engine_far_slower_than_its_trial_hands_the_machine_to_the_next_best(lite0_frozen, tmp_path,
                                                                                   monkeypatch):
    """The choice is kept per machine: one chosen on a bad timing must not slow every later run. Once its
    sustained rate falls far below another candidate's trial rate, the next runs use that one."""
    import time

    engine, x = _checked_after_8_rows(monkeypatch, lite0_frozen, tmp_path, {"torch": 50.0, "torch-bf16": 10.0,
                                                                           "onnxruntime": 150.0,
                                                                           "onnxruntime-lanes": 180.0})
    engine(x)
    assert engine.info["engine"] == "onnxruntime-lanes"
    kept = engine.active

    def slow(batch):  # 4 rows in 0.1 s: 40 images/s, far below onnxruntime's 150 on the trial
        time.sleep(0.1)
        return kept(batch)

    engine.active = slow
    for _ in range(3):
        engine(x)
    assert engine.info["sustained_images_per_s"] < 50
    saved = _saved_choice(tmp_path)
    assert saved["engine"] == "onnxruntime" and saved["demoted"] == "onnxruntime-lanes"
    assert saved["rates"]["onnxruntime-lanes"] == engine.info["sustained_images_per_s"]

    again = FrozenEngine(lite0_frozen, CPU, "auto", tmp_path / "frozen.onnx", precision="auto")
    again(x)
    assert again.info["engine"] == "onnxruntime" and again.info["choice"] == "cached"


def test_a_kept_engine_as_fast_as_its_trial_stays_chosen(lite0_frozen, tmp_path, monkeypatch):
    engine, x = _checked_after_8_rows(monkeypatch, lite0_frozen, tmp_path, {"torch": 1.0, "torch-bf16": 0.5,
                                                                           "onnxruntime": 2.0, "onnxruntime-lanes": 3.0})
    for _ in range(4):
        engine(x)
    assert engine.info["engine"] == "onnxruntime-lanes" and engine.info["sustained_images_per_s"] > 2.0
    saved = _saved_choice(tmp_path)
    assert saved["engine"] == "onnxruntime-lanes" and "demoted" not in saved


def test_predict_auto_precision_is_the_one_the_run_scored_its_val_images_in(tmp_path, monkeypatch):
    """`predict --precision auto` reproduces the run's reported accuracy: bf16 only where the run trained and
    scored in bf16 (and the device has it), fp32 where its frozen part ran on an fp32 engine or the run
    folder does not say."""
    from transferkit.predict import Predictor

    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2, size=32)
    run = tmp_path / "run"
    fit(TrainConfig(data=str(data), out=str(run), model="resnet18", pretrained=False, image_size=32,
                    mode="finetune", epochs=1, batch_size=4, workers=0, precision="bf16"))
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert Predictor(run).precision == "bf16"
    assert Predictor(run, precision="fp32").precision == "fp32"
    metrics_file = run / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["source"]["engine"] = "onnxruntime-lanes"  # features made in fp32: bf16 would not reproduce them
    metrics_file.write_text(json.dumps(metrics))
    assert Predictor(run).precision == "fp32"
    assert Predictor(run, precision="bf16").precision == "bf16"  # asked for by name: as asked
    metrics["source"]["engine"] = "torch-bf16"
    metrics_file.write_text(json.dumps(metrics))
    assert Predictor(run).precision == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert Predictor(run).precision == "fp32"  # a device without native bf16
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    metrics_file.unlink()  # an unfinished or copied run: nothing says how its numbers were computed
    assert Predictor(run).precision == "fp32"


@pytest.mark.parametrize("metrics", [{"precision": "bf16"}, {"precision": {"resolved": "bf16"}, "source": "x"}, [1]])
def test_a_hand_edited_metrics_file_predicts_in_fp32(tmp_path, metrics):
    """metrics.json sections written otherwise than the run writes them (a hand-edited `"precision": "bf16"`)
    were an AttributeError traceback in every predict; a run folder that does not say means fp32."""
    from transferkit.predict import run_precision

    (tmp_path / "best.safetensors").write_bytes(b"")  # only its place is read here
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    expected = precision.resolve("auto", torch.device("cpu")) if isinstance(metrics, dict) and \
        metrics.get("source") == "x" else "fp32"
    assert run_precision(tmp_path, torch.device("cpu")) == expected
