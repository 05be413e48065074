"""The loop: one epoch of training, and one evaluation, as plain functions.

``train_one_epoch`` runs the optimisation steps of one pass over the training split (or the rest
of an interrupted one); ``evaluate`` computes the metrics of a model over an evaluation split,
and ``evaluate_ensemble`` those of several networks and of their average, in one pass.
Everything around them (the schedule, checkpoints, outputs, resume) is the ``Trainer``'s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from data.loaders import BatchLoader
from data.transforms import Pipeline
from training.distributed import StopRequest, agree_stop, all_max, all_sum, rank_and_world
from training.fastpath import TrainStep, autocast, model_input
from training.tasks import EvalResult, Task, task_for


class LossNotFinite(Exception):
    """A training loss was NaN or infinite at ``step`` of ``epoch`` (the trainer words it)."""

    def __init__(self, step: int, epoch: int) -> None:
        super().__init__(f"non-finite loss at step {step}")
        self.step = step
        self.epoch = epoch


@dataclass
class EpochEnd:
    """How an epoch ended: its mean training loss and seconds, or (``partial``) where a stop
    request ended it early, as checkpoints record it."""

    loss: float
    seconds: float
    partial: dict[str, Any] | None = None


def train_one_epoch(
    step: TrainStep,
    loader: BatchLoader,
    epoch: int,
    progress: Any,
    stop: StopRequest,
    *,
    log_every: int,
    lr: float,
    on_loss: Callable[[float, int], None] | None = None,
    partial: dict[str, Any] | None = None,
) -> EpochEnd:
    """One pass over the training split, or the rest of the interrupted one that ``partial``
    describes. ``progress.global_step`` counts the steps.

    The loop never waits for the GPU except every ``log_every`` steps: the running loss and the
    first step whose loss was not finite are kept on the device until then, and read together
    (``on_loss`` gets the window's mean loss and the step). Raises ``LossNotFinite`` at the
    first sync after a NaN or infinite loss. A stop request ends the epoch at the next step
    where the processes agree (``agree_stop``), with ``EpochEnd.partial`` set.
    """
    rank, world = rank_and_world()
    device = loader.device
    step.model.train()
    skip = partial["batches_done"] if partial else 0
    loss_sum = torch.tensor(partial["loss_sum"] if partial else 0.0, device=device)
    seconds_before = partial["seconds"] if partial else 0.0
    window = torch.zeros((), device=device)
    step_counter = torch.tensor(progress.global_step, device=device)
    first_bad = torch.tensor(-1, device=device)
    window_steps, batches_done = 0, skip
    batches = loader.iterate(partial["order"] if partial else None, skip)
    bar = tqdm(
        batches,
        desc=f"epoch {epoch}",
        total=len(loader),
        initial=skip,
        leave=False,
        disable=not sys.stderr.isatty() or rank != 0,
        dynamic_ncols=True,
    )

    def check_finite(bad: int) -> None:
        if bad >= 0:
            raise LossNotFinite(bad, epoch)

    start = window_start = time.perf_counter()
    for images, labels in bar:
        detached = step(images, labels)
        loss_sum += detached * labels.shape[0]
        window += detached
        step_counter += 1
        first_bad = torch.where(~torch.isfinite(detached) & (first_bad < 0), step_counter, first_bad)
        window_steps += 1
        batches_done += 1
        progress.global_step += 1
        synced = progress.global_step % log_every == 0
        if synced:
            # The one sync: read the loss window and the divergence marker together.
            mean, bad = all_max(torch.stack([window / window_steps, first_bad.to(window.dtype)])).tolist()
            check_finite(int(bad))
            now = time.perf_counter()
            rate = window_steps * loader.batch_size / (now - window_start)
            window.zero_()
            window_steps, window_start = 0, now
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            if on_loss is not None:
                on_loss(mean, progress.global_step)
        if agree_stop(stop, device, synced) and batches_done < len(loader):
            check_finite(int(all_max(first_bad)))
            bar.close()
            return EpochEnd(
                0.0,
                0.0,
                {
                    "order": loader.order.cpu(),
                    "batches_done": batches_done,
                    "loss_sum": all_sum(loss_sum).item(),
                    "seconds": seconds_before + time.perf_counter() - start,
                },
            )
    bar.close()
    check_finite(int(all_max(first_bad)))  # the epoch's sync
    # Resumed under DDP, every process carries the whole interrupted sum: count it once.
    loss_sum = all_sum(loss_sum) - (world - 1) * (partial["loss_sum"] if partial else 0.0)
    return EpochEnd(loss_sum.item() / len(loader.split), seconds_before + time.perf_counter() - start)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    num_classes: int,
    multilabel: bool = False,
    amp: str = "off",
    channels_last: bool = False,
) -> EvalResult:
    """Loss, top-1/top-5, the confusion matrix and (multi-label) AP per class over ``loader``
    (``training.tasks`` says how for each task).

    Batches come as N x V x C x H x W; with V > 1 (10-crop) the softmax (sigmoid for multi-label)
    outputs of the views are averaged, as in the paper. Top-5 becomes top-``num_classes`` when
    there are fewer than five classes. Counts stay on the device until the end so the loop never
    waits for the GPU. ``amp`` and ``channels_last`` as in training; the metrics are computed in
    fp32 (float64 for the loss) whatever the model's precision. Under torchrun every process
    evaluates its own share and the totals are added up.
    """
    task = task_for(multilabel)
    model.eval()
    device = loader.device
    totals = task.totals(num_classes, device)
    for images, labels in loader:
        task.accumulate(totals, view_scores(task, model, images, amp, channels_last), labels)
    return task.finalise(totals, len(loader.split), num_classes)


def view_scores(
    task: Task, model: nn.Module, inputs: torch.Tensor, amp: str = "off", channels_last: bool = False
) -> torch.Tensor:
    """The task's per-image scores of N x V x C x H x W model inputs: the model on every view
    (under autocast ``amp``, in its memory layout), the views' fp32 outputs averaged
    (``Task.scores``)."""
    n, views = inputs.shape[:2]
    with autocast(inputs.device, amp):
        logits = model(model_input(inputs.flatten(0, 1), channels_last))
    return task.scores(logits.float().view(n, views, -1))


@dataclass
class Member:
    """One network of an ensemble: the model (eval mode, on the loader's device) with its own
    evaluation ``pipeline`` and precision."""

    model: nn.Module
    pipeline: Pipeline
    amp: str = "off"
    channels_last: bool = False


@torch.inference_mode()
def evaluate_ensemble(
    members: list[Member], loader: BatchLoader, num_classes: int, multilabel: bool = False
) -> tuple[list[EvalResult], EvalResult]:
    """The metrics of each member and of their ensemble over ``loader``, whose batches are the
    images as read (its pipeline leaves them alone): each member turns a batch into its own
    views, its scores average its views (``Task.scores``), and the ensemble's average the
    members' probabilities (``Task.combine``). The evaluation split is read once and every
    member runs on each batch before the next is read: nothing is kept per image but what
    ``evaluate`` keeps. With one member the ensemble is that member."""
    task = task_for(multilabel)
    device = loader.device
    totals = [task.totals(num_classes, device) for _ in members]
    together = task.totals(num_classes, device) if len(members) > 1 else totals[0]
    for member in members:
        member.model.eval()
    for images, labels in loader:
        scores = []
        for m, sums in zip(members, totals, strict=True):
            scores.append(view_scores(task, m.model, m.pipeline.evaluate(images), m.amp, m.channels_last))
            task.accumulate(sums, scores[-1], labels)
        if len(members) > 1:
            task.accumulate(together, task.combine(scores), labels)
    count = len(loader.split)
    results = [task.finalise(sums, count, num_classes) for sums in totals]
    return results, results[0] if len(members) == 1 else task.finalise(together, count, num_classes)
