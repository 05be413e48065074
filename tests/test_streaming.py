"""Streaming a sharded cache (``BatchLoader`` over a ``ShardStore``): every image once per epoch
on one process and across a 2-process gloo group, a mid-epoch resume that replays the same
batches bit for bit, and host memory that stays within the stated bound."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fakedata import write_class_folders, write_photos
from main_cli import run

from data.core import Split
from data.loaders import BatchLoader, place_split
from data.shards import shard_split
from data.transforms import Pipeline
from hardware.capabilities import Capabilities

ROOT = Path(__file__).resolve().parent.parent
COUNT, SIZE, BATCH = 23, 16, 4


class Unchanged(Pipeline):
    """The uint8 batch as it came, so that the test sees exactly what the loader read."""

    def train(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Split:
    photos = write_photos(tmp_path_factory.mktemp("photos"), COUNT)
    return shard_split(
        photos, torch.arange(COUNT), tmp_path_factory.mktemp("cache"), "train", SIZE, workers=1, shard_images=5
    )


def loader(split: Split, seed: int = 0, workers: int = 0, rank: int = 0, world: int = 1, train: bool = True):
    return BatchLoader(
        split,
        BATCH,
        Unchanged(),
        train,
        "cpu",
        index_generator=torch.Generator().manual_seed(seed),
        workers=workers,
        rank=rank,
        world=world,
    )


def test_place_split_streams_a_store_when_asked_and_decodes_it_otherwise(stored):
    assert loader(place_split(stored, torch.device("cpu"), "stream", 0)).streaming
    placed = place_split(stored, torch.device("cpu"), "memory", 0)
    assert isinstance(placed.images, torch.Tensor) and not loader(placed).streaming


@pytest.mark.parametrize("workers", [0, 2])
def test_every_image_once_per_epoch_reshuffled_each_epoch(stored, workers):
    streamed = loader(stored, workers=workers)
    everything = stored.images.decode_all()
    orders = []
    for _ in range(2):
        labels = []
        for images, batch_labels in streamed:
            assert torch.equal(images, everything[batch_labels])  # each image with its own label
            labels.append(batch_labels)
        orders.append(torch.cat(labels))
        assert sorted(orders[-1].tolist()) == list(range(COUNT))
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(orders[0], torch.randperm(COUNT, generator=torch.Generator().manual_seed(0)))


def test_a_mid_epoch_resume_replays_the_same_batches_bit_for_bit(stored):
    first = loader(stored, seed=5)
    full = list(first.iterate())
    resumed = list(loader(stored, seed=99).iterate(order=first.order, skip=3))  # another seed: the order rules
    assert len(resumed) == len(full) - 3
    for (a, la), (b, lb) in zip(full[3:], resumed, strict=False):
        assert torch.equal(a, b) and torch.equal(la, lb)


def _ddp_worker(rank: int, world: int, store: str, split: Split, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        seen = {}
        for train in (True, False):
            labels = [lb for _, lb in loader(split, rank=rank, world=world, train=train)]
            seen[train] = torch.cat(labels)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, seen)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_read_disjoint_shares_that_cover_every_image(stored, tmp_path):
    out = tmp_path / "seen.pt"
    # fork: the children need not import torch again (seconds each); they use no threads of ours.
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), stored, str(out)), nprocs=2, start_method="fork")
    gathered = torch.load(out)
    for train in (True, False):
        shares = [set(g[train].tolist()) for g in gathered]
        assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(COUNT)), train
        assert all(
            len(g[train]) == len(s) for g, s in zip(gathered, shares, strict=False)
        )  # none twice within a process


MEMORY = """
import resource, sys
from pathlib import Path
import numpy as np, torch
from data.loaders import BatchLoader, stream_bound
from data.shards import ShardStats, ShardStore, read_shard
from data.core import Split
from data.transforms import Pipeline
from hardware.capabilities import Capabilities

class Unchanged(Pipeline):
    def train(self, x, generator=None):
        return x

folder, size, count, per = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
files = sorted(folder.glob("*.shard"))
read = [read_shard(f, "0" * 64, i, per, size) for i, f in enumerate(files)]
stats = sum((s for _, s in read[1:]), read[0][1])
split = Split(ShardStore(files, [o for o, _ in read], size, stats), torch.arange(count))
streamed = BatchLoader(split, 16, Unchanged(), True, "cpu", index_generator=torch.Generator().manual_seed(0))
next(iter(streamed))  # the decoder's first allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
total = sum(len(labels) for _, labels in streamed)
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(total, growth, split.nbytes, stream_bound(16, 3 * size * size, 0))
"""


def ramp_shards(folder: Path, size: int, count: int, per: int, levels: int) -> None:
    """``count`` plain gradients of ``size`` x ``size`` (quick to encode), ``per`` to a shard, image
    ``i`` of a shard brightened by ``i % levels``, written as preparation writes shards."""
    from data.shards import encode_images, write_shard

    ramp = torch.arange(size, dtype=torch.uint8).expand(3, size, size)
    for number in range(count // per):
        images = [ramp + (i % levels) for i in range(per)]
        write_shard(folder / f"{number:05d}.shard", *encode_images(images), "0" * 64, number)


def run_script(script: str, *args: object) -> subprocess.CompletedProcess:
    """``python -c script *args`` in a fresh process at the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_host_memory_stays_bounded_while_streaming_a_cache_larger_than_the_bound(tmp_path):
    """A subprocess streams 800 images of 64 x 64 (9.8 MB decoded, against a bound of 0.6 MB
    for batches of 16 without workers): its peak resident memory grows by far less than the
    decoded cache, which it would if the images were kept. Plain gradients: quick to encode."""
    size, count, per = 64, 800, 100
    ramp_shards(tmp_path, size, count, per, levels=128)
    result = run_script(MEMORY, tmp_path, size, count, per)
    assert result.returncode == 0, result.stderr
    total, growth, decoded, bound = map(int, result.stdout.split())
    assert total == count and decoded == count * 3 * size * size and bound == 3 * 16 * 3 * size * size
    assert decoded > 10 * bound
    assert growth < decoded / 4, (growth, decoded)


def augmented(split: Split, workers: int) -> BatchLoader:
    """A CPU training loader with a real augmentation, which its workers then run."""
    from data.transforms import ModernPipeline

    pipeline = ModernPipeline(torch.full((3,), 0.5), torch.full((3,), 0.25), crop=8)
    return BatchLoader(
        split,
        BATCH,
        pipeline,
        True,
        "cpu",
        generator=torch.Generator().manual_seed(3),
        index_generator=torch.Generator().manual_seed(0),
        workers=workers,
    )


def test_augmented_in_workers_the_same_for_any_workers_and_resumed_bit_for_bit(stored):
    """On a CPU the workers augment each batch with its own seed: the batches do not depend on
    the number of workers, and a resume from the generator's state after 3 batches (what a
    checkpoint saves) replays the rest of the epoch exactly."""
    inline, pooled = augmented(stored, 0), augmented(stored, 2)
    assert inline.augment_in_workers
    states, full = [], []
    for images, labels in inline:
        full.append((images, labels))
        states.append(inline.generator.get_state())
    assert full[0][0].shape == (BATCH, 3, 8, 8) and full[0][0].dtype == torch.float32
    for (a, la), (b, lb) in zip(full, pooled, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert torch.equal(pooled.generator.get_state(), states[-1])  # one draw per batch used, none ahead
    resumed = augmented(stored, 2)
    resumed.generator.set_state(states[2])
    replay = list(resumed.iterate(order=inline.order, skip=3))
    assert len(replay) == len(full) - 3
    for (a, la), (b, lb) in zip(full[3:], replay, strict=False):
        assert torch.equal(a, b) and torch.equal(la, lb)


def _reader(stored: Split, path: str) -> BatchLoader:
    if path == "augmented":  # CPU training: the workers decode and augment
        return augmented(stored, 0)
    if path == "decoded":  # CPU evaluation: the workers decode
        return loader(stored, train=False)
    return BatchLoader(stored, BATCH, Unchanged(), True, Capabilities.stand_in())  # bytes, decoded here


@pytest.mark.parametrize("path", ["augmented", "decoded", "encoded"])
def test_the_workers_get_each_batchs_indices_by_value_not_through_shared_memory(stored, monkeypatch, path):
    """A tensor on the workers' queue goes through shared memory, its file descriptor handed
    over a socket by a thread of the main process; a worker killed mid-handover (the SIGKILL
    test, once in CI) made that thread print a traceback. Each batch's indices are numpy arrays."""
    sent = []

    class Recording(torch.utils.data.DataLoader):
        def __init__(self, dataset, sampler, **options):
            def record():
                for item in sampler:
                    sent.append(item)
                    yield item

            super().__init__(dataset, sampler=record(), **options)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Recording)
    batches = list(_reader(stored, path))
    assert len(sent) == len(batches) == -(-COUNT // BATCH)
    indices = [item[0] if path == "augmented" else item for item in sent]
    assert all(type(index) is np.ndarray for index in indices), [type(i) for i in indices]
    assert sorted(np.concatenate(indices).tolist()) == list(range(COUNT))


DESCRIPTORS = """
import resource, sys
from pathlib import Path
import torch
from data.core import Split
from data.loaders import BatchLoader
from data.shards import ShardStore, read_shard
from hardware.capabilities import Capabilities

class Unchanged:
    views = 1

    def evaluate(self, x):
        return x

resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
folder = Path(sys.argv[1])
size, count, per, batch = (int(arg) for arg in sys.argv[2:6])
files = sorted(folder.glob("*.shard"))
read = [read_shard(f, "0" * 64, i, per, size) for i, f in enumerate(files)]
stats = sum((s for _, s in read[1:]), read[0][1])
split = Split(ShardStore(files, [o for o, _ in read], size, stats), torch.arange(count))
streamed = BatchLoader(split, batch, Unchanged(), False, Capabilities.stand_in(), workers=8)
everything = split.images.decode_all()
seen = []
for images, labels in streamed:
    assert torch.equal(images, everything[labels])
    seen.append(labels)
print(torch.cat(seen).tolist() == list(range(count)), len(seen))
"""


def test_decoding_in_process_streams_large_batches_from_8_workers_within_256_file_descriptors(tmp_path):
    """On CUDA the workers pass each batch's JPEG bytes to the training process (``decode_in_process``).
    Every tensor that crosses a worker's queue holds a shared-memory file descriptor until it is
    used: one tensor per image would need 8 workers x 2 prefetched x 256 images of them, far past
    a 256 (or the usual 1,024) descriptor limit. A subprocess under ``ulimit -n 256`` streams an
    evaluation of 2,048 images in batches of 256 through the CPU stand-in for a GPU."""
    size, count, per, batch = 16, 2048, 256, 256
    ramp_shards(tmp_path, size, count, per, levels=200)
    result = run_script(DESCRIPTORS, tmp_path, size, count, per, batch)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", str(count // batch)]


@pytest.fixture
def rotten(stored, tmp_path) -> Split:
    """A copy of the cache whose shard 2 lost the first byte of its third JPEG (image 12): damage
    that a start does not see when the shard's size and time are those recorded (bit rot)."""
    from data.shards import ShardStore

    files = []
    for path in stored.images.files:
        files.append(tmp_path / path.name)
        shutil.copyfile(path, files[-1])
    at = int(stored.images.offsets[2][2])
    blob = bytearray(files[2].read_bytes())
    blob[at] ^= 0xFF
    files[2].write_bytes(bytes(blob))
    store = stored.images
    return Split(ShardStore(files, store.offsets, store.size, store.stats), stored.labels)


@pytest.mark.parametrize("where, workers", [("cpu", 0), ("cuda", 0), ("cuda", 2), ("memory", 0)])
def test_a_damaged_jpeg_is_one_sentence_naming_its_shard(rotten, where, workers):
    """Wherever the JPEG is decoded: by the loader on a CPU, in the training process in one call
    on CUDA (``decode_in_process``, the CPU standing in), after DataLoader workers passed its bytes,
    or all at once into memory (``--loader memory``). The workers' own path (decoding and
    augmenting there) goes through the command line in test_bad_data.py."""
    from data.core import DataError
    from hardware.capabilities import Capabilities

    sentence = (
        rf"^cache shard {re.escape(str(rotten.images.files[2]))} is damaged: its image 3 of 5 cannot be decoded \(Not "
        r"a JPEG file: starts with 0x00 0xd8\), though its size and time are those recorded when its digest last "
        r"matched; delete it and run again \(or run prepare\), which rebuilds it from the images\.$"
    )
    with pytest.raises(DataError, match=sentence):
        if where == "memory":
            place_split(rotten, torch.device("cpu"), "memory", 0)
        else:
            hw = Capabilities.stand_in() if where == "cuda" else "cpu"
            list(BatchLoader(rotten, BATCH, Unchanged(), False, hw, workers=workers))


def test_workers_hand_batches_over_under_a_temporary_folder_too_long_for_their_sockets(tmp_path):
    """A worker hands a batch over through a Unix socket in multiprocessing's folder under TMPDIR,
    and a socket's path has at most 107 characters: under a TMPDIR of 120 (a cluster job's scratch
    folder, say) every hand-over failed with "AF_UNIX path too long". The folder then goes to a
    short standard one, and a streamed epoch with two workers runs as anywhere else."""
    write_class_folders(tmp_path / "data", {"a": 6, "b": 6}, size=40)
    deep = tmp_path / ("t" * max(1, 120 - len(str(tmp_path)) - 1))
    deep.mkdir()
    assert len(str(deep)) >= 120
    flags = ["-c", "-ds", "ImageFolder", "--data-dir", "data", "--loader", "stream", "--workers", "2"]
    result = run(*flags, "--batch-size", "4", "-ne", "1", "-d", cwd=tmp_path, env={**os.environ, "TMPDIR": str(deep)})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "epoch 1/1" in result.stderr
    assert [p.name for p in deep.iterdir() if not p.name.startswith("torchinductor_")] == []
