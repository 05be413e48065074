"""A training command line carried out: the run built from the parsed flags, then trained,
resumed or evaluated.

``main.py`` parses the flags and hands them over to ``run``; a ``UserError`` raised here is
the one sentence the user sees. That includes the two ways a run loses a process it relies on
(a torchrun peer, a DataLoader worker): each is a sentence naming what was lost and how to go
on, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from data.loaders import lost_worker
from data.registry import load_dataset
from hardware.capabilities import Capabilities, resolve_device
from network import SplitPaperAlexNet, make_model, split_devices
from trainer import Trainer
from training.checkpoint import load_checkpoint
from training.config import (
    RESUME_MAY_CHANGE,
    TrainConfig,
    config_from_args,
    config_from_checkpoint,
)
from training.distributed import (
    StopSignals,
    data_peers,
    init_distributed,
    launched_by_torchrun,
    lost_process,
    rank_and_world,
)
from training.evaluation import evaluate_members, read_member, same_data
from training.fastpath import choose_kernels
from training.optim import grouped_optimizer_state
from training.outputs import RunFolders, claim_run, output_dir_of
from training.resume import load_weights
from training.weights import load_initial_weights
from utils import UserError

logger = logging.getLogger("alexnet")


def run(args: argparse.Namespace, given: set[str], stop: StopSignals) -> int:
    """Build what the arguments ask for and train, resume or evaluate; ``stop.phase`` says what
    is under way. ``given`` holds the flags the user gave (``training.config.explicit_flags``)."""
    try:
        return _run(args, given, stop)
    except RuntimeError as error:  # under torchrun, a collective whose peer process is gone
        sentence = lost_process(error, None)
        if sentence is None:
            raise
        raise UserError(sentence) from None


def _run(args: argparse.Namespace, given: set[str], stop: StopSignals) -> int:
    device = resolve_device(args.device)
    if launched_by_torchrun():
        if args.evaluate:
            raise UserError("--evaluate runs in one process; start it with python, not torchrun.")
        stop.phase = "joining the other processes"
        device = init_distributed(device, timedelta(minutes=args.dist_timeout))
        if rank_and_world()[0] != 0:  # one voice: the other processes only speak up about problems
            logging.getLogger().setLevel(logging.WARNING)
    hw = Capabilities.of(device)
    if launched_by_torchrun():
        logger.info(
            "data parallel: %d processes (%s), global batch split between them", rank_and_world()[1], hw.backend
        )
    if args.evaluate:
        return _evaluate(args, given, hw, stop)
    checkpoint_path = args.resume
    stop.phase = "reading the checkpoint"
    checkpoint = load_checkpoint(checkpoint_path, resume=bool(args.resume)) if checkpoint_path else None
    if checkpoint is None:
        config = config_from_args(args, hw)
    else:
        may_change = RESUME_MAY_CHANGE
        if args.split_gpus is False:
            may_change |= {"split_gpus"}  # a split run goes on as the grouped model (_build_and_go)
        config = config_from_checkpoint(checkpoint, checkpoint_path, args, given, hw, may_change)
        if "output_dir" not in given:
            config = replace(config, output_dir=output_dir_of(checkpoint_path, config) or config.output_dir)
    split = towers(config, hw.device, checkpoint_path if args.resume else None)
    choose_kernels(config.deterministic, hw)
    # Named, checked and locked before the data are read: a second process on the same run, or
    # a name that is taken, is told at once. Released here, the one owner, however it ends.
    stop.phase = "preparing the run's folders"
    resume_step = checkpoint.get("global_step", 0) if checkpoint is not None else 0
    folders = claim_run(config, checkpoint_path, resume_step, args.rewind)
    # From here on the run's settings are fixed: name and output folder included.
    config = replace(config, run_name=folders.name)
    try:
        return _build_and_go(args, config, checkpoint, checkpoint_path, hw, split, folders, stop)
    except RuntimeError as error:
        # Under torchrun, a collective whose peer process is gone; anywhere, a DataLoader worker's death.
        last = None if config.dry_run else folders.ckpt_dir / "last.pt"
        sentence = lost_process(error, last) or lost_worker_sentence(error, last, config.workers, False)
        if sentence is None:
            raise
        raise UserError(sentence) from None
    finally:
        folders.release()


def _evaluate(args: argparse.Namespace, given: set[str], hw: Capabilities, stop: StopSignals) -> int:
    """``--evaluate``: the checkpoints read and checked, then evaluated (``training.evaluation``)."""
    stop.phase = "reading the checkpoint"
    checkpoints = [read_member(path, args, given, hw) for path in args.evaluate]
    same_data(checkpoints)
    config = checkpoints[0].config
    split = towers(config, hw.device, None)
    choose_kernels(config.deterministic, hw)
    try:
        return evaluate_members(checkpoints, args.crops, hw, split, stop)
    except RuntimeError as error:  # a DataLoader worker's death
        sentence = lost_worker_sentence(error, None, config.workers, True)
        if sentence is None:
            raise
        raise UserError(sentence) from None


def _build_and_go(
    args: argparse.Namespace,
    config: TrainConfig,
    checkpoint: dict[str, Any] | None,
    checkpoint_path: Path | None,
    hw: Capabilities,
    split: tuple[torch.device, torch.device] | None,
    folders: RunFolders | None,
    stop: StopSignals,
) -> int:
    device = hw.device
    stop.phase = "reading the data"
    # The config holds the data options; under torchrun the processes build any cache together.
    data = load_dataset(config.dataset, config, data_peers())
    stop.phase = "building the model"
    torch.manual_seed(config.seed)
    model = make_model(config.model, data.num_classes, lrn=config.lrn, fidelity=config.fidelity)
    if checkpoint is not None:
        load_weights(checkpoint, checkpoint_path, model, data.num_classes, data.name)
    elif config.weights:
        stop.phase = "reading the initial weights"
        load_initial_weights(Path(config.weights), model, config.model, data.classes, config.paper_train)
    if split is not None:
        model = SplitPaperAlexNet(model, split)
        logger.info("the two towers run on %s and %s", *model.devices)
    elif args.resume and checkpoint["config"].get("split_gpus"):
        checkpoint = {**checkpoint, "optimizer": grouped_optimizer_state(checkpoint["optimizer"], model, config)}
        logger.info(
            "%s was trained split over two devices; it goes on as the grouped model on %s (the same "
            "weights; dropout now draws one mask per layer instead of one per tower)",
            checkpoint_path,
            device,
        )
    stop.phase = "preparing training"
    trainer = Trainer(config, model, data, hw, resume=checkpoint if args.resume else None, folders=folders)
    stop.phase = "training"
    trainer.fit()
    return 0


def lost_worker_sentence(error: RuntimeError, last: Path | None, workers: int, evaluating: bool) -> str | None:
    """The sentence for a run whose DataLoader worker died (``data.loaders.lost_worker``): a worker
    holds up to ``PREFETCH`` batches, so fewer workers or smaller batches need less memory; the
    run's ``last`` checkpoint, when it has one, resumes with fewer workers (not with another
    batch size, which is part of the run)."""
    what = lost_worker(error)
    if what is None:
        return None
    fewer = f"--workers {workers // 2}"
    if evaluating:
        return f"{what}; run again with fewer workers, e.g. {fewer}."
    if last is not None and last.is_file():
        return (
            f"{what}; {last} is kept: resume with --resume {last} {fewer}, or start again with a smaller --batch-size."
        )
    return f"{what}; run again with fewer workers (e.g. {fewer}) or a smaller --batch-size (nothing was saved yet)."


def towers(config: TrainConfig, device: torch.device, resumed: Path | None) -> tuple[torch.device, torch.device] | None:
    """The devices of the two towers of ``--split-gpus`` (``network.split_devices``), or None for
    the grouped model on one device. ``resumed`` is the checkpoint of a resumed run, which keeps
    its split: where this machine cannot hold the towers, the sentence names ``--no-split-gpus``,
    which resumes it as the grouped model."""
    if not config.split_gpus:
        return None
    if resumed is not None and launched_by_torchrun():
        raise UserError(
            f"{resumed} was trained with --split-gpus, which runs one model over two GPUs in one process, not under "
            "torchrun; add --no-split-gpus to resume it as the grouped model in each process."
        )
    try:
        return split_devices(device)
    except UserError:
        if resumed is None:
            raise
        raise UserError(
            f"{resumed} was trained with --split-gpus, and its two towers need {device} and the CUDA device after "
            f"it, which this machine does not have; add --no-split-gpus to resume it as the grouped model on {device} "
            "(the same weights; dropout then draws one mask per layer instead of one per tower)."
        ) from None
