"""``python main.py prepare -ds ImageNet --data-dir D``: build a data set's resize cache (both
splits) without training, then print where it is and its size.

Training builds the same cache on first use; this lets it happen ahead, on a machine or at a
time of one's choosing, with every core (``--workers``) and a progress bar.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from data.core import DataOptions
from data.folders import cache_dir_for
from data.imagenet import find_imagenet_root
from data.registry import load_dataset
from data.voc import find_voc_folder, voc_cache_dir
from settings.rules import Check

logger = logging.getLogger(__name__)

#: The data sets with a resize cache, and where each one's cache goes.
CACHE_DIRS: dict[str, Callable[[DataOptions], Path]] = {
    "ImageNet": lambda o: cache_dir_for(find_imagenet_root(o.data_path)[0], o, "imagenet"),
    "ImageFolder": lambda o: cache_dir_for(o.data_path, o, "folder"),
    "PascalVOC2012": lambda o: voc_cache_dir(find_voc_folder(o), o),
}


def _arg(name: str) -> Callable[[str], object]:
    """The argparse type of ``DataOptions.<name>``: the rule a checkpoint's value obeys too."""
    check: Check = DataOptions.__dataclass_fields__[name].metadata["check"]
    return check.parse


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-ds",
        "--dataset",
        required=True,
        choices=list(CACHE_DIRS),
        metavar="DATASET",
        help=f"data set whose cache to build: {', '.join(CACHE_DIRS)}",
    )
    parser.add_argument(
        "--data-dir",
        type=_arg("data_dir"),
        default=DataOptions.data_dir,
        help="folder holding the data set (default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        type=_arg("cache_dir"),
        default="",
        help="folder for the cache (default: alexnet_cache/ in the data set's folder, or "
        "~/.cache/alexnet when that is read-only)",
    )
    parser.add_argument(
        "--workers",
        type=_arg("resize_workers"),
        default=0,
        help="processes that decode and resize (default: one per core)",
    )
    parser.add_argument(
        "-c",
        "--cifar",
        action="store_true",
        help="ImageFolder: resize to 32x32, for the 32x32 network (default: 256x256)",
    )
    parser.add_argument(
        "--val-fraction",
        type=_arg("val_fraction"),
        default=DataOptions.val_fraction,
        help="ImageFolder without val/: the share of each class held out (default: %(default)s)",
    )
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument(
        "--train-fraction",
        type=_arg("train_fraction"),
        default=1.0,
        help="cache only this class-stratified share of the training split (default: all)",
    )
    subset.add_argument(
        "--train-size",
        type=_arg("train_size"),
        default=0,
        help="cache only this many training images, class-stratified (default: all)",
    )
    return parser


def folder_bytes(folder: Path) -> int:
    """The total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: Sequence[str]) -> int:
    """Build the cache of both splits; print where it is and how large it is."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.dataset != "ImageFolder" and (args.cifar or "--val-fraction" in argv):
        parser.error(f"-c and --val-fraction only apply to -ds ImageFolder; {args.dataset} has its own size and split")
    options = DataOptions(
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        resize_workers=args.workers,
        image_size=32 if args.cifar else 256,
        val_fraction=args.val_fraction,
        train_fraction=args.train_fraction,
        train_size=args.train_size,
    )
    data = load_dataset(args.dataset, options)
    cache = CACHE_DIRS[args.dataset](options)
    size = folder_bytes(cache)
    print(
        f"{args.dataset}: {len(data.train)} training and {len(data.test)} evaluation images, "
        f"{data.image_size}x{data.image_size}, cached in {cache} ({size / 1e6:.1f} MB in all)"
    )
    return 0
