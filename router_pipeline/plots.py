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
