"""The command line, end to end, as a user runs it (subprocesses in a scratch folder): the flags
(help, names, bad values and combinations), a whole run and everything it writes (TensorBoard,
summary, checkpoints, log), dry runs, every model, and a run that must learn.

Real data sets through the command line are in test_cli_data.py; resume and --evaluate in
test_checkpoints.py; the bad-input table (docs/troubleshooting.md) in test_bad_flags.py,
test_bad_data.py and test_bad_checkpoints.py."""

import argparse
import json
import re

import pytest
import torch
from main_cli import only
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from main import get_args_parser
from network import CifarAlexNet
from utils import __version__


def test_version(tmp_path, run_main):
    result = run_main("-v", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"alexnet {__version__}"


def test_every_help_line_states_its_default():
    parser = get_args_parser()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert "(default: " in action.help, action.option_strings


def test_seed_flags_keep_their_short_and_long_names():
    options = {s for a in get_args_parser()._actions for s in a.option_strings}
    seed = [
        "-h",
        "--help",
        "-v",
        "--version",
        "-d",
        "--dry_run",
        "-l",
        "--log",
        "-c",
        "--cifar",
        "-pt",
        "--paper_train",
        "-pm",
        "--paper_model",
        "-ne",
        "--n_epoch",
        "-es",
        "--early_stop",
        "-lls",
        "--log_loss_step",
        "-lce",
        "--log_confusion_epoch",
        "-ds",
        "--dataset",
        "-m",
        "--message",
    ]
    new = ["--data-dir", "--batch-size", "--lr", "--seed", "--device", "--output-dir"]
    assert set(seed + new) <= options


def test_training_run_writes_tensorboard_summary_checkpoints_and_log(tmp_path, run_main, tiny_shapes):
    result = run_main("-c", "-l", "-ne", "2", "-lls", "1", "-lce", "1", "-m", "tiny run", *tiny_shapes, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    (run_dir,) = (tmp_path / "runs" / "Shapes").iterdir()
    name = run_dir.name
    assert name.endswith("_CifarAlexNet_modern")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["train_size"] == 120 and summary["test_size"] == 40
    assert summary["model"] == "CifarAlexNet" and summary["dataset"] == "Shapes"
    assert 0 <= summary["best_top1"] <= 100 and summary["best_top1"] >= summary["final_top1"]
    assert summary["best_top5"] >= summary["best_top1"]
    assert summary["train_images_per_second"] > 0
    assert summary["config"]["message"] == "tiny run" and summary["config"]["run_name"] == name
    assert json.loads((run_dir / "config.json").read_text()) == summary["config"]
    assert sorted(p.name for p in run_dir.glob("confusion_*.csv")) == [
        "confusion_epoch001.csv",
        "confusion_epoch002.csv",
    ]

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "Shapes/train/loss",
        "Shapes/train/lr",
        "Shapes/val/loss",
        "Shapes/val/top1",
        "Shapes/val/top5",
        "Shapes/val/top1_max",
    } <= tags
    top1 = [e.value for e in events.Scalars("Shapes/val/top1")]
    assert len(top1) == 2 and max(top1) == pytest.approx(summary["best_top1"])
    assert len(events.Scalars("Shapes/train/loss")) == 2 * 3  # -lls 1: every one of 3 steps per epoch
    assert "message" in events.Tags()["tensors"] or any("message" in t for t in events.Tags()["tensors"])

    ckpt_dir = tmp_path / "checkpoints" / "Shapes" / name
    for file in ("best.pt", "last.pt"):
        checkpoint = torch.load(ckpt_dir / file, weights_only=True)
        model = CifarAlexNet(10)
        model.load_state_dict(checkpoint["model"], strict=True)
        assert checkpoint["config"]["model"] == "CifarAlexNet"
    assert torch.load(ckpt_dir / "last.pt", weights_only=True)["epoch"] == 2
    assert torch.load(ckpt_dir / "best.pt", weights_only=True)["epoch"] == summary["best_epoch"]

    log = (tmp_path / "log" / f"{name}.log").read_text()
    assert "epoch 2/2" in log and "message: tiny run" in log

    # A second identical run gets its own folders and leaves the first one alone.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = run_main("-c", "-ne", "1", *tiny_shapes, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(list((tmp_path / "runs" / "Shapes").iterdir())) == 2
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())


def test_tensorboard_holds_every_tag_and_checkpoints_hold_every_state(tmp_path, run_main, tiny_shapes):
    result = run_main("-c", "-ne", "2", "-lls", "1", "-lce", "1", "-m", "hello there", *tiny_shapes, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only(tmp_path / "runs" / "Shapes", "*")
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/epoch", "val/loss", "val/top1", "val/top5", "val/top1_max"):
        assert f"Shapes/{tag}" in tags["scalars"], tag
    assert {"Shapes/train/augmented", "Shapes/val/confusion"} <= set(tags["images"])
    assert len(events.Images("Shapes/val/confusion")) == 2 and len(events.Images("Shapes/train/augmented")) == 1
    assert {"config/text_summary", "message/text_summary"} <= set(tags["tensors"])
    message = events.Tensors("message/text_summary")[0].tensor_proto.string_val[0].decode()
    assert message == "hello there"
    assert "_hparams_/session_end_info" in events.PluginTagToContent("hparams")
    assert {"hparam/best_top1", "hparam/best_top5"} <= set(tags["scalars"])
    # the README's tag filters (the original v2 tool's regular expressions) select the curves it says
    shown = sorted(t for t in tags["scalars"] if re.search(r"Shapes/.*/top\d", t))
    assert shown == ["Shapes/val/top1", "Shapes/val/top1_max", "Shapes/val/top5"]
    steps = [e.step for e in events.Scalars("Shapes/val/top1")]
    assert steps == [3, 6]  # the training step at the end of each epoch: 120 images / 40
    assert [e.value for e in events.Scalars("Shapes/train/epoch")] == [1, 2]

    checkpoint = torch.load(only(tmp_path / "checkpoints" / "Shapes", "*/last.pt"), weights_only=True)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "global_step",
        "best_metric",
        "best",
        "best_epoch",
        "rng",
        "config",
        "version",
        "classes",
        "top1_max",
        "train_images",
        "train_seconds",
    } <= set(checkpoint)
    assert {"torch", "index", "augment"} <= set(checkpoint["rng"])
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 6
    assert checkpoint["config"] == json.loads((run_dir / "config.json").read_text())
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])
    assert checkpoint["scheduler"]["lr"] == pytest.approx(1e-4)


def test_dry_run_writes_nothing_under_runs_or_checkpoints(tmp_path, run_main, tiny_shapes):
    result = run_main("-c", "-d", "-ne", "1", *tiny_shapes, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1" in result.stderr and "dry run" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "log").exists()
    logged = run_main("-c", "-d", "-l", "-ne", "1", *tiny_shapes, cwd=tmp_path)
    assert logged.returncode == 0
    assert len(list((tmp_path / "log").glob("*.log"))) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "flags, model",
    [(["-pm", "-pt"], "PaperAlexNet"), ([], "TorchAlexNet"), (["-c", "-pm", "--no-lrn"], "CifarAlexNet")],
)
def test_every_model_trains_on_shapes(tmp_path, flags, model, run_main):
    result = run_main(
        *flags, "-d", "-ne", "1", "--shapes-train", "16", "--shapes-test", "8", "--batch-size", "8", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert f"{model} on Shapes" in result.stderr and "epoch 1/1" in result.stderr
    if "-pt" in flags:
        assert "paper setup, sgd (paper rule) lr 0.01, batch 8" in result.stderr and "10-crop test" in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-ne", "0"], "argument -ne/--n_epoch: must be at least 1, got 0"),
        (["-es", "-3"], "argument -es/--early_stop: must be at least 0, got -3"),
        (["--lr", "-0.1"], "argument --lr: must be above 0, got -0.1"),
        (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
        (["--momentum", "1"], "argument --momentum: must be at least 0 and below 1, got 1"),
        (["--lr-factor", "1.5"], "argument --lr-factor: must be above 0 and below 1, got 1.5"),
        (["--warm-start", "0.5"], "argument --warm-start: must be at least 1, got 0.5"),
        (["--workers", "-1"], "argument --workers: must be at least 0 and at most 256, got -1"),
        (["--max-lr-drops", "two"], "argument --max-lr-drops: 'two' is not a whole number"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
        (["--resume", "a.pt", "--evaluate", "b.pt"], "argument --evaluate: not allowed with argument --resume"),
        (["--batch-size", "many"], "argument --batch-size: 'many' is not a whole number"),
        (["-ds", "ImageNet21k"], "argument -ds/--dataset: invalid choice: 'ImageNet21k'"),
    ],
)
def test_bad_flag_values_are_one_sentence_and_exit_2(capsys, flags, message):
    """The parser itself, in this process (every flag's rule; the bad-input catalogue runs a few
    of these through the real command line as well)."""
    with pytest.raises(SystemExit) as stopped:
        get_args_parser().parse_args(flags)
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert errors == [f"main.py: error: {message}"] or (len(errors) == 1 and message in errors[0]), errors


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--coarse-labels"], "--coarse-labels only applies to -ds Cifar100"),
        (["--no-lrn"], "--no-lrn only applies to the paper's features; add -pm"),
        (["--rewind"], "--rewind only applies to --resume"),
    ],
)
def test_bad_flag_combinations_are_one_sentence_and_exit_2(tmp_path, flags, message, run_main):
    result = run_main(*flags, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tmp_path, run_main, tiny_shapes):
    result = run_main("-c", "--device", "cuda", *tiny_shapes, cwd=tmp_path)
    assert result.returncode == 1
    assert "has no usable CUDA GPU; use --device cpu." in result.stderr
    assert "Traceback" not in result.stderr


def test_cifar_alexnet_learns_shapes(tmp_path, run_main):
    """It must actually learn: six times the 10 % of chance after four short epochs (this run
    reached 79 % and 84 % on the 2-core development machine; docs/speed.md's full-size run
    of three epochs on 8,000 images reaches 96.69 %).

    No time limit: the run takes 82 s on those 2 cores lightly loaded and over ten minutes when
    they are busy. Less work does not learn reliably: the network stays near chance for its first
    1,000 to 2,000 images at any batch size or rate tried (batch 8 to 50, Adam at 1e-4 to 3e-4),
    and three epochs end at 68 %, too close to the bound for CPUs that train in fp32, not bf16."""
    result = run_main(
        "-c",
        "-ne",
        "4",
        "--shapes-train",
        "2500",
        "--shapes-test",
        "500",
        "--batch-size",
        "50",
        "--output-dir",
        "out",
        cwd=tmp_path,
        timeout=None,
    )
    assert result.returncode == 0, result.stderr
    (summary,) = (tmp_path / "out" / "runs" / "Shapes").glob("*/summary.json")
    best = json.loads(summary.read_text())["best_top1"]
    assert best >= 60.0, f"best top-1 {best} % is below six times chance (60 %):\n{result.stderr[-2000:]}"
