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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", markersize=3, label=name, linestyle="--" if name.startswith("random") else "-")
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=45, zorder=5, label=name, marker="s")
    ax.set(title=title, xlabel="share of calls to the large model", ylabel="accuracy (share correct)", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def cv_by_layer(grid, path: Path) -> Path:
    """Cross-validated AUC of the Gemma head against the layer it reads, one line per C."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for c, rows in grid.groupby("c"):
        rows = rows.sort_values("layer")
        ax.plot(rows["layer"], rows["cv_auc"], marker="o", markersize=4, label=f"C={c:g}")
    ax.set(title="Gemma head: cross-validated AUC of P(Complex_Query)", xlabel="layer (blocks run)",
           ylabel="out-of-fold ROC AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
