"""``ImageFolder``: the user's own images, one folder per class, in any format Pillow reads.

Layouts: ``<data-dir>/train/<class>/*`` with ``<data-dir>/val/<class>/*`` (or ``valid/``, or
``test/``: the first present, logged), or a single ``<data-dir>/<class>/*`` split here,
stratified and reproducibly, by ``--val-fraction``. Classes are the sorted folder names.

Finding the files, their labels, the split and the training subset are pure functions of the
folder tree (``image_folder_lists``, ``stratified_split``, ``stratified_subset``); only the last
step (``lists_to_dataset``) decodes anything, through the resize cache (``data.shards``). The
ImageNet reader (``data.imagenet``) shares these steps.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.archives import is_writable_dir, require_cache_dir, require_data_dir, short_hash, user_cache_dir
from data.core import ALONE, DataError, DataOptions, DataSet, Peers
from data.shards import shard_split
from utils import printable, short_reason

logger = logging.getLogger(__name__)

#: The paper's stored size (short side 256, centre 256x256), for the 224-input networks.
PAPER_SIZE = 256
#: The split and the subset are drawn from this fixed seed, never from --seed: runs that differ
#: only in --seed then train and evaluate on the same images, so their spread measures the
#: training, and no evaluation image is ever trained on by a run with another seed.
SPLIT_SEED = 0
#: Evaluation folders tried, in order, beside ``train/``.
EVAL_FOLDERS = ("val", "valid", "test")


@dataclass
class ImageLists:
    """What a folder reader found: class names (index order), the image files of each split
    with their class indices, and where the evaluation split came from (for the log)."""

    classes: list[str]
    train_paths: list[Path]
    train_labels: list[int]
    test_paths: list[Path]
    test_labels: list[int]
    test_source: str

    def subset(self, keep: np.ndarray) -> ImageLists:
        """The same lists with only the training images at indices ``keep``."""
        return ImageLists(
            self.classes,
            [self.train_paths[i] for i in keep],
            [self.train_labels[i] for i in keep],
            self.test_paths,
            self.test_labels,
            self.test_source,
        )


def image_suffixes() -> frozenset[str]:
    """File name endings Pillow opens (lower case, with the dot): ``.jpg``, ``.png``, ``.webp``..."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


#: The resize cache's default folder inside the data folder (``cache_dir_for``). In the layout
#: without ``train/`` it sits among the class folders, and is left out by its identity (this very
#: folder, not any folder of that name).
CACHE_FOLDER = "alexnet_cache"


@dataclass
class Skipped:
    """What a listing left out or took beyond the plain case, counted for one log line each."""

    not_images: int = 0  # files Pillow has no format for, by their name endings
    not_regular: int = 0  # FIFOs, sockets, devices, broken links: never opened
    revisited: int = 0  # links to a folder already read, or holding the class folder (a loop)
    nested: int = 0  # images in subfolders of a class folder, taken

    def log(self, root: Path) -> None:
        if self.not_images:
            logger.warning("%s: skipped %d files that are not images (by their name endings)", root, self.not_images)
        if self.not_regular:
            logger.warning(
                "%s: skipped %d entries that are not regular files (FIFOs, sockets, devices or broken links), "
                "which are never opened",
                root,
                self.not_regular,
            )
        if self.revisited:
            logger.warning(
                "%s: skipped %d links to folders already read or holding their class folder (a loop)",
                root,
                self.revisited,
            )
        if self.nested:
            logger.info(
                "%s: took %d images from subfolders of class folders (as torchvision's ImageFolder does)",
                root,
                self.nested,
            )


def _entries(folder: Path, role: str) -> list[os.DirEntry]:
    """The entries of ``folder`` (hidden ones left out: .DS_Store, ._photo.jpg, .ipynb_checkpoints).
    A folder that cannot be read is refused rather than skipped: skipping it would silently drop
    its images, or a whole class (``role`` says what it is, for the sentence)."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except OSError as error:
        raise DataError(
            f"cannot read {folder} ({short_reason(error.strerror or error)}), {role}; give this user read access to "
            "it, or move it out of the data folder."
        ) from None


def _kind(entry: os.DirEntry) -> str:
    """What an entry is, following links: "dir", "file" (a regular file) or "other". ``os.scandir``
    knows most entries' kinds without a ``stat`` each: ImageNet's training set is 1.28 M files."""
    try:
        return "file" if entry.is_file() else "dir" if entry.is_dir() else "other"  # files first: most are
    except OSError as error:  # a link into a folder this user may not read
        raise DataError(
            f"cannot read {entry.path} ({short_reason(error.strerror or error)}); give this user read access to it, or "
            "remove it."
        ) from None


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def visible_files(folder: Path, skipped: Skipped | None = None) -> list[Path]:
    """The regular files in ``folder`` (hidden ones left out), sorted by name; the entries that
    are neither files nor folders are counted in ``skipped``."""
    names = []
    for entry in _entries(folder, "a folder of the data set"):
        kind = _kind(entry)
        if kind == "file":
            names.append(entry.name)
        elif kind == "other" and skipped is not None:
            skipped.not_regular += 1
    return [folder / name for name in sorted(names)]  # sorted as text: comparing Paths is 10x slower


def folders_above(root: Path) -> frozenset[tuple[int, int]]:
    """The identities of ``root`` and every folder that holds it: a link to one of them from a
    class folder would read the other classes (or the whole disk) into this one."""
    return identities([root, *root.resolve().parents])


def images_under(
    folder: Path, name: str, suffixes: frozenset[str], skipped: Skipped, above: frozenset[tuple[int, int]]
) -> list[Path]:
    """The image files under the class folder ``folder`` (of class ``name``), subfolders included,
    sorted by their path in it. Hidden entries are left out; files without one of ``suffixes``
    (the name endings Pillow opens), entries that are not regular files, links not followed and
    images in subfolders are counted in ``skipped``.

    Subfolders are read as torchvision's ImageFolder reads them (photos sorted into one folder
    per day or per camera stay in their class). Links are followed, but neither to a folder already
    read nor to one in ``above`` (the split's folder and those holding it: ``folders_above``), so a
    link back up cannot loop or read other classes. Only regular files are listed: a FIFO named
    ``x.jpg`` would block the first read of it."""
    seen = {_identity(folder.stat()), *above}
    found: list[str] = []
    pending = [("", folder)]
    while pending:
        prefix, current = pending.pop()
        role = (
            f"a subfolder of class {name}, whose images would be left out"
            if prefix
            else f"the folder of class {name}, which would be left out"
        )
        for entry in _entries(current, role):
            kind = _kind(entry)
            if kind == "dir":
                key = _identity(entry.stat())
                if key in seen:
                    skipped.revisited += 1
                else:
                    seen.add(key)
                    pending.append((f"{prefix}{entry.name}/", Path(entry.path)))
            elif kind == "other":
                skipped.not_regular += 1
            elif entry.name[entry.name.rfind(".") :].lower() not in suffixes:  # no dot: a last letter, never a suffix
                skipped.not_images += 1
            else:
                found.append(prefix + entry.name)
                skipped.nested += bool(prefix)
    return [folder / relative for relative in sorted(found)]  # sorted as text: comparing Paths is 10x slower


def class_folders(root: Path, leave_out: frozenset[tuple[int, int]] = frozenset()) -> list[str]:
    """The sorted names of the class folders in ``root``: hidden ones, and the folders whose
    identity (device, inode) is in ``leave_out`` (the resize cache), left out."""
    names = []
    for entry in _entries(root, "a folder of class folders"):
        if _kind(entry) == "dir" and (not leave_out or _identity(entry.stat()) not in leave_out):
            names.append(entry.name)
    return sorted(names)


def class_images(root: Path, classes: list[str], index: dict[str, int]) -> tuple[list[Path], list[int]]:
    """The image files under ``root/<class>/`` (subfolders included: ``images_under``) for each of
    ``classes``, with the class index ``index`` gives them. Files Pillow has no format for, and
    entries that are not regular files, are skipped with a count; images in subfolders are
    counted in the log; a class folder without any image is one sentence naming it."""
    if not classes:
        raise DataError(f"{root} holds no class folders; put each class's images in {root}/<class>/.")
    suffixes = image_suffixes()
    skipped = Skipped()
    above = folders_above(root)
    paths, labels, empty = [], [], []
    for name in classes:
        images = images_under(root / name, name, suffixes, skipped, above)
        if not images:
            empty.append(name)
        paths.extend(images)
        labels.extend([index[name]] * len(images))
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise DataError(
            f"{len(empty)} class folders in {root} hold no image files ({shown}); add images or remove the folders."
        )
    skipped.log(root)
    return paths, labels


def require_two_classes(root: Path, classes: list[str]) -> None:
    """A data set of one class trains to a top-1 of 100 % and says nothing: refused."""
    if len(classes) == 1:
        raise DataError(
            f"{root} has one class folder ({printable(classes[0])}); a classifier needs at least two classes, so add "
            "a folder of images for each other class."
        )


def refuse_cache_inside(cache: Path | None, splits: list[Path]) -> None:
    """A ``--cache-dir`` inside a folder whose subfolders are read as classes (or images) would be
    read as one on the next run: refused, naming both."""
    if cache is None:
        return
    where = cache.resolve()
    for split in splits:
        folder = split.resolve()
        if where == folder or folder in where.parents:
            raise DataError(
                f"--cache-dir {cache} is inside {split}, whose subfolders are read as classes, so the cache would "
                f"become one; pass a --cache-dir outside {split}, or leave it out."
            )


def identities(folders: list[Path]) -> frozenset[tuple[int, int]]:
    """The (device, inode) of each of ``folders`` that exists."""
    found = set()
    for folder in folders:
        try:
            found.add(_identity(folder.stat()))
        except OSError:
            pass
    return frozenset(found)


def class_members(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, its indices in ascending order) for each class present, in one sort rather than
    one pass over the labels per class (1,000 passes over 1.28 M labels for ImageNet)."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return [(int(c), members) for c, members in zip(classes, np.split(order, starts[1:]), strict=False)]


def stratified_split(labels: list[int], fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: in each class, ``round(fraction * n)`` images (at least one where the
    class has two or more) go to val, chosen by a generator seeded with ``seed`` and the class
    index, so a class's share does not change when other classes are added. Both sorted."""
    labels_np = np.asarray(labels, dtype=np.int64)
    val = []
    for c, members in class_members(labels_np):
        n = len(members)
        k = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        order = np.random.default_rng([seed, c]).permutation(n)
        val.extend(members[order[:k]].tolist())
    is_val = np.zeros(len(labels_np), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def stratified_subset(labels: list[int], fraction: float = 1.0, size: int = 0, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of a class-stratified subset: ``size`` images when ``size`` > 0, else
    ``fraction`` of them. Each class keeps its share (the rounding remainders go to the classes
    with the largest ones, ties to the lower index) and at least one image; the images kept are
    the first of a permutation seeded with ``seed`` and the class index, so a class's larger share
    holds its smaller one."""
    labels_np = np.asarray(labels, dtype=np.int64)
    total = len(labels_np)
    want = min(size, total) if size > 0 else fraction * total
    groups = class_members(labels_np)
    counts = np.array([len(members) for _, members in groups])
    exact = counts * want / total
    quota = np.floor(exact).astype(np.int64)
    left = round(want) - int(quota.sum())
    if left > 0:
        quota[np.argsort(-(exact - quota), kind="stable")[:left]] += 1
    quota = np.clip(quota, 1, counts)
    keep = []
    for (c, members), k in zip(groups, quota, strict=False):
        keep.extend(members[np.random.default_rng([seed, c]).permutation(len(members))[:k]].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


def subset_tag(options: DataOptions) -> str:
    """How a training subset is named in the cache ("" for the whole split)."""
    if options.train_size > 0:
        return f"-n{options.train_size}"
    return f"-f{options.train_fraction:g}" if options.train_fraction < 1 else ""


def take_subset(lists: ImageLists, options: DataOptions) -> ImageLists:
    """The lists with the training subset ``--train-fraction`` / ``--train-size`` chose."""
    if not subset_tag(options):
        return lists
    keep = stratified_subset(lists.train_labels, options.train_fraction, options.train_size)
    logger.info(
        "training on a class-stratified subset: %d of %d images (fixed seed %d)",
        len(keep),
        len(lists.train_labels),
        SPLIT_SEED,
    )
    return lists.subset(keep)


def image_folder_lists(data_dir: Path, val_fraction: float, cache_dir: Path | None = None) -> ImageLists:
    """The files, labels and classes of an ImageFolder tree (no image is opened).

    With ``train/``, the evaluation split is the first of ``val/``, ``valid/``, ``test/`` that
    exists; its classes must be among the training ones. Without it, every folder is a class and
    ``stratified_split`` holds out ``val_fraction`` of each. ``cache_dir`` (``--cache-dir``) may not
    be inside a folder whose subfolders are classes; the default cache among the class folders
    (``CACHE_FOLDER``) is left out by its identity. One class is refused."""
    require_data_dir(data_dir, "one folder of images per class")
    train_root = data_dir / "train"
    if train_root.is_dir():
        found = next((data_dir / name for name in EVAL_FOLDERS if (data_dir / name).is_dir()), None)
        refuse_cache_inside(cache_dir, [train_root] + ([found] if found is not None else []))
        classes = class_folders(train_root)
        index = {name: i for i, name in enumerate(classes)}
        train_paths, train_labels = class_images(train_root, classes, index)
        if found is None:
            raise DataError(
                f"{data_dir} has train/ but no val/, valid/ or test/; add one with the same class folders, or put the "
                "class folders directly in the data folder to split them by --val-fraction."
            )
        eval_classes = class_folders(found)
        unknown = sorted(set(eval_classes) - set(classes))
        if unknown:
            raise DataError(
                f"{found} has class folders that train/ lacks ({', '.join(unknown[:3])}); the classes are the folders "
                "of train/, so add them there or remove them."
            )
        test_paths, test_labels = class_images(found, eval_classes, index)
        require_two_classes(train_root, classes)
        if val_fraction != DataOptions.val_fraction:
            logger.warning(
                "--val-fraction %g is unused: %s has its own %s/, which is the evaluation split",
                val_fraction,
                data_dir,
                found.name,
            )
        return ImageLists(classes, train_paths, train_labels, test_paths, test_labels, f"{found.name}/")
    default = data_dir / CACHE_FOLDER
    if cache_dir is None or cache_dir.resolve() != default.resolve():
        refuse_cache_inside(cache_dir, [data_dir])
    classes = class_folders(data_dir, identities([default]))
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = class_images(data_dir, classes, index)
    require_two_classes(data_dir, classes)
    train, val = stratified_split(labels, val_fraction)
    if len(val) == 0:
        raise DataError(f"{data_dir} has too few images to hold out a validation split; add images to each class.")
    return ImageLists(
        classes,
        [paths[i] for i in train],
        [labels[i] for i in train],
        [paths[i] for i in val],
        [labels[i] for i in val],
        f"{val_fraction:g} of each class, held out",
    )


def cache_dir_for(root: Path, options: DataOptions, tag: str) -> Path:
    """``--cache-dir`` (checked: ``require_cache_dir``), else ``alexnet_cache/`` inside ``root``,
    else (read-only data) the user's cache folder."""
    if options.cache_path is not None:
        require_cache_dir(options.cache_path)
        return options.cache_path
    beside = root / CACHE_FOLDER
    if is_writable_dir(beside):
        return beside
    fallback = user_cache_dir() / f"{tag}-{short_hash(str(root.resolve()))}"
    logger.warning("%s is read-only; keeping the resize cache in %s (choose with --cache-dir)", root, fallback)
    return fallback


def lists_to_dataset(
    name: str, lists: ImageLists, cache_dir: Path, options: DataOptions, size: int, peers: Peers = ALONE
) -> DataSet:
    """The data set of ``lists`` with its images from the resize cache at ``size`` (built once,
    by the ``peers`` together)."""
    tag = subset_tag(options)
    workers = options.resize_workers or None
    labels = torch.tensor(lists.train_labels, dtype=torch.int64)
    train = shard_split(lists.train_paths, labels, cache_dir, f"train{tag}", size, workers, peers=peers)
    labels = torch.tensor(lists.test_labels, dtype=torch.int64)
    test = shard_split(lists.test_paths, labels, cache_dir, "val", size, workers, peers=peers)
    return DataSet(name=name, classes=list(lists.classes), train=train, test=test)


def load_image_folder(options: DataOptions, peers: Peers = ALONE) -> DataSet:
    """The user's class folders, images at ``options.image_size`` (256, or 32 for -c)."""
    lists = take_subset(image_folder_lists(options.data_path, options.val_fraction, options.cache_path), options)
    logger.info(
        "ImageFolder %s: %d classes, %d training images, %d evaluation images (%s)",
        options.data_path,
        len(lists.classes),
        len(lists.train_paths),
        len(lists.test_paths),
        lists.test_source,
    )
    return lists_to_dataset(
        "ImageFolder", lists, cache_dir_for(options.data_path, options, "folder"), options, options.image_size, peers
    )
