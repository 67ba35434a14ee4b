"""PNG plots for the Dagster UI (matplotlib, headless)."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(losses: list[tuple[int, float]], path: Path, title: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, marker="o", markersize=3)
    ax.set(title=title, xlabel="optimizer step", ylabel="training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown_image(path: Path, alt: str) -> str:
    """Inline the PNG so the UI shows it wherever the metadata is viewed."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"


def cost_quality_curves(curves: dict, points: dict, path: Path, title: str = "Cost-quality on the test split") -> Path:
    """Accuracy against the share of calls sent to the large model.

    ``curves``: name -> (shares, accuracies); ``points``: name -> (share, accuracy)
    for single routings (always-medium, always-large, the router's own decisions)."""
    dashed = [name for name in curves if name.startswith("random")]
    return _curves_and_points(curves, points, dashed, path, title=title, xlabel="share of calls to the large model",
                              xlim=(-0.02, 1.02))


def _curves_and_points(curves: dict, points: dict, dashed: list, path: Path, **axes) -> Path:
    """Accuracy curves (the ``dashed`` ones are references) and single points, saved to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, label=name, linestyle="--" if name in dashed else "-")
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=45, zorder=5, label=name, marker="s")
    ax.set(ylabel="accuracy (share correct)", ylim=(-0.02, 1.02), **axes)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cv_by_layer(grid, chosen: dict, path: Path, one_se: bool = True) -> Path:
    """Cross-validated AUC of the Gemma head against the layer it reads, one line per value
    of its classifier's hyper-parameter (LDA's shrinkage, or logistic's C), with the best
    AUC's one-standard-error floor (when ``one_se``, the rule the block was chosen by) and
    the params chosen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    hyper, label = ("shrinkage", "shrinkage") if "shrinkage" in grid else ("c", "C")
    for value, rows in grid.groupby(hyper):
        rows = rows.sort_values("layer")
        ax.plot(rows["layer"], rows["cv_auc"], marker="o", markersize=4, label=f"{label}={value:g}")
    best = grid.loc[grid["cv_auc"].idxmax()]
    if one_se and "cv_se" in grid and best["cv_se"] == best["cv_se"]:
        ax.axhline(best["cv_auc"] - best["cv_se"], color="grey", linestyle=":", label="best - 1 SE")
    pick = grid[(grid["layer"] == chosen["layer"]) & (grid[hyper] == chosen[hyper])]
    ax.scatter(pick["layer"], pick["cv_auc"], s=120, facecolors="none", edgecolors="black", zorder=5, label="chosen")
    ax.set(title="Gemma head: cross-validated AUC of P(Complex_Query)", xlabel="layer (blocks run)",
           ylabel="out-of-fold ROC AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def label_mix(quality, path: Path) -> Path:
    """The policy mix of each source's labels, one stacked bar per source."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.5 * max(1, len(quality))), dpi=100)
    left = [0.0] * len(quality)
    for column in [c for c in quality.columns if c.startswith("share_")]:
        values = quality[column].fillna(0).tolist()
        ax.barh(quality["source"], values, left=left, label=column.removeprefix("share_"))
        left = [a + b for a, b in zip(left, values)]
    ax.set(title="Labels per source: policy mix", xlabel="share of labelled questions", xlim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cost_accuracy_frontiers(frontiers: dict, points: dict, path: Path,
                            title: str = "Cost-accuracy frontier on the test split") -> Path:
    """Each router's frontier (``frontiers``: name -> (USD per 1,000 queries, accuracy) of
    its hull's vertices) and the single models (``points``: name -> (USD per 1,000, accuracy))."""
    return _curves_and_points(frontiers, points, ["random mix", "oracle"], path, title=title,
                              xlabel="USD per 1,000 queries")


def experiment_arms(rows: list[dict], path: Path, title: str = "Experiments: accuracy and spend per arm") -> Path:
    """Per arm (``rows``: online_quality.arm_rows), its feedback accuracy with the 95%
    interval as error bars (an arm without grades is named, no point) and, beside, its
    spend per 1,000 requests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{r['profile']} / {r['experiment']}: {r['arm']}" for r in rows]
    fig, (acc, spend) = plt.subplots(1, 2, figsize=(9, 1.2 + 0.45 * max(1, len(rows))), dpi=100, sharey=True,
                                     gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(rows)))
    for i, r in enumerate(rows):
        if r["accuracy"] is None:
            acc.text(0.5, i, "no grades yet", ha="center", va="center", fontsize=8, color="grey")
            continue
        acc.errorbar([r["accuracy"]], [i], xerr=[[r["accuracy"] - r["accuracy_lo95"]],
                                                 [r["accuracy_hi95"] - r["accuracy"]]],
                     fmt="o", capsize=4, color="C0")
        acc.annotate(f"{r['accuracy']:.3f} (n={r['graded']})", (r["accuracy"], i), textcoords="offset points",
                     xytext=(0, 7), ha="center", fontsize=7)
    acc.set(xlim=(-0.02, 1.02), xlabel="accuracy from feedback (95% interval)", yticks=y, yticklabels=labels)
    acc.invert_yaxis()
    acc.grid(alpha=0.3, axis="x")
    spend.barh(y, [r["usd_per_1000"] or 0.0 for r in rows], color="C1")
    for i, r in enumerate(rows):
        spend.annotate(f"${(r['usd_per_1000'] or 0.0):.3f}", (r["usd_per_1000"] or 0.0, i),
                       textcoords="offset points", xytext=(3, 0), va="center", fontsize=7)
    spend.set(xlabel="USD per 1,000 requests", xlim=(0, 1.3 * max([r["usd_per_1000"] or 0.0 for r in rows] + [1e-6])))
    spend.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
