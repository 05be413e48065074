"""Property tests: random and mutated bytes through the CIFAR and VOC readers and the checkpoint
loader. Every outcome must be a correct load or the tool's own one-sentence error; any other
exception, a hang (the deadline) or a crash fails the test. Bounded so the suite stays fast."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from fakedata import python2_pickle, voc_xml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from datasets import DataError, decode_resized, parse_voc_xml, read_cifar_batch, safe_unpickle
from trainer import CheckpointError, load_checkpoint

FUZZ = settings(max_examples=300, deadline=3000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` with a few bit flips, overwrites, insertions, deletions or a truncation."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        else:
            del data[i:]
    return bytes(data)


def with_file(data: bytes, suffix: str, check) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_bytes(data)
        check(path)


BATCH = python2_pickle({
    b"batch_label": b"training batch 1 of 5",
    b"labels": [3, 1, 4],
    b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072),
    b"filenames": [b"a.png", b"b.png", b"c.png"],
})  # fmt: skip


def check_batch(path: Path) -> None:
    try:
        split = read_cifar_batch(path, b"labels", 10)
    except DataError:
        return
    assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
    assert split.labels.shape == (split.images.shape[0],)
    assert all(0 <= label < 10 for label in split.labels.tolist())


@FUZZ
@given(mutated(BATCH))
def test_cifar_batches_mutated(data):
    with_file(data, "", check_batch)


@FUZZ
@given(st.binary(max_size=512))
def test_cifar_batches_random(data):
    with_file(data, "", check_batch)


@FUZZ
@given(mutated(python2_pickle({b"label_names": [b"cat", b"dog"], b"num_vis": 3072})))
def test_cifar_meta_mutated(data):
    def check(path):
        try:
            safe_unpickle(path)
        except DataError:
            pass

    with_file(data, "", check)


XML = voc_xml("a.jpg", 500, 375, [("dog", False), ("person", True), ("person", False), ("car", True)]).encode()


def check_xml(path: Path) -> None:
    try:
        labels = parse_voc_xml(path)
    except DataError:
        return
    assert labels.shape == (20,) and set(np.unique(labels)) <= {-1, 0, 1}


@FUZZ
@given(mutated(XML))
def test_voc_xml_mutated(data):
    with_file(data, ".xml", check_xml)


@FUZZ
@given(st.binary(max_size=512))
def test_voc_xml_random(data):
    with_file(data, ".xml", check_xml)


def small_jpeg() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.jpg"
        yy, xx = np.mgrid[0:48, 0:64]
        Image.fromarray(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)).save(path, quality=85)
        return path.read_bytes()


def check_jpeg(path: Path) -> None:
    try:
        image = decode_resized(path, 64)
    except DataError:
        return
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8


@FUZZ
@given(mutated(small_jpeg()))
def test_voc_jpeg_mutated(data):
    with_file(data, ".jpg", check_jpeg)


def small_checkpoint() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        torch.save({"model": {"w": torch.arange(6.0)}, "config": {"model": "X", "lr": 0.1}, "epoch": 3,
                    "classes": ["a", "b"], "rng": {"torch": torch.get_rng_state()}}, path)  # fmt: skip
        return path.read_bytes()


def check_checkpoint(path: Path) -> None:
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError:
        return
    assert isinstance(checkpoint, dict) and isinstance(checkpoint["config"], dict)


@FUZZ
@given(mutated(small_checkpoint()))
def test_checkpoint_mutated(data):
    with_file(data, ".pt", check_checkpoint)


@FUZZ
@given(st.binary(max_size=512))
def test_checkpoint_random(data):
    with_file(data, ".pt", check_checkpoint)
