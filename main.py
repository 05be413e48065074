"""AlexNet training tool: parse the command line, build data and model, hand over to the trainer.

python main.py -c                      # CifarAlexNet on the built-in Shapes data
python main.py -c -ds Shapes -ne 3     # three epochs
python main.py -pm -pt -ds Shapes      # the paper's network and training setup
tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from datasets import DATASETS, DataOptions, load_dataset
from network import build_model
from trainer import SETUPS, TrainConfig, Trainer
from utils import UserError, __version__, resolve_device, setup_logging

logger = logging.getLogger("alexnet")


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type for rates that must be above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: the seed tool's flags with their meanings, plus conventional long ones."""
    modern, paper = SETUPS["modern"], SETUPS["paper"]
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="AlexNet (Krizhevsky, Sutskever & Hinton, 2012) training tool: the paper's network, "
        "torchvision's variant and a 32x32 variant on Shapes, CIFAR-10/100 and Pascal VOC 2012.",
    )
    parser.add_argument("-v", "--version", action="version", version=f"alexnet {__version__}")
    parser.add_argument(
        "-d",
        "--dry_run",
        action="store_true",
        help="train without writing TensorBoard runs or checkpoints (default: off)",
    )
    parser.add_argument(
        "-l", "--log", action="store_true", help="also save the terminal output to log/<run-name>.log (default: off)"
    )
    parser.add_argument(
        "-c",
        "--cifar",
        action="store_true",
        help="use CifarAlexNet, the 32x32 network (default: off, TorchAlexNet at 224)",
    )
    parser.add_argument(
        "-pt",
        "--paper_train",
        action="store_true",
        help=f"train with the paper's setup: SGD, batch {paper.batch_size}, lr {paper.lr}, momentum "
        f"{paper.momentum}, weight decay {paper.weight_decay}, lr/10 on plateau (default: off, Adam)",
    )
    parser.add_argument(
        "-pm",
        "--paper_model",
        action="store_true",
        help="use the paper's network: PaperAlexNet, or with -c CifarAlexNet with the paper's "
        "features (LRN, two-GPU grouping, paper init) (default: off)",
    )
    parser.add_argument(
        "-ne",
        "--n_epoch",
        type=positive_int,
        default=200,
        help="maximum number of training epochs (default: %(default)s)",
    )
    parser.add_argument(
        "-es",
        "--early_stop",
        type=positive_int,
        default=50,
        help="stop after this many epochs without a better top-1 (default: %(default)s)",
    )
    parser.add_argument(
        "-lls",
        "--log_loss_step",
        type=positive_int,
        default=100,
        help="log the training loss every this many steps (default: %(default)s)",
    )
    parser.add_argument(
        "-lce",
        "--log_confusion_epoch",
        type=positive_int,
        default=10,
        help="save the confusion matrix every this many epochs and at the end (default: %(default)s)",
    )
    parser.add_argument(
        "-ds",
        "--dataset",
        default="Shapes",
        choices=list(DATASETS),
        help="data set to train on (default: %(default)s, generated, no download)",
    )
    parser.add_argument(
        "-m", "--message", default="", help="a note about this run, saved to the log and TensorBoard (default: none)"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("dataset"), help="folder holding the data sets (default: %(default)s)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("."),
        help="folder under which runs/, checkpoints/ and log/ are written (default: current folder)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"training batch size (default: {modern.batch_size}; {paper.batch_size} with -pt)",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"initial learning rate (default: {modern.lr} with Adam, {paper.lr} with -pt)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed for weights, shuffling and augmentation (default: %(default)s)"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="device to train on, e.g. cpu, cuda, cuda:1 (default: cuda when present, else cpu)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch the official CIFAR / VOC archive into --data-dir when it is not there (default: off)",
    )
    parser.add_argument(
        "--coarse-labels",
        action="store_true",
        help="train CIFAR-100 on its 20 coarse classes instead of the 100 fine ones (default: off)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder for the VOC 256x256 resize cache (default: alexnet_cache/ in the VOC folder, or "
        "~/.cache/alexnet when that is read-only)",
    )
    parser.add_argument(
        "--loader",
        choices=["auto", "memory", "stream"],
        default="auto",
        help="memory: whole data set on the training device; stream: read the VOC cache with DataLoader "
        "workers; auto: memory when it fits (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes when streaming (default: %(default)s)",
    )
    parser.add_argument(
        "--no-lrn",
        dest="lrn",
        action="store_false",
        help="drop local response normalisation from the paper's features, -pm only (default: keep)",
    )
    shapes = parser.add_argument_group("Shapes data set")
    shapes.add_argument(
        "--shapes-train",
        type=positive_int,
        default=DataOptions.shapes_train,
        help="number of generated training images (default: %(default)s)",
    )
    shapes.add_argument(
        "--shapes-test",
        type=positive_int,
        default=DataOptions.shapes_test,
        help="number of generated test images (default: %(default)s)",
    )
    shapes.add_argument(
        "--shapes-seed",
        type=int,
        default=DataOptions.shapes_seed,
        help="seed the images are generated from (default: %(default)s)",
    )
    return parser


def config_from_args(args: argparse.Namespace, device: torch.device) -> TrainConfig:
    """Resolve the flags and the chosen setup's defaults into one ``TrainConfig``."""
    setup_name = "paper" if args.paper_train else "modern"
    setup = SETUPS[setup_name]
    model = "CifarAlexNet" if args.cifar else "PaperAlexNet" if args.paper_model else "TorchAlexNet"
    return TrainConfig(
        dataset=args.dataset,
        model=model,
        cifar=args.cifar,
        paper_model=args.paper_model,
        paper_train=args.paper_train,
        lrn=args.lrn,
        setup=setup_name,
        optimizer=setup.optimizer,
        lr=args.lr if args.lr is not None else setup.lr,
        momentum=setup.momentum,
        weight_decay=setup.weight_decay,
        batch_size=args.batch_size if args.batch_size is not None else setup.batch_size,
        lr_factor=setup.lr_factor,
        plateau_patience=setup.plateau_patience,
        n_epoch=args.n_epoch,
        early_stop=args.early_stop,
        log_loss_step=args.log_loss_step,
        log_confusion_epoch=args.log_confusion_epoch,
        seed=args.seed,
        device=str(device),
        data_dir=str(args.data_dir),
        output_dir=str(args.output_dir),
        dry_run=args.dry_run,
        log=args.log,
        message=args.message,
        coarse_labels=args.coarse_labels,
        cache_dir=str(args.cache_dir or ""),
        loader=args.loader,
        workers=args.workers,
        shapes_train=args.shapes_train,
        shapes_test=args.shapes_test,
        shapes_seed=args.shapes_seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the process exit code."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.lrn and not args.paper_model:
        parser.error("--no-lrn only applies to the paper's features; add -pm")
    if args.cifar and DATASETS[args.dataset].image_size != 32:
        size = DATASETS[args.dataset].image_size
        parser.error(f"-c (CifarAlexNet, 32x32 inputs) cannot train on {args.dataset}'s {size}x{size} images; drop -c")
    if args.coarse_labels and args.dataset != "Cifar100":
        parser.error("--coarse-labels only applies to -ds Cifar100")
    if args.workers < 0:
        parser.error(f"argument --workers: must be 0 or more, got {args.workers}")
    setup_logging()
    try:
        device = resolve_device(args.device)
        config = config_from_args(args, device)
        data = load_dataset(
            config.dataset,
            DataOptions(
                data_dir=args.data_dir,
                download=args.download,
                coarse_labels=args.coarse_labels,
                cache_dir=args.cache_dir,
                shapes_train=config.shapes_train,
                shapes_test=config.shapes_test,
                shapes_seed=config.shapes_seed,
            ),
        )
        torch.manual_seed(config.seed)
        model = build_model(config.cifar, config.paper_model, data.num_classes, lrn=config.lrn)
        Trainer(config, model, data, device).fit()
    except UserError as error:
        logger.error("error: %s", error)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
