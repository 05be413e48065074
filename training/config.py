"""The settings of a run: the named setups and ``TrainConfig``, every field with its rule.

A field's rule (``utils.Check`` in the field's metadata) is applied to the command line's
flags and to the config a checkpoint carries alike, so a checkpoint cannot hold a value the
command line would refuse: a run name that leaves its folder, an unknown optimiser, a negative
batch size. The rest of its metadata (``training.fields.setting``) says whether ``--resume`` and
``--evaluate`` may change it and whether it is part of what an experiment compares.
"""

from __future__ import annotations

import subprocess
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from data.core import DataOptions
from data.registry import DATASETS
from hardware.capabilities import device_problem
from network import MODELS
from settings.rules import COUNT, FLAG, PATH, POSITIVE, Check, names_where, setting
from training.schedule import milestones_problem
from utils import FIDELITIES, __version__

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
    "paper": {"optimizer": "sgd", "paper_update": True, "lr": 0.01, "weight_decay": 5e-4, "n_epoch": 90,
              "early_stop": 0, "stop_after_last_drop": True},
}  # fmt: skip


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
    # network, the paper pipeline and the paper's optimiser read it (README, "Fidelity").
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
    device: str = setting("cpu", Check(str, rule=device_problem), resume=True, evaluate=True, identity=False,
                          per_process=True)  # fmt: skip
    # Autocast precision of forward and backward, and the memory layout: they follow the device
    # unless given, so a run moved from a GPU to a CPU drops bf16.
    amp: str = setting("off", Check(str, choices=AMP_CHOICES), resume=True, evaluate=True, identity=False,
                       per_process=True)  # fmt: skip
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
    done = subprocess.run(["git", "-C", str(CODE_ROOT), *args], capture_output=True, text=True, timeout=GIT_SECONDS,
                          check=True)  # fmt: skip
    return done.stdout.strip()
