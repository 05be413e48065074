"""The settings of a run: the named setups and ``TrainConfig``, every field with its rule.

A field's rule (``utils.Check`` in the field's metadata) is applied to the command line's
flags and to the config a checkpoint carries alike, so a checkpoint cannot hold a value the
command line would refuse: a run name that leaves its folder, an unknown optimiser, a negative
batch size.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from datasets import DATASETS
from utils import Check, __version__, device_problem

#: The models a config may name (``network.build_model`` builds them).
MODEL_NAMES = ("TorchAlexNet", "PaperAlexNet", "CifarAlexNet")
#: Autocast precisions (``trainer.AMP_DTYPES`` maps them to dtypes).
AMP_CHOICES = ("bf16", "fp16", "off")
OPTIMIZERS = ("sgd", "adam")
LOADERS = ("auto", "memory", "stream")
#: Seeds are drawn into 64-bit generators after small offsets (rank, epoch): 32 bits keep clear.
MAX_SEED = 2**32 - 1
#: Generated images: far beyond what a Shapes experiment needs, far below what overflows.
MAX_SHAPES = 10_000_000
MAX_WORKERS = 256


@dataclass(frozen=True)
class Setup:
    """A named training recipe: the defaults that ``--lr``, ``--batch-size`` etc. override."""

    optimizer: str
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    lr_factor: float
    plateau_patience: int
    max_lr_drops: int
    n_epoch: int
    early_stop: int  # epochs without improvement before stopping; 0 = never
    stop_after_last_drop: bool  # a plateau after the last allowed drop ends the run
    paper_update: bool  # SGD with the paper's own update rule (PaperSGD)


SETUPS: dict[str, Setup] = {
    # §5 of the paper: batch 128, momentum 0.9, weight decay 5e-4 with the paper's update rule,
    # lr 0.01 divided by 10 when the validation error stops improving, "reduced three times
    # prior to termination", about 90 epochs.
    "paper": Setup("sgd", lr=0.01, batch_size=128, momentum=0.9, weight_decay=5e-4, lr_factor=0.1,
                   plateau_patience=5, max_lr_drops=3, n_epoch=90, early_stop=0, stop_after_last_drop=True,
                   paper_update=True),
    # Adam with plateau decay and early stopping: works across the three models and data sets
    # without tuning.
    "modern": Setup("adam", lr=1e-4, batch_size=128, momentum=0.9, weight_decay=0.0, lr_factor=0.1,
                    plateau_patience=5, max_lr_drops=3, n_epoch=200, early_stop=50, stop_after_last_drop=False,
                    paper_update=False),
}  # fmt: skip


def setting(default: Any, check: Check) -> Any:
    """A config field with its default and its rule."""
    return field(default=default, metadata={"check": check})


FLAG = Check(bool)
POSITIVE = Check(int, 1)
COUNT = Check(int, 0)
PATH = Check(str, path=True)


@dataclass
class TrainConfig:
    """Everything that defines a run, resolved (no "use the default" placeholders left).

    Dumped to ``config.json`` and stored in every checkpoint as a plain dict.
    """

    dataset: str = setting("Shapes", Check(str, choices=tuple(DATASETS)))
    model: str = setting("TorchAlexNet", Check(str, choices=MODEL_NAMES))
    cifar: bool = setting(False, FLAG)
    paper_model: bool = setting(False, FLAG)
    paper_train: bool = setting(False, FLAG)
    lrn: bool = setting(True, FLAG)
    setup: str = setting("modern", Check(str, choices=tuple(SETUPS)))
    optimizer: str = setting("adam", Check(str, choices=OPTIMIZERS))
    paper_update: bool = setting(False, FLAG)
    lr: float = setting(1e-4, Check(float, 0, low_open=True))
    momentum: float = setting(0.9, Check(float, 0, 1, high_open=True))
    weight_decay: float = setting(0.0, Check(float, 0))
    batch_size: int = setting(128, Check(int, 1, 2**31 - 1))
    eval_batch_size: int = setting(512, Check(int, 1, 2**31 - 1))
    lr_factor: float = setting(0.1, Check(float, 0, 1, low_open=True, high_open=True))
    plateau_patience: int = setting(5, POSITIVE)
    max_lr_drops: int = setting(3, COUNT)
    stop_after_last_drop: bool = setting(False, FLAG)
    warm_start: float = setting(1.0, Check(float, 1))
    n_epoch: int = setting(200, POSITIVE)
    early_stop: int = setting(50, COUNT)  # 0: never
    log_loss_step: int = setting(100, POSITIVE)
    log_confusion_epoch: int = setting(10, POSITIVE)
    seed: int = setting(0, Check(int, 0, MAX_SEED))
    deterministic: bool = setting(False, FLAG)
    device: str = setting("cpu", Check(str, rule=device_problem))
    amp: str = setting("off", Check(str, choices=AMP_CHOICES))  # autocast precision of forward and backward
    channels_last: bool = setting(False, FLAG)
    compile: bool = setting(False, FLAG)
    split_gpus: bool = setting(False, FLAG)
    data_dir: str = setting("dataset", PATH)
    output_dir: str = setting(".", PATH)
    dry_run: bool = setting(False, FLAG)
    log: bool = setting(False, FLAG)
    message: str = setting("", Check(str))
    coarse_labels: bool = setting(False, FLAG)
    cache_dir: str = setting("", PATH)
    loader: str = setting("auto", Check(str, choices=LOADERS))
    workers: int = setting(2, Check(int, 0, MAX_WORKERS))
    shapes_train: int = setting(8000, Check(int, 1, MAX_SHAPES))
    shapes_test: int = setting(1600, Check(int, 1, MAX_SHAPES))
    shapes_seed: int = setting(0, Check(int, 0, 2**31 - 1))
    run_name: str = setting("", Check(str, name=True))
    version: str = setting(__version__, Check(str))

    @classmethod
    def check(cls, name: str) -> Check:
        """The rule of field ``name`` (for argparse types and checkpoint fields alike)."""
        return _CHECKS[name]

    @classmethod
    def from_dict(cls, values: object) -> TrainConfig:
        """A config from a checkpoint's dict, every field checked by its rule (``ValueError``
        naming the field and the reason). Keys this version does not know are dropped, and
        fields an older version did not write take their defaults."""
        if not isinstance(values, dict):
            raise TypeError(f"the config is a {type(values).__name__}, not a dict")
        checked = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            try:
                checked[f.name] = f.metadata["check"](values[f.name])
            except ValueError as error:
                raise ValueError(f"its config's {f.name} {error}") from None
        return cls(**checked)


_CHECKS: dict[str, Check] = {f.name: f.metadata["check"] for f in fields(TrainConfig)}
assert all(f.default is not MISSING for f in fields(TrainConfig))
