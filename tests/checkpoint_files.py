"""Checkpoints written by the tool's own code, for tests that read them (predict, export): a
freshly initialised network and its preprocessing, saved as a run would save them, in moments and
without a training run."""

from __future__ import annotations

from pathlib import Path

import torch

from data.core import Split
from data.registry import load_dataset
from data.transforms import make_pipeline
from network import MODELS, make_model
from training.config import TrainConfig
from training.resume import Checkpointer, Progress
from training.schedule import PlateauSchedule

CLASSES = ["alpha", "beta", "gamma"]


def make_checkpoint(
    folder: Path,
    model: str,
    paper_train: bool = False,
    fidelity: str = "code",
    split_gpus: bool = False,
    multilabel: bool = False,
) -> Path:
    """A checkpoint written by the real ``Checkpointer.state`` / ``save`` code path: a freshly
    initialised ``model`` (3 classes) and the pipeline ``make_pipeline`` builds for it, from
    tiny Shapes for a 32-input model, else from 6 random 256x256 images."""
    config = TrainConfig(
        model=model, paper_train=paper_train, fidelity=fidelity, split_gpus=split_gpus, shapes_train=60, shapes_test=10
    )
    input_size = MODELS[model].input_size
    if input_size == 32:
        data = load_dataset("Shapes", config)
        train, classes = data.train, data.classes
    else:
        g = torch.Generator().manual_seed(1)
        train = Split(torch.randint(0, 256, (6, 3, 256, 256), generator=g, dtype=torch.uint8), torch.zeros(6))
        classes = CLASSES
    torch.manual_seed(0)
    net = make_model(model, len(classes), lrn=config.lrn, fidelity=fidelity)
    pipeline = make_pipeline(train, input_size, paper_train, "cpu", fidelity)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    generators = {"index": torch.Generator(), "augment": torch.Generator()}
    checkpointer = Checkpointer(folder, net, optimizer, PlateauSchedule(base_lr=0.01), None, generators)
    task = "multi-label" if multilabel else "single-label"
    state = checkpointer.state(Progress(), "top1", classes, config, pipeline, train.images.shape[-1], task)
    checkpointer.save(state, best=False, epoch=0)
    return checkpointer.last
