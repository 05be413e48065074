"""Small helpers shared by the other modules: errors, atomic writes, run folders, logging."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, damaged file).

    ``main`` reports it as one sentence and a non-zero exit instead of a traceback.
    """


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the tool; ``exit_code`` is 128 + signal. ``reported``: the
    trainer has already said what it saved and how to resume."""

    def __init__(self, signum: int, reported: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
        self.reported = reported


class StopSignals:
    """SIGINT and SIGTERM from the first moment of ``main`` until the training loop takes over
    (``trainer.StopRequest``, which saves first): the first signal raises ``Interrupted``, which
    unwinds whatever is under way (temporary files are removed on the way out) and ``main``
    says in which ``phase`` it stopped; further signals while it unwinds are acknowledged and
    otherwise ignored, so a second Ctrl-C cannot turn a clean stop into a traceback."""

    def __init__(self) -> None:
        self.signum = 0
        self.phase = "starting"

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum:
            logging.getLogger("alexnet").warning("%s again: already stopping", signal.Signals(signum).name)
            return
        self.signum = signum
        raise Interrupted(signum)

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (main thread only)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self)


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


# ---------------------------------------------------------------------------------------------
# Checked values: the same rule for a flag the user types and a field a checkpoint holds

#: The longest free text (``-m``) and path a run records.
MAX_TEXT = 10_000
MAX_PATH = 4096


@dataclass(frozen=True)
class Check:
    """What one setting may hold: its type, range or choices, or that it is a name or a path.

    ``check(value)`` validates a value that already has a type (a checkpoint's field) and
    ``parse(text)`` a command-line string (an argparse ``type``); both raise ``ValueError`` with
    the reason in a few words, so every caller can build its own sentence around it.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    name: bool = False  # one file or folder name (name_problem); "" allowed for "not chosen yet"
    path: bool = False  # a path the user gave: text without NUL, valid UTF-8, at most MAX_PATH
    rule: Callable[[Any], str | None] | None = None  # any further rule: the problem, or None

    def __call__(self, value: Any) -> Any:
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not self.kind:
            raise ValueError(f"must be a {self.kind.__name__}, not a {type(value).__name__}")
        if self.kind is float and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.choices))}, got {quoted(str(value))}")
        if isinstance(value, str):
            self._check_text(value)
        problem = self.rule(value) if self.rule is not None else None
        if problem:
            raise ValueError(problem)
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            lo = "" if self.low is None else f"{'above' if self.low_open else 'at least'} {_number(self.low)}"
            hi = "" if self.high is None else f"{'below' if self.high_open else 'at most'} {_number(self.high)}"
            raise ValueError(f"must be {' and '.join(p for p in (lo, hi) if p)}, got {value}")
        return value

    def _check_text(self, value: str) -> None:
        if self.name:
            problem = name_problem(value) if value else None
            if problem:
                raise ValueError(f"{quoted(value)} cannot be a folder name: it {problem}")
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{quoted(value)} is not valid UTF-8 text") from None
        limit = MAX_PATH if self.path else MAX_TEXT
        if len(value) > limit:
            raise ValueError(f"is {len(value)} characters long, more than {limit}")
        if self.path and "\0" in value:
            raise ValueError("holds a NUL character")

    def parse(self, text: str) -> Any:
        """The value of a command-line string (for argparse: errors become ``ArgumentTypeError``)."""
        if self.kind in (int, float):
            try:
                value = self.kind(text)
            except ValueError:
                noun = "whole number" if self.kind is int else "number"
                raise argparse.ArgumentTypeError(f"{quoted(text)} is not a {noun}") from None
        else:
            value = text
        try:
            return self(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None


def _number(x: float) -> str:
    """A bound as people write it: 4294967295 rather than 4294967295.0, 1e-09 as is."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else str(x)


def quoted(text: str, limit: int = 60) -> str:
    """``text`` in quotes for a one-line message: printable, and cut to ``limit`` characters."""
    text = printable(text)
    return "'" + (text if len(text) <= limit else text[: limit - 3] + "...") + "'"


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


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a partly written file at ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    _atomic_write(path, lambda f: f.write(data))


class RunInUse(UserError):
    """Another live process holds the run's lock."""


class RunLock:
    """One live process per run folder: an exclusive ``flock`` on ``<folder>/.lock``.

    The kernel drops the lock when its process ends in any way, ``kill -9`` included, so a
    stale lock file never blocks a later run: the next process simply takes the lock. The file
    holds the holder's process id, host and start time, for the sentence the second process
    prints. Where ``fcntl`` is missing (Windows) the lock is the file itself, created
    exclusively, and counted as stale when its process no longer exists.
    """

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / ".lock"
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise ``RunInUse`` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            try:
                fd = self._open()
            except BlockingIOError:
                raise RunInUse(self._in_use()) from None
            try:  # the holder may have removed the file between our open and our lock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()} {socket.gethostname()} {datetime.now():%Y-%m-%d %H:%M:%S}\n".encode())
        return self

    def _open(self) -> int:
        if fcntl is None:
            return self._open_exclusive()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_exclusive(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid = self._holder()[0]
            if pid.isdigit() and _process_alive(int(pid)):
                raise BlockingIOError from None
            self.path.unlink(missing_ok=True)  # stale: its process is gone
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    def _holder(self) -> list[str]:
        try:
            words = self.path.read_text(encoding="utf-8", errors="replace").split()
        except OSError:
            words = []
        return (words + ["?", "?", "?", "?"])[:4]

    def _in_use(self) -> str:
        pid, host, day, time = (printable(w) for w in self._holder())
        return (f"{self.what} is in use by process {pid} on {host} (since {day} {time}); wait for it to finish or "
                f"stop it, then run this again.")  # fmt: skip

    def release(self) -> None:
        """Give the lock back (removing the file first, so no one locks a file on its way out)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device this tool trains on (cpu, cuda, cuda:N), or None."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"{quoted(name)} is not a device name; use cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"{quoted(name)} is a {device.type} device; this tool trains on cpu, cuda or cuda:N"
    return None


def resolve_device(name: str | None) -> torch.device:
    """The device for ``--device``: CUDA when present unless told otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(name)
    if problem:
        raise UserError(f"--device {problem}.")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA, but this machine has no usable CUDA GPU; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has only {torch.cuda.device_count()} CUDA device(s).")
    return device


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


# ---------------------------------------------------------------------------------------------
# Data parallelism (torchrun)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` set up (NCCL on GPUs, gloo on CPUs); returns this
    process's device: ``cuda:LOCAL_RANK`` on a GPU machine, the CPU otherwise.

    The group keeps the backend's default timeout (gloo 30 min, NCCL 10 min). A process that is
    killed or crashes closes its connections, and its peers' next collective fails within
    seconds (``lost_process`` words that), so no shorter timeout is needed for it; only a peer
    whose machine vanishes without closing them is waited for that long. A shorter one would
    also have to outlast every phase one process runs alone while the others wait at a barrier
    (rank 0 reading the data and building the VOC cache, saving a checkpoint).
    """
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started process {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); pass --nproc_per_node at most that number."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                            else None)  # fmt: skip
    return device


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: How gloo, NCCL and torchrun's store report a peer that is gone (killed, crashed, its machine
#: lost) or silent past the group's timeout, in the collectives of the other processes.
LOST_PEER = re.compile(
    r"connection (closed|reset) by peer|broken pipe|connection refused|timed out waiting|socket timeout|"
    r"communicator was aborted|remote process exited|collective operation timeout",
    re.IGNORECASE,
)


def lost_process(error: BaseException, last: Path | None) -> str | None:
    """The sentence for a torchrun run whose process group lost a process, recognised from the
    error a collective raised in a surviving one; None for any other error (which should
    propagate). ``last`` is the run's last.pt, which the same torchrun command resumes (None
    when nothing is saved: a dry run, or a run that had not claimed its folders yet)."""
    import torch.distributed as dist

    connection_lost = isinstance(error, (dist.DistNetworkError, dist.DistStoreError)) or (
        isinstance(error, RuntimeError) and LOST_PEER.search(str(error)) is not None
    )
    if not launched_by_torchrun() or not connection_lost:
        return None
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    # gloo names the peer by the address it lost ("[../pair.cc:561] Connection closed by peer
    # [10.0.0.2]:40211. This is typically caused by..."): keep that first statement.
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0].rstrip(".")
    reason = re.sub(r"\[([^\]]+)\]:(\d+)", r"\1:\2", reason)[:160]
    who = f"process {1 - rank} of 2" if world == 2 else f"one of the {world} processes"
    if last is None:
        advice = "start the same torchrun command again"
    else:
        advice = f"resume from the last checkpoint with the same torchrun command plus --resume {last}"
    return (
        f"the run lost {who} ({printable(reason)}): it was stopped, crashed or lost its machine, so "
        f"process {rank} stops too; {advice}"
    )
