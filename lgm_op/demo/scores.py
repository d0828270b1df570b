"""Scores for abnormal inputs, and the AUROC of telling them from digits (scikit-learn)."""
import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["likelihood_score", "auroc"]


def likelihood_score(logits):
    """logits: (M, K) from the label-free graph -> (M,) score ``-max_k logits``.

    Up to a constant this is the negative log-likelihood of the feature under its most likely
    class Gaussian: higher means less likely, that is more abnormal.
    """
    return -np.max(np.asarray(logits, dtype=np.float64), axis=1)


def auroc(normal_scores, abnormal_scores):
    """Area under the ROC curve for "higher score = abnormal": P(score of an abnormal input >
    score of a normal one) + 0.5 P(equal); 1.0 when every abnormal input scores above every
    normal one, 0.5 when the two sets are indistinguishable. Scores must be finite."""
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    abnormal = np.asarray(abnormal_scores, dtype=np.float64).ravel()
    if len(normal) == 0 or len(abnormal) == 0:
        raise ValueError(f"auroc needs both sets non-empty, got {len(normal)} normal and "
                         f"{len(abnormal)} abnormal scores")
    if not (np.isfinite(normal).all() and np.isfinite(abnormal).all()):
        raise ValueError("auroc: scores must be finite (no NaN or Inf)")
    is_abnormal = np.concatenate((np.zeros(len(normal)), np.ones(len(abnormal))))
    return float(roc_auc_score(is_abnormal, np.concatenate((normal, abnormal))))
