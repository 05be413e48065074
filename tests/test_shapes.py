"""The built-in Shapes data set."""

import numpy as np
import pytest
import torch

from data.core import DataError, DataOptions
from data.registry import load_dataset
from data.shapes import SHAPES_CLASSES, make_shapes


def test_shapes_is_deterministic_for_a_seed():
    a, b, c = make_shapes(200, seed=3), make_shapes(200, seed=3), make_shapes(200, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_shapes_layout_and_balance():
    split = make_shapes(500, seed=0)
    assert split.images.shape == (500, 3, 32, 32) and split.images.dtype == torch.uint8
    assert split.labels.dtype == torch.int64
    assert torch.equal(torch.bincount(split.labels, minlength=10), torch.full((10,), 50))
    assert len(SHAPES_CLASSES) == 10


def test_load_shapes_has_cifar_proportions_and_distinct_splits():
    data = load_dataset("Shapes", DataOptions())
    assert (len(data.train), len(data.test)) == (8000, 1600)  # 5 : 1 as CIFAR's 50,000 : 10,000
    assert data.classes == SHAPES_CLASSES and data.image_size == 32
    # No test image is a copy of a training image.
    train = {bytes(img.numpy()) for img in data.train.images[:2000]}
    assert not any(bytes(img.numpy()) in train for img in data.test.images)
    small = load_dataset("Shapes", DataOptions(shapes_train=30, shapes_test=20, shapes_seed=5))
    assert (len(small.train), len(small.test)) == (30, 20)


def foreground(image: torch.Tensor) -> np.ndarray:
    """Pixels clearly brighter than the background (shapes are 96+ levels brighter)."""
    gray = image.double().mean(0).numpy()
    return gray > np.median(gray) + 48


def test_shapes_vary_in_position_size_and_colour():
    split = make_shapes(400, seed=1)
    for label in range(10):
        images = split.images[split.labels == label]
        masks = [foreground(img) for img in images]
        areas = np.array([m.sum() for m in masks])
        centres = np.array([np.argwhere(m).mean(0) for m in masks])
        assert areas.max() > 2 * areas.min(), SHAPES_CLASSES[label]
        assert centres.std(0).min() > 2.0, SHAPES_CLASSES[label]
        colours = np.array([img.double().numpy()[:, m].mean(1) for img, m in zip(images, masks, strict=False)])
        assert colours.std(0).min() > 15, SHAPES_CLASSES[label]


def test_shape_masks_are_the_named_shapes():
    """The pixel at the centre of a shape's bounding box is filled for solid shapes and empty
    for hollow ones (ring, frame), on average over each class's images."""
    split = make_shapes(2000, seed=2)
    centre_fill = []
    for label in range(10):
        masks = np.stack([foreground(img) for img in split.images[split.labels == label]])
        vals = []
        for m in masks:
            ys, xs = np.nonzero(m)
            if ys.size == 0:
                continue
            cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
            vals.append(m[cy, cx])
        centre_fill.append(np.mean(vals))
    fill = dict(zip(SHAPES_CLASSES, centre_fill, strict=False))
    for name in ["disc", "square", "diamond", "plus", "cross", "hbar", "vbar"]:
        assert fill[name] > 0.9, (name, fill[name])
    for name in ["ring", "frame"]:
        assert fill[name] < 0.1, (name, fill[name])


def test_load_dataset_rejects_unknown_names():
    with pytest.raises(DataError, match="unknown data set 'Imagenet'"):
        load_dataset("Imagenet", DataOptions())
