"""``Shapes``: the built-in data set, ten classes of coloured shapes generated from a seed (no
download), train and test from separate seeds."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch

from data.core import DataError, DataOptions, DataSet, Split

logger = logging.getLogger(__name__)


SHAPES_CLASSES = [
    "disc",
    "square",
    "triangle",
    "diamond",
    "plus",
    "cross",
    "ring",
    "frame",
    "hbar",
    "vbar",
]


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
    ramp = np.cos(angle)[:, None, None] * (np.arange(size)[None, None, :] / size - 0.5) + np.sin(angle)[
        :, None, None
    ] * (np.arange(size)[None, :, None] / size - 0.5)
    background = background + 32 * ramp[:, None]
    alpha = coverage[:, None]
    image = alpha * shape_colour + (1 - alpha) * background
    image += rng.normal(0, 12, image.shape)
    images = torch.from_numpy(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


#: Peak memory of ``make_shapes`` per image (float64 intermediates), measured: about 115 kB.
SHAPES_BYTES_PER_IMAGE = 120_000


def available_memory() -> int | None:
    """Bytes of memory this machine can still hand out (MemAvailable: free plus reclaimable
    cache), or None where that cannot be told."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load_shapes(options: DataOptions) -> DataSet:
    """The built-in data set: generated, never downloaded, train and test from separate seeds.
    A count that would not fit in memory while it is generated is one sentence, not a crash."""
    largest = max(options.shapes_train, options.shapes_test)
    need, have = largest * SHAPES_BYTES_PER_IMAGE, available_memory()
    if have is not None and need > have:
        raise DataError(
            f"generating {largest} Shapes images needs about {need / 1e9:.1f} GB of memory and this machine has "
            f"{have / 1e9:.1f} GB available; pass a smaller --shapes-train / --shapes-test."
        )
    logger.info(
        "generating %d training and %d test images of Shapes (seed %d)",
        options.shapes_train,
        options.shapes_test,
        options.shapes_seed,
    )
    return DataSet(
        name="Shapes",
        classes=list(SHAPES_CLASSES),
        train=make_shapes(options.shapes_train, seed=2 * options.shapes_seed),
        test=make_shapes(options.shapes_test, seed=2 * options.shapes_seed + 1),
    )
