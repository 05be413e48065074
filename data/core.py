"""What every data set is made of: ``Split`` (uint8 images N x 3 x H x W and their labels),
``DataSet`` (a name, class names and the train and evaluation splits), ``DataOptions`` (what the
readers may need from the command line), ``Peers`` (the processes that read it together) and
``DataError``.

Labels are int64 class indices (N), or for multi-label data int8 N x C in VOC's own convention:
1 present, -1 absent, 0 "difficult only" (ignored by loss and metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from settings.rules import FLAG, PATH, Check, setting
from utils import UserError


class DataError(UserError):
    """A problem with the user's data (missing, corrupt, wrong layout): shown as one sentence."""


class Images(Protocol):
    """What a split's images offer wherever they are held: a uint8 tensor N x 3 x H x W has it,
    and so has the sharded cache (``data.shards.ShardStore``), which decodes on access. Declared
    here so that ``Split`` names what it needs without importing the cache, which imports it."""

    @property
    def shape(self) -> torch.Size: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def numel(self) -> int: ...

    def element_size(self) -> int: ...

    def __getitem__(self, key: Any) -> torch.Tensor: ...


@dataclass
class Split:
    """One split of a data set: uint8 images N x 3 x H x W and their labels.

    ``images`` is a tensor, or a ``data.shards.ShardStore`` (the sharded image cache), which
    indexes like one and decodes on access: ``to`` decodes it whole into memory, a streaming
    ``BatchLoader`` reads it batch by batch. ``source`` is a ``.npy`` cache the images are
    memory-mapped from, if any, so a streaming loader can reopen it in its worker processes.
    """

    images: Images
    labels: torch.Tensor
    source: Path | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        """The images' size decoded, in bytes."""
        return self.images.numel() * self.images.element_size()

    @property
    def stored(self) -> bool:
        """Whether the images are a sharded cache still to be decoded (not a tensor)."""
        return not isinstance(self.images, torch.Tensor)

    def to(self, device: torch.device | str) -> Split:
        """A copy in ``device`` memory (a memory-mapped split is read, a sharded one decoded, into RAM)."""
        if self.stored:  # a ShardStore: the one kind of images that is not a tensor
            return Split(self.images.decode_all().to(device), self.labels.to(device, copy=True))
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


def _alone(value: Any) -> list[Any]:
    return [value]


@dataclass(frozen=True)
class Peers:
    """The processes that read a data set together, as the readers see them: this one's ``rank``
    among ``world`` of them, how many share this machine's cores (``local``), and ``gather``,
    which each of them calls at the same point and which returns every one's value in rank
    order. The default is one process alone; under torchrun ``training.distributed.data_peers``
    makes them, so that nothing under ``data/`` knows the process group."""

    rank: int = 0
    world: int = 1
    local: int = 1
    gather: Callable[[Any], list[Any]] = _alone

    @contextmanager
    def first(self) -> Iterator[None]:
        """Rank 0 runs the block while the others wait, then they run it: a download or an
        unpacking happens once, and the others find it done. A ``DataError`` that rank 0 raises
        there is raised by every process, instead of leaving them waiting."""
        if self.world == 1:
            yield
        elif self.rank == 0:
            try:
                yield
            except DataError as error:
                self.gather(str(error))
                raise
            self.gather(None)
        else:
            problem = self.gather(None)[0]
            if problem is not None:
                raise DataError(problem)
            yield


#: One process, reading alone.
ALONE = Peers()

#: Generated images: far beyond what a Shapes experiment needs, far below what overflows.
MAX_SHAPES = 10_000_000


@dataclass(frozen=True)
class DataOptions:
    """What the readers may need from the command line. ``TrainConfig`` holds these fields, so
    they are plain values a checkpoint can store: paths are text ("" for no cache folder), read
    as ``data_path`` and ``cache_path``. Each field's ``setting`` says what may change it."""

    data_dir: str = setting("dataset", PATH, resume=True, evaluate=True, identity=False)
    download: bool = setting(False, FLAG, resume=True, evaluate=True, identity=False, per_process=True)
    coarse_labels: bool = setting(False, FLAG, evaluate=True)
    cache_dir: str = setting("", PATH, resume=True, evaluate=True, identity=False, per_process=True)
    shapes_train: int = setting(8000, Check(int, 1, MAX_SHAPES), evaluate=True)
    shapes_test: int = setting(1600, Check(int, 1, MAX_SHAPES), evaluate=True)
    shapes_seed: int = setting(0, Check(int, 0, 2**31 - 1), evaluate=True)
    # ImageFolder: the share of each class held out for evaluation when there is no val/ folder.
    val_fraction: float = setting(0.1, Check(float, 0, 1, low_open=True, high_open=True))
    # A class-stratified subset of the training split (ImageNet, ImageFolder): a fraction, or a
    # number of images (0: all); drawn from a fixed seed (data.folders.SPLIT_SEED).
    train_fraction: float = setting(1.0, Check(float, 0, 1, low_open=True))
    train_size: int = setting(0, Check(int, 0, 2**31 - 1))
    # The side ImageFolder images are resized to: the paper's 256, or 32 for the 32x32 network
    # (main.config_from_args sets it from the model).
    image_size: int = setting(256, Check(int, 8, 4096))
    # Processes that build the resize cache (0: one per core).
    resize_workers: int = setting(0, Check(int, 0, 1024), resume=True, evaluate=True, identity=False, per_process=True)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def cache_path(self) -> Path | None:
        return Path(self.cache_dir) if self.cache_dir else None
