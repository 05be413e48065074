"""Training: the ``Trainer``, which wires a run together and runs its epochs.

One loop serves every model and data set. ``Trainer.fit`` trains epoch after epoch, evaluates
on the evaluation split after each, keeps the best model, divides the learning rate when the
evaluation metric (top-1; mAP for multi-label VOC) stops improving, and stops when the setup
says so: after ``n_epoch`` epochs, after ``early_stop`` epochs without improvement (modern), or
at the first plateau after the last allowed learning-rate drop (paper).

Outputs of a run named ``<run>`` on data set ``<ds>`` (nothing under runs/ or checkpoints/ with
``dry_run``)::

    runs/<ds>/<run>/           TensorBoard events, config.json, metrics.jsonl, summary.json, confusion CSVs
    checkpoints/<ds>/<run>/    last.pt (every epoch), best.pt (on improvement)
    log/<run>.log              the terminal output, with ``log``

All TensorBoard scalars use the training step as their x-axis (``<ds>/train/epoch`` maps steps
to epochs), so that a resumed run can purge whatever the interrupted one logged after its last
checkpoint.

Each job has its room in ``training/``; this module is the public face, and re-exports the few
names the command line and the benchmarks use (``__all__``):

- ``training.loop``: ``train_one_epoch`` and ``evaluate``, the loop itself;
- ``training.tasks``: single- versus multi-label (loss, metrics, what "better" means);
- ``training.fastpath``: autocast, channels-last, torch.compile, the optimisation step;
- ``training.optim``: the paper's SGD, SGD, Adam; ``training.schedule``: the plateau rule;
- ``training.checkpoint``: ``Progress``, ``Checkpointer``, loading with every field checked;
- ``training.outputs``: the run's name, folders and lock, ``RunOutputs`` (TensorBoard, logs,
  ``metrics.jsonl``, ``summary.json``);
- ``training.distributed``: rank, world, agreement between processes, signals;
- ``training.config``: ``TrainConfig`` and the setups.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.core import DataSet
from data.loaders import Loaders, make_loaders
from hardware.capabilities import Capabilities, capabilities
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.distributed import Interrupted, StopRequest, agree_stop, barrier, rank_and_world
from training.fastpath import AMP_DTYPES, TrainStep, compile_model, prepare_model, training_loss, unwrap
from training.figures import model_kernel_grid
from training.loop import LossNotFinite, evaluate, train_one_epoch
from training.optim import build_optimizer, set_lr
from training.outputs import RunFolders, RunOutputs, claim_run, writing
from training.resume import Checkpointer, Progress, load_weights
from training.schedule import PlateauSchedule, parse_milestones
from training.tasks import format_metrics, task_for
from training.weights import freeze_features
from utils import UserError

#: What the command line and the benchmarks take from here: the ``Trainer`` and its neighbours,
#: and the few names of ``training/`` they use. Everything else is imported from its own module.
__all__ = [
    "AMP_DTYPES",
    "TrainConfig",
    "TrainStep",
    "Trainer",
    "TrainingDiverged",
    "compile_model",
    "format_metrics",
    "load_checkpoint",
    "load_weights",
    "prepare_model",
    "run_loaders",
    "training_loss",
]

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


def run_loaders(config: TrainConfig, data: DataSet, input_size: int, device: torch.device | Capabilities) -> Loaders:
    """The loaders and pipeline of a run on ``data`` for a model of ``input_size``, as ``config``
    sets them, for this process (its rank among the processes of a distributed run)."""
    rank, world = rank_and_world()
    return make_loaders(
        data,
        input_size,
        config.paper_train,
        device,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        loader=config.loader,
        workers=config.workers,
        seed=config.seed,
        rank=rank,
        world=world,
        fidelity=config.fidelity,
    )


class Trainer:
    """Trains ``model`` on ``data`` as ``config`` says; ``fit()`` runs it and returns the summary.

    With ``resume`` (a checkpoint from ``load_checkpoint``) it continues that run: same run
    folder, epoch, learning rate, counters and random streams. ``folders`` are the run's claimed
    folders (``training.outputs.claim_run``), which their claimer releases; without them the
    Trainer claims its own, and ``fit`` releases those when it ends.
    ``device`` may be a ``Capabilities`` (a test's CPU standing in for a GPU).
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        data: DataSet,
        device: torch.device | Capabilities,
        resume: dict[str, Any] | None = None,
        folders: RunFolders | None = None,
    ) -> None:
        self.hw = capabilities(device)
        device = self.hw.device
        self.config, self.data, self.device = config, data, device
        self.rank, self.world = rank_and_world()
        self.is_main = self.rank == 0
        self.task = task_for(data)
        self.model = prepare_model(model, device, config.channels_last)
        # The order of images (CPU) and the augmentation (on the device), both seeded. Under DDP
        # every process draws the same order and its own augmentation and dropout.
        loaders = run_loaders(config, data, unwrap(model).input_size, self.hw)
        if self.world > 1:
            torch.manual_seed(config.seed + self.rank)
        self.train_loader, self.eval_loader, self.pipeline = loaders.train, loaders.eval, loaders.pipeline

        self.schedule = PlateauSchedule(
            base_lr=config.lr,
            factor=config.lr_factor,
            patience=config.plateau_patience,
            max_drops=config.max_lr_drops,
            early_stop=config.early_stop,
            stop_after_last_drop=config.stop_after_last_drop,
            warm_start=config.warm_start,
            milestones=parse_milestones(config.lr_milestones),
        )
        if config.freeze_features:
            trainable, total = freeze_features(model)
            logger.info("features frozen: %s of %s parameters train (the classifier)", f"{trainable:,}", f"{total:,}")
        self.optimizer = build_optimizer(model.parameters(), config, self.hw.fused_optimizer)  # the trainable ones
        self._set_lr(self.schedule.lr)
        if self.world > 1:
            # Gradients are averaged over the processes in buckets, overlapping the backward pass.
            self.model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if config.compile:
            self.model = compile_model(self.model, self._warm_up)
        self.train_step = TrainStep(
            self.model, self.optimizer, self.task.loss, device, config.amp, config.channels_last
        )

        # The run's folders: named, checked and locked before anything is written (main.py
        # claims them before reading the data; a Trainer built directly claims them here). Who
        # claims them releases them, once.
        self.owns_folders = folders is None
        if folders is None:
            folders = claim_run(config)
            self.config = config = replace(config, run_name=folders.name)
        self.folders = folders
        self.checkpointer = Checkpointer(
            self.folders.ckpt_dir,
            self.model,
            self.optimizer,
            self.schedule,
            self.train_step.scaler,
            {"index": self.train_loader.index_generator, "augment": self.train_loader.generator},
        )
        self.progress = Progress()
        self.stop = StopRequest()
        self.resume = resume
        if resume is not None:
            self._restore(resume)
        self.outputs = RunOutputs(
            config,
            self.folders,
            data.name,
            data.classes,
            self.task,
            self.progress.global_step if resume is not None else None,
        )
        if config.amp != "off" or config.channels_last:
            logger.info("fast path: autocast %s, channels-last %s", config.amp, "on" if config.channels_last else "off")
        slow = self.hw.amp_warning(config.amp)
        if slow:
            logger.warning("%s", slow)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue from a checkpoint (weights already loaded, fields checked)."""
        config = self.config
        self.progress = self.checkpointer.restore(
            checkpoint, config.run_name, len(self.train_loader.split), len(self.train_loader)
        )
        self._set_lr(self.schedule.lr)
        recorded_lr = checkpoint["config"].get("lr")
        if recorded_lr is not None and not math.isclose(config.lr, recorded_lr):
            # --lr on --resume: go on at this rate (after a divergence, say) with no warm phase left.
            self.schedule.base_lr = self.schedule.lr = config.lr
            self._set_lr(config.lr)
            logger.info("learning rate set to %.2e for the rest of the run", config.lr)
        self.checkpointer.restore_rng(checkpoint, config.seed, self.progress.epoch)

    def _warm_up(self, model: nn.Module) -> None:
        """A training step's forward and backward on one full batch (no update): compiles
        ``model`` before the first real step."""
        # This process's share of a global batch: the shape every full training step has here.
        share = len(torch.arange(self.config.batch_size).tensor_split(self.world)[self.rank])
        images, labels = self.train_loader.first(share, self.config.seed + 2)
        model.train()
        training_loss(model, self.task.loss, images, labels, self.config.amp, self.config.channels_last).backward()

    def _set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)  # groups with a fixed rate (the release's biases) keep theirs

    # ----------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train, evaluate every epoch, keep the best checkpoint; return the run's summary.

        Raises ``Interrupted`` after saving when SIGINT/SIGTERM arrives, ``TrainingDiverged``
        when the loss stops being finite, and ``UserError`` when outputs cannot be written.
        """
        config, p = self.config, self.progress
        try:
            with self.stop:
                self.outputs.open(lambda: self.train_loader.first(64, config.seed + 1)[0])
                self.outputs.start(
                    config.model + (" split over two devices" if config.split_gpus else ""),
                    len(self.train_loader.split),
                    len(self.eval_loader.split),
                    config.lr * config.warm_start,
                    self.device,
                    self.pipeline.describe(),
                    self._resumed_at(),
                )
                while p.epoch < config.n_epoch and not p.stop_reason:
                    start = time.perf_counter()
                    train_loss, train_seconds = self._train_epoch(p.epoch + 1)
                    p.epoch += 1
                    p.train_images += len(self.train_loader.split)
                    p.train_seconds += train_seconds
                    result = evaluate(
                        self.model,
                        self.eval_loader,
                        self.data.num_classes,
                        self.task.multilabel,
                        config.amp,
                        config.channels_last,
                    )
                    lr = self.schedule.lr
                    decision = self.schedule.step(self.task.score(result), p.epoch)
                    self._set_lr(decision.lr)
                    if decision.improved:
                        p.best, p.best_epoch = result.metrics(), p.epoch
                    p.top1_max = max(p.top1_max, result.top1)
                    p.last = result.metrics()
                    p.stop_reason = decision.stop
                    images_per_s = len(self.train_loader.split) / train_seconds
                    self.outputs.epoch(p, result, train_loss, lr, images_per_s, time.perf_counter() - start)
                    self._log_kernels()
                    if decision.dropped:
                        logger.info("plateau: learning rate %.2e -> %.2e", lr, decision.lr)
                    if not config.dry_run:
                        self._save(best=decision.improved)
                    if agree_stop(self.stop, self.device, synced=True):
                        self._interrupted(f"after epoch {p.epoch}")
                if p.stop_reason:
                    logger.info("stopping after epoch %d: %s", p.epoch, p.stop_reason)
                return self._finish()
        finally:
            if self.owns_folders:
                self.folders.release()
            self.outputs.close()

    def _log_kernels(self) -> None:
        """conv1's kernels as a picture in TensorBoard (``kernels/conv1``) when the confusion
        matrix is logged: every ``-lce`` epochs and at the last."""
        epoch, step = self.progress.epoch, self.progress.global_step
        if self.outputs.writer is None or (epoch % self.config.log_confusion_epoch and epoch != self.config.n_epoch):
            return
        grid = model_kernel_grid(unwrap(self.model))
        self.outputs.tensorboard(lambda writer: writer.add_image("kernels/conv1", grid, step))
        self.outputs.tensorboard(lambda writer: writer.flush())

    def _resumed_at(self) -> str | None:
        if self.resume is None:
            return None
        p = self.progress
        where = f"epoch {p.epoch}" if not p.partial else f"batch {p.partial['batches_done']} of epoch {p.epoch + 1}"
        return f"resumed after {where} (step {p.global_step}) at lr {self.schedule.lr:.2e}"

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        """``train_one_epoch``, with what a stop or a divergence means for the run."""
        p = self.progress
        partial, p.partial = p.partial, None
        try:
            end = train_one_epoch(
                self.train_step,
                self.train_loader,
                epoch,
                p,
                self.stop,
                log_every=self.config.log_loss_step,
                lr=self.schedule.lr,
                on_loss=self.outputs.train_loss,
                partial=partial,
            )
        except LossNotFinite as bad:
            self._diverged(bad.step, bad.epoch)
        if end.partial is not None:
            p.partial = end.partial
            if not self.config.dry_run:
                self._save(best=False)
            self._interrupted(
                f"at step {p.global_step} (epoch {epoch}, batch {end.partial['batches_done']} of "
                f"{len(self.train_loader)})"
            )
        return end.loss, end.seconds

    def _diverged(self, first_bad_step: int, epoch: int) -> None:
        """Stop with one sentence when a training loss was NaN or infinite; nothing is saved
        from the diverged weights, so the last checkpoint stays the last good one."""
        lr, p = self.schedule.lr, self.progress
        last = self.checkpointer.last
        if not self.config.dry_run and p.epoch > 0 and (not self.is_main or last.exists()):
            if p.best is not None and self.is_main:
                self._write_summary("diverged")
            advice = (
                f"{last} from epoch {p.epoch} is kept: resume from it with a smaller learning rate, "
                f"e.g. --resume {last} --lr {lr / 10:.1e}."
            )
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
            if self.progress.best is not None:
                self._write_summary("interrupted")
            logger.warning("stopped by %s %s; saved %s", name, where, self.checkpointer.last)
            launcher = "torchrun ... main.py" if self.world > 1 else "python main.py"
            logger.warning("resume with: %s --resume %s", launcher, self.checkpointer.last)
        barrier()  # nobody leaves (and gets the others killed) before rank 0 has saved
        raise Interrupted(self.stop.signum, reported=True)

    # ----------------------------------------------------------------------------------------
    # Checkpoints and the summary

    def _save(self, best: bool) -> None:
        """``last.pt`` (and ``best.pt``) and the summary."""
        p = self.progress
        state = self.checkpointer.state(
            p, self.task.score_key, self.data.classes, self.config, self.pipeline, self.data.image_size, self.task.name
        )  # a collective
        if not self.is_main:
            return
        self.checkpointer.save(state, best, p.epoch)
        if p.best is not None:
            self._write_summary("running")

    def _summary(self, status: str) -> dict[str, Any]:
        return self.outputs.summary(
            status, self.progress, self.schedule, len(self.train_loader.split), len(self.eval_loader.split)
        )

    def _write_summary(self, status: str) -> None:
        writing(self.outputs.run_dir, lambda: self.outputs.write_summary(self._summary(status)))

    def _finish(self) -> dict[str, Any]:
        if self.progress.best is None:  # resumed a run that had already finished
            raise UserError(f"run {self.config.run_name} has no finished epoch to report; train it first.")
        summary = self._summary("finished")
        self.outputs.finish(summary, self.progress)
        return summary
