"""The results report: a Markdown table and validation curves for any set of runs.

Every folder holding a ``summary.json`` below the given folders is a run. Runs are put into
*sections* (one table and one figure each) and, within a section, into *variants* (one table
row and one curve each, over seeds):

- runs made by ``python -m experiments run`` are named by the ``experiment.json`` above them:
  the section is the preset (the finding), the variant the preset's variant;
- other runs form one section per data set, and their variant is (``--group-by``) the run name
  without its ``-s<seed>`` suffix (``name``), the settings other than the seed (``config``),
  or the run itself (``run``); ``auto`` takes the name where it ends in ``-s<seed>``, the
  settings otherwise.

Numbers come from ``summary.json`` (best top-1 / top-5 / mAP, the epoch of the best, images/s,
training seconds); curves from each run's ``metrics.jsonl`` (a row per epoch), or for runs written
before it existed (0.1.x) from the TensorBoard scalars ``<Dataset>/val/{top1,mAP,loss}``, placed
on the epoch axis by ``<Dataset>/train/epoch`` logged at the same step.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments import ExperimentError
from experiments.presets import PRESETS
from experiments.runner import MANIFEST, read_manifest
from training.outputs import METRICS_FILE, read_metrics

logger = logging.getLogger(__name__)

GROUP_BY = ("auto", "name", "config", "run")
SEED_SUFFIX = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")
COLUMNS = (
    "variant",
    "data set",
    "model",
    "runs",
    "train images",
    "best top-1 (%)",
    "best top-5 (%)",
    "best mAP (%)",
    "epochs to best",
    "epochs",
    "images/s",
    "train time (s)",
)
MISSING = "—"


@dataclass
class Run:
    """One run folder (holding ``summary.json``) and where it goes in the report."""

    folder: Path
    summary: dict[str, Any]
    section: str
    variant: str
    seed: int | None
    manifest: dict[str, Any] | None = None  # the experiment.json that names it, if any

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset", "?"))

    @property
    def metric(self) -> str:
        """The run's selection metric: mAP for multi-label VOC, top-1 otherwise."""
        return "mAP" if "best_mAP" in self.summary else "top1"


@dataclass
class Section:
    """Runs compared together: a preset's finding, or the runs on one data set."""

    name: str
    variants: dict[str, list[Run]] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Finding and grouping runs


def find_runs(roots: Sequence[Path], group_by: str = "auto") -> list[Run]:
    """Every run under ``roots`` (folders, or run folders themselves), with its section and variant."""
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
    summaries: dict[Path, dict[str, Any]] = {}
    for root in roots:
        if not root.exists():
            raise ExperimentError(
                f"{root} does not exist; pass a folder of runs (runs/, or an experiments --output-dir)."
            )
        if not root.is_dir():
            raise ExperimentError(
                f"{root} is not a folder; pass a folder of runs (runs/, or an experiments --output-dir)."
            )
        for path in sorted(root.rglob("summary.json")):
            summary = _read_summary(path)
            if summary is not None:
                summaries[path.parent.resolve()] = summary
    if not summaries:
        where = ", ".join(str(r) for r in roots)
        raise ExperimentError(
            f"found no runs (no summary.json) under {where}; train some first, e.g. "
            "python -m experiments run warm_start."
        )

    runs, loose = [], []
    manifests: dict[Path, dict[str, Any]] = {}
    for folder, summary in summaries.items():
        placed = _place_by_manifest(folder, summary, manifests)
        if placed is not None:
            runs.append(placed)
        else:
            loose.append(Run(folder, summary, section=str(summary.get("dataset", "?")), variant="", seed=None))
    for section_runs in _by_section(loose).values():
        _name_variants(section_runs, group_by)
    return runs + loose


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        # One damaged file should not hide a whole sweep; the warning names it.
        logger.warning("skipping %s: cannot read it (%s)", path, error)
        return None
    if not isinstance(summary, dict) or "best_top1" not in summary:
        logger.warning("skipping %s: not a summary.json written by main.py", path)
        return None
    return summary


def _place_by_manifest(folder: Path, summary: dict[str, Any], cache: dict[Path, dict[str, Any]]) -> Run | None:
    """The run's preset and variant from the nearest ``experiment.json`` above it, if any
    names the folder of this run."""
    for parent in folder.parents:
        path = parent / MANIFEST
        if path not in cache and path.is_file():
            cache[path] = read_manifest(path)
        if path in cache:
            run_id = folder.relative_to(parent).parts[0]
            entry = cache[path]["runs"].get(run_id)
            if entry is None:
                return None
            manifest = cache[path]
            # The same preset at two scales is two experiments: never average their seeds together.
            scale = manifest.get("scale", "full")
            section = str(manifest.get("preset", parent.name)) + ("" if scale == "full" else f" ({scale})")
            return Run(folder, summary, section, str(entry["variant"]), entry.get("seed"), manifest)
    return None


def _by_section(runs: Iterable[Run]) -> dict[str, list[Run]]:
    sections: dict[str, list[Run]] = {}
    for run in runs:
        sections.setdefault(run.section, []).append(run)
    return sections


def _experiment_settings(run: Run) -> dict[str, Any]:
    """The run's settings that say what was trained: two runs that differ only in the others
    (where and how they ran, and the seed) are seeds of one variant. Each config field says
    which it is; keys the config no longer has (a 0.1 run's ``cifar``) count as settings."""
    from training.config import NOT_THE_EXPERIMENT  # loads torch: only where runs are grouped by settings

    config = run.summary.get("config", {})
    return {k: v for k, v in config.items() if k not in NOT_THE_EXPERIMENT}


def _name_variants(runs: list[Run], group_by: str) -> None:
    """Set ``variant`` and ``seed`` of runs that no manifest names (one section's runs)."""
    by_config = group_by == "config" or (
        group_by == "auto" and not all(SEED_SUFFIX.match(str(r.summary.get("run_name", ""))) for r in runs)
    )
    for run in runs:
        name = str(run.summary.get("run_name", run.folder.name))
        run.seed = run.summary.get("config", {}).get("seed")
        match = SEED_SUFFIX.match(name)
        if group_by == "run":
            run.variant = name
        elif not by_config:
            run.variant = match["variant"] if match else name
    if not by_config:
        return
    # Name each group of equal settings by the settings that differ between the groups.
    settings = [_experiment_settings(r) for r in runs]
    keys = sorted({k for s in settings for k in s})
    differing = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
    for run, setting in zip(runs, settings, strict=False):
        label = ", ".join(f"{k}={setting.get(k)}" for k in differing)
        run.variant = label or str(run.summary.get("model", "run"))


def sections_of(runs: Sequence[Run]) -> list[Section]:
    """Runs as sections of variants: presets in their registry's order, then data sets; variants
    in the preset's order, else by name; runs by seed."""
    sections: dict[str, Section] = {}
    for run in runs:
        section = sections.setdefault(run.section, Section(run.section))
        section.variants.setdefault(run.variant, []).append(run)
        if run.manifest is not None:
            section.manifest = run.manifest
    for section in sections.values():
        order = list((section.manifest or {}).get("variants", {}))
        position = {name: i for i, name in enumerate(order)}
        ordered = sorted(section.variants.items(), key=lambda kv: (position.get(kv[0], len(position)), kv[0]))
        section.variants = {
            k: sorted(v, key=lambda r: (r.seed is None, r.seed or 0, str(r.folder))) for k, v in ordered
        }
    presets = {name: i for i, name in enumerate(PRESETS)}

    def section_order(section: Section) -> tuple[bool, int, str]:
        preset = (section.manifest or {}).get("preset", "")
        return section.manifest is None, presets.get(preset, len(presets)), section.name

    return sorted(sections.values(), key=section_order)


# ---------------------------------------------------------------------------------------------
# Numbers


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no deviation for a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(values: Sequence[float | None], digits: int = 2) -> str:
    """``"m ± s"`` over the values present, just the value for one, a dash for none."""
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return MISSING
    mean, std = mean_std(present)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_mean(values: Sequence[float | None], digits: int) -> str:
    """The mean of the values present, a dash for none."""
    present = [float(v) for v in values if v is not None]
    return f"{statistics.fmean(present):.{digits}f}" if present else MISSING


def row_of(variant: str, runs: Sequence[Run]) -> list[str]:
    """One table row: ``COLUMNS`` for the runs (seeds) of one variant."""
    summaries = [r.summary for r in runs]

    def each(key: str) -> list[Any]:
        return [s.get(key) for s in summaries]

    def joined(key: str) -> str:
        return " / ".join(sorted({str(v) for v in each(key) if v is not None})) or MISSING

    multilabel = all("best_mAP" in s for s in summaries)
    unfinished = sum(s.get("status") != "finished" for s in summaries)
    count = f"{len(runs)}" + (f" ({unfinished} not finished)" if unfinished else "")
    return [
        variant,
        joined("dataset"),
        joined("model"),
        count,
        joined("train_size"),
        # Top-1 / top-5 of a multi-label data set count an image right when its best class is
        # one of its labels: not the data set's metric, so mAP alone is shown there.
        MISSING if multilabel else format_mean_std(each("best_top1")),
        MISSING if multilabel else format_mean_std(each("best_top5")),
        format_mean_std(each("best_mAP")),
        format_mean(each("best_epoch"), 1),
        format_mean(each("epochs"), 1),
        format_mean(each("train_images_per_second"), 0),
        format_mean(each("train_seconds"), 0),
    ]


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str] = COLUMNS) -> str:
    """A GitHub Markdown table, numbers right-aligned."""
    align = ["---" if i < 3 else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


# ---------------------------------------------------------------------------------------------
# Curves


CURVES = ("top1", "top5", "mAP", "loss")


def read_curves(folder: Path, dataset: str) -> dict[str, dict[int, float]]:
    """Validation curves of one run, ``{"top1" | "top5" | "mAP" | "loss": {epoch: value}}``,
    from its ``metrics.jsonl``, else from its TensorBoard event files (empty when it has
    neither)."""
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        curves: dict[str, dict[int, float]] = {}
        for row in read_metrics(metrics):
            epoch = row.get("train/epoch")
            for name in CURVES:
                value = row.get(f"val/{name}")
                # A resumed run may log an epoch again; the later value is the one that counts.
                if isinstance(epoch, int) and isinstance(value, (int, float)):
                    curves.setdefault(name, {})[epoch] = float(value)
        return {name: dict(sorted(points.items())) for name, points in curves.items()}
    return _tensorboard_curves(folder, dataset)


def _tensorboard_curves(folder: Path, dataset: str) -> dict[str, dict[int, float]]:
    """``read_curves`` for runs written before ``metrics.jsonl`` existed."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    # Scalars only: the augmented-batch and confusion images are the bulk of the files.
    guidance = {ea.SCALARS: 0, ea.IMAGES: 1, ea.HISTOGRAMS: 1, ea.TENSORS: 1, ea.AUDIO: 1, ea.COMPRESSED_HISTOGRAMS: 1}
    accumulator = ea.EventAccumulator(str(folder), size_guidance=guidance)
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", []))
    epoch_tag = f"{dataset}/train/epoch"
    # Steps are the x-axis of every scalar; train/epoch at the same step says which epoch ended.
    epoch_at = {e.step: round(e.value) for e in accumulator.Scalars(epoch_tag)} if epoch_tag in tags else {}
    curves: dict[str, dict[int, float]] = {}
    for name in CURVES:
        tag = f"{dataset}/val/{name}"
        if tag not in tags:
            continue
        points: dict[int, float] = {}
        for index, event in enumerate(accumulator.Scalars(tag)):
            # A resumed run may log an epoch again; the later value is the one that counts.
            points[epoch_at.get(event.step, index + 1)] = float(event.value)
        curves[name] = dict(sorted(points.items()))
    return curves


def _mean_curve(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and sample std over the runs that reached each epoch (std 0 for one run)."""
    epochs = sorted({e for c in curves for e in c})
    means, stds = [], []
    for epoch in epochs:
        mean, std = mean_std([c[epoch] for c in curves if epoch in c])
        means.append(mean)
        stds.append(std or 0.0)
    return epochs, means, stds


def plot_section(section: Section, curves: dict[Path, dict[str, dict[int, float]]], path: Path) -> bool:
    """One PNG for the section: validation top-1 (mAP for VOC) and loss against epoch, a line per
    variant (mean over seeds) with a ±1 std band; False when no run has curves."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    score_axes, loss_axes = figure.subplots(1, 2)
    metrics_shown, drawn = set(), False
    for index, (variant, runs) in enumerate(section.variants.items()):
        colour = f"C{index % 10}"
        # Variants that stay at chance draw on top of each other; dashes keep them apart.
        style = ("-", "--", ":", "-.")[index % 4]
        for axes, key in ((score_axes, None), (loss_axes, "loss")):
            series = []
            for run in runs:
                metric = key or run.metric
                if metric in curves.get(run.folder, {}):
                    series.append(curves[run.folder][metric])
                    if key is None:
                        metrics_shown.add("mAP" if metric == "mAP" else "top-1")
            if not series:
                continue
            epochs, mean, std = _mean_curve(series)
            label = f"{variant} (n={len(series)})"
            axes.plot(epochs, mean, marker="o", markersize=3, color=colour, linestyle=style, label=label)
            if len(series) > 1:
                axes.fill_between(
                    epochs,
                    [m - s for m, s in zip(mean, std, strict=False)],
                    [m + s for m, s in zip(mean, std, strict=False)],
                    color=colour,
                    alpha=0.2,
                    linewidth=0,
                )
            drawn = True
    if not drawn:
        return False
    score_axes.set_ylabel(f"validation {' / '.join(sorted(metrics_shown, reverse=True))} (%)")
    loss_axes.set_ylabel("validation loss")
    section_curves = [curves.get(run.folder, {}) for runs in section.variants.values() for run in runs]
    last_epoch = max((e for c in section_curves for curve in c.values() for e in curve), default=1)
    for axes in (score_axes, loss_axes):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.set_xlim(0.5, last_epoch + 0.5)
    score_axes.legend(fontsize="small")
    figure.suptitle(f"{section.name}: mean over seeds, band ±1 std")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return True


# ---------------------------------------------------------------------------------------------
# The report


def slug(name: str) -> str:
    """A file name for a section."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "section"


def _scale_note(scale: str) -> str:
    if scale == "full":
        return "Scale: `full`, the data sets the finding is about."
    return (
        f"Scale: `{scale}`: a CPU-sized stand-in for the test above (other data, fewer images and epochs; see the "
        "data set column and the commands), so it shows the comparison running, not the finding's evidence."
    )


def make_report_folder(out: Path) -> None:
    """``out`` made if needed; one sentence where it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where a folder should be, no permission, a full disk
        raise ExperimentError(
            f"cannot create the report folder {out} ({error.strerror or error}); pass another --out."
        ) from None


def write_report(roots: Sequence[Path], out: Path, group_by: str = "auto") -> tuple[Path, str]:
    """Write ``report.md`` and one PNG per section into ``out``; returns the report's path and
    its tables (for the terminal)."""
    runs = find_runs(roots, group_by)
    sections = sections_of(runs)
    make_report_folder(out)
    curves = {run.folder: read_curves(run.folder, run.dataset) for run in runs}
    sources = ", ".join(f"`{r}`" for r in roots)
    plural = "s" if len(sections) != 1 else ""
    lines = [
        "# Results",
        "",
        (
            f"{len(runs)} runs under {sources}, in {len(sections)} section{plural}. Each row is a variant over its "
            "seeds: mean ± sample standard deviation (n − 1) where there are several runs, the value where there "
            "is one. "
            "*Best* is the evaluation at the epoch with the best top-1 (mAP for VOC); *epochs to best* is that epoch; "
            "*images/s* and *train time* count the training passes only (not evaluation), per run."
        ),
        "",
    ]
    tables, figures = [], 0
    for section in sections:
        manifest = section.manifest or {}
        lines += [f"## {section.name}", ""]
        if manifest:
            lines += [
                f"**Finding.** {manifest.get('finding', '')}",
                "",
                f"**Test.** {manifest.get('tests', '')}",
                "",
                _scale_note(manifest.get("scale", "?")),
                "",
            ]
        table = markdown_table([row_of(name, runs) for name, runs in section.variants.items()])
        tables.append(f"{section.name}\n{table}")
        lines += [table, ""]
        png = out / f"{slug(section.name)}.png"
        if plot_section(section, curves, png):
            figures += 1
            lines += [f"![{section.name}: validation curves]({png.name})", ""]
        else:
            logger.warning("%s: no TensorBoard validation scalars found, so no figure", section.name)
        if manifest:
            where = "the runner adds `--output-dir`, and `--data-dir` and `--device` where given"
            lines += [f"Commands (first seed of each variant; {where}):", ""]
            for variant in section.variants:
                entries = [e for e in manifest["runs"].values() if e.get("variant") == variant]
                if entries:
                    first = min(entries, key=lambda e: e.get("seed", 0))
                    lines.append(f"- {variant}: `python main.py {' '.join(first['argv'])}`")
            lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    logger.info("wrote %s and %d figure(s) for %d runs", report, figures, len(runs))
    return report, "\n\n".join(tables)
