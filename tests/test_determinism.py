"""What ``--deterministic`` and ``--amp fp16`` need of the models on a GPU, checked on the CPU.

``torch.use_deterministic_algorithms(True)`` makes a CUDA run raise at the first op that has
no deterministic kernel; its docstring lists them. Autograd records the same backward nodes on
every device, so a CPU training graph that holds none of the listed backward nodes runs on
CUDA too; the listed ops that throw in the forward (or only with some arguments) are caught by
recording the aten ops of a whole training step with a ``TorchDispatchMode``. Both checks are
first shown to find the ops they look for, so they cannot pass by looking at nothing.

fp16 has a largest value of 65504: squaring an activation of 256 overflows, so the
normalisations compute in fp32 whatever autocast says.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from network import FIDELITY, MODELS, PaperLRN, SameMapNorm, make_model
from training.fastpath import training_loss
from training.tasks import MultiLabel, Task


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


@dataclass(frozen=True)
class Throwing:
    """An op of the "will throw a RuntimeError" list of ``torch.use_deterministic_algorithms``."""

    documented: str  # its name in that list
    grad_fn: str | None  # the backward node autograd records for it; None where that node alone does not tell
    aten: str  # the aten op that throws (the backward's where differentiating throws)
    example: Callable[[], torch.Tensor]  # a tiny graph that uses it, which keeps the names above honest
    when: Callable[[dict[str, Any]], bool] = lambda arguments: True  # the arguments with which it throws


def max_unpooled(pool: Callable, unpool: Callable, x: torch.Tensor) -> torch.Tensor:
    return unpool(*pool(x, 2, return_indices=True), 2)


THROWING = [
    Throwing(
        "torch.nn.AvgPool3d", "AvgPool3DBackward0", "avg_pool3d_backward", lambda: F.avg_pool3d(leaf(1, 2, 4, 4, 4), 2)
    ),
    Throwing(
        "torch.nn.AdaptiveAvgPool2d",
        "AdaptiveAvgPool2DBackward0",
        "_adaptive_avg_pool2d_backward",
        lambda: F.adaptive_avg_pool2d(leaf(1, 2, 6, 6), 3),
    ),
    Throwing(
        "torch.nn.AdaptiveAvgPool3d",
        "AdaptiveAvgPool3DBackward0",
        "_adaptive_avg_pool3d_backward",
        lambda: F.adaptive_avg_pool3d(leaf(1, 2, 4, 4, 4), 2),
    ),
    Throwing(
        "torch.nn.AdaptiveMaxPool2d",
        "AdaptiveMaxPool2DBackward0",
        "adaptive_max_pool2d_backward",
        lambda: F.adaptive_max_pool2d(leaf(1, 2, 6, 6), 3),
    ),
    Throwing(
        "torch.nn.FractionalMaxPool2d",
        "FractionalMaxPool2DBackward0",
        "fractional_max_pool2d_backward",
        lambda: F.fractional_max_pool2d(leaf(1, 2, 6, 6), 2, output_size=3),
    ),
    Throwing(
        "torch.nn.FractionalMaxPool3d",
        "FractionalMaxPool3DBackward0",
        "fractional_max_pool3d_backward",
        lambda: F.fractional_max_pool3d(leaf(1, 2, 4, 4, 4), 2, output_size=2),
    ),
    # Unpooling throws in the forward; the 1-d one runs as the 2-d one.
    Throwing(
        "torch.nn.MaxUnpool1d",
        "MaxUnpool2DBackward0",
        "max_unpool2d",
        lambda: max_unpooled(F.max_pool1d, F.max_unpool1d, leaf(1, 2, 6)),
    ),
    Throwing(
        "torch.nn.MaxUnpool2d",
        "MaxUnpool2DBackward0",
        "max_unpool2d",
        lambda: max_unpooled(F.max_pool2d, F.max_unpool2d, leaf(1, 2, 6, 6)),
    ),
    Throwing(
        "torch.nn.MaxUnpool3d",
        "MaxUnpool3DBackward0",
        "max_unpool3d",
        lambda: max_unpooled(F.max_pool3d, F.max_unpool3d, leaf(1, 2, 4, 4, 4)),
    ),
    Throwing(
        "torch.nn.functional.interpolate",
        "UpsampleLinear1DBackward0",
        "upsample_linear1d_backward",
        lambda: F.interpolate(leaf(1, 2, 6), scale_factor=2, mode="linear"),
    ),
    Throwing(
        "torch.nn.functional.interpolate",
        "UpsampleBilinear2DBackward0",
        "upsample_bilinear2d_backward",
        lambda: F.interpolate(leaf(1, 2, 6, 6), scale_factor=2, mode="bilinear"),
    ),
    Throwing(
        "torch.nn.functional.interpolate",
        "UpsampleBicubic2DBackward0",
        "upsample_bicubic2d_backward",
        lambda: F.interpolate(leaf(1, 2, 6, 6), scale_factor=2, mode="bicubic"),
    ),
    Throwing(
        "torch.nn.functional.interpolate",
        "UpsampleTrilinear3DBackward0",
        "upsample_trilinear3d_backward",
        lambda: F.interpolate(leaf(1, 2, 4, 4, 4), scale_factor=2, mode="trilinear"),
    ),
    Throwing(
        "torch.nn.functional.interpolate",
        "UpsampleBilinear2DAaBackward0",
        "_upsample_bilinear2d_aa_backward",
        lambda: F.interpolate(leaf(1, 2, 6, 6), scale_factor=0.5, mode="bilinear", antialias=True),
    ),
    Throwing(
        "torch.nn.functional.interpolate",
        "UpsampleBicubic2DAaBackward0",
        "_upsample_bicubic2d_aa_backward",
        lambda: F.interpolate(leaf(1, 2, 6, 6), scale_factor=0.5, mode="bicubic", antialias=True),
    ),
    Throwing(
        "torch.nn.ReflectionPad1d",
        "ReflectionPad1DBackward0",
        "reflection_pad1d_backward",
        lambda: F.pad(leaf(1, 2, 6), (1, 1), mode="reflect"),
    ),
    Throwing(
        "torch.nn.ReflectionPad2d",
        "ReflectionPad2DBackward0",
        "reflection_pad2d_backward",
        lambda: F.pad(leaf(1, 2, 6, 6), (1, 1, 1, 1), mode="reflect"),
    ),
    Throwing(
        "torch.nn.ReflectionPad3d",
        "ReflectionPad3DBackward0",
        "reflection_pad3d_backward",
        lambda: F.pad(leaf(1, 2, 4, 4, 4), (1, 1, 1, 1, 1, 1), mode="reflect"),
    ),
    # The list says NLLLoss; the CUDA kernel that throws is the one for class maps (N, C, H, W)
    # with a reduction. Logits of shape (N, C) run nll_loss_forward, which does not.
    Throwing(
        "torch.nn.NLLLoss",
        "NllLoss2DBackward0",
        "nll_loss2d_forward",
        lambda: F.nll_loss(leaf(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long)),
        when=lambda arguments: arguments["reduction"] != 0,
    ),
    Throwing(
        "torch.nn.CTCLoss",
        "CtcLossBackward0",
        "_ctc_loss_backward",
        lambda: F.ctc_loss(leaf(6, 1, 3).log_softmax(2), torch.ones(1, 2, dtype=torch.long), [6], [2]),
    ),
    Throwing(
        "torch.nn.EmbeddingBag",
        None,
        "_embedding_bag_backward",  # mode 2 is "max"
        lambda: F.embedding_bag(torch.tensor([[0, 1]]), leaf(3, 2), mode="max"),
        when=lambda arguments: arguments["mode"] == 2,
    ),
    Throwing(
        "torch.Tensor.put_",
        "PutBackward0",
        "put_",
        lambda: leaf(4).clone().put_(torch.tensor([0]), torch.tensor([1.0])),
    ),
    Throwing("torch.histc", None, "histc", lambda: torch.histc(torch.rand(8), 4)),
    Throwing(
        "torch.bincount",
        None,
        "bincount",
        lambda: torch.bincount(torch.tensor([0, 1]), torch.rand(2)),
        when=lambda arguments: arguments.get("weights") is not None,
    ),
    Throwing(
        "torch.median",
        "MedianBackward1",
        "median",  # the overload with a dim returns indices
        lambda: leaf(2, 3).median(dim=1).values,
        when=lambda arguments: "dim" in arguments,
    ),
    Throwing(
        "torch.nn.functional.grid_sample",
        "GridSampler2DBackward0",
        "grid_sampler_2d_backward",
        lambda: F.grid_sample(leaf(1, 2, 6, 6), torch.zeros(1, 3, 3, 2), align_corners=False),
    ),
    Throwing(
        "torch.nn.functional.grid_sample",
        "GridSampler3DBackward0",
        "grid_sampler_3d_backward",
        lambda: F.grid_sample(leaf(1, 2, 4, 4, 4), torch.zeros(1, 2, 2, 2, 3), align_corners=False),
    ),
    Throwing(
        "torch.Tensor.scatter_reduce",
        None,
        "scatter_reduce",
        lambda: leaf(2, 3).scatter_reduce(1, torch.zeros(2, 1, dtype=torch.long), leaf(2, 1), "prod"),
        when=lambda arguments: arguments["reduce"] == "prod",
    ),
]

#: Listed ops that a float network cannot reach.
NOT_APPLICABLE = {"torch.Tensor.resize_": "throws for quantized tensors only"}

THROWING_NODES = {op.grad_fn for op in THROWING if op.grad_fn}


def documented_throwing() -> set[str]:
    """The names in the "will throw a RuntimeError" list of ``use_deterministic_algorithms``."""
    doc = torch.use_deterministic_algorithms.__doc__
    section = re.search(r"operations will throw a(.*?)In addition", doc, re.DOTALL).group(1)
    return set(re.findall(r"\* :(?:class|func):`([^`]+)`", section))


def graph_nodes(loss: torch.Tensor) -> set[str]:
    """The class names of the nodes of ``loss``'s autograd graph (``grad_fn`` and, recursively,
    its ``next_functions``)."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


class AtenOps(TorchDispatchMode):
    """Records the aten ops that run inside it, forward and backward: all of them in ``ran``, those
    that throw on CUDA under ``use_deterministic_algorithms`` (``THROWING``) in ``throwing``."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: set[str] = set()
        self.throwing: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ran.add(str(func))
        name = func.overloadpacket.__name__
        arguments = {**dict(zip((a.name for a in func._schema.arguments), args, strict=False)), **kwargs}
        self.throwing |= {f"{func} ({op.documented})" for op in THROWING if op.aten == name and op.when(arguments)}
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# The list and the two checks against PyTorch


def test_the_list_is_pytorchs():
    assert {op.documented for op in THROWING} | NOT_APPLICABLE.keys() == documented_throwing()


@pytest.mark.parametrize("op", THROWING, ids=lambda op: op.grad_fn or op.aten)
def test_both_checks_find_each_listed_op(op):
    with AtenOps() as ops:
        out = op.example()
        if out.requires_grad:
            out.sum().backward()
    assert any(found.startswith(f"aten.{op.aten}.") for found in ops.throwing), ops.ran
    if op.grad_fn:
        assert op.grad_fn in graph_nodes(op.example())


def test_both_checks_find_torchs_lrn_and_adaptive_pool():
    x = leaf(2, 8, 13, 13)
    lrn = F.local_response_norm(x, 5)
    pooled = nn.AdaptiveAvgPool2d((6, 6))(x)
    assert "AvgPool3DBackward0" in graph_nodes(lrn) & THROWING_NODES
    assert "AdaptiveAvgPool2DBackward0" in graph_nodes(pooled) & THROWING_NODES
    with AtenOps() as ops:
        (lrn.sum() + pooled.sum()).backward()
    assert ops.throwing == {
        "aten.avg_pool3d_backward.default (torch.nn.AvgPool3d)",
        "aten._adaptive_avg_pool2d_backward.default (torch.nn.AdaptiveAvgPool2d)",
    }


def test_cross_entropy_on_logits_is_the_deterministic_nll_loss():
    with AtenOps() as ops:
        F.cross_entropy(leaf(4, 10), torch.tensor([0, 1, 2, 3])).backward()
    assert "aten.nll_loss_forward.default" in ops.ran
    assert ops.throwing == set()


# ---------------------------------------------------------------------------------------------
# Every registered model, as training runs it

NUM_CLASSES = 10

#: (registered name, lrn, fidelity) of every model the flags can build.
CASES = {
    name + (f"-{fidelity}" if info.paper_features else "") + ("" if lrn else "-no-lrn"): (name, lrn, fidelity)
    for name, info in MODELS.items()
    for fidelity in (FIDELITY if info.paper_features else ["code"])
    for lrn in ((True, False) if info.paper_features else (True,))
}


@pytest.fixture(scope="module", params=list(CASES))
def model(request) -> tuple[nn.Module, int]:
    """A registered model in training mode, and its native input size."""
    name, lrn, fidelity = CASES[request.param]
    torch.manual_seed(0)
    return make_model(name, NUM_CLASSES, lrn=lrn, fidelity=fidelity).train(), MODELS[name].input_size


def both_losses(logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The single-label and the multi-label training losses of the same logits, added, so that one
    graph holds both."""
    classes, present = labels
    return Task().loss(logits, classes) + MultiLabel().loss(logits, present)


def training_graph(model: nn.Module, size: int, amp: str, channels_last: bool) -> torch.Tensor:
    """The loss of one training batch as ``training.fastpath`` computes it."""
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    present = torch.tensor([[1, -1, 0] * 3 + [1], [-1, 1, 1] * 3 + [0]])  # VOC style: 1 / -1 / 0
    return training_loss(model, both_losses, images, (torch.tensor([0, 7]), present), amp, channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_no_training_graph_holds_a_backward_that_throws_on_cuda(model, amp, channels_last):
    loss = training_graph(*model, amp, channels_last)
    nodes = graph_nodes(loss)
    assert "ConvolutionBackward0" in nodes and "NllLossBackward0" in nodes  # the walk saw the graph
    assert nodes & THROWING_NODES == set()


@pytest.mark.parametrize("amp, channels_last", [("off", False), ("bf16", True)], ids=["fp32", "bf16-channels-last"])
def test_no_op_that_throws_on_cuda_runs_in_a_training_step(model, amp, channels_last):
    with AtenOps() as ops:
        training_graph(*model, amp, channels_last).backward()
    model[0].zero_grad(set_to_none=True)
    assert "aten.convolution_backward.default" in ops.ran and "aten.nll_loss_forward.default" in ops.ran
    assert ops.throwing == set()


# ---------------------------------------------------------------------------------------------
# The normalisations in fp32 under autocast


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 1e-3), (torch.bfloat16, 2**-8)], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "norm",
    [PaperLRN(groups=2, summed=False), PaperLRN(groups=2, summed=True), PaperLRN(), SameMapNorm()],
    ids=["lrn-code", "lrn-text", "lrn-one-group", "cnorm2"],
)
def test_normalisations_under_autocast_give_their_fp32_result(norm, dtype, rtol, channels_last):
    generator = torch.Generator().manual_seed(0)
    # Activations of up to 1000 either way (LRN1 precedes the ReLU in the release), none so small
    # that its result is subnormal; in the dtype autocast's convolution hands over.
    sign = torch.randint(0, 2, (2, 96, 13, 13), generator=generator) * 2 - 1
    x = (sign * (1 + 999 * torch.rand(2, 96, 13, 13, generator=generator))).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = norm(x.float())
    with torch.autocast("cpu", dtype=dtype):
        got = norm(x)
    # One rounding of the fp32 result to the input's dtype: 2**-11 (fp16), 2**-9 (bf16).
    torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=0)
    assert got.dtype == dtype
