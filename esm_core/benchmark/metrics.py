"""Scores of the few-shot benchmark (docs/METHOD.md section 7): accuracy and macro-F1 with bootstrap intervals.

Predictions outside the task's labels (None: an unparsed generation) count as wrong and are
counted as unparsed; intervals are seeded percentile bootstraps over the rows. The "majority of the
k examples" reference answers each prompt with the majority label of its chosen examples.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np


# ------------------------------------------------------------------------------------ metrics
@dataclass
class Score:
    """Accuracy and macro-F1 with bootstrap 95 % intervals on n rows."""

    acc: float
    acc_lo: float
    acc_hi: float
    f1: float
    f1_lo: float
    f1_hi: float
    n: int
    n_unparsed: int = 0


def _encode(y: Sequence, labels: Sequence[str]) -> np.ndarray:
    pos = {l: i for i, l in enumerate(labels)}
    return np.array([pos.get(v, -1) if v is not None else -1 for v in y], dtype=np.int64)


def _f1_rows(t: np.ndarray, p: np.ndarray, n_labels: int) -> np.ndarray:
    """Macro-F1 per row of [R, n] label-index arrays (prediction -1 = no label; F1 of an absent class = 0)."""
    f1 = np.zeros(t.shape[0])
    for c in range(n_labels):
        tp = ((t == c) & (p == c)).sum(1)
        fp = ((t != c) & (p == c)).sum(1)
        fn = ((t == c) & (p != c)).sum(1)
        den = 2 * tp + fp + fn
        f1 += np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
    return f1 / n_labels


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    t, p = list(y_true), list(y_pred)
    return float(np.mean([a == b for a, b in zip(t, p)])) if t else float("nan")


def macro_f1(y_true: Sequence, y_pred: Sequence, labels: Sequence[str]) -> float:
    """Macro-F1 over ``labels`` (predictions outside them, e.g. None = unparsed, are wrong for every class);
    equals sklearn.metrics.f1_score(average='macro', labels=labels, zero_division=0)."""
    t, p = _encode(y_true, labels), _encode(y_pred, labels)
    return float(_f1_rows(t[None], p[None], len(labels))[0]) if len(t) else float("nan")


def bootstrap_scores(y_true: Sequence, y_pred: Sequence, labels: Sequence[str], *, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> Score:
    """Accuracy and macro-F1 with percentile bootstrap intervals (rows resampled with replacement, seeded)."""
    t, p = _encode(y_true, labels), _encode(y_pred, labels)
    n = len(t)
    n_unparsed = int(sum(v is None for v in y_pred))
    if n == 0:
        nan = float("nan")
        return Score(nan, nan, nan, nan, nan, nan, 0, n_unparsed)
    acc = float((t == p).mean())
    f1 = float(_f1_rows(t[None], p[None], len(labels))[0])
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        accs, f1s = [], []
        for s in range(0, n_boot, 256):  # chunks keep memory at 256 x n
            idx = rng.integers(0, n, size=(min(256, n_boot - s), n))
            tb, pb = t[idx], p[idx]
            accs.append((tb == pb).mean(1))
            f1s.append(_f1_rows(tb, pb, len(labels)))
        a, f = np.concatenate(accs), np.concatenate(f1s)
        q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
        alo, ahi = np.percentile(a, q)
        flo, fhi = np.percentile(f, q)
    else:
        alo = ahi = acc
        flo = fhi = f1
    return Score(acc, float(alo), float(ahi), f1, float(flo), float(fhi), n, n_unparsed)


def retrieval_majority(example_labels: Sequence[str], fallback: str) -> str:
    """Majority label of the chosen examples; a tie (or no examples) gives ``fallback``."""
    c = Counter(example_labels).most_common()
    if not c or (len(c) > 1 and c[0][1] == c[1][1]):
        return fallback
    return c[0][0]
