"""The paper's Table 2 rebuilt from evaluation records, with its printed numbers beside them.

    python main.py --evaluate s0.pt --crops 10 > evaluations/1cnn-s0.json        # one per seed
    python main.py --evaluate s0.pt s1.pt s2.pt s3.pt s4.pt --crops 10 > evaluations/5cnns.json
    python -m experiments report evaluations --paper-table                        # report/paper-table.md

An evaluation record is the one line of JSON that ``--evaluate`` prints (``"kind": "evaluation"``).
Every ``*.json`` below the given folders is read; other JSON (a run's ``summary.json``) is left
alone without a word, while a record that cannot be used is named in a warning, so that a
missing number is never a silent one.

A row is an ensemble size and whether any member started from ``--weights``: "1 CNN", "5 CNNs",
"7 CNNs*", labelled as the paper labels them (its 7 CNNs* averaged two pre-trained networks with
five others). Its cells are the mean top-1 / top-5 error of the records for that row, centre
crop and 10 crops apart; several records (seeds) give ``mean ± sample sd (n)``. Each data set has
a table of its own, headed by its name, because the paper's numbers are ILSVRC-2012 validation
errors and a Shapes or CIFAR error beside them measures something else.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments import ExperimentError
from experiments.report import MISSING, make_report_folder, mean_std

logger = logging.getLogger(__name__)

TABLE_FILE = "paper-table.md"
#: Krizhevsky et al. 2012, Table 2: ILSVRC-2012 validation error (%), 10 crops, as
#: {(members, pre-trained): (top-1, top-5)}. The test-set column (16.4 and 15.3) and SIFT+FVs
#: (26.2, test only) are left out: no evaluation here is on the test set.
PAPER = {(1, False): (40.7, 18.2), (5, False): (38.1, 16.4), (1, True): (39.0, 16.6), (7, True): (36.7, 15.4)}
PAPER_DATASET = "ImageNet"
PAPER_IMAGES = 50_000  # ILSVRC-2012 validation
CROPS = (1, 10)
HEADER = (
    "model",
    "centre crop top-1",
    "centre crop top-5",
    "10 crops top-1",
    "10 crops top-5",
    "paper top-1",
    "paper top-5",
)
MAKE_RECORDS = "python main.py --evaluate A.pt [B.pt ...] --crops 10 > evaluations/NAME.json"


@dataclass(frozen=True)
class Evaluation:
    """What the table takes from one evaluation record."""

    path: Path
    dataset: str
    count: int
    crops: int
    members: int
    pretrained: bool  # any member started from --weights
    top1_error: float
    top5_error: float

    @property
    def row(self) -> tuple[int, bool]:
        return self.members, self.pretrained


def row_label(members: int, pretrained: bool) -> str:
    """The paper's name for a row: "1 CNN", "5 CNNs", "7 CNNs*"."""
    return f"{members} CNN{'s' if members != 1 else ''}{'*' if pretrained else ''}"


# ---------------------------------------------------------------------------------------------
# Finding the records


def find_evaluations(roots: Sequence[Path]) -> list[Evaluation]:
    """Every usable evaluation record in ``roots`` (folders searched for ``*.json``, or record
    files themselves), in path order."""
    paths: dict[Path, Path] = {}
    for root in roots:
        if not root.exists():
            raise ExperimentError(f"{root} does not exist; pass a folder of evaluation records ({MAKE_RECORDS}).")
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*.json") if p.is_file()):
            paths.setdefault(path.resolve(), path)
    evaluations = [e for e in map(read_evaluation, paths.values()) if e is not None]
    if not evaluations:
        where = ", ".join(str(r) for r in roots)
        raise ExperimentError(
            f'found no evaluation records (JSON with "kind": "evaluation") under {where}; make them with '
            f"{MAKE_RECORDS}."
        )
    return evaluations


def read_evaluation(path: Path) -> Evaluation | None:
    """The record in ``path``; None, with a warning naming the file, when it is not JSON or an
    evaluation record lacks what the table needs, and silently when it is other JSON."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("skipping %s: cannot read it as JSON (%s)", path, error)
        return None
    if not isinstance(record, dict) or record.get("kind") != "evaluation":
        return None
    problem = _problem(record)
    if problem:
        logger.warning("skipping %s: %s; make it again with %s", path, problem, MAKE_RECORDS)
        return None
    if "mAP" in record:
        # Top-1 of a multi-label image counts its best class if it is one of the labels: not the
        # data set's metric, and not what Table 2 measures.
        logger.warning(
            "skipping %s: a multi-label (mAP) evaluation of %s has no Table 2 errors", path, record["dataset"]
        )
        return None
    if record["crops"] is None:
        logger.warning(
            "skipping %s: its members were evaluated with different numbers of crops (crops null), so it belongs "
            "in neither the centre-crop nor the 10-crop columns; evaluate them again with one --crops",
            path,
        )
        return None
    if record["crops"] not in CROPS:
        logger.warning("skipping %s: crops %s is neither the centre crop (1) nor 10 crops", path, record["crops"])
        return None
    members = record["members"]
    return Evaluation(
        path=path,
        dataset=record["dataset"],
        count=record["count"],
        crops=record["crops"],
        members=len(members),
        pretrained=any(m["pretrained"] for m in members),
        top1_error=float(record["top1_error"]),
        top5_error=float(record["top5_error"]),
    )


def _problem(record: dict[str, Any]) -> str | None:
    """What keeps an evaluation record out of the table, or None."""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value: Any) -> bool:
        return (whole(value) or isinstance(value, float)) and math.isfinite(value)

    checks = {
        "dataset": (lambda v: isinstance(v, str) and bool(v), "a data set's name"),
        "count": (whole, "a number of images"),
        "crops": (lambda v: v is None or whole(v), "1, 10 or null"),
        "top1_error": (number, "a number"),
        "top5_error": (number, "a number"),
        "members": (lambda v: isinstance(v, list) and bool(v), "a list of members"),
    }
    for key, (valid, expected) in checks.items():
        if key not in record:
            return f"the record has no {key!r}"
        if not valid(record[key]):
            return f"its {key!r} is {json.dumps(record[key])[:40]}, not {expected}"
    for index, member in enumerate(record["members"], start=1):
        if not isinstance(member, dict) or not isinstance(member.get("pretrained"), bool):
            return f"member {index} has no 'pretrained' (true or false)"
    return None


# ---------------------------------------------------------------------------------------------
# The table


def format_cell(values: Sequence[float]) -> str:
    """One decimal, as the paper prints: the value for one record, ``mean ± sample sd (n)`` for
    several, a dash for none."""
    if not values:
        return MISSING
    mean, sd = mean_std(values)
    return f"{mean:.1f}" if sd is None else f"{mean:.1f} ± {sd:.1f} ({len(values)})"


def table_rows(evaluations: Sequence[Evaluation]) -> list[list[str]]:
    """The rows of one data set's table: the paper's four and any others the records have, no
    star before star, then by ensemble size."""
    rows = sorted(set(PAPER) | {e.row for e in evaluations}, key=lambda row: (row[1], row[0]))
    lines = []
    for members, pretrained in rows:
        cells = [row_label(members, pretrained)]
        for crops in CROPS:
            chosen = [e for e in evaluations if e.row == (members, pretrained) and e.crops == crops]
            cells += [format_cell([e.top1_error for e in chosen]), format_cell([e.top5_error for e in chosen])]
        paper = PAPER.get((members, pretrained))
        cells += [f"{paper[0]:.1f}", f"{paper[1]:.1f}"] if paper else [MISSING, MISSING]
        lines.append(cells)
    return lines


def markdown(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    """A GitHub Markdown table: the label left, numbers right-aligned."""
    align = ["---", *["---:"] * (len(header) - 1)]
    return "\n".join("| " + " | ".join(line) + " |" for line in (header, align, *rows))


def heading(dataset: str, counts: Sequence[int]) -> str:
    """The sentence that says what the table's numbers were measured on, beside the paper's."""
    images = " / ".join(f"{c:,}" for c in sorted(set(counts)))
    measured = f"Table 2 layout, evaluated on {dataset} ({images} images)"
    if dataset != PAPER_DATASET:
        return (
            f"{measured}: the paper's columns are its ILSVRC-2012 validation errors, not {dataset}, so the two "
            "sides do not compare."
        )
    whole = "" if set(counts) == {PAPER_IMAGES} else f"; the paper used all {PAPER_IMAGES:,} validation images"
    return f"{measured}: the paper's columns are the same data set, ILSVRC-2012 validation{whole}."


def paper_table(evaluations: Sequence[Evaluation]) -> str:
    """The Markdown of every data set's table, data sets in name order."""
    datasets = sorted({e.dataset for e in evaluations})
    lines = [
        "# Table 2 of Krizhevsky et al. (2012), from evaluation records",
        "",
        "Top-1 and top-5 errors in %. One record per cell is printed as it is (one decimal, as the paper "
        "prints); several (seeds) as mean ± sample standard deviation (n − 1) with their number in brackets. "
        "A row is the number of networks averaged; * marks an ensemble with a member that started from `--weights` "
        "(pre-trained, as the paper marks them). The paper's columns are its 10-crop ILSVRC-2012 validation "
        "errors.",
    ]
    for dataset in datasets:
        chosen = [e for e in evaluations if e.dataset == dataset]
        lines += [
            "",
            f"## {dataset}",
            "",
            heading(dataset, [e.count for e in chosen]),
            "",
            markdown(table_rows(chosen)),
        ]
    return "\n".join(lines) + "\n"


def write_paper_table(roots: Sequence[Path], out: Path) -> tuple[Path, str]:
    """Write ``paper-table.md`` into ``out`` from the records under ``roots``; returns its path
    and its text (for the terminal)."""
    evaluations = find_evaluations(roots)
    text = paper_table(evaluations)
    make_report_folder(out)
    path = out / TABLE_FILE
    path.write_text(text)
    logger.info("wrote %s from %d evaluation record(s)", path, len(evaluations))
    return path, text
