"""Trust nothing a checkpoint or the command line says: where a resumed run writes, whose run it
is, one process per run, every checkpoint field checked, signals in every phase, and values that
used to end in tracebacks.

The catalogue rows (``CASES``) run through ``main_cli.run_case`` like the README table's other
rows: the exit code, the one sentence, no traceback, the earlier run untouched, nothing written
beside the work folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from main_cli import TINY, Case, command, earlier_checkpoint, only, run, run_case, snapshot, unchanged

from training.checkpoint import FIELD_RULES, check_fields, check_optimizer_state, check_partial_epoch
from training.config import TrainConfig
from training.schedule import check_schedule_state
from utils import printable


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


CASES = [
    Case("checkpoint naming a run outside its folder", ["--resume", "evil.pt"], 1,
         r"checkpoint evil.pt cannot be used: its config's run_name '\.\./\.\./\.\./escaped' cannot be a folder name: "
         r"it holds a path separator; it is damaged or was not written by this tool, so use another one \(best.pt or "
         r"last.pt of the run\)\.",
         prepare=lambda w, e: crafted(w, "evil.pt", set_config(run_name="../../../escaped"))),
    Case("checkpoint with an unknown optimizer", ["--resume", "evil.pt"], 1,
         r"checkpoint evil.pt cannot be used: its config's optimizer must be one of sgd, adam, got 'rmsprop'; it is "
         r"damaged or was not written by this tool",
         prepare=lambda w, e: crafted(w, "evil.pt", set_config(optimizer="rmsprop"))),
    Case("checkpoint with a field out of range", ["--resume", "evil.pt"], 1,
         r"checkpoint evil.pt cannot be used: its scheduler's patience must be at least 1, got 0; it is damaged",
         prepare=lambda w, e: crafted(w, "evil.pt", lambda c: c["scheduler"].update(patience=0))),
    Case("checkpoint whose optimizer state does not fit the model", ["--resume", "evil.pt", "--output-dir", "new"], 1,
         r"the checkpoint of run .* cannot be resumed: its optimizer's exp_avg of parameter 0 does not have that "
         r"parameter's shape; it is damaged or was not written for this model and data",
         prepare=lambda w, e: crafted(w, "evil.pt", lambda c: c["optimizer"]["state"][0].update(
             exp_avg=torch.zeros(3)), light=False)),
    Case("resume into another run of the same name", ["--resume", "EARLIER", "--output-dir", "other"], 1,
         r"--resume .*last.pt: other/checkpoints/Shapes/.* already holds a run of that name, not the one this "
         r"checkpoint comes from; pass another --output-dir, or resume that run from its own last.pt\.",
         prepare=foreign_run),
    Case("resume from a checkpoint older than last.pt", ["--resume", "checkpoints/Shapes/EARLIER_RUN/older.pt"], 1,
         r"--resume .*older.pt: the run's .*last.pt is at epoch 1 \(step 1\), past this checkpoint \(step 0\); resume "
         r"from .*last.pt, or pass --rewind to go back \(that last.pt is then kept under another name\)\.",
         prepare=lambda w, e: crafted(w, "older.pt", older_step, inside_run=True)),
    Case("dry run logging under an earlier run's name", ["-d", "-l", "--run-name", "EARLIER_RUN", *TINY], 1,
         r"--run-name .*: runs/Shapes/.* already exists; pick another name, or --resume the run from its last.pt\."),
    Case("run name too long", ["--run-name", "x" * 300], 2,
         r"argument --run-name: 'x{57}\.\.\.' cannot be a folder name: it is 300 bytes long, more than the 200 a name "
         r"may have; use letters, digits, - _ \."),
    Case("text that is not UTF-8", ["-m", "caf\udce9"], 2,
         r"argument -m/--message: 'caf\\udce9' is not valid UTF-8 text"),
    Case("seed out of range", ["--seed", str(2**70)], 2,
         r"argument --seed: must be at least 0 and at most 4294967295, got 1180591620717411303424"),
    Case("negative Shapes seed", ["--shapes-seed", "-1"], 2,
         r"argument --shapes-seed: must be at least 0 and at most 2147483647, got -1"),
    Case("too many Shapes images", ["--shapes-train", str(10**11)], 2,
         r"argument --shapes-train: must be at least 1 and at most 10000000, got 100000000000"),
    Case("Shapes count beyond memory", ["-c", "--shapes-train", "10000000", "-d"], 1,
         r"generating 10000000 Shapes images needs about 1200.0 GB of memory and this machine has .* GB available; "
         r"pass a smaller --shapes-train / --shapes-test\."),
    Case("device that cannot train", ["--device", "meta", *TINY], 1,
         r"--device 'meta' is a meta device; this tool trains on cpu, cuda or cuda:N\."),
    Case("report folder below a file", ["report", "runs", "--out", "afile/report"], 1,
         r"cannot create the report folder afile/report \(Not a directory\); pass another --out\.",
         prepare=report_below_a_file),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_untrusted_run_catalogue(tmp_path, earlier, case):
    run_case(case, tmp_path, earlier)
    if case.name == "checkpoint naming a run outside its folder":
        assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()


# ---------------------------------------------------------------------------------------------
# Where a resumed run writes


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory) -> Path:
    """A finished two-epoch CifarAlexNet run on tiny Shapes (its folder)."""
    root = tmp_path_factory.mktemp("cifar_run")
    result = run("-c", "-ne", "2", "--seed", "1", *TINY, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def copy_run(source: Path, to: Path) -> Path:
    """A hard-linked copy of a run folder (checkpoints are replaced, never written in place)."""
    import shutil

    shutil.copytree(source, to, copy_function=os.link)
    return only(to / "checkpoints" / "Shapes", "*/last.pt")


def test_a_checkpoint_decides_neither_where_the_run_writes_nor_what_the_terminal_shows(tmp_path, cifar_run):
    last = copy_run(cifar_run, tmp_path / "work")
    checkpoint = torch.load(last, weights_only=True)
    elsewhere = tmp_path / "other-machine" / "outputs"
    checkpoint["config"] = {**checkpoint["config"], "output_dir": str(elsewhere), "run_name": "moved",
                            "cache_dir": str(tmp_path / "other-machine" / "cache"),
                            "message": "note \x1b]0;owned\x07\x1b[2J\r"}  # fmt: skip
    torch.save(checkpoint, tmp_path / "work" / "moved.pt")
    result = run("--resume", "moved.pt", "-ne", "3", cwd=tmp_path / "work")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "other-machine").exists()
    # The message reaches the terminal without its escape sequences (title, clear screen, bell).
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr and "\r" not in result.stderr
    assert "message: note \\x1b]0;owned\\x07\\x1b[2J\\x0d" in result.stderr
    resumed = torch.load(tmp_path / "work" / "checkpoints" / "Shapes" / "moved" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 3 and resumed["config"]["output_dir"] == "."
    assert json.loads((tmp_path / "work" / "runs" / "Shapes" / "moved" / "config.json").read_text())["run_name"] == (
        "moved"
    )


def test_rewind_only_when_asked_and_the_newer_last_pt_is_kept(tmp_path, cifar_run):
    last = copy_run(cifar_run, tmp_path / "work")
    state = torch.load(last, weights_only=True)
    older = dict(state, global_step=state["global_step"] - 3, epoch=1, partial=None)
    torch.save(older, last.parent / "epoch1.pt")
    before = last.read_bytes()
    refused = run("--resume", str(last.parent / "epoch1.pt"), "-ne", "2", cwd=tmp_path / "work")
    assert refused.returncode == 1 and "pass --rewind to go back" in refused.stderr
    assert last.read_bytes() == before
    rewound = run("--resume", str(last.parent / "epoch1.pt"), "-ne", "2", "--rewind", cwd=tmp_path / "work")
    assert rewound.returncode == 0, rewound.stderr
    assert re.search(r"rewinding run .* to step \d+; its last.pt \(at epoch 2 \(step 6\)\) is kept as .*last.epoch2.pt",
                     rewound.stderr), rewound.stderr  # fmt: skip
    assert (last.parent / "last.epoch2.pt").read_bytes() == before
    assert torch.load(last, weights_only=True)["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# One live process per run


def start(flags: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command(*flags), cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # fmt: skip


def wait_for(process: subprocess.Popen, text: str) -> str:
    seen = []
    for line in process.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never appeared:\n{''.join(seen)}")


def test_two_resumes_of_one_run_the_second_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path, cifar_run):
    last = copy_run(cifar_run, tmp_path / "work")
    first = start(["--resume", str(last), "-ne", "4", "-lls", "1"], tmp_path / "work")
    try:
        wait_for(first, "resumed after epoch 2")
        second = run("--resume", str(last), "-ne", "4", cwd=tmp_path / "work")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert re.search(rf"error: run {last.parent.name} is in use by process {first.pid} on .* \(since .*\); wait for "
                         r"it to finish or stop it, then run this again\.", second.stderr), second.stderr  # fmt: skip
        os.killpg(first.pid, signal.SIGKILL)  # no handler runs: the lock file stays behind
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.stderr.close()
    assert (last.parent / ".lock").exists()
    again = run("--resume", str(last), "-ne", "2", cwd=tmp_path / "work")  # the lock is free: it runs (and ends)
    assert again.returncode == 0, again.stderr
    assert torch.load(last, weights_only=True)["epoch"] >= 2  # whole, whatever epoch the kill came in
    assert not (last.parent / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# Signals in every phase


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_while_generating_the_data_is_one_sentence_and_writes_nothing(tmp_path, signum, code):
    process = start(["-c", "--shapes-train", "30000", "--run-name", "big"], tmp_path)
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


def test_a_stop_during_evaluate_is_one_sentence(tmp_path, cifar_run):
    last = copy_run(cifar_run, tmp_path / "work")
    before = snapshot(tmp_path / "work")
    process = start(["--evaluate", str(last), "--shapes-test", "30000"], tmp_path / "work")
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
# Output a user or a machine reads


def test_evaluate_prints_strict_json_when_the_loss_overflows(tmp_path, cifar_run):
    last = copy_run(cifar_run, tmp_path / "work")
    checkpoint = torch.load(last, weights_only=True)
    for key in ("classifier.6.weight", "classifier.6.bias"):  # finite weights, logits beyond float32
        checkpoint["model"][key] = torch.full_like(checkpoint["model"][key], 3e38)
    checkpoint["model"]["classifier.6.weight"][0] = -3e38
    torch.save(checkpoint, tmp_path / "huge.pt")
    result = run("--evaluate", str(tmp_path / "huge.pt"), cwd=tmp_path / "work")
    assert result.returncode == 0, result.stderr

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads(result.stdout, parse_constant=refuse)
    assert metrics["loss"] is None and metrics["count"] == 40


# ---------------------------------------------------------------------------------------------
# Every field of a checkpoint (in process: the rules themselves, over many values)


@pytest.fixture(scope="module")
def state(cifar_run) -> dict:
    return torch.load(only(cifar_run / "checkpoints" / "Shapes", "*/last.pt"), weights_only=True)


@pytest.fixture(scope="module")
def light(state) -> dict:
    """The real checkpoint with a two-tensor model and its Adam state: the same fields, checked
    in microseconds instead of scanning 28 million weights per example."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


BAD_VALUES = [None, True, -1, 2**70, -1.5, float("nan"), float("inf"), "x", "../x", [], {}, [None], {"a": 1},
              torch.zeros(3), torch.full((2,), float("nan"))]  # fmt: skip


def test_the_real_checkpoint_passes_every_rule(state):
    assert check_fields(state) is None


@pytest.mark.parametrize("key", sorted(FIELD_RULES))
def test_every_field_refuses_values_of_the_wrong_kind(light, key):
    """Each field with each bad value: a problem in words naming the field, or (where the value
    happens to be valid for it, e.g. None for an optional field) acceptance; never an exception."""
    refused = 0
    for value in BAD_VALUES:
        problem = check_fields({**light, key: value})
        if problem is not None:
            assert problem.startswith("its ") and len(problem) < 300, problem
            refused += 1
    assert refused >= len(BAD_VALUES) - 3


@pytest.mark.parametrize("field", sorted(f for f in TrainConfig.__dataclass_fields__))
def test_every_config_field_is_checked(light, field):
    for value in BAD_VALUES[:10]:
        problem = check_fields({**light, "config": {**light["config"], field: value}})
        if problem is None:
            TrainConfig.from_dict({**light["config"], field: value})  # accepted: must build
        else:
            assert problem.startswith(f"its config's {field} "), problem


FIELD_FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@FIELD_FUZZ
@given(st.sampled_from(sorted(FIELD_RULES)), VALUES)
def test_fuzzed_fields_are_accepted_or_named(light, key, value):
    problem = check_fields({**light, key: value})
    assert problem is None or problem.startswith("its ")


@FIELD_FUZZ
@given(st.dictionaries(st.sampled_from(["lr", "best", "patience", "drops", "warm_start", "evil"]), VALUES))
def test_fuzzed_schedule_states_are_accepted_or_refused_in_words(light, changes):
    try:
        check_schedule_state({**light["scheduler"], **changes})
    except ValueError as error:
        assert str(error).startswith("its scheduler")


def test_an_optimizer_state_must_fit_the_model(state):
    from network import CifarAlexNet

    model = CifarAlexNet(10)
    optimizer = torch.optim.Adam(model.parameters())
    assert check_optimizer_state(state["optimizer"], optimizer) is None
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert "not a SGD state" in check_optimizer_state(state["optimizer"], sgd)
    small = torch.optim.Adam(CifarAlexNet(10).classifier.parameters())
    assert "not a Adam state of this model" in check_optimizer_state(state["optimizer"], small)
    nan = {**state["optimizer"], "state": {**state["optimizer"]["state"]}}
    nan["state"][3] = {**nan["state"][3], "exp_avg_sq": torch.full_like(nan["state"][3]["exp_avg_sq"], float("nan"))}
    assert (
        check_optimizer_state(nan, optimizer)
        == "its optimizer's exp_avg_sq of parameter 3 holds NaN or infinite values"
    )


def test_an_interrupted_epoch_must_be_an_order_of_the_training_images():
    partial = {"order": torch.randperm(10), "batches_done": 2, "loss_sum": 1.0, "seconds": 1.0}
    assert check_partial_epoch(partial, 10, 3) is None
    assert "not an order of the 10 training images" in check_partial_epoch({**partial, "order": torch.zeros(10,
                                                                                          dtype=torch.long)}, 10, 3)  # fmt: skip
    assert "more than the 1 an epoch has" in check_partial_epoch(partial, 10, 1)


def test_printable_escapes_control_characters_and_stray_bytes():
    assert printable("a\x1b[31mb\r\n\udcff\tc") == "a\\x1b[31mb\\x0d\\x0a\\udcff\tc"
