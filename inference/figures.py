"""``python main.py figures``: the paper's pictures of a trained network, from a checkpoint.

python main.py figures --checkpoint checkpoints/Shapes/<run>/best.pt           # into runs/Shapes/<run>/figures/
python main.py figures --checkpoint best.pt --out pictures --images 8 --queries 5

Three PNGs, and the same three images in the run's TensorBoard (tags ``figures/...``, at the
checkpoint's step):

- ``kernels``: conv1's kernels, each normalised on its own, one labelled block per tower for the
  paper's two-tower networks (Figure 3);
- ``predictions``: evaluation images with their top-5 scores, the true class in red (Figure 4,
  left; per-class sigmoid scores and every present class for multi-label VOC);
- ``neighbours``: query images from the evaluation split and the 6 training images whose fc7
  activations (the last hidden layer, after its ReLU) are nearest in Euclidean distance
  (Figure 4, right). The training set is streamed through the network once in batches with a
  running top-6 per query, so memory does not grow with the data set.

The data set, its preprocessing (the run's evaluation pipeline; the centre view for fc7 under
10-crop) and the network come from the checkpoint's config, as for ``--evaluate``. Files are
named ``<figure>_<checkpoint>_epochNNN.png`` and never replace an earlier one: a taken name gets
``-2``, ``-3``...
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from data.core import DataError, DataSet, Split
from data.loaders import Loaders
from data.registry import load_dataset
from data.transforms import Pipeline
from hardware.capabilities import resolve_device
from network import make_model
from settings.rules import POSITIVE
from trainer import run_loaders
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.figures import (
    figure_image,
    model_kernel_grid,
    neighbours_grid,
    png_bytes,
    predictions_figure,
    true_classes,
)
from training.outputs import output_dir_of, run_paths
from training.resume import load_weights
from utils import UserError, short_reason, temp_file_beside

logger = logging.getLogger(__name__)

#: Training images whose fc7 activations are shown next to each query, as in the paper.
NEIGHBOURS = 6


def get_args_parser() -> argparse.ArgumentParser:
    """The flags of ``python main.py figures``."""
    parser = argparse.ArgumentParser(
        prog="main.py figures",
        description="Draw the paper's figures for a checkpoint: conv1's kernels, top-5 predictions and fc7 nearest "
        "neighbours, as PNGs and in the run's TensorBoard.",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        metavar="CKPT",
        help="a best.pt or last.pt written by this tool (required)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding the data set (default: the one the checkpoint recorded, when it exists "
        "here, else dataset)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder for the VOC 256x256 resize cache (default: alexnet_cache/ in the VOC folder, or ~/.cache/alexnet "
        "when that is read-only)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the PNGs (default: runs/<dataset>/<run>/figures/ of the checkpoint's run)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="device to run the network on, e.g. cpu, cuda (default: cuda when present, else cpu)",
    )
    parser.add_argument(
        "--images",
        type=POSITIVE.parse,
        default=8,
        help="evaluation images in the predictions figure (default: %(default)s)",
    )
    parser.add_argument(
        "--queries", type=POSITIVE.parse, default=5, help="query images in the neighbours figure (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=POSITIVE.parse,
        default=256,
        help="model inputs per batch while the training set is streamed (default: %(default)s)",
    )
    return parser


def main(argv: list[str]) -> int:
    """Draw the figures of ``--checkpoint``; 0 on success (``UserError`` for bad input)."""
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint)
    config = TrainConfig.from_dict(checkpoint["config"])
    run_dir = run_folder(args.checkpoint, config)
    events = events_folder(args.checkpoint, run_dir, args.out)
    data = figures_data(args, config, device)
    model = make_model(config.model, data.num_classes, lrn=config.lrn, fidelity=config.fidelity)
    load_weights(checkpoint, args.checkpoint, model, data.num_classes, data.name)
    stem, step = f"{args.checkpoint.stem}_epoch{int(checkpoint['epoch']):03d}", int(checkpoint["global_step"])
    del checkpoint  # the weights are in the model now; the optimiser's state is not needed
    model = model.to(device).eval()
    loaders = run_loaders(config, data, model.input_size, device)
    pictures = draw(model, loaders, data.classes, data.multilabel, args, device)
    written = [
        write_new(png_bytes(image), args.out or run_dir / "figures", f"{name}_{stem}")
        for name, image in pictures.items()
    ]
    log_to_tensorboard(events, pictures, step)
    for path in written:
        logger.info("wrote %s", path)
    return 0


def events_folder(checkpoint: Path, run_dir: Path, out: Path | None) -> Path:
    """Where the figures' TensorBoard images go: the run's folder, or ``out`` when that folder
    is not here or cannot be written (it is checked before anything is drawn, so TensorBoard's
    writer thread never meets a folder it cannot write). One sentence without ``out``."""
    problem = write_problem(run_dir) if run_dir.is_dir() else "does not exist here"
    if problem is None:
        return run_dir
    if out is None:
        problem = problem if problem == "does not exist here" else f"cannot be written ({problem})"
        raise UserError(f"the run folder of {checkpoint}, {run_dir}, {problem}; pass --out DIR for the figures.")
    if run_dir.is_dir():
        logger.warning(
            "the run folder %s cannot be written (%s): the figures' TensorBoard images go to %s", run_dir, problem, out
        )
    return out


def write_problem(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (tried for real: permissions lie on some
    mounts, and root ignores them), or None; nothing is left behind."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return short_reason(error.strerror or error)
    return None


def figures_data(args: argparse.Namespace, config: TrainConfig, device: torch.device) -> DataSet:
    """The checkpoint's data set, read where ``--data-dir`` says, else where the checkpoint
    recorded it when that folder exists here, else from ``dataset`` (as ``--evaluate`` does). A
    data set that is not there names the folder the checkpoint recorded."""
    recorded = Path(config.data_dir)
    data_dir = args.data_dir or (recorded if recorded.is_dir() else Path("dataset"))
    # Where and how this process reads the data is its own business, as for --evaluate.
    config = replace(
        config, data_dir=str(data_dir), download=False, cache_dir=str(args.cache_dir or ""), device=str(device)
    )
    try:
        return load_dataset(config.dataset, config)
    except DataError:
        if args.data_dir is not None or recorded.is_dir():
            raise
    raise UserError(
        f"checkpoint {args.checkpoint} was trained on {config.dataset} in {recorded}, which does not "
        f"exist here (nor is it in {data_dir}); pass --data-dir DIR, the folder that holds "
        f"{config.dataset} now."
    )


def draw(
    model: nn.Module,
    loaders: Loaders,
    classes: list[str],
    multilabel: bool,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The three pictures (uint8 3 x H x W) of ``model`` on the run's data (``loaders``: the
    placed splits and the evaluation pipeline)."""
    train, test, pipeline = loaders.train.split, loaders.eval.split, loaders.pipeline
    chosen = spread(len(test), args.images)
    scores = predict(model, pipeline, test.images[chosen].to(device), multilabel)
    figure = predictions_figure(test.images[chosen], scores.cpu(), test.labels[chosen].cpu(), classes, multilabel)
    queries = chosen[: args.queries] if args.queries <= len(chosen) else spread(len(test), args.queries)
    return {
        "kernels": model_kernel_grid(model),
        "predictions": figure_image(figure),
        "neighbours": draw_neighbours(model, pipeline, train, test, queries, args.batch_size, device),
    }


def run_folder(checkpoint_path: Path, config: TrainConfig) -> Path:
    """``runs/<dataset>/<run>/`` of the checkpoint's run: beside its ``checkpoints/`` folder when
    the file sits at ``<out>/checkpoints/<dataset>/<run>/`` (``output_dir_of``, as ``--resume``
    finds it), else under the config's ``output_dir`` (the names checked to stay in their
    folder, ``training.outputs.run_paths``)."""
    output = output_dir_of(checkpoint_path, config) or config.output_dir
    return run_paths(Path(output), config.dataset, config.run_name)[0]


def spread(count: int, wanted: int) -> torch.Tensor:
    """``wanted`` indices spread evenly over ``range(count)`` (all of them when fewer)."""
    return torch.linspace(0, count - 1, min(count, wanted)).round().long().unique()


def centre_view(views: int) -> int:
    """Which of a pipeline's evaluation views is the centre crop: the fifth of the ten
    (``data.transforms.ten_crop``: four corners, centre, then their mirrors), or the only one."""
    return 4 if views == 10 else 0


@torch.inference_mode()
def predict(model: nn.Module, pipeline: Pipeline, images: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Scores (N x C) of uint8 images as the run's evaluation computes them: the softmax (sigmoid
    for multi-label data) of every view, averaged (10-crop under the paper setup)."""
    inputs = pipeline.evaluate(images)
    n, views = inputs.shape[:2]
    logits = model(inputs.flatten(0, 1)).float().view(n, views, -1)
    return (logits.sigmoid() if multilabel else logits.softmax(-1)).mean(1)


def fc7_module(model: nn.Module) -> nn.Module:
    """The module whose output is fc7's activation: the classifier's last ReLU (after fc7 in
    every network of ``network.py``: torchvision's head and the paper's)."""
    return [m for m in model.classifier if isinstance(m, nn.ReLU)][-1]


@torch.inference_mode()
def fc7_features(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """fc7's activations (N x 4096, float32) for model inputs (N x C x H x W)."""
    captured: list[torch.Tensor] = []
    hook = fc7_module(model).register_forward_hook(lambda module, args, output: captured.append(output.float().clone()))
    try:
        model(inputs)
    finally:
        hook.remove()
    return captured[0]


def nearest_neighbours(
    queries: torch.Tensor, batches: Iterable[torch.Tensor], k: int = NEIGHBOURS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows nearest to each query (Euclidean), over rows that arrive in ``batches``:
    (distances, indices), Q x k each (fewer columns when there are fewer rows), nearest first,
    indices counted over all batches.

    Only the running best ``k`` per query is kept: each batch's distances are merged with it
    and cut back to ``k``, so memory is the queries, one batch and Q x (k + batch), whatever
    the number of rows. Distances are computed directly, not through the matrix product that
    ``cdist`` otherwise uses for speed, so a row's distance does not depend on its batch."""
    best = torch.full((len(queries), 0), float("inf"), device=queries.device)
    where = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)
    seen = 0
    for rows in batches:
        distances = torch.cdist(queries[None], rows[None].to(queries), compute_mode="donot_use_mm_for_euclid_dist")[0]
        numbers = torch.arange(seen, seen + len(rows), device=queries.device).expand(len(queries), -1)
        best, picked = torch.cat([best, distances], 1).topk(min(k, best.shape[1] + len(rows)), largest=False)
        where = torch.cat([where, numbers], 1).gather(1, picked)
        seen += len(rows)
    return best, where


def training_features(
    model: nn.Module, pipeline: Pipeline, images: torch.Tensor, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """fc7 features of ``images`` (uint8, anywhere: a memory-mapped cache too) batch by batch,
    each from its centre view; ``batch_size`` counts model inputs, as for evaluation."""
    view = centre_view(pipeline.views)
    step = max(1, batch_size // pipeline.views)
    for start in range(0, len(images), step):
        inputs = pipeline.evaluate(images[start : start + step].to(device))[:, view]
        yield fc7_features(model, inputs)


def draw_neighbours(
    model: nn.Module,
    pipeline: Pipeline,
    train: Split,
    test: Split,
    queries: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """The neighbours picture for evaluation images ``queries`` (indices into ``test``)."""
    query_images = test.images[queries]
    inputs = pipeline.evaluate(query_images.to(device))[:, centre_view(pipeline.views)]
    features = fc7_features(model, inputs)
    _, nearest = nearest_neighbours(features, training_features(model, pipeline, train.images, batch_size, device))
    nearest = nearest.cpu()
    if nearest.shape[1] < NEIGHBOURS:
        logger.warning(
            "the training set has %d images: showing %d neighbours per query instead of %d",
            len(train),
            nearest.shape[1],
            NEIGHBOURS,
        )
    found = train.images[nearest.flatten()].cpu().view(*nearest.shape, *train.images.shape[1:])
    same = torch.tensor(
        [
            [bool(set(true_classes(test.labels[q].cpu())) & set(true_classes(train.labels[i].cpu()))) for i in row]
            for q, row in zip(queries.tolist(), nearest, strict=False)
        ]
    )
    return neighbours_grid(query_images.cpu(), found, same)


def write_new(data: bytes, folder: Path, stem: str) -> Path:
    """``folder/<stem>.png`` written whole, or ``<stem>-2.png``, ``-3``... when taken: an earlier
    figure is never replaced (the name is claimed by a hard link, which fails on an existing
    file, so two processes cannot take the same one)."""
    try:
        return _write_new(data, folder, stem)
    except OSError as error:
        raise UserError(
            f"cannot write the figures to {folder} ({short_reason(error.strerror or error)}); pass a writable --out."
        ) from None


def _write_new(data: bytes, folder: Path, stem: str) -> Path:
    fd, tmp = temp_file_beside(folder / f"{stem}.png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        n = 1
        while True:
            path = folder / (f"{stem}.png" if n == 1 else f"{stem}-{n}.png")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                n += 1
    finally:
        Path(tmp).unlink(missing_ok=True)


def log_to_tensorboard(folder: Path, pictures: dict[str, torch.Tensor], step: int) -> None:
    """The pictures as TensorBoard images ``figures/<name>`` at ``step``, in ``folder``'s events."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        for name, image in pictures.items():
            writer.add_image(f"figures/{name}", image, step)
    finally:
        writer.close()
