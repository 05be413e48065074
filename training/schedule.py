"""The learning-rate schedule: decay on plateaus, early stopping and the warm start."""

from __future__ import annotations

import itertools
import math
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from settings.rules import Check


@dataclass
class Decision:
    """What the schedule decided after an epoch."""

    improved: bool
    lr: float
    dropped: bool = False
    stop: str = ""  # why the run should stop, or "" to go on


@dataclass
class PlateauSchedule:
    """Learning-rate decay on plateaus, early stopping, and the warm start, in one place.

    A plateau is ``patience`` epochs in a row without a better score; each plateau multiplies
    the learning rate by ``factor``, at most ``max_drops`` times. With ``warm_start`` = F > 1 the
    run starts at F x ``base_lr`` (the original v2 tool's finding: start large, decay on plateau); the
    plateaus that bring it back down to ``base_lr`` do not count as drops. Then:

    - ``stop_after_last_drop`` (paper): the first plateau after the last drop ends the run;
    - ``early_stop`` > 0 (modern): ``early_stop`` epochs without a better score end the run.

    ``milestones`` (``--lr-milestones``): epochs after which the rate is multiplied by ``factor``
    whatever the scores, as the 2012 log records its drops (after epochs 25, 51 and 79),
    alongside the plateau rule; each counts as one of the ``max_drops``. They come from the
    config, not the state: a resumed run is given them again.
    """

    base_lr: float
    factor: float = 0.1
    patience: int = 5
    max_drops: int = 3
    early_stop: int = 0
    stop_after_last_drop: bool = False
    warm_start: float = 1.0
    lr: float = 0.0
    best: float = -math.inf
    bad_epochs: int = 0
    stale: int = 0
    drops: int = 0
    milestones: InitVar[tuple[int, ...]] = ()
    _milestones: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self, milestones: tuple[int, ...]) -> None:
        if self.lr == 0.0:
            self.lr = self.base_lr * self.warm_start
        self._milestones = tuple(milestones)

    def step(self, score: float, epoch: int | None = None) -> Decision:
        """Record one epoch's score (of epoch ``epoch``, counted from 1, which milestones need)
        and return the learning rate to use next."""
        improved = score > self.best
        if improved:
            self.best, self.bad_epochs, self.stale = score, 0, 0
        else:
            self.bad_epochs += 1
            self.stale += 1
        decision = Decision(improved=improved, lr=self.lr)
        if self.bad_epochs >= self.patience:
            self.bad_epochs = 0
            if self.lr > self.base_lr * (1 + 1e-9):  # still warm: come back down, uncounted
                self.lr = max(self.lr * self.factor, self.base_lr)
                decision.dropped = True
            elif self.drops < self.max_drops:
                self.drops += 1
                self.lr *= self.factor
                decision.dropped = True
            elif self.stop_after_last_drop:
                decision.stop = f"a plateau after the last of {self.max_drops} learning-rate drops"
        if epoch in self._milestones and not decision.dropped and self.drops < self.max_drops:
            self.drops += 1
            self.lr *= self.factor
            decision.dropped = True
        if not decision.stop and self.early_stop and self.stale >= self.early_stop:
            decision.stop = f"no better score for {self.stale} epochs"
        decision.lr = self.lr
        return decision

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        del state["_milestones"]  # from the config
        return state

    def load_state_dict(self, state: object) -> None:
        """Continue from ``state_dict()``'s output, every field checked first (``ValueError``
        naming the field): a checkpoint's schedule is untrusted input like the rest of it."""
        self.__dict__.update(check_schedule_state(state))


def _best_score(value: Any) -> Any:
    """The best score so far: a percentage, or minus infinity before the first epoch."""
    return value if value == -math.inf else Check(float, 0, 100)(value)


_STATE_CHECKS: dict[str, Any] = {
    "base_lr": Check(float, 0, low_open=True),
    "factor": Check(float, 0, 1, low_open=True, high_open=True),
    "patience": Check(int, 1),
    "max_drops": Check(int, 0),
    "early_stop": Check(int, 0),
    "stop_after_last_drop": Check(bool),
    "warm_start": Check(float, 1),
    "lr": Check(float, 0, low_open=True),
    "best": _best_score,
    "bad_epochs": Check(int, 0),
    "stale": Check(int, 0),
    "drops": Check(int, 0),
}
assert set(_STATE_CHECKS) == {f.name for f in fields(PlateauSchedule)} - {"_milestones"}


def check_schedule_state(state: object) -> dict[str, Any]:
    """``state`` if it is a whole ``PlateauSchedule.state_dict()`` with every value in range."""
    if not isinstance(state, dict) or set(state) != set(_STATE_CHECKS):
        raise ValueError("its scheduler state is not the learning-rate schedule's")
    checked = {}
    for key, check in _STATE_CHECKS.items():
        try:
            checked[key] = check(state[key])
        except (TypeError, ValueError) as error:
            raise ValueError(f"its scheduler's {key} {error}") from None
    return checked


def milestones_problem(text: str) -> str | None:
    """Why ``text`` is not a list of epochs for ``--lr-milestones`` ("25,51,79": increasing whole
    numbers from 1, comma-separated; "" for none), or None."""
    if not text:
        return None
    parts = text.split(",")
    if len(parts) > 1000 or not all(p.strip().isdigit() for p in parts):
        return f"must be epochs separated by commas, e.g. 25,51,79, got {text[:40]!r}"
    epochs = [int(p) for p in parts]
    if epochs[0] < 1 or any(b <= a for a, b in itertools.pairwise(epochs)):
        return f"must be increasing epochs from 1, e.g. 25,51,79, got {text[:40]!r}"
    return None


def parse_milestones(text: str) -> tuple[int, ...]:
    """The epochs of a checked ``--lr-milestones`` value."""
    return tuple(int(p) for p in text.split(",")) if text else ()
