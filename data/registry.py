"""The registry of data sets (``DATASETS``): each one's reader, the size of the images it yields,
its task and the reader options it takes; ``load_dataset`` reads one by name and checks that its
labels are those of its task.

- ``Shapes``: built in, generated from a seed (no download; ``data.shapes``).
- ``Cifar10`` / ``Cifar100``: the official python pickles, read with a restricted unpickler
  (``data.cifar``, ``data.pickles``).
- ``PascalVOC2012``: JPEGs + XML, multi-label; images resized once (short side 256, centre
  256x256) into a cache next to the data (``data.voc``, ``data.cache``).
- ``ImageNet``: ILSVRC-2012 in its usual layouts, 1,000 classes in sorted-wnid order, no
  download (``data.imagenet``); images resized once to 256x256 into the sharded cache.
- ``ImageFolder``: the user's own ``<class>/`` folders, any format Pillow reads (``data.folders``);
  resized to 256x256, or 32x32 for the 32x32 network (``resizable``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data.cifar import CIFAR10, CIFAR100, load_cifar
from data.core import ALONE, DataError, DataOptions, DataSet, Peers
from data.folders import PAPER_SIZE, load_image_folder
from data.imagenet import load_imagenet
from data.shapes import load_shapes
from data.voc import VOC_CACHE_SIZE, load_voc2012
from utils import short_reason

SINGLE_LABEL = "single-label"
MULTI_LABEL = "multi-label"
TASKS = (SINGLE_LABEL, MULTI_LABEL)
#: Reader options every data set accepts; the others are listed by the data sets that take them.
COMMON_OPTIONS = frozenset({"data_dir", "download", "cache_dir", "image_size", "resize_workers"})
#: The training subset flags (``data.folders.stratified_subset``).
SUBSET = frozenset({"train_fraction", "train_size"})


@dataclass(frozen=True)
class DatasetInfo:
    """A registered data set: its reader, the size of the images it yields, its task
    (``single-label``: one class per image; ``multi-label``: 1 / -1 / 0 per class, VOC style)
    and the reader options it takes beyond ``COMMON_OPTIONS``. A ``resizable`` one is resized to
    whatever the model takes (``DataOptions.image_size``: 32 for the 32x32 network), so
    ``image_size`` is only its default. Training picks its task from the labels
    (``DataSet.multilabel``), so ``load_dataset`` holds a reader to the ``task`` declared here."""

    load: Callable[[DataOptions, Peers], DataSet]
    image_size: int
    task: str = SINGLE_LABEL
    options: frozenset[str] = frozenset()
    resizable: bool = False

    def accepts(self, option: str) -> bool:
        return option in COMMON_OPTIONS or option in self.options


DATASETS: dict[str, DatasetInfo] = {
    "Shapes": DatasetInfo(
        lambda options, peers: load_shapes(options),
        32,
        options=frozenset({"shapes_train", "shapes_test", "shapes_seed"}),
    ),
    "Cifar10": DatasetInfo(lambda options, peers: load_cifar(CIFAR10, options, "Cifar10", peers), 32),
    "Cifar100": DatasetInfo(
        lambda options, peers: load_cifar(CIFAR100, options, "Cifar100", peers),
        32,
        options=frozenset({"coarse_labels"}),
    ),
    "PascalVOC2012": DatasetInfo(load_voc2012, VOC_CACHE_SIZE, task=MULTI_LABEL),
    "ImageNet": DatasetInfo(load_imagenet, PAPER_SIZE, options=SUBSET),
    "ImageFolder": DatasetInfo(load_image_folder, PAPER_SIZE, options=SUBSET | {"val_fraction"}, resizable=True),
}


def load_dataset(name: str, options: DataOptions, peers: Peers = ALONE) -> DataSet:
    """Load the data set registered under ``name``; under torchrun every process calls it with
    its ``peers`` (``training.distributed.data_peers``), and they build any cache together."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
    info = DATASETS[name]
    try:
        data = info.load(options, peers)
    except OSError as error:  # permissions, I/O errors: whatever the readers did not foresee
        where = error.filename or options.data_dir
        cache = options.cache_path
        if cache is not None and error.filename and Path(os.path.abspath(where)).is_relative_to(cache.absolute()):
            raise DataError(
                f"cannot write the resize cache in {where} ({short_reason(error.strerror or error)}); give this user "
                f"write access to --cache-dir {cache}, or pass another --cache-dir."
            ) from None
        raise DataError(
            f"cannot read {where} ({short_reason(error.strerror or error)}); check that this user may read it, "
            "or pass another --data-dir."
        ) from None
    if data.multilabel != (info.task == MULTI_LABEL):  # a reader's bug, not the user's
        task = MULTI_LABEL if data.multilabel else SINGLE_LABEL
        raise RuntimeError(f"the {name} reader made {task} labels, but its registry entry says {info.task}")
    return data
