"""A checkpoint alone is enough: load one of this tool's checkpoints for inference, with its
network (the grouped one for a ``--split-gpus`` run), its evaluation preprocessing and its class
names (``load_trained``), check that several can be averaged (``check_ensemble``), and turn
image files into the uint8 squares its data set's cache held (``read_image``).

Checkpoints since format 3 carry the preprocessing (``training.resume.preprocess_state``).
An older one does not: its pipeline is rebuilt from its data set, the way ``--evaluate`` does,
because that gives exactly the statistics the run trained with (Shapes is generated on the spot,
so old Shapes checkpoints need nothing); when the data set is not there, the sentence says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.core import DataError
from data.images import UNREADABLE, open_resized
from data.transforms import Pipeline, make_pipeline, pipeline_from_state
from network import MODELS, make_model
from training.checkpoint import CheckpointError, load_checkpoint, not_regular
from training.config import TrainConfig
from training.evaluation import class_mismatch
from training.loop import view_scores
from training.resume import load_weights
from training.tasks import MULTI, Task, task_for
from utils import short_reason


@dataclass
class Trained:
    """A trained network ready for inference: ``model`` (eval mode, on its device), the run's
    evaluation ``pipeline``, the class names, the side of the square images the data set held
    (``image_size``) and whether its scores are per-class sigmoids (``multilabel``)."""

    path: Path
    config: TrainConfig
    model: nn.Module
    pipeline: Pipeline
    classes: list[str]
    image_size: int
    multilabel: bool

    @property
    def input_size(self) -> int:
        """The side of the model's input (one view of the pipeline)."""
        return MODELS[self.config.model].input_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x S x S (``read_image``) -> the model inputs, N x V x C x H x W."""
        return self.pipeline.evaluate(images.to(self.device))

    @torch.inference_mode()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """N x classes scores of uint8 images (``Task.scores``: the log of the views' mean
        softmax, or the mean of their sigmoids for multi-label data), as ``training.loop.evaluate``
        scores them (10-crop under ``-pt``). Kept in the task's space rather than as
        probabilities so that an ensemble's ``Task.combine`` is exact for a member given alone."""
        return view_scores(self.task, self.model, self.preprocess(images))

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """N x classes probabilities of uint8 images: the softmax (per-class sigmoid for
        multi-label data) of each view, averaged over the views."""
        return self.task.probabilities(self.scores(images))

    @property
    def task(self) -> Task:
        return task_for(self.multilabel)


def _preprocessing(
    checkpoint: dict[str, Any], config: TrainConfig, path: Path, device: torch.device
) -> tuple[Pipeline, int, bool]:
    """The pipeline, image size and task: the checkpoint's own, or rebuilt from its data set."""
    saved = checkpoint.get("preprocess")
    if saved is not None:
        pipeline = pipeline_from_state(saved["pipeline"]).to(device)  # checked by load_checkpoint
        return pipeline, saved["image_size"], saved["task"] == MULTI.name
    from data.registry import load_dataset  # only old checkpoints need the data set

    try:
        data = load_dataset(config.dataset, config)
    except DataError as error:
        raise CheckpointError(
            f"checkpoint {path} was written before checkpoints held their preprocessing, so it is rebuilt from its "
            f"data set, {config.dataset} in {config.data_dir}, which cannot be read ({str(error).rstrip('.')}); put "
            "the data set back there, or use a checkpoint written by this version."
        ) from None
    pipeline = make_pipeline(data.train, MODELS[config.model].input_size, config.paper_train, device, config.fidelity)
    return pipeline, data.image_size, data.multilabel


def load_trained(path: Path | str, device: torch.device | str = "cpu") -> Trained:
    """The network of checkpoint ``path`` on ``device``, in eval mode, with its preprocessing.
    A ``--split-gpus`` checkpoint holds the grouped PaperAlexNet's weights, and that is the
    network returned (the same function, on one device). Every problem is a ``CheckpointError``."""
    path, device = Path(path), torch.device(device)
    checkpoint = load_checkpoint(path)
    config = TrainConfig.from_dict(checkpoint["config"])  # checked by load_checkpoint
    classes = list(checkpoint["classes"])
    model = make_model(config.model, len(classes), lrn=config.lrn, fidelity=config.fidelity)
    load_weights(checkpoint, path, model, len(classes), str(config.dataset))
    pipeline, image_size, multilabel = _preprocessing(checkpoint, config, path, device)
    return Trained(path, config, model.to(device).eval(), pipeline, classes, image_size, multilabel)


def check_ensemble(members: Sequence[Trained]) -> None:
    """Refuse networks whose outputs cannot be averaged: every member must have the first one's
    class names, in the same order (``training.evaluation.class_mismatch``), and its task
    (softmax and sigmoid scores mean different things). The first mismatch is one
    ``CheckpointError``; anything else (model, preprocessing, image size) may differ, since each
    member prepares its own inputs."""
    first = members[0]
    for member in members[1:]:
        problem = class_mismatch(first.path, first.classes, member.path, member.classes)
        if problem is not None:
            raise CheckpointError(problem)
        if member.multilabel != first.multilabel:
            a, b = first.path, member.path
            kinds = {True: "multi-label (sigmoid scores)", False: "single-label (softmax scores)"}
            raise CheckpointError(
                f"checkpoint {b} is {kinds[member.multilabel]} but {a} is {kinds[first.multilabel]}; an ensemble "
                "averages scores of one kind, so pass checkpoints of runs on one data set."
            )


def read_image(path: Path, size: int) -> torch.Tensor:
    """An image file of any format Pillow reads, of any size, as the data sets' caches hold
    images (``data.images.open_resized``: upright, 8-bit RGB, the short side resized to ``size``
    and the centre square kept); uint8 3 x size x size. A file that cannot be read is a
    ``DataError`` with the reason in a few words (the caller names the file); only regular files
    are opened (a FIFO would wait for a writer)."""
    kind = not_regular(path)
    if kind is not None:
        raise DataError(f"{kind}, not a file")
    try:
        return open_resized(path, size)
    except UNREADABLE as error:
        raise DataError(short_reason(error)) from None
    except DataError as error:
        raise DataError(str(error).removeprefix(f"{path} ")) from None
