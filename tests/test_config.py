"""One config: what each field says about itself, setups as changes applied once, 0.1 configs
read back, the code version, and the flag checks read from the registries. In process: the
parser, ``config_from_args`` and ``main.main`` for the refusals that exit before any work."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict

import pytest
import torch

import main
from data.core import DataOptions
from hardware.capabilities import Capabilities
from network import make_model
from training import config as config_module
from training.config import NOT_THE_EXPERIMENT, TrainConfig, code_version
from training.resume import check_compatible
from utils import UserError, __version__

CPU = torch.device("cpu")

#: What --resume may change: how long, where and on what machine the run goes on, and its learning rate.
RESUME_MAY_CHANGE = {
    "n_epoch",
    "early_stop",
    "lr",
    "log_loss_step",
    "log_confusion_epoch",
    "log",
    "data_dir",
    "cache_dir",
    "output_dir",
    "loader",
    "workers",
    "resize_workers",
    "download",
    "device",
    "deterministic",
    "amp",
    "channels_last",
    "compile",
    "code_version",
}
#: What --evaluate may change: the data it is measured on and the machine, besides the model flags.
EVALUATE_MAY_CHANGE = {
    "dataset",
    "model",
    "cifar",
    "paper_model",
    "paper_train",
    "lrn",
    "coarse_labels",
    "shapes_train",
    "shapes_test",
    "shapes_seed",
    "data_dir",
    "cache_dir",
    "loader",
    "workers",
    "resize_workers",
    "download",
    "device",
    "amp",
    "channels_last",
    "compile",
    "split_gpus",
    "code_version",
}
#: The settings that do not make another experiment (runs differing only in them compare).
NOT_THE_EXPERIMENT_FIELDS = {
    "seed",
    "run_name",
    "output_dir",
    "data_dir",
    "cache_dir",
    "device",
    "dry_run",
    "log",
    "message",
    "loader",
    "workers",
    "resize_workers",
    "download",
    "log_loss_step",
    "log_confusion_epoch",
    "deterministic",
    "version",
    "code_version",
    "eval_batch_size",
    "amp",
    "channels_last",
    "compile",
}


# Fields the config records that 0.1's did not: --download, the preparing processes and the code.
RECORDED_NOW = {"download", "resize_workers", "code_version"}


def test_what_may_change_is_read_from_the_fields():
    assert config_module.RESUME_MAY_CHANGE == RESUME_MAY_CHANGE
    assert config_module.EVALUATE_MAY_CHANGE == EVALUATE_MAY_CHANGE
    assert NOT_THE_EXPERIMENT == NOT_THE_EXPERIMENT_FIELDS


HERE = Capabilities.of(CPU)  # what this machine defaults to

# What the 0.1 code resolved with no flags on the CPU (``amp`` and ``channels_last`` follow the
# CPU's bf16 support): the config it wrote, field by field, but for ``version``, which names the
# package that resolved it (0.2.0 now).
OLD_DEFAULT = {
    "dataset": "Shapes",
    "model": "TorchAlexNet",
    "cifar": False,
    "paper_model": False,
    "paper_train": False,
    "lrn": True,
    "setup": "modern",
    "optimizer": "adam",
    "paper_update": False,
    "lr": 1e-4,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "batch_size": 128,
    "eval_batch_size": 512,
    "lr_factor": 0.1,
    "plateau_patience": 5,
    "max_lr_drops": 3,
    "stop_after_last_drop": False,
    "warm_start": 1.0,
    "n_epoch": 200,
    "early_stop": 50,
    "log_loss_step": 100,
    "log_confusion_epoch": 10,
    "seed": 0,
    "deterministic": False,
    "device": "cpu",
    "amp": HERE.amp,
    "channels_last": HERE.channels_last,
    "compile": False,
    "split_gpus": False,
    "data_dir": "dataset",
    "output_dir": ".",
    "dry_run": False,
    "log": False,
    "message": "",
    "coarse_labels": False,
    "cache_dir": "",
    "loader": "auto",
    "workers": 2,
    "shapes_train": 8000,
    "shapes_test": 1600,
    "shapes_seed": 0,
    "run_name": "",
    "version": "0.2.0",
}
PAPER_SETUP = {
    "setup": "paper",
    "paper_train": True,
    "optimizer": "sgd",
    "paper_update": True,
    "lr": 0.01,
    "weight_decay": 5e-4,
    "n_epoch": 90,
    "early_stop": 0,
    "stop_after_last_drop": True,
}


@pytest.mark.parametrize(
    "flags, old_changes",
    [
        ([], {}),
        (["-pt"], PAPER_SETUP),
        (
            ["-pm", "-pt", "--optimizer", "adam", "--lr", "0.001", "-es", "7"],
            {
                **PAPER_SETUP,
                "model": "PaperAlexNet",
                "paper_model": True,
                "optimizer": "adam",
                "lr": 0.001,
                "early_stop": 7,
            },
        ),
        (
            [
                "--batch-size",
                "64",
                "--weight-decay",
                "0.01",
                "-ne",
                "3",
                "--momentum",
                "0.5",
                "--plateau-patience",
                "2",
                "--lr-factor",
                "0.5",
                "--max-lr-drops",
                "0",
                "--warm-start",
                "10",
            ],
            {
                "batch_size": 64,
                "weight_decay": 0.01,
                "n_epoch": 3,
                "momentum": 0.5,
                "plateau_patience": 2,
                "lr_factor": 0.5,
                "max_lr_drops": 0,
                "warm_start": 10.0,
            },
        ),
        (
            [
                "-c",
                "-ds",
                "Cifar100",
                "--coarse-labels",
                "--data-dir",
                "d",
                "--cache-dir",
                "c",
                "--output-dir",
                "o",
                "--run-name",
                "r",
                "--seed",
                "5",
                "-d",
                "-l",
                "-m",
                "note",
                "--loader",
                "stream",
                "--workers",
                "0",
                "--deterministic",
                "--compile",
                "-lls",
                "7",
                "-lce",
                "3",
            ],
            {
                "model": "CifarAlexNet",
                "cifar": True,
                "dataset": "Cifar100",
                "coarse_labels": True,
                "data_dir": "d",
                "cache_dir": "c",
                "output_dir": "o",
                "run_name": "r",
                "seed": 5,
                "dry_run": True,
                "log": True,
                "message": "note",
                "loader": "stream",
                "workers": 0,
                "deterministic": True,
                "compile": True,
                "log_loss_step": 7,
                "log_confusion_epoch": 3,
            },
        ),
        (
            [
                "-pm",
                "--no-lrn",
                "--split-gpus",
                "--amp",
                "fp16",
                "--no-channels-last",
                "--shapes-train",
                "10",
                "--shapes-test",
                "5",
                "--shapes-seed",
                "3",
            ],
            {
                "model": "PaperAlexNet",
                "paper_model": True,
                "lrn": False,
                "split_gpus": True,
                "amp": "fp16",
                "channels_last": False,
                "shapes_train": 10,
                "shapes_test": 5,
                "shapes_seed": 3,
            },
        ),
    ],
)
def test_setups_and_flags_resolve_as_before(flags, old_changes):
    config = config_module.config_from_args(main.get_args_parser().parse_args(flags), CPU)
    old = {**OLD_DEFAULT, **old_changes}
    # -c and -pm are no longer recorded, only the model's name.
    expected = {k: v for k, v in old.items() if k not in ("cifar", "paper_model")}
    # --fidelity, --lr-milestones, --weights and --freeze-features are recorded too; 0.2 trained what is
    # now "text", with no milestones, from a random initialisation. So are ImageFolder's size and split
    # and the training subset (data.core.DataOptions).
    recorded_since = RECORDED_NOW | {
        "fidelity",
        "lr_milestones",
        "weights",
        "freeze_features",
        "image_size",
        "val_fraction",
        "train_fraction",
        "train_size",
    }
    assert {k: v for k, v in asdict(config).items() if k not in recorded_since} == expected
    assert config.fidelity == "code" and config.lr_milestones == ""
    assert config.weights == "" and config.freeze_features is False
    assert (config.download, config.code_version) == (False, code_version())


def test_minus_c_minus_pm_is_one_name_and_the_setup_is_applied_once():
    config = config_module.config_from_args(main.get_args_parser().parse_args(["-c", "-pm", "-pt", "--download"]), CPU)
    assert config.model == "PaperCifarAlexNet" and config.download
    assert config_module.SETUPS["modern"] == {}  # the defaults are the modern setup
    assert config_module.resolve("paper", {"lr": 0.5}).lr == 0.5


# The config the 0.1 code wrote for ``-c -pm -ds Cifar100 --coarse-labels --data-dir data --cache-dir cache``.
OLD_PAPER_CIFAR = {
    **OLD_DEFAULT,
    "model": "CifarAlexNet",
    "cifar": True,
    "paper_model": True,
    "dataset": "Cifar100",
    "coarse_labels": True,
    "data_dir": "data",
    "cache_dir": "cache",
    "amp": "off",
    "channels_last": False,
    "run_name": "2024-01-01_00-00-00_Cifar100_CifarAlexNet_modern",
}


@pytest.mark.parametrize(
    "changes, model",
    [
        ({}, "PaperCifarAlexNet"),
        ({"paper_model": False}, "CifarAlexNet"),
        ({"model": "PaperAlexNet", "cifar": False, "dataset": "Shapes", "coarse_labels": False}, "PaperAlexNet"),
        ({"model": "TorchAlexNet", "cifar": False, "paper_model": False}, "TorchAlexNet"),
    ],
)
def test_a_flat_0_1_config_loads_with_its_model_name_and_data_options(changes, model):
    config = TrainConfig.from_dict({**OLD_PAPER_CIFAR, **changes})
    assert config.model == model
    assert isinstance(config, DataOptions)
    assert (config.data_dir, config.cache_dir, config.data_path.name, config.cache_path.name) == (
        "data",
        "cache",
        "data",
        "cache",
    )
    assert config.coarse_labels == (changes.get("dataset", "Cifar100") == "Cifar100")
    assert (config.download, config.code_version) == (False, "")
    assert "cifar" not in asdict(config) and "paper_model" not in asdict(config)


def test_the_old_model_flags_of_a_config_are_still_checked():
    with pytest.raises(ValueError, match=r"^its config's paper_model must be a bool, not a str$"):
        TrainConfig.from_dict({**OLD_PAPER_CIFAR, "paper_model": "yes"})


def from_checkpoint(old: dict, flags: list[str], mode: str) -> TrainConfig:
    args = main.get_args_parser().parse_args([mode, "last.pt", *flags])
    may_change = config_module.RESUME_MAY_CHANGE if mode == "--resume" else config_module.EVALUATE_MAY_CHANGE
    return config_module.config_from_checkpoint(
        {"config": old},
        args.resume or args.evaluate,
        args,
        config_module.explicit_flags(main.get_args_parser(), [mode, "last.pt", *flags]),
        CPU,
        may_change,
    )


def test_evaluate_may_change_the_model_through_its_flags():
    cifar = {**OLD_PAPER_CIFAR, "paper_model": False}
    assert from_checkpoint(cifar, ["-pm"], "--evaluate").model == "PaperCifarAlexNet"
    assert from_checkpoint(OLD_DEFAULT, ["-c"], "--evaluate").model == "CifarAlexNet"
    assert from_checkpoint(OLD_DEFAULT, ["-c", "-pm"], "--evaluate").model == "PaperCifarAlexNet"
    assert from_checkpoint(OLD_PAPER_CIFAR, ["-c"], "--evaluate").model == "PaperCifarAlexNet"


def test_resume_refuses_model_flags_by_their_names():
    with pytest.raises(
        UserError,
        match=r"fixes these settings, which the command line changes: paper_model \(True; "
        r"the checkpoint has False\); drop those flags\.",
    ):
        from_checkpoint({**OLD_PAPER_CIFAR, "paper_model": False}, ["-pm"], "--resume")
    resumed = from_checkpoint(OLD_PAPER_CIFAR, ["-c", "-pm", "-ne", "300"], "--resume")
    assert (resumed.model, resumed.n_epoch, resumed.setup) == ("PaperCifarAlexNet", 300, "modern")


def test_a_continued_run_takes_where_and_how_it_runs_from_this_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder without "data" (the checkout has the data/ package)
    old = {
        **OLD_PAPER_CIFAR,
        "device": "cuda:1",
        "amp": "bf16",
        "channels_last": True,
        "output_dir": "/elsewhere",
        "cache_dir": "/their/cache",
        "download": True,
        "decode_device": "cuda:1",
        "code_version": "abc",
    }
    resumed = from_checkpoint(old, [], "--resume")
    assert (resumed.device, resumed.amp, resumed.channels_last) == ("cpu", HERE.amp, HERE.channels_last)
    assert "decode_device" not in asdict(resumed)  # recorded until the cache was built on the CPU alone
    assert (resumed.output_dir, resumed.cache_dir, resumed.download) == (".", "", False)
    assert resumed.code_version == code_version()
    assert resumed.data_dir == "dataset"  # "data" does not exist here
    assert from_checkpoint(old, ["--download", "--cache-dir", "c"], "--evaluate").download


def test_a_checkpoint_names_the_paper_cifar_network_and_loads_into_it():
    model = make_model("PaperCifarAlexNet", 10)
    checkpoint = {"config": {"model": "PaperCifarAlexNet"}, "classes": list("abcdefghij"), "model": model.state_dict()}
    check_compatible(checkpoint, "best.pt", make_model("PaperCifarAlexNet", 10), 10, "Shapes")
    with pytest.raises(UserError, match="holds a PaperCifarAlexNet, but this command builds a PaperAlexNet"):
        check_compatible(checkpoint, "best.pt", make_model("PaperAlexNet", 10), 10, "Shapes")


def test_code_version_is_the_commit_in_a_git_checkout(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("no git here")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "main.py").write_text("print(1)\n")
    subprocess.run([*git, "add", "main.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(config_module, "CODE_ROOT", tmp_path)
    assert code_version() == head
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert code_version() == head
    (tmp_path / "main.py").write_text("print(2)\n")
    assert code_version() == head + "-dirty"


def test_code_version_is_the_package_version_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "CODE_ROOT", tmp_path)
    assert code_version() == __version__
    (tmp_path / ".git").mkdir()  # a broken checkout: git fails
    assert code_version() == __version__

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(config_module.subprocess, "run", no_git)
    assert code_version() == __version__


def test_this_checkout_records_its_commit():
    if not (config_module.CODE_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|" + re.escape(__version__), code_version())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--coarse-labels"], "--coarse-labels only applies to -ds Cifar100"),
        (["-ds", "Cifar10", "--coarse-labels"], "--coarse-labels only applies to -ds Cifar100"),
        (["--no-lrn"], "--no-lrn only applies to the paper's features; add -pm"),
        (["-c", "--no-lrn"], "--no-lrn only applies to the paper's features; add -pm"),
        (
            ["-c", "-ds", "PascalVOC2012"],
            "-c (CifarAlexNet, 32x32 inputs) cannot train on PascalVOC2012's 256x256 images; drop -c",
        ),
        (["--split-gpus"], "--split-gpus splits the paper's network: add -pm (and drop -c)"),
        (["-c", "--split-gpus", "-d"], "--split-gpus splits the paper's network: add -pm (and drop -c)"),
        (["-c", "-pm", "--split-gpus"], "--split-gpus splits the paper's network: add -pm (and drop -c)"),
        (["--rewind"], "--rewind only applies to --resume"),
    ],
)
def test_flags_that_do_not_go_together_exit_2_with_the_old_sentences(capsys, own_signals, flags, message):
    with pytest.raises(SystemExit) as stopped:
        main.main(flags)
    assert stopped.value.code == 2
    assert f"main.py: error: {message}\n" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["-pm", "--no-lrn"],
        ["-c", "-pm", "--no-lrn"],
        ["-ds", "Cifar100", "--coarse-labels"],
        ["-pm", "--split-gpus"],
        ["-ds", "Cifar10", "--shapes-train", "5"],  # a value other data sets leave unused, as before
        ["-ds", "PascalVOC2012", "--download", "--cache-dir", "c"],
        ["-ds", "Shapes", "--download"],
    ],
)
def test_flags_that_go_together_pass_the_checks(flags):
    parser = main.get_args_parser()
    assert config_module.combination_problem(parser, parser.parse_args(flags)) is None
