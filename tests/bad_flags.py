"""Bad command lines, one sentence each: the rows of the bad-input table (docs/troubleshooting.md)
about flags, their values and combinations, and the folders and run names they give.

Each row is a ``main_cli.Case``, run by test_bad_flags.py in a folder holding an earlier run
(``main_cli.run_case``).
"""

from __future__ import annotations

import os
from pathlib import Path

from main_cli import TINY, Case, without_file_permission_override


def locked_output(work: Path, earlier: Path) -> None:
    (work / "readonly").mkdir()
    os.chmod(work / "readonly", 0o555)


def report_below_a_file(work: Path, earlier: Path) -> None:
    (work / "afile").write_text("a regular file\n")


CASES = [
    Case(
        "unknown -ds",
        ["-ds", "ImageNet21k"],
        2,
        r"argument -ds/--dataset: invalid choice: 'ImageNet21k' \(choose from '?Shapes'?, '?Cifar10'?, '?Cifar100'?, "
        r"'?PascalVOC2012'?, '?ImageNet'?, '?ImageFolder'?\)",
    ),
    Case(
        "-c with PascalVOC2012",
        ["-c", "-ds", "PascalVOC2012"],
        2,
        r"-c \(CifarAlexNet, 32x32 inputs\) cannot train on PascalVOC2012's 256x256 images; drop -c",
    ),
    Case("-ne 0", ["-ne", "0"], 2, r"argument -ne/--n_epoch: must be at least 1, got 0"),
    Case(
        "--crops without --evaluate",
        ["--crops", "10", *TINY],
        2,
        r"--crops chooses the views of --evaluate; add --evaluate PATH, or drop --crops",
    ),
    Case("negative value", ["-lls", "-5"], 2, r"argument -lls/--log_loss_step: must be at least 1, got -5"),
    Case(
        "output folder not writable",
        ["-ne", "1", *TINY, "--output-dir", "readonly"],
        1,
        r"cannot write to readonly/checkpoints \(Permission denied\); pass a writable --output-dir\.",
        prepare=locked_output,
        prefix=without_file_permission_override,
    ),
    Case(
        "run name already used",
        ["--run-name", "taken", "-ne", "1", *TINY],
        1,
        r"--run-name taken: runs/Shapes/taken already exists; pick another name, or --resume the run from its "
        r"last.pt\.",
        prepare=lambda w, e: (w / "runs" / "Shapes" / "taken").mkdir(),
    ),
    Case(
        "dry run logging under an earlier run's name",
        ["-d", "-l", "--run-name", "EARLIER_RUN", *TINY],
        1,
        r"--run-name .*: runs/Shapes/.* already exists; pick another name, or --resume the run from its last.pt\.",
    ),
    Case(
        "run name too long",
        ["--run-name", "x" * 300],
        2,
        r"argument --run-name: 'x{19}\.\.\.x{38}' cannot be a folder name: it is 300 bytes long, more than the 200 a "
        r"name may have; use letters, digits, - _ \.",
    ),
    Case(
        "text that is not UTF-8", ["-m", "caf\udce9"], 2, r"argument -m/--message: 'caf\\udce9' is not valid UTF-8 text"
    ),
    Case(
        "seed out of range",
        ["--seed", str(2**70)],
        2,
        r"argument --seed: must be at least 0 and at most 4294967295, got 1180591620717411303424",
    ),
    Case(
        "negative Shapes seed",
        ["--shapes-seed", "-1"],
        2,
        r"argument --shapes-seed: must be at least 0 and at most 2147483647, got -1",
    ),
    Case(
        "too many Shapes images",
        ["--shapes-train", str(10**11)],
        2,
        r"argument --shapes-train: must be at least 1 and at most 10000000, got 100000000000",
    ),
    Case(
        "Shapes count beyond memory",
        ["-c", "--shapes-train", "10000000", "-d"],
        1,
        r"generating 10000000 Shapes images needs about 1200.0 GB of memory and this machine has .* GB available; "
        r"pass a smaller --shapes-train / --shapes-test\.",
    ),
    Case(
        "device that cannot train",
        ["--device", "meta", *TINY],
        1,
        r"--device 'meta' is a meta device; this tool trains on cpu, cuda or cuda:N\.",
    ),
    Case(
        "report folder below a file",
        ["report", "runs", "--out", "afile/report"],
        1,
        r"cannot create the report folder afile/report \(Not a directory\); pass another --out\.",
        prepare=report_below_a_file,
    ),
]
