"""Distance correlation between paired samples: how much activations depend on images.

The biased (V-statistic) estimator is the quantity NoPeek (Vepakomma et al.,
2019) penalises during training, so it doubles as a differentiable penalty; the
bias-corrected form of Székely & Rizzo (2013) stays near 0 for independent
samples however many dimensions they have.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splitrpc.errors import UserError

# Below this, a squared distance correlation counts as zero; keeps sqrt's gradient finite.
DCOR_FLOOR = 1e-30


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

