"""The built-in Shapes data, the batched transforms and the loader."""

import math

import numpy as np
import pytest
import torch

from datasets import (
    SHAPES_CLASSES,
    BatchLoader,
    BatchTransform,
    DataError,
    DataOptions,
    Split,
    channel_stats,
    load_dataset,
    make_shapes,
    random_crop_flip,
)


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
        colours = np.array([img.double().numpy()[:, m].mean(1) for img, m in zip(images, masks)])
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
    fill = dict(zip(SHAPES_CLASSES, centre_fill))
    for name in ["disc", "square", "diamond", "plus", "cross", "hbar", "vbar"]:
        assert fill[name] > 0.9, (name, fill[name])
    for name in ["ring", "frame"]:
        assert fill[name] < 0.1, (name, fill[name])


def test_load_dataset_rejects_unknown_names():
    with pytest.raises(DataError, match="unknown data set 'Imagenet'"):
        load_dataset("Imagenet", DataOptions())


def test_channel_stats_are_exact():
    split = make_shapes(64, seed=0)
    mean, std = channel_stats(split.images, chunk=10)
    x = split.images.numpy().astype(np.float64) / 255
    assert np.allclose(mean.numpy(), x.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(std.numpy(), x.std(axis=(0, 2, 3)), atol=1e-6)


def test_random_crop_flip_returns_crops_and_mirrors_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        crops = [(dy, dx, padded[i, :, dy : dy + 8, dx : dx + 8]) for dy in range(5) for dx in range(5)]
        candidates = [(dy, dx, flip) for dy, dx, c in crops for flip, view in ((False, c), (True, c.flip(-1)))
                      if torch.equal(out[i], view)]  # fmt: skip
        assert candidates, f"image {i} is not a crop of its padded input"
        flips += candidates[0][2]
    assert 10 < flips < 54  # mirrors happen about half the time


def index_split(n: int) -> Split:
    """Images whose every pixel is their own index, labels = index % 3."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return Split(images, torch.arange(n) % 3)


def identity_transform(size: int = 4) -> BatchTransform:
    return BatchTransform(torch.zeros(3), torch.full((3,), 1 / 255), input_size=size, crop_padding=0)


def test_loader_visits_every_image_once_per_epoch_in_a_new_order():
    split = index_split(103)
    loader = BatchLoader(split, 10, identity_transform(), train=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == math.ceil(103 / 10)
    orders = []
    for _ in range(2):
        seen = []
        for images, labels in loader:
            idx = images[:, 0, 0, 0].round().long()
            assert torch.equal(labels, idx % 3)  # labels travel with their images
            seen += idx.tolist()
        assert sorted(seen) == list(range(103))
        orders.append(seen)
    assert orders[0] != orders[1]


def test_eval_loader_keeps_order_and_does_not_augment():
    split = index_split(25)
    seen = [img[:, 0, 0, 0].round().long() for img, _ in BatchLoader(split, 7, identity_transform(), train=False)]
    assert torch.cat(seen).tolist() == list(range(25))


def test_transform_normalises_and_resizes_for_224_models():
    split = make_shapes(4, seed=0)
    mean, std = channel_stats(split.images)
    out = BatchTransform(mean, std, input_size=224)(split.images, train=False)
    assert out.shape == (4, 3, 224, 224) and out.dtype == torch.float32
    native = BatchTransform(mean, std, input_size=32)(split.images, train=False)
    assert native.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(native.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
