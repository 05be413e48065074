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

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (main thread only)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self)


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
    """Whether this process is one of several that ``torchrun`` started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
