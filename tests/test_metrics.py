import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, log_loss, precision_recall_fscore_support, roc_auc_score

from transferkit.results.metrics import (
    accuracy_interval,
    classification_metrics,
    evaluation_summary,
    expected_calibration_error,
    format_metrics_table,
)

CLASSES = ["cat", "dog", "fox"]


def one_hot_probs(preds, n_classes, confidence=0.8):
    """Rows that put `confidence` on the predicted class and share the rest evenly."""
    probs = np.full((len(preds), n_classes), (1 - confidence) / (n_classes - 1))
    probs[np.arange(len(preds)), preds] = confidence
    return probs


def test_known_predictions_match_hand_computed_and_sklearn():
    y = np.array([0, 1, 2, 2])
    preds = np.array([0, 1, 1, 2])
    probs = one_hot_probs(preds, 3)
    m = classification_metrics(y, probs, CLASSES)

    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    p, r, f, s = precision_recall_fscore_support(y, preds, labels=[0, 1, 2], zero_division=0)
    for i, row in enumerate(m["per_class"]):
        assert row["class"] == CLASSES[i]
        assert row["precision"] == pytest.approx(p[i])
        assert row["recall"] == pytest.approx(r[i])
        assert row["f1"] == pytest.approx(f[i])
        assert row["support"] == s[i]
    assert m["per_class"][1]["precision"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(f1_score(y, preds, average="macro"))
    assert m["log_loss"] == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert "top_losses" not in m
    json.dumps(m)  # must be JSON-serializable as is


def test_ece_perfectly_calibrated_is_zero():
    # 10 samples at confidence 0.8 with 8 right, 5 at 0.6 with 3 right: calibrated per bin.
    y = np.zeros(15, dtype=int)
    preds = np.array([0] * 8 + [1] * 2 + [0] * 3 + [1] * 2)
    conf = np.array([0.8] * 10 + [0.6] * 5)
    probs = np.zeros((15, 2))
    probs[np.arange(15), preds] = conf
    probs[np.arange(15), 1 - preds] = 1 - conf
    assert expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)


def test_ece_known_miscalibration():
    y = np.array([0, 1, 0, 1])
    certain = np.array([[1.0, 0.0]] * 4)  # always 100 % sure of class 0, right half the time
    assert expected_calibration_error(y, certain) == pytest.approx(0.5)
    overconfident = one_hot_probs(np.zeros(4, dtype=int), 2, confidence=0.9)
    assert expected_calibration_error(np.zeros(4, dtype=int), overconfident) == pytest.approx(0.1)
    m = classification_metrics(y, certain, ["a", "b"])
    assert m["ece"] == pytest.approx(0.5)
    assert np.isfinite(m["log_loss"])  # a certain miss is clipped, not inf


def test_absent_class_does_not_crash():
    y = np.array([0, 0, 1, 1])  # "fox" never occurs
    preds = np.array([0, 2, 1, 1])  # but is predicted once
    m = classification_metrics(y, one_hot_probs(preds, 3), CLASSES)
    assert m["per_class"][2] == {"class": "fox", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion_matrix"] == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]
    assert m["balanced_accuracy"] == pytest.approx(0.75)  # mean recall over present classes
    assert m["roc_auc"] is None
    json.dumps(m)


def test_two_class_roc_auc_uses_positive_column():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs, ["ok", "defect"])
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p1))
    assert classification_metrics([1, 1], probs[2:], ["ok", "defect"])["roc_auc"] is None


def test_float32_rows_not_summing_exactly_to_one_are_accepted():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4)).astype(np.float32)
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32) * 1.0001
    y = np.arange(50) % 4
    m = classification_metrics(y, probs, list("abcd"))
    assert 0.0 <= m["roc_auc"] <= 1.0


def test_top_losses_ordered_worst_first():
    y = np.array([0, 1, 1, 0, 1])
    p1 = np.array([0.3, 0.05, 0.9, 0.99, 0.6])  # losses: 0.36, 3.0, 0.11, 4.6, 0.51
    probs = np.stack([1 - p1, p1], axis=1)
    paths = [f"img{i}.png" for i in range(5)]
    m = classification_metrics(y, probs, ["ok", "defect"], paths=paths, top_k_losses=3)
    top = m["top_losses"]
    assert [t["path"] for t in top] == ["img3.png", "img1.png", "img4.png"]
    losses = [t["loss"] for t in top]
    assert losses == sorted(losses, reverse=True)
    assert top[0]["true"] == "ok" and top[0]["predicted"] == "defect"
    assert top[0]["probability_of_predicted"] == pytest.approx(0.99)
    assert top[0]["probability_of_true"] == pytest.approx(0.01)
    assert top[0]["loss"] == pytest.approx(-np.log(0.01))
    json.dumps(m)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        classification_metrics([0, 1], np.ones((3, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError):
        classification_metrics([0, 1], np.ones((2, 2)) / 2, ["a", "b"], paths=["only-one"])


def test_evaluation_summary_and_table():
    y = np.array([0, 1, 2, 2])
    summary = evaluation_summary(y, one_hot_probs(np.array([0, 1, 1, 2]), 3), CLASSES, split="val")
    assert summary["split"] == "val" and summary["accuracy"] == pytest.approx(0.75)
    table = format_metrics_table(summary)
    assert "accuracy" in table and "0.7500" in table
    interval = summary["accuracy_interval"]  # 3 of 4 right: wide
    assert interval["images"] == 4 and interval["low"] < 0.75 < interval["high"]
    assert f"95% interval       {interval['low']:.4f}-{interval['high']:.4f}" in table
    for name in CLASSES:
        assert name in table
    assert format_metrics_table({"n": 3}).count("n/a") >= 5  # partial dicts still print


def test_a_long_class_name_does_not_widen_every_row_of_the_table():
    """A 210-character class name padded each row of `transferkit evaluate`'s table to 250 columns."""
    names = ["photo_" + "L" * 200 + "_one", "photo_" + "L" * 200 + "_two", "cat"]
    y = np.array([0, 1, 2])
    table = format_metrics_table(evaluation_summary(y, one_hot_probs(y, 3), names, split="val"))
    assert max(len(line) for line in table.splitlines()) <= 80
    assert "photo_LLLLLLLLLLLLL…LLLLLLLLLLLLLLLL_one" in table and "…LLLLLLLLLLLLLLLL_two" in table


def test_a_split_without_every_class_scores_quietly():
    """An inner hold-out (or a small val split) may lack a class the model predicts: the epoch's scores are
    computed without sklearn's UserWarning, which printed once per epoch in users' searches."""
    import warnings

    from transferkit.engine.fit import _summarize

    p = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _summarize(p, np.array([0, 1, 1]))
    assert out["accuracy"] == 2 / 3 and out["balanced_accuracy"] == 0.75


def test_accuracy_interval_is_the_wilson_score_interval():
    """561 of 656 right (ELPV's val split at 0.855): the closed-form Wilson interval, which contains the
    accuracy, narrows as the images grow, reaches 1.0 only for a perfect score and is absent without images."""
    def wilson(k, n, z=1.959963984540054):
        p = k / n
        centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)

    got = accuracy_interval(561 / 656, 656)
    assert got["images"] == 656 and got["confidence"] == 0.95
    assert (got["low"], got["high"]) == pytest.approx(wilson(561, 656), abs=1e-9)
    assert got["low"] < 561 / 656 < got["high"]
    small = accuracy_interval(130 / 153, 153)
    assert small["high"] - small["low"] > got["high"] - got["low"]
    assert accuracy_interval(1.0, 50)["high"] == pytest.approx(1.0) and accuracy_interval(1.0, 50)["low"] < 1
    assert accuracy_interval(0.5, 0) is None and accuracy_interval(None, 10) is None
