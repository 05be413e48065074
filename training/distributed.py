"""Processes and signals: who this process is among the ones ``torchrun`` started, how they
agree, and how a stop request reaches them.

Everything that differs between one process and several lives here, so the rest of the tool
reads the same either way: ``rank_and_world`` / ``is_main``, ``all_max`` / ``all_sum`` (no-ops
alone), ``broadcast_object`` (rank 0 decides, the others follow), ``agree_stop`` (a signal seen
by any process stops all of them at the same step), ``data_peers`` (the processes as the data
readers see them: they build a resize cache together), ``lost_process`` (a peer that died, in
one sentence).

Signals: ``StopSignals`` covers ``main`` from its first line (a stop unwinds at once with
``Interrupted``); ``StopRequest`` takes over while training, where a stop only takes note so
the loop can finish its step and save first.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.core import Peers
from hardware.capabilities import Capabilities
from utils import UserError, printable

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Signals


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
    (``StopRequest``, which saves first): the first signal raises ``Interrupted``, which
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

    def install(self) -> dict[int, Any]:
        """Take over SIGINT and SIGTERM (main thread only); returns the handlers to restore."""
        return {signum: signal.signal(signum, self) for signum in (signal.SIGINT, signal.SIGTERM)}


class StopRequest:
    """Signal handler that only takes note: the training loop finishes its step, saves and stops.
    Further signals while it saves are acknowledged and otherwise ignored, so a second Ctrl-C
    cannot cut a checkpoint in half. Used as a context manager it holds SIGINT and SIGTERM and
    gives them back on exit."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            logger.warning("%s again: already stopping, the checkpoint is being saved", name)
            return
        self.signum = signum
        logger.warning("%s: finishing the current step, then saving and stopping", name)

    def install(self) -> dict[int, Any]:
        """Take over SIGINT and SIGTERM (main thread only); returns the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def __enter__(self) -> StopRequest:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        self._previous = self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


# ---------------------------------------------------------------------------------------------
# Processes (torchrun)


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` started this process, one of several or alone (torchrun gives each
    worker ``TORCHELASTIC_RUN_ID``): either way it joins torchrun's process group, so that
    ``--nproc_per_node=1`` runs the same code (NCCL on a GPU) as several processes do."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


#: How long a process waits at a collective for the others (``--dist-timeout``), in minutes.
#: A peer that is killed or crashes closes its connections, and the others' next collective
#: fails within seconds whatever this is (``lost_process``); only a machine that vanishes
#: without closing them is waited for this long. What it must outlast are the phases one process
#: runs while the others wait: rank 0 downloading and unpacking VOC (2 GB), a checkpoint being
#: saved, and a resize cache whose folder the machines do not share, which each then builds
#: whole: ImageNet's 1.33 M images take 31-46 minutes on 8 cores at the 60-90 images a second
#: per core measured on this project's CPU, 62-92 on 4. Where they share it, the processes build
#: it together and wait only for the slowest share (``data.shards``). The backends' defaults
#: (NCCL 10 minutes, gloo 30) are shorter than a preparation.
DIST_TIMEOUT_MINUTES = 120


def init_distributed(
    device: torch.device, timeout: timedelta = timedelta(minutes=DIST_TIMEOUT_MINUTES)
) -> torch.device:
    """Join the process group ``torchrun`` set up (NCCL on GPUs, gloo on CPUs), whose collectives
    (barriers included) wait ``timeout`` for a silent peer (``DIST_TIMEOUT_MINUTES`` says why so
    long); returns this process's device: ``cuda:LOCAL_RANK`` on a GPU machine, the CPU
    otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started process {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); pass --nproc_per_node at most that number."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = Capabilities.of(device).backend
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timeout)
    return device


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process is the one that writes and speaks (rank 0, or the only one)."""
    return rank_and_world()[0] == 0


def all_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``t`` over the processes (``t`` itself alone)."""
    if rank_and_world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over the processes (``t`` itself alone)."""
    if rank_and_world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` in every process (any picklable value)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree_stop(stop: StopRequest, device: torch.device, synced: bool) -> bool:
    """Whether a stop was requested: at once alone; with several processes only at a step where
    they ``synced`` anyway (every ``-lls`` steps and at epoch ends), and then for all of them
    together when any one saw a signal, so they save the same step."""
    if rank_and_world()[1] == 1:
        return bool(stop.signum)
    if not synced:
        return False
    signum = int(all_max(torch.tensor(stop.signum or 0, device=device)).item())
    stop.signum = stop.signum or signum
    return signum > 0


def barrier() -> None:
    """Wait for every process (nothing alone)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` alone)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def data_peers() -> Peers:
    """This process and the others torchrun started, as the data readers see them: they build a
    resize cache together, each its share, and rank 0 alone downloads (``data.core.Peers``)."""
    rank, world = rank_and_world()
    return Peers(rank, world, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), gather_objects)


#: What a collective of a surviving process raises when the process group lost a process (killed,
#: crashed, its machine gone) or waited for one past the group's timeout. NCCL raises
#: ``DistBackendError``: "remote process exited or there was a network error", "NCCL communicator
#: was aborted", and the watchdog's "Watchdog caught collective operation timeout" (which it
#: wraps in "Process group watchdog thread terminated with exception: ..."); torchrun's store
#: raises ``DistStoreError`` or ``DistNetworkError``.
LOST_GROUP = (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError)
#: gloo raises a plain RuntimeError (torch 2.14), recognised by its wording: "Connection closed by
#: peer [10.0.0.2]:40211", "Timed out waiting 1800000ms for recv operation to complete".
LOST_PEER = re.compile(
    r"connection (closed|reset) by peer|broken pipe|connection refused|timed out waiting",
    re.IGNORECASE,
)
#: The NCCL results that name a fault of this process (a bug, a failing GPU), not a lost peer:
#: those errors propagate. torch writes the result's name at the start of the message's second line.
LOCAL_NCCL_FAULT = re.compile(r"^nccl(InvalidUsage|InvalidArgument|InternalError|UnhandledCudaError):", re.MULTILINE)


def lost_process(error: BaseException, last: Path | None) -> str | None:
    """The sentence for a torchrun run whose process group lost a process, recognised from the
    error a collective raised in a surviving one: NCCL's and the store's by their type
    (``LOST_GROUP``), gloo's by their wording (``LOST_PEER``). None for any other error, which
    should propagate. ``last`` is the run's last.pt, which the same torchrun command resumes
    (None when nothing is saved: a dry run, or a run that had not claimed its folders yet)."""
    text = str(error)
    if isinstance(error, LOST_GROUP):
        connection_lost = LOCAL_NCCL_FAULT.search(text) is None
    else:
        connection_lost = isinstance(error, RuntimeError) and LOST_PEER.search(text) is not None
    if not launched_by_torchrun() or not connection_lost:
        return None
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    who = f"process {1 - rank} of 2" if world == 2 else f"one of the {world} processes"
    if last is None:
        advice = "start the same torchrun command again"
    else:
        advice = f"resume from the last checkpoint with the same torchrun command plus --resume {last}"
    return (
        f"the run lost {who} ({printable(_first_statement(text) or type(error).__name__)}): it was stopped, "
        f"crashed or lost its machine, so process {rank} stops too; {advice}"
    )


def _first_statement(text: str) -> str:
    """What went wrong, from a collective's error message: its first statement, without the
    source locations and tags around it. gloo: "[../pair.cc:561] Connection closed by peer
    [10.0.0.2]:40211. This is typically caused by..."; NCCL: "NCCL error in: <file>:<line>,
    remote process exited or there was a network error, NCCL version 2.27.3" or "[PG ID 0 ...
    Rank 0] Process group watchdog thread terminated with exception: [Rank 0] Watchdog caught
    collective operation timeout: WorkNCCL(...) ran for 600046 milliseconds before timing out."."""
    first = (text.strip().splitlines() or [""])[0]
    first = first.split("terminated with exception: ", 1)[-1]
    first = re.sub(r"^(\[[^\]]*\]\s*)+", "", first)
    first = re.sub(r"^NCCL error in: \S+:\d+, (.*?)(, NCCL version \S+)?$", r"\1", first)
    first = first.split(". ")[0].rstrip(".")
    return re.sub(r"\[([^\]]+)\]:(\d+)", r"\1:\2", first)[:200]
