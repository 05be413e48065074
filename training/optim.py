"""Optimisers: the paper's SGD update rule, PyTorch's SGD with momentum, and Adam.

A parameter group with ``fixed_lr`` keeps its learning rate when the schedule sets the weights'
rate (``set_lr``): the biases of the 2012 release (``--fidelity code``), whose rate 0.02 was never
lowered.
"""

from __future__ import annotations

from typing import Any

import torch

from network import PaperAlexNet, SplitPaperAlexNet, join_towers
from training.config import TrainConfig
from training.weights import freeze_features


class PaperSGD(torch.optim.Optimizer):
    """Stochastic gradient descent with the paper's own update rule (§5)::

        v <- momentum * v - weight_decay * lr * w - lr * dL/dw
        w <- w + v

    ``torch.optim.SGD(momentum, weight_decay)`` keeps ``v`` in gradient units and multiplies by
    the current learning rate at every step, so a learning-rate drop shrinks the whole velocity
    at once. Here ``v`` already holds each past step's learning rate, so after a drop the old
    velocity decays away over the next steps, as in the original training. While the learning
    rate is constant the two rules give the same weights. Weight decay applies to every
    parameter of a group, as the formula is written; ``release_groups`` gives the biases their
    own group as the 2012 code did.
    """

    # GradScaler hands over its scale and inf flag as device tensors (``grad_scale``, ``found_inf``)
    # instead of unscaling and reading the flag on the host before every step.
    _step_supports_amp_scaling = True

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter with a gradient. Under a ``torch.amp.GradScaler`` the
        gradients are divided by its ``grad_scale`` here (``None`` after ``scaler.unscale_``), and
        a nonzero ``found_inf`` leaves parameters and velocities as they were, decided on the
        device so that no step waits for it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            # One batch of foreach kernels per device: the split model's towers sit on two GPUs,
            # and the scaler's 0-dim tensors live on one of them.
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.device, []).append(p)
            for device, params in by_device.items():
                scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
                inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
                self._update(params, group, scale, inf)
        return loss

    def _update(
        self,
        params: list[torch.Tensor],
        group: dict[str, Any],
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> None:
        velocities = []
        for p in params:
            state = self.state[p]
            if "velocity" not in state:
                state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            velocities.append(state["velocity"])
        grads = [p.grad for p in params]
        if grad_scale is not None:
            grads = torch._foreach_div(grads, grad_scale)
        step = torch._foreach_add(grads, params, alpha=group["weight_decay"])  # dL/dw + wd * w
        if found_inf is None:
            torch._foreach_mul_(velocities, group["momentum"])
            torch._foreach_add_(velocities, step, alpha=-group["lr"])
            torch._foreach_add_(params, velocities)
            return
        # The same arithmetic out of place, kept only where no gradient overflowed: a skipped
        # step leaves the weights bit for bit (no 0/1 mask multiplies the update: 0 * inf is NaN).
        new_velocities = torch._foreach_mul(velocities, group["momentum"])
        torch._foreach_add_(new_velocities, step, alpha=-group["lr"])
        new_params = torch._foreach_add(params, new_velocities)
        skip = found_inf != 0
        for old, new in zip(velocities + params, new_velocities + new_params, strict=False):
            old.copy_(torch.where(skip, old, new))


#: The biases' rate in the 2012 release relative to the weights' initial one: epsB 0.02 against
#: epsW 0.01 (layer-params-145.cfg:19 etc.; the log at P:165-181 lowers epsW only).
BIAS_LR_FACTOR = 2.0


def release_groups(params: Any, lr: float) -> list[dict[str, Any]]:
    """The 2012 release's parameter groups for ``PaperSGD``: the weights, with the update rule
    as given; and the biases (the 1-D parameters: AlexNet has no others) without weight decay
    (wc applies to weights only, src/layer.cu:565) at ``BIAS_LR_FACTOR`` times the initial rate,
    which the schedule leaves alone (``fixed_lr``). Both keep the momentum (momB = momW = 0.9)."""
    params = list(params)
    weights = [p for p in params if p.ndim > 1]
    biases = [p for p in params if p.ndim <= 1]
    return [{"params": weights}, {"params": biases, "lr": BIAS_LR_FACTOR * lr, "weight_decay": 0.0, "fixed_lr": True}]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group but those with a fixed rate."""
    for group in optimizer.param_groups:
        if not group.get("fixed_lr", False):
            group["lr"] = lr


def build_optimizer(params: Any, config: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The paper's SGD, PyTorch's SGD with momentum, or Adam, as the config says. The paper's
    SGD under ``--fidelity code`` has the release's bias groups (``release_groups``). Parameters
    that do not train (``--freeze-features``) stay out, so weight decay and momentum cannot
    move them either. ``fused`` (``Capabilities.fused_optimizer``: on GPUs) gives Adam its fused
    kernel; how an optimiser runs is the machine's choice, never the run's, so a checkpoint's
    flags are replaced by this one's on resume (``training.resume.with_machine_flags``)."""
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "sgd" and config.paper_update:
        groups = release_groups(params, config.lr) if config.fidelity == "code" else params
        return PaperSGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def grouped_optimizer_state(saved: dict[str, Any], model: PaperAlexNet, config: TrainConfig) -> dict[str, Any]:
    """The optimiser state of a ``--split-gpus`` run (``saved``) as the optimiser of the grouped
    ``model`` holds it: each parameter's tensors (momentum, Adam's moments) joined from the towers'
    halves as the weights are (``network.join_towers``), its step count the first tower's. A state
    that does not fit the split model is returned as it is, for the resume to refuse."""
    split = SplitPaperAlexNet(model, ("meta", "meta"))  # names, shapes and order only: no memory
    split_names, _ = _optimizer_numbering(split, config)
    grouped_names, groups = _optimizer_numbering(split.to_grouped(), config)
    numbered = sum(len(group["params"]) for group in saved["param_groups"])
    if numbered != len(split_names) or len(groups) != len(saved["param_groups"]):
        return saved
    index = {name: i for i, name in enumerate(split_names)}
    state = {}
    for i, name in enumerate(grouped_names):
        first = saved["state"].get(index[f"towers.0.{name}"])
        if first is None:  # no step taken yet
            continue
        second = saved["state"].get(index.get(f"towers.1.{name}"), {})  # fc8's bias lives on the first tower only
        state[i] = {
            key: join_towers({name: value}, {name: second[key]})[name]
            if isinstance(value, torch.Tensor) and value.ndim and key in second
            else value
            for key, value in first.items()
        }
    # The groups keep their settings (rates, decay) and take the grouped model's numbering.
    param_groups = [{**old, "params": new["params"]} for old, new in zip(saved["param_groups"], groups, strict=False)]
    return {"state": state, "param_groups": param_groups}


def _optimizer_numbering(model: torch.nn.Module, config: TrainConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """The names of ``model``'s trained parameters in the order its optimiser's state_dict numbers
    them, and that state_dict's parameter groups (the optimiser built as the trainer builds it)."""
    if config.freeze_features:
        freeze_features(model)
    names = {id(p): name for name, p in model.named_parameters()}
    optimizer = build_optimizer(model.parameters(), config)
    numbered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return numbered, optimizer.state_dict()["param_groups"]
