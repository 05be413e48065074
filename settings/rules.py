"""What a setting may hold and what it says about itself: the one rule for a value, whether the
user types it as a flag or a checkpoint holds it as a field (``Check``), and a config field's
declaration (``setting``): its default, its rule, and who may change it.

``TrainConfig`` (``training.config``) and the data options it holds (``data.core.DataOptions``)
declare every field with ``setting``. The command line's rules, what ``--resume`` and
``--evaluate`` may change, and what the results report compares are read from these
declarations, so there is no list of field names to keep in step by hand. This module sits below
``data/`` and ``training/``, which both declare settings, and uses only ``utils``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from utils import name_problem, quoted

#: The longest free text (``-m``) and path a run records.
MAX_TEXT = 10_000
MAX_PATH = 4096


@dataclass(frozen=True)
class Check:
    """What one setting may hold: its type, range or choices, or that it is a name or a path.

    ``check(value)`` validates a value that already has a type (a checkpoint's field) and
    ``parse(text)`` a command-line string (an argparse ``type``); both raise ``ValueError`` with
    the reason in a few words, so every caller can build its own sentence around it.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    name: bool = False  # one file or folder name (name_problem); "" allowed for "not chosen yet"
    path: bool = False  # a path the user gave: text without NUL, valid UTF-8, at most MAX_PATH
    rule: Callable[[Any], str | None] | None = None  # any further rule: the problem, or None

    def __call__(self, value: Any) -> Any:
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not self.kind:
            raise ValueError(f"must be a {self.kind.__name__}, not a {type(value).__name__}")
        if self.kind is float and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.choices))}, got {quoted(str(value))}")
        if isinstance(value, str):
            self._check_text(value)
        problem = self.rule(value) if self.rule is not None else None
        if problem:
            raise ValueError(problem)
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            lo = "" if self.low is None else f"{'above' if self.low_open else 'at least'} {_number(self.low)}"
            hi = "" if self.high is None else f"{'below' if self.high_open else 'at most'} {_number(self.high)}"
            raise ValueError(f"must be {' and '.join(p for p in (lo, hi) if p)}, got {value}")
        return value

    def _check_text(self, value: str) -> None:
        if self.name:
            problem = name_problem(value) if value else None
            if problem:
                raise ValueError(f"{quoted(value)} cannot be a folder name: it {problem}")
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{quoted(value)} is not valid UTF-8 text") from None
        limit = MAX_PATH if self.path else MAX_TEXT
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters long, more than {limit}")
        if self.path and "\0" in value:
            raise ValueError("holds a NUL character")

    def parse(self, text: str) -> Any:
        """The value of a command-line string (for argparse: errors become ``ArgumentTypeError``)."""
        if self.kind in (int, float):
            try:
                value = self.kind(text)
            except ValueError:
                noun = "whole number" if self.kind is int else "number"
                raise argparse.ArgumentTypeError(f"{quoted(text)} is not a {noun}") from None
        else:
            value = text
        try:
            return self(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None


def _number(x: float) -> str:
    """A bound as people write it: 4294967295 rather than 4294967295.0, 1e-09 as is."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else str(x)


# Rules that many settings share.
FLAG = Check(bool)
POSITIVE = Check(int, 1)
COUNT = Check(int, 0)
PATH = Check(str, path=True)


def setting(
    default: Any,
    check: Check,
    *,
    resume: bool = False,
    evaluate: bool = False,
    identity: bool = True,
    per_process: bool = False,
) -> Any:
    """A config field with its default and its rule (``Check``: the flag's argparse type
    and the test of the value a checkpoint holds), and what it says about itself:

    - ``resume`` / ``evaluate``: the command line may change it when continuing or evaluating
      a checkpoint; otherwise a flag that differs from the checkpoint is refused;
    - ``identity``: it is part of what an experiment compares (the report groups runs by these
      fields; where and how a run was carried out is not);
    - ``per_process``: it says where and how this process runs, so a run continued or evaluated
      takes it from this command line (its flag or its default), never from the checkpoint.
    """
    metadata = {
        "check": check,
        "resume": resume,
        "evaluate": evaluate,
        "identity": identity,
        "per_process": per_process,
    }
    return field(default=default, metadata=metadata)


def names_where(cls: type, key: str, value: bool = True) -> frozenset[str]:
    """The names of the fields of dataclass ``cls`` whose ``key`` says ``value``."""
    return frozenset(f.name for f in fields(cls) if f.metadata[key] is value)
