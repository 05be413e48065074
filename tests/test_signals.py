"""Stops: Ctrl-C and SIGTERM (once, or again while stopping) and kill -9 in every phase of a
run: while generating or reading the data, building the VOC cache, streaming through DataLoader
workers, training (saved where it stopped, resumed bit-identically), saving and evaluating.

Signals under torchrun are in test_distributed.py. ``main.main`` called in-process gives the
caller its handlers back, whichever way it ends.
"""

from __future__ import annotations

import _thread
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from fakedata import small_voc, voc_xml, write_class_folders
from main_cli import VOC_DRY_RUN, copy_run, only, snapshot, start, unchanged, wait_for

import main
from data.core import DataError
from data.loaders import _ignore_stop_signals
from data.shards import shard_split
from training.run import lost_worker_sentence

# ---------------------------------------------------------------------------------------------
# Training: saved where it stopped, resumed bit-identically


def reference(tmp_path_factory, run_main, flags: list[str]) -> dict:
    root = tmp_path_factory.mktemp("reference")
    result = run_main(*flags, cwd=root)
    assert result.returncode == 0, result.stderr
    return torch.load(only(root / "checkpoints" / "Shapes", "*/last.pt"), weights_only=True)


FLAGS = [
    "-c",
    "--seed",
    "5",
    "--deterministic",
    "-ne",
    "3",
    "--shapes-train",
    "200",
    "--shapes-test",
    "40",
    "--batch-size",
    "20",
    "-lls",
    "1",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, run_main) -> dict:
    return reference(tmp_path_factory, run_main, FLAGS)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_where_it_stopped_and_resume_finishes_identically(tmp_path, uninterrupted, signum, code, run_main):
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
    resumed = run_main("--resume", str(last), cwd=tmp_path)
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


# ---------------------------------------------------------------------------------------------
# Generating the data and evaluating


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_while_generating_the_data_is_one_sentence_and_writes_nothing(tmp_path, signum, code):
    process = start(["-c", "--shapes-train", "30000", "--run-name", "big"], tmp_path, new_session=True)
    try:
        wait_for(process, "generating 30000 training")
        time.sleep(0.5)  # generating 30000 images takes seconds
        process.send_signal(signum)
        time.sleep(0.02)
        process.send_signal(signum)  # a second one while unwinding is acknowledged, not a traceback
        rest = process.stderr.read()
        assert process.wait(timeout=120) == code, rest
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stderr.close()
    assert "Traceback" not in rest
    assert f"stopped by {signal.Signals(signum).name} while reading the data; nothing of this run was saved" in rest
    assert list(tmp_path.iterdir()) == []  # the claimed run folders were empty and are gone


def test_ctrl_c_again_and_again_while_torch_loads_exits_130_with_the_sentence(tmp_path):
    """The first seconds of a command (here one that would generate a large Shapes set) are
    Python loading torch, before ``main``'s handlers: the first SIGINT there ends the process with
    one sentence. Further ones, sent from that sentence until the process is gone, find it
    unwinding or shutting down, where one used to be a traceback from threading's shutdown or,
    once the interpreter had put the default handlers back, a death by SIGINT (-2). The first is
    sent while torch's library is being loaded: a state the test can see (/proc/PID/maps), not a
    time it guesses; the others until the exit, so that every phase of it is met."""
    process = start(["-c", "--shapes-train", "100000", "-d"], tmp_path, new_session=True)
    try:
        maps = Path(f"/proc/{process.pid}/maps")
        while process.poll() is None and "libtorch" not in maps.read_text():
            time.sleep(0.002)
        process.send_signal(signal.SIGINT)
        wait_for(process, "stopped by SIGINT while")  # "starting", or a phase of main's where torch loads fast
        while process.poll() is None:
            process.send_signal(signal.SIGINT)
            time.sleep(0.001)
        rest = process.stderr.read()
        assert process.wait(timeout=60) == 130, rest
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stderr.close()
    assert "Traceback" not in rest, rest
    assert list(tmp_path.iterdir()) == []


def test_a_stop_during_evaluate_is_one_sentence(tmp_path, cifar_run):
    last = copy_run(cifar_run, tmp_path / "work")
    before = snapshot(tmp_path / "work")
    process = start(["--evaluate", str(last), "--shapes-test", "30000"], tmp_path / "work", new_session=True)
    try:
        wait_for(process, "generating")
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=120) == 143, rest
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stderr.close()
    assert "Traceback" not in rest
    assert "stopped by SIGTERM while reading the data; nothing of this run was saved" in rest
    assert unchanged(tmp_path / "work", before) and not list((tmp_path / "work").rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# Reading the data: DataLoader workers and the VOC cache


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


def test_sigterm_to_the_process_group_while_streaming_saves_and_stops(tmp_path):
    """Slurm and systemd signal every process of the job: the DataLoader workers ignore SIGTERM,
    the main process saves last.pt and stops with 143, then shuts the workers down."""
    small_voc(tmp_path / "data")
    process = start(
        [
            "-ds",
            "PascalVOC2012",
            "--data-dir",
            "data",
            "-ne",
            "2",
            "--batch-size",
            "1",
            "--loader",
            "stream",
            "--workers",
            "2",
        ],
        tmp_path,
        new_session=True,
    )
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "augmentation:" in line:
            break
    deadline = time.monotonic() + 60
    while len(children(process.pid)) < 2 and time.monotonic() < deadline:  # the epoch's workers have started
        time.sleep(0.02)
    workers = children(process.pid)
    assert len(workers) >= 2, "".join(seen)
    time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 143, rest
    assert "Traceback" not in rest and "DataLoader worker" not in rest, rest
    assert "stopped by SIGTERM" in rest
    assert only(tmp_path / "checkpoints" / "PascalVOC2012", "*/last.pt").is_file()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "workers outlived the run"


def test_a_streaming_worker_killed_by_sigkill_is_one_sentence_and_leaves_no_temporary_folder(tmp_path):
    """The out-of-memory killer's way: SIGKILL to one DataLoader worker of an ImageFolder streamed
    from its cache. One sentence names the worker and the signal, the usual cause and what to
    change; the process exits 1; HOME stays empty and TMPDIR holds no ``pymp-*`` folder (the
    killed worker's own, before). torch's import makes ``torchinductor_<user>`` there, whatever
    the command: that is torch's, and left alone."""
    write_class_folders(tmp_path / "data", {"a": 20, "b": 20}, size=40)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    flags = [
        "-c",
        "-ds",
        "ImageFolder",
        "--data-dir",
        "data",
        "--cache-dir",
        "cache",
        "--loader",
        "stream",
        "--workers",
        "2",
        "--batch-size",
        "1",
        "-ne",
        "5",
        "-d",
    ]
    process = start(flags, tmp_path, new_session=True, env={**os.environ, "HOME": str(home), "TMPDIR": str(tmp)})
    try:
        seen = wait_for(process, "augmentation:")  # the training loop is next
        while len(children(process.pid)) < 2 and process.poll() is None:  # its workers have started
            time.sleep(0.01)
        workers = children(process.pid)
        assert len(workers) >= 2, seen
        os.kill(workers[0], signal.SIGKILL)
        rest = process.communicate(timeout=300)[1]  # a guard against a hang, not a time to meet
        assert process.returncode == 1, rest
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stderr.close()
    assert "Traceback" not in rest, rest
    errors = [line for line in rest.splitlines() if "error: " in line]
    assert errors == [
        (
            f"error: DataLoader worker (pid {workers[0]}) was killed "
            "by SIGKILL, most often by the kernel's out-of-memory "
            "killer (dmesg names it); run again with fewer workers "
            "(e.g. --workers 1) or a smaller --batch-size (nothing "
            "was saved yet)."
        )
    ], rest
    assert list(home.iterdir()) == []
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []


def test_the_sentence_for_a_lost_worker_says_what_is_kept_and_how_to_resume(tmp_path):
    last = tmp_path / "last.pt"
    last.write_bytes(b"a checkpoint")
    killed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    assert lost_worker_sentence(killed, last, 4, False) == (
        f"DataLoader worker (pid 4242) was killed by SIGKILL, most often by the kernel's out-of-memory killer (dmesg "
        f"names it); {last} is kept: resume with --resume {last} --workers 2, or start again with a smaller "
        "--batch-size."
    )
    gone = RuntimeError("DataLoader worker (pid(s) 4242, 4243) exited unexpectedly")
    assert lost_worker_sentence(gone, None, 3, True) == (
        "DataLoader workers (pid 4242, 4243) stopped unexpectedly; run again with fewer workers, e.g. --workers 1."
    )
    bus = RuntimeError(
        "DataLoader worker (pid 7) is killed by signal: Bus error. It is possible that dataloader's "
        "workers are out of shared memory."
    )
    assert lost_worker_sentence(bus, None, 2, True).startswith(
        "DataLoader worker (pid 7) was killed by SIGBUS, most often for want of shared memory (/dev/shm); "
    )
    assert lost_worker_sentence(RuntimeError("CUDA out of memory"), last, 2, False) is None


def test_workers_ignore_both_stop_signals(own_signals):
    _ignore_stop_signals(0)
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def slow_decoder(calls: list[int], seconds: float = 0.05):
    def decode(path: Path, size: int) -> torch.Tensor:
        calls.append(1)
        time.sleep(seconds)
        return torch.zeros(3, size, size, dtype=torch.uint8)

    return decode


def only_complete_shards(folder: Path) -> list[str]:
    """The names in a shard folder, after checking that none is a temporary file."""
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert not [n for n in names if n.endswith(".tmp")], names
    return names


def test_the_cache_build_stops_promptly_on_ctrl_c_and_keeps_only_complete_shards(tmp_path, monkeypatch, own_signals):
    calls: list[int] = []
    monkeypatch.setattr("data.shards.decode_resized", slow_decoder(calls))
    paths = [tmp_path / f"{i}.jpg" for i in range(300)]  # 300 x 50 ms: seconds
    for path in paths:
        path.write_bytes(b"x")
    # Python's own Ctrl-C handler, whatever this process inherited: a shell starts background
    # jobs with SIGINT ignored, and interrupt_main then does nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torchvision.io  # noqa: F401 (imported by the first shard; seconds, not part of the stop)

    timer = threading.Timer(0.5, _thread.interrupt_main)  # a few shards in
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            shard_split(paths, torch.zeros(300), tmp_path / "cache", "train", 16, workers=1, shard_images=4)
    finally:
        timer.cancel()
    # Promptly: counted in images decoded, not in seconds (which a loaded machine stretches).
    assert len(calls) < 100
    assert 0 < len(only_complete_shards(tmp_path / "cache" / "train_16")) < 75


def test_a_bad_image_is_reported_after_the_rest_and_the_good_shards_are_kept(tmp_path, monkeypatch):
    decode = slow_decoder([], 0)

    def failing(path: Path, size: int) -> torch.Tensor:
        if path.name == "5.jpg":
            raise DataError(f"{path} cannot be decoded as a JPEG")
        return decode(path, size)

    monkeypatch.setattr("data.shards.decode_resized", failing)
    paths = [tmp_path / f"{i}.jpg" for i in range(40)]
    for path in paths:
        path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"5.jpg cannot be decoded"):
        shard_split(paths, torch.zeros(40), tmp_path / "cache", "train", 16, workers=1, shard_images=10)
    # 5.jpg is in the first shard of ten: the other three were built, for the rerun.
    assert only_complete_shards(tmp_path / "cache" / "train_16") == ["00001.shard", "00002.shard", "00003.shard"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_two_stops_while_building_the_cache_leave_no_file(tmp_path, signum, code):
    """Through the command line: main's handler raises inside the build, which stops, removes
    its temporary file and exits 143 (130) without writing a cache; a second signal while it
    unwinds is acknowledged, not a traceback."""
    folder = small_voc(tmp_path / "data")
    ids = [f"2011_{i:06d}" for i in range(3000)]  # seconds to resize even on many cores
    xml = voc_xml("x.jpg", 500, 375, [("dog", False)])
    for image_id in ids:
        os.link(folder / "JPEGImages" / "2010_000000.jpg", folder / "JPEGImages" / f"{image_id}.jpg")
        (folder / "Annotations" / f"{image_id}.xml").write_text(xml)
    (folder / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    process = start(VOC_DRY_RUN, tmp_path)
    for line in process.stderr:
        if "building the 256x256 cache of 3000 images" in line:
            break
    time.sleep(0.2)
    process.send_signal(signum)
    time.sleep(0.01)
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == code, rest
    assert "Traceback" not in rest, rest
    assert f"stopped by {signal.Signals(signum).name} while reading the data; nothing of this run was saved" in rest
    assert len(only_complete_shards(tmp_path / "cache" / "train_256")) < 3  # stopped before the end
    assert not (tmp_path / "checkpoints").exists()  # the run's claimed folder was empty and is gone


# ---------------------------------------------------------------------------------------------
# main() called in-process: the caller's handlers again when it returns


def callers_handler(signum, frame) -> None:
    """A caller's own handler (pytest's stand-in), which main must put back."""


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--rewind"], 2),  # the parser's error: SystemExit
        (["--version"], 0),  # argparse's action: SystemExit
        (["--evaluate", "missing.pt"], 1),  # run: a UserError
        (["predict", "--checkpoint", "missing.pt", "photo.jpg"], 1),  # run_command
        (["experiments", "list"], 0),  # the experiments' command line
    ],
)
def test_main_gives_the_callers_handlers_back(tmp_path, monkeypatch, own_signals, argv, code):
    monkeypatch.chdir(tmp_path)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, callers_handler)
    try:
        returned = main.main(argv)
    except SystemExit as stop:
        returned = stop.code
    assert returned == code
    assert signal.getsignal(signal.SIGINT) is callers_handler and signal.getsignal(signal.SIGTERM) is callers_handler


def test_a_stop_inside_main_is_its_exit_code_and_then_the_callers_handlers_are_back(monkeypatch, own_signals):
    def stopped_while_running(*args) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # main's StopSignals raises Interrupted at once
        return 0

    monkeypatch.setattr(main, "run", stopped_while_running)
    signal.signal(signal.SIGTERM, callers_handler)
    assert main.main(["-d"]) == 143
    assert signal.getsignal(signal.SIGTERM) is callers_handler


def test_the_script_ignores_stop_signals_once_main_returns(own_signals):
    # ``python main.py`` installs _stopped_while_starting while torch loads; after main, "while
    # starting" would be wrong and the process is exiting: the signals are ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, main._stopped_while_starting)
    with pytest.raises(SystemExit):
        main.main(["--rewind"])
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
