"""What the server can learn about hospital images from the L1 activations it receives.

Split learning keeps raw images at the hospitals, but the server sees the head's
activations, and an activation one convolution away from the image can carry most
of it. This module measures that leakage in two ways:

* statistically, with the distance correlation between images and activations
  (Székely, Rizzo & Bakirov, 2007): the quantity NoPeek (Vepakomma et al., 2019)
  penalises during training, so it doubles as a differentiable penalty, and its
  bias-corrected form (Székely & Rizzo, 2013), which stays near 0 for independent
  samples however many dimensions they have;
* by reconstruction, scored with PSNR and SSIM on pixel scale:
  - the query-free model-inversion attack of He, Zhang & Lee (ACSAC 2019), by an
    honest-but-curious server that does not know the head's weights: it trains a
    surrogate head through its own frozen trunk on public labelled data, so the
    surrogate emits activations where the trunk expects them, then trains a decoder
    from surrogate activations back to images (cf. feature-space hijacking,
    Pasquini et al., CCS 2021);
  - white-box inversion (regularised maximum likelihood, "rMLE", He et al. 2019),
    an upper bound for a server that knows the head's weights.

Images here are normalised float tensors (N, 3, H, W) as produced by
``splitrpc.data``; ``denormalize`` maps them back to [0, 1] for the image metrics.
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

from splitrpc.data import IMAGE_SIZE, NORMALIZATION
from splitrpc.errors import UserError

IMAGE_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)

# PSNR of identical images is infinite; a finite cap keeps batch means and plots usable.
# 100 dB is far above any real reconstruction (8-bit quantisation alone limits PSNR to ~59 dB).
PSNR_CAP_DB = 100.0

# SSIM constants of Wang et al. (2004).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

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

# Below this, a squared distance correlation counts as zero; keeps sqrt's gradient finite.
DCOR_FLOOR = 1e-30


# --------------------------------------------------------------------------- distance correlation
def _double_centred_distances(samples: Tensor) -> Tensor:
    flat = samples.reshape(samples.shape[0], -1).to(torch.float64)
    # The direct kernel, not the Gram-matrix shortcut: the shortcut loses precision on
    # near-duplicate rows, and the direct one has a zero (not NaN) gradient at distance 0.
    distances = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    return distances - distances.mean(0, keepdim=True) - distances.mean(1, keepdim=True) + distances.mean()


def _check_paired(x: Tensor, y: Tensor, minimum: int) -> None:
    n = x.shape[0]
    if y.shape[0] != n:
        raise UserError(f"distance correlation needs paired samples, got {n} and {y.shape[0]}")
    if n < minimum:
        raise UserError(f"distance correlation needs at least {minimum} samples, got {n}")


def distance_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Sample distance correlation in [0, 1] between paired samples x (n, ...) and y (n, ...).

    The biased (V-statistic) estimator with double-centred distance matrices, as in
    NoPeek: dCor^2 = dCov^2(x, y) / sqrt(dVar^2(x) dVar^2(y)). It is 1 when y is a
    similarity transform of x (scaled, shifted, rotated) and 0 here when either
    sample is constant. For independent samples it tends to 0 only as n grows with
    the dimension fixed: at n = 200, independent Gaussians give about 0.12 in one
    dimension, 0.49 in 16 and 0.97 in 768 (Székely & Rizzo, 2013). So on images and
    activations its absolute value overstates dependence; compare it with a
    baseline, or read ``bias_corrected_distance_correlation``. Computed in float64
    and differentiable; the result has the inputs' (promoted) dtype.
    """
    _check_paired(x, y, minimum=2)
    a, b = _double_centred_distances(x), _double_centred_distances(y)
    dcov2 = (a * b).mean()
    variance_product = (a * a).mean() * (b * b).mean()
    has_variance = variance_product > 0
    # The clamps keep both branches of the where finite, so its gradient is too.
    dcor2 = dcov2 / variance_product.clamp_min(DCOR_FLOOR).sqrt()
    dcor = dcor2.clamp(DCOR_FLOOR, 1.0).sqrt()
    dcor = torch.where(has_variance, dcor, torch.zeros_like(dcor))
    return dcor.to(torch.promote_types(x.dtype, y.dtype))


def _u_centred_distances(samples: Tensor) -> Tensor:
    flat = samples.reshape(samples.shape[0], -1).to(torch.float64)
    n = flat.shape[0]
    distances = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    centred = (distances - distances.sum(0, keepdim=True) / (n - 2) - distances.sum(1, keepdim=True) / (n - 2)
               + distances.sum() / ((n - 1) * (n - 2)))
    return centred * (1 - torch.eye(n, dtype=centred.dtype, device=centred.device))  # zero diagonal by definition


def bias_corrected_distance_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Bias-corrected squared distance correlation R* of Székely & Rizzo (2013), in [-1, 1].

    Built from U-centred distance matrices, whose inner product is an unbiased
    estimator of dCov^2, so for independent samples it is centred on 0 in any
    dimension (spread about sqrt(2) / n), unlike ``distance_correlation``. It can be
    negative, so it is not square-rooted: 1 for similarity transforms, ~0 for
    independence. Needs n >= 4; 0 when a sample is constant.
    """
    _check_paired(x, y, minimum=4)
    a, b = _u_centred_distances(x), _u_centred_distances(y)
    # The 1 / (n (n - 3)) of the unbiased inner product cancels in the ratio.
    variance_product = (a * a).sum() * (b * b).sum()
    has_variance = variance_product > 0
    r_star = (a * b).sum() / variance_product.clamp_min(DCOR_FLOOR).sqrt()
    r_star = torch.where(has_variance, r_star, torch.zeros_like(r_star))
    return r_star.to(torch.promote_types(x.dtype, y.dtype))


# --------------------------------------------------------------------------- image metrics
def denormalize(images: Tensor, dataset: str) -> Tensor:
    """Normalised images back to pixel scale ([0, 1] for real images; not clamped)."""
    if dataset not in NORMALIZATION:
        raise UserError(f"unknown dataset {dataset!r} for denormalisation: choose from {', '.join(NORMALIZATION)}")
    mean, std = NORMALIZATION[dataset]
    shape = (1, len(mean), 1, 1)
    return images * torch.tensor(std, dtype=images.dtype, device=images.device).view(shape) \
        + torch.tensor(mean, dtype=images.dtype, device=images.device).view(shape)


def _check_pair(reconstructed: Tensor, original: Tensor, what: str) -> None:
    if reconstructed.shape != original.shape:
        raise UserError(f"{what}: reconstructed {tuple(reconstructed.shape)} and original "
                        f"{tuple(original.shape)} differ in shape")
    if reconstructed.dim() < 2 or reconstructed.shape[0] == 0:
        raise UserError(f"{what}: expected a non-empty batch of images, got shape {tuple(reconstructed.shape)}")


def psnr(reconstructed: Tensor, original: Tensor, data_range: float) -> float:
    """Mean over the batch of per-image PSNR in dB, each capped at ``PSNR_CAP_DB`` (so equal images give 100)."""
    _check_pair(reconstructed, original, "psnr")
    diff = reconstructed.detach().to(torch.float64) - original.detach().to(torch.float64)
    mse = diff.flatten(1).pow(2).mean(1)
    per_image = 10 * torch.log10(data_range ** 2 / mse)  # +inf where mse == 0
    return per_image.clamp(max=PSNR_CAP_DB).mean().item()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """A normalised (size x size) Gaussian in float64."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    window = line[:, None] * line[None, :]
    return window / window.sum()


def ssim(reconstructed: Tensor, original: Tensor, data_range: float) -> float:
    """Mean SSIM (Wang et al., 2004) of (N, C, H, W) images, per channel.

    Gaussian 11x11 window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (not
    sample) covariances and only windows that fit inside the image: the definition
    of skimage's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False)``.
    """
    _check_pair(reconstructed, original, "ssim")
    if reconstructed.dim() != 4:
        raise UserError(f"ssim: expected (N, C, H, W) images, got shape {tuple(reconstructed.shape)}")
    if min(reconstructed.shape[-2:]) < SSIM_WINDOW:
        raise UserError(f"ssim: images of {tuple(reconstructed.shape[-2:])} are smaller than the "
                        f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
    x = reconstructed.detach().to(torch.float64)
    y = original.detach().to(torch.float64)
    channels = x.shape[1]
    window = gaussian_window().to(x.device).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)

    def local_mean(t: Tensor) -> Tensor:  # one window per channel: a depthwise "valid" convolution
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean().item()


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
                     init_std: float = WHITE_BOX_INIT_STD) -> Tensor:
    """Images whose activations through the known ``head`` match ``activations`` (rMLE, He et al. 2019).

    Minimises mean((head(x) - a)^2) + tv_weight * total_variation(x) with Adam from
    small seeded noise around the mean image (0 in normalised space). The head runs
    in eval mode, so every image is inverted independently, and is left unchanged.
    Returns the images in normalised space.
    """
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn((len(activations), *image_shape), generator=generator, dtype=activations.dtype)
    images = (init_std * start).to(activations.device).requires_grad_(True)
    target = activations.detach()
    optimizer = torch.optim.Adam([images], lr=lr)
    with _in_mode(head, training=False):
        for _ in range(steps):
            loss = F.mse_loss(head(images), target) + tv_weight * total_variation(images)
            optimizer.zero_grad(set_to_none=True)
            _adam_step(optimizer, loss, [images])
    return images.detach()


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
