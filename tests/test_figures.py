"""The paper's figures (``python main.py figures``, ``training.figures``): the pictures' pixel
sizes worked out from their layouts, the two-tower kernel grid pixel by pixel, per-kernel
normalisation, fc7 features, the streamed nearest neighbours against a brute-force search, and
the command end to end on a ``-c`` and a ``-pm -pt`` checkpoint (PNGs, TensorBoard, never
overwriting, the sentence for a wrong checkpoint). The kernel grid the trainer logs every
``-lce`` epochs is read back from the ``cifar_run`` fixture's events."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from main_cli import copy_run, only
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from inference.figures import fc7_features, fc7_module, main, nearest_neighbours, spread, write_new
from network import CifarAlexNet, PaperAlexNet, SplitPaperAlexNet
from trainer import Trainer
from training.figures import (
    FRAME,
    GAP,
    LABEL_HEIGHT,
    NEIGHBOUR_PIXELS,
    OTHER_COLOUR,
    PAD,
    QUERY_COLOUR,
    SAME_COLOUR,
    KernelLayout,
    NeighbourLayout,
    conv1_kernels,
    figure_image,
    kernel_grid,
    model_kernel_grid,
    neighbours_grid,
    normalise_each,
    png_bytes,
    predictions_figure,
    predictions_size,
    true_classes,
    write_confusion_csv,
)
from utils import UserError

RED, BLUE = torch.tensor([255, 0, 0], dtype=torch.uint8), torch.tensor([0, 0, 255], dtype=torch.uint8)


def grid_size(count: int, size: int, scale: int, towers: int) -> tuple[int, int]:
    """(height, width) of the kernel grid by hand: rows of at most 16 kernels of size * scale
    pixels with PAD between and around them, a label strip above each tower's block, GAP
    between blocks."""
    per_tower = count // towers
    columns, rows = min(16, per_tower), math.ceil(per_tower / 16)
    cell = size * scale
    block = LABEL_HEIGHT + rows * (cell + PAD) + PAD
    return towers * block + (towers - 1) * GAP, columns * (cell + PAD) + PAD


def png_size(image: torch.Tensor, tmp_path: Path) -> tuple[int, int]:
    """(height, width) of ``image`` written as a PNG and opened again by PIL."""
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes(image))
    with Image.open(path) as opened:
        opened.verify()
    with Image.open(path) as opened:
        assert opened.format == "PNG" and opened.mode == "RGB"
        return opened.size[1], opened.size[0]


@pytest.mark.parametrize(("count", "size", "scale", "towers"), [(96, 11, 3, 2), (64, 3, 11, 1), (5, 5, 2, 1)])
def test_kernel_grid_has_the_size_of_its_layout(count, size, scale, towers, tmp_path):
    kernels = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(count))
    image = kernel_grid(kernels, towers, scale)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert png_size(image, tmp_path) == grid_size(count, size, scale, towers)
    layout = KernelLayout(count, size, scale, towers)
    assert (layout.height, layout.width) == grid_size(count, size, scale, towers)


def test_each_kernel_is_stretched_to_black_and_white_on_its_own():
    kernels = torch.zeros(2, 3, 2, 2)
    kernels[0, 0, 0, 0], kernels[0, 1, 1, 1], kernels[0, 2, 0, 1] = -2.0, 6.0, 0.0
    kernels[1] = 7.0  # constant: no contrast to stretch
    out = normalise_each(kernels)
    assert out[0, 0, 0, 0] == 0 and out[0, 1, 1, 1] == 1 and out[0, 2, 0, 1] == 0.25
    assert torch.all(out[1] == 0.5)


@pytest.fixture(scope="module")
def paper_model() -> PaperAlexNet:
    """A PaperAlexNet whose kernel i holds one bright pixel at (i // 11, i % 11) of its tower's
    colour: red for kernels 0-47 (the first GPU), blue for 48-95."""
    model = PaperAlexNet(num_classes=10)
    with torch.no_grad():
        weight = model.features[0].weight
        weight.zero_()
        for i in range(96):
            weight[i, 0 if i < 48 else 2, (i % 48) // 11, (i % 48) % 11] = 1.0
    return model


def test_two_tower_grid_puts_kernels_0_to_47_in_the_first_block_and_48_to_95_in_the_second(paper_model):
    kernels, towers = conv1_kernels(paper_model)
    assert towers == 2 and kernels.shape == (96, 3, 11, 11)
    image = kernel_grid(kernels, towers, scale=3)
    height, width = grid_size(96, 11, 3, 2)
    assert image.shape == (3, height, width)
    block = (height - GAP) // 2
    pixels = image.permute(1, 2, 0)
    for top, colour, other in ((0, RED, BLUE), (block + GAP, BLUE, RED)):
        part = pixels[top : top + block]
        assert int((part == colour).all(-1).sum()) == 48 * 3 * 3  # one 3x3-enlarged pixel per kernel
        assert not (part == other).all(-1).any()
    # Kernel by kernel, in rows of 16: its bright pixel where its own index put it.
    cell = 33
    for i in range(96):
        tower, within = divmod(i, 48)
        top = tower * (block + GAP) + LABEL_HEIGHT + PAD + (within // 16) * (cell + PAD)
        left = PAD + (within % 16) * (cell + PAD)
        y, x = top + 3 * (within // 11), left + 3 * (within % 11)
        kernel = pixels[top : top + cell, left : left + cell].clone()
        assert torch.equal(
            kernel[y - top : y - top + 3, x - left : x - left + 3], (RED if i < 48 else BLUE).expand(3, 3, 3)
        ), i
        kernel[y - top : y - top + 3, x - left : x - left + 3] = 0
        assert not kernel.any(), i  # the rest of the kernel is black


def test_split_model_gives_the_grouped_models_kernel_grid(paper_model):
    split = SplitPaperAlexNet(paper_model)
    assert torch.equal(model_kernel_grid(split), model_kernel_grid(paper_model))


def test_single_tower_networks_get_one_block():
    assert conv1_kernels(CifarAlexNet(10))[1] == 1
    assert conv1_kernels(CifarAlexNet(10, paper=True))[1] == 2  # the paper's features on 32x32 images


# CifarAlexNet has torchvision's head (dropout before fc6 and fc7), its paper variant the paper's
# (dropout after their ReLUs): the two classifiers of every network in network.py.
@pytest.mark.parametrize(
    "build", [lambda: CifarAlexNet(10), lambda: CifarAlexNet(10, paper=True)], ids=["torchvision-head", "paper-head"]
)
def test_fc7_features_are_what_fc8_reads(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, model.input_size, model.input_size)
    features = fc7_features(model, x)
    assert features.shape == (2, 4096) and bool((features >= 0).all()) and bool((features > 0).any())
    rest = list(model.classifier)[list(model.classifier).index(fc7_module(model)) + 1 :]
    assert isinstance(rest[-1], torch.nn.Linear) and not any(isinstance(m, torch.nn.Linear) for m in rest[:-1])
    with torch.no_grad():
        assert torch.allclose(torch.nn.Sequential(*rest)(features), model(x), atol=1e-5)


def test_streamed_nearest_neighbours_equal_a_brute_force_search():
    generator = torch.Generator().manual_seed(0)
    queries, rows = torch.randn(5, 32, generator=generator), torch.randn(103, 32, generator=generator)
    distances, indices = nearest_neighbours(queries, rows.split(10), k=6)  # 11 batches, the last of 3
    expected_distances, expected = torch.cdist(queries, rows).topk(6, largest=False)
    assert torch.equal(indices, expected)
    assert torch.allclose(distances, expected_distances, atol=1e-5)
    # A query that is itself a row finds itself first, at distance 0.
    distances, indices = nearest_neighbours(rows[[7, 99]], rows.split(4), k=6)
    assert indices[:, 0].tolist() == [7, 99] and distances[:, 0].tolist() == [0.0, 0.0]


def test_fewer_training_images_than_neighbours_gives_them_all_nearest_first():
    rows = torch.tensor([[0.0], [5.0], [1.0], [3.0]])
    distances, indices = nearest_neighbours(torch.tensor([[0.4], [4.4]]), rows.split(3), k=6)
    assert indices.tolist() == [[0, 2, 3, 1], [1, 3, 2, 0]]
    assert torch.allclose(distances, torch.tensor([[0.4, 0.6, 2.6, 4.6], [0.6, 1.4, 3.4, 4.4]]))


def test_spread_indices_cover_the_split():
    assert spread(40, 8).tolist() == [0, 6, 11, 17, 22, 28, 33, 39]
    assert spread(3, 8).tolist() == [0, 1, 2]


def test_true_classes_of_single_and_multi_label_targets():
    assert true_classes(torch.tensor(3)) == [3]
    assert true_classes(torch.tensor([1, -1, 0, 1], dtype=torch.int8)) == [0, 3]  # 0: difficult only, not shown


@pytest.mark.parametrize(("count", "multilabel"), [(8, False), (3, True)])
def test_predictions_figure_has_the_size_of_its_panels(count, multilabel, tmp_path):
    generator = torch.Generator().manual_seed(count)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    classes = [f"class {c}" for c in range(20 if multilabel else 10)]
    logits = torch.randn(count, len(classes), generator=generator)
    if multilabel:
        scores, labels = logits.sigmoid(), torch.randint(-1, 2, (count, 20), dtype=torch.int8, generator=generator)
    else:
        scores, labels = logits.softmax(1), torch.arange(count)
    image = figure_image(predictions_figure(images, scores, labels, classes, multilabel))
    rows, columns = math.ceil(count / 4), min(count, 4)
    assert predictions_size(count) == (rows * 300, columns * 240)  # 2.4 x 3.0 inch panels at 100 dpi
    assert png_size(image, tmp_path) == predictions_size(count)


def test_neighbours_grid_layout_and_frames(tmp_path):
    queries = torch.full((2, 3, 32, 32), 10, dtype=torch.uint8)
    neighbours = torch.full((2, 6, 3, 32, 32), 20, dtype=torch.uint8)
    same = torch.tensor([[True, False, True, False, False, False], [False] * 6])
    image = neighbours_grid(queries, neighbours, same)
    cell = NEIGHBOUR_PIXELS + 2 * FRAME
    height, width = LABEL_HEIGHT + 2 * (cell + PAD) + PAD, 7 * (cell + PAD) + PAD + GAP
    assert png_size(image, tmp_path) == (height, width) == (NeighbourLayout(2).height, NeighbourLayout(2).width)
    pixels = image.permute(1, 2, 0)
    top = LABEL_HEIGHT + PAD
    assert pixels[top, PAD].tolist() == list(QUERY_COLOUR)
    assert pixels[top + FRAME, PAD + FRAME].tolist() == [10, 10, 10]
    for column, colour in ((1, SAME_COLOUR), (2, OTHER_COLOUR), (3, SAME_COLOUR)):
        left = PAD + column * (cell + PAD) + GAP
        assert pixels[top, left].tolist() == list(colour)
        assert pixels[top + FRAME + NEIGHBOUR_PIXELS - 1, left + FRAME].tolist() == [20, 20, 20]


# ---------------------------------------------------------------------------------------------
# The command end to end


def pngs(folder: Path) -> dict[str, tuple[int, int]]:
    """{file name: (height, width)} of the PNGs in ``folder``."""
    out = {}
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            out[path.name] = (image.size[1], image.size[0])
    return out


def images_in(folder: Path) -> dict[str, list]:
    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return {tag: events.Images(tag) for tag in events.Tags()["images"]}


def test_trainer_logs_the_kernel_grid_with_the_confusion_matrix(cifar_run):
    run_dir = only(cifar_run / "runs" / "Shapes", "*")
    logged = images_in(run_dir)
    # Two epochs, -lce 10: logged at the last epoch only, with the confusion matrix.
    assert len(logged["kernels/conv1"]) == 1 == len(logged["Shapes/val/confusion"])
    assert logged["kernels/conv1"][0].step == logged["Shapes/val/confusion"][0].step
    height, width = grid_size(64, 3, 11, 1)
    assert (logged["kernels/conv1"][0].height, logged["kernels/conv1"][0].width) == (height, width)


def test_trainer_logs_the_kernel_grid_every_lce_epochs_and_at_the_last():
    logged = []

    class Writer:
        def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
            logged.append((tag, tuple(image.shape), step))

        def flush(self) -> None:
            pass

    model = CifarAlexNet(10)
    writer = Writer()
    outputs = SimpleNamespace(writer=writer, tensorboard=lambda action: action(writer))  # as RunOutputs.tensorboard
    trainer = SimpleNamespace(
        config=SimpleNamespace(log_confusion_epoch=2, n_epoch=5),
        model=model,
        outputs=outputs,
        progress=SimpleNamespace(),
    )
    for epoch in range(1, 6):
        trainer.progress.epoch, trainer.progress.global_step = epoch, 10 * epoch
        Trainer._log_kernels(trainer)
    assert logged == [("kernels/conv1", (3, *grid_size(64, 3, 11, 1)), step) for step in (20, 40, 50)]


def test_figures_of_a_cifar_checkpoint_go_to_the_run_folder_and_its_tensorboard(cifar_run, tmp_path):
    best = copy_run(cifar_run, tmp_path / "work").with_name("best.pt")
    run_dir = only(tmp_path / "work" / "runs" / "Shapes", "*")
    epoch = torch.load(best, weights_only=True)["epoch"]
    assert main(["--checkpoint", str(best), "--device", "cpu"]) == 0
    expected = {
        f"kernels_best_epoch{epoch:03d}.png": grid_size(64, 3, 11, 1),
        f"neighbours_best_epoch{epoch:03d}.png": (NeighbourLayout(5).height, NeighbourLayout(5).width),
        f"predictions_best_epoch{epoch:03d}.png": predictions_size(8),
    }
    assert pngs(run_dir / "figures") == expected
    logged = images_in(run_dir)
    assert {"figures/kernels", "figures/predictions", "figures/neighbours"} <= logged.keys()
    assert logged["figures/kernels"][0].step == torch.load(best, weights_only=True)["global_step"]
    # The kernels are the checkpoint's, not a freshly built model's.
    model = CifarAlexNet(10)
    model.load_state_dict(torch.load(best, weights_only=True)["model"])
    with Image.open(run_dir / "figures" / f"kernels_best_epoch{epoch:03d}.png") as image:
        drawn = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(drawn, model_kernel_grid(model))


def test_a_taken_name_gets_the_next_number(tmp_path):
    (tmp_path / "kernels_best_epoch002.png").write_bytes(b"earlier")
    (tmp_path / "kernels_best_epoch002-2.png").write_bytes(b"earlier too")
    assert write_new(b"new", tmp_path, "kernels_best_epoch002") == tmp_path / "kernels_best_epoch002-3.png"
    assert (tmp_path / "kernels_best_epoch002.png").read_bytes() == b"earlier"
    assert (tmp_path / "kernels_best_epoch002-2.png").read_bytes() == b"earlier too"
    assert (tmp_path / "kernels_best_epoch002-3.png").read_bytes() == b"new"
    assert {p.name for p in tmp_path.iterdir()} == {f"kernels_best_epoch002{s}.png" for s in ("", "-2", "-3")}
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(UserError, match=r"cannot write the figures to .*afile/figures \(Not a directory\); pass a wr"):
        write_new(b"new", tmp_path / "afile" / "figures", "kernels")


def test_a_checkpoint_away_from_its_run_folder_needs_out(cifar_run, tmp_path, monkeypatch):
    best = copy_run(cifar_run, tmp_path / "work").with_name("best.pt")
    moved = tmp_path / "elsewhere" / "best.pt"
    moved.parent.mkdir()
    moved.write_bytes(best.read_bytes())
    monkeypatch.chdir(tmp_path / "elsewhere")  # the config's output_dir "." holds no runs/ here
    with pytest.raises(UserError, match=r"does not exist here; pass --out DIR"):
        main(["--checkpoint", str(moved), "--device", "cpu"])
    assert not (tmp_path / "elsewhere" / "runs").exists()


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, run_main) -> Path:
    """A one-epoch PaperAlexNet run with the paper's setup (10-crop evaluation) on 8 + 2 Shapes images."""
    root = tmp_path_factory.mktemp("paper_run")
    flags = ["-pm", "-pt", "-ne", "1", "--shapes-train", "8", "--shapes-test", "2", "--batch-size", "8"]
    result = run_main(*flags, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def test_figures_of_a_paper_checkpoint_show_two_towers(paper_run, tmp_path):
    best = only(paper_run / "checkpoints" / "Shapes", "*/best.pt")
    # 30 model inputs per batch: 3 training images of 10 views, so the 8 are streamed in 3 batches.
    args = [
        "--checkpoint",
        str(best),
        "--out",
        str(tmp_path / "out"),
        "--images",
        "2",
        "--queries",
        "2",
        "--batch-size",
        "30",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    sizes = pngs(tmp_path / "out")
    assert sizes["kernels_best_epoch001.png"] == grid_size(96, 11, 3, 2)
    assert sizes["predictions_best_epoch001.png"] == predictions_size(2)
    assert sizes["neighbours_best_epoch001.png"] == (NeighbourLayout(2).height, NeighbourLayout(2).width)
    logged = images_in(only(paper_run / "runs" / "Shapes", "*"))  # the run's TensorBoard, although --out
    assert (logged["figures/kernels"][0].height, logged["figures/kernels"][0].width) == grid_size(96, 11, 3, 2)


def test_a_wrong_checkpoint_is_one_sentence(tmp_path, run_main):
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    result = run_main("figures", "--checkpoint", "notes.pt", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: checkpoint notes.pt cannot be loaded (")
    assert line.endswith(
        "); it is damaged or was not written by this tool, so use another one (best.pt or last.pt of the run)."
    )
    with pytest.raises(UserError, match="does not exist; pass the path of a last.pt or best.pt"):
        main(["--checkpoint", str(tmp_path / "missing.pt")])


def test_confusion_csv_keeps_its_columns_whatever_the_class_names(tmp_path):
    """Class names with a comma, quotes or a line break (an ImageFolder's folders) are quoted as
    CSV quotes them: ``csv.reader`` reads back exactly the names and the counts."""
    classes = ["Ants, small", 'say "cheese"', "two\nlines", "plain"]
    confusion = torch.arange(16).view(4, 4)
    write_confusion_csv(confusion, classes, tmp_path / "confusion.csv")
    with open(tmp_path / "confusion.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["true\\predicted", *classes]
    assert rows[1:] == [[name, *map(str, row)] for name, row in zip(classes, confusion.tolist(), strict=False)]


def test_a_run_folder_this_user_cannot_write_is_one_sentence_or_out(cifar_run, tmp_path, run_main):
    """Without --out: one sentence before anything is drawn. With --out: the PNGs and the
    TensorBoard images go there (TensorBoard's writer thread raised a PermissionError before);
    the run folder is left as it was either way."""
    from main_cli import snapshot, unchanged, without_file_permission_override

    prefix = without_file_permission_override()
    best = copy_run(cifar_run, tmp_path / "work").with_name("best.pt")
    run_dir = only(tmp_path / "work" / "runs" / "Shapes", "*")
    before = snapshot(run_dir)
    os.chmod(run_dir, 0o555)
    try:
        refused = run_main("figures", "--checkpoint", str(best), "--device", "cpu", cwd=tmp_path, prefix=prefix)
        drawn = run_main(
            "figures", "--checkpoint", str(best), "--device", "cpu", "--out", "out", cwd=tmp_path, prefix=prefix
        )
    finally:
        os.chmod(run_dir, 0o755)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    sentence = (
        f"error: the run folder of {best}, {run_dir}, cannot be written (Permission denied); pass --out DIR "
        "for the figures."
    )
    assert refused.stderr.strip().splitlines() == [sentence]
    assert drawn.returncode == 0 and "Traceback" not in drawn.stderr and "error" not in drawn.stderr, drawn.stderr
    assert f"the run folder {run_dir} cannot be written (Permission denied)" in drawn.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    assert {"figures/kernels", "figures/predictions", "figures/neighbours"} <= images_in(tmp_path / "out").keys()
    assert unchanged(run_dir, before) and not (run_dir / "figures").exists()
