"""Bad checkpoints, one sentence each: the rows of the bad-input table (docs/troubleshooting.md)
about the checkpoints a command reads (``--resume``, ``--evaluate``, ``--weights``, ``export``,
``figures``: missing, damaged, crafted, of another model or data set) and the run folders it
writes them to (read-only, full).

Each row is a ``main_cli.Case``, run by test_bad_checkpoints.py in a folder holding an earlier
run (``main_cli.run_case``); the crafted ones are the earlier run's last.pt with one field
changed. Every checkpoint field against wrong types and values is in test_checkpoints.py, and
``--weights`` files of the wrong kind in test_weights.py.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

import torch
from fakedata import write_cifar100
from main_cli import TINY, Case, earlier_checkpoint, without_file_permission_override

from network import CifarAlexNet


def file_size_limit(limit: int) -> Callable[[], None]:
    """A child process whose writes fail beyond ``limit`` bytes per file (Python ignores
    SIGXFSZ, so the write raises EFBIG): a disk that fills up while a checkpoint is saved."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def truncated_copy(work: Path, earlier: Path) -> None:
    (work / "cut.pt").write_bytes(earlier_checkpoint(earlier).read_bytes()[:4096])


def locked_run_folder(top: str) -> Callable[[Path, Path], None]:
    """The earlier run's folder under ``top`` (checkpoints or runs) made read-only."""
    return lambda work, earlier: os.chmod(work / top / "Shapes" / earlier_checkpoint(work).parent.name, 0o555)


def crafted(work: Path, name: str, change, inside_run: bool = False, light: bool = True) -> Path:
    """A copy of the earlier run's last.pt with ``change(checkpoint)`` applied, written to
    ``work/<name>`` (or beside last.pt in the run folder with ``inside_run``). ``light``: with a
    one-tensor model and no optimizer state instead of 700 MB of TorchAlexNet weights, for rows
    refused before the model is built (every field is checked before the weights are used)."""
    last = earlier_checkpoint(work)
    checkpoint = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    if light:
        checkpoint["model"] = {"features.0.weight": torch.zeros(1)}
        checkpoint["optimizer"] = {"state": {}, "param_groups": checkpoint["optimizer"]["param_groups"]}
    change(checkpoint)
    path = (last.parent if inside_run else work) / name
    torch.save(checkpoint, path)
    return path


def set_config(**values):
    def change(checkpoint):
        checkpoint["config"] = {**checkpoint["config"], **values}

    return change


def swapped_classes(checkpoint):
    classes = checkpoint["classes"]
    checkpoint["classes"] = [classes[1], classes[0], *classes[2:]]


def older_step(checkpoint):
    checkpoint["global_step"] -= 1
    checkpoint["partial"] = None


def foreign_run(work: Path, earlier: Path) -> None:
    """Another output folder that holds a different run under the earlier run's name."""
    name = earlier_checkpoint(work).parent.name
    (work / "other" / "checkpoints" / "Shapes" / name).mkdir(parents=True)
    (work / "other" / "checkpoints" / "Shapes" / name / "notes.txt").write_text("another run's files\n")


def nothing_at(name: str) -> Callable:
    def check(work: Path, result) -> None:
        assert not (work / name).exists(), f"{name} was written"

    return check


def fc8_bias_of_7(work: Path, earlier: Path) -> None:
    """A CifarAlexNet state dict whose fc8 weight has 10 rows and its bias 7 entries."""
    state = CifarAlexNet(10).state_dict()
    state["classifier.6.bias"] = state["classifier.6.bias"][:7].clone()
    torch.save(state, work / "w.pt")


CASES = [
    Case(
        "checkpoint missing",
        ["--resume", "gone/last.pt"],
        1,
        r"checkpoint gone/last.pt does not exist; pass the path of a last.pt or best.pt\.",
    ),
    Case(
        "checkpoint truncated",
        ["--resume", "cut.pt"],
        1,
        r"checkpoint cut.pt cannot be loaded \(.*\); it is damaged or was not written by this tool, so use another "
        r"one \(best.pt or last.pt of the run\)\.",
        prepare=truncated_copy,
    ),
    Case(
        "checkpoint of another model",
        ["--evaluate", "EARLIER", "-pm"],
        1,
        r"checkpoint .*last.pt holds a TorchAlexNet, but this command builds a PaperAlexNet; drop the model flags "
        r"\(-c, -pm\) or pass a checkpoint of this model\.",
    ),
    Case(
        "checkpoint of another class count",
        ["--evaluate", "EARLIER", "-ds", "Cifar100", "--data-dir", "data", "--coarse-labels"],
        1,
        r"checkpoint .*last.pt was trained on 10 classes \(Shapes\), but Cifar100 has 20; pass a checkpoint trained "
        r"on Cifar100\.",
        prepare=lambda w, e: write_cifar100(w / "data" / "cifar-100"),
    ),
    Case(
        "ensemble of checkpoints with other classes",
        ["--evaluate", "EARLIER", "swapped.pt"],
        1,
        r"checkpoint swapped.pt has class 'square' at index 0, where \S+/last.pt has 'disc'; an ensemble needs the "
        r"same classes in the same order, so pass checkpoints of runs on one data set\.",
        prepare=lambda w, e: crafted(w, "swapped.pt", swapped_classes),
    ),
    Case(
        "ensemble of checkpoints of two data sets",
        ["--evaluate", "EARLIER", "cifar.pt"],
        1,
        r"checkpoint cifar.pt was trained on Cifar10 and \S+/last.pt on Shapes; the networks of an ensemble must "
        r"share the data set, so evaluate them apart \(or all on one, with -ds\)\.",
        prepare=lambda w, e: crafted(w, "cifar.pt", set_config(dataset="Cifar10")),
    ),
    Case(
        "checkpoint folder not writable",
        ["--resume", "EARLIER", "-ne", "2"],
        1,
        r"cannot write to \S+/checkpoints/Shapes/[^/ ]+/\.lock \(Permission denied\); pass a writable --output-dir\.$",
        prepare=locked_run_folder("checkpoints"),
        prefix=without_file_permission_override,
    ),
    Case(
        "run folder not writable",
        ["--resume", "EARLIER", "-ne", "2"],
        1,
        r"cannot write to \S+/runs/Shapes/[^/ ]+ \(Permission denied\); pass a writable --output-dir\.$",
        prepare=locked_run_folder("runs"),
        prefix=without_file_permission_override,
    ),
    Case(
        "disk full while saving",
        ["-c", "-ne", "1", *TINY],
        1,
        r"could not save the checkpoint of epoch 1 in checkpoints/Shapes/.* \(File too large\); free some disk space "
        r"or pass another --output-dir \(the previous last.pt and best.pt are unchanged\)\.",
        preexec=file_size_limit(20_000_000),
    ),
    Case(
        "checkpoint naming a run outside its folder",
        ["--resume", "evil.pt"],
        1,
        r"checkpoint evil.pt cannot be used: its config's run_name '\.\./\.\./\.\./escaped' cannot be a folder name: "
        r"it holds a path separator; it is damaged or was not written by this tool, so use another one \(best.pt or "
        r"last.pt of the run\)\.",
        prepare=lambda w, e: crafted(w, "evil.pt", set_config(run_name="../../../escaped")),
    ),
    Case(
        "checkpoint with an unknown optimizer",
        ["--resume", "evil.pt"],
        1,
        r"checkpoint evil.pt cannot be used: its config's optimizer must be one of sgd, adam, got 'rmsprop'; it is "
        r"damaged or was not written by this tool",
        prepare=lambda w, e: crafted(w, "evil.pt", set_config(optimizer="rmsprop")),
    ),
    Case(
        "checkpoint with a field out of range",
        ["--resume", "evil.pt"],
        1,
        r"checkpoint evil.pt cannot be used: its scheduler's patience must be at least 1, got 0; it is damaged",
        prepare=lambda w, e: crafted(w, "evil.pt", lambda c: c["scheduler"].update(patience=0)),
    ),
    Case(
        "checkpoint whose optimizer state does not fit the model",
        ["--resume", "evil.pt", "--output-dir", "new"],
        1,
        r"the checkpoint of run .* cannot be resumed: its optimizer's exp_avg of parameter 0 does not have that "
        r"parameter's shape; it is damaged or was not written for this model and data",
        prepare=lambda w, e: crafted(
            w, "evil.pt", lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)), light=False
        ),
    ),
    Case(
        "resume into another run of the same name",
        ["--resume", "EARLIER", "--output-dir", "other"],
        1,
        r"--resume .*last.pt: other/checkpoints/Shapes/.* already holds a run of that name, not the one this "
        r"checkpoint comes from; pass another --output-dir, or resume that run from its own last.pt\.",
        prepare=foreign_run,
    ),
    Case(
        "resume from a checkpoint older than last.pt",
        ["--resume", "checkpoints/Shapes/EARLIER_RUN/older.pt"],
        1,
        r"--resume .*older.pt: the run's .*last.pt is at epoch 1 \(step 1\), past this checkpoint \(step 0\); resume "
        r"from .*last.pt, or pass --rewind to go back \(that last.pt is then kept under another name\)\.",
        prepare=lambda w, e: crafted(w, "older.pt", older_step, inside_run=True),
    ),
    Case(
        "checkpoint whose preprocessing does not fit its network",
        ["export", "--checkpoint", "evil.pt", "--format", "torchscript", "model.pt"],
        1,
        r"checkpoint evil.pt cannot be used: its preprocess has a pipeline that makes 1-pixel inputs, but the network "
        r"takes 224; it is damaged or was not written by this tool",
        prepare=lambda w, e: crafted(w, "evil.pt", lambda c: c["preprocess"]["pipeline"].update(input_size=1)),
        check=nothing_at("model.pt"),
    ),
    Case(
        "checkpoint that is a folder",
        ["--evaluate", "checkpoints"],
        1,
        r"checkpoint checkpoints is a folder; pass the path of a last.pt or best.pt in it\.",
    ),
    Case(
        "--weights whose fc8 bias does not fit its weight",
        ["-c", "--weights", "w.pt", *TINY],
        1,
        r"weights file w.pt does not fit CifarAlexNet: its 'classifier\.6\.bias' is \(7,\), where its "
        r"'classifier\.6\.weight' has 10 rows; pass weights of this network\.",
        prepare=fc8_bias_of_7,
    ),
    Case(
        "figures: data set folder gone",
        ["figures", "--checkpoint", "evil.pt", "--out", "figs"],
        1,
        r"checkpoint evil.pt was trained on Cifar10 in .*moved/data, which does not exist here \(nor is it in "
        r"dataset\); pass --data-dir DIR, the folder that holds Cifar10 now\.",
        prepare=lambda w, e: crafted(w, "evil.pt", set_config(dataset="Cifar10", data_dir=str(w / "moved" / "data"))),
        check=nothing_at("figs"),
    ),
]
