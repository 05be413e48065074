"""Checkpoints through the command line and in process: resume (bit-identical, from anywhere,
into the right folders, one live process per run, ``--rewind``), ``--evaluate``, saving whole
files or none, and checkpoints refused in one sentence: damaged, foreign, of another model, with
flags that change the run, or crafted (every field checked in process, over many values).

A run stopped by a signal or ``kill -9`` and resumed is in test_signals.py; the bad-input table's
rows about checkpoints run in test_bad_checkpoints.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from main_cli import copy_run, only, start, wait_for
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.checkpoint import FIELDS, check_fields
from training.config import TrainConfig
from training.resume import check_optimizer_state, check_partial_epoch
from training.schedule import check_schedule_state
from utils import _atomic_write, atomic_write_json, printable

# ---------------------------------------------------------------------------------------------
# Resume and --evaluate


def final_weights(root: Path) -> dict:
    return torch.load(only(root / "checkpoints" / "Shapes", "*/last.pt"), weights_only=True)["model"]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, run_main, tiny_shapes):
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir()
    split.mkdir()
    flags = ["-c", "--seed", "3", "--deterministic", "-lls", "1", *tiny_shapes]
    assert run_main(*flags, "-ne", "3", cwd=whole).returncode == 0
    first = run_main(*flags, "-ne", "2", cwd=split)
    assert first.returncode == 0, first.stderr
    last = only(split / "checkpoints" / "Shapes", "*/last.pt")
    second = run_main("--resume", str(last), "-ne", "3", cwd=tmp_path)  # from elsewhere: folders come from the path
    assert second.returncode == 0, second.stderr
    assert "resumed after epoch 2 (step 6)" in second.stderr

    a = json.loads(only(whole / "runs" / "Shapes", "*/summary.json").read_text())
    b = json.loads(only(split / "runs" / "Shapes", "*/summary.json").read_text())
    for key in ("final_top1", "final_top5", "best_top1", "best_epoch", "epochs", "steps", "final_lr"):
        assert a[key] == b[key], key
    wa, wb = final_weights(whole), final_weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(list((split / "runs" / "Shapes").iterdir())) == 1  # the same run folder

    events = EventAccumulator(str(only(split / "runs" / "Shapes", "*")))
    events.Reload()
    assert [e.step for e in events.Scalars("Shapes/val/top1")] == [3, 6, 9]
    assert len(events.Scalars("Shapes/train/loss")) == 9


def test_evaluate_reproduces_the_recorded_metric(tmp_path, run_main, tiny_shapes):
    assert run_main("-c", "-ne", "2", *tiny_shapes, cwd=tmp_path).returncode == 0
    best = only(tmp_path / "checkpoints" / "Shapes", "*/best.pt")
    recorded = torch.load(best, weights_only=True)
    result = run_main("--evaluate", str(best), cwd=tmp_path / "checkpoints")  # data are regenerated: Shapes
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["top1"] == recorded["best"]["top1"] and metrics["loss"] == recorded["best"]["loss"]
    assert metrics["count"] == 40
    assert not (tmp_path / "checkpoints" / "runs").exists()  # evaluation writes nothing


def test_evaluate_uses_ten_crops_for_a_paper_setup_run(tmp_path, run_main):
    flags = ["-pm", "-pt", "-ne", "1", "--shapes-train", "8", "--shapes-test", "4", "--batch-size", "4"]
    assert run_main(*flags, cwd=tmp_path).returncode == 0
    best = only(tmp_path / "checkpoints" / "Shapes", "*/best.pt")
    result = run_main("--evaluate", str(best), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(10-crop)" in result.stderr
    assert json.loads(result.stdout)["top1"] == torch.load(best, weights_only=True)["best"]["top1"]


# ---------------------------------------------------------------------------------------------
# Damaged, foreign and mismatched checkpoints


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory, run_main, tiny_shapes) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    assert run_main("-c", "-ne", "1", *tiny_shapes, cwd=root).returncode == 0
    return only(root / "checkpoints" / "Shapes", "*/last.pt")


def write_bad(kind: str, path: Path, good: Path) -> None:
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:1000])
    elif kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 10)
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    elif kind == "foreign pickle":
        torch.save({"model": {}, "config": Path("x"), "epoch": 1, "classes": []}, path)
    elif kind == "no config":
        torch.save({"model": {}, "epoch": 1}, path)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", r"checkpoint .*nowhere.pt does not exist; pass the path of a last.pt or best.pt\."),
        ("truncated", r"checkpoint .*bad.pt cannot be loaded \(.*\); it is damaged or was not written by this tool"),
        ("random bytes", r"checkpoint .*bad.pt cannot be loaded"),
        ("not a dict", r"bad.pt is not a checkpoint written by this tool \(it lacks model, config, epoch, classes\)"),
        ("foreign pickle", r"checkpoint .*bad.pt cannot be loaded \(.*\); it is damaged or was not written"),
        ("no config", r"bad.pt is not a checkpoint written by this tool \(it lacks config, classes\)"),
    ],
)
@pytest.mark.parametrize("mode", ["--resume", "--evaluate"])
def test_bad_checkpoints_are_one_sentence(tmp_path, shapes_checkpoint, kind, message, mode, run_main):
    path = tmp_path / ("nowhere.pt" if kind == "missing" else "bad.pt")
    write_bad(kind, path, shapes_checkpoint)
    result = run_main(mode, str(path), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "runs").exists()


def test_checkpoint_of_another_model_or_class_count(tmp_path, shapes_checkpoint, shared_data, run_main):
    other_model = run_main("--evaluate", str(shapes_checkpoint), "-pm", cwd=tmp_path)
    assert other_model.returncode == 1
    assert "holds a CifarAlexNet, but this command builds a CifarAlexNet" not in other_model.stderr
    assert "does not fit CifarAlexNet" in other_model.stderr  # the paper-width CifarAlexNet
    classes = run_main(
        "--evaluate", str(shapes_checkpoint), "-ds", "Cifar100", "--data-dir", str(shared_data), cwd=tmp_path
    )
    assert classes.returncode == 1
    assert "was trained on 10 classes (Shapes), but Cifar100 has 100; pass a checkpoint trained on Cifar100." in (
        classes.stderr
    )


def test_checkpoint_of_torch_alexnet_refuses_the_cifar_model(tmp_path, run_main):
    assert (
        run_main("-ne", "1", "--shapes-train", "8", "--shapes-test", "4", "--batch-size", "8", cwd=tmp_path).returncode
        == 0
    )
    path = only(tmp_path / "checkpoints" / "Shapes", "*/last.pt")
    result = run_main("--evaluate", str(path), "-c", cwd=tmp_path)
    assert result.returncode == 1
    assert "holds a TorchAlexNet, but this command builds a CifarAlexNet; drop the model flags" in result.stderr


def test_resume_refuses_flags_that_change_the_run(tmp_path, shapes_checkpoint, run_main):
    result = run_main("--resume", str(shapes_checkpoint), "--batch-size", "64", "-ds", "Cifar10", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "fixes these settings, which the command line changes: batch_size (64; the checkpoint has 40), "
        "dataset ('Cifar10'; the checkpoint has 'Shapes'); drop those flags." in result.stderr
    )


# ---------------------------------------------------------------------------------------------
# Where a resumed run writes


def test_a_checkpoint_decides_neither_where_the_run_writes_nor_what_the_terminal_shows(tmp_path, cifar_run, run_main):
    last = copy_run(cifar_run, tmp_path / "work")
    checkpoint = torch.load(last, weights_only=True)
    elsewhere = tmp_path / "other-machine" / "outputs"
    checkpoint["config"] = {
        **checkpoint["config"],
        "output_dir": str(elsewhere),
        "run_name": "moved",
        "cache_dir": str(tmp_path / "other-machine" / "cache"),
        "message": "note \x1b]0;owned\x07\x1b[2J\r",
    }
    torch.save(checkpoint, tmp_path / "work" / "moved.pt")
    result = run_main("--resume", "moved.pt", "-ne", "3", cwd=tmp_path / "work")
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


def test_rewind_only_when_asked_and_the_newer_last_pt_is_kept(tmp_path, cifar_run, run_main):
    last = copy_run(cifar_run, tmp_path / "work")
    state = torch.load(last, weights_only=True)
    older = dict(state, global_step=state["global_step"] - 3, epoch=1, partial=None)
    torch.save(older, last.parent / "epoch1.pt")
    before = last.read_bytes()
    refused = run_main("--resume", str(last.parent / "epoch1.pt"), "-ne", "2", cwd=tmp_path / "work")
    assert refused.returncode == 1 and "pass --rewind to go back" in refused.stderr
    assert last.read_bytes() == before
    rewound = run_main("--resume", str(last.parent / "epoch1.pt"), "-ne", "2", "--rewind", cwd=tmp_path / "work")
    assert rewound.returncode == 0, rewound.stderr
    assert re.search(
        r"rewinding run .* to step \d+; its last.pt \(at epoch 2 \(step 6\)\) is kept as .*last.epoch2.pt",
        rewound.stderr,
    ), rewound.stderr
    assert (last.parent / "last.epoch2.pt").read_bytes() == before
    assert torch.load(last, weights_only=True)["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# One live process per run


def test_two_resumes_of_one_run_the_second_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path, cifar_run, run_main):
    last = copy_run(cifar_run, tmp_path / "work")
    first = start(["--resume", str(last), "-ne", "4", "-lls", "1"], tmp_path / "work", new_session=True)
    try:
        wait_for(first, "resumed after epoch 2")
        second = run_main("--resume", str(last), "-ne", "4", cwd=tmp_path / "work")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert re.search(
            rf"error: run {last.parent.name} is in use by process {first.pid} on .* \(since .*\); wait for "
            r"it to finish or stop it, then run this again\.",
            second.stderr,
        ), second.stderr
        os.killpg(first.pid, signal.SIGKILL)  # no handler runs: the lock file stays behind
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.stderr.close()
    assert (last.parent / ".lock").exists()
    again = run_main("--resume", str(last), "-ne", "2", cwd=tmp_path / "work")  # the lock is free: it runs (and ends)
    assert again.returncode == 0, again.stderr
    assert torch.load(last, weights_only=True)["epoch"] >= 2  # whole, whatever epoch the kill came in
    assert not (last.parent / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# Output a user or a machine reads


def test_evaluate_prints_strict_json_when_the_loss_overflows(tmp_path, cifar_run, run_main):
    last = copy_run(cifar_run, tmp_path / "work")
    checkpoint = torch.load(last, weights_only=True)
    for key in ("classifier.6.weight", "classifier.6.bias"):  # finite weights, logits beyond float32
        checkpoint["model"][key] = torch.full_like(checkpoint["model"][key], 3e38)
    checkpoint["model"]["classifier.6.weight"][0] = -3e38
    torch.save(checkpoint, tmp_path / "huge.pt")
    result = run_main("--evaluate", str(tmp_path / "huge.pt"), cwd=tmp_path / "work")
    assert result.returncode == 0, result.stderr

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads(result.stdout, parse_constant=refuse)
    assert metrics["loss"] is None and metrics["count"] == 40


def test_printable_escapes_control_characters_and_stray_bytes():
    assert printable("a\x1b[31mb\r\n\udcff\tc") == "a\\x1b[31mb\\x0d\\x0a\\udcff\tc"


# ---------------------------------------------------------------------------------------------
# Saving: a whole file or none


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    def atomic_torch_save(obj, path):
        _atomic_write(path, lambda f: torch.save(obj, f))

    path = tmp_path / "ckpt" / "last.pt"
    atomic_torch_save({"model": {"w": torch.ones(2)}, "epoch": 1}, path)
    atomic_torch_save({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.zeros(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]

    class Boom(Exception):
        pass

    class Unsaveable:
        def __reduce__(self):
            raise Boom

    with pytest.raises(Boom):
        atomic_torch_save({"x": Unsaveable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2  # the old file survived
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]

    atomic_write_json({"b": 1, "a": math.pi}, tmp_path / "s.json")
    assert (tmp_path / "s.json").read_text().startswith('{\n  "a": 3.14159')


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


BAD_VALUES = [
    None,
    True,
    -1,
    2**70,
    -1.5,
    float("nan"),
    float("inf"),
    "x",
    "../x",
    [],
    {},
    [None],
    {"a": 1},
    torch.zeros(3),
    torch.full((2,), float("nan")),
]


def test_the_real_checkpoint_passes_every_rule(state):
    from training.checkpoint import network_problem

    assert check_fields(state) is None and network_problem(state) is None


@pytest.mark.parametrize("key", sorted(FIELDS))
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
@given(st.sampled_from(sorted(FIELDS)), VALUES)
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


#: Stored preprocessing to start from, per network: the real run's (CifarAlexNet: a cifar
#: pipeline on 32-pixel images) and, for TorchAlexNet, a modern and a paper one on 256-pixel images.
PIPELINES = {
    "modern": {"kind": "modern", "mean": torch.full((3,), 0.5), "std": torch.full((3,), 0.25), "crop": 224},
    "paper": {
        "kind": "paper",
        "mean_image": torch.full((3, 256, 256), 120.0),
        "eigenvalues": torch.ones(3) / 100,
        "eigenvectors": torch.eye(3),
        "crop": 224,
        "base": 256,
        "sigma": 0.1,
        "fidelity": "code",
    },
}
SIZES = st.integers(-2, 300) | st.sampled_from([0, 1, 7, 8, 31, 32, 33, 223, 224, 225, 256, 257, 4096, 2**40])
ENTRIES = (
    SIZES
    | VALUES
    | st.sampled_from(
        [
            torch.zeros(3),
            torch.ones(3),
            -torch.ones(3),
            torch.full((3,), float("nan")),
            torch.eye(3),
            torch.ones(2),
            torch.zeros(3, 8, 8),
            torch.ones(3, 256, 256),
            torch.ones(3, dtype=torch.long),
            "cifar",
            "paper",
            "modern",
            "text",
            0.5,
            1.5,
        ]
    )
)
PIPELINE_KEYS = [
    "kind",
    "mean",
    "std",
    "input_size",
    "padding",
    "crop",
    "mean_image",
    "eigenvalues",
    "eigenvectors",
    "base",
    "sigma",
    "fidelity",
]


@FIELD_FUZZ
@given(
    st.sampled_from(["cifar", "modern", "paper"]),
    st.dictionaries(st.sampled_from(PIPELINE_KEYS), ENTRIES, max_size=3),
    st.dictionaries(st.sampled_from(["image_size", "task"]), ENTRIES, max_size=2),
)
def test_fuzzed_preprocessing_is_refused_in_words_or_gives_the_network_its_inputs(light, start, pipeline, outer):
    """A checkpoint's ``preprocess`` with entries changed: refused in words (by the field rule
    or against the network, ``network_problem``), or a pipeline whose evaluation turns images of
    its ``image_size`` into finite inputs of the network's size."""
    from data.transforms import pipeline_from_state
    from network import MODELS
    from training.checkpoint import network_problem

    saved = light["preprocess"]
    model = "CifarAlexNet" if start == "cifar" else "TorchAlexNet"
    base = saved if start == "cifar" else {**saved, "pipeline": PIPELINES[start], "image_size": 256}
    preprocess = {**base, **outer, "pipeline": {**base["pipeline"], **pipeline}}
    checkpoint = {**light, "config": {**light["config"], "model": model}, "preprocess": preprocess}
    problem = check_fields(checkpoint) or network_problem(checkpoint)
    event("refused" if problem else "accepted")
    if problem is not None:
        assert problem.startswith("its "), problem
        return
    evaluation = pipeline_from_state(preprocess["pipeline"])
    size, side = preprocess["image_size"], MODELS[model].input_size
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs = evaluation.evaluate(images)
    assert inputs.shape == (2, evaluation.views, 3, side, side)
    assert bool(torch.isfinite(inputs).all())


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
    assert "not an order of the 10 training images" in check_partial_epoch(
        {**partial, "order": torch.zeros(10, dtype=torch.long)}, 10, 3
    )
    assert "more than the 1 an epoch has" in check_partial_epoch(partial, 10, 1)
