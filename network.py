"""The three AlexNets.

- ``PaperAlexNet``: the network of Krizhevsky, Sutskever & Hinton (NIPS 2012) as published:
  96-256-384-384-256 kernels, the two-GPU split expressed as ``groups=2`` on conv2/4/5, local
  response normalisation after the first two ReLUs, overlapping 3/2 max-pooling, dropout on
  fc6/fc7 and the paper's initialisation. 60,965,224 parameters at 1000 classes.
- ``TorchAlexNet``: torchvision's variant ("One weird trick", Krizhevsky 2014), layer for layer
  and key for key the same as ``torchvision.models.alexnet``. 61,100,840 parameters.
- ``CifarAlexNet``: the same five-conv/three-fc network for 32x32 images, the first 11x11/4
  convolution shrunk to 3x3/1 so a CIFAR image survives it.

Every model follows torchvision's layout (``features``, ``avgpool`` where used, ``classifier``)
so state_dicts are comparable and ``print(model)`` reads like the paper's table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

#: Fully connected width of fc6 and fc7 in every AlexNet.
FC_WIDTH = 4096


class PaperLRN(nn.LocalResponseNorm):
    """Local response normalisation in the paper's parametrisation (§3.3).

    ``b[i] = a[i] / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a[j]^2) ** beta``
    with k=2, n=5, alpha=1e-4, beta=0.75.

    ``nn.LocalResponseNorm`` divides ``alpha`` by the window size (it averages the squares over a
    zero-padded window), so the paper's *sum* needs ``alpha * size`` there; zero padding makes
    the clipped window at the channel edges come out exactly as in the formula. cuda-convnet's
    own layer config also divided its scale by the window, so whether the paper's 1e-4 already
    meant the averaged form is disputed; we follow the paper's text as written.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__(size=size, alpha=alpha * size, beta=beta, k=k)
        self.paper_alpha = alpha

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.paper_alpha} (summed), beta={self.beta}, k={self.k}"


def alexnet_features(
    channels: Sequence[int],
    conv1: tuple[int, int, int],
    groups: int = 1,
    norm: Callable[[], nn.Module] | None = None,
) -> nn.Sequential:
    """AlexNet's five convolutions: conv-ReLU-[norm]-pool twice, three conv-ReLU, pool.

    ``conv1`` is (kernel, stride, padding) of the first layer; conv2 is 5x5/pad 2 and conv3-5
    are 3x3/pad 1. ``groups`` applies to conv2, conv4 and conv5, the layers that in the paper
    see only the half of the previous layer living on their own GPU. ``norm`` builds the layer
    that follows the first two ReLUs (LRN in the paper); ``None`` leaves no slot at all, which
    keeps torchvision's layer indices.
    """
    c1, c2, c3, c4, c5 = channels
    kernel, stride, padding = conv1

    def block(conv: nn.Conv2d, normed: bool, pooled: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [conv, nn.ReLU(inplace=True)]
        if normed and norm is not None:
            layers.append(norm())
        if pooled:
            # Overlapping pooling (3x3 windows, stride 2): worth 0.4 points top-1 in the paper.
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        return layers

    return nn.Sequential(
        *block(nn.Conv2d(3, c1, kernel, stride=stride, padding=padding), normed=True, pooled=True),
        *block(nn.Conv2d(c1, c2, 5, padding=2, groups=groups), normed=True, pooled=True),
        *block(nn.Conv2d(c2, c3, 3, padding=1), normed=False, pooled=False),
        *block(nn.Conv2d(c3, c4, 3, padding=1, groups=groups), normed=False, pooled=False),
        *block(nn.Conv2d(c4, c5, 3, padding=1, groups=groups), normed=False, pooled=True),
    )


def torchvision_classifier(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """torchvision's head: dropout before fc6 and fc7 (indices 0-6 as in torchvision)."""
    return nn.Sequential(
        nn.Dropout(p=dropout),
        nn.Linear(in_features, FC_WIDTH),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(FC_WIDTH, FC_WIDTH),
        nn.ReLU(inplace=True),
        nn.Linear(FC_WIDTH, num_classes),
    )


def paper_classifier(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The paper's head: dropout zeroes the *outputs* of the hidden fc6 and fc7 neurons (§4.2)."""
    return nn.Sequential(
        nn.Linear(in_features, FC_WIDTH),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(FC_WIDTH, FC_WIDTH),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(FC_WIDTH, num_classes),
    )


@torch.no_grad()
def paper_init_(model: nn.Module) -> None:
    """The paper's initialisation (§5): every weight N(0, 0.01); biases 1 in conv2, conv4, conv5,
    fc6 and fc7 (to give the ReLUs positive inputs early on), 0 in conv1, conv3 and fc8."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(convs) != 5 or len(linears) != 3:
        raise ValueError(f"paper_init_ expects 5 convolutions and 3 linear layers, got {len(convs)} and {len(linears)}")
    ones = {id(convs[1]), id(convs[3]), id(convs[4]), id(linears[0]), id(linears[1])}
    for layer in convs + linears:
        nn.init.normal_(layer.weight, mean=0.0, std=0.01)
        nn.init.constant_(layer.bias, 1.0 if id(layer) in ones else 0.0)


class PaperAlexNet(nn.Module):
    """AlexNet exactly as in the 2012 paper.

    ===== ================ ======== ============ ===================== ===================
    layer out (GPU A + B)  kernel   stride / pad sees                  then
    ===== ================ ======== ============ ===================== ===================
    conv1 48 + 48 = 96     11x11    4 / 2 (224)  image                 ReLU, LRN, pool 3/2
    conv2 128 + 128 = 256  5x5      1 / 2        own half (groups=2)   ReLU, LRN, pool 3/2
    conv3 192 + 192 = 384  3x3      1 / 1        both halves           ReLU
    conv4 192 + 192 = 384  3x3      1 / 1        own half (groups=2)   ReLU
    conv5 128 + 128 = 256  3x3      1 / 1        own half (groups=2)   ReLU, pool 3/2
    fc6   4096             9216 in  -            everything            ReLU, dropout
    fc7   4096             -        -            everything            ReLU, dropout
    fc8   num_classes      -        -            everything            (softmax in the loss)
    ===== ================ ======== ============ ===================== ===================

    Feature maps 55 -> 27 -> 13 -> 13 -> 13 -> 6. The paper says 224x224 inputs, but
    (224 - 11) / 4 + 1 is not an integer; the original code behaved like a 227 input. Both are
    supported and both give 55x55 after conv1: ``input_size=224`` pads conv1 by 2 (default, the
    crop size of the paper's pipeline), ``input_size=227`` pads by 0.

    Args:
        num_classes: size of fc8.
        dropout: drop probability on the outputs of fc6 and fc7 (paper: 0.5).
        lrn: keep the local response normalisation; ``False`` puts ``nn.Identity`` in its place
            so state_dict keys stay the same (the seed found LRN useless on CIFAR).
        input_size: 224 or 227, see above.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, lrn: bool = True, input_size: int = 224) -> None:
        super().__init__()
        if input_size not in (224, 227):
            raise ValueError(f"PaperAlexNet takes 224 or 227 pixel inputs, not {input_size}")
        self.input_size = input_size
        self.features = alexnet_features(
            channels=(96, 256, 384, 384, 256),
            conv1=(11, 4, 2 if input_size == 224 else 0),
            groups=2,
            norm=PaperLRN if lrn else nn.Identity,
        )
        self.classifier = paper_classifier(256 * 6 * 6, num_classes, dropout)
        paper_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class TorchAlexNet(nn.Module):
    """torchvision's AlexNet: 64-192-384-256-256, no LRN, no groups, adaptive 6x6 average pool.

    Same modules, indices and state_dict keys as ``torchvision.models.alexnet``, so its
    ImageNet weights load with ``strict=True``. Default PyTorch initialisation, as torchvision.
    Input 224x224 (conv1 11x11/4, pad 2).
    """

    input_size = 224

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = alexnet_features(channels=(64, 192, 384, 256, 256), conv1=(11, 4, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = torchvision_classifier(256 * 6 * 6, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class CifarAlexNet(nn.Module):
    """AlexNet for 32x32 images: an 11x11 stride-4 first layer would leave a 32x32 image as a 6x6
    map, so conv1 becomes 3x3 stride 1 (the ratio of kernel to image, 11/224, is about 1.6 pixels
    at 32x32). Everything after it is AlexNet's.

    With ``paper=False`` (default) the widths follow torchvision; with ``paper=True`` they are
    the paper's, with ``groups=2`` on conv2/4/5, LRN after the first two ReLUs (switchable with
    ``lrn``), the paper's head and the paper's initialisation.

    ===== ======================= ======== ============ ====== =========================
    layer out (torch / paper)     kernel   stride / pad map    then
    ===== ======================= ======== ============ ====== =========================
    conv1 64 / 96                 3x3      1 / 1        32x32  ReLU, [LRN], pool 3/2 ->15
    conv2 192 / 256 (paper: g=2)  5x5      1 / 2        15x15  ReLU, [LRN], pool 3/2 -> 7
    conv3 384 / 384               3x3      1 / 1        7x7    ReLU
    conv4 256 / 384 (paper: g=2)  3x3      1 / 1        7x7    ReLU
    conv5 256 / 256 (paper: g=2)  3x3      1 / 1        7x7    ReLU, pool 3/2 -> 3x3
    avgpool                       adaptive 3x3                 (identity at 32x32 input)
    fc6   4096                    2304 in                      ReLU + dropout
    fc7   4096                                                 ReLU + dropout
    fc8   num_classes
    ===== ======================= ======== ============ ====== =========================
    """

    input_size = 32

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, paper: bool = False, lrn: bool = True) -> None:
        super().__init__()
        self.paper = paper
        if paper:
            self.features = alexnet_features(
                channels=(96, 256, 384, 384, 256), conv1=(3, 1, 1), groups=2, norm=PaperLRN if lrn else nn.Identity
            )
        else:
            self.features = alexnet_features(channels=(64, 192, 384, 256, 256), conv1=(3, 1, 1))
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        head = paper_classifier if paper else torchvision_classifier
        self.classifier = head(256 * 3 * 3, num_classes, dropout)
        if paper:
            paper_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def build_model(cifar: bool, paper_model: bool, num_classes: int, dropout: float = 0.5, lrn: bool = True) -> nn.Module:
    """The seed's model choice: ``-pm`` -> PaperAlexNet, ``-c`` -> CifarAlexNet (with the paper's
    features when ``-pm`` is also given), neither -> TorchAlexNet."""
    if cifar:
        return CifarAlexNet(num_classes, dropout, paper=paper_model, lrn=lrn)
    if paper_model:
        return PaperAlexNet(num_classes, dropout, lrn=lrn)
    return TorchAlexNet(num_classes, dropout)
