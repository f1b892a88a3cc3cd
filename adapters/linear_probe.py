"""Linear probe, CLIP protocol (SPEC §8.2), and its few-shot variant. Pure functions over feature arrays.

Protocol ``PROTOCOL_ID``: frozen pooled image features taken before the projection; scikit-learn's L-BFGS
``LogisticRegression`` (L2, ``max_iter=1000``); the inverse regularisation ``C = 1/lambda`` chosen on a validation
split by CLIP's parametric sweep over 1e-6..1e6 (start at the 7 points 1e-6, 1e-4, ..., 1e6, then repeatedly halve the
step around the best value until the step is 1/8 decade, i.e. a 97-point log grid, 15 fits); refit on train + val with
the chosen ``C`` (as CLIP does; ``refit="train"`` keeps the validation split out); report on the test split.

Multi-label targets (VOC2007, ``(N, C)`` arrays of 1/0/-1) use one binary L-BFGS logistic regression per class
(one-vs-rest), scored by 11-point mAP; difficult (-1) samples count as negatives for fitting.

This is not CLIP_benchmark's probe (a torch linear layer trained with AdamW); results name ``PROTOCOL_ID`` so the two
are never mixed.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from threadpoolctl import threadpool_limits

from florence.adapters.zeroshot import score_metrics

PROTOCOL_ID = "openai-clip-lbfgs-v1"
FEW_SHOT_PROTOCOL_ID = "florence-fewshot-lbfgs-v1"
METRICS = ("top1", "mean_per_class", "map_11point")
LOG10_C_RANGE = (-6.0, 6.0)
FINEST_STEP = 1.0 / 8.0  # decades


@dataclass
class LinearProbeResult:
    """Outcome of one probe.

    Attributes:
        C: the chosen inverse regularisation strength (sklearn ``C``; lambda = 1/C).
        metrics: test metrics (``top1``, ``top5``, ``mean_per_class`` or ``map_11point``), fractions in [0, 1].
        test_scores: ``(N_test, C_classes)`` class probabilities of the refitted classifier.
        sweep: ``[(C, validation score), ...]`` in evaluation order.
        converged: False if any fit stopped at ``max_iter``.
    """

    C: float
    metrics: dict[str, float]
    test_scores: np.ndarray
    sweep: list[tuple[float, float]] = field(default_factory=list)
    converged: bool = True


def fit_logistic_regression(features: np.ndarray, targets: np.ndarray, C: float, max_iter: int = 1000,
                            threads: int | None = None):
    """L-BFGS logistic regression: multinomial for ``(N,)`` labels, one-vs-rest binary for ``(N, C)`` targets.

    ``threads`` caps the BLAS / OpenMP threads of the fit (``threadpoolctl``); None keeps the libraries' default.
    On a machine shared with other busy processes, 1 thread is several times faster than spinning threads.

    Returns ``(classifier, converged)``.
    """
    base = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs")
    limits = threadpool_limits(limits=threads) if threads is not None else nullcontext()
    with limits, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if targets.ndim == 2:
            classifier = OneVsRestClassifier(base).fit(features, (targets == 1).astype(np.int64))
        else:
            classifier = base.fit(features, targets)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return classifier, converged


evaluate_scores = score_metrics  # all metrics that apply: top-1/5 + mean per class, or 11-point mAP for multi-label


def _class_scores(classifier, features: np.ndarray, num_classes: int) -> np.ndarray:
    """``(N, num_classes)`` probabilities, with zero columns for classes absent from the fit data."""
    proba = classifier.predict_proba(features)
    if proba.shape[1] == num_classes:
        return proba
    full = np.zeros((features.shape[0], num_classes), dtype=proba.dtype)
    full[:, classifier.classes_] = proba
    return full


def parametric_search(evaluate: Callable[[float], float]) -> tuple[float, dict[float, float]]:
    """CLIP's coarse-then-refined search over ``log10 C`` in [-6, 6].

    Evaluates the 7 points -6, -4, ..., 6, then halves the step around the best point seen so far (step 1, 1/2, 1/4,
    1/8 decade), evaluating the two neighbours at each step. Every point lies on the 97-point grid of ``log_grid``.
    Ties go to the smaller ``C`` (stronger regularisation).

    Args:
        evaluate: ``log10 C -> validation score`` (higher is better).

    Returns:
        ``(best log10 C, {log10 C: score} in evaluation order)``.
    """
    scores: dict[float, float] = {}

    def visit(log_c: float) -> None:
        log_c = round(log_c, 6)
        if log_c not in scores:
            scores[log_c] = float(evaluate(log_c))

    def best() -> float:
        return max(sorted(scores), key=lambda lc: scores[lc])  # max() keeps the first (smallest C) of equals

    low, high = LOG10_C_RANGE
    for log_c in np.arange(low, high + 1e-9, 2.0):
        visit(float(log_c))
    step = 2.0
    while step > FINEST_STEP:
        step /= 2.0
        center = best()
        for log_c in (center - step, center + step):
            if low - 1e-9 <= log_c <= high + 1e-9:
                visit(log_c)
    return best(), scores


def sweep_regularization(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    metric: str,
    num_classes: int,
    max_iter: int = 1000,
    threads: int | None = None,
) -> tuple[float, list[tuple[float, float]], bool, tuple[LogisticRegression | OneVsRestClassifier, bool]]:
    """``parametric_search`` with L-BFGS fits on train scored by ``metric`` on val.

    Returns ``(best C, [(C, validation score), ...] in evaluation order, all fits converged, (the classifier fitted
    on train with the best C, its converged flag))``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown probe metric {metric!r}; expected one of {METRICS}")
    fits: dict[float, tuple[LogisticRegression | OneVsRestClassifier, bool]] = {}

    def evaluate(log_c: float) -> float:
        fits[log_c] = fit_logistic_regression(train_x, train_y, 10.0**log_c, max_iter, threads)
        return evaluate_scores(_class_scores(fits[log_c][0], val_x, num_classes), val_y)[metric]

    best, scores = parametric_search(evaluate)
    converged = all(ok for _, ok in fits.values())
    return 10.0**best, [(10.0**lc, s) for lc, s in scores.items()], converged, fits[best]


def linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    metric: str,
    num_classes: int,
    refit: str = "train+val",
    max_iter: int = 1000,
    threads: int | None = None,
) -> LinearProbeResult:
    """Sweep ``C`` on (train -> val), refit with it, and evaluate on test.

    Args:
        train, val, test: ``(features (N, F), targets (N,) labels or (N, C) multi-label)`` pairs.
        metric: the selection metric, one of ``METRICS`` (the dataset's reported metric).
        num_classes: number of classes (score columns).
        refit: ``"train+val"`` (CLIP) or ``"train"``.
        threads: BLAS / OpenMP thread cap for the fits (None: library default).
    """
    if refit not in ("train+val", "train"):
        raise ValueError(f"refit must be 'train+val' or 'train', got {refit!r}")
    best_c, history, converged, (classifier, ok) = sweep_regularization(
        *train, *val, metric, num_classes, max_iter, threads
    )
    if refit == "train+val":  # refit = "train" reuses the sweep's fit with the chosen C (same data, same C)
        fit_x, fit_y = np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])
        classifier, ok = fit_logistic_regression(fit_x, fit_y, best_c, max_iter, threads)
    test_scores = _class_scores(classifier, test[0], num_classes)
    return LinearProbeResult(
        C=best_c,
        metrics=evaluate_scores(test_scores, test[1]),
        test_scores=test_scores,
        sweep=history,
        converged=converged and ok,
    )


def sample_few_shot(labels: np.ndarray, k: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``k`` samples per class (all of a class if it has fewer), drawn with ``seed``; sorted.

    ``exclude``: indices that must not be drawn.
    """
    rng = np.random.default_rng(seed)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[exclude] = False
    picked = []
    for c in np.unique(labels):
        pool = np.flatnonzero((labels == c) & allowed)
        picked.append(rng.choice(pool, size=min(k, len(pool)), replace=False))
    return np.sort(np.concatenate(picked))


@dataclass
class FewShotResult:
    """Few-shot probe over seeds: per-seed results and mean / std (population std) of each metric."""

    k: int
    seeds: list[int]
    per_seed: list[LinearProbeResult]
    mean: dict[str, float]
    std: dict[str, float]


def few_shot_probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    k: int,
    seeds: list[int],
    metric: str,
    num_classes: int,
    max_iter: int = 1000,
    threads: int | None = None,
) -> FewShotResult:
    """k-shot linear probe (``FEW_SHOT_PROTOCOL_ID``), once per seed.

    Per seed: draw k training shots per class from ``train``, and k further shots per class as the validation split
    of the ``C`` sweep (disjoint from the training shots); refit on the k training shots only (so the classifier sees
    exactly k labelled examples per class); evaluate on the whole test split.
    """
    features, labels = train
    if labels.ndim != 1:
        raise ValueError("few-shot probing needs single-label targets")
    runs = []
    for seed in seeds:
        shots = sample_few_shot(labels, k, seed)
        val = sample_few_shot(labels, k, seed + 1_000_003, exclude=shots)
        run = linear_probe(
            (features[shots], labels[shots]), (features[val], labels[val]), test, metric, num_classes,
            refit="train", max_iter=max_iter, threads=threads,
        )
        runs.append(run)
    names = runs[0].metrics.keys()
    mean = {n: float(np.mean([r.metrics[n] for r in runs])) for n in names}
    std = {n: float(np.std([r.metrics[n] for r in runs])) for n in names}
    return FewShotResult(k=k, seeds=list(seeds), per_seed=runs, mean=mean, std=std)


def log_grid() -> np.ndarray:
    """The 97 ``C`` values the sweep can reach (1e-6..1e6, 8 per decade); for documentation and tests."""
    low, high = LOG10_C_RANGE
    return 10.0 ** np.linspace(low, high, int(round((high - low) / FINEST_STEP)) + 1)

