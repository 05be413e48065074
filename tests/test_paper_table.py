"""``python -m experiments report --paper-table``: the paper's Table 2 from evaluation records.

The records are written here as ``main.py --evaluate`` prints them (one line of JSON), with
known errors, beside the other JSON a folder of runs holds; the table they make is spelled out
in full, every mean and sample deviation worked out by hand in the comments.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from experiments import ExperimentError
from experiments.__main__ import main
from experiments.paper_table import (
    PAPER,
    find_evaluations,
    format_cell,
    heading,
    paper_table,
    read_evaluation,
    row_label,
    write_paper_table,
)


def record(
    path: Path,
    dataset: str,
    crops: int | None,
    top1_error: float,
    top5_error: float,
    pretrained: tuple[bool, ...] = (False,),
    count: int = 240,
) -> dict[str, Any]:
    """An evaluation record as ``--evaluate`` prints it: accuracies, their errors by float
    subtraction, and one entry per member."""
    top1, top5 = 100 - top1_error, 100 - top5_error
    names = [f"{path.stem}-m{i}.pt" for i in range(len(pretrained))]
    members = [
        {
            "checkpoint": name,
            "model": "CifarAlexNet",
            "pretrained": flag,
            "crops": crops or 1,
            "loss": 1.5,
            "top1": top1,
            "top5": top5,
            "top1_error": 100 - top1,
            "top5_error": 100 - top5,
            "count": count,
        }
        for name, flag in zip(names, pretrained, strict=True)
    ]
    evaluation = {
        "kind": "evaluation",
        "checkpoint": names[0],
        "checkpoints": names,
        "dataset": dataset,
        "crops": crops,
        "loss": 1.5,
        "top1": top1,
        "top5": top5,
        "count": count,
        "top1_error": 100 - top1,
        "top5_error": 100 - top5,
        "members": members,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(evaluation) + "\n")
    return evaluation


SEVEN_STAR = (True, True, False, False, False, False, False)  # the paper's 7 CNNs*: two pre-trained


@pytest.fixture
def records(tmp_path: Path) -> Path:
    """A folder of evaluations on Shapes and CIFAR-10, and the other files such a folder holds."""
    root = tmp_path / "evaluations"
    shapes = root / "shapes"
    # 1 CNN, three seeds, 10 crops: top-1 40, 41, 42 -> 41.0 ± 1.0; top-5 18, 18.5, 19 -> 18.5 ± 0.5.
    for seed, (top1, top5) in enumerate([(40.0, 18.0), (41.0, 18.5), (42.0, 19.0)]):
        record(shapes / f"1cnn-s{seed}-10crop.json", "Shapes", 10, top1, top5)
    # 1 CNN, two seeds, centre crop: 45.25, 46.75 -> 46.0 ± 1.06 (1.5 / sqrt 2); 20, 22 -> 21.0 ± 1.41.
    record(shapes / "1cnn-s0-centre.json", "Shapes", 1, 45.25, 20.0)
    record(shapes / "1cnn-s1-centre.json", "Shapes", 1, 46.75, 22.0)
    # 3 CNNs, a row the paper has not; 17.25 prints 17.2 (one decimal, half to even).
    record(shapes / "3cnns-centre.json", "Shapes", 1, 43.0, 17.25, pretrained=(False,) * 3)
    record(shapes / "5cnns-10crop.json", "Shapes", 10, 38.125, 16.0, pretrained=(False,) * 5)  # 38.125 prints 38.1
    record(shapes / "1cnn-pretrained.json", "Shapes", 10, 39.5, 16.5, pretrained=(True,))
    record(shapes / "2cnns-one-pretrained.json", "Shapes", 10, 37.0, 15.5, pretrained=(False, True))
    record(shapes / "7cnns-pretrained.json", "Shapes", 10, 36.0, 15.0, pretrained=SEVEN_STAR)
    record(root / "cifar" / "1cnn.json", "CIFAR10", 1, 100 - 59.3, 100 - 95.0, count=10_000)
    record(root / "mixed.json", "Shapes", None, 30.0, 10.0, pretrained=(False, False))
    (root / "junk.json").write_text('{"kind": "evaluation", ')
    broken = record(root / "no-top5.json", "Shapes", 10, 30.0, 10.0)
    del broken["top5_error"]
    (root / "no-top5.json").write_text(json.dumps(broken))
    unmarked = record(root / "unmarked.json", "Shapes", 10, 30.0, 10.0)
    del unmarked["members"][0]["pretrained"]
    (root / "unmarked.json").write_text(json.dumps(unmarked))
    run = root / "runs" / "Shapes" / "run-s0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"run_name": "run-s0", "best_top1": 50.0, "status": "finished"}))
    (run / "config.json").write_text(json.dumps({"seed": 0}))
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "notes.txt").write_text("not a record, not *.json")
    (root / "old.json").mkdir()  # a folder with a record's name
    return root


INTRO = (
    "# Table 2 of Krizhevsky et al. (2012), from evaluation records\n"
    "\n"
    "Top-1 and top-5 errors in %. One record per cell is printed as it is (one decimal, as the paper prints); "
    "several (seeds) as mean ± sample standard deviation (n − 1) with their number in brackets. A row is the number "
    "of networks averaged; * marks an ensemble with a member that started from `--weights` (pre-trained, as the "
    "paper marks them). The paper's columns are its 10-crop ILSVRC-2012 validation errors.\n"
)
HEADER = (
    "| model | centre crop top-1 | centre crop top-5 | 10 crops top-1 | 10 crops top-5 | paper top-1 | paper top-5 |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
)
EXPECTED = (
    INTRO + "\n## CIFAR10\n\n"
    "Table 2 layout, evaluated on CIFAR10 (10,000 images): the paper's columns are its ILSVRC-2012 validation "
    "errors, not CIFAR10, so the two sides do not compare.\n\n"
    + HEADER
    + "| 1 CNN | 40.7 | 5.0 | — | — | 40.7 | 18.2 |\n"
    "| 5 CNNs | — | — | — | — | 38.1 | 16.4 |\n"
    "| 1 CNN* | — | — | — | — | 39.0 | 16.6 |\n"
    "| 7 CNNs* | — | — | — | — | 36.7 | 15.4 |\n"
    "\n## Shapes\n\n"
    "Table 2 layout, evaluated on Shapes (240 images): the paper's columns are its ILSVRC-2012 validation errors, "
    "not Shapes, so the two sides do not compare.\n\n"
    + HEADER
    + "| 1 CNN | 46.0 ± 1.1 (2) | 21.0 ± 1.4 (2) | 41.0 ± 1.0 (3) | 18.5 ± 0.5 (3) | 40.7 | 18.2 |\n"
    "| 3 CNNs | 43.0 | 17.2 | — | — | — | — |\n"
    "| 5 CNNs | — | — | 38.1 | 16.0 | 38.1 | 16.4 |\n"
    "| 1 CNN* | — | — | 39.5 | 16.5 | 39.0 | 16.6 |\n"
    "| 2 CNNs* | — | — | 37.0 | 15.5 | — | — |\n"
    "| 7 CNNs* | — | — | 36.0 | 15.0 | 36.7 | 15.4 |\n"
)


def test_table_from_fixture_records(records: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The whole file, cell by cell: rows as the paper labels them (no star first, then by size),
    seeds averaged, centre crop and 10 crops apart, one table per data set, the paper's numbers
    in their own columns and a dash where a row has none."""
    with caplog.at_level(logging.WARNING, logger="experiments"):
        path, text = write_paper_table([records], tmp_path / "report")
    assert path == tmp_path / "report" / "paper-table.md"
    assert path.read_text() == text
    assert text == EXPECTED


def test_skipped_files_are_named(records: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A *.json that does not parse, a record without a key, one whose members lack a key and one
    whose members used different crops are each named in a warning; other JSON (a summary.json, a
    list) passes without one."""
    with caplog.at_level(logging.WARNING, logger="experiments"):
        evaluations = find_evaluations([records])
    assert len(evaluations) == 11
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert len(warnings) == 4
    assert warnings[0].startswith(f"skipping {records / 'junk.json'}: cannot read it as JSON (")
    assert warnings[1] == (
        f"skipping {records / 'mixed.json'}: its members were evaluated with different numbers of crops (crops "
        "null), so it belongs in neither the centre-crop nor the 10-crop columns; evaluate them again with one --crops"
    )
    assert warnings[2] == (
        f"skipping {records / 'no-top5.json'}: the record has no 'top5_error'; make it again with python main.py "
        "--evaluate A.pt [B.pt ...] --crops 10 > evaluations/NAME.json"
    )
    assert warnings[3] == (
        f"skipping {records / 'unmarked.json'}: member 1 has no 'pretrained' (true or false); make it again with "
        "python main.py --evaluate A.pt [B.pt ...] --crops 10 > evaluations/NAME.json"
    )


AGAIN = "; make it again with python main.py --evaluate A.pt [B.pt ...] --crops 10 > evaluations/NAME.json"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"top1_error": "40.7"}, "its 'top1_error' is \"40.7\", not a number" + AGAIN),
        ({"top5_error": float("nan")}, "its 'top5_error' is NaN, not a number" + AGAIN),
        ({"members": []}, "its 'members' is [], not a list of members" + AGAIN),
        ({"crops": 5}, "crops 5 is neither the centre crop (1) nor 10 crops"),
        ({"mAP": 80.0}, "a multi-label (mAP) evaluation of Shapes has no Table 2 errors"),
    ],
)
def test_records_the_table_cannot_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: dict[str, Any], reason: str
) -> None:
    """A record with a value --evaluate does not write, or one Table 2 has no place for, is named."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**record(path, "Shapes", 10, 40.0, 18.0), **change}))
    with caplog.at_level(logging.WARNING, logger="experiments"):
        assert read_evaluation(path) is None
    assert [r.getMessage() for r in caplog.records] == [f"skipping {path}: {reason}"]


def test_a_record_file_is_a_root_and_counted_once(records: Path) -> None:
    """A record named on the command line is read; named again under its folder, it counts once."""
    five = records / "shapes" / "5cnns-10crop.json"
    assert [e.members for e in find_evaluations([five])] == [5]
    assert len(find_evaluations([five, records / "shapes"])) == 10


def test_mean_and_sample_sd() -> None:
    """One record as it is, to one decimal; several as mean ± sample sd (n − 1) and n."""
    assert format_cell([100 - 59.3]) == "40.7"  # 40.700000000000003
    assert format_cell([40.0, 41.0, 42.0]) == "41.0 ± 1.0 (3)"
    # Five seeds: mean 38.2; deviations 0, .3, -.3, -.2, .2 -> squares sum .26, / 4 = .065, sd 0.255.
    assert format_cell([38.2, 38.5, 37.9, 38.0, 38.4]) == "38.2 ± 0.3 (5)"
    assert format_cell([16.0, 16.0]) == "16.0 ± 0.0 (2)"
    assert format_cell([]) == "—"


def test_labels_and_the_papers_numbers() -> None:
    """The paper's four rows and their printed errors (Table 2, ILSVRC-2012 validation)."""
    assert [row_label(k, star) for k, star in PAPER] == ["1 CNN", "5 CNNs", "1 CNN*", "7 CNNs*"]
    assert list(PAPER.values()) == [(40.7, 18.2), (38.1, 16.4), (39.0, 16.6), (36.7, 15.4)]


def test_imagenet_heading_names_the_same_data_set() -> None:
    """On ImageNet the paper's columns are comparable, and a subset of the validation set is said
    to be one."""
    assert heading("ImageNet", [50_000, 50_000]) == (
        "Table 2 layout, evaluated on ImageNet (50,000 images): the paper's columns are the same data set, "
        "ILSVRC-2012 validation."
    )
    assert heading("ImageNet", [5_000, 50_000]) == (
        "Table 2 layout, evaluated on ImageNet (5,000 / 50,000 images): the paper's columns are the same data set, "
        "ILSVRC-2012 validation; the paper used all 50,000 validation images."
    )


def test_command_line(
    records: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``report --paper-table`` prints the table and writes it in place of the runs' report: the
    summary.json among the records makes no report.md."""
    out = tmp_path / "report"
    assert main(["report", str(records), "--paper-table", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == f"{EXPECTED}\npaper table: {out / 'paper-table.md'}\n"
    assert sorted(p.name for p in out.iterdir()) == ["paper-table.md"]


def test_no_records_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A folder without records, and a folder that is not there, are one sentence and exit 1."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "summary.json").write_text(json.dumps({"best_top1": 50.0}))
    sentence = (
        f'found no evaluation records (JSON with "kind": "evaluation") under {empty}, {tmp_path}; make them with '
        "python main.py --evaluate A.pt [B.pt ...] --crops 10 > evaluations/NAME.json."
    )
    with pytest.raises(ExperimentError) as raised:
        find_evaluations([empty, tmp_path])
    assert str(raised.value) == sentence
    caplog.clear()
    assert main(["report", str(empty), "--paper-table", "--out", str(tmp_path / "out")]) == 1
    assert [r.getMessage() for r in caplog.records] == [f"error: {sentence.replace(f', {tmp_path}', '')}"]
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "out").exists()
    caplog.clear()
    assert main(["report", str(tmp_path / "gone"), "--paper-table"]) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"error: {tmp_path / 'gone'} does not exist; pass a folder of evaluation records (python main.py --evaluate "
        "A.pt [B.pt ...] --crops 10 > evaluations/NAME.json)."
    ]


def test_the_readmes_table_is_the_one_its_records_make(repo_root):
    """The README's Table 2 example is what the report makes of the records it was built from
    (experiments/results/table2_shapes), row for row."""
    readme = (repo_root / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(readme) if line.startswith("| model | centre crop top-1 |"))
    shown = readme[start : readme.index("", start)]
    made = paper_table(find_evaluations([repo_root / "experiments" / "results" / "table2_shapes"])).splitlines()
    assert len(shown) == 4 and made[made.index(shown[0]) :][:4] == shown
