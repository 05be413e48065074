"""The three AlexNets against the paper's numbers and torchvision."""

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from network import CifarAlexNet, PaperAlexNet, PaperLRN, TorchAlexNet, make_model, model_name


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def conv_params(table: list[tuple[int, int, int, int]]) -> int:
    """Parameters of convolutions given as (in, out, kernel, groups) rows."""
    return sum(cin // g * cout * k * k + cout for cin, cout, k, g in table)


def fc_params(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def feature_map_sizes(model: nn.Module, size: int) -> list[tuple[str, int]]:
    """Spatial size after every conv and pool of ``model.features`` for a ``size`` input."""
    out = []
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        for layer in model.features:
            x = layer(x)
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                out.append((type(layer).__name__, x.shape[-1]))
    return out


# ---------------------------------------------------------------------------------------------
# Parameter counts (paper.md)


def test_paper_alexnet_has_the_papers_parameter_count():
    assert n_params(PaperAlexNet(1000)) == 60_965_224


def test_torch_alexnet_matches_torchvision_parameter_count():
    assert n_params(TorchAlexNet(1000)) == 61_100_840
    assert n_params(torchvision.models.alexnet(weights=None)) == 61_100_840


def test_cifar_alexnet_parameter_counts_follow_its_layer_table():
    torch_table = [(3, 64, 3, 1), (64, 192, 5, 1), (192, 384, 3, 1), (384, 256, 3, 1), (256, 256, 3, 1)]
    paper_table = [(3, 96, 3, 1), (96, 256, 5, 2), (256, 384, 3, 1), (384, 384, 3, 2), (384, 256, 3, 2)]
    head = fc_params([256 * 3 * 3, 4096, 4096, 10])
    assert n_params(CifarAlexNet(10)) == conv_params(torch_table) + head == 28_711_754
    assert n_params(CifarAlexNet(10, paper=True)) == conv_params(paper_table) + head == 28_565_386


# ---------------------------------------------------------------------------------------------
# PaperAlexNet's layer table


def test_paper_alexnet_layer_table():
    got = [
        (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0], c.groups)
        for c in convs(PaperAlexNet(fidelity="text"))
    ]
    assert got == [
        (3, 96, 11, 4, 2, 1),
        (96, 256, 5, 1, 2, 2),
        (256, 384, 3, 1, 1, 1),
        (384, 384, 3, 1, 1, 2),
        (384, 256, 3, 1, 1, 2),
    ]
    assert [(m.in_features, m.out_features) for m in linears(PaperAlexNet())] == [
        (9216, 4096),
        (4096, 4096),
        (4096, 1000),
    ]
    pools = [m for m in PaperAlexNet().features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride) for p in pools] == [(3, 2)] * 3


def test_lrn_follows_the_relu_of_conv1_and_conv2_before_pooling():
    kinds = [type(m).__name__ for m in PaperAlexNet(fidelity="text").features]
    assert kinds == [
        "Conv2d",
        "ReLU",
        "PaperLRN",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "PaperLRN",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
    ]
    lrn = PaperAlexNet(fidelity="text").features[2]
    assert (lrn.size, lrn.paper_alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 2.0)


def test_dropout_acts_on_the_outputs_of_fc6_and_fc7():
    kinds = [type(m).__name__ for m in PaperAlexNet(dropout=0.5, fidelity="text").classifier]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert [m.p for m in PaperAlexNet(dropout=0.5).classifier if isinstance(m, nn.Dropout)] == [0.5, 0.5]


@pytest.mark.parametrize("size", [224, 227])
def test_paper_alexnet_feature_maps(size):
    model = PaperAlexNet(input_size=size, fidelity="text")
    assert model.features[0].padding == ((2, 2) if size == 224 else (0, 0))
    assert feature_map_sizes(model, size) == [
        ("Conv2d", 55),
        ("MaxPool2d", 27),
        ("Conv2d", 27),
        ("MaxPool2d", 13),
        ("Conv2d", 13),
        ("Conv2d", 13),
        ("Conv2d", 13),
        ("MaxPool2d", 6),
    ]


def test_paper_alexnet_refuses_other_input_sizes():
    with pytest.raises(ValueError, match="224 or 227"):
        PaperAlexNet(input_size=225)


# ---------------------------------------------------------------------------------------------
# Local response normalisation against the formula written out


def lrn_by_hand(a: torch.Tensor, n=5, k=2.0, alpha=1e-4, beta=0.75) -> torch.Tensor:
    """b[i] = a[i] / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a[j]^2)^beta, looped."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        s = sum(a[:, j] ** 2 for j in range(lo, hi + 1))
        out[:, i] = a[:, i] / (k + alpha * s) ** beta
    return out


def test_lrn_equals_the_papers_formula():
    torch.manual_seed(0)
    # Activations of a few hundred make the denominator differ clearly from k, as in early
    # training of the real network.
    a = torch.relu(torch.randn(2, 12, 5, 5, dtype=torch.float64) * 300)
    expected = lrn_by_hand(a)
    assert torch.allclose(PaperLRN()(a), expected, rtol=1e-12, atol=0)
    # The guard that matters: PyTorch's own alpha=1e-4 (averaged) is a different layer.
    assert not torch.allclose(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a), expected, rtol=1e-3)
    assert torch.allclose(nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(a), expected, rtol=1e-12)


def test_lrn_window_is_clipped_at_the_channel_edges():
    a = torch.zeros(1, 5, 1, 1, dtype=torch.float64)
    a[0, 0] = 100.0
    a[0, 4] = 50.0
    b = PaperLRN()(a)
    # Channel 0 sees channels 0..2 only; channel 2 sees 0..4; channel 4 sees 2..4.
    assert b[0, 0].item() == pytest.approx(100 / (2 + 1e-4 * 100**2) ** 0.75, rel=1e-12)
    assert b[0, 4].item() == pytest.approx(50 / (2 + 1e-4 * 50**2) ** 0.75, rel=1e-12)


@pytest.mark.parametrize("summed, on_sum", [(True, 1e-4), (False, 2e-5)])  # text, code
def test_grouped_lrn_on_channels_last_maps_is_the_formula_per_group(summed, on_sum):
    torch.manual_seed(0)
    a = torch.relu(torch.randn(2, 12, 5, 5, dtype=torch.float64) * 300)
    expected = torch.cat([lrn_by_hand(a[:, :6], alpha=on_sum), lrn_by_hand(a[:, 6:], alpha=on_sum)], 1)
    lrn = PaperLRN(groups=2, summed=summed)
    got = lrn(a.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    # The groups are a grouped convolution's, not a reshape's: no copy to NCHW and back.
    assert got.is_contiguous(memory_format=torch.channels_last)
    # Its window is built per call: no state, so checkpoints load as they always did.
    assert lrn.state_dict() == {}


def test_no_lrn_switch_replaces_lrn_by_identity_and_keeps_the_keys():
    with_lrn, without = PaperAlexNet(lrn=True, fidelity="text"), PaperAlexNet(lrn=False, fidelity="text")
    assert not any(isinstance(m, PaperLRN) for m in without.modules())
    assert [type(m).__name__ for m in without.features][2] == "Identity"
    assert with_lrn.state_dict().keys() == without.state_dict().keys()
    without.load_state_dict(with_lrn.state_dict())
    x = torch.randn(1, 3, 224, 224) * 50
    with torch.no_grad():
        assert not torch.allclose(with_lrn.eval()(x), without.eval()(x))


# ---------------------------------------------------------------------------------------------
# The two-GPU split


@pytest.mark.parametrize("index", [1, 3, 4])  # conv2, conv4, conv5
def test_grouped_conv_equals_two_towers(index):
    torch.manual_seed(index)
    conv = convs(PaperAlexNet())[index]
    assert conv.groups == 2
    x = torch.randn(2, conv.in_channels, 13, 13)
    half_in, half_out = conv.in_channels // 2, conv.out_channels // 2
    towers = []
    for gpu in range(2):
        w = conv.weight[gpu * half_out : (gpu + 1) * half_out]
        b = conv.bias[gpu * half_out : (gpu + 1) * half_out]
        xin = x[:, gpu * half_in : (gpu + 1) * half_in]
        towers.append(F.conv2d(xin, w, b, stride=conv.stride, padding=conv.padding))
    with torch.no_grad():
        assert torch.allclose(conv(x), torch.cat(towers, dim=1), atol=1e-6)
    # Each output half really depends on its own input half only.
    x2 = x.clone()
    x2[:, :half_in] += 1.0
    with torch.no_grad():
        y, y2 = conv(x), conv(x2)
    assert torch.equal(y[:, half_out:], y2[:, half_out:])
    assert not torch.allclose(y[:, :half_out], y2[:, :half_out])


# ---------------------------------------------------------------------------------------------
# Initialisation


@pytest.mark.parametrize(
    "model_fn", [lambda: PaperAlexNet(1000, fidelity="text"), lambda: CifarAlexNet(10, paper=True, fidelity="text")]
)
def test_paper_initialisation(model_fn):
    torch.manual_seed(0)
    model = model_fn()
    layers = convs(model) + linears(model)
    for layer in layers:
        w = layer.weight.detach().double()
        # The std estimate of >= 2,592 normal draws is within 5% of 0.01 with overwhelming odds.
        assert w.std().item() == pytest.approx(0.01, rel=0.05), layer
        assert abs(w.mean().item()) < 0.002, layer
    biases = [layer.bias.detach() for layer in layers]
    expected_one = [False, True, False, True, True, True, True, False]  # conv1..5, fc6..8
    for bias, one in zip(biases, expected_one, strict=True):
        assert torch.equal(bias, torch.full_like(bias, 1.0 if one else 0.0))


# ---------------------------------------------------------------------------------------------
# TorchAlexNet is torchvision's AlexNet


def test_torch_alexnet_loads_torchvision_weights_and_gives_the_same_outputs():
    torch.manual_seed(0)
    reference = torchvision.models.alexnet(weights=None).eval()
    ours = TorchAlexNet(1000).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), rtol=0, atol=1e-6)
    # And the other way round.
    reference.load_state_dict(TorchAlexNet(1000).state_dict(), strict=True)


@pytest.mark.parametrize("size", [160, 256])  # 4x4 and 7x7 maps before the 6x6 pool
def test_torch_alexnet_pools_other_input_sizes_as_torchvision(size):
    torch.manual_seed(0)
    reference = torchvision.models.alexnet(weights=None).eval()
    ours = TorchAlexNet(1000).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert ours.features(x).shape[-1] != 6
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-6)


def test_avgpool_is_skipped_only_where_it_would_change_nothing():
    # At 32x32 the maps already are 3x3 (tests/test_determinism.py: the pool leaves the graph).
    model = CifarAlexNet(10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.classifier(torch.flatten(model.avgpool(model.features(x)), 1))
        assert torch.equal(model(x), pooled)
        # 64x64 gives 7x7 maps, which the pool averages to 3x3.
        big = torch.randn(1, 3, 64, 64)
        assert model.features(big).shape[-2:] == (7, 7)
        expected = model.classifier(torch.flatten(F.adaptive_avg_pool2d(model.features(big), 3), 1))
        assert torch.equal(model(big), expected)


def test_torch_alexnet_layers_print_like_torchvisions():
    assert (
        repr(TorchAlexNet(1000)).split("\n", 1)[1] == repr(torchvision.models.alexnet(weights=None)).split("\n", 1)[1]
    )


# ---------------------------------------------------------------------------------------------
# Shapes of outputs and gradients


@pytest.mark.parametrize(
    "model_fn, size, classes",
    [
        (lambda: PaperAlexNet(1000), 224, 1000),
        (lambda: PaperAlexNet(20, input_size=227), 227, 20),
        (lambda: TorchAlexNet(1000), 224, 1000),
        (lambda: CifarAlexNet(10), 32, 10),
        (lambda: CifarAlexNet(100, paper=True), 32, 100),
    ],
)
def test_output_shapes(model_fn, size, classes):
    model = model_fn().eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, size, size)).shape == (3, classes)


@pytest.mark.parametrize("paper", [False, True])
def test_cifar_alexnet_feature_maps(paper):
    model = CifarAlexNet(10, paper=paper)
    assert model.features[0].kernel_size == (3, 3) and model.features[0].stride == (1, 1)
    assert feature_map_sizes(model, 32) == [
        ("Conv2d", 32),
        ("MaxPool2d", 15),
        ("Conv2d", 15),
        ("MaxPool2d", 7),
        ("Conv2d", 7),
        ("Conv2d", 7),
        ("Conv2d", 7),
        ("MaxPool2d", 3),
    ]


def test_cifar_alexnet_with_paper_features_has_the_split_and_lrn():
    model = CifarAlexNet(10, paper=True)
    assert [c.groups for c in convs(model)] == [1, 2, 1, 2, 2]
    assert sum(isinstance(m, PaperLRN) for m in model.modules()) == 2
    assert [c.out_channels for c in convs(model)] == [96, 256, 384, 384, 256]
    assert sum(isinstance(m, PaperLRN) for m in CifarAlexNet(10, paper=True, lrn=False).modules()) == 0
    assert [c.groups for c in convs(CifarAlexNet(10))] == [1, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "model_fn, size",
    [
        (lambda: PaperAlexNet(5), 224),
        (lambda: TorchAlexNet(5), 224),
        (lambda: CifarAlexNet(5), 32),
        (lambda: CifarAlexNet(5, paper=True), 32),
    ],
)
def test_gradients_reach_every_parameter(model_fn, size):
    torch.manual_seed(0)
    model = model_fn().eval()  # no dropout, so every unit can contribute
    x = torch.randn(4, 3, size, size)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "cifar, paper, expected",
    [
        (False, False, TorchAlexNet),
        (False, True, PaperAlexNet),
        (True, False, CifarAlexNet),
        (True, True, CifarAlexNet),
    ],
)
def test_the_original_tools_model_flags_choose_the_network(cifar, paper, expected):
    model = make_model(model_name(cifar, paper), num_classes=7)
    assert type(model) is expected
    assert linears(model)[-1].out_features == 7
    if cifar:
        assert model.paper is paper
