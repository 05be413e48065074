"""CIFAR training augmentation: our batched tensor pipeline against the usual torchvision one.

    python benchmarks/pipeline.py            # 50,000 images, median of three epochs each way
    python benchmarks/pipeline.py --quick    # 10,000 images, one epoch each way

Ours: the uint8 training set as one tensor, random crop (4-pixel padding) + mirror +
normalisation as batched tensor code (``datasets.BatchLoader`` + ``CifarPipeline``).
Usual: a torchvision ``CIFAR10``-style ``Dataset`` (PIL image per item) with ``RandomCrop(32,
padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, through a ``DataLoader``
with 2 workers. Both produce the same normalised float batches of 128; both are timed over full
epochs in the same process, on random images (the content does not change the cost).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import BatchLoader, CifarPipeline, Split, channel_stats


class UsualCifar(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: HWC uint8 array -> PIL -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def epoch_rate(batches, n: int) -> float:
    """Images per second over one pass of ``batches`` (touching each batch so nothing is lazy)."""
    start = time.perf_counter()
    total = 0.0
    for x, _ in batches:
        total += float(x[0, 0, 0, 0])
    return n / (time.perf_counter() - start)


def measure(n: int, repeats: int = 3, batch_size: int = 128, workers: int = 2, seed: int = 0) -> dict[str, float]:
    """Median images/s of ``repeats`` epochs each way, the two ways taking turns so that any
    slow spell of the machine hits both."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n)

    split = Split(torch.from_numpy(images), torch.from_numpy(labels))
    mean, std = channel_stats(split.images)
    ours = BatchLoader(split, batch_size, CifarPipeline(mean, std, 32), train=True,
                       generator=torch.Generator().manual_seed(seed),
                       index_generator=torch.Generator().manual_seed(seed))  # fmt: skip
    epoch_rate(ours, n)  # warm-up: first-call allocations

    usual_transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean.tolist(), std.tolist()),
    ])  # fmt: skip
    dataset = UsualCifar(images.transpose(0, 2, 3, 1).copy(), labels, usual_transform)
    usual = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    ours_rates, usual_rates = [], []
    for _ in range(repeats):
        ours_rates.append(epoch_rate(ours, n))
        usual_rates.append(epoch_rate(usual, n))
    ours_rate, usual_rate = statistics.median(ours_rates), statistics.median(usual_rates)
    return {"ours_img_s": ours_rate, "usual_img_s": usual_rate, "ratio": ours_rate / usual_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 images instead of 50,000 (default: off)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (default: none)")
    args = parser.parse_args()
    n = 10_000 if args.quick else 50_000
    result = measure(n, repeats=1 if args.quick else 3)
    result.update(images=n, hardware=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                  torch=torch.__version__)  # fmt: skip
    print(f"CIFAR augmentation, {n} images, batch 128, {result['hardware']}, torch {result['torch']}")
    print(f"  ours  (batched tensor code):          {result['ours_img_s']:>10,.0f} images/s")
    print(f"  usual (PIL per image, 2 workers):     {result['usual_img_s']:>10,.0f} images/s")
    print(f"  ratio:                                {result['ratio']:>10.1f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
