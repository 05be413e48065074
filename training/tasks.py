"""What is being learnt: one class per image, or any number of classes per image.

A ``Task`` holds everything that differs between the two, so the loop, the trainer, the outputs
and the checkpoints never ask which one they have:

- ``SingleLabel`` (Shapes, CIFAR): cross-entropy, top-1/top-5 accuracy, the confusion matrix of
  (true class, top-1 prediction); "better" means a higher top-1.
- ``MultiLabel`` (Pascal VOC: 1 present, -1 absent, 0 "difficult only", per class): binary
  cross-entropy over the entries that count, top-1/top-5 hit rate (a present class among the
  best 1 / 5 scores), the average precision of each class and their mean (mAP); "better" means
  a higher mAP.

Each has ``loss`` (training), ``accumulate`` and ``finalise`` (evaluation, exact over the whole
split and over all processes), ``score`` (the number the schedule watches), and the extra
fields the summary, the log and TensorBoard show. ``task_for(data)`` picks one, once, from the
data set's labels (``DataSet.multilabel``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from data.core import DataSet
from data.registry import MULTI_LABEL
from training.distributed import all_sum, gather_objects


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the present (1) and absent (-1) entries of VOC-style labels;
    "difficult only" entries (0) count neither way. Mean over the entries that count."""
    weight = (labels != 0).float()
    target = (labels > 0).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, weight, reduction="sum")
    return loss / weight.sum().clamp_min(1)


def voc_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """All-points average precision of one class (the VOC2010+ definition): the area under the
    precision-recall curve after replacing each precision by the best precision at any higher
    recall. ``labels`` are 1 / -1 / 0; entries labelled 0 are left out. Ties in ``scores`` keep
    their data order. NaN when the class has no positive example."""
    keep = labels != 0
    scores, positive = scores[keep].double(), labels[keep] > 0
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.sort(scores, descending=True, stable=True).indices
    positive = positive[order]
    tp = positive.cumsum(0).double()
    precision = tp / torch.arange(1, len(positive) + 1, dtype=torch.float64)
    envelope = precision.flip(0).cummax(0).values.flip(0)
    # Recall grows by 1/n_pos exactly at each positive, so the area is a sum over positives.
    return float(envelope[positive].sum() / n_pos)


@dataclass
class EvalResult:
    """Metrics over a whole evaluation split (exact counts, not means of batch means).

    Single-label: top-1/top-5 accuracy. Multi-label: top-1/top-5 hit rate (a positive label
    among the best 1 / 5 scores), per-class AP and their mean, mAP. The confusion matrix counts
    (true class, top-1 prediction) pairs; for multi-label data every positive label of an image
    is a true class.
    """

    loss: float
    top1: float  # percent
    top5: float  # percent
    count: int
    confusion: torch.Tensor | None = None  # C x C counts, rows = true class, columns = predicted
    ap: list[float] | None = None  # percent per class, NaN for classes absent from the split
    mAP: float | None = None  # percent, mean over classes with positives

    def metrics(self) -> dict[str, Any]:
        """The numbers, JSON-ready (an AP of a class absent from the split is null)."""
        out: dict[str, Any] = {"loss": self.loss, "top1": self.top1, "top5": self.top5, "count": self.count}
        if self.mAP is not None:
            out["mAP"] = self.mAP
            out["ap"] = [None if math.isnan(a) else a for a in self.ap or []]
        return out


def format_metrics(result: EvalResult) -> str:
    """``val loss ...  [mAP ...]  top-1 ...  top-5 ...`` for log lines."""
    mAP = f"  mAP {result.mAP:.2f}%" if result.mAP is not None else ""
    return f"val loss {result.loss:.4f}{mAP}  top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%"


@dataclass
class Totals:
    """What ``Task.accumulate`` adds up over an evaluation, kept on the device until the end."""

    loss_sum: torch.Tensor
    loss_weight: torch.Tensor
    hits1: torch.Tensor
    hits5: torch.Tensor
    confusion: torch.Tensor  # flattened C x C counts
    scores: list[torch.Tensor] = field(default_factory=list)  # multi-label: for AP at the end
    labels: list[torch.Tensor] = field(default_factory=list)


class Task:
    """The single-label task; ``MultiLabel`` changes what differs."""

    name = "single-label"
    multilabel = False
    #: The metric that decides "better", a key of ``EvalResult.metrics()``.
    score_key = "top1"

    def score(self, result: EvalResult) -> float:
        """The number of ``result`` that decides "better" (``score_key``)."""
        return result.metrics()[self.score_key]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch."""
        return F.cross_entropy(logits, labels)

    def totals(self, num_classes: int, device: torch.device) -> Totals:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.int64, device=device)
        confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        return Totals(zero, zero.clone(), count, count.clone(), confusion)

    #: The space of ``scores``: log-probabilities (softmax), or probabilities (per-class sigmoid).
    log_scores = True

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-image class scores from the N x V x C fp32 logits of V views: the log of the mean
        of the views' softmax, computed stably (the paper's averaging over its 10 patches)."""
        return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(logits.shape[1])

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """The class probabilities that ``scores`` are (or are the logs of)."""
        return scores.exp() if self.log_scores else scores

    def combine(self, scores: list[torch.Tensor]) -> torch.Tensor:
        """An ensemble's scores: the mean of its members' probabilities (``scores`` of each),
        in the same space. Taken relative to the largest member's value, so that a member given
        twice (or alone) gives back exactly its own scores."""
        if len(scores) == 1:
            return scores[0]
        stack = torch.stack(scores)
        top = stack.amax(0)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        if self.log_scores:
            return top + (stack - top).exp().mean(0).log()
        return top + (stack - top).mean(0)

    def _add_loss(self, totals: Totals, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Add the batch's loss to ``totals``; the one-hot N x C matrix of each image's true classes."""
        totals.loss_sum += F.nll_loss(scores, labels, reduction="sum")
        totals.loss_weight += labels.shape[0]
        return F.one_hot(labels, scores.shape[-1]).float()

    def _hits(self, top: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """N x k: whether each of the k best classes is a true class."""
        return top == labels[:, None]

    def accumulate(self, totals: Totals, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch's N x C ``scores`` (of its views, and of an ensemble's members) to ``totals``."""
        num_classes = scores.shape[-1]
        true = self._add_loss(totals, scores, labels)
        top = scores.topk(min(5, num_classes), dim=1).indices
        hit = self._hits(top, labels)
        predicted = F.one_hot(top[:, 0], num_classes).float()
        # Counts as a product of one-hot matrices: exact for any batch below 2^24 images, and
        # deterministic on GPUs, where bincount is not.
        totals.confusion += (true.T @ predicted).round().long().flatten()
        totals.hits1 += hit[:, 0].sum()
        totals.hits5 += hit.any(dim=1).sum()

    def finalise(self, totals: Totals, count: int, num_classes: int) -> EvalResult:
        """The metrics of the whole split: the totals of every process added up (exact for the
        counts); ``count`` is the split's size."""
        sums = torch.cat(
            [
                torch.stack([totals.loss_sum, totals.loss_weight, totals.hits1.double(), totals.hits5.double()]),
                totals.confusion.double(),
            ]
        )
        sums = all_sum(sums)
        return EvalResult(
            loss=sums[0].item() / max(sums[1].item(), 1.0),
            top1=100.0 * sums[2].round().item() / count,
            top5=100.0 * sums[3].round().item() / count,
            count=count,
            confusion=sums[4:].round().long().view(num_classes, num_classes).cpu(),
        )

    def best_fields(self, best: dict[str, Any], last: dict[str, Any], classes: list[str]) -> dict[str, Any]:
        """The summary's task-specific fields beyond top-1/top-5."""
        return {}

    def scalars(self, result: EvalResult, classes: list[str]) -> dict[str, float]:
        """The TensorBoard scalars (and metrics.jsonl entries) beyond loss and top-1/top-5."""
        return {}

    def hparam_metrics(self, best: dict[str, Any]) -> dict[str, float]:
        return {}

    def best_line(self, best: dict[str, Any], last: dict[str, Any], best_epoch: int, epochs: int) -> str | None:
        """An extra line for the end of a run, or None."""
        return None


class MultiLabel(Task):
    name = MULTI_LABEL
    multilabel = True
    score_key = "mAP"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return multilabel_loss(logits, labels)

    log_scores = False

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The mean of the views' per-class sigmoids."""
        return torch.sigmoid(logits).mean(1)

    def _add_loss(self, totals: Totals, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = (labels != 0).double()
        target = (labels > 0).double()
        totals.loss_sum += F.binary_cross_entropy(
            scores.double().clamp(1e-7, 1 - 1e-7), target, weight, reduction="sum"
        )
        totals.loss_weight += weight.sum()
        totals.scores.append(scores)
        totals.labels.append(labels)
        return (labels > 0).float()  # every positive label of an image is a true class

    def _hits(self, top: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return labels.gather(1, top) > 0

    def finalise(self, totals: Totals, count: int, num_classes: int) -> EvalResult:
        result = super().finalise(totals, count, num_classes)
        local = (torch.cat(totals.scores).cpu(), torch.cat(totals.labels).cpu()) if totals.scores else None
        parts = [part for part in gather_objects(local) if part is not None]
        scores, labels = torch.cat([s for s, _ in parts]), torch.cat([y for _, y in parts])
        result.ap = [100.0 * voc_average_precision(scores[:, c], labels[:, c]) for c in range(num_classes)]
        present = [a for a in result.ap if not math.isnan(a)]
        result.mAP = sum(present) / len(present) if present else 0.0
        return result

    def best_fields(self, best: dict[str, Any], last: dict[str, Any], classes: list[str]) -> dict[str, Any]:
        # Classes absent from the evaluation split have no AP: null.
        return {
            "best_mAP": best["mAP"],
            "final_mAP": last["mAP"],
            "best_ap_per_class": dict(zip(classes, best["ap"], strict=False)),
        }

    def scalars(self, result: EvalResult, classes: list[str]) -> dict[str, float]:
        assert result.mAP is not None and result.ap is not None
        return {
            "val/mAP": result.mAP,
            **{f"val/AP/{c}": a for c, a in zip(classes, result.ap, strict=False) if not math.isnan(a)},
        }

    def hparam_metrics(self, best: dict[str, Any]) -> dict[str, float]:
        return {"hparam/best_mAP": best["mAP"]}

    def best_line(self, best: dict[str, Any], last: dict[str, Any], best_epoch: int, epochs: int) -> str | None:
        return f"best mAP {best['mAP']:.2f}% at epoch {best_epoch} of {epochs}; final mAP {last['mAP']:.2f}%"


SINGLE = Task()
MULTI = MultiLabel()
TASKS: dict[str, Task] = {SINGLE.name: SINGLE, MULTI.name: MULTI}


def task_for(data: DataSet | bool) -> Task:
    """The task of a data set, as its labels say (``DataSet.multilabel``: a row of labels per
    image), whatever its name; or of the ``multilabel`` flag of ``evaluate``."""
    multilabel = data if isinstance(data, bool) else data.multilabel
    return MULTI if multilabel else SINGLE
