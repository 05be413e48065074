"""``python main.py predict --checkpoint CKPT [--checkpoint CKPT ...] PATH...``: the top-k
classes of image files, by one network or by the mean of several (an ensemble, as the paper's
Table 2 averages five).

Each image goes the way the checkpoint's evaluation images went: resized (short side) and
centre-cropped to the data set's image size, as the caches hold them, then the run's evaluation
pipeline (10-crop averaged under ``-pt``), then softmax scores (per-class sigmoid for VOC). An
ensemble's members each do this with their own preprocessing, and their probabilities are
averaged a batch at a time (``Task.combine``), so memory does not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data.core import DataError
from hardware.capabilities import resolve_device
from inference.checkpoint import Trained, check_ensemble, load_trained, read_image
from settings.rules import Check
from training.checkpoint import not_regular
from utils import UserError, printable, quoted, short_reason

logger = logging.getLogger("alexnet")

#: How many bad files the one sentence names before "and N more".
NAMED_FAILURES = 3

EPILOG = """\
output: a table per image (rank, probability, class), or with --json one JSON object per line
and image: {"path": the file as found, "predictions": [{"class": name, "index": class index,
"probability": 0-1}, best first]}, and with several checkpoints "checkpoints": [each, in the order
given] (the table then starts with a line naming them). Probabilities are softmax scores (they
add up to 1 over all classes), or for multi-label checkpoints (VOC) each class's own sigmoid
score; with several checkpoints, the mean of theirs.

exit status: 0 when every image was predicted; 1 when some path could not be read: a file that
is not an image, a path that is not a regular file (a FIFO, a device: never opened), a folder
that cannot be searched (the others are still predicted, each kind named on stderr in one
sentence), or nothing could run."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py predict",
        description="Classify image files with a trained checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="image files (any format Pillow reads, any size) or folders (searched recursively)",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        type=Path,
        help="a last.pt or best.pt of this tool; given again, the networks' probabilities are averaged (an ensemble "
        "of checkpoints with the same classes)",
    )
    parser.add_argument(
        "--crops",
        type=int,
        choices=(1, 10),
        help="views per image: 1, the centre crop; 10, the paper's four corners and centre and their mirrors "
        "(default: each run's own, 10 under -pt, else 1)",
    )
    parser.add_argument("--topk", type=Check(int, 1, 100_000).parse, default=5, help="classes shown per image (5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    parser.add_argument(
        "--batch-size",
        type=Check(int, 1, 65_536).parse,
        default=32,
        help="images per forward pass (32; x10 views under -pt)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (CUDA when present)")
    return parser


@dataclass
class Skipped:
    """The paths a search did not read, each with why: paths that exist but are not regular
    files (a FIFO named ``photo.jpg`` would block the reader), and folders that could not be
    searched (no permission)."""

    special: list[tuple[Path, str]] = field(default_factory=list)
    folders: list[tuple[Path, str]] = field(default_factory=list)

    def sentences(self) -> list[str]:
        """One sentence per kind of skipped path: the count and the first few."""
        out = []
        if self.special:
            out.append(
                f"{_count(self.special, 'path is not a regular file', 'paths are not regular files')} and "
                f"{_was(self.special)} skipped: {_named(self.special)}; pass image files or folders."
            )
        if self.folders:
            them = "it" if len(self.folders) == 1 else "them"
            out.append(
                f"{_count(self.folders, 'folder', 'folders')} could not be searched and {_was(self.folders)} "
                f"skipped: {_named(self.folders)}; give this user read access to {them}, or leave {them} out."
            )
        return out


def _count(items: list, one: str, many: str) -> str:
    return f"{len(items)} {one if len(items) == 1 else many}"


def _was(items: list) -> str:
    return "was" if len(items) == 1 else "were"


def _named(items: list[tuple[Path, str]]) -> str:
    named = "; ".join(f"{quoted(str(p))} ({printable(reason)})" for p, reason in items[:NAMED_FAILURES])
    return named + (f" and {len(items) - NAMED_FAILURES} more" if len(items) > NAMED_FAILURES else "")


def image_files(paths: Sequence[Path], skipped: Skipped | None = None) -> list[Path]:
    """The files to predict: each file as given, and in each folder (recursively, sorted) the
    files whose extension Pillow knows. A path that does not exist stays in the list, so it is
    reported with the unreadable files; one that is not a regular file, and a folder that cannot
    be searched, go to ``skipped`` with the reason instead (never opened)."""
    skipped = Skipped() if skipped is None else skipped
    known = set(Image.registered_extensions())
    files: list[Path] = []
    for path in paths:
        kind = not_regular(path)
        if kind == "a folder":
            files += _search(path, known, skipped)
        elif kind is not None:
            skipped.special.append((path, kind))
        else:
            files.append(path)
    return files


def _search(folder: Path, known: set[str], skipped: Skipped) -> list[Path]:
    """The image files under ``folder``, sorted; links to folders are not followed (as ``rglob``)."""
    found: list[Path] = []

    def unsearchable(error: OSError) -> None:
        skipped.folders.append((Path(error.filename or folder), error.strerror or short_reason(error)))

    for top, _, names in os.walk(folder, onerror=unsearchable):
        for name in names:
            path = Path(top, name)
            if path.suffix.lower() not in known:
                continue
            kind = not_regular(path)
            if kind is None:  # a regular file, or a dangling link: reading it says why not
                found.append(path)
            elif kind != "a folder":
                skipped.special.append((path, kind))
    return sorted(found)


def batches(
    files: list[Path], size: int, image_sizes: Sequence[int], failed: list[tuple[Path, str]]
) -> Iterator[tuple[list[Path], dict[int, torch.Tensor]]]:
    """Batches of up to ``size`` paths and their decoded images at each of ``image_sizes`` (each
    file read once per size, whatever the number of networks that take it); the files that
    cannot be read go to ``failed`` with the reason."""
    for start in range(0, len(files), size):
        good: list[Path] = []
        images: dict[int, list[torch.Tensor]] = {s: [] for s in image_sizes}
        for path in files[start : start + size]:
            try:
                read = {s: read_image(path, s) for s in image_sizes}
            except DataError as error:
                failed.append((path, str(error)))
                continue
            except OSError as error:  # a path that vanished or is not readable
                failed.append((path, error.strerror or "unreadable"))
                continue
            good.append(path)
            for s, image in read.items():
                images[s].append(image)
        if good:
            yield good, {s: torch.stack(stack) for s, stack in images.items()}


def top_predictions(probabilities: torch.Tensor, classes: list[str], k: int) -> list[list[dict[str, Any]]]:
    """The ``k`` best classes of each row: [{"class", "index", "probability"}], best first."""
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [
        [{"class": classes[i], "index": i, "probability": v} for v, i in zip(vs, ix, strict=False)]
        for vs, ix in zip(values.tolist(), indices.tolist(), strict=False)
    ]


def predictions(
    members: Sequence[Trained], files: list[Path], batch_size: int, k: int, failed: list[tuple[Path, str]]
) -> Iterator[dict[str, Any]]:
    """The top-``k`` predictions of each readable file as {"path", "predictions"} records (and
    "checkpoints" when ``members`` are several: ``check_ensemble`` passed them), a batch of
    ``batch_size`` images at a time: every member scores the batch and their mean is taken
    before the next batch is read, so output starts at once and memory stays bounded. The
    files that cannot be read go to ``failed`` with the reason."""
    first = members[0]
    task = first.task
    sizes = list(dict.fromkeys(m.image_size for m in members))
    named = {"checkpoints": [str(m.path) for m in members]} if len(members) > 1 else {}
    for paths, images in batches(files, batch_size, sizes, failed):
        scores = task.combine([m.scores(images[m.image_size]) for m in members])
        top = top_predictions(task.probabilities(scores).cpu(), first.classes, k)
        for path, best in zip(paths, top, strict=True):
            yield {"path": str(path), "predictions": best, **named}


def failure_sentence(failed: list[tuple[Path, str]], total: int) -> str:
    """One sentence about the files that could not be read: the count and the first few (the
    others, if any, were predicted)."""
    named = "; ".join(f"{quoted(str(p))} ({printable(reason)})" for p, reason in failed[:NAMED_FAILURES])
    more = f" and {len(failed) - NAMED_FAILURES} more" if len(failed) > NAMED_FAILURES else ""
    skipped = " and were skipped" if len(failed) < total else ""
    return (
        f"{len(failed)} of {total} files could not be read as images{skipped}: {named}{more}; convert or remove them."
    )


def format_table(result: dict[str, Any]) -> str:
    """An image's path and its predictions, a line each."""
    lines = [printable(result["path"])]
    for rank, p in enumerate(result["predictions"], 1):
        lines.append(f"  {rank:>3}  {100 * p['probability']:7.2f}%  {printable(p['class'])}")
    return "\n".join(lines)


def _network(trained: Trained) -> str:
    """``PaperAlexNet, 10-crop`` for the log line."""
    views = trained.pipeline.views
    return trained.config.model + (f", {views}-crop" if views > 1 else "")


def main(argv: Sequence[str]) -> int:
    args = get_parser().parse_args(list(argv))
    device = resolve_device(args.device)
    loaded: dict[Path, Trained] = {}
    for path in args.checkpoint:  # a checkpoint given twice is loaded once (and still counts twice)
        if path not in loaded:
            loaded[path] = load_trained(path, device)
    if args.crops is not None:
        loaded = {p: replace(t, pipeline=t.pipeline.with_views(args.crops)) for p, t in loaded.items()}
    members = [loaded[path] for path in args.checkpoint]
    check_ensemble(members)
    skipped = Skipped()
    files = image_files(args.paths, skipped)
    notes = skipped.sentences()
    for sentence in notes:
        logger.error("error: %s", sentence)
    if not files and notes:
        return 1
    if not files:
        raise UserError(
            f"no image files found in {', '.join(quoted(str(p)) for p in args.paths)}; pass image "
            "files or folders holding them."
        )
    scores = "sigmoid" if members[0].multilabel else "softmax"
    if len(members) == 1:
        views = members[0].pipeline.views
        logger.info(
            "%s: %s on %d image(s), %s scores%s",
            members[0].path,
            members[0].config.model,
            len(files),
            scores,
            f", {views}-crop" if views > 1 else "",
        )
    else:
        logger.info(
            "mean of %d networks (%s) on %d image(s), %s scores",
            len(members),
            "; ".join(f"{m.path}: {_network(m)}" for m in members),
            len(files),
            scores,
        )
    failed: list[tuple[Path, str]] = []
    predicted = 0
    for result in predictions(members, files, args.batch_size, args.topk, failed):
        if not predicted and not args.json and len(members) > 1:
            print(f"mean of {len(members)} checkpoints: {', '.join(printable(str(m.path)) for m in members)}")
        print(json.dumps(result) if args.json else format_table(result), flush=True)
        predicted += 1
    if failed and not predicted and not notes:
        raise UserError(failure_sentence(failed, len(files)))
    if failed:
        logger.error("error: %s", failure_sentence(failed, len(files)))
    return 1 if failed or notes else 0
