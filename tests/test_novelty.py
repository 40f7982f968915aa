"""Novelty reference: sampling the training embeddings before pooling keeps the numbers and the memory low."""

import numpy as np

from transferkit import novelty


def test_reference_is_a_seeded_sample_of_pooled_training_embeddings(monkeypatch):
    monkeypatch.setattr(novelty, "MAX_REFERENCE", 50)
    rng = np.random.default_rng(1)
    train = rng.random((200, 16, 2, 2), dtype=np.float32)
    val = rng.random((40, 16, 2, 2), dtype=np.float32)
    ref = novelty.NoveltyReference.calibrate(train, val, seed=3)
    keep = np.sort(np.random.default_rng(3).choice(200, 50, replace=False))
    assert np.allclose(ref.reference, novelty.pool(train)[keep])
    assert ref.info["reference_images"] == 50
    # A training image is at distance ~0 from itself; a foreign pattern scores above the threshold.
    assert ref.score(train[keep[:1]])[0] < ref.threshold
    assert ref.score(-np.ones((1, 16, 2, 2), dtype=np.float32))[0] > ref.threshold
