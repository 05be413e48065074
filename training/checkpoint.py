"""Checkpoints: the atomic save, and loading with every field checked.

A checkpoint is untrusted input as much as a data file is: it may be damaged, come from another
tool or another version, or be crafted. ``torch.load(weights_only=True)`` already refuses
anything but tensors and plain values; ``load_checkpoint`` then checks every field the tool
reads (types, ranges, names, known optimisers) with the same rules as the command line, and the
trainer checks what only the model and the data can tell (``training.resume``:
``check_compatible``, ``check_optimizer_state``, ``check_partial_epoch``). Whatever is wrong becomes one sentence
naming the file and the field, never a traceback.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.core import DataOptions
from data.registry import DATASETS, TASKS
from data.transforms import pipeline_from_state
from network import MODELS, make_model
from settings.rules import Check
from training.config import TrainConfig
from training.schedule import check_schedule_state
from utils import UserError, quoted, short_reason, temp_file_beside

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
#: What ``GradScaler.state_dict`` holds.
SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
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
    ("scaler", _keys(*SCALER_KEYS, among=True), "is not a loss-scaler state"),
    (
        "scaler.*",
        lambda x: type(x) in (int, float) and math.isfinite(x) and x >= 0,
        "holds a loss-scaler value that is not a finite non-negative number",
    ),
    ("version", TEXT, None),
    ("preprocess", _keys("pipeline", "image_size", "task"), "is not a description of the evaluation preprocessing"),
    ("preprocess.image_size", Check(int, SMALLEST_IMAGE, LARGEST_IMAGE), "its preprocess's image_size "),
    ("preprocess.task", lambda task: task in TASKS, "names a task other than single-label or multi-label"),
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
