"""The resize cache: images decoded and resized once (``data.images``) into a ``.npy`` file,
memory-mapped afterwards, plus a ``.json`` with the sources' fingerprint and the cache's own
digest; rebuilt when the sources change or the cache no longer matches its digest."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.images import decode_resized, decode_resized_batch
from utils import atomic_write_json, short_reason, temp_file_beside

logger = logging.getLogger(__name__)


#: 2: the centre box is resized on its own (``resize_centre``), and the cache's digest is kept.
VOC_CACHE_VERSION = 2


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
