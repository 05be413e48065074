"""Small helpers shared by the other modules: errors, atomic writes, run folders, logging."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import torch

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, damaged file).

    ``main`` reports it as one sentence and a non-zero exit instead of a traceback.
    """


def short_reason(error: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-sentence user errors."""
    text = str(error).strip()
    line = text.splitlines()[0].rstrip(":") if text else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."


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


def unique_run_name(stem: str, *parents: Path) -> str:
    """``<timestamp>_<stem>``, with ``-2``, ``-3``... appended if any of ``parents`` already has a
    folder of that name, so a new run never writes into an earlier one."""
    base = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{stem}"
    name, n = base, 1
    while any((parent / name).exists() for parent in parents):
        n += 1
        name = f"{base}-{n}"
    return name


def resolve_device(name: str | None) -> torch.device:
    """The device for ``--device``: CUDA when present unless told otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA, but this machine has no usable CUDA GPU; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has only {torch.cuda.device_count()} CUDA device(s).")
    return device


def setup_logging(verbose: bool = True) -> None:
    """Log INFO and above to stderr as plain lines, the way the terminal output reads."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers[:] = [handler]


def add_log_file(path: Path) -> logging.Handler:
    """Also write every log line, time-stamped, to ``path`` (``-l``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


# ---------------------------------------------------------------------------------------------
# Data parallelism (torchrun)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` set up (NCCL on GPUs, gloo on CPUs); returns this
    process's device: ``cuda:LOCAL_RANK`` on a GPU machine, the CPU otherwise."""
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
