"""Writers of tiny data sets in the exact on-disk formats the real ones use.

- CIFAR: protocol-2 pickles as the official files were written by Python 2: bytes keys and
  strings as ``BINSTRING`` opcodes, numpy arrays through ``numpy.core.multiarray._reconstruct``,
  ``data`` a uint8 N x 3072 array in CHW row order, labels plain lists of ints.
- VOC: ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` as in the release, ``ImageSets/Main``.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
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
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels,
            b"data": test_images.reshape(n_test, 3072), b"filenames": [b"t.png"] * n_test}  # fmt: skip
    (folder / "test_batch").write_bytes(python2_pickle(test))
    meta = {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(python2_pickle(meta))
    return {
        "train_images": np.concatenate(train_images), "train_labels": train_labels,
        "test_images": test_images, "test_labels": test_labels,
    }  # fmt: skip


def write_cifar100(folder: Path, n_train: int = 7, n_test: int = 5, seed: int = 0) -> dict:
    """An official-format ``cifar-100-python`` folder; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        images = random_images(n, seed + len(name))
        fine = rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
                 b"coarse_labels": coarse, b"data": images.reshape(n, 3072)}  # fmt: skip
        (folder / name).write_bytes(python2_pickle(batch))
        written[name] = (images, fine, coarse)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}  # fmt: skip
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


def write_voc(root: Path, annotations: dict[str, list[tuple[str, bool]]], lists: dict[str, list[str]],
              seed: int = 0) -> Path:  # fmt: skip
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
