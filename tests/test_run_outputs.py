"""What a run leaves behind and reads back: ``metrics.jsonl`` (written per epoch, cut back on
resume, read by the report), checkpoints written by version 0.1 (resumed and evaluated by this
one), ``Progress`` and the weight checks, and the task chosen from the data set's labels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from main_cli import only

from data.core import DataSet, Split
from experiments.report import read_curves
from network import CifarAlexNet, TorchAlexNet
from training.outputs import read_metrics
from training.resume import CHECKPOINT_FORMAT, Progress, check_compatible, load_weights
from training.tasks import MULTI, SINGLE, task_for

#: The last commit of version 0.1 (before the trainer was split): its checkpoints must resume.
VERSION_0_1 = "5b1de5904d7f874e14474987c95995b655ad4545"
EPOCH_SCALARS = {
    "step",
    "seconds",
    "train/epoch",
    "train/lr",
    "train/epoch_loss",
    "train/images_per_second",
    "val/loss",
    "val/top1",
    "val/top5",
    "val/top1_max",
}


def metrics_of(root: Path) -> list[dict]:
    return read_metrics(only(root / "runs" / "Shapes", "*/metrics.jsonl"))


def test_metrics_jsonl_has_every_scalar_of_every_epoch_and_is_cut_back_on_resume(tmp_path, run_main, tiny_shapes):
    assert run_main("-c", "-ne", "2", *tiny_shapes, cwd=tmp_path).returncode == 0
    rows = metrics_of(tmp_path)
    assert [row["train/epoch"] for row in rows] == [1, 2] and set(rows[0]) == EPOCH_SCALARS
    assert [row["step"] for row in rows] == [3, 6]  # 120 images in batches of 40
    summary = json.loads(only(tmp_path / "runs" / "Shapes", "*/summary.json").read_text())
    assert rows[-1]["val/top1"] == summary["final_top1"] and rows[-1]["val/top1_max"] == summary["top1_max"]
    # What an interrupted run logged after its last checkpoint (step 6), and a line cut short.
    path = only(tmp_path / "runs" / "Shapes", "*/metrics.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({**rows[-1], "step": 9, "train/epoch": 3}) + "\n" + '{"step": 1')
    last = only(tmp_path / "checkpoints" / "Shapes", "*/last.pt")
    assert run_main("--resume", str(last), "-ne", "3", cwd=tmp_path).returncode == 0
    resumed = metrics_of(tmp_path)
    assert [row["train/epoch"] for row in resumed] == [1, 2, 3] and resumed[:2] == rows
    assert read_curves(path.parent, "Shapes")["top1"] == {row["train/epoch"]: row["val/top1"] for row in resumed}


@pytest.fixture(scope="module")
def run_of_version_0_1(tmp_path_factory, repo_root, tiny_shapes) -> Path:
    """A folder with a finished run written by version 0.1's own code (from git history)."""
    has_commit = (
        shutil.which("git")
        and subprocess.run(
            ["git", "-C", str(repo_root), "cat-file", "-e", f"{VERSION_0_1}^{{commit}}"],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    if not has_commit:
        pytest.skip("version 0.1 is not in this checkout's git history")
    root = tmp_path_factory.mktemp("v01")
    code, work = root / "code", root / "work"
    code.mkdir()
    work.mkdir()
    archive = subprocess.run(["git", "-C", str(repo_root), "archive", VERSION_0_1], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    flags = ["-c", "-ne", "1", "--seed", "4", *tiny_shapes]
    result = subprocess.run(
        [sys.executable, str(code / "main.py"), *flags],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return work


def test_a_checkpoint_of_version_0_1_evaluates_and_resumes(run_of_version_0_1, tmp_path, run_main):
    work = tmp_path / "work"
    shutil.copytree(run_of_version_0_1, work, copy_function=os.link)
    last = only(work / "checkpoints" / "Shapes", "*/last.pt")
    old = torch.load(last, weights_only=True)
    assert old["version"].startswith("0.1.") and "format" not in old
    evaluated = run_main("--evaluate", str(last), cwd=work)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["top1"] == old["last"]["top1"]  # same weights, same data, same numbers
    resumed = run_main("--resume", str(last), "-ne", "2", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch 1 (step 3)" in resumed.stderr
    new = torch.load(last, weights_only=True)
    assert (new["epoch"], new["global_step"], new["format"]) == (2, 6, CHECKPOINT_FORMAT)
    assert [row["train/epoch"] for row in metrics_of(work)] == [2]  # 0.1 wrote no metrics.jsonl


def test_progress_round_trips_through_a_checkpoint_dict():
    progress = Progress(epoch=3, global_step=30, best={"top1": 50.0}, best_epoch=2, top1_max=50.0, stop_reason="x")
    assert Progress.from_checkpoint({**asdict(progress), "model": {}, "optimizer": {}}) == progress
    assert Progress.from_checkpoint({"epoch": 1}) == Progress(epoch=1)  # fields 0.1.0 did not write: defaults


def test_check_compatible_only_checks_and_load_weights_loads(tmp_path):
    source, target = CifarAlexNet(10), CifarAlexNet(10)
    checkpoint = {
        "config": {"model": "CifarAlexNet", "dataset": "Shapes"},
        "classes": list("abcdefghij"),
        "model": source.state_dict(),
    }
    before = target.features[0].weight.clone()
    check_compatible(checkpoint, tmp_path / "x.pt", target, 10, "Shapes")
    assert torch.equal(target.features[0].weight, before)
    load_weights(checkpoint, tmp_path / "x.pt", target, 10, "Shapes")
    assert torch.equal(target.features[0].weight, source.features[0].weight)
    with pytest.raises(Exception, match="holds a CifarAlexNet, but this command builds a TorchAlexNet"):
        load_weights(checkpoint, tmp_path / "x.pt", TorchAlexNet(10), 10, "Shapes")


def test_the_task_follows_the_labels_whatever_the_data_set_is_called():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    single = Split(images, torch.zeros(2, dtype=torch.int64))
    multi = Split(images, torch.zeros(2, 20, dtype=torch.int8))
    assert task_for(DataSet("Shapes", list("abcdefghij"), single, single)) is SINGLE
    assert task_for(DataSet("PascalVOC2012", [str(i) for i in range(20)], multi, multi)) is MULTI
    assert task_for(DataSet("made in code", ["a", "b"], multi, multi)) is MULTI  # unregistered: by its labels
    assert (SINGLE.score_key, MULTI.score_key) == ("top1", "mAP")


def test_a_reader_whose_labels_disagree_with_its_registry_entrys_task_is_a_programming_error(monkeypatch):
    """The registry declares each data set's task; training reads it from the labels, so
    ``load_dataset`` refuses a reader that makes the other kind (a bug, not bad input)."""
    from dataclasses import replace

    from data.core import DataOptions
    from data.registry import DATASETS, MULTI_LABEL, load_dataset

    options = DataOptions(shapes_train=20, shapes_test=10)
    assert task_for(load_dataset("Shapes", options)) is SINGLE
    monkeypatch.setitem(DATASETS, "Shapes", replace(DATASETS["Shapes"], task=MULTI_LABEL))
    with pytest.raises(
        RuntimeError, match="^the Shapes reader made single-label labels, but its registry entry says multi-label$"
    ):
        load_dataset("Shapes", options)


def test_a_metrics_row_that_cannot_be_written_is_one_sentence(tmp_path):
    """A full disk or a folder in the way while appending to ``metrics.jsonl`` is the same
    ``cannot write to ...`` sentence as every other write of a run, not a traceback."""
    from types import SimpleNamespace

    from training.config import TrainConfig
    from training.outputs import METRICS_FILE, RunFolders, RunOutputs
    from training.tasks import EvalResult
    from utils import UserError

    run_dir = tmp_path / "run"
    (run_dir / METRICS_FILE).mkdir(parents=True)  # opening it to append fails: IsADirectoryError
    folders = RunFolders("run", run_dir, tmp_path / "ckpt", tmp_path / "run.log")
    outputs = RunOutputs(TrainConfig(), folders, "Shapes", ["a", "b"], SINGLE)
    outputs.writer = SimpleNamespace(add_scalar=lambda *a: None, flush=lambda: None)
    progress = SimpleNamespace(epoch=1, global_step=3, top1_max=50.0)
    with pytest.raises(UserError, match=r"^cannot write to .*metrics\.jsonl .*; pass a writable --output-dir\.$"):
        outputs.epoch(progress, EvalResult(0.5, 50.0, 100.0, 2), 0.7, 0.01, 100.0, 1.0)


def test_a_tensorboard_write_that_fails_in_its_thread_is_one_sentence_and_no_thread_traceback(tmp_path, monkeypatch):
    """TensorBoard writes its events in a thread of its own, which prints its exception itself
    (``threading.excepthook``). With the run folder gone under it, the next epoch's writes are the
    ``cannot write to ...`` sentence in the training process, and the thread's exception never
    reaches the hook: nothing is printed beside the sentence; closing warns, and gives the hook back."""
    import threading
    from types import SimpleNamespace

    from training.config import TrainConfig
    from training.outputs import RunFolders, RunOutputs
    from training.tasks import EvalResult
    from utils import UserError

    printed = []
    hook = printed.append
    monkeypatch.setattr(threading, "excepthook", hook)
    run_dir = tmp_path / "run"
    folders = RunFolders("run", run_dir, tmp_path / "ckpt", tmp_path / "run.log")
    outputs = RunOutputs(TrainConfig(), folders, "Shapes", ["a", "b"], SINGLE)
    outputs.open(lambda: torch.zeros(4, 3, 8, 8))
    outputs.writer.flush()
    shutil.rmtree(run_dir)
    progress = SimpleNamespace(epoch=1, global_step=3, top1_max=50.0)
    with pytest.raises(UserError, match=r"^cannot write to \S+run\S* \(.+\); pass a writable --output-dir\.$"):
        outputs.epoch(progress, EvalResult(0.5, 50.0, 100.0, 2), 0.7, 0.01, 100.0, 1.0)
    outputs.close()  # joins the writer's thread
    assert printed == [] and threading.excepthook is hook
