"""Batched transforms, the pipelines chosen per model and setup, and the loaders."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from data.core import DataError, Split
from data.loaders import BatchLoader
from data.shapes import make_shapes
from data.transforms import (
    CifarPipeline,
    ModernPipeline,
    PaperPipeline,
    Pipeline,
    channel_stats,
    crop_flip,
    make_pipeline,
    mean_image,
    pca_shift,
    random_crop_flip,
    random_resized_crop_flip,
    rgb_eigen,
    ten_crop,
)


def test_crop_flip_equals_torchvisions_crop_and_flip_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    top = torch.tensor([0, 8, 3, 4, 8, 1])
    left = torch.tensor([0, 8, 7, 0, 2, 5])
    flip = torch.tensor([False, True, False, True, True, False])
    out = crop_flip(F.pad(x, (4, 4, 4, 4)), top, left, flip, 32)
    for i in range(6):
        expected = TF.crop(TF.pad(x[i], [4]), int(top[i]), int(left[i]), 32, 32)
        if flip[i]:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(out[i], expected), i


def test_random_crop_flip_draws_independent_parameters_per_image():
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(64, 3, 32, 32).contiguous()
    out = random_crop_flip(x, 32, padding=4, generator=torch.Generator().manual_seed(0))
    distinct = {bytes(img.numpy()) for img in out}
    assert len(distinct) > 40  # 81 offsets x 2 mirrors: one shared draw would give 1


def test_random_crop_flip_returns_crops_and_mirrors_of_the_padded_image():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, 8, padding=2, generator=torch.Generator().manual_seed(1))
    padded = F.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        matches = [flip for c in crops for flip, view in ((0, c), (1, c.flip(-1))) if torch.equal(out[i], view)]
        assert matches, f"image {i} is not a crop of its padded input"
        flips += matches[0]
    assert 10 < flips < 54  # mirrors happen about half the time


def test_ten_crop_matches_torchvision_views_and_coordinates():
    x = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    views = ten_crop(x, 224)
    assert views.shape == (2, 10, 3, 224, 224)
    for i in range(2):
        expected = TF.ten_crop(x[i], [224, 224])
        for v in range(10):
            assert torch.equal(views[i, v], expected[v]), v
    # Coordinates by hand: top-left, top-right, bottom-left, bottom-right, centre (16 = (256-224)/2).
    assert torch.equal(views[0, 1], x[0, :, 0:224, 32:256])
    assert torch.equal(views[0, 3], x[0, :, 32:256, 32:256])
    assert torch.equal(views[0, 4], x[0, :, 16:240, 16:240])
    assert torch.equal(views[0, 9], x[0, :, 16:240, 16:240].flip(-1))
    assert torch.equal(views[0, 5], x[0, :, 0:224, 32:256].flip(-1))  # mirror's top-left = top-right mirrored


def test_pca_shift_is_the_papers_formula():
    rng = np.random.default_rng(0)
    vectors, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    values = np.array([0.2, 0.02, 0.004])
    alphas = rng.normal(0, 0.1, size=(5, 3))
    got = pca_shift(torch.tensor(alphas), torch.tensor(values), torch.tensor(vectors)).numpy()
    for i in range(5):
        # [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T, with p_j the j-th eigenvector (a column).
        expected = sum(vectors[:, j] * alphas[i, j] * values[j] for j in range(3))
        assert np.allclose(got[i], expected, atol=1e-12)


def test_rgb_eigen_decomposes_the_pixel_covariance():
    images = make_shapes(50, seed=0).images
    values, vectors = rgb_eigen(images, chunk=7)
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double().numpy() / 255
    cov = np.cov(pixels, bias=True)
    assert np.all(np.diff(values.numpy()) <= 0)  # descending
    for j in range(3):
        assert np.allclose(
            cov @ vectors[:, j].double().numpy(), values[j].item() * vectors[:, j].double().numpy(), atol=1e-6
        )
    assert np.allclose(sorted(np.linalg.eigvalsh(cov)), sorted(values.double().numpy()), atol=1e-7)


def test_paper_pipeline_train_is_mean_subtraction_pca_shift_and_crop():
    split = make_shapes(20, seed=0)
    big = F.interpolate(split.images.float(), size=(256, 256), mode="nearest").round().to(torch.uint8)
    mean, (values, vectors) = mean_image(big), rgb_eigen(big)
    pipeline = PaperPipeline(mean, values, vectors, crop=224, sigma=0.1, fidelity="text")
    out = pipeline.train(big[:4], torch.Generator().manual_seed(5))

    # The same draws, in the pipeline's order: alphas, then crop rows, columns and mirrors.
    g = torch.Generator().manual_seed(5)
    alphas = torch.randn(4, 3, generator=g) * 0.1
    top = torch.randint(0, 33, (4,), generator=g)
    left = torch.randint(0, 33, (4,), generator=g)
    flip = torch.rand(4, generator=g) < 0.5
    for i in range(4):
        shift = 255 * (vectors.double() @ (alphas[i].double() * values.double()))
        centred = big[i].double() - mean.double() + shift[:, None, None]
        patch = centred[:, top[i] : top[i] + 224, left[i] : left[i] + 224]
        if flip[i]:
            patch = patch.flip(-1)
        assert torch.allclose(out[i].double(), patch, atol=1e-3)
    # A new draw per image: the colour shifts differ between images.
    assert alphas.std(0).min() > 0


def test_paper_pipeline_evaluates_ten_views_of_the_mean_subtracted_image():
    big = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8)
    pipeline = PaperPipeline(mean_image(big), *rgb_eigen(big), fidelity="text")
    views = pipeline.evaluate(big)
    assert pipeline.views == 10 and views.shape == (3, 10, 3, 224, 224)
    centred = big.float() - mean_image(big)
    assert torch.allclose(views[1, 4], centred[1, :, 16:240, 16:240])


def test_random_resized_crop_of_the_whole_image_is_the_image_or_its_mirror():
    x = torch.rand(8, 3, 40, 40)
    out = random_resized_crop_flip(
        x, 40, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0)
    )
    mirrored = 0
    for i in range(8):
        same, mirror = torch.allclose(out[i], x[i], atol=1e-5), torch.allclose(out[i], x[i].flip(-1), atol=1e-5)
        assert same or mirror
        mirrored += mirror
    assert 0 < mirrored < 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_resized_crops_equal_grid_sample_of_the_same_boxes(dtype):
    """The separable resampling against the 2-D one it replaced (``F.grid_sample`` of the boxes'
    affine grids, which the pipeline used before): boxes inside, at the edge, mirrored, up- and
    down-sampled, odd sizes, more images than one CPU chunk; equal up to float rounding."""
    from data.transforms import resized_crops

    x = torch.randint(0, 256, (7, 3, 29, 23), generator=torch.Generator().manual_seed(0)).to(dtype)
    box = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],
            [0.0, 0.0, -1.0, 1.0],
            [0.3, -0.2, 0.5, 0.7],
            [-0.6, 0.5, -0.4, 0.5],
            [0.9, 0.9, 0.1, 0.1],
            [0.0, 0.0, 0.05, 0.2],
            [-0.5, 0.1, 0.5, 0.9],
        ]
    )
    theta = torch.zeros(7, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = box[:, 2], box[:, 0], box[:, 3], box[:, 1]
    for size in (11, 40):
        grid = F.affine_grid(theta, [7, 3, size, size], align_corners=False)
        expected = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = resized_crops(x, box, size)
        assert out.dtype == torch.float32 and out.shape == (7, 3, size, size)
        assert torch.allclose(out, expected, atol=1e-3), (out - expected).abs().max()
    whole = resized_crops(x[:1].expand(2, -1, -1, -1), box[:2], 23)  # the whole first image, plain and mirrored
    assert torch.allclose(whole[1], whole[0].flip(-1), atol=1e-3)
    assert torch.allclose(whole[0], F.interpolate(x[:1].float(), size=(23, 23), mode="bilinear")[0], atol=1e-3)


def test_random_resized_crop_takes_a_box_of_the_requested_area():
    # An image whose pixel values are their own column index: a box spanning a fraction f of the
    # width shows values over about f * width.
    x = torch.arange(256.0).expand(16, 3, 256, 256).contiguous()
    out = random_resized_crop_flip(
        x, 64, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(1)
    )
    spans = (out[:, 0].amax(dim=(1, 2)) - out[:, 0].amin(dim=(1, 2))).tolist()
    assert all(abs(span - 128) < 6 for span in spans), spans  # sqrt(0.25) = half of 256


@pytest.mark.parametrize(
    "image_size, input_size, paper, expected, views",
    [
        (32, 32, False, CifarPipeline, 1),
        (32, 32, True, CifarPipeline, 1),
        (32, 224, False, CifarPipeline, 1),
        (32, 224, True, PaperPipeline, 10),
        (256, 224, True, PaperPipeline, 10),
        (256, 224, False, ModernPipeline, 1),
        (256, 227, True, PaperPipeline, 10),
    ],
)
def test_pipeline_choice(image_size, input_size, paper, expected, views):
    split = Split(torch.randint(0, 256, (4, 3, image_size, image_size), dtype=torch.uint8), torch.zeros(4))
    pipeline = make_pipeline(split, input_size, paper)
    assert type(pipeline) is expected and pipeline.views == views
    assert pipeline.train(split.images, torch.Generator().manual_seed(0)).shape == (4, 3, input_size, input_size)
    assert pipeline.evaluate(split.images).shape == (4, views, 3, input_size, input_size)


def test_cifar_alexnet_refuses_large_images():
    split = Split(torch.zeros(2, 3, 256, 256, dtype=torch.uint8), torch.zeros(2))
    with pytest.raises(DataError, match=r"CifarAlexNet \(-c\) takes 32x32 images, but these are 256x256; drop -c"):
        make_pipeline(split, 32, paper=False)


def test_cifar_pipeline_normalises_with_training_statistics():
    split = make_shapes(64, seed=0)
    mean, std = channel_stats(split.images)
    out = CifarPipeline(mean, std, input_size=32).evaluate(split.images)[:, 0]
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(out.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    x = split.images.numpy().astype(np.float64) / 255
    assert np.allclose(mean.numpy(), x.mean(axis=(0, 2, 3)), atol=1e-6)
    assert np.allclose(std.numpy(), x.std(axis=(0, 2, 3)), atol=1e-6)
    upsampled = CifarPipeline(mean, std, input_size=224).evaluate(split.images[:2])
    assert upsampled.shape == (2, 1, 3, 224, 224)


class Raw(Pipeline):
    def train(self, x, generator=None):
        return x

    def evaluate(self, x):
        return x.unsqueeze(1)


def index_split(n: int) -> Split:
    """Images whose every pixel is their own index, labels = index % 3."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return Split(images, torch.arange(n) % 3)


def test_loader_visits_every_image_once_per_epoch_in_a_new_order():
    loader = BatchLoader(index_split(103), 10, Raw(), train=True, index_generator=torch.Generator().manual_seed(0))
    assert len(loader) == math.ceil(103 / 10)
    orders = []
    for _ in range(2):
        seen = []
        for images, labels in loader:
            idx = images[:, 0, 0, 0].long()
            assert torch.equal(labels, idx % 3)  # labels travel with their images
            seen += idx.tolist()
        assert sorted(seen) == list(range(103))
        orders.append(seen)
    assert orders[0] != orders[1]


def test_eval_loader_keeps_order_and_does_not_augment():
    seen = [img[:, 0, 0, 0, 0].long() for img, _ in BatchLoader(index_split(25), 7, Raw(), train=False)]
    assert torch.cat(seen).tolist() == list(range(25))


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_from_the_cache_gives_the_same_batches_as_memory(tmp_path, workers):
    split = index_split(50)
    path = tmp_path / "cache.npy"
    np.save(path, split.images.numpy())
    mapped = Split(torch.from_numpy(np.load(path, mmap_mode="c")), split.labels, source=path)
    memory = BatchLoader(mapped.to("cpu"), 8, Raw(), True, index_generator=torch.Generator().manual_seed(3))
    stream = BatchLoader(mapped, 8, Raw(), True, index_generator=torch.Generator().manual_seed(3), workers=workers)
    assert stream.streaming and not memory.streaming
    for (a, la), (b, lb) in zip(memory, stream, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
