"""Data parallelism on CPU with gloo: torchrun end to end, two torchrun agents standing for two
machines (the weights of one process; a lost node), one DDP step against one big step,
evaluation over uneven shares, and the sharding of batches."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from main_cli import ROOT

from data.core import Split
from data.loaders import BatchLoader, eval_loader
from data.transforms import CifarPipeline, Pipeline
from network import CifarAlexNet
from training.config import TrainConfig
from training.distributed import lost_process, rank_and_world
from training.fastpath import TrainStep
from training.loop import evaluate

TORCHRUN = shutil.which("torchrun")

# A torchrun worker that runs the real command line and then writes each rank's final weights.
WORKER = """
import sys, torch
sys.path.insert(0, {root!r})
import main, trainer
from training.fastpath import plain_state_dict
finish = trainer.Trainer._finish
def dump(self):
    out = finish(self)
    torch.save(plain_state_dict(self.model), f"{out}/rank{{self.rank}}.pt")
    return out
trainer.Trainer._finish = dump
{extra}
sys.exit(main.main(sys.argv[1:]))
"""


def _torchrun(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), out=str(tmp_path), extra=""))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        "-c",
        "--shapes-train",
        "192",
        "--shapes-test",
        "75",
        "--batch-size",
        "64",
        "--seed",
        "3",
        "--output-dir",
        str(tmp_path / "out"),
        *flags,
    ]
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


# TF32 (CUDA only) would round the DDP and the one-process step differently. Set through
# fp32_precision, the API of every torch we support: reading the deprecated allow_tf32 raises
# once anything in the process has used the new one.
EXACT_FLOAT32 = [
    (torch.backends.cudnn.conv, "fp32_precision", "ieee"),
    (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
]


def _init(rank: int, world: int, store: str, device: str = "cpu") -> None:
    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        for target, name, value in EXACT_FLOAT32:
            setattr(target, name, value)
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
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for NCCL")
        ),
    ],
)
def test_one_ddp_step_on_two_halves_equals_one_step_on_the_whole_batch(tmp_path, device, monkeypatch):
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_step_worker, args=(2, str(tmp_path / "store"), str(out), device), nprocs=2)
    torch.manual_seed(0)
    single = CifarAlexNet(10, dropout=0.0)
    if device == "cuda":
        for target, name, value in EXACT_FLOAT32:
            monkeypatch.setattr(target, name, value)
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
    rank, world = rank_and_world()
    cpu = torch.device("cpu")
    loader = eval_loader(split, _Plain(), cpu, batch_size=config.eval_batch_size, rank=rank, world=world)
    result = evaluate(model, loader, classes, multilabel)
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
        loader = BatchLoader(
            split, 4, pipeline, train=True, index_generator=torch.Generator().manual_seed(0), rank=rank, world=3
        )
        return [labels.tolist() for _, labels in loader]

    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    shares = [seen(r) for r in range(3)]
    # Batches of 4, 4 and 2 images: the first two are shared 2/1/1, the last (fewer than three
    # images) is dropped by every process, so all take the same number of steps.
    assert [len(s) for s in shares] == [2, 2, 2]
    for i in range(2):
        assert [label for s in shares for label in s[i]] == order[4 * i : 4 * i + 4]


def test_split_gpus_needs_the_paper_model(tmp_path, run_main):
    result = run_main("-c", "--split-gpus", "-d", cwd=tmp_path)
    assert result.returncode == 2
    assert "--split-gpus splits the paper's network: add -pm (and drop -c)" in result.stderr


def test_split_gpus_on_cpu_trains_and_saves_the_grouped_weights(tmp_path, run_main):
    from network import PaperAlexNet

    common = ["--shapes-train", "32", "--shapes-test", "16", "--batch-size", "16", "--device", "cpu"]
    result = run_main("-pm", "--split-gpus", "-ne", "1", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the two towers run on cpu and cpu" in result.stderr
    (last,) = (tmp_path / "checkpoints" / "Shapes").glob("*/last.pt")
    saved = torch.load(last, weights_only=True)
    grouped = PaperAlexNet(10).state_dict()
    assert list(saved["model"]) == list(grouped)
    assert all(saved["model"][k].shape == v.shape for k, v in grouped.items())
    # The grouped model on one device evaluates it and finds the recorded metric.
    evaluated = run_main("--evaluate", str(last), *common, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["top1"] == pytest.approx(saved["last"]["top1"])


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_sigterm_under_torchrun_saves_mid_epoch_and_resume_finishes(tmp_path, repo_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [
        "-c",
        "-ne",
        "2",
        "--shapes-train",
        "512",
        "--shapes-test",
        "32",
        "--batch-size",
        "32",
        "-lls",
        "1",
        "--output-dir",
        "out",
        "--run-name",
        "ddp",
    ]
    log = tmp_path / "log.txt"
    with log.open("w") as out:
        job = subprocess.Popen(
            [TORCHRUN, "--standalone", "--nproc_per_node=2", str(repo_root / "main.py"), *flags],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while "epoch 1/2" not in log.read_text() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.5)
        time.sleep(2)  # into epoch 2 (8 s of steps here)
        job.send_signal(signal.SIGTERM)  # what a scheduler does; torchrun passes it on to the workers
        job.wait(timeout=300)
    text = log.read_text()
    assert job.returncode != 0
    # Mid-epoch as a rule; at the epoch's end if the signal came while epoch 1 was being saved.
    assert re.search(
        r"stopped by SIGTERM (at step \d+ \(epoch 2, batch \d+ of 16\)|after epoch 1); saved "
        r"out/checkpoints/Shapes/ddp/last.pt",
        text,
    ), text[-3000:]
    assert "resume with: torchrun ... main.py --resume out/checkpoints/Shapes/ddp/last.pt" in text
    saved = torch.load(tmp_path / "out/checkpoints/Shapes/ddp/last.pt", weights_only=True)
    assert saved["epoch"] == 1
    where = f"batch {saved['partial']['batches_done']} of epoch 2" if saved["partial"] else "epoch 1"

    resumed = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node=2",
            str(repo_root / "main.py"),
            "--resume",
            "out/checkpoints/Shapes/ddp/last.pt",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed after {where}" in resumed.stderr
    summary = json.loads((tmp_path / "out/runs/Shapes/ddp/summary.json").read_text())
    assert summary["epochs"] == 2 and summary["status"] == "finished" and summary["steps"] == 32


# ---------------------------------------------------------------------------------------------
# Two machines, simulated by two torchrun agents on this one (c10d rendezvous on the loopback)

# What the multi-node worker adds to WORKER: its process id in pid.<RANK> (for the kill test),
# and no randomness besides the shared data order. The tool gives each process its own
# augmentation and dropout stream (seed + rank) by design, so to compare weights with one process
# the training images are only normalised, as for evaluation, and dropout is 0.
EXACT = """
import os
open(f"{out}/pid.{{os.environ.get('RANK', '0')}}", "w").write(str(os.getpid()))
init = trainer.Trainer.__init__
def exact(self, *args, **kwargs):
    init(self, *args, **kwargs)
    pipeline = self.pipeline
    pipeline.train = lambda images, generator=None: pipeline.evaluate(images)[:, 0]
    for module in self.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
trainer.Trainer.__init__ = exact
"""
# fp32 (a CPU with native bf16 would default to it), batches of 64 (3 steps an epoch) and SGD at
# a rate where training is stable, so rounding differences stay as small as they start: Adam
# divides by the root of the squared gradients, which blows the rounding of a near-zero gradient
# up to a whole step, and SGD at 0.1 already amplifies it a thousandfold in six steps.
EXACT_FLAGS = [
    "-c",
    "--shapes-train",
    "192",
    "--shapes-test",
    "32",
    "--batch-size",
    "64",
    "--seed",
    "3",
    "--amp",
    "off",
    "--no-channels-last",
    "--optimizer",
    "sgd",
    "--lr",
    "0.01",
]


def _worker_script(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), out=str(folder), extra=EXACT.format(out=str(folder))))
    return script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_agents(folder: Path, *flags: str) -> list[subprocess.Popen]:
    """``torchrun --nnodes=2`` twice, as on two machines: one process each, a c10d rendezvous
    that the first agent hosts, everything on 127.0.0.1. Each agent in its own session (its
    workers start their own too: ``_stop_all`` ends them all); the workers' output goes to
    ``folder/logs<node>/.../stderr.log``, the agents' to ``folder/agent<node>.txt``."""
    script = _worker_script(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo would otherwise pick the interface of the host name
    port, run_id = _free_port(), f"test-{os.getpid()}-{time.monotonic_ns()}"
    agents = []
    for node in (0, 1):
        command = [
            TORCHRUN,
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={1 - node}",
            "--local-addr=127.0.0.1",
            "--max-restarts=0",
            f"--log-dir={folder / f'logs{node}'}",
            "--redirects=3",
            str(script),
            *flags,
        ]
        with (folder / f"agent{node}.txt").open("w") as log:
            agents.append(
                subprocess.Popen(
                    command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    return agents


def _stop_all(agents: list[subprocess.Popen], folder: Path) -> None:
    """Kill what is left of both agents and of their workers (each in its own session)."""
    for agent in agents:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
    for pid_file in folder.glob("pid.*"):
        pid = int(pid_file.read_text())
        try:  # only a worker of this test: the process id may have been reused meanwhile
            if str(folder / "worker.py") in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                os.killpg(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def _worker_stderr(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob("logs*/**/stderr.log")))


def _one_process(folder: Path, threads: int, *flags: str) -> subprocess.Popen:
    """The multi-node worker run alone (``python worker.py``: one process, no torchrun) with
    ``threads`` threads, its output in ``folder/output.txt``."""
    script = _worker_script(folder)
    with (folder / "output.txt").open("w") as log:
        return subprocess.Popen(
            [sys.executable, str(script), *flags],
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )


# How far the two nodes may end from one process, in multiples of the noise floor: the difference
# between two legitimate single-process runs, one thread against two. Both differences start as
# another fp32 summation order in the first step's gradients (the all-reduce of two halves; oneDNN
# splitting its reductions over two threads), which the following steps carry on alike, so they
# come out of a size, scattered: on a 2-core EPYC both stayed within one ulp of the weights, the
# two nodes at most 0.75 of the floor. 10 leaves room for that scatter where kernels round further
# apart (on an AMX Xeon the two nodes ended 1.25 % of a tensor's movement, some hundred ulps, from
# one process), and the test checks that 10 floors stay below what it must catch: a wrong share,
# or gradients summed instead of averaged, puts a tensor off by half its movement or more.
NOISE_MULTIPLE = 10


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_two_nodes_train_to_the_weights_of_one_process_with_the_whole_batch(tmp_path):
    flags = [*EXACT_FLAGS, "-ne", "2", "--output-dir", "out"]
    # The two single-process runs (one thread, and two for the noise floor) beside the two nodes:
    # a run is mostly single-threaded start-up, so the four share two cores in the time of two.
    agents = _two_agents(tmp_path / "ddp", *flags)
    alone = {threads: _one_process(tmp_path / f"threads{threads}", threads, *flags) for threads in (1, 2)}
    try:
        for process in [*agents, *alone.values()]:
            process.wait(timeout=300)
    finally:
        _stop_all(agents, tmp_path / "ddp")
        for process in alone.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [a.returncode for a in agents] == [0, 0], _worker_stderr(tmp_path / "ddp")[-3000:]
    assert "data parallel: 2 processes (gloo)" in _worker_stderr(tmp_path / "ddp")
    for threads, process in alone.items():
        assert process.returncode == 0, (tmp_path / f"threads{threads}" / "output.txt").read_text()[-3000:]

    torch.manual_seed(3)  # main.py seeds the weights with --seed
    initial = CifarAlexNet(10).state_dict()
    single, other = (torch.load(tmp_path / f"threads{t}" / "rank0.pt", weights_only=True) for t in (1, 2))
    ddp = [torch.load(tmp_path / "ddp" / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    moved = {key: (value - initial[key]).abs().max().item() for key, value in single.items()}
    assert min(moved.values()) > 1e-6, moved
    # The noise floor as a fraction of each tensor's movement, the largest over the model (one
    # rounding perturbation, grown by training, in every tensor at once); and per tensor the
    # finest difference fp32 can show, one rounding of its largest weight (eps * |w|).
    noise = max((other[key] - value).abs().max().item() / moved[key] for key, value in single.items())
    assert NOISE_MULTIPLE * noise < 0.5, (
        f"one thread and two end {100 * noise:.3g} % of a tensor's movement apart: too much rounding noise for "
        f"{NOISE_MULTIPLE} times it to stay below what a wrong share does (50 %)"
    )
    for key, value in single.items():
        assert torch.equal(ddp[0][key], ddp[1][key]), (
            f"{key}: the ranks differ by {(ddp[0][key] - ddp[1][key]).abs().max()}"
        )
        off = (ddp[0][key] - value).abs().max().item()
        floor = max(noise * moved[key], torch.finfo(torch.float32).eps * value.abs().max().item())
        assert off <= NOISE_MULTIPLE * floor, (
            f"{key}: two nodes end {off:.3g} from one process ({100 * off / moved[key]:.3g} % of the {moved[key]:.3g} "
            f"it moved), {off / floor:.3g} times the noise floor {floor:.3g} (one thread against two: "
            f"{100 * noise:.3g} % of the movement; one rounding of the largest weight); {NOISE_MULTIPLE} allowed"
        )


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_a_lost_node_stops_both_with_one_sentence_and_a_whole_last_checkpoint(tmp_path):
    folder = tmp_path / "ddp"
    agents = _two_agents(folder, *EXACT_FLAGS, "-ne", "50", "--output-dir", "out", "--run-name", "lost")
    last = folder / "out/checkpoints/Shapes/lost/last.pt"
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and time.monotonic() < deadline and all(a.poll() is None for a in agents):
            time.sleep(0.2)
        assert last.exists(), _worker_stderr(folder)[-3000:]
        # The process of rank 1 (on whichever agent the rendezvous made node 1), as a machine
        # failure or the OOM killer would end it: no signal handler, no goodbye.
        os.kill(int((folder / "pid.1").read_text()), signal.SIGKILL)
        for agent in agents:
            agent.wait(timeout=120)  # gloo notices the closed connection at once, not at its timeout
    finally:
        _stop_all(agents, folder)
    assert all(a.returncode != 0 for a in agents), [a.returncode for a in agents]
    text = _worker_stderr(folder)
    assert "Traceback" not in text, text[-3000:]
    (line,) = [line for line in text.splitlines() if "error: " in line]
    assert re.fullmatch(
        r"error: the run lost process 1 of 2 \(.+\): it was stopped, crashed or lost its "
        r"machine, so process 0 stops too; resume from the last checkpoint with the same torchrun command plus "
        r"--resume out/checkpoints/Shapes/lost/last.pt",
        line,
    ), line
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] >= 1 and saved["config"]["run_name"] == "lost"


# ---------------------------------------------------------------------------------------------
# Recognising a lost process from the error a surviving one gets: by type (NCCL, the store),
# by wording (gloo's plain RuntimeError)

NCCL_REMOTE = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3690, remote process exited or there "
    "was a network error, NCCL version 2.27.3\nncclRemoteError: A call failed possibly due to a network error or a "
    "remote process exiting prematurely.\nLast error:\nsocketProgress: Connection closed by remote peer"
)
NCCL_TIMEOUT = (
    "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE, NumelIn=1, "
    "NumelOut=1, Timeout(ms)=600000) ran for 600046 milliseconds before timing out."
)
TIMEOUT_REASON = NCCL_TIMEOUT.removeprefix("[Rank 0] ").removesuffix(".")
ADVICE = (
    ": it was stopped, crashed or lost its machine, so process 0 stops too; resume from the last checkpoint with "
    "the same torchrun command plus --resume out/last.pt"
)


@pytest.fixture
def two_processes(monkeypatch):
    """The environment torchrun gives process 0 of 2."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")


@pytest.mark.parametrize(
    "error, reason",
    [
        (dist.DistBackendError(NCCL_REMOTE), "remote process exited or there was a network error"),
        (dist.DistBackendError(NCCL_TIMEOUT), TIMEOUT_REASON),
        (
            dist.DistBackendError(
                f"[PG ID 0 PG GUID 0(default_pg) Rank 0] Process group watchdog thread terminated with "
                f"exception: {NCCL_TIMEOUT}"
            ),
            TIMEOUT_REASON,
        ),
        (
            dist.DistBackendError("NCCL communicator was aborted on rank 0. Original reason for failure was: ..."),
            "NCCL communicator was aborted on rank 0",
        ),
        (dist.DistNetworkError("Connection reset by peer"), "Connection reset by peer"),
        (
            dist.DistStoreError("Failed to recv, got 0 bytes. Connection was likely closed."),
            "Failed to recv, got 0 bytes",
        ),
        (
            RuntimeError(
                "[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                "[10.0.0.2]:40211. This is typically caused by a remote worker crashing."
            ),
            "Connection closed by peer 10.0.0.2:40211",
        ),
        (
            RuntimeError(
                "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1800000ms for "
                "recv operation to complete"
            ),
            "Timed out waiting 1800000ms for recv operation to complete",
        ),
    ],
)
def test_a_lost_process_is_one_sentence_under_nccl_gloo_and_the_store(two_processes, error, reason):
    assert lost_process(error, Path("out/last.pt")) == f"the run lost process 1 of 2 ({reason}){ADVICE}"


def test_nccl_errors_are_recognised_by_type_not_wording(two_processes):
    # The NCCL text without its type is not gloo's wording: a plain RuntimeError of it propagates.
    assert lost_process(RuntimeError(NCCL_REMOTE.replace("Connection closed", "Closed")), None) is None
    assert lost_process(dist.DistBackendError("unhandled system error"), None) == (
        "the run lost process 1 of 2 (unhandled system error): it was stopped, crashed or lost its machine, so "
        "process 0 stops too; start the same torchrun command again"
    )


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x9216 and 4096x10)"),
        ValueError("Connection closed by peer"),  # gloo's wording, but not a collective's error
        dist.DistBackendError(
            "NCCL error in: ProcessGroupNCCL.cpp:3690, invalid usage (run with NCCL_DEBUG=WARN for "
            "details), NCCL version 2.27.3\nncclInvalidUsage: This usually reflects invalid usage of "
            "NCCL library."
        ),
        dist.DistBackendError(
            "NCCL error in: ProcessGroupNCCL.cpp:3690, unhandled cuda error (run with NCCL_DEBUG=INFO "
            "for details), NCCL version 2.27.3\nncclUnhandledCudaError: Call to CUDA function failed."
        ),
    ],
)
def test_other_errors_propagate(two_processes, error):
    assert lost_process(error, Path("out/last.pt")) is None


def test_outside_torchrun_nothing_is_a_lost_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert lost_process(dist.DistBackendError(NCCL_REMOTE), None) is None


# ---------------------------------------------------------------------------------------------
# The resize cache under torchrun: the processes build it together

#: Seconds each image takes to resize in these tests: 4 images take 10 s alone, twice the group's
#: 5-second timeout, and 5 s for each of two processes sharing them.
SLOW = 2.5
TIMEOUT = timedelta(seconds=5)


def _cache_worker(rank: int, port: int, case: str, folder: Path) -> None:
    """Process ``rank`` of 2 of a gloo group joined as torchrun's would be (``init_distributed``,
    a 5-second timeout), reading the cache of ``folder`` as ``case`` says; it saves what came of
    it (the images, or the error's text) and the names of the files it resized itself."""
    import data.shards
    from data.core import ALONE, DataOptions
    from data.images import decode_resized
    from data.registry import load_dataset
    from data.shards import shard_split
    from training.distributed import data_peers, init_distributed

    torch.set_num_threads(1)  # a forked child must not join the parent's OpenMP threads (it would hang)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
    )
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    resized = []

    def resize(path: Path, size: int) -> torch.Tensor:
        resized.append(path.name)
        time.sleep(SLOW if case in ("together", "rank 0 first") else 0)
        return decode_resized(path, size)

    data.shards.decode_resized = resize
    init_distributed(torch.device("cpu"), TIMEOUT)
    photos = sorted((folder / "photos").iterdir())
    peers = data_peers()
    try:
        if case == "rank 0 first":  # what main.py did: rank 0 read the data (building the cache) first
            with peers.first():
                outcome = shard_split(photos, torch.arange(4), folder / "cache", "train", 16, 1, 1, ALONE).images[:]
        elif case == "readers":
            options = DataOptions(data_dir=str(folder), cache_dir=str(folder / "cache"), image_size=16)
            images = load_dataset("ImageFolder", options, peers).train.images[:]
            outcome = [images, load_dataset("PascalVOC2012", options, peers).test.images[:]]
        else:  # "together", "bad"
            outcome = shard_split(photos, torch.arange(4), folder / "cache", "train", 16, 1, 1, peers).images[:]
    except Exception as error:  # noqa: BLE001 (what a process met is the test's result)
        outcome = f"{type(error).__name__}: {error}"
    finally:
        dist.destroy_process_group()
    torch.save({"outcome": outcome, "resized": resized}, folder / f"rank{rank}.pt")


def _two_readers(folder: Path, case: str) -> list[dict]:
    """What each of two processes came to in ``case`` (``_cache_worker``), on 4 small photos of
    which the second is damaged in the case "bad"."""
    from fakedata import write_photos

    photos = write_photos(folder / "photos", 4, sizes=[(24, 20)])
    if case == "bad":
        photos[1].write_bytes(b"not a picture")
    mp.start_processes(_cache_worker, args=(_free_port(), case, folder), nprocs=2, start_method="fork")
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_each_process_builds_its_share_of_the_cache_so_none_waits_past_the_timeout(tmp_path):
    """The preparation takes twice the group's timeout; each process builds every other shard
    (rank 0: 0 and 2, rank 1: 1 and 3), then reads the other's, so each waits only for the
    other's share to end about when its own does, and both get the same images."""
    ranks = _two_readers(tmp_path, "together")
    assert [r["resized"] for r in ranks] == [["0000.jpg", "0002.jpg"], ["0001.png", "0003.png"]]
    assert isinstance(ranks[0]["outcome"], torch.Tensor), ranks[0]["outcome"]
    assert ranks[0]["outcome"].shape == (4, 3, 16, 16) and torch.equal(ranks[0]["outcome"], ranks[1]["outcome"])


def test_rank_0_building_the_cache_alone_stops_the_run_at_the_timeout(tmp_path):
    """The design this replaces, for the record: rank 0 builds the whole cache while rank 1 waits
    at a collective, which gives up after the group's timeout (5 s here, 10 min on NCCL by
    default) while rank 0 is still at work."""
    ranks = _two_readers(tmp_path, "rank 0 first")
    assert ranks[0]["resized"] == ["0000.jpg", "0001.png", "0002.jpg", "0003.png"] and ranks[1]["resized"] == []
    assert re.search(r"timed out", ranks[1]["outcome"], re.IGNORECASE), ranks[1]["outcome"]


def test_a_bad_image_in_one_process_share_is_the_same_sentence_in_every_process(tmp_path):
    """Image 1 (rank 1's share) is damaged: both processes raise the one-sentence ``DataError``
    that one process alone would, and neither is left waiting for the other."""
    ranks = _two_readers(tmp_path, "bad")
    assert ranks[0]["outcome"] == ranks[1]["outcome"]
    assert re.fullmatch(
        r"DataError: \S+/0001\.png cannot be decoded as an image \(.+\); replace it .+ or remove it\.",
        ranks[0]["outcome"],
    ), ranks[0]["outcome"]


def test_image_folder_and_voc_build_their_caches_through_the_shared_path(tmp_path):
    """The readers hand the processes to the cache: one shard each (train, val) is built by the
    process whose share it is (rank 0), the other reads it, and both have the same images."""
    from fakedata import small_voc, write_class_folders

    write_class_folders(tmp_path / "train", {"a": 2, "b": 2}, size=20)
    write_class_folders(tmp_path / "val", {"a": 1, "b": 1}, size=20)
    small_voc(tmp_path)
    ranks = _two_readers(tmp_path, "readers")
    assert len(ranks[0]["resized"]) == 4 + 2 + 3 and ranks[1]["resized"] == []  # ImageFolder's 6, VOC's 3
    for mine, theirs in zip(*(r["outcome"] for r in ranks), strict=True):
        assert torch.equal(mine, theirs)


def test_dist_timeout_reaches_the_process_group_in_minutes(monkeypatch, own_signals, capsys):
    """``--dist-timeout`` (120 minutes unless given) is the group's timeout; zero or less is one
    sentence from the parser."""
    import main
    import training.run
    from training.distributed import DIST_TIMEOUT_MINUTES
    from utils import UserError

    joined = []

    def join(device: torch.device, timeout: timedelta) -> torch.device:
        joined.append(timeout)
        raise UserError("joined")

    monkeypatch.setattr(training.run, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(training.run, "init_distributed", join)
    assert main.main(["-c"]) == 1 and main.main(["-c", "--dist-timeout", "7.5"]) == 1
    assert joined == [timedelta(minutes=DIST_TIMEOUT_MINUTES), timedelta(minutes=7.5)] and DIST_TIMEOUT_MINUTES == 120
    with pytest.raises(SystemExit):
        main.main(["-c", "--dist-timeout", "0"])
    assert "error: argument --dist-timeout: must be above 0 and at most 10080, got 0.0\n" in capsys.readouterr().err


def test_rank_0_runs_a_download_first_and_hands_its_error_to_the_others():
    """``Peers.first``: rank 0 runs the block and then meets the others at one gather, which
    carries its ``DataError``; the others raise that sentence instead of running the block."""
    from data.core import DataError, Peers

    sent, ran = [], []
    rank0 = Peers(0, 2, 1, lambda value: sent.append(value) or [value, None])
    with pytest.raises(DataError, match=r"^no archive$"), rank0.first():
        raise DataError("no archive")
    with rank0.first():
        ran.append(0)
    assert sent == ["no archive", None] and ran == [0]
    with pytest.raises(DataError, match=r"^no archive$"), Peers(1, 2, 1, lambda value: ["no archive", value]).first():
        ran.append(1)
    with Peers(1, 2, 1, lambda value: [None, value]).first():
        ran.append(1)
    assert ran == [0, 1]
