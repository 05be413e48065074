"""``--weights`` and ``--freeze-features`` (``training.weights``): torchvision's AlexNet file
into TorchAlexNet, fc8 re-initialised for another class count, frozen features, and the files
that do not fit, each one sentence.

torchvision's real file cannot be downloaded here: the tests save a seeded
``torchvision.models.alexnet(weights=None)`` under a name carrying its hash, as torchvision's
``alexnet-owt-7be5be79.pth`` does. The 224 models hold 61M parameters, so each is built once.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from fakedata import write_cifar10
from main_cli import copy_run, only
from torch import nn

import main
from network import CifarAlexNet, TorchAlexNet
from training.weights import WeightsError, hash_problem, load_initial_weights

FC8 = ("classifier.6.weight", "classifier.6.bias")


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A seeded torchvision AlexNet (eval mode) and its state dict saved as
    ``alexnet-<first 8 hex of sha256>.pth``."""
    torch.manual_seed(7)
    reference = torchvision.models.alexnet(weights=None).eval()
    folder = tmp_path_factory.mktemp("torchvision")
    plain = folder / "alexnet.pth"
    torch.save(reference.state_dict(), plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    return plain.rename(folder / f"alexnet-owt-{digest[:8]}.pth"), reference


@pytest.fixture(scope="module")
def imagenet_model() -> TorchAlexNet:
    torch.manual_seed(1)
    return TorchAlexNet(num_classes=1000).eval()


def test_torchvision_state_dict_gives_torchvisions_outputs(torchvision_file, imagenet_model, caplog):
    path, reference = torchvision_file
    with caplog.at_level(logging.INFO, logger="training.weights"):
        loaded = load_initial_weights(path, imagenet_model, "TorchAlexNet", [f"c{i}" for i in range(1000)])
    assert loaded.reinitialised == () and loaded.source == "torchvision"
    assert "re-initialised" not in caplog.text
    batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = imagenet_model(batch), reference(batch)
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_another_class_count_reinitialises_fc8_only(torchvision_file, caplog):
    path, reference = torchvision_file
    torch.manual_seed(2)
    model = TorchAlexNet(num_classes=10)
    own_fc8 = {key: model.state_dict()[key].clone() for key in FC8}
    with caplog.at_level(logging.INFO, logger="training.weights"):
        loaded = load_initial_weights(path, model, "TorchAlexNet", [f"c{i}" for i in range(10)])
    assert loaded.reinitialised == FC8
    assert "fc8 (classifier.6) re-initialised: the weights were trained on 1000 classes, this run has 10" in caplog.text
    state, file_state = model.state_dict(), reference.state_dict()
    assert state.keys() == file_state.keys()
    for key, tensor in state.items():
        expected = own_fc8[key] if key in FC8 else file_state[key]
        assert torch.equal(tensor, expected), key


def test_hash_rule_is_torchvisions_sha256_prefix(tmp_path):
    content = b"not really weights"
    digest = hashlib.sha256(content).hexdigest()
    good, bad, plain = tmp_path / f"x-{digest[:10]}.pth", tmp_path / "x-0123abcd.pth", tmp_path / "best.pt"
    for path in (good, bad, plain):
        path.write_bytes(content)
    assert hash_problem(good) is None and hash_problem(plain) is None
    assert hash_problem(bad) == f"its sha256 starts with {digest[:8]}, not with the 0123abcd its name says"


def test_files_that_do_not_fit_are_one_sentence_each(torchvision_file, imagenet_model, tmp_path):
    path, _ = torchvision_file
    foreign = tmp_path / "resnet.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).state_dict(), foreign)
    with pytest.raises(WeightsError, match=r"does not fit TorchAlexNet: it has no tensor 'features\.0\.weight'; pass"):
        load_initial_weights(foreign, imagenet_model, "TorchAlexNet", ["a", "b"])
    cifar = CifarAlexNet(10)
    with pytest.raises(WeightsError, match="holds torchvision's AlexNet, which only TorchAlexNet takes; drop -c"):
        load_initial_weights(path, cifar, "CifarAlexNet", ["a", "b"])
    # CifarAlexNet has torchvision's names in other shapes: its own state dict is not taken for torchvision's.
    broken = cifar.state_dict()
    broken["features.3.weight"][0, 0, 0, 0] = float("nan")
    torch.save(broken, tmp_path / "cifar.pth")
    with pytest.raises(WeightsError, match=r"does not fit CifarAlexNet: its 'features\.3\.weight' holds NaN or inf"):
        load_initial_weights(tmp_path / "cifar.pth", cifar, "CifarAlexNet", ["a", "b"])
    with pytest.raises(WeightsError, match="-pt feeds 0-255 pixels minus the mean image; drop -pt"):
        load_initial_weights(path, imagenet_model, "TorchAlexNet", ["a", "b"], paper_train=True)


def test_fc8_bias_must_fit_its_weight_and_a_folder_is_named(tmp_path):
    """fc8 may have another class count, but its weight and bias the same one: a state dict or a
    checkpoint whose fc8 weight has 10 rows and bias 7 entries is one sentence, not a traceback
    from ``load_state_dict``. A folder is named a folder."""
    from dataclasses import asdict

    from training.config import TrainConfig

    state = CifarAlexNet(10).state_dict()
    state["classifier.6.bias"] = state["classifier.6.bias"][:7].clone()
    classes = [f"c{i}" for i in range(10)]
    torch.save(state, tmp_path / "plain.pth")
    with pytest.raises(
        WeightsError,
        match=r"weights file .*plain.pth does not fit CifarAlexNet: its 'classifier\.6\."
        r"bias' is \(7,\), where its 'classifier\.6\.weight' has 10 rows; pass weights",
    ):
        load_initial_weights(tmp_path / "plain.pth", CifarAlexNet(10), "CifarAlexNet", classes)
    checkpoint = {"model": state, "config": asdict(TrainConfig(model="CifarAlexNet")), "epoch": 1, "classes": classes}
    torch.save(checkpoint, tmp_path / "best.pt")
    with pytest.raises(
        WeightsError,
        match=r"best.pt cannot be used as --weights: its model's 'classifier\.6\.bias' is "
        r"\(7,\), where a CifarAlexNet of 10 classes has \(10,\); it is damaged",
    ):
        load_initial_weights(tmp_path / "best.pt", CifarAlexNet(10), "CifarAlexNet", classes)
    with pytest.raises(
        WeightsError, match=r"weights file .* is a folder; pass the path of a file in it: torchvision's"
    ):
        load_initial_weights(tmp_path, CifarAlexNet(10), "CifarAlexNet", classes)


def error_line(capsys) -> str:
    """The one error line an in-process ``main.main`` wrote to stderr (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_hash_mismatch(torchvision_file, tmp_path, run_main):
    path, _ = torchvision_file
    renamed = tmp_path / "alexnet-owt-7be5be79.pth"  # torchvision's real name, which this file's hash is not
    renamed.write_bytes(path.read_bytes())
    result = run_main("-d", "--shapes-train", "20", "--shapes-test", "10", "--weights", str(renamed), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: weights file {renamed} is damaged or not the file its name says (its sha256")
    assert lines[-1].endswith("7be5be79 its name says); download it again.")
    assert "Traceback" not in result.stderr


def test_cli_wrong_network_and_non_alexnet(cifar_run, tmp_path, capsys, own_signals):
    checkpoint = only(cifar_run / "checkpoints" / "Shapes", "*/best.pt")
    tiny = ["-d", "--shapes-train", "20", "--shapes-test", "10", "--output-dir", str(tmp_path)]
    assert main.main([*tiny, "-c", "-pm", "--weights", str(checkpoint)]) == 1
    assert error_line(capsys) == (
        f"error: checkpoint {checkpoint} holds a CifarAlexNet, but this run builds a "
        "PaperCifarAlexNet; set -c / -pm as that run did, or pass a checkpoint of this "
        "network."
    )
    foreign = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    assert main.main([*tiny, "-c", "--weights", str(foreign)]) == 1
    assert error_line(capsys) == (
        f"error: weights file {foreign} does not fit CifarAlexNet: it has no tensor "
        "'features.0.weight'; pass weights of this network."
    )


def test_flags_that_do_not_go_with_weights(capsys, own_signals):
    for flags, message in (
        (["--weights", "w.pth", "--resume", "last.pt"], "--weights starts a new run"),
        (["--freeze-features"], "--freeze-features keeps the starting weights' features"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main.main(flags)
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err


def test_checkpoint_fine_tuned_on_another_data_set_with_frozen_features(cifar_run, tmp_path, own_signals, capsys):
    """A Shapes CifarAlexNet checkpoint starts a CIFAR-10 run whose convolutions stay as they were
    (SGD with momentum and weight decay, which would move anything the optimiser held); the
    classifier trains, fc8 is the new run's own; --resume continues without the weights file."""
    source = copy_run(cifar_run, tmp_path / "source")
    write_cifar10(tmp_path / "data" / "cifar-10-batches-py", per_batch=8, n_test=8)
    flags = [
        "-c",
        "-ds",
        "Cifar10",
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(tmp_path / "out"),
        "--run-name",
        "tuned",
        "--batch-size",
        "8",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--weight-decay",
        "0.01",
        "-ne",
        "1",
        "--seed",
        "3",
    ]
    assert main.main([*flags, "--weights", str(source), "--freeze-features"]) == 0
    log = capsys.readouterr().err  # main.main logs to stderr (utils.setup_logging)
    before = torch.load(source, weights_only=True)
    after_path = tmp_path / "out" / "checkpoints" / "Cifar10" / "tuned" / "last.pt"
    after = torch.load(after_path, weights_only=True)
    assert after["config"]["weights"] == str(source) and after["config"]["freeze_features"] is True
    assert after["epoch"] == 1 and after["global_step"] == 5  # a new run: its own counters
    features = [key for key in before["model"] if key.startswith("features.")]
    assert features and all(torch.equal(after["model"][k], before["model"][k]) for k in features)
    assert not torch.equal(after["model"]["classifier.1.weight"], before["model"]["classifier.1.weight"])
    # Shapes and CIFAR-10 both have 10 classes, but other ones: fc8 is the new run's own.
    assert "fc8 (classifier.6) re-initialised: the weights' 10 classes are not this run's" in log
    assert not torch.equal(after["model"]["classifier.6.weight"], before["model"]["classifier.6.weight"])
    trainable = sum(t.numel() for k, t in after["model"].items() if k.startswith("classifier."))
    total = sum(t.numel() for t in after["model"].values())
    assert f"features frozen: {trainable:,} of {total:,} parameters train" in log
    source.unlink()  # --resume continues from the run's own state, never from --weights
    assert main.main(["--resume", str(after_path), "-ne", "2"]) == 0
    assert torch.load(after_path, weights_only=True)["epoch"] == 2
