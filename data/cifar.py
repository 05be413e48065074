"""``Cifar10`` / ``Cifar100``: the official python pickles (read with ``data.pickles``'
restricted unpickler), found in ``--data-dir`` as a folder or as the official archive (unpacked
once, ``data.archives``), and checked for layout, class names and label range."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.archives import download_archive, extract_archive, require_data_dir
from data.core import ALONE, DataError, DataOptions, DataSet, Peers, Split
from data.pickles import safe_unpickle
from utils import printable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR version lives and how its files are laid out. ``labels`` and
    ``coarse_labels`` are (meta key of the class names, batch key of the labels, class count)."""

    title: str
    seed_name: str  # the original v2 tool's folder name under --data-dir
    folder: str  # the official folder name inside the archive
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels: tuple[bytes, bytes, int]
    coarse_labels: tuple[bytes, bytes, int] | None = None


CIFAR10 = CifarSpec(
    "CIFAR-10",
    "cifar-10",
    "cifar-10-batches-py",
    "cifar-10-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    (b"label_names", b"labels", 10),
)
CIFAR100 = CifarSpec(
    "CIFAR-100",
    "cifar-100",
    "cifar-100-python",
    "cifar-100-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
    ("train",),
    ("test",),
    "meta",
    (b"fine_label_names", b"fine_labels", 100),
    (b"coarse_label_names", b"coarse_labels", 20),
)


def _looks_like_cifar(folder: Path, spec: CifarSpec) -> bool:
    names = (spec.meta_file, *spec.train_files, *spec.test_files)
    return folder.is_dir() and any((folder / name).is_file() for name in names)


def find_cifar_folder(spec: CifarSpec, options: DataOptions) -> Path:
    """The folder holding the batch files: ``--data-dir`` itself, ``<seed_name>/``,
    ``<official folder>/`` or ``<seed_name>/<official folder>/``; failing those, the official
    archive in ``--data-dir`` or ``<seed_name>/``, unpacked once. ``--download`` fetches it."""
    data_dir = options.data_path
    if options.download:
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        require_data_dir(data_dir, f"{spec.title} ({spec.seed_name}/ or {spec.folder}/ or {spec.archive})")
    roots = [data_dir, data_dir / spec.seed_name]
    for root in roots:
        for folder in (root, root / spec.folder):
            if _looks_like_cifar(folder, spec):
                return folder
    archives = [root / spec.archive for root in roots if (root / spec.archive).is_file()]
    if not archives and options.download:
        archives = [download_archive(spec.url, spec.md5, data_dir, spec.title)]
    if archives:
        return extract_archive(
            archives[0], spec.folder, lambda f: _looks_like_cifar(f, spec), spec.title, options.cache_path
        )
    raise DataError(
        f"found no {spec.title} in {data_dir}: put the official python version there as {spec.seed_name}/, "
        f"{spec.folder}/ or {spec.archive}, or pass --download."
    )


MAX_CLASS_NAME = 100  # characters; the longest official name has 29


def class_names(meta: object, key: bytes, count: int, path: Path, title: str) -> list[str]:
    """The ``count`` class names under ``key`` of a meta file: unique, non-empty, printable
    UTF-8 text. The list sets the model's number of outputs, so a file that lists more or fewer
    names than the data set has would silently train another model."""
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path} is not a CIFAR meta file (no list of class names under {key!r}); replace it.")
    if len(names) != count:
        raise DataError(
            f"{path} lists {len(names)} class names under {key!r}, but {title} has {count}; replace it with the file "
            "from the official archive."
        )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        try:
            text = name.decode("utf-8") if isinstance(name, bytes) else name
        except UnicodeDecodeError:
            text, problem = name.decode("utf-8", "replace"), "not UTF-8 text"
        else:
            problem = (
                "empty"
                if not text
                else f"longer than {MAX_CLASS_NAME} characters"
                if len(text) > MAX_CLASS_NAME
                else "not printable text"
                if not text.isprintable()
                else f"the same as name {seen[text] + 1}"
                if text in seen
                else None
            )
        if problem:
            raise DataError(
                f"{path}: class name {i + 1} under {key!r} ({printable(repr(text[:40]))}) is {problem}; replace it "
                "with the file from the official archive."
            )
        seen[text] = i
    return list(seen)


def _label_array(labels: object) -> np.ndarray | None:
    """One int64 label per entry from a list of ints (the official files) or a 1-D integer
    array; None for anything else. Checked before numpy sees it: ``np.asarray`` of a list that
    repeats one big object would copy that object once per entry."""
    if isinstance(labels, np.ndarray):
        return labels.astype(np.int64) if labels.ndim == 1 and labels.dtype.kind in "iu" else None
    if isinstance(labels, list) and all(type(n) is int and -(2**63) <= n < 2**63 for n in labels):
        return np.array(labels, dtype=np.int64)
    return None


def read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> Split:
    """Images and labels of one official batch file, checked for layout and label range."""
    if not path.is_file():
        raise DataError(f"{path} is missing; copy the complete {path.parent.name} folder from the official archive.")
    batch = safe_unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path} is not a CIFAR batch file (it lacks b'data' or {label_key!r}); replace it.")
    data, labels = batch[b"data"], _label_array(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: b'data' must be a uint8 N x 3072 array, found {shape}; replace the file.")
    if labels is None or labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {label_key!r} must hold one whole-number label per image; replace the file.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels must be 0..{num_classes - 1}, found {labels.min()}..{labels.max()}; replace the file."
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(images, torch.from_numpy(labels))


def concat_splits(splits: list[Split]) -> Split:
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def load_cifar(spec: CifarSpec, options: DataOptions, name: str, peers: Peers = ALONE) -> DataSet:
    """CIFAR-10 or CIFAR-100 from the official python pickles (any number of images)."""
    with peers.first():  # a download or an unpacking, once
        folder = find_cifar_folder(spec, options)
    meta_path = folder / spec.meta_file
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing; copy the complete {spec.folder} folder from the official archive.")
    meta = safe_unpickle(meta_path)
    names_key, label_key, count = spec.coarse_labels if options.coarse_labels and spec.coarse_labels else spec.labels
    classes = class_names(meta, names_key, count, meta_path, spec.title)
    train = concat_splits([read_cifar_batch(folder / f, label_key, len(classes)) for f in spec.train_files])
    test = concat_splits([read_cifar_batch(folder / f, label_key, len(classes)) for f in spec.test_files])
    for split, files in ((train, spec.train_files), (test, spec.test_files)):
        if len(split) == 0:
            raise DataError(f"{folder / files[0]} holds no images; replace it with the file from the official archive.")
    logger.info(
        "%s from %s: %d training and %d test images, %d classes",
        spec.title,
        folder,
        len(train),
        len(test),
        len(classes),
    )
    return DataSet(name=name, classes=classes, train=train, test=test)
