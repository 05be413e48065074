"""Run a preset: one ``main.py`` process per (variant, seed), resumable, skipping finished runs.

Layout under ``--output-dir`` (one folder per run, so a run is found again without knowing the
timestamped name main.py gives it)::

    <out>/<preset>/experiment.json              what was asked: finding, scale, every run's argv
    <out>/<preset>/<variant>-s<seed>/            main.py's --output-dir for that run
        runs/<Dataset>/<run>/summary.json        status "finished" -> skipped
        checkpoints/<Dataset>/<run>/last.pt      present but not finished -> --resume

The report (``experiments.report``) reads ``experiment.json`` to name the finding and variant of
every run below it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments import ExperimentError
from experiments.presets import Preset

logger = logging.getLogger(__name__)

MAIN_PY = Path(__file__).resolve().parents[1] / "main.py"
MANIFEST = "experiment.json"
# Exit codes main.py uses when stopped by SIGINT / SIGTERM: the sweep stops too.
STOPPED = (130, 143)


@dataclass(frozen=True)
class PlannedRun:
    """One (variant, seed) of a preset and what the runner will do with it."""

    run_id: str  # <variant>-s<seed>: the folder name, and the run name where main.py takes one
    variant: str
    seed: int
    folder: Path  # main.py's --output-dir for this run
    argv: tuple[str, ...]  # main.py arguments that define the run, seed included
    action: str  # "skip" (finished), "resume", "start", or "failed" (diverged, or results but no checkpoint)
    checkpoint: Path | None = None  # last.pt to resume from
    detail: str = ""

    def command(self, extra: Sequence[str] = ()) -> list[str]:
        """The full command line that carries out ``action`` (not meaningful for skip/failed)."""
        resume = ["--resume", str(self.checkpoint)] if self.action == "resume" else []
        return [sys.executable, str(MAIN_PY), *resume, *self.argv, "--output-dir", str(self.folder), *extra]


def run_state(folder: Path) -> tuple[str, Path | None, str]:
    """``(action, checkpoint, detail)`` for the run whose main.py output folder is ``folder``."""
    statuses = {}
    for summary in folder.glob("runs/*/*/summary.json"):
        try:
            statuses[summary] = json.loads(summary.read_text()).get("status", "")
        except (OSError, json.JSONDecodeError) as error:
            # summary.json is written atomically, so this is damage from outside: say so, and
            # let the checkpoint decide.
            logger.warning("cannot read %s (%s); judging the run by its checkpoint", summary, error)
            statuses[summary] = "unreadable"
    finished = [s for s, status in statuses.items() if status == "finished"]
    if finished:
        return "skip", None, f"finished ({finished[0].parent})"
    if any(status == "diverged" for status in statuses.values()):
        # Resuming would replay the same steps into the same divergence.
        return "failed", None, "diverged; resume it by hand with a smaller --lr, or delete the folder to start over"
    checkpoints = sorted(folder.glob("checkpoints/*/*/last.pt"), key=lambda p: p.stat().st_mtime)
    if checkpoints:
        return "resume", checkpoints[-1], f"resuming {checkpoints[-1]}"
    if statuses:
        # main.py writes a summary only after a checkpoint, so someone removed it: leave the
        # results alone rather than start over on top of them.
        return "failed", None, f"has a summary.json but no last.pt to resume; delete {folder} to start it again"
    return "start", None, "new"


def plan(
    preset: Preset, scale: str, seeds: Sequence[int], output_dir: Path, variants: Sequence[str] = ()
) -> list[PlannedRun]:
    """What running ``preset`` at ``scale`` for ``seeds`` needs, run by run."""
    chosen = [preset.variant(name) for name in variants] if variants else list(preset.variants)
    runs = []
    for variant in chosen:
        for seed in seeds:
            run_id = f"{variant.name}-s{seed}"
            folder = output_dir / preset.name / run_id
            action, checkpoint, detail = run_state(folder)
            argv = (*preset.argv(variant, scale), "--seed", str(seed))
            runs.append(PlannedRun(run_id, variant.name, seed, folder, argv, action, checkpoint, detail))
    return runs


def write_manifest(preset: Preset, scale: str, runs: Sequence[PlannedRun], output_dir: Path) -> Path:
    """Record the preset, its scale and every run's arguments in ``<out>/<preset>/experiment.json``,
    keeping runs recorded by earlier invocations (say, more seeds added later)."""
    path = output_dir / preset.name / MANIFEST
    manifest = read_manifest(path) if path.exists() else {}
    if manifest and manifest.get("scale") != scale:
        raise ExperimentError(
            f"{path.parent} holds {preset.name} runs at scale {manifest.get('scale')!r}, not {scale!r}; "
            "pass another --output-dir or the same --scale."
        )
    recorded = manifest.get("runs", {})
    recorded.update({r.run_id: {"variant": r.variant, "seed": r.seed, "argv": list(r.argv)} for r in runs})
    manifest = {
        "preset": preset.name,
        "finding": preset.finding,
        "tests": preset.tests,
        "scale": scale,
        "variants": {v.name: v.about for v in preset.variants},
        "runs": dict(sorted(recorded.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)  # whole or not at all: a report may read it while a sweep runs
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest written by ``write_manifest``; a damaged one is one sentence."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExperimentError(f"cannot read {path} ({error}); delete it and run the preset again.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), dict):
        raise ExperimentError(f"{path} is not an experiment manifest; delete it and run the preset again.")
    return manifest


def supports_run_name() -> bool:
    """Whether this main.py takes ``--run-name`` (the runner gives each run its id when it does)."""
    result = subprocess.run([sys.executable, str(MAIN_PY), "-h"], capture_output=True, text=True, check=False)
    return "--run-name" in result.stdout


def clear_leftovers(folder: Path) -> None:
    """Remove what a run that never finished its first epoch left (no checkpoint and no summary,
    so nothing to resume or report), so that a fresh start does not find its run folder taken."""
    for sub in ("runs", "checkpoints", "log"):
        if (folder / sub).exists():
            logger.info("removing %s: a start that saved no checkpoint", folder / sub)
            shutil.rmtree(folder / sub)


def launch(command: Sequence[str]) -> int:
    """Run one main.py and return its exit code. On Ctrl-C the child, which received the same
    SIGINT, is left to save its checkpoint rather than killed mid-write."""
    process = subprocess.Popen(list(command))
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            logger.warning("waiting for %s to save its checkpoint", command[1])


def extra_args(
    preset: Preset, run: PlannedRun, data_dir: Path | None, device: str | None, run_name: bool, download: bool = False
) -> list[str]:
    """Arguments that say where and how to run, not what: data folder (and whether to fetch the
    data set into it), device, and for a new run a note for TensorBoard and (``run_name``) its id
    as the run name."""
    extra = []
    if data_dir is not None:
        extra += ["--data-dir", str(data_dir)]
    if download:
        extra.append("--download")
    if device is not None:
        extra += ["--device", device]
    if run.action == "start":
        extra += ["-m", f"experiments: {preset.name} / {run.variant}, seed {run.seed}"]
        if run_name:
            extra += ["--run-name", f"{preset.name}-{run.run_id}"]
    return extra


def execute(
    preset: Preset,
    runs: Sequence[PlannedRun],
    data_dir: Path | None = None,
    device: str | None = None,
    run_name: bool = False,
    download: bool = False,
) -> list[PlannedRun]:
    """Carry out ``runs`` one after another (``run_name``: pass each its id as ``--run-name``);
    returns the runs that failed. Stops the sweep (``KeyboardInterrupt``) when a run was stopped
    by SIGINT / SIGTERM."""
    failed = []
    for run in runs:
        if run.action in ("skip", "failed"):
            log = logger.info if run.action == "skip" else logger.warning
            log("%s/%s: skipped, %s", preset.name, run.run_id, run.detail)
            if run.action == "failed":
                failed.append(run)
            continue
        if run.action == "start":
            clear_leftovers(run.folder)
        command = run.command(extra_args(preset, run, data_dir, device, run_name, download))
        logger.info("%s/%s: %s", preset.name, run.run_id, shlex.join(command[1:]))
        code = launch(command)
        if code in STOPPED:
            raise KeyboardInterrupt(f"{preset.name}/{run.run_id} stopped (exit {code})")
        if code != 0:
            logger.error("%s/%s failed with exit code %d", preset.name, run.run_id, code)
            failed.append(run)
    return failed
