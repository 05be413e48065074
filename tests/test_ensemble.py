"""The paper's Table 2 protocol in ``--evaluate``: ensembles of several checkpoints (the mean of
their softmax outputs, each network with its own preprocessing), the centre crop or the paper's
ten patches (``--crops``), and the errors as the paper prints them, all against sums done by hand;
and an ensemble's memory, which does not grow with the evaluation split."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import main
from data.core import Split
from data.loaders import eval_loader
from data.registry import load_dataset
from data.transforms import CifarPipeline, ModernPipeline, PaperPipeline, make_pipeline
from network import make_model
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.evaluation import AsRead
from training.loop import Member, evaluate_ensemble
from training.resume import Checkpointer, Progress
from training.schedule import PlateauSchedule

SHAPES = {"shapes_train": 60, "shapes_test": 12}


def confident(model: torch.nn.Module, seed: int, scale: float = 200) -> torch.nn.Module:
    """A freshly initialised ``model`` whose last layer is scaled up, so that its softmax is far
    from uniform and two seeds disagree: the averages below then have something to average."""
    torch.manual_seed(seed)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(scale)
    return model.eval()


def write_checkpoint(folder: Path, model: str, seed: int, paper_train: bool = False) -> Path:
    """A Shapes checkpoint written by the real ``Checkpointer`` path (no training): the network of
    ``seed`` and the pipeline its run would have built, stored as the run stores it."""
    config = TrainConfig(model=model, paper_train=paper_train, seed=seed, **SHAPES)
    data = load_dataset("Shapes", config)
    torch.manual_seed(seed)
    net = confident(make_model(model, data.num_classes), seed)
    pipeline = make_pipeline(data.train, net.input_size, paper_train)
    checkpointer = Checkpointer(
        folder,
        net,
        torch.optim.SGD(net.parameters(), lr=0.01),
        PlateauSchedule(base_lr=0.01),
        None,
        {"index": torch.Generator(), "augment": torch.Generator()},
    )
    state = checkpointer.state(Progress(), "top1", data.classes, config, pipeline, data.image_size)
    checkpointer.save(state, best=False, epoch=0)
    return checkpointer.last


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ensemble")
    return {
        "a": write_checkpoint(root / "a", "CifarAlexNet", 1),
        "b": write_checkpoint(root / "b", "CifarAlexNet", 2),
        "wide": write_checkpoint(root / "wide", "TorchAlexNet", 3),  # 224 inputs: Shapes upsampled
    }


def evaluate(capsys, *flags: str) -> dict:
    """``main.py --evaluate ...`` in this process: its exit code 0 and its JSON line."""
    assert main.main(["--evaluate", *flags]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.splitlines()[-1])


METRICS = ("loss", "top1", "top5", "count", "top1_error", "top5_error")


def metrics(record: dict) -> dict:
    return {k: record[k] for k in METRICS}


def test_an_ensemble_of_one_or_of_one_network_twice_is_that_network(checkpoints, capsys):
    a = str(checkpoints["a"])
    alone = evaluate(capsys, a)
    twice = evaluate(capsys, a, a)
    assert alone["checkpoints"] == [a] and twice["checkpoints"] == [a, a]
    assert metrics(alone) == metrics(alone["members"][0]) == metrics(twice) == metrics(twice["members"][1])
    assert 0 < alone["top1"] < 100  # a network that gets some right and some wrong: something to compare


def test_the_errors_are_100_minus_the_accuracies_to_the_last_digit(checkpoints, capsys):
    record = evaluate(capsys, str(checkpoints["a"]), str(checkpoints["b"]), "--crops", "10")
    assert record["crops"] == 10
    for entry in (record, *record["members"]):
        assert entry["top1_error"] == 100 - entry["top1"] and entry["top5_error"] == 100 - entry["top5"]
    assert [m["crops"] for m in record["members"]] == [10, 10]
    assert [m["pretrained"] for m in record["members"]] == [False, False]
    assert [m["model"] for m in record["members"]] == ["CifarAlexNet", "CifarAlexNet"]


def by_hand(probabilities: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 / top-5 accuracy (percent) and the mean negative log-likelihood of N x C probabilities."""
    top5 = probabilities.topk(5, dim=1).indices
    return {
        "top1": 100.0 * (top5[:, 0] == labels).sum().item() / len(labels),
        "top5": 100.0 * (top5 == labels[:, None]).any(1).sum().item() / len(labels),
        "loss": -probabilities[torch.arange(len(labels)), labels].double().log().mean().item(),
    }


def softmax_of(model: torch.nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """The mean over ``views`` (each N x C x H x W) of the model's softmax, in float64 (where no
    probability underflows to a tie at 0 that would make the top-5 arbitrary)."""
    with torch.inference_mode():
        return torch.stack([F.softmax(model(v).double(), dim=1) for v in views]).mean(0)


def agrees(result, expected: dict) -> None:
    # Counts are exact; the loss is a mean of logs summed in another order (float64 here, a
    # logsumexp there), equal to well within 1e-6 relative.
    assert (result.top1, result.top5) == (expected["top1"], expected["top5"])
    assert result.loss == pytest.approx(expected["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def shapes():
    data = load_dataset("Shapes", TrainConfig(**SHAPES))
    return data, data.test


def test_an_ensemble_of_two_networks_is_the_mean_of_their_softmax_outputs(shapes, checkpoints):
    data, test = shapes
    cifar = make_pipeline(data.train, 32, False)
    wide = make_pipeline(data.train, 224, False)  # upsampled to 224: another preprocessing
    nets = [confident(make_model("CifarAlexNet", 10), 5), confident(make_model("TorchAlexNet", 10), 6)]
    members = [Member(nets[0], cifar), Member(nets[1], wide)]
    loader = eval_loader(test, AsRead(1), "cpu", batch_size=10)
    results, ensemble = evaluate_ensemble(members, loader, data.num_classes)
    x = test.images
    mine = [softmax_of(nets[0], [cifar.evaluate(x)[:, 0]]), softmax_of(nets[1], [wide.evaluate(x)[:, 0]])]
    agrees(results[0], by_hand(mine[0], test.labels))
    agrees(results[1], by_hand(mine[1], test.labels))
    agrees(ensemble, by_hand((mine[0] + mine[1]) / 2, test.labels))


def paper_pipeline(images: torch.Tensor) -> PaperPipeline:
    """The paper's pipeline (the 2012 code's way) for 32 crops out of 40 x 40 images."""
    mean = images.float().mean(0)
    g = torch.Generator().manual_seed(0)
    vectors = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
    return PaperPipeline(mean, torch.tensor([0.3, 0.02, 0.001]), vectors, crop=32, base=40)


def test_ten_crops_are_the_corners_and_centre_and_their_mirrors_averaged_and_one_is_the_centre():
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (12, 3, 40, 40), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,), generator=g)
    pipeline = paper_pipeline(images)
    net = confident(make_model("CifarAlexNet", 10), 8, scale=1)  # inputs in 0-255 units: logits are large already
    loader = eval_loader(Split(images, labels), AsRead(10), "cpu", batch_size=40)
    (ten,), _ = evaluate_ensemble([Member(net, pipeline)], loader, 10)
    (one,), _ = evaluate_ensemble([Member(net, pipeline.with_views(1))], loader, 10)
    x, mean = images.float(), pipeline.mean_image[:, 4:36, 4:36]
    corners = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]
    views = [img[:, :, t : t + 32, left : left + 32] - mean for img in (x, x.flip(-1)) for t, left in corners]
    agrees(ten, by_hand(softmax_of(net, views), labels))
    agrees(one, by_hand(softmax_of(net, [x[:, :, 4:36, 4:36] - mean]), labels))
    assert ten.loss != one.loss


def test_crops_of_the_modern_and_cifar_pipelines():
    """``--crops 1`` is each pipeline's centre view as it was; 10 are the ten patches: of the
    256 image for the modern pipeline, of the padded image training crops from for CIFAR's."""
    g = torch.Generator().manual_seed(3)
    big = torch.randint(0, 256, (2, 3, 40, 40), generator=g, dtype=torch.uint8)
    modern = ModernPipeline(torch.full((3,), 0.5), torch.full((3,), 0.2), crop=32)
    assert torch.equal(modern.with_views(1).evaluate(big), modern.evaluate(big))
    ten = modern.with_views(10).evaluate(big)
    assert ten.shape == (2, 10, 3, 32, 32)
    assert torch.equal(ten[:, 4], modern.evaluate(big)[:, 0])  # the fifth patch is the centre
    assert torch.equal(ten[:, 5], ten[:, 1].flip(-1))  # the mirror's top left is the top right mirrored
    assert torch.equal(ten[:, 9], ten[:, 4].flip(-1))  # the mirrored centre
    small = big[..., :32, :32]
    cifar = CifarPipeline(torch.full((3,), 0.5), torch.full((3,), 0.2), input_size=32, padding=4)
    assert torch.equal(cifar.with_views(1).evaluate(small), cifar.evaluate(small))
    ten = cifar.with_views(10).evaluate(small)
    assert torch.equal(ten[:, 4], cifar.evaluate(small)[:, 0])  # the padded image's centre is the image
    zero = (0 - 0.5) / 0.2  # a padded pixel, normalised
    assert torch.allclose(ten[:, 0, :, :4, :4], torch.full_like(ten[:, 0, :, :4, :4], zero))


def test_crops_on_the_command_line(checkpoints, capsys):
    wide = str(checkpoints["wide"])
    centre, ten = evaluate(capsys, wide), evaluate(capsys, wide, "--crops", "10")
    assert (centre["crops"], ten["crops"]) == (1, 10)
    assert metrics(centre) == metrics(evaluate(capsys, wide, "--crops", "1"))
    assert ten["loss"] != centre["loss"]
    mixed = evaluate(capsys, wide, str(checkpoints["a"]))
    assert mixed["crops"] == 1 and [m["crops"] for m in mixed["members"]] == [1, 1]


def test_members_that_name_other_classes_are_one_sentence(checkpoints, tmp_path, capsys):
    saved = load_checkpoint(checkpoints["b"])
    classes = saved["classes"]
    torch.save({**saved, "classes": [classes[1], classes[0], *classes[2:]]}, tmp_path / "swapped.pt")
    assert main.main(["--evaluate", str(checkpoints["a"]), str(tmp_path / "swapped.pt")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == (
        f"error: checkpoint {tmp_path / 'swapped.pt'} has class '{classes[1]}' at index 0, where "
        f"{checkpoints['a']} has '{classes[0]}'; an ensemble needs the same classes in the same "
        "order, so pass checkpoints of runs on one data set."
    )


def test_crops_without_evaluate_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as stop:
        main.main(["-c", "--crops", "10"])
    assert stop.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: --crops chooses the views of --evaluate; add --evaluate PATH, or drop --crops")
    )


class LiveTensorBytes(TorchDispatchMode):
    """The most bytes of tensors made under this mode that were alive at once (storages counted
    once), checked after every operation: what an evaluation holds on to, exactly, whatever the
    allocator or the machine does."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: list[weakref.ref] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.alive += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        tensors = [t for t in (ref() for ref in self.alive) if t is not None]
        self.alive = [weakref.ref(t) for t in tensors]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        self.peak = max(self.peak, sum(storages.values()))
        return out


def peak_bytes(count: int, keep: bool = False) -> int:
    """The peak of ``LiveTensorBytes`` while five networks are evaluated together on ``count``
    images; with ``keep``, while the same five are evaluated one after another, keeping their
    outputs (the way the issue rules out), to show that the measure sees what is kept."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (count, 3, 32, 32), generator=g, dtype=torch.uint8), torch.zeros(count).long())
    pipeline = CifarPipeline(torch.full((3,), 0.5), torch.full((3,), 0.2), input_size=32)
    members = [Member(confident(make_model("CifarAlexNet", 100), seed), pipeline) for seed in range(5)]
    loader = eval_loader(split, AsRead(1), "cpu", batch_size=8)
    with LiveTensorBytes() as probe, torch.inference_mode():
        if keep:
            kept = [m.model(m.pipeline.evaluate(x)[:, 0]) for m in members for x, _ in loader]
            del kept
        else:
            evaluate_ensemble(members, loader, 100)
    return probe.peak


def test_an_ensemble_of_five_holds_the_same_memory_for_any_size_of_evaluation_split():
    """24 more images add their place in the evaluation order (one int64 each) and nothing else;
    keeping five networks' 100 outputs would add 24 x 5 x 100 float32."""
    assert peak_bytes(32) - peak_bytes(8) <= 24 * 8
    assert peak_bytes(32, keep=True) - peak_bytes(8, keep=True) >= 24 * 5 * 100 * 4
