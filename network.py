"""The three AlexNets, and the paper's one split over two devices.

- ``PaperAlexNet``: the network of Krizhevsky, Sutskever & Hinton (NIPS 2012) as published:
  96-256-384-384-256 kernels, the two-GPU split expressed as ``groups=2`` on conv2/4/5, local
  response normalisation after the first two ReLUs, overlapping 3/2 max-pooling, dropout on
  fc6/fc7 and the paper's initialisation. 60,965,224 parameters at 1000 classes. Where the
  text is silent or ambiguous, ``fidelity`` follows the 2012 code release ("code", default:
  ``NetworkFidelity``, ``SameMapNorm``, ``CeilConv2d``, ``ReleaseDropout``) or the text ("text").
- ``SplitPaperAlexNet``: the same network with its two towers on two devices, as the paper ran
  it (model parallel), giving the grouped model's outputs; its weights convert both ways.
- ``TorchAlexNet``: torchvision's variant ("One weird trick", Krizhevsky 2014), layer for layer
  and key for key the same as ``torchvision.models.alexnet``. 61,100,840 parameters.
- ``CifarAlexNet``: the same five-conv/three-fc network for 32x32 images, the first 11x11/4
  convolution shrunk to 3x3/1 so a CIFAR image survives it.

Every model follows torchvision's layout (``features``, ``avgpool`` where used, ``classifier``)
so state_dicts are comparable and ``print(model)`` reads like the paper's table.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError

#: Fully connected width of fc6 and fc7 in every AlexNet.
FC_WIDTH = 4096


def in_float32(norm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` computed in fp32 (fp64 stays fp64) with autocast off, returned in ``x``'s dtype.

    The response normalisations square their input: in fp16, whose largest value is 65504, an
    activation of 256 or more squares to inf and its output becomes 0 (what ``--amp fp16`` did to
    the paper's network), and bf16 keeps 8 bits of each square. Autocast would also run the LRN
    window's convolution in the low precision, hence off here."""
    compute = torch.promote_types(x.dtype, torch.float32)
    # Devices without autocast (the meta device) have none to turn off.
    if not torch.amp.is_autocast_available(x.device.type):
        return norm(x.to(compute)).to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return norm(x.to(compute)).to(x.dtype)


def cross_map_window(channels: int, groups: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """The weight of the grouped 1x1 convolution that sums LRN's window of squares: output map ``i``
    takes 1 x each input map ``i - size // 2`` to ``i + (size - 1) // 2`` of its own group (the
    window of ``F.local_response_norm``) and 0 x the others, so the window is clipped at the edges
    of each group. Shape (channels, channels // groups, 1, 1), on ``like``'s device and dtype."""
    maps = torch.arange(channels // groups, device=like.device)
    offset = maps - maps[:, None]  # [output map, input map]
    band = (offset >= -(size // 2)) & (offset <= (size - 1) // 2)
    return band.to(like.dtype).repeat(groups, 1)[:, :, None, None]


class PaperLRN(nn.LocalResponseNorm):
    """Local response normalisation (§3.3) with k=2, n=5, alpha=1e-4, beta=0.75, in either
    reading of alpha:

    - ``summed=True`` (``--fidelity text``), the printed formula:
      ``b[i] = a[i] / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a[j]^2) ** beta``;
    - ``summed=False`` (``--fidelity code``), what the 2012 network computed: the release's layer
      parser divides ``scale`` by ``size`` before the kernel runs (layer.py:1183), so the
      denominator is ``(k + alpha / n * sum a[j]^2) ** beta``, i.e. ``(2 + 2e-5 * sum) ** 0.75``.

    ``nn.LocalResponseNorm`` divides ``alpha`` by the window size (it averages the squares over a
    zero-padded window): the code's reading is its own, the text's needs ``alpha * size`` there.
    The window is clipped at the channel edges, exactly as in the formula (and as cuda-convnet's
    cross-map kernel, which clips the window to the existing maps).

    With ``groups=2`` the channels are normalised as two separate halves, the window never
    reaching across the middle: each of the paper's GPUs normalised its own kernel maps (the
    two-GPU layer config of cuda-convnet2 has ``rnorm1a``/``rnorm1b`` over 48 channels each), so
    this is what makes the grouped single-device network equal the two towers.

    The window sums are a grouped 1x1 convolution of the squares with a 0/1 band matrix
    (``cross_map_window``), built per call so that the state_dict stays empty. The sums are the
    formula's (the other maps add exact zeros), and unlike ``F.local_response_norm`` it has a
    deterministic CUDA backward (``avg_pool3d``'s raises under ``--deterministic``) and keeps a
    channels-last input channels-last instead of copying it to NCHW and back around the
    per-group window: forward and backward in fp32 at batch 32 on a 2-core CPU it is 1.2x (NCHW)
    and 1.6x (channels-last) as fast as ``F.local_response_norm`` at LRN1's 96x55x55 maps, 1.5x
    and 1.9x at LRN2's 256x27x27. It runs in fp32 under autocast (``in_float32``).

    On Ampere and newer GPUs the convolution runs in TF32 (``torch.backends.cudnn.allow_tf32`` is
    True by default): the squares keep 10 mantissa bits, so a window sum is off by up to 2**-10
    (~1e-3) relative, and the output, through ``(k + c * sum) ** -beta`` (c the factor on the sum),
    by at most beta x that (~7e-4), less where ``c * sum`` is small next to k. That is below
    bf16's rounding (the default autocast) and of the order of the TF32 convolutions around it,
    and TF32 keeps fp32's range, which is what the fp32 is for: it is left on.
    """

    def __init__(
        self,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 2.0,
        groups: int = 1,
        summed: bool = True,
    ) -> None:
        super().__init__(size=size, alpha=alpha * size if summed else alpha, beta=beta, k=k)
        self.paper_alpha = alpha
        self.groups = groups
        self.summed = summed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_float32(self._normalise, x)

    def _normalise(self, a: torch.Tensor) -> torch.Tensor:
        window = cross_map_window(a.shape[1], self.groups, self.size, a)
        total = F.conv2d(a.square(), window, groups=self.groups)
        # ``self.alpha`` is nn.LocalResponseNorm's: it multiplies the mean of the window's squares.
        return a / (self.k + self.alpha / self.size * total).pow(self.beta)

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        how = "summed" if self.summed else "divided by size"
        return f"size={self.size}, alpha={self.paper_alpha} ({how}), beta={self.beta}, k={self.k}{groups}"


class SameMapNorm(nn.Module):
    """Same-map response normalisation: ``cnorm2a/b`` of the 2012 release (type ``rnorm``, after
    the cross-map LRN of layer 2, before pool2; layers-145.cfg:107-117, layer-params-145.cfg:157-163),
    which the paper does not mention. Each map is normalised by its own neighbourhood::

        b[c, y, x] = a[c, y, x] / (min_div + scale / size**2 * S[c, y, x]) ** power
        S[c, y, x] = sum over y' in [y - size//2, y - size//2 + size - 1],
                              x' in [x - size//2, x - size//2 + size - 1] of a[c, y', x']**2

    with size 5, scale 0.001, power 0.75, min_div 1. Where each number comes from:

    - the window starts ``size // 2`` before the pixel and spans ``size`` pixels (centred for an
      odd size; one more pixel before than after for an even one), per channel only:
      ``startPxX = -sizeX/2 + pxIdxX`` and the loop to ``startPxX + sizeX`` in ``kCNorm_fewfilter``
      / ``kCNorm_manyfilter`` (``kCNorm2`` for sizes >= 6 gives the same window), cuda-convnet's
      ``src/cudaconv2/conv_util.cu:758-780`` (dnouri/cuda-convnet), the same in cuda-convnet2's
      ``cudaconv3/src/conv_util.cu:878-889``;
    - edges: the loop is clipped to the map (``MAX(0, ...)``, ``MIN(imgSize, ...)``), so pixels
      outside add nothing while the divisor stays ``size**2``: a zero-padded window, i.e.
      ``avg_pool2d`` with ``count_include_pad=True`` times ``size**2``;
    - ``scale / size**2``: the release's parser divides ``scale`` by ``size**2`` for this layer
      type (layer.py:1183); scale 0.001 and pow 0.75 are layer-params-145.cfg:157-163;
    - ``min_div`` 1: the release calls ``convResponseNorm`` without a minimum (src/layer.cu:1569),
      and that kernel adds 1 (``prod = 1 + addScale * prod``, cuda-convnet
      ``src/cudaconv2/conv_util.cu:802``; cuda-convnet2 made it the ``minDiv`` argument, default 1).

    Without weights, and per map, so the two towers need nothing of each other. In fp32 under
    autocast (``in_float32``).
    """

    def __init__(self, size: int = 5, scale: float = 1e-3, power: float = 0.75, min_div: float = 1.0) -> None:
        super().__init__()
        self.size, self.scale, self.power, self.min_div = size, scale, power, min_div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_float32(self._normalise, x)

    def _normalise(self, a: torch.Tensor) -> torch.Tensor:
        before = self.size // 2
        after = self.size - 1 - before
        squares = F.pad(a.square(), (before, after, before, after))
        # The mean over a zero-padded window is the clipped sum divided by size**2.
        mean = F.avg_pool2d(squares, self.size, stride=1)
        return a * (self.min_div + self.scale * mean).pow(-self.power)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale} (divided by size^2), power={self.power}, min_div={self.min_div}"


class CeilConv2d(nn.Conv2d):
    """A convolution whose output size follows cuda-convnet's ceil rule, ``1 + ceil((in + 2 pad -
    kernel) / stride)`` (the release's layer.py:1004): the missing pixels are zeros on the right
    and bottom only. conv1 of the release on 224x224 crops: 11x11/4, no padding, 55x55 out, as
    if the input were padded by (0, 3, 0, 3), which is where the "227" comes from."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = [
            (-(size + 2 * pad - k)) % s
            for size, pad, k, s in zip(x.shape[-2:], self.padding, self.kernel_size, self.stride, strict=False)
        ]
        return super().forward(F.pad(x, (0, extra[1], 0, extra[0])) if any(extra) else x)


class ReleaseDropout(nn.Dropout):
    """Dropout as the release's ``hs`` layers did it (layers-145.cfg:256-291, keep 0.5, and
    src/layer.cu:1124-1133): training zeroes units with probability ``p`` and leaves the others
    unscaled; evaluation multiplies every output by the keep probability ``1 - p`` (the paper's
    "multiply their outputs by 0.5"). ``nn.Dropout`` instead scales by ``1 / (1 - p)`` in
    training and does nothing at test: the same expectation, another network at each step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = 1 - self.p
        if not self.training:
            return x * keep
        return x * torch.empty_like(x).bernoulli_(keep)


@dataclass(frozen=True)
class NetworkFidelity:
    """What ``--fidelity`` changes in the paper's network: the 2012 release (``code``) or the
    paper's text (``text``). docs/fidelity.md lists each with its place in the release."""

    lrn_summed: bool  # alpha multiplies the sum of squares (text) or their sum / n (code)
    norm_before_relu1: bool  # layer 1: conv, LRN, pool, ReLU (code) or conv, ReLU, LRN, pool (text)
    same_map_norm: bool  # cnorm2 after LRN2 (code only)
    deep_init_std: float  # initial weight std of conv3-5
    dropout: type[nn.Dropout]  # scaled at test (code) or inverted (text)
    ceil_conv1: bool  # conv1 on 224: no padding and the ceil rule (code) or pad 2 (text)


FIDELITY: dict[str, NetworkFidelity] = {
    "code": NetworkFidelity(
        lrn_summed=False,
        norm_before_relu1=True,
        same_map_norm=True,
        deep_init_std=0.03,
        dropout=ReleaseDropout,
        ceil_conv1=True,
    ),
    "text": NetworkFidelity(
        lrn_summed=True,
        norm_before_relu1=False,
        same_map_norm=False,
        deep_init_std=0.01,
        dropout=nn.Dropout,
        ceil_conv1=False,
    ),
}

#: What ``--fidelity`` chooses between where the paper's text is silent or ambiguous: ``code``
#: reproduces the 2012 release (what was trained), ``text`` the paper as written.
FIDELITIES = tuple(FIDELITY)


def paper_norm(fidelity: NetworkFidelity, lrn: bool) -> Callable[[int], nn.Module]:
    """The normalisation slot after conv1 and conv2 of the paper's features (``alexnet_features``'s
    ``norm``): LRN per tower, with cnorm2 after it in layer 2 in the release; ``nn.Identity``
    without LRN (``--no-lrn`` drops cnorm2 as well), so state_dict keys never change."""

    def build(layer: int) -> nn.Module:
        if not lrn:
            return nn.Identity()
        cross_map = PaperLRN(groups=2, summed=fidelity.lrn_summed)
        if layer == 2 and fidelity.same_map_norm:
            return nn.Sequential(cross_map, SameMapNorm())
        return cross_map

    return build


def alexnet_features(
    channels: Sequence[int],
    conv1: tuple[int, int, int],
    groups: int = 1,
    norm: Callable[[int], nn.Module] | None = None,
    norm_before_relu1: bool = False,
    conv1_type: type[nn.Conv2d] = nn.Conv2d,
) -> nn.Sequential:
    """AlexNet's five convolutions: conv-ReLU-[norm]-pool twice, three conv-ReLU, pool.

    ``conv1`` is (kernel, stride, padding) of the first layer (a ``conv1_type``); conv2 is
    5x5/pad 2 and conv3-5 are 3x3/pad 1. ``groups`` applies to conv2, conv4 and conv5, the
    layers that in the paper see only the half of the previous layer living on their own GPU.
    ``norm(layer)`` builds the layer that follows the ReLUs of layers 1 and 2 (LRN in the
    paper); ``None`` leaves no slot at all, which keeps torchvision's layer indices. With
    ``norm_before_relu1`` layer 1 is conv, norm, pool, ReLU, the order of the 2012 release (the
    same modules at other indices: ReLU and max-pooling commute, LRN and ReLU do not).
    """
    c1, c2, c3, c4, c5 = channels
    kernel, stride, padding = conv1

    def block(conv: nn.Conv2d, layer: int, pooled: bool) -> list[nn.Module]:
        normed = norm is not None and layer in (1, 2)
        # Overlapping pooling (3x3 windows, stride 2): worth 0.4 points top-1 in the paper.
        pool = [nn.MaxPool2d(kernel_size=3, stride=2)] if pooled else []
        if normed and layer == 1 and norm_before_relu1:
            return [conv, norm(layer), *pool, nn.ReLU(inplace=True)]
        return [conv, nn.ReLU(inplace=True), *([norm(layer)] if normed else []), *pool]

    return nn.Sequential(
        *block(conv1_type(3, c1, kernel, stride=stride, padding=padding), layer=1, pooled=True),
        *block(nn.Conv2d(c1, c2, 5, padding=2, groups=groups), layer=2, pooled=True),
        *block(nn.Conv2d(c2, c3, 3, padding=1), layer=3, pooled=False),
        *block(nn.Conv2d(c3, c4, 3, padding=1, groups=groups), layer=4, pooled=False),
        *block(nn.Conv2d(c4, c5, 3, padding=1, groups=groups), layer=5, pooled=True),
    )


def pool_to_size(pool: nn.AdaptiveAvgPool2d, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)``, or ``x`` itself where it already has the pool's output size (at the native
    input size of TorchAlexNet and CifarAlexNet). There the pool averages one-pixel windows, which
    changes nothing, but its backward has no deterministic CUDA kernel: ``--deterministic`` raised
    at the first step. The module stays, as ``avgpool``, for torchvision's layout and other sizes."""
    size = pool.output_size
    wanted = (size, size) if isinstance(size, int) else size
    if all(want in (None, have) for want, have in zip(wanted, x.shape[-2:], strict=True)):
        return x
    return pool(x)


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


def paper_classifier(
    in_features: int, num_classes: int, dropout: float, dropout_type: type[nn.Dropout] = nn.Dropout
) -> nn.Sequential:
    """The paper's head: dropout zeroes the *outputs* of the hidden fc6 and fc7 neurons (§4.2)."""
    return nn.Sequential(
        nn.Linear(in_features, FC_WIDTH),
        nn.ReLU(inplace=True),
        dropout_type(p=dropout),
        nn.Linear(FC_WIDTH, FC_WIDTH),
        nn.ReLU(inplace=True),
        dropout_type(p=dropout),
        nn.Linear(FC_WIDTH, num_classes),
    )


@torch.no_grad()
def paper_init_(model: nn.Module, deep_std: float = 0.01) -> None:
    """The paper's initialisation (§5): every weight N(0, 0.01); biases 1 in conv2, conv4, conv5,
    fc6 and fc7 (to give the ReLUs positive inputs early on), 0 in conv1, conv3 and fc8. The
    weights of conv3-5 have std ``deep_std``: 0.03 in the 2012 release (layers-145.cfg:143, 172, 200)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(convs) != 5 or len(linears) != 3:
        raise ValueError(f"paper_init_ expects 5 convolutions and 3 linear layers, got {len(convs)} and {len(linears)}")
    ones = {id(convs[1]), id(convs[3]), id(convs[4]), id(linears[0]), id(linears[1])}
    deep = {id(conv) for conv in convs[2:]}
    for layer in convs + linears:
        nn.init.normal_(layer.weight, mean=0.0, std=deep_std if id(layer) in deep else 0.01)
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

    The two halves are the paper's two GPUs, and every layer keeps them apart where the GPUs
    did: conv2/4/5 by ``groups=2``, and LRN by normalising each half of the maps on its own
    (``PaperLRN(groups=2)``), so no LRN window spans channels 47/48 of conv1 or 127/128 of
    conv2. ``SplitPaperAlexNet`` runs the same network on two real devices.

    ``fidelity="code"`` (default) builds what the 2012 release trained where the text is silent
    or ambiguous (``NetworkFidelity``): LRN with alpha divided by n, layer 1 as conv1 (no padding
    on 224, the ceil rule: as if padded by 0/3/0/3), LRN, pool, ReLU; cnorm2 (``SameMapNorm``)
    after LRN2; conv3-5 initialised with std 0.03; dropout scaled at test. ``"text"`` builds
    the table above as printed. Both have the same state_dict keys and parameter count.

    Args:
        num_classes: size of fc8.
        dropout: drop probability on the outputs of fc6 and fc7 (paper: 0.5).
        lrn: keep the local response normalisation; ``False`` puts ``nn.Identity`` in its place
            so state_dict keys stay the same (the seed found LRN useless on CIFAR).
        input_size: 224 or 227, see above.
        fidelity: "code" (the 2012 release) or "text" (the paper as printed), see above.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        dropout: float = 0.5,
        lrn: bool = True,
        input_size: int = 224,
        fidelity: str = "code",
    ) -> None:
        super().__init__()
        if input_size not in (224, 227):
            raise ValueError(f"PaperAlexNet takes 224 or 227 pixel inputs, not {input_size}")
        how = FIDELITY[fidelity]
        self.input_size, self.lrn, self.fidelity = input_size, lrn, fidelity
        self.features = alexnet_features(
            channels=(96, 256, 384, 384, 256),
            conv1=(11, 4, 2 if input_size == 224 and not how.ceil_conv1 else 0),
            groups=2,
            norm=paper_norm(how, lrn),
            norm_before_relu1=how.norm_before_relu1,
            conv1_type=CeilConv2d if how.ceil_conv1 else nn.Conv2d,
        )
        self.classifier = paper_classifier(256 * 6 * 6, num_classes, dropout, how.dropout)
        paper_init_(self, how.deep_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# Where the two towers of SplitPaperAlexNet meet: before conv3 (``features[8]``), fc6 (the
# classifier's input), fc7 (``classifier[3]``) and fc8 (``classifier[6]``). The indices are
# PaperAlexNet's, which the LRN slots keep fixed whether or not LRN is on.
_CONV3, _FC7, _FC8 = 8, 3, 6
_FC8_BIAS = f"classifier.{_FC8}.bias"


def _tower_dim(name: str) -> int | None:
    """The dimension along which a PaperAlexNet tensor is cut into the towers' halves: the output
    dimension everywhere but fc8, which is cut by its inputs (dim 1) so each tower adds a partial
    sum; ``None`` for fc8's bias, which lives whole on the first tower."""
    if name == _FC8_BIAS:
        return None
    return 1 if name.startswith(f"classifier.{_FC8}.") else 0


def split_grouped(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Cut a PaperAlexNet state_dict (or any tensors under its names, e.g. gradients) into the
    state_dicts of the two towers of ``SplitPaperAlexNet``."""
    towers: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    for name, tensor in state.items():
        dim = _tower_dim(name)
        if dim is None:
            towers[0][name] = tensor
        else:
            towers[0][name], towers[1][name] = tensor.chunk(2, dim)
    return towers


def join_towers(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``split_grouped``: PaperAlexNet tensors from the two towers' halves, on the
    device of ``a``."""
    joined = {}
    for name, first in a.items():
        dim = _tower_dim(name)
        joined[name] = first if dim is None else torch.cat([first, b[name].to(first.device)], dim)
    return joined


def _tower_layer(layer: nn.Module, tower: int, fc8: bool = False) -> nn.Module:
    """One tower's part of a PaperAlexNet layer: half the kernels or neurons of every convolution
    and of fc6/fc7, fc8 over half of its inputs, LRN over the tower's own maps; layers without
    weights are copied. Built on the meta device: the weights come from
    ``load_grouped_state_dict``, so initialising them would be wasted work."""
    if isinstance(layer, nn.Conv2d):
        # A grouped convolution sees only its own half of the input, an ungrouped one all of it.
        return type(layer)(
            layer.in_channels // layer.groups,
            layer.out_channels // 2,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            device="meta",
        )
    if isinstance(layer, nn.Linear) and fc8:
        return nn.Linear(layer.in_features // 2, layer.out_features, bias=tower == 0, device="meta")
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features // 2, device="meta")
    if isinstance(layer, PaperLRN):
        return PaperLRN(layer.size, layer.paper_alpha, layer.beta, layer.k, summed=layer.summed)
    if isinstance(layer, nn.Sequential):
        return nn.Sequential(*(_tower_layer(part, tower) for part in layer))
    return copy.deepcopy(layer)


class PaperTower(nn.Module):
    """One of the paper's two GPUs: PaperAlexNet's layers under the same names, each holding its
    half of the kernels and neurons. It has no ``forward``: the towers exchange activations
    four times, which ``SplitPaperAlexNet.forward`` does."""

    def __init__(self, model: PaperAlexNet, tower: int, device: torch.device) -> None:
        super().__init__()
        self.features = nn.Sequential(*(_tower_layer(layer, tower) for layer in model.features))
        self.classifier = nn.Sequential(
            *(_tower_layer(layer, tower, fc8=i == _FC8) for i, layer in enumerate(model.classifier))
        )
        self.to_empty(device=device)


def _run(layers: nn.Sequential, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    for layer in itertools.islice(layers, start, stop):
        x = layer(x)
    return x


class SplitPaperAlexNet(nn.Module):
    """PaperAlexNet with its two towers on two devices, the model parallelism of the paper (§3.2).

    Tower k (on ``devices[k]``) holds half of every layer: 48 conv1 kernels over the whole image,
    LRN over its own 48 maps, 128 conv2 kernels over its own maps, 192 conv3 kernels, 192 conv4
    and 128 conv5 kernels, and 2048 of the 4096 neurons of fc6 and fc7. The towers exchange
    activations where the paper's GPUs communicated: conv3 sees both towers' conv2 maps, fc6 both
    towers' conv5 maps, fc7 both towers' fc6 neurons. fc8 is cut by its inputs instead: each
    tower multiplies its own 2048 fc7 neurons by its half of fc8's weights and only the partial
    logits cross to ``devices[0]``, which holds fc8's bias and returns the sum. The output (and
    the loss, and so the labels) live on ``devices[0]``; the input may be anywhere.

    The outputs are the grouped model's up to float rounding, and so are the gradients; dropout
    draws its masks per tower, so training steps differ from the grouped model's only in which
    units are dropped. Both towers may sit on one device (the CPU in the tests).

    Built from a PaperAlexNet, whose settings (classes, dropout, LRN, input size) and weights it
    takes; the layers are created on their devices, so do not ``.to()`` it afterwards.
    Checkpoints should hold the grouped model's state_dict, which ``grouped_state_dict`` gives
    and ``load_grouped_state_dict`` reads (``to_grouped`` gives a whole PaperAlexNet).
    """

    def __init__(self, model: PaperAlexNet, devices: Sequence[torch.device | str] = ("cpu", "cpu")) -> None:
        super().__init__()
        if not isinstance(model, PaperAlexNet):
            raise TypeError(f"SplitPaperAlexNet splits a PaperAlexNet, not a {type(model).__name__}")
        if len(devices) != 2:
            raise ValueError(f"SplitPaperAlexNet needs two devices, got {len(devices)}")
        self.devices = tuple(torch.device(d) for d in devices)
        self.input_size = model.input_size
        self.towers = nn.ModuleList(PaperTower(model, k, device) for k, device in enumerate(self.devices))
        self._settings = {
            "num_classes": model.classifier[_FC8].out_features,
            "dropout": model.classifier[_FC8 - 1].p,
            "lrn": model.lrn,
            "input_size": model.input_size,
            "fidelity": model.fidelity,
        }
        self.load_grouped_state_dict(model.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (a, b), (da, db) = self.towers, self.devices
        # conv1 and conv2: each tower convolves the whole image with its own kernels.
        ya = _run(a.features, x.to(da, non_blocking=True), stop=_CONV3)
        yb = _run(b.features, x.to(db, non_blocking=True), stop=_CONV3)
        ya, yb = self._exchange(ya, yb)
        ya, yb = _run(a.features, ya, _CONV3), _run(b.features, yb, _CONV3)
        # Flattening is channel-major, so joining the flat halves is flattening the joined maps.
        ya, yb = self._exchange(torch.flatten(ya, 1), torch.flatten(yb, 1))
        ya, yb = _run(a.classifier, ya, stop=_FC7), _run(b.classifier, yb, stop=_FC7)
        ya, yb = self._exchange(ya, yb)
        ya, yb = _run(a.classifier, ya, _FC7, _FC8), _run(b.classifier, yb, _FC7, _FC8)
        return a.classifier[_FC8](ya) + b.classifier[_FC8](yb).to(da, non_blocking=True)

    def _exchange(self, ya: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers' channels (tower 0's first) on each tower's device."""
        da, db = self.devices
        return torch.cat([ya, yb.to(da, non_blocking=True)], 1), torch.cat([ya.to(db, non_blocking=True), yb], 1)

    def grouped_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as PaperAlexNet's state_dict (same keys and shapes), on ``devices[0]``."""
        a, b = (tower.state_dict() for tower in self.towers)
        return join_towers(a, b)

    #: Its layers are made on their devices: ``training.fastpath.prepare_model`` leaves it there.
    places_itself = True

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What checkpoints hold: the grouped model's state_dict, so a split run's checkpoint
        loads into PaperAlexNet and back."""
        return self.grouped_state_dict()

    @torch.no_grad()
    def load_grouped_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a PaperAlexNet state_dict, each tower taking its halves; as strict as
        ``load_state_dict(strict=True)`` about keys and shapes."""
        expected = self.towers[0].state_dict().keys()
        if state.keys() != expected:
            missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
            raise RuntimeError(f"not a PaperAlexNet state_dict: missing {missing}, unexpected {unexpected}")
        for tower, halves in zip(self.towers, split_grouped(state), strict=True):
            params = tower.state_dict(keep_vars=True)
            for name, half in halves.items():
                if half.shape != params[name].shape:
                    raise RuntimeError(
                        f"size mismatch for {name}: a tower holds {tuple(params[name].shape)}, "
                        f"the state_dict gives half of it as {tuple(half.shape)}"
                    )
                params[name].copy_(half)

    def to_grouped(self) -> PaperAlexNet:
        """A PaperAlexNet with these weights, on ``devices[0]``."""
        with self.devices[0]:
            model = PaperAlexNet(**self._settings)
        model.load_state_dict(self.grouped_state_dict())
        return model.train(self.training)

    def extra_repr(self) -> str:
        return f"devices=({self.devices[0]}, {self.devices[1]})"


def split_devices(device: torch.device) -> tuple[torch.device, torch.device]:
    """The two devices of ``--split-gpus`` for the training device ``device``: ``cuda`` (or
    ``cuda:N``) gives that GPU and the next one, ``cpu`` puts both towers on the CPU (as the
    tests do). Raises ``UserError`` when there is no second GPU."""
    if device.type == "cpu":
        return device, device
    if device.type != "cuda":
        raise UserError(f"--split-gpus runs the two towers on two CUDA devices (or the CPU), not on {device.type}.")
    first, count = device.index or 0, torch.cuda.device_count()
    if first + 2 > count:
        raise UserError(
            f"--split-gpus needs two CUDA devices (cuda:{first} and cuda:{first + 1}), found {count}; "
            "drop --split-gpus to train the grouped model on one device."
        )
    return torch.device("cuda", first), torch.device("cuda", first + 1)


class TorchAlexNet(nn.Module):
    """torchvision's AlexNet: 64-192-384-256-256, no LRN, no groups, adaptive 6x6 average pool
    (``pool_to_size``: an identity on the 6x6 maps of a 224 input, so it is skipped there).

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
        x = pool_to_size(self.avgpool, x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class CifarAlexNet(nn.Module):
    """AlexNet for 32x32 images: an 11x11 stride-4 first layer would leave a 32x32 image as a 6x6
    map, so conv1 becomes 3x3 stride 1 (the ratio of kernel to image, 11/224, is about 1.6 pixels
    at 32x32). Everything after it is AlexNet's.

    With ``paper=False`` (default) the widths follow torchvision; with ``paper=True`` they are
    the paper's, with ``groups=2`` on conv2/4/5, LRN after the first two ReLUs over each half
    of the maps (switchable with ``lrn``), the paper's head and the paper's initialisation.
    ``fidelity`` applies with ``paper=True`` as in ``PaperAlexNet``, except for conv1, which
    is this network's own 3x3/1 (no ceil rule to follow): in ``code`` the LRN scale, layer 1's
    order, cnorm2, the 0.03 init of conv3-5 and the test-time-scaled dropout.

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

    def __init__(
        self, num_classes: int = 10, dropout: float = 0.5, paper: bool = False, lrn: bool = True, fidelity: str = "code"
    ) -> None:
        super().__init__()
        self.paper = paper
        how = FIDELITY[fidelity]
        if paper:
            self.features = alexnet_features(
                channels=(96, 256, 384, 384, 256),
                conv1=(3, 1, 1),
                groups=2,
                norm=paper_norm(how, lrn),
                norm_before_relu1=how.norm_before_relu1,
            )
            self.classifier = paper_classifier(256 * 3 * 3, num_classes, dropout, how.dropout)
            paper_init_(self, how.deep_init_std)
        else:
            self.features = alexnet_features(channels=(64, 192, 384, 256, 256), conv1=(3, 1, 1))
            self.classifier = torchvision_classifier(256 * 3 * 3, num_classes, dropout)
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = pool_to_size(self.avgpool, x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@dataclass(frozen=True)
class ModelInfo:
    """A registered network: how to build it, the input size it expects, whether
    ``--split-gpus`` can put its two towers on two devices, and whether it has the paper's
    features (LRN, which ``--no-lrn`` removes)."""

    build: Callable[[int, float, bool, str], nn.Module]  # (num_classes, dropout, lrn, fidelity) -> model
    kind: type[nn.Module]  # the class it builds
    input_size: int
    splittable: bool = False
    paper_features: bool = False


MODELS: dict[str, ModelInfo] = {
    "TorchAlexNet": ModelInfo(lambda n, dropout, lrn, fidelity: TorchAlexNet(n, dropout), TorchAlexNet, 224),
    "PaperAlexNet": ModelInfo(
        lambda n, dropout, lrn, fidelity: PaperAlexNet(n, dropout, lrn=lrn, fidelity=fidelity),
        PaperAlexNet,
        224,
        splittable=True,
        paper_features=True,
    ),
    "CifarAlexNet": ModelInfo(lambda n, dropout, lrn, fidelity: CifarAlexNet(n, dropout), CifarAlexNet, 32),
    "PaperCifarAlexNet": ModelInfo(
        lambda n, dropout, lrn, fidelity: CifarAlexNet(n, dropout, paper=True, lrn=lrn, fidelity=fidelity),
        CifarAlexNet,
        32,
        paper_features=True,
    ),
}


def model_name(cifar: bool, paper_model: bool) -> str:
    """The original v2 tool's flags as a registered name: ``-c`` -> CifarAlexNet (PaperCifarAlexNet, the
    paper's features on 32x32 images, with ``-pm``), ``-pm`` -> PaperAlexNet, neither ->
    TorchAlexNet. The one place these flags are read."""
    if cifar:
        return "PaperCifarAlexNet" if paper_model else "CifarAlexNet"
    return "PaperAlexNet" if paper_model else "TorchAlexNet"


def make_model(
    name: str, num_classes: int, dropout: float = 0.5, lrn: bool = True, fidelity: str = "code"
) -> nn.Module:
    """The registered network ``name`` (freshly initialised); ``fidelity`` applies to the paper's
    networks only."""
    return MODELS[name].build(num_classes, dropout, lrn, fidelity)
