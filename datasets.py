"""Data sets, batched transforms and loaders.

Every data set is read once into memory as uint8 images (N x 3 x H x W) plus labels and, where it
fits, moved to the training device whole; augmentation then runs on whole batches as tensor code
with independent random parameters per image. This avoids the per-image Python work of a
``Dataset`` + ``DataLoader`` pipeline, which is what usually limits AlexNet training speed.
Data that do not fit are streamed from their on-disk cache by a ``DataLoader`` with workers.

Data sets (``DATASETS``):

- ``Shapes``: built in, generated from a seed (no download).
- ``Cifar10`` / ``Cifar100``: the official python pickles, read with a restricted unpickler.
- ``PascalVOC2012``: JPEGs + XML, multi-label; images resized once (short side 256, centre
  256x256) into a cache next to the data.

Labels are int64 class indices (N), or for multi-label data int8 N x C in VOC's own convention:
1 present, -1 absent, 0 "difficult only" (ignored by loss and metrics).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import math
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from utils import UserError, atomic_write_json, short_reason, temp_file_beside

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------
# Shapes: the built-in data set


SHAPES_CLASSES = [
    "disc", "square", "triangle", "diamond", "plus",
    "cross", "ring", "frame", "hbar", "vbar",
]  # fmt: skip


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape ``label`` in coordinates scaled so the shape spans about [-1, 1]."""
    au, av = np.abs(u), np.abs(v)
    if label == 0:  # disc
        return u * u + v * v <= 1.0
    if label == 1:  # square
        return np.maximum(au, av) <= 0.8
    if label == 2:  # triangle, apex up (image rows grow downwards)
        return (v <= 0.75) & (au <= 0.95 * (v + 0.95) / 1.7)
    if label == 3:  # diamond
        return au + av <= 1.0
    if label == 4:  # plus
        return ((au <= 0.28) & (av <= 1.0)) | ((av <= 0.28) & (au <= 1.0))
    if label == 5:  # diagonal cross
        return ((np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4)) & (np.maximum(au, av) <= 0.85)
    if label == 6:  # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if label == 7:  # hollow square
        m = np.maximum(au, av)
        return (m <= 0.85) & (m >= 0.5)
    if label == 8:  # horizontal bar
        return (au <= 1.0) & (av <= 0.3)
    if label == 9:  # vertical bar
        return (au <= 0.3) & (av <= 1.0)
    raise ValueError(f"no shape {label}")


def make_shapes(n: int, seed: int, size: int = 32) -> Split:
    """``n`` images of ten classes of coloured shapes, the same for the same ``(n, seed)``.

    Each image has a random dark background colour with a smooth brightness gradient, one shape
    of random size (radius 6-12 px at 32 px), position and colour (96-160 levels brighter than
    the background in every channel), anti-aliased by 2x2 supersampling, and Gaussian pixel
    noise (sigma 12). Classes are balanced and shuffled.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES))
    scale = size / 32
    radius = rng.uniform(6, 12, n) * scale
    margin = 0.8 * radius
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)

    sub = (np.arange(2) + 0.5) / 2  # 2x2 supersampling offsets within a pixel
    coords = (np.arange(size)[:, None] + sub[None, :]).reshape(-1)  # size*2 positions
    coverage = np.empty((n, size, size), np.float32)
    for label in range(len(SHAPES_CLASSES)):
        idx = np.flatnonzero(labels == label)
        if idx.size == 0:
            continue
        r = radius[idx, None, None]
        u = (coords[None, None, :] - cx[idx, None, None]) / r
        v = (coords[None, :, None] - cy[idx, None, None]) / r
        inside = _shape_mask(label, u, v).astype(np.float32)  # k x 2size x 2size
        coverage[idx] = inside.reshape(idx.size, size, 2, size, 2).mean(axis=(2, 4))

    # A darker background than the shape in every channel: with random contrast polarity the
    # task is far harder and a plain AlexNet needs many epochs before it starts learning.
    background = rng.uniform(0, 96, (n, 3, 1, 1))
    shape_colour = background + rng.uniform(96, 160, (n, 3, 1, 1))
    angle = rng.uniform(0, 2 * math.pi, n)
    ramp = (np.cos(angle)[:, None, None] * (np.arange(size)[None, None, :] / size - 0.5)
            + np.sin(angle)[:, None, None] * (np.arange(size)[None, :, None] / size - 0.5))  # fmt: skip
    background = background + 32 * ramp[:, None]
    alpha = coverage[:, None]
    image = alpha * shape_colour + (1 - alpha) * background
    image += rng.normal(0, 12, image.shape)
    images = torch.from_numpy(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def load_shapes(options: DataOptions) -> DataSet:
    """The built-in data set: generated, never downloaded, train and test from separate seeds."""
    return DataSet(
        name="Shapes",
        classes=list(SHAPES_CLASSES),
        train=make_shapes(options.shapes_train, seed=2 * options.shapes_seed),
        test=make_shapes(options.shapes_test, seed=2 * options.shapes_seed + 1),
    )


# --------------------------------------------------------------------------------------------
# Files and folders


def user_cache_dir() -> Path:
    """Where caches go when the data folder is read-only: $XDG_CACHE_HOME/alexnet."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alexnet"


def is_writable_dir(path: Path) -> bool:
    """Whether files can be created in ``path`` (tried for real: permissions lie on some mounts)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def require_data_dir(data_dir: Path, what: str) -> None:
    """One clear sentence when ``--data-dir`` itself is missing or not a folder."""
    if not data_dir.exists():
        raise DataError(f"data folder {data_dir} does not exist; create it and put {what} in it, or pass --data-dir.")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder; pass the folder that holds {what}.")
    try:
        next(data_dir.iterdir(), None)
    except OSError as error:
        raise DataError(
            f"cannot read data folder {data_dir} ({short_reason(error.strerror or error)}); give this user read "
            "access to it, or pass another --data-dir."
        ) from None


def download(url: str, md5: str, root: Path, what: str) -> None:
    """Fetch and unpack an official archive with torchvision's checksummed downloader."""
    from torchvision.datasets.utils import download_and_extract_archive

    logger.info("downloading %s from %s into %s", what, url, root)
    try:
        download_and_extract_archive(url, download_root=str(root), md5=md5)
    except Exception as error:  # noqa: BLE001 (network, disk or checksum: all end the same way for the user)
        raise DataError(
            f"could not download {what} from {url} ({short_reason(error)}); download it by hand and put it in {root}."
        ) from None


def extract_archive(archive: Path, cache_dir: Path | None) -> Path:
    """Unpack a .tar.gz once, next to it (or in the cache folder if that is read-only); returns
    the folder it was unpacked into. Unpacked into a temporary folder first, then renamed, so an
    interrupted extraction is never mistaken for a complete one."""
    target = archive.parent
    if not is_writable_dir(target):
        target = cache_dir or user_cache_dir() / f"archive-{short_hash(str(archive.resolve()))}"
        logger.info("%s is read-only; unpacking %s into %s", archive.parent, archive.name, target)
    done = target / f".{archive.name}.extracted"
    if done.exists():
        return target
    logger.info("unpacking %s (once)", archive)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            raise DataError(f"archive {archive} is damaged ({short_reason(error)}); download it again.") from None
        for entry in Path(tmp).iterdir():
            destination = target / entry.name
            if destination.exists():
                shutil.rmtree(destination) if destination.is_dir() else destination.unlink()
            os.replace(entry, destination)
    done.touch()
    return target


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100


def _numpy_reconstruct() -> Callable:
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


class CifarUnpickler(pickle._Unpickler):
    """An unpickler that can build only what the official CIFAR files contain.

    The official files hold dicts of bytes keys, lists of ints and bytes, and uint8 numpy arrays.
    Rebuilding those needs numpy's array reconstructor, ``ndarray`` and ``dtype`` (plus
    ``_codecs.encode``, which Python 3 uses for bytes in protocol-2 pickles). Any other global,
    such as ``os.system`` in a crafted file, is refused before it can be called.

    It extends the pure-Python unpickler: the C one grows its memo table to the largest index a
    file names, so four damaged bytes in a PUT opcode can make it fill gigabytes (found by the
    fuzz tests). The Python one keeps a dict, and is as fast on these files (they are one big
    byte string and a list of labels).
    """

    ALLOWED: ClassVar[dict[tuple[str, str], Callable[[], object]]] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: __import__("codecs").encode,
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]()
        raise ForbiddenGlobal(f"{module}.{name}")


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside ``CifarUnpickler.ALLOWED``."""


def safe_unpickle(path: Path) -> object:
    """Load a CIFAR pickle with ``CifarUnpickler``; every failure is a ``DataError``."""
    try:
        # From memory, not the file: a damaged length field then cannot make the unpickler
        # reserve gigabytes for bytes that are not there.
        return CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except ForbiddenGlobal as error:
        raise DataError(
            f"{path} asks to call {error}, which no CIFAR file does, so it was not loaded (it may be crafted "
            "to run code); replace it with the file from the official archive."
        ) from None
    except OSError as error:
        raise DataError(
            f"cannot read {path} ({error.strerror or error}); check the file and its permissions."
        ) from None
    except Exception as error:  # noqa: BLE001 (any parse failure of untrusted bytes means a damaged file)
        raise DataError(
            f"{path} is truncated or not a CIFAR pickle ({type(error).__name__}); "
            "replace it with the file from the official archive."
        ) from None


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR version lives and how its files are laid out."""

    title: str
    seed_name: str  # the seed tool's folder name under --data-dir
    folder: str  # the official folder name inside the archive
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str


CIFAR10 = CifarSpec(
    "CIFAR-10", "cifar-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
)  # fmt: skip
CIFAR100 = CifarSpec(
    "CIFAR-100", "cifar-100", "cifar-100-python", "cifar-100-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
    ("train",), ("test",), "meta",
)  # fmt: skip


def _looks_like_cifar(folder: Path, spec: CifarSpec) -> bool:
    names = (spec.meta_file, *spec.train_files, *spec.test_files)
    return folder.is_dir() and any((folder / name).is_file() for name in names)


def find_cifar_folder(spec: CifarSpec, options: DataOptions) -> Path:
    """The folder holding the batch files: ``--data-dir`` itself, ``<seed_name>/``,
    ``<official folder>/`` or ``<seed_name>/<official folder>/``; failing those, the official
    archive in ``--data-dir`` or ``<seed_name>/``, unpacked once. ``--download`` fetches it."""
    data_dir = options.data_dir
    if options.download:
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        require_data_dir(data_dir, f"{spec.title} ({spec.seed_name}/ or {spec.folder}/ or {spec.archive})")
    roots = [data_dir, data_dir / spec.seed_name]
    for root in roots:
        for folder in (root, root / spec.folder):
            if _looks_like_cifar(folder, spec):
                return folder
    for root in roots:
        if (root / spec.archive).is_file():
            return extract_archive(root / spec.archive, options.cache_dir) / spec.folder
    if options.download:
        download(spec.url, spec.md5, data_dir, spec.title)
        return data_dir / spec.folder
    raise DataError(
        f"found no {spec.title} in {data_dir}: put the official python version there as {spec.seed_name}/, "
        f"{spec.folder}/ or {spec.archive}, or pass --download."
    )


def _names(meta: object, key: bytes, path: Path) -> list[str]:
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path} is not a CIFAR meta file (no list of class names under {key!r}); replace it.")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> Split:
    """Images and labels of one official batch file, checked for layout and label range."""
    if not path.is_file():
        raise DataError(f"{path} is missing; copy the complete {path.parent.name} folder from the official archive.")
    batch = safe_unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path} is not a CIFAR batch file (it lacks b'data' or {label_key!r}); replace it.")
    data, labels = batch[b"data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: b'data' must be a uint8 N x 3072 array, found {shape}; replace the file.")
    try:
        labels = np.asarray(labels)
    except Exception:  # noqa: BLE001 (ragged or exotic label lists from a damaged file)
        labels = np.asarray([None])
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key!r} must hold one whole-number label per image; replace the file.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels must be 0..{num_classes - 1}, found {labels.min()}..{labels.max()}; replace the file."
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(images, torch.from_numpy(labels.astype(np.int64)))


def concat_splits(splits: list[Split]) -> Split:
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def load_cifar(spec: CifarSpec, options: DataOptions, name: str) -> DataSet:
    """CIFAR-10 or CIFAR-100 from the official python pickles (any number of images)."""
    folder = find_cifar_folder(spec, options)
    meta_path = folder / spec.meta_file
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing; copy the complete {spec.folder} folder from the official archive.")
    meta = safe_unpickle(meta_path)
    if spec is CIFAR10:
        classes, label_key = _names(meta, b"label_names", meta_path), b"labels"
    elif options.coarse_labels:
        classes, label_key = _names(meta, b"coarse_label_names", meta_path), b"coarse_labels"
    else:
        classes, label_key = _names(meta, b"fine_label_names", meta_path), b"fine_labels"
    train = concat_splits([read_cifar_batch(folder / f, label_key, len(classes)) for f in spec.train_files])
    test = concat_splits([read_cifar_batch(folder / f, label_key, len(classes)) for f in spec.test_files])
    for split, files in ((train, spec.train_files), (test, spec.test_files)):
        if len(split) == 0:
            raise DataError(f"{folder / files[0]} holds no images; replace it with the file from the official archive.")
    logger.info("%s from %s: %d training and %d test images, %d classes", spec.title, folder, len(train), len(test),
                len(classes))  # fmt: skip
    return DataSet(name=name, classes=classes, train=train, test=test)


# --------------------------------------------------------------------------------------------
# Pascal VOC 2012 (multi-label classification)


VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
VOC_CACHE_SIZE = 256
VOC_CACHE_VERSION = 1
MAX_IMAGE_PIXELS = 50_000_000  # VOC images are at most 500x500; this refuses decompression bombs


def _is_voc_folder(path: Path) -> bool:
    return (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir()


def find_voc_folder(options: DataOptions) -> Path:
    """The ``VOC2012`` folder: ``<data-dir>/PascalVOC2012`` (the seed's layout, itself VOC2012 or a
    VOCdevkit root), ``<data-dir>/VOCdevkit/VOC2012``, or ``--data-dir`` being either."""
    data_dir = options.data_dir
    if options.download:
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        require_data_dir(data_dir, "Pascal VOC 2012 (PascalVOC2012/ or VOCdevkit/)")
    seed = data_dir / "PascalVOC2012"
    candidates = [seed, seed / "VOC2012", seed / "VOCdevkit" / "VOC2012", data_dir / "VOCdevkit" / "VOC2012",
                  data_dir / "VOC2012", data_dir]  # fmt: skip
    for folder in candidates:
        if _is_voc_folder(folder):
            return folder
    if options.download:
        download(VOC_URL, VOC_MD5, data_dir, "Pascal VOC 2012")
        return data_dir / "VOCdevkit" / "VOC2012"
    raise DataError(
        f"found no Pascal VOC 2012 in {data_dir}: put the VOCdevkit/VOC2012 folder there as PascalVOC2012/ "
        "(or VOCdevkit/), with Annotations/, JPEGImages/ and ImageSets/Main/, or pass --download."
    )


def read_image_list(path: Path) -> list[str]:
    """Image ids of an ``ImageSets/Main/<split>.txt`` file (first column)."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(
            f"cannot read image list {path} ({short_reason(error)}); replace it with the original."
        ) from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DataError(f"image list {path} is empty; replace it with the original from the VOC release.")
    return ids


def voc_image_lists(folder: Path) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
    """(name, ids) of the training and evaluation lists: train/val, else trainval/test."""
    main = folder / "ImageSets" / "Main"
    for train, test in (("train", "val"), ("trainval", "test")):
        if (main / f"{train}.txt").is_file() and (main / f"{test}.txt").is_file():
            if train == "trainval":
                logger.warning("%s has no train.txt/val.txt: training on trainval.txt, evaluating on test.txt", main)
            return (train, read_image_list(main / f"{train}.txt")), (test, read_image_list(main / f"{test}.txt"))
    raise DataError(
        f"{main} has neither train.txt + val.txt nor trainval.txt + test.txt; copy ImageSets from the release."
    )


def parse_voc_xml(path: Path) -> np.ndarray:
    """The image's 20-class label vector: 1 if it has a non-difficult object of the class, 0 if
    all its objects of the class are difficult (ignored), -1 otherwise.

    Files with a DOCTYPE are refused: VOC annotations never have one, and entity declarations
    are how XML bombs (billion laughs) and external-entity reads are built.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path} ({short_reason(error)}); restore it from the VOC release.") from None
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise DataError(f"{path} declares a DOCTYPE or entities, which VOC annotations never do; it was not parsed.")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as error:
        raise DataError(
            f"{path} is not well-formed XML ({short_reason(error)}); restore it from the VOC release."
        ) from None
    labels = np.full(len(VOC_CLASSES), -1, np.int8)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataError(f"{path} names an unknown class {name!r} (VOC has {', '.join(VOC_CLASSES)}); fix the file.")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        index = VOC_CLASSES.index(name)
        if not difficult:
            labels[index] = 1
        elif labels[index] == -1:
            labels[index] = 0
    return labels


def _check_header(image: Image.Image, path: Path) -> None:
    width, height = image.size  # from the header; nothing decoded yet
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{path} claims to be {width}x{height} pixels, far more than any VOC image; restore it from the VOC release."
        )


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side ``size``; int() truncates as torchvision's resize does."""
    scale = size / min(width, height)
    return (size, int(height * scale)) if width <= height else (int(width * scale), size)


def decode_resized(path: Path, size: int) -> torch.Tensor:
    """A JPEG as uint8 3 x size x size: short side resized to ``size`` (PIL's antialiased
    bilinear filter), then the centre ``size x size`` crop."""
    try:
        with Image.open(path) as image:
            _check_header(image, path)
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(
            f"{path} cannot be decoded as a JPEG ({short_reason(error)}); restore it from the VOC release."
        ) from None
    new = resized_shape(*image.size, size)
    image = image.resize(new, Image.BILINEAR)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def decode_resized_batch(paths: list[Path], size: int, device: torch.device | str) -> torch.Tensor:
    """``decode_resized`` of several JPEGs at once with torchvision's decoder on ``device``
    (nvJPEG on a GPU) and an antialiased bilinear resize there; uint8 N x 3 x size x size on the
    CPU. Within a few grey levels of the PIL path (different resampling code). A file the
    batched decoder refuses goes through ``decode_resized``, which names it or decodes it."""
    import torchvision.io
    from torchvision.transforms.v2 import functional as TF

    device = torch.device(device)
    data = []
    for path in paths:
        try:
            with Image.open(path) as image:
                _check_header(image, path)
                jpeg = image.format == "JPEG" and image.mode in ("RGB", "L")
        except (OSError, ValueError, Image.DecompressionBombError):
            jpeg = False  # decode_resized below says what is wrong with it
        data.append(torchvision.io.read_file(str(path)) if jpeg else None)
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    readable = [i for i, d in enumerate(data) if d is not None]
    try:
        decoded = torchvision.io.decode_jpeg([data[i] for i in readable], mode=torchvision.io.ImageReadMode.RGB,
                                             device=device) if readable else []  # fmt: skip
    except RuntimeError:
        decoded, readable = [], []  # one bad file spoils the batch: every image the slow way
    for i, image in zip(readable, decoded):
        width, height = image.shape[2], image.shape[1]
        new_w, new_h = resized_shape(width, height, size)
        image = TF.resize(image, [new_h, new_w], antialias=True)
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        out[i] = image[:, top : top + size, left : left + size].cpu()
    for i in sorted(set(range(len(paths))) - set(readable)):
        out[i] = decode_resized(paths[i], size)
    return out


def voc_fingerprint(paths: list[Path], size: int) -> str:
    """Changes whenever an image is added, removed, replaced or touched."""
    h = hashlib.sha256(f"v{VOC_CACHE_VERSION} {size}".encode())
    for path in paths:
        stat = path.stat()
        h.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_resize_cache(paths: list[Path], cache: Path, size: int, device: str = "cpu") -> np.ndarray:
    """The images resized to ``size`` as a memory-mapped N x 3 x size x size uint8 array, built
    once into ``cache`` (``.npy`` + ``.json`` fingerprint) and rebuilt when the sources change.
    On a CUDA ``device`` the JPEGs are decoded and resized on the GPU."""
    fingerprint = voc_fingerprint(paths, size)
    meta_path = cache.with_suffix(".json")
    shape = (len(paths), 3, size, size)
    if cache.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == fingerprint:
                array = np.load(cache, mmap_mode="c", allow_pickle=False)
                if array.shape == shape and array.dtype == np.uint8:
                    return array
        except (OSError, ValueError) as error:
            logger.warning("resize cache %s is unreadable (%s); rebuilding it", cache, error)
        logger.info("the images changed since %s was built; rebuilding it", cache)

    logger.info("building the %dx%d resize cache of %d images in %s (once)", size, size, len(paths), cache)
    fd, tmp = temp_file_beside(cache)
    os.close(fd)
    try:
        _fill_resized(np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape), paths, size, device)
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json({"fingerprint": fingerprint, "shape": list(shape), "count": len(paths)}, meta_path)
    return np.load(cache, mmap_mode="c", allow_pickle=False)


def _fill_resized(array: np.ndarray, paths: list[Path], size: int, device: str = "cpu") -> None:
    """Decode and resize ``paths`` into the rows of ``array``, then flush it to disk: on a GPU
    in batches of 64 through nvJPEG, on the CPU on a few threads (PIL releases the GIL)."""
    bar = tqdm(total=len(paths), desc="resize", leave=False, disable=not sys.stderr.isatty())
    if torch.device(device).type == "cuda":
        for start in range(0, len(paths), 64):
            chunk = paths[start : start + 64]
            array[start : start + len(chunk)] = decode_resized_batch(chunk, size, device).numpy()
            bar.update(len(chunk))
    else:

        def work(i: int) -> None:
            array[i] = decode_resized(paths[i], size).numpy()

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for _ in pool.map(work, range(len(paths))):
                bar.update(1)
    bar.close()
    array.flush()


def voc_cache_dir(folder: Path, options: DataOptions) -> Path:
    """``--cache-dir``, else ``alexnet_cache/`` inside the VOC folder, else (read-only data) the
    user's cache folder."""
    if options.cache_dir is not None:
        return options.cache_dir
    beside = folder / "alexnet_cache"
    if is_writable_dir(beside):
        return beside
    fallback = user_cache_dir() / f"voc2012-{short_hash(str(folder.resolve()))}"
    logger.warning("%s is read-only; keeping the resize cache in %s (choose with --cache-dir)", folder, fallback)
    return fallback


def load_voc_split(folder: Path, name: str, ids: list[str], cache_dir: Path, device: str = "cpu") -> Split:
    """Labels from the XML files and images from the resize cache for one image list."""
    list_path = folder / "ImageSets" / "Main" / f"{name}.txt"
    jpegs, labels = [], []
    for image_id in ids:
        jpeg = folder / "JPEGImages" / f"{image_id}.jpg"
        xml = folder / "Annotations" / f"{image_id}.xml"
        for path in (jpeg, xml):
            if not path.is_file():
                raise DataError(
                    f"{list_path} names {image_id}, but {path} does not exist; restore it or remove the line."
                )
        jpegs.append(jpeg)
        labels.append(parse_voc_xml(xml))
    cache = cache_dir / f"{name}_{VOC_CACHE_SIZE}.npy"
    array = load_resize_cache(jpegs, cache, VOC_CACHE_SIZE, device)
    return Split(torch.from_numpy(array), torch.from_numpy(np.stack(labels)), source=cache)


def load_voc2012(options: DataOptions) -> DataSet:
    """Pascal VOC 2012 classification: 20 classes, multi-label, images at 256x256."""
    folder = find_voc_folder(options)
    (train_name, train_ids), (test_name, test_ids) = voc_image_lists(folder)
    cache_dir = voc_cache_dir(folder, options)
    train = load_voc_split(folder, train_name, train_ids, cache_dir, options.decode_device)
    test = load_voc_split(folder, test_name, test_ids, cache_dir, options.decode_device)
    logger.info("Pascal VOC 2012 from %s: %d images in %s.txt, %d in %s.txt", folder, len(train), train_name,
                len(test), test_name)  # fmt: skip
    return DataSet(name="PascalVOC2012", classes=list(VOC_CLASSES), train=train, test=test)


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class DatasetInfo:
    """A registered data set: its reader and the size of the images it yields."""

    load: Callable[[DataOptions], DataSet]
    image_size: int


DATASETS: dict[str, DatasetInfo] = {
    "Shapes": DatasetInfo(load_shapes, 32),
    "Cifar10": DatasetInfo(lambda options: load_cifar(CIFAR10, options, "Cifar10"), 32),
    "Cifar100": DatasetInfo(lambda options: load_cifar(CIFAR100, options, "Cifar100"), 32),
    "PascalVOC2012": DatasetInfo(load_voc2012, VOC_CACHE_SIZE),
}


def load_dataset(name: str, options: DataOptions) -> DataSet:
    """Load the data set registered under ``name``."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
    try:
        return DATASETS[name].load(options)
    except OSError as error:  # permissions, I/O errors: whatever the readers did not foresee
        where = error.filename or options.data_dir
        raise DataError(
            f"cannot read {where} ({short_reason(error.strerror or error)}); check that this user may read it, "
            "or pass another --data-dir."
        ) from None


# --------------------------------------------------------------------------------------------
# Batched transforms: whole batches, per-image random parameters, on the batch's device.


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
    crops = [img[..., t : t + size, l : l + size] for img in (x, x.flip(-1)) for t, l in corners]
    return torch.stack(crops, dim=1)


def random_resized_crop_flip(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-image random box (area fraction in ``scale``, aspect ratio in ``ratio``, log-uniform),
    resampled bilinearly to ``size x size`` and mirrored with p = 0.5, as one ``grid_sample``."""
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
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = bw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = bh
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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


class CifarPipeline(Pipeline):
    """32x32 data: random crop of the 4-pixel zero-padded image and mirror; normalise by the
    training set's channel mean and std; for a 224-input model the batch is then upsampled
    bilinearly (the seed's other way of feeding CIFAR to AlexNet)."""

    name = "cifar"

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, input_size: int, padding: int = 4) -> None:
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
        return self._finish(x).unsqueeze(1)

    def describe(self) -> str:
        resize = f", upsampled to {self.input_size}" if self.input_size != 32 else ""
        return f"random crop (pad {self.padding}) + mirror{resize}, channel-normalised"


class PaperPipeline(Pipeline):
    """The paper's recipe (§4.1, §5) on 256x256 images: subtract the training set's mean image,
    add the PCA colour shift (a new N(0, sigma) draw of the three alphas per image per use), take
    a random ``crop`` patch and mirror it; evaluate on the ten patches. Inputs stay in 0-255
    units as in the paper. Smaller images (CIFAR) are first upsampled to 256 on the batch."""

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
    ) -> None:
        self.base = base
        if mean_image.shape[-1] != base:
            mean_image = F.interpolate(mean_image[None], size=(base, base), mode="bilinear", align_corners=False)[0]
        self.mean_image = mean_image
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.crop = crop
        self.sigma = sigma

    def _centred(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] != self.base:
            x = F.interpolate(x, size=(self.base, self.base), mode="bilinear", align_corners=False)
        return x - self.mean_image

    def train(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self._centred(x)
        alphas = torch.randn(x.shape[0], 3, generator=generator, device=x.device) * self.sigma
        x = x + 255 * pca_shift(alphas, self.eigenvalues, self.eigenvectors)[:, :, None, None]
        return random_crop_flip(x, self.crop, 0, generator)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        return ten_crop(self._centred(x), self.crop)

    def describe(self) -> str:
        return f"paper: mean image, PCA colour (sigma {self.sigma}), random {self.crop} crops + mirror; 10-crop test"


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
        x = x.float().div_(255)
        x = random_resized_crop_flip(x, self.crop, self.scale, self.ratio, generator)
        return (x - self.mean) / self.std

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop].float().div_(255)
        return ((x - self.mean) / self.std).unsqueeze(1)

    def describe(self) -> str:
        return f"random-resized crop {self.crop} (area {self.scale[0]:.0%}-100%) + mirror; centre crop test"


def make_pipeline(train: Split, input_size: int, paper: bool, device: torch.device | str = "cpu") -> Pipeline:
    """The transform for a model input size and setup, with statistics of the training split
    (computed where the split lives, kept on ``device``).

    - 32-input model (CifarAlexNet): CIFAR crop + flip, whatever the setup.
    - 224/227-input model with ``paper``: the paper's pipeline (10-crop evaluation).
    - 224/227-input model on 32x32 data: CIFAR crop + flip, then upsampled.
    - 224/227-input model on 256x256 data: random-resized crop.
    """
    size = train.images.shape[-1]
    if input_size == 32 and size != 32:
        raise DataError(f"CifarAlexNet (-c) takes 32x32 images, but these are {size}x{size}; drop -c.")

    def stats(fn: Callable) -> list[torch.Tensor]:
        out = fn(train.images)
        return [t.to(device) for t in (out if isinstance(out, tuple) else (out,))]

    if input_size == 32:
        return CifarPipeline(*stats(channel_stats), input_size=32)
    if paper:
        return PaperPipeline(*stats(mean_image), *stats(rgb_eigen), crop=input_size)
    if size < input_size:
        return CifarPipeline(*stats(channel_stats), input_size=input_size)
    return ModernPipeline(*stats(channel_stats), crop=input_size)


# --------------------------------------------------------------------------------------------
# Loaders


def fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """Whether a data set of ``nbytes`` should live whole on ``device``: at most half of the
    free GPU memory (the model needs the rest) or half of the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= free // 2
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return nbytes <= available // 2


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops the run cleanly."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _CacheRows(torch.utils.data.Dataset):
    """Batches of rows of a ``.npy`` cache, opened lazily in each worker process."""

    def __init__(self, path: Path, labels: torch.Tensor) -> None:
        self.path = path
        self.labels = labels
        self.array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        rows = index.numpy()
        return torch.from_numpy(np.ascontiguousarray(self.array[rows])), self.labels[index]


class BatchLoader:
    """Batches of a ``Split`` through a ``Pipeline``, reshuffled each epoch when training.

    When the split already lives on ``device`` the whole loop is tensor indexing on that device.
    Otherwise (a memory-mapped cache too large for it) a ``DataLoader`` with ``workers``
    processes reads the rows and they are copied over pinned and non-blocking.
    ``index_generator`` (CPU) draws the order, ``generator`` (on ``device``) the augmentation.

    Under data parallelism (``world`` > 1) every process draws the same order and takes its
    ``rank``-th share of each batch of ``batch_size`` (the global batch), so the processes
    together see every image once per epoch; a last batch smaller than ``world`` is dropped by
    all of them (training) or shared out unevenly (evaluation, where some take none).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        pipeline: Pipeline,
        train: bool,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        index_generator: torch.Generator | None = None,
        workers: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.split = split
        self.rank = rank
        self.world = world
        self.batch_size = batch_size
        self.pipeline = pipeline
        self.train = train
        self.device = torch.device(device)
        self.generator = generator
        self.index_generator = index_generator
        self.workers = workers
        self.order: torch.Tensor | None = None  # the order of the epoch under way
        # A split still memory-mapped from its cache is streamed; ``Split.to`` drops ``source``.
        self.streaming = split.source is not None

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def _order(self) -> torch.Tensor:
        n = len(self.split)
        return torch.randperm(n, generator=self.index_generator) if self.train else torch.arange(n)

    def iterate(self, order: torch.Tensor | None = None, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass, like ``iter(loader)``; with ``order`` and ``skip`` it replays an interrupted
        epoch: the same image order, starting after its first ``skip`` batches."""
        self.order = self._order() if order is None else order
        yield from self._transformed(self._raw_batches(self.order, skip))

    def _shares(self, order: torch.Tensor, skip: int) -> list[torch.Tensor]:
        """This process's indices of each remaining batch."""
        batches = order.split(self.batch_size)[skip:]
        if self.world == 1:
            return list(batches)
        if not self.train:
            # Evaluation: each process a contiguous slice of the split, every image counted once.
            share = order.tensor_split(self.world)[self.rank]
            return [b for b in share.split(max(1, self.batch_size // self.world)) if len(b)]
        return [b.tensor_split(self.world)[self.rank] for b in batches if len(b) >= self.world]

    def _raw_batches(self, order: torch.Tensor, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.streaming:
            order = order.to(self.split.images.device)
            for idx in self._shares(order, skip):
                images, labels = self.split.images[idx], self.split.labels[idx]
                if images.device != self.device:
                    images = images.pin_memory() if self.device.type == "cuda" else images
                    images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
                yield images, labels
            return
        loader = torch.utils.data.DataLoader(
            _CacheRows(self.split.source, self.split.labels.cpu()),
            sampler=self._shares(order, skip),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_interrupts,
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _transformed(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in batches:
            if self.train:
                yield self.pipeline.train(images, self.generator), labels
            else:
                yield self.pipeline.evaluate(images), labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()
