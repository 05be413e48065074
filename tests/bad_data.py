"""Bad data, one sentence each: the rows of the bad-input table (docs/troubleshooting.md) about data
sets, data folders, caches, image folders and ImageNet layouts, and the files they build.

Each row is a ``main_cli.Case``, run by test_bad_data.py in a folder holding an earlier run
(``main_cli.run_case``). ``READERS`` are missing, unreadable and damaged CIFAR and VOC files;
``UNTRUSTED`` are files crafted to delete, exhaust memory or read outside the data folder (issue
12, the data half; test_untrusted_data.py holds what those cannot show in one line and uses the
builders here); ``IMAGE_FOLDER`` and ``IMAGENET`` are the layouts of those two readers.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fakedata import (
    CIFAR10_NAMES,
    Ops,
    add_tar_entry,
    codec_chain,
    memo_reuse_batch,
    png_claiming,
    python2_pickle,
    small_voc,
    solid,
    voc_xml,
    write_cifar10,
    write_class_folders,
    write_image,
    write_imagenet,
    zero_stride_batch,
)
from main_cli import ROOT, VOC_DRY_RUN, Case, isolated, without_file_permission_override
from PIL import Image

# ---------------------------------------------------------------------------------------------
# CIFAR and VOC files and the data folder


def cifar(work: Path) -> Path:
    folder = work / "data" / "cifar-10"
    write_cifar10(folder)
    return folder


def voc4(work: Path) -> Path:
    """The small VOC folder, four images: dog, cat, person and bus."""
    return small_voc(work / "data", ["dog", "cat", "person", "bus"])


def damage_batch(work: Path, payload: Callable[[bytes], bytes]) -> None:
    path = cifar(work) / "data_batch_2"
    path.write_bytes(payload(path.read_bytes()))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


BOMB = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]><annotation><object><name>&lol3;</name>'
    "</object></annotation>"
)


def locked_data(work: Path, earlier: Path) -> None:
    cifar(work)
    os.chmod(work / "data", 0)


def rotten_cache(work: Path, earlier: Path) -> None:
    """An ImageFolder and its 32x32 cache, recorded as verified (``verified.json``), whose first
    JPEG then lost its first byte with the shard's size and time kept: bit rot that a start does
    not see, as the shard is not hashed again."""
    from data import prepare
    from data.shards import HEAD_BYTES, save_verified

    write_class_folders(work / "data", {"a": 6, "b": 6}, size=40)
    assert (
        prepare.main(
            [
                "-ds",
                "ImageFolder",
                "--data-dir",
                str(work / "data"),
                "--cache-dir",
                str(work / "cache"),
                "-c",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    past = (time.time_ns() - 3600 * 10**9) // 10**9 * 10**9
    for folder in (work / "cache").iterdir():
        shards = sorted(folder.glob("*.shard"))
        for path in shards:
            os.utime(path, ns=(past, past))
        save_verified(folder, {path.name: (path.stat().st_size, past) for path in shards}, len(shards))
    shard = work / "cache" / "train_32" / "00000.shard"
    blob = bytearray(shard.read_bytes())
    blob[HEAD_BYTES] ^= 0xFF  # the first JPEG's first byte
    shard.write_bytes(bytes(blob))
    os.utime(shard, ns=(past, past))


CIFAR = ["-c", "-ds", "Cifar10", "--data-dir", "data", "-ne", "1"]
ROTTEN = [
    "-c",
    "-ds",
    "ImageFolder",
    "--data-dir",
    "data",
    "--cache-dir",
    "cache",
    "-ne",
    "1",
    "-d",
    "--loader",
    "stream",
    "--workers",
    "2",
]

#: Decoded by the DataLoader workers (a CPU); on CUDA by the training process (test_streaming.py).
ROTTEN_SENTENCE = (
    r"cache shard cache/train_32/00000\.shard is damaged: its image 1 of 10 cannot be decoded \(Not a JPEG file: "
    r"starts with 0x00 0xd8\), though its size and time are those recorded when its digest last matched; delete it and "
    r"run again \(or run prepare\), which rebuilds it from the images\.$"
)

VOC = ["-ds", "PascalVOC2012", "--data-dir", "data", "-ne", "1", "--cache-dir", "cache"]


READERS = [
    Case(
        "missing data folder",
        CIFAR,
        1,
        r"data folder data does not exist; create it and put CIFAR-10 \(cifar-10/ or cifar-10-batches-py/ or "
        r"cifar-10-python.tar.gz\) in it, or pass --data-dir\.",
    ),
    Case(
        "empty data folder",
        CIFAR,
        1,
        r"found no CIFAR-10 in data: put the official python version there as cifar-10/, cifar-10-batches-py/ or "
        r"cifar-10-python.tar.gz, or pass --download\.",
        prepare=lambda w, e: (w / "data").mkdir(),
    ),
    Case(
        "unreadable data folder",
        CIFAR,
        1,
        r"cannot read data folder data \(Permission denied\); give this user read access to it, or pass another "
        r"--data-dir\.",
        prepare=locked_data,
        prefix=without_file_permission_override,
    ),
    Case(
        "truncated CIFAR pickle",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2 is truncated or not a CIFAR pickle \(.*\); replace it with the file from the "
        r"official archive\.",
        prepare=lambda w, e: damage_batch(w, lambda b: b[: len(b) // 3]),
    ),
    Case(
        "pickle with the wrong keys",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2 is not a CIFAR batch file \(it lacks b'data' or b'labels'\); replace it\.",
        prepare=lambda w, e: damage_batch(w, lambda b: python2_pickle({b"images": b"", b"labels": []})),
    ),
    Case(
        "pickle with the wrong shapes",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2: b'data' must be a uint8 N x 3072 array, found \(3, 1024\); replace the file\.",
        prepare=lambda w, e: damage_batch(
            w,
            lambda b: python2_pickle({b"data": torch.zeros(3, 1024, dtype=torch.uint8).numpy(), b"labels": [0, 1, 2]}),
        ),
    ),
    Case(
        "labels out of range",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2: labels must be 0..9, found 0..10; replace the file\.",
        prepare=lambda w, e: damage_batch(
            w, lambda b: python2_pickle({b"data": torch.zeros(2, 3072, dtype=torch.uint8).numpy(), b"labels": [0, 10]})
        ),
    ),
    Case(
        "pickle that runs code",
        CIFAR,
        1,
        r"data/cifar-10/data_batch_2 asks to call posix.system, which no CIFAR file does, so it was not loaded \(it "
        r"may be crafted to run code\); replace it with the file from the official archive\.",
        prepare=lambda w, e: damage_batch(w, lambda b: pickle.dumps(Exploit(), protocol=2)),
    ),
    Case(
        "corrupt JPEG",
        VOC,
        1,
        r"data/PascalVOC2012/JPEGImages/2010_000001.jpg cannot be decoded as an image \(.*\); replace it with a "
        r"good copy",
        prepare=lambda w, e: (voc4(w) / "JPEGImages/2010_000001.jpg").write_bytes(b"\xff\xd8\xff\x00"),
    ),
    Case(
        "missing JPEG",
        VOC,
        1,
        r"data/PascalVOC2012/ImageSets/Main/val.txt names 2010_000003, but "
        r"data/PascalVOC2012/JPEGImages/2010_000003.jpg does not exist; restore it or remove the line\.",
        prepare=lambda w, e: (voc4(w) / "JPEGImages/2010_000003.jpg").unlink(),
    ),
    Case(
        "malformed XML",
        VOC,
        1,
        r"data/PascalVOC2012/Annotations/2010_000000.xml is not well-formed XML \(no element found: line 1, "
        r"column 12\); restore it from the VOC release\.",
        prepare=lambda w, e: (voc4(w) / "Annotations/2010_000000.xml").write_text("<annotation>"),
    ),
    Case(
        "unknown class in XML",
        VOC,
        1,
        r"data/PascalVOC2012/Annotations/2010_000002.xml names an unknown class 'persons' \(VOC has aeroplane, .*, "
        r"tvmonitor\); fix the file\.",
        prepare=lambda w, e: (voc4(w) / "Annotations/2010_000002.xml").write_text(voc_xml("a", 9, 9, [("persons", 0)])),
    ),
    Case(
        "XML bomb",
        VOC,
        1,
        r"data/PascalVOC2012/Annotations/2010_000001.xml declares a DOCTYPE or entities, which VOC annotations never "
        r"do; it was not parsed\.",
        prepare=lambda w, e: (voc4(w) / "Annotations/2010_000001.xml").write_text(BOMB),
    ),
    Case(
        "image list naming a missing image",
        VOC,
        1,
        r"data/PascalVOC2012/ImageSets/Main/train.txt names 2010_000077, but "
        r"data/PascalVOC2012/JPEGImages/2010_000077.jpg does not exist; restore it or remove the line\.",
        prepare=lambda w, e: (voc4(w) / "ImageSets/Main/train.txt").write_text("2010_000000\n2010_000077\n"),
    ),
    Case("cache shard damaged under its recorded time", ROTTEN, 1, ROTTEN_SENTENCE, prepare=rotten_cache),
]


# ---------------------------------------------------------------------------------------------
# Files crafted to delete, exhaust memory or read outside the data folder

CIFAR_DRY = ["-c", "-ds", "Cifar10", "--data-dir", "data", "-ne", "1", "-d"]
CIFAR_HERE = ["-c", "-ds", "Cifar10", "--data-dir", ".", "-ne", "1", "-d"]
OFFICIAL = r"; replace it with the file from the official archive\."


def voc(work: Path) -> Path:
    return small_voc(work / "data")


def replace_batch(work: Path, data: bytes) -> None:
    (cifar(work) / "data_batch_2").write_bytes(data)


def cifar_archive(archive: Path, extra: dict[str, str] | None = None, own: bool = True) -> None:
    """An official-layout ``cifar-10-python.tar.gz`` (unless not ``own``), plus ``extra``
    entries (archive name: text) beside its folder."""
    build = archive.parent / ".build"
    with tarfile.open(archive, "w:gz") as tar:
        if own:
            write_cifar10(build / "cifar-10-batches-py")
            tar.add(build / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        for name, text in (extra or {}).items():
            path = build / "extra" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            tar.add(path, arcname=name)
    for path in sorted(build.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    build.rmdir()


def archive_over_checkpoints(work: Path, earlier: Path) -> None:
    """An archive in ``--data-dir .`` that holds no CIFAR, only a ``checkpoints/`` entry."""
    cifar_archive(work / "cifar-10-python.tar.gz", {"checkpoints/Shapes/note.txt": "from the archive"}, own=False)


def folder_in_the_way(work: Path, earlier: Path) -> None:
    (work / "data").mkdir()
    cifar_archive(work / "data" / "cifar-10-python.tar.gz")
    (work / "data" / "cifar-10-batches-py").mkdir()
    (work / "data" / "cifar-10-batches-py" / "notes.txt").write_text("the user's own")


def still_there(work: Path, result: subprocess.CompletedProcess) -> None:
    assert (work / "data" / "cifar-10-batches-py" / "notes.txt").read_text() == "the user's own"
    assert sorted(p.name for p in (work / "data").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def meta_with(names: list[bytes]) -> bytes:
    return python2_pickle({b"label_names": names, b"num_cases_per_batch": 3, b"num_vis": 3072})


def image_list(work: Path, lines: list[str]) -> None:
    folder = voc(work)
    (folder / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{line}\n" for line in lines))


def outside_image(work: Path) -> Path:
    """A JPEG and its XML outside the VOC folder: ``work/outside/x``."""
    (work / "outside").mkdir()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(work / "outside" / "x.jpg")
    (work / "outside" / "x.xml").write_text(voc_xml("x.jpg", 40, 30, [("dog", False)]))
    return work / "outside" / "x"


BOMB_UTF16 = (
    '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 '
    '"&lol;&lol;&lol;&lol;&lol;&lol;">]><annotation><object><name>&lol2;</name></object></annotation>'
)


def float_image(work: Path) -> None:
    path = voc(work) / "JPEGImages" / "2010_000001.jpg"
    Image.fromarray(np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(30, 40), "F").save(path, format="TIFF")


def cifar_archive_with(work: Path, entries: list[tuple]) -> None:
    """``data/cifar-10-python.tar.gz``: the official folder, then ``entries`` (``add_tar_entry``'s
    arguments), as a crafted archive holds them."""
    build = work / ".build"
    write_cifar10(build / "cifar-10-batches-py")
    (work / "data").mkdir()
    with tarfile.open(work / "data" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(build / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        for entry in entries:
            add_tar_entry(tar, *entry)
    shutil.rmtree(build)


def nothing_unpacked(work: Path, result: subprocess.CompletedProcess) -> None:
    assert [p.name for p in (work / "data").iterdir()] == ["cifar-10-python.tar.gz"]
    assert not (work / "x").exists() and not (work / "data" / "x").exists()


#: What every command imports, before the baseline of the memory it grows by.
CAPPED_MAIN = """
import resource, sys
sys.path.insert(0, {root!r})
import numpy, torch, torchvision.io, PIL.Image, main, data.prepare, data.registry

def vm_size():
    return int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (2 << 30), resource.RLIM_INFINITY))
try:
    code = main.main(sys.argv[3:])
finally:
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(f"peak memory grew by {{grew}} bytes", file=sys.stderr)
sys.exit(code)
"""


def capped_main() -> list[str]:
    """A prefix that runs ``python main.py ARGS`` as ``main.main(ARGS)`` in a Python that has
    already imported what every command imports, under an address-space cap of 2 GiB more (which
    guards the machine), and prints by how much the peak resident memory grew after that."""
    return [sys.executable, "-c", CAPPED_MAIN.format(root=str(ROOT))]


def memory_grew_by(result: subprocess.CompletedProcess) -> int:
    return int(re.search(r"peak memory grew by (\d+) bytes", result.stderr).group(1))


def bomb_among_images(work: Path, earlier: Path) -> None:
    write_class_folders(work / "data", {"a": 2, "b": 2})
    png_claiming(work / "data" / "b" / "bomb.png", 13000, 13000)


def within_500_mb(work: Path, result: subprocess.CompletedProcess) -> None:
    """The issue's bound: within 500 MB of the same command on ordinary input, whose growth is
    at least 0 (it is 30-60 MB here); the old code grew by 1.3 GB."""
    assert memory_grew_by(result) < 500 * MB, result.stderr


MB = 1 << 20
PREPARE_FOLDER = ["prepare", "-ds", "ImageFolder", "--data-dir", "data", "--cache-dir", "cache", "--workers", "1"]


UNTRUSTED = [
    # 1. An archive creates its own data set's folder and nothing else, and deletes nothing.
    Case(
        "archive without its data folder",
        CIFAR_HERE,
        1,
        r"cifar-10-python.tar.gz holds no CIFAR-10 in a cifar-10-batches-py/ folder, so it is not the official "
        r"archive; download it again\.",
        prepare=archive_over_checkpoints,
    ),
    Case(
        "folder in the archive's way",
        CIFAR_DRY,
        1,
        r"data/cifar-10-batches-py already exists but holds no CIFAR-10; remove or rename it so that "
        r"cifar-10-python.tar.gz can be unpacked there\.",
        prepare=folder_in_the_way,
        check=still_there,
    ),
    # 2. What a file yields is backed by its own bytes; memory is bounded by its size.
    Case(
        "pickle conjuring images from one byte",
        CIFAR_DRY,
        1,
        r"data/cifar-10/data_batch_2 was not loaded: it calls numpy.ndarray directly, which no CIFAR file does "
        r"\(it may be crafted\)" + OFFICIAL,
        prepare=lambda w, e: replace_batch(w, zero_stride_batch(100)),
    ),
    Case(
        "pickle array without its bytes",
        CIFAR_DRY,
        1,
        r"data/cifar-10/data_batch_2 was not loaded: it makes an array without giving it its bytes, which no CIFAR "
        r"file does \(it may be crafted\)" + OFFICIAL,
        prepare=lambda w, e: replace_batch(w, Ops().batch(lambda o: o.reconstruct(), lambda o: o.list())),
    ),
    Case(
        "pickle codec chain",
        CIFAR_DRY,
        1,
        r"data/cifar-10/data_batch_2 was not loaded: it calls _codecs.encode other than as encode\(text, 'latin1'\) "
        r"for bytes, which no CIFAR file does \(it may be crafted\)" + OFFICIAL,
        prepare=lambda w, e: replace_batch(w, codec_chain(22)),
    ),
    Case(
        "pickle reusing its bytes for many arrays",
        CIFAR_DRY,
        1,
        r"data/cifar-10/data_batch_2 was not loaded: it needs more than [\d,]+ bytes of memory for its [\d,]+ "
        r"bytes, which no CIFAR file does \(it may be crafted\)" + OFFICIAL,
        prepare=lambda w, e: replace_batch(w, memo_reuse_batch(400)),
    ),
    # 3. Names from data files become paths only through utils.safe_child.
    Case(
        "image id leading out of the folder",
        VOC_DRY_RUN,
        1,
        r"data/PascalVOC2012/ImageSets/Main/train.txt line 2: the image id '../../../outside/x' holds a path "
        r"separator, so it cannot name a file in the VOC folder; fix the line or remove it\.",
        prepare=lambda w, e: [outside_image(w), image_list(w, ["2010_000000", "../../../outside/x"])],
    ),
    Case(
        "absolute image id",
        VOC_DRY_RUN,
        1,
        r"data/PascalVOC2012/ImageSets/Main/train.txt line 1: the image id '/.*' holds a path separator, "
        r"so it cannot name a file in the VOC folder; fix the line or remove it\.",
        prepare=lambda w, e: image_list(w, [str(outside_image(w)), "2010_000000"]),
    ),
    # 4. Meta files and images are what they claim.
    Case(
        "class names of another count",
        CIFAR_DRY,
        1,
        r"data/cifar-10/batches.meta lists 11 class names under b'label_names', but CIFAR-10 has 10" + OFFICIAL,
        prepare=lambda w, e: (cifar(w) / "batches.meta").write_bytes(
            meta_with([n.encode() for n in CIFAR10_NAMES] + [b"unicorn"])
        ),
    ),
    Case(
        "repeated class name",
        CIFAR_DRY,
        1,
        r"data/cifar-10/batches.meta: class name 4 under b'label_names' \('bird'\) is the same as name 3" + OFFICIAL,
        prepare=lambda w, e: (cifar(w) / "batches.meta").write_bytes(
            meta_with([n.encode() for n in CIFAR10_NAMES[:3]] + [b"bird"] + [n.encode() for n in CIFAR10_NAMES[4:]])
        ),
    ),
    Case(
        "XML bomb in UTF-16",
        VOC_DRY_RUN,
        1,
        r"data/PascalVOC2012/Annotations/2010_000001.xml declares a DOCTYPE or entities, which VOC annotations never "
        r"do; it was not parsed\.",
        prepare=lambda w, e: (voc(w) / "Annotations/2010_000001.xml").write_bytes(BOMB_UTF16.encode("utf-16")),
    ),
    Case(
        "floating-point image",
        VOC_DRY_RUN,
        1,
        r"data/PascalVOC2012/JPEGImages/2010_000001.jpg holds F pixels \(32-bit integers or floating point\), which "
        r"have no fixed white level; save it as an 8-bit JPEG or PNG\.",
        prepare=lambda w, e: float_image(w),
    ),
    # 5. Issue 22: images beyond the bound are refused from their header, by every reader; archive
    # entries that lead out of their folder refuse the archive.
    isolated(
        Case(
            "image claiming 169 megapixels",
            PREPARE_FOLDER,
            1,
            r"data/b/bomb\.png claims to be 13000x13000 pixels, more "
            r"than 50 megapixels \(a decompression bomb, a damaged "
            r"header, or a photo to downscale first\); replace it with a smaller image or remove it\.$",
            prepare=bomb_among_images,
            prefix=capped_main,
            check=within_500_mb,
        )
    ),
    isolated(
        Case(
            "archive entry leading out of its folder",
            CIFAR_DRY,
            1,
            r"archive data/cifar-10-python\.tar\.gz was not unpacked: "
            r"its entry 'cifar-10-batches-py/\.\./x' leads out of "
            r"cifar-10-batches-py/ \(no official archive of CIFAR-10 "
            r"holds such an entry: it may be crafted\); download "
            r"it again\.$",
            prepare=lambda w, e: cifar_archive_with(w, [("cifar-10-batches-py/../x", b"escaped")]),
            check=nothing_unpacked,
        )
    ),
    isolated(
        Case(
            "archive entry written through a link",
            CIFAR_DRY,
            1,
            r"archive data/cifar-10-python\.tar\.gz was not unpacked: its entry 'cifar-10-batches-py/up' is a link to "
            r"'\.\.', out of cifar-10-batches-py/ \(no official archive of CIFAR-10 holds such an entry: it may be "
            r"crafted\); download it again\.$",
            prepare=lambda w, e: cifar_archive_with(
                w, [("cifar-10-batches-py/up", b"", ".."), ("cifar-10-batches-py/up/x", b"escaped")]
            ),
            check=nothing_unpacked,
        )
    ),
]


# ---------------------------------------------------------------------------------------------
# Image folders


def _truncated(work, earlier):
    write_class_folders(work / "data", {"a": 3, "b": 3})
    (work / "data" / "b" / "b_2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")


def _unreadable_subfolder(work, earlier):
    write_class_folders(work / "data", {"a": 2, "b": 2})
    write_class_folders(work / "data" / "a" / "2024", {"x": 1})
    os.chmod(work / "data" / "a" / "2024", 0)


def _one_class(work, earlier):
    write_class_folders(work / "data" / "train", {"a": 3})
    write_class_folders(work / "data" / "val", {"a": 1})


def _two_classes_and(*paths):
    def prepare(work, earlier):
        write_class_folders(work / "data" / "train", {"a": 2, "b": 2})
        write_class_folders(work / "data" / "val", {"a": 1, "b": 1})
        for path in paths:
            (work / path).mkdir(mode=0o555) if path == "readonly" else (work / path).write_text("a file")

    return prepare


def _no_cache_in_train(work, result):
    assert sorted(p.name for p in (work / "data" / "train").iterdir()) == ["a", "b"]


#: ``prepare`` on the image folder data/, where each row adds its own --cache-dir or none.
PREPARE = ["prepare", "-ds", "ImageFolder", "--data-dir", "data", "--workers", "1"]


IMAGE_FOLDER = [
    Case(
        "missing folder",
        ["-ds", "ImageFolder", "--data-dir", "nowhere", "-ne", "1"],
        1,
        r"data folder nowhere does not exist; create it and put one folder of images per class in it",
    ),
    Case(
        "empty class folders",
        ["prepare", "-ds", "ImageFolder", "--data-dir", "data"],
        1,
        r"2 class folders in data hold no image files \(a, b\); add images or remove the folders\.$",
        lambda work, earlier: [(work / "data" / c).mkdir(parents=True) for c in "ab"],
    ),
    Case(
        "unreadable file",
        ["-ds", "ImageFolder", "--data-dir", "data", "-ne", "1", "--cache-dir", "cache"],
        1,
        r"data/b/b_2\.jpg cannot be decoded as an image \(.*\); replace it with a good copy .*or remove it\.$",
        _truncated,
    ),
    isolated(
        Case(
            "unreadable subfolder of a class",
            PREPARE,
            1,
            r"cannot read data/a/2024 \(Permission denied\), a subfolder "
            r"of class a, whose images would be left out; give "
            r"this user read access to it, or move it out of the data folder\.$",
            _unreadable_subfolder,
            prefix=without_file_permission_override,
            restore=["data/a/2024"],
        )
    ),
    isolated(
        Case(
            "one class",
            ["-ds", "ImageFolder", "--data-dir", "data", "-ne", "1", "--cache-dir", "cache"],
            1,
            r"data/train has one class folder \(a\); a classifier "
            r"needs at least two classes, so add a folder of images "
            r"for each other class\.$",
            _one_class,
        )
    ),
    isolated(
        Case(
            "--cache-dir that is a file",
            [*PREPARE, "--cache-dir", "afile"],
            1,
            r"--cache-dir afile is a file, not a folder; pass a folder "
            r"for the resize cache \(it is created if missing\)\.$",
            _two_classes_and("afile"),
        )
    ),
    isolated(
        Case(
            "read-only --cache-dir",
            [*PREPARE, "--cache-dir", "readonly"],
            1,
            r"cannot write the resize cache in readonly/train_256 "
            r"\(Permission denied\); give this user write access to "
            r"--cache-dir readonly, or pass another --cache-dir\.$",
            _two_classes_and("readonly"),
            prefix=without_file_permission_override,
        )
    ),
    isolated(
        Case(
            "--cache-dir inside a split's folder",
            [*PREPARE, "--cache-dir", "data/train/cache"],
            1,
            r"--cache-dir data/train/cache is inside data/train, whose "
            r"subfolders are read as classes, so the cache would "
            r"become one; pass a --cache-dir outside data/train, or leave it out\.$",
            _two_classes_and(),
            check=_no_cache_in_train,
        )
    ),
]


# ---------------------------------------------------------------------------------------------
# ImageNet layouts


def _imagenet_with_unknown_val_label(work, earlier):
    write_imagenet(work / "data", {"n01": 1}, {"n01": 1}, "kaggle")
    with open(work / "data" / "LOC_val_solution.csv", "a") as f:
        f.write("ILSVRC2012_val_00000009,n09 0 0 1 1\n")
    write_image(work / "data" / "val" / "ILSVRC2012_val_00000009.JPEG", solid((1, 2, 3)))


def _solution_with(*rows):
    def prepare(work, earlier):
        write_imagenet(work / "data", {"n01": 1, "n02": 1}, {"n01": 1, "n02": 1}, "kaggle")
        with open(work / "data" / "LOC_val_solution.csv", "a") as f:
            f.write("".join(f"{row}\n" for row in rows))

    return prepare


IMAGENET = [
    Case(
        "no ImageNet",
        ["-ds", "ImageNet", "--data-dir", "data", "-ne", "1"],
        1,
        r"found no ImageNet in data: get ILSVRC-2012 from https://image-net\.org .* in data/imagenet/\.$",
        lambda work, earlier: (work / "data").mkdir(),
    ),
    Case(
        "val label not a class",
        ["prepare", "-ds", "ImageNet", "--data-dir", "data"],
        1,
        r"LOC_val_solution\.csv labels ILSVRC2012_val_00000009\.JPEG n09, which is not a class of train/",
        _imagenet_with_unknown_val_label,
    ),
    isolated(
        Case(
            "one image with two classes",
            ["prepare", "-ds", "ImageNet", "--data-dir", "data"],
            1,
            r"data/LOC_val_solution\.csv labels ILSVRC2012_val_00000001 "
            r"twice, n01 on line 2 and n02 on line 4; keep the "
            r"right line and remove the other\.$",
            _solution_with("ILSVRC2012_val_00000001,n02 0 0 7 7"),
        )
    ),
    isolated(
        Case(
            "label line beyond the bound",
            ["prepare", "-ds", "ImageNet", "--data-dir", "data"],
            1,
            r"data/LOC_val_solution\.csv line 4 is longer than 65,536 characters, which no line of the real file is; "
            r"replace it with the original\.$",
            _solution_with("ILSVRC2012_val_00000003,n01" + " 0 0 7 7 n01" * 6000),
        )
    ),
]


#: Every data row, in the order of the sections above.
CASES = [*READERS, *UNTRUSTED, *IMAGE_FOLDER, *IMAGENET]
