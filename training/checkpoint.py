"""Checkpoints: the atomic save, and loading with every field checked.

A checkpoint is untrusted input as much as a data file is: it may be damaged, come from another
tool or another version, or be crafted. ``torch.load(weights_only=True)`` already refuses
anything but tensors and plain values; ``load_checkpoint`` then checks every field the tool
reads (types, ranges, names, known optimisers) with the same rules as the command line, and the
trainer checks what only the model and the data can tell (``check_compatible``,
``check_optimizer_state``, ``check_partial_epoch``). Whatever is wrong becomes one sentence
naming the file and the field, never a traceback.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.core import DataOptions
from data.registry import DATASETS
from data.transforms import Pipeline, pipeline_from_state
from network import MODELS, make_model
from settings.rules import Check
from training.config import TrainConfig
from training.distributed import gather_objects, rank_and_world
from training.fastpath import plain_state_dict
from training.schedule import check_schedule_state
from utils import UserError, __version__, printable, quoted, short_reason, temp_file_beside

logger = logging.getLogger(__name__)

#: Bounds well beyond any real checkpoint, so a crafted one cannot make the checks themselves slow.
MAX_CLASSES = 100_000
MAX_TENSORS = 10_000
MAX_RANKS = 65_536
#: The sides a checkpoint's preprocessing may resize photos to: from the floor of
#: ``DataOptions.image_size`` to the largest images any data set of this tool holds (256), so
#: that a crafted size cannot make ``predict`` read each photo at gigabytes.
SMALLEST_IMAGE = int(next(f for f in fields(DataOptions) if f.name == "image_size").metadata["check"].low)
LARGEST_IMAGE = max(info.image_size for info in DATASETS.values())


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, foreign or does not fit the model and data."""


def save_checkpoint(checkpoint: dict[str, Any], last: Path, best: Path | None) -> None:
    """Write ``last`` (and ``best`` when given) atomically: serialise once to a temporary file,
    fsync, hard-link it as the new ``best``, then rename it over ``last``. A crash at any moment
    leaves each file either whole and old or whole and new."""
    fd, tmp = temp_file_beside(last)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        if best is not None:
            fd_best, tmp_best = temp_file_beside(best)
            os.close(fd_best)
            os.unlink(tmp_best)
            try:
                os.link(tmp, tmp_best)
            except OSError:  # file systems without hard links
                shutil.copyfile(tmp, tmp_best)
            os.replace(tmp_best, best)
        os.replace(tmp, last)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def not_regular(path: Path) -> str | None:
    """What ``path`` is when it exists but is not a regular file ("a folder", "a FIFO", "a
    socket", "a device"), else None. Only regular files are opened: opening a FIFO waits for a
    writer that may never come."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing or out of reach: opening it says which
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"


def load_checkpoint(path: Path, resume: bool = False) -> dict[str, Any]:
    """A checkpoint written by this tool, loaded with ``weights_only=True`` (tensors and plain
    values only, so a crafted file cannot run code), every field checked (``check_fields``;
    ``resume`` asks for everything a resumed run needs). Every failure is a ``CheckpointError``."""
    path = Path(path)
    kind = not_regular(path)
    if kind == "a folder":
        raise CheckpointError(f"checkpoint {path} is a folder; pass the path of a last.pt or best.pt in it.")
    if kind is not None:
        raise CheckpointError(f"checkpoint {path} is {kind}, not a file; pass the path of a last.pt or best.pt.")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a last.pt or best.pt.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (truncated zip, foreign pickle, refused global: all "unusable")
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded ({short_reason(error)}); it is damaged or was not written by "
            "this tool, so use another one (best.pt or last.pt of the run)."
        ) from None
    missing = [k for k in EVALUATE_FIELDS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint written by this tool (it lacks {', '.join(missing)}); "
            "pass a last.pt or best.pt from checkpoints/."
        )
    missing = [k for k in RESUME_FIELDS if k not in checkpoint]
    if resume and missing:
        raise CheckpointError(
            f"checkpoint {path} holds no training state to resume (it lacks {', '.join(missing)}); evaluate it with "
            "--evaluate, or resume from a last.pt from checkpoints/."
        )
    problem = check_fields(checkpoint) or network_problem(checkpoint)
    if problem:
        raise CheckpointError(
            f"checkpoint {path} cannot be used: {problem}; it is damaged or was not written by this tool, so use "
            "another one (best.pt or last.pt of the run)."
        )
    return checkpoint


# ---------------------------------------------------------------------------------------------
# The fields: one table of rules, walked in order by ``check_fields``; the first problem is told.


def _keys(*names: str, at_least: bool = False, among: bool = False) -> Callable[[Any], bool]:
    """A dict whose keys are ``names`` (or include them, or are among them)."""
    compare = set.__ge__ if at_least else set.__le__ if among else set.__eq__
    return lambda value: isinstance(value, dict) and compare(set(value), set(names))


def _sized(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, list) and low <= len(value) <= high


def _state_dict(value: object) -> None:
    """Named tensors, finite where floating point (the first that is not is named)."""
    if not isinstance(value, dict) or not value or len(value) > MAX_TENSORS:
        raise ValueError("is not a state dict")
    for key, tensor in value.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError("is not a state dict of named tensors")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"holds NaN or infinite values in {quoted(key)}")


def _byte_states(rng: dict) -> bool:
    cuda = rng.get("cuda", [])
    states = (rng["torch"], rng["index"], rng["augment"], *(cuda if isinstance(cuda, list) else [None]))
    return all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 and s.dim() == 1 for s in states)


def _ap(value: object) -> bool:
    """Per-class AP: percentages, or None / NaN for a class absent from the split."""

    def ok(a: object) -> bool:
        return a is None or (type(a) is float and (0 <= a <= 100 or math.isnan(a)))

    return isinstance(value, list) and len(value) <= MAX_CLASSES and all(map(ok, value))


PERCENT, COUNT, SECONDS, TEXT = Check(float, 0, 100), Check(int, 0), Check(float, 0), Check(str)
CPU_RNG = torch.get_rng_state().numel()
#: The random streams: CPU (``torch``, ``index``), augmentation (any device) and CUDA.
RNG = [
    ("", _keys("torch", "index", "augment", at_least=True), "is not a set of random-generator states"),
    ("", _byte_states, "holds a random-generator state that is not a byte tensor"),
    (
        "",
        lambda r: r["torch"].numel() == r["index"].numel() == CPU_RNG,
        f"holds a CPU random-generator state that is not {CPU_RNG} bytes",
    ),
]
#: ``EvalResult.metrics()``: loss, top-1/top-5 in percent, the image count, and for multi-label
#: data mAP and the per-class AP.
METRICS = [
    ("", _keys("loss", "top1", "top5", "count", at_least=True), "is not a set of metrics"),
    (".loss", lambda loss: type(loss) in (float, int), "has a loss that is not a number"),
    *((f".{key}", PERCENT if key != "count" else COUNT, None) for key in ("top1", "top5", "count", "mAP")),
    ("", lambda m: "mAP" not in m or _ap(m.get("ap")), "has per-class AP that are not percentages"),
]
#: The fields this tool reads, each with the rules of its entries: (field path, rule, problem).
#: A path's parts after the field name an entry (absent: skipped), or "*" every item of a list or
#: value of a dict. A rule with a problem is a test; one without raises its own words (ValueError),
#: which a problem ending in a space comes before. Fields that may be None are ``OPTIONAL``.
FIELD_RULES: list[tuple[str, Callable[[Any], Any], str | None]] = [
    ("model", _state_dict, None),
    ("config", TrainConfig.from_dict, None),
    ("epoch", COUNT, None),
    ("classes", _sized(1, MAX_CLASSES), f"must be a list of 1 to {MAX_CLASSES} class names"),
    ("classes.*", TEXT, None),
    ("global_step", COUNT, None),
    ("optimizer", _keys("state", "param_groups"), "is not an optimiser state"),
    (
        "optimizer",
        lambda o: type(o["state"]) is dict and type(o["param_groups"]) is list and o["param_groups"],
        "is not an optimiser state",
    ),
    (
        "optimizer.param_groups.*",
        lambda g: isinstance(g, dict) and isinstance(g.get("params"), list),
        "has a parameter group without its parameters",
    ),
    (
        "optimizer.param_groups.*.params.*",
        lambda i: type(i) is int,
        "has a parameter group whose parameters are not indices",
    ),
    (
        "optimizer.state",
        lambda s: all(type(i) is int and isinstance(e, dict) for i, e in s.items()),
        "has a state entry that is not indexed by parameter",
    ),
    (
        "optimizer.state.*",
        lambda e: all(
            isinstance(k, str) and (v is None or isinstance(v, (torch.Tensor, int, float))) for k, v in e.items()
        ),
        "has a state entry that holds neither tensors nor numbers",
    ),
    ("scheduler", check_schedule_state, None),
    ("best_metric", PERCENT, None),
    *((f"best{path}", *rule) for path, *rule in METRICS),
    ("best_epoch", COUNT, None),
    *((f"last{path}", *rule) for path, *rule in METRICS),
    ("top1_max", PERCENT, None),
    ("train_images", COUNT, None),
    ("train_seconds", SECONDS, None),
    ("stop_reason", TEXT, None),
    (
        "partial",
        _keys("order", "batches_done", "loss_sum", "seconds"),
        "does not say where the interrupted epoch stopped",
    ),
    (
        "partial.order",
        lambda o: isinstance(o, torch.Tensor) and o.dtype == torch.int64 and o.dim() == 1,
        "holds an image order that is not a list of indices",
    ),
    ("partial.batches_done", COUNT, None),
    ("partial.loss_sum", SECONDS, None),
    ("partial.seconds", SECONDS, None),
    *((f"rng{path}", *rule) for path, *rule in RNG),
    ("rng_ranks", _sized(1, MAX_RANKS), "is not a list of the processes' random streams"),
    *((f"rng_ranks.*{path}", *rule) for path, *rule in RNG),
    (
        "scaler",
        _keys("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker", among=True),
        "is not a loss-scaler state",
    ),
    (
        "scaler.*",
        lambda x: type(x) in (int, float) and math.isfinite(x) and x >= 0,
        "holds a loss-scaler value that is not a finite non-negative number",
    ),
    ("version", TEXT, None),
    ("preprocess", _keys("pipeline", "image_size", "task"), "is not a description of the evaluation preprocessing"),
    ("preprocess.image_size", Check(int, SMALLEST_IMAGE, LARGEST_IMAGE), "its preprocess's image_size "),
    (
        "preprocess.task",
        lambda task: task in ("single-label", "multi-label"),
        "names a task other than single-label or multi-label",
    ),
    ("preprocess.pipeline", lambda state: pipeline_from_state(state, largest=LARGEST_IMAGE), "has a pipeline that "),
]
OPTIONAL = {"best_metric", "best", "last", "partial", "rng_ranks", "scaler", "preprocess"}
#: The fields this tool reads, in the order they are checked.
FIELDS = tuple(dict.fromkeys(path.split(".")[0] for path, _, _ in FIELD_RULES))
#: What ``--evaluate`` reads, and what ``--resume`` reads.
EVALUATE_FIELDS = ("model", "config", "epoch", "classes")
RESUME_FIELDS = (*EVALUATE_FIELDS, "global_step", "optimizer", "scheduler", "rng")


def _entries(value: Any, parts: list[str]) -> list[Any]:
    """The entries of ``value`` a path's ``parts`` name."""
    for part in parts:
        if part == "*":
            value = [v for item in value for v in (item.values() if isinstance(item, dict) else item)]
        else:
            value = [item[part] for item in value if part in item]
    return value


def check_fields(checkpoint: dict[str, Any]) -> str | None:
    """The first problem among the fields this tool reads, as words that complete "checkpoint X
    cannot be used: ...", or None. Keys it does not know are left alone (a newer version's)."""
    for path, rule, problem in FIELD_RULES:
        key, *parts = path.split(".")
        if key not in checkpoint or (checkpoint[key] is None and key in OPTIONAL):
            continue
        try:
            for value in _entries([checkpoint[key]], parts):
                if problem is None or problem.endswith(" "):
                    try:
                        rule(value)
                    except ValueError as error:
                        raise ValueError(f"{problem or ''}{error}") from None
                elif not rule(value):
                    raise ValueError(problem)
        except (ValueError, TypeError) as error:
            return str(error) if str(error).startswith("its ") else f"its {key} {error}"
    return None


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


def network_problem(checkpoint: dict[str, Any]) -> str | None:
    """What in a checkpoint does not fit the network its config names, in words that complete
    "checkpoint X cannot be used: ...", or None; for a checkpoint whose fields passed
    ``check_fields``. The class list must be as long as fc8 (the last ``Linear``) is wide, and
    the stored preprocessing must make that network's inputs (``pipeline_from_state``).

    Everything is read from the checkpoint and from the network built on the meta device
    (shapes, no memory), before anything real is built: a crafted class list or input size
    cannot allocate a 100,000-way layer or gigabytes of images, nor crash the network."""
    config = TrainConfig.from_dict(checkpoint["config"])
    classes = len(checkpoint["classes"])
    with torch.device("meta"):
        reference = make_model(config.model, classes, lrn=config.lrn, fidelity=config.fidelity)
    fc8 = [name for name, module in reference.named_modules() if isinstance(module, nn.Linear)][-1]
    ours = reference.state_dict()
    for key in (f"{fc8}.weight", f"{fc8}.bias"):
        theirs, shape = checkpoint["model"].get(key), ours[key].shape
        if not isinstance(theirs, torch.Tensor) or theirs.shape == shape:
            continue  # absent or not a tensor: load_weights says so
        if key.endswith(".weight") and theirs.dim() and theirs.shape[0] != classes:
            return (
                f"its classes are {classes} names, but its {config.model}'s fc8 ({fc8}) has {theirs.shape[0]} outputs"
            )
        return (
            f"its model's {quoted(key)} is {tuple(theirs.shape)}, where a {config.model} of {classes} classes has "
            f"{tuple(shape)}"
        )
    saved = checkpoint.get("preprocess")
    if saved is not None:
        try:
            pipeline_from_state(saved["pipeline"], MODELS[config.model].input_size, saved["image_size"], LARGEST_IMAGE)
        except ValueError as error:
            return f"its preprocess has a pipeline that {error}"
    return None


# ---------------------------------------------------------------------------------------------
# Checks that need the model, the optimiser or the data


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
