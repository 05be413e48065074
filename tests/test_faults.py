"""Nothing lost, nothing crashes: the bad-input table of docs/troubleshooting.md as a catalogue of bad
inputs (flags, data, checkpoints, output folders, run names), and a run that diverges.

Every row of the catalogue goes through the real command line in a folder that already holds an
earlier run, and checks the exit code, the one sentence, the absence of a traceback, and that
the earlier run's files were not touched. The rows about crafted data files are in
test_untrusted_data.py (they share its file builders); the table's rows that need more than one
command are tested in test_signals.py (Ctrl-C / SIGTERM, stops while reading data or
evaluating), test_checkpoints.py (a run in use by another process) and test_cli.py (CUDA).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fakedata import python2_pickle, small_voc, voc_xml, write_cifar10
from main_cli import TINY, Case, earlier_checkpoint, only, run_case, snapshot

from network import CifarAlexNet


def without_file_permission_override() -> list[str]:
    """A command prefix under which file permissions apply: root normally ignores them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder unreadable")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def file_size_limit(limit: int) -> Callable[[], None]:
    """A child process whose writes fail beyond ``limit`` bytes per file (Python ignores
    SIGXFSZ, so the write raises EFBIG): a disk that fills up while a checkpoint is saved."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


# ---------------------------------------------------------------------------------------------
# The catalogue


def cifar(work: Path) -> Path:
    folder = work / "data" / "cifar-10"
    write_cifar10(folder)
    return folder


def voc(work: Path) -> Path:
    return small_voc(work / "data", ["dog", "cat", "person", "bus"])


def damage_batch(work: Path, payload: Callable[[bytes], bytes]) -> None:
    path = cifar(work) / "data_batch_2"
    path.write_bytes(payload(path.read_bytes()))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


BOMB = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]><annotation><object><name>&lol3;</name>'
    "</object></annotation>"
)


def truncated_copy(work: Path, earlier: Path) -> None:
    (work / "cut.pt").write_bytes(earlier_checkpoint(earlier).read_bytes()[:4096])


def locked_data(work: Path, earlier: Path) -> None:
    cifar(work)
    os.chmod(work / "data", 0)


def locked_output(work: Path, earlier: Path) -> None:
    (work / "readonly").mkdir()
    os.chmod(work / "readonly", 0o555)


def locked_run_folder(top: str) -> Callable[[Path, Path], None]:
    """The earlier run's folder under ``top`` (checkpoints or runs) made read-only."""
    return lambda work, earlier: os.chmod(work / top / "Shapes" / earlier_checkpoint(work).parent.name, 0o555)


def rotten_cache(work: Path, earlier: Path) -> None:
    """An ImageFolder and its 32x32 cache, recorded as verified (``verified.json``), whose first
    JPEG then lost its first byte with the shard's size and time kept: bit rot that a start does
    not see, as the shard is not hashed again."""
    from fakedata import write_class_folders

    from data import prepare
    from data.shards import HEAD_BYTES, save_verified

    write_class_folders(work / "data", {"a": 6, "b": 6}, size=40)
    assert (
        prepare.main(
            [
                "-ds",
                "ImageFolder",
                "--data-dir",
                str(work / "data"),
                "--cache-dir",
                str(work / "cache"),
                "-c",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    past = (time.time_ns() - 3600 * 10**9) // 10**9 * 10**9
    for folder in (work / "cache").iterdir():
        shards = sorted(folder.glob("*.shard"))
        for path in shards:
            os.utime(path, ns=(past, past))
        save_verified(folder, {path.name: (path.stat().st_size, past) for path in shards}, len(shards))
    shard = work / "cache" / "train_32" / "00000.shard"
    blob = bytearray(shard.read_bytes())
    blob[HEAD_BYTES] ^= 0xFF  # the first JPEG's first byte
    shard.write_bytes(bytes(blob))
    os.utime(shard, ns=(past, past))


CIFAR = ["-c", "-ds", "Cifar10", "--data-dir", "data", "-ne", "1"]
ROTTEN = [
    "-c",
    "-ds",
    "ImageFolder",
    "--data-dir",
    "data",
    "--cache-dir",
    "cache",
    "-ne",
    "1",
    "-d",
    "--loader",
    "stream",
    "--workers",
    "2",
]
#: Decoded by the DataLoader workers (a CPU); on CUDA by the training process (test_streaming.py).
ROTTEN_SENTENCE = (
    r"cache shard cache/train_32/00000\.shard is damaged: its image 1 of 10 cannot be decoded \(Not a JPEG file: "
    r"starts with 0x00 0xd8\), though its size and time are those recorded when its digest last matched; delete it and "
    r"run again \(or run prepare\), which rebuilds it from the images\.$"
)
VOC = ["-ds", "PascalVOC2012", "--data-dir", "data", "-ne", "1", "--cache-dir", "cache"]

CATALOGUE = [
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
    Case("negative value", ["-lls", "-5"], 2, r"argument -lls/--log_loss_step: must be at least 1, got -5"),
    Case(
        "missing data folder",
        CIFAR,
        1,
        r"data folder data does not exist; create it and put CIFAR-10 \(cifar-10/ or cifar-10-batches-py/ or "
        r"cifar-10-python.tar.gz\) in it, or pass --data-dir\.",
    ),
    Case(
        "empty data folder",
        CIFAR,
        1,
        r"found no CIFAR-10 in data: put the official python version there as cifar-10/, cifar-10-batches-py/ or "
        r"cifar-10-python.tar.gz, or pass --download\.",
        prepare=lambda w, e: (w / "data").mkdir(),
    ),
    Case(
        "unreadable data folder",
        CIFAR,
        1,
        r"cannot read data folder data \(Permission denied\); give this user read access to it, or pass another "
        r"--data-dir\.",
        prepare=locked_data,
        prefix=without_file_permission_override,
    ),
    Case(
        "truncated CIFAR pickle",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2 is truncated or not a CIFAR pickle \(.*\); replace it with the file from the "
        r"official archive\.",
        prepare=lambda w, e: damage_batch(w, lambda b: b[: len(b) // 3]),
    ),
    Case(
        "pickle with the wrong keys",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2 is not a CIFAR batch file \(it lacks b'data' or b'labels'\); replace it\.",
        prepare=lambda w, e: damage_batch(w, lambda b: python2_pickle({b"images": b"", b"labels": []})),
    ),
    Case(
        "pickle with the wrong shapes",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2: b'data' must be a uint8 N x 3072 array, found \(3, 1024\); replace the file\.",
        prepare=lambda w, e: damage_batch(
            w,
            lambda b: python2_pickle({b"data": torch.zeros(3, 1024, dtype=torch.uint8).numpy(), b"labels": [0, 1, 2]}),
        ),
    ),
    Case(
        "labels out of range",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2: labels must be 0..9, found 0..10; replace the file\.",
        prepare=lambda w, e: damage_batch(
            w, lambda b: python2_pickle({b"data": torch.zeros(2, 3072, dtype=torch.uint8).numpy(), b"labels": [0, 10]})
        ),
    ),
    Case(
        "pickle that runs code",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2 asks to call posix.system, which no CIFAR file does, so it was not loaded \(it "
        r"may be crafted to run code\); replace it with the file from the official archive\.",
        prepare=lambda w, e: damage_batch(w, lambda b: pickle.dumps(Exploit(), protocol=2)),
    ),
    Case(
        "corrupt JPEG",
        VOC,
        1,
        r"data/PascalVOC2012/JPEGImages/2010_000001.jpg cannot be decoded as an image \(.*\); replace it with a "
        r"good copy",
        prepare=lambda w, e: (voc(w) / "JPEGImages/2010_000001.jpg").write_bytes(b"\xff\xd8\xff\x00"),
    ),
    Case(
        "missing JPEG",
        VOC,
        1,
        r"data/PascalVOC2012/ImageSets/Main/val.txt names 2010_000003, but "
        r"data/PascalVOC2012/JPEGImages/2010_000003.jpg does not exist; restore it or remove the line\.",
        prepare=lambda w, e: (voc(w) / "JPEGImages/2010_000003.jpg").unlink(),
    ),
    Case(
        "malformed XML",
        VOC,
        1,
        r"data/PascalVOC2012/Annotations/2010_000000.xml is not well-formed XML \(no element found: line 1, "
        r"column 12\); restore it from the VOC release\.",
        prepare=lambda w, e: (voc(w) / "Annotations/2010_000000.xml").write_text("<annotation>"),
    ),
    Case(
        "unknown class in XML",
        VOC,
        1,
        r"data/PascalVOC2012/Annotations/2010_000002.xml names an unknown class 'persons' \(VOC has aeroplane, .*, "
        r"tvmonitor\); fix the file\.",
        prepare=lambda w, e: (voc(w) / "Annotations/2010_000002.xml").write_text(voc_xml("a", 9, 9, [("persons", 0)])),
    ),
    Case(
        "XML bomb",
        VOC,
        1,
        r"data/PascalVOC2012/Annotations/2010_000001.xml declares a DOCTYPE or entities, which VOC annotations never "
        r"do; it was not parsed\.",
        prepare=lambda w, e: (voc(w) / "Annotations/2010_000001.xml").write_text(BOMB),
    ),
    Case(
        "image list naming a missing image",
        VOC,
        1,
        r"data/PascalVOC2012/ImageSets/Main/train.txt names 2010_000077, but "
        r"data/PascalVOC2012/JPEGImages/2010_000077.jpg does not exist; restore it or remove the line\.",
        prepare=lambda w, e: (voc(w) / "ImageSets/Main/train.txt").write_text("2010_000000\n2010_000077\n"),
    ),
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
        prepare=lambda w, e: __import__("fakedata").write_cifar100(w / "data" / "cifar-100"),
    ),
    Case(
        "output folder not writable",
        ["-ne", "1", *TINY, "--output-dir", "readonly"],
        1,
        r"cannot write to readonly/checkpoints \(Permission denied\); pass a writable --output-dir\.",
        prepare=locked_output,
        prefix=without_file_permission_override,
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
        "run name already used",
        ["--run-name", "taken", "-ne", "1", *TINY],
        1,
        r"--run-name taken: runs/Shapes/taken already exists; pick another name, or --resume the run from its "
        r"last.pt\.",
        prepare=lambda w, e: (w / "runs" / "Shapes" / "taken").mkdir(),
    ),
    Case("cache shard damaged under its recorded time", ROTTEN, 1, ROTTEN_SENTENCE, prepare=rotten_cache),
    Case(
        "disk full while saving",
        ["-c", "-ne", "1", *TINY],
        1,
        r"could not save the checkpoint of epoch 1 in checkpoints/Shapes/.* \(File too large\); free some disk space "
        r"or pass another --output-dir \(the previous last.pt and best.pt are unchanged\)\.",
        preexec=file_size_limit(20_000_000),
    ),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_bad_input_catalogue(tmp_path, earlier, case):
    run_case(case, tmp_path, earlier)


# ---------------------------------------------------------------------------------------------
# The rows about runs and checkpoints: crafted checkpoints, run names, flag values


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


def older_step(checkpoint):
    checkpoint["global_step"] -= 1
    checkpoint["partial"] = None


def foreign_run(work: Path, earlier: Path) -> None:
    """Another output folder that holds a different run under the earlier run's name."""
    name = earlier_checkpoint(work).parent.name
    (work / "other" / "checkpoints" / "Shapes" / name).mkdir(parents=True)
    (work / "other" / "checkpoints" / "Shapes" / name / "notes.txt").write_text("another run's files\n")


def report_below_a_file(work: Path, earlier: Path) -> None:
    (work / "afile").write_text("a regular file\n")


def nothing_at(name: str) -> Callable:
    def check(work: Path, result) -> None:
        assert not (work / name).exists(), f"{name} was written"

    return check


def fc8_bias_of_7(work: Path, earlier: Path) -> None:
    """A CifarAlexNet state dict whose fc8 weight has 10 rows and its bias 7 entries."""
    state = CifarAlexNet(10).state_dict()
    state["classifier.6.bias"] = state["classifier.6.bias"][:7].clone()
    torch.save(state, work / "w.pt")


RUN_CASES = [
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
        "dry run logging under an earlier run's name",
        ["-d", "-l", "--run-name", "EARLIER_RUN", *TINY],
        1,
        r"--run-name .*: runs/Shapes/.* already exists; pick another name, or --resume the run from its last.pt\.",
    ),
    Case(
        "run name too long",
        ["--run-name", "x" * 300],
        2,
        r"argument --run-name: 'x{57}\.\.\.' cannot be a folder name: it is 300 bytes long, more than the 200 a name "
        r"may have; use letters, digits, - _ \.",
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


@pytest.mark.parametrize("case", RUN_CASES, ids=[c.name for c in RUN_CASES])
def test_untrusted_run_catalogue(tmp_path, earlier, case):
    run_case(case, tmp_path, earlier)
    if case.name == "checkpoint naming a run outside its folder":
        assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_catalogue_is_the_troubleshooting_table(repo_root):
    """Every row of the bad-input table (docs/troubleshooting.md) is a case above, and every case a row."""
    readme = (repo_root / "docs" / "troubleshooting.md").read_text()
    table = readme[readme.index("| bad input |") :].split("\n\n")[0].splitlines()[2:]
    rows = {line.split("|")[1].strip().strip("`") for line in table}
    from test_image_folder import ERRORS as FOLDER_CASES
    from test_imagenet import ERRORS as IMAGENET_CASES
    from test_untrusted_data import CASES as DATA_CASES

    names = [c.name for c in (*CATALOGUE, *DATA_CASES, *RUN_CASES, *IMAGENET_CASES, *FOLDER_CASES)]
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
