"""``make_loaders``: training batches that follow the seed, random streams that replay, and
evaluation batch sizes counted in model inputs."""

import itertools
import logging

import numpy as np
import pytest
import torch

from data.core import DataOptions, Split
from data.loaders import BatchLoader, make_loaders
from data.registry import load_dataset

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("Shapes", DataOptions(shapes_train=48, shapes_test=48, shapes_seed=3))


def first_batches(loader: BatchLoader, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(iter(loader), count))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "input_size, paper, rank, world",
    [(32, False, 0, 1), (224, True, 0, 1), (224, False, 0, 1), (32, False, 1, 2)],
)
def test_training_batches_follow_the_seed(shapes, device, input_size, paper, rank, world):
    """The same seed gives the same batches (order and augmentation), another seed others, and
    each process of a data-parallel run batches of its own."""
    device = torch.device(device)

    def loaders(seed: int, rank: int = rank):
        return make_loaders(
            shapes, input_size, paper, device, batch_size=8, eval_batch_size=20, seed=seed, rank=rank, world=world
        )

    made = loaders(5)
    got, again, other = first_batches(made.train), first_batches(loaders(5).train), first_batches(loaders(6).train)
    assert len(got) == len(again) == 2
    for (x, y), (x0, y0) in zip(got, again, strict=False):
        assert x.device.type == device.type and x.shape[-1] == input_size
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert not all(torch.equal(x, x1) for (x, _), (x1, _) in zip(got, other, strict=False))
    if world > 1:
        assert not torch.equal(got[0][0], first_batches(loaders(5, rank=0).train)[0][0])
    assert made.train.pipeline is made.eval.pipeline is made.pipeline
    assert made.train.train and not made.eval.train
    assert (made.train.batch_size, made.train.rank, made.train.world) == (8, rank, world)


@pytest.mark.parametrize("input_size, paper, views", [(224, True, 10), (32, False, 1), (224, False, 1)])
def test_evaluation_batches_count_model_inputs(shapes, input_size, paper, views):
    loaders = make_loaders(shapes, input_size, paper, torch.device("cpu"), batch_size=8, eval_batch_size=40)
    assert loaders.pipeline.views == views
    assert loaders.eval.batch_size == 40 // views
    images, labels = next(iter(loaders.eval))
    assert images.shape[:2] == (40 // views, views) and torch.equal(labels, shapes.test.labels[: 40 // views])
    # Never fewer than one image, and under data parallelism the loader's batch is the global one.
    assert make_loaders(shapes, 224, True, torch.device("cpu"), batch_size=8, eval_batch_size=4).eval.batch_size == 1
    shared = make_loaders(
        shapes, input_size, paper, torch.device("cpu"), batch_size=8, eval_batch_size=40, rank=1, world=2
    )
    assert (shared.eval.batch_size, shared.eval.rank, shared.eval.world) == (2 * (40 // views), 1, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_saved_generator_states_replay_the_same_batches(shapes, device):
    device = torch.device(device)
    loaders = make_loaders(shapes, 32, False, device, batch_size=8, eval_batch_size=8, seed=7)
    train = loaders.train
    assert train.generator.device.type == device.type and train.index_generator.device.type == "cpu"
    # Building the loaders draws nothing: an evaluation-only run leaves both streams as seeded.
    assert torch.equal(train.index_generator.get_state(), torch.Generator().manual_seed(7).get_state())
    assert torch.equal(train.generator.get_state(), torch.Generator(device).manual_seed(7).get_state())
    train.index_generator.manual_seed(11)  # a state of its own, as a resumed run has
    train.generator.manual_seed(12)
    states = train.index_generator.get_state(), train.generator.get_state()
    first = first_batches(train)
    assert not torch.equal(train.index_generator.get_state(), states[0])  # the loader drew from both
    assert not torch.equal(train.generator.get_state(), states[1])
    train.index_generator.set_state(states[0])
    train.generator.set_state(states[1])
    again = first_batches(train)
    for (x, y), (x0, y0) in zip(again, first, strict=False):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    train.generator.set_state(states[1])
    other = first_batches(train)  # the order moved on; the augmentation stream alone was restored
    assert not torch.equal(other[0][1], first[0][1])


def test_a_cached_split_is_streamed_or_placed_as_the_loader_option_says(shapes, tmp_path, caplog):
    path = tmp_path / "train_32.npy"
    np.save(path, shapes.train.images.numpy())
    cached = Split(torch.from_numpy(np.load(path, mmap_mode="c")), shapes.train.labels, source=path)
    data = type(shapes)(shapes.name, shapes.classes, cached, shapes.test)
    caplog.set_level(logging.INFO)
    streamed = make_loaders(data, 32, False, torch.device("cpu"), batch_size=8, eval_batch_size=8, loader="stream")
    assert streamed.train.streaming and streamed.train.split.source == path and not streamed.eval.streaming
    assert f"48 images (0.00 GB) stay on disk in {path}: streaming them with a DataLoader of 0 workers" in caplog.text
    placed = make_loaders(data, 32, False, torch.device("cpu"), batch_size=8, eval_batch_size=8, loader="memory")
    assert not placed.train.streaming and placed.train.split.source is None
    for (x, y), (x0, y0) in zip(first_batches(streamed.train), first_batches(placed.train), strict=False):
        assert torch.equal(x, x0) and torch.equal(y, y0)
