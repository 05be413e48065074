"""Initial weights for a new run (``--weights``) and frozen features (``--freeze-features``).

A run started with ``--weights PATH`` is a new run (new optimiser, new counters, its own run
folder) whose model starts from the weights in PATH instead of its random initialisation:

- a torchvision AlexNet state dict, such as ``alexnet-owt-7be5be79.pth``, the file
  ``torchvision.models.AlexNet_Weights.IMAGENET1K_V1`` downloads; ``TorchAlexNet`` has
  torchvision's module names, so it maps key for key;
- or a checkpoint of this tool (``last.pt`` / ``best.pt``), from any data set, of the same network.

When the class count differs (ImageNet's 1000 against CIFAR-10's 10, say), or a checkpoint's
classes are other classes, fc8 (the last ``Linear``) keeps the model's own initialisation and
the log says so; every other tensor must match in name and shape. A file whose name carries a
hash as torchvision's do (``<name>-<hex>.pth``) must have a sha256 that starts with that hex,
which is the rule ``torch.hub`` applies to its downloads.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from network import TorchAlexNet
from training.checkpoint import EVALUATE_FIELDS, check_fields, network_problem, not_regular
from utils import UserError, quoted, short_reason

logger = logging.getLogger(__name__)

#: ``<name>-<first 8 or more hex digits of the file's sha256>.pth``, torchvision's file names.
HASHED_NAME = re.compile(r".+-([0-9a-f]{8,64})\.pth?")
HASH_CHUNK = 1 << 20


class WeightsError(UserError):
    """A ``--weights`` file that is missing, damaged, foreign or does not fit the model."""


@dataclass(frozen=True)
class InitialWeights:
    """What ``load_initial_weights`` put into the model: where the weights came from (in words)
    and the tensors it left at the model's own initialisation (fc8's, or none)."""

    source: str
    reinitialised: tuple[str, ...]


def hash_problem(path: Path) -> str | None:
    """Why ``path``'s content does not match the hash its name carries, or None (also when the
    name carries none)."""
    match = HASHED_NAME.fullmatch(path.name)
    if match is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    expected, actual = match.group(1), digest.hexdigest()
    if actual.startswith(expected):
        return None
    return f"its sha256 starts with {actual[: len(expected)]}, not with the {expected} its name says"


def read_weights(path: Path) -> dict:
    """The object in ``path``, loaded with ``weights_only=True`` (tensors and plain values only:
    the file may come from anywhere) after the hash check; every failure is a ``WeightsError``."""
    kind = not_regular(path)
    if kind is not None:
        where = " in it" if kind == "a folder" else ""
        raise WeightsError(
            f"weights file {path} is {kind}; pass the path of a file{where}: torchvision's "
            "alexnet-owt-*.pth or a checkpoint of this tool (last.pt, best.pt)."
        )
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; pass torchvision's alexnet-owt-*.pth or a checkpoint of this tool."
        )
    problem = hash_problem(path)
    if problem:
        raise WeightsError(
            f"weights file {path} is damaged or not the file its name says ({problem}); download it again."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (truncated zip, foreign pickle, refused global: all "unusable")
        raise WeightsError(
            f"weights file {path} cannot be loaded ({short_reason(error)}); pass torchvision's "
            "alexnet-owt-*.pth or a checkpoint of this tool."
        ) from None
    if not isinstance(loaded, dict):
        raise WeightsError(
            f"weights file {path} holds a {type(loaded).__name__}, not a state dict or a checkpoint; "
            "pass torchvision's alexnet-owt-*.pth or a checkpoint of this tool."
        )
    return loaded


def last_linear(model: nn.Module) -> str:
    """The name of the model's last ``Linear`` (fc8: ``classifier.6`` in every network here)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def first_mismatch(state: Mapping[str, object], model: nn.Module, fc8: str) -> str | None:
    """The first tensor of ``model`` that ``state`` lacks or holds in another shape (fc8 may
    differ in its class count), else the first key ``state`` has beyond the model's, else the
    first tensor that is not floating-point or not finite; in words."""
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    return _shape_problem(state, shapes, fc8) or _value_problem(state)


def _shape_problem(state: Mapping[str, object], shapes: Mapping[str, torch.Size], fc8: str) -> str | None:
    """Every tensor of the model in ``state`` in the model's shape, but fc8's count of classes:
    fc8's weight may have any number of rows, and its bias exactly one entry per row."""
    rows = state.get(f"{fc8}.weight")
    rows = rows.shape[0] if isinstance(rows, torch.Tensor) and rows.dim() == 2 else None
    for key, shape in shapes.items():
        theirs = state.get(key)
        if not isinstance(theirs, torch.Tensor):
            return f"it has no tensor {quoted(key)}"
        if key == f"{fc8}.bias" and rows is not None:
            if theirs.shape != (rows,):
                return (
                    f"its {quoted(key)} is {tuple(theirs.shape)}, where its {quoted(f'{fc8}.weight')} has {rows} rows"
                )
        elif (theirs.shape[1:] != shape[1:]) if key.startswith(fc8 + ".") else (theirs.shape != shape):
            return f"its {quoted(key)} is {tuple(theirs.shape)}, where the model's is {tuple(shape)}"
    extra = next((key for key in state if key not in shapes), None)
    return None if extra is None else f"it has {quoted(str(extra))}, which the model has not"


def _value_problem(state: Mapping[str, object]) -> str | None:
    for key, tensor in state.items():
        assert isinstance(tensor, torch.Tensor)  # _shape_problem found every key a tensor
        if not tensor.dtype.is_floating_point:
            return f"its {quoted(key)} holds {tensor.dtype}, not floating-point numbers"
        if not bool(torch.isfinite(tensor).all()):
            return f"its {quoted(key)} holds NaN or infinite values"
    return None


def load_initial_weights(
    path: Path, model: nn.Module, model_name: str, classes: Sequence[str], paper_train: bool = False
) -> InitialWeights:
    """Put the weights of ``path`` (torchvision's AlexNet state dict or one of this tool's
    checkpoints) into ``model``, the freshly initialised ``network.MODELS[model_name]`` of a run
    on ``classes``; fc8 keeps its initialisation when the class count (or a checkpoint's class
    list) differs. One sentence (``WeightsError``) for a file that does not fit."""
    path = Path(path)
    loaded = read_weights(path)
    fc8 = last_linear(model)
    if "model" in loaded and "config" in loaded:  # one of this tool's checkpoints
        state, their_classes, source = _checkpoint_state(loaded, path, model_name)
    else:
        state, their_classes, source = _torchvision_state(loaded, path, model, paper_train), None, "torchvision"
    problem = first_mismatch(state, model, fc8)
    if problem:
        raise WeightsError(f"weights file {path} does not fit {model_name}: {problem}; pass weights of this network.")
    fc8_keys = (f"{fc8}.weight", f"{fc8}.bias")
    count = state[fc8_keys[0]].shape[0]
    other = count != len(classes) or (their_classes is not None and list(their_classes) != list(classes))
    keep = {key: value for key, value in state.items() if not (other and key in fc8_keys)}
    model.load_state_dict(keep, strict=not other)
    reinitialised = tuple(key for key in fc8_keys if key not in keep and key in model.state_dict())
    logger.info("initial weights: %s (%s)", path, source)
    if reinitialised:
        why = (
            f"the weights were trained on {count} classes, this run has {len(classes)}"
            if count != len(classes)
            else f"the weights' {count} classes are not this run's"
        )
        logger.info("fc8 (%s) re-initialised: %s", fc8, why)
    return InitialWeights(source, reinitialised)


def _checkpoint_state(checkpoint: dict, path: Path, model_name: str) -> tuple[dict, list[str], str]:
    """A checkpoint's state dict, class names and description, after the checks
    ``training.checkpoint.load_checkpoint`` applies (the file is already loaded)."""
    missing = [key for key in EVALUATE_FIELDS if key not in checkpoint]
    problem = f"it lacks {', '.join(missing)}" if missing else check_fields(checkpoint) or network_problem(checkpoint)
    if problem:
        raise WeightsError(
            f"checkpoint {path} cannot be used as --weights: {problem}; it is damaged or was not "
            "written by this tool, so use another one (best.pt or last.pt of the run)."
        )
    theirs = str(checkpoint["config"].get("model"))
    if theirs != model_name:
        raise WeightsError(
            f"checkpoint {path} holds a {quoted(theirs)[1:-1]}, but this run builds a {model_name}; "
            "set -c / -pm as that run did, or pass a checkpoint of this network."
        )
    config = checkpoint["config"]
    source = f"checkpoint of run {config.get('run_name')} on {config.get('dataset')}, epoch {checkpoint['epoch']}"
    return checkpoint["model"], checkpoint["classes"], source


def _torchvision_state(state: dict, path: Path, model: nn.Module, paper_train: bool) -> dict:
    """A torchvision state dict, refused where it cannot go: into another network than
    ``TorchAlexNet``, or in front of the paper's pipeline, whose inputs (0-255 pixels minus the
    mean image) are about 55 times the normalised ones these weights were trained on."""
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise WeightsError(
            f"weights file {path} is neither a state dict of named tensors nor a checkpoint of this "
            "tool; pass torchvision's alexnet-owt-*.pth or a last.pt / best.pt."
        )
    with torch.device("meta"):  # only the names and shapes: nothing to initialise
        reference = TorchAlexNet()
    shapes = {key: tensor.shape for key, tensor in reference.state_dict().items()}
    torchvision = _shape_problem(state, shapes, last_linear(reference)) is None
    if not isinstance(model, TorchAlexNet) and torchvision:
        raise WeightsError(
            f"weights file {path} holds torchvision's AlexNet, which only TorchAlexNet takes; drop -c and -pm."
        )
    if paper_train and torchvision:
        raise WeightsError(
            f"weights file {path} holds torchvision's weights, trained on mean/std-normalised inputs, "
            "but -pt feeds 0-255 pixels minus the mean image; drop -pt and choose the optimiser "
            "with --optimizer / --lr."
        )
    return state


def freeze_features(model: nn.Module) -> tuple[int, int]:
    """``--freeze-features``: stop gradients to every parameter under a ``features`` module
    (the convolutions, in the grouped and the split networks alike); returns the number of
    parameters that still train and the total."""
    total = trainable = 0
    for name, parameter in model.named_parameters():
        if "features" in name.split("."):
            parameter.requires_grad_(False)
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total
