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
import signal
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from training.fields import FLAG, PATH, setting
from utils import (
    Check,
    UnsafeName,
    UserError,
    atomic_write_json,
    device_problem,
    printable,
    safe_child,
    short_reason,
    temp_file_beside,
)

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


#: Generated images: far beyond what a Shapes experiment needs, far below what overflows.
MAX_SHAPES = 10_000_000


@dataclass
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
    # Where VOC JPEGs are decoded for the resize cache (cuda: nvJPEG): the training device.
    decode_device: str = setting("cpu", Check(str, rule=device_problem), resume=True, evaluate=True, identity=False,
                                 per_process=True)  # fmt: skip

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def cache_path(self) -> Path | None:
        return Path(self.cache_dir) if self.cache_dir else None


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


#: Peak memory of ``make_shapes`` per image (float64 intermediates), measured: about 115 kB.
SHAPES_BYTES_PER_IMAGE = 120_000


def available_memory() -> int | None:
    """Bytes of memory this machine can still hand out (MemAvailable: free plus reclaimable
    cache), or None where that cannot be told."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load_shapes(options: DataOptions) -> DataSet:
    """The built-in data set: generated, never downloaded, train and test from separate seeds.
    A count that would not fit in memory while it is generated is one sentence, not a crash."""
    largest = max(options.shapes_train, options.shapes_test)
    need, have = largest * SHAPES_BYTES_PER_IMAGE, available_memory()
    if have is not None and need > have:
        raise DataError(
            f"generating {largest} Shapes images needs about {need / 1e9:.1f} GB of memory and this machine has "
            f"{have / 1e9:.1f} GB available; pass a smaller --shapes-train / --shapes-test."
        )
    logger.info("generating %d training and %d test images of Shapes (seed %d)", options.shapes_train,
                options.shapes_test, options.shapes_seed)  # fmt: skip
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


def download_archive(url: str, md5: str, root: Path, what: str) -> Path:
    """Fetch an official archive into ``root`` with torchvision's checksummed downloader (a file
    already there with the right checksum is kept); returns its path. Unpacking is left to
    ``extract_archive``, so a download obeys the same rule as an archive the user put there."""
    from torchvision.datasets.utils import download_url

    filename = url.rsplit("/", 1)[-1]
    logger.info("downloading %s from %s into %s", what, url, root)
    try:
        download_url(url, str(root), filename=filename, md5=md5)
    except Exception as error:  # noqa: BLE001 (network, disk or checksum: all end the same way for the user)
        raise DataError(
            f"could not download {what} from {url} ({short_reason(error)}); download it by hand and put it in {root}."
        ) from None
    return root / filename


def _member_parts(name: str) -> list[str]:
    """The components of an archive entry's name, without empty and ``.`` ones."""
    return [part for part in name.split("/") if part not in ("", ".")]


def extract_archive(
    archive: Path, folder: str, holds: Callable[[Path], bool], what: str, cache_dir: Path | None
) -> Path:
    """Unpack the data set's own ``folder`` from ``archive`` next to it (or, if that is read-only,
    into the cache folder); returns the unpacked folder.

    The archive may create that one folder and nothing else: entries outside it are left out
    with a warning, because a crafted or repacked archive could otherwise replace whatever sits
    beside it (an earlier run's ``checkpoints/``, the other CIFAR's folder). Nothing that
    exists is deleted or replaced: a ``folder`` already there is used if ``holds`` says it holds
    the data, and is otherwise the user's to remove or rename. Unpacked into a temporary folder
    first (``tarfile``'s ``data`` filter: no absolute paths, links out of it or device files),
    checked, then renamed into place, so an interrupted extraction is never mistaken for a
    complete one and leaves nothing behind.
    """
    target = archive.parent
    if not is_writable_dir(target):
        target = cache_dir or user_cache_dir() / f"archive-{short_hash(str(archive.resolve()))}"
        logger.info("%s is read-only; unpacking %s into %s", archive.parent, archive.name, target)
    destination = target / folder
    if destination.exists() or destination.is_symlink():
        if holds(destination):
            return destination
        raise DataError(
            f"{destination} already exists but holds no {what}; remove or rename it so that {archive.name} can be "
            "unpacked there."
        )
    logger.info("unpacking %s/ from %s (once)", folder, archive)
    target.mkdir(parents=True, exist_ok=True)
    skipped = 0

    def own_entries(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        nonlocal skipped
        for member in tar:
            parts = _member_parts(member.name)
            if parts and parts[0] == folder and ".." not in parts:
                yield member
            else:
                skipped += 1

    with tempfile.TemporaryDirectory(dir=target, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, members=own_entries(tar), filter="data")
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            raise DataError(f"archive {archive} is damaged ({short_reason(error)}); download it again.") from None
        if skipped:
            logger.warning("%s: left out %d entries outside %s/ (an archive of %s may create only that folder)",
                           archive, skipped, folder, what)  # fmt: skip
        unpacked = Path(tmp) / folder
        if unpacked.is_symlink() or not holds(unpacked):
            raise DataError(f"{archive} holds no {what} in a {folder}/ folder, so it is not the official archive; "
                            "download it again.")  # fmt: skip
        # Checked again just before the rename, which would silently replace an empty folder.
        if destination.exists() or destination.is_symlink():
            raise DataError(f"{destination} appeared while {archive.name} was unpacked; remove or rename it and run "
                            "this again.")  # fmt: skip
        os.rename(unpacked, destination)
    return destination


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100


class CraftedPickle(pickle.UnpicklingError):
    """A pickle that builds something no CIFAR file does; the message says what, as a phrase
    ("calls numpy.ndarray directly")."""


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside ``CifarUnpickler.ALLOWED``."""


#: The numpy types an array in a CIFAR file may have (the files hold uint8 images; the others
#: are plain numbers that a re-saved file could use for labels). No objects, strings, records.
PLAIN_DTYPES = frozenset({"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"})
MAX_ARRAY_DIMS = 8
#: What each numpy call in a pickle is charged against the byte budget (its Python objects).
CALL_COST = 256


def _text(value: object) -> str | None:
    """``value`` as text when it is short ASCII text or bytes (Python 2 pickles give bytes)."""
    if isinstance(value, bytes) and len(value) <= 16:
        value = value.decode("ascii", "replace")
    return value if isinstance(value, str) and len(value) <= 16 else None


class _NdarrayMarker:
    """What ``numpy.ndarray`` unpickles to: the first argument ``_reconstruct`` expects. Calling
    it is refused, because ``ndarray(shape, dtype, buffer, offset, strides)`` can make an array
    that the file's bytes do not back (a stride of 0 turns one byte into any number of images)."""

    def __call__(self, *args: object) -> None:
        raise CraftedPickle("calls numpy.ndarray directly")


_NDARRAY = _NdarrayMarker()


class _PendingDtype:
    """A ``numpy.dtype`` call from a pickle, resolved to a built-in dtype once checked. numpy's
    own ``dtype.__setstate__`` is never called: with ``copy=False`` the dtype is numpy's shared
    one, and its state (byte order, fields) would change every array of that type."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.order: str | None = None

    def build(self, state: object) -> None:
        if self.order is not None:
            raise CraftedPickle("sets the state of one numpy dtype twice")
        orders = ("|",) if self.code[1] == "1" else ("<", ">", "=")
        order = _text(state[1]) if isinstance(state, tuple) and len(state) == 8 else None
        if order not in orders or state[0] != 3 or state[2:] != (None, None, None, -1, -1, 0):
            raise CraftedPickle(f"gives numpy dtype {self.code!r} a state numpy never writes")
        self.order = order

    def resolved(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.order) if self.order in ("<", ">") else dtype


class _PendingArray:
    """A ``_reconstruct`` call from a pickle: an array only once ``build`` gives it its bytes."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def build(self, state: object, unpickler: CifarUnpickler) -> None:
        if self.array is not None:
            raise CraftedPickle("sets the state of one array twice")
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CraftedPickle("gives an array a state numpy never writes")
        version, shape, dtype, fortran, raw = state
        if (
            version != 1
            or not isinstance(shape, tuple)
            or len(shape) > MAX_ARRAY_DIMS
            or not all(type(n) is int and n >= 0 for n in shape)
            or not isinstance(dtype, _PendingDtype)
            or type(fortran) not in (bool, int)
            or fortran not in (0, 1)
            or not isinstance(raw, bytes)
        ):
            raise CraftedPickle("gives an array a state numpy never writes")
        dtype = dtype.resolved()
        size = math.prod(shape) * dtype.itemsize
        if len(raw) != size:
            raise CraftedPickle(
                f"builds a {' x '.join(map(str, shape)) or 'scalar'} {dtype.name} array of {size:,} bytes from "
                f"{len(raw):,} bytes"
            )
        unpickler.charge(size)
        # A read-only view of the pickle's own bytes: what the array holds is what the file held.
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")


class CifarUnpickler(pickle._Unpickler):
    """An unpickler that can build only what the official CIFAR files contain.

    The official files hold dicts of bytes keys, lists of ints and bytes, and uint8 numpy arrays,
    written as ``_reconstruct(ndarray, (0,), b"b")`` followed by a state (BUILD) that carries the
    array's shape, dtype and raw bytes (plus ``_codecs.encode(text, "latin1")``, which Python 3
    uses for bytes in protocol-2 pickles). Any other global, such as ``os.system`` in a crafted
    file, is refused before it can be called.

    None of numpy's own constructors is reachable: the allowed globals resolve to stand-ins that
    accept exactly the calls numpy writes, so that whatever a file says, the data it yields is
    backed by its own bytes and memory stays bounded by its size:

    - an array exists only once its state gave it raw bytes of exactly shape x itemsize length
      and a plain dtype (``PLAIN_DTYPES``); ``ndarray`` is not callable (strides, offsets and
      foreign buffers are how a few bytes became 100 images), and an array left without its
      state (numpy would hand out uninitialised memory) is refused;
    - ``_codecs.encode`` encodes text as latin-1 and nothing else (other codecs, such as hex,
      double their input at each call of a chain);
    - every array and encoded string is charged against a budget of ``4 x file size + 1 MiB``
      bytes, whether or not it shares memory, so memo references that reuse one big bytes object
      for many arrays cannot multiply memory either. (Lists, tuples and dicts cost at most a few
      dozen bytes per byte of the file, a bound of the same kind.)

    It extends the pure-Python unpickler: the C one grows its memo table to the largest index a
    file names, so four damaged bytes in a PUT opcode can make it fill gigabytes (found by the
    fuzz tests). The Python one keeps a dict, and is as fast on these files (they are one big
    byte string and a list of labels).
    """

    ALLOWED: ClassVar[dict[tuple[str, str], Callable[[CifarUnpickler], object]]] = {
        ("numpy.core.multiarray", "_reconstruct"): lambda u: u._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): lambda u: u._reconstruct,
        ("numpy", "ndarray"): lambda u: _NDARRAY,
        ("numpy", "dtype"): lambda u: u._dtype,
        ("_codecs", "encode"): lambda u: u._encode,
    }

    def __init__(self, file: io.BytesIO, size: int) -> None:
        super().__init__(file, encoding="bytes")
        self.budget = 4 * size + (1 << 20)
        self.size = size
        self.spent = 0

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)](self)
        raise ForbiddenGlobal(f"{module}.{name}")

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` more of memory against the file's budget, before they are taken."""
        self.spent += nbytes
        if self.spent > self.budget:
            raise CraftedPickle(f"needs more than {self.budget:,} bytes of memory for its {self.size:,} bytes")

    def _reconstruct(self, subtype: object, shape: object, code: object) -> _PendingArray:
        if subtype is not _NDARRAY or shape != (0,) or code not in (b"b", "b"):
            raise CraftedPickle("calls numpy's _reconstruct with arguments numpy never writes")
        self.charge(CALL_COST)
        return _PendingArray()

    def _dtype(self, code: object, align: object = False, copy: object = True) -> _PendingDtype:
        text = _text(code)
        if text not in PLAIN_DTYPES:
            shown = printable(repr(code))
            raise CraftedPickle(f"asks for numpy dtype {shown[:40]}, which is not a plain number type")
        if type(align) not in (bool, int) or align != 0 or type(copy) not in (bool, int) or copy not in (0, 1):
            raise CraftedPickle("calls numpy.dtype with arguments numpy never writes")
        self.charge(CALL_COST)
        return _PendingDtype(text)

    def _encode(self, text: object, *args: object) -> bytes:
        if not isinstance(text, str) or args not in (("latin1",), ("latin-1",)):
            raise CraftedPickle("calls _codecs.encode other than as encode(text, 'latin1') for bytes")
        self.charge(len(text))
        return text.encode("latin-1")

    def load_build(self) -> None:
        """BUILD gives state to what ``_reconstruct`` and ``dtype`` returned, and to nothing else."""
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, _PendingArray):
            target.build(state, self)
        elif isinstance(target, _PendingDtype):
            target.build(state)
        else:
            raise CraftedPickle(f"sets the state of a {type(target).__name__}")

    dispatch: ClassVar[dict] = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}

    def load(self) -> object:
        return self._resolve(super().load(), {})

    def _resolve(self, obj: object, seen: dict[int, object]) -> object:
        """``obj`` with every stand-in replaced by its array or dtype; containers are visited
        once each (shared tuples would otherwise cost exponential time)."""
        if isinstance(obj, _PendingArray):
            if obj.array is None:
                raise CraftedPickle("makes an array without giving it its bytes")
            return obj.array
        if isinstance(obj, _PendingDtype):
            return obj.resolved()
        if isinstance(obj, (bytes, str, int, float, type(None))):  # bool is an int
            return obj
        if not isinstance(obj, (list, dict, tuple, set, frozenset)):
            kind = "bare numpy or codecs function" if callable(obj) else type(obj).__name__
            raise CraftedPickle(f"holds a {kind} among its data")
        if id(obj) in seen:
            return seen[id(obj)]
        seen[id(obj)] = obj
        if isinstance(obj, list):
            obj[:] = [self._resolve(item, seen) for item in obj]
        elif isinstance(obj, dict):
            for key, value in obj.items():
                if self._resolve(key, seen) is not key:
                    raise CraftedPickle("uses an array as a dictionary key")
                obj[key] = self._resolve(value, seen)
        elif isinstance(obj, tuple):
            items = [self._resolve(item, seen) for item in obj]
            if any(a is not b for a, b in zip(items, obj)):
                seen[id(obj)] = tuple(items)
        elif any(self._resolve(item, seen) is not item for item in obj):
            raise CraftedPickle("puts an array in a set")
        return seen[id(obj)]


def safe_unpickle(path: Path) -> object:
    """Load a CIFAR pickle with ``CifarUnpickler``; every failure is a ``DataError``."""
    try:
        # From memory, not the file: a damaged length field then cannot make the unpickler
        # reserve gigabytes for bytes that are not there.
        data = path.read_bytes()
        return CifarUnpickler(io.BytesIO(data), size=len(data)).load()
    except ForbiddenGlobal as error:
        raise DataError(
            f"{path} asks to call {error}, which no CIFAR file does, so it was not loaded (it may be crafted "
            "to run code); replace it with the file from the official archive."
        ) from None
    except CraftedPickle as error:
        raise DataError(
            f"{path} was not loaded: it {error}, which no CIFAR file does (it may be crafted); replace it with the "
            "file from the official archive."
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
    """Where one CIFAR version lives and how its files are laid out. ``labels`` and
    ``coarse_labels`` are (meta key of the class names, batch key of the labels, class count)."""

    title: str
    seed_name: str  # the seed tool's folder name under --data-dir
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
    "CIFAR-10", "cifar-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
    (b"label_names", b"labels", 10),
)  # fmt: skip
CIFAR100 = CifarSpec(
    "CIFAR-100", "cifar-100", "cifar-100-python", "cifar-100-python.tar.gz",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
    ("train",), ("test",), "meta",
    (b"fine_label_names", b"fine_labels", 100), (b"coarse_label_names", b"coarse_labels", 20),
)  # fmt: skip


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
        return extract_archive(archives[0], spec.folder, lambda f: _looks_like_cifar(f, spec), spec.title,
                               options.cache_path)  # fmt: skip
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
                "empty" if not text
                else f"longer than {MAX_CLASS_NAME} characters" if len(text) > MAX_CLASS_NAME
                else "not printable text" if not text.isprintable()
                else f"the same as name {seen[text] + 1}" if text in seen
                else None
            )  # fmt: skip
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


def load_cifar(spec: CifarSpec, options: DataOptions, name: str) -> DataSet:
    """CIFAR-10 or CIFAR-100 from the official python pickles (any number of images)."""
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
#: 2: the centre box is resized on its own (``resize_centre``), and the cache's digest is kept.
VOC_CACHE_VERSION = 2
MAX_IMAGE_PIXELS = 50_000_000  # VOC images are at most 500x500; this refuses decompression bombs
#: The batched (GPU) decoder resizes whole images, so it takes only those whose resized long side
#: stays within this many times the short one (every VOC image: their sides are within 1:4).
MAX_BATCH_ASPECT = 4


def _is_voc_folder(path: Path) -> bool:
    return (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir()


def find_voc_folder(options: DataOptions) -> Path:
    """The ``VOC2012`` folder: ``<data-dir>/PascalVOC2012`` (the seed's layout, itself VOC2012 or a
    VOCdevkit root), ``<data-dir>/VOCdevkit/VOC2012``, or ``--data-dir`` being either; failing
    those, the official archive in ``--data-dir``, unpacked once. ``--download`` fetches it."""
    data_dir = options.data_path
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
    archive = data_dir / VOC_URL.rsplit("/", 1)[-1]
    if not archive.is_file() and options.download:
        archive = download_archive(VOC_URL, VOC_MD5, data_dir, "Pascal VOC 2012")
    if archive.is_file():
        devkit = extract_archive(archive, "VOCdevkit", lambda f: _is_voc_folder(f / "VOC2012"), "Pascal VOC 2012",
                                 options.cache_path)  # fmt: skip
        return devkit / "VOC2012"
    raise DataError(
        f"found no Pascal VOC 2012 in {data_dir}: put the VOCdevkit/VOC2012 folder there as PascalVOC2012/ "
        "(or VOCdevkit/), with Annotations/, JPEGImages/ and ImageSets/Main/, or pass --download."
    )


def read_image_list(path: Path) -> list[str]:
    """Image ids of an ``ImageSets/Main/<split>.txt`` file (first column), each one checked by
    the project's one rule for names that become paths (``utils.safe_child``): an id names a
    file inside ``JPEGImages/`` and ``Annotations/``, never a path out of them. Read as
    ``utf-8-sig`` (a byte-order mark from a Windows editor is not part of the first id); CRLF
    line ends are whitespace to ``split``."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(
            f"cannot read image list {path} ({short_reason(error)}); replace it with the original."
        ) from None
    ids = []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words:
            continue
        try:
            safe_child(path.parent, words[0])  # the id itself, then the longest file name made from it
            safe_child(path.parent, f"{words[0]}.jpg")
        except UnsafeName as error:
            raise DataError(
                f"{path} line {number}: the image id {error}, so it cannot name a file in the VOC folder; fix the "
                "line or remove it."
            ) from None
        ids.append(words[0])
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


class _Declaration(Exception):
    """Raised by the expat pre-pass at a DOCTYPE or entity declaration."""


def _refuse_declarations(data: bytes) -> None:
    """Raise ``_Declaration`` if the XML declares a DOCTYPE or an entity, found by the parser
    itself rather than by a byte search, so no encoding (UTF-16, a BOM, a declared charset)
    hides one. Other parse errors are left to the real parse, which reports them."""

    def refuse(*args: object) -> None:
        raise _Declaration

    parser = xml.parsers.expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError:
        pass


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
    try:
        _refuse_declarations(data)
    except _Declaration:
        raise DataError(
            f"{path} declares a DOCTYPE or entities, which VOC annotations never do; it was not parsed."
        ) from None
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
            shown = printable(repr(name[:40]))
            raise DataError(f"{path} names an unknown class {shown} (VOC has {', '.join(VOC_CLASSES)}); fix the file.")
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
    """(width, height) with the short side ``size``; int() truncates as torchvision's resize does
    (never below ``size``, which float rounding could give for a square)."""
    scale = size / min(width, height)
    return (size, max(size, int(height * scale))) if width <= height else (max(size, int(width * scale)), size)


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """``image`` as 8-bit RGB, whatever its mode.

    ``convert("RGB")`` is right for 8-bit modes (greyscale, palette, CMYK, YCbCr) but clips
    16-bit greyscale (``I;16*``: PNG, TIFF) at 255, so an ordinary photo comes out near-white:
    those are scaled to 8 bits (v / 257, rounded). 32-bit integer and floating-point pixels
    (``I``, ``F``) have no fixed white level, so they are refused rather than guessed. Pixels
    with transparency (an alpha band, or a palette or colour marked transparent) are composed
    over white, as viewers show them; dropping the alpha would show whatever colour the
    transparent pixels happen to hold.
    """
    # Pillow before 10 opens a 16-bit greyscale PNG as I (32-bit); PNG has no deeper samples, so
    # there I means 16 bits as surely as I;16 does.
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    elif image.mode in ("I", "F") or image.mode.startswith(("I;", "F;")):
        raise DataError(
            f"{path} holds {image.mode} pixels (32-bit integers or floating point), which have no fixed white level; "
            "save it as an 8-bit JPEG or PNG."
        )
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resize_centre(image: Image.Image, size: int) -> Image.Image:
    """The centre ``size x size`` crop of ``image`` resized so that its short side is ``size``
    (PIL's antialiased bilinear filter), computed without ever making the whole resized image.

    A 1 x 10000 JPEG is 3 KB, but resizing its short side to 256 makes the long side 2.56
    million pixels: 2 GB for a picture of which 256 x 256 pixels are kept. So the crop box is
    taken in source coordinates and only it is resampled, in the same two passes as a whole
    resize (horizontal on the rows the vertical pass reads, then vertical): the memory is that
    of the source image and two buffers of about ``size`` x its short side. Refusing thin
    images instead would refuse legitimate panoramas; this gives every image an answer.

    The result is the old resize-then-crop within 1 grey level (the filter positions are the
    same up to float rounding): on the VOC samples in ``shared/data`` 0.05-0.3 % of the values
    differ, by 1.
    """
    width, height = image.size
    new_w, new_h = resized_shape(width, height, size)
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    x0, x1 = left * width / new_w, min(width, (left + size) * width / new_w)
    y0, y1 = top * height / new_h, min(height, (top + size) * height / new_h)
    reach = 2 * max(1.0, height / new_h) + 1  # rows beyond the box that the vertical filter reads
    r0, r1 = max(0, math.floor(y0 - reach)), min(height, math.ceil(y1 + reach))
    rows = image.crop((0, r0, width, r1)).resize((size, r1 - r0), Image.BILINEAR, box=(x0, 0, x1, r1 - r0))
    return rows.resize((size, size), Image.BILINEAR, box=(0, y0 - r0, size, y1 - r0))


def decode_resized(path: Path, size: int) -> torch.Tensor:
    """An image file (a JPEG in VOC; any format PIL reads) as uint8 3 x size x size: its short
    side resized to ``size`` and the centre ``size x size`` crop (``resize_centre``)."""
    try:
        with Image.open(path) as image:
            _check_header(image, path)
            image = to_rgb(image, path)
        image = resize_centre(image, size)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(
            f"{path} cannot be decoded as a JPEG ({short_reason(error)}); restore it from the VOC release."
        ) from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def decode_resized_batch(paths: list[Path], size: int, device: torch.device | str) -> torch.Tensor:
    """``decode_resized`` of several JPEGs at once with torchvision's decoder on ``device``
    (nvJPEG on a GPU) and an antialiased bilinear resize there; uint8 N x 3 x size x size on the
    CPU. Within a few grey levels of the PIL path (different resampling code). This path resizes
    the whole image, so it takes only 8-bit JPEGs whose resized long side stays within
    ``MAX_BATCH_ASPECT`` x ``size`` (memory bounded as in ``resize_centre``); every other file
    goes through ``decode_resized``, which names it or decodes it."""
    import torchvision.io
    from torchvision.transforms.v2 import functional as TF

    device = torch.device(device)
    data = []
    for path in paths:
        try:
            with Image.open(path) as image:
                _check_header(image, path)
                jpeg = image.format == "JPEG" and image.mode in ("RGB", "L")
                jpeg = jpeg and max(resized_shape(*image.size, size)) <= MAX_BATCH_ASPECT * size
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
    slow = set(range(len(paths))) - set(readable)
    for i, image in zip(readable, decoded):
        new_w, new_h = resized_shape(image.shape[2], image.shape[1], size)
        if max(new_w, new_h) > MAX_BATCH_ASPECT * size:  # the header said otherwise
            slow.add(i)
            continue
        image = TF.resize(image, [new_h, new_w], antialias=True)
        top, left = round((new_h - size) / 2), round((new_w - size) / 2)
        out[i] = image[:, top : top + size, left : left + size].cpu()
    for i in sorted(slow):
        out[i] = decode_resized(paths[i], size)
    return out


def voc_fingerprint(paths: list[Path], size: int) -> str:
    """Changes whenever an image is added, removed, replaced or touched."""
    h = hashlib.sha256(f"v{VOC_CACHE_VERSION} {size}".encode())
    for path in paths:
        stat = path.stat()
        h.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """BLAKE2b of a file's contents, read in chunks (about 1 s per GB on one core, less than
    reading the file from disk; the VOC training cache is 1.1 GB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


MAX_CACHE_META_BYTES = 1 << 16  # the meta file this tool writes is about 300 bytes


def read_cache_meta(meta_path: Path) -> dict | None:
    """The resize cache's ``.json`` if it is what this tool writes (an object with a
    fingerprint and a digest, both text); otherwise None, after a warning saying why."""
    try:
        if meta_path.stat().st_size > MAX_CACHE_META_BYTES:
            raise ValueError(f"larger than {MAX_CACHE_META_BYTES} bytes")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        logger.warning("resize cache meta %s is unreadable (%s); rebuilding the cache", meta_path, short_reason(error))
        return None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(key), str) for key in ("fingerprint", "digest")):
        logger.warning("resize cache meta %s is not what this tool writes (no fingerprint and digest); rebuilding the "
                       "cache", meta_path)  # fmt: skip
        return None
    return meta


def _cached_array(cache: Path, meta: dict, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cache memory-mapped, if it has ``shape`` and the digest its meta recorded when it was
    built; otherwise None, after a warning. The fingerprint covers the JPEGs, not the cache: a
    cache replaced by zeros of the right shape would be used without the digest."""
    try:
        array = np.load(cache, mmap_mode="c", allow_pickle=False)
        if array.shape != shape or array.dtype != np.uint8:
            problem = f"holds {array.dtype} {array.shape}, not uint8 {shape}"
        elif cache.stat().st_size != array.offset + array.nbytes:
            problem = "has bytes beyond its array"
        elif file_digest(cache) != meta["digest"]:
            problem = "does not match the digest recorded when it was built (it was changed or damaged)"
        else:
            return array
    except (OSError, ValueError) as error:
        problem = f"is unreadable ({short_reason(error)})"
    logger.warning("resize cache %s %s; rebuilding it", cache, problem)
    return None


def load_resize_cache(paths: list[Path], cache: Path, size: int, device: str = "cpu") -> np.ndarray:
    """The images resized to ``size`` as a memory-mapped N x 3 x size x size uint8 array, built
    once into ``cache`` (``.npy`` + ``.json`` with the sources' fingerprint and the cache's own
    digest) and rebuilt when the sources change or the cache does not match its digest. On a
    CUDA ``device`` the JPEGs are decoded and resized on the GPU."""
    fingerprint = voc_fingerprint(paths, size)
    meta_path = cache.with_suffix(".json")
    shape = (len(paths), 3, size, size)
    if cache.is_file() and meta_path.is_file():
        meta = read_cache_meta(meta_path)
        if meta is not None and meta["fingerprint"] != fingerprint:
            logger.info("the images changed since %s was built; rebuilding it", cache)
        elif meta is not None:
            array = _cached_array(cache, meta, shape)
            if array is not None:
                return array

    logger.info("building the %dx%d resize cache of %d images in %s (once)", size, size, len(paths), cache)
    fd, tmp = temp_file_beside(cache)
    os.close(fd)
    try:
        _fill_resized(np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape), paths, size, device)
        digest = file_digest(Path(tmp))
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json({"fingerprint": fingerprint, "digest": digest, "shape": list(shape), "count": len(paths)},
                      meta_path)  # fmt: skip
    return np.load(cache, mmap_mode="c", allow_pickle=False)


def _fill_resized(array: np.ndarray, paths: list[Path], size: int, device: str = "cpu") -> None:
    """Decode and resize ``paths`` into the rows of ``array``, then flush it to disk: on a GPU
    in batches of 64 through nvJPEG, on the CPU on a few threads (PIL releases the GIL).

    Stops promptly on Ctrl-C, SIGTERM (main's handler raises in this thread) or a bad image:
    the queued images are cancelled and only those already being decoded are waited for,
    instead of the whole data set that ``pool.map`` has submitted."""
    bar = tqdm(total=len(paths), desc="resize", leave=False, disable=not sys.stderr.isatty())
    try:
        if torch.device(device).type == "cuda":
            for start in range(0, len(paths), 64):
                chunk = paths[start : start + 64]
                array[start : start + len(chunk)] = decode_resized_batch(chunk, size, device).numpy()
                bar.update(len(chunk))
        else:

            def work(i: int) -> None:
                array[i] = decode_resized(paths[i], size).numpy()

            pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
            try:
                for _ in pool.map(work, range(len(paths))):
                    bar.update(1)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    array.flush()


def voc_cache_dir(folder: Path, options: DataOptions) -> Path:
    """``--cache-dir``, else ``alexnet_cache/`` inside the VOC folder, else (read-only data) the
    user's cache folder."""
    if options.cache_path is not None:
        return options.cache_path
    beside = folder / "alexnet_cache"
    if is_writable_dir(beside):
        return beside
    fallback = user_cache_dir() / f"voc2012-{short_hash(str(folder.resolve()))}"
    logger.warning("%s is read-only; keeping the resize cache in %s (choose with --cache-dir)", folder, fallback)
    return fallback


def load_voc_split(folder: Path, name: str, ids: list[str], cache_dir: Path, device: str = "cpu") -> Split:
    """Labels from the XML files and images from the resize cache for one image list (its ids
    already checked by ``read_image_list``; ``safe_child`` again here, since this is where they
    become paths)."""
    list_path = folder / "ImageSets" / "Main" / f"{name}.txt"
    jpegs, labels = [], []
    for image_id in ids:
        try:
            jpeg = safe_child(folder / "JPEGImages", f"{image_id}.jpg")
            xml = safe_child(folder / "Annotations", f"{image_id}.xml")
        except UnsafeName as error:
            raise DataError(
                f"{list_path}: the image id {printable(image_id)!r} cannot name a file in the VOC folder ({error}); fix "
                "its line or remove it."
            ) from None
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


SINGLE_LABEL = "single-label"
MULTI_LABEL = "multi-label"
#: Reader options every data set accepts; the others are listed by the data sets that take them.
COMMON_OPTIONS = frozenset({"data_dir", "download", "cache_dir", "decode_device"})


@dataclass(frozen=True)
class DatasetInfo:
    """A registered data set: its reader, the size of the images it yields, its task
    (``single-label``: one class per image; ``multi-label``: 1 / -1 / 0 per class, VOC style)
    and the reader options it takes beyond ``COMMON_OPTIONS``."""

    load: Callable[[DataOptions], DataSet]
    image_size: int
    task: str = SINGLE_LABEL
    options: frozenset[str] = frozenset()

    def accepts(self, option: str) -> bool:
        return option in COMMON_OPTIONS or option in self.options


DATASETS: dict[str, DatasetInfo] = {
    "Shapes": DatasetInfo(load_shapes, 32, options=frozenset({"shapes_train", "shapes_test", "shapes_seed"})),
    "Cifar10": DatasetInfo(lambda options: load_cifar(CIFAR10, options, "Cifar10"), 32),
    "Cifar100": DatasetInfo(lambda options: load_cifar(CIFAR100, options, "Cifar100"), 32,
                            options=frozenset({"coarse_labels"})),
    "PascalVOC2012": DatasetInfo(load_voc2012, VOC_CACHE_SIZE, task=MULTI_LABEL),
}  # fmt: skip


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


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops the run
    cleanly (saving ``last.pt``) and then shuts them down. Schedulers (Slurm, systemd) send
    SIGTERM to every process of the job at once; a worker killed by it makes the main process's
    next batch a RuntimeError instead of a clean stop. A worker still exits when the main
    process dies (the DataLoader's watchdog) and on SIGKILL, which schedulers send after their
    grace period."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
            worker_init_fn=_ignore_stop_signals,
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
