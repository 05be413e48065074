"""``tools/gpu_check.sh``, the one command for a GPU machine, rehearsed on the CPU (every step
through the same code paths, the CPU standing in for a GPU), so that the script cannot rot
while no GPU is at hand; and its one sentence where there is no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = [
    "cuda-tests",
    "shapes-default",
    "shapes-compile",
    "shapes-fp16",
    "deterministic",
    "kill-resume",
    "resume-gpu-cpu",
    "resume-cpu-gpu",
    "imagenet-stream",
    "predict",
    "export",
    "torchrun-1",
    "torchrun-2",
    "split-gpus",
    "benchmark",
]


def gpu_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run tools/gpu_check.sh itself")
def test_without_a_gpu_it_says_so_in_one_sentence_and_exits_2(tmp_path):
    result = gpu_check(cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: this machine has no usable CUDA GPU; run it on one, or rehearse it here with --rehearse."
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_earlier_check_is_never_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "gpu_check.json").write_text("{}")
    result = gpu_check("--rehearse", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2 and "is not empty; pass a new --out" in result.stderr
    assert (tmp_path / "out" / "gpu_check.json").read_text() == "{}"


def test_the_rehearsal_runs_every_step_that_does_not_need_cuda_itself(tmp_path, shared_data):
    result = gpu_check("--rehearse", "--out", "out", cwd=tmp_path)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    outcome = {step["step"]: step["result"] for step in report["steps"]}
    assert list(outcome) == STEPS
    failed = {s["step"]: s["detail"] for s in report["steps"] if s["result"] != "passed"}
    assert failed == {"cuda-tests": "needs CUDA itself"}, result.stdout
    assert result.returncode == 0
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table.startswith("GPU check: gpu none (rehearsal") and table.count("| passed |") == len(STEPS) - 1
    details = {s["step"]: s["detail"] for s in report["steps"]}
    # The CUDA branches really ran: the stand-in's defaults (bf16, channels-last), fp16, gloo.
    assert "amp bf16, channels-last True" in details["shapes-default"]
    assert "amp fp16" in details["shapes-fp16"]
    assert "bit-identical" in details["deterministic"] and "bit-identical" in details["kill-resume"]
    assert details["torchrun-2"].startswith("2 process(es) over gloo")
