"""What every data set is made of: ``Split`` (uint8 images N x 3 x H x W and their labels),
``DataSet`` (a name, class names and the train and evaluation splits), ``DataOptions`` (what the
readers may need from the command line) and ``DataError``.

Labels are int64 class indices (N), or for multi-label data int8 N x C in VOC's own convention:
1 present, -1 absent, 0 "difficult only" (ignored by loss and metrics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from utils import UserError


class DataError(UserError):
    """A problem with the user's data (missing, corrupt, wrong layout): shown as one sentence."""


@dataclass
class Split:
    """One split of a data set: uint8 images N x 3 x H x W and their labels.

    ``source`` is the ``.npy`` cache the images are memory-mapped from, if any, so a streaming
    loader can reopen it in its worker processes instead of copying the array into each.
    """

    images: torch.Tensor
    labels: torch.Tensor
    source: Path | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def to(self, device: torch.device | str) -> Split:
        """A copy in ``device`` memory (a memory-mapped split is read into RAM)."""
        copy = self.source is not None
        return Split(self.images.to(device, copy=copy), self.labels.to(device, copy=copy))


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

    @property
    def multilabel(self) -> bool:
        return self.train.labels.dim() == 2


@dataclass
class DataOptions:
    """What the readers may need from the command line."""

    data_dir: Path = Path("dataset")
    download: bool = False
    coarse_labels: bool = False
    cache_dir: Path | None = None
    shapes_train: int = 8000
    shapes_test: int = 1600
    shapes_seed: int = 0
    decode_device: str = "cpu"  # where VOC JPEGs are decoded for the resize cache (cuda: nvJPEG)
