"""The sharded image cache: every image resized once the paper's way (short side ``size``, centre
``size`` x ``size``: ``data.images.decode_resized``) and re-encoded as a JPEG, in shards of
``SHARD_IMAGES`` images that stream sequentially, plus the training statistics of each shard.

Why JPEG at quality 95 with full-resolution chroma (4:4:4): measured on the 64 photos of
``shared/data/imagenet-sample`` at 256 x 256 (2-core CPU), against the direct resize:

    encoding        bytes/image   mean |diff|   worst image's mean   max   decode (torchvision)
    q90, 4:2:0          20.5 K        2.66            11.1            167        0.8 ms
    q90, 4:4:4          25.7 K        2.15             5.9             43        1.0 ms
    q95, 4:4:4          37.1 K        1.47             3.2             24        0.4-0.9 ms
    PNG (lossless)     105.5 K        0               0                 0        1.6 ms

q95 4:4:4 is the smallest that keeps the mean difference under 2 grey levels (the issue's
"within 2 grey levels", read as a mean for a lossy format): 47 GB per 1.28 M images, against
252 GB of raw pixels and 135 GB of PNG, and it decodes faster than PNG. PIL and torchvision decode
these files to identical pixels (both libjpeg-turbo).

A shard file is ``<MAGIC><fingerprint><its images' JPEGs back to back><tail><tail length: 8
bytes><MAGIC>``; the fingerprint (names, sizes and times of its sources, the format and its
number) says whether it is still the cache of its sources; the tail is an ``.npz`` with the
images' byte offsets, the sums the statistics need (per-pixel sum, RGB outer-product sum) over the
decoded images and a BLAKE2b digest of all of it. Each shard is written to a temporary file and renamed when
complete, so an interrupted preparation (Ctrl-C, ``kill -9``) keeps every finished shard and a
rerun builds only the rest; a shard whose digest does not match (damaged, truncated, changed) is
rebuilt with a warning.

Checking every digest reads the whole cache (about 49 GB for ImageNet) at every start, so a shard
is hashed only when it is new to this folder's record of verified shards (``verified.json``: each
shard's size and modification time when its digest last matched) or its size or time differ from
it; otherwise only its structure is checked (head, tail, fingerprint: a few small reads). Damage
that leaves both unchanged (bit rot under a restored mtime) is then caught only when the image
fails to decode, as one sentence naming the shard (``ShardStore.decode_encoded``), or not at all
where the damaged JPEG still decodes. A shard modified within ``RACY_NS`` of being recorded is
not recorded (a file system's clock ticks coarsely, so a change right after the check can keep
the same time), and is hashed again at the next start. The record is read only up to the size a
record of the cache's shards can have (``verified_limit``); a larger or damaged one is replaced,
every shard hashed again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data.core import ALONE, DataError, Peers, Split
from data.images import decode_resized
from utils import short_reason

logger = logging.getLogger(__name__)

#: 1: JPEG q95 4:4:4 shards with per-shard statistics.
SHARD_VERSION = 1
JPEG_QUALITY = 95
#: How the cached pixels are made, in each shard's fingerprint: a change rebuilds the cache. The
#: resize is always Pillow's on the CPU (``data.images.resize_centre``), whatever device trains:
#: Pillow 10.4, 11.3, 12.0 and 13.0 (libjpeg-turbo 3.0.3 to 3.2.0) give the same pixels and the
#: same JPEG bytes, measured on the 72 photos of ``shared/data`` at 256 and 32, so Pillow's version
#: is left out (it would rebuild an ImageNet cache at every upgrade for nothing).
RECIPE = f"pillow bilinear centre-box, jpeg q{JPEG_QUALITY} 4:4:4"
SHARD_IMAGES = 1024  # about 37 MB per shard of 256 x 256 images: few files, little lost to a kill
MAGIC = b"ALXSHRD1"
HEAD_BYTES = len(MAGIC) + 64  # MAGIC and the shard's fingerprint (SHA-256, hex)
FAILURES_SHOWN = 3
VERIFIED = "verified.json"  # the record of shards whose digest matched, in each cache folder
RACY_NS = 2_000_000_000  # a shard modified this recently is not trusted by its (size, time) alone
#: Room for one shard's entry in ``verified.json``, which takes about 50 bytes (``verified_limit``).
VERIFIED_BYTES_PER_SHARD = 256

#: A shard file's (size, mtime_ns): when both are what they were when its digest matched, the
#: digest is not computed again.
Stamp = tuple[int, int]


def decode_jpegs(data: list[torch.Tensor], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Encoded JPEGs (1-D uint8 tensors) as uint8 3 x H x W RGB tensors on ``device`` (nvJPEG in one
    batched call on a GPU). torchvision 0.29 deprecates its decoders in favour of TorchCodec (the
    maintained decoders since torchcodec 0.16). Checked with torchcodec 0.17 from pip on this
    project's CPU machine: it installs, and its ``decode_jpeg`` gives these shards' pixels exactly,
    at 0.73 ms an image against torchvision's 0.44 ms. torchvision stays until it drops the
    decoders (no new dependency, and it is faster here); this is the one function to change."""
    import torchvision.io

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated since torchvision 0.29", category=DeprecationWarning)
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)


def split_jpegs(data: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """JPEGs stored back to back in ``data`` (``ShardStore.encoded``), one 1-D view each."""
    return list(data.tensor_split(offsets[1:-1]))


def encode_jpeg(image: torch.Tensor) -> bytes:
    """A uint8 3 x H x W image as a quality-95 JPEG without chroma subsampling (see the module
    docstring for why)."""
    out = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def fingerprint(paths: list[Path], size: int, number: int) -> str:
    """A shard's: changes whenever one of its images is added, removed, replaced or touched, or
    the format or the ``RECIPE`` changes (so a changed image rebuilds its own shard, not the whole
    cache)."""
    h = hashlib.sha256(f"shards v{SHARD_VERSION} {RECIPE} {size} {number}".encode())
    for path in paths:
        stat = path.stat()
        h.update(f"{path.parent.name}/{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class ShardStats:
    """Sums over decoded uint8 images from which ``data.transforms``' statistics follow exactly:
    ``image_sum`` (3 x S x S, 0-255 units), ``outer`` (3 x 3 sum of RGB outer products over all
    pixels, [0, 1] units) and ``count`` (images). Shards' stats add up."""

    image_sum: np.ndarray
    outer: np.ndarray
    count: int

    @classmethod
    def of(cls, images: torch.Tensor) -> ShardStats:
        x = images.to(torch.float64)
        pixels = x.div(255).permute(1, 0, 2, 3).reshape(3, -1)
        return cls(x.sum(0).numpy(), (pixels @ pixels.T).numpy(), images.shape[0])

    def __add__(self, other: ShardStats) -> ShardStats:
        return ShardStats(self.image_sum + other.image_sum, self.outer + other.outer, self.count + other.count)

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        pixels = self.count * self.image_sum.shape[1] * self.image_sum.shape[2]
        mean = torch.from_numpy(self.image_sum).sum((1, 2)) / 255 / pixels
        return mean, torch.from_numpy(self.outer) / pixels, pixels

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``data.transforms.channel_stats`` of the decoded images."""
        mean, second, _ = self._moments()
        std = (second.diagonal() - mean.square()).clamp_min(1e-12).sqrt()
        return mean.float(), std.float()

    def mean_image(self) -> torch.Tensor:
        """As ``data.transforms.mean_image`` of the decoded images."""
        return torch.from_numpy(self.image_sum / self.count).float()

    def rgb_eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``data.transforms.rgb_eigen`` of the decoded images."""
        mean, second, _ = self._moments()
        values, vectors = torch.linalg.eigh(second - torch.outer(mean, mean))
        return values.flip(0).float(), vectors.flip(1).float()


class ShardStore:
    """The images of a sharded cache, behaving enough like a uint8 N x 3 x S x S tensor for the
    rest of the code: ``len``, ``shape``, and indexing (an int, a slice, an index tensor or list)
    decodes those images. Picklable (DataLoader workers reopen the files lazily)."""

    def __init__(self, files: list[Path], offsets: list[np.ndarray], size: int, stats: ShardStats) -> None:
        self.files = files
        self.offsets = offsets
        self.size = size
        self.stats = stats
        counts = [len(o) - 1 for o in offsets]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._fds: dict[int, int] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        for fd in self.__dict__.get("_fds", {}).values():
            os.close(fd)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.size, self.size))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        """The decoded size."""
        return len(self) * 3 * self.size * self.size

    def element_size(self) -> int:
        return 1

    def numel(self) -> int:
        return self.nbytes

    def _indices(self, key: int | slice | torch.Tensor | list[int]) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        return np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64).reshape(-1)

    def encoded(self, key: int | slice | torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored JPEG bytes of those images back to back in one uint8 tensor, and the N + 1
        offsets of the images in it (``split_jpegs`` makes them one tensor each again). Two
        tensors whatever N: each tensor that crosses from a DataLoader worker to the training
        process holds a shared-memory file descriptor until it is used, and one per image ran
        out of them (``ulimit -n``) with 8 workers or a 512-image evaluation batch."""
        spans = []
        for i in self._indices(key):
            i = int(i) + len(self) if i < 0 else int(i)
            if not 0 <= i < len(self):
                raise IndexError(f"image {i} is out of range for a cache of {len(self)}")
            shard = int(np.searchsorted(self.starts, i, side="right")) - 1
            start, end = self.offsets[shard][i - self.starts[shard] : i - self.starts[shard] + 2]
            spans.append((shard, int(start), int(end)))
        offsets = np.concatenate([[0], np.cumsum([end - start for _, start, end in spans])]).astype(np.int64)
        data = bytearray(int(offsets[-1]))
        view = memoryview(data)
        for (shard, start, end), at in zip(spans, offsets.tolist(), strict=False):
            if shard not in self._fds:
                self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
            os.preadv(self._fds[shard], [view[at : at + end - start]], start)  # a short read leaves a bad JPEG
        images = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return images, torch.from_numpy(offsets)

    def decode(self, key: int | slice | torch.Tensor | list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Those images decoded, uint8 N x 3 x S x S on ``device``."""
        data, offsets = self.encoded(key)
        if len(offsets) == 1:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8, device=device)
        return self.decode_encoded(data, offsets, key, device)

    def decode_encoded(
        self,
        data: torch.Tensor,
        offsets: torch.Tensor,
        key: int | slice | torch.Tensor | list[int],
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """The images ``encoded(key)`` gave as ``data`` and ``offsets``, decoded on ``device`` in one
        call (nvJPEG on a GPU). A JPEG that does not decode is a ``DataError`` naming its shard:
        damage that kept the shard's size and time (bit rot under a restored time), which a start
        does not hash (``verified.json``), shows only here."""
        try:
            return torch.stack(decode_jpegs(split_jpegs(data, offsets), device))
        except (RuntimeError, ValueError) as error:
            raise self._damaged(key, error) from None

    def _damaged(self, key: int | slice | torch.Tensor | list[int], error: Exception) -> DataError:
        """The sentence for images of ``key`` that failed to decode together: the first that fails
        alone on the CPU names its shard (the first image's, should none fail alone)."""
        indices = [int(i) + len(self) if i < 0 else int(i) for i in self._indices(key)]
        bad = indices[0]
        for i in indices:
            try:
                decode_jpegs(split_jpegs(*self.encoded([i])))
            except (RuntimeError, ValueError) as alone:
                bad, error = i, alone
                break
        shard = int(np.searchsorted(self.starts, bad, side="right")) - 1
        path, first = self.files[shard], int(self.starts[shard])
        where = f"its image {bad - first + 1} of {int(self.starts[shard + 1]) - first}"
        # Without torchvision's "decode_jpeg, <source file>:<line>, " in front of libjpeg's reason.
        reason = short_reason(RuntimeError(re.sub(r"^\w+, \S+:\d+, ", "", str(error).strip())))
        return DataError(
            f"cache shard {path} is damaged: {where} cannot be decoded ({reason}), "
            "though its size and time are those recorded when its digest last matched; delete it and run again (or "
            "run prepare), which rebuilds it from the images."
        )

    def __getitem__(self, key: int | slice | torch.Tensor | list[int] | tuple) -> torch.Tensor:
        if isinstance(key, tuple):  # images[i, c]: the images decoded, then the rest of the index
            return self[key[0]][key[1:]] if key else self[:]
        images = self.decode(key)
        return images[0] if isinstance(key, int) else images

    def decode_all(self, chunk: int = 1024) -> torch.Tensor:
        """Every image, decoded into one uint8 tensor in memory."""
        out = torch.empty(self.shape, dtype=torch.uint8)
        for start in range(0, len(self), chunk):
            out[start : start + chunk] = self.decode(slice(start, start + chunk))
        return out

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stats.channel_stats()

    def mean_image(self) -> torch.Tensor:
        return self.stats.mean_image()

    def rgb_eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stats.rgb_eigen()


# --- one shard --------------------------------------------------------------------------------


def _digest(data: bytes | memoryview, offsets: np.ndarray, stats: ShardStats, number: int) -> str:
    h = hashlib.blake2b(data)  # the head (fingerprint) and the JPEGs
    for array in (offsets, stats.image_sum, stats.outer, np.array([stats.count, number])):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def shard_fingerprint(path: Path) -> str | None:
    """The fingerprint a shard was built for, from its head alone; None if it has none."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return None
    return head[len(MAGIC) :].decode("ascii", "replace") if len(head) == HEAD_BYTES and head.startswith(MAGIC) else None


def read_shard(
    path: Path, print_: str, number: int, count: int, size: int, verified: Stamp | None = None
) -> tuple[np.ndarray, ShardStats]:
    """A complete shard's offsets (in the file) and stats; ``ValueError`` saying what is wrong
    otherwise (built for other sources: an older cache; a digest mismatch: damaged or changed).
    With ``verified``, the shard's stamp when its digest last matched, a shard that still has that
    stamp is only checked for its structure (see the module docstring)."""
    return _read_shard(path, print_, number, count, size, verified)[:2]


def _stamp(stat: os.stat_result) -> Stamp:
    return stat.st_size, stat.st_mtime_ns


def _read_shard(
    path: Path, print_: str, number: int, count: int, size: int, verified: Stamp | None
) -> tuple[np.ndarray, ShardStats, Stamp]:
    """``read_shard``, and the stamp the file had when it was read (taken before reading, so a
    change while it is read shows as another stamp next time)."""
    try:
        with open(path, "rb") as f:
            stamp = _stamp(os.fstat(f.fileno()))
            whole = stamp != verified
            blob = f.read() if whole else b""
            if whole:
                head, end, length = blob[:HEAD_BYTES], blob[-16:], len(blob)
            else:
                head, length = f.read(HEAD_BYTES), stamp[0]
                f.seek(max(0, length - 16))
                end = f.read(16)
            if length < HEAD_BYTES + 16 or end[-8:] != MAGIC or not head.startswith(MAGIC):
                raise ValueError("does not end as a complete shard does (truncated or appended to)")
            tail_length = int.from_bytes(end[:8], "little")
            if tail_length > length - 16 - HEAD_BYTES:
                raise ValueError("is truncated")
            if whole:
                tail_bytes = blob[length - 16 - tail_length : length - 16]
            else:
                f.seek(length - 16 - tail_length)
                tail_bytes = f.read(tail_length)
        with np.load(io.BytesIO(tail_bytes), allow_pickle=False) as tail:
            fields = {key: tail[key] for key in tail.files}
        offsets = fields["offsets"].astype(np.int64)
        stats = ShardStats(fields["image_sum"], fields["outer"], int(fields["count"]))
        digest = str(fields["digest"])
    except (OSError, ValueError, EOFError, KeyError) as error:
        known = isinstance(error, ValueError) and str(error).startswith(("does not end", "is truncated"))
        raise ValueError(str(error) if known else f"is unreadable ({short_reason(error)})") from None
    if head[len(MAGIC) :] != print_.encode():
        raise ValueError("belongs to another version of the data")
    data_length = length - 16 - tail_length
    fits = len(offsets) == count + 1 and offsets[0] == HEAD_BYTES and offsets[-1] == data_length
    if not fits or stats.image_sum.shape != (3, size, size) or stats.count != count:
        raise ValueError("does not hold the images it should")
    if whole and _digest(memoryview(blob)[:data_length], offsets, stats, number) != digest:
        raise ValueError("does not match its digest (it was damaged or changed)")
    return offsets, stats, stamp


def verified_limit(shards: int) -> int:
    """The most bytes the record of ``shards`` shards can take: each shard's line (its name, size
    and time) is about 50 bytes, counted as ``VERIFIED_BYTES_PER_SHARD``."""
    return 1024 + VERIFIED_BYTES_PER_SHARD * shards


def load_verified(folder: Path, shards: int) -> dict[str, Stamp]:
    """The folder's record of verified shards (file name -> stamp) for a cache of ``shards``
    shards; empty when it is missing, and, with a warning, when it is damaged or larger than such
    a record can be (``verified_limit``: it is not read whole). Every shard is then hashed, and the
    record written again."""
    record, problem = _read_verified(folder, shards)
    if problem:
        logger.warning("%s %s; every shard in %s is hashed again", folder / VERIFIED, problem, folder)
    return record


def _read_verified(folder: Path, shards: int) -> tuple[dict[str, Stamp], str | None]:
    limit = verified_limit(shards)
    try:
        with open(folder / VERIFIED, "rb") as f:
            text = f.read(limit + 1)
    except FileNotFoundError:
        return {}, None
    except OSError as error:
        return {}, f"cannot be read ({short_reason(error)})"
    if len(text) > limit:
        return {}, f"is larger than the record of {shards} shards can be (over {limit:,} bytes), so it was not read"
    try:
        record = json.loads(text)
        return {name: (int(s[0]), int(s[1])) for name, s in record["shards"].items()}, None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}, "is damaged"


def save_verified(folder: Path, stamps: dict[str, Stamp], shards: int) -> None:
    """Write the record of a cache of ``shards`` shards (a temporary file renamed over it: a kill
    leaves the old one or the new one); stamps modified less than ``RACY_NS`` ago are left out."""
    now = time.time_ns()
    settled = {name: list(s) for name, s in sorted(stamps.items()) if s[1] <= now - RACY_NS}
    if ({name: tuple(s) for name, s in settled.items()}, None) == _read_verified(folder, shards):
        return  # unchanged: the file is left alone (a damaged one is replaced)
    text = json.dumps({"version": SHARD_VERSION, "shards": settled}, indent=0) + "\n"
    tmp = folder / f".{VERIFIED}.{os.getpid()}.tmp"
    try:
        tmp.write_text(text)
        os.replace(tmp, folder / VERIFIED)
    except OSError as error:  # a read-only cache still works, it is only hashed at every start
        tmp.unlink(missing_ok=True)
        logger.warning(
            "cannot record the verified shards in %s (%s); they will be hashed again next time",
            folder,
            short_reason(error),
        )


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread while a shard is built in this process, as in the preparing workers
    (``_worker_init``): it works on one small image at a time, and waking a pool of threads for
    each of ``ShardStats.of``'s small products costs more than the product itself on a busy
    machine (a 16 x 16 image: 15 ms on two threads, 0.003 ms on one; 256 x 256: 3.8 and 0.26 ms,
    on this project's 2-core CPU under a load of 7)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def encode_images(images: Iterable[torch.Tensor]) -> tuple[list[bytes], ShardStats]:
    """The images as JPEGs and the stats of the images as they decode from them, one image at a
    time: a preparing worker holds a shard's JPEGs (about 37 MB), never its decoded images."""
    blobs: list[bytes] = []
    stats = None
    with _one_thread():
        for image in images:
            blobs.append(encode_jpeg(image))
            decoded = decode_jpegs([torch.frombuffer(bytearray(blobs[-1]), dtype=torch.uint8)])[0]
            one = ShardStats.of(decoded[None])
            stats = one if stats is None else stats + one
    if stats is None:
        raise ValueError("a shard holds at least one image")
    return blobs, stats


def write_shard(path: Path, blobs: list[bytes], stats: ShardStats, print_: str, number: int) -> np.ndarray:
    """Write the JPEGs ``blobs`` (and their ``stats``, from ``encode_images``) as the shard ``path``
    of fingerprint ``print_``: a temporary file renamed when complete. Returns their offsets in it."""
    offsets = np.concatenate([[HEAD_BYTES], HEAD_BYTES + np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    data = MAGIC + print_.encode() + b"".join(blobs)
    tail = io.BytesIO()
    np.savez(
        tail,
        offsets=offsets,
        image_sum=stats.image_sum,
        outer=stats.outer,
        count=np.array(stats.count),
        digest=np.array(_digest(data, offsets, stats, number)),
    )
    tail_bytes = tail.getvalue()
    # Named with this process's id, so that a later run can tell a dead preparation's file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.write(tail_bytes)
            f.write(len(tail_bytes).to_bytes(8, "little"))
            f.write(MAGIC)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return offsets


@dataclass
class _Job:
    """One shard to check or build: its file, sources, and what it must match."""

    path: Path
    sources: list[Path]
    fingerprint: str
    number: int
    size: int
    verified: Stamp | None = None  # its stamp when its digest last matched


@dataclass
class _Done:
    number: int
    offsets: np.ndarray | None
    stats: ShardStats | None
    failures: list[tuple[Path, str]]
    warning: str | None = None
    built: bool = False
    stamp: Stamp | None = None  # the file's, once it is known to match its digest


def _ensure_shard(job: _Job) -> _Done:
    """The shard as it is when complete and intact; otherwise built (with a warning when it was
    there but damaged). Images that fail to decode are reported and the shard is not written."""
    warning = None
    if job.path.exists():
        try:
            offsets, stats, stamp = _read_shard(
                job.path, job.fingerprint, job.number, len(job.sources), job.size, job.verified
            )
            return _Done(job.number, offsets, stats, [], stamp=stamp)
        except ValueError as error:
            if "another version" not in str(error):
                warning = f"cache shard {job.path} {error}; rebuilding it"
    failures: list[tuple[Path, str]] = []
    blobs, stats = encode_images(_resized(job, failures))  # every image, so that all failures are named
    if failures:
        return _Done(job.number, None, None, failures, warning)
    offsets = write_shard(job.path, blobs, stats, job.fingerprint, job.number)
    return _Done(job.number, offsets, stats, [], warning, True, _stamp(job.path.stat()))


def _resized(job: _Job, failures: list[tuple[Path, str]]) -> Iterator[torch.Tensor]:
    """The job's images resized one by one; a file that fails is added to ``failures`` and a
    blank image stands in for it (nothing is written)."""
    blank = torch.zeros(3, job.size, job.size, dtype=torch.uint8)
    for path in job.sources:
        try:
            yield decode_resized(path, job.size)
        except DataError as error:
            failures.append((path, str(error)))
            yield blank


def _worker_init() -> None:
    """Workers leave Ctrl-C and SIGTERM to the main process, which stops them itself (see
    ``_run_jobs``), and use one thread each: the processes are the parallelism."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def _stop(pool: concurrent.futures.ProcessPoolExecutor, jobs: list[_Job]) -> None:
    """Stop promptly (Ctrl-C, SIGTERM raised in this process by main's handler): the workers are
    killed mid-shard rather than waited for (a shard is seconds of work), and the temporary
    files of the shards they were writing removed. Finished shards stay, for the rerun."""
    processes = list((pool._processes or {}).values())  # private, but there is no public way to kill them
    for process in processes:
        process.kill()
    for process in processes:
        process.join()
    pool.shutdown(wait=True, cancel_futures=True)
    for process in processes:
        for job in jobs:
            job.path.with_name(f".{job.path.name}.{process.pid}.tmp").unlink(missing_ok=True)


def _run_jobs(jobs: list[_Job], workers: int, progress: bool = True) -> list[_Done]:
    """Every job's result, on ``workers`` processes (in this one for a single worker or shard),
    with a progress bar on a terminal (where ``progress``)."""
    total = sum(len(job.sources) for job in jobs)
    bar = tqdm(total=total, desc="prepare", unit="img", leave=False, disable=not (progress and sys.stderr.isatty()))
    done: list[_Done] = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                done.append(_ensure_shard(job))
                bar.update(len(job.sources))
            return done
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = concurrent.futures.ProcessPoolExecutor(
            min(workers, len(jobs)), multiprocessing.get_context(method), _worker_init
        )
        try:
            futures = {pool.submit(_ensure_shard, job): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                done.append(future.result())
                bar.update(len(futures[future].sources))
        except BaseException:
            _stop(pool, jobs)
            raise
        pool.shutdown(wait=True)
        return done
    finally:
        bar.close()


@dataclass
class _Report:
    """What a process tells the others about a shard it built or checked."""

    number: int
    stamp: Stamp | None  # None: incomplete (its images failed)
    failures: list[tuple[Path, str]]
    built: bool


def _shared(peers: Peers, run: Callable[[], list[_Done]]) -> tuple[list[_Done], list[_Report]]:
    """``run()`` in this process, then what every process found (in shard order). A problem the
    user must fix that one process meets (a ``DataError``; an ``OSError``: a full disk, a folder
    it may not write) is raised by all of them alike, instead of leaving the others waiting at
    the next collective for one that has stopped."""
    try:
        done, problem = run(), None
    except (DataError, OSError) as error:
        done, problem = [], error
    gathered = peers.gather((problem, [_Report(d.number, d.stamp, d.failures, d.built) for d in done]))
    for other, _ in gathered:
        if other is not None:
            raise other
    return done, sorted((r for _, reports in gathered for r in reports), key=lambda r: r.number)


def _check_theirs(jobs: list[_Job], workers: int, rank: int) -> list[_Done]:
    """The shards other processes built, read by this one; those it finds missing or different
    (a cache folder of its own) built again, and their failures a ``DataError``."""
    done = _run_jobs(jobs, workers, progress=False)
    rebuilt = [d for d in done if d.built or d.failures]
    if rebuilt:
        logger.warning(
            "process %d found %d shards that the others built missing or different in %s (a cache folder "
            "of its own?) and built them again",
            rank,
            len(rebuilt),
            jobs[0].path.parent,
        )
    failures = [f for d in done for f in d.failures]
    if failures:
        kept = sum(d.stamp is not None for d in done)
        raise DataError(_failure_message(failures, sum(len(job.sources) for job in jobs), kept))
    return done


def shard_split(
    paths: list[Path],
    labels: torch.Tensor,
    cache_dir: Path,
    name: str,
    size: int = 256,
    workers: int | None = None,
    shard_images: int = SHARD_IMAGES,
    peers: Peers = ALONE,
) -> Split:
    """A ``Split`` of ``labels`` whose images are ``paths`` resized the paper's way, from the
    sharded cache ``cache_dir/<name>_<size>/``: reused when the sources are unchanged, completed
    when a preparation was interrupted, rebuilt when they changed or a shard is damaged. Shards
    are built on the CPU in parallel by ``workers`` processes (default: every core, shared out
    between the ``peers`` of this machine), whatever device trains: Pillow's resize
    (``data.images.decode_resized``) is the one recipe, so the pixels do not depend on the
    machine, and it handles any downscale (torchvision's antialiased resize on CUDA refuses a
    4032 x 3024 photo to 32 pixels for lack of shared memory).

    Under torchrun (``peers``) the processes share the work: each builds or checks the shards
    numbered rank, rank + world, ..., so they wait for each other only as long as the slowest
    share takes beyond the others, never for a whole preparation. Then each reads the others'
    shards, checking only their structure where a shard has the size and time its builder
    reported (one cache folder for all: one machine, or a shared file system); one that finds a
    shard missing (machines with a cache folder each) builds it too.

    Files that cannot be decoded are collected over the whole set (the good shards are written
    and kept) and reported in one ``DataError``, the same in every process."""
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
    folder = cache_dir / f"{name}_{size}"
    count = math.ceil(len(paths) / shard_images)
    verified = load_verified(folder, count)
    jobs = []
    for number, start in enumerate(range(0, len(paths), shard_images)):
        sources = paths[start : start + shard_images]
        jobs.append(
            _Job(
                folder / f"{number:05d}.shard",
                sources,
                fingerprint(sources, size, number),
                number,
                size,
                verified.get(f"{number:05d}.shard"),
            )
        )
    present = [job for job in jobs if job.path.exists()]
    changed = sum(shard_fingerprint(job.path) not in (job.fingerprint, None) for job in present)
    if changed:
        logger.info(
            "%d shards in %s were built from other images or by another recipe; rebuilding them", changed, folder
        )
    if len(present) - changed < len(jobs):
        logger.info(
            "building the %dx%d cache of %d images in %s as JPEG shards (once; %d of %d shards there%s)",
            size,
            size,
            len(paths),
            folder,
            len(present),
            len(jobs),
            f"; {peers.world} processes share the work" if peers.world > 1 else "",
        )
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, cores // peers.local)
    mine = jobs[peers.rank :: peers.world]
    done, reports = _shared(peers, lambda: _run_jobs(mine, workers, progress=peers.rank == 0))
    for d in done:
        if d.warning:
            logger.warning("%s", d.warning)
    failures = [f for r in reports for f in r.failures]
    if peers.world > 1 and not failures:
        reported = {r.number: r.stamp for r in reports}
        theirs = [replace(job, verified=reported[job.number]) for job in jobs if job.number % peers.world != peers.rank]
        done += _shared(peers, lambda: _check_theirs(theirs, workers, peers.rank))[0]
    built = sum(r.built for r in reports)
    if built and built < len(jobs):
        logger.info("built %d of the %d shards in %s; the others were complete", built, len(jobs), folder)
    _remove_stale_shards(folder, len(jobs))
    if folder.is_dir():
        stamps = {r.number: r.stamp for r in reports} | {d.number: d.stamp for d in done}
        save_verified(folder, {jobs[n].path.name: stamp for n, stamp in stamps.items() if stamp is not None}, len(jobs))
    if failures:
        raise DataError(_failure_message(failures, len(paths), sum(r.stamp is not None for r in reports)))
    done.sort(key=lambda d: d.number)
    stats = ShardStats(np.zeros((3, size, size)), np.zeros((3, 3)), 0)
    for d in done:
        stats = stats + d.stats
    store = ShardStore([job.path for job in jobs], [d.offsets for d in done], size, stats)
    return Split(store, labels)


def _failure_message(failures: list[tuple[Path, str]], total: int, kept: int) -> str:
    """One sentence for every image that failed: the reader's own sentence when there is one;
    otherwise the count, the first few paths, the first reason and the fix."""
    if len(failures) == 1:
        return failures[0][1]
    shown = ", ".join(str(path) for path, _ in failures[:FAILURES_SHOWN])
    more = f" and {len(failures) - FAILURES_SHOWN} more" if len(failures) > FAILURES_SHOWN else ""
    return (
        f"{len(failures)} of {total} images cannot be decoded: {shown}{more} (the first: "
        f"{short_reason(DataError(failures[0][1]))}); remove or replace them, then run again ({kept} complete cache "
        "shards are kept)."
    )


def _remove_stale_shards(folder: Path, count: int) -> None:
    """Shards numbered beyond ``count``, left by an earlier, larger version of the data, and the
    temporary files of preparations whose process is gone (``kill -9``): cache files this tool
    wrote, never the user's."""
    for path in folder.glob("[0-9][0-9][0-9][0-9][0-9].shard"):
        if int(path.stem) >= count:
            path.unlink(missing_ok=True)
    for path in [*folder.glob(".[0-9][0-9][0-9][0-9][0-9].shard.*.tmp"), *folder.glob(f".{VERIFIED}.*.tmp")]:
        pid = path.name.split(".")[-2]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31  # another user's process, or no such id
    return True
