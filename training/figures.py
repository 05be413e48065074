"""Pictures and files of a run's evaluation: the confusion matrix as CSV and as a figure, and a
grid of model inputs, for TensorBoard and the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def write_confusion_csv(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    """The confusion matrix as CSV: a header of predicted classes, one row per true class."""
    lines = ["true\\predicted," + ",".join(classes)]
    lines += [name + "," + ",".join(str(int(v)) for v in row) for name, row in zip(classes, confusion.tolist())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def confusion_figure(confusion: torch.Tensor, classes: list[str], title: str) -> Any:
    """A matplotlib figure of the confusion matrix, rows normalised to the share of each true
    class. Up to 20 classes: every class named on both axes and every cell's count written in
    it. More (CIFAR-100): a plain heat map with every tenth class named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.double()
    shares = (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()
    n = len(classes)
    labelled = n <= 20
    size = 6 if n <= 10 else 9 if labelled else 10
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = list(range(n)) if labelled else list(range(0, n, 10))
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=8)
    ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=8)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("true")
    ax.set_title(title)
    if labelled:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    return fig


def image_grid(images: torch.Tensor, max_images: int = 64) -> torch.Tensor:
    """Model inputs (any normalisation) as one picture, each image stretched to [0, 1]."""
    from torchvision.utils import make_grid

    x = images[:max_images].detach().float().cpu()
    return make_grid(x, nrow=8, normalize=True, scale_each=True, padding=2)
