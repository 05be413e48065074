"""The paper's two-GPU split: SplitPaperAlexNet against the grouped single-device PaperAlexNet,
and a split run's checkpoint on a machine with one GPU (evaluated, resumed, predicted, exported
and drawn as the grouped model)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from main_cli import copy_run, snapshot, unchanged
from PIL import Image
from torch import nn

import main
import training.run
from inference.checkpoint import load_trained, read_image
from network import (
    CifarAlexNet,
    PaperAlexNet,
    PaperLRN,
    SplitPaperAlexNet,
    join_towers,
    split_devices,
    split_grouped,
)
from training.config import TrainConfig
from training.optim import build_optimizer, grouped_optimizer_state
from training.resume import check_optimizer_state
from training.run import towers
from training.weights import freeze_features
from utils import UserError

CPU = ("cpu", "cpu")
DEVICES = [
    pytest.param(CPU, id="cpu"),
    pytest.param(
        ("cuda:0", "cuda:0"),
        id="one-gpu",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
    pytest.param(
        ("cuda:0", "cuda:1"),
        id="two-gpus",
        marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
    ),
]


@pytest.fixture(autouse=True)
def exact_cuda_float32(monkeypatch):
    """TF32 convolutions would round the grouped and the split model differently (1e-3). TF32
    exists on CUDA only, so without it nothing is patched. The flags go through
    ``fp32_precision``, the API of every torch we support (>= 2.9): the older ``allow_tf32``
    is deprecated there, and reading it raises once anything has used the new API."""
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee")
        monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")


def models(devices, seed=0, **kwargs) -> tuple[PaperAlexNet, SplitPaperAlexNet]:
    """A paper-initialised PaperAlexNet on the first device and its split copy."""
    torch.manual_seed(seed)
    grouped = PaperAlexNet(**kwargs)
    return grouped.to(devices[0]), SplitPaperAlexNet(grouped, devices)


def images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Mean-subtracted pixel values (about +-100), large enough for LRN to bite."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 60


# ---------------------------------------------------------------------------------------------
# LRN per tower: the grouped model normalises each GPU's maps on its own


def test_grouped_lrn_is_two_independent_lrns():
    torch.manual_seed(0)
    a = torch.relu(torch.randn(2, 96, 3, 3, dtype=torch.float64) * 300)
    per_tower = torch.cat([PaperLRN()(a[:, :48]), PaperLRN()(a[:, 48:])], dim=1)
    assert torch.allclose(PaperLRN(groups=2)(a), per_tower, rtol=1e-12, atol=0)
    # A window spanning the whole 96 maps differs exactly where it reaches over the middle:
    # channels 46 and 47 see 48 and 49 there, and the other way round.
    across = (PaperLRN()(a) - per_tower).abs().amax(dim=(0, 2, 3))
    assert torch.nonzero(across).flatten().tolist() == [46, 47, 48, 49]


@pytest.mark.parametrize("model_fn", [PaperAlexNet, lambda: CifarAlexNet(10, paper=True)])
def test_paper_features_normalise_per_tower(model_fn):
    lrns = [m for m in model_fn().modules() if isinstance(m, PaperLRN)]
    assert [(m.groups, m.size, m.paper_alpha, m.beta, m.k) for m in lrns] == [(2, 5, 1e-4, 0.75, 2.0)] * 2


# ---------------------------------------------------------------------------------------------
# The towers (built on the meta device: shapes only, no time spent on weights)


def meta_paper_alexnet(**kwargs) -> PaperAlexNet:
    with torch.device("meta"):
        return PaperAlexNet(**kwargs)


def test_towers_hold_the_papers_halves_and_all_its_parameters():
    split = SplitPaperAlexNet(meta_paper_alexnet(num_classes=1000), devices=("meta", "meta"))
    assert sum(p.numel() for p in split.parameters()) == 60_965_224
    for tower in split.towers:
        convs = [m for m in tower.features if isinstance(m, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.groups) for c in convs] == [
            (3, 48, 1),  # the whole image
            (48, 128, 1),  # own half only
            (256, 192, 1),  # both towers
            (192, 192, 1),
            (192, 128, 1),
        ]
        fcs = [(m.in_features, m.out_features) for m in tower.classifier if isinstance(m, nn.Linear)]
        assert fcs == [(9216, 2048), (4096, 2048), (2048, 1000)]
    # fc8's bias is added once, on the first tower.
    assert split.towers[0].classifier[6].bias is not None and split.towers[1].classifier[6].bias is None


def test_split_keeps_the_models_settings():
    grouped = meta_paper_alexnet(num_classes=7, dropout=0.3, lrn=False, input_size=227)
    split = SplitPaperAlexNet(grouped, devices=("meta", "meta"))
    assert split.input_size == 227
    assert not any(isinstance(m, PaperLRN) for m in split.modules())
    assert [m.p for m in split.modules() if isinstance(m, nn.Dropout)] == [0.3] * 4
    back = split.to_grouped()
    assert back.input_size == 227 and back.features[0].padding == (0, 0)
    assert not any(isinstance(m, PaperLRN) for m in back.modules())
    assert back.classifier[6].out_features == 7 and back.classifier[2].p == 0.3


def test_split_refuses_other_models():
    with pytest.raises(TypeError, match="PaperAlexNet"):
        SplitPaperAlexNet(CifarAlexNet(10, paper=True))


# ---------------------------------------------------------------------------------------------
# Same outputs and gradients as the grouped model


@pytest.mark.parametrize("devices", DEVICES)
@pytest.mark.parametrize("lrn, size", [(True, 224), (False, 227)])
def test_split_outputs_and_gradients_equal_the_grouped_models(devices, lrn, size):
    # The text's layer order: the guard at the end puts one LRN over all 96 maps at features[2].
    grouped, split = models(devices, num_classes=10, lrn=lrn, input_size=size, fidelity="text")
    grouped.eval(), split.eval()  # no dropout: the towers draw their own masks
    x, target = images(size), torch.tensor([3, 7], device=devices[0])
    x_grouped = x.to(devices[0], copy=True).requires_grad_()
    x_split = x.clone().requires_grad_()  # on the CPU: the split model moves it to each tower
    expected, got = grouped(x_grouped), split(x_split)
    assert got.device == torch.device(devices[0]) and got.shape == (2, 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    F.cross_entropy(expected, target).backward()
    F.cross_entropy(got, target).backward()
    a, b = ({name: p.grad for name, p in tower.named_parameters()} for tower in split.towers)
    grads = join_towers(a, b)
    assert list(grads) == [name for name, _ in grouped.named_parameters()]
    for name, p in grouped.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=name)
    scale = x_grouped.grad.abs().max().item()
    torch.testing.assert_close(x_split.grad.to(devices[0]), x_grouped.grad, rtol=1e-4, atol=1e-5 * scale)

    if lrn:  # The guard: the same weights with one LRN window over all 96 maps are another network.
        grouped.features[2] = PaperLRN()
        with torch.no_grad():
            assert not torch.allclose(grouped(x_grouped), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints hold the grouped model's state_dict


@pytest.mark.parametrize("devices", DEVICES)
def test_grouped_to_split_to_grouped_is_the_identity(devices):
    grouped, split = models(devices, num_classes=10)
    state = grouped.state_dict()
    back = split.grouped_state_dict()
    assert list(back) == list(state)
    assert all(torch.equal(back[name], state[name]) for name in state)
    assert all(t.device == torch.device(devices[0]) for t in back.values())
    # ``to_grouped`` gives a whole PaperAlexNet; PaperAlexNet loads the dict strictly.
    assert all(torch.equal(w, state[name]) for name, w in split.to_grouped().state_dict().items())
    grouped.load_state_dict(back, strict=True)

    a, b = split_grouped(state)
    assert a["features.0.weight"].shape == b["features.0.weight"].shape == (48, 3, 11, 11)
    assert a["features.4.weight"].shape == (128, 48, 5, 5)
    assert a["classifier.6.weight"].shape == (10, 2048)
    assert "classifier.6.bias" in a and "classifier.6.bias" not in b
    assert all(torch.equal(w, state[name]) for name, w in join_towers(a, b).items())

    # Loading another model's weights makes the split model that model.
    other = {name: w + torch.rand_like(w) for name, w in state.items()}
    split.load_grouped_state_dict(other)
    assert all(torch.equal(w, other[name]) for name, w in split.grouped_state_dict().items())


def test_load_grouped_state_dict_is_strict():
    split = SplitPaperAlexNet(meta_paper_alexnet(num_classes=10), devices=("meta", "meta"))
    state = meta_paper_alexnet(num_classes=10).state_dict()
    del state["features.8.bias"]
    with pytest.raises(RuntimeError, match=r"missing \['features.8.bias'\]"):
        split.load_grouped_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch for classifier.6.weight"):
        split.load_grouped_state_dict(meta_paper_alexnet(num_classes=20).state_dict())


# ---------------------------------------------------------------------------------------------
# Devices for --split-gpus


def test_split_devices_on_the_cpu_puts_both_towers_there():
    assert split_devices(torch.device("cpu")) == (torch.device("cpu"), torch.device("cpu"))


def test_split_devices_takes_the_gpu_and_the_next(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert split_devices(torch.device("cuda")) == (torch.device("cuda", 0), torch.device("cuda", 1))
    assert split_devices(torch.device("cuda:1")) == (torch.device("cuda", 1), torch.device("cuda", 2))


@pytest.mark.parametrize("count", [0, 1])
def test_split_devices_without_a_second_gpu_is_a_user_error(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(UserError) as error:
        split_devices(torch.device("cuda"))
    assert str(error.value) == (
        f"--split-gpus needs two CUDA devices (cuda:0 and cuda:1), found {count}; "
        "drop --split-gpus to train the grouped model on one device."
    )


def test_split_devices_past_the_last_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"needs two CUDA devices \(cuda:1 and cuda:2\), found 2"):
        split_devices(torch.device("cuda:1"))


def test_split_devices_refuses_other_device_types():
    with pytest.raises(UserError, match="two CUDA devices \\(or the CPU\\), not on mps"):
        split_devices(torch.device("mps"))


# ---------------------------------------------------------------------------------------------
# A split run on a machine with one GPU: --evaluate, --resume, predict, export and figures


@pytest.fixture
def one_gpu(monkeypatch):
    """This machine as one with a single CUDA device, where ``main`` asks for the towers' devices
    (``network.split_devices`` answering for ``cuda`` there); the networks themselves run on the
    CPU, which cannot hold CUDA tensors."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(training.run, "split_devices", lambda device: split_devices(torch.device("cuda")))


def test_towers_keep_the_split_where_two_devices_exist_and_name_no_split_gpus_where_not(monkeypatch):
    split, grouped = TrainConfig(model="PaperAlexNet", split_gpus=True), TrainConfig(model="PaperAlexNet")
    cuda, last = torch.device("cuda"), Path("run/last.pt")
    assert towers(grouped, cuda, last) is None
    assert towers(split, torch.device("cpu"), last) == (torch.device("cpu"), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert towers(split, cuda, last) == (torch.device("cuda", 0), torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="drop --split-gpus to train the grouped model on one device"):
        towers(split, cuda, None)  # a new run asked for the split: it can drop the flag
    with pytest.raises(UserError) as error:
        towers(split, cuda, last)  # a resumed one has it from its checkpoint
    assert str(error.value) == (
        "run/last.pt was trained with --split-gpus, and its two towers need cuda and the CUDA device after it, which "
        "this machine does not have; add --no-split-gpus to resume it as the grouped model on cuda (the same "
        "weights; dropout then draws one mask per layer instead of one per tower)."
    )
    # Under torchrun each process runs a whole model: the split cannot go on there.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        UserError,
        match=r"^run/last.pt was trained with --split-gpus, which runs one model over two GPUs "
        r"in one process, not under torchrun; add --no-split-gpus",
    ):
        towers(split, cuda, last)


def round_trip(state: dict) -> dict:
    """``state`` as a checkpoint gives it back: saved and loaded, sharing no tensor with it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"optimizer": "sgd", "paper_update": True, "fidelity": "code"}, id="paper-sgd-bias-group"),
        pytest.param({"optimizer": "adam", "freeze_features": True}, id="adam-frozen-features"),
    ],
)
def test_a_split_runs_optimizer_state_continues_in_the_grouped_model(settings):
    config = TrainConfig(model="PaperAlexNet", lr=0.01, momentum=0.9, weight_decay=5e-4, **settings)
    torch.manual_seed(0)
    split = SplitPaperAlexNet(PaperAlexNet(num_classes=10, fidelity=config.fidelity), CPU).eval()  # no dropout
    if config.freeze_features:
        freeze_features(split)
    x, target = images(224, batch=1), torch.tensor([3])

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    optimizer = build_optimizer(split.parameters(), config)
    step(split, optimizer)
    grouped = split.to_grouped()
    converted = grouped_optimizer_state(round_trip(optimizer.state_dict()), grouped, config)
    if config.freeze_features:
        freeze_features(grouped)
    grouped_optimizer = build_optimizer(grouped.parameters(), config)
    assert check_optimizer_state(converted, grouped_optimizer) is None
    grouped_optimizer.load_state_dict(converted)
    # Momentum (Adam's moments) of each weight is the towers' halves put together like the weight.
    for name, p in grouped.named_parameters():
        if p.requires_grad:
            halves = [dict(tower.named_parameters()).get(name) for tower in split.towers]
            key = "velocity" if config.paper_update else "exp_avg"
            a, b = ({name: optimizer.state[h][key]} if h is not None else {} for h in halves)
            assert torch.equal(grouped_optimizer.state[p][key], join_towers(a, b)[name]), name
    # and the next step is the split model's, up to float rounding.
    step(split, optimizer)
    step(grouped, grouped_optimizer)
    expected = split.grouped_state_dict()
    for name, w in grouped.state_dict().items():
        torch.testing.assert_close(w, expected[name], rtol=1e-5, atol=1e-6, msg=name)


#: A one-epoch run of the paper's network split over two towers, both on the CPU; float32.
SPLIT_RUN = [
    "-pm",
    "--split-gpus",
    "--device",
    "cpu",
    "--amp",
    "off",
    "-ne",
    "1",
    "--shapes-train",
    "16",
    "--shapes-test",
    "8",
    "--batch-size",
    "8",
    "--seed",
    "1",
]


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, run_main) -> Path:
    """The folder of a finished ``SPLIT_RUN``. Copy it (``main_cli.copy_run``) before running
    anything in it."""
    root = tmp_path_factory.mktemp("split_run")
    result = run_main(*SPLIT_RUN, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the two towers run on cpu and cpu" in result.stderr
    return root


def error_line(capsys) -> str:
    """The one error line an in-process ``main.main`` wrote to stderr (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_evaluate_runs_a_split_checkpoint_as_the_grouped_model_on_one_gpu(split_run, tmp_path, one_gpu, capsys):
    last = copy_run(split_run, tmp_path / "work")
    assert main.main(["--evaluate", str(last), "--device", "cpu", "--amp", "off"]) == 0
    out, err = capsys.readouterr()
    assert "the two towers run on" not in err
    metrics = json.loads(out.splitlines()[-1])
    # What the split model measured when it saved the checkpoint.
    recorded = torch.load(last, weights_only=True)["last"]
    assert metrics["top1"] == recorded["top1"] and metrics["count"] == 8
    assert metrics["loss"] == pytest.approx(recorded["loss"], rel=1e-5)
    # Asked for the towers, there are not two GPUs for them: the sentence of a new run.
    assert main.main(["--evaluate", str(last), "-pm", "--split-gpus", "--device", "cpu"]) == 1
    assert error_line(capsys).endswith("found 1; drop --split-gpus to train the grouped model on one device.")


def test_resume_of_a_split_run_on_one_gpu_names_no_split_gpus_and_writes_nothing(split_run, tmp_path, one_gpu, capsys):
    last = copy_run(split_run, tmp_path / "work")
    before = snapshot(tmp_path / "work")
    assert main.main(["--resume", str(last), "-ne", "2"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: {last} was trained with --split-gpus, and its two towers need ")
    assert "; add --no-split-gpus to resume it as the grouped model on " in line
    assert unchanged(tmp_path / "work", before)


def test_resume_with_no_split_gpus_goes_on_as_the_grouped_model(split_run, tmp_path, one_gpu, capsys):
    last = copy_run(split_run, tmp_path / "work")
    assert main.main(["--resume", str(last), "--no-split-gpus", "-ne", "2", "--amp", "off"]) == 0
    err = capsys.readouterr().err
    assert f"{last} was trained split over two devices; it goes on as the grouped model on cpu" in err
    assert "the two towers run on" not in err
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 2 and saved["config"]["split_gpus"] is False
    # Its optimiser now numbers the grouped model's 16 tensors (Adam: moments of their shapes).
    config = TrainConfig.from_dict(saved["config"])
    assert check_optimizer_state(saved["optimizer"], build_optimizer(PaperAlexNet(10).parameters(), config)) is None
    assert len(saved["optimizer"]["state"]) == 16
    # The next resume needs nothing more.
    assert main.main(["--resume", str(last), "-ne", "2"]) == 0


def test_predict_export_and_figures_of_a_split_checkpoint_run_the_grouped_model(split_run, tmp_path, one_gpu, capsys):
    last = copy_run(split_run, tmp_path / "work")
    trained = load_trained(last)
    assert trained.config.split_gpus and type(trained.model) is PaperAlexNet
    split = SplitPaperAlexNet(trained.model, CPU).eval()

    photo = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo)
    assert (
        main.main(["predict", "--checkpoint", str(last), "--device", "cpu", "--json", "--topk", "10", str(photo)]) == 0
    )
    predicted = json.loads(capsys.readouterr().out)
    got = {p["class"]: p["probability"] for p in predicted["predictions"]}
    trained.model = split  # the same scoring, by the split model
    expected = trained.probabilities(read_image(photo, trained.image_size)[None])[0]
    assert got == pytest.approx({c: expected[i].item() for i, c in enumerate(trained.classes)}, rel=1e-4, abs=1e-6)

    out = tmp_path / "model.pt"
    assert main.main(["export", str(out), "--checkpoint", str(last), "--format", "torchscript"]) == 0
    x = images(224, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(out)(x), split(x), rtol=1e-4, atol=1e-4)

    assert main.main(["figures", "--checkpoint", str(last), "--device", "cpu", "--out", str(tmp_path / "figures")]) == 0
    drawn = sorted(p.name.split("_")[0] for p in (tmp_path / "figures").glob("*.png"))
    assert drawn == ["kernels", "neighbours", "predictions"], drawn
