"""AlexNet training tool: parse the command line and hand over, to ``training.run`` (train, resume,
evaluate) or to a subcommand (``COMMANDS``).

python main.py -c                                   # CifarAlexNet on the built-in Shapes data
python main.py -c -ds Cifar10 --data-dir dataset    # CIFAR-10
python main.py -pm -pt -ds PascalVOC2012            # the paper's network and training setup
python main.py --resume checkpoints/Shapes/<run>/last.pt
python main.py --evaluate checkpoints/Shapes/<run>/best.pt    # or several: one ensemble; --crops 1|10
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
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from data import prepare
from data.core import DataOptions
from data.registry import DATASETS
from inference import export, figures, predict
from network import FIDELITIES
from settings.rules import Check
from training.config import AMP_CHOICES, LOADERS, OPTIMIZERS, TrainConfig, combination_problem, explicit_flags, resolve
from training.distributed import DIST_TIMEOUT_MINUTES, Interrupted, StopSignals
from training.run import run
from utils import UserError, __version__, name_problem, quoted, setup_logging

logger = logging.getLogger("alexnet")


def number_type(
    kind: type, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Any:
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
        raise argparse.ArgumentTypeError(
            f"{quoted(text)} cannot be a folder name: it {problem}; use letters, digits, - _ ."
        )
    return text


def path_type(text: str) -> Path:
    """A path the run records: valid UTF-8 text (JSON, TensorBoard and the log need it)."""
    return Path(Check(str, path=True).parse(text))


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: the original v2 tool's flags with their meanings, plus conventional long ones.
    A flag that sets a ``TrainConfig`` field checks its value by that field's rule."""
    modern, paper = resolve("modern", {}), resolve("paper", {})
    # The flags are a table, one call of two or three lines each: the formatter leaves it as written.
    # fmt: off
    parser = argparse.ArgumentParser(prog="main.py", description="AlexNet (Krizhevsky, Sutskever & Hinton, 2012) "
        "training tool: the paper's network, torchvision's variant and a 32x32 variant on Shapes, CIFAR-10/100, "
        "Pascal VOC 2012, ImageNet and your own class folders (ImageFolder).")

    def field(group: Any, *names: str, **kwargs: Any) -> None:  # the field is the last name's
        group.add_argument(*names, type=setting_type(names[-1].lstrip("-").replace("-", "_")), **kwargs)

    def switch(group: Any, *names: str, help: str) -> None:
        group.add_argument(*names, action="store_true", help=help)

    def setup_default(name: str) -> str:  # the default of a setting the setup (-pt) chooses
        return f"(default: {getattr(modern, name)}; {getattr(paper, name)} with -pt)"

    add = parser.add_argument
    add("-v", "--version", action="version", version=f"alexnet {__version__}")
    switch(parser, "-d", "--dry_run", help="train without writing TensorBoard runs or checkpoints (default: off)")
    switch(parser, "-l", "--log", help="also save the terminal output to log/<run-name>.log (default: off)")
    switch(parser, "-c", "--cifar", help="use CifarAlexNet, the 32x32 network (default: off, TorchAlexNet at 224)")
    switch(parser, "-pt", "--paper_train", help=f"train with the paper's setup: SGD with the paper's update rule, "
           f"batch {paper.batch_size}, lr {paper.lr}, momentum {paper.momentum}, weight decay {paper.weight_decay}, "
           f"lr/10 on plateau at most {paper.max_lr_drops} times, stop at the next plateau or after {paper.n_epoch} "
           "epochs, 10-crop evaluation at 224 (default: off, the modern setup with Adam)")
    switch(parser, "-pm", "--paper_model", help="use the paper's network: PaperAlexNet, or with -c CifarAlexNet with "
           "the paper's features (LRN, two-GPU grouping, paper init) (default: off)")
    field(parser, "-ne", "--n_epoch", help=f"maximum number of training epochs {setup_default('n_epoch')}")
    field(parser, "-es", "--early_stop", help="stop after this many epochs without a better top-1 / mAP, 0 never "
          f"(default: {modern.early_stop}; with -pt off: the run stops at the plateau after the last lr drop)")
    field(parser, "-lls", "--log_loss_step", default=100,
          help="log the training loss every this many steps (default: %(default)s)")
    field(parser, "-lce", "--log_confusion_epoch", default=10,
          help="save the confusion matrix (figure and CSV) every this many epochs and at the end "
               "(default: %(default)s)")
    add("-ds", "--dataset", default="Shapes", choices=list(DATASETS), metavar="DATASET",
        help=f"data set to train on: {', '.join(DATASETS)} (default: %(default)s, generated, no download)")
    field(parser, "-m", "--message", default="",
          help="a note about this run, saved to the log and TensorBoard (default: none)")

    paths = parser.add_argument_group("data and outputs")
    paths.add_argument("--data-dir", type=path_type, default=Path("dataset"),
                       help="folder holding the data sets (default: %(default)s)")
    paths.add_argument("--output-dir", type=path_type, default=Path("."),
                       help="folder under which runs/, checkpoints/ and log/ are written (default: current folder)")
    paths.add_argument("--run-name", type=run_name_type, help="name of the run's folders under runs/, checkpoints/ "
                       "and log/; must be new (default: <date>_<time>_<dataset>_<model>_<setup>)")
    switch(paths, "--download", help="fetch the official CIFAR / VOC archive into --data-dir when it is not there "
           "(default: off)")
    switch(paths, "--coarse-labels", help="train CIFAR-100 on its 20 coarse classes instead of the 100 fine ones "
           "(default: off)")
    paths.add_argument("--cache-dir", type=path_type, help="folder for the resize cache of VOC, ImageNet and "
                       "ImageFolder (default: alexnet_cache/ in the data set's folder, or ~/.cache/alexnet when that "
                       "is read-only)")
    field(paths, "--val-fraction", help="ImageFolder without val/: the share of each class held out for evaluation "
          f"(default: {DataOptions.val_fraction})")
    subset = paths.add_mutually_exclusive_group()
    field(subset, "--train-fraction", help="train on this class-stratified share of the training split, the same "
          "images whatever --seed (ImageNet, ImageFolder) (default: all)")
    field(subset, "--train-size", help="train on this many training images, class-stratified, the same whatever "
          "--seed (ImageNet, ImageFolder) (default: all)")
    paths.add_argument("--loader", choices=LOADERS, default="auto", help="memory: whole data set on the training "
                       "device; stream: read the VOC cache with DataLoader workers; auto: memory when it fits "
                       "(default: %(default)s)")
    field(paths, "--workers", default=2, help="DataLoader worker processes when streaming (default: %(default)s)")

    opt = parser.add_argument_group("optimisation (defaults follow the setup: modern, or the paper's with -pt)")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (the paper's update rule under -pt, PyTorch's "
                     f"otherwise) or adam {setup_default('optimizer')}")
    for flag, what in (("--lr", "initial learning rate"), ("--batch-size", "training batch size"),
                       ("--weight-decay", "weight decay"), ("--momentum", "SGD momentum"),
                       ("--plateau-patience", "epochs without a better top-1 / mAP that make a plateau"),
                       ("--lr-factor", "learning-rate multiplier at a plateau"),
                       ("--max-lr-drops", "most learning-rate drops")):
        field(opt, flag, help=f"{what} {setup_default(flag[2:].replace('-', '_'))}")
    field(opt, "--lr-milestones", default="", metavar="EPOCHS", help="also multiply the learning rate by "
          "--lr-factor after these epochs, e.g. 25,51,79 (the drops the 2012 log records); each counts toward "
          "--max-lr-drops (default: none)")
    field(opt, "--warm-start", default=1.0, metavar="FACTOR", help="start at FACTOR x --lr and let plateaus bring it "
          "back down before the counted drops (the original v2 tool's finding: a large initial learning rate helps) "
          "(default: 1, off)")
    field(opt, "--seed", default=0,
          help="random seed for weights, shuffling and augmentation, 0 to 2^32-1 (default: %(default)s)")
    opt.add_argument("--device", help="device to train on, e.g. cpu, cuda, cuda:1 (default: cuda when present, "
                     "else cpu)")
    opt.add_argument("--dist-timeout", type=number_type(float, 0, 10080, low_open=True), default=DIST_TIMEOUT_MINUTES,
                     metavar="MINUTES", help="under torchrun, how long a process waits for the others before the "
                     "run stops (rank 0 downloading, a machine building its own resize cache) (default: %(default)s)")
    switch(opt, "--deterministic", help="deterministic kernels only, so a run (and a resumed run) repeats bit for bit "
           "on the same machine; slower on GPUs (default: off)")

    fast = parser.add_argument_group("speed")
    fast.add_argument("--amp", choices=sorted(AMP_CHOICES), help="autocast precision of the forward and backward "
                      "passes; fp16 adds loss scaling (default: bf16 on GPUs of compute capability 8.0 and newer and "
                      "on CPUs with native bf16 (AVX512-BF16, AMX), fp16 on 7.x, else off)")
    both_ways = argparse.BooleanOptionalAction
    fast.add_argument("--channels-last", action=both_ways, help="keep images and convolution weights in NHWC, the "
                      "layout tensor-core and oneDNN bf16 convolutions read (default: on where --amp defaults to "
                      "bf16)")
    fast.add_argument("--split-gpus", action=both_ways, help="-pm only: run the paper's two towers on two GPUs "
                      "(--device and the next one) as in 2012, or both on --device cpu; --evaluate runs a split run "
                      "as the grouped model unless given this, --no-split-gpus resumes one as the grouped model "
                      "(default: off, the grouped model on one device)")
    fast.add_argument("--compile", action=both_ways, default=False, help="torch.compile the model (a minute of "
                      "compiling first; falls back to eager with a warning where unavailable) (default: off)")
    opt.add_argument("--fidelity", choices=FIDELITIES, help="-pm / -pt only: where the paper's text is silent or "
                     "ambiguous, follow the 2012 code release (code: LRN scale, normalisation order and cnorm2, "
                     "init, dropout, conv1 padding, bias rate and decay, PCA noise) or the text as written (text) "
                     "(default: code)")
    opt.add_argument("--no-lrn", dest="lrn", action="store_false",
                     help="drop local response normalisation from the paper's features, -pm only (default: keep)")

    checkpoints = parser.add_argument_group("checkpoints")
    ckpt = checkpoints.add_mutually_exclusive_group()
    ckpt.add_argument("--resume", type=path_type, metavar="PATH", help="continue the run of this last.pt where it "
                      "stopped: same run folder, epoch, learning rate, counters and random streams; -ne may extend "
                      "it (default: none)")
    ckpt.add_argument("--evaluate", type=path_type, nargs="+", metavar="PATH", help="evaluate this checkpoint on "
                      "the evaluation split, or several as one ensemble (their softmax averaged, each network with "
                      "its own preprocessing), print the metrics and errors as JSON and exit (default: none)")
    checkpoints.add_argument("--crops", type=int, choices=(1, 10), help="views per image for --evaluate: 1, the "
                             "centre crop; 10, the paper's four corners and centre and their mirrors (default: the "
                             "run's own, 10 under -pt, else 1)")
    switch(checkpoints, "--rewind", help="with --resume: allow going back to a checkpoint older than the run's "
           "last.pt (best.pt, say); that last.pt is kept as last.epoch<N>.pt (default: off, refused)")

    tune = parser.add_argument_group("starting from trained weights")
    tune.add_argument("--weights", type=path_type, metavar="PATH", help="start a new run from these weights: "
                      "torchvision's alexnet-owt-7be5be79.pth (TorchAlexNet) or a checkpoint of this tool of the "
                      "same network, from any data set; fc8 is re-initialised when the classes differ (default: "
                      "none, random initialisation)")
    switch(tune, "--freeze-features", help="with --weights: train only the classifier, the convolutions keep their "
           "weights (default: off)")

    shapes = parser.add_argument_group("Shapes data set")
    field(shapes, "--shapes-train", default=DataOptions.shapes_train,
          help="number of generated training images (default: %(default)s)")
    field(shapes, "--shapes-test", default=DataOptions.shapes_test,
          help="number of generated test images (default: %(default)s)")
    field(shapes, "--shapes-seed", default=DataOptions.shapes_seed,
          help="seed the images are generated from (default: %(default)s)")
    # fmt: on
    return parser


#: ``python main.py COMMAND ...``: the jobs besides training, each a ``main(argv) -> int`` that
#: parses its own flags, with what ``stop.phase`` says meanwhile.
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "prepare": (prepare.main, "preparing the data"),
    "predict": (predict.main, "predicting"),
    "export": (export.main, "exporting"),
    "figures": (figures.main, "drawing the figures"),
}


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
        command, stop.phase = COMMANDS[argv[0]]
        return handed_over(lambda: command(argv[1:]), stop)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    problem = combination_problem(parser, args)
    if problem:
        parser.error(problem)
    try:
        return handed_over(lambda: run(args, given, stop), stop, "; nothing of this run was saved")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def handed_over(job: Callable[[], int], stop: StopSignals, unsaved: str = "") -> int:
    """``job``'s exit code, where a ``UserError`` is one sentence and exit 1 and a stop signal one
    sentence (``unsaved`` says what it lost) and its exit code."""
    setup_logging()
    try:
        return job()
    except UserError as error:
        logger.error("error: %s", error)
        return 1
    except Interrupted as stopped:
        stop.signum = stop.signum or stopped.signum  # later signals only unwind further
        if not stopped.reported:
            logger.warning("stopped by %s while %s%s", stopped, stop.phase, unsaved)
        return stopped.exit_code


if __name__ == "__main__":
    sys.exit(main())  # with SIGINT and SIGTERM ignored from its return on (main's finally)
