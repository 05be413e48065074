"""Trust nothing a data file says: archives, pickles, images, image lists, caches and meta files
crafted to delete, exhaust memory or read outside the data folder (issue 12, the data half).

The rows of the bad-input table (docs/troubleshooting.md) about such files are
``bad_data.UNTRUSTED``, run through the command line by test_bad_data.py; this file holds what they
cannot show in one line, with the same file builders. Where the right outcome is a run that
succeeds with a warning, a plain command-line test checks the files and the warning. The memory
bounds are measured in a fresh process (peak RSS before and after, under an address-space cap).
Signals while the data are read or cached are in test_signals.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_data import CIFAR_HERE, MB, cifar_archive, cifar_archive_with, voc
from fakedata import (
    Ops,
    codec_chain,
    memo_reuse_batch,
    png_claiming,
    python2_pickle,
    stateless_batch,
    voc_xml,
    write_cifar100,
    zero_stride_batch,
)
from main_cli import ROOT, VOC_DRY_RUN, snapshot, unchanged
from PIL import Image

from data.archives import is_writable_dir
from data.core import DataError, DataOptions
from data.images import decode_resized, to_rgb
from data.pickles import safe_unpickle
from data.registry import load_dataset
from data.voc import VOC_CLASSES, parse_voc_xml, read_image_list

# ---------------------------------------------------------------------------------------------
# 1. Archives


def test_archive_entries_beside_its_folder_are_left_out_and_nothing_is_replaced(tmp_path, earlier, run_main):
    """The probe's case: ``cifar-10-python.tar.gz`` with extra ``checkpoints/`` and
    ``cifar-100-python/`` entries, unpacked with ``--data-dir .`` in a folder holding an earlier
    run and the user's own CIFAR-100: the run goes on, with a warning, and only
    ``cifar-10-batches-py/`` is new."""
    work = tmp_path / "work"
    shutil.copytree(earlier, work, copy_function=os.link)  # hard links: a rewrite shows as a new inode
    write_cifar100(work / "cifar-100-python")
    cifar_archive(
        work / "cifar-10-python.tar.gz",
        {
            "checkpoints/Shapes/evil/last.pt": "not a checkpoint",
            "cifar-100-python/train": "not CIFAR-100",
            "runs": "a file where the runs folder is",
        },
    )
    before = snapshot(work)
    names = {p.name for p in work.iterdir()}
    result = run_main(*CIFAR_HERE, cwd=work)
    assert result.returncode == 0, result.stderr
    assert (
        "cifar-10-python.tar.gz: left out 3 entries outside cifar-10-batches-py/ (an archive of CIFAR-10 may "
        "create only that folder)" in result.stderr
    )
    assert unchanged(work, before)
    assert {p.name for p in work.iterdir()} == names | {"cifar-10-batches-py"}
    assert not (work / "checkpoints" / "Shapes" / "evil").exists()
    assert "CifarAlexNet on Cifar10 (15 train / 4 test images, 10 classes)" in result.stderr


def test_extraction_leaves_no_trace_when_the_archive_is_refused(tmp_path):
    cifar_archive(tmp_path / "cifar-10-python.tar.gz", {"elsewhere/x": "x"}, own=False)
    with pytest.raises(DataError, match=r"holds no CIFAR-10 in a cifar-10-batches-py/ folder"):
        load_dataset("Cifar10", DataOptions(data_dir=tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("filtered", [True, False], ids=["data filter", "without it"])
@pytest.mark.parametrize(
    "entries, named, reason",
    [
        ([("cifar-10-batches-py/../x", b"escaped")], "cifar-10-batches-py/../x", "leads out of cifar-10-batches-py/"),
        ([("../x", b"escaped")], "../x", "leads out of the folder it is unpacked into"),
        ([("/cifar-10-batches-py/x", b"x")], "/cifar-10-batches-py/x", "has an absolute name"),
        (
            [("cifar-10-batches-py/up", b"", "../..")],
            "cifar-10-batches-py/up",
            "is a link to '../..', out of cifar-10-batches-py/",
        ),
        ([("cifar-10-batches-py/abs", b"", "/etc")], "cifar-10-batches-py/abs", "is a link to the absolute path /etc"),
        (
            [("cifar-10-batches-py/h", b"", "x", tarfile.LNKTYPE), ("x", b"beside")],
            "cifar-10-batches-py/h",
            "is a link to 'x', out of cifar-10-batches-py/",
        ),
        (
            [("cifar-10-batches-py/f", b"", None, tarfile.FIFOTYPE)],
            "cifar-10-batches-py/f",
            "is a device file or a FIFO",
        ),
        ([("runs", b"", "/etc")], "runs", "is a link to the absolute path /etc"),
    ],
)
def test_an_archive_entry_that_leads_out_refuses_the_archive(tmp_path, monkeypatch, entries, named, reason, filtered):
    """PEP 706's ``data`` filter's rules, with the data set's folder as the destination, on every
    Python (the filter came with 3.11.4 and 3.12): the entry is named and nothing is left."""
    if not filtered:
        monkeypatch.delattr(tarfile, "data_filter")
    cifar_archive_with(tmp_path, entries)
    message = f"its entry {named!r} {reason} (no official archive of CIFAR-10 holds such an entry"
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset("Cifar10", DataOptions(data_dir=tmp_path / "data"))
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cifar-10-python.tar.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_links_inside_the_folder_are_unpacked(tmp_path):
    cifar_archive_with(tmp_path, [("cifar-10-batches-py/same", b"", "data_batch_1")])
    assert len(load_dataset("Cifar10", DataOptions(data_dir=tmp_path / "data")).train) == 15
    assert (tmp_path / "data" / "cifar-10-batches-py" / "same").resolve().name == "data_batch_1"


def test_an_existing_folder_that_holds_the_data_is_used_not_replaced(tmp_path, monkeypatch):
    """Read-only data folder: the archive goes to the cache folder, once; a second start finds
    what the first unpacked there and leaves it alone."""
    data = tmp_path / "data"
    data.mkdir()
    cifar_archive(data / "cifar-10-python.tar.gz")
    real = is_writable_dir
    monkeypatch.setattr("data.archives.is_writable_dir", lambda p: False if p == data else real(p))
    options = DataOptions(data_dir=data, cache_dir=tmp_path / "cache")
    load_dataset("Cifar10", options)
    unpacked = tmp_path / "cache" / "cifar-10-batches-py" / "data_batch_1"
    stamp = unpacked.stat().st_mtime_ns
    assert len(load_dataset("Cifar10", options).train) == 15
    assert unpacked.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cifar-10-batches-py"]


# ---------------------------------------------------------------------------------------------
# 2. Memory bounded by the file's size


PROBE = """
import json, resource, sys
sys.path.insert(0, {root!r})
import numpy as np, torch, torchvision.io, torchvision.transforms.v2, PIL.Image
import data.cifar, data.core, data.images
from pathlib import Path

def vm_size():
    return int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# A cap on the address space as well, so that a reader that does not bound its memory fails
# here instead of taking gigabytes from the machine.
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (1 << 30), resource.RLIM_INFINITY))
reports = []
for path, call in {calls!r}:
    path = Path(path)
    try:
        value = eval(call)
        outcome = "loaded " + str(tuple(getattr(value, "shape", ())))
    except data.core.DataError as error:
        outcome = "DataError: " + str(error)
    except MemoryError:
        outcome = "MemoryError"
    # The peak only grows: each call's figure bounds its own growth and every earlier one's.
    reports.append((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, outcome))
print(json.dumps(reports))
"""


def peak_growth(calls: list[tuple[Path, str]]) -> list[tuple[int, str]]:
    """Run each ``call`` (an expression over ``path`` and the ``data`` package) in turn in one fresh
    Python, and return after each how much the process's peak resident memory has grown since
    the start, and what happened. One process for all: starting Python with torch costs seconds."""
    script = PROBE.format(root=str(ROOT), calls=[(str(path), call) for path, call in calls])
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(r) for r in json.loads(result.stdout.strip().splitlines()[-1])]


CRAFTED = {
    "zero stride": (lambda: zero_stride_batch(100_000), "calls numpy.ndarray directly"),
    "no state": (lambda: stateless_batch(100_000), "calls numpy's _reconstruct with arguments numpy never writes"),
    "codec chain": (lambda: codec_chain(22), "calls _codecs.encode other than as encode(text, 'latin1') for bytes"),
    "memo reuse": (lambda: memo_reuse_batch(2000), "needs more than"),
}


def test_crafted_pickles_are_refused_within_a_bounded_memory(tmp_path):
    """Each file is a few hundred bytes to 300 KB and asks for 300 MB to 1 GB: refused, with the
    peak memory of the process growing by less than 32 MB."""
    calls = []
    for name, (data, _) in CRAFTED.items():
        path = tmp_path / name.replace(" ", "_") / "data_batch_1"
        path.parent.mkdir()
        path.write_bytes(data())
        calls.append((path, "data.cifar.read_cifar_batch(path, b'labels', 10)"))
    for (name, (_, phrase)), (path, _), (grew, outcome) in zip(
        CRAFTED.items(), calls, peak_growth(calls), strict=False
    ):
        assert outcome.startswith(f"DataError: {path} was not loaded: it {phrase}"), outcome
        assert grew < 32 * MB, f"{name}: peak memory grew by {grew / MB:.0f} MB"


def test_the_byte_budget_is_a_multiple_of_the_file_size(tmp_path):
    """Arrays are charged whether or not they share bytes: 300 KB of bytes may back a few
    arrays, not hundreds (4 x file + 1 MiB); the official files spend about 1x."""
    few = tmp_path / "few"
    few.write_bytes(memo_reuse_batch(4))
    assert len(safe_unpickle(few)[b"labels"]) == 4
    many = tmp_path / "many"
    many.write_bytes(memo_reuse_batch(12))
    size = many.stat().st_size
    with pytest.raises(DataError, match=rf"needs more than {4 * size + (1 << 20):,} bytes of memory for its {size:,}"):
        safe_unpickle(many)


def test_thin_images_decode_within_a_bounded_memory(tmp_path):
    """A 3 KB 1 x 10000 JPEG resized to a short side of 256 would be 256 x 2.56 million pixels
    (2 GB); only the centre box is resampled."""
    calls = []
    for width, height in [(1, 10000), (10000, 1), (3, 7000)]:
        path = tmp_path / f"thin_{width}x{height}.jpg"
        column = (np.arange(height) % 256).astype(np.uint8)[:, None]
        Image.fromarray(np.tile(column, (1, width))).convert("RGB").save(path)
        assert path.stat().st_size < 64_000
        calls.append((path, "data.images.decode_resized(path, 256)"))
    for (path, call), (grew, outcome) in zip(calls, peak_growth(calls), strict=False):
        assert outcome.startswith("loaded (") and outcome.endswith("256, 256)"), (path.name, call, outcome)
        assert grew < 32 * MB, f"{path.name} {call}: peak memory grew by {grew / MB:.0f} MB"


def test_headers_beyond_the_bound_and_huge_label_lines_are_refused_within_a_bounded_memory(tmp_path):
    """20 KB PNGs that claim 169 megapixels (decoded at 1.3 GB before) and 196 megapixels
    (beyond Pillow's own limit, which gives the same sentence), through the cache's reader and
    predict's; an ImageNet label file of one 60 MB line, and one of 100 MB: one sentence each,
    with the peak memory growing by less than 32 MB."""
    bomb = png_claiming(tmp_path / "bomb.png", 13000, 13000)
    giant = png_claiming(tmp_path / "giant.png", 14000, 14000)
    line = tmp_path / "line" / "LOC_val_solution.csv"
    line.parent.mkdir()
    with open(line, "w") as f:
        f.write("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764")
        f.write(" 0 0 9 9 n01440764" * (60_000_000 // 19))
    large = tmp_path / "large" / "LOC_val_solution.csv"
    large.parent.mkdir()
    with open(large, "w") as f:
        f.write("ImageId,PredictionString\n")
        f.truncate(100 << 20)  # a sparse file: 100 MB that take no disk
    solution = "__import__('data.imagenet', fromlist=['x']).read_val_solution(path, {'ILSVRC2012_val_00000001'})"
    calls = [
        (bomb, "data.images.decode_resized(path, 256)"),
        (giant, "data.images.decode_resized(path, 256)"),
        (bomb, "__import__('inference.checkpoint', fromlist=['x']).read_image(path, 224)"),
        (line, solution),
        (large, solution),
    ]
    expected = [
        f"DataError: {bomb} claims to be 13000x13000 pixels, more than 50 megapixels",
        f"DataError: {giant} claims to be 196,000,000 pixels, more than 50 megapixels",
        "DataError: claims to be 13000x13000 pixels, more than 50 megapixels",  # predict names the file itself
        f"DataError: {line} line 2 is longer than 65,536 characters, which no line of the real file is",
        f"DataError: {large} is 104,857,600 bytes, more than the 67,108,864 a label file of ILSVRC-2012 may have",
    ]
    for (path, call), (grew, outcome), start in zip(calls, peak_growth(calls), expected, strict=False):
        assert outcome.startswith(start), (call, outcome)
        assert grew < 32 * MB, f"{path.name} {call}: peak memory grew by {grew / MB:.0f} MB"


def test_the_bound_is_50_megapixels_exactly(tmp_path):
    """10000 x 5000 passes the header check (the truncated data then fails to decode); 10001 x
    5000 does not."""
    for width, problem in ((10000, "cannot be decoded as an image"), (10001, "claims to be 10001x5000 pixels")):
        path = png_claiming(tmp_path / f"{width}.png", width, 5000)
        path.write_bytes(path.read_bytes()[:200])  # the header and a little of the data
        with pytest.raises(DataError, match=re.escape(f"{path} {problem}")):
            decode_resized(path, 32)


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    """Opening a FIFO for reading blocks until something writes to it. A writer stands by here
    (it writes as soon as a reader waits, then closes), so that the old code, which opened the
    FIFO plainly, failed instead of hanging."""
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    done = threading.Event()

    def writer() -> None:
        while not done.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails while no reader has it open
            except OSError:
                done.wait(0.01)
                continue
            try:
                os.write(fd, b"not an image")
            except BrokenPipeError:  # the reader looked and closed it first
                pass
            os.close(fd)
            return

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(DataError, match=re.escape(f"{fifo} is a FIFO, not a regular file; replace it")):
            decode_resized(fifo, 32)
    finally:
        done.set()
        thread.join()


def test_a_thin_image_is_its_centre_resized(tmp_path):
    """A vertical ramp 1 pixel wide: the output is the middle of the ramp, stretched across."""
    path = tmp_path / "thin.png"
    Image.fromarray((np.arange(1000) // 4).astype(np.uint8)[:, None]).save(path)
    image = decode_resized(path, 256)
    assert image.shape == (3, 256, 256)
    assert torch.equal(image[:, :, 0:1].expand(3, 256, 256), image)  # every column the same
    assert abs(image[0, 128, 0].item() - 125) <= 1  # the centre of the ramp


@pytest.mark.parametrize(
    "build, phrase",
    [
        (
            lambda o: o.array((2, 3072), lambda o: o.bytes(b"\x00" * 100)),
            "builds a 2 x 3072 uint8 array of 6,144 bytes from 100 bytes",
        ),
        (
            lambda o: o.reconstruct().mark().int(1).shape((1, 3072)).dtype("O").false().bytes(b"").tuple().build(),
            "asks for numpy dtype 'O', which is not a plain number type",
        ),
        (
            lambda o: o.array((1, 3072), lambda o: o.bytes(b"\x00" * 3072), order=">"),
            "gives numpy dtype 'u1' a state numpy never writes",
        ),
        (
            lambda o: o.dict().mark().array((1, 1), lambda o: o.bytes(b"\x00")).bytes(b"x").setitems(),
            "uses an array as a dictionary key",
        ),
        (
            lambda o: o.dict().mark().bytes(b"data").reconstruct().setitems(),
            "makes an array without giving it its bytes",
        ),
        (
            lambda o: (
                o.array((1, 1), lambda o: o.bytes(b"\x00"))
                .put(9)
                .mark()
                .int(1)
                .shape((1, 1))
                .dtype()
                .false()
                .bytes(b"\x01")
                .tuple()
                .build()
            ),
            "sets the state of one array twice",
        ),
        (lambda o: o.list().dict().build(), "sets the state of a list"),
    ],
)
def test_arrays_only_from_their_own_bytes(tmp_path, build, phrase):
    path = tmp_path / "batch"
    ops = Ops()
    path.write_bytes(build(ops).done())
    with pytest.raises(DataError, match=re.escape(f"was not loaded: it {phrase}, which no CIFAR file does")):
        safe_unpickle(path)


def test_dtypes_are_never_numpy_shared_ones_changed(tmp_path):
    """A pickle's dtype state never reaches numpy's shared dtype objects (``copy=False`` gives the
    very object every int64 array uses)."""
    ops = Ops().reconstruct().mark().int(1).shape((2,)).dtype("i8", ">", copy=False).false()
    data = ops.bytes(b"\x00" * 7 + b"\x01" + b"\x00" * 7 + b"\x02").tuple().build().done()
    before = np.dtype("i8").str
    path = tmp_path / "batch"
    path.write_bytes(data)
    array = safe_unpickle(path)
    assert array.tolist() == [1, 2] and array.dtype.str == ">i8"
    assert np.dtype("i8").str == before and np.array([1]).dtype.str == before


def test_official_and_python3_arrays_still_load_exactly(tmp_path):
    """What numpy itself writes: Python 2 (BINSTRING bytes) and Python 3 (``_codecs.encode``)
    protocol-2 pickles, C and Fortran order, several plain dtypes."""
    arrays = {
        b"u1": np.arange(12, dtype=np.uint8).reshape(3, 4),
        b"f": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        b"i8": np.array([-1, 2**40], dtype=np.int64),
        b"big": np.array([1, 2], dtype=">i4"),
        b"b": np.array([True, False]),
    }
    # Python 3 writes empty bytes as builtins.bytes(), a global no CIFAR file needs: Python 2 only.
    empty = {**arrays, b"empty": np.zeros((0, 3072), np.uint8)}
    for data, written in ((pickle.dumps(arrays, protocol=2), arrays), (python2_pickle(empty), empty)):
        path = tmp_path / "arrays"
        path.write_bytes(data)
        loaded = safe_unpickle(path)
        for key, array in written.items():
            assert loaded[key].dtype == array.dtype and np.array_equal(loaded[key], array), key


# ---------------------------------------------------------------------------------------------
# 3. Paths from data files


@pytest.mark.parametrize(
    "line, problem",
    [
        ("../x", "'../x' holds a path separator"),
        ("/etc/passwd", "'/etc/passwd' holds a path separator"),
        ("..", "'..' names a folder itself, not something in it"),
        ("a\\b", "holds a path separator"),  # how the name is quoted is utils.safe_child's business
        ("a\x1bb", "holds a control character"),
        ("-rf", "'-rf' starts with '-'"),
        ("x" * 199, "is 203 bytes long, more than the 200 a name may have"),
    ],
)
def test_image_ids_must_be_names_inside_the_folder(tmp_path, line, problem):
    path = tmp_path / "train.txt"
    path.write_text(f"2008_000001\n\n{line} 1\n")
    message = (
        rf"train\.txt line 3: the image id .*{re.escape(problem)}, so it cannot name a file in the VOC folder; "
        r"fix the line or remove it\."
    )
    with pytest.raises(DataError, match=message):
        read_image_list(path)


def test_an_image_list_with_a_bom_and_crlf_reads_as_the_ids(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes("2008_000001\r\n2008_000002  1\r\n\r\n".encode("utf-8-sig"))
    assert read_image_list(path) == ["2008_000001", "2008_000002"]


def test_a_bom_list_trains_through_the_command_line(tmp_path, run_main):
    """Saved by a Windows editor: BOM and CRLF. The first image was reported missing before."""
    folder = voc(tmp_path)
    (folder / "ImageSets" / "Main" / "train.txt").write_bytes("2010_000000\r\n2010_000001\r\n".encode("utf-8-sig"))
    result = run_main(*VOC_DRY_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 images in train.txt, 1 in val.txt" in result.stderr


# ---------------------------------------------------------------------------------------------
# 4. Caches and meta files


def voc_options(tmp_path: Path) -> DataOptions:
    return DataOptions(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")


def test_a_zeroed_cache_is_rebuilt_through_the_command_line(tmp_path, run_main):
    """A shard's first image's bytes replaced by zeros (its JPEGs untouched, so their
    fingerprint still matches): the digest recorded at build time no longer does, so it is rebuilt."""
    voc(tmp_path)
    first = run_main(*VOC_DRY_RUN, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    shard = tmp_path / "cache" / "train_256" / "00000.shard"
    built = shard.read_bytes()
    shard.write_bytes(built[:200] + bytes(1000) + built[1200:])  # within the first JPEG, past the head
    result = run_main(*VOC_DRY_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "cache shard cache/train_256/00000.shard does not match its digest (it was damaged or changed); "
        "rebuilding it" in result.stderr
    )
    assert shard.read_bytes() == built
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train_256", "val_256"]


@pytest.mark.parametrize(
    "damage, warning",
    [
        (lambda b: b[: len(b) // 2], "does not end as a complete shard does (truncated or appended to)"),
        (lambda b: b + b"\0" * 10, "does not end as a complete shard does (truncated or appended to)"),
        (lambda b: b"", "does not end as a complete shard does (truncated or appended to)"),
        (lambda b: b[:-16] + (1 << 40).to_bytes(8, "little") + b[-8:], "is truncated"),
        (lambda b: b[:-20] + b"junk" + b[-16:], "is unreadable"),  # the tail's zip is damaged
    ],
)
def test_a_damaged_shard_is_a_warning_and_a_rebuild(tmp_path, caplog, damage, warning):
    voc(tmp_path)
    first = load_dataset("PascalVOC2012", voc_options(tmp_path)).train.images[:]
    shard = tmp_path / "cache" / "train_256" / "00000.shard"
    shard.write_bytes(damage(shard.read_bytes()))
    data = load_dataset("PascalVOC2012", voc_options(tmp_path))
    assert f"cache shard {shard} {warning}" in caplog.text and "rebuilding it" in caplog.text
    assert torch.equal(data.train.images[:], first)


def test_an_untouched_cache_is_used_without_a_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    voc(tmp_path)
    load_dataset("PascalVOC2012", voc_options(tmp_path))
    caplog.clear()
    load_dataset("PascalVOC2012", voc_options(tmp_path))
    assert "building" not in caplog.text and "rebuilding" not in caplog.text


@pytest.mark.parametrize(
    "names, message",
    [
        ([b"a"] * 99, r"lists 99 class names under b'fine_label_names', but CIFAR-100 has 100"),
        ([f"n{i}".encode() for i in range(99)] + [b""], r"class name 100 under b'fine_label_names' \(''\) is empty"),
        ([f"n{i}".encode() for i in range(99)] + [b"\xff"], r"class name 100 .* is not UTF-8 text"),
        ([f"n{i}".encode() for i in range(99)] + [b"a\nb"], r"class name 100 .* is not printable text"),
        ([f"n{i}".encode() for i in range(99)] + [b"x" * 101], r"class name 100 .* is longer than 100 characters"),
    ],
)
def test_class_names_are_the_official_count_of_unique_printable_text(tmp_path, names, message):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder)
    (folder / "meta").write_bytes(
        python2_pickle({b"fine_label_names": names, b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    )
    with pytest.raises(DataError, match=message):
        load_dataset("Cifar100", DataOptions(data_dir=tmp_path))


def test_cifar100_coarse_names_must_be_twenty(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder)
    (folder / "meta").write_bytes(
        python2_pickle(
            {
                b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"c{i}".encode() for i in range(21)],
            }
        )
    )
    assert load_dataset("Cifar100", DataOptions(data_dir=tmp_path)).num_classes == 100
    with pytest.raises(DataError, match=r"lists 21 class names under b'coarse_label_names', but CIFAR-100 has 20"):
        load_dataset("Cifar100", DataOptions(data_dir=tmp_path, coarse_labels=True))


def grey_ramp() -> np.ndarray:
    """300 x 300 16-bit greyscale, black on the left to white on the right."""
    return np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (300, 1))


def ramp8() -> np.ndarray:
    return ((grey_ramp().astype(np.int64) + 128) // 257).astype(np.uint8)


@pytest.mark.parametrize(
    "mode, write, tolerance",
    [
        # 16-bit greyscale: scaled to 8 bits, not clipped to white as convert("RGB") does.
        ("I;16", lambda p: Image.fromarray(grey_ramp()).save(p, format="PNG"), 1),
        ("L", lambda p: Image.fromarray(ramp8()).save(p, format="PNG"), 0),
        ("P", lambda p: Image.fromarray(ramp8()).convert("RGB").quantize(256).save(p, format="PNG"), 2),
        ("CMYK", lambda p: Image.fromarray(ramp8()).convert("CMYK").save(p, format="JPEG", quality=100), 3),
        ("RGBA", lambda p: Image.fromarray(ramp8()).convert("RGBA").save(p, format="PNG"), 0),
    ],
)
def test_image_modes_become_the_right_rgb(tmp_path, mode, write, tolerance):
    path = tmp_path / "image.jpg"  # VOC names every file .jpg, whatever it holds
    write(path)
    # Pillow before 10 opens a 16-bit PNG as I rather than I;16: the same 16-bit values.
    assert Image.open(path).mode in ((mode, "I") if mode == "I;16" else (mode,))
    image = decode_resized(path, 256).int()
    reference = torch.from_numpy(np.asarray(Image.fromarray(ramp8()).resize((256, 256), Image.BILINEAR)).astype(int))
    assert (image - reference[None]).abs().max() <= tolerance
    assert image[:, :, 0].max() < 10 and image[:, :, -1].min() > 245  # black to white, not clipped


def palette_image() -> Image.Image:
    image = Image.new("P", (300, 300), 3)
    image.putpalette([10, 20, 30] * 256)
    return image


@pytest.mark.parametrize(
    "write",
    [
        lambda p: Image.merge("LA", [Image.new("L", (300, 300), 0)] * 2).save(p, format="PNG"),
        lambda p: Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(p, format="PNG"),
        lambda p: palette_image().save(p, format="PNG", transparency=3),
        lambda p: Image.new("RGB", (300, 300), (10, 20, 30)).save(p, format="PNG", transparency=(10, 20, 30)),
    ],
)
def test_transparent_pixels_are_white(tmp_path, write):
    path = tmp_path / "image.jpg"
    write(path)
    assert (decode_resized(path, 256) == 255).all()


def test_sixteen_bit_big_endian_and_32_bit_modes(tmp_path):
    path = tmp_path / "a.png"
    big = Image.frombytes("I;16B", (4, 1), np.array([0, 257, 32896, 65535], dtype=">u2").tobytes())
    assert to_rgb(big, path).getpixel((2, 0)) == (128, 128, 128)
    with pytest.raises(DataError, match=r"a.png holds I pixels \(32-bit integers or floating point\)"):
        to_rgb(Image.new("I", (4, 4)), path)


@pytest.mark.parametrize(
    "codec, declared",
    [
        ("utf-16", "UTF-16"),
        ("utf-16-be", "UTF-16BE"),
        ("utf-16-le", "UTF-16"),
        ("utf-8-sig", "UTF-8"),
        ("latin-1", "ISO-8859-1"),
        ("cp1252", "windows-1252"),
        ("utf-8", "UTF-8"),
    ],
)
def test_a_doctype_is_found_whatever_the_encoding(tmp_path, codec, declared):
    text = (
        f'<?xml version="1.0" encoding="{declared}"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<annotation><object><name>&x;</name></object></annotation>"
    )
    path = tmp_path / "a.xml"
    path.write_bytes(text.encode(codec))
    with pytest.raises(DataError, match=r"declares a DOCTYPE or entities, which VOC annotations never do"):
        parse_voc_xml(path)


def test_an_encoding_the_parser_cannot_read_is_refused_too(tmp_path):
    path = tmp_path / "a.xml"
    path.write_bytes('<?xml version="1.0" encoding="UTF-32"?><!DOCTYPE a><annotation/>'.encode("utf-32"))
    with pytest.raises(DataError, match=r"a.xml (declares a DOCTYPE|is not well-formed XML)"):
        parse_voc_xml(path)


def test_an_annotation_in_utf16_without_a_doctype_still_parses(tmp_path):
    path = tmp_path / "a.xml"
    path.write_bytes(voc_xml("a.jpg", 9, 9, [("dog", False)]).encode("utf-16"))
    assert parse_voc_xml(path)[VOC_CLASSES.index("dog")] == 1
