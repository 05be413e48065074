"""Loaders. Every data set is read once into memory as uint8 images plus labels and, where it
fits, moved to the training device whole (``place_split``), so a ``BatchLoader`` is tensor
indexing on that device followed by the batched transforms of ``data.transforms``. Data that do
not fit are streamed from their on-disk cache by a ``DataLoader`` with workers.

``make_loaders`` builds the training and evaluation loaders and the pipeline the way a training
run uses them.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing.util
import os
import re
import signal
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.core import DataError, DataSet, Split
from data.shards import ShardStore
from data.transforms import Pipeline, make_pipeline
from hardware.capabilities import Capabilities, capabilities

logger = logging.getLogger(__name__)


def fits_in_memory(nbytes: int, device: torch.device | Capabilities) -> bool:
    """Whether a data set of ``nbytes`` should live whole on ``device``: at most half of the
    free GPU memory (the model needs the rest) or half of the available RAM."""
    free = capabilities(device).free_memory()
    return free is None or nbytes <= free // 2


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops the run
    cleanly (saving ``last.pt``) and then shuts them down. Schedulers (Slurm, systemd) send
    SIGTERM to every process of the job at once; a worker killed by it makes the main process's
    next batch a RuntimeError instead of a clean stop. A worker still exits when the main
    process dies (the DataLoader's watchdog) and on SIGKILL, which schedulers send after their
    grace period."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


#: What torch raises in the training process when a DataLoader worker died: "DataLoader worker
#: (pid 4242) is killed by signal: Killed." (its SIGCHLD handler, wherever the training process
#: is), "... exited unexpectedly with exit code 1" (likewise), "DataLoader worker (pid(s) 4242)
#: exited unexpectedly" (found gone while waiting for a batch: ``LostWorker`` adds the signal).
LOST_WORKER = re.compile(
    r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:is killed by signal: ([^.]+)\.|exited unexpectedly)"
)


class LostWorker(RuntimeError):
    """DataLoader workers ``pids`` died; ``signal_name`` is the signal that killed the first, where
    known."""

    def __init__(self, pids: list[int], signal_name: str | None) -> None:
        super().__init__(f"DataLoader worker (pid(s) {', '.join(map(str, pids))}) exited unexpectedly")
        self.pids = pids
        self.signal_name = signal_name


def _lost_worker(error: BaseException, exit_codes: dict[int, int | None]) -> LostWorker | None:
    """``error`` as a ``LostWorker`` when it says a worker died (``LOST_WORKER``), with the signal
    from its message or from the workers' ``exit_codes`` (negative: killed by that signal)."""
    if isinstance(error, LostWorker):
        return error
    found = LOST_WORKER.search(str(error)) if isinstance(error, RuntimeError) else None
    if found is None:
        return None
    pids = [int(pid) for pid in found[1].split(",")]
    if found[2] is not None:
        name = next((s.name for s in signal.Signals if signal.strsignal(s) == found[2]), found[2])
        return LostWorker(pids, name)
    killed = [-code for pid in pids if (code := exit_codes.get(pid)) is not None and code < 0]
    return LostWorker(pids, signal.Signals(killed[0]).name if killed else None)


def lost_worker(error: BaseException) -> str | None:
    """What happened, for an error that says a DataLoader worker died: which worker, by which
    signal, and the usual cause; None for any other error."""
    lost = _lost_worker(error, {})
    if lost is None:
        return None
    who = f"DataLoader worker{'s' if len(lost.pids) > 1 else ''} (pid {', '.join(map(str, lost.pids))})"
    if lost.signal_name is None:
        return f"{who} stopped unexpectedly"
    cause = {
        "SIGKILL": ", most often by the kernel's out-of-memory killer (dmesg names it)",
        "SIGBUS": ", most often for want of shared memory (/dev/shm)",
    }.get(lost.signal_name, "")
    return f"{who} was killed by {lost.signal_name}{cause}"


#: The longest path of a Unix socket (``sun_path``, 108 bytes with the final NUL), and what
#: multiprocessing adds to its temporary folder's parent: ``/pymp-XXXXXXXX/listener-XXXXXXXX``.
SOCKET_PATH_MAX, SOCKET_NAME = 107, 32


def _share_the_temporary_folder() -> None:
    """Make multiprocessing's temporary folder (``pymp-*`` in TMPDIR) before the workers start.
    Each worker that hands a batch over makes one of its own otherwise, for the socket that passes
    its shared memory, and removes it when it exits; a worker killed (by the out-of-memory
    killer, say) leaves it behind. Made here, it is inherited by the forked workers (Linux's
    way of starting them) and removed by this process when it exits, however they end.

    Where TMPDIR is too long a path for those sockets (more than 75 characters: a cluster job's
    scratch folder, say), every batch a worker hands over would fail ("AF_UNIX path too long"):
    the folder is made in the first short standard one instead, as Python 3.13 does itself."""
    saved = tempfile.gettempdir()
    tempfile.tempdir = _short_temporary_base(saved) or saved
    try:
        multiprocessing.util.get_temp_dir()
    finally:
        tempfile.tempdir = saved


def _short_temporary_base(base: str) -> str | None:
    """``base`` if its sockets' paths fit, else the first of /tmp, /var/tmp, /dev/shm that is a
    writable folder whose do, else None (and the workers' sockets fail as they would have)."""
    for folder in (base, "/tmp", "/var/tmp", "/dev/shm"):
        if len(folder) + SOCKET_NAME <= SOCKET_PATH_MAX and os.path.isdir(folder) and os.access(folder, os.W_OK):
            return folder
    return None


class _CacheRows(torch.utils.data.Dataset):
    """Batches of rows of a ``.npy`` cache, opened lazily in each worker process."""

    def __init__(self, path: Path, labels: torch.Tensor) -> None:
        self.path = path
        self.labels = labels
        self.array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.ascontiguousarray(self.array[rows])), self.labels[torch.from_numpy(rows)]


class _StoreBatches(torch.utils.data.Dataset):
    """Batches of a sharded cache read in DataLoader workers: decoded there (``encoded=False``,
    CPU training) or left as JPEG bytes for the main process to decode on the GPU in one nvJPEG
    call (``encoded=True``: the batch's bytes in one tensor and their offsets,
    ``ShardStore.encoded``). With a ``pipeline`` the workers also augment each decoded batch, its
    index coming with the seed of its augmentation (``_seeded_shares``)."""

    def __init__(
        self, store: ShardStore, labels: torch.Tensor, encoded: bool, pipeline: Pipeline | None = None
    ) -> None:
        self.store = store
        self.labels = labels
        self.encoded = encoded
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(
        self, item: np.ndarray | tuple[np.ndarray, int]
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor] | _Failed:
        try:
            if self.pipeline is not None:
                index, seed = torch.from_numpy(item[0]), item[1]
                images = self.pipeline.train(self.store.decode(index), torch.Generator().manual_seed(seed))
                return images, self.labels[index]
            index = torch.from_numpy(item)
            images = self.store.encoded(index) if self.encoded else self.store.decode(index)
        except DataError as error:  # a damaged shard (``ShardStore.decode_encoded``)
            return _Failed(error)
        return images, self.labels[index]


@dataclass
class _Failed:
    """A user error met by a DataLoader worker, handed to the training process as a batch and
    raised there (``BatchLoader``): raised in the worker, it would come back with the worker's
    traceback in its message (the DataLoader's ``ExceptionWrapper``)."""

    error: DataError


def _batch_seed(generator: torch.Generator) -> int:
    """One batch's augmentation seed, drawn from the loader's generator."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _seeded_shares(shares: list[torch.Tensor], generator: torch.Generator) -> Iterator[tuple[torch.Tensor, int]]:
    """Each batch's indices with its seed, drawn from a copy of ``generator``: the workers get the
    seeds ahead of time, while the loader's own generator advances by one draw per batch only as
    batches are used, so that a checkpoint's generator state resumes with the next batch's seed."""
    ahead = torch.Generator().manual_seed(0)
    ahead.set_state(generator.get_state())
    for share in shares:
        yield share, _batch_seed(ahead)


def _by_value(shares: Iterable[torch.Tensor] | Iterable[tuple[torch.Tensor, int]]) -> Iterator:
    """The batches' indices as numpy arrays, which cross the workers' queue by value. A tensor
    there goes through shared memory, its file descriptor handed over a socket by a thread of this
    process; a worker killed in the middle of that (the out-of-memory killer's way) made that
    thread print a traceback above the one sentence that says what happened."""
    for share in shares:
        if isinstance(share, tuple):
            yield share[0].cpu().numpy(), share[1]
        else:
            yield share.cpu().numpy()


#: Batches each DataLoader worker reads ahead (DataLoader's default ``prefetch_factor``).
PREFETCH = 2


def stream_bound(batch: int, image_bytes: int, workers: int) -> int:
    """Host memory the batches of a streaming loader can hold at once, in bytes: each worker's
    ``PREFETCH`` batches read ahead plus the one being used (``workers`` = 0: that one alone)."""
    return (max(1, workers) * PREFETCH + 1) * batch * image_bytes


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

    A split whose images are a sharded cache (``ShardStore``) is streamed: the workers read and
    decode each batch (on a CUDA ``device`` they pass the JPEG bytes and this process decodes the
    batch with nvJPEG: ``Capabilities.decode_in_process``; ``device`` may be a ``Capabilities``).
    Host memory then holds at most ``stream_bound``: (workers x ``PREFETCH`` + 1) batches of
    decoded images (on CUDA, of JPEG bytes, about 12x less; on a CPU when training, of augmented
    float inputs, about 3x more). On a CPU the workers also augment the training
    batches (``augment_in_workers``): each batch with a generator of its own, seeded by one draw of
    ``generator``, whatever the number of workers (0 included).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        pipeline: Pipeline,
        train: bool,
        device: torch.device | str | Capabilities = "cpu",
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
        self.hw = capabilities(device)
        self.device = self.hw.device
        self.generator = generator
        self.index_generator = index_generator
        self.workers = workers
        self.order: torch.Tensor | None = None  # the order of the epoch under way
        # A split still memory-mapped from its cache is streamed; ``Split.to`` drops ``source``.
        self.streaming = split.source is not None or split.stored
        # Decoding and augmenting a batch cost about the same on a CPU; both in the workers keeps
        # this process (whose threads the workers' processes would contend with) out of the way.
        self.augment_in_workers = split.stored and train and self.hw.augment_in_workers
        if split.stored and self.streaming:
            share = min(math.ceil(batch_size / world), len(split))
            image_bytes = split.images.nbytes // max(1, len(split))
            if self.augment_in_workers:  # float32 model inputs of the pipeline's size
                side = getattr(pipeline, "crop", getattr(pipeline, "input_size", split.images.shape[-1]))
                image_bytes = max(image_bytes, 4 * 3 * side * side)
            logger.info(
                "streaming %s batches of %d from %d shards: host memory for batches at most %.0f MB "
                "((%d workers x %d prefetched + 1) x %d images x %d KB %s)",
                "training" if train else "evaluation",
                share,
                len(split.images.files),
                stream_bound(share, image_bytes, workers) / 1e6,
                max(1, workers),
                PREFETCH,
                share,
                image_bytes // 1000,
                "augmented" if self.augment_in_workers else "decoded",
            )

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def _order(self) -> torch.Tensor:
        n = len(self.split)
        return torch.randperm(n, generator=self.index_generator) if self.train else torch.arange(n)

    def first(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's first ``count`` images through the training augmentation, drawn with a
        generator of their own seeded with ``seed`` (the loader's streams are left alone), and
        their labels: a picture for TensorBoard, or a batch to compile the model with."""
        count = min(count, len(self.split))
        generator = torch.Generator(self.device).manual_seed(seed)
        images = self.pipeline.train(self.split.images[:count].to(self.device), generator)
        return images, self.split.labels[:count].to(self.device)

    def iterate(self, order: torch.Tensor | None = None, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass, like ``iter(loader)``; with ``order`` and ``skip`` it replays an interrupted
        epoch: the same image order, starting after its first ``skip`` batches."""
        self.order = self._order() if order is None else order
        if self.augment_in_workers:
            for batch in self._raw_batches(self.order, skip):
                _batch_seed(self._augment_generator())  # the draw this batch's seed came from (``_seeded_shares``)
                yield batch
            return
        yield from self._transformed(self._raw_batches(self.order, skip))

    def _augment_generator(self) -> torch.Generator:
        return torch.default_generator if self.generator is None else self.generator

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
                    images = images.pin_memory() if self.hw.pin_memory else images
                    images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
                yield images, labels
            return
        gpu_decode = self.split.stored and self.hw.decode_in_process
        shares = self._shares(order, skip)
        if self.augment_in_workers:
            dataset = _StoreBatches(self.split.images, self.split.labels.cpu(), False, self.pipeline)
            shares = _seeded_shares(shares, self._augment_generator())
        elif self.split.stored:
            dataset = _StoreBatches(self.split.images, self.split.labels.cpu(), encoded=gpu_decode)
        else:
            dataset = _CacheRows(self.split.source, self.split.labels.cpu())
        if self.workers:
            _share_the_temporary_folder()
        loader = torch.utils.data.DataLoader(
            dataset,
            sampler=_by_value(shares),
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=PREFETCH if self.workers else None,
            pin_memory=self.hw.pin_memory and not gpu_decode,
            worker_init_fn=_ignore_stop_signals,
        )
        batches = iter(loader)
        try:
            # In order (the DataLoader's default): each batch comes with its indices, which name the
            # shard of a JPEG that does not decode here (on CUDA).
            for batch, indices in zip(batches, shares if gpu_decode else itertools.repeat(None), strict=False):
                if isinstance(batch, _Failed):
                    raise batch.error
                images, labels = batch
                if gpu_decode:
                    images = self.split.images.decode_encoded(*images, indices, self.device)
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        except RuntimeError as error:
            # The worker processes, to tell the signal that killed one (private: no public way).
            exit_codes = {w.pid: w.exitcode for w in getattr(batches, "_workers", [])}
            lost = _lost_worker(error, exit_codes)
            if lost is None:
                raise
            raise lost from error
        finally:
            # The workers stop now, however this ends. Left to the collection of the iterator, which
            # the error's traceback keeps alive, they would outlive the process's last moments: at
            # exit the DataLoader no longer stops them, and multiprocessing sends them SIGTERM, which
            # they ignore (``_ignore_stop_signals``), then waits for them for ever. Its shutdown is
            # private (``_shutdown_workers``, the one its own ``__del__`` calls): no public way.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del batches

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


def place_split(split: Split, device: torch.device | Capabilities, loader: str, workers: int) -> Split:
    """The whole split on the training device when it fits (or ``loader="memory"``): a sharded
    cache is decoded into memory once; otherwise it stays on disk (memory-mapped, or in its
    shards) and is streamed by DataLoader workers."""
    target = capabilities(device).device
    if split.source is None and not split.stored:
        return split.to(target)
    stream = loader == "stream" or (loader == "auto" and not fits_in_memory(split.nbytes, device))
    if not stream:
        return split.to(target)
    where = split.images.files[0].parent if split.stored else split.source
    logger.info(
        "%d images (%.2f GB) stay on disk in %s: streaming them with a DataLoader of %d workers",
        len(split),
        split.nbytes / 1e9,
        where,
        workers,
    )
    return split


def eval_loader(
    split: Split,
    pipeline: Pipeline,
    device: torch.device | Capabilities,
    *,
    batch_size: int,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> BatchLoader:
    """Large evaluation batches, counted in model inputs (``batch_size``, per process): 10-crop
    takes a tenth of the images. Under data parallelism the loader's batch is the global one."""
    batch = max(1, batch_size // pipeline.views)
    return BatchLoader(split, batch * world, pipeline, False, device, workers=workers, rank=rank, world=world)


@dataclass
class Loaders:
    """What a training run reads its data through. ``train.generator`` (on the device: the
    augmentation) and ``train.index_generator`` (CPU: the order of images) are the two seeded
    random streams a checkpoint saves and restores."""

    train: BatchLoader  # the shuffled, augmented training loader
    eval: BatchLoader  # the evaluation loader
    pipeline: Pipeline


def make_loaders(
    data: DataSet,
    input_size: int,
    paper: bool,
    device: torch.device | Capabilities,
    *,
    batch_size: int,
    eval_batch_size: int,
    loader: str = "auto",
    workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    fidelity: str = "code",
) -> Loaders:
    """The loaders and pipeline of a run on ``data`` for a model of ``input_size`` (``paper``:
    the paper's setup, as the 2012 code or the text does it: ``fidelity``), as the trainer
    builds them, in the same order so that the random streams are the same: both splits placed
    (``place_split``: on ``device`` or streamed, as ``loader`` says), the pipeline from the
    placed training split's statistics, then the two generators (the order seeded with ``seed``,
    the same in every process; the augmentation with ``seed + rank``), the training loader
    (``batch_size``: the global batch) and the evaluation loader (``eval_batch_size`` model inputs per process).

    Under data parallelism the trainer also seeds torch's global generator with ``seed + rank``
    (dropout), after the generators and before the first batch; that is left to it. Evaluation
    alone (``--evaluate``) uses ``.eval``: the training loader costs nothing until iterated."""
    hw = capabilities(device)
    train = place_split(data.train, hw, loader, workers)
    test = place_split(data.test, hw, loader, workers)
    pipeline = make_pipeline(train, input_size, paper, hw.device, fidelity)
    index_generator = torch.Generator().manual_seed(seed)
    generator = torch.Generator(hw.device).manual_seed(seed + rank)
    train_loader = BatchLoader(
        train,
        batch_size,
        pipeline,
        True,
        hw,
        generator=generator,
        index_generator=index_generator,
        workers=workers,
        rank=rank,
        world=world,
    )
    test_loader = eval_loader(test, pipeline, hw, batch_size=eval_batch_size, workers=workers, rank=rank, world=world)
    return Loaders(train_loader, test_loader, pipeline)
