"""The demo's two figures (matplotlib, Agg backend: no display needed)."""
from dataclasses import dataclass, replace
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

__all__ = ["FeaturePanel", "plot_features", "plot_abnormal"]

CLASS_COLORS = plt.get_cmap("tab10").colors


@dataclass
class FeaturePanel:
    """One variant's test features. features: (M, 2); labels: (M,); means, variances: (K, 2) or
    None (the softmax baseline has no Gaussians); variances are exp(clip(log_var)), per axis."""

    title: str
    features: np.ndarray
    labels: np.ndarray
    accuracy: float
    means: Optional[np.ndarray] = None
    variances: Optional[np.ndarray] = None


def _limits(panel):
    # Robust limits: a few far-out test points must not shrink the clusters to a dot.
    lo = np.percentile(panel.features, 0.5, axis=0)
    hi = np.percentile(panel.features, 99.5, axis=0)
    if panel.means is not None:  # every mean and its 1-sigma ellipse in view
        sigma = np.sqrt(panel.variances)
        lo = np.minimum(lo, (panel.means - sigma).min(axis=0))
        hi = np.maximum(hi, (panel.means + sigma).max(axis=0))
    center, half = (lo + hi) / 2, (hi - lo).max() / 2 * 1.12 + 1e-6
    return (center[0] - half, center[0] + half), (center[1] - half, center[1] + half)


def _draw_panel(ax, panel):
    ax.set_title(f"{panel.title}\ntest accuracy {100 * panel.accuracy:.1f}%", fontsize=11)
    # A diverged run leaves NaN / Inf values: draw what is finite and say so.
    finite = np.isfinite(panel.features).all(axis=1)
    gaussians_finite = panel.means is not None and bool(
        np.isfinite(panel.means).all() and np.isfinite(panel.variances).all())
    panel = replace(panel, features=panel.features[finite], labels=panel.labels[finite],
                    means=panel.means if gaussians_finite else None,
                    variances=panel.variances if gaussians_finite else None)
    if not finite.all():
        ax.text(0.5, 0.02, f"{np.count_nonzero(~finite)} features not finite", color="red",
                ha="center", transform=ax.transAxes)
    if not finite.any():
        return
    colors = np.asarray(CLASS_COLORS)[panel.labels.astype(int)]
    ax.scatter(panel.features[:, 0], panel.features[:, 1], c=colors, s=5, alpha=0.55,
               linewidths=0, rasterized=True)
    if panel.means is not None:
        sigma = np.sqrt(panel.variances)
        for k, (mean, sd) in enumerate(zip(panel.means, sigma)):
            for radius, style in ((1, "-"), (2, "--")):
                ax.add_patch(Ellipse(mean, 2 * radius * sd[0], 2 * radius * sd[1], fill=False,
                                     edgecolor=CLASS_COLORS[k], linestyle=style, linewidth=1.3))
            ax.plot(*mean, marker="o", markersize=9, markerfacecolor=CLASS_COLORS[k],
                    markeredgecolor="black", markeredgewidth=1.0, zorder=5)
            ax.annotate(str(k), mean, ha="center", va="center", fontsize=6.5, fontweight="bold",
                        color="white", zorder=6)
    xlim, ylim = _limits(panel)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("feature 1")
    ax.set_ylabel("feature 2")
    ax.grid(True, linewidth=0.4, alpha=0.4)


def plot_features(panels, path, suptitle):
    """Side-by-side scatter plots of the 2-D test features of each variant, saved to ``path``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 5.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _draw_panel(ax, panel)
    handles = [Line2D([], [], linestyle="", label="digit:")]
    handles += [Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor=c,
                       markeredgecolor="none", label=str(k)) for k, c in enumerate(CLASS_COLORS)]
    if any(p.means is not None for p in panels):
        handles += [Line2D([], [], color="0.3", linestyle="-", label="1σ"),
                    Line2D([], [], color="0.3", linestyle="--", label="2σ"),
                    Line2D([], [], marker="o", linestyle="", markersize=8, markerfacecolor="0.6",
                           markeredgecolor="black", label="class mean")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=10, handletextpad=0.3, columnspacing=1.2)
    fig.suptitle(suptitle, fontsize=13)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_abnormal(rows, path, suptitle):
    """Histograms of the score ``-max_k logits`` for test digits against each abnormal kind.

    rows: a list of (title, normal_scores (M,), {kind: scores (M_kind,)}, {kind: AUROC or None}),
    one row of panels per model, one panel per kind. Each row's range covers the central 99% of
    its scores; the rest are counted in the end bins.
    """
    kinds = list(rows[0][2])
    fig, axes = plt.subplots(len(rows), len(kinds), figsize=(5.2 * len(kinds), 4.0 * len(rows)),
                             squeeze=False)
    for row_axes, (title, normal_scores, abnormal_scores, aurocs) in zip(axes, rows):
        pooled = np.concatenate([normal_scores] + [abnormal_scores[k] for k in kinds])
        pooled = pooled[np.isfinite(pooled)]
        lo, hi = np.percentile(pooled, [0.5, 99.5]) if len(pooled) else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)

        def clipped(scores):
            scores = scores[np.isfinite(scores)]
            return np.clip(scores, edges[0], edges[-1])

        for ax, kind in zip(row_axes, kinds):
            ax.hist(clipped(normal_scores), bins=edges, color="tab:blue", alpha=0.6,
                    label="test digits")
            ax.hist(clipped(abnormal_scores[kind]), bins=edges, color="tab:red", alpha=0.6,
                    label=kind)
            value = aurocs[kind]
            ax.set_title(f"{title}\ndigits vs {kind}: AUROC "
                         + ("n/a" if value is None else f"{value:.3f}"), fontsize=10.5)
            ax.legend(frameon=False)
            ax.grid(True, linewidth=0.4, alpha=0.4)
        row_axes[0].set_ylabel("inputs")
    for ax in axes[-1]:
        ax.set_xlabel("score  −max$_k$ logits  (higher = less likely)")
    fig.suptitle(suptitle, fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
