"""Command line of the experiments: list the presets, run them, report on runs.

python -m experiments list
python -m experiments run warm_start --seeds 3                      # full CIFAR-10, resumable
python -m experiments run all --scale small --data-dir ../shared/data --seeds 2
python -m experiments run lrn --scale tiny --seeds 1 --dry-list     # what would run, and how
python -m experiments report runs/experiments/full --out report
python -m experiments report runs/ --group-by config                # any runs, not only presets
python -m experiments report evaluations --paper-table              # the paper's Table 2 from --evaluate records
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import ExperimentError
from experiments.paper_table import write_paper_table
from experiments.presets import PRESETS, SCALES
from experiments.report import GROUP_BY, write_report
from experiments.runner import execute, extra_args, plan, supports_run_name, write_manifest

logger = logging.getLogger("experiments")


def get_args_parser() -> argparse.ArgumentParser:
    """``list``, ``run`` and ``report``."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Re-run the original v2 tool's findings (presets of main.py runs over seeds) and report the "
        "results.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,run,report}")

    commands.add_parser("list", help="the presets: the finding each tests and its variants' flags")

    run = commands.add_parser("run", help="run presets: one main.py per variant and seed, skipping finished runs")
    run.add_argument("presets", nargs="+", metavar="PRESET", help=f"{', '.join(PRESETS)}, or all")
    run.add_argument("--seeds", type=_positive, default=3, help="seeds 0..N-1 of every variant (default: %(default)s)")
    run.add_argument(
        "--scale",
        choices=SCALES,
        default="full",
        help="full: the canonical data sets; small: Shapes and the real samples, a few epochs (CPU minutes); "
        "tiny: a few hundred Shapes images, one epoch (default: %(default)s)",
    )
    run.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="folder for <preset>/<variant>-s<seed>/ run folders (default: runs/experiments/<scale>)",
    )
    run.add_argument("--data-dir", type=Path, default=None, help="main.py's --data-dir (default: main.py's, dataset)")
    run.add_argument(
        "--download", action="store_true", help="main.py's --download: fetch missing data sets (default: off)"
    )
    run.add_argument("--device", default=None, help="main.py's --device (default: cuda when present, else cpu)")
    run.add_argument(
        "--variant", action="append", default=[], metavar="NAME", help="only this variant (repeatable; default: all)"
    )
    run.add_argument(
        "--dry-list", action="store_true", help="print each run's action and command, run nothing (default: off)"
    )

    report = commands.add_parser("report", help="Markdown table and PNG curves of the runs under some folders")
    report.add_argument(
        "folders",
        nargs="+",
        type=Path,
        metavar="FOLDER",
        help="folders searched for summary.json (with --paper-table: for *.json evaluation records, or such files)",
    )
    report.add_argument("--out", type=Path, default=Path("report"), help="report folder (default: %(default)s)")
    report.add_argument(
        "--group-by",
        choices=GROUP_BY,
        default="auto",
        help="variants of runs outside a preset: name (run name less -s<seed>), config (settings less the "
        "seed), run (each alone), auto (name where it ends in -s<seed>, else config) (default: %(default)s)",
    )
    report.add_argument(
        "--paper-table",
        action="store_true",
        help="instead of the runs' report, the paper's Table 2 (k CNNs, centre and 10 crops, its printed errors "
        "beside) from the records `main.py --evaluate ... > NAME.json` wrote, into <out>/paper-table.md "
        "(default: off)",
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def list_presets() -> None:
    """Print every preset, its finding, and each variant's full-scale flags."""
    for preset in PRESETS.values():
        print(f"{preset.name}: {preset.finding}\n  {preset.tests}")
        for variant in preset.variants:
            print(f"  - {variant.name} ({variant.about}): {' '.join(preset.argv(variant, 'full'))}")
        print()


def run_presets(args: argparse.Namespace) -> int:
    """Plan every run of the chosen presets, then (unless ``--dry-list``) carry them out."""
    names = list(PRESETS) if args.presets == ["all"] else args.presets
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ExperimentError(f"unknown preset {unknown[0]!r}; choose from {', '.join(PRESETS)}, or all.")
    output_dir = args.output_dir or Path("runs") / "experiments" / args.scale
    seeds = list(range(args.seeds))
    planned = []
    for name in names:
        preset = PRESETS[name]
        try:
            runs = plan(preset, args.scale, seeds, output_dir, args.variant)
        except KeyError as error:
            raise ExperimentError(f"{error.args[0]}.") from None
        planned.append((preset, runs))
    if args.dry_list:
        for preset, runs in planned:
            for run in runs:
                extra = extra_args(preset, run, args.data_dir, args.device, False, args.download)
                command = shlex.join(run.command(extra)[1:]) if run.action in ("start", "resume") else run.detail
                print(f"{preset.name}/{run.run_id}: {run.action}: {command}")
        return 0
    to_launch = any(r.action == "start" for _, runs in planned for r in runs)
    run_name = to_launch and supports_run_name()
    # Every manifest first: a clash of scales is reported before any run starts.
    for preset, runs in planned:
        write_manifest(preset, args.scale, runs, output_dir)
    failed = []
    for preset, runs in planned:
        failed += [
            f"{preset.name}/{r.run_id}"
            for r in execute(preset, runs, args.data_dir, args.device, run_name, args.download)
        ]
    if failed:
        logger.error("%d run(s) did not finish: %s", len(failed), ", ".join(failed))
        return 1
    logger.info("done; report with: python -m experiments report %s", output_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # TensorBoard's event reader narrates every file it opens at INFO.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    try:
        if args.command == "list":
            list_presets()
            return 0
        if args.command == "run":
            return run_presets(args)
        if args.paper_table:
            table, text = write_paper_table(args.folders, args.out)
            print(text, end="")
            print(f"\npaper table: {table}")
            return 0
        report, tables = write_report(args.folders, args.out, args.group_by)
        print(tables)
        print(f"\nreport: {report}")
        return 0
    except ExperimentError as error:
        logger.error("error: %s", error)
        return 1
    except OSError as error:  # writing the report: the folder exists but cannot take the files
        logger.error(
            "error: cannot write the report into %s (%s); pass another --out.", args.out, error.strerror or error
        )
        return 1
    except KeyboardInterrupt as stop:
        logger.error("stopped: %s", stop or "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
