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
from utils import printable, short_reason

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


def require_cache_dir(cache: Path) -> None:
    """One sentence naming ``--cache-dir`` when it is a file or cannot be created (it is created
    here otherwise). A folder that exists but that this user may not write is accepted: a complete
    cache is only read, and a write it needs fails naming the folder (``data.registry``)."""
    if cache.is_dir():
        return
    if cache.exists() or cache.is_symlink():
        raise DataError(
            f"--cache-dir {cache} is a file, not a folder; pass a "
            "folder for the resize cache (it is created if missing)."
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"cannot create --cache-dir {cache} ({short_reason(error.strerror or error)}); pass a folder this user may "
            "write, or leave --cache-dir out to keep the cache in the data folder."
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


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _how_it_leaves(member: tarfile.TarInfo, tmp: str, folder: str) -> str | None:
    """Why ``member``, unpacked into ``tmp``, would lead out of where it belongs (None if it
    does not): out of ``tmp`` for any entry, out of ``tmp/<folder>`` for the data set's own.

    The rules of PEP 706's ``data`` filter, checked here so that every Python gets them (the
    filter itself came with 3.11.4 and 3.12) and the sentence names the entry: no absolute name,
    no ``..`` leading out, no link whose target leads out, nothing written through a link that
    leads out (paths are resolved against what is already unpacked), no device file or FIFO."""
    name = member.name
    if name.startswith("/") or os.path.isabs(name):
        return "has an absolute name"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "is a device file or a FIFO"
    parts = _member_parts(name)
    own = bool(parts) and parts[0] == folder
    inside = os.path.realpath(os.path.join(tmp, folder) if own else tmp)
    target = os.path.realpath(os.path.join(tmp, name))
    if not _within(target, inside):
        return f"leads out of {folder}/" if own else "leads out of the folder it is unpacked into"
    if member.issym() or member.islnk():
        if member.linkname.startswith("/") or os.path.isabs(member.linkname):
            return f"is a link to the absolute path {printable(member.linkname)}"
        base = os.path.dirname(target) if member.issym() else tmp
        if not _within(os.path.realpath(os.path.join(base, member.linkname)), inside):
            return f"is a link to {printable(member.linkname)!r}, out of {folder + '/' if own else 'that folder'}"
    return None


def extract_archive(
    archive: Path, folder: str, holds: Callable[[Path], bool], what: str, cache_dir: Path | None
) -> Path:
    """Unpack the data set's own ``folder`` from ``archive`` next to it (or, if that is read-only,
    into the cache folder); returns the unpacked folder.

    The archive may create that one folder and nothing else: entries beside it are left out
    with a warning, because a crafted or repacked archive could otherwise replace whatever sits
    beside it (an earlier run's ``checkpoints/``, the other CIFAR's folder). An entry that would
    lead out of where it is unpacked (``_how_it_leaves``: ``../x``, a link out of the folder, a
    write through one) refuses the whole archive, naming it: no official archive holds one, so it
    is crafted or damaged, and training on the rest would hide that. Nothing that exists is
    deleted or replaced: a ``folder`` already there is used if ``holds`` says it holds the data, and
    is otherwise the user's to remove or rename. Unpacked into a temporary folder first (with
    ``tarfile``'s ``data`` filter too, where Python has it), checked, then renamed into place, so
    an interrupted extraction is never mistaken for a complete one and leaves nothing behind.
    """
    target = archive.parent
    if not is_writable_dir(target):
        if cache_dir is not None:
            require_cache_dir(cache_dir)
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

    def own_entries(tar: tarfile.TarFile, tmp: str) -> Iterator[tarfile.TarInfo]:
        """The entries of ``folder``, each checked just before it is unpacked (``extractall``
        takes them one at a time), so links unpacked before it are seen."""
        nonlocal skipped
        for member in tar:
            reason = _how_it_leaves(member, tmp, folder)
            if reason is not None:
                raise DataError(
                    f"archive {archive} was not unpacked: its entry {printable(member.name)!r} {reason} (no official "
                    f"archive of {what} holds such an entry: it may be crafted); download it again."
                )
            parts = _member_parts(member.name)
            if parts and parts[0] == folder:
                yield member
            else:
                skipped += 1

    # PEP 706's filter also clears set-user-id and group- or world-writable modes.
    data_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tempfile.TemporaryDirectory(dir=target, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, members=own_entries(tar, tmp), **data_filter)
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            raise DataError(f"archive {archive} is damaged ({short_reason(error)}); download it again.") from None
        if skipped:
            logger.warning(
                "%s: left out %d entries outside %s/ (an archive of %s may create only that folder)",
                archive,
                skipped,
                folder,
                what,
            )
        unpacked = Path(tmp) / folder
        if unpacked.is_symlink() or not holds(unpacked):
            raise DataError(
                f"{archive} holds no {what} in a {folder}/ folder, so it is not the official archive; "
                "download it again."
            )
        # Checked again just before the rename, which would silently replace an empty folder.
        if destination.exists() or destination.is_symlink():
            raise DataError(
                f"{destination} appeared while {archive.name} was unpacked; remove or rename it and run this again."
            )
        os.rename(unpacked, destination)
    return destination
