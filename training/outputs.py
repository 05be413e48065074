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
- **One live process per run**: ``RunLock`` in the checkpoint folder, taken before anything
  is written and dropped by the kernel whatever way the process ends.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
from torch.utils.tensorboard import SummaryWriter

from training.config import TrainConfig
from training.distributed import broadcast_object, is_main, rank_and_world
from training.figures import confusion_figure, image_grid, write_confusion_csv
from training.tasks import format_metrics
from utils import (
    UnsafeName,
    UserError,
    add_log_file,
    atomic_write_bytes,
    atomic_write_json,
    printable,
    safe_child,
    short_reason,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# One live process per run


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
        return (
            f"{self.what} is in use by process {pid} on {host} (since {day} {time}); wait for it to finish or "
            f"stop it, then run this again."
        )

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


def output_dir_of(checkpoint_path: Path, config: TrainConfig) -> str | None:
    """``<out>`` for ``<out>/checkpoints/<dataset>/<run>/last.pt``, so a resumed run finds its
    folders wherever it is started from; None for a checkpoint outside that layout (the run then
    writes under ``--output-dir``, the current folder by default: never where the file says)."""
    parts = checkpoint_path.resolve().parts
    if len(parts) >= 4 and parts[-4] == "checkpoints" and parts[-3] == config.dataset and parts[-2] == config.run_name:
        return str(Path(*parts[:-4]))
    return None


def run_paths(output: Path, dataset: str, name: str) -> tuple[Path, Path, Path]:
    """(runs/<ds>/<run>, checkpoints/<ds>/<run>, log/<run>.log) under ``output``; ``UserError``
    when a name would lead elsewhere."""
    try:
        return (
            safe_child(output / "runs", dataset, name),
            safe_child(output / "checkpoints", dataset, name),
            safe_child(output / "log", f"{name}.log"),
        )
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


def claim_run(
    config: TrainConfig, resume_from: Path | None = None, resume_step: int = 0, rewind: bool = False
) -> RunFolders:
    """Name the run (a new one) or check its folders (a resumed one) and lock it; the folders'
    ``name`` is the run's name, which the caller puts in its config before freezing it for the
    run. Under torchrun rank 0 decides and the others follow, or all stop with rank 0's
    sentence."""
    rank, _ = rank_and_world()
    output = Path(config.output_dir)
    decided: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        try:
            folders = _claim(config, output, resume_from, resume_step, rewind)
            decided = (folders.name, None)
        except UserError as error:
            decided = (None, str(error))
    name, problem = broadcast_object(decided)
    if problem:
        raise UserError(problem)
    if rank != 0:
        folders = RunFolders(name, *run_paths(output, config.dataset, name))
    return folders


def _claim(config: TrainConfig, output: Path, resume_from: Path | None, resume_step: int, rewind: bool) -> RunFolders:
    if resume_from is None:
        name = config.run_name or new_run_name(output, config)
        if config.run_name:
            existing = taken(output, config.dataset, name)
            if existing:
                raise UserError(
                    f"--run-name {name}: {existing} already exists; pick another name, or --resume the "
                    "run from its last.pt."
                )
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
        raise UserError(
            f"cannot write to {error.filename or folders.ckpt_dir} ({error.strerror or error}); pass a "
            "writable --output-dir."
        ) from None
    try:
        # A read-only checkpoint folder (a resumed run's) fails here, at its lock file.
        folders.lock = writing(folders.ckpt_dir, lambda: RunLock(folders.ckpt_dir, f"run {name}").acquire())
        if resume_from is not None:
            writing(folders.ckpt_dir, lambda: _check_rewind(folders, resume_from, resume_step, rewind))
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
    logger.warning(
        "rewinding run %s to step %d; its last.pt (%s) is kept as %s",
        folders.name,
        resume_step,
        what.removeprefix("is "),
        kept,
    )


def _free_name(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}.pt", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.pt"
    return path


# ---------------------------------------------------------------------------------------------
# What a run writes


def writing(path: Path, action: Callable[[], Any]) -> Any:
    """Run ``action``; a failure to write becomes one sentence naming the file or folder."""
    try:
        return action()
    except OSError as error:
        where = os.fsdecode(error.filename) if error.filename else path  # TensorBoard's are bytes
        raise UserError(
            f"cannot write to {where} ({short_reason(error.strerror or error)}); pass a writable --output-dir."
        ) from None


def check_writable(folder: Path) -> None:
    """``OSError`` naming ``folder`` unless a file can be created in it (one is, then removed)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".writable.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(folder)) from None
    os.close(fd)
    os.unlink(name)


def _quiet_event_writer(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``threading.excepthook`` that leaves out a write error of TensorBoard's writer thread: the
    writer keeps it and raises it in the training process at its next call
    (``EventFileWriter._check_worker_status``), where ``RunOutputs`` says it in one sentence;
    printed by the thread as well, it would be a traceback beside that sentence."""

    def excepthook(args: Any) -> None:
        if not (type(args.thread).__module__.startswith("tensorboard.") and issubclass(args.exc_type, OSError)):
            hook(args)

    return excepthook


#: One row per finished epoch, every scalar of that epoch (the TensorBoard tags without the data
#: set's prefix, plus ``step`` and ``seconds``): what ``experiments/report.py`` reads.
METRICS_FILE = "metrics.jsonl"


class RunOutputs:
    """Everything a run writes besides its checkpoints, in one place.

    - ``runs/<ds>/<run>/``: ``config.json``, the TensorBoard events (scalars every epoch and
      every ``-lls`` steps, a grid of augmented inputs, the confusion figure), ``metrics.jsonl``
      (a row per epoch), ``summary.json`` and the confusion CSVs;
    - ``log/<run>.log`` with ``-l``: the terminal output;
    - the terminal: the epoch line and the closing lines.

    Only the writing process (rank 0) writes files, and nothing under ``runs/`` with ``-d``. On
    resume the events and ``metrics.jsonl`` are cut back to the checkpoint's step, so whatever
    the interrupted run logged after its last checkpoint disappears.
    """

    def __init__(
        self,
        config: TrainConfig,
        folders: RunFolders,
        data_name: str,
        classes: list[str],
        task: Any,
        resume_step: int | None = None,
    ) -> None:
        self.config = config
        self.folders = folders
        self.run_dir = folders.run_dir
        self.data_name = data_name
        self.classes = classes
        self.task = task
        self.resume_step = resume_step  # None: a new run
        self.writes = not config.dry_run and is_main()
        self.log_file = folders.log_file if config.log and is_main() else None
        self.writer: SummaryWriter | None = None
        self._log_handler: logging.Handler | None = None
        self._excepthook: Callable[[Any], Any] | None = None  # threading's, while the writer is open

    # -- opening and closing

    def open(self, augmented: Callable[[], torch.Tensor]) -> None:
        """Start the log file, create the run folder and write what a run starts with.
        ``augmented()`` gives a batch of augmented inputs for TensorBoard (a new run only)."""
        resumed = self.resume_step is not None
        if self.writes and resumed and self.run_dir.is_dir():
            # Before the log and the TensorBoard writer, whose thread would be the first to find a
            # read-only run folder (a traceback of its own); a refused resume then changes nothing.
            writing(self.run_dir, lambda: check_writable(self.run_dir))
        if self.log_file is not None:
            log_file = self.log_file
            self._log_handler = writing(log_file, lambda: add_log_file(log_file))
        if self.writes:
            self._excepthook, threading.excepthook = threading.excepthook, _quiet_event_writer(threading.excepthook)
            writing(self.run_dir, lambda: self._open_run_dir(augmented))

    def tensorboard(self, action: Callable[[SummaryWriter], Any]) -> None:
        """``action(writer)`` when there is one; its write error (or its thread's, raised by
        its next call) is one sentence."""
        writer = self.writer
        if writer is not None:
            writing(self.run_dir, lambda: action(writer))

    def _open_run_dir(self, augmented: Callable[[], torch.Tensor]) -> None:
        config, resumed = self.config, self.resume_step is not None
        self.run_dir.mkdir(parents=True, exist_ok=resumed)
        self.folders.ckpt_dir.mkdir(parents=True, exist_ok=True)  # claim_run made it to hold the lock
        if not resumed or not (self.run_dir / "config.json").exists():
            atomic_write_json(asdict(config), self.run_dir / "config.json")
        if not resumed:
            self.writer = SummaryWriter(log_dir=str(self.run_dir))
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in asdict(config).items()))
            if config.message:
                self.writer.add_text("message", config.message)
            self.writer.add_image(f"{self.data_name}/train/augmented", image_grid(augmented()), 0)
            return
        # A run killed while saving leaves its temporary file behind; the checkpoint it was
        # replacing is whole, and this folder belongs to this run alone.
        for folder in (self.run_dir, self.folders.ckpt_dir):
            for stale in folder.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        # Hide whatever the interrupted run logged after the checkpoint it resumes from.
        assert self.resume_step is not None
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=self.resume_step + 1)
        self._cut_metrics(self.resume_step)

    def _cut_metrics(self, step: int) -> None:
        """Keep the rows of ``metrics.jsonl`` up to ``step`` (rows cut short by a kill go too)."""
        path = self.run_dir / METRICS_FILE
        if not path.exists():
            return
        kept = [row for row in read_metrics(path) if row.get("step", 0) <= step]
        text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in kept)
        atomic_write_bytes(text.encode(), path)

    def close(self) -> None:
        """Close the writer and the log (on every way out of a run: a write error here, after
        whatever ended the run, is a warning)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except OSError as error:
                logger.warning("the TensorBoard events in %s may be incomplete (%s)", self.run_dir, short_reason(error))
        if self._excepthook is not None:
            threading.excepthook, self._excepthook = self._excepthook, None
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    # -- during the run

    def start(
        self,
        model_name: str,
        train_size: int,
        test_size: int,
        lr: float,
        device: torch.device,
        pipeline: str,
        resumed_at: str | None,
    ) -> None:
        """The opening lines: what trains on what, and where a resumed run goes on from."""
        config = self.config
        logger.info(
            "run %s: %s on %s (%d train / %d test images, %d classes), %s setup, %s lr %g, batch %d, device %s%s",
            config.run_name,
            model_name,
            self.data_name,
            train_size,
            test_size,
            len(self.classes),
            config.setup,
            config.optimizer + (" (paper rule)" if config.paper_update else ""),
            lr,
            config.batch_size,
            device,
            " (dry run: nothing saved under runs/ or checkpoints/)" if config.dry_run else "",
        )
        if resumed_at:
            logger.info("%s", resumed_at)
        if config.message:
            logger.info("message: %s", config.message)
        logger.info("augmentation: %s", pipeline)

    def train_loss(self, mean: float, step: int) -> None:
        """The mean training loss of the last ``-lls`` steps."""
        self.tensorboard(lambda writer: writer.add_scalar(f"{self.data_name}/train/loss", mean, step))

    def epoch(
        self, progress: Any, result: Any, train_loss: float, lr: float, images_per_s: float, seconds: float
    ) -> None:
        """The epoch's line, its scalars (TensorBoard and ``metrics.jsonl``) and, every
        ``-lce`` epochs and at the last, the confusion matrix."""
        config, epoch = self.config, progress.epoch
        logger.info(
            "epoch %d/%d  train loss %.4f  %s  lr %.2e  %.0f img/s  %.1f s",
            epoch,
            config.n_epoch,
            train_loss,
            format_metrics(result),
            lr,
            images_per_s,
            seconds,
        )
        if self.writer is None:
            return
        scalars = {
            "train/epoch": epoch,
            "train/lr": lr,
            "train/epoch_loss": train_loss,
            "train/images_per_second": images_per_s,
            "val/loss": result.loss,
            "val/top1": result.top1,
            "val/top5": result.top5,
            "val/top1_max": progress.top1_max,
            **self.task.scalars(result, self.classes),
        }
        prefix, step = f"{self.data_name}/", progress.global_step
        for tag, value in scalars.items():
            self.tensorboard(lambda w, tag=tag, value=value: w.add_scalar(prefix + tag, value, step))
        row = {"step": step, "seconds": seconds, **scalars}
        row = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
        writing(self.run_dir, lambda: self._append_metrics(row))
        if (epoch % config.log_confusion_epoch == 0 or epoch == config.n_epoch) and result.confusion is not None:
            csv = self.run_dir / f"confusion_epoch{epoch:03d}.csv"
            writing(self.run_dir, lambda: write_confusion_csv(result.confusion, self.classes, csv))
            title = f"{self.data_name} epoch {epoch}: top-1 {result.top1:.1f}%"
            figure = confusion_figure(result.confusion, self.classes, title)
            self.tensorboard(lambda w: w.add_figure(prefix + "val/confusion", figure, step))
        self.tensorboard(lambda w: w.flush())

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")

    # -- the summary

    def summary(self, status: str, progress: Any, schedule: Any, train_size: int, test_size: int) -> dict[str, Any]:
        """``status``: running, finished, interrupted or diverged."""
        best, last = progress.best, progress.last
        assert best is not None and last is not None
        finished = status == "finished"
        return {
            "run_name": self.config.run_name,
            "dataset": self.data_name,
            "model": self.config.model,
            "status": status,
            "stop_reason": progress.stop_reason or ("epoch limit" if finished else ""),
            "best_top1": best["top1"],
            "best_top5": best["top5"],
            "best_epoch": progress.best_epoch,
            "final_top1": last["top1"],
            "final_top5": last["top5"],
            "top1_max": progress.top1_max,
            "epochs": progress.epoch,
            "steps": progress.global_step,
            "final_lr": schedule.lr,
            "lr_drops": schedule.drops,
            "train_images_per_second": progress.train_images / max(progress.train_seconds, 1e-9),
            "train_seconds": progress.train_seconds,
            "train_size": train_size,
            "test_size": test_size,
            "config": asdict(self.config),
            **self.task.best_fields(best, last, self.classes),
        }

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writes:
            atomic_write_json(summary, self.run_dir / "summary.json")

    def finish(self, summary: dict[str, Any], progress: Any) -> None:
        """The closing lines, the hyperparameters for TensorBoard and the final ``summary.json``."""
        best = progress.best
        line = self.task.best_line(best, progress.last, progress.best_epoch, progress.epoch)
        if line:
            logger.info("%s", line)
        logger.info(
            "best top-1 %.2f%% (top-5 %.2f%%) at epoch %d of %d; final top-1 %.2f%%; %.0f training images/s",
            best["top1"],
            best["top5"],
            progress.best_epoch,
            progress.epoch,
            summary["final_top1"],
            summary["train_images_per_second"],
        )
        if self.writes:
            assert self.writer is not None
            metrics = {
                "hparam/best_top1": best["top1"],
                "hparam/best_top5": best["top5"],
                **self.task.hparam_metrics(best),
            }
            hparams = {k: v for k, v in asdict(self.config).items() if isinstance(v, (int, float, str, bool))}
            self.tensorboard(lambda w: w.add_hparams(hparams, metrics, run_name="."))
            writing(self.run_dir, lambda: atomic_write_json(summary, self.run_dir / "summary.json"))
            logger.info("TensorBoard, summary.json and confusion CSVs: %s", self.run_dir)
            logger.info("checkpoints (best.pt, last.pt): %s", self.folders.ckpt_dir)
            logger.info("resume with: --resume %s", self.folders.ckpt_dir / "last.pt")
        if self.log_file is not None:
            logger.info("log: %s", self.log_file)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a line that is not a JSON object (cut short by a kill,
    say) is left out."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
