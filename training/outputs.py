"""Where a run writes, and who may write there.

A run named ``<run>`` on data set ``<ds>`` owns ``runs/<ds>/<run>/``, ``checkpoints/<ds>/<run>/``
and ``log/<run>.log`` under ``--output-dir``. ``claim_run`` decides those paths once, before the
data are read, with three rules:

- **Names stay in their folder.** The run name and the data set name, whether typed or read from
  a checkpoint, pass ``utils.safe_child``: nothing a file says can lead outside ``--output-dir``.
- **A new run never writes into an earlier one**, and a resumed run only into its own folders:
  ``--resume A/.../last.pt --output-dir B`` is refused when B holds another run of that name, and
  resuming from a checkpoint older than the run's ``last.pt`` (``best.pt``, say) would throw the
  newer epochs away, so it needs ``--rewind``, which keeps that ``last.pt`` under another name.
- **One live process per run**: ``utils.RunLock`` in the checkpoint folder, taken before anything
  is written and dropped by the kernel whatever way the process ends.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training.config import TrainConfig
from utils import RunLock, UnsafeName, UserError, rank_and_world, safe_child

logger = logging.getLogger(__name__)


@dataclass
class RunFolders:
    """The run's paths, its lock (held by the writing process), and the folders ``claim_run``
    created, so a run that fails before writing anything leaves nothing behind."""

    name: str
    run_dir: Path
    ckpt_dir: Path
    log_file: Path
    lock: RunLock | None = None
    created: list[Path] = field(default_factory=list)

    def release(self) -> None:
        """Drop the lock and remove the folders ``claim_run`` made that are still empty."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote into it, and it stays
                break
        self.created = []


def run_paths(output: Path, dataset: str, name: str) -> tuple[Path, Path, Path]:
    """(runs/<ds>/<run>, checkpoints/<ds>/<run>, log/<run>.log) under ``output``; ``UserError``
    when a name would lead elsewhere."""
    try:
        return (safe_child(output / "runs", dataset, name), safe_child(output / "checkpoints", dataset, name),
                safe_child(output / "log", f"{name}.log"))  # fmt: skip
    except UnsafeName as error:
        raise UserError(f"the run name {error}; pick another with --run-name.") from None


def taken(output: Path, dataset: str, name: str) -> Path | None:
    """The first of the run's three paths that already exists, if any."""
    return next((p for p in run_paths(output, dataset, name) if os.path.lexists(p)), None)


def new_run_name(output: Path, config: TrainConfig) -> str:
    """``<timestamp>_<dataset>_<model>_<setup>``, with ``-2``, ``-3``... when that is taken."""
    base = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{config.dataset}_{config.model}_{config.setup}"
    name, n = base, 1
    while taken(output, config.dataset, name):
        n += 1
        name = f"{base}-{n}"
    return name


def make_dirs(folder: Path) -> list[Path]:
    """``folder.mkdir(parents=True)`` that returns the folders it created, outermost first."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def claim_run(config: TrainConfig, resume_from: Path | None = None, resume_step: int = 0,
              rewind: bool = False) -> RunFolders:  # fmt: skip
    """Name the run (a new one) or check its folders (a resumed one), lock it, and set
    ``config.run_name``. Under torchrun rank 0 decides and the others follow, or all stop with
    rank 0's sentence."""
    rank, world = rank_and_world()
    output = Path(config.output_dir)
    decided: list[Any] = [None, None]
    if rank == 0:
        try:
            folders = _claim(config, output, resume_from, resume_step, rewind)
            decided = [folders.name, None]
        except UserError as error:
            decided = [None, str(error)]
    if world > 1:
        dist.broadcast_object_list(decided, src=0)
    name, problem = decided
    if problem:
        raise UserError(problem)
    if rank != 0:
        folders = RunFolders(name, *run_paths(output, config.dataset, name))
    config.run_name = name
    return folders


def _claim(config: TrainConfig, output: Path, resume_from: Path | None, resume_step: int,
           rewind: bool) -> RunFolders:  # fmt: skip
    if resume_from is None:
        name = config.run_name or new_run_name(output, config)
        if config.run_name:
            existing = taken(output, config.dataset, name)
            if existing:
                raise UserError(f"--run-name {name}: {existing} already exists; pick another name, or --resume the "
                                "run from its last.pt.")  # fmt: skip
    elif not config.run_name:
        raise UserError(f"checkpoint {resume_from} names no run; pass a last.pt or best.pt from checkpoints/.")
    else:
        name = config.run_name
    folders = RunFolders(name, *run_paths(output, config.dataset, name))
    if resume_from is not None:
        _check_own_run(folders, resume_from)
    if config.dry_run:  # writes nothing under runs/ or checkpoints/, so holds no lock
        return folders
    try:
        folders.created = make_dirs(folders.ckpt_dir)
    except OSError as error:
        raise UserError(f"cannot write to {error.filename or folders.ckpt_dir} ({error.strerror or error}); pass a "
                        "writable --output-dir.") from None  # fmt: skip
    try:
        folders.lock = RunLock(folders.ckpt_dir, f"run {name}").acquire()
        if resume_from is not None:
            _check_rewind(folders, resume_from, resume_step, rewind)
    except BaseException:
        folders.release()
        raise
    return folders


def _check_own_run(folders: RunFolders, resume_from: Path) -> None:
    """A resumed run writes into its own folders, or into new ones: never into another run of
    the same name in another ``--output-dir``."""
    own = resume_from.resolve().parent == folders.ckpt_dir.resolve()
    if own:
        return
    for path in (folders.ckpt_dir, folders.run_dir):
        if path.exists():
            raise UserError(
                f"--resume {resume_from}: {path} already holds a run of that name, not the one this checkpoint comes "
                "from; pass another --output-dir, or resume that run from its own last.pt."
            )


def _check_rewind(folders: RunFolders, resume_from: Path, resume_step: int, rewind: bool) -> None:
    """Resuming from a checkpoint older than the run's ``last.pt`` goes back in time: only with
    ``--rewind``, and the newer ``last.pt`` is kept as ``last.epoch<N>.pt``."""
    last = folders.ckpt_dir / "last.pt"
    if not last.exists() or last.samefile(resume_from):
        return
    try:
        newer = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        step, epoch = int(newer["global_step"]), int(newer["epoch"])
    except Exception:  # noqa: BLE001 (any unreadable last.pt: keep it, rewinding only when asked)
        step, epoch = -1, -1
    if 0 <= step <= resume_step:
        return
    what = f"is at epoch {epoch} (step {step})" if step >= 0 else "cannot be read"
    if not rewind:
        raise UserError(
            f"--resume {resume_from}: the run's {last} {what}, past this checkpoint (step {resume_step}); resume "
            f"from {last}, or pass --rewind to go back (that last.pt is then kept under another name)."
        )
    kept = _free_name(folders.ckpt_dir, f"last.epoch{epoch}" if epoch >= 0 else "last.unreadable")
    os.replace(last, kept)
    logger.warning("rewinding run %s to step %d; its last.pt (%s) is kept as %s", folders.name, resume_step,
                   what.removeprefix("is "), kept)  # fmt: skip


def _free_name(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}.pt", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.pt"
    return path
