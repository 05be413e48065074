"""``--evaluate A.pt [B.pt ...]``: one network, or an ensemble as in the paper's Table 2.

Each checkpoint is a member with its own network and its own evaluation preprocessing (the one
its checkpoint stores; rebuilt from the data set for checkpoints older than that, or when the
command line changes the data set, the network or the setup), so a ``-pt`` network and a
modern one can be averaged. ``--crops`` gives every member the centre crop (1) or the paper's
ten patches (10); by default each keeps its run's own (10 under ``-pt``, else 1). The
evaluation split is read once; the members' probabilities are averaged per image
(``training.loop.evaluate_ensemble``). The result is one line of JSON on stdout: the ensemble's
metrics with the errors the paper prints (100 minus each accuracy), and each member's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.core import DataSet
from data.loaders import eval_loader, place_split
from data.registry import load_dataset
from data.transforms import Pipeline, make_pipeline, pipeline_from_state
from hardware.capabilities import Capabilities
from network import MODELS, SplitPaperAlexNet, make_model
from training.checkpoint import load_checkpoint
from training.config import EVALUATE_MAY_CHANGE, TrainConfig, config_from_checkpoint
from training.distributed import StopSignals, data_peers
from training.fastpath import prepare_model
from training.loop import Member, evaluate_ensemble
from training.resume import load_weights
from training.tasks import EvalResult, format_metrics
from utils import UserError, quoted

logger = logging.getLogger("alexnet")

#: What the stored preprocessing was made for: where the command line changes one of these,
#: the pipeline is rebuilt for the new setting from the data set, as training would build it.
PIPELINE_FIELDS = ("dataset", "model", "paper_train", "fidelity")


@dataclass
class Checkpoint:
    """A member as read: its path, the checkpoint, and its configuration for this evaluation."""

    path: Path
    saved: dict[str, Any]
    config: TrainConfig


class AsRead(Pipeline):
    """The evaluation loader's pipeline: the images as read, which each member then turns into
    its own inputs. ``views`` (the most of any member) sizes the loader's batches."""

    name = "as read"

    def __init__(self, views: int) -> None:
        self.views = views

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        return x


def read_member(path: Path, args: argparse.Namespace, given: set[str], hw: Capabilities) -> Checkpoint:
    """A checkpoint, checked, with its configuration and the flags the command line may change on
    top. A ``--split-gpus`` checkpoint holds the grouped model's weights, which evaluate the same
    on one device: it runs split only when ``--split-gpus`` is given."""
    saved = load_checkpoint(path)
    config = config_from_checkpoint(saved, path, args, given, hw, EVALUATE_MAY_CHANGE)
    if args.split_gpus is None:
        config = replace(config, split_gpus=False)
    return Checkpoint(path, saved, config)


def evaluate_members(
    checkpoints: list[Checkpoint],
    crops: int | None,
    hw: Capabilities,
    split: tuple[torch.device, torch.device] | None,
    stop: StopSignals,
) -> int:
    """Evaluate ``checkpoints`` (``read_member``, ``same_data``) on their data set's evaluation
    split with ``crops`` views (None: each run's own), each network on ``hw.device`` or its two
    towers on the ``split`` devices; log the metrics and print the JSON record; returns the exit
    code. ``stop.phase`` says what is under way."""
    first = checkpoints[0].config
    stop.phase = "reading the data"
    data = load_dataset(first.dataset, first, data_peers())
    stop.phase = "building the model"
    members = [member(c, data, hw, split, crops) for c in checkpoints]
    test = place_split(data.test, hw, first.loader, first.workers)
    views = max(m.pipeline.views for m in members)
    loader = eval_loader(test, AsRead(views), hw, batch_size=first.eval_batch_size, workers=first.workers)
    stop.phase = "evaluating"
    results, ensemble = evaluate_ensemble(members, loader, data.num_classes, data.multilabel)
    for c, m, result in zip(checkpoints, members, results, strict=True):
        logger.info("%s on %s, %d images%s: %s", c.path, data.name, result.count, _views(m), _line(result))
        recorded = c.saved.get("last") or {}
        if recorded and c.config.dataset == c.saved["config"].get("dataset"):
            metric = "mAP" if "mAP" in recorded else "top1"
            logger.info("recorded at epoch %d: %s %.2f%%", c.saved["epoch"], metric, recorded[metric])
    if len(members) > 1:
        logger.info("ensemble of %d on %s, %d images: %s", len(members), data.name, ensemble.count, _line(ensemble))
    print(json.dumps(evaluation_record(checkpoints, members, results, ensemble, data), allow_nan=False))
    return 0


def same_data(checkpoints: list[Checkpoint]) -> None:
    """The members of an ensemble must be evaluated on one data set and name the same classes
    in the same order (their outputs are averaged class by class); the first mismatch is one
    sentence."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.config.dataset != first.config.dataset:
            raise UserError(
                f"checkpoint {other.path} was trained on {other.config.dataset} and "
                f"{first.path} on {first.config.dataset}; the networks of an ensemble must share the data "
                "set, so evaluate them apart (or all on one, with -ds)."
            )
        problem = class_mismatch(first.path, first.saved["classes"], other.path, other.saved["classes"])
        if problem is not None:
            raise UserError(problem)


#: Class names a sentence shows.
NAMED_CLASSES = 3


def class_mismatch(first: Path, ours: list[str], other: Path, theirs: list[str]) -> str | None:
    """Why the network of checkpoint ``other`` (classes ``theirs``) cannot be averaged with that
    of ``first`` (``ours``), or None: an output is a class index, so an ensemble needs the same
    classes in the same order (``--evaluate`` and ``predict`` alike)."""
    a, b = first, other
    same = "an ensemble needs the same classes in the same order, so pass checkpoints of runs on one data set."
    if len(theirs) != len(ours):
        return (
            f"checkpoint {b} has {len(theirs)} classes ({_names(theirs)}), {a} has {len(ours)} ({_names(ours)}); {same}"
        )
    for index, (mine, yours) in enumerate(zip(ours, theirs, strict=True)):
        if mine != yours:
            return f"checkpoint {b} has class {quoted(yours)} at index {index}, where {a} has {quoted(mine)}; {same}"
    return None


def _names(classes: list[str]) -> str:
    """The first few class names, quoted (a name may hold a comma) and cut short."""
    shown = ", ".join(quoted(c, 30) for c in classes[:NAMED_CLASSES])
    return shown + (", ..." if len(classes) > NAMED_CLASSES else "")


def member(
    checkpoint: Checkpoint,
    data: DataSet,
    hw: Capabilities,
    split: tuple[torch.device, torch.device] | None,
    crops: int | None,
) -> Member:
    """The network of ``checkpoint`` with its weights, on this device (or its towers on the
    ``split`` devices), and its evaluation pipeline with ``crops`` views (None: the run's own)."""
    config = checkpoint.config
    model: nn.Module = make_model(config.model, data.num_classes, lrn=config.lrn, fidelity=config.fidelity)
    load_weights(checkpoint.saved, checkpoint.path, model, data.num_classes, data.name)
    if split is not None:
        model = SplitPaperAlexNet(model, split)
        logger.info("the two towers run on %s and %s", *model.devices)
    model = prepare_model(model, hw.device, config.channels_last)  # the split model stays on its towers
    pipeline = preprocessing(checkpoint, data, hw)
    if crops is not None:
        pipeline = pipeline.with_views(crops)
    return Member(model, pipeline, config.amp, config.channels_last)


def preprocessing(checkpoint: Checkpoint, data: DataSet, hw: Capabilities) -> Pipeline:
    """The member's evaluation pipeline, on the device: the checkpoint's own, unless it has none
    (written before checkpoints held it) or the command line changed what it was made for."""
    config, saved = checkpoint.config, checkpoint.saved
    trained = TrainConfig.from_dict(saved["config"])
    stored = saved.get("preprocess")
    if stored is not None and all(getattr(config, f) == getattr(trained, f) for f in PIPELINE_FIELDS):
        return pipeline_from_state(stored["pipeline"]).to(hw.device)  # checked by load_checkpoint
    input_size = MODELS[config.model].input_size
    return make_pipeline(data.train, input_size, config.paper_train, hw.device, config.fidelity)


def evaluation_record(
    checkpoints: list[Checkpoint], members: list[Member], results: list[EvalResult], ensemble: EvalResult, data: DataSet
) -> dict[str, Any]:
    """The JSON line: the ensemble's metrics (the one network's, for one checkpoint) and each
    member's, with the errors as the paper prints them (``experiments report --paper-table``
    reads these)."""
    views = {m.pipeline.views for m in members}
    return {
        "kind": "evaluation",
        "checkpoint": str(checkpoints[0].path),
        "checkpoints": [str(c.path) for c in checkpoints],
        "dataset": data.name,
        "crops": views.pop() if len(views) == 1 else None,
        **_metrics(ensemble),
        "members": [
            {
                "checkpoint": str(c.path),
                "model": c.config.model,
                "pretrained": bool(c.config.weights),
                "crops": m.pipeline.views,
                **_metrics(result),
            }
            for c, m, result in zip(checkpoints, members, results, strict=True)
        ],
    }


def _metrics(result: EvalResult) -> dict[str, Any]:
    """The metrics with the two errors, JSON-ready: a loss that overflowed is null, not NaN
    (which JSON does not have)."""
    metrics = {**result.metrics(), "top1_error": 100.0 - result.top1, "top5_error": 100.0 - result.top5}
    return {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()}


def _line(result: EvalResult) -> str:
    return f"{format_metrics(result)}  (error: top-1 {100.0 - result.top1:.2f}%, top-5 {100.0 - result.top5:.2f}%)"


def _views(member: Member) -> str:
    return " (10-crop)" if member.pipeline.views == 10 else ""
