"""The fast path (autocast, channels-last, torch.compile) against the plain fp32 eager path, the
CPU fallbacks of the CUDA-only pieces, and the benchmark's ``--quick`` mode."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.speed import (
    cudnn_conv_setting,
    datasheet_peak,
    fp32_conv_precision,
    matmul_precision,
    measured_peak,
    path_precisions,
    preparation_label,
)
from hardware.capabilities import Capabilities
from network import CifarAlexNet, TorchAlexNet
from training.fastpath import TrainStep, autocast, compile_model, model_input, prepare_model
from training.loop import evaluate

# Documented bound: over the first steps of training, a bf16-autocast loss stays within 2 % of
# the fp32 loss (bf16 keeps 8 significant bits, ~0.4 % per rounding; the errors average out over
# the sums of a convolution). fp16 keeps 11 bits: 0.5 %.
BF16_REL = 0.02
FP16_REL = 0.005


def _batches(steps: int, n: int = 8, size: int = 32, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(steps)
    ]


def _losses(amp: str, channels_last: bool, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    model = prepare_model(CifarAlexNet(10, dropout=0.0), torch.device("cpu"), channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = TrainStep(model, optimizer, F.cross_entropy, torch.device("cpu"), amp=amp, channels_last=channels_last)
    return [step(x, y).item() for x, y in _batches(steps)]


def test_channels_last_trains_like_contiguous():
    plain, nhwc = _losses("off", False), _losses("off", True)
    assert nhwc == pytest.approx(plain, rel=1e-4)


def test_bf16_loss_stays_within_the_documented_bound_of_fp32():
    fp32, bf16 = _losses("off", False), _losses("bf16", False)
    assert bf16 == pytest.approx(fp32, rel=BF16_REL)
    assert bf16 != fp32  # autocast really ran in bf16


def test_fp16_uses_a_grad_scaler_and_stays_within_its_bound():
    torch.manual_seed(0)
    model = CifarAlexNet(10, dropout=0.0)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.01), F.cross_entropy, torch.device("cpu"), "fp16")
    assert step.scaler is not None
    assert TrainStep(model, step.optimizer, F.cross_entropy, torch.device("cpu"), "bf16").scaler is None
    assert _losses("fp16", False) == pytest.approx(_losses("off", False), rel=FP16_REL)


def test_autocast_off_is_plain_fp32():
    model = CifarAlexNet(10)
    with autocast(torch.device("cpu"), "off"):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16


def test_model_input_layout():
    x = torch.randn(2, 3, 8, 8)
    assert model_input(x, True).is_contiguous(memory_format=torch.channels_last)
    assert model_input(x, False) is x


def test_evaluation_metrics_agree_between_fp32_and_bf16():
    from data.core import Split
    from data.loaders import BatchLoader
    from data.transforms import CifarPipeline

    g = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(64) % 10)
    loader = BatchLoader(split, 32, CifarPipeline(torch.full((3,), 0.5), torch.full((3,), 0.25), 32), train=False)
    torch.manual_seed(0)
    model = CifarAlexNet(10)
    fp32 = evaluate(model, loader, 10)
    bf16 = evaluate(model, loader, 10, amp="bf16", channels_last=True)
    assert bf16.count == fp32.count == 64
    assert bf16.loss == pytest.approx(fp32.loss, rel=BF16_REL)


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    model = CifarAlexNet(10)

    def broken(module, **kwargs):
        def call(*args):
            raise RuntimeError("Compiler: cc not found")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING):
        out = compile_model(model, lambda m: m(torch.randn(2, 3, 32, 32)))
    assert out is model
    assert "torch.compile is unavailable here (Compiler: cc not found); training eagerly" in caplog.text


def test_compile_warm_up_leaves_random_streams_and_gradients_alone(monkeypatch):
    # An identity "compiler" isolates compile_model's own bookkeeping from inductor's run time.
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    model = CifarAlexNet(10)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)

    def warm_up(m):
        m.train()
        m(torch.randn(4, 3, 32, 32)).sum().backward()  # draws dropout masks and randn

    assert compile_model(model, warm_up) is model
    assert torch.equal(torch.rand(3), expected)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_model_gives_the_eager_outputs():
    torch.manual_seed(0)
    model = CifarAlexNet(10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = compile_model(model, lambda m: m(x))
        assert compiled is not model  # the real compiler ran
        torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-5)


def test_checkpoint_of_a_compiled_model_has_plain_keys():
    from training.fastpath import unwrap

    model = TorchAlexNet(10)
    wrapped = torch.compile(model)  # wrapping alone compiles nothing
    assert unwrap(wrapped) is model
    assert list(unwrap(wrapped).state_dict()) == list(copy.deepcopy(model).state_dict())


def test_benchmark_quick_writes_every_key(tmp_path, repo_root):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--quick", "--json", str(out)],
        check=False,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    for model in ("CifarAlexNet", "TorchAlexNet", "PaperAlexNet"):
        for part in ("pipeline", "train"):
            for key in ("ours_img_s", "usual_img_s"):
                assert figures[f"{model}.{part}.{key}"] > 0
            ratio = figures[f"{model}.{part}.ratio"]
            assert ratio == pytest.approx(
                figures[f"{model}.{part}.ours_img_s"] / figures[f"{model}.{part}.usual_img_s"]
            )
        assert figures[f"{model}.train.ours_mfu"] > 0  # a ratio of two timings: no bound asserted
    assert figures["torch"] == torch.__version__
    assert figures["hardware"]
    # On this CPU: the usual loop computes in fp32, ours in its autocast dtype; both peaks measured.
    ours = "bf16" if Capabilities.of("cpu").amp == "bf16" else "fp32"
    assert {path: peak["precision"] for path, peak in figures["peaks"].items()} == {"usual": "fp32", "ours": ours}
    for peak in figures["peaks"].values():
        assert peak["flops"] > 0 and peak["source"].startswith(f"measured: fastest of 5 2048x2048 {peak['precision']}")
    assert "datasheet_peak" not in figures


# --- The benchmark's peaks: which precision, which card, what is measured --------------------


@pytest.mark.parametrize(
    ("device_type", "capability", "cudnn_conv", "expected"),
    [
        ("cuda", (8, 0), "tf32", "tf32"),  # A100: cuDNN's default lets fp32 convolutions use TF32
        ("cuda", (9, 0), "tf32", "tf32"),  # H100
        ("cuda", (12, 0), "tf32", "tf32"),  # Blackwell
        ("cuda", (7, 0), "tf32", "fp32"),  # V100: no TF32 tensor cores
        ("cuda", (8, 6), "ieee", "fp32"),  # TF32 switched off
        ("cpu", None, "tf32", "fp32"),
    ],
)
def test_the_usual_loops_peak_is_in_the_precision_its_convolutions_use(device_type, capability, cudnn_conv, expected):
    fp32 = fp32_conv_precision(device_type, capability, cudnn_conv)
    assert fp32 == expected
    assert path_precisions("off", fp32) == {"usual": expected, "ours": expected}
    assert path_precisions("bf16", fp32) == {"usual": expected, "ours": "bf16"}


@pytest.fixture
def cudnn_settings():
    """cuDNN's fp32 precision settings (new API) put back after the test."""
    backends = torch.backends
    modules = (backends.cudnn.conv, backends.cudnn.rnn, backends.cudnn, backends)
    saved = [module.fp32_precision for module in modules]
    yield
    for module, value in zip(modules, saved, strict=True):
        module.fp32_precision = value


def test_cudnn_convolution_setting_resolves_as_aten_does(cudnn_settings):
    backends = torch.backends
    assert cudnn_conv_setting() == "tf32"  # PyTorch's default for cuDNN convolutions
    backends.cudnn.conv.fp32_precision = "ieee"
    assert cudnn_conv_setting() == "ieee"
    backends.cudnn.conv.fp32_precision = "none"  # defers to cuDNN's, then the global setting
    backends.cudnn.fp32_precision = "tf32"
    assert cudnn_conv_setting() == "tf32"
    backends.cudnn.fp32_precision = "none"
    assert cudnn_conv_setting() == "ieee"
    backends.fp32_precision = "tf32"
    assert cudnn_conv_setting() == "tf32"


@pytest.mark.parametrize(
    ("name", "capability", "precision", "flops"),
    [
        ("NVIDIA H100 80GB HBM3", (9, 0), "bf16", 989e12),  # the SXM5 card's name
        ("NVIDIA H100 SXM5 80GB", (9, 0), "bf16", 989e12),
        ("NVIDIA H100 PCIe", (9, 0), "bf16", None),  # 756 TFLOP/s: not the SXM's datasheet
        ("NVIDIA H100 NVL", (9, 0), "bf16", None),
        ("NVIDIA H100 80GB HBM3", (8, 0), "bf16", None),  # a name and capability that disagree
        ("NVIDIA H100 80GB HBM3", (9, 0), "tf32", None),  # no datasheet value kept for TF32
        ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16", None),
        ("NVIDIA H200", (9, 0), "bf16", None),
        ("", None, "bf16", None),  # a CPU
    ],
)
def test_a_datasheet_peak_only_for_a_card_identified_by_name_and_capability(name, capability, precision, flops):
    peak = datasheet_peak(name, capability, precision)
    if flops is None:
        assert peak is None
    else:
        assert (peak.flops, peak.precision, peak.source) == (flops, precision, "datasheet: H100 SXM dense bf16")


def test_tf32_peak_measurement_restores_the_matmul_settings():
    backends = torch.backends
    before = (
        torch.get_float32_matmul_precision(),
        backends.cuda.matmul.fp32_precision,
        backends.mkldnn.matmul.fp32_precision,
    )
    with pytest.raises(RuntimeError, match="inside"), matmul_precision("tf32"):
        assert backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "high"  # legacy and new flags agree
        raise RuntimeError("inside")
    after = (
        torch.get_float32_matmul_precision(),
        backends.cuda.matmul.fp32_precision,
        backends.mkldnn.matmul.fp32_precision,
    )
    assert after == before
    with matmul_precision("fp32"):
        assert backends.cuda.matmul.fp32_precision == "ieee"


def test_measured_peak_names_its_precision():
    peak = measured_peak(torch.device("cpu"), "fp32")
    assert peak.precision == "fp32" and peak.flops > 0
    assert peak.source == "measured: fastest of 5 2048x2048 fp32 matmuls in this run"


def test_preparation_is_labelled_as_cpu_work():
    assert preparation_label(2) == "CPU, 2 worker processes"
    assert preparation_label(1) == "CPU, 1 worker process"
