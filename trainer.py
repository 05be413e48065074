"""Training: setups, the epoch loop, metrics, TensorBoard, logs, checkpoints and summary.json.

One loop serves every model and data set. ``Trainer.fit`` trains for ``n_epoch`` epochs,
evaluates on the evaluation split after each, keeps the best model, decays the learning rate
when top-1 stops improving and stops early after ``early_stop`` epochs without improvement.

Outputs of a run named ``<run>`` on data set ``<ds>`` (nothing under runs/ or checkpoints/ with
``dry_run``)::

    runs/<ds>/<run>/           TensorBoard events, summary.json, config.json, confusion CSVs
    checkpoints/<ds>/<run>/    best.pt (best top-1, or mAP for VOC, so far), last.pt (latest epoch)
    log/<run>.log              the terminal output, with ``log``
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets import BatchLoader, DataSet, Split, fits_in_memory, make_pipeline
from utils import __version__, add_log_file, atomic_torch_save, atomic_write_json, unique_run_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """A named training recipe: the defaults that ``--lr``, ``--batch-size`` etc. override."""

    optimizer: str
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    lr_factor: float
    plateau_patience: int


SETUPS: dict[str, Setup] = {
    # §5 of the paper: SGD, batch 128, momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10
    # when the validation error stops improving.
    "paper": Setup("sgd", lr=0.01, batch_size=128, momentum=0.9, weight_decay=5e-4, lr_factor=0.1, plateau_patience=5),
    # Adam with the same plateau decay; needs no tuning across the three models and data sets.
    "modern": Setup("adam", lr=1e-4, batch_size=128, momentum=0.9, weight_decay=0.0, lr_factor=0.1, plateau_patience=5),
}


@dataclass
class TrainConfig:
    """Everything that defines a run, resolved (no "use the default" placeholders left).

    Dumped to ``config.json`` and stored in every checkpoint as a plain dict.
    """

    dataset: str = "Shapes"
    model: str = "TorchAlexNet"
    cifar: bool = False
    paper_model: bool = False
    paper_train: bool = False
    lrn: bool = True
    setup: str = "modern"
    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    eval_batch_size: int = 512
    lr_factor: float = 0.1
    plateau_patience: int = 5
    n_epoch: int = 200
    early_stop: int = 50
    log_loss_step: int = 100
    log_confusion_epoch: int = 10
    seed: int = 0
    device: str = "cpu"
    data_dir: str = "dataset"
    output_dir: str = "."
    dry_run: bool = False
    log: bool = False
    message: str = ""
    coarse_labels: bool = False
    cache_dir: str = ""
    loader: str = "auto"
    workers: int = 2
    shapes_train: int = 8000
    shapes_test: int = 1600
    shapes_seed: int = 0
    run_name: str = ""
    version: str = field(default=__version__)


def build_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or Adam, as the config says."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under ``torch.compile`` and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


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

    Single-label: top-1/top-5 accuracy and a confusion matrix. Multi-label: top-1/top-5 hit
    rate (a positive label among the best 1 / 5 scores), per-class AP and their mean, mAP.
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


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader, num_classes: int, multilabel: bool = False) -> EvalResult:
    """Loss, top-1/top-5 and the confusion matrix (or AP per class) over ``loader``.

    Batches come as N x V x C x H x W; with V > 1 (10-crop) the softmax (sigmoid for multi-label)
    outputs of the views are averaged, as in the paper. Top-5 becomes top-``num_classes`` when
    there are fewer than five classes. Counts stay on the device until the end so the loop never
    waits for the GPU.
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
        logits = model(images.flatten(0, 1)).float().view(n, views, -1)
        if multilabel:
            scores = torch.sigmoid(logits).mean(1)
            weight = (labels != 0).double()
            target = (labels > 0).double()
            loss_sum += F.binary_cross_entropy(scores.double().clamp(1e-7, 1 - 1e-7), target, weight, reduction="sum")
            loss_weight += weight.sum()
            top = scores.topk(k, dim=1).indices
            hit = labels.gather(1, top) > 0
            all_scores.append(scores)
            all_labels.append(labels)
        else:
            # log of the mean of the views' softmax, computed stably
            scores = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(views)
            loss_sum += F.nll_loss(scores, labels, reduction="sum")
            loss_weight += n
            top = scores.topk(k, dim=1).indices
            hit = top == labels[:, None]
            confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes * num_classes)
        hits1 += hit[:, 0].sum()
        hits5 += hit.any(dim=1).sum()
    count = len(loader.split)
    result = EvalResult(
        loss=loss_sum.item() / max(loss_weight.item(), 1.0),
        top1=100.0 * hits1.item() / count,
        top5=100.0 * hits5.item() / count,
        count=count,
    )
    if multilabel:
        scores, labels = torch.cat(all_scores).cpu(), torch.cat(all_labels).cpu()
        result.ap = [100.0 * voc_average_precision(scores[:, c], labels[:, c]) for c in range(num_classes)]
        present = [a for a in result.ap if not math.isnan(a)]
        result.mAP = sum(present) / len(present) if present else 0.0
    else:
        result.confusion = confusion.view(num_classes, num_classes).cpu()
    return result


def write_confusion_csv(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    """The confusion matrix as CSV: a header of predicted classes, one row per true class."""
    lines = ["true\\predicted," + ",".join(classes)]
    lines += [name + "," + ",".join(str(int(v)) for v in row) for name, row in zip(classes, confusion.tolist())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class Trainer:
    """Trains ``model`` on ``data`` as ``config`` says; ``fit()`` runs it and returns the summary."""

    def __init__(self, config: TrainConfig, model: nn.Module, data: DataSet, device: torch.device) -> None:
        self.device = device
        self.data = data
        self.model = model.to(device)
        self.train_split = self._place(data.train, config)
        self.test_split = self._place(data.test, config)

        input_size = unwrap(model).input_size
        self.pipeline = make_pipeline(self.train_split, input_size, paper=config.paper_train, device=device)
        self.loss_fn = multilabel_loss if data.multilabel else F.cross_entropy
        # Two streams: the order of images (CPU) and the augmentation (on the device), both seeded.
        self.index_generator = torch.Generator().manual_seed(config.seed)
        self.generator = torch.Generator(device).manual_seed(config.seed)
        self.train_loader = BatchLoader(
            self.train_split, config.batch_size, self.pipeline, True, device,
            generator=self.generator, index_generator=self.index_generator, workers=config.workers,
        )  # fmt: skip
        eval_batch = max(1, config.eval_batch_size // self.pipeline.views)
        self.eval_loader = BatchLoader(
            self.test_split, eval_batch, self.pipeline, False, device, workers=config.workers
        )

        self.optimizer = build_optimizer(model.parameters(), config)
        # Decay on the evaluation top-1 (mode="max"): "when the validation error stopped improving".
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=config.lr_factor, patience=config.plateau_patience
        )

        output = Path(config.output_dir)
        stem = f"{type(unwrap(model)).__name__}_{config.setup}"
        self.run_dir = output / "runs" / data.name
        self.ckpt_dir = output / "checkpoints" / data.name
        config.run_name = unique_run_name(stem, self.run_dir, self.ckpt_dir, output / "log")
        self.run_dir /= config.run_name
        self.ckpt_dir /= config.run_name
        self.log_file = output / "log" / f"{config.run_name}.log" if config.log else None
        self.config = config

        self.best: EvalResult | None = None
        self.best_epoch = 0
        self.top1_max = 0.0
        self.global_step = 0
        self.writer: SummaryWriter | None = None
        self._log_handler: logging.Handler | None = None

    def _place(self, split: Split, config: TrainConfig) -> Split:
        """The whole split on the training device when it fits (or ``--loader memory``);
        otherwise it stays memory-mapped and is streamed by DataLoader workers."""
        if split.source is None:
            return split.to(self.device)
        stream = config.loader == "stream" or (
            config.loader == "auto" and not fits_in_memory(split.nbytes, self.device)
        )
        if not stream:
            return split.to(self.device)
        logger.info(
            "%d images (%.2f GB) stay on disk in %s: streaming them with a DataLoader of %d workers",
            len(split), split.nbytes / 1e9, split.source, config.workers,
        )  # fmt: skip
        return split

    # ----------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train, evaluate every epoch, keep the best checkpoint; return the run's summary."""
        config = self.config
        if self.log_file is not None:
            self._log_handler = add_log_file(self.log_file)
        try:
            if not config.dry_run:
                self.run_dir.mkdir(parents=True)
                self.ckpt_dir.mkdir(parents=True)
                atomic_write_json(asdict(config), self.run_dir / "config.json")
                self.writer = SummaryWriter(log_dir=str(self.run_dir))
                self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in asdict(config).items()))
                if config.message:
                    self.writer.add_text("message", config.message)
            return self._fit()
        finally:
            if self.writer is not None:
                self.writer.close()
            if self._log_handler is not None:
                logging.getLogger().removeHandler(self._log_handler)
                self._log_handler.close()

    def _fit(self) -> dict[str, Any]:
        config, name = self.config, self.data.name
        model_name = type(unwrap(self.model)).__name__
        logger.info(
            "run %s: %s on %s (%d train / %d test images, %d classes), %s setup, %s lr %g, batch %d, device %s%s",
            config.run_name, model_name, name, len(self.train_split), len(self.test_split), self.data.num_classes,
            config.setup, config.optimizer, config.lr, config.batch_size, self.device,
            " (dry run: nothing saved under runs/ or checkpoints/)" if config.dry_run else "",
        )  # fmt: skip
        if config.message:
            logger.info("message: %s", config.message)

        logger.info("augmentation: %s", self.pipeline.describe())
        metric = "mAP" if self.data.multilabel else "top-1"
        train_images, train_seconds = 0, 0.0
        stale = 0
        epoch = 0
        result: EvalResult | None = None
        for epoch in range(1, config.n_epoch + 1):
            start = time.perf_counter()
            train_loss = self.train_one_epoch(epoch)
            seconds = time.perf_counter() - start
            train_images += len(self.train_split)
            train_seconds += seconds
            result = evaluate(self.model, self.eval_loader, self.data.num_classes, self.data.multilabel)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step(result.score)

            improved = self.best is None or result.score > self.best.score
            if improved:
                self.best, self.best_epoch, stale = result, epoch, 0
            else:
                stale += 1
            self.top1_max = max(self.top1_max, result.top1)
            self._log_epoch(epoch, train_loss, result, lr, len(self.train_split) / seconds, time.perf_counter() - start)
            if not config.dry_run:
                checkpoint = self._checkpoint(epoch)
                atomic_torch_save(checkpoint, self.ckpt_dir / "last.pt")
                if improved:
                    atomic_torch_save(checkpoint, self.ckpt_dir / "best.pt")
                due = epoch % config.log_confusion_epoch == 0 or epoch == config.n_epoch
                if due and result.confusion is not None:
                    path = self.run_dir / f"confusion_epoch{epoch:03d}.csv"
                    write_confusion_csv(result.confusion, self.data.classes, path)
            if stale >= config.early_stop:
                logger.info("early stop: no better %s for %d epochs", metric, stale)
                break

        assert self.best is not None and result is not None
        summary = {
            "run_name": config.run_name,
            "dataset": name,
            "model": model_name,
            "best_top1": self.best.top1,
            "best_top5": self.best.top5,
            "best_epoch": self.best_epoch,
            "final_top1": result.top1,
            "final_top5": result.top5,
            "top1_max": self.top1_max,
            "epochs": epoch,
            "train_images_per_second": train_images / train_seconds,
            "train_size": len(self.train_split),
            "test_size": len(self.test_split),
            "config": asdict(config),
        }
        if self.best.mAP is not None:
            summary["best_mAP"] = self.best.mAP
            summary["final_mAP"] = result.mAP
            # Classes absent from the evaluation split have no AP: null, not NaN, to stay valid JSON.
            summary["best_ap_per_class"] = {
                c: None if math.isnan(ap) else ap for c, ap in zip(self.data.classes, self.best.ap or [])
            }
            logger.info("best mAP %.2f%% at epoch %d of %d; final mAP %.2f%%", self.best.mAP, self.best_epoch, epoch,
                        result.mAP)  # fmt: skip
        logger.info(
            "best top-1 %.2f%% (top-5 %.2f%%) at epoch %d of %d; final top-1 %.2f%%; %.0f training images/s",
            self.best.top1, self.best.top5, self.best_epoch, epoch, result.top1, summary["train_images_per_second"],
        )  # fmt: skip
        if not config.dry_run:
            assert self.writer is not None
            metrics = {"hparam/best_top1": self.best.top1, "hparam/best_top5": self.best.top5}
            if self.best.mAP is not None:
                metrics["hparam/best_mAP"] = self.best.mAP
            self.writer.add_hparams(
                {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))},
                metrics,
                run_name=".",
            )
            atomic_write_json(summary, self.run_dir / "summary.json")
            logger.info("TensorBoard and summary.json: %s", self.run_dir)
            logger.info("checkpoints: %s", self.ckpt_dir)
        if self.log_file is not None:
            logger.info("log: %s", self.log_file)
        return summary

    def train_one_epoch(self, epoch: int) -> float:
        """One pass over the training split; returns the mean training loss."""
        config = self.config
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        window = torch.zeros((), device=self.device)
        window_steps = 0
        bar = tqdm(
            self.train_loader, desc=f"epoch {epoch}", leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True
        )
        for images, labels in bar:
            loss = self.loss_fn(self.model(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

            detached = loss.detach()
            loss_sum += detached * labels.shape[0]
            window += detached
            window_steps += 1
            self.global_step += 1
            # Reading a loss forces a GPU sync, so it happens only every log_loss_step steps.
            if self.global_step % config.log_loss_step == 0:
                mean = window.item() / window_steps
                window.zero_()
                window_steps = 0
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                if self.writer is not None:
                    self.writer.add_scalar(f"{self.data.name}/train/loss", mean, self.global_step)
        return loss_sum.item() / len(self.train_split)

    def _log_epoch(
        self, epoch: int, train_loss: float, result: EvalResult, lr: float, images_per_s: float, seconds: float
    ) -> None:
        mAP = f"  mAP {result.mAP:.2f}%" if result.mAP is not None else ""
        logger.info(
            "epoch %d/%d  train loss %.4f  val loss %.4f%s  top-1 %.2f%%  top-5 %.2f%%  lr %.2e  %.0f img/s  %.1f s",
            epoch, self.config.n_epoch, train_loss, result.loss, mAP, result.top1, result.top5, lr, images_per_s,
            seconds,
        )  # fmt: skip
        if self.writer is not None:
            prefix = f"{self.data.name}/"
            scalars = {
                "train/lr": lr,
                "val/loss": result.loss,
                "val/top1": result.top1,
                "val/top5": result.top5,
                "val/top1_max": self.top1_max,
                "train/images_per_second": images_per_s,
            }
            if result.mAP is not None and result.ap is not None:
                scalars["val/mAP"] = result.mAP
                scalars.update({f"val/AP/{c}": ap for c, ap in zip(self.data.classes, result.ap) if not math.isnan(ap)})
            for tag, value in scalars.items():
                self.writer.add_scalar(prefix + tag, value, epoch)
            self.writer.flush()

    def _checkpoint(self, epoch: int) -> dict[str, Any]:
        assert self.best is not None
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "best_score": self.best.score,
            "best_epoch": self.best_epoch,
            "classes": list(self.data.classes),
            "config": asdict(self.config),
            "version": __version__,
        }
