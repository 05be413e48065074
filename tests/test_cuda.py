"""What only a real GPU can show (``pytest -m cuda``; skipped without one, run by
``tools/gpu_check.sh``). Everything else about the CUDA branches runs on the CPU through
``Capabilities.stand_in`` (test_hardware.py); these check that the stand-in tells the truth and
that CUDA's own kernels keep the promises the CPU tests assume."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from fakedata import write_photos

from data.core import DataOptions
from data.registry import load_dataset
from data.shards import decode_jpegs, shard_split
from hardware.capabilities import Capabilities
from network import CifarAlexNet, PaperLRN, SameMapNorm
from trainer import Trainer
from training.config import TrainConfig
from training.fastpath import compile_model
from training.optim import PaperSGD

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_stand_in_decides_as_the_real_gpu_does():
    real = Capabilities.of("cuda")
    stand_in = Capabilities.stand_in(real.capability, real.cuda_devices)
    policy = ("amp", "channels_last", "fused_optimizer", "decode_in_process", "augment_in_workers")
    assert {p: getattr(real, p) for p in policy} == {p: getattr(stand_in, p) for p in policy}
    assert (real.pin_memory, real.backend, real.autotune) == (True, "nccl", True)


DETERMINISTIC = textwrap.dedent("""
    import os, sys, torch
    import torch.nn.functional as F
    sys.path.insert(0, sys.argv[1])
    from network import MODELS, make_model
    torch.use_deterministic_algorithms(True)
    for name, info in MODELS.items():
        for options in ({}, {"fidelity": "text"}, {"lrn": False}) if info.paper_features else ({},):
            grads = []
            for _ in range(2):
                torch.manual_seed(0)
                model = make_model(name, 10, **options).cuda().to(memory_format=torch.channels_last)
                x = torch.randn(4, 3, info.input_size, info.input_size, device="cuda") * 60
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), torch.arange(4, device="cuda"))
                loss.backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            assert all(torch.equal(a, b) for a, b in zip(*grads)), (name, options)
    print("ok")
""")


def test_every_model_trains_under_deterministic_algorithms():
    # A process of its own: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it first starts.
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    result = subprocess.run(
        [sys.executable, "-c", DETERMINISTIC, ROOT], capture_output=True, text=True, env=env, check=False, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("layer", [PaperLRN(groups=2, summed=False), PaperLRN(groups=2), SameMapNorm()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_normalisation_under_autocast_equals_fp32(layer, dtype):
    # 0-255 inputs give conv1 outputs of hundreds: their squares overflow fp16 (max 65504).
    layer = layer.cuda()
    x = (torch.rand(8, 96, 27, 27, device="cuda") * 2 - 1) * 1000
    reference = layer(x)
    with torch.autocast("cuda", dtype=dtype):
        got = layer(x.to(dtype)).float()
    assert torch.isfinite(got).all()
    rel = ((got - reference).abs() / reference.abs().clamp_min(1e-3)).max().item()
    assert rel < (1e-3 if dtype == torch.float16 else 1e-2), rel  # the input's own rounding: 2^-11 / 2^-8


def test_the_papers_sgd_under_loss_scaling_never_waits_for_the_gpu():
    model = CifarAlexNet(10).cuda()
    optimizer = PaperSGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.arange(8, device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(optimizer)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        optimizer.zero_grad(set_to_none=True)


def test_nvjpeg_decodes_the_cache_as_the_cpu_does(tmp_path):
    photos = write_photos(tmp_path / "photos", 12)
    store = shard_split(photos, torch.arange(12), tmp_path / "cache", "train", 64, workers=1).images
    data = store.encoded(list(range(12)))
    on_gpu = torch.stack(decode_jpegs(data, "cuda")).cpu().float()
    on_cpu = torch.stack(decode_jpegs(data)).float()
    diff = (on_gpu - on_cpu).abs()
    # Decoders may differ in their inverse DCT by a grey level here and there, never in the picture.
    assert diff.mean().item() <= 1.0, (diff.mean().item(), diff.max().item())


def test_a_gpu_checkpoint_loads_where_there_is_no_gpu(tmp_path):
    shapes = load_dataset("Shapes", DataOptions(shapes_train=64, shapes_test=32))
    config = TrainConfig(model="CifarAlexNet", batch_size=32, n_epoch=1, output_dir=str(tmp_path))
    summary = Trainer(config, CifarAlexNet(10), shapes, torch.device("cuda")).fit()
    last = tmp_path / "checkpoints" / "Shapes" / summary["run_name"] / "last.pt"
    script = (
        "import sys, torch; c = torch.load(sys.argv[1], weights_only=True); "
        "print(all(t.device.type == 'cpu' for t in c['model'].values()))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", script, str(last)], capture_output=True, text=True, env=env, check=False, timeout=300
    )
    assert result.stdout.strip() == "True", result.stderr[-2000:]


def test_the_compile_warm_up_leaves_the_models_gpu_stream_alone():
    model = CifarAlexNet(10).cuda()
    before = torch.cuda.get_rng_state(0)

    def warm_up(m):
        F.cross_entropy(m(torch.randn(4, 3, 32, 32, device="cuda")), torch.arange(4, device="cuda")).backward()

    compile_model(model, warm_up)
    assert torch.equal(torch.cuda.get_rng_state(0), before)
