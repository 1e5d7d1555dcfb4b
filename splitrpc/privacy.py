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


# --------------------------------------------------------------------------- label leakage
# In U-shaped split learning the hospital keeps the loss, and the server receives, for every
# sample it sent up, the gradient of the loss with respect to that output. Li et al. (ICLR
# 2022, "Label Leakage and Protection in Two-party Split Learning") show that these
# gradients betray the labels: by their norm (a rare or badly fitted class gets large ones)
# and by their direction (gradients of samples of one class point the same way). The
# functions below take per-sample gradients as the server receives them, (N, ...) with one
# row per sample, and score, classify or cluster them; the defences are what a hospital
# can do to the gradients before they leave.

# Spherical k-means: Lloyd iterations on unit vectors, from k-means++ seeds.
KMEANS_ITERATIONS = 50
KMEANS_RESTARTS = 4
# A zero gradient has no direction; its normalised form stays 0 instead of NaN.
DIRECTION_NORM_FLOOR = 1e-30


def flatten_gradients(gradients: Tensor) -> Tensor:
    """(N, ...) per-sample gradients as an (N, D) float64 matrix."""
    if gradients.dim() < 2 or gradients.shape[0] == 0:
        raise UserError(f"expected per-sample gradients of shape (N, ...), got {tuple(gradients.shape)}")
    return gradients.detach().reshape(gradients.shape[0], -1).to(torch.float64)


def _unit_rows(matrix: Tensor) -> Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(DIRECTION_NORM_FLOOR)


def auc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives``, exactly.

    The Mann-Whitney statistic from ranks: the probability that a random positive
    scores above a random negative, ties counting one half (tied scores share the
    mean of their ranks). 1 separates perfectly, 0.5 is chance, 0 separates
    perfectly the other way round.
    """
    scores = scores.detach().reshape(-1).to(torch.float64)
    positives = positives.reshape(-1).to(torch.bool)
    if scores.shape != positives.shape:
        raise UserError(f"auc: {scores.numel()} scores for {positives.numel()} labels")
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"auc needs positives and negatives, got {n_pos} and {n_neg}")
    if not torch.isfinite(scores).all():
        raise UserError("auc: scores must be finite")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # Ranks 1..N in increasing order; tied scores all get the mean rank of their block.
    block_end = counts.cumsum(0).to(torch.float64)
    mean_rank = block_end - (counts.to(torch.float64) - 1) / 2
    rank_sum = mean_rank[inverse][positives].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def one_vs_rest_auc(scores: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """For each class c, the AUC of column c of ``scores`` (N, C) at telling class c from the rest.

    ``None`` for a class absent from ``labels`` (or the only one present).
    """
    if scores.shape != (len(labels), num_classes):
        raise UserError(f"one_vs_rest_auc: scores of shape {tuple(scores.shape)} for {len(labels)} labels "
                        f"and {num_classes} classes")
    result: list[float | None] = []
    for c in range(num_classes):
        positives = labels == c
        result.append(auc(scores[:, c], positives) if 0 < int(positives.sum()) < len(labels) else None)
    return result


def norm_scores(gradients: Tensor) -> Tensor:
    """Li et al.'s norm attack: each sample's gradient norm, read as 'more likely positive' when larger.

    In a binary task where the positive class is rare (or badly fitted), positives
    keep a low predicted probability, so |p - y| and with it the gradient norm is
    larger for them. It needs no known label at all.
    """
    return flatten_gradients(gradients).norm(dim=1)


def cosine_scores(gradients: Tensor, reference: Tensor) -> Tensor:
    """Li et al.'s direction attack: cosine similarity of each gradient to one known positive's gradient."""
    g = flatten_gradients(gradients)
    ref = flatten_gradients(reference.reshape(1, -1)).reshape(-1)
    if ref.numel() != g.shape[1]:
        raise UserError(f"cosine_scores: reference of {ref.numel()} values for gradients of {g.shape[1]}")
    return _unit_rows(g) @ (ref / ref.norm().clamp_min(DIRECTION_NORM_FLOOR))


def _check_known(n: int, known: Tensor, known_labels: Tensor, num_classes: int) -> None:
    if known.numel() != known_labels.numel():
        raise UserError(f"{known.numel()} known samples but {known_labels.numel()} known labels")
    if known.numel() == 0:
        raise UserError("the direction attack needs at least one sample whose label the server knows")
    if int(known.min()) < 0 or int(known.max()) >= n:
        raise UserError(f"known sample indices must lie in 0..{n - 1}")
    if int(known_labels.min()) < 0 or int(known_labels.max()) >= num_classes:
        raise UserError(f"known labels must lie in 0..{num_classes - 1}")


def class_direction_scores(gradients: Tensor, known: Tensor, known_labels: Tensor, num_classes: int,
                           rule: str = "mean") -> Tensor:
    """(N, C) similarity of each gradient to each class, from a few samples whose labels the server knows.

    ``rule="mean"``: cosine to the mean unit direction of the known gradients of the
    class; ``rule="nearest"``: the largest cosine to any known gradient of the class.
    A class without a known sample scores -inf (never chosen). Rows are the
    multi-class form of Li et al.'s cosine score; their argmax is the inferred label.
    """
    g = _unit_rows(flatten_gradients(gradients))
    known, known_labels = known.reshape(-1).long(), known_labels.reshape(-1).long()
    _check_known(len(g), known, known_labels, num_classes)
    scores = torch.full((len(g), num_classes), -math.inf, dtype=g.dtype)
    for c in range(num_classes):
        rows = known[known_labels == c]
        if len(rows) == 0:
            continue
        if rule == "mean":
            scores[:, c] = g @ _unit_rows(g[rows].mean(0, keepdim=True)).reshape(-1)
        elif rule == "nearest":
            scores[:, c] = (g @ g[rows].T).max(dim=1).values
        else:
            raise UserError(f"unknown direction rule {rule!r}: choose mean or nearest")
    return scores


def kmeans_directions(gradients: Tensor, clusters: int, seed: int = 0, iterations: int = KMEANS_ITERATIONS,
                      restarts: int = KMEANS_RESTARTS) -> Tensor:
    """Cluster index (N,) of each gradient by spherical k-means on the unit gradients; no label used.

    k-means++ seeding from a seeded generator; of ``restarts`` runs, the one with the
    largest total cosine to its centres is kept.
    """
    g = _unit_rows(flatten_gradients(gradients))
    n = len(g)
    if not 1 <= clusters <= n:
        raise UserError(f"cannot make {clusters} clusters of {n} gradients")
    generator = torch.Generator().manual_seed(seed)
    best, best_fit = None, -math.inf
    for _ in range(restarts):
        centres = g[torch.randint(n, (1,), generator=generator)]
        while len(centres) < clusters:
            distance = (2 - 2 * (g @ centres.T).max(dim=1).values).clamp_min(0)  # squared chord distance
            if distance.sum() <= 0:
                pick = torch.randint(n, (1,), generator=generator)
            else:
                pick = torch.multinomial(distance, 1, generator=generator)
            centres = torch.cat([centres, g[pick]])
        for _ in range(iterations):
            assign = (g @ centres.T).argmax(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, assign, g)
            empty = sums.norm(dim=1) == 0
            new = torch.where(empty[:, None], centres, _unit_rows(sums))  # an empty cluster keeps its centre
            if torch.equal(new, centres):
                break
            centres = new
        assign = (g @ centres.T).argmax(dim=1)
        fit = (g * centres[assign]).sum().item()
        if fit > best_fit:
            best, best_fit = assign, fit
    return best


def labels_from_known(assign: Tensor, known: Tensor, known_labels: Tensor, num_classes: int) -> Tensor:
    """Label each cluster by the majority of the known labels in it (what the attacker can do).

    A cluster with no known sample gets the label no better than a guess: the most
    common known label overall. Returns the inferred label (N,) of every sample.
    """
    known, known_labels = known.reshape(-1).long(), known_labels.reshape(-1).long()
    _check_known(len(assign), known, known_labels, num_classes)
    clusters = int(assign.max()) + 1
    votes = torch.zeros(clusters, num_classes, dtype=torch.long)
    votes.index_put_((assign[known], known_labels), torch.ones_like(known_labels), accumulate=True)
    fallback = int(torch.bincount(known_labels, minlength=num_classes).argmax())
    mapping = torch.where(votes.sum(1) > 0, votes.argmax(1), torch.full((clusters,), fallback))
    return mapping[assign]


def hungarian(cost: Tensor) -> list[int]:
    """Assignment minimising total cost for a square (n, n) matrix: ``result[row] = column``.

    The O(n^3) shortest augmenting path form of the Hungarian method (Kuhn-Munkres,
    with potentials); exact.
    """
    n = cost.shape[0]
    if cost.dim() != 2 or cost.shape[1] != n:
        raise UserError(f"hungarian needs a square cost matrix, got {tuple(cost.shape)}")
    a = cost.tolist()
    inf = math.inf
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match = [0] * (n + 1)  # match[column] = row, 1-based; 0 = free
    way = [0] * (n + 1)
    for row in range(1, n + 1):
        match[0] = row
        column = 0
        min_to = [inf] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[column] = True
            r, delta, next_column = match[column], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = a[r - 1][j - 1] - u[r] - v[j]
                    if reduced < min_to[j]:
                        min_to[j], way[j] = reduced, column
                    if min_to[j] < delta:
                        delta, next_column = min_to[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    min_to[j] -= delta
            column = next_column
            if match[column] == 0:
                break
        while column:
            previous = way[column]
            match[column] = match[previous]
            column = previous
    result = [0] * n
    for j in range(1, n + 1):
        result[match[j] - 1] = j - 1
    return result


def labels_by_hungarian(assign: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Label the clusters by the one-to-one matching that agrees most with the TRUE labels.

    An oracle: it reads every label, so the accuracy it gives is an upper bound on
    what any labelling of these clusters could reach, not an attack.
    """
    size = max(num_classes, int(assign.max()) + 1)
    agreement = torch.zeros(size, size, dtype=torch.float64)
    agreement.index_put_((assign.long(), labels.long()), torch.ones(len(labels), dtype=torch.float64),
                         accumulate=True)
    mapping = torch.tensor(hungarian(-agreement))
    return mapping[assign.long()]


def accuracy(predicted: Tensor, labels: Tensor) -> float:
    return (predicted.reshape(-1).long() == labels.reshape(-1).long()).double().mean().item()


# Defences, applied by the hospital to the gradients it returns.
def gaussian_noise_defence(gradients: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """Add isotropic Gaussian noise whose total norm is about ``ratio`` times the batch's largest gradient norm.

    Per coordinate std = ratio * max_i |g_i| / sqrt(D), as in Li et al.'s noise
    baseline, so ``ratio`` means the same thing at any cut and training stage.
    """
    if ratio < 0:
        raise UserError(f"noise ratio must be non-negative, got {ratio}")
    g = gradients.detach().reshape(gradients.shape[0], -1)
    std = ratio * g.norm(dim=1).max() / math.sqrt(g.shape[1])
    noise = torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device)
    return (g + std * noise).reshape(gradients.shape)


def max_norm_defence(gradients: Tensor, generator: torch.Generator) -> Tensor:
    """Li et al.'s "max norm" heuristic: g_i * (1 + sigma_i z_i), z_i ~ N(0, 1) one scalar per sample.

    sigma_i = sqrt(max_j |g_j|^2 / |g_i|^2 - 1), so every perturbed gradient has the
    same expected squared norm, the batch's largest; a gradient keeps its line (the
    sign may flip), which is why it targets the norm attack and not the direction one.
    """
    # float64: a float32 gradient that is exactly 0 (a sample the tail fits perfectly) would
    # make the ratio overflow to inf, and 0 * inf is NaN; in float64 it stays 0.
    g = gradients.detach().reshape(gradients.shape[0], -1).to(torch.float64)
    norms = g.norm(dim=1, keepdim=True)
    sigma = (norms.max() ** 2 / norms.clamp_min(DIRECTION_NORM_FLOOR) ** 2 - 1).clamp_min(0).sqrt()
    z = torch.randn((g.shape[0], 1), generator=generator, dtype=g.dtype).to(g.device)
    return (g * (1 + sigma * z)).to(gradients.dtype).reshape(gradients.shape)


def pick_known(labels: Tensor, per_class: int, num_classes: int, seed: int = 0) -> Tensor:
    """Indices of ``per_class`` samples of each class (fewer if a class has fewer): the labels the server knows."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        rows = (labels.reshape(-1) == c).nonzero().reshape(-1)
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def label_leakage_report(gradients: Tensor, labels: Tensor, num_classes: int, known_per_class: int = 5,
                         seed: int = 0) -> dict:
    """Every label attack on one set of received gradients, scored on the samples whose label the server does not know.

    ``known_per_class`` labelled samples per class (drawn with ``seed``) are the
    server's side knowledge for the direction attacks and for naming clusters.
    Reports label-inference accuracy (``chance`` is the most common class's share)
    and one-vs-rest leak AUC averaged over classes, and per class (with two classes
    the mean is 0.5 by symmetry: read the positive class's entry).
    ``cluster_hungarian_acc`` (clusters named one-to-one by Hungarian matching to the
    true labels: the usual clustering accuracy) and ``cluster_oracle_acc`` (each
    cluster named by the majority of its true labels: the best any naming of these
    clusters can do) read every label: bounds, not attacks.
    """
    labels = labels.reshape(-1).long()
    g = flatten_gradients(gradients)
    if len(g) != len(labels):
        raise UserError(f"{len(g)} gradients for {len(labels)} labels")
    known = pick_known(labels, known_per_class, num_classes, seed)
    unknown = torch.ones(len(labels), dtype=torch.bool)
    unknown[known] = False
    target = labels[unknown]
    norms = norm_scores(g)[unknown]
    norm_auc = one_vs_rest_auc(norms[:, None].expand(-1, num_classes), target, num_classes)
    mean_scores = class_direction_scores(g, known, labels[known], num_classes, "mean")
    nearest_scores = class_direction_scores(g, known, labels[known], num_classes, "nearest")
    # Li et al.'s cosine attack: one known positive's gradient per class as the reference.
    first_known = [known[labels[known] == c][:1] for c in range(num_classes)]
    cosine_auc = [auc(cosine_scores(g[unknown], g[rows[0]]), target == c)
                  if len(rows) and 0 < int((target == c).sum()) < len(target) else None
                  for c, rows in enumerate(first_known)]
    mean_auc = one_vs_rest_auc(mean_scores[unknown].clamp_min(-2), target, num_classes)
    clusters = kmeans_directions(g, num_classes, seed=seed)
    return {
        "samples": int(unknown.sum()), "known_labels": len(known), "gradient_dim": g.shape[1],
        "chance": torch.bincount(target, minlength=num_classes).max().item() / len(target),
        "norm_auc": _mean_defined(norm_auc), "norm_auc_per_class": norm_auc,
        "cosine_auc": _mean_defined(cosine_auc), "cosine_auc_min": min((v for v in cosine_auc if v is not None), default=None),
        "cosine_auc_per_class": cosine_auc,
        "direction_mean_auc": _mean_defined(mean_auc),
        "direction_mean_acc": accuracy(mean_scores[unknown].argmax(1), target),
        "direction_nearest_acc": accuracy(nearest_scores[unknown].argmax(1), target),
        "cluster_known_acc": accuracy(labels_from_known(clusters, known, labels[known], num_classes)[unknown], target),
        "cluster_hungarian_acc": accuracy(labels_by_hungarian(clusters, labels, num_classes)[unknown], target),
        "cluster_oracle_acc": accuracy(labels_from_known(clusters, torch.arange(len(labels)), labels,
                                                         num_classes)[unknown], target),
    }
