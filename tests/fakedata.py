"""Writers of tiny data sets in the exact on-disk formats the real ones use.

- CIFAR: protocol-2 pickles as the official files were written by Python 2: bytes keys and
  strings as ``BINSTRING`` opcodes, numpy arrays through ``numpy.core.multiarray._reconstruct``,
  ``data`` a uint8 N x 3072 array in CHW row order, labels plain lists of ints.
- VOC: ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` as in the release, ``ImageSets/Main``.
- Crafted pickles (``Ops``): opcode by opcode, for the files a plain pickler would never write.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

_RECONSTRUCT = (getattr(np, "_core", None) or np.core).multiarray._reconstruct


class _Python2Pickler(pickle._Pickler):
    """The pure-Python pickler, writing bytes the way Python 2 wrote ``str``."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None) -> None:
        if obj is _RECONSTRUCT:  # numpy 2 calls the module numpy._core; the files say numpy.core
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def python2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def random_images(n: int, seed: int) -> np.ndarray:
    """n x 3 x 32 x 32 uint8 images."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(folder: Path, per_batch: int = 3, n_test: int = 4, seed: int = 0) -> dict:
    """An official-format ``cifar-10-batches-py`` folder; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_images, train_labels = [], []
    for i in range(1, 6):
        images = random_images(per_batch, seed + i)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": labels,
            b"data": images.reshape(per_batch, 3072),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
        (folder / f"data_batch_{i}").write_bytes(python2_pickle(batch))
        train_images.append(images)
        train_labels += labels
    test_images = random_images(n_test, seed + 99)
    test_labels = rng.integers(0, 10, n_test).tolist()
    test = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": test_labels,
        b"data": test_images.reshape(n_test, 3072),
        b"filenames": [b"t.png"] * n_test,
    }
    (folder / "test_batch").write_bytes(python2_pickle(test))
    meta = {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(python2_pickle(meta))
    return {
        "train_images": np.concatenate(train_images),
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }


def write_cifar100(folder: Path, n_train: int = 7, n_test: int = 5, seed: int = 0) -> dict:
    """An official-format ``cifar-100-python`` folder; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        images = random_images(n, seed + len(name))
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        batch = {
            b"filenames": [b"x.png"] * n,
            b"batch_label": name.encode(),
            b"fine_labels": fine,
            b"coarse_labels": coarse,
            b"data": images.reshape(n, 3072),
        }
        (folder / name).write_bytes(python2_pickle(batch))
        written[name] = (images, fine, coarse)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(python2_pickle(meta))
    return written


def tar_gz(folder: Path, archive: Path) -> None:
    """Pack ``folder`` (under its own name) as the official archives are packed."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def voc_xml(filename: str, width: int, height: int, objects: list[tuple[str, bool]]) -> str:
    """An annotation in the release's layout; objects are (class name, difficult)."""
    header = (
        f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{filename}</filename>\n"
        "\t<source>\n\t\t<database>The VOC2007 Database</database>\n\t</source>\n"
        "\t<owner>\n\t\t<name>Some Owner</name>\n\t</owner>\n"
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
        "\t<segmented>0</segmented>\n"
    )
    parts = [header]
    for name, difficult in objects:
        parts.append(
            f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
            f"\t\t<difficult>{int(difficult)}</difficult>\n"
            "\t\t<bndbox>\n\t\t\t<xmin>1</xmin>\n\t\t\t<ymin>1</ymin>\n\t\t\t<xmax>20</xmax>\n\t\t\t<ymax>20</ymax>\n"
            "\t\t</bndbox>\n"
        )
        if name == "person":  # person layout parts carry <name> tags of their own
            parts.append("\t\t<part>\n\t\t\t<name>head</name>\n\t\t</part>\n")
        parts.append("\t</object>\n")
    parts.append("</annotation>\n")
    return "".join(parts)


def write_voc(
    root: Path, annotations: dict[str, list[tuple[str, bool]]], lists: dict[str, list[str]], seed: int = 0
) -> Path:
    """A ``VOC2012`` folder at ``root`` with one JPEG and XML per image id and the given
    ``ImageSets/Main/<name>.txt`` lists."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (image_id, objects) in enumerate(annotations.items()):
        width, height = (500, 375) if i % 2 == 0 else (333, 500)
        yy, xx = np.mgrid[0:height, 0:width]
        base = rng.integers(0, 200, 3)
        pixels = np.stack([(base[c] + (xx * (c + 1) + yy * (3 - c)) // 8) % 256 for c in range(3)], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", width, height, objects))
    for name, ids in lists.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def small_voc(data: Path, classes: Sequence[str] = ("dog", "cat", "person"), year: int = 2010, train: int = 2) -> Path:
    """``data/PascalVOC2012`` with an image for each of ``classes``, holding one object of it (not
    difficult), ids ``<year>_000000``, ...: the first ``train`` in train.txt, the rest in val.txt."""
    annotations = {f"{year}_{i:06d}": [(c, False)] for i, c in enumerate(classes)}
    ids = list(annotations)
    return write_voc(data / "PascalVOC2012", annotations, {"train": ids[:train], "val": ids[train:]})


# ---------------------------------------------------------------------------------------------
# Crafted pickles: what an attacker writes by hand


class Ops:
    """A tiny protocol-2 pickle assembler: each method appends one opcode and returns ``self``,
    so a crafted file reads as the program it is, e.g.
    ``Ops().glob("numpy", "dtype").text("u1").int(0).int(1).tuple3().reduce()``."""

    def __init__(self) -> None:
        self.out = bytearray(pickle.PROTO + b"\x02")

    def op(self, code: bytes, arg: bytes = b"") -> Ops:
        self.out += code + arg
        return self

    def glob(self, module: str, name: str) -> Ops:
        return self.op(pickle.GLOBAL, f"{module}\n{name}\n".encode())

    def bytes(self, data: bytes) -> Ops:  # Python 2's str, read as bytes
        if len(data) < 256:
            return self.op(pickle.SHORT_BINSTRING, bytes([len(data)]) + data)
        return self.op(pickle.BINSTRING, struct.pack("<i", len(data)) + data)

    def text(self, value: str) -> Ops:
        data = value.encode("utf-8", "surrogatepass")
        return self.op(pickle.BINUNICODE, struct.pack("<I", len(data)) + data)

    def int(self, n: int) -> Ops:
        return self.op(pickle.BININT1, bytes([n])) if 0 <= n < 256 else self.op(pickle.BININT, struct.pack("<i", n))

    def none(self) -> Ops:
        return self.op(pickle.NONE)

    def false(self) -> Ops:
        return self.op(pickle.NEWFALSE)

    def true(self) -> Ops:
        return self.op(pickle.NEWTRUE)

    def mark(self) -> Ops:
        return self.op(pickle.MARK)

    def tuple(self) -> Ops:
        return self.op(pickle.TUPLE)

    def tuple1(self) -> Ops:
        return self.op(pickle.TUPLE1)

    def tuple2(self) -> Ops:
        return self.op(pickle.TUPLE2)

    def tuple3(self) -> Ops:
        return self.op(pickle.TUPLE3)

    def reduce(self) -> Ops:
        return self.op(pickle.REDUCE)

    def build(self) -> Ops:
        return self.op(pickle.BUILD)

    def dict(self) -> Ops:
        return self.op(pickle.EMPTY_DICT)

    def list(self) -> Ops:
        return self.op(pickle.EMPTY_LIST)

    def setitems(self) -> Ops:
        return self.op(pickle.SETITEMS)

    def appends(self) -> Ops:
        return self.op(pickle.APPENDS)

    def put(self, i: int) -> Ops:
        return self.op(pickle.LONG_BINPUT, struct.pack("<I", i))

    def get(self, i: int) -> Ops:
        return self.op(pickle.LONG_BINGET, struct.pack("<I", i))

    def done(self) -> bytes:
        return bytes(self.out + pickle.STOP)

    # Pieces numpy writes

    def dtype(self, code: str = "u1", order: str = "|", copy: bool = True) -> Ops:
        """``numpy.dtype(code, False, copy)`` and its state, as numpy pickles it."""
        self.glob("numpy", "dtype").text(code).false().op(pickle.NEWTRUE if copy else pickle.NEWFALSE).tuple3()
        return self.reduce().mark().int(3).text(order).none().none().none().int(-1).int(-1).int(0).tuple().build()

    def shape(self, shape: tuple[int, ...]) -> Ops:
        self.mark()
        for n in shape:
            self.int(n)
        return self.tuple()

    def reconstruct(self) -> Ops:
        """``_reconstruct(ndarray, (0,), b"b")``: an empty array waiting for its state."""
        self.glob("numpy.core.multiarray", "_reconstruct").glob("numpy", "ndarray").int(0).tuple1().bytes(b"b")
        return self.tuple3().reduce()

    def array(self, shape: tuple[int, ...], raw: Callable[[Ops], Ops], code: str = "u1", order: str = "|") -> Ops:
        """An array as numpy pickles it, its raw bytes pushed by ``raw`` (a literal, a memo get)."""
        self.reconstruct().mark().int(1).shape(shape).dtype(code, order).false()
        return raw(self).tuple().build()

    def batch(self, data: Callable[[Ops], Ops], labels: Callable[[Ops], Ops]) -> bytes:
        """``{b"data": ..., b"labels": ...}``, the two values pushed by the callables."""
        self.dict().mark().bytes(b"data")
        data(self)
        self.bytes(b"labels")
        labels(self)
        return self.setitems().done()


def zero_stride_batch(n: int) -> bytes:
    """A batch of ``n`` images and labels conjured from one byte: ``ndarray(shape, dtype, buffer,
    offset, strides)`` with strides of 0 (a few hundred bytes whatever ``n``)."""

    return Ops().batch(lambda o: _ndarray_call(o, (n, 3072)), lambda o: _ndarray_call(o, (n,)))


def _ndarray_call(ops: Ops, shape: tuple[int, ...]) -> Ops:
    """``numpy.ndarray(shape, dtype("u1"), b"\x00", 0, (0, ...))``: every element the same byte."""
    ops.glob("numpy", "ndarray").mark().shape(shape).dtype().bytes(b"\x00").int(0).shape((0,) * len(shape))
    return ops.tuple().reduce()


def stateless_batch(n: int) -> bytes:
    """A batch whose arrays come from ``_reconstruct(ndarray, shape, dtype)`` with no state after
    it: numpy hands out ``n`` images and labels of uninitialised memory, backed by no bytes."""

    def empty(shape: tuple[int, ...]) -> Callable[[Ops], Ops]:
        glob = ("numpy.core.multiarray", "_reconstruct")
        return lambda o: o.glob(*glob).glob("numpy", "ndarray").shape(shape).dtype().tuple3().reduce()

    return Ops().batch(empty((n, 3072)), empty((n,)))


def codec_chain(levels: int, seed: int = 200) -> bytes:
    """``_codecs.encode`` applied ``levels`` times with the hex codec to ``seed`` bytes: each call
    doubles the bytes, so a file of a few hundred bytes asks for ``seed * 2**levels``."""
    ops = Ops().dict().mark().bytes(b"data")
    for _ in range(levels):
        ops.glob("_codecs", "encode")
    ops.bytes(b"x" * seed)
    for _ in range(levels):
        ops.text("hex").tuple2().reduce()
    return ops.bytes(b"labels").list().setitems().done()


def memo_reuse_batch(copies: int, rows: int = 100) -> bytes:
    """One ``rows`` x 3072 block of bytes, memoised once and given to the data array and to
    ``copies`` more arrays (the labels list): about ``rows * 3072`` bytes of file, ``copies``
    times that of arrays once a reader copies them (``np.asarray`` of the labels does)."""
    block = Ops().bytes(b"\x07" * rows * 3072).put(0).op(pickle.POP)  # memoised, then off the stack
    ops = block.dict().mark().bytes(b"data").array((rows, 3072), lambda o: o.get(0)).bytes(b"labels").list().mark()
    for _ in range(copies):
        ops.array((rows, 3072), lambda o: o.get(0))
    return ops.appends().setitems().done()


def write_photos(
    folder: Path, count: int, seed: int = 0, sizes: Sequence[tuple[int, int]] = ((40, 30), (24, 48), (32, 32))
) -> list[Path]:
    """``count`` small smooth pictures (gradients plus a few blobs, which JPEG keeps well, as it
    does photos) of the given (width, height) in turn, alternately JPEG and PNG, in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        channels = []
        for _ in range(3):
            a, b, c = rng.uniform(-3, 3, 3)
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            blob = 80 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.1 * width * height))
            channels.append(128 + a * x + b * y + c + blob - 40)
        pixels = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
        path = folder / (f"{i:04d}.jpg" if i % 2 == 0 else f"{i:04d}.png")
        Image.fromarray(pixels).save(path, **({"quality": 95} if i % 2 == 0 else {}))
        paths.append(path)
    return paths


# Image folders (ImageFolder, ImageNet): real JPEG and PNG files a few pixels wide.

#: EXIF tag 0x0112: 6 means "rotate 90 degrees clockwise to show" (a phone held upright).
EXIF_ORIENTATION = 0x0112


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, colour)


def write_image(path: Path, image: Image.Image, fmt: str = "JPEG", orientation: int | None = None) -> Path:
    """``image`` saved as ``fmt`` whatever ``path``'s name says (a PNG named .JPEG, as in
    ImageNet); JPEGs at quality 95, with an EXIF orientation tag when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"quality": 95} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        extra["exif"] = exif
    image.save(path, fmt, **extra)
    return path


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct solid colour per class, so a decoded image says which class it came from."""
    return (40 * (index % 6) + 20, 255 - 50 * (index % 5), 90 + 30 * (index % 4))


def write_class_folders(root: Path, counts: dict[str, int], suffix: str = ".jpg", size: int = 8) -> list[Path]:
    """``root/<class>/<class>_<i><suffix>``: ``counts[class]`` solid images per class, each in
    its class's colour (JPEG or PNG by ``suffix``); the paths written, in sorted order."""
    paths = []
    for index, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            fmt = "PNG" if suffix.lower() == ".png" else "JPEG"
            image = solid(class_colour(index), (size, size))
            paths.append(write_image(root / name / f"{name}_{i}{suffix}", image, fmt))
    return paths


def write_imagenet(
    root: Path,
    train: dict[str, int],
    val: dict[str, int],
    layout: str = "folders",
    mapping: Sequence[str] | None = None,
) -> dict[str, str]:
    """A tiny ILSVRC-2012 tree in ``root``: ``train/<wnid>/<wnid>_<i>.JPEG`` and ``val/`` as
    ``layout`` says: ``folders`` (``val/<wnid>/``), ``kaggle`` (flat, ``LOC_val_solution.csv``) or
    ``devkit`` (flat, ``ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat``, needs scipy).
    ``mapping``: the wnids of ``LOC_synset_mapping.txt`` (written in the order given). Val images
    are numbered in sorted-wnid order; returns val file stem -> wnid."""
    for wnid, n in train.items():
        for i in range(n):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", solid(class_colour(i)))
    val_wnids = {}
    for wnid in sorted(val):
        for _ in range(val[wnid]):
            stem = f"ILSVRC2012_val_{len(val_wnids) + 1:08d}"
            val_wnids[stem] = wnid
            folder = root / "val" / wnid if layout == "folders" else root / "val"
            write_image(folder / f"{stem}.JPEG", solid(class_colour(len(val_wnids))))
    if mapping is not None:
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w[1:]}, other name\n" for w in mapping))
    if layout == "kaggle":
        rows = "".join(f"{stem},{wnid} 0 0 7 7 {wnid} 1 1 5 5 \n" for stem, wnid in val_wnids.items())
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + rows)
    elif layout == "devkit":
        from scipy.io import savemat

        # The devkit numbers the 1,000 leaf synsets in its own order (not sorted by wnid), then
        # the inner ones; the ground truth holds those numbers.
        wnids = sorted(set(train) | set(val), reverse=True)
        ids = {w: i + 1 for i, w in enumerate(wnids)}
        records = [(ids[w], w, f"class {w[1:]}, other name", 0) for w in wnids]
        records.append((len(wnids) + 1, "n00001740", "entity", 3))
        fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        synsets = np.array(records, dtype=fields)
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        savemat(str(data / "meta.mat"), {"synsets": synsets})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in val_wnids.values()))
    return val_wnids


# Crafted images and archives: what a header or an entry claims, not what it holds.


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1-bit greyscale PNG of ``width`` x ``height`` zero pixels, written row by row (never
    the whole image in memory): 13000 x 13000 is 20 KB on disk and 169 megapixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # the filter byte, then the row's bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def add_tar_entry(
    tar: tarfile.TarFile, name: str, data: bytes = b"", link: str | None = None, kind: bytes = tarfile.SYMTYPE
) -> None:
    """An entry written as a crafted archive holds it: a file of ``data``, or with ``link`` a
    link of ``kind`` (symbolic, or ``tarfile.LNKTYPE``: hard) to it; ``tarfile.FIFOTYPE`` a FIFO."""
    info = tarfile.TarInfo(name)
    if link is not None or kind == tarfile.FIFOTYPE:
        info.type, info.linkname = kind, link or ""
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
