"""Linear probe (CLIP protocol) and few-shot probe, checked against scikit-learn run directly."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from florence.adapters import linear_probe as lp


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Tiny fits: one BLAS / OpenMP thread (spinning threads on a busy shared machine cost far more than they give)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def digits_splits():
    """Real features: scikit-learn's 8x8 digits (64 pixel features), 300 train / 150 val / 400 test."""
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    tr, va, te = order[:300], order[300:450], order[450:850]
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])


def test_parametric_search_reaches_the_optimum_on_the_97_point_grid():
    grid = np.log10(lp.log_grid())
    assert len(grid) == 97 and grid[0] == pytest.approx(-6) and grid[-1] == pytest.approx(6)
    for target in (1.375, -5.875, 6.0, -0.125):
        best, scores = lp.parametric_search(lambda x: -(x - target) ** 2)
        assert best == pytest.approx(target)
        assert len(scores) <= 7 + 2 * 4
        assert all(np.isclose(grid, s).any() for s in scores)  # every visited point lies on the grid
    # ties go to the smaller C
    best, _ = lp.parametric_search(lambda x: 1.0)
    assert best == -6.0


def test_linear_probe_equals_sklearn_run_directly(digits_splits):
    train, val, test = digits_splits
    result = lp.linear_probe(train, val, test, "top1", num_classes=10)
    # the sweep's choice is the best of the visited C values, each scored by sklearn directly
    direct = {}
    for c, _ in result.sweep:
        clf = LogisticRegression(C=c, max_iter=1000).fit(*train)
        direct[c] = (clf.predict(val[0]) == val[1]).mean()
    best_score = max(direct.values())
    assert direct[result.C] == pytest.approx(best_score)
    assert result.C == min(c for c, s in direct.items() if s == best_score)
    for c, s in result.sweep:
        assert s == pytest.approx(direct[c])
    # refit on train + val with the chosen C, evaluate on test
    clf = LogisticRegression(C=result.C, max_iter=1000).fit(np.concatenate([train[0], val[0]]),
                                                            np.concatenate([train[1], val[1]]))
    assert result.metrics["top1"] == pytest.approx((clf.predict(test[0]) == test[1]).mean())
    assert result.metrics["mean_per_class"] == pytest.approx(balanced_accuracy_score(test[1], clf.predict(test[0])))
    np.testing.assert_allclose(result.test_scores, clf.predict_proba(test[0]), rtol=1e-6, atol=1e-9)
    assert result.metrics["top1"] > 0.85  # digits are linearly separable enough


def test_refit_on_train_only(digits_splits):
    train, val, test = digits_splits
    result = lp.linear_probe(train, val, test, "mean_per_class", num_classes=10, refit="train")
    clf = LogisticRegression(C=result.C, max_iter=1000).fit(*train)
    assert result.metrics["mean_per_class"] == pytest.approx(balanced_accuracy_score(test[1], clf.predict(test[0])))


def test_multilabel_probe_uses_one_vs_rest_and_11_point_map():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3))
    x = rng.normal(size=(240, 8))
    y = (x @ w + 0.3 * rng.normal(size=(240, 3)) > 0.5).astype(int)
    y[0, 1] = -1  # a "difficult" entry
    result = lp.linear_probe((x[:120], y[:120]), (x[120:180], y[120:180]), (x[180:], y[180:]), "map_11point", 3)
    assert set(result.metrics) == {"map_11point"}
    assert result.test_scores.shape == (60, 3)
    assert 0.7 < result.metrics["map_11point"] <= 1.0


def test_sample_few_shot_is_per_class_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    a = lp.sample_few_shot(labels, 3, seed=0)
    assert np.array_equal(a, lp.sample_few_shot(labels, 3, seed=0))
    assert not np.array_equal(a, lp.sample_few_shot(labels, 3, seed=1))
    assert np.bincount(labels[a]).tolist() == [3, 3, 3, 3]
    b = lp.sample_few_shot(labels, 5, seed=0, exclude=a)
    assert not set(a) & set(b) and np.bincount(labels[b]).tolist() == [5, 5, 5, 5]
    assert len(lp.sample_few_shot(labels, 50, seed=0)) == 40  # a class with fewer shots gives all it has


def test_few_shot_probe_mean_and_std_over_seeds(digits_splits):
    train, _, test = digits_splits
    res = lp.few_shot_probe(train, test, k=5, seeds=[0, 1, 2], metric="top1", num_classes=10)
    per_seed = [r.metrics["top1"] for r in res.per_seed]
    assert res.mean["top1"] == pytest.approx(np.mean(per_seed))
    assert res.std["top1"] == pytest.approx(np.std(per_seed))
    # each seed's classifier is sklearn fitted on exactly 5 shots per class with the chosen C
    shots = lp.sample_few_shot(train[1], 5, seed=0)
    clf = LogisticRegression(C=res.per_seed[0].C, max_iter=1000).fit(train[0][shots], train[1][shots])
    assert per_seed[0] == pytest.approx((clf.predict(test[0]) == test[1]).mean())
    assert 0.5 < res.mean["top1"] < 1.0


def test_unknown_metric_is_refused(digits_splits):
    train, val, test = digits_splits
    with pytest.raises(ValueError, match="unknown probe metric"):
        lp.linear_probe(train, val, test, "accuracy", 10)
