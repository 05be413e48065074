"""Small helpers that every layer shares: user errors, names that become paths, text safe for the
terminal, atomic writes and logging. The setting rules live in ``settings.rules``, the device in
``hardware.capabilities``."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__version__ = "0.2.0"


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, damaged file).

    ``main`` reports it as one sentence and a non-zero exit instead of a traceback.
    """


def short_reason(error: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-sentence user errors."""
    text = str(error).strip()
    line = text.splitlines()[0].rstrip(":") if text else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."


# ---------------------------------------------------------------------------------------------
# Names that become paths, and text that reaches the terminal

#: Longest name in bytes: the file systems' 255, less room for suffixes such as ``.log`` and
#: the ``.<name>.<random>.tmp`` of an atomic write.
NAME_MAX_BYTES = 200


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be one file or folder name inside a folder, or None when it can.

    The one rule for every name that becomes a path, whether the user typed it or a file
    (checkpoint, image list) says it: text, valid UTF-8, at most ``NAME_MAX_BYTES`` bytes, no
    separator, NUL or other control character, not ``.`` or ``..``, not starting with ``-``
    (it would read as a flag in the commands the tool prints).
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if not name:
        return "is empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > NAME_MAX_BYTES:
        return f"is {size} bytes long, more than the {NAME_MAX_BYTES} a name may have"
    if name in (".", ".."):
        return "names a folder itself, not something in it"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "holds a control character"
    if name.startswith("-"):
        return "starts with '-'"
    return None


class UnsafeName(ValueError):
    """A name from the command line or a file that would lead out of its folder."""


def safe_child(parent: Path, *names: str) -> Path:
    """``parent / name / ...``, each name checked by ``name_problem``, so that whatever a file
    says, the path stays inside ``parent``. Raises ``UnsafeName`` with the reason."""
    path = Path(parent)
    for name in names:
        problem = name_problem(name)
        if problem:
            raise UnsafeName(f"{quoted(name)} {problem}" if isinstance(name, str) else f"a name {problem}")
        path = path / name
    return path


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (escape sequences, carriage
    returns) and lone surrogates (bytes that were not UTF-8) shown as ``\\x1b``-style escapes."""

    def show(c: str) -> str:
        if c in "\t" or (unicodedata.category(c) not in ("Cc", "Cs")):
            return c
        code = ord(c)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return "".join(show(c) for c in str(text))


def quoted(text: str, limit: int = 60) -> str:
    """``text`` in quotes for a one-line message: printable, and cut to ``limit`` characters in
    the middle, so that a long path keeps where it starts and its file name."""
    text = printable(text)
    if len(text) > limit:
        head = (limit - 3) // 3
        text = text[:head] + "..." + text[len(text) - (limit - 3 - head) :]
    return "'" + text + "'"


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder (same file system, so ``os.replace`` is atomic),
    with the permissions a plain ``open`` would give rather than ``mkstemp``'s owner-only 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same folder, fsync it, then ``os.replace`` it over
    ``path``, so a crash at any moment leaves either the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """``path`` replaced by ``data`` whole, or left as it was."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data))


class PrintableFormatter(logging.Formatter):
    """Log lines with control characters shown as escapes: text from files (a checkpoint's
    message, a class name) cannot move the cursor, recolour or retitle the user's terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def setup_logging(verbose: bool = True) -> None:
    """Log INFO and above to stderr as plain lines, the way the terminal output reads."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(message)s"))
    root.handlers[:] = [handler]


def add_log_file(path: Path) -> logging.Handler:
    """Also write every log line, time-stamped, to ``path`` (``-l``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
