"""The settings of a run: the named setups and ``TrainConfig``, every field with its rule.

A field's rule (``utils.Check`` in the field's metadata) is applied to the command line's
flags and to the config a checkpoint carries alike, so a checkpoint cannot hold a value the
command line would refuse: a run name that leaves its folder, an unknown optimiser, a negative
batch size. The rest of its metadata (``settings.rules.setting``) says whether ``--resume`` and
``--evaluate`` may change it and whether it is part of what an experiment compares.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from data.core import DataOptions
from data.registry import DATASETS
from hardware.capabilities import Capabilities, capabilities, device_problem
from network import FIDELITIES, MODELS, model_name
from settings.rules import COUNT, FLAG, PATH, POSITIVE, Check, names_where, setting
from training.distributed import launched_by_torchrun
from training.schedule import milestones_problem
from utils import UserError, __version__, quoted

#: Autocast precisions (``trainer.AMP_DTYPES`` maps them to dtypes).
AMP_CHOICES = ("bf16", "fp16", "off")
OPTIMIZERS = ("sgd", "adam")
LOADERS = ("auto", "memory", "stream")
#: Seeds are drawn into 64-bit generators after small offsets (rank, epoch): 32 bits keep clear.
MAX_SEED = 2**32 - 1
MAX_WORKERS = 256
#: The folder holding this code, whose git commit a run records.
CODE_ROOT = Path(__file__).resolve().parents[1]
GIT_SECONDS = 3


#: The named training recipes: what each changes in ``TrainConfig``'s defaults (which are the
#: modern setup). ``--lr``, ``--batch-size`` etc. override them in turn.
SETUPS: dict[str, dict[str, Any]] = {
    # Adam with plateau decay and early stopping: works across the three models and data sets
    # without tuning.
    "modern": {},
    # §5 of the paper: batch 128, momentum 0.9, weight decay 5e-4 with the paper's update rule,
    # lr 0.01 divided by 10 when the validation error stops improving, "reduced three times
    # prior to termination", about 90 epochs.
    "paper": {
        "optimizer": "sgd",
        "paper_update": True,
        "lr": 0.01,
        "weight_decay": 5e-4,
        "n_epoch": 90,
        "early_stop": 0,
        "stop_after_last_drop": True,
    },
}


@dataclass(frozen=True)
class TrainConfig(DataOptions):
    """Everything that defines a run, resolved (no "use the default" placeholders left): the
    data options it reads (``DataOptions``, inherited, so they are declared once) and the rest.

    Dumped to ``config.json`` and stored in every checkpoint as a plain, flat dict. The defaults
    are the modern setup; ``SETUPS`` holds what another setup changes.
    """

    dataset: str = setting("Shapes", Check(str, choices=tuple(DATASETS)), evaluate=True)
    model: str = setting("TorchAlexNet", Check(str, choices=tuple(MODELS)), evaluate=True)  # a network.MODELS name
    paper_train: bool = setting(False, FLAG, evaluate=True)
    lrn: bool = setting(True, FLAG, evaluate=True)
    # The 2012 release's choices ("code") or the paper's text ("text") where they differ: the
    # network, the paper pipeline and the paper's optimiser read it (docs/fidelity.md).
    fidelity: str = setting("code", Check(str, choices=FIDELITIES))
    setup: str = setting("modern", Check(str, choices=tuple(SETUPS)))
    optimizer: str = setting("adam", Check(str, choices=OPTIMIZERS))
    paper_update: bool = setting(False, FLAG)  # SGD with the paper's own update rule (PaperSGD)
    lr: float = setting(1e-4, Check(float, 0, low_open=True), resume=True)
    momentum: float = setting(0.9, Check(float, 0, 1, high_open=True))
    weight_decay: float = setting(0.0, Check(float, 0))
    batch_size: int = setting(128, Check(int, 1, 2**31 - 1))
    eval_batch_size: int = setting(512, Check(int, 1, 2**31 - 1), identity=False)
    lr_factor: float = setting(0.1, Check(float, 0, 1, low_open=True, high_open=True))
    plateau_patience: int = setting(5, POSITIVE)
    max_lr_drops: int = setting(3, COUNT)
    lr_milestones: str = setting("", Check(str, rule=milestones_problem))  # e.g. "25,51,79"; "" none
    stop_after_last_drop: bool = setting(False, FLAG)  # a plateau after the last allowed drop ends the run
    warm_start: float = setting(1.0, Check(float, 1))
    n_epoch: int = setting(200, POSITIVE, resume=True)
    early_stop: int = setting(50, COUNT, resume=True)  # epochs without improvement before stopping; 0: never
    log_loss_step: int = setting(100, POSITIVE, resume=True, identity=False)
    log_confusion_epoch: int = setting(10, POSITIVE, resume=True, identity=False)
    seed: int = setting(0, Check(int, 0, MAX_SEED), identity=False)
    deterministic: bool = setting(False, FLAG, resume=True, identity=False)
    device: str = setting(
        "cpu", Check(str, rule=device_problem), resume=True, evaluate=True, identity=False, per_process=True
    )
    # Autocast precision of forward and backward, and the memory layout: they follow the device
    # unless given, so a run moved from a GPU to a CPU drops bf16.
    amp: str = setting(
        "off", Check(str, choices=AMP_CHOICES), resume=True, evaluate=True, identity=False, per_process=True
    )
    channels_last: bool = setting(False, FLAG, resume=True, evaluate=True, identity=False, per_process=True)
    compile: bool = setting(False, FLAG, resume=True, evaluate=True, identity=False)
    split_gpus: bool = setting(False, FLAG, evaluate=True)
    # Where a run's initial weights came from (``--weights``: torchvision's file or a checkpoint;
    # "" for a random initialisation). Read once, when the run starts: --resume continues from
    # the run's own state and never reloads it.
    weights: str = setting("", PATH)
    freeze_features: bool = setting(False, FLAG)  # only the classifier trains (--freeze-features)
    output_dir: str = setting(".", PATH, resume=True, identity=False, per_process=True)
    dry_run: bool = setting(False, FLAG, identity=False)
    log: bool = setting(False, FLAG, resume=True, identity=False)
    message: str = setting("", Check(str), identity=False)
    loader: str = setting("auto", Check(str, choices=LOADERS), resume=True, evaluate=True, identity=False)
    workers: int = setting(2, Check(int, 0, MAX_WORKERS), resume=True, evaluate=True, identity=False)
    run_name: str = setting("", Check(str, name=True), identity=False)
    version: str = setting(__version__, Check(str), identity=False)
    # The code that wrote this config or checkpoint (``code_version``; "" where not recorded):
    # a resumed run's checkpoints name the code that continued it, its config.json the code
    # that started it.
    code_version: str = setting("", Check(str), resume=True, evaluate=True, identity=False, per_process=True)

    @classmethod
    def check(cls, name: str) -> Check:
        """The rule of field ``name`` (for argparse types and checkpoint fields alike)."""
        return _CHECKS[name]

    @classmethod
    def from_dict(cls, values: object) -> TrainConfig:
        """A config from a checkpoint's dict, every field checked by its rule (``ValueError``
        naming the field and the reason). Keys this version does not know are dropped, and
        fields an older version did not write take their defaults. A 0.1 dict also held the
        flags ``cifar`` and ``paper_model``, and named ``-c -pm`` "CifarAlexNet": it is read as
        "PaperCifarAlexNet". A config without ``fidelity`` (0.1, 0.2) trained the paper's text,
        so it is read as "text", not as today's default."""
        if not isinstance(values, dict):
            raise TypeError(f"the config is a {type(values).__name__}, not a dict")
        checked = {}
        for name, check in {**_CHECKS, **_OLD_FLAGS}.items():
            if name not in values:
                continue
            try:
                checked[name] = check(values[name])
            except ValueError as error:
                raise ValueError(f"its config's {name} {error}") from None
        if checked.pop("paper_model", False) and checked.get("model") == "CifarAlexNet":
            checked["model"] = "PaperCifarAlexNet"
        checked.pop("cifar", None)
        checked.setdefault("fidelity", "text")
        return cls(**checked)


_CHECKS: dict[str, Check] = {f.name: f.metadata["check"] for f in fields(TrainConfig)}
#: The model flags a 0.1 config recorded beside the model's name (checked, then read by from_dict).
_OLD_FLAGS: dict[str, Check] = {"cifar": FLAG, "paper_model": FLAG}
assert all(f.default is not MISSING for f in fields(TrainConfig))

assert all(_CHECKS[name](value) == value for setup in SETUPS.values() for name, value in setup.items())


def resolve(setup: str, flags: dict[str, Any]) -> TrainConfig:
    """``TrainConfig``'s defaults, then setup ``setup``'s changes, then ``flags``: each once."""
    return TrainConfig(**{"setup": setup, **SETUPS[setup], **flags})


def may_change(when: str) -> frozenset[str]:
    """The fields the command line may change on ``"resume"`` or ``"evaluate"``."""
    return names_where(TrainConfig, when)


#: Fields that say where and how this process runs: a continued or evaluated run takes them
#: from its own command line, never from the checkpoint.
PER_PROCESS = names_where(TrainConfig, "per_process")
#: Fields that say how a run was carried out, not what was trained: two runs that differ only
#: in these are seeds of one variant (``experiments.report``).
NOT_THE_EXPERIMENT = names_where(TrainConfig, "identity", False)


def code_version() -> str:
    """The git commit this code is at, with "-dirty" when tracked files have changed since;
    the package version where that cannot be told (no git, no checkout, git too slow)."""
    if not (CODE_ROOT / ".git").exists():  # a copy or an installed package; not a parent's repo
        return __version__
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return __version__
    return commit + ("-dirty" if dirty else "")


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(CODE_ROOT), *args], capture_output=True, text=True, timeout=GIT_SECONDS, check=True
    )
    return done.stdout.strip()


# ---------------------------------------------------------------------------------------------
# This run's configuration, from the command line and, on --resume / --evaluate, the checkpoint

#: The config's fields: a flag whose destination is one of these sets it.
SETTINGS = frozenset(f.name for f in fields(TrainConfig))
#: -c and -pm together name the model (``network.model_name``); a config records only the name.
MODEL_FLAGS = ("cifar", "paper_model")


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations the user actually gave on the command line (not defaults): argparse
    fills in a default only where the namespace has no value yet, so each starts as a marker
    that only a given flag replaces."""
    unset = object()
    start = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {name for name, value in vars(parser.parse_args(argv, start)).items() if value is not unset}


def config_from_args(args: argparse.Namespace, hw: torch.device | Capabilities) -> TrainConfig:
    """Resolve the flags into one ``TrainConfig`` (a new run): the defaults, the changes of the
    chosen setup (the paper's with -pt), then every flag that sets a field and was given a
    value; the model's name from -c / -pm, the device (``hw``) and what follows it, the code's
    version."""
    hw = capabilities(hw)
    flags = {
        name: str(value) if isinstance(value, Path) else value
        for name, value in vars(args).items()
        if name in SETTINGS and value is not None
    }
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
    checkpoint: dict[str, Any],
    path: Path,
    args: argparse.Namespace,
    given: set[str],
    hw: torch.device | Capabilities,
    may_change: frozenset[str],
) -> TrainConfig:
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
            flag = "--" + option.replace("_", "-")  # every data option's flag is its field's name
            takers = " or ".join(f"-ds {n}" for n, d in DATASETS.items() if d.accepts(option))
            return f"{flag} only applies to {takers}"
    if args.split_gpus and not model.splittable:
        return "--split-gpus splits the paper's network: add -pm (and drop -c)"
    if args.split_gpus and launched_by_torchrun():
        return "--split-gpus runs one model over two GPUs in one process; start it with python, not torchrun"
    if args.rewind and not args.resume:
        return "--rewind only applies to --resume"
    if args.crops is not None and not args.evaluate:
        return "--crops chooses the views of --evaluate; add --evaluate PATH, or drop --crops"
    if args.weights and (args.resume or args.evaluate):
        # A checkpoint's own weights are what --resume continues and --evaluate measures.
        return "--weights starts a new run; drop it with --resume or --evaluate, which use the checkpoint's weights"
    if args.freeze_features and not (args.weights or args.resume or args.evaluate):
        return "--freeze-features keeps the starting weights' features, so it needs --weights PATH"
    return None
