"""``python main.py predict --checkpoint CKPT PATH...``: the top-k classes of image files.

Each image goes the way the checkpoint's evaluation images went: resized (short side) and
centre-cropped to the data set's image size, as the caches hold them, then the run's evaluation
pipeline (10-crop averaged under ``-pt``), then softmax scores (per-class sigmoid for VOC).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data.core import DataError
from inference.checkpoint import Trained, load_trained, read_image
from utils import Check, UserError, printable, quoted, resolve_device

logger = logging.getLogger("alexnet")

#: How many bad files the one sentence names before "and N more".
NAMED_FAILURES = 3

EPILOG = """\
output: a table per image (rank, probability, class), or with --json one JSON object per line
and image: {"path": the file as found, "predictions": [{"class": name, "index": class index,
"probability": 0-1}, best first]}. Probabilities are softmax scores (they add up to 1 over all
classes), or for multi-label checkpoints (VOC) each class's own sigmoid score.

exit status: 0 when every image was predicted; 1 when some file could not be read (the others
are still predicted, the bad ones named on stderr in one sentence) or nothing could run."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py predict", description="Classify image files with a trained checkpoint.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="image files (any format Pillow reads, any size) or folders (searched recursively)",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a last.pt or best.pt of this tool")
    parser.add_argument("--topk", type=Check(int, 1, 100_000).parse, default=5, help="classes shown per image (5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    parser.add_argument(
        "--batch-size",
        type=Check(int, 1, 65_536).parse,
        default=32,
        help="images per forward pass (32; x10 views under -pt)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (CUDA when present)")
    return parser  # fmt: skip


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The files to predict: each file as given, and in each folder (recursively, sorted) the
    files whose extension Pillow knows. A path that does not exist stays in the list, so it is
    reported with the unreadable files."""
    known = set(Image.registered_extensions())
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known)
        else:
            files.append(path)
    return files


def batches(files: list[Path], size: int, image_size: int, failed: list[tuple[Path, str]]
            ) -> Iterator[tuple[list[Path], torch.Tensor]]:  # fmt: skip
    """Batches of up to ``size`` decoded images and their paths; the files that cannot be read
    go to ``failed`` with the reason."""
    for start in range(0, len(files), size):
        good, images = [], []
        for path in files[start : start + size]:
            try:
                images.append(read_image(path, image_size))
                good.append(path)
            except DataError as error:
                failed.append((path, str(error)))
            except OSError as error:  # a path that vanished or is not readable
                failed.append((path, error.strerror or "unreadable"))
        if good:
            yield good, torch.stack(images)


def top_predictions(probabilities: torch.Tensor, classes: list[str], k: int) -> list[list[dict[str, Any]]]:
    """The ``k`` best classes of each row: [{"class", "index", "probability"}], best first."""
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
    return [[{"class": classes[i], "index": i, "probability": v} for v, i in zip(vs, ix)]
            for vs, ix in zip(values.tolist(), indices.tolist())]  # fmt: skip


def predictions(trained: Trained, files: list[Path], batch_size: int, k: int, failed: list[tuple[Path, str]]
                ) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The top-``k`` predictions of each readable file as {"path", "predictions"} records, a batch
    of ``batch_size`` images at a time (so output starts at once and memory stays bounded);
    the files that cannot be read go to ``failed`` with the reason."""
    for paths, images in batches(files, batch_size, trained.image_size, failed):
        for path, top in zip(paths, top_predictions(trained.probabilities(images).cpu(), trained.classes, k)):
            yield {"path": str(path), "predictions": top}


def predict_files(trained: Trained, files: list[Path], batch_size: int, k: int
                  ) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:  # fmt: skip
    """``predictions`` as a list, and the files that could not be read with the reason."""
    failed: list[tuple[Path, str]] = []
    return list(predictions(trained, files, batch_size, k, failed)), failed


def failure_sentence(failed: list[tuple[Path, str]], total: int) -> str:
    """One sentence about the files that could not be read: the count and the first few (the
    others, if any, were predicted)."""
    named = "; ".join(f"{quoted(str(p))} ({printable(reason)})" for p, reason in failed[:NAMED_FAILURES])
    more = f" and {len(failed) - NAMED_FAILURES} more" if len(failed) > NAMED_FAILURES else ""
    skipped = " and were skipped" if len(failed) < total else ""
    return (f"{len(failed)} of {total} files could not be read as images{skipped}: {named}{more}; "
            "convert or remove them.")  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    lines = [printable(result["path"])]
    for rank, p in enumerate(result["predictions"], 1):
        lines.append(f"  {rank:>3}  {100 * p['probability']:7.2f}%  {printable(p['class'])}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    args = get_parser().parse_args(list(argv))
    device = resolve_device(args.device)
    trained = load_trained(args.checkpoint, device)
    files = image_files(args.paths)
    if not files:
        raise UserError(f"no image files found in {', '.join(quoted(str(p)) for p in args.paths)}; pass image "
                        "files or folders holding them.")  # fmt: skip
    views = trained.pipeline.views
    logger.info("%s: %s on %d image(s), %s scores%s", args.checkpoint, trained.config.model, len(files),
                "sigmoid" if trained.multilabel else "softmax", f", {views}-crop" if views > 1 else "")  # fmt: skip
    failed: list[tuple[Path, str]] = []
    predicted = 0
    for result in predictions(trained, files, args.batch_size, args.topk, failed):
        print(json.dumps(result) if args.json else format_table(result), flush=True)
        predicted += 1
    if failed and not predicted:
        raise UserError(failure_sentence(failed, len(files)))
    if failed:
        logger.error("error: %s", failure_sentence(failed, len(files)))
        return 1
    return 0
