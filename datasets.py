"""Data sets, batched transforms and loaders.

Every data set is read once into memory as uint8 images (N x 3 x H x W) plus labels and moved to
the training device whole; augmentation then runs on whole batches as tensor code. This avoids
the per-image Python work of a ``Dataset`` + ``DataLoader`` pipeline, which is what usually
limits AlexNet training speed.

Data sets are looked up by name in ``DATASETS``; adding one means writing a loader function that
returns a ``DataSet`` and adding it there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils import UserError


class DataError(UserError):
    """A problem with the user's data (missing, corrupt, wrong layout): shown as one sentence."""


@dataclass
class Split:
    """One split of a data set: uint8 images N x 3 x H x W and int64 class labels N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class DataSet:
    """A named data set with its class names and its train and evaluation splits."""

    name: str
    classes: list[str]
    train: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


@dataclass
class DataOptions:
    """What the loaders may need from the command line."""

    data_dir: Path = Path("dataset")
    shapes_train: int = 8000
    shapes_test: int = 1600
    shapes_seed: int = 0


# --------------------------------------------------------------------------------------------
# Shapes: the built-in data set


SHAPES_CLASSES = [
    "disc", "square", "triangle", "diamond", "plus",
    "cross", "ring", "frame", "hbar", "vbar",
]  # fmt: skip


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape ``label`` in coordinates scaled so the shape spans about [-1, 1]."""
    au, av = np.abs(u), np.abs(v)
    if label == 0:  # disc
        return u * u + v * v <= 1.0
    if label == 1:  # square
        return np.maximum(au, av) <= 0.8
    if label == 2:  # triangle, apex up (image rows grow downwards)
        return (v <= 0.75) & (au <= 0.95 * (v + 0.95) / 1.7)
    if label == 3:  # diamond
        return au + av <= 1.0
    if label == 4:  # plus
        return ((au <= 0.28) & (av <= 1.0)) | ((av <= 0.28) & (au <= 1.0))
    if label == 5:  # diagonal cross
        return ((np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4)) & (np.maximum(au, av) <= 0.85)
    if label == 6:  # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if label == 7:  # hollow square
        m = np.maximum(au, av)
        return (m <= 0.85) & (m >= 0.5)
    if label == 8:  # horizontal bar
        return (au <= 1.0) & (av <= 0.3)
    if label == 9:  # vertical bar
        return (au <= 0.3) & (av <= 1.0)
    raise ValueError(f"no shape {label}")


def make_shapes(n: int, seed: int, size: int = 32) -> Split:
    """``n`` images of ten classes of coloured shapes, the same for the same ``(n, seed)``.

    Each image has a random dark background colour with a smooth brightness gradient, one shape
    of random size (radius 6-12 px at 32 px), position and colour (96-160 levels brighter than
    the background in every channel), anti-aliased by 2x2 supersampling, and Gaussian pixel
    noise (sigma 12). Classes are balanced and shuffled.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES))
    scale = size / 32
    radius = rng.uniform(6, 12, n) * scale
    margin = 0.8 * radius
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)

    sub = (np.arange(2) + 0.5) / 2  # 2x2 supersampling offsets within a pixel
    coords = (np.arange(size)[:, None] + sub[None, :]).reshape(-1)  # size*2 positions
    coverage = np.empty((n, size, size), np.float32)
    for label in range(len(SHAPES_CLASSES)):
        idx = np.flatnonzero(labels == label)
        if idx.size == 0:
            continue
        r = radius[idx, None, None]
        u = (coords[None, None, :] - cx[idx, None, None]) / r
        v = (coords[None, :, None] - cy[idx, None, None]) / r
        inside = _shape_mask(label, u, v).astype(np.float32)  # k x 2size x 2size
        coverage[idx] = inside.reshape(idx.size, size, 2, size, 2).mean(axis=(2, 4))

    # A darker background than the shape in every channel: with random contrast polarity the
    # task is far harder and a plain AlexNet needs many epochs before it starts learning.
    background = rng.uniform(0, 96, (n, 3, 1, 1))
    shape_colour = background + rng.uniform(96, 160, (n, 3, 1, 1))
    angle = rng.uniform(0, 2 * math.pi, n)
    ramp = (np.cos(angle)[:, None, None] * (np.arange(size)[None, None, :] / size - 0.5)
            + np.sin(angle)[:, None, None] * (np.arange(size)[None, :, None] / size - 0.5))  # fmt: skip
    background = background + 32 * ramp[:, None]
    alpha = coverage[:, None]
    image = alpha * shape_colour + (1 - alpha) * background
    image += rng.normal(0, 12, image.shape)
    images = torch.from_numpy(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def load_shapes(options: DataOptions) -> DataSet:
    """The built-in data set: generated, never downloaded, train and test from separate seeds."""
    if options.shapes_train < 1 or options.shapes_test < 1:
        raise DataError("Shapes needs at least one training and one test image; raise --shapes-train/--shapes-test.")
    return DataSet(
        name="Shapes",
        classes=list(SHAPES_CLASSES),
        train=make_shapes(options.shapes_train, seed=2 * options.shapes_seed),
        test=make_shapes(options.shapes_test, seed=2 * options.shapes_seed + 1),
    )


DATASETS: dict[str, Callable[[DataOptions], DataSet]] = {
    "Shapes": load_shapes,
}


def load_dataset(name: str, options: DataOptions) -> DataSet:
    """Load the data set registered under ``name``."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
    return DATASETS[name](options)


# --------------------------------------------------------------------------------------------
# Batched transforms: uint8 batch in, float batch out, all on the batch's device.


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of uint8 images in [0, 1] units, exact (float64)."""
    total = torch.zeros(3, dtype=torch.float64, device=images.device)
    total_sq = torch.zeros(3, dtype=torch.float64, device=images.device)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``H x W`` crop of each image zero-padded by ``padding``, mirrored with p = 0.5."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=x.device)
    flip = torch.rand(n, 1, generator=generator, device=x.device) < 0.5
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip, w - 1 - cols, cols) + dx  # a mirror is a reversed column index
    rows = torch.arange(h, device=x.device) + dy
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class BatchTransform:
    """Train/eval transform of uint8 batches: [crop+flip at native size], to float, resize to
    the model's input size when it differs, normalise by the training set's channel stats."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, input_size: int, crop_padding: int = 4) -> None:
        self.mean = mean.view(1, 3, 1, 1)
        self.std = std.view(1, 3, 1, 1)
        self.input_size = input_size
        self.crop_padding = crop_padding

    def __call__(self, x: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if train and self.crop_padding:
            x = random_crop_flip(x, self.crop_padding, generator)
        x = x.float().div_(255)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class BatchLoader:
    """Iterates over a device-resident ``Split`` in batches, reshuffled each epoch when training.

    Yields ``(inputs, labels)`` already transformed and on the split's device. ``generator``
    drives both the shuffle and the augmentation, so a seed fixes the whole data stream.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        transform: BatchTransform,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        self.split = split
        self.batch_size = batch_size
        self.transform = transform
        self.train = train
        self.generator = generator

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        device = self.split.images.device
        if self.train:
            order = torch.randperm(n, generator=self.generator, device=device)
        else:
            order = torch.arange(n, device=device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            images = self.split.images[idx]
            yield self.transform(images, self.train, self.generator), self.split.labels[idx]
