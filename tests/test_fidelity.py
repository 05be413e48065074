"""``--fidelity``: the 2012 code release (``code``, the default) against the paper's text
(``text``), in the config, the network, the optimiser and the paper pipeline. The release's
numbers are written out literally here, each with its place in
``computerhistory/AlexNet-Source-Code`` (L = layers/layers-145.cfg, P = layers/layer-params-145.cfg)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import main
from data.transforms import PaperPipeline, mean_image, rgb_eigen
from network import (
    CifarAlexNet,
    PaperAlexNet,
    PaperLRN,
    ReleaseDropout,
    SameMapNorm,
    SplitPaperAlexNet,
    make_model,
)
from training.config import (
    RESUME_MAY_CHANGE,
    TrainConfig,
    config_from_args,
    config_from_checkpoint,
    explicit_flags,
    may_change,
    resolve,
)
from training.optim import build_optimizer, set_lr
from training.resume import check_optimizer_state
from utils import UserError

CPU = torch.device("cpu")


def config_of(*flags: str) -> TrainConfig:
    return config_from_args(main.get_args_parser().parse_args(list(flags)), CPU)


# ---------------------------------------------------------------------------------------------
# The flag and the config field


def test_fidelity_defaults_to_code_and_is_part_of_the_experiment():
    assert config_of("-pm", "-pt").fidelity == "code"
    assert config_of("-pm", "--fidelity", "text").fidelity == "text"
    assert config_of("-c", "-pt", "--fidelity", "text").fidelity == "text"
    assert "fidelity" not in may_change("resume") | may_change("evaluate")
    assert TrainConfig.check("fidelity")("code") == "code"
    with pytest.raises(ValueError):
        TrainConfig.check("fidelity")("faithful")


def test_a_config_without_fidelity_is_what_it_trained_the_text():
    assert TrainConfig.from_dict({"model": "PaperAlexNet", "version": "0.2.0"}).fidelity == "text"
    assert TrainConfig.from_dict({"model": "PaperAlexNet", "fidelity": "code"}).fidelity == "code"
    with pytest.raises(ValueError, match="fidelity"):
        TrainConfig.from_dict({"fidelity": "both"})


@pytest.mark.parametrize("flags", [["--fidelity", "code"], ["-c", "--fidelity", "text"]])
def test_fidelity_without_the_papers_network_or_setup_is_refused(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        main.main(flags)
    assert stop.value.code == 2
    assert "--fidelity only applies to the paper's network or setup; add -pm or -pt" in capsys.readouterr().err


def test_resume_refuses_another_fidelity():
    checkpoint = {"config": {"model": "PaperAlexNet", "paper_train": True, "setup": "paper"}}  # 0.2: text
    args = main.get_args_parser().parse_args(["-pm", "-pt", "--fidelity", "code"])
    with pytest.raises(UserError, match="fidelity"):
        config_from_checkpoint(
            checkpoint,
            "last.pt",
            args,
            explicit_flags(main.get_args_parser(), ["-pm", "-pt", "--fidelity", "code"]),
            CPU,
            RESUME_MAY_CHANGE,
        )
    args = main.get_args_parser().parse_args(["-pm", "-pt"])
    resumed = config_from_checkpoint(
        checkpoint, "last.pt", args, explicit_flags(main.get_args_parser(), ["-pm", "-pt"]), CPU, RESUME_MAY_CHANGE
    )
    assert resumed.fidelity == "text"


# ---------------------------------------------------------------------------------------------
# The network


def lrn_by_hand(a: torch.Tensor, alpha_on_sum: float) -> torch.Tensor:
    """b[i] = a[i] / (2 + alpha_on_sum * sum_{j=max(0,i-2)}^{min(N-1,i+2)} a[j]^2)^0.75, looped."""
    out = torch.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        s = sum(a[:, j] ** 2 for j in range(max(0, i - 2), min(channels - 1, i + 2) + 1))
        out[:, i] = a[:, i] / (2 + alpha_on_sum * s) ** 0.75
    return out


def test_lrn_of_both_fidelities_against_the_formula():
    torch.manual_seed(0)
    a = torch.relu(torch.randn(2, 12, 4, 4, dtype=torch.float64) * 300)
    # code: the release's parser divides scale 0.0001 by size 5 (layer.py:1183): 2e-5 on the sum.
    code = PaperLRN(summed=False)(a)
    torch.testing.assert_close(code, lrn_by_hand(a, 2e-5), rtol=1e-12, atol=0)
    torch.testing.assert_close(code, nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a), rtol=1e-12, atol=0)
    torch.testing.assert_close(PaperLRN(summed=True)(a), lrn_by_hand(a, 1e-4), rtol=1e-12, atol=0)
    lrns = [m for m in PaperAlexNet(10, fidelity="code").modules() if isinstance(m, PaperLRN)]
    assert [(m.size, m.paper_alpha, m.alpha, m.beta, m.k, m.groups) for m in lrns] == [
        (5, 1e-4, 1e-4, 0.75, 2.0, 2)
    ] * 2
    lrns = [m for m in PaperAlexNet(10, fidelity="text").modules() if isinstance(m, PaperLRN)]
    assert [(m.size, m.alpha, m.summed) for m in lrns] == [(5, 5e-4, True)] * 2


def same_map_by_hand(a: torch.Tensor, size: int, scale: float, power: float, min_div: float) -> torch.Tensor:
    """The release's rnorm kernel as loops: the window starts size//2 before the pixel, is
    clipped to the map, and the sum is scaled by scale / size**2."""
    n, c, h, w = a.shape
    out = torch.empty_like(a)
    for y in range(h):
        for x in range(w):
            y0, x0 = y - size // 2, x - size // 2
            total = torch.zeros(n, c, dtype=a.dtype)
            for yy in range(max(0, y0), min(h, y0 + size)):
                for xx in range(max(0, x0), min(w, x0 + size)):
                    total += a[:, :, yy, xx] ** 2
            out[:, :, y, x] = a[:, :, y, x] / (min_div + scale / size**2 * total) ** power
    return out


@pytest.mark.parametrize("size", [5, 4])
def test_cnorm2_against_the_kernel_written_as_loops(size):
    torch.manual_seed(1)
    a = torch.randn(2, 3, 7, 6, dtype=torch.float64) * 40
    expected = same_map_by_hand(a, size, 0.001, 0.75, 1.0)
    torch.testing.assert_close(SameMapNorm(size)(a), expected, rtol=1e-12, atol=0)
    # The corner pixel sees the 3x3 (size 5) in-map part of its window, over 25 all the same.
    if size == 5:
        corner = a[:, :, 0, 0] / (1 + 0.001 / 25 * a[:, :, :3, :3].square().sum((2, 3))) ** 0.75
        torch.testing.assert_close(SameMapNorm()(a)[:, :, 0, 0], corner, rtol=1e-12, atol=0)


def test_code_network_order_and_cnorm2_sit_where_the_release_has_them():
    kinds = [type(m).__name__ for m in PaperAlexNet(10, fidelity="code").features]
    assert kinds == [
        "CeilConv2d",
        "PaperLRN",
        "MaxPool2d",
        "ReLU",  # L:9-63
        "Conv2d",
        "ReLU",
        "Sequential",
        "MaxPool2d",  # L:65-131
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
    ]
    norm2 = PaperAlexNet(10, fidelity="code").features[6]
    assert [type(m).__name__ for m in norm2] == ["PaperLRN", "SameMapNorm"]
    assert (norm2[1].size, norm2[1].scale, norm2[1].power, norm2[1].min_div) == (5, 0.001, 0.75, 1.0)  # P:157-163
    code, text = PaperAlexNet(1000, fidelity="code"), PaperAlexNet(1000, fidelity="text")
    assert code.state_dict().keys() == text.state_dict().keys()
    assert sum(p.numel() for p in code.parameters()) == 60_965_224
    text.load_state_dict(code.state_dict())
    assert [type(m).__name__ for m in PaperAlexNet(10, lrn=False, fidelity="code").features][1] == "Identity"


def test_code_conv1_is_the_ceil_rule_padding_on_the_right_and_bottom():
    torch.manual_seed(2)
    conv = PaperAlexNet(10, fidelity="code").features[0]
    assert (conv.kernel_size, conv.stride, conv.padding) == ((11, 11), (4, 4), (0, 0))  # L:9-33
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    conv = conv.double()
    with torch.no_grad():
        out = conv(x)
        assert out.shape[-2:] == (55, 55)
        torch.testing.assert_close(out, F.conv2d(F.pad(x, (0, 3, 0, 3)), conv.weight, conv.bias, stride=4))
        # 227 needs no extra pixels.
        assert PaperAlexNet(10, input_size=227, fidelity="code").features[0](torch.randn(1, 3, 227, 227)).shape[
            -2:
        ] == (55, 55)
    assert PaperAlexNet(10, fidelity="text").features[0].padding == (2, 2)


@pytest.mark.parametrize(
    "model_fn", [lambda: PaperAlexNet(1000, fidelity="code"), lambda: CifarAlexNet(10, paper=True, fidelity="code")]
)
def test_code_initialisation_is_0_03_on_conv3_to_5(model_fn):
    torch.manual_seed(0)
    model = model_fn()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    stds = [0.01, 0.01, 0.03, 0.03, 0.03, 0.01, 0.01, 0.01]  # L:17, 73, 143, 172, 200, 242, 270, 298
    for layer, std in zip(layers, stds, strict=True):
        assert layer.weight.detach().double().std().item() == pytest.approx(std, rel=0.05), layer
    ones = [layer.bias.detach().eq(1).all().item() for layer in layers]
    assert ones == [False, True, False, True, True, True, True, False]  # L:74, 173, 201, 243, 271


def test_code_dropout_trains_unscaled_and_halves_at_test():
    torch.manual_seed(3)
    dropout = PaperAlexNet(10, fidelity="code").classifier[2]
    assert isinstance(dropout, ReleaseDropout) and dropout.p == 0.5  # L:256-291, keep=0.5
    x = torch.rand(64, 4096) + 0.5
    y = dropout.train()(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept])  # unscaled
    assert 0.45 < kept.float().mean().item() < 0.55
    assert torch.equal(dropout.eval()(x), x * 0.5)
    text = PaperAlexNet(10, fidelity="text").classifier[2]
    assert type(text) is nn.Dropout and torch.equal(text.eval()(x), x)


def test_grouped_and_split_agree_in_code_mode():
    torch.manual_seed(4)
    grouped = PaperAlexNet(10, fidelity="code").eval()
    split = SplitPaperAlexNet(grouped, ("cpu", "cpu")).eval()
    assert split.to_grouped().fidelity == "code"
    assert sum(isinstance(m, SameMapNorm) for m in split.modules()) == 2
    x = torch.randn(2, 3, 224, 224) * 60
    with torch.no_grad():
        torch.testing.assert_close(split(x), grouped(x), rtol=1e-4, atol=1e-5)


def test_the_registry_passes_the_fidelity():
    assert make_model("PaperAlexNet", 10, fidelity="text").fidelity == "text"
    assert make_model("PaperAlexNet", 10).fidelity == "code"
    lrn = next(m for m in make_model("PaperCifarAlexNet", 10, fidelity="code").modules() if isinstance(m, PaperLRN))
    assert not lrn.summed


# ---------------------------------------------------------------------------------------------
# The optimiser


def release_sgd(fidelity: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return build_optimizer(params, resolve("paper", {"fidelity": fidelity}))


def test_code_biases_keep_rate_0_02_without_decay_across_a_weight_rate_drop():
    w = torch.nn.Parameter(torch.full((1, 1), 2.0, dtype=torch.float64))
    b = torch.nn.Parameter(torch.full((1,), 2.0, dtype=torch.float64))
    optimizer = release_sgd("code", [w, b])
    assert [(len(g["params"]), g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (1, 0.01, 0.9, 0.0005),
        (1, 0.02, 0.9, 0.0),
    ]
    rates = [0.01, 0.01, 0.01, 0.001, 0.001]  # the schedule drops the weights' rate after 3 steps
    vw = vb = 0.0
    ww = wb = 2.0
    for step, lr in enumerate(rates):
        set_lr(optimizer, lr)
        w.grad, b.grad = torch.full_like(w, 0.5), torch.full_like(b, 0.5)
        optimizer.step()
        vw = 0.9 * vw - 0.0005 * lr * ww - lr * 0.5  # weights: the paper's rule at the current rate
        vb = 0.9 * vb - 0.02 * 0.5  # biases: no decay, 0.02 throughout
        ww, wb = ww + vw, wb + vb
        assert w.item() == pytest.approx(ww, rel=1e-12), step
        assert b.item() == pytest.approx(wb, rel=1e-12), step
    assert optimizer.param_groups[1]["lr"] == 0.02
    # The first step, by hand: 2 - 0.01 * (0.5 + 0.0005 * 2) and 2 - 0.02 * 0.5.
    first = release_sgd(
        "code", [torch.nn.Parameter(torch.full((1, 1), 2.0)), torch.nn.Parameter(torch.full((1,), 2.0))]
    )
    for p in (q for g in first.param_groups for q in g["params"]):
        p.grad = torch.full_like(p, 0.5)
    first.step()
    assert [g["params"][0].item() for g in first.param_groups] == pytest.approx([1.99499, 1.99], rel=1e-6)


def test_text_keeps_one_group_with_decay_on_everything():
    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    optimizer = release_sgd("text", [w, b])
    assert len(optimizer.param_groups) == 1 and "fixed_lr" not in optimizer.param_groups[0]
    set_lr(optimizer, 0.001)
    assert optimizer.param_groups[0]["lr"] == 0.001


@pytest.mark.parametrize("fidelity", ["code", "text"])
def test_a_saved_optimizer_state_fits_the_one_built_again(fidelity):
    model = make_model("PaperCifarAlexNet", 10, fidelity=fidelity)
    optimizer = release_sgd(fidelity, list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    assert check_optimizer_state(saved, release_sgd(fidelity, list(model.parameters()))) is None
    other = "text" if fidelity == "code" else "code"
    assert check_optimizer_state(saved, release_sgd(other, list(model.parameters()))) is not None


def test_a_code_mode_run_resumes(tmp_path, run_main):
    flags = ["-c", "-pm", "-pt", "--shapes-train", "64", "--shapes-test", "32", "--batch-size", "32"]
    first = run_main(*flags, "-ne", "1", "--run-name", "code", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    last = tmp_path / "checkpoints" / "Shapes" / "code" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["config"]["fidelity"] == "code"
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]] == [0.01, 0.02]
    resumed = run_main("--resume", str(last), "-ne", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(last, weights_only=True)["epoch"] == 2


# ---------------------------------------------------------------------------------------------
# The paper pipeline


def test_code_pipeline_is_crop_centre_mean_pca_noise_then_divide_by_1_1():
    torch.manual_seed(5)
    big = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8)
    mean = mean_image(big)
    values, vectors = rgb_eigen(big)
    pipeline = PaperPipeline(mean, values, vectors, crop=224, sigma=0.1, fidelity="code")
    out = pipeline.train(big, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 3, generator=g)
    top, left = torch.randint(0, 33, (4,), generator=g), torch.randint(0, 33, (4,), generator=g)
    flip = torch.rand(4, generator=g) < 0.5
    mean_crop = mean[:, 16:240, 16:240].double()  # convdata.py:137: the centre 224 of the 256 mean
    for i in range(4):
        # convdata.py:113: eigenvectors . (stdevs * N(0, 1)), stdevs = sqrt(eigenvalue) in 0-255 units.
        noise = vectors.double() @ (255 * values.double().sqrt() * z[i].double())
        patch = big[i, :, top[i] : top[i] + 224, left[i] : left[i] + 224].double()
        if flip[i]:
            patch = patch.flip(-1)
        expected = (patch - mean_crop + 0.1 * noise[:, None, None]) / 1.1  # convdata.py:203, 205
        torch.testing.assert_close(out[i].double(), expected, rtol=0, atol=1e-3)
    views = pipeline.evaluate(big)
    torch.testing.assert_close(views[:, 4], big[:, :, 16:240, 16:240].float() - mean[:, 16:240, 16:240])


def test_code_colour_noise_has_the_covariance_of_the_formula():
    # Flat images at the mean: what comes out is the noise alone, divided by 1.1.
    values = torch.tensor([0.04, 0.01, 0.0025])  # [0, 1] units: stdevs 51, 25.5, 12.75 pixel levels
    vectors = torch.linalg.qr(torch.tensor([[1.0, 0.2, 0.1], [0.3, 1.0, 0.2], [0.1, 0.4, 1.0]]))[0]
    flat = torch.full((4000, 3, 16, 16), 100, dtype=torch.uint8)
    pipeline = PaperPipeline(mean_image(flat), values, vectors, crop=12, base=16, sigma=0.1, fidelity="code")
    out = pipeline.train(flat, torch.Generator().manual_seed(6)).double()
    noise = out[:, :, 0, 0] * 1.1
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))  # one shift per image, on every pixel
    along = noise @ vectors.double()  # coordinates along the eigenvectors
    torch.testing.assert_close(along.std(0), 0.1 * 255 * values.double().sqrt(), rtol=0.05, atol=0)
    assert along.mean(0).abs().max() < 4 * 5.1 / 4000**0.5  # four standard errors of the largest (5.1)


# ---------------------------------------------------------------------------------------------
# The whole run, both ways (the paper's network at 224 on a CPU: kept to one small epoch each)


@pytest.mark.parametrize("fidelity", [[], ["--fidelity", "text"]])
def test_the_papers_network_and_setup_train_in_both_fidelities(fidelity, tmp_path, run_main):
    flags = ["-pm", "-pt", "-ds", "Shapes", "-ne", "1", "--shapes-train", "64", "--shapes-test", "32"]
    result = run_main(*flags, "--batch-size", "32", *fidelity, "--run-name", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = torch.load(tmp_path / "checkpoints" / "Shapes" / "run" / "last.pt", weights_only=True)["config"]
    assert config["fidelity"] == ("text" if fidelity else "code")


# ---------------------------------------------------------------------------------------------
# The fidelity table (docs/fidelity.md) says what the tests above assert


def test_fidelity_table_states_the_release_values(repo_root):
    readme = (repo_root / "docs" / "fidelity.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.splitlines() if line.startswith("| ")}
    expected = {
        "LRN denominator (rnorm1, rnorm2)": ["(2 + 2e-5 Σ a²)^0.75", "(2 + 1e-4 Σ a²)^0.75", "layer.py:1183"],
        "layer 1 order": ["conv, LRN, pool, ReLU", "conv, ReLU, LRN, pool", "L:9-63"],
        "cnorm2 (same-map response normalisation after LRN2)": ["0.001/25", "^0.75", "P:157-163"],
        "conv1 on a 224 crop": ["padding 2", "3 zero pixels on the right and bottom", "layer.py:1004"],
        "weight init, conv3-5": ["| 0.01 | 0.03 |", "L:143, 157, 172, 186, 200, 214"],
        "dropout (fc6, fc7)": ["× 0.5 at test", "src/layer.cu:1124-1133"],
        "momentum": ["momW 0.9, momB 0.9", "| 0.9 | 0.9 |"],
        "weight decay": ["0.0005 on weights, 0 on biases", "src/layer.cu:565"],
        "learning rate, weights": ["epsW 0.01, lowered by hand at epochs 25, 51, 79", "`--lr-milestones 25,51,79`"],
        "learning rate, biases": ["epsB 0.02", "0.02 (2 × `--lr`), never lowered"],
        "weight init, conv1-2, fc6-8": ["initW 0.01", "| 0.01 | 0.01 |"],
        "bias init": ["initB 1", "conv2, conv4, conv5, fc6, fc7"],
        "crop and mirror": ["one offset and mirror per chunk of 32 images", "convdata.py:125"],
        "mean subtracted": ["centre 224 crop of the mean", "convdata.py:137"],
        "PCA colour noise": ["0.1 · [p1 p2 p3](255 √λ ∘ N(0, 1))", "convdata.py:40-42, 113"],
        "after the noise": ["÷ 1.1", "convdata.py:205"],
    }
    for row, texts in expected.items():
        assert row in rows, row
        for text in texts:
            assert text in rows[row], (row, text)
    assert "disputed" not in readme


# ---------------------------------------------------------------------------------------------
# --lr-milestones: the drops the 2012 log records, alongside the plateau rule


def test_milestones_drop_the_rate_after_those_epochs_and_count_as_drops():
    from training.schedule import PlateauSchedule, milestones_problem, parse_milestones

    schedule = PlateauSchedule(base_lr=0.01, factor=0.1, patience=100, max_drops=3, milestones=parse_milestones("2,4"))
    rates = [schedule.step(score, epoch).lr for epoch, score in enumerate([1, 2, 3, 4, 5], start=1)]
    assert rates == pytest.approx([0.01, 0.001, 0.001, 0.0001, 0.0001]) and schedule.drops == 2
    # A plateau drop and a milestone drop at the same epoch are one drop; max_drops bounds both.
    both = PlateauSchedule(base_lr=1.0, factor=0.5, patience=1, max_drops=1, milestones=(1, 2))
    assert [both.step(0, 1).lr, both.step(0, 2).lr] == [0.5, 0.5] and both.drops == 1
    # The milestones come from the config, never from a checkpoint's schedule state.
    assert "_milestones" not in schedule.state_dict() and "milestones" not in schedule.state_dict()
    restored = PlateauSchedule(base_lr=0.01, milestones=(7,))
    restored.load_state_dict(schedule.state_dict())
    assert restored.lr == pytest.approx(0.0001) and restored.step(0, 7).lr == pytest.approx(0.00001)
    assert parse_milestones("25,51,79") == (25, 51, 79) and parse_milestones("") == ()
    assert milestones_problem("25,51,79") is None and milestones_problem("") is None
    assert "increasing" in milestones_problem("5,3") and "commas" in milestones_problem("5;3")


def test_lr_milestones_flag_reaches_the_config_and_is_checked():
    config = config_from_args(main.get_args_parser().parse_args(["--lr-milestones", "25,51,79"]), torch.device("cpu"))
    assert config.lr_milestones == "25,51,79"
    with pytest.raises(SystemExit):
        main.get_args_parser().parse_args(["--lr-milestones", "0,3"])
