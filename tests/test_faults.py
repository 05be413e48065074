"""Runtime faults and the bad-input table as a whole: a run whose loss becomes NaN stops naming
the step and keeps its last good checkpoint, and every row of docs/troubleshooting.md's table is
a tested case.

The rows go through the real command line by subject: test_bad_data.py, test_bad_checkpoints.py
and test_bad_flags.py (their cases in bad_data.py, bad_checkpoints.py and bad_flags.py); the rows
that need more than one command are tested in test_signals.py (Ctrl-C / SIGTERM, stops while
reading data or evaluating), test_checkpoints.py (a run in use by another process) and
test_cli.py (CUDA).
"""

from __future__ import annotations

import json
import re

import bad_checkpoints
import bad_data
import bad_flags
import torch
from main_cli import only, snapshot


def test_catalogue_is_the_troubleshooting_table(repo_root):
    """Every row of the bad-input table (docs/troubleshooting.md) is a case of bad_data.py,
    bad_checkpoints.py or bad_flags.py, or one of the rows tested on their own, and every case is a
    row."""
    readme = (repo_root / "docs" / "troubleshooting.md").read_text()
    table = readme[readme.index("| bad input |") :].split("\n\n")[0].splitlines()[2:]
    rows = {line.split("|")[1].strip().strip("`") for line in table}
    names = [c.name for c in (*bad_data.CASES, *bad_checkpoints.CASES, *bad_flags.CASES)]
    assert len(names) == len(set(names))
    # Rows tested by their own tests: test_faults (divergence), test_signals (signals in training, a stop
    # while reading data or evaluating), test_cli (CUDA), test_checkpoints (two processes on one run),
    # test_shards (several bad images, an oversized verified.json, an image replaced with its stamp),
    # test_weights, test_predict, test_export, test_figures, test_signals (stops while torch loads, a
    # DataLoader worker killed).
    assert rows == set(names) | {
        "training diverges (NaN or infinite loss)",
        "Ctrl-C / SIGTERM",
        "CUDA asked for, none present",
        "run in use by another process",
        "stop while reading data or evaluating",
        "several unreadable images",
        "--weights whose hash is not its name's",
        "--weights of another network",
        "--weights not an AlexNet",
        "predict: unreadable files",
        "export: OUT exists",
        "figures: checkpoint away from its run",
        "figures: run folder not writable",
        "predict: a FIFO or an unreadable folder",
        "class name with a comma",
        "export to ONNX",
        "checkpoint listing more classes than its network has",
        "Ctrl-C again and again while starting",
        "DataLoader worker killed",
        "oversized verified.json",
        "image replaced with its size and time kept",
    }


# ---------------------------------------------------------------------------------------------
# Divergence


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, run_main, tiny_shapes):
    assert run_main("-c", "-ne", "1", *tiny_shapes, cwd=tmp_path).returncode == 0
    last = only(tmp_path / "checkpoints" / "Shapes", "*/last.pt")
    before = snapshot(last.parent)
    result = run_main("--resume", str(last), "-ne", "3", "--lr", "1e30", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    match = re.search(
        r"error: training diverged: the loss became NaN or infinite at step (\d+) \(epoch 2, learning "
        r"rate 1.00e\+30\); (.*)last.pt from epoch 1 is kept: resume from it with a smaller learning "
        r"rate, e.g. --resume .*last.pt --lr 1.0e\+29\.",
        result.stderr,
    )
    assert match, result.stderr
    assert 3 < int(match.group(1)) <= 6  # epoch 2 holds steps 4-6
    assert snapshot(last.parent) == before
    assert torch.load(last, weights_only=True)["epoch"] == 1
    summary = json.loads(only(tmp_path / "runs" / "Shapes", "*/summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs"] == 1


def test_nan_in_the_first_epoch_says_nothing_was_saved(tmp_path, run_main, tiny_shapes):
    result = run_main("-c", "-ne", "1", "--lr", "1e30", *tiny_shapes, cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "at step " in result.stderr
        and "(epoch 1, learning rate 1.00e+30); nothing was saved: start again with "
        "a smaller learning rate, e.g. --lr 1.0e+29."
        in result.stderr
    )
    assert not list((tmp_path / "checkpoints").rglob("*.pt"))
