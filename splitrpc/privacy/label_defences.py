"""What a U-shaped hospital can do so that the gradients it returns betray less of its labels.

In U-shaped split learning (``--labels hospital``) the hospital's tail computes the loss and
returns, per sample, the gradient of that loss with respect to the trunk's output; the attacks
of ``splitrpc.privacy.label_leakage`` read labels from those gradients. Each defence here has one
strength knob (``--label-defence-strength``):

* ``noise``: isotropic Gaussian noise, ``strength`` times the batch's largest gradient norm in
  total (Li et al.'s noise baseline);
* ``max_norm``: Li et al.'s heuristic, every gradient scaled to the batch's largest expected
  norm (no knob: ``strength`` must stay at its default);
* ``marvell``: Marvell's optimized noise (Li et al., ICLR 2022), extended to K classes (below);
  ``strength`` is their power scale: noise power = strength x the spread of the class means;
* ``rr``: label differential privacy by randomized response at the tail: each training record's
  label is replaced once, for the whole run, by ``randomized_response`` at epsilon = ``strength``;
  the tail trains on those labels, so the gradients carry them, not the true ones;
* ``mixup``: the tail trains on mixtures of pairs of trunk outputs and their labels (Zhang et
  al. 2018, applied at the cut as in MALM and mixup-based label defences), mixing weight drawn
  from Beta(strength, strength): each returned gradient is a blend of two samples' gradients.

Everything random is drawn from a generator the caller seeds by (run seed, hospital, epoch,
batch), so that a retried or resumed step draws the same.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from splitrpc.privacy.label_leakage import gaussian_noise_defence, max_norm_defence



def check(defence: str, strength: float, strength_given: bool) -> None:
    """One line (UserError) for a setting no run should start with (the name itself is checked by the
    config, against ``splitrpc.config.LABEL_DEFENCES``)."""
    from splitrpc.errors import UserError

    if not math.isfinite(strength) or strength < 0:
        raise UserError(f"--label-defence-strength must be a non-negative number, got {strength}")
    if defence == "none" and strength_given:
        raise UserError("--label-defence-strength needs a --label-defence")
    if defence == "max_norm" and strength_given:
        raise UserError("--label-defence max_norm has no strength: leave --label-defence-strength out")
    if defence in ("rr", "mixup") and strength == 0:
        raise UserError(f"--label-defence {defence} needs a positive strength "
                        f"({'epsilon' if defence == 'rr' else 'the Beta parameter alpha'}), got 0")


def class_spread_noise(gradients: Tensor, labels: Tensor, scale: float, generator: torch.Generator) -> Tensor:
    """Marvell's noise, for any number of classes.

    Marvell (Li et al. 2022, reference implementation ``KL_gradient_perturb``) is defined for two
    classes: it adds Gaussian noise along ``g1 - g0`` (the difference of the classes' mean
    gradients in the batch) and spherical noise, with the four variances that minimise the
    symmetric KL divergence between the two classes' perturbed distributions under a power
    budget ``P = scale * |g1 - g0|^2``. With the classes' own spread ignored (their ``uv_choice
    ="zero"``) and balanced classes (p = 1/2), their solver gives both classes the same noise,
    all of it along ``g1 - g0``, of variance P.

    The K-class extension keeps that solution's form: every sample gets the same Gaussian noise
    in the span of the class-mean differences, with covariance ``scale`` x the between-class
    scatter ``sum_c p_c (m_c - m)(m_c - m)^T`` (m_c the batch's mean gradient of class c, p_c
    its share, m the batch mean). Its power, ``scale * sum_c p_c |m_c - m|^2``, is for two
    balanced classes ``scale * |g1 - g0|^2 / 4``; the noise blurs exactly the directions along
    which the classes' mean gradients differ. What it does not do, and Marvell's solver does,
    is shape unequal noise for unequal class variances: a simplification, stated in
    docs/privacy.md. The labels are the hospital's own; nothing about them leaves but the
    perturbed gradients.
    """
    g = gradients.detach().reshape(gradients.shape[0], -1).to(torch.float64)
    labels = labels.reshape(-1).long()
    mean = g.mean(0)
    noise = torch.zeros_like(g)
    for c in labels.unique():
        rows = labels == c
        share = rows.double().mean()
        direction = g[rows].mean(0) - mean
        # One independent N(0, 1) coefficient per sample and class: sum_c sqrt(p_c) d_c xi_c has
        # covariance sum_c p_c d_c d_c^T.
        xi = torch.randn((len(g), 1), generator=generator, dtype=g.dtype)
        noise += xi * (share.sqrt() * direction)
    return (g + math.sqrt(scale) * noise).to(gradients.dtype).reshape(gradients.shape)


def defend_gradients(defence: str, strength: float, gradients: Tensor, labels: Tensor,
                     generator: torch.Generator) -> Tensor:
    """The gradient a hospital returns under ``defence`` (``rr`` and ``mixup`` act before the loss)."""
    if defence == "noise":
        return gaussian_noise_defence(gradients, strength, generator)
    if defence == "max_norm":
        return max_norm_defence(gradients, generator)
    if defence == "marvell":
        return class_spread_noise(gradients, labels, strength, generator)
    return gradients


def keep_probability(epsilon: float, num_classes: int) -> float:
    """Randomized response's chance of keeping the true label: e^eps / (e^eps + K - 1)."""
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def randomized_response(labels: Tensor, epsilon: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """epsilon-label-DP randomized response (Warner 1965; Ghazi et al. 2021's RR baseline).

    Each label is kept with probability e^eps / (e^eps + K - 1) and otherwise replaced by one of
    the other K - 1 classes, uniformly: for any two labels, the probability of any output differs
    by at most e^eps. Applied once per record, it costs eps for the whole run; redrawn every
    epoch, the run would compose it epochs times.
    """
    labels = labels.reshape(-1).long()
    keep = torch.rand(len(labels), generator=generator, dtype=torch.float64) < keep_probability(epsilon, num_classes)
    shift = torch.randint(1, num_classes, (len(labels),), generator=generator)
    return torch.where(keep, labels, (labels + shift) % num_classes)


def mixup_loss(tail: torch.nn.Module, output: Tensor, labels: Tensor, alpha: float,
               generator: torch.Generator) -> Tensor:
    """Cross-entropy of the tail on mixtures of the batch's trunk outputs and of their labels.

    One weight lam ~ Beta(alpha, alpha) per batch and a random pairing, as Zhang et al.; the loss
    ``lam CE(tail(x_mix), y) + (1 - lam) CE(tail(x_mix), y[perm])``. The gradient a sample
    receives then mixes its own with its partner's, so its direction no longer names one class.
    Small alpha: lam near 0 or 1, little mixing; alpha = 1: lam uniform.
    """
    # torch's Beta takes no generator: numpy's, seeded from ours, so the draw follows the step's seed.
    lam = float(np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(len(labels), generator=generator).to(labels.device)
    mixed = lam * output + (1 - lam) * output[perm]
    logits = tail(mixed)
    labels = labels.long()
    return lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])

