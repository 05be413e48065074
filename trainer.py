"""Training: setups, optimisers, the epoch loop, metrics, TensorBoard, logs, checkpoints, resume.

One loop serves every model and data set. ``Trainer.fit`` trains epoch after epoch, evaluates
on the evaluation split after each, keeps the best model, divides the learning rate when the
evaluation metric (top-1; mAP for multi-label VOC) stops improving, and stops when the setup
says so: after ``n_epoch`` epochs, after ``early_stop`` epochs without improvement (modern), or
at the first plateau after the last allowed learning-rate drop (paper).

Outputs of a run named ``<run>`` on data set ``<ds>`` (nothing under runs/ or checkpoints/ with
``dry_run``)::

    runs/<ds>/<run>/           TensorBoard events, config.json, summary.json, confusion CSVs
    checkpoints/<ds>/<run>/    last.pt (every epoch), best.pt (on improvement)
    log/<run>.log              the terminal output, with ``log``

All TensorBoard scalars use the training step as their x-axis (``<ds>/train/epoch`` maps steps
to epochs), so that a resumed run can purge whatever the interrupted one logged after its last
checkpoint.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets import BatchLoader, DataSet, Pipeline, Split, fits_in_memory, make_pipeline
from network import SplitPaperAlexNet
from training.checkpoint import (
    CheckpointError,
    check_optimizer_state,
    check_partial_epoch,
    load_checkpoint,  # noqa: F401 (callers import it from here)
    save_checkpoint,
)
from training.checkpoint import check_compatible as checkpoint_check_compatible
from training.config import AMP_CHOICES, TrainConfig
from training.outputs import RunFolders, claim_run
from training.schedule import PlateauSchedule
from utils import (
    Interrupted,
    UserError,
    __version__,
    add_log_file,
    atomic_write_json,
    printable,
    rank_and_world,
    short_reason,
)

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class StopRequest:
    """Signal handler that only takes note: the training loop finishes its step, saves and stops.
    Further signals while it saves are acknowledged and otherwise ignored, so a second Ctrl-C
    cannot cut a checkpoint in half."""

    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            logger.warning("%s again: already stopping, the checkpoint is being saved", name)
            return
        self.signum = signum
        logger.warning("%s: finishing the current step, then saving and stopping", name)

    def install(self) -> dict[int, Any]:
        """Take over SIGINT and SIGTERM (main thread only); returns the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}


# ---------------------------------------------------------------------------------------------
# Optimisation


class PaperSGD(torch.optim.Optimizer):
    """Stochastic gradient descent with the paper's own update rule (§5)::

        v <- momentum * v - weight_decay * lr * w - lr * dL/dw
        w <- w + v

    ``torch.optim.SGD(momentum, weight_decay)`` keeps ``v`` in gradient units and multiplies by
    the current learning rate at every step, so a learning-rate drop shrinks the whole velocity
    at once. Here ``v`` already holds each past step's learning rate, so after a drop the old
    velocity decays away over the next steps, as in the original training. While the learning
    rate is constant the two rules give the same weights. Weight decay applies to every
    parameter, as the formula is written.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            velocities = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                velocities.append(state["velocity"])
            grads = [p.grad for p in params]
            step = torch._foreach_add(grads, params, alpha=group["weight_decay"])  # dL/dw + wd * w
            torch._foreach_mul_(velocities, group["momentum"])
            torch._foreach_add_(velocities, step, alpha=-group["lr"])
            torch._foreach_add_(params, velocities)
        return loss


def build_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """The paper's SGD, PyTorch's SGD with momentum, or Adam, as the config says."""
    if config.optimizer == "sgd" and config.paper_update:
        return PaperSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        # The fused CUDA kernel updates every tensor in one launch instead of a dozen per tensor.
        fused = torch.device(config.device).type == "cuda"
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


# ---------------------------------------------------------------------------------------------
# The fast path: mixed precision, channels-last, torch.compile

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
assert set(AMP_DTYPES) == set(AMP_CHOICES)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX); elsewhere
    oneDNN emulates them and bf16 is slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def default_amp(device: torch.device) -> str:
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed) and on CPUs with native bf16
    (1.7x the fp32 training speed of CifarAlexNet on a 2-core AVX512-BF16 EPYC); fp32 elsewhere."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "off"


def default_channels_last(device: torch.device) -> bool:
    """NHWC where convolutions run fastest in it: tensor cores, and oneDNN's bf16 kernels."""
    return default_amp(device) == "bf16"


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """The autocast context of ``amp`` (disabled for ``off``)."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def model_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``images`` in the memory layout the model's weights use."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def training_loss(
    model: nn.Module, loss_fn: Any, images: torch.Tensor, labels: torch.Tensor, amp: str, channels_last: bool
) -> torch.Tensor:
    """The loss of one training batch on the fast path: autocast ``amp``, inputs in the model's
    memory layout."""
    with autocast(images.device, amp):
        return loss_fn(model(model_input(images, channels_last)), labels)


class TrainStep:
    """One optimisation step: forward under autocast, backward, update. fp16 gets a GradScaler
    (its narrow exponent range underflows small gradients); bf16 has fp32's range and needs none.
    Returns the detached loss without waiting for the device."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any, device: torch.device,
        amp: str = "off", channels_last: bool = False,
    ) -> None:  # fmt: skip
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.amp = amp
        self.channels_last = channels_last
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = training_loss(self.model, self.loss_fn, images, labels, self.amp, self.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()


def compile_model(model: nn.Module, warm_up: Any) -> nn.Module:
    """``torch.compile(model)``, tried at once with ``warm_up(compiled)`` (a forward and backward
    on one batch); where compilation is unavailable (no C++ compiler or Triton, an unsupported
    platform) a warning and the eager model. The warm-up runs under a forked RNG and its
    gradients are dropped, so training sees the same random streams with or without it."""
    compiled = torch.compile(model)
    devices = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices):
            warm_up(compiled)
    except Exception as error:  # noqa: BLE001 - backends fail in many ways; eager always works
        logger.warning("torch.compile is unavailable here (%s); training eagerly", short_reason(error))
        return model
    finally:
        model.zero_grad(set_to_none=True)
    logger.info("model compiled with torch.compile")
    return compiled


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under ``torch.compile`` and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------
# Metrics


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

    @property
    def score(self) -> float:
        """The number that decides "better": mAP for multi-label data, else top-1."""
        return self.mAP if self.mAP is not None else self.top1

    def metrics(self) -> dict[str, Any]:
        """The numbers, JSON-ready (an AP of a class absent from the split is null)."""
        out: dict[str, Any] = {"loss": self.loss, "top1": self.top1, "top5": self.top5, "count": self.count}
        if self.mAP is not None:
            out["mAP"] = self.mAP
            out["ap"] = [None if math.isnan(a) else a for a in self.ap or []]
        return out


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: BatchLoader, num_classes: int, multilabel: bool = False, amp: str = "off",
    channels_last: bool = False,
) -> EvalResult:  # fmt: skip
    """Loss, top-1/top-5, the confusion matrix and (multi-label) AP per class over ``loader``.

    Batches come as N x V x C x H x W; with V > 1 (10-crop) the softmax (sigmoid for multi-label)
    outputs of the views are averaged, as in the paper. Top-5 becomes top-``num_classes`` when
    there are fewer than five classes. Counts stay on the device until the end so the loop never
    waits for the GPU. ``amp`` and ``channels_last`` as in training; the metrics are computed in
    fp32 (float64 for the loss) whatever the model's precision.
    """
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_weight = torch.zeros((), dtype=torch.float64, device=device)
    hits1 = torch.zeros((), dtype=torch.int64, device=device)
    hits5 = torch.zeros((), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    all_scores, all_labels = [], []
    k = min(5, num_classes)
    for images, labels in loader:
        n, views = images.shape[:2]
        with autocast(device, amp):
            logits = model(model_input(images.flatten(0, 1), channels_last)).float().view(n, views, -1)
        if multilabel:
            scores = torch.sigmoid(logits).mean(1)
            weight = (labels != 0).double()
            target = (labels > 0).double()
            loss_sum += F.binary_cross_entropy(scores.double().clamp(1e-7, 1 - 1e-7), target, weight, reduction="sum")
            loss_weight += weight.sum()
            top = scores.topk(k, dim=1).indices
            hit = labels.gather(1, top) > 0
            true = (labels > 0).float()  # every positive label of an image is a true class
            predicted = F.one_hot(top[:, 0], num_classes).float()
            all_scores.append(scores)
            all_labels.append(labels)
        else:
            # log of the mean of the views' softmax, computed stably
            scores = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(views)
            loss_sum += F.nll_loss(scores, labels, reduction="sum")
            loss_weight += n
            top = scores.topk(k, dim=1).indices
            hit = top == labels[:, None]
            true = F.one_hot(labels, num_classes).float()
            predicted = F.one_hot(top[:, 0], num_classes).float()
        # Counts as a product of one-hot matrices: exact for any batch below 2^24 images, and
        # deterministic on GPUs, where bincount is not.
        confusion += (true.T @ predicted).round().long().flatten()
        hits1 += hit[:, 0].sum()
        hits5 += hit.any(dim=1).sum()
    count = len(loader.split)
    _, world = rank_and_world()
    if world > 1:
        # Every process evaluated its own slice: add the sums up (exact for the counts).
        sums = torch.cat([torch.stack([loss_sum, loss_weight, hits1.double(), hits5.double()]), confusion.double()])
        dist.all_reduce(sums)
        loss_sum, loss_weight, hits1, hits5 = sums[0], sums[1], sums[2].long(), sums[3].long()
        confusion = sums[4:].round().long()
        if multilabel:
            local = (torch.cat(all_scores).cpu(), torch.cat(all_labels).cpu()) if all_scores else None
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, local)
            all_scores = [g[0] for g in gathered if g is not None]
            all_labels = [g[1] for g in gathered if g is not None]
    result = EvalResult(
        loss=loss_sum.item() / max(loss_weight.item(), 1.0),
        top1=100.0 * hits1.item() / count,
        top5=100.0 * hits5.item() / count,
        count=count,
        confusion=confusion.view(num_classes, num_classes).cpu(),
    )
    if multilabel:
        scores, labels = torch.cat(all_scores).cpu(), torch.cat(all_labels).cpu()
        result.ap = [100.0 * voc_average_precision(scores[:, c], labels[:, c]) for c in range(num_classes)]
        present = [a for a in result.ap if not math.isnan(a)]
        result.mAP = sum(present) / len(present) if present else 0.0
    return result


def format_metrics(result: EvalResult) -> str:
    """``val loss ...  [mAP ...]  top-1 ...  top-5 ...`` for log lines."""
    mAP = f"  mAP {result.mAP:.2f}%" if result.mAP is not None else ""
    return f"val loss {result.loss:.4f}{mAP}  top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%"


# ---------------------------------------------------------------------------------------------
# Pictures and files for TensorBoard and the run folder


def write_confusion_csv(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    """The confusion matrix as CSV: a header of predicted classes, one row per true class."""
    lines = ["true\\predicted," + ",".join(classes)]
    lines += [name + "," + ",".join(str(int(v)) for v in row) for name, row in zip(classes, confusion.tolist())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def confusion_figure(confusion: torch.Tensor, classes: list[str], title: str) -> Any:
    """A matplotlib figure of the confusion matrix, rows normalised to the share of each true
    class. Up to 20 classes: every class named on both axes and every cell's count written in
    it. More (CIFAR-100): a plain heat map with every tenth class named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.double()
    shares = (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()
    n = len(classes)
    labelled = n <= 20
    size = 6 if n <= 10 else 9 if labelled else 10
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = list(range(n)) if labelled else list(range(0, n, 10))
    ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=8)
    ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=8)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("true")
    ax.set_title(title)
    if labelled:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    return fig


def image_grid(images: torch.Tensor, max_images: int = 64) -> torch.Tensor:
    """Model inputs (any normalisation) as one picture, each image stretched to [0, 1]."""
    from torchvision.utils import make_grid

    x = images[:max_images].detach().float().cpu()
    return make_grid(x, nrow=8, normalize=True, scale_each=True, padding=2)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def check_compatible(checkpoint: dict[str, Any], path: Path, model: nn.Module, data: DataSet) -> None:
    """One sentence when the checkpoint holds another model or another class count than the
    model and data it is about to be loaded into; otherwise its weights are loaded."""
    checkpoint_check_compatible(checkpoint, path, unwrap(model), data.num_classes, data.name)


def place_split(split: Split, device: torch.device, loader: str, workers: int) -> Split:
    """The whole split on the training device when it fits (or ``loader="memory"``); otherwise
    it stays memory-mapped from its cache and is streamed by DataLoader workers."""
    if split.source is None:
        return split.to(device)
    stream = loader == "stream" or (loader == "auto" and not fits_in_memory(split.nbytes, device))
    if not stream:
        return split.to(device)
    logger.info(
        "%d images (%.2f GB) stay on disk in %s: streaming them with a DataLoader of %d workers",
        len(split), split.nbytes / 1e9, split.source, workers,
    )  # fmt: skip
    return split


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict checkpoints hold: the plain model's, whatever wraps it (compile, DDP), and
    the grouped PaperAlexNet's keys for the model split over two GPUs."""
    model = unwrap(model)
    return model.grouped_state_dict() if isinstance(model, SplitPaperAlexNet) else model.state_dict()


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, its convolution weights channels-last when asked: cuDNN's fastest
    convolutions on tensor cores read NHWC."""
    if not isinstance(model, SplitPaperAlexNet):  # the split model's towers already sit on their devices
        model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def eval_loader(split: Split, pipeline: Pipeline, config: TrainConfig, device: torch.device) -> BatchLoader:
    """Large evaluation batches, counted in model inputs: 10-crop takes a tenth of the images."""
    batch = max(1, config.eval_batch_size // pipeline.views)
    rank, world = rank_and_world()
    return BatchLoader(split, batch * world, pipeline, False, device, workers=config.workers, rank=rank, world=world)


def evaluate_checkpoint(config: TrainConfig, model: nn.Module, data: DataSet, device: torch.device) -> EvalResult:
    """``--evaluate``: the metrics of ``model`` (weights already loaded) on the evaluation split,
    with the run's pipeline (10-crop under the paper setup)."""
    model = prepare_model(model, device, config.channels_last)
    train = place_split(data.train, device, config.loader, config.workers)
    test = place_split(data.test, device, config.loader, config.workers)
    pipeline = make_pipeline(train, unwrap(model).input_size, paper=config.paper_train, device=device)
    loader = eval_loader(test, pipeline, config, device)
    return evaluate(model, loader, data.num_classes, data.multilabel, config.amp, config.channels_last)


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains ``model`` on ``data`` as ``config`` says; ``fit()`` runs it and returns the summary.

    With ``resume`` (a checkpoint from ``load_checkpoint``) it continues that run: same run
    folder, epoch, learning rate, counters and random streams. ``folders`` are the run's claimed
    folders (``training.outputs.claim_run``); ``fit`` releases their lock when it ends.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        data: DataSet,
        device: torch.device,
        resume: dict[str, Any] | None = None,
        folders: RunFolders | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.data = data
        self.rank, self.world = rank_and_world()
        self.is_main = self.rank == 0
        self.model = prepare_model(model, device, config.channels_last)
        self.train_split = place_split(data.train, device, config.loader, config.workers)
        self.test_split = place_split(data.test, device, config.loader, config.workers)

        self.pipeline = make_pipeline(self.train_split, unwrap(model).input_size, config.paper_train, device)
        self.loss_fn = multilabel_loss if data.multilabel else F.cross_entropy
        # Two streams: the order of images (CPU) and the augmentation (on the device), both seeded.
        # Under DDP every process draws the same order and its own augmentation and dropout.
        self.index_generator = torch.Generator().manual_seed(config.seed)
        self.generator = torch.Generator(device).manual_seed(config.seed + self.rank)
        if self.world > 1:
            torch.manual_seed(config.seed + self.rank)
        self.train_loader = BatchLoader(
            self.train_split, config.batch_size, self.pipeline, True, device,
            generator=self.generator, index_generator=self.index_generator, workers=config.workers,
            rank=self.rank, world=self.world,
        )  # fmt: skip
        self.eval_loader = eval_loader(self.test_split, self.pipeline, config, device)

        self.schedule = PlateauSchedule(
            base_lr=config.lr, factor=config.lr_factor, patience=config.plateau_patience,
            max_drops=config.max_lr_drops, early_stop=config.early_stop,
            stop_after_last_drop=config.stop_after_last_drop, warm_start=config.warm_start,
        )  # fmt: skip
        self.optimizer = build_optimizer(model.parameters(), config)
        self._set_lr(self.schedule.lr)
        if self.world > 1:
            # Gradients are averaged over the processes in buckets, overlapping the backward pass.
            self.model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if config.compile:
            self.model = compile_model(self.model, self._warm_up)
        self.train_step = TrainStep(self.model, self.optimizer, self.loss_fn, device, config.amp, config.channels_last)

        # The run's folders: named, checked and locked before anything is written (main.py
        # claims them before reading the data; a Trainer built directly claims them here).
        self.folders = folders if folders is not None else claim_run(config)
        self.run_dir = self.folders.run_dir
        self.ckpt_dir = self.folders.ckpt_dir
        self.log_file = self.folders.log_file if config.log and self.is_main else None

        # Progress, all of it saved in checkpoints.
        self.epoch = 0
        self.global_step = 0
        self.best: dict[str, Any] | None = None  # EvalResult.metrics() of the best epoch
        self.best_epoch = 0
        self.top1_max = 0.0
        self.train_images = 0
        self.train_seconds = 0.0
        self.last: dict[str, Any] | None = None
        self.stop_reason = ""
        self.partial: dict[str, Any] | None = None  # where an interrupted epoch stopped
        self.stop = StopRequest()
        self.resume = resume
        if resume is not None:
            self._restore(resume)
        if config.amp != "off" or config.channels_last:
            logger.info("fast path: autocast %s, channels-last %s", config.amp, "on" if config.channels_last else "off")

        self.writer: SummaryWriter | None = None
        self._log_handler: logging.Handler | None = None

    def _warm_up(self, model: nn.Module) -> None:
        """A training step's forward and backward on one full batch (no update), drawn with its
        own generator: compiles ``model`` before the first real step."""
        count = min(self.config.batch_size, len(self.train_split))
        generator = torch.Generator(self.device).manual_seed(self.config.seed + 2)
        images = self.pipeline.train(self.train_split.images[:count].to(self.device), generator)
        labels = self.train_split.labels[:count].to(self.device)
        model.train()
        training_loss(model, self.loss_fn, images, labels, self.config.amp, self.config.channels_last).backward()

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ----------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train, evaluate every epoch, keep the best checkpoint; return the run's summary.

        Raises ``Interrupted`` after saving when SIGINT/SIGTERM arrives, ``TrainingDiverged``
        when the loss stops being finite, and ``UserError`` when outputs cannot be written.
        """
        config = self.config
        previous_handlers = self.stop.install()
        try:
            if self.log_file is not None:
                self._log_handler = self._writing(self.log_file, lambda: add_log_file(self.log_file))
            if not config.dry_run and self.is_main:
                self._writing(self.run_dir, self._open_outputs)
            return self._fit()
        finally:
            self.folders.release()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if self.writer is not None:
                self.writer.close()
            if self._log_handler is not None:
                logging.getLogger().removeHandler(self._log_handler)
                self._log_handler.close()

    def _writing(self, path: Path, action: Any) -> Any:
        """Run ``action``; a failure to write becomes one sentence naming the folder."""
        try:
            return action()
        except OSError as error:
            raise UserError(
                f"cannot write to {error.filename or path} ({short_reason(error.strerror or error)}); "
                "pass a writable --output-dir."
            ) from None

    def _open_outputs(self) -> None:
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=self.resume is not None)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)  # claim_run made it to hold the lock
        if self.resume is None or not (self.run_dir / "config.json").exists():
            atomic_write_json(asdict(config), self.run_dir / "config.json")
        if self.resume is None:
            self.writer = SummaryWriter(log_dir=str(self.run_dir))
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in asdict(config).items()))
            if config.message:
                self.writer.add_text("message", config.message)
            self._log_augmented_batch()
        else:
            # A run killed while saving leaves its temporary file behind; the checkpoint it was
            # replacing is whole, and this folder belongs to this run alone.
            for folder in (self.run_dir, self.ckpt_dir):
                for stale in folder.glob(".*.tmp"):
                    stale.unlink(missing_ok=True)
            # Hide whatever the interrupted run logged after the checkpoint it resumes from.
            self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=self.global_step + 1)

    def _log_augmented_batch(self) -> None:
        """One grid of augmented training inputs, drawn with its own generator so the training
        stream stays the same with or without it."""
        assert self.writer is not None
        count = min(64, len(self.train_split))
        generator = torch.Generator(self.device).manual_seed(self.config.seed + 1)
        raw = self.train_split.images[:count].to(self.device)
        self.writer.add_image(f"{self.data.name}/train/augmented", image_grid(self.pipeline.train(raw, generator)), 0)

    def _fit(self) -> dict[str, Any]:
        config = self.config
        model_name = config.model + (" split over two devices" if config.split_gpus else "")
        logger.info(
            "run %s: %s on %s (%d train / %d test images, %d classes), %s setup, %s lr %g, batch %d, device %s%s",
            config.run_name, model_name, self.data.name, len(self.train_split), len(self.test_split),
            self.data.num_classes, config.setup, config.optimizer + (" (paper rule)" if config.paper_update else ""),
            config.lr * config.warm_start, config.batch_size, self.device,
            " (dry run: nothing saved under runs/ or checkpoints/)" if config.dry_run else "",
        )  # fmt: skip
        if self.resume is not None:
            where = f"epoch {self.epoch}" if not self.partial else \
                f"batch {self.partial['batches_done']} of epoch {self.epoch + 1}"  # fmt: skip
            logger.info("resumed after %s (step %d) at lr %.2e", where, self.global_step, self.schedule.lr)
        if config.message:
            logger.info("message: %s", config.message)
        logger.info("augmentation: %s", self.pipeline.describe())

        while self.epoch < config.n_epoch and not self.stop_reason:
            start = time.perf_counter()
            train_loss, train_seconds = self.train_one_epoch(self.epoch + 1)
            self.epoch += 1
            images_per_s = len(self.train_split) / train_seconds
            self.train_images += len(self.train_split)
            self.train_seconds += train_seconds
            result = evaluate(self.model, self.eval_loader, self.data.num_classes, self.data.multilabel,
                              self.config.amp, self.config.channels_last)  # fmt: skip
            lr = self.schedule.lr
            decision = self.schedule.step(result.score)
            self._set_lr(decision.lr)
            if decision.improved:
                self.best, self.best_epoch = result.metrics(), self.epoch
            self.top1_max = max(self.top1_max, result.top1)
            self.last = result.metrics()
            self.stop_reason = decision.stop
            seconds = time.perf_counter() - start
            self._log_epoch(result, train_loss, lr, images_per_s, seconds)
            if decision.dropped:
                logger.info("plateau: learning rate %.2e -> %.2e", lr, decision.lr)
            if not config.dry_run:
                self._save(best=decision.improved)
            if self._stop_requested(synced=True):
                self._interrupted(f"after epoch {self.epoch}")
        if self.stop_reason:
            logger.info("stopping after epoch %d: %s", self.epoch, self.stop_reason)
        return self._finish()

    def train_one_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the training split (or the rest of an interrupted one); returns the mean
        training loss and the seconds it took.

        The loop never waits for the GPU except every ``log_loss_step`` steps: the running loss
        and the first step whose loss was not finite are kept on the device until then.
        """
        config = self.config
        self.model.train()
        partial, self.partial = self.partial, None
        skip = partial["batches_done"] if partial else 0
        loss_sum = torch.tensor(partial["loss_sum"] if partial else 0.0, device=self.device)
        seconds_before = partial["seconds"] if partial else 0.0
        window = torch.zeros((), device=self.device)
        step_counter = torch.tensor(self.global_step, device=self.device)
        first_bad = torch.tensor(-1, device=self.device)
        window_steps, batches_done = 0, skip
        batches = self.train_loader.iterate(partial["order"] if partial else None, skip)
        bar = tqdm(batches, desc=f"epoch {epoch}", total=len(self.train_loader), initial=skip, leave=False,
                   disable=not sys.stderr.isatty() or not self.is_main, dynamic_ncols=True)  # fmt: skip
        start = window_start = time.perf_counter()
        for images, labels in bar:
            detached = self.train_step(images, labels)
            loss_sum += detached * labels.shape[0]
            window += detached
            step_counter += 1
            first_bad = torch.where(~torch.isfinite(detached) & (first_bad < 0), step_counter, first_bad)
            window_steps += 1
            batches_done += 1
            self.global_step += 1
            synced = self.global_step % config.log_loss_step == 0
            if synced:
                # The one sync: read the loss window and the divergence marker together.
                mean, bad = self._all_max(torch.stack([window / window_steps, first_bad.to(window.dtype)])).tolist()
                self._check_finite(int(bad), epoch)
                now = time.perf_counter()
                rate = window_steps * config.batch_size / (now - window_start)
                window.zero_()
                window_steps, window_start = 0, now
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{self.schedule.lr:.2e}", img_s=f"{rate:.0f}")
                if self.writer is not None:
                    self.writer.add_scalar(f"{self.data.name}/train/loss", mean, self.global_step)
            if self._stop_requested(synced) and batches_done < len(self.train_loader):
                self._check_finite(int(self._all_max(first_bad)), epoch)
                self.partial = {
                    "order": self.train_loader.order.cpu(),
                    "batches_done": batches_done,
                    "loss_sum": self._all_sum(loss_sum).item(),
                    "seconds": seconds_before + time.perf_counter() - start,
                }
                if not config.dry_run:
                    self._save(best=False)
                self._interrupted(f"at step {self.global_step} (epoch {epoch}, batch {batches_done} of "
                                  f"{len(self.train_loader)})")  # fmt: skip
        bar.close()
        self._check_finite(int(self._all_max(first_bad)), epoch)  # the epoch's sync
        # Resumed under DDP, every process carries the whole interrupted sum: count it once.
        loss_sum = self._all_sum(loss_sum) - (self.world - 1) * (partial["loss_sum"] if partial else 0.0)
        return loss_sum.item() / len(self.train_split), seconds_before + time.perf_counter() - start

    # Under DDP every process must take the same decisions at the same step, so the stop signal
    # and the divergence marker are agreed on by all-reduce (at the steps that sync anyway).

    def _all_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def _stop_requested(self, synced: bool) -> bool:
        """Whether SIGINT/SIGTERM arrived: at once alone; under DDP at the next ``log_loss_step``
        step or epoch end, when all processes agree on it."""
        if self.world == 1:
            return bool(self.stop.signum)
        if not synced:
            return False
        signum = self._all_max(torch.tensor(self.stop.signum or 0, device=self.device)).item()
        self.stop.signum = self.stop.signum or int(signum)
        return signum > 0

    def _check_finite(self, first_bad_step: int, epoch: int) -> None:
        """Stop with one sentence when a training loss was NaN or infinite; nothing is saved
        from the diverged weights, so the last checkpoint stays the last good one."""
        if first_bad_step < 0:
            return
        lr = self.schedule.lr
        last = self.ckpt_dir / "last.pt"
        if not self.config.dry_run and self.epoch > 0 and (not self.is_main or last.exists()):
            if self.best is not None and self.is_main:
                self._write_summary("diverged")
            advice = (f"{last} from epoch {self.epoch} is kept: resume from it with a smaller learning rate, "
                      f"e.g. --resume {last} --lr {lr / 10:.1e}.")  # fmt: skip
        else:
            advice = f"nothing was saved: start again with a smaller learning rate, e.g. --lr {lr / 10:.1e}."
        raise TrainingDiverged(
            f"training diverged: the loss became NaN or infinite at step {first_bad_step} (epoch {epoch}, "
            f"learning rate {lr:.2e}); {advice}"
        )

    def _interrupted(self, where: str) -> None:
        """Say what was kept and how to go on, then raise ``Interrupted``."""
        name = signal.Signals(self.stop.signum).name
        if self.config.dry_run:
            logger.warning("stopped by %s %s (dry run: nothing saved)", name, where)
        elif self.is_main:
            if self.best is not None:
                self._write_summary("interrupted")
            last = self.ckpt_dir / "last.pt"
            logger.warning("stopped by %s %s; saved %s", name, where, last)
            launcher = "torchrun ... main.py" if self.world > 1 else "python main.py"
            logger.warning("resume with: %s --resume %s", launcher, last)
        if self.world > 1:
            dist.barrier()  # nobody leaves (and gets the others killed) before rank 0 has saved
        raise Interrupted(self.stop.signum, reported=True)

    def _log_epoch(self, result: EvalResult, train_loss: float, lr: float, images_per_s: float, seconds: float) -> None:
        config = self.config
        logger.info(
            "epoch %d/%d  train loss %.4f  %s  lr %.2e  %.0f img/s  %.1f s",
            self.epoch, config.n_epoch, train_loss, format_metrics(result), lr, images_per_s, seconds,
        )  # fmt: skip
        if self.writer is None:
            return
        prefix, step = f"{self.data.name}/", self.global_step
        scalars = {
            "train/epoch": self.epoch,
            "train/lr": lr,
            "train/epoch_loss": train_loss,
            "train/images_per_second": images_per_s,
            "val/loss": result.loss,
            "val/top1": result.top1,
            "val/top5": result.top5,
            "val/top1_max": self.top1_max,
        }
        if result.mAP is not None and result.ap is not None:
            scalars["val/mAP"] = result.mAP
            scalars.update({f"val/AP/{c}": a for c, a in zip(self.data.classes, result.ap) if not math.isnan(a)})
        for tag, value in scalars.items():
            self.writer.add_scalar(prefix + tag, value, step)
        if (
            self.epoch % config.log_confusion_epoch == 0 or self.epoch == config.n_epoch
        ) and result.confusion is not None:
            write_confusion_csv(
                result.confusion, self.data.classes, self.run_dir / f"confusion_epoch{self.epoch:03d}.csv"
            )
            title = f"{self.data.name} epoch {self.epoch}: top-1 {result.top1:.1f}%"
            self.writer.add_figure(prefix + "val/confusion", confusion_figure(result.confusion, self.data.classes, title),
                                   step)  # fmt: skip
        self.writer.flush()

    # ----------------------------------------------------------------------------------------
    # Checkpoints and the summary

    def _state(self) -> dict[str, Any]:
        rng = {
            "torch": torch.get_rng_state(),
            "index": self.index_generator.get_state(),
            "augment": self.generator.get_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rng_ranks: list[Any] | None = None
        if self.world > 1:  # each process has its own augmentation and dropout streams
            rng_ranks = [None] * self.world
            dist.all_gather_object(rng_ranks, rng)
        return {
            "model": plain_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_metric": self.best["mAP" if self.data.multilabel else "top1"] if self.best else None,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "last": self.last,
            "top1_max": self.top1_max,
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
            "stop_reason": self.stop_reason,
            "partial": self.partial,
            "rng": rng,
            "rng_ranks": rng_ranks,
            "scaler": self.train_step.scaler.state_dict() if self.train_step.scaler is not None else None,
            "classes": list(self.data.classes),
            "config": asdict(self.config),
            "version": __version__,
        }

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (its model weights are already loaded, its fields
        checked by ``load_checkpoint``); what only this model and data can tell is checked here."""
        problem = check_optimizer_state(checkpoint["optimizer"], self.optimizer) or check_partial_epoch(
            checkpoint.get("partial"), len(self.train_split), len(self.train_loader)
        )
        if problem:
            raise CheckpointError(
                f"the checkpoint of run {printable(self.config.run_name)} cannot be resumed: {problem}; it is damaged "
                "or was not written for this model and data, so use another one (best.pt or last.pt of the run)."
            )
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"the checkpoint of run {printable(self.config.run_name)} holds an optimizer state that does not load "
                f"({short_reason(error)}); use another checkpoint of the run."
            ) from None
        self.schedule.load_state_dict(checkpoint["scheduler"])
        self._set_lr(self.schedule.lr)
        for key in ("epoch", "global_step", "best", "best_epoch", "last", "top1_max", "train_images", "train_seconds",
                    "stop_reason", "partial"):  # fmt: skip
            setattr(self, key, checkpoint.get(key))
        recorded_lr = checkpoint["config"].get("lr")
        if recorded_lr is not None and not math.isclose(self.config.lr, recorded_lr):
            # --lr on --resume: go on at this rate (after a divergence, say) with no warm phase left.
            self.schedule.base_lr = self.schedule.lr = self.config.lr
            self._set_lr(self.config.lr)
            logger.info("learning rate set to %.2e for the rest of the run", self.config.lr)
        if self.train_step.scaler is not None and checkpoint.get("scaler"):
            self.train_step.scaler.load_state_dict(checkpoint["scaler"])
        rng = checkpoint["rng"]
        ranks = checkpoint.get("rng_ranks")
        if self.world > 1:
            if ranks and len(ranks) == self.world:
                rng = ranks[self.rank]
            else:  # another number of processes: fresh per-process streams from the seed
                rng = {
                    **rng,
                    "torch": torch.Generator().manual_seed(self.config.seed + self.rank + self.epoch).get_state(),
                    "augment": torch.Generator(self.device).manual_seed(self.config.seed + self.rank).get_state(),
                }
        torch.set_rng_state(rng["torch"])
        self.index_generator.set_state(rng["index"])
        if rng["augment"].numel() == self.generator.get_state().numel():
            self.generator.set_state(rng["augment"])
        else:  # recorded on another kind of device, whose generator state has another size
            logger.warning("the augmentation stream was recorded on another kind of device; drawing a new one from "
                           "the seed")  # fmt: skip
            self.generator.manual_seed(self.config.seed + self.rank + self.epoch)
        cuda = rng.get("cuda", [])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

    def _save(self, best: bool) -> None:
        """``last.pt`` (and ``best.pt``) and the summary; a full disk is one sentence, and the
        files of the previous epoch stay as they were."""
        state = self._state()  # under DDP a collective: every process takes part
        if not self.is_main:
            return
        try:
            save_checkpoint(state, self.ckpt_dir / "last.pt", self.ckpt_dir / "best.pt" if best else None)
            if self.best is not None:
                self._write_summary("running")
        except (OSError, RuntimeError) as error:
            # torch.save reports a failed write as a RuntimeError raised from the OSError.
            cause = error if isinstance(error, OSError) else error.__context__
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else short_reason(error)
            raise UserError(
                f"could not save the checkpoint of epoch {self.epoch} in {self.ckpt_dir} ({reason}); free some disk "
                "space or pass another --output-dir (the previous last.pt and best.pt are unchanged)."
            ) from None

    def _write_summary(self, status: str) -> None:
        atomic_write_json(self._summary(status), self.run_dir / "summary.json")

    def _summary(self, status: str) -> dict[str, Any]:
        """``status``: running, finished, interrupted or diverged."""
        assert self.best is not None and self.last is not None
        finished = status == "finished"
        summary: dict[str, Any] = {
            "run_name": self.config.run_name,
            "dataset": self.data.name,
            "model": self.config.model,
            "status": status,
            "stop_reason": self.stop_reason or ("epoch limit" if finished else ""),
            "best_top1": self.best["top1"],
            "best_top5": self.best["top5"],
            "best_epoch": self.best_epoch,
            "final_top1": self.last["top1"],
            "final_top5": self.last["top5"],
            "top1_max": self.top1_max,
            "epochs": self.epoch,
            "steps": self.global_step,
            "final_lr": self.schedule.lr,
            "lr_drops": self.schedule.drops,
            "train_images_per_second": self.train_images / max(self.train_seconds, 1e-9),
            "train_seconds": self.train_seconds,
            "train_size": len(self.train_split),
            "test_size": len(self.test_split),
            "config": asdict(self.config),
        }
        if "mAP" in self.best:
            summary["best_mAP"] = self.best["mAP"]
            summary["final_mAP"] = self.last["mAP"]
            # Classes absent from the evaluation split have no AP: null.
            summary["best_ap_per_class"] = dict(zip(self.data.classes, self.best["ap"]))
        return summary

    def _finish(self) -> dict[str, Any]:
        if self.best is None:  # resumed a run that had already finished
            raise UserError(f"run {self.config.run_name} has no finished epoch to report; train it first.")
        summary = self._summary("finished")
        best = self.best
        if "mAP" in best:
            logger.info("best mAP %.2f%% at epoch %d of %d; final mAP %.2f%%", best["mAP"], self.best_epoch,
                        self.epoch, self.last["mAP"])  # fmt: skip
        logger.info(
            "best top-1 %.2f%% (top-5 %.2f%%) at epoch %d of %d; final top-1 %.2f%%; %.0f training images/s",
            best["top1"], best["top5"], self.best_epoch, self.epoch, summary["final_top1"],
            summary["train_images_per_second"],
        )  # fmt: skip
        if not self.config.dry_run and self.is_main:
            assert self.writer is not None
            metrics = {"hparam/best_top1": best["top1"], "hparam/best_top5": best["top5"]}
            if "mAP" in best:
                metrics["hparam/best_mAP"] = best["mAP"]
            hparams = {k: v for k, v in asdict(self.config).items() if isinstance(v, (int, float, str, bool))}
            self.writer.add_hparams(hparams, metrics, run_name=".")
            atomic_write_json(summary, self.run_dir / "summary.json")
            logger.info("TensorBoard, summary.json and confusion CSVs: %s", self.run_dir)
            logger.info("checkpoints (best.pt, last.pt): %s", self.ckpt_dir)
            logger.info("resume with: --resume %s", self.ckpt_dir / "last.pt")
        if self.log_file is not None:
            logger.info("log: %s", self.log_file)
        return summary
