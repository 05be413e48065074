"""Data parallelism on CPU with gloo: torchrun end to end, one DDP step against one big step,
evaluation over uneven shares, and the sharding of batches."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from datasets import BatchLoader, CifarPipeline, Pipeline, Split
from network import CifarAlexNet
from trainer import TrainConfig, TrainStep, eval_loader, evaluate

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun")

# A torchrun worker that runs the real command line and then writes each rank's final weights.
WORKER = """
import sys, torch
sys.path.insert(0, {root!r})
import main, trainer
finish = trainer.Trainer._finish
def dump(self):
    out = finish(self)
    torch.save(trainer.plain_state_dict(self.model), f"{out}/rank{{self.rank}}.pt")
    return out
trainer.Trainer._finish = dump
sys.exit(main.main(sys.argv[1:]))
"""


def _torchrun(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), "-c", "--shapes-train", "192",
               "--shapes-test", "75", "--batch-size", "64", "--seed", "3", "--output-dir", str(tmp_path / "out"),
               *flags]  # fmt: skip
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_torchrun_trains_writes_one_run_and_keeps_the_ranks_identical(tmp_path):
    result = _torchrun(tmp_path, "-ne", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel: 2 processes (gloo)" in result.stderr
    runs = list((tmp_path / "out" / "runs" / "Shapes").iterdir())
    assert len(runs) == 1  # rank 0 alone writes, under the name it chose
    assert len(list((tmp_path / "out" / "checkpoints" / "Shapes").iterdir())) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["test_size"] == 75
    assert result.stderr.count("epoch 1/1") == 1  # one voice in the log
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = torch.load(tmp_path / "out" / "checkpoints" / "Shapes" / runs[0].name / "last.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], rank0[k]) for k in rank0)
    assert len(saved["rng_ranks"]) == 2

    # --resume under torchrun continues the same run folder for one more epoch.
    last = tmp_path / "out" / "checkpoints" / "Shapes" / runs[0].name / "last.pt"
    resumed = _torchrun(tmp_path, "--resume", str(last), "-ne", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((runs[0] / "summary.json").read_text())["epochs"] == 2
    assert len(list((tmp_path / "out" / "runs" / "Shapes").iterdir())) == 1


def _init(rank: int, world: int, store: str, device: str = "cpu") -> None:
    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


def _sgd_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    device = next(model.parameters()).device
    TrainStep(model, optimizer, F.cross_entropy, device)(images.to(device), labels.to(device))


def _ddp_step_worker(rank: int, world: int, store: str, out: str, device: str) -> None:
    _init(rank, world, store, device)
    torch.manual_seed(0)
    local = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    ids = [rank] if device == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(CifarAlexNet(10, dropout=0.0).to(local), device_ids=ids)
    images, labels = _batch()
    half = slice(rank * 8, rank * 8 + 8)
    _sgd_step(model, images[half], labels[half])
    if rank == 0:
        torch.save({k: v.cpu() for k, v in model.module.state_dict().items()}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA "
                                                          "devices for NCCL"))],
)  # fmt: skip
def test_one_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch(tmp_path, device):
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_step_worker, args=(2, str(tmp_path / "store"), str(out), device), nprocs=2)
    torch.manual_seed(0)
    single = CifarAlexNet(10, dropout=0.0)
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        single = single.cuda()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    _sgd_step(single, *_batch())
    ddp = torch.load(out, weights_only=True)
    for key, value in single.state_dict().items():
        value = value.cpu()
        assert not torch.equal(value, before[key].cpu())  # the step moved every tensor
        torch.testing.assert_close(ddp[key], value, rtol=0, atol=1e-5)


class _Plain(Pipeline):
    views = 1

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div(255).unsqueeze(1)


def _eval_data(multilabel: bool) -> tuple[Split, int]:
    g = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=g)  # 37: uneven shares
    if multilabel:
        labels = torch.randint(-1, 2, (37, 20), generator=g, dtype=torch.int64).to(torch.int8)
        return Split(images, labels), 20
    return Split(images, torch.randint(0, 10, (37,), generator=g)), 10


def _eval(multilabel: bool) -> dict:
    split, classes = _eval_data(multilabel)
    torch.manual_seed(0)
    model = CifarAlexNet(classes)
    config = TrainConfig(eval_batch_size=8)
    result = evaluate(model, eval_loader(split, _Plain(), config, torch.device("cpu")), classes, multilabel)
    return {**result.metrics(), "confusion": result.confusion}


def _eval_worker(rank: int, world: int, store: str, out: str) -> None:
    _init(rank, world, store)
    results = {"single": _eval(False), "multi": _eval(True)}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_evaluation_over_uneven_shares_equals_one_process(tmp_path):
    out = tmp_path / "eval.pt"
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    ddp = torch.load(out, weights_only=False)
    for key, multilabel in (("single", False), ("multi", True)):
        alone, shared = _eval(multilabel), ddp[key]
        assert shared["count"] == alone["count"] == 37
        assert (shared["top1"], shared["top5"]) == (alone["top1"], alone["top5"])
        assert torch.equal(shared["confusion"], alone["confusion"])
        # Each process runs the model on other batch sizes, so its fp32 logits differ in the last bits.
        assert shared["loss"] == pytest.approx(alone["loss"], rel=1e-6)
        if multilabel:
            assert shared["mAP"] == pytest.approx(alone["mAP"], rel=1e-6)
            assert shared["ap"] == pytest.approx(alone["ap"], rel=1e-6, nan_ok=True)


def test_training_shares_cover_each_global_batch_once():
    split = Split(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10))
    pipeline = CifarPipeline(torch.zeros(3), torch.ones(3), 4, padding=0)

    def seen(rank: int) -> list[list[int]]:
        loader = BatchLoader(split, 4, pipeline, train=True, index_generator=torch.Generator().manual_seed(0),
                             rank=rank, world=3)  # fmt: skip
        return [labels.tolist() for _, labels in loader]

    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    shares = [seen(r) for r in range(3)]
    # Batches of 4, 4 and 2 images: the first two are shared 2/1/1, the last (fewer than three
    # images) is dropped by every process, so all take the same number of steps.
    assert [len(s) for s in shares] == [2, 2, 2]
    for i in range(2):
        assert [label for s in shares for label in s[i]] == order[4 * i : 4 * i + 4]


def test_split_gpus_needs_the_paper_model(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "-c", "--split-gpus", "-d"], cwd=tmp_path,
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "--split-gpus splits the paper's network: add -pm (and drop -c)" in result.stderr


def test_split_gpus_on_cpu_trains_and_saves_the_grouped_weights(tmp_path):
    from network import PaperAlexNet

    common = ["--shapes-train", "32", "--shapes-test", "16", "--batch-size", "16", "--device", "cpu"]
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "-pm", "--split-gpus", "-ne", "1", *common],
                            cwd=tmp_path, capture_output=True, text=True, check=False, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the two towers run on cpu and cpu" in result.stderr
    (last,) = (tmp_path / "checkpoints" / "Shapes").glob("*/last.pt")
    saved = torch.load(last, weights_only=True)
    grouped = PaperAlexNet(10).state_dict()
    assert list(saved["model"]) == list(grouped)
    assert all(saved["model"][k].shape == v.shape for k, v in grouped.items())
    # The grouped model on one device evaluates it and finds the recorded metric.
    evaluated = subprocess.run([sys.executable, str(ROOT / "main.py"), "--evaluate", str(last), *common],
                               cwd=tmp_path, capture_output=True, text=True, check=False, timeout=600)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["top1"] == pytest.approx(saved["last"]["top1"])


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_sigterm_under_torchrun_saves_mid_epoch_and_resume_finishes(tmp_path):
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["-c", "-ne", "2", "--shapes-train", "512", "--shapes-test", "32", "--batch-size", "32", "-lls", "1",
             "--output-dir", "out", "--run-name", "ddp"]  # fmt: skip
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        job = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"), *flags],
                               cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 300
        while "epoch 1/2" not in log.read_text() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.5)
        time.sleep(2)  # into epoch 2 (8 s of steps here)
        job.send_signal(signal.SIGTERM)  # what a scheduler does; torchrun passes it on to the workers
        job.wait(timeout=300)
    text = log.read_text()
    assert job.returncode != 0
    # Mid-epoch as a rule; at the epoch's end if the signal came while epoch 1 was being saved.
    assert re.search(r"stopped by SIGTERM (at step \d+ \(epoch 2, batch \d+ of 16\)|after epoch 1); saved "
                     r"out/checkpoints/Shapes/ddp/last.pt", text), text[-3000:]  # fmt: skip
    assert "resume with: torchrun ... main.py --resume out/checkpoints/Shapes/ddp/last.pt" in text
    saved = torch.load(tmp_path / "out/checkpoints/Shapes/ddp/last.pt", weights_only=True)
    assert saved["epoch"] == 1
    where = f"batch {saved['partial']['batches_done']} of epoch 2" if saved["partial"] else "epoch 1"

    resumed = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "main.py"), "--resume",
                              "out/checkpoints/Shapes/ddp/last.pt"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed after {where}" in resumed.stderr
    summary = json.loads((tmp_path / "out/runs/Shapes/ddp/summary.json").read_text())
    assert summary["epochs"] == 2 and summary["status"] == "finished" and summary["steps"] == 32
