"""The experiments package: presets, the resumable runner and the results report.

The report is checked on run folders written here in main.py's formats (``summary.json`` and
TensorBoard event files from ``SummaryWriter``) with known numbers: every table cell is worked
out again in the test. One preset runs end to end at tiny size through the command line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from main_cli import ROOT
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from experiments import ExperimentError
from experiments.presets import PRESETS, SCALES, flags_to_argv
from experiments.report import COLUMNS, find_runs, read_curves, write_report
from experiments.runner import plan, run_state, write_manifest
from main import get_args_parser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path,
    dataset: str,
    name: str,
    *,
    seed: int,
    curve: list[float],
    top5: float,
    ips: float,
    seconds: float,
    lr: float = 1e-4,
    mAP: list[float] | None = None,
) -> dict[str, Any]:
    """A run folder as main.py writes it: events with the validation scalars at steps 10, 20, ...
    and a summary whose best epoch is the curve's maximum (mAP's, for VOC)."""
    folder = root / "runs" / dataset / name
    writer = SummaryWriter(log_dir=str(folder))
    for epoch, top1 in enumerate(curve, start=1):
        step = 10 * epoch
        writer.add_scalar(f"{dataset}/train/epoch", epoch, step)
        writer.add_scalar(f"{dataset}/val/top1", top1, step)
        writer.add_scalar(f"{dataset}/val/loss", 3.0 - top1 / 50, step)
        if mAP is not None:
            writer.add_scalar(f"{dataset}/val/mAP", mAP[epoch - 1], step)
    writer.close()
    score = mAP if mAP is not None else curve
    best_epoch = score.index(max(score)) + 1
    summary = {
        "run_name": name,
        "dataset": dataset,
        "model": "CifarAlexNet",
        "status": "finished",
        "best_top1": curve[best_epoch - 1],
        "best_top5": top5,
        "best_epoch": best_epoch,
        "epochs": len(curve),
        "train_images_per_second": ips,
        "train_seconds": seconds,
        "train_size": 500,
        "test_size": 100,
        "config": {
            "dataset": dataset,
            "model": "CifarAlexNet",
            "lr": lr,
            "seed": seed,
            "run_name": name,
            "output_dir": str(root),
        },
    }
    if mAP is not None:
        summary["best_mAP"] = max(mAP)
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def read_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """``{section heading: [row as {column: cell}]}`` from the report's Markdown."""
    tables: dict[str, list[dict[str, str]]] = {}
    section, header = "", None
    for line in markdown.splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(cells[0]) <= set("-:"):
                tables.setdefault(section, []).append(dict(zip(header, cells, strict=False)))
    return tables


def mean_pm_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


@pytest.fixture
def loose_runs(tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Three seeds of one variant and one of another on Shapes, two VOC seeds (mAP)."""
    a = [
        make_run(tmp_path, "Shapes", f"sweep-a-s{s}", seed=s, curve=c, top5=t5, ips=ips, seconds=sec)
        for s, (c, t5, ips, sec) in enumerate(
            [
                ([20.0, 55.5, 50.0], 90.0, 120.0, 30.0),
                ([25.0, 40.0, 61.25], 95.5, 130.0, 31.0),
                ([30.0, 70.0, 65.0], 97.0, 110.0, 35.5),
            ]
        )
    ]
    b = [make_run(tmp_path, "Shapes", "sweep-b-s0", seed=0, curve=[11.0, 12.5], top5=52.0, ips=99.0, seconds=20.0)]
    voc = [
        make_run(
            tmp_path,
            "PascalVOC2012",
            f"voc-s{s}",
            seed=s,
            curve=[5.0, 7.0],
            top5=30.0,
            ips=12.0,
            seconds=100.0 + s,
            mAP=m,
        )
        for s, m in enumerate([[8.0, 12.5], [15.0, 9.0]])
    ]
    return {"sweep-a": a, "sweep-b": b, "voc": voc}


def test_report_table_values(tmp_path: Path, loose_runs: dict[str, list[dict[str, Any]]]) -> None:
    """Every number of the table is the mean ± sample std of the summaries' numbers."""
    report, _ = write_report([tmp_path / "runs"], tmp_path / "report")
    tables = read_tables(report.read_text())
    assert set(tables) == {"Shapes", "PascalVOC2012"}
    rows = {row["variant"]: row for table in tables.values() for row in table}
    assert set(rows) == {"sweep-a", "sweep-b", "voc"}
    for variant, summaries in loose_runs.items():
        row = rows[variant]
        assert list(row) == list(COLUMNS)
        assert row["runs"] == str(len(summaries))
        if variant == "voc":
            assert row["best top-1 (%)"] == row["best top-5 (%)"] == "—"
            assert row["best mAP (%)"] == mean_pm_std([s["best_mAP"] for s in summaries])
        else:
            assert row["best top-1 (%)"] == mean_pm_std([s["best_top1"] for s in summaries])
            assert row["best top-5 (%)"] == mean_pm_std([s["best_top5"] for s in summaries])
            assert row["best mAP (%)"] == "—"
        assert row["epochs to best"] == f"{statistics.mean(s['best_epoch'] for s in summaries):.1f}"
        assert row["images/s"] == f"{statistics.mean(s['train_images_per_second'] for s in summaries):.0f}"
        assert row["train time (s)"] == f"{statistics.mean(s['train_seconds'] for s in summaries):.0f}"
    # Worked by hand for sweep-a: best 55.5, 61.25, 70.0 -> mean 62.25, sample std 7.30.
    assert rows["sweep-a"]["best top-1 (%)"] == "62.25 ± 7.30"
    assert rows["sweep-a"]["epochs to best"] == "2.3"
    assert rows["sweep-b"]["best top-1 (%)"] == "12.50"  # one seed: the value, no deviation
    assert rows["voc"]["best mAP (%)"] == "13.75 ± 1.77"


def test_report_figures_are_png(tmp_path: Path, loose_runs: dict[str, list[dict[str, Any]]]) -> None:
    """One decodable PNG per section, referenced from report.md."""
    report, _ = write_report([tmp_path / "runs"], tmp_path / "report")
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert [p.name for p in pngs] == ["PascalVOC2012.png", "Shapes.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 500 and image.height >= 200
        assert f"]({png.name})" in report.read_text()


def test_curves_follow_epochs_and_resume(tmp_path: Path) -> None:
    """Steps map to epochs through train/epoch; after a resume (purge_step) the re-logged epoch's
    new value replaces the one the interrupted run logged past its checkpoint."""
    make_run(tmp_path, "Shapes", "r-s0", seed=0, curve=[10.0, 20.0, 30.0], top5=50.0, ips=1.0, seconds=1.0)
    folder = tmp_path / "runs" / "Shapes" / "r-s0"
    assert read_curves(folder, "Shapes")["top1"] == {1: 10.0, 2: 20.0, 3: 30.0}
    resumed = SummaryWriter(log_dir=str(folder), purge_step=21)  # last checkpoint after epoch 2 (step 20)
    resumed.add_scalar("Shapes/train/epoch", 3, 30)
    resumed.add_scalar("Shapes/val/top1", 33.0, 30)
    resumed.close()
    assert read_curves(folder, "Shapes")["top1"] == {1: 10.0, 2: 20.0, 3: 33.0}


def test_group_by_config(tmp_path: Path) -> None:
    """Timestamped names: seeds grouped by their settings, variants named by what differs."""
    for seed, lr in [(0, 1e-3), (1, 1e-3), (0, 1e-4)]:
        make_run(
            tmp_path,
            "Shapes",
            f"2026-01-0{seed}_{lr}",
            seed=seed,
            curve=[10.0 + seed],
            top5=50.0,
            ips=1.0,
            seconds=1.0,
            lr=lr,
        )
    runs = find_runs([tmp_path], "auto")
    assert sorted((r.variant, r.seed) for r in runs) == [("lr=0.0001", 0), ("lr=0.001", 0), ("lr=0.001", 1)]
    assert {r.variant for r in find_runs([tmp_path], "run")} == {r.summary["run_name"] for r in runs}


@pytest.mark.parametrize("scale", SCALES)
def test_presets_parse_and_differ_only_where_they_should(scale: str) -> None:
    """Every variant is a valid main.py command line, and the variants of a finding differ
    exactly in the flags the finding is about (at full scale)."""
    expected = {
        "warm_start": {"--warm-start"},
        "first_kernel": {"-c"},
        "lrn": {"--no-lrn"},
        "dataset_difficulty": {"-ds"},
        "lr_by_data_size": {"--warm-start", "--shapes-train"},
    }
    assert set(PRESETS) == set(expected)
    parser = get_args_parser()
    for name, preset in PRESETS.items():
        flag_sets = [preset.flags(v, scale) for v in preset.variants]
        for variant, flags in zip(preset.variants, flag_sets, strict=False):
            args = parser.parse_args(flags_to_argv(flags))
            assert args.lrn or args.paper_model, f"{name}/{variant.name}: --no-lrn needs -pm"
            assert not (args.cifar and args.dataset == "PascalVOC2012")
            if scale == "tiny":
                assert (args.dataset, args.n_epoch) == ("Shapes", 1)
        if scale == "full":
            keys = {k for f in flag_sets for k in f}
            differing = {k for k in keys if len({f.get(k) for f in flag_sets}) > 1}
            assert differing == expected[name]


def test_plan_skips_resumes_and_starts(tmp_path: Path) -> None:
    """finished -> skip, last.pt without a finished summary -> resume, nothing -> start."""
    preset = PRESETS["warm_start"]
    finished = tmp_path / "warm_start" / "plain-s0"
    (finished / "runs" / "Shapes" / "x").mkdir(parents=True)
    (finished / "runs" / "Shapes" / "x" / "summary.json").write_text(json.dumps({"status": "finished"}))
    interrupted = tmp_path / "warm_start" / "warm10-s0"
    (interrupted / "runs" / "Shapes" / "y").mkdir(parents=True)
    (interrupted / "runs" / "Shapes" / "y" / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    (interrupted / "checkpoints" / "Shapes" / "y").mkdir(parents=True)
    (interrupted / "checkpoints" / "Shapes" / "y" / "last.pt").write_bytes(b"")
    runs = {r.run_id: r for r in plan(preset, "tiny", [0, 1], tmp_path)}
    assert {k: r.action for k, r in runs.items()} == {
        "plain-s0": "skip",
        "plain-s1": "start",
        "warm10-s0": "resume",
        "warm10-s1": "start",
    }
    resume = runs["warm10-s0"].command()
    assert resume[2:4] == ["--resume", str(interrupted / "checkpoints" / "Shapes" / "y" / "last.pt")]
    assert resume[-2:] == ["--output-dir", str(interrupted)] and "--seed" in resume
    assert run_state(tmp_path / "nothing")[0] == "start"
    write_manifest(preset, "tiny", list(runs.values()), tmp_path)
    with pytest.raises(ExperimentError, match="holds warm_start runs at scale 'tiny', not 'small'"):
        write_manifest(preset, "small", list(runs.values()), tmp_path)
    # Results without a checkpoint (removed by hand) are neither resumed nor overwritten.
    (interrupted / "checkpoints" / "Shapes" / "y" / "last.pt").unlink()
    assert run_state(interrupted)[0] == "failed"


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "experiments", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, env=env, timeout=300)


def test_user_errors_are_one_sentence(tmp_path: Path) -> None:
    missing = cli("report", str(tmp_path / "gone"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    sentence = f"{tmp_path / 'gone'} does not exist; pass a folder of runs (runs/, or an experiments --output-dir)."
    assert missing.stderr.strip() == f"error: {sentence}"
    empty = cli("report", str(tmp_path))
    assert empty.returncode == 1 and "Traceback" not in empty.stderr
    assert "found no runs (no summary.json) under" in empty.stderr
    unknown = cli("run", "imagenet", "--dry-list")
    assert unknown.returncode == 1 and "unknown preset 'imagenet'; choose from warm_start" in unknown.stderr


def test_preset_end_to_end_tiny(tmp_path: Path) -> None:
    """warm_start at tiny size through the command line: both variants train and finish; a second
    invocation skips them; a run whose summary is not finished is resumed, not restarted; the
    report names the preset's finding and variants."""
    out = tmp_path / "exp"
    args = ("run", "warm_start", "--scale", "tiny", "--seeds", "1", "--output-dir", str(out), "--device", "cpu")
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    summaries = {
        v: list((out / "warm_start" / f"{v}-s0").glob("runs/Shapes/*/summary.json")) for v in ("plain", "warm10")
    }
    for variant, found in summaries.items():
        assert len(found) == 1, variant
        summary = json.loads(found[0].read_text())
        assert summary["status"] == "finished" and summary["epochs"] == 1
        assert summary["config"]["warm_start"] == {"plain": 1.0, "warm10": 10.0}[variant]
        assert summary["config"]["seed"] == 0 and summary["train_size"] == 96
    manifest = json.loads((out / "warm_start" / "experiment.json").read_text())
    assert manifest["scale"] == "tiny" and set(manifest["runs"]) == {"plain-s0", "warm10-s0"}

    second = cli(*args)
    assert second.returncode == 0
    assert second.stderr.count("skipped, finished") == 2 and "main.py" not in second.stderr

    # A run killed after its last checkpoint but before its final summary: resumed, then finished.
    path = summaries["warm10"][0]
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "running"}))
    third = cli(*args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "warm_start/warm10-s0: " in third.stderr and "--resume" in third.stderr
    assert json.loads(path.read_text())["status"] == "finished"
    assert len(list((out / "warm_start" / "warm10-s0").glob("runs/Shapes/*/summary.json"))) == 1

    report = cli("report", str(out), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert PRESETS["warm_start"].finding in text
    rows = read_tables(text)["warm_start (tiny)"]
    assert [r["variant"] for r in rows] == ["plain", "warm10"] and all(r["runs"] == "1" for r in rows)
    assert (tmp_path / "report" / "warm_start_tiny.png").read_bytes()[:8] == PNG_MAGIC
