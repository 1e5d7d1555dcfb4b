"""Image metrics on pixel scale: ``denormalize`` normalised images, then PSNR and SSIM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from splitrpc.data import NORMALIZATION
from splitrpc.errors import UserError

# PSNR of identical images is infinite; a finite cap keeps batch means and plots usable.
# 100 dB is far above any real reconstruction (8-bit quantisation alone limits PSNR to ~59 dB).
PSNR_CAP_DB = 100.0

# SSIM constants of Wang et al. (2004).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


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

