"""Batched transforms: augmentation runs on whole uint8 batches as tensor code on the batch's
device, with independent random parameters per image. This avoids the per-image Python work of
a ``Dataset`` + ``DataLoader`` pipeline, which is what usually limits AlexNet training speed.

A ``Pipeline`` turns uint8 batches into model inputs (``CifarPipeline``, ``PaperPipeline``,
``ModernPipeline``); ``make_pipeline`` picks the one for a model input size and setup, with
statistics of the training split. ``Pipeline.state`` and ``pipeline_from_state`` carry a
pipeline's evaluation in checkpoints and exported files (``predict``, ``export``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from data.core import DataError, Split


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


def mean_image(images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The per-pixel mean image (3 x H x W, 0-255 units) of uint8 images, exact (float64)."""
    total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
    for start in range(0, images.shape[0], chunk):
        total += images[start : start + chunk].to(torch.float64).sum(0)
    return (total / images.shape[0]).float()


def rgb_eigen(images: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the 3x3 covariance of RGB values
    over all pixels of ``images``, in [0, 1] units (paper §4.1)."""
    n = 0
    total = torch.zeros(3, dtype=torch.float64, device=images.device)
    outer = torch.zeros(3, 3, dtype=torch.float64, device=images.device)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64).div(255).permute(1, 0, 2, 3).reshape(3, -1)
        n += x.shape[1]
        total += x.sum(1)
        outer += x @ x.T
    mean = total / n
    cov = outer / n - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(cov)
    return values.flip(0).float(), vectors.flip(1).float()


def pca_shift(alphas: torch.Tensor, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> torch.Tensor:
    """The paper's colour shift per image: ``[p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T`` (N x 3)."""
    return (alphas * eigenvalues) @ eigenvectors.T


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image ``size x size`` crops at (``top``, ``left``), mirrored where ``flip``.

    One ``gather`` over the flattened pixels with a per-image index map: about 4x faster on a
    CPU than advanced indexing with four broadcast index tensors, and the same on a GPU.
    """
    n, c, _, w = x.shape
    cols = torch.arange(size, device=x.device)
    cols = torch.where(flip[:, None], size - 1 - cols, cols) + left[:, None]  # a mirror reverses columns
    rows = torch.arange(size, device=x.device) + top[:, None]
    index = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, size * size).expand(n, c, size * size)
    return x.flatten(2).gather(2, index).view(n, c, size, size)


def random_crop_flip(
    x: torch.Tensor, size: int, padding: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random ``size x size`` crop of each image (zero-padded by ``padding``), mirrored with p = 0.5."""
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    n, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (n,), generator=generator, device=x.device)
    left = torch.randint(0, w - size + 1, (n,), generator=generator, device=x.device)
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    return crop_flip(x, top, left, flip, size)


def ten_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The paper's ten test patches (N x 10 x C x size x size): the four corners and the centre
    of the image, then the same five of its mirror image, in the order of torchvision's
    ``ten_crop``."""
    h, w = x.shape[-2:]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    crops = [img[..., top : top + size, left : left + size] for img in (x, x.flip(-1)) for top, left in corners]
    return torch.stack(crops, dim=1)


def crops(x: torch.Tensor, size: int, views: int) -> torch.Tensor:
    """The test views of ``size x size`` (N x views x C x size x size): the centre crop (1), or
    the paper's ten patches (10, ``ten_crop``, whose fifth is that centre crop)."""
    if views == 10:
        return ten_crop(x, size)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size].unsqueeze(1)


#: Images resampled at a time on a CPU: 4 x 3 x 224 x 256 float32 intermediates are 2.8 MB, and
#: chunks of 4 were 1.5x faster than whole batches of 16 on the 2-core CPU this was measured on.
CHUNK = 4


def _taps(centre: torch.Tensor, half: torch.Tensor, out: int, length: int) -> tuple[torch.Tensor, ...]:
    """Where each of ``out`` output pixels samples an axis of ``length`` pixels, for boxes given
    by their ``centre`` and signed ``half`` side in [-1, 1] units (N each; a negative side mirrors):
    the two neighbouring pixels (N x out) and the weight of the second, as ``grid_sample`` has
    it (pixel centres, ``align_corners=False``; positions clamped to the edge, ``"border"``)."""
    steps = (torch.arange(out, device=centre.device, dtype=torch.float32) * 2 + 1) / out - 1
    position = ((centre[:, None] + half[:, None] * steps + 1) * length - 1) / 2
    position = position.clamp(0, length - 1)
    low = position.floor()
    weight = position - low
    low = low.long()
    return low, (low + 1).clamp(max=length - 1), weight


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[n, c, rows[n]]`` for every image n and channel c (N x C x S x W): one ``index_select``
    of whole rows, which is a copy per row rather than a per-element gather."""
    n, c, h, w = x.shape
    base = (torch.arange(n * c, device=x.device) * h).view(n, c, 1)
    flat = (base + rows[:, None, :]).reshape(-1)
    return x.reshape(n * c * h, w).index_select(0, flat).view(n, c, rows.shape[1], w)


def _lerp(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``a + (b - a) * weight`` in float32, in place on a float copy of ``b``."""
    a = a.float()
    return b.float().sub_(a).mul_(weight).add_(a)


def resized_crops(x: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear ``size x size`` resamplings of per-image boxes of ``x`` (N x C x H x W, any real
    or uint8 dtype; float32 out, in the input's units). ``box`` is N x 4: centre x, centre y, half
    width, half height in [-1, 1] image units, a negative half width mirroring the crop. The same
    values as ``F.grid_sample`` with the affine grid of those boxes (``align_corners=False``,
    ``padding_mode="border"``), up to float rounding, computed separably: whole rows gathered and
    blended first, then columns: on one core of the 2-core CPU, 0.47 ms per 224 crop of a 256 uint8
    image against 1.0-1.2 ms for ``grid_sample`` of the float image (batches of 16)."""
    if x.device.type == "cpu" and x.shape[0] > CHUNK:  # intermediates that stay in the CPU's caches
        return torch.cat(
            [resized_crops(x[i : i + CHUNK], box[i : i + CHUNK], size) for i in range(0, x.shape[0], CHUNK)]
        )
    n, _, h, w = x.shape
    top, bottom, wy = _taps(box[:, 1], box[:, 3], size, h)
    left, right, wx = _taps(box[:, 0], box[:, 2], size, w)
    x = _lerp(_rows(x, top), _rows(x, bottom), wy[:, None, :, None])  # N x C x size x W
    left, right = (i.view(n, 1, 1, size).expand(-1, x.shape[1], size, -1) for i in (left, right))
    return _lerp(x.gather(3, left), x.gather(3, right), wx[:, None, None, :])


def random_resized_crop_flip(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image random box (area fraction in ``scale``, aspect ratio in ``ratio``, log-uniform),
    resampled bilinearly to ``size x size`` and mirrored with p = 0.5 (``resized_crops``: float32
    out, in the units of ``x``, which may be uint8)."""
    n = x.shape[0]
    device = x.device
    area = torch.empty(n, device=device).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    # Box sides as fractions of the image, clipped to fit (the clip slightly favours full-width boxes).
    bw = (area * aspect).sqrt().clamp(max=1.0)
    bh = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - bw)
    cy = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - bh)
    sign = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    return resized_crops(x, torch.stack([cx, cy, bw * sign, bh], dim=1), size)


class Pipeline:
    """Turns uint8 batches into model inputs. ``train`` augments; ``evaluate`` returns
    ``views`` inputs per image (N x V x C x H x W) whose predictions are averaged."""

    name = "base"
    views = 1

    def train(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def with_views(self, views: int) -> Pipeline:
        """This pipeline evaluating ``views`` views per image (``--crops``): 1, the centre crop;
        10, the four corners and the centre and their mirrors, the paper's ten patches. The
        training augmentation is unchanged."""
        if views not in (1, 10):
            raise ValueError(f"views must be 1 or 10, not {views}")
        other = copy.copy(self)
        other.views = views
        return other

    def to(self, device: torch.device | str) -> Pipeline:
        """This pipeline with its statistics on ``device``."""
        other = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(other, name, value.to(device))
        return other

    def state(self) -> dict[str, Any]:
        """What rebuilds this pipeline's evaluation (``pipeline_from_state``): its ``kind`` and its
        statistics as CPU tensors and plain numbers, for checkpoints and exported files."""
        raise NotImplementedError


def _stat(state: dict[str, Any], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``state[key]``: a finite float tensor of ``shape`` (a checkpoint is untrusted input)."""
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) != shape:
        raise ValueError(f"has a {key} that is not a float tensor of shape {list(shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"has a {key} with NaN or infinite values")
    return value.float()


def _size(state: dict[str, Any], key: str, low: int = 1, high: int = 4096) -> int:
    value = state.get(key)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(
            f"has {'an' if key[0] in 'aeiou' else 'a'} {key} that is not a whole number from {low} to {high}"
        )
    return value


def pipeline_from_state(
    state: object, input_size: int | None = None, image_size: int | None = None, largest: int = 4096
) -> Pipeline:
    """The pipeline a ``Pipeline.state()`` describes, every entry checked (``ValueError`` with
    the problem in words that complete "the pipeline ..."); the paper pipeline's ``base`` (the
    side of its mean image, to which every image is resized) at most ``largest``.

    With the network's ``input_size`` and the side of the square images it is fed
    (``image_size``), also that the pipeline is one ``make_pipeline`` builds for them, so that
    evaluating it gives that network its inputs: a ``cifar`` pipeline makes ``input_size``
    inputs by enlarging the images (never shrinking them), a ``modern`` one crops
    ``input_size`` out of them, a ``paper`` one crops ``input_size`` out of its ``base``
    squares. A checkpoint is untrusted input: these are checked before anything is built from
    it, so a crafted size can neither crash the network nor make it allocate gigabytes."""
    if not isinstance(state, dict) or state.get("kind") not in ("cifar", "paper", "modern"):
        raise ValueError("is not a cifar, paper or modern pipeline")
    kind = state["kind"]
    if kind in ("cifar", "modern"):
        std = _stat(state, "std", (3,))
        if not bool((std > 0).all()):
            raise ValueError("has a std that is not positive")
        mean = _stat(state, "mean", (3,))
    if kind == "cifar":
        size = _size(state, "input_size")
        _fits(size, input_size)
        if image_size is not None and image_size > size:
            raise ValueError(f"enlarges images to {size} pixels, but its image_size is {image_size}")
        return CifarPipeline(mean, std, size, _size(state, "padding", 0))
    if kind == "modern":
        crop = _size(state, "crop")
        _fits(crop, input_size)
        if image_size is not None and image_size < crop:
            raise ValueError(f"crops {crop} pixels, more than its image_size of {image_size}")
        return ModernPipeline(mean, std, crop=crop)
    base, crop = _size(state, "base", high=largest), _size(state, "crop")
    sigma = state.get("sigma")
    if crop > base or type(sigma) is not float or not 0 <= sigma <= 1 or state.get("fidelity") not in ("code", "text"):
        raise ValueError("has a crop larger than its images, a sigma that is not a number, or an unknown fidelity")
    _fits(crop, input_size)
    return PaperPipeline(
        _stat(state, "mean_image", (3, base, base)),
        _stat(state, "eigenvalues", (3,)),
        _stat(state, "eigenvectors", (3, 3)),
        crop=crop,
        base=base,
        sigma=sigma,
        fidelity=state["fidelity"],
    )


def _fits(size: int, input_size: int | None) -> None:
    if input_size is not None and size != input_size:
        raise ValueError(f"makes {size}-pixel inputs, but the network takes {input_size}")


class CifarPipeline(Pipeline):
    """32x32 data: random crop of the 4-pixel zero-padded image and mirror; normalise by the
    training set's channel mean and std; for a 224-input model the batch is then upsampled
    bilinearly (the original v2 tool's other way of feeding CIFAR to AlexNet)."""

    name = "cifar"

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, input_size: int, padding: int = 4) -> None:
        self.mean, self.std = mean, std
        # (x / 255 - mean) / std as one multiply-add on the uint8 values.
        self.scale = (1 / (255 * std)).view(1, 3, 1, 1)
        self.shift = (-mean / std).view(1, 3, 1, 1)
        self.input_size = input_size
        self.padding = padding

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, x.float(), self.scale)
        if x.shape[-1] != self.input_size:
            # Bilinear resampling commutes with the per-channel affine normalisation.
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return x

    def train(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.padding:
            x = random_crop_flip(x, x.shape[-1], self.padding, generator)
        return self._finish(x)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        if self.views == 1:
            return self._finish(x).unsqueeze(1)
        # The ten crops of the padded image that training draws from: corners, centre, mirrors.
        n, size = x.shape[0], x.shape[-1]
        p = self.padding
        views = ten_crop(F.pad(x, (p, p, p, p)), size)
        return self._finish(views.flatten(0, 1)).unflatten(0, (n, self.views))

    def describe(self) -> str:
        resize = f", upsampled to {self.input_size}" if self.input_size != 32 else ""
        return f"random crop (pad {self.padding}) + mirror{resize}, channel-normalised"

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "mean": self.mean.cpu(),
            "std": self.std.cpu(),
            "input_size": self.input_size,
            "padding": self.padding,
        }


class PaperPipeline(Pipeline):
    """The paper's recipe (§4.1, §5) on 256x256 images: mean image, PCA colour shift (a new draw
    per image per use), random ``crop`` patches and their mirrors; evaluation on the ten patches.
    Inputs stay in 0-255 units as in the paper. Smaller images (CIFAR) are first upsampled to
    256 on the batch. Where the paper's text leaves the details open, ``fidelity`` chooses:

    - ``"text"``: subtract the 256x256 mean image, add ``255 [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T``
      with ``a ~ N(0, sigma)`` and the eigenvalues ``l`` of the [0, 1]-unit covariance, then crop;
    - ``"code"`` (the 2012 release's convdata.py): crop and mirror, subtract the centre
      ``crop x crop`` patch of the mean image from every patch (convdata.py:137, 222-226; at test
      too), add ``sigma * [p1 p2 p3] (s * z)`` with ``z ~ N(0, 1)`` and ``s`` the standard
      deviations along the eigenvectors in 0-255 units (``255 sqrt(l)``; convdata.py:40-42, 113,
      201-203), then divide the whole patch by ``1 + sigma`` (convdata.py:205) so the training
      inputs keep the test inputs' scale. The release drew one crop per chunk of 32 images
      (convdata.py:125, 252-258); here each image has its own, as the paper says.
    """

    name = "paper"
    views = 10

    def __init__(
        self,
        mean_image: torch.Tensor,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
        crop: int = 224,
        base: int = 256,
        sigma: float = 0.1,
        fidelity: str = "code",
    ) -> None:
        self.base = base
        if mean_image.shape[-1] != base:
            mean_image = F.interpolate(mean_image[None], size=(base, base), mode="bilinear", align_corners=False)[0]
        self.mean_image = mean_image
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.crop = crop
        self.sigma = sigma
        self.fidelity = fidelity
        border = (base - crop) // 2
        self.mean_crop = mean_image[:, border : border + crop, border : border + crop]
        # The standard deviation along each eigenvector, in pixel units (0-255).
        self.stdevs = 255 * eigenvalues.clamp_min(0).sqrt()
        if fidelity not in ("code", "text"):
            raise ValueError(f"fidelity must be code or text, not {fidelity!r}")

    def _based(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != self.base:
            x = F.interpolate(x, size=(self.base, self.base), mode="bilinear", align_corners=False)
        return x

    # Chosen per call, not bound once: a copy (``with_views``, ``to``) works on its own attributes.
    def train(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        train = self._train_release if self.fidelity == "code" else self._train_text
        return train(self._based(x), generator)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        evaluate = self._evaluate_release if self.fidelity == "code" else self._evaluate_text
        return evaluate(self._based(x))

    def _train_text(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = x - self.mean_image
        alphas = torch.randn(x.shape[0], 3, generator=generator, device=x.device) * self.sigma
        x = x + 255 * pca_shift(alphas, self.eigenvalues, self.eigenvectors)[:, :, None, None]
        return random_crop_flip(x, self.crop, 0, generator)

    def _evaluate_text(self, x: torch.Tensor) -> torch.Tensor:
        return crops(x - self.mean_image, self.crop, self.views)

    def _train_release(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # The same draws in the same order as the text's: the colour first, then the crops.
        z = torch.randn(x.shape[0], 3, generator=generator, device=x.device)
        noise = self.sigma * (z * self.stdevs) @ self.eigenvectors.T
        x = random_crop_flip(x, self.crop, 0, generator) - self.mean_crop
        return (x + noise[:, :, None, None]) / (1 + self.sigma)

    def _evaluate_release(self, x: torch.Tensor) -> torch.Tensor:
        return crops(x, self.crop, self.views) - self.mean_crop

    def describe(self) -> str:
        if self.fidelity == "code":
            return (
                f"paper (2012 code): random {self.crop} crops + mirror, centre mean crop, PCA colour "
                f"({self.sigma} x stdev) then / {1 + self.sigma:g}; 10-crop test"
            )
        return f"paper: mean image, PCA colour (sigma {self.sigma}), random {self.crop} crops + mirror; 10-crop test"

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "mean_image": self.mean_image.cpu(),
            "eigenvalues": self.eigenvalues.cpu(),
            "eigenvectors": self.eigenvectors.cpu(),
            "crop": self.crop,
            "base": self.base,
            "sigma": float(self.sigma),
            "fidelity": self.fidelity,
        }


class ModernPipeline(Pipeline):
    """224-input models on 256x256 images without ``-pt``: random-resized crop (25-100 % of the
    area, aspect 3/4-4/3) and mirror, channel normalisation; centre crop for evaluation. The
    area floor is 25 % rather than torchvision's 8 % because VOC is multi-label: small crops
    often cut away every labelled object."""

    name = "modern"

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, crop: int = 224, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)):
        self.mean = mean.view(1, 3, 1, 1)
        self.std = std.view(1, 3, 1, 1)
        self.crop = crop
        self.scale = scale
        self.ratio = ratio

    def train(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # Resampled from uint8 (the same values as from x / 255, scaled after), normalised in place.
        x = random_resized_crop_flip(x, self.crop, self.scale, self.ratio, generator)
        return x.mul_(1 / (255 * self.std)).sub_(self.mean / self.std)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        x = crops(x, self.crop, self.views).float().div_(255)
        return (x - self.mean) / self.std

    def describe(self) -> str:
        return f"random-resized crop {self.crop} (area {self.scale[0]:.0%}-100%) + mirror; centre crop test"

    def state(self) -> dict[str, Any]:
        # The training-only settings (scale, ratio) are not needed to evaluate.
        return {"kind": self.name, "mean": self.mean.view(3).cpu(), "std": self.std.view(3).cpu(), "crop": self.crop}


def make_pipeline(
    train: Split, input_size: int, paper: bool, device: torch.device | str = "cpu", fidelity: str = "code"
) -> Pipeline:
    """The transform for a model input size and setup, with statistics of the training split
    (computed where the split lives, or those a sharded cache stored; kept on ``device``).

    - 32-input model (CifarAlexNet): CIFAR crop + flip, whatever the setup (and ``fidelity``).
    - 224/227-input model with ``paper``: the paper's pipeline (10-crop evaluation), as the 2012
      code did it or as the text says (``fidelity``, see ``PaperPipeline``).
    - 224/227-input model on 32x32 data: CIFAR crop + flip, then upsampled.
    - 224/227-input model on 256x256 data: random-resized crop.
    """
    size = train.images.shape[-1]
    if input_size == 32 and size != 32:
        raise DataError(f"CifarAlexNet (-c) takes 32x32 images, but these are {size}x{size}; drop -c.")

    def stats(fn: Callable) -> list[torch.Tensor]:
        # A sharded cache stored these while it was prepared: nothing is decoded at start-up.
        out = getattr(train.images, fn.__name__)() if train.stored else fn(train.images)
        return [t.to(device) for t in (out if isinstance(out, tuple) else (out,))]

    if input_size == 32:
        return CifarPipeline(*stats(channel_stats), input_size=32)
    if paper:
        return PaperPipeline(*stats(mean_image), *stats(rgb_eigen), crop=input_size, fidelity=fidelity)
    if size < input_size:
        return CifarPipeline(*stats(channel_stats), input_size=input_size)
    return ModernPipeline(*stats(channel_stats), crop=input_size)
