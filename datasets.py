"""Data sets, batched transforms and loaders: the public face of the ``data`` package, which
holds them one job per module. The rest of the project imports from here.

- ``data.core``: ``DataError``, ``Split`` (uint8 images N x 3 x H x W and labels), ``DataSet``,
  ``DataOptions``.
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

from data.archives import extract_archive, is_writable_dir
from data.cifar import read_cifar_batch
from data.core import DataError, DataOptions, DataSet, Split
from data.folders import ImageLists, image_folder_lists, stratified_split, stratified_subset
from data.imagenet import imagenet_lists
from data.images import decode_resized, to_rgb
from data.loaders import (
    BatchLoader,
    Loaders,
    _ignore_stop_signals,
    eval_loader,
    fits_in_memory,
    make_loaders,
    place_split,
)
from data.pickles import PLAIN_DTYPES, CifarUnpickler, safe_unpickle
from data.registry import DATASETS, load_dataset
from data.shapes import SHAPES_CLASSES, make_shapes
from data.shards import ShardStore, shard_split

from data.transforms import (  # isort: skip (one line per name would repeat tests/test_transforms.py's list)
    CifarPipeline, ModernPipeline, PaperPipeline, Pipeline, channel_stats, crop_flip, make_pipeline, mean_image,
    pca_shift, random_crop_flip, random_resized_crop_flip, rgb_eigen, ten_crop,
)  # fmt: skip
from data.voc import VOC_CLASSES, VOC_MD5, VOC_URL, parse_voc_xml, read_image_list

__all__ = [
    "DATASETS", "PLAIN_DTYPES", "SHAPES_CLASSES", "VOC_CLASSES", "VOC_MD5", "VOC_URL",
    "BatchLoader", "CifarPipeline", "CifarUnpickler", "DataError", "DataOptions", "DataSet", "ImageLists", "Loaders",
    "ModernPipeline", "PaperPipeline", "Pipeline", "ShardStore", "Split",
    "_ignore_stop_signals", "channel_stats", "crop_flip", "decode_resized", "eval_loader",
    "extract_archive", "fits_in_memory", "image_folder_lists", "imagenet_lists", "is_writable_dir", "load_dataset",
    "make_loaders", "make_pipeline", "make_shapes", "mean_image", "parse_voc_xml", "pca_shift", "place_split",
    "random_crop_flip", "random_resized_crop_flip", "read_cifar_batch", "read_image_list", "rgb_eigen", "safe_unpickle",
    "shard_split", "stratified_split", "stratified_subset", "ten_crop", "to_rgb",
]  # fmt: skip
