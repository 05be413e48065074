"""``PascalVOC2012``: JPEGs + XML, multi-label classification over 20 classes. Image lists and
annotations are checked (an id cannot name a path out of the VOC folder; XML with a DOCTYPE or
entities is refused); images are resized once (short side 256, centre 256x256) into the sharded
cache next to the data (``data.shards``)."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
import xml.parsers.expat
from pathlib import Path

import numpy as np
import torch

from data.archives import (
    download_archive,
    extract_archive,
    is_writable_dir,
    require_cache_dir,
    require_data_dir,
    short_hash,
    user_cache_dir,
)
from data.core import ALONE, DataError, DataOptions, DataSet, Peers, Split
from data.shards import shard_split
from utils import UnsafeName, printable, safe_child, short_reason

logger = logging.getLogger(__name__)


VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
VOC_CACHE_SIZE = 256


def _is_voc_folder(path: Path) -> bool:
    return (path / "Annotations").is_dir() and (path / "JPEGImages").is_dir()


def find_voc_folder(options: DataOptions) -> Path:
    """The ``VOC2012`` folder: ``<data-dir>/PascalVOC2012`` (the original v2 tool's layout, itself VOC2012 or a
    VOCdevkit root), ``<data-dir>/VOCdevkit/VOC2012``, or ``--data-dir`` being either; failing
    those, the official archive in ``--data-dir``, unpacked once. ``--download`` fetches it."""
    data_dir = options.data_path
    if options.download:
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        require_data_dir(data_dir, "Pascal VOC 2012 (PascalVOC2012/ or VOCdevkit/)")
    seed = data_dir / "PascalVOC2012"
    candidates = [
        seed,
        seed / "VOC2012",
        seed / "VOCdevkit" / "VOC2012",
        data_dir / "VOCdevkit" / "VOC2012",
        data_dir / "VOC2012",
        data_dir,
    ]
    for folder in candidates:
        if _is_voc_folder(folder):
            return folder
    archive = data_dir / VOC_URL.rsplit("/", 1)[-1]
    if not archive.is_file() and options.download:
        archive = download_archive(VOC_URL, VOC_MD5, data_dir, "Pascal VOC 2012")
    if archive.is_file():
        devkit = extract_archive(
            archive, "VOCdevkit", lambda f: _is_voc_folder(f / "VOC2012"), "Pascal VOC 2012", options.cache_path
        )
        return devkit / "VOC2012"
    raise DataError(
        f"found no Pascal VOC 2012 in {data_dir}: put the VOCdevkit/VOC2012 folder there as PascalVOC2012/ "
        "(or VOCdevkit/), with Annotations/, JPEGImages/ and ImageSets/Main/, or pass --download."
    )


def read_image_list(path: Path) -> list[str]:
    """Image ids of an ``ImageSets/Main/<split>.txt`` file (first column), each one checked by
    the project's one rule for names that become paths (``utils.safe_child``): an id names a
    file inside ``JPEGImages/`` and ``Annotations/``, never a path out of them. Read as
    ``utf-8-sig`` (a byte-order mark from a Windows editor is not part of the first id); CRLF
    line ends are whitespace to ``split``."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(
            f"cannot read image list {path} ({short_reason(error)}); replace it with the original."
        ) from None
    ids = []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words:
            continue
        try:
            safe_child(path.parent, words[0])  # the id itself, then the longest file name made from it
            safe_child(path.parent, f"{words[0]}.jpg")
        except UnsafeName as error:
            raise DataError(
                f"{path} line {number}: the image id {error}, so it cannot name a file in the VOC folder; fix the "
                "line or remove it."
            ) from None
        ids.append(words[0])
    if not ids:
        raise DataError(f"image list {path} is empty; replace it with the original from the VOC release.")
    return ids


def voc_image_lists(folder: Path) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
    """(name, ids) of the training and evaluation lists: train/val, else trainval/test."""
    main = folder / "ImageSets" / "Main"
    for train, test in (("train", "val"), ("trainval", "test")):
        if (main / f"{train}.txt").is_file() and (main / f"{test}.txt").is_file():
            if train == "trainval":
                logger.warning("%s has no train.txt/val.txt: training on trainval.txt, evaluating on test.txt", main)
            return (train, read_image_list(main / f"{train}.txt")), (test, read_image_list(main / f"{test}.txt"))
    raise DataError(
        f"{main} has neither train.txt + val.txt nor trainval.txt + test.txt; copy ImageSets from the release."
    )


class _Declaration(Exception):
    """Raised by the expat pre-pass at a DOCTYPE or entity declaration."""


def _refuse_declarations(data: bytes) -> None:
    """Raise ``_Declaration`` if the XML declares a DOCTYPE or an entity, found by the parser
    itself rather than by a byte search, so no encoding (UTF-16, a BOM, a declared charset)
    hides one. Other parse errors are left to the real parse, which reports them."""

    def refuse(*args: object) -> None:
        raise _Declaration

    parser = xml.parsers.expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError:
        pass


def parse_voc_xml(path: Path) -> np.ndarray:
    """The image's 20-class label vector: 1 if it has a non-difficult object of the class, 0 if
    all its objects of the class are difficult (ignored), -1 otherwise.

    Files with a DOCTYPE are refused: VOC annotations never have one, and entity declarations
    are how XML bombs (billion laughs) and external-entity reads are built.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path} ({short_reason(error)}); restore it from the VOC release.") from None
    try:
        _refuse_declarations(data)
    except _Declaration:
        raise DataError(
            f"{path} declares a DOCTYPE or entities, which VOC annotations never do; it was not parsed."
        ) from None
    try:
        root = ET.fromstring(data)
    except ET.ParseError as error:
        raise DataError(
            f"{path} is not well-formed XML ({short_reason(error)}); restore it from the VOC release."
        ) from None
    labels = np.full(len(VOC_CLASSES), -1, np.int8)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            shown = printable(repr(name[:40]))
            raise DataError(f"{path} names an unknown class {shown} (VOC has {', '.join(VOC_CLASSES)}); fix the file.")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        index = VOC_CLASSES.index(name)
        if not difficult:
            labels[index] = 1
        elif labels[index] == -1:
            labels[index] = 0
    return labels


def voc_cache_dir(folder: Path, options: DataOptions) -> Path:
    """``--cache-dir`` (checked: ``require_cache_dir``), else ``alexnet_cache/`` inside the VOC
    folder, else (read-only data) the user's cache folder."""
    if options.cache_path is not None:
        require_cache_dir(options.cache_path)
        return options.cache_path
    beside = folder / "alexnet_cache"
    if is_writable_dir(beside):
        return beside
    fallback = user_cache_dir() / f"voc2012-{short_hash(str(folder.resolve()))}"
    logger.warning("%s is read-only; keeping the resize cache in %s (choose with --cache-dir)", folder, fallback)
    return fallback


def load_voc_split(
    folder: Path, name: str, ids: list[str], cache_dir: Path, workers: int | None = None, peers: Peers = ALONE
) -> Split:
    """Labels from the XML files and images from the sharded cache (built by the ``peers``
    together) for one image list (its ids already checked by ``read_image_list``; ``safe_child``
    again here, since this is where they become paths)."""
    list_path = folder / "ImageSets" / "Main" / f"{name}.txt"
    jpegs, labels = [], []
    for image_id in ids:
        try:
            jpeg = safe_child(folder / "JPEGImages", f"{image_id}.jpg")
            xml = safe_child(folder / "Annotations", f"{image_id}.xml")
        except UnsafeName as error:
            raise DataError(
                f"{list_path}: the image id {printable(image_id)!r} "
                f"cannot name a file in the VOC folder ({error}); fix "
                "its line or remove it."
            ) from None
        for path in (jpeg, xml):
            if not path.is_file():
                raise DataError(
                    f"{list_path} names {image_id}, but {path} does not exist; restore it or remove the line."
                )
        jpegs.append(jpeg)
        labels.append(parse_voc_xml(xml))
    old = cache_dir / f"{name}_{VOC_CACHE_SIZE}.npy"
    if old.is_file():
        logger.info(
            "%s (the resize cache of earlier versions) is no longer used; delete it to free %.1f GB",
            old,
            old.stat().st_size / 1e9,
        )
    return shard_split(jpegs, torch.from_numpy(np.stack(labels)), cache_dir, name, VOC_CACHE_SIZE, workers, peers=peers)


def load_voc2012(options: DataOptions, peers: Peers = ALONE) -> DataSet:
    """Pascal VOC 2012 classification: 20 classes, multi-label, images at 256x256."""
    with peers.first():  # a download or an unpacking, once
        folder = find_voc_folder(options)
    (train_name, train_ids), (test_name, test_ids) = voc_image_lists(folder)
    cache_dir = voc_cache_dir(folder, options)
    train = load_voc_split(folder, train_name, train_ids, cache_dir, options.resize_workers or None, peers)
    test = load_voc_split(folder, test_name, test_ids, cache_dir, options.resize_workers or None, peers)
    logger.info(
        "Pascal VOC 2012 from %s: %d images in %s.txt, %d in %s.txt",
        folder,
        len(train),
        train_name,
        len(test),
        test_name,
    )
    return DataSet(name="PascalVOC2012", classes=list(VOC_CLASSES), train=train, test=test)
