"""Scores for abnormal inputs and the AUROC of telling two sets apart, in NumPy."""
import numpy as np

__all__ = ["likelihood_score", "auroc", "average_ranks"]


def likelihood_score(logits):
    """logits: (M, K) from the label-free graph -> (M,) score ``-max_k logits``.

    Up to a constant this is the negative log-likelihood of the feature under its most likely
    class Gaussian: higher means less likely, that is more abnormal.
    """
    return -np.max(np.asarray(logits, dtype=np.float64), axis=1)


def average_ranks(values):
    """values: (M,) -> (M,) ranks 1..M in ascending order, tied values sharing their mean rank."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Runs of equal values: [starts[i], ends[i]) in sorted order get the mean of ranks start+1..end.
    boundary = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    starts = np.concatenate(([0], boundary))
    ends = np.concatenate((boundary, [len(values)]))
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(normal_scores, abnormal_scores):
    """Area under the ROC curve for "higher score = abnormal".

    Equals P(score of an abnormal input > score of a normal one) + 0.5 P(equal), computed from the
    Mann-Whitney U statistic of the pooled ranks (ties share their mean rank): 1.0 when every
    abnormal input scores above every normal one, 0.5 when the two sets are indistinguishable.
    NaN scores are not allowed.
    """
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    abnormal = np.asarray(abnormal_scores, dtype=np.float64).ravel()
    if len(normal) == 0 or len(abnormal) == 0:
        raise ValueError(f"auroc needs both sets non-empty, got {len(normal)} normal and "
                         f"{len(abnormal)} abnormal scores")
    if np.isnan(normal).any() or np.isnan(abnormal).any():
        raise ValueError("auroc: scores must not be NaN")
    ranks = average_ranks(np.concatenate((normal, abnormal)))
    rank_sum = ranks[len(normal):].sum()
    u = rank_sum - len(abnormal) * (len(abnormal) + 1) / 2.0
    return float(u / (len(normal) * len(abnormal)))
