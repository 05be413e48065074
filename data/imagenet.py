"""``ImageNet``: ILSVRC-2012 classification, 1,000 classes, read from the layouts users have.

The data cannot be downloaded by the tool (its licence asks each user to agree to the terms):
get it from https://image-net.org (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and the
devkit) or from Kaggle's "ImageNet Object Localization Challenge".

- ``<data-dir>/imagenet/``, ``<data-dir>/ILSVRC2012/`` or ``--data-dir`` itself holding
  ``train/<wnid>/*.JPEG`` (Kaggle's ``ILSVRC/Data/CLS-LOC/train/`` below any of them too);
- ``val/<wnid>/*.JPEG`` (torchvision's layout), or a flat ``val/`` labelled by Kaggle's
  ``LOC_val_solution.csv`` or by the devkit's ``ILSVRC2012_validation_ground_truth.txt`` (whose
  ILSVRC2012_IDs ``meta.mat`` maps to wnids: reading it needs scipy, an optional dependency).

The class index is the sorted-wnid order, the one torchvision's pretrained weights use. Where
``LOC_synset_mapping.txt`` (or the devkit's ``meta.mat``) is present, the classes are all 1,000
of it, so a sample of a few classes still gets their real indices; without it, the sorted
``train/`` folders. Images are resized once, the paper's way (short side 256, centre 256x256);
the modern evaluation then takes the centre 224 of that, which is torchvision's protocol
(resize 256, centre crop 224): the centre 224 of the centre 256 of an image resized to 256 is the
centre 224 of that image, since both crops are centred on the same pixel grid ((256 - 224) / 2 =
16 whole pixels each side, and the resized image's centre 256 starts at round((L - 256) / 2), so
centre 224 of it starts at round((L - 256) / 2) + 16 = round((L - 224) / 2) for every even and
odd L: torchvision's CenterCrop uses the same rounding).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from data.archives import require_data_dir
from data.core import ALONE, DataError, DataOptions, DataSet, Peers
from data.folders import (
    PAPER_SIZE,
    ImageLists,
    Skipped,
    cache_dir_for,
    class_folders,
    class_images,
    image_suffixes,
    lists_to_dataset,
    refuse_cache_inside,
    require_two_classes,
    take_subset,
    visible_files,
)
from utils import printable, short_reason

logger = logging.getLogger(__name__)

SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
WHERE = (
    'get ILSVRC-2012 from https://image-net.org or Kaggle\'s "ImageNet Object Localization Challenge" and put '
    "train/<wnid>/*.JPEG and val/ (class folders, or flat with LOC_val_solution.csv) in {}/imagenet/"
)


def find_imagenet_root(data_dir: Path) -> tuple[Path, list[Path]]:
    """(the folder holding ``train/`` and ``val/``, the folders to look for the label files in)."""
    require_data_dir(data_dir, "ImageNet (imagenet/train/<wnid>/*.JPEG)")
    for base in (data_dir / "imagenet", data_dir / "ILSVRC2012", data_dir):
        kaggle = base / "ILSVRC" / "Data" / "CLS-LOC"
        for images in (base, kaggle):
            if (images / "train").is_dir():
                devkit = [base / "ILSVRC2012_devkit_t12" / "data", base / "data"]
                return images, list(dict.fromkeys([images, base, *devkit]))
    raise DataError(f"found no ImageNet in {data_dir}: {WHERE.format(data_dir)}.")


def _find(name: str, folders: list[Path]) -> Path | None:
    return next((folder / name for folder in folders if (folder / name).is_file()), None)


#: The label files are read line by line within these bounds, far beyond the real files (the
#: 50,000-line ``LOC_val_solution.csv`` is about 3 MB, its longest line under 1 KB; the mapping is
#: 31 KB), so a crafted or damaged one (one line of a gigabyte) costs megabytes, not gigabytes.
MAX_LABEL_FILE_BYTES = 64 << 20
MAX_MAPPING_BYTES = 1 << 20
MAX_LINE_CHARS = 64 << 10


def _bounded_lines(path: Path, max_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) of a UTF-8 text file (a byte-order mark dropped),
    refused in one sentence when the file or one of its lines is beyond the bounds."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise DataError(
                    f"{path} is {size:,} bytes, more than the {max_bytes:,} a label file of ILSVRC-2012 may have "
                    "(the real one is a fraction of that); replace it with the original."
                )
            for number, line in enumerate(iter(lambda: f.readline(MAX_LINE_CHARS + 1), ""), 1):
                if len(line) > MAX_LINE_CHARS:
                    raise DataError(
                        f"{path} line {number} is longer than {MAX_LINE_CHARS:,} characters, which no line of the "
                        "real file is; replace it with the original."
                    )
                yield number, line.rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path} ({short_reason(error)}); replace it with the original.") from None


def read_synset_mapping(path: Path) -> dict[str, str]:
    """wnid -> first name of each line ``n01440764 tench, Tinca tinca`` (names made unique: two
    ILSVRC classes are both called "crane", two "maillot")."""
    names: dict[str, str] = {}
    for number, line in _bounded_lines(path, MAX_MAPPING_BYTES):
        wnid, _, rest = line.strip().partition(" ")
        if not wnid:
            continue
        if not (wnid.startswith("n") and wnid[1:].isdigit()):
            raise DataError(f"{path} line {number} does not start with a wnid (n01440764 ...); fix or replace it.")
        names[wnid] = rest.split(",")[0].strip() or wnid
    seen: dict[str, int] = {}
    for name in names.values():
        seen[name] = seen.get(name, 0) + 1
    return {w: (f"{n} ({w})" if seen[n] > 1 else n) for w, n in names.items()}


def read_devkit_meta(path: Path) -> tuple[dict[str, str], dict[int, str]]:
    """(wnid -> name, ILSVRC2012_ID -> wnid) of the 1,000 leaf synsets in the devkit's meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(
            f"{path} is a MATLAB file, which needs scipy: pip install scipy, or label val/ with class folders or "
            f"{VAL_SOLUTION} instead."
        ) from None
    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        ids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        names = {str(s["WNID"]): str(s["words"]).split(",")[0].strip() for s in leaves}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise DataError(
            f"{path} is not the ILSVRC-2012 devkit's meta.mat ({short_reason(error)}); replace it."
        ) from None
    return names, ids


def read_val_solution(path: Path, images: set[str]) -> dict[str, str]:
    """Image id -> wnid of Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the
    string ``wnid xmin ymin xmax ymax`` per object; every object of an image has its class), for
    the ids in ``images`` (the files of ``val/``: what is kept is bounded by them, not by the file).

    An image listed twice with different classes is refused, naming it: which label is right
    cannot be guessed. Listed twice with the same class, it is one label, and the repeats are
    counted in the log."""
    labels: dict[str, tuple[str, int]] = {}
    rows, repeats = 0, 0
    lines = (line for _, line in _bounded_lines(path, MAX_LABEL_FILE_BYTES))
    try:
        reader = csv.reader(lines)
        header = next(reader, [])
        for row in reader if header[:2] == ["ImageId", "PredictionString"] else ():
            words = row[1].split() if len(row) > 1 else []
            if not row or not row[0] or not words:
                continue
            rows += 1
            if row[0] not in images:
                continue
            seen = labels.get(row[0])
            if seen is None:
                labels[row[0]] = (words[0], reader.line_num)
            elif seen[0] != words[0]:
                raise DataError(
                    f"{path} labels {printable(row[0])} twice, {printable(seen[0])} on line {seen[1]} and "
                    f"{printable(words[0])} on line {reader.line_num}; keep the right line and remove the other."
                )
            else:
                repeats += 1
    except csv.Error as error:
        raise DataError(f"cannot read {path} ({short_reason(error)}); replace it with Kaggle's original.") from None
    if not rows:
        raise DataError(f"{path} has no ImageId,PredictionString rows; replace it with Kaggle's original.")
    if repeats:
        logger.warning(
            "%s lists %d images more than once, with the same class each time; each is labelled once", path, repeats
        )
    return {image: wnid for image, (wnid, _) in labels.items()}


def flat_val_images(val: Path) -> list[Path]:
    """The images of a flat ``val/``; what is left out is counted in the log."""
    suffixes = image_suffixes()
    skipped = Skipped()
    files = visible_files(val, skipped)
    images = [p for p in files if p.suffix.lower() in suffixes]
    skipped.not_images = len(files) - len(images)
    skipped.log(val)
    return images


def label_flat_val(val: Path, folders: list[Path], index: dict[str, int]) -> tuple[list[Path], list[int], str]:
    """(files, class indices, the label file used) of a flat ``val/``: by ``LOC_val_solution.csv``
    or, failing it, the devkit's ground truth (line i labels ``ILSVRC2012_val_<i:08d>``)."""
    paths = flat_val_images(val)
    if not paths:
        raise DataError(f"{val} holds no images; {WHERE.format(val.parent.parent)}.")
    solution = _find(VAL_SOLUTION, folders)
    stems = {path.stem for path in paths}
    if solution is not None:
        wnids = read_val_solution(solution, stems)
        used = solution
    else:
        truth, meta = _find(DEVKIT_GROUND_TRUTH, folders), _find(DEVKIT_META, folders)
        if truth is None or meta is None:
            raise DataError(
                f"{val} is flat but neither {VAL_SOLUTION} nor the devkit's {DEVKIT_GROUND_TRUTH} with {DEVKIT_META} "
                f"is beside it; put one there, or sort val/ into val/<wnid>/ folders."
            )
        _, id_wnid = read_devkit_meta(meta)
        wnids = {}
        for number, line in _bounded_lines(truth, MAX_LABEL_FILE_BYTES):
            if line.strip():
                if not line.strip().isdigit() or int(line) not in id_wnid:
                    raise DataError(f"{truth} line {number} is not an ILSVRC2012_ID of {meta}; replace the file.")
                stem = f"ILSVRC2012_val_{number:08d}"
                if stem in stems:
                    wnids[stem] = id_wnid[int(line)]
        used = truth
    labels = []
    for path in paths:
        wnid = wnids.get(path.stem)
        if wnid is None:
            raise DataError(f"{path} has no label in {used}; remove it or use the label file of the release.")
        if wnid not in index:
            raise DataError(
                f"{used} labels {path.name} {printable(wnid)}, which is not a class of train/ (nor of "
                f"{SYNSET_MAPPING}); add that class, or the mapping file."
            )
        labels.append(index[wnid])
    return paths, labels, used.name


def imagenet_lists(data_dir: Path, cache_dir: Path | None = None) -> ImageLists:
    """The files, labels and classes of an ImageNet tree (no image is opened); classes are
    names, in sorted-wnid order (wnids without a names file). ``cache_dir`` (``--cache-dir``) may
    not be inside ``train/`` or ``val/``."""
    root, folders = find_imagenet_root(data_dir)
    train_root, val = root / "train", root / "val"
    refuse_cache_inside(cache_dir, [train_root, val])
    train_wnids = class_folders(train_root)
    mapping, meta = _find(SYNSET_MAPPING, folders), _find(DEVKIT_META, folders)
    if mapping is not None:
        names = read_synset_mapping(mapping)
    elif meta is not None:
        names, _ = read_devkit_meta(meta)
    else:
        names = {w: w for w in train_wnids}
    wnids = sorted(names)
    index = {w: i for i, w in enumerate(wnids)}
    unknown = [w for w in train_wnids if w not in index]
    if unknown:
        raise DataError(
            f"{train_root} has class folders that {mapping or meta} does not list ({', '.join(unknown[:3])}); "
            "remove them, or the names file."
        )
    train_paths, train_labels = class_images(train_root, train_wnids, index)
    if not val.is_dir():
        raise DataError(f"{root} has train/ but no val/; {WHERE.format(data_dir)}.")
    val_wnids = class_folders(val)
    if val_wnids:
        unknown = [w for w in val_wnids if w not in index]
        if unknown:
            raise DataError(f"{val} has class folders that are not classes of train/ ({', '.join(unknown[:3])}).")
        test_paths, test_labels = class_images(val, val_wnids, index)
        source = "val/<wnid>/"
    else:
        test_paths, test_labels, label_file = label_flat_val(val, folders, index)
        source = f"val/ labelled by {label_file}"
    require_two_classes(train_root, [names[w] for w in wnids])
    return ImageLists([names[w] for w in wnids], train_paths, train_labels, test_paths, test_labels, source)


def load_imagenet(options: DataOptions, peers: Peers = ALONE) -> DataSet:
    """ILSVRC-2012 classification at 256x256 (the paper's preparation)."""
    if options.download:
        raise DataError(f"ImageNet cannot be downloaded by this tool (its licence): {WHERE.format(options.data_dir)}.")
    lists = take_subset(imagenet_lists(options.data_path, options.cache_path), options)
    root, _ = find_imagenet_root(options.data_path)
    logger.info(
        "ImageNet %s: %d classes, %d training images in %d class folders, %d evaluation images (%s)",
        root,
        len(lists.classes),
        len(lists.train_paths),
        len(set(lists.train_labels)),
        len(lists.test_paths),
        lists.test_source,
    )
    return lists_to_dataset("ImageNet", lists, cache_dir_for(root, options, "imagenet"), options, PAPER_SIZE, peers)
