"""Verify a GPU machine in one command: every CUDA path of the tool, run for real, with a table.

    tools/gpu_check.sh                       # on a CUDA machine: the steps below, ~8 minutes on one H100
    tools/gpu_check.sh --out DIR             # where the runs, gpu_check.json and gpu_check.md go
    tools/gpu_check.sh --rehearse            # the same steps on the CPU, standing in for a GPU

Steps (each is the tool's own command line, checked for what it must show):

    cuda-tests        pytest -m cuda: the tests that need a real GPU (tests/test_cuda.py)
    shapes-default    -c on Shapes, 3 epochs, the device's defaults (bf16 + channels-last from 8.0)
    shapes-compile    the same with --compile: compiled (no fallback), same accuracy bar
    shapes-fp16       the same with --amp fp16 (loss scaling)
    deterministic     --deterministic twice: bit-identical weights
    kill-resume       SIGTERM in epoch 2, then --resume: the weights of the uninterrupted run
    resume-gpu-cpu    the GPU run's last.pt resumed with --device cpu for one more epoch
    resume-cpu-gpu    a CPU run's last.pt resumed on the GPU (fused Adam) for one more epoch
    imagenet-stream   -pm -pt -ds ImageNet on shared/data/imagenet-sample, streamed (nvJPEG)
    predict           predict with a GPU checkpoint, on the GPU and on a CPU-only process
    export            ONNX export of a GPU checkpoint (verified by onnxruntime)
    torchrun-1        torchrun --nproc_per_node 1: the process group (NCCL) and DDP with one process
    torchrun-2        torchrun --nproc_per_node 2 over NCCL (two GPUs only)
    split-gpus        -pm --split-gpus, the paper's two towers on two GPUs (two GPUs only)
    benchmark         benchmarks/speed.py --device cuda --compile --json

It writes ``gpu_check.json`` (machine, torch, CUDA, each step's result, seconds and details) and
``gpu_check.md`` (the same as a Markdown table, for a note) into ``--out``. Exit status 0 when
every step passed or was skipped for lack of a second GPU, 1 when one failed, 2 without CUDA.

``--rehearse`` runs every step that does not need a GPU's hardware on the CPU through the same
code paths: ``ALEXNET_CUDA_STAND_IN=9.0`` makes ``--device cpu`` take the CUDA branches
(``hardware.capabilities``), the data are small and accuracy is not judged; torch.compile runs
with TorchDynamo disabled (its compiler takes minutes on a small CPU), NCCL becomes gloo, and the
steps that need CUDA itself (cuda-tests, two GPUs) are skipped. A test runs it, so the script
cannot rot.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"
#: CifarAlexNet on Shapes after 3 epochs (docs/speed.md, "Measured"): 96.69-98.19 % top-1 over seeds 0-2
#: (fp32 and bf16 on a CPU); a GPU run below 95 % is a bug, not noise.
SHAPES_TOP1 = 95.0


class Failed(Exception):
    """A step's check did not hold; the message says what was seen."""


class Skipped(Exception):
    """A step that cannot run here (the message says why)."""


@dataclass
class Check:
    """What one run of the script needs to know and keeps."""

    out: Path
    rehearse: bool
    device: str
    gpus: int
    env: dict[str, str]
    kept: dict[str, Path] = field(default_factory=dict)  # checkpoints later steps start from

    @property
    def shapes(self) -> list[str]:
        """Shapes flags: the full run of docs/speed.md (3 epochs), or seconds' worth in a rehearsal."""
        if self.rehearse:
            return ["--shapes-train", "64", "--shapes-test", "32", "--batch-size", "32", "-ne", "1"]
        return ["-ne", "3"]

    def run(
        self,
        folder: str,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: int = 600,
        command: list[str] | None = None,
    ) -> subprocess.CompletedProcess:
        """``python main.py *args`` (or ``command``) in ``out/folder``; fails with its stderr's end."""
        cwd = self.out / folder
        cwd.mkdir(parents=True, exist_ok=True)
        argv = command or [sys.executable, str(ROOT / "main.py"), *args]
        result = subprocess.run(
            argv, cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout, check=False
        )
        (cwd / "output.txt").write_text(f"$ {' '.join(argv)}\n{result.stdout}\n{result.stderr}")
        if result.returncode != 0:
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])
            raise Failed(f"exit {result.returncode}: {tail}")
        return result

    def summary(self, folder: str) -> dict:
        """The summary.json of the one run in ``out/folder``."""
        (path,) = (self.out / folder / "runs").glob("*/*/summary.json")
        return json.loads(path.read_text())

    def last(self, folder: str) -> Path:
        (path,) = (self.out / folder / "checkpoints").glob("*/*/last.pt")
        return path

    def accurate(self, folder: str) -> str:
        """The run's top-1, which must reach the bar of docs/speed.md (not judged in a rehearsal)."""
        summary = self.summary(folder)
        top1 = summary["best_top1"]
        config = summary["config"]
        shown = f"top-1 {top1:.2f} %, amp {config['amp']}, channels-last {config['channels_last']}"
        if not self.rehearse and top1 < SHAPES_TOP1:
            raise Failed(f"{shown}: below the {SHAPES_TOP1} % of docs/speed.md")
        return shown


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def identical(a: Path, b: Path) -> str:
    wa, wb = weights(a), weights(b)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    if worst != 0:
        raise Failed(f"weights differ (largest difference {worst:.3g})")
    return f"{len(wa)} tensors bit-identical"


# --- the steps --------------------------------------------------------------------------------


def cuda_tests(c: Check) -> str:
    result = c.run(
        "cuda-tests",
        command=[sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", str(ROOT / "tests")],
    )
    return result.stdout.strip().splitlines()[-1]


def shapes_default(c: Check) -> str:
    c.run("shapes-default", "-c", "--seed", "1", "--device", c.device, *c.shapes)
    c.kept["gpu"] = c.last("shapes-default")
    (best,) = (c.out / "shapes-default" / "checkpoints").glob("*/*/best.pt")
    c.kept["best"] = best
    return c.accurate("shapes-default")


def shapes_compile(c: Check) -> str:
    env = {"TORCHDYNAMO_DISABLE": "1"} if c.rehearse else {}
    result = c.run("shapes-compile", "-c", "--seed", "1", "--compile", "--device", c.device, *c.shapes, env=env)
    if "model compiled with torch.compile" not in result.stderr:
        raise Failed("torch.compile fell back to eager: " + " ".join(result.stderr.split("unavailable here")[1:])[:200])
    return c.accurate("shapes-compile")


def shapes_fp16(c: Check) -> str:
    # A CPU has no fp16 convolution kernels worth the name (minutes for 64 images): a rehearsal
    # takes a handful, enough to run the loss scaler's path.
    shapes = ["--shapes-train", "8", "--shapes-test", "8", "--batch-size", "8", "-ne", "1"] if c.rehearse else c.shapes
    c.run("shapes-fp16", "-c", "--seed", "1", "--amp", "fp16", "--device", c.device, *shapes)
    return c.accurate("shapes-fp16")


def deterministic_flags(c: Check) -> list[str]:
    # Large enough that a GPU's second epoch outlasts the stop signal of kill-resume.
    shapes = c.shapes[:-2] if c.rehearse else ["--shapes-train", "20000", "--shapes-test", "1000"]
    return ["-c", "--deterministic", "--seed", "3", "-lls", "1", "--device", c.device, *shapes]


def deterministic(c: Check) -> str:
    for folder in ("deterministic-a", "deterministic-b"):
        c.run(folder, *deterministic_flags(c), "-ne", "2")
    c.kept["deterministic"] = c.last("deterministic-a")
    return identical(c.last("deterministic-a"), c.last("deterministic-b"))


def kill_resume(c: Check) -> str:
    if "deterministic" not in c.kept:
        raise Skipped("needs the deterministic step's run")
    cwd = c.out / "kill-resume"
    cwd.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(ROOT / "main.py"), *deterministic_flags(c), "-ne", "2"]
    process = subprocess.Popen(argv, cwd=cwd, env=c.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    for line in process.stderr:  # the first epoch's line: the kill lands in epoch 2
        seen.append(line)
        if "epoch 1/2" in line:
            process.send_signal(signal.SIGTERM)
            break
    seen.extend(process.stderr)
    code = process.wait(timeout=300)
    (cwd / "output.txt").write_text("".join(seen))
    if code == 0:
        raise Failed("the run finished before the stop signal reached it; give it more --shapes-train")
    if code != 128 + signal.SIGTERM:
        raise Failed(f"the stopped run exited {code}, not {128 + signal.SIGTERM}")
    resumed = c.run("kill-resume", "--resume", str(c.last("kill-resume")), "--device", c.device)
    where = next(
        (
            line.split("resumed after ")[1].split(" (")[0]
            for line in resumed.stderr.splitlines()
            if "resumed after " in line
        ),
        "?",
    )
    return f"resumed after {where}: " + identical(c.last("kill-resume"), c.kept["deterministic"])


def resume_gpu_cpu(c: Check) -> str:
    if "gpu" not in c.kept:
        raise Skipped("needs the shapes-default run")
    epochs = 2 if c.rehearse else 4
    result = c.run(
        "shapes-default",
        "--resume",
        str(c.kept["gpu"]),
        "-ne",
        str(epochs),
        "--device",
        "cpu",
        env={"ALEXNET_CUDA_STAND_IN": ""},
    )
    if f"epoch {epochs}/{epochs}" not in result.stderr:
        raise Failed(f"no epoch {epochs}")
    return f"epoch {epochs} trained on the CPU from the GPU's last.pt"


def resume_cpu_gpu(c: Check) -> str:
    shapes = c.shapes[:-2] if c.rehearse else ["--shapes-train", "1000", "--shapes-test", "200"]
    c.run("resume-cpu-gpu", "-c", "-ne", "1", "--device", "cpu", *shapes, env={"ALEXNET_CUDA_STAND_IN": ""})
    result = c.run("resume-cpu-gpu", "--resume", str(c.last("resume-cpu-gpu")), "-ne", "2", "--device", c.device)
    if "epoch 2/2" not in result.stderr:
        raise Failed("no second epoch")
    return "epoch 2 trained on the GPU (fused Adam) from the CPU's last.pt"


def imagenet_stream(c: Check) -> str:
    if not (SAMPLE / "train").is_dir():
        raise Failed(f"no ImageNet sample at {SAMPLE}")
    small = ["--workers", "2", "--train-size", "8", "--batch-size", "8"] if c.rehearse else ["--workers", "8"]
    result = c.run(
        "imagenet-stream",
        "-pm",
        "-pt",
        "-ds",
        "ImageNet",
        "--data-dir",
        str(SAMPLE),
        "-ne",
        "1",
        "--loader",
        "stream",
        "--device",
        c.device,
        "--cache-dir",
        str(c.out / "imagenet-stream" / "cache"),
        *small,
    )
    streaming = [line.split("streaming ", 1)[1] for line in result.stderr.splitlines() if "streaming " in line]
    if not streaming:
        raise Failed("the run did not stream")
    summary = c.summary("imagenet-stream")
    return f"{summary['train_size']} images streamed, top-1 {summary['best_top1']:.2f} % (1 epoch)"


def predict(c: Check) -> str:
    if "best" not in c.kept:
        raise Skipped("needs the shapes-default run")
    photos = sorted((SAMPLE / "train").glob("*/*"))[:4] if SAMPLE.is_dir() else []
    if not photos:
        raise Failed(f"no photos in {SAMPLE}")
    args = ["predict", "--checkpoint", str(c.kept["best"]), "--json", *map(str, photos)]
    here = c.run("predict", *args, "--device", c.device)
    cpu_only = c.run("predict", *args, env={"CUDA_VISIBLE_DEVICES": "", "ALEXNET_CUDA_STAND_IN": ""})
    if here.stdout.count("\n") != len(photos) or cpu_only.stdout.count("\n") != len(photos):
        raise Failed("not one line per photo")
    return f"{len(photos)} photos on {c.device}, and in a process that sees no GPU"


def export(c: Check) -> str:
    if "best" not in c.kept:
        raise Skipped("needs the shapes-default run")
    c.run(
        "export",
        "export",
        "--checkpoint",
        str(c.kept["best"]),
        "--format",
        "onnx",
        "--force",
        str(c.out / "export" / "model.onnx"),
    )
    return f"{(c.out / 'export' / 'model.onnx').stat().st_size / 1e6:.1f} MB ONNX, verified by onnxruntime"


def torchrun(c: Check, processes: int) -> str:
    if processes > max(1, c.gpus) and not c.rehearse:
        raise Skipped(f"needs {processes} GPUs, this machine has {c.gpus}")
    shapes = c.shapes if c.rehearse else ["--shapes-train", "2000", "--shapes-test", "400", "-ne", "1"]
    folder = f"torchrun-{processes}"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        str(ROOT / "main.py"),
        "-c",
        *shapes,
    ]
    if c.rehearse:
        argv.extend(["--device", "cpu"])
    result = c.run(folder, command=argv)
    backend = "gloo" if c.rehearse else "NCCL"
    if f"{processes} processes ({backend.lower()}" not in result.stderr.lower():
        raise Failed(f"no {backend} process group of {processes}")
    return f"{processes} process(es) over {backend}: " + c.accurate(folder).split(",")[0]


def split_gpus(c: Check) -> str:
    if c.gpus < 2 and not c.rehearse:
        raise Skipped(f"needs 2 GPUs, this machine has {c.gpus}")
    # The paper's network at 224: a rehearsal on a CPU takes a handful of images.
    shapes = ["--shapes-train", "8", "--shapes-test", "8", "--batch-size", "8"] if c.rehearse else []
    result = c.run("split-gpus", "-pm", "--split-gpus", "-ne", "1", "--device", c.device, *shapes)
    towers = next(line for line in result.stderr.splitlines() if "the two towers run on" in line)
    return towers.split("INFO")[-1].strip(" :")


def benchmark(c: Check) -> str:
    json_path = c.out / "benchmark" / "speed.json"
    extra = [
        "--quick",
        "--models",
        "CifarAlexNet",
        "--imagenet",
        "none",
        "--images",
        "256",
        "--train-steps",
        "1",
        "--batch-size",
        "32",
    ]
    extra = extra if c.rehearse else []
    compile_flag = [] if c.rehearse else ["--compile"]
    c.run(
        "benchmark",
        command=[
            sys.executable,
            str(ROOT / "benchmarks" / "speed.py"),
            "--device",
            c.device,
            *compile_flag,
            "--json",
            str(json_path),
            *extra,
        ],
    )
    figures = json.loads(json_path.read_text())
    ratios = {k.split(".")[0]: v for k, v in figures.items() if k.endswith("train.ratio")}
    return "training speed ours / usual: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())


STEPS: list[tuple[str, Callable[[Check], str], bool]] = [  # (name, step, needs CUDA itself)
    ("cuda-tests", cuda_tests, True),
    ("shapes-default", shapes_default, False),
    ("shapes-compile", shapes_compile, False),
    ("shapes-fp16", shapes_fp16, False),
    ("deterministic", deterministic, False),
    ("kill-resume", kill_resume, False),
    ("resume-gpu-cpu", resume_gpu_cpu, False),
    ("resume-cpu-gpu", resume_cpu_gpu, False),
    ("imagenet-stream", imagenet_stream, False),
    ("predict", predict, False),
    ("export", export, False),
    ("torchrun-1", lambda c: torchrun(c, 1), False),
    ("torchrun-2", lambda c: torchrun(c, 2), False),
    ("split-gpus", split_gpus, False),
    ("benchmark", benchmark, False),
]


def machine(rehearse: bool) -> dict[str, object]:
    if rehearse:
        return {
            "gpu": "none (rehearsal on the CPU, standing in for compute capability 9.0)",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def table(about: dict[str, object], results: list[dict[str, object]]) -> str:
    head = ", ".join(f"{k} {v}" for k, v in about.items())
    rows = [f"| {r['step']} | {r['result']} | {r['seconds']:.0f} s | {r['detail']} |" for r in results]
    return "\n".join([f"GPU check: {head}", "", "| step | result | time | detail |", "|---|---|---|---|", *rows]) + "\n"


#: The rehearsal's two lanes: each step after the ones it starts from (``Check.kept``).
REHEARSAL_LANES = (
    {
        "cuda-tests",
        "shapes-default",
        "shapes-compile",
        "shapes-fp16",
        "resume-gpu-cpu",
        "predict",
        "export",
        "imagenet-stream",
    },
    {"deterministic", "kill-resume", "resume-cpu-gpu", "torchrun-1", "torchrun-2", "split-gpus", "benchmark"},
)


def run_step(check: Check, name: str, step: Callable[[Check], str], needs_cuda: bool) -> dict[str, object]:
    """One step's result (passed, skipped or FAILED), seconds and details, printed as it ends."""
    start = time.perf_counter()
    try:
        if needs_cuda and check.rehearse:
            raise Skipped("needs CUDA itself")
        result, detail = "passed", step(check)
    except Skipped as why:
        result, detail = "skipped", str(why)
    except (Failed, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as error:
        result, detail = "FAILED", str(error) if isinstance(error, Failed) else f"{type(error).__name__}: {error}"
    seconds = time.perf_counter() - start
    print(f"{name:<16} {result:<8} {seconds:6.0f} s  {detail}", flush=True)
    return {"step": name, "result": result, "seconds": seconds, "detail": detail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a new folder for the runs and the report (default: gpu_check/<date>_<time>)",
    )
    parser.add_argument("--rehearse", action="store_true", help="run the steps on the CPU standing in for a GPU")
    parser.add_argument("--steps", nargs="*", default=None, help="only these steps (default: all)")
    args = parser.parse_args(argv)
    if not args.rehearse and not torch.cuda.is_available():
        print(
            "gpu_check: this machine has no usable CUDA GPU; run it on one, or rehearse it here with --rehearse.",
            file=sys.stderr,
        )
        return 2
    args.out = args.out or Path("gpu_check") / time.strftime("%Y-%m-%d_%H-%M-%S")
    if args.out.exists() and any(args.out.iterdir()):
        print(f"gpu_check: {args.out} is not empty; pass a new --out (earlier checks are kept).", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.rehearse:
        env["ALEXNET_CUDA_STAND_IN"] = "9.0"
    check = Check(
        args.out.resolve(),
        args.rehearse,
        "cpu" if args.rehearse else "cuda",
        0 if args.rehearse else torch.cuda.device_count(),
        env,
    )
    about = machine(args.rehearse)
    chosen = [step for step in STEPS if args.steps is None or step[0] in args.steps]
    if args.rehearse:
        # On a CPU nothing here is timed for the table, so two lanes of steps that need nothing of
        # each other run side by side (half the time on two cores); a GPU check runs one at a time.
        lanes = [[s for s in chosen if s[0] in LANE] for LANE in REHEARSAL_LANES]
    else:
        lanes = [chosen]
    with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
        done = [r for lane in pool.map(lambda lane: [run_step(check, *s) for s in lane], lanes) for r in lane]
    order = [name for name, _, _ in chosen]
    results = sorted(done, key=lambda r: order.index(r["step"]))
    report = {**about, "rehearsal": args.rehearse, "steps": results}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(table(about, results))
    print(f"\n{table(about, results)}\nwritten: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    return 1 if any(r["result"] == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
