"""Reconstructing hospital images from the L1 activations the server receives.

Scored with PSNR and SSIM on pixel scale (``splitrpc.privacy.image_metrics``):

* the query-free model-inversion attack of He, Zhang & Lee (ACSAC 2019), by an
  honest-but-curious server that does not know the head's weights: it trains a
  surrogate head through its own frozen trunk on public labelled data, so the
  surrogate emits activations where the trunk expects them, then trains a decoder
  from surrogate activations back to images (cf. feature-space hijacking,
  Pasquini et al., CCS 2021);
* white-box inversion (regularised maximum likelihood, "rMLE", He et al. 2019),
  an upper bound for a server that knows the head's weights.

``leakage_report`` scores one batch: distance correlation of images and
activations, and the quality of reconstructions.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from splitrpc.data import IMAGE_SIZE
from splitrpc.errors import UserError
from splitrpc.privacy.dcor import bias_corrected_distance_correlation, distance_correlation
from splitrpc.privacy.image_metrics import denormalize, psnr, ssim

IMAGE_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)

# The attack's defaults: a starting point for CIFAR-scale auxiliary sets, not tuned on them
# (the tests run a few hundred steps on tiny synthetic images).
ATTACK_BATCH_SIZE = 64
SURROGATE_STEPS = 2000
SURROGATE_LR = 1e-3
DECODER_STEPS = 2000
DECODER_LR = 1e-3
DECODER_HIDDEN_CHANNELS = 32
# Aux images used to measure per-channel activation statistics that standardise the decoder's input.
ACTIVATION_STATS_SAMPLES = 256
# Dead ReLU channels have zero spread; they stay zero instead of dividing by it.
ACTIVATION_STD_FLOOR = 1e-6
RECONSTRUCT_BATCH_SIZE = 256

# White-box inversion defaults. The TV weight is relative to the mean squared activation
# error: through a random ResNet-20 L1, 0.05 already blurred smooth images (28 dB vs 37 dB at 0.01).
WHITE_BOX_STEPS = 500
WHITE_BOX_LR = 0.05
WHITE_BOX_TV_WEIGHT = 0.01
WHITE_BOX_INIT_STD = 0.1


# --------------------------------------------------------------------------- attack helpers
@contextlib.contextmanager
def _in_mode(module: object, training: bool) -> Iterator[None]:
    """Put every submodule of ``module`` (if it is one) in train or eval mode, and restore each afterwards."""
    if not isinstance(module, nn.Module):
        yield
        return
    before = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, was_training in before:
            m.training = was_training


def _index_batches(n: int, batch_size: int, steps: int, seed: int, device: torch.device) -> Iterator[Tensor]:
    """``steps`` batches of indices into n samples: successive seeded permutations, no sample repeated within one."""
    if n == 0:
        raise UserError("the attack needs at least one auxiliary image")
    batch_size = min(batch_size, n)
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        yield order[position:position + batch_size].to(device)
        position += batch_size


def _adam_step(optimizer: torch.optim.Optimizer, loss: Tensor, parameters: list[Tensor]) -> None:
    # autograd.grad touches only the tensors being optimised: modules the loss runs
    # through (the frozen trunk, a known head) keep their .grad untouched.
    grads = torch.autograd.grad(loss, parameters)
    for p, g in zip(parameters, grads):
        p.grad = g
    optimizer.step()


def train_surrogate_head(trunk: nn.Module, head_template: nn.Module, aux_images: Tensor, aux_labels: Tensor,
                         steps: int = SURROGATE_STEPS, lr: float = SURROGATE_LR,
                         batch_size: int = ATTACK_BATCH_SIZE, seed: int = 0,
                         also_train: Sequence[nn.Parameter] = ()) -> nn.Module:
    """A copy of ``head_template`` trained so that ``trunk(surrogate(x))`` classifies aux data, trunk frozen.

    The trunk is run in eval mode (its normalisation statistics are those it learnt
    from the hospitals) and none of its parameters, buffers or gradients change. To
    fit the frozen trunk, the surrogate must emit activations in the space the trunk
    expects, i.e. close to the real head's. Returns the surrogate in eval mode.
    """
    surrogate = copy.deepcopy(head_template)
    # also_train: against a U-shaped split the server lacks the classifier, so it trains its own
    # tail (part of ``trunk``) together with the surrogate.
    parameters = [p for p in surrogate.parameters() if p.requires_grad] + list(also_train)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    with _in_mode(trunk, training=False):
        surrogate.train()
        for rows in _index_batches(len(aux_images), batch_size, steps, seed, aux_images.device):
            loss = F.cross_entropy(trunk(surrogate(aux_images[rows])), aux_labels[rows])
            optimizer.zero_grad(set_to_none=True)
            _adam_step(optimizer, loss, parameters)
    return surrogate.eval()


class Decoder(nn.Module):
    """Activations (C, h, w) back to images (3, H, W), with H = h * 2^k.

    Input is standardised per channel with fixed statistics of the head's
    activations, so the decoder does not depend on their scale. A convolutional path
    upsamples k times; a linear path (nearest upsampling and a 1x1 convolution)
    runs beside it, so an invertible linear head is learnt almost at once and the
    convolutions only add what is nonlinear.
    """

    def __init__(self, activation_shape: tuple[int, int, int], image_shape: tuple[int, int, int],
                 activation_mean: Tensor, activation_std: Tensor, hidden_channels: int = DECODER_HIDDEN_CHANNELS):
        super().__init__()
        channels, height, width = activation_shape
        image_channels, image_height, image_width = image_shape
        scale = image_height // height
        if image_height != height * scale or image_width != width * scale or scale & (scale - 1):
            raise UserError(f"cannot decode activations of spatial size {height}x{width} into {image_height}x"
                            f"{image_width} images: the image must be a power-of-two multiple of the activation")
        self.register_buffer("activation_mean", activation_mean.reshape(1, channels, 1, 1).clone())
        self.register_buffer("activation_std", activation_std.reshape(1, channels, 1, 1).clone())
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden_channels, 3, padding=1), nn.ReLU()]
        for _ in range(int(math.log2(scale))):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1), nn.ReLU(),
                   nn.Conv2d(hidden_channels, image_channels, 3, padding=1)]
        self.convolutional = nn.Sequential(*layers)
        self.linear = nn.Sequential(nn.Upsample(scale_factor=scale, mode="nearest"),
                                    nn.Conv2d(channels, image_channels, 1))

    def forward(self, activations: Tensor) -> Tensor:
        standardised = (activations - self.activation_mean) / self.activation_std
        return self.convolutional(standardised) + self.linear(standardised)


def train_decoder(head: Callable[[Tensor], Tensor], aux_images: Tensor, steps: int = DECODER_STEPS,
                  lr: float = DECODER_LR, batch_size: int = ATTACK_BATCH_SIZE, seed: int = 0,
                  hidden_channels: int = DECODER_HIDDEN_CHANNELS) -> Decoder:
    """A decoder trained on (head(x) -> x) pairs of aux images, MSE in normalised space.

    ``head`` is any callable: the attacker's surrogate, or the true head for an
    oracle upper bound. A module head is run in eval mode without gradients and left
    as it was. The decoder's output has the aux images' shape. Returns it in eval mode.
    """
    if aux_images.dim() != 4 or len(aux_images) == 0:
        raise UserError(f"train_decoder: expected a non-empty batch of (N, C, H, W) images, "
                        f"got {tuple(aux_images.shape)}")
    with _in_mode(head, training=False), torch.no_grad():
        sample = head(aux_images[:ACTIVATION_STATS_SAMPLES])
    if sample.dim() != 4:
        raise UserError(f"train_decoder: expected (N, C, h, w) activations, got shape {tuple(sample.shape)}")
    mean = sample.mean(dim=(0, 2, 3))
    std = sample.std(dim=(0, 2, 3)).clamp_min(ACTIVATION_STD_FLOOR)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, without touching the caller's global RNG
        torch.manual_seed(seed)
        decoder = Decoder(tuple(sample.shape[1:]), tuple(aux_images.shape[1:]), mean, std, hidden_channels)
    decoder = decoder.to(device=aux_images.device, dtype=aux_images.dtype)
    parameters = list(decoder.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    decoder.train()
    with _in_mode(head, training=False):
        for rows in _index_batches(len(aux_images), batch_size, steps, seed, aux_images.device):
            images = aux_images[rows]
            with torch.no_grad():
                activations = head(images)
            loss = F.mse_loss(decoder(activations), images)
            optimizer.zero_grad(set_to_none=True)
            _adam_step(optimizer, loss, parameters)
    return decoder.eval()


@torch.no_grad()
def reconstruct(decoder: nn.Module, activations: Tensor, batch_size: int = RECONSTRUCT_BATCH_SIZE) -> Tensor:
    """Images (normalised space) that ``decoder`` infers from received activations."""
    with _in_mode(decoder, training=False):
        return torch.cat([decoder(chunk) for chunk in activations.split(batch_size)])


def attack(trunk: nn.Module, head_template: nn.Module, aux_images: Tensor, aux_labels: Tensor,
           received_activations: Tensor, surrogate_steps: int = SURROGATE_STEPS, decoder_steps: int = DECODER_STEPS,
           surrogate_lr: float = SURROGATE_LR, decoder_lr: float = DECODER_LR,
           batch_size: int = ATTACK_BATCH_SIZE, seed: int = 0, also_train: Sequence[nn.Parameter] = ()) -> Tensor:
    """The query-free attack end to end: a surrogate head, a decoder trained on its activations,
    and that decoder's reconstructions (normalised space) of the activations the server received."""
    surrogate = train_surrogate_head(trunk, head_template, aux_images, aux_labels, surrogate_steps, surrogate_lr,
                                     batch_size, seed, also_train)
    decoder = train_decoder(surrogate, aux_images, decoder_steps, decoder_lr, batch_size, seed)
    return reconstruct(decoder, received_activations)


# --------------------------------------------------------------------------- white-box inversion
def total_variation(images: Tensor) -> Tensor:
    """Anisotropic total variation: mean absolute difference between vertical and between horizontal neighbours."""
    vertical = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean()
    horizontal = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    return vertical + horizontal


def invert_white_box(head: nn.Module, activations: Tensor, steps: int = WHITE_BOX_STEPS, lr: float = WHITE_BOX_LR,
                     tv_weight: float = WHITE_BOX_TV_WEIGHT, seed: int = 0,
                     image_shape: tuple[int, int, int] = IMAGE_SHAPE,
                     init_std: float = WHITE_BOX_INIT_STD, batch_statistics: bool = False) -> Tensor:
    """Images whose activations through the known ``head`` match ``activations`` (rMLE, He et al. 2019).

    Minimises mean((head(x) - a)^2) + tv_weight * total_variation(x) with Adam from
    small seeded noise around the mean image (0 in normalised space). The head runs
    in eval mode, so every image is inverted independently, and is left unchanged.
    ``batch_statistics=True`` runs a copy of the head in train mode instead, so its
    normalisation uses the statistics of the batch being inverted, as the hospital's
    training forward did: the right model for activations of one training batch when
    the attacker lacks the head's running statistics (e.g. it only has the initial
    weights). Normalisation over the batch erases each channel's offset and the scale
    shared by the whole batch, so those come out arbitrary: rescale the result with
    ``match_batch_moments``. Returns the images in normalised space.
    """
    if batch_statistics:
        head = copy.deepcopy(head)  # train-mode forwards update running statistics: the caller's head keeps its own
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn((len(activations), *image_shape), generator=generator, dtype=activations.dtype)
    images = (init_std * start).to(activations.device).requires_grad_(True)
    target = activations.detach()
    optimizer = torch.optim.Adam([images], lr=lr)
    with _in_mode(head, training=batch_statistics):
        for _ in range(steps):
            loss = F.mse_loss(head(images), target) + tv_weight * total_variation(images)
            optimizer.zero_grad(set_to_none=True)
            _adam_step(optimizer, loss, [images])
    return images.detach()


def match_batch_moments(images: Tensor, mean: Tensor | float = 0.0, std: Tensor | float = 1.0) -> Tensor:
    """Shift and scale (N, C, H, W) images so that each channel has ``mean`` and ``std`` over the batch.

    Restores what normalisation over the batch erased from a batch-statistics
    inversion, given moments the attacker can know: 0 and 1 for normalised data, or
    those of public data passed through the same augmentation.
    """
    shape = (1, images.shape[1], 1, 1)
    mean = torch.as_tensor(mean, dtype=images.dtype).reshape(-1).expand(images.shape[1]).reshape(shape)
    std = torch.as_tensor(std, dtype=images.dtype).reshape(-1).expand(images.shape[1]).reshape(shape)
    centred = images - images.mean(dim=(0, 2, 3), keepdim=True)
    return centred / centred.std(dim=(0, 2, 3), keepdim=True).clamp_min(ACTIVATION_STD_FLOOR) * std + mean


# --------------------------------------------------------------------------- reporting
def leakage_report(original_images: Tensor, reconstructions: Tensor, activations: Tensor, dataset: str) -> dict:
    """Leakage of one batch: dependence of activations on images, and quality of reconstructions.

    ``dcor`` is ``distance_correlation`` (the NoPeek quantity; inflated by the
    dimension, see there), ``dcor_bias_corrected`` the R* that is ~0 under
    independence; ``psnr`` and ``ssim`` compare denormalised images clamped to [0, 1].
    """
    originals = denormalize(original_images.detach(), dataset).clamp(0, 1)
    recovered = denormalize(reconstructions.detach(), dataset).clamp(0, 1)
    return {
        "dcor": distance_correlation(original_images.detach(), activations.detach()).item(),
        "dcor_bias_corrected": bias_corrected_distance_correlation(original_images.detach(),
                                                                   activations.detach()).item(),
        "psnr": psnr(recovered, originals, data_range=1.0),
        "ssim": ssim(recovered, originals, data_range=1.0),
        "n": len(original_images),
    }

