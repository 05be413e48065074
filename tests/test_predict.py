"""``predict`` and the checkpoints it reads: the saved preprocessing round-trips and is checked,
probabilities are the model's softmax (sigmoid for multi-label) of the run's own evaluation
pipeline, 10-crop equals the trainer's evaluation, an ensemble's are the mean of its members',
bad files and mismatched members are one sentence."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkpoint_files import CLASSES, make_checkpoint
from PIL import Image

import inference.predict
from data.core import Split
from data.loaders import eval_loader
from data.registry import load_dataset
from data.transforms import make_pipeline, pipeline_from_state
from inference.checkpoint import Trained, check_ensemble, load_trained, read_image
from inference.predict import image_files, predictions
from network import MODELS, make_model
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import TrainConfig
from training.loop import evaluate
from training.resume import Checkpointer, Progress
from training.schedule import PlateauSchedule
from utils import quoted


def checkpoint_of(folder: Path, model: str, train: Split, classes: list[str], seed: int) -> Path:
    """A checkpoint as ``make_checkpoint`` writes one, of a network initialised from ``seed`` on
    the given training images and classes: the members of the ensembles below, which need the
    same classes under other weights or image sizes."""
    config = TrainConfig(model=model, shapes_train=60, shapes_test=10)
    torch.manual_seed(seed)
    net = make_model(model, len(classes), lrn=config.lrn)
    pipeline = make_pipeline(train, MODELS[model].input_size, False, "cpu")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    generators = {"index": torch.Generator(), "augment": torch.Generator()}
    checkpointer = Checkpointer(folder, net, optimizer, PlateauSchedule(base_lr=0.01), None, generators)
    state = checkpointer.state(Progress(), "top1", classes, config, pipeline, train.images.shape[-1], "single-label")
    checkpointer.save(state, best=False, epoch=0)
    return checkpointer.last


def predicted(
    members: list[Trained], files: list[Path], batch_size: int, k: int
) -> tuple[list[dict], list[tuple[Path, str]]]:
    """What ``predict`` prints for ``files``, as records, and the files it could not read."""
    failed: list[tuple[Path, str]] = []
    return list(predictions(members, files, batch_size, k, failed)), failed


def as_tensor(records: list[dict], num_classes: int) -> torch.Tensor:
    """The images' probabilities of every class (records of ``k`` = ``num_classes``), as the
    float32 they were computed in (a float32 goes through a Python float unchanged)."""
    out = torch.zeros(len(records), num_classes)
    for row, record in zip(out, records, strict=True):
        for p in record["predictions"]:
            row[p["index"]] = p["probability"]
    return out


def photo(path: Path, width: int, height: int, seed: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def cifar_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cifar"), "CifarAlexNet")


@pytest.fixture(scope="module")
def paper_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("paper"), "PaperAlexNet", paper_train=True)


@pytest.fixture(scope="module")
def paper(paper_ckpt):
    """The -pm -pt checkpoint loaded once (60M parameters: loading and checking take seconds)."""
    return load_trained(paper_ckpt)


@pytest.fixture(scope="module")
def cifar(cifar_ckpt) -> Trained:
    """``cifar_ckpt`` loaded once for the tests that only read it."""
    return load_trained(cifar_ckpt)


@pytest.fixture(scope="module")
def shapes_train() -> tuple[Split, list[str]]:
    """The training split and classes of the tiny Shapes that ``make_checkpoint`` uses (32x32)."""
    data = load_dataset("Shapes", TrainConfig(shapes_train=60, shapes_test=10))
    return data.train, data.classes


@pytest.fixture(scope="module")
def cifar_other(tmp_path_factory, shapes_train) -> Path:
    """``cifar_ckpt``'s network (Shapes classes) with other initial weights."""
    return checkpoint_of(tmp_path_factory.mktemp("other"), "CifarAlexNet", *shapes_train, seed=1)


@pytest.fixture(scope="module")
def cifar_three(tmp_path_factory) -> Path:
    """A -c checkpoint (32x32 images, one view) with ``paper_ckpt``'s classes (256x256, 10-crop)."""
    g = torch.Generator().manual_seed(2)
    train = Split(torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8), torch.zeros(6))
    return checkpoint_of(tmp_path_factory.mktemp("three"), "CifarAlexNet", train, CLASSES, seed=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of odd images (sizes, modes, formats, one in a subfolder), one broken file and a
    text file that a folder search leaves out."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    photo(root / "wide.png", 61, 17, 0)
    photo(root / "grey.jpg", 20, 48, 1, "L")
    photo(root / "sub" / "palette.gif", 40, 40, 2, "P")
    photo(root / "rgba.webp", 33, 33, 3, "RGBA")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_checkpoint_carries_the_pipeline(cifar_ckpt, paper):
    """The saved pipeline rebuilds with the same statistics, and a damaged one is refused."""
    checkpoint = load_checkpoint(cifar_ckpt)
    saved = checkpoint["preprocess"]
    assert saved["image_size"] == 32 and saved["task"] == "single-label"
    assert paper.image_size == 256 and paper.pipeline.state()["kind"] == "paper"
    for state in (saved["pipeline"], paper.pipeline.state()):
        rebuilt = pipeline_from_state(state).state()
        assert rebuilt.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(rebuilt[key], value) if isinstance(value, torch.Tensor) else rebuilt[key] == value
    checkpoint["preprocess"]["pipeline"]["std"] = torch.tensor([1.0, float("nan"), 1.0])
    bad = cifar_ckpt.parent / "bad.pt"
    torch.save(checkpoint, bad)
    with pytest.raises(CheckpointError, match="its preprocess has a pipeline that has a std with NaN"):
        load_checkpoint(bad)


def test_old_checkpoint_rebuilds_the_pipeline_from_its_data(cifar_ckpt):
    """A checkpoint without ``preprocess`` (format 2) gets the pipeline of its data set back:
    the same statistics the run saved."""
    checkpoint = load_checkpoint(cifar_ckpt)
    saved = checkpoint.pop("preprocess")
    old = cifar_ckpt.parent / "old.pt"
    torch.save(checkpoint, old)
    trained = load_trained(old)
    assert trained.image_size == 32 and not trained.multilabel
    assert torch.allclose(trained.pipeline.state()["mean"], saved["pipeline"]["mean"])
    assert torch.allclose(trained.pipeline.state()["std"], saved["pipeline"]["std"])


def test_old_checkpoint_without_its_data_is_one_sentence(cifar_ckpt, tmp_path):
    checkpoint = load_checkpoint(cifar_ckpt)
    del checkpoint["preprocess"]
    checkpoint["config"] = {**checkpoint["config"], "dataset": "Cifar10", "data_dir": str(tmp_path / "nothing")}
    torch.save(checkpoint, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"written before checkpoints held their preprocessing.*Cifar10.*put the"):
        load_trained(tmp_path / "old.pt")


def test_probabilities_are_the_softmax_of_the_preprocessed_batch(cifar_ckpt, images):
    trained = load_trained(cifar_ckpt)
    files = [images / "wide.png", images / "grey.jpg"]
    results, failed = predicted([trained], files, batch_size=1, k=len(trained.classes))
    assert not failed and [r["path"] for r in results] == [str(f) for f in files]
    batch = torch.stack([read_image(f, 32) for f in files])
    with torch.inference_mode():
        expected = F.softmax(trained.model(trained.pipeline.evaluate(batch)[:, 0]), dim=1)
    for result, row in zip(results, expected, strict=False):
        got = torch.zeros(len(trained.classes))
        for p in result["predictions"]:
            got[p["index"]] = p["probability"]
            assert p["class"] == trained.classes[p["index"]]
        assert torch.allclose(got, row, atol=1e-6)
        probs = [p["probability"] for p in result["predictions"]]
        assert probs == sorted(probs, reverse=True)


def test_multilabel_scores_are_sigmoids(tmp_path, images):
    trained = load_trained(make_checkpoint(tmp_path, "CifarAlexNet", multilabel=True))
    assert trained.multilabel
    batch = read_image(images / "wide.png", 32)[None]
    with torch.inference_mode():
        expected = torch.sigmoid(trained.model(trained.pipeline.evaluate(batch)[:, 0]))
    assert torch.allclose(trained.probabilities(batch), expected, atol=1e-6)


def test_ten_crop_equals_the_trainers_evaluation(paper, images):
    """predict's 10-crop probabilities give exactly the loss and top-1 that ``training.loop.
    evaluate`` computes on the same images with the run's pipeline."""
    trained = paper
    assert trained.pipeline.views == 10
    files = [images / "wide.png", images / "grey.jpg"]
    results, _ = predicted([trained], files, batch_size=2, k=3)
    probs = as_tensor(results, 3)
    labels = torch.tensor([0, 2])
    split = Split(torch.stack([read_image(f, 256) for f in files]), labels)
    metrics = evaluate(trained.model, eval_loader(split, trained.pipeline, torch.device("cpu"), batch_size=20), 3)
    loss = -probs[torch.arange(2), labels].log().mean().item()
    assert math.isclose(metrics.loss, loss, rel_tol=1e-5)
    assert metrics.top1 == 100.0 * (probs.argmax(1) == labels).float().mean().item()


def by_hand(trained: Trained, images: torch.Tensor) -> torch.Tensor:
    """The softmax of each view of ``images`` (uint8 at ``trained.image_size``) by the network,
    averaged over the views: the paper's prediction, written out without ``Task``."""
    inputs = trained.pipeline.evaluate(images)
    n, views = inputs.shape[:2]
    with torch.inference_mode():
        return F.softmax(trained.model(inputs.flatten(0, 1)).view(n, views, -1), dim=-1).mean(1)


def read_all(files: list[Path], size: int) -> torch.Tensor:
    return torch.stack([read_image(f, size) for f in files])


#: The ensemble's mean goes through log_softmax, logsumexp, exp and log in float32 where the
#: hand-made one is a softmax and a plain mean: a few float32 roundings apart (3e-7 of the
#: probability at most, measured on 64 images), well inside this relative tolerance.
RTOL = 1e-5


def test_an_ensemble_of_one_or_of_the_same_checkpoint_twice_is_that_checkpoint(cifar, cifar_ckpt, paper, images):
    """Exactly, bit for bit: for one view (-c, two loaded copies) and for ten (-pt)."""
    photos = [images / "wide.png", images / "grey.jpg", images / "rgba.webp"]
    for trained, again, files in ((cifar, load_trained(cifar_ckpt), photos), (paper, paper, photos[:1])):
        alone = trained.probabilities(read_all(files, trained.image_size))
        for members in ([trained], [trained, again]):
            records, failed = predicted(members, files, batch_size=2, k=len(trained.classes))
            assert not failed and torch.equal(as_tensor(records, len(trained.classes)), alone)


def test_an_ensemble_is_the_mean_of_its_members_softmax(cifar, cifar_ckpt, cifar_other, images):
    a, b = cifar, load_trained(cifar_other)
    files = [images / "wide.png", images / "grey.jpg", images / "sub" / "palette.gif"]
    batch = read_all(files, 32)
    expected = (by_hand(a, batch) + by_hand(b, batch)) / 2
    assert not torch.allclose(by_hand(a, batch), by_hand(b, batch), rtol=RTOL)  # two different networks
    records, _ = predicted([a, b], files, batch_size=2, k=10)
    assert torch.allclose(as_tensor(records, 10), expected, rtol=RTOL, atol=0)
    assert all(r["checkpoints"] == [str(cifar_ckpt), str(cifar_other)] for r in records)


def test_members_with_their_own_preprocessing_and_image_size(paper, cifar_three, images, monkeypatch):
    """A -pm -pt member (256-pixel images, ten 224 crops) and a -c one (32 pixels, one view) are
    averaged, each with its own pipeline; every file is read once at each size, a batch at a
    time (the first record comes before the second batch is read)."""
    small = load_trained(cifar_three)
    files = [images / "wide.png", images / "grey.jpg"]
    expected = (by_hand(paper, read_all(files, 256)) + by_hand(small, read_all(files, 32))) / 2
    reads = []

    def counted(path: Path, size: int) -> torch.Tensor:
        reads.append((path.name, size))
        return read_image(path, size)

    monkeypatch.setattr(inference.predict, "read_image", counted)
    stream = predictions([paper, small], files, 1, 3, [])
    records = [next(stream)]
    assert reads == [("wide.png", 256), ("wide.png", 32)]
    records += list(stream)
    assert torch.allclose(as_tensor(records, 3), expected, rtol=RTOL, atol=0)
    assert reads == [("wide.png", 256), ("wide.png", 32), ("grey.jpg", 256), ("grey.jpg", 32)]


def test_a_multilabel_ensemble_is_the_mean_of_its_members_sigmoids(cifar, cifar_other, images):
    """Per-class sigmoid scores are averaged as they are (the two networks made multi-label)."""
    a, b = replace(cifar, multilabel=True), replace(load_trained(cifar_other), multilabel=True)
    files = [images / "wide.png", images / "grey.jpg"]
    inputs = read_all(files, 32)
    with torch.inference_mode():
        expected = sum(torch.sigmoid(m.model(m.pipeline.evaluate(inputs)[:, 0])) for m in (a, b)) / 2
    records, _ = predicted([a, b], files, batch_size=2, k=10)
    assert torch.allclose(as_tensor(records, 10), expected, rtol=RTOL, atol=0)


def test_a_224_input_and_a_32_input_member_of_one_32x32_data_set(cifar, shapes_train, images, monkeypatch):
    """TorchAlexNet on 32x32 Shapes (inputs upsampled to 224) beside a -c network of the same
    data: one read of each file serves both. The 224 member is built in memory (writing and
    reading its 240 MB checkpoint would add seconds, and both are tested above)."""
    train, classes = shapes_train
    torch.manual_seed(3)
    large = Trained(
        Path("torch.pt"),
        TrainConfig(model="TorchAlexNet"),
        make_model("TorchAlexNet", len(classes), lrn=False).eval(),
        make_pipeline(train, 224, False, "cpu"),
        classes,
        32,
        False,
    )
    small = cifar
    files = [images / "wide.png", images / "rgba.webp"]
    batch = read_all(files, 32)
    expected = (by_hand(large, batch) + by_hand(small, batch)) / 2
    reads = []

    def counted(path: Path, size: int) -> torch.Tensor:
        reads.append(path.name)
        return read_image(path, size)

    monkeypatch.setattr(inference.predict, "read_image", counted)
    records, _ = predicted([large, small], files, batch_size=2, k=10)
    assert torch.allclose(as_tensor(records, 10), expected, rtol=RTOL, atol=0)
    assert reads == ["wide.png", "rgba.webp"]


def test_members_must_share_classes_in_order_and_task(cifar):
    """The first difference, in one sentence: the class count, a class at an index, the task."""
    a = replace(cifar, path=Path("A.pt"))  # Shapes: disc, square, triangle, ...
    swapped = replace(a, path=Path("B.pt"), classes=[a.classes[1], a.classes[0], *a.classes[2:]])
    fewer = replace(a, path=Path("B.pt"), classes=a.classes[:3])
    voc = replace(a, path=Path("B.pt"), multilabel=True)
    same = "an ensemble needs the same classes in the same order, so pass checkpoints of runs on one data set."
    names = ", ".join(f"'{c}'" for c in a.classes[:3])
    cases = [
        ([a, a, fewer], f"checkpoint B.pt has 3 classes ({names}), A.pt has 10 ({names}, ...); {same}"),
        (
            [a, swapped],
            f"checkpoint B.pt has class '{a.classes[1]}' at index 0, where A.pt has '{a.classes[0]}'; {same}",
        ),
        (
            [a, voc],
            "checkpoint B.pt is multi-label (sigmoid scores) but A.pt is single-label (softmax scores); an "
            "ensemble averages scores of one kind, so pass checkpoints of runs on one data set.",
        ),
    ]
    for members, sentence in cases:
        with pytest.raises(CheckpointError) as raised:
            check_ensemble(members)
        assert str(raised.value) == sentence
    check_ensemble([a, a])


def test_a_mismatched_ensemble_is_one_sentence_and_nothing_on_stdout(
    cifar_ckpt, cifar_three, images, run_main, tmp_path
):
    photo = str(images / "wide.png")
    result = run_main("predict", "--checkpoint", str(cifar_ckpt), "--checkpoint", str(cifar_three), photo, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: checkpoint {cifar_three} has 3 classes ('alpha', 'beta', 'gamma'), "
        f"{cifar_ckpt} has 10 ('disc', 'square', 'triangle', ...); an ensemble needs the same "
        "classes in the same order, so pass checkpoints of runs on one data set."
    ]


def test_the_output_names_the_averaged_checkpoints(cifar, cifar_ckpt, cifar_other, images, capsys, monkeypatch):
    """``predict``'s own ``main``: with --json every record carries "checkpoints" beside its keys,
    and the table starts with a line naming them; a checkpoint given twice is loaded once."""
    one, two = str(cifar_ckpt), str(cifar_other)
    loaded = {one: cifar, two: load_trained(cifar_other)}
    loads = []

    def load(path: Path, device: torch.device) -> Trained:
        loads.append(str(path))
        return loaded[str(path)]

    monkeypatch.setattr(inference.predict, "load_trained", load)
    files = [str(images / "wide.png"), str(images / "grey.jpg")]
    assert inference.predict.main(["--checkpoint", one, "--checkpoint", two, *files, "--json", "--topk", "2"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in records] == files
    assert all(set(r) == {"path", "predictions", "checkpoints"} and r["checkpoints"] == [one, two] for r in records)
    loads.clear()
    assert inference.predict.main(["--checkpoint", one, "--checkpoint", one, *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert loads == [one] and lines[0] == f"mean of 2 checkpoints: {one}, {one}" and lines[1] == files[0]


def test_folder_search_and_bad_files_in_one_sentence(cifar_ckpt, images, run_main, tmp_path):
    files = image_files([images])
    assert images / "notes.txt" not in files and images / "sub" / "palette.gif" in files
    result = run_main("predict", "--checkpoint", str(cifar_ckpt), str(images), "--json", "--topk", "2", cwd=tmp_path)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == ["grey.jpg", "palette.gif", "rgba.webp", "wide.png"]
    for record in records:
        assert set(record) == {"path", "predictions"} and len(record["predictions"]) == 2
        assert all(set(p) == {"class", "index", "probability"} for p in record["predictions"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 of 5 files could not be read" in errors[0] and "broken.jpg" in errors[0]
    assert "Traceback" not in result.stderr


def test_predicts_real_photos(paper, shared_data):
    folder = shared_data / "imagenet-sample" / "val"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    files = image_files([folder])[:2]
    results, failed = predicted([paper], files, batch_size=2, k=3)
    assert not failed and len(results) == 2
    for result in results:
        assert len(result["predictions"]) == 3
        assert 0 < sum(p["probability"] for p in result["predictions"]) <= 1 + 1e-6


def test_every_preprocess_entry_is_checked(cifar_ckpt, paper):
    """Each entry of a saved pipeline set to a wrong value: one problem in words, never an
    exception (a checkpoint is untrusted input)."""
    from training.checkpoint import check_fields

    bad_values = [None, -1, 2**40, 1.5, "x", [], {}, torch.zeros(2), torch.full((3,), float("nan"))]
    saved = load_checkpoint(cifar_ckpt)["preprocess"]
    for preprocess in (saved, {**saved, "pipeline": paper.pipeline.state(), "image_size": 32}):
        assert check_fields({"preprocess": preprocess}) is None
        for key in [*preprocess["pipeline"], "image_size", "task"]:
            for value in bad_values:
                if key in preprocess:
                    changed = {**preprocess, key: value}
                else:
                    changed = {**preprocess, "pipeline": {**preprocess["pipeline"], key: value}}
                problem = check_fields({"preprocess": changed})
                assert problem is not None and problem.startswith("its preprocess"), (key, value, problem)


def test_predict_reads_images_upright_as_the_caches_do(tmp_path):
    """A phone photo stored sideways with an EXIF orientation is predicted the way training saw
    it: ``read_image`` is the caches' own ``open_resized``, EXIF rotation included."""
    from fakedata import write_image
    from PIL import Image

    from data.images import decode_resized
    from inference.checkpoint import read_image

    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:8, :8] = (255, 0, 0)
    path = write_image(tmp_path / "phone.jpg", Image.fromarray(pixels), orientation=6)
    image = read_image(path, 16)
    assert image[0, 3, 12] > 200 and image[0, 3, 3] < 50  # red top-right, where EXIF puts it
    assert torch.equal(image, decode_resized(path, 16))


def test_stored_preprocessing_and_classes_must_fit_the_network(cifar_ckpt, paper):
    """What a checkpoint stores is checked against the network its config names, before
    anything is built: the pipeline's input size, a cifar pipeline that would shrink, a modern
    crop larger than the images, a class list longer than fc8, an fc8 bias of another length."""
    from training.checkpoint import network_problem

    checkpoint = load_checkpoint(cifar_ckpt)  # CifarAlexNet (32-pixel inputs), 10 Shapes classes
    saved = checkpoint["preprocess"]
    assert network_problem(checkpoint) is None
    modern = {"kind": "modern", "mean": torch.zeros(3), "std": torch.ones(3), "crop": 32}
    bias = checkpoint["model"]["classifier.6.bias"]
    crafted = [
        (
            {"preprocess": {**saved, "image_size": 256}},
            "its preprocess has a pipeline that enlarges images to 32 pixels, but its image_size is 256",
        ),
        (
            {"preprocess": {**saved, "pipeline": {**saved["pipeline"], "input_size": 224}}},
            "its preprocess has a pipeline that makes 224-pixel inputs, but the network takes 32",
        ),
        (
            {"preprocess": {**saved, "pipeline": paper.pipeline.state(), "image_size": 256}},
            "its preprocess has a pipeline that makes 224-pixel inputs, but the network takes 32",
        ),
        (
            {"preprocess": {**saved, "pipeline": modern, "image_size": 16}},
            "its preprocess has a pipeline that crops 32 pixels, more than its image_size of 16",
        ),
        (
            {"classes": [*checkpoint["classes"], "extra"]},
            "its classes are 11 names, but its CifarAlexNet's fc8 (classifier.6) has 10 outputs",
        ),
        (
            {"model": {**checkpoint["model"], "classifier.6.bias": bias[:7]}},
            "its model's 'classifier.6.bias' is (7,), where a CifarAlexNet of 10 classes has (10,)",
        ),
    ]
    for change, problem in crafted:
        assert network_problem({**checkpoint, **change}) == problem
    assert network_problem({**checkpoint, "preprocess": {**saved, "pipeline": modern}}) is None


#: Runs the command after it and reports that command's peak resident memory on stderr.
PEAK_SCRIPT = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print('peak rss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'kB', file=sys.stderr); sys.exit(code)"
)
PEAK = [sys.executable, "-c", PEAK_SCRIPT]


def peak_mb(result) -> float:
    return int(re.search(r"peak rss (\d+) kB", result.stderr).group(1)) / 1024


@pytest.fixture(scope="module")
def skipping(cifar_ckpt, tmp_path_factory, run_main):
    """``predict`` on a FIFO named like a photo, and on a folder holding a photo, another FIFO
    and a subfolder this user cannot search (the command, measured with ``PEAK``, in its folder)."""
    from main_cli import without_file_permission_override

    prefix = without_file_permission_override()
    root = tmp_path_factory.mktemp("skipping")
    photos = root / "photos"
    (photos / "locked").mkdir(parents=True)
    photo(photos / "a.png", 20, 20, 0)
    photo(photos / "locked" / "hidden.png", 20, 20, 1)
    os.mkfifo(photos / "fifo.jpg")
    os.mkfifo(root / "photo.jpg")
    os.chmod(photos / "locked", 0)
    try:
        # The limit only ends a hang (opening a FIFO waits for a writer); the command takes seconds.
        return run_main(
            "predict",
            "--checkpoint",
            str(cifar_ckpt),
            "photo.jpg",
            "photos",
            "--json",
            cwd=root,
            prefix=[*prefix, *PEAK],
            timeout=300,
        )
    finally:
        os.chmod(photos / "locked", 0o755)


def test_only_regular_files_are_opened_and_every_skipped_path_is_named(skipping):
    """A FIFO is never opened and a folder this user cannot search is not passed over in
    silence: one sentence per kind, the readable images predicted, exit status 1 (some input
    could not be read)."""
    result = skipping
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == ["photos/a.png"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    special = (
        "error: 2 paths are not regular files and were skipped: 'photo.jpg' (a FIFO); 'photos/fifo.jpg' (a "
        "FIFO); pass image files or folders."
    )
    folder = (
        "error: 1 folder could not be searched and was skipped: 'photos/locked' (Permission denied); give this "
        "user read access to it, or leave it out."
    )
    assert errors == [special, folder]


def test_crafted_sizes_and_class_lists_are_refused_before_anything_is_built(cifar_ckpt, skipping, tmp_path, run_main):
    """A pipeline making 4096-pixel inputs for a 32-pixel network, and 100,000 class names on a
    10-class one: one sentence each, and the command's peak memory within 500 MB of predicting
    with the real checkpoint (``skipping``). Before, the first ran the network on 4096 x 4096
    inputs and the second built a 100,000-way fc8 (2.6 GB against 1.0)."""
    photo(tmp_path / "photo.png", 40, 30, 0)
    checkpoint = load_checkpoint(cifar_ckpt)
    pipeline = checkpoint["preprocess"]["pipeline"]
    crafted = {
        "big.pt": (
            {"preprocess": {**checkpoint["preprocess"], "pipeline": {**pipeline, "input_size": 4096}}},
            "its preprocess has a pipeline that makes 4096-pixel inputs, but the network takes 32",
        ),
        "many.pt": (
            {"classes": [f"class {i}" for i in range(100_000)]},
            "its classes are 100000 names, but its CifarAlexNet's fc8 (classifier.6) has 10 outputs",
        ),
    }
    for name, (change, problem) in crafted.items():
        torch.save({**checkpoint, **change}, tmp_path / name)
        result = run_main("predict", "--checkpoint", name, "photo.png", cwd=tmp_path, prefix=PEAK)
        assert result.returncode == 1 and "Traceback" not in result.stderr and result.stdout == "", result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert line == (
            f"error: checkpoint {name} cannot be used: {problem}; it is damaged or was not written by "
            "this tool, so use another one (best.pt or last.pt of the run)."
        )
        assert peak_mb(result) < peak_mb(skipping) + 500, (name, peak_mb(result), peak_mb(skipping))


def test_a_folder_or_a_fifo_as_checkpoint_is_named_for_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint .* is a folder; pass the path of a last.pt or best.pt in"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint .*last.pt is a FIFO, not a file; pass the path of a"):
        load_checkpoint(tmp_path / "last.pt")


def test_crops_choose_the_centre_crop_or_the_ten_patches(paper, images, capsys, monkeypatch):
    """``--crops 1`` scores a -pt network on its centre patch alone, ``--crops 10`` (its default)
    on the ten; the network itself is left as it was loaded."""
    monkeypatch.setattr(inference.predict, "load_trained", lambda path, device: paper)
    files = [str(images / "wide.png"), str(images / "grey.jpg")]
    out = {}
    for crops in ("1", "10"):
        assert inference.predict.main(["--checkpoint", "p.pt", "--crops", crops, *files, "--json", "--topk", "3"]) == 0
        out[crops] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert paper.pipeline.views == 10
    centre = replace(paper, pipeline=paper.pipeline.with_views(1))
    paths = [Path(f) for f in files]
    assert out["1"] == predicted([centre], paths, 32, 3)[0]
    assert out["10"] == predicted([paper], paths, 32, 3)[0] != out["1"]


def test_a_long_path_in_a_sentence_keeps_its_start_and_its_file_name():
    """A sentence quotes a path in at most 60 characters by cutting its middle: a long TMPDIR or
    data folder once cut ``broken.jpg`` off the sentence that was about it."""
    path = "/scratch/job-12345/" + "x" * 150 + "/holiday/broken.jpg"
    shown = quoted(path)
    assert len(shown) == 62 and shown.startswith("'/scratch/job-12345") and shown.endswith("/holiday/broken.jpg'")
    assert "..." in shown and quoted("short.jpg") == "'short.jpg'"
