"""Our training path against the usual one, side by side in one run, for the three AlexNets.

    python benchmarks/speed.py                      # all three models, full measurement
    python benchmarks/speed.py --quick              # under a minute on a 2-core CPU
    python benchmarks/speed.py --json speed.json    # also write the figures
    python benchmarks/speed.py --device cuda --compile
    python benchmarks/speed.py --models --workers 2   # only the ImageNet case (real photos)

For each model it measures, in the same process and on the same random images:

(a) the data pipeline alone. Ours: the uint8 training set as one tensor on the device and the
    batched augmentation of ``datasets`` (CifarAlexNet: crop + mirror; TorchAlexNet: the
    modern random-resized crop; PaperAlexNet: the paper's mean image, PCA colour, random crop
    and mirror). Usual: a ``Dataset`` returning one PIL image per item with the matching
    torchvision transforms, batched by a ``DataLoader`` with ``--workers`` processes.
(b) training steps. Ours: ``trainer.TrainStep`` on the device's default fast path (bf16
    autocast and channels-last on CUDA and on CPUs with native bf16, else fp32; ``--compile``
    adds torch.compile) fed by
    our pipeline, with no host sync until the end. Usual: an fp32 eager loop fed by the usual
    pipeline that copies each batch to the device and reads ``loss.item()`` every step.

(c) ImageNet-style, on the real photos of ``--imagenet`` (``shared/data/imagenet-sample``; skipped
    with a message where absent): the one-time preparation (``data.shards.shard_split``: decode,
    resize to 256, re-encode as JPEG shards), which runs on the CPU whatever the training device,
    in images/s per core of its ``--workers`` processes, and the training pipeline on the
    prepared cache. Ours: the shards streamed by a ``BatchLoader`` whose ``--workers`` DataLoader
    workers decode the stored 256x256 JPEGs and (on a CPU) apply the batched random-resized
    crop + flip + normalise. Usual: torchvision ``ImageFolder`` with PIL ``RandomResizedCrop(224)``,
    flip and normalise on the original photos, through a ``DataLoader`` with the same workers.
    GPU figures (nvJPEG) are printed as not yet measured where no GPU ran them.

Both sides use Adam, batch ``--batch-size`` and warm up (worker start-up, first-call
allocations, cuDNN autotuning, compilation) before the clock starts. Model FLOP utilisation is
3 x the forward FLOPs of one image (forward + backward) x images/s / peak, where the peak is
the fastest large matmul timed in the same run in the precision the path's convolutions compute
in: ours in its autocast dtype (bf16) where it autocasts; the usual fp32 loop in TF32 on a CUDA
card with TF32 tensor cores (compute capability 8.0 and newer) while cuDNN's fp32 convolutions
may use them (PyTorch's default), else fp32. The JSON names each path's peak (precision and
source); a datasheet peak, where the card is identified by name and compute capability (the
H100 SXM), is recorded beside the measured ones for reference.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import DataSet, Split, channel_stats, make_loaders, make_pipeline, mean_image, rgb_eigen
from hardware.capabilities import Capabilities
from network import CifarAlexNet, PaperAlexNet, TorchAlexNet
from trainer import (
    AMP_DTYPES,
    TrainStep,
    compile_model,
    prepare_model,
    training_loss,
)

#: Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, by card and precision. Only the
#: H100 SXM's: the PCIe H100 (756 TFLOP/s dense bf16) and the H100 NVL share its compute
#: capability 9.0 and most of its name, so ``datasheet_card`` must tell them apart.
DATASHEET_PEAKS = {("H100 SXM", "bf16"): 989e12}


class PILImages(torch.utils.data.Dataset):
    """What torchvision's data sets do per item: an HWC uint8 array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class Lighting:
    """The per-image PCA colour shift as AlexNet scripts usually write it (on a CHW float)."""

    def __init__(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, sigma: float = 0.1) -> None:
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.sigma = sigma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.sigma
        return x + (self.eigenvectors @ (alpha * self.eigenvalues)).view(3, 1, 1)


@dataclass
class Case:
    """One model with its input data and both pipelines (ours: the trainer's, from ``make_loaders``)."""

    name: str
    build: Callable[[], torch.nn.Module]
    image_size: int  # stored images (32, or 256 after the resize cache)
    input_size: int  # the model's input
    paper: bool  # ours: the paper's setup (``-pt``)
    usual: Callable[[Split], Callable]  # -> per-image transform


def cifar_case() -> Case:
    def usual(split: Split):
        mean, std = channel_stats(split.images)
        return transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean.tolist(), std.tolist()),
            ]
        )

    return Case("CifarAlexNet", lambda: CifarAlexNet(10), 32, 32, False, usual)


def torch_case() -> Case:
    def usual(split: Split):
        mean, std = channel_stats(split.images)
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=(0.25, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean.tolist(), std.tolist()),
            ]
        )

    return Case("TorchAlexNet", lambda: TorchAlexNet(1000), 256, 224, False, usual)


def paper_case() -> Case:
    def usual(split: Split):
        values, vectors = rgb_eigen(split.images)
        mean = (mean_image(split.images) / 255).mean((1, 2))
        return transforms.Compose(
            [
                transforms.RandomCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                Lighting(values.float(), vectors.float()),
                transforms.Normalize(mean.tolist(), [1 / 255] * 3),
            ]
        )

    # The text's network and pipeline (--fidelity text): the torchvision transforms above are its
    # order, and the timings stay comparable with those recorded before --fidelity existed.
    return Case("PaperAlexNet", lambda: PaperAlexNet(1000, fidelity="text"), 256, 224, True, usual)


CASES = {"CifarAlexNet": cifar_case, "TorchAlexNet": torch_case, "PaperAlexNet": paper_case}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(batches: Iterator, steps: int, batch_size: int, device: torch.device, consume: Callable) -> float:
    """Images per second over ``steps`` batches after one warm-up batch."""
    consume(*next(batches))
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        consume(*next(batches))
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def forever(make: Callable[[], Iterator]) -> Iterator:
    while True:
        yield from make()


def to_device(device: torch.device) -> Callable:
    """The pipeline's last step: the batch on ``device`` (a no-op for ours, already there)."""

    def consume(x: torch.Tensor, y: torch.Tensor) -> None:
        x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return consume


def usual_loader(split: Split, case: Case, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    dataset = PILImages(split.images.permute(0, 2, 3, 1).numpy(), split.labels.numpy(), case.usual(split))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def forward_flops(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one image's forward pass (a multiply-add counts two)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Peak:
    """A peak in FLOP/s, the precision it is in (fp32, tf32, bf16) and where it comes from."""

    flops: float
    precision: str
    source: str


def cudnn_conv_setting() -> str:
    """cuDNN's fp32 convolution setting as ATen resolves it: the convolutions' own, else cuDNN's,
    else the global one ("none" defers to the next; PyTorch's default for convolutions is tf32)."""
    backends = torch.backends
    for setting in (backends.cudnn.conv.fp32_precision, backends.cudnn.fp32_precision, backends.fp32_precision):
        if setting != "none":
            return setting
    return "ieee"


def fp32_conv_precision(device_type: str, capability: tuple[int, int] | None, cudnn_conv: str) -> str:
    """The precision an fp32 model's convolutions compute in: TF32 on CUDA cards with TF32 tensor
    cores (compute capability 8.0, Ampere, and newer) where ``cudnn_conv`` allows it, else fp32."""
    if device_type == "cuda" and capability is not None and capability >= (8, 0) and cudnn_conv == "tf32":
        return "tf32"
    return "fp32"


def path_precisions(amp: str, fp32: str) -> dict[str, str]:
    """The precision each training path computes in: the usual fp32 loop in ``fp32`` (what fp32
    convolutions use), ours in its autocast dtype, or like the usual loop without autocast."""
    return {"usual": fp32, "ours": fp32 if amp == "off" else amp}


def datasheet_card(name: str, capability: tuple[int, int] | None) -> str | None:
    """The card of ``DATASHEET_PEAKS`` that ``name`` and ``capability`` identify for certain, or
    None. An H100 SXM reports compute capability 9.0 and a name that says SXM or its HBM3 memory
    ("NVIDIA H100 80GB HBM3"); the PCIe and NVL cards name themselves so."""
    if capability != (9, 0) or "H100" not in name or "PCIe" in name or "NVL" in name:
        return None
    return "H100 SXM" if "SXM" in name or "HBM3" in name else None


def datasheet_peak(name: str, capability: tuple[int, int] | None, precision: str) -> Peak | None:
    """The datasheet's dense peak in ``precision`` of the identified card, where it is known."""
    card = datasheet_card(name, capability)
    flops = DATASHEET_PEAKS.get((card, precision))
    return None if flops is None else Peak(flops, precision, f"datasheet: {card} dense {precision}")


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """fp32 matmuls in TF32 (``tf32``) or in full fp32 (else) for the block, the settings as they
    were afterwards. ``set_float32_matmul_precision`` sets the legacy and the new (fp32_precision)
    flags together: setting only one is refused as a mix of the two APIs."""
    saved = torch.get_float32_matmul_precision()
    backends = torch.backends
    flags = backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)
        backends.cuda.matmul.fp32_precision, backends.mkldnn.matmul.fp32_precision = flags


def measured_peak(device: torch.device, precision: str) -> Peak:
    """The fastest of several large matmuls in ``precision`` on ``device`` (TF32: fp32 operands
    with TF32 matmuls allowed for the measurement only)."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = AMP_DTYPES.get(precision) or torch.float32  # fp32 operands for fp32 and tf32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    with matmul_precision(precision):
        a @ b
        synchronize(device)
        for _ in range(5):  # the fastest of several: a peak, not an average
            start = time.perf_counter()
            a @ b
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return Peak(2 * n**3 / best, precision, f"measured: fastest of 5 {n}x{n} {precision} matmuls in this run")


def preparation_label(workers: int) -> str:
    """Where the ImageNet preparation (``shard_split``) runs: worker processes on the CPU, whatever
    the training device."""
    return f"CPU, {workers} worker process{'es' if workers != 1 else ''}"


def measure(case: Case, args: argparse.Namespace, device: torch.device, peaks: dict[str, Peak]) -> dict[str, float]:
    """Pipeline and training images/s, ours and usual, for one model."""
    size = case.input_size
    quick = args.quick
    big = case.image_size > 32
    batch = args.batch_size or (128 if not big or device.type == "cuda" else 16)
    images = args.images or (50_000 if not big else 2_048) // (10 if quick else 1)
    images = max(images, 4 * batch)
    g = torch.Generator().manual_seed(0)
    split = Split(
        torch.randint(0, 256, (images, 3, case.image_size, case.image_size), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (images,), generator=g),
    )
    # Ours: the trainer's training loader (the split on the device, seeds 0); nothing is evaluated.
    data = DataSet(case.name, [str(c) for c in range(10)], split, Split(split.images[:1], split.labels[:1]))
    ours_loader = make_loaders(
        data, size, case.paper, device, batch_size=batch, eval_batch_size=batch, loader="memory", fidelity="text"
    ).train
    # Drop each epoch's last partial batch so every timed batch is full on both sides.
    full = len(split) // batch

    def ours_batches() -> Iterator:
        return itertools.islice(iter(ours_loader), full)

    usual = usual_loader(split, case, batch, args.workers)
    pipe_steps = max(2, full - 2) if not quick else max(2, min(full - 2, 8 if big else 30))
    out: dict[str, float] = {}
    out["pipeline.ours_img_s"] = rate(forever(ours_batches), pipe_steps, batch, device, to_device(device))
    out["pipeline.usual_img_s"] = rate(forever(lambda: iter(usual)), pipe_steps, batch, device, to_device(device))

    # Training: the same initial weights on both sides.
    torch.manual_seed(0)
    reference = case.build()
    flops = 3 * forward_flops(reference, size)
    train_steps = args.train_steps or ((2 if big else 4) if quick else (10 if big and device.type == "cpu" else 50))

    hw = Capabilities.of(device)
    amp, channels_last = hw.amp, hw.channels_last
    model = prepare_model(case.build(), device, channels_last)
    model.load_state_dict(reference.state_dict())
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=hw.fused_optimizer or None)
    if args.compile:
        warm = next(iter(ours_batches()))

        def warm_up(m: torch.nn.Module) -> None:
            training_loss(m, F.cross_entropy, *warm, amp, channels_last).backward()

        model = compile_model(model, warm_up)
    step = TrainStep(model, optimizer, F.cross_entropy, device, amp, channels_last)
    out["train.ours_img_s"] = rate(forever(ours_batches), train_steps, batch, device, step)

    plain = case.build().to(device)
    plain.load_state_dict(reference.state_dict())
    plain.train()
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-4)

    def usual_step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device), y.to(device)
        if x.shape[-1] != size:  # 32x32 images for a 224 model: the usual upsampling
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(plain(x), y)
        plain_optimizer.zero_grad()
        loss.backward()
        plain_optimizer.step()
        loss.item()  # the usual running-loss bookkeeping: a host sync every step

    out["train.usual_img_s"] = rate(forever(lambda: iter(usual)), train_steps, batch, device, usual_step)
    for part in ("pipeline", "train"):
        out[f"{part}.ratio"] = out[f"{part}.ours_img_s"] / out[f"{part}.usual_img_s"]
    # Each path against the peak of the precision it computes in.
    out["train.ours_mfu"] = flops * out["train.ours_img_s"] / peaks["ours"].flops
    out["train.usual_mfu"] = flops * out["train.usual_img_s"] / peaks["usual"].flops
    out["pipeline_over_train"] = out["pipeline.ours_img_s"] / out["train.ours_img_s"]
    out["batch_size"] = batch
    out["forward_gflops_per_image"] = flops / 3 / 1e9
    out["amp"] = amp
    out["channels_last"] = channels_last
    return out


IMAGENET_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def imagenet_case(
    folder: Path, workers: int, batch_size: int, epochs: int, device: torch.device, repeat: int = 4
) -> dict[str, object]:
    """Preparation throughput and training-pipeline throughput, ours against the usual, on the
    class folders of ``folder/train`` (see the module docstring, part (c)), each photo taken
    ``repeat`` times so that an epoch outlasts the DataLoader workers' start (both sides)."""
    import tempfile

    import torchvision.io  # noqa: F401 (imported once here, not inside the timed preparation)
    from torchvision.datasets import ImageFolder

    from data.loaders import BatchLoader
    from data.shards import shard_split

    usual_set = ImageFolder(
        str(folder / "train"),
        transform=transforms.Compose(
            [
                transforms.RandomResizedCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        ),
    )
    usual_set.samples = usual_set.samples * repeat
    paths = [Path(path) for path, _ in usual_set.samples]
    labels = torch.tensor([label for _, label in usual_set.samples])
    figures: dict[str, object] = {"images": len(paths) // repeat, "workers": workers}
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        # Shards of 16 here, so that every worker has some (1,024 on real data).
        split = shard_split(paths, labels, Path(cache), "train", 256, workers=workers, shard_images=16)
        seconds = time.perf_counter() - start
        figures["prepare.img_s_per_core"] = len(paths) / seconds / workers
        figures["prepare.ran_on"] = preparation_label(workers)
        figures["cache.jpeg_bytes_per_image"] = sum(int(o[-1] - o[0]) for o in split.images.offsets) / len(paths)
        pipeline = make_pipeline(split, 224, False, device)
        ours = BatchLoader(
            split,
            batch_size,
            pipeline,
            True,
            device,
            generator=torch.Generator(device).manual_seed(0),
            index_generator=torch.Generator().manual_seed(0),
            workers=workers,
        )
        usual = torch.utils.data.DataLoader(usual_set, batch_size=batch_size, shuffle=True, num_workers=workers)
        for name, loader in (("ours", ours), ("usual", usual)):
            for _ in loader:  # warm-up epoch: page cache, first allocations
                pass
            start = time.perf_counter()
            count = 0
            for _ in range(epochs):
                for images, _labels in loader:
                    images.to(device)
                    count += len(images)
            synchronize(device)
            figures[f"pipeline.{name}_img_s"] = count / (time.perf_counter() - start)
    figures["pipeline.ratio"] = figures["pipeline.ours_img_s"] / figures["pipeline.usual_img_s"]
    return figures


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per measurement, < 1 min on 2 CPU cores (default: off)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (default: none)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--models",
        nargs="*",
        choices=list(CASES),
        default=list(CASES),
        help="models to measure; none: only the ImageNet case (default: all three)",
    )
    parser.add_argument(
        "--imagenet",
        type=Path,
        default=IMAGENET_SAMPLE,
        help="ImageNet-style photos in "
        "train/<class>/ for part (c); 'none' skips it (default: shared/data/imagenet-sample)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=0, help="batch size (default: 128; 16 for the 224 models on a CPU)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        help="images in the synthetic training set (default: 50,000 at 32x32, 2,048 at 256x256; a tenth with --quick)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="timed training steps per side (default: 50; 10 for the 224 models on a CPU; 4 / 2 with --quick)",
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the usual side (default: 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our side (default: off)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    card, capability = "", None  # the GPU's name and compute capability
    if device.type == "cuda":
        card, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    fp32 = fp32_conv_precision(device.type, capability, cudnn_conv_setting())
    precisions = path_precisions(Capabilities.of(device).amp, fp32)
    measured = {precision: measured_peak(device, precision) for precision in sorted(set(precisions.values()))}
    peaks = {path: measured[precision] for path, precision in precisions.items()}
    figures: dict[str, object] = {
        "hardware": hardware(device),
        "torch": torch.__version__,
        "device": str(device),
        "quick": args.quick,
        "compile": args.compile,
        "peaks": {path: asdict(peak) for path, peak in peaks.items()},
    }
    print(
        f"{figures['hardware']}, torch {torch.__version__}; peaks: "
        + ", ".join(f"{path} {p.precision} {p.flops / 1e12:.3g} TFLOP/s" for path, p in peaks.items())
        + " (measured in this run)"
    )
    reference = datasheet_peak(card, capability, precisions["ours"])
    if reference is not None:  # beside the measured peak, which the MFU is against
        figures["datasheet_peak"] = asdict(reference)
        print(f"  for reference, {reference.source}: {reference.flops / 1e12:.3g} TFLOP/s")
    print(f"{'model':<14}{'part':<10}{'ours img/s':>12}{'usual img/s':>13}{'ratio':>8}{'MFU ours':>10}{'batch':>7}")
    for name in args.models:
        result = measure(CASES[name](), args, device, peaks)
        figures.update({f"{name}.{key}": value for key, value in result.items()})
        for part in ("pipeline", "train"):
            mfu = f"{100 * result['train.ours_mfu']:.1f}%" if part == "train" else ""
            print(
                f"{name:<14}{part:<10}{result[part + '.ours_img_s']:>12,.0f}{result[part + '.usual_img_s']:>13,.0f}"
                f"{result[part + '.ratio']:>7.1f}x{mfu:>10}{result['batch_size']:>7}"
            )
    if str(args.imagenet) != "none":
        figures.update(report_imagenet(args, device))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


def report_imagenet(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Part (c), printed, and its figures under ``ImageNet.``; a message where the photos are absent."""
    if not (args.imagenet / "train").is_dir():
        print(f"ImageNet case skipped: no train/<class>/ photos in {args.imagenet} (pass --imagenet DIR)")
        return {}
    batch = args.batch_size or 16
    result = imagenet_case(args.imagenet, args.workers, batch, 2 if args.quick else 5, device)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    print(
        f"ImageNet-style, {result['images']} real photos (each taken 4 times), {args.workers} workers, "
        f"batch {batch} (load average now {load}: the ratio is meaningful only on a quiet machine):"
    )
    print(
        f"  preparation (decode, resize 256, JPEG q95 shards) on the {result['prepare.ran_on']}: "
        f"{result['prepare.img_s_per_core']:,.1f} images/s per core, "
        f"{result['cache.jpeg_bytes_per_image'] / 1e3:.1f} KB of JPEG per image"
    )
    print(
        f"  training pipeline on {device.type}: ours {result['pipeline.ours_img_s']:,.0f} img/s, usual "
        f"(ImageFolder + PIL RandomResizedCrop) {result['pipeline.usual_img_s']:,.0f} img/s, "
        f"{result['pipeline.ratio']:.1f}x"
    )
    if device.type != "cuda":
        print("  GPU (nvJPEG decode + batched augmentation): not yet measured")
    return {f"ImageNet.{key}": value for key, value in result.items()}


if __name__ == "__main__":
    main()
