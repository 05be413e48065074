"""Data folders and official archives: the checks on ``--data-dir``, where caches and unpacked
archives go when it is read-only (the user's cache folder), downloads with torchvision's
checksummed downloader, and extraction that may create only the data set's own folder."""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from data.core import DataError
from utils import short_reason

logger = logging.getLogger(__name__)


def user_cache_dir() -> Path:
    """Where caches go when the data folder is read-only: $XDG_CACHE_HOME/alexnet."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alexnet"


def is_writable_dir(path: Path) -> bool:
    """Whether files can be created in ``path`` (tried for real: permissions lie on some mounts)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def require_data_dir(data_dir: Path, what: str) -> None:
    """One clear sentence when ``--data-dir`` itself is missing or not a folder."""
    if not data_dir.exists():
        raise DataError(f"data folder {data_dir} does not exist; create it and put {what} in it, or pass --data-dir.")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder; pass the folder that holds {what}.")
    try:
        next(data_dir.iterdir(), None)
    except OSError as error:
        raise DataError(
            f"cannot read data folder {data_dir} ({short_reason(error.strerror or error)}); give this user read "
            "access to it, or pass another --data-dir."
        ) from None


def download_archive(url: str, md5: str, root: Path, what: str) -> Path:
    """Fetch an official archive into ``root`` with torchvision's checksummed downloader (a file
    already there with the right checksum is kept); returns its path. Unpacking is left to
    ``extract_archive``, so a download obeys the same rule as an archive the user put there."""
    from torchvision.datasets.utils import download_url

    filename = url.rsplit("/", 1)[-1]
    logger.info("downloading %s from %s into %s", what, url, root)
    try:
        download_url(url, str(root), filename=filename, md5=md5)
    except Exception as error:  # noqa: BLE001 (network, disk or checksum: all end the same way for the user)
        raise DataError(
            f"could not download {what} from {url} ({short_reason(error)}); download it by hand and put it in {root}."
        ) from None
    return root / filename


def _member_parts(name: str) -> list[str]:
    """The components of an archive entry's name, without empty and ``.`` ones."""
    return [part for part in name.split("/") if part not in ("", ".")]


def extract_archive(
    archive: Path, folder: str, holds: Callable[[Path], bool], what: str, cache_dir: Path | None
) -> Path:
    """Unpack the data set's own ``folder`` from ``archive`` next to it (or, if that is read-only,
    into the cache folder); returns the unpacked folder.

    The archive may create that one folder and nothing else: entries outside it are left out
    with a warning, because a crafted or repacked archive could otherwise replace whatever sits
    beside it (an earlier run's ``checkpoints/``, the other CIFAR's folder). Nothing that
    exists is deleted or replaced: a ``folder`` already there is used if ``holds`` says it holds
    the data, and is otherwise the user's to remove or rename. Unpacked into a temporary folder
    first (``tarfile``'s ``data`` filter: no absolute paths, links out of it or device files),
    checked, then renamed into place, so an interrupted extraction is never mistaken for a
    complete one and leaves nothing behind.
    """
    target = archive.parent
    if not is_writable_dir(target):
        target = cache_dir or user_cache_dir() / f"archive-{short_hash(str(archive.resolve()))}"
        logger.info("%s is read-only; unpacking %s into %s", archive.parent, archive.name, target)
    destination = target / folder
    if destination.exists() or destination.is_symlink():
        if holds(destination):
            return destination
        raise DataError(
            f"{destination} already exists but holds no {what}; remove or rename it so that {archive.name} can be "
            "unpacked there."
        )
    logger.info("unpacking %s/ from %s (once)", folder, archive)
    target.mkdir(parents=True, exist_ok=True)
    skipped = 0

    def own_entries(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        nonlocal skipped
        for member in tar:
            parts = _member_parts(member.name)
            if parts and parts[0] == folder and ".." not in parts:
                yield member
            else:
                skipped += 1

    with tempfile.TemporaryDirectory(dir=target, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, members=own_entries(tar), filter="data")
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            raise DataError(f"archive {archive} is damaged ({short_reason(error)}); download it again.") from None
        if skipped:
            logger.warning("%s: left out %d entries outside %s/ (an archive of %s may create only that folder)",
                           archive, skipped, folder, what)  # fmt: skip
        unpacked = Path(tmp) / folder
        if unpacked.is_symlink() or not holds(unpacked):
            raise DataError(f"{archive} holds no {what} in a {folder}/ folder, so it is not the official archive; "
                            "download it again.")  # fmt: skip
        # Checked again just before the rename, which would silently replace an empty folder.
        if destination.exists() or destination.is_symlink():
            raise DataError(f"{destination} appeared while {archive.name} was unpacked; remove or rename it and run "
                            "this again.")  # fmt: skip
        os.rename(unpacked, destination)
    return destination
