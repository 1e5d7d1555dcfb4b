"""CIFAR networks written as an ordered list of stages, so they can be cut.

A model is an ``nn.Sequential`` of stages. Stage 0 is the first convolution
with its normalisation and ReLU: the paper's "first hidden layer" (L1).
``split_model(model, cut)`` keeps the first ``cut`` stages at the hospital
(the head) and the rest at the server (the trunk); ``trunk(head(x))`` runs
exactly the operations of ``model(x)`` in the same order.

``--bottleneck R`` (``add_bottleneck``) adds a learned encoder to the end of
stage ``cut - 1`` and its decoder to the start of stage ``cut``: the stages
keep their number, so every split of the model (split learning, U-shaped,
the one-process references, the baselines) places the encoder at the
hospital and the decoder at the server without knowing about it.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from splitrpc.errors import UserError

VGG_LAYERS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}
# Blocks per stage group of the CIFAR ResNets (depth = 6n + 2).
RESNET_CIFAR = {"resnet20": 3, "resnet56": 9}


def _channels(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # Up to 8 groups that divide the channel count: per-sample statistics, so
        # a step does not depend on how samples are grouped into batches.
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    return nn.Identity()


def _conv_norm_relu(cin: int, cout: int, norm: str, bias: bool) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), _norm(norm, cout), nn.ReLU(inplace=True)]


def vgg(name: str, num_classes: int, width: float, norm: str) -> nn.Sequential:
    stages: list[nn.Module] = []
    pending_pool = False
    cin = 3
    for item in VGG_LAYERS[name]:
        if item == "M":
            pending_pool = True  # pooling opens the next stage, so stage 0 is exactly conv+norm+ReLU
            continue
        cout = _channels(item, width)
        layers = [nn.MaxPool2d(2)] if pending_pool else []
        # Convolution biases kept, as in the reference CIFAR VGG (14.73 M parameters for VGG-16).
        stages.append(nn.Sequential(*layers, *_conv_norm_relu(cin, cout, norm, bias=True)))
        pending_pool, cin = False, cout
    stages.append(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(cin, num_classes)))
    return nn.Sequential(*stages)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=norm == "none")
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=norm == "none")
        self.norm2 = _norm(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        self.pad = None
        if stride != 1 or cin != cout:
            if shortcut == "conv":  # option B, as in ResNet-18
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=norm == "none"), _norm(norm, cout))
            else:  # option A, the parameter-free shortcut of the CIFAR ResNets
                extra = cout - cin
                self.pad = (stride, extra // 2, extra - extra // 2)

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.pad is not None:
            stride, lo, hi = self.pad
            skip = F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, lo, hi))
        else:
            skip = self.shortcut(x)
        return F.relu(out + skip)


def _resnet(blocks: list[int], widths: list[int], num_classes: int, width: float, norm: str, shortcut: str) -> nn.Sequential:
    cin = _channels(widths[0], width)
    stages: list[nn.Module] = [nn.Sequential(*_conv_norm_relu(3, cin, norm, bias=norm == "none"))]
    for group, (count, base) in enumerate(zip(blocks, widths)):
        cout = _channels(base, width)
        for i in range(count):
            stride = 2 if group > 0 and i == 0 else 1
            stages.append(BasicBlock(cin, cout, stride, norm, shortcut))
            cin = cout
    stages.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)))
    return nn.Sequential(*stages)


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_model(name: str, num_classes: int = 10, width: float = 1.0, norm: str = "batch") -> nn.Sequential:
    if name in VGG_LAYERS:
        model = vgg(name, num_classes, width, norm)
    elif name == "resnet18":
        model = _resnet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, width, norm, shortcut="conv")
    elif name in RESNET_CIFAR:
        n = RESNET_CIFAR[name]
        model = _resnet([n, n, n], [16, 32, 64], num_classes, width, norm, shortcut="pad")
    else:
        raise UserError(f"unknown model {name!r}")
    _init(model)
    return model


def stage_count(name: str) -> int:
    """Stages of a model, without building it: one per conv layer (VGG) or residual block, plus stem and classifier."""
    if name in VGG_LAYERS:
        return sum(1 for item in VGG_LAYERS[name] if item != "M") + 1
    if name == "resnet18":
        return 1 + 8 + 1
    if name in RESNET_CIFAR:
        return 1 + 3 * RESNET_CIFAR[name] + 1
    raise UserError(f"unknown model {name!r}")


def build_for(cfg) -> nn.Sequential:
    """The network ``cfg`` describes, with its bottleneck at the cut if it asks for one; unseeded."""
    model = build_model(cfg.model, cfg.num_classes, cfg.width, cfg.norm)
    return add_bottleneck(model, cfg.cut, cfg.bottleneck, cfg.norm)


def model_for(cfg, seed: int | None = None) -> nn.Sequential:
    """The full model every party builds from the same seed (--seed unless given), so all copies start
    equal. The process-wide RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        return build_for(cfg).to(getattr(torch, cfg.dtype))


# --- the learned bottleneck at the cut (--bottleneck) ------------------------------------------
def bottleneck_layout(shape: tuple[int, int, int], ratio: int) -> tuple[int, int] | None:
    """(stride, channels) of the encoder that makes a CxHxW activation exactly ``ratio`` times smaller,
    or None if none does.

    From 4x on, a 2x2 convolution of stride 2 halves both sides (4x fewer positions, where
    neighbouring values are most alike) and the channels make up the rest: C' = 4C / R. Below
    4x, or when a side is odd, only the channels shrink: C' = C / R. C' must be a whole number.
    """
    channels, height, width = shape
    stride = 2 if ratio >= 4 and height % 2 == 0 and width % 2 == 0 else 1
    kept = channels * stride * stride
    if ratio < 1 or kept % ratio:
        return None
    return stride, kept // ratio


def bottleneck_ratios(shape: tuple[int, int, int]) -> list[int]:
    """Every ratio ``bottleneck_layout`` meets exactly for this activation shape (1 = no bottleneck)."""
    channels = shape[0]
    return [r for r in range(1, 4 * channels + 1) if bottleneck_layout(shape, r) is not None]


def add_bottleneck(model: nn.Sequential, cut: int, ratio: int, norm: str) -> nn.Sequential:
    """``model`` with an encoder closing stage ``cut - 1`` and a decoder opening stage ``cut`` (in place).

    Encoder: a strided (or 1x1) convolution down to C' channels and a normalisation, no ReLU:
    a ReLU would zero about half of the few values that cross, which carry what the trunk
    needs (the linear bottleneck of MobileNetV2). Decoder: its mirror, a transposed (or 1x1)
    convolution back to C channels, normalisation and ReLU, so the trunk's first stage sees
    an input of the shape and kind it expects (every stage ends in a ReLU).
    """
    if ratio == 1:
        return model
    check_cut(len(model), cut)
    shape = activation_shape(model, cut)
    layout = bottleneck_layout(shape, ratio)
    if layout is None:
        raise UserError(bottleneck_problem(shape, ratio, "the model", cut))
    stride, narrow = layout
    channels, bias = shape[0], norm == "none"
    if stride == 1:
        down, up = nn.Conv2d(channels, narrow, 1, bias=bias), nn.Conv2d(narrow, channels, 1, bias=bias)
    else:
        down = nn.Conv2d(channels, narrow, stride, stride=stride, bias=bias)
        up = nn.ConvTranspose2d(narrow, channels, stride, stride=stride, bias=bias)
    encoder = nn.Sequential(OrderedDict(conv=down, norm=_norm(norm, narrow)))
    decoder = nn.Sequential(OrderedDict(conv=up, norm=_norm(norm, channels), relu=nn.ReLU(inplace=True)))
    _init(encoder)
    _init(decoder)
    model[cut - 1] = nn.Sequential(OrderedDict(stage=model[cut - 1], encoder=encoder))
    model[cut] = nn.Sequential(OrderedDict(decoder=decoder, stage=model[cut]))
    return model


def bottleneck_problem(shape: tuple, ratio: int, name: str, cut: int) -> str:
    return (f"--bottleneck {ratio} cannot shrink the {'x'.join(map(str, shape))} activations of {name} at --cut "
            f"{cut} exactly: choose one of {', '.join(map(str, bottleneck_ratios(shape)))}")


def check_bottleneck(name: str, width: float, norm: str, cut: int, ratio: int) -> None:
    """A ratio that no encoder meets exactly is one clear error, found from shapes alone (a model on
    the meta device: no weights are allocated)."""
    if ratio == 1:
        return
    with torch.device("meta"):
        shape = activation_shape(build_model(name, 10, width, norm), cut)
    if bottleneck_layout(shape, ratio) is None:
        raise UserError(bottleneck_problem(shape, ratio, name, cut))


def check_cut(stages: int, cut: int, name: str = "the model") -> None:
    if not 1 <= cut <= stages - 1:
        raise UserError(f"--cut {cut} is out of range for {name}: choose 1..{stages - 1} "
                        f"(it has {stages} stages and the server keeps at least the classifier)")


def split_model(model: nn.Sequential, cut: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(head, trunk): the first ``cut`` stages and the rest. Shares the modules of ``model``."""
    check_cut(len(model), cut)
    return nn.Sequential(*model[:cut]), nn.Sequential(*model[cut:])


def check_tail(stages: int, cut: int, tail: int, name: str = "the model") -> None:
    if tail < 1 or cut + tail > stages - 1:
        raise UserError(f"--tail {tail} with --cut {cut} leaves the server no stage of {name} ({stages} stages): "
                        f"choose --cut + --tail <= {stages - 1}, --tail >= 1")


def split_u(model: nn.Sequential, cut: int, tail: int) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """(head, middle, tail) of the U-shaped split: the hospital keeps the first ``cut`` and the last ``tail``
    stages, the server the middle. Shares the modules of ``model``."""
    check_tail(len(model), cut, tail)
    return nn.Sequential(*model[:cut]), nn.Sequential(*model[cut:-tail]), nn.Sequential(*model[-tail:])


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def activation_shape(model: nn.Sequential, cut: int, image_shape=(3, 32, 32)) -> tuple[int, ...]:
    """Shape of one sample's activation at the cut, from a forward pass in eval mode."""
    head, _ = split_model(model, cut)
    was_training = head.training
    head.eval()
    dtype = next(head.parameters()).dtype
    shape = tuple(head(torch.zeros(1, *image_shape, dtype=dtype)).shape[1:])
    head.train(was_training)
    return shape


def floating_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and floating-point buffer (BatchNorm statistics): what averaging models moves."""
    return [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
