"""Data sets, batched transforms and loaders: the public face of the ``data`` package, which
holds them one job per module. It re-exports what the command line (``main.py``) and the
benchmarks use; everything else, tests included, imports a name from the module that defines it.

- ``data.core``: ``DataError``, ``Split`` (uint8 images N x 3 x H x W and labels), ``DataSet``,
  ``DataOptions``, ``Peers``.
- ``data.registry``: ``DATASETS`` (reader, image size, task and options of each data set) and
  ``load_dataset``.
- Readers, one module per data set: ``data.shapes`` (built in, generated from a seed),
  ``data.cifar`` (``Cifar10`` / ``Cifar100``: the official python pickles), ``data.voc``
  (``PascalVOC2012``: JPEGs + XML, multi-label), ``data.imagenet`` (``ImageNet``: ILSVRC-2012's
  layouts, sorted-wnid classes) and ``data.folders`` (``ImageFolder``: the user's class folders;
  the file lists, stratified splits and subsets the ImageNet reader shares).
- ``data.prepare``: ``python main.py prepare``, the resize cache built without training.
- What the readers share: ``data.archives`` (data folders, downloads, archive extraction),
  ``data.pickles`` (the restricted CIFAR unpickler), ``data.images`` (decoding and resizing one
  image) and ``data.shards`` (the sharded image cache).
- ``data.transforms``: batched augmentation and the ``Pipeline`` classes; ``make_pipeline``.
- ``data.loaders``: ``BatchLoader``, ``place_split`` (on the device or streamed from the cache),
  ``eval_loader`` and ``make_loaders``, which builds a run's loaders as the trainer uses them.
"""

from __future__ import annotations

from data.core import DataOptions, DataSet, Split
from data.loaders import make_loaders
from data.registry import DATASETS, load_dataset
from data.transforms import channel_stats, make_pipeline, mean_image, rgb_eigen

__all__ = [
    "DATASETS",
    "DataOptions",
    "DataSet",
    "Split",
    "channel_stats",
    "load_dataset",
    "make_loaders",
    "make_pipeline",
    "mean_image",
    "rgb_eigen",
]
