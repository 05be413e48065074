"""Property tests: random and mutated bytes through the CIFAR, VOC and ImageNet readers and the
checkpoint loader, crafted pickle programs and array fields through the restricted unpickler, and random
text through the VOC image-id rule. Every outcome must be a correct load or the tool's own
one-sentence error; any other exception, a hang (the deadline) or a crash fails the test.
Bounded so the suite stays fast."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from fakedata import Ops, python2_pickle, voc_xml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data.cifar import read_cifar_batch
from data.core import DataError
from data.imagenet import read_val_solution
from data.images import decode_resized
from data.pickles import PLAIN_DTYPES, safe_unpickle
from data.voc import parse_voc_xml, read_image_list
from training.checkpoint import CheckpointError, load_checkpoint
from utils import safe_child

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


def file_fuzz_tests(name: str, original: bytes, suffix: str, check) -> tuple:
    """``test_<name>_mutated`` and ``test_<name>_random``: FUZZ's budget of mutations of
    ``original`` and of random bytes, each written to a file ending in ``suffix`` and handed to
    ``check``."""
    tests = []
    for kind, strategy in (("mutated", mutated(original)), ("random", st.binary(max_size=512))):

        def test(data):
            with_file(data, suffix, check)

        test.__name__ = test.__qualname__ = f"test_{name}_{kind}"  # hypothesis seeds each by its name
        tests.append(FUZZ(given(strategy)(test)))
    return tuple(tests)


BATCH = python2_pickle(
    {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [3, 1, 4],
        b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072),
        b"filenames": [b"a.png", b"b.png", b"c.png"],
    }
)


def check_batch(path: Path) -> None:
    try:
        split = read_cifar_batch(path, b"labels", 10)
    except DataError:
        return
    assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
    assert split.labels.shape == (split.images.shape[0],)
    assert all(0 <= label < 10 for label in split.labels.tolist())


test_cifar_batches_mutated, test_cifar_batches_random = file_fuzz_tests("cifar_batches", BATCH, "", check_batch)


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


test_voc_xml_mutated, test_voc_xml_random = file_fuzz_tests("voc_xml", XML, ".xml", check_xml)


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


SOLUTION = (
    "ImageId,PredictionString\r\n"
    "ILSVRC2012_val_00000001,n01751748 0 0 249 203 \r\n"
    "ILSVRC2012_val_00000002,n09193705 10 20 300 400 n09193705 5 5 9 9 \r\n"
    "ILSVRC2012_val_00000003,n02105855 1 2 3 4 \r\n"
    '"ILSVRC2012_val_00000004","n04263257 0 0 7 7"\r\n'
).encode("utf-8-sig")
VAL_IMAGES = {f"ILSVRC2012_val_{i:08d}" for i in range(1, 6)}
SOLUTION_SENTENCE = re.compile(
    r".*LOC_val_solution\.csv (has no ImageId,PredictionString rows; replace it with Kaggle's original"
    r"|labels .* twice, .* on line \d+ and .* on line \d+; keep the right line and remove the other"
    r"|line \d+ is longer than [\d,]+ characters, which no line of the real file is; replace it with the original)\."
    r"|cannot read .*LOC_val_solution\.csv \(.*\); replace it with (Kaggle's )?(the )?original\.",
    re.DOTALL,
)


def check_solution(path: Path) -> None:
    """Kaggle's label file: labels for the images asked for, words of the file, or one sentence."""
    csv_path = path.with_name("LOC_val_solution.csv")
    path.rename(csv_path)
    try:
        labels = read_val_solution(csv_path, VAL_IMAGES)
    except DataError as error:
        assert SOLUTION_SENTENCE.fullmatch(str(error)), error
        return
    assert set(labels) <= VAL_IMAGES
    assert all(isinstance(wnid, str) and wnid and not wnid.isspace() for wnid in labels.values())


test_imagenet_solution_mutated, test_imagenet_solution_random = file_fuzz_tests(
    "imagenet_solution", SOLUTION, ".csv", check_solution
)


def small_checkpoint() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        torch.save(
            {
                "model": {"w": torch.arange(6.0)},
                "config": {"model": "X", "lr": 0.1},
                "epoch": 3,
                "classes": ["a", "b"],
                "rng": {"torch": torch.get_rng_state()},
            },
            path,
        )
        return path.read_bytes()


def check_checkpoint(path: Path) -> None:
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError:
        return
    assert isinstance(checkpoint, dict) and isinstance(checkpoint["config"], dict)


test_checkpoint_mutated, test_checkpoint_random = file_fuzz_tests(
    "checkpoint", small_checkpoint(), ".pt", check_checkpoint
)


# ---------------------------------------------------------------------------------------------
# Crafted pickles: numpy's array fields, and whole programs of the allowed calls

SOME = settings(max_examples=200, deadline=3000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def budget(data: bytes) -> int:
    return 4 * len(data) + (1 << 20)


def arrays_in(obj: object) -> list[np.ndarray]:
    """Every array reachable from ``obj``; fails on anything the unpickler should not hand out."""
    found, stack, seen = [], [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            found.append(item)
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack += list(item)
        else:
            assert isinstance(item, (bytes, str, int, float, bool, type(None), np.dtype)), type(item)
    return found


def check_loaded(data: bytes) -> object:
    """Load ``data``: a DataError, or plain objects whose arrays are views of the file's own
    bytes (plain dtypes, no more bytes than the budget)."""

    def check(path: Path) -> None:
        try:
            obj = safe_unpickle(path)
        except DataError as error:
            assert re.match(
                rf"{re.escape(str(path))} (was not loaded: it |asks to call |is truncated or not a CIFAR "
                r"pickle)",
                str(error),
            ), error
            return
        arrays = arrays_in(obj)
        assert sum(a.nbytes for a in arrays) <= budget(data)
        for array in arrays:
            assert array.dtype.str[1:] in PLAIN_DTYPES and not array.flags.writeable
            assert isinstance(array.base if array.base is not None else b"", (bytes, np.ndarray))

    with_file(data, "", check)


CODES = [*sorted(PLAIN_DTYPES), "O", "V8", "U3", "S5", "M8", "c16", "f16", "u1x", ""]


@SOME
@given(
    shape=st.lists(st.integers(0, 300), max_size=4).map(tuple)
    | st.lists(st.integers(-3, 2**31 - 1), max_size=3).map(tuple),
    code=st.sampled_from(CODES),
    order=st.sampled_from(["|", "<", ">", "=", "!", ""]),
    fortran=st.sampled_from([0, 1, 2]),
    version=st.sampled_from([0, 1, 2]),
    exact=st.booleans(),
    off=st.integers(-3, 3),
)
def test_cifar_array_fields(shape, code, order, fortran, version, exact, off):
    itemsize = np.dtype(code).itemsize if code in PLAIN_DTYPES else 1
    wanted = math.prod(shape) * itemsize
    size = wanted if exact and 0 <= wanted <= 200_000 else min(max(0, wanted + off), 200_000)
    ops = Ops().reconstruct().mark().int(version).shape(shape).dtype(code or "u1", order).int(fortran)
    data = ops.bytes(bytes(range(256)) * (size // 256) + bytes(size % 256)).tuple().build().done()
    check_loaded(data)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "a").write_bytes(data)
            array = safe_unpickle(Path(tmp) / "a")
    except DataError:
        return
    assert array.shape == shape and array.nbytes == size and version == 1 and fortran in (0, 1)


STEPS = st.sampled_from(
    [
        lambda o: o.reconstruct(),
        lambda o: o.dtype(),
        lambda o: o.dtype("i8", "<"),
        lambda o: o.dtype("u1", "|", False),
        lambda o: o.bytes(b"\x01" * 3072),
        lambda o: o.bytes(b"b"),
        lambda o: o.text("latin1"),
        lambda o: o.text("hex"),
        lambda o: o.text("\xff" * 100),
        lambda o: o.int(0),
        lambda o: o.int(1),
        lambda o: o.int(3),
        lambda o: o.int(3072),
        lambda o: o.mark(),
        lambda o: o.tuple(),
        lambda o: o.tuple1(),
        lambda o: o.tuple2(),
        lambda o: o.tuple3(),
        lambda o: o.reduce(),
        lambda o: o.build(),
        lambda o: o.dict(),
        lambda o: o.list(),
        lambda o: o.setitems(),
        lambda o: o.appends(),
        lambda o: o.put(0),
        lambda o: o.put(1),
        lambda o: o.get(0),
        lambda o: o.get(1),
        lambda o: o.false(),
        lambda o: o.none(),
        lambda o: o.glob("numpy", "ndarray"),
        lambda o: o.glob("_codecs", "encode"),
        lambda o: o.glob("numpy", "dtype"),
        lambda o: o.glob("numpy.core.multiarray", "_reconstruct"),
        lambda o: o.array((1, 3072), lambda o: o.bytes(b"\x02" * 3072)),
        lambda o: o.array((1, 3072), lambda o: o.get(0)),
    ]
)


@SOME
@given(st.lists(STEPS, min_size=1, max_size=40))
def test_cifar_pickle_programs(steps):
    """Random programs of the calls the unpickler allows (and of what can go wrong with them):
    memo reuse, calls with wrong arguments, states on the wrong objects, arrays never built."""
    ops = Ops()
    for step in steps:
        step(ops)
    check_loaded(ops.done())


# ---------------------------------------------------------------------------------------------
# VOC image ids: whatever a list says, an id names a file inside the folder or is refused

ID_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(["/", "\\", ".", "-", "\x00", "\r", "\n", "\ufeff", " ", "~", "\u2028"]),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=30,
)
ID_SENTENCE = re.compile(
    r".*train\.txt (line \d+: the image id .*, so it cannot name a file in the VOC folder; fix the line or remove it"
    r"|is empty; replace it with the original from the VOC release)\.",
    re.DOTALL,
)


@SOME
@given(
    st.lists(
        ID_TEXT | st.sampled_from(["../../etc/passwd", "/etc/passwd", "..", ".", "x" * 210]), min_size=1, max_size=4
    )
)
def test_voc_ids_name_files_inside_the_folder(lines):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "VOC2012"
        (folder / "ImageSets" / "Main").mkdir(parents=True)
        path = folder / "ImageSets" / "Main" / "train.txt"
        path.write_bytes("\n".join(lines).encode("utf-8"))
        try:
            ids = read_image_list(path)
        except DataError as error:
            assert ID_SENTENCE.fullmatch(str(error)), error
            return
        for image_id in ids:
            for sub, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
                child = safe_child(folder / sub, f"{image_id}{suffix}")
                assert child.resolve().parent == (folder / sub).resolve() and child.name == f"{image_id}{suffix}"
