"""Real data sets through the command line: CIFAR-10, the shared CIFAR-100 and VOC samples, VOC in
memory and streamed (the data errors are rows of the bad-input table in bad_data.py, run by
test_bad_data.py)."""

import json
from pathlib import Path

import pytest
from fakedata import small_voc, write_cifar10


def summary(cwd: Path, dataset: str) -> dict:
    (path,) = (cwd / "runs" / dataset).glob("*/summary.json")
    return json.loads(path.read_text())


def test_cifar10_in_the_official_layout_trains(tmp_path, run_main):
    write_cifar10(tmp_path / "somewhere" / "cifar-10-batches-py", per_batch=20, n_test=20)
    result = run_main("-c", "-ds", "Cifar10", "--data-dir", "somewhere", "-ne", "1", "--batch-size", "25", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    s = summary(tmp_path, "Cifar10")
    assert (s["train_size"], s["test_size"], s["model"]) == (100, 20, "CifarAlexNet")
    assert "random crop (pad 4) + mirror, channel-normalised" in result.stderr


def test_cifar100_shared_sample_trains(shared_data, tmp_path, run_main):
    result = run_main("-c", "-ds", "Cifar100", "--data-dir", str(shared_data), "-ne", "1", "-d", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "CifarAlexNet on Cifar100 (486 train / 916 test images, 100 classes)" in result.stderr


def test_paper_setup_on_the_shared_voc_sample_reports_map(shared_data, tmp_path, run_main):
    result = run_main(
        "-pm",
        "-pt",
        "-ds",
        "PascalVOC2012",
        "--data-dir",
        str(shared_data),
        "-ne",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "10-crop test" in result.stderr and " mAP " in result.stderr
    s = summary(tmp_path, "PascalVOC2012")
    assert 0 <= s["best_mAP"] <= 100
    # Classes present in the 4 evaluation images get an AP; the others have none (null).
    present = {c for c, ap in s["best_ap_per_class"].items() if ap is not None}
    assert present == {"aeroplane", "person", "train", "tvmonitor"}


def voc(tmp_path: Path) -> Path:
    return small_voc(tmp_path / "data", ["dog", "cat", "person", "car", "bus", "dog"], year=2009, train=4)


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_modern_setup_on_voc_in_memory_and_streamed(tmp_path, loader, run_main):
    voc(tmp_path)
    result = run_main(
        "-ds",
        "PascalVOC2012",
        "--data-dir",
        "data",
        "-ne",
        "1",
        "-d",
        "--batch-size",
        "2",
        "--loader",
        loader,
        "--workers",
        "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "random-resized crop 224" in result.stderr and "TorchAlexNet on PascalVOC2012" in result.stderr
    assert ("streaming them with a DataLoader of 2 workers" in result.stderr) == (loader == "stream")


def test_cifar_alexnet_on_voc_is_refused(tmp_path, run_main):
    result = run_main("-c", "-ds", "PascalVOC2012", cwd=tmp_path)
    assert result.returncode == 2
    assert "-c (CifarAlexNet, 32x32 inputs) cannot train on PascalVOC2012's 256x256 images; drop -c" in result.stderr
