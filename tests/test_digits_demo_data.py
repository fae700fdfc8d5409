"""bench/digits_demo.py trains a model, so CI never runs it; this keeps it importable and its data right.

Importing it catches syntax and import errors (scikit-learn is imported lazily, so CI does
not need the bench extra); with scikit-learn installed, the data and the job layout are
checked too (the classifier's fit takes seconds, so it is left to the bench).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def demo():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("digits_demo")
    finally:
        sys.path.remove(str(BENCH))


def test_random_pairs_ask_two_different_digits(demo):
    pairs = demo.random_pairs(500, seed=3)
    assert pairs.shape == (500, 2)
    assert bool((pairs[:, 0] != pairs[:, 1]).all())
    assert set(pairs.flatten().tolist()) == set(range(10))


def test_split_is_scaled_cells(demo):
    pytest.importorskip("sklearn", reason="the bench extra (pip install -e '.[bench]') is not installed")
    train_x, train_y, test_x, test_y = demo.load_split(seed=0)
    assert train_x.shape[1:] == (1, demo.CELL, demo.CELL) and len(train_x) + len(test_x) == 1797
    assert float(train_x.min()) == pytest.approx(-1.0, abs=0.05) and float(train_x.max()) == pytest.approx(1.0, abs=0.05)
    assert set(test_y.tolist()) == set(range(10))
    # The classifier's view of a cell: the data set's 8x8 again, in [-1, 1].
    features = demo.classifier_features(test_x[:4])
    assert features.shape == (4, 64) and float(abs(features).max()) <= 1.0
