"""AlexNet training tool: parse the command line, build data and model, hand over to the trainer.

python main.py -c                                   # CifarAlexNet on the built-in Shapes data
python main.py -c -ds Cifar10 --data-dir dataset    # CIFAR-10
python main.py -pm -pt -ds PascalVOC2012            # the paper's network and training setup
python main.py --resume checkpoints/Shapes/<run>/last.pt
python main.py --evaluate checkpoints/Shapes/<run>/best.pt
python main.py -ds Cifar10 --weights alexnet-owt-7be5be79.pth   # fine-tune torchvision's ImageNet weights
python main.py prepare -ds ImageNet --data-dir /data       # the one-time resize, before training
python main.py predict --checkpoint best.pt photo.jpg      # also: export, figures (COMMANDS)
tensorboard --logdir runs
"""

from __future__ import annotations

import signal
import sys


def _stopped_while_starting(signum: int, frame: object) -> None:
    # Further stops are ignored from here on: one arriving while this exit unwinds would raise
    # again (a traceback from threading's shutdown), and one arriving once the interpreter has put
    # the default handlers back, on its way out, would kill the process (-2 instead of 130).
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    sys.stderr.write(f"stopped by {signal.Signals(signum).name} while starting; nothing was written\n")
    sys.exit(128 + signum)


if __name__ == "__main__":
    # Loading torch takes a second or two: a stop during it ends quietly, not with a traceback.
    # Installed before the other imports, so that the window without it is Python's own start.
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _stopped_while_starting)

import argparse
import importlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from data.loaders import lost_worker
from datasets import DATASETS, DataOptions, load_dataset
from hardware.capabilities import Capabilities, capabilities, resolve_device
from network import MODELS, SplitPaperAlexNet, make_model, model_name, split_devices
from settings.rules import Check
from trainer import (
    AMP_DTYPES,
    TrainConfig,
    Trainer,
    evaluate_checkpoint,
    format_metrics,
    load_checkpoint,
    load_weights,
)
from training.config import PER_PROCESS, code_version, may_change, resolve
from training.distributed import (
    DIST_TIMEOUT_MINUTES,
    Interrupted,
    StopSignals,
    data_peers,
    init_distributed,
    launched_by_torchrun,
    lost_process,
    rank_and_world,
)
from training.optim import grouped_optimizer_state
from training.outputs import RunFolders, claim_run, output_dir_of
from training.weights import load_initial_weights
from utils import FIDELITIES, UserError, __version__, name_problem, quoted, setup_logging

logger = logging.getLogger("alexnet")


def number_type(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> Any:  # fmt: skip
    """An argparse type: ``kind`` within [low, high] (open ends where asked), with the reason
    in one sentence when not (``utils.Check``, the rule checkpoints are held to as well)."""
    return Check(kind, low, high, low_open, high_open).parse


def setting_type(name: str) -> Any:
    """The argparse type of a flag that sets ``TrainConfig.<name>``: that field's own rule."""
    return TrainConfig.check(name).parse


def run_name_type(text: str) -> str:
    """A run name usable as one folder name (the rule every name that becomes a path follows)."""
    problem = name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{quoted(text)} cannot be a folder name: it {problem}; use letters, digits, "
                                         "- _ .")  # fmt: skip
    return text


def path_type(text: str) -> Path:
    """A path the run records: valid UTF-8 text (JSON, TensorBoard and the log need it)."""
    return Path(Check(str, path=True).parse(text))


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: the seed tool's flags with their meanings, plus conventional long ones."""
    modern, paper = resolve("modern", {}), resolve("paper", {})
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="AlexNet (Krizhevsky, Sutskever & Hinton, 2012) training tool: the paper's network, "
        "torchvision's variant and a 32x32 variant on Shapes, CIFAR-10/100, Pascal VOC 2012, ImageNet and your own "
        "class folders (ImageFolder).",
    )
    add = parser.add_argument
    add("-v", "--version", action="version", version=f"alexnet {__version__}")
    add(
        "-d",
        "--dry_run",
        action="store_true",
        help="train without writing TensorBoard runs or checkpoints (default: off)",
    )
    add("-l", "--log", action="store_true", help="also save the terminal output to log/<run-name>.log (default: off)")
    add(
        "-c",
        "--cifar",
        action="store_true",
        help="use CifarAlexNet, the 32x32 network (default: off, TorchAlexNet at 224)",
    )
    add(
        "-pt",
        "--paper_train",
        action="store_true",
        help=f"train with the paper's setup: SGD with the paper's update rule, batch {paper.batch_size}, lr {paper.lr}, "
        f"momentum {paper.momentum}, weight decay {paper.weight_decay}, lr/10 on plateau at most {paper.max_lr_drops} "
        f"times, stop at the next plateau or after {paper.n_epoch} epochs, 10-crop evaluation at 224 "
        "(default: off, the modern setup with Adam)",
    )
    add(
        "-pm",
        "--paper_model",
        action="store_true",
        help="use the paper's network: PaperAlexNet, or with -c CifarAlexNet with the paper's features (LRN, "
        "two-GPU grouping, paper init) (default: off)",
    )
    add(
        "-ne",
        "--n_epoch",
        type=setting_type("n_epoch"),
        default=None,
        help=f"maximum number of training epochs (default: {modern.n_epoch}; {paper.n_epoch} with -pt)",
    )
    add(
        "-es",
        "--early_stop",
        type=setting_type("early_stop"),
        default=None,
        help="stop after this many epochs without a better top-1 / mAP, 0 never (default: "
        f"{modern.early_stop}; with -pt off: the run stops at the plateau after the last lr drop)",
    )
    add(
        "-lls",
        "--log_loss_step",
        type=setting_type("log_loss_step"),
        default=100,
        help="log the training loss every this many steps (default: %(default)s)",
    )
    add(
        "-lce",
        "--log_confusion_epoch",
        type=setting_type("log_confusion_epoch"),
        default=10,
        help="save the confusion matrix (figure and CSV) every this many epochs and at the end (default: %(default)s)",
    )
    add(
        "-ds",
        "--dataset",
        default="Shapes",
        choices=list(DATASETS),
        metavar="DATASET",
        help=f"data set to train on: {', '.join(DATASETS)} (default: %(default)s, generated, no download)",
    )
    add(
        "-m",
        "--message",
        type=setting_type("message"),
        default="",
        help="a note about this run, saved to the log and TensorBoard (default: none)",
    )

    paths = parser.add_argument_group("data and outputs")
    paths.add_argument(
        "--data-dir",
        type=path_type,
        default=Path("dataset"),
        help="folder holding the data sets (default: %(default)s)",
    )
    paths.add_argument(
        "--output-dir",
        type=path_type,
        default=Path("."),
        help="folder under which runs/, checkpoints/ and log/ are written (default: current folder)",
    )
    paths.add_argument(
        "--run-name",
        type=run_name_type,
        default=None,
        help="name of the run's folders under runs/, checkpoints/ and log/; must be new "
        "(default: <date>_<time>_<dataset>_<model>_<setup>)",
    )
    paths.add_argument(
        "--download",
        action="store_true",
        help="fetch the official CIFAR / VOC archive into --data-dir when it is not there (default: off)",
    )
    paths.add_argument(
        "--coarse-labels",
        action="store_true",
        help="train CIFAR-100 on its 20 coarse classes instead of the 100 fine ones (default: off)",
    )
    paths.add_argument(
        "--cache-dir",
        type=path_type,
        default=None,
        help="folder for the resize cache of VOC, ImageNet and ImageFolder (default: alexnet_cache/ in the data "
        "set's folder, or ~/.cache/alexnet when that is read-only)",
    )
    paths.add_argument(
        "--val-fraction",
        type=setting_type("val_fraction"),
        default=None,
        help="ImageFolder without val/: the share of each class held out for evaluation (default: "
        f"{DataOptions.val_fraction})",
    )
    subset = paths.add_mutually_exclusive_group()
    subset.add_argument(
        "--train-fraction",
        type=setting_type("train_fraction"),
        default=None,
        help="train on this class-stratified share of the training split, the same images whatever --seed "
        "(ImageNet, ImageFolder) (default: all)",
    )
    subset.add_argument(
        "--train-size",
        type=setting_type("train_size"),
        default=None,
        help="train on this many training images, class-stratified, the same whatever --seed (ImageNet, "
        "ImageFolder) (default: all)",
    )
    paths.add_argument(
        "--loader",
        choices=["auto", "memory", "stream"],
        default="auto",
        help="memory: whole data set on the training device; stream: read the VOC cache with "
        "DataLoader workers; auto: memory when it fits (default: %(default)s)",
    )
    paths.add_argument(
        "--workers",
        type=setting_type("workers"),
        default=2,
        help="DataLoader worker processes when streaming (default: %(default)s)",
    )

    opt = parser.add_argument_group("optimisation (defaults follow the setup: modern, or the paper's with -pt)")
    opt.add_argument(
        "--optimizer",
        choices=["sgd", "adam"],
        default=None,
        help=f"sgd (the paper's update rule under -pt, PyTorch's otherwise) or adam "
        f"(default: {modern.optimizer}; {paper.optimizer} with -pt)",
    )
    for flag, name, what in (
        ("--lr", "lr", "initial learning rate"),
        ("--batch-size", "batch_size", "training batch size"),
        ("--weight-decay", "weight_decay", "weight decay"),
        ("--momentum", "momentum", "SGD momentum"),
        ("--plateau-patience", "plateau_patience", "epochs without a better top-1 / mAP that make a plateau"),
        ("--lr-factor", "lr_factor", "learning-rate multiplier at a plateau"),
        ("--max-lr-drops", "max_lr_drops", "most learning-rate drops"),
    ):
        opt.add_argument(
            flag,
            type=setting_type(name),
            default=None,
            help=f"{what} (default: {getattr(modern, name)}; {getattr(paper, name)} with -pt)",
        )
    opt.add_argument(
        "--lr-milestones",
        type=setting_type("lr_milestones"),
        default="",
        metavar="EPOCHS",
        help="also multiply the learning rate by --lr-factor after these epochs, e.g. 25,51,79 (the drops the "
        "2012 log records); each counts toward --max-lr-drops (default: none)",
    )
    opt.add_argument(
        "--warm-start",
        type=setting_type("warm_start"),
        default=1.0,
        metavar="FACTOR",
        help="start at FACTOR x --lr and let plateaus bring it back down before the counted drops "
        "(the seed's finding: a large initial learning rate helps) (default: 1, off)",
    )
    opt.add_argument(
        "--seed",
        type=setting_type("seed"),
        default=0,
        help="random seed for weights, shuffling and augmentation, 0 to 2^32-1 (default: %(default)s)",
    )
    opt.add_argument(
        "--device",
        default=None,
        help="device to train on, e.g. cpu, cuda, cuda:1 (default: cuda when present, else cpu)",
    )
    opt.add_argument(
        "--dist-timeout",
        type=number_type(float, 0, 10080, low_open=True),
        default=DIST_TIMEOUT_MINUTES,
        metavar="MINUTES",
        help="under torchrun, how long a process waits for the others before the run stops (rank 0 downloading, a "
        "machine building its own resize cache) (default: %(default)s)",
    )
    opt.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels only, so a run (and a resumed run) repeats bit for bit on the same "
        "machine; slower on GPUs (default: off)",
    )
    fast = parser.add_argument_group("speed")
    fast.add_argument(
        "--amp",
        choices=sorted(AMP_DTYPES),
        default=None,
        help="autocast precision of the forward and backward passes; fp16 adds loss scaling (default: bf16 on GPUs "
        "of compute capability 8.0 and newer and on CPUs with native bf16 (AVX512-BF16, AMX), fp16 on 7.x, else off)",
    )
    fast.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep images and convolution weights in NHWC, the layout tensor-core and oneDNN bf16 "
        "convolutions read (default: on where --amp defaults to bf16)",
    )
    fast.add_argument(
        "--split-gpus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="-pm only: run the paper's two towers on two GPUs (--device and the next one) as in 2012, or both "
        "on --device cpu; --evaluate runs a split run as the grouped model unless given this, --no-split-gpus "
        "resumes one as the grouped model (default: off, the grouped model on one device)",
    )
    fast.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model (a minute of compiling first; falls back to eager with a warning "
        "where unavailable) (default: off)",
    )
    opt.add_argument(
        "--fidelity",
        choices=list(FIDELITIES),
        default=None,
        help="-pm / -pt only: where the paper's text is silent or ambiguous, follow the 2012 code release "
        "(code: LRN scale, normalisation order and cnorm2, init, dropout, conv1 padding, bias rate and decay, "
        "PCA noise) or the text as written (text) (default: code)",
    )
    opt.add_argument(
        "--no-lrn",
        dest="lrn",
        action="store_false",
        help="drop local response normalisation from the paper's features, -pm only (default: keep)",
    )

    ckpt = parser.add_argument_group("checkpoints").add_mutually_exclusive_group()
    ckpt.add_argument(
        "--resume",
        type=path_type,
        default=None,
        metavar="PATH",
        help="continue the run of this last.pt where it stopped: same run folder, epoch, learning "
        "rate, counters and random streams; -ne may extend it (default: none)",
    )
    parser.add_argument_group("checkpoints").add_argument(
        "--rewind",
        action="store_true",
        help="with --resume: allow going back to a checkpoint older than the run's last.pt (best.pt, say); that "
        "last.pt is kept as last.epoch<N>.pt (default: off, refused)",
    )
    ckpt.add_argument(
        "--evaluate",
        type=path_type,
        default=None,
        metavar="PATH",
        help="evaluate this checkpoint on the evaluation split (10-crop if it was trained with -pt), "
        "print the metrics as JSON and exit (default: none)",
    )

    tune = parser.add_argument_group("starting from trained weights")
    tune.add_argument(
        "--weights",
        type=path_type,
        default=None,
        metavar="PATH",
        help="start a new run from these weights: torchvision's alexnet-owt-7be5be79.pth (TorchAlexNet) or a "
        "checkpoint of this tool of the same network, from any data set; fc8 is re-initialised when the classes "
        "differ (default: none, random initialisation)",
    )
    tune.add_argument(
        "--freeze-features",
        action="store_true",
        help="with --weights: train only the classifier, the convolutions keep their weights (default: off)",
    )

    shapes = parser.add_argument_group("Shapes data set")
    shapes.add_argument(
        "--shapes-train",
        type=setting_type("shapes_train"),
        default=DataOptions.shapes_train,
        help="number of generated training images (default: %(default)s)",
    )
    shapes.add_argument(
        "--shapes-test",
        type=setting_type("shapes_test"),
        default=DataOptions.shapes_test,
        help="number of generated test images (default: %(default)s)",
    )
    shapes.add_argument(
        "--shapes-seed",
        type=setting_type("shapes_seed"),
        default=DataOptions.shapes_seed,
        help="seed the images are generated from (default: %(default)s)",
    )
    return parser  # fmt: skip


def explicit_flags(argv: Sequence[str] | None) -> set[str]:
    """The destinations the user actually gave on the command line (not defaults)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


#: The config's fields: a flag whose destination is one of these sets it.
SETTINGS = frozenset(f.name for f in fields(TrainConfig))
#: -c and -pm together name the model (``network.model_name``); a config records only the name.
MODEL_FLAGS = ("cifar", "paper_model")


def config_from_args(args: argparse.Namespace, hw: torch.device | Capabilities) -> TrainConfig:
    """Resolve the flags into one ``TrainConfig`` (a new run): the defaults, the changes of the
    chosen setup (the paper's with -pt), then every flag that sets a field and was given a
    value; the model's name from -c / -pm, the device (``hw``) and what follows it, the code's
    version."""
    hw = capabilities(hw)
    flags = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()
             if name in SETTINGS and value is not None}  # fmt: skip
    overrides = {
        "amp": hw.amp,
        "channels_last": hw.channels_last,
        **flags,
        "model": model_name(args.cifar, args.paper_model),
        "device": str(hw.device),
        "image_size": data_image_size(args.cifar),
        "code_version": code_version(),
    }
    return resolve("paper" if args.paper_train else "modern", overrides)


def data_image_size(cifar: bool) -> int:
    """The side a resizable data set (ImageFolder) is resized to: 32 for the 32x32 network,
    else the paper's 256 that the 224-input networks crop."""
    return 32 if cifar else DataOptions.image_size


def model_flags(name: str) -> dict[str, bool]:
    """The -c / -pm values that name model ``name`` (``network.model_name`` read backwards)."""
    for cifar in (False, True):
        for paper_model in (False, True):
            if model_name(cifar, paper_model) == name:
                return {"cifar": cifar, "paper_model": paper_model}
    raise ValueError(f"no -c / -pm combination names {name}")


def changeable(when: str) -> frozenset[str]:
    """What the command line may change on ``"resume"`` or ``"evaluate"``: the fields whose
    setting says so, and -c / -pm where that includes the model."""
    names = may_change(when)
    return names | frozenset(MODEL_FLAGS) if "model" in names else names


# Where the data and outputs are, how long to go on, how to log, and on what hardware may differ
# from the checkpoint on --resume; everything else defines the run being continued.
RESUME_MAY_CHANGE = changeable("resume")
EVALUATE_MAY_CHANGE = changeable("evaluate")


def config_from_checkpoint(
    checkpoint: dict[str, Any], path: Path, args: argparse.Namespace, given: set[str],
    hw: torch.device | Capabilities, may_change: frozenset[str],
) -> TrainConfig:  # fmt: skip
    """The checkpoint's config with the flags the user gave on top, where they may change it."""
    base = TrainConfig.from_dict(checkpoint["config"])
    new = config_from_args(args, hw)
    # -c and -pm are compared as the flags they are: the recorded model name gives their values.
    recorded = {**asdict(base), **model_flags(base.model)}
    fresh = {**asdict(new), **model_flags(new.model)}
    named = {f for f in given if f in fresh}
    refused = sorted(f for f in named - may_change if fresh[f] != recorded[f])
    if refused:
        what = ", ".join(f"{f} ({_shown(fresh[f])}; the checkpoint has {_shown(recorded[f])})" for f in refused)
        raise UserError(f"{path} fixes these settings, which the command line changes: {what}; drop those flags.")
    changes = {f: fresh[f] for f in named & may_change}
    # Where and how this process runs comes from the command line, never from the file (the
    # cache folder, the device and what follows it); the recorded data folder is used only
    # when it exists here.
    changes.update({f: fresh[f] for f in PER_PROCESS - named})
    if "data_dir" not in named and not Path(base.data_dir).is_dir():
        changes["data_dir"] = fresh["data_dir"]
    if changes.keys() & set(MODEL_FLAGS):
        flags = {f: changes.pop(f, recorded[f]) for f in MODEL_FLAGS}
        changes["model"] = model_name(**flags)
    return replace(base, **changes)


def _shown(value: Any) -> str:
    """A setting's value in a message: text quoted and printable, numbers and flags as written."""
    return quoted(value) if isinstance(value, str) else repr(value)


def combination_problem(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Why the flags do not go together, or None: what the model and the data set take is read
    from their registries (``network.MODELS``, ``datasets.DATASETS``)."""
    name = model_name(args.cifar, args.paper_model)
    model, data = MODELS[name], DATASETS[args.dataset]
    if not args.lrn and not model.paper_features:
        return "--no-lrn only applies to the paper's features; add -pm"
    if args.fidelity is not None and not model.paper_features and not args.paper_train:
        return "--fidelity only applies to the paper's network or setup; add -pm or -pt"
    # A 32-input network takes the images at their own size; the 224-input ones crop or
    # upsample any size (datasets.make_pipeline).
    if model.input_size == 32 and data.image_size != model.input_size and not data.resizable:
        size, side = data.image_size, model.input_size
        return f"-c ({name}, {side}x{side} inputs) cannot train on {args.dataset}'s {size}x{size} images; drop -c"
    for option in (f.name for f in fields(DataOptions)):
        # A switch the data set has no use for is a mistaken command; a value such as
        # --shapes-train has its default anyway, and data sets without it leave it unused.
        # A value flag without a default (--val-fraction, --train-size) counts when it is given.
        value = getattr(args, option, None)
        given = value is True or (value is not None and value is not False and parser.get_default(option) is None)
        if given and not data.accepts(option):
            flag = next(a.option_strings[-1] for a in parser._actions if a.dest == option)
            takers = " or ".join(f"-ds {n}" for n, d in DATASETS.items() if d.accepts(option))
            return f"{flag} only applies to {takers}"
    if args.split_gpus and not model.splittable:
        return "--split-gpus splits the paper's network: add -pm (and drop -c)"
    if args.split_gpus and launched_by_torchrun():
        return "--split-gpus runs one model over two GPUs in one process; start it with python, not torchrun"
    if args.rewind and not args.resume:
        return "--rewind only applies to --resume"
    if args.weights and (args.resume or args.evaluate):
        # A checkpoint's own weights are what --resume continues and --evaluate measures.
        return "--weights starts a new run; drop it with --resume or --evaluate, which use the checkpoint's weights"
    if args.freeze_features and not (args.weights or args.resume or args.evaluate):
        return "--freeze-features keeps the starting weights' features, so it needs --weights PATH"
    return None


#: ``python main.py COMMAND ...``: the jobs besides training, each a module whose
#: ``main(argv) -> int`` parses its own flags; (module, what ``stop.phase`` says meanwhile).
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("data.prepare", "preparing the data"),
    "predict": ("inference.predict", "predicting"),
    "export": ("inference.export", "exporting"),
    "figures": ("inference.figures", "drawing the figures"),
}


def run_command(name: str, argv: list[str], stop: StopSignals) -> int:
    """Run ``COMMANDS[name]`` with ``argv``: a ``UserError`` is one sentence and exit 1, a stop
    signal one sentence and its exit code, as for training."""
    module, stop.phase = COMMANDS[name]
    setup_logging()
    try:
        return importlib.import_module(module).main(argv)
    except UserError as error:
        logger.error("error: %s", error)
        return 1
    except Interrupted as stopped:
        if not stopped.reported:
            logger.warning("stopped by %s while %s", stopped, stop.phase)
        return stopped.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the process exit code. SIGINT and SIGTERM are the tool's while it
    runs and the caller's again when it returns (ignored, when the caller is the script itself)."""
    stop = StopSignals()
    previous = stop.install()  # before any work: a stop at any moment is one sentence and the right code
    try:
        return _main(argv, stop)
    finally:
        for signum, handler in previous.items():
            # The script is exiting: a late Ctrl-C has nothing left to stop, "while starting" would
            # be wrong, and during the interpreter's shutdown (which puts back the default
            # handlers) it would kill the process with another exit status; so it is ignored.
            signal.signal(signum, signal.SIG_IGN if handler is _stopped_while_starting else handler)


def _main(argv: Sequence[str] | None, stop: StopSignals) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["report"], ["experiments"]):
        # `python main.py report runs/` is `python -m experiments report runs/`.
        from experiments.__main__ import main as experiments_main

        stop.phase = "writing the report" if argv[0] == "report" else "running the experiments"
        try:
            return experiments_main(argv if argv[0] == "report" else argv[1:])
        except Interrupted as stopped:
            logger.warning("stopped by %s while %s", stopped, stop.phase)
            return stopped.exit_code
    if argv[:1] and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:], stop)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = explicit_flags(argv)
    problem = combination_problem(parser, args)
    if problem:
        parser.error(problem)
    setup_logging()
    try:
        return run(args, given, stop)
    except UserError as error:
        logger.error("error: %s", error)
        return 1
    except Interrupted as stopped:
        stop.signum = stop.signum or stopped.signum  # later signals only unwind further
        if not stopped.reported:
            logger.warning("stopped by %s while %s; nothing of this run was saved", stopped, stop.phase)
        return stopped.exit_code
    except RuntimeError as error:  # under torchrun, a collective whose peer process is gone
        sentence = lost_process(error, None)
        if sentence is None:
            raise
        logger.error("error: %s", sentence)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, given: set[str], stop: StopSignals) -> int:
    """Build what the arguments ask for and train, resume or evaluate; ``stop.phase`` says what
    is under way."""
    device = resolve_device(args.device)
    if launched_by_torchrun():
        if args.evaluate:
            raise UserError("--evaluate runs in one process; start it with python, not torchrun.")
        stop.phase = "joining the other processes"
        device = init_distributed(device, timedelta(minutes=args.dist_timeout))
        if rank_and_world()[0] != 0:  # one voice: the other processes only speak up about problems
            logging.getLogger().setLevel(logging.WARNING)
    hw = Capabilities.of(device)
    if launched_by_torchrun():
        logger.info("data parallel: %d processes (%s), global batch split between them", rank_and_world()[1],
                    hw.backend)  # fmt: skip
    checkpoint_path = args.resume or args.evaluate
    stop.phase = "reading the checkpoint"
    checkpoint = load_checkpoint(checkpoint_path, resume=bool(args.resume)) if checkpoint_path else None
    if checkpoint is None:
        config = config_from_args(args, hw)
    else:
        may_change = RESUME_MAY_CHANGE if args.resume else EVALUATE_MAY_CHANGE
        if args.resume and args.split_gpus is False:
            may_change |= {"split_gpus"}  # a split run goes on as the grouped model (_build_and_go)
        config = config_from_checkpoint(checkpoint, checkpoint_path, args, given, hw, may_change)
        if args.evaluate and args.split_gpus is None:
            # The checkpoint holds the grouped model's weights, which evaluate the same on one device.
            config = replace(config, split_gpus=False)
        if args.resume and "output_dir" not in given:
            config = replace(config, output_dir=output_dir_of(checkpoint_path, config) or config.output_dir)
    split = towers(config, hw.device, checkpoint_path if args.resume else None)
    if config.deterministic:
        make_deterministic()
    elif hw.autotune:
        # Let cuDNN time its convolution algorithms once per input shape and keep the fastest.
        torch.backends.cudnn.benchmark = True
    folders: RunFolders | None = None
    if not args.evaluate:
        # Named, checked and locked before the data are read: a second process on the same run,
        # or a name that is taken, is told at once.
        stop.phase = "preparing the run's folders"
        resume_step = checkpoint.get("global_step", 0) if checkpoint is not None and args.resume else 0
        folders = claim_run(config, checkpoint_path if args.resume else None, resume_step, args.rewind)
        # From here on the run's settings are fixed: name and output folder included.
        config = replace(config, run_name=folders.name)
    try:
        return _build_and_go(args, config, checkpoint, checkpoint_path, hw, split, folders, stop)
    except RuntimeError as error:
        # Under torchrun, a collective whose peer process is gone; anywhere, a DataLoader worker's death.
        saved = folders is not None and not config.dry_run
        last = folders.ckpt_dir / "last.pt" if saved else None
        sentence = lost_process(error, last) or lost_worker_sentence(error, last, config.workers, folders is None)
        if sentence is None:
            raise
        raise UserError(sentence) from None
    finally:
        if folders is not None:
            folders.release()


def _build_and_go(args: argparse.Namespace, config: TrainConfig, checkpoint: dict[str, Any] | None,
                  checkpoint_path: Path | None, hw: Capabilities, split: tuple[torch.device, torch.device] | None,
                  folders: RunFolders | None, stop: StopSignals) -> int:  # fmt: skip
    device = hw.device
    stop.phase = "reading the data"
    # The config holds the data options; under torchrun the processes build any cache together.
    data = load_dataset(config.dataset, config, data_peers())
    stop.phase = "building the model"
    torch.manual_seed(config.seed)
    model = make_model(config.model, data.num_classes, lrn=config.lrn, fidelity=config.fidelity)
    if checkpoint is not None:
        load_weights(checkpoint, checkpoint_path, model, data.num_classes, data.name)
    elif config.weights:
        stop.phase = "reading the initial weights"
        load_initial_weights(Path(config.weights), model, config.model, data.classes, config.paper_train)
    if split is not None:
        model = SplitPaperAlexNet(model, split)
        logger.info("the two towers run on %s and %s", *model.devices)
    elif args.resume and checkpoint["config"].get("split_gpus"):
        checkpoint = {**checkpoint, "optimizer": grouped_optimizer_state(checkpoint["optimizer"], model, config)}
        logger.info("%s was trained split over two devices; it goes on as the grouped model on %s (the same "
                    "weights; dropout now draws one mask per layer instead of one per tower)", checkpoint_path,
                    device)  # fmt: skip
    if args.evaluate:
        stop.phase = "evaluating"
        result = evaluate_checkpoint(config, model, data, hw)
        # The 32-input networks see the centre view under -pt too (datasets.make_pipeline).
        views = " (10-crop)" if config.paper_train and MODELS[config.model].input_size != 32 else ""
        logger.info(
            "%s on %s, %d images%s: %s", checkpoint_path, data.name, result.count, views, format_metrics(result)
        )
        recorded = checkpoint.get("last") or {}
        if recorded and config.dataset == checkpoint["config"].get("dataset"):
            metric = "mAP" if "mAP" in recorded else "top1"
            logger.info("recorded at epoch %d: %s %.2f%%", checkpoint["epoch"], metric, recorded[metric])
        # Strict JSON: a loss that overflowed is null, not NaN (which JSON does not have).
        metrics = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in result.metrics().items()}
        print(json.dumps({"checkpoint": str(checkpoint_path), "dataset": data.name, **metrics}, allow_nan=False))
        return 0
    stop.phase = "preparing training"
    trainer = Trainer(config, model, data, hw, resume=checkpoint if args.resume else None, folders=folders)
    stop.phase = "training"
    trainer.fit()
    return 0


def lost_worker_sentence(error: RuntimeError, last: Path | None, workers: int, evaluating: bool) -> str | None:
    """The sentence for a run whose DataLoader worker died (``data.loaders.lost_worker``): a worker
    holds up to ``PREFETCH`` batches, so fewer workers or smaller batches need less memory; the
    run's ``last`` checkpoint, when it has one, resumes with fewer workers (not with another
    batch size, which is part of the run)."""
    what = lost_worker(error)
    if what is None:
        return None
    fewer = f"--workers {workers // 2}"
    if evaluating:
        return f"{what}; run again with fewer workers, e.g. {fewer}."
    if last is not None and last.is_file():
        return (
            f"{what}; {last} is kept: resume with --resume {last} {fewer}, or start again with a smaller --batch-size."
        )
    return f"{what}; run again with fewer workers (e.g. {fewer}) or a smaller --batch-size (nothing was saved yet)."


def towers(config: TrainConfig, device: torch.device, resumed: Path | None) -> tuple[torch.device, torch.device] | None:
    """The devices of the two towers of ``--split-gpus`` (``network.split_devices``), or None for
    the grouped model on one device. ``resumed`` is the checkpoint of a resumed run, which keeps
    its split: where this machine cannot hold the towers, the sentence names ``--no-split-gpus``,
    which resumes it as the grouped model."""
    if not config.split_gpus:
        return None
    if resumed is not None and launched_by_torchrun():
        raise UserError(
            f"{resumed} was trained with --split-gpus, which runs one model over two GPUs in one process, not under "
            "torchrun; add --no-split-gpus to resume it as the grouped model in each process."
        )
    try:
        return split_devices(device)
    except UserError:
        if resumed is None:
            raise
        raise UserError(
            f"{resumed} was trained with --split-gpus, and its two towers need {device} and the CUDA device after "
            f"it, which this machine does not have; add --no-split-gpus to resume it as the grouped model on {device} "
            "(the same weights; dropout then draws one mask per layer instead of one per tower)."
        ) from None


def make_deterministic() -> None:
    """Bit-for-bit repeatable runs (``--deterministic``): deterministic kernels only, no cuDNN
    autotuning, and the cuBLAS workspace setting that deterministic CUDA matmuls need."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    sys.exit(main())  # with SIGINT and SIGTERM ignored from its return on (main's finally)
