"""What a setting says about itself: its default, its rule, and who may change it.

``TrainConfig`` (``training.config``) and the data options it holds (``datasets.DataOptions``)
declare every field with ``setting``. The command line's rules, what ``--resume`` and
``--evaluate`` may change, and what the results report compares are read from these
declarations, so there is no list of field names to keep in step by hand.
"""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any

from utils import Check

FLAG = Check(bool)
POSITIVE = Check(int, 1)
COUNT = Check(int, 0)
PATH = Check(str, path=True)


def setting(default: Any, check: Check, *, resume: bool = False, evaluate: bool = False, identity: bool = True,
            per_process: bool = False) -> Any:  # fmt: skip
    """A config field with its default and its rule (``utils.Check``: the flag's argparse type
    and the test of the value a checkpoint holds), and what it says about itself:

    - ``resume`` / ``evaluate``: the command line may change it when continuing or evaluating
      a checkpoint; otherwise a flag that differs from the checkpoint is refused;
    - ``identity``: it is part of what an experiment compares (the report groups runs by these
      fields; where and how a run was carried out is not);
    - ``per_process``: it says where and how this process runs, so a run continued or evaluated
      takes it from this command line (its flag or its default), never from the checkpoint.
    """
    metadata = {"check": check, "resume": resume, "evaluate": evaluate, "identity": identity,
                "per_process": per_process}  # fmt: skip
    return field(default=default, metadata=metadata)


def names_where(cls: type, key: str, value: bool = True) -> frozenset[str]:
    """The names of the fields of dataclass ``cls`` whose ``key`` says ``value``."""
    return frozenset(f.name for f in fields(cls) if f.metadata[key] is value)
