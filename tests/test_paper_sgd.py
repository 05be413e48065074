"""The paper's SGD under fp16 loss scaling: ``torch.amp.GradScaler`` hands ``PaperSGD`` its scale
and inf flag as device tensors, and the optimiser unscales and skips on the device, without the
per-step host sync GradScaler needs for other non-fused optimisers.

The update rule itself is tested in test_training.py, the release's bias groups in
test_fidelity.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.optim import BIAS_LR_FACTOR, PaperSGD, release_groups, set_lr

LR = 0.01
RATES = [LR, LR, LR / 10]  # a drop before the last step: the biases' fixed rate must stay


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in RATES]


def _optimizer(model: nn.Module) -> PaperSGD:
    return PaperSGD(release_groups(model.parameters(), LR), lr=LR, momentum=0.9, weight_decay=5e-4)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.float16):
        return F.cross_entropy(model(x), y)


def _velocities(optimizer: PaperSGD) -> list[torch.Tensor]:
    return [optimizer.state[p]["velocity"].clone() for g in optimizer.param_groups for p in g["params"]]


def _scaled_training(unscale_first: bool) -> tuple[nn.Module, PaperSGD, torch.amp.GradScaler]:
    model = _model()
    optimizer = _optimizer(model)
    scaler = torch.amp.GradScaler("cpu")
    for (x, y), lr in zip(_batches(), RATES, strict=True):
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(_loss(model, x, y)).backward()
        if unscale_first:
            scaler.unscale_(optimizer)  # e.g. to clip: the step must not divide a second time
        scaler.step(optimizer)
        scaler.update()
    return model, optimizer, scaler


def _by_hand_training() -> tuple[nn.Module, PaperSGD]:
    """The same steps with the scaling done here: the loss times 2^16 (GradScaler's initial
    scale), the gradients divided by it, and a plain ``PaperSGD.step``."""
    model = _model()
    optimizer = _optimizer(model)
    scale = 2.0**16
    for (x, y), lr in zip(_batches(), RATES, strict=True):
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        (_loss(model, x, y) * scale).backward()
        for p in model.parameters():
            p.grad.div_(scale)
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_-then-step"])
def test_a_scaled_step_gives_the_weights_of_unscaling_by_hand(unscale_first):
    model, optimizer, scaler = _scaled_training(unscale_first)
    reference, by_hand = _by_hand_training()
    assert scaler.get_scale() == 2.0**16  # no step overflowed: every step was taken
    # Bit for bit: both sides run the same forward and backward on the same weights, and differ
    # only in dividing the gradients by a power of two (here or in unscale_), which is exact in
    # binary floating point; the update is the same foreach arithmetic. A double division (by
    # the scale in unscale_ and again in the step) would move the weights 2^16 times less.
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), f"{name}: max difference {(p - q).abs().max().item():.3g}"
    assert all(torch.equal(a, b) for a, b in zip(_velocities(optimizer), _velocities(by_hand), strict=True))
    # The release's groups: the weights' rate followed set_lr, the biases' stayed fixed.
    assert [g["lr"] for g in optimizer.param_groups] == [LR / 10, BIAS_LR_FACTOR * LR]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_-then-step"])
def test_an_overflowed_step_leaves_weights_and_velocities_alone_and_backs_off(bad, unscale_first):
    model, optimizer, scaler = _scaled_training(unscale_first=False)
    weights = [p.detach().clone() for p in model.parameters()]
    velocities = _velocities(optimizer)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    next(model.parameters()).grad[0, 0, 0, 0] = bad  # one overflowed entry in one tensor
    if unscale_first:
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert all(torch.equal(v, w) for v, w in zip(_velocities(optimizer), velocities, strict=True))
    assert scaler.get_scale() == 2.0**15  # backed off by GradScaler's factor 0.5


def test_scaler_step_reads_nothing_back_to_the_host(monkeypatch):
    """GradScaler.step reads ``found_inf.item()`` before a non-fused optimiser's step (a host
    sync every fp16 step on a GPU); PaperSGD takes the flag as a tensor instead."""
    model = _model()
    optimizer = _optimizer(model)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batches()[0]
    scaler.scale(_loss(model, x, y)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    reads = []
    for name in ("item", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    scaler.step(optimizer)
    monkeypatch.undo()
    assert reads == []
    assert getattr(PaperSGD, "_step_supports_amp_scaling", False) is True
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # it did step
