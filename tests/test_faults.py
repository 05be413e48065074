"""Nothing lost, nothing crashes: the bad-input catalogue, interruption, kill -9, divergence.

Every row of the catalogue goes through the real command line in a folder that already holds an
earlier run, and checks the exit code, the one sentence, the absence of a traceback, and that
the earlier run's files were not touched.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fakedata import python2_pickle, voc_xml, write_cifar10, write_voc
from main_cli import ROOT, TINY, Case, command, earlier_checkpoint, only, run, run_case, snapshot


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
    annotations = {f"2010_{i:06d}": [(c, False)] for i, c in enumerate(["dog", "cat", "person", "bus"])}
    ids = list(annotations)
    return write_voc(work / "data" / "PascalVOC2012", annotations, {"train": ids[:2], "val": ids[2:]})


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


CIFAR = ["-c", "-ds", "Cifar10", "--data-dir", "data", "-ne", "1"]
VOC = ["-ds", "PascalVOC2012", "--data-dir", "data", "-ne", "1", "--cache-dir", "cache"]

CATALOGUE = [
    Case("unknown -ds", ["-ds", "ImageNet"], 2,
         r"argument -ds/--dataset: invalid choice: 'ImageNet' \(choose from '?Shapes'?, '?Cifar10'?, '?Cifar100'?, "
         r"'?PascalVOC2012'?\)"),
    Case("-c with PascalVOC2012", ["-c", "-ds", "PascalVOC2012"], 2,
         r"-c \(CifarAlexNet, 32x32 inputs\) cannot train on PascalVOC2012's 256x256 images; drop -c"),
    Case("-ne 0", ["-ne", "0"], 2, r"argument -ne/--n_epoch: must be at least 1, got 0"),
    Case("negative value", ["-lls", "-5"], 2, r"argument -lls/--log_loss_step: must be at least 1, got -5"),
    Case("missing data folder", CIFAR, 1,
         r"data folder data does not exist; create it and put CIFAR-10 \(cifar-10/ or cifar-10-batches-py/ or "
         r"cifar-10-python.tar.gz\) in it, or pass --data-dir\."),
    Case("empty data folder", CIFAR, 1,
         r"found no CIFAR-10 in data: put the official python version there as cifar-10/, cifar-10-batches-py/ or "
         r"cifar-10-python.tar.gz, or pass --download\.", prepare=lambda w, e: (w / "data").mkdir()),
    Case("unreadable data folder", CIFAR, 1,
         r"cannot read data folder data \(Permission denied\); give this user read access to it, or pass another "
         r"--data-dir\.", prepare=locked_data, prefix=without_file_permission_override),
    Case("truncated CIFAR pickle", CIFAR, 1,
         r"data/cifar-10/data_batch_2 is truncated or not a CIFAR pickle \(.*\); replace it with the file from the "
         r"official archive\.", prepare=lambda w, e: damage_batch(w, lambda b: b[: len(b) // 3])),
    Case("pickle with the wrong keys", CIFAR, 1,
         r"data/cifar-10/data_batch_2 is not a CIFAR batch file \(it lacks b'data' or b'labels'\); replace it\.",
         prepare=lambda w, e: damage_batch(w, lambda b: python2_pickle({b"images": b"", b"labels": []}))),
    Case("pickle with the wrong shapes", CIFAR, 1,
         r"data/cifar-10/data_batch_2: b'data' must be a uint8 N x 3072 array, found \(3, 1024\); replace the file\.",
         prepare=lambda w, e: damage_batch(w, lambda b: python2_pickle(
             {b"data": torch.zeros(3, 1024, dtype=torch.uint8).numpy(), b"labels": [0, 1, 2]}))),
    Case("labels out of range", CIFAR, 1,
         r"data/cifar-10/data_batch_2: labels must be 0..9, found 0..10; replace the file\.",
         prepare=lambda w, e: damage_batch(w, lambda b: python2_pickle(
             {b"data": torch.zeros(2, 3072, dtype=torch.uint8).numpy(), b"labels": [0, 10]}))),
    Case("pickle that runs code", CIFAR, 1,
         r"data/cifar-10/data_batch_2 asks to call posix.system, which no CIFAR file does, so it was not loaded \(it "
         r"may be crafted to run code\); replace it with the file from the official archive\.",
         prepare=lambda w, e: damage_batch(w, lambda b: pickle.dumps(Exploit(), protocol=2))),
    Case("corrupt JPEG", VOC, 1,
         r"data/PascalVOC2012/JPEGImages/2010_000001.jpg cannot be decoded as a JPEG \(.*\); restore it from the VOC "
         r"release\.", prepare=lambda w, e: (voc(w) / "JPEGImages/2010_000001.jpg").write_bytes(b"\xff\xd8\xff\x00")),
    Case("missing JPEG", VOC, 1,
         r"data/PascalVOC2012/ImageSets/Main/val.txt names 2010_000003, but "
         r"data/PascalVOC2012/JPEGImages/2010_000003.jpg does not exist; restore it or remove the line\.",
         prepare=lambda w, e: (voc(w) / "JPEGImages/2010_000003.jpg").unlink()),
    Case("malformed XML", VOC, 1,
         r"data/PascalVOC2012/Annotations/2010_000000.xml is not well-formed XML \(no element found: line 1, "
         r"column 12\); restore it from the VOC release\.",
         prepare=lambda w, e: (voc(w) / "Annotations/2010_000000.xml").write_text("<annotation>")),
    Case("unknown class in XML", VOC, 1,
         r"data/PascalVOC2012/Annotations/2010_000002.xml names an unknown class 'persons' \(VOC has aeroplane, .*, "
         r"tvmonitor\); fix the file\.",
         prepare=lambda w, e: (voc(w) / "Annotations/2010_000002.xml").write_text(voc_xml("a", 9, 9, [("persons", 0)]))),
    Case("XML bomb", VOC, 1,
         r"data/PascalVOC2012/Annotations/2010_000001.xml declares a DOCTYPE or entities, which VOC annotations never "
         r"do; it was not parsed\.", prepare=lambda w, e: (voc(w) / "Annotations/2010_000001.xml").write_text(BOMB)),
    Case("image list naming a missing image", VOC, 1,
         r"data/PascalVOC2012/ImageSets/Main/train.txt names 2010_000077, but "
         r"data/PascalVOC2012/JPEGImages/2010_000077.jpg does not exist; restore it or remove the line\.",
         prepare=lambda w, e: (voc(w) / "ImageSets/Main/train.txt").write_text("2010_000000\n2010_000077\n")),
    Case("checkpoint missing", ["--resume", "gone/last.pt"], 1,
         r"checkpoint gone/last.pt does not exist; pass the path of a last.pt or best.pt\."),
    Case("checkpoint truncated", ["--resume", "cut.pt"], 1,
         r"checkpoint cut.pt cannot be loaded \(.*\); it is damaged or was not written by this tool, so use another "
         r"one \(best.pt or last.pt of the run\)\.", prepare=truncated_copy),
    Case("checkpoint of another model", ["--evaluate", "EARLIER", "-pm"], 1,
         r"checkpoint .*last.pt holds a TorchAlexNet, but this command builds a PaperAlexNet; drop the model flags "
         r"\(-c, -pm\) or pass a checkpoint of this model\."),
    Case("checkpoint of another class count", ["--evaluate", "EARLIER", "-ds", "Cifar100", "--data-dir", "data",
                                               "--coarse-labels"], 1,
         r"checkpoint .*last.pt was trained on 10 classes \(Shapes\), but Cifar100 has 20; pass a checkpoint trained "
         r"on Cifar100\.", prepare=lambda w, e: __import__("fakedata").write_cifar100(w / "data" / "cifar-100")),
    Case("output folder not writable", ["-ne", "1", *TINY, "--output-dir", "readonly"], 1,
         r"cannot write to readonly/checkpoints \(Permission denied\); pass a writable --output-dir\.",
         prepare=locked_output, prefix=without_file_permission_override),
    Case("run name already used", ["--run-name", "taken", "-ne", "1", *TINY], 1,
         r"--run-name taken: runs/Shapes/taken already exists; pick another name, or --resume the run from its "
         r"last.pt\.", prepare=lambda w, e: (w / "runs" / "Shapes" / "taken").mkdir()),
    Case("disk full while saving", ["-c", "-ne", "1", *TINY], 1,
         r"could not save the checkpoint of epoch 1 in checkpoints/Shapes/.* \(File too large\); free some disk space "
         r"or pass another --output-dir \(the previous last.pt and best.pt are unchanged\)\.",
         preexec=file_size_limit(20_000_000)),
]  # fmt: skip


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_bad_input_catalogue(tmp_path, earlier, case):
    run_case(case, tmp_path, earlier)


def test_catalogue_is_the_readme_table():
    """Every row of the README's table is a case above, and every case a row."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| bad input |") :].split("\n\n")[0].splitlines()[2:]
    rows = {line.split("|")[1].strip().strip("`") for line in table}
    from test_untrusted_data import CASES as DATA_CASES
    from test_untrusted_runs import CASES as RUN_CASES

    names = [c.name for c in (*CATALOGUE, *DATA_CASES, *RUN_CASES)]
    assert len(names) == len(set(names))
    # Rows tested by their own tests: test_faults (divergence, signals in training), test_cli (CUDA),
    # test_untrusted_runs (two processes on one run, a stop while reading data or evaluating).
    assert rows == set(names) | {"training diverges (NaN or infinite loss)", "Ctrl-C / SIGTERM",
                                 "CUDA asked for, none present", "run in use by another process",
                                 "stop while reading data or evaluating"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Interruption, kill -9, exact resume, divergence


def reference(tmp_path_factory, flags: list[str]) -> dict:
    root = tmp_path_factory.mktemp("reference")
    result = run(*flags, cwd=root)
    assert result.returncode == 0, result.stderr
    return torch.load(only(root / "checkpoints" / "Shapes", "*/last.pt"), weights_only=True)


FLAGS = ["-c", "--seed", "5", "--deterministic", "-ne", "3", "--shapes-train", "200", "--shapes-test", "40",
         "--batch-size", "20", "-lls", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return reference(tmp_path_factory, FLAGS)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start(flags: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command(*flags), cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def wait_for(process: subprocess.Popen, text: str) -> str:
    seen = []
    for line in process.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never appeared:\n{''.join(seen)}")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_where_it_stopped_and_resume_finishes_identically(tmp_path, uninterrupted, signum, code):
    process = start(FLAGS, tmp_path)
    wait_for(process, "epoch 1/3")
    time.sleep(0.3)  # into epoch 2
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == code, rest
    assert "Traceback" not in rest
    assert f"stopped by {signal.Signals(signum).name}" in rest and "resume with: python main.py --resume" in rest
    last = only(tmp_path / "checkpoints" / "Shapes", "*/last.pt")
    state = torch.load(last, weights_only=True)
    summary = json.loads(only(tmp_path / "runs" / "Shapes", "*/summary.json").read_text())
    assert summary["status"] == "interrupted"
    resumed = run("--resume", str(last), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    if state["partial"] is not None:  # stopped inside an epoch: it continues from that batch
        assert f"resumed after batch {state['partial']['batches_done']} of epoch" in resumed.stderr
    assert same_weights(torch.load(last, weights_only=True)["model"], uninterrupted["model"])


def test_a_second_ctrl_c_while_saving_does_not_corrupt_anything(tmp_path):
    process = start(FLAGS, tmp_path)
    wait_for(process, "epoch 1/3")
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130, rest
    assert "already stopping, the checkpoint is being saved" in rest and "Traceback" not in rest
    last = only(tmp_path / "checkpoints" / "Shapes", "*/last.pt")
    assert torch.load(last, weights_only=True)["epoch"] >= 1
    assert not list(last.parent.glob("*.tmp"))


def test_kill_9_at_random_moments_never_breaks_resume(tmp_path, uninterrupted):
    """SIGKILL (no handler can run) at several random moments; each time resume from whatever
    last.pt exists (or start again when none does yet). The end result equals a run that was
    never interrupted, bit for bit."""
    rng = random.Random(2026)
    kills = 0
    deadline = time.monotonic() + 240
    while True:
        lasts = list((tmp_path / "checkpoints" / "Shapes").glob("*/last.pt"))
        if lasts:
            state = torch.load(lasts[0], weights_only=True)  # never half-written
            json.loads(only(tmp_path / "runs" / "Shapes", "*/summary.json").read_text())
            flags = ["--resume", str(lasts[0])]
        else:
            shutil.rmtree(tmp_path / "runs", ignore_errors=True)
            shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
            flags = FLAGS
        process = start(flags, tmp_path)
        if kills < 4 and time.monotonic() < deadline:
            try:
                process.wait(timeout=rng.uniform(2.0, 9.0))
            except subprocess.TimeoutExpired:
                process.kill()
                kills += 1
            process.wait()
            process.stderr.close()
            continue
        rest = process.stderr.read()
        assert process.wait(timeout=300) == 0, rest
        break
    assert kills >= 1
    state = torch.load(only(tmp_path / "checkpoints" / "Shapes", "*/last.pt"), weights_only=True)
    assert state["epoch"] == 3
    assert same_weights(state["model"], uninterrupted["model"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    assert run("-c", "-ne", "1", *TINY, cwd=tmp_path).returncode == 0
    last = only(tmp_path / "checkpoints" / "Shapes", "*/last.pt")
    before = snapshot(last.parent)
    result = run("--resume", str(last), "-ne", "3", "--lr", "1e30", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    match = re.search(r"error: training diverged: the loss became NaN or infinite at step (\d+) \(epoch 2, learning "
                      r"rate 1.00e\+30\); (.*)last.pt from epoch 1 is kept: resume from it with a smaller learning "
                      r"rate, e.g. --resume .*last.pt --lr 1.0e\+29\.", result.stderr)  # fmt: skip
    assert match, result.stderr
    assert 3 < int(match.group(1)) <= 6  # epoch 2 holds steps 4-6
    assert snapshot(last.parent) == before
    assert torch.load(last, weights_only=True)["epoch"] == 1
    summary = json.loads(only(tmp_path / "runs" / "Shapes", "*/summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs"] == 1


def test_nan_in_the_first_epoch_says_nothing_was_saved(tmp_path):
    result = run("-c", "-ne", "1", "--lr", "1e30", *TINY, cwd=tmp_path)
    assert result.returncode == 1
    assert "at step " in result.stderr and "(epoch 1, learning rate 1.00e+30); nothing was saved: start again with " \
        "a smaller learning rate, e.g. --lr 1.0e+29." in result.stderr  # fmt: skip
    assert not list((tmp_path / "checkpoints").rglob("*.pt"))
