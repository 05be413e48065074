"""Pictures and files of a run: the confusion matrix as CSV and as a figure, a grid of model
inputs, and the paper's figures (``python main.py figures``): conv1's kernels (Figure 3),
evaluation images with their top-5 scores and evaluation images with their nearest training
images in fc7 space (Figure 4).

The kernel and neighbour grids are drawn pixel by pixel (their sizes follow from
``KernelLayout`` and ``NeighbourLayout``, so a test can compute them); the predictions need
text next to bars and are a matplotlib figure of a fixed size (``predictions_size``)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def write_confusion_csv(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    """The confusion matrix as CSV: a header of predicted classes, one row per true class.
    Written by the ``csv`` module, which quotes a class name holding a comma, a quote or a line
    break (an ImageFolder's folder ``Ants, small``), so every row keeps its columns."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["true\\predicted", *classes])
        writer.writerows([name, *(int(v) for v in row)] for name, row in zip(classes, confusion.tolist(), strict=False))


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


# ---------------------------------------------------------------------------------------------
# The paper's figures

#: Pixels between kernels (and neighbour images), and around them: white in the kernel grid.
PAD = 2
#: Height of the strip above each block holding its label.
LABEL_HEIGHT = 14
#: Extra pixels between the towers' blocks of the kernel grid, and between a query and its neighbours.
GAP = 8
#: Kernels per row of a block: 16 shows each tower's 48 kernels as 3 rows, the paper's Figure 3.
KERNEL_COLUMNS = 16


def default_scale(kernel_size: int) -> int:
    """How much to enlarge a kernel so it shows at about 33 pixels: 3 for 11x11, 11 for 3x3."""
    return max(1, round(33 / kernel_size))


@dataclass(frozen=True)
class KernelLayout:
    """Where each kernel of conv1 goes: ``towers`` blocks one above the other, each with a label
    strip on top and ``count / towers`` kernels of ``size * scale`` pixels in rows of
    ``columns``, ``PAD`` white pixels between and around them, ``GAP`` more between blocks."""

    count: int
    size: int
    scale: int
    towers: int = 1
    columns: int = KERNEL_COLUMNS

    @property
    def cell(self) -> int:
        return self.size * self.scale

    @property
    def per_tower(self) -> int:
        return self.count // self.towers

    @property
    def rows(self) -> int:
        return math.ceil(self.per_tower / self.columns)

    @property
    def block_height(self) -> int:
        return LABEL_HEIGHT + self.rows * (self.cell + PAD) + PAD

    @property
    def width(self) -> int:
        return min(self.columns, self.per_tower) * (self.cell + PAD) + PAD

    @property
    def height(self) -> int:
        return self.towers * self.block_height + (self.towers - 1) * GAP

    def origin(self, index: int) -> tuple[int, int]:
        """(top, left) of kernel ``index``: tower ``index // per_tower``, row-major within it."""
        tower, within = divmod(index, self.per_tower)
        row, column = divmod(within, self.columns)
        top = tower * (self.block_height + GAP) + LABEL_HEIGHT + PAD + row * (self.cell + PAD)
        return top, PAD + column * (self.cell + PAD)


def conv1_kernels(model: nn.Module) -> tuple[torch.Tensor, int]:
    """conv1's weights (out x 3 x k x k, on the CPU) and the number of towers they belong to:
    2 for the paper's networks, whose conv2 sees each half of conv1's maps on its own
    (``groups=2``; kernels 0-47 fed the first GPU), 1 otherwise. ``SplitPaperAlexNet`` gives
    its towers' kernels in the grouped model's order."""
    towers = getattr(model, "towers", None)
    if towers is not None:
        weights = [next(m for m in tower.modules() if isinstance(m, nn.Conv2d)).weight for tower in towers]
        return torch.cat([w.detach().float().cpu() for w in weights]), len(weights)
    conv1, conv2 = [m for m in model.modules() if isinstance(m, nn.Conv2d)][:2]
    return conv1.weight.detach().float().cpu(), conv2.groups


def normalise_each(kernels: torch.Tensor) -> torch.Tensor:
    """Each kernel stretched to [0, 1] on its own (its minimum black, its maximum white, over
    its three colours), as the paper shows them; a constant kernel is mid grey."""
    low = kernels.amin(dim=(1, 2, 3), keepdim=True)
    span = kernels.amax(dim=(1, 2, 3), keepdim=True) - low
    return torch.where(span > 0, (kernels - low) / span.clamp_min(torch.finfo(kernels.dtype).tiny), 0.5)


def kernel_grid(kernels: torch.Tensor, towers: int = 1, scale: int | None = None) -> torch.Tensor:
    """conv1's kernels (out x 3 x k x k) as one uint8 RGB picture (3 x H x W, ``KernelLayout``):
    one block per tower, labelled, each kernel normalised on its own and enlarged ``scale``
    times (``default_scale``) without smoothing."""
    count, channels, size, _ = kernels.shape
    if channels != 3 or count % towers:
        raise ValueError(f"expected RGB kernels in {towers} equal towers, got {tuple(kernels.shape)}")
    layout = KernelLayout(count, size, scale or default_scale(size), towers)
    pixels = normalise_each(kernels.float()).mul(255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(layout.scale, 2).repeat_interleave(layout.scale, 3)
    canvas = torch.full((3, layout.height, layout.width), 255, dtype=torch.uint8)
    for index in range(count):
        top, left = layout.origin(index)
        canvas[:, top : top + layout.cell, left : left + layout.cell] = pixels[index]
    labels = (
        [f"conv1: {count} kernels, {size}x{size}"]
        if towers == 1
        else [f"GPU {t + 1}: kernels {t * layout.per_tower}-{(t + 1) * layout.per_tower - 1}" for t in range(towers)]
    )
    return _with_labels(canvas, [(t * (layout.block_height + GAP), PAD, text) for t, text in enumerate(labels)])


def model_kernel_grid(model: nn.Module) -> torch.Tensor:
    """``kernel_grid`` of a model's conv1 (``conv1_kernels``): what TensorBoard shows every
    ``-lce`` epochs and ``python main.py figures`` draws."""
    return kernel_grid(*conv1_kernels(model))


def _with_labels(canvas: torch.Tensor, labels: list[tuple[int, int, str]]) -> torch.Tensor:
    """``canvas`` (uint8 3 x H x W) with each (top, left, text) written in black from there."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11)  # fits LABEL_HEIGHT; Pillow's default 10 runs words together
    for top, left, text in labels:
        draw.text((left, top + 1), text, fill=(0, 0, 0), font=font)
    return torch.from_numpy(_array(image)).permute(2, 0, 1).contiguous()


def _array(image: Any) -> Any:
    import numpy as np

    return np.asarray(image.convert("RGB")).copy()


def png_bytes(image: torch.Tensor) -> bytes:
    """A uint8 3 x H x W picture as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def figure_image(figure: Any) -> torch.Tensor:
    """A matplotlib figure rendered at its own size and dpi (no tight bounding box, so the pixel
    size is ``figsize * dpi``), as uint8 3 x H x W; the figure is closed."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi, facecolor="white")
    plt.close(figure)
    buffer.seek(0)
    return torch.from_numpy(_array(Image.open(buffer))).permute(2, 0, 1).contiguous()


#: One image and its bars in the predictions figure, in inches, at ``PREDICTIONS_DPI``.
PANEL_INCHES = (2.4, 3.0)
PREDICTIONS_DPI = 100
PREDICTIONS_COLUMNS = 4


def predictions_size(count: int) -> tuple[int, int]:
    """(height, width) in pixels of ``predictions_figure`` for ``count`` images: panels of
    ``PANEL_INCHES`` at ``PREDICTIONS_DPI``, ``PREDICTIONS_COLUMNS`` to a row."""
    columns = min(count, PREDICTIONS_COLUMNS)
    rows = math.ceil(count / PREDICTIONS_COLUMNS)
    return round(rows * PANEL_INCHES[1] * PREDICTIONS_DPI), round(columns * PANEL_INCHES[0] * PREDICTIONS_DPI)


def true_classes(label: torch.Tensor) -> list[int]:
    """The classes an image has: its class index, or for multi-label data (VOC's 1 / -1 / 0)
    every class marked present."""
    if label.dim() == 0:
        return [int(label)]
    return [int(i) for i in torch.nonzero(label == 1).flatten()]


def predictions_figure(
    images: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, classes: list[str], multilabel: bool, top: int = 5
) -> Any:
    """The paper's Figure 4 (left): each image (uint8 3 x H x W) above the ``top`` best of its
    ``scores`` (N x C: softmax probabilities, or per-class sigmoid scores for multi-label data)
    as bars with the class names. The true class is named above the image and its bar is red
    (multi-label: every class present, so a true class outside the top five is still named)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    height, width = predictions_size(count)
    figure = plt.figure(figsize=(width / PREDICTIONS_DPI, height / PREDICTIONS_DPI), dpi=PREDICTIONS_DPI)
    rows = math.ceil(count / PREDICTIONS_COLUMNS)
    # Margins in pixels: the heading and the first titles above, the bars' tick labels below.
    grid = figure.add_gridspec(
        2 * rows,
        PREDICTIONS_COLUMNS,
        height_ratios=[3, 2] * rows,
        left=0.02,
        right=0.98,
        top=1 - 36 / height,
        bottom=16 / height,
        hspace=0.45,
        wspace=0.12,
    )
    k = min(top, len(classes))
    for n in range(count):
        row, column = divmod(n, PREDICTIONS_COLUMNS)
        picture = figure.add_subplot(grid[2 * row, column])
        picture.imshow(images[n].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        picture.set_axis_off()
        truth = true_classes(labels[n])
        named = ", ".join(classes[c] for c in truth) or "(none)"
        picture.set_title(named if len(named) <= 34 else named[:31] + "...", fontsize=8)
        bars = figure.add_subplot(grid[2 * row + 1, column])
        values, best = scores[n].float().topk(k)
        colours = ["#d62728" if int(c) in truth else "#9ecae1" for c in best]
        bars.barh(range(k), values.tolist(), color=colours, height=0.8)
        for y, c in enumerate(best.tolist()):
            bars.text(0.02, y, classes[c], va="center", ha="left", fontsize=7)
        bars.set_xlim(0, 1)
        bars.set_ylim(k - 0.5, -0.5)  # the best on top
        bars.set_yticks([])
        bars.tick_params(axis="x", labelsize=6)
    kind = "sigmoid score per class" if multilabel else "softmax probability"
    figure.suptitle(f"top-{k} predictions ({kind}); red: a true class", fontsize=9, y=1 - 3 / height, va="top")
    return figure


#: Display size of each image in the neighbours figure, and the coloured frame around it.
NEIGHBOUR_PIXELS = 96
FRAME = 3
#: Frame colours: the query, a neighbour sharing one of its classes, a neighbour that does not.
QUERY_COLOUR, SAME_COLOUR, OTHER_COLOUR = (128, 128, 128), (0, 160, 0), (200, 0, 0)


@dataclass(frozen=True)
class NeighbourLayout:
    """Rows of a query and its ``k`` neighbours: a label strip on top, each image shown at
    ``NEIGHBOUR_PIXELS`` inside a ``FRAME``, ``PAD`` pixels between framed images and ``GAP``
    more between the query and its first neighbour."""

    queries: int
    k: int = 6

    @property
    def cell(self) -> int:
        return NEIGHBOUR_PIXELS + 2 * FRAME

    @property
    def width(self) -> int:
        return (self.k + 1) * (self.cell + PAD) + PAD + GAP

    @property
    def height(self) -> int:
        return LABEL_HEIGHT + self.queries * (self.cell + PAD) + PAD

    def origin(self, row: int, column: int) -> tuple[int, int]:
        """(top, left) of the frame of image ``column`` (0: the query) in row ``row``."""
        return (LABEL_HEIGHT + PAD + row * (self.cell + PAD), PAD + column * (self.cell + PAD) + (GAP if column else 0))


def shown_at(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """uint8 images resized to ``pixels`` square: small ones enlarged without smoothing (a
    32x32 image stays sharp), large ones reduced with antialiasing."""
    x = images.float()
    if images.shape[-1] < pixels:
        x = F.interpolate(x, size=(pixels, pixels), mode="nearest-exact")
    elif images.shape[-1] > pixels:
        x = F.interpolate(x, size=(pixels, pixels), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def neighbours_grid(queries: torch.Tensor, neighbours: torch.Tensor, same_class: torch.Tensor) -> torch.Tensor:
    """The paper's Figure 4 (right) as uint8 3 x H x W (``NeighbourLayout``): each row a query
    image (uint8 3 x H x W, grey frame) and then its nearest training images (``neighbours``:
    Q x k x 3 x H x W, nearest first), framed green where they share a class with the query
    (``same_class``: Q x k booleans) and red where not."""
    count, k = neighbours.shape[:2]
    layout = NeighbourLayout(count, k)
    canvas = torch.full((3, layout.height, layout.width), 255, dtype=torch.uint8)
    shown = shown_at(torch.cat([queries[:, None], neighbours], 1).flatten(0, 1), NEIGHBOUR_PIXELS)
    shown = shown.view(count, k + 1, 3, NEIGHBOUR_PIXELS, NEIGHBOUR_PIXELS)
    for row in range(count):
        for column in range(k + 1):
            colour = QUERY_COLOUR if column == 0 else SAME_COLOUR if same_class[row, column - 1] else OTHER_COLOUR
            top, left = layout.origin(row, column)
            canvas[:, top : top + layout.cell, left : left + layout.cell] = torch.tensor(colour)[:, None, None]
            inner = (
                slice(None),
                slice(top + FRAME, top + FRAME + NEIGHBOUR_PIXELS),
                slice(left + FRAME, left + FRAME + NEIGHBOUR_PIXELS),
            )
            canvas[inner] = shown[row, column]
    title = f"query | its {k} nearest training images by fc7 (Euclidean); green: shares a class"
    return _with_labels(canvas, [(0, PAD, title)])
