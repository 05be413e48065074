"""Putting a checkpoint back: its weights into a model (``check_compatible``, ``load_weights``),
its optimiser state and partial epoch checked against the run that resumes it, and the run's
progress and checkpoints (``Progress``, ``Checkpointer``: what they hold, with ``on_cpu`` and
``preprocess_state``, writing them, and restoring a run as it was). The file itself (the atomic
save, loading with every field checked) is ``training.checkpoint``'s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.transforms import Pipeline
from network import MODELS
from training.checkpoint import CheckpointError, save_checkpoint
from training.config import TrainConfig
from training.distributed import gather_objects, rank_and_world
from training.fastpath import plain_state_dict
from utils import UserError, __version__, printable, quoted, short_reason

logger = logging.getLogger(__name__)


def check_compatible(
    checkpoint: dict[str, Any], path: Path, model: nn.Module, num_classes: int, data_name: str
) -> None:
    """One sentence when the checkpoint holds another kind of model or another class count than
    the model and data it is meant for (nothing is loaded: ``load_weights`` does that)."""
    config = checkpoint["config"]
    ours = type(model).__name__
    theirs = MODELS.get(str(config.get("model")))
    if theirs is None or theirs.kind.__name__ != ours:
        raise CheckpointError(
            f"checkpoint {path} holds a {quoted(str(config.get('model')))[1:-1]}, but this command builds a {ours}; "
            "drop the model flags (-c, -pm) or pass a checkpoint of this model."
        )
    classes = checkpoint["classes"]
    if len(classes) != num_classes:
        raise CheckpointError(
            f"checkpoint {path} was trained on {len(classes)} classes ({config.get('dataset')}), but {data_name} "
            f"has {num_classes}; pass a checkpoint trained on {data_name}."
        )


def load_weights(checkpoint: dict[str, Any], path: Path, model: nn.Module, num_classes: int, data_name: str) -> None:
    """The checkpoint's weights in ``model``, after ``check_compatible``; weights that do not fit
    (the paper-width CifarAlexNet's into the torchvision-width one, say) are one sentence."""
    check_compatible(checkpoint, path, model, num_classes, data_name)
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__} ({short_reason(error)}); pass a checkpoint "
            "written for it."
        ) from None


#: The per-parameter state each optimiser keeps (PaperSGD: ``velocity``).
OPTIMIZER_STATE_KEYS = {
    "Adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "SGD": {"momentum_buffer"},
    "PaperSGD": {"velocity"},
}


#: How an optimiser runs (its kernels, graph capture, autograd through the step), not what it
#: computes: they belong to the machine that resumes, never to the run, so a checkpoint's are
#: replaced by those the current device chose (``with_machine_flags``). Fused Adam on a GPU and
#: its for-each twin on a CPU update the same state.
MACHINE_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def with_machine_flags(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``saved`` (an optimiser state_dict) whose parameter groups take ``optimizer``'s
    ``MACHINE_FLAGS`` in place of their own; groups ``optimizer`` lacks stay as they are, for
    ``check_optimizer_state`` to refuse. ``Optimizer.load_state_dict`` then also places each
    state tensor (Adam's step count, say) where the current flags want it."""
    ours = optimizer.state_dict()["param_groups"]
    groups = []
    for i, group in enumerate(saved["param_groups"]):
        if i < len(ours) and isinstance(group, dict):
            group = {k: v for k, v in group.items() if k not in MACHINE_FLAGS}
            group.update({k: ours[i][k] for k in MACHINE_FLAGS if k in ours[i]})
        groups.append(group)
    return {**saved, "param_groups": groups}


def check_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> str | None:
    """Whether a checkpoint's optimiser state fits ``optimizer`` (the one built for this model):
    the same parameter groups over the same parameters with the same settings, and per-parameter
    buffers of each parameter's shape. The problem in words, or None."""
    fresh = optimizer.state_dict()
    groups = saved["param_groups"]
    if len(groups) != len(fresh["param_groups"]):
        return f"its optimizer has {len(groups)} parameter groups, this model's {len(fresh['param_groups'])}"
    for group, ours in zip(groups, fresh["param_groups"], strict=False):
        if group["params"] != ours["params"] or set(group) != set(ours):
            return f"its optimizer state is not a {type(optimizer).__name__} state of this model"
        for key, value in group.items():
            if key != "params" and type(value) is not type(ours[key]) and not _both_numbers(value, ours[key]):
                return f"its optimizer's {quoted(key)} is a {type(value).__name__}, not a {type(ours[key]).__name__}"
            if isinstance(value, float) and not math.isfinite(value):
                return f"its optimizer's {quoted(key)} is not a finite number"
    # state_dict() numbers the parameters in the order the groups list them.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shapes = {
        index: p.shape
        for index, p in zip((i for g in fresh["param_groups"] for i in g["params"]), params, strict=False)
    }
    allowed = OPTIMIZER_STATE_KEYS.get(type(optimizer).__name__, set())
    for index, entry in saved["state"].items():
        if index not in shapes:
            return f"its optimizer state names parameter {index}, which this model does not have"
        if not set(entry) <= allowed:
            return f"its optimizer state is not a {type(optimizer).__name__} state"
        for key, item in entry.items():
            if key == "step":
                if not (isinstance(item, (int, float)) or (isinstance(item, torch.Tensor) and item.numel() == 1)):
                    return "its optimizer's step count is not a number"
            elif item is not None and (not isinstance(item, torch.Tensor) or item.shape != shapes[index]):
                return f"its optimizer's {key} of parameter {index} does not have that parameter's shape"
            elif item is not None and item.is_floating_point() and not bool(torch.isfinite(item).all()):
                return f"its optimizer's {key} of parameter {index} holds NaN or infinite values"
    return None


def _both_numbers(a: object, b: object) -> bool:
    return type(a) in (int, float) and type(b) in (int, float)


def check_partial_epoch(partial: dict[str, Any] | None, train_size: int, batches: int) -> str | None:
    """Whether an interrupted epoch's record fits the training split: its order a permutation
    of the images, and at most ``batches`` batches done. The problem in words, or None."""
    if partial is None:
        return None
    order = partial["order"]
    if order.numel() != train_size or not torch.equal(order.sort().values, torch.arange(train_size)):
        return f"its interrupted epoch's image order is not an order of the {train_size} training images"
    if partial["batches_done"] > batches:
        return f"its interrupted epoch ran {partial['batches_done']} batches, more than the {batches} an epoch has"
    return None


# ---------------------------------------------------------------------------------------------
# The run's progress and its checkpoints


@dataclass
class Progress:
    """How far a run has come: everything besides the weights and the optimiser that a resumed
    run must pick up, saved in every checkpoint under these names."""

    epoch: int = 0  # finished epochs
    global_step: int = 0
    best: dict[str, Any] | None = None  # EvalResult.metrics() of the best epoch
    best_epoch: int = 0
    last: dict[str, Any] | None = None  # EvalResult.metrics() of the latest epoch
    top1_max: float = 0.0
    train_images: int = 0
    train_seconds: float = 0.0
    stop_reason: str = ""
    partial: dict[str, Any] | None = None  # where an interrupted epoch stopped

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> Progress:
        """The progress a checkpoint holds (its fields checked by ``load_checkpoint``; fields
        an older version did not write take their defaults)."""
        return cls(**{f.name: checkpoint[f.name] for f in fields(cls) if checkpoint.get(f.name) is not None})


#: The format of what ``Checkpointer.state`` writes (the formats before it: CHANGELOG.md). All
#: load; without ``preprocess``, predict rebuilds the pipeline from the data set, as
#: ``--evaluate`` does.
CHECKPOINT_FORMAT = 3


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (in dicts, lists and tuples, at any depth) on the CPU:
    what checkpoints hold, so that ``torch.load(path, weights_only=True)`` reads them on a
    machine without the GPU they were trained on, with no ``map_location``."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def preprocess_state(pipeline: Pipeline, image_size: int, task: str) -> dict[str, Any] | None:
    """The ``preprocess`` entry of a checkpoint: what ``predict`` and ``export`` need besides the
    weights and class names, so that a checkpoint alone is enough. The evaluation pipeline
    (``Pipeline.state``), the side of the square images the data set's cache holds (what a photo
    is resized and centre-cropped to before the pipeline: 32, or 256 for the 224-input models)
    and the task (``training.tasks``: softmax or per-class sigmoid scores). None for a pipeline
    kind that cannot describe itself."""
    try:
        state = pipeline.state()
    except NotImplementedError:  # a pipeline kind without a state: predict rebuilds it from the data
        return None
    return {"pipeline": state, "image_size": int(image_size), "task": task}


class Checkpointer:
    """A run's checkpoints: what they hold, writing them, and putting a run back as it was.

    ``state`` gathers the weights (the plain model's, under any wrapper), the optimiser, the
    schedule, the ``Progress``, every random stream (each process's under torchrun) and the
    GradScaler; ``save`` writes ``last.pt`` (and ``best.pt``) atomically; ``restore`` checks what
    only this model and data can tell (the optimiser state fits, an interrupted epoch's order is
    an order of this training split) and then loads it all back.
    """

    def __init__(
        self,
        folder: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Any,
        scaler: torch.amp.GradScaler | None,
        generators: dict[str, torch.Generator],
    ) -> None:
        self.folder = folder
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.scaler = scaler
        self.generators = generators  # "index" (the order of images, CPU) and "augment" (on the device)

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    def _rng(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in self.generators.items()}}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return rng

    def state(
        self,
        progress: Progress,
        task_score_key: str,
        classes: list[str],
        config: TrainConfig,
        pipeline: Pipeline | None = None,
        image_size: int = 0,
        task: str = "single-label",
    ) -> dict[str, Any]:
        """The checkpoint of this moment (under torchrun a collective: every process calls it).
        With the run's ``pipeline`` (and the data's ``image_size`` and ``task``) it carries the
        evaluation preprocessing (``preprocess_state``)."""
        rng = self._rng()
        _, world = rank_and_world()
        best = progress.best
        return on_cpu(
            {
                "model": plain_state_dict(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                **asdict(progress),
                "best_metric": best[task_score_key] if best else None,
                "rng": rng,
                # each process has its own augmentation and dropout streams
                "rng_ranks": gather_objects(rng) if world > 1 else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "classes": list(classes),
                "config": asdict(config),
                "version": __version__,
                "format": CHECKPOINT_FORMAT,
                "preprocess": preprocess_state(pipeline, image_size, task) if pipeline is not None else None,
            }
        )

    def save(self, state: dict[str, Any], best: bool, epoch: int) -> None:
        """``last.pt`` (and ``best.pt``); a full disk is one sentence, and the files of the
        previous epoch stay as they were."""
        try:
            save_checkpoint(state, self.last, self.best if best else None)
        except (OSError, RuntimeError) as error:
            # torch.save reports a failed write as a RuntimeError raised from the OSError.
            cause = error if isinstance(error, OSError) else error.__context__
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else short_reason(error)
            raise UserError(
                f"could not save the checkpoint of epoch {epoch} in {self.folder} ({reason}); free some disk "
                "space or pass another --output-dir (the previous last.pt and best.pt are unchanged)."
            ) from None

    def restore(self, checkpoint: dict[str, Any], run_name: str, train_size: int, batches: int) -> Progress:
        """Put the optimiser, the schedule, the scaler and the random streams back as the
        checkpoint has them (its weights are already loaded, its fields checked by
        ``load_checkpoint``); returns its ``Progress``."""
        saved = with_machine_flags(checkpoint["optimizer"], self.optimizer)
        problem = check_optimizer_state(saved, self.optimizer) or check_partial_epoch(
            checkpoint.get("partial"), train_size, batches
        )
        if problem:
            raise CheckpointError(
                f"the checkpoint of run {printable(run_name)} cannot be resumed: {problem}; it is damaged "
                "or was not written for this model and data, so use another one (best.pt or last.pt of the run)."
            )
        try:
            self.optimizer.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"the checkpoint of run {printable(run_name)} holds an optimizer state that does not load "
                f"({short_reason(error)}); use another checkpoint of the run."
            ) from None
        self.schedule.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        return Progress.from_checkpoint(checkpoint)

    def restore_rng(self, checkpoint: dict[str, Any], seed: int, epoch: int) -> None:
        """The random streams of the checkpoint: this process's own under torchrun, or fresh
        per-process streams from the seed when the number of processes changed."""
        rank, world = rank_and_world()
        rng = checkpoint["rng"]
        ranks = checkpoint.get("rng_ranks")
        augment = self.generators["augment"]
        if world > 1:
            if ranks and len(ranks) == world:
                rng = ranks[rank]
            else:  # another number of processes: fresh per-process streams from the seed
                rng = {
                    **rng,
                    "torch": torch.Generator().manual_seed(seed + rank + epoch).get_state(),
                    "augment": torch.Generator(augment.device).manual_seed(seed + rank).get_state(),
                }
        torch.set_rng_state(rng["torch"])
        self.generators["index"].set_state(rng["index"])
        if rng["augment"].numel() == augment.get_state().numel():
            augment.set_state(rng["augment"])
        else:  # recorded on another kind of device, whose generator state has another size
            logger.warning(
                "the augmentation stream was recorded on another kind of device; drawing a new one from the seed"
            )
            augment.manual_seed(seed + rank + epoch)
        cuda = rng.get("cuda", [])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
