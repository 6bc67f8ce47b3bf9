"""AUC and logloss, overall and per domain (checked against scikit-learn in the tests)."""
from __future__ import annotations

import math

import numpy as np


def auc(label, score) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula; tied scores share their mean rank.
    NaN when the labels hold one class only."""
    label, score = np.asarray(label, dtype=np.float64), np.asarray(score, dtype=np.float64)
    positives = int((label == 1).sum())
    negatives = len(label) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each distinct score
    rank_sum = mean_rank[inverse][label == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def logloss(label, prob) -> float:
    """Mean binary cross-entropy; probabilities clipped to [eps, 1 - eps] with eps = float64 machine epsilon."""
    label = np.asarray(label, dtype=np.float64)
    if len(label) == 0:
        return math.nan
    eps = np.finfo(np.float64).eps
    prob = np.clip(np.asarray(prob, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(label * np.log(prob) + (1 - label) * np.log1p(-prob)))


def domain_metrics(label, prob, domain, num_domains: int, min_rows: int = 0) -> dict:
    """``{"auc", "logloss", "rows", "auc_d0", "logloss_d0", "rows_d0", ...}`` (flat, for tables and CSV).

    A domain with fewer than ``min_rows`` rows gets AUC NaN ("n/a"): the AUC of a handful of rows is noise
    (8 rows can score 0.0 or 1.0) and would pose as a domain's worst or best."""
    label, prob, domain = (np.asarray(a) for a in (label, prob, domain))
    result = {"auc": auc(label, prob), "logloss": logloss(label, prob), "rows": int(len(label))}
    for d in range(num_domains):
        rows = domain == d
        count = int(rows.sum())
        result.update({f"auc_d{d}": auc(label[rows], prob[rows]) if count >= min_rows else math.nan,
                       f"logloss_d{d}": logloss(label[rows], prob[rows]), f"rows_d{d}": count})
    return result
