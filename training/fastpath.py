"""The fast path: mixed precision, channels-last, torch.compile, and the one optimisation step.

Defaults follow the device (``hardware.capabilities.Capabilities.amp`` and ``.channels_last``:
bf16 from compute capability 8.0, fp16 on 7.x, fp32 below and on CPUs without native bf16). fp16
gets a GradScaler. ``torch.compile`` is tried with
a warm-up step and drops back to eager with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from training.config import AMP_CHOICES
from utils import short_reason

logger = logging.getLogger(__name__)

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
assert set(AMP_DTYPES) == set(AMP_CHOICES)


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
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any,
        device: torch.device,
        amp: str = "off",
        channels_last: bool = False,
    ) -> None:
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
    try:
        with torch.random.fork_rng(devices=cuda_indices(model)):
            warm_up(compiled)
    except Exception as error:  # noqa: BLE001 - backends fail in many ways; eager always works
        logger.warning("torch.compile is unavailable here (%s); training eagerly", short_reason(error))
        return model
    finally:
        model.zero_grad(set_to_none=True)
    logger.info("model compiled with torch.compile")
    return compiled


def cuda_indices(model: nn.Module) -> list[int]:
    """The CUDA devices ``model``'s parameters live on (both of ``--split-gpus``, or ``cuda:1``
    whatever the current device is), whose random streams a warm-up must leave as they were."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under ``torch.compile`` and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def choose_kernels(deterministic: bool, hw: Any) -> None:
    """Bit-for-bit repeatable kernels (``--deterministic``: deterministic algorithms only, no
    cuDNN autotuning, and the cuBLAS workspace setting deterministic CUDA matmuls need), or on a
    GPU cuDNN's autotuner, which times its convolution algorithms once per shape and keeps the
    fastest (``hw``: ``hardware.capabilities.Capabilities``)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif hw.autotune:
        torch.backends.cudnn.benchmark = True


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, its convolution weights channels-last when asked: cuDNN's fastest
    convolutions on tensor cores read NHWC."""
    if not getattr(model, "places_itself", False):  # the split model's towers sit on their own devices
        model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict checkpoints hold: the plain model's, whatever wraps it (compile, DDP), and
    the grouped PaperAlexNet's keys for the model split over two GPUs."""
    model = unwrap(model)
    return getattr(model, "checkpoint_state_dict", model.state_dict)()
