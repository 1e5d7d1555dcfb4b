"""Leakage metrics and reconstruction attacks on tiny synthetic images (CPU, seconds)."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from splitrpc.privacy import dcor, image_metrics, inversion
from splitrpc.data import NORMALIZATION, Normalizer
from splitrpc.errors import UserError
from splitrpc.models import build_model, split_model

DATASET = "synthetic"  # normalisation of the synthetic set: mean 0.5, std 0.25 per channel
SIZE = 16  # image side for the attack tests; 32 only where a real CIFAR head is inverted
CLASSES = 3

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def smooth_images(n: int, seed: int, size: int = SIZE, low: int = 4) -> torch.Tensor:
    """Normalised images whose pixels are bilinear upsamplings of random low x low colour grids."""
    generator = torch.Generator().manual_seed(seed)
    pixels = F.interpolate(torch.rand(n, 3, low, low, generator=generator), size=(size, size),
                           mode="bilinear", align_corners=False)
    mean, std = NORMALIZATION[DATASET]
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def dominant_colour(images: torch.Tensor) -> torch.Tensor:
    """A learnable label: which colour channel is brightest on average."""
    return images.mean(dim=(2, 3)).argmax(1)


def pixels(images: torch.Tensor) -> torch.Tensor:
    return image_metrics.denormalize(images, DATASET).clamp(0, 1)


def pixel_psnr(reconstructed, original) -> float:
    return image_metrics.psnr(pixels(reconstructed), pixels(original), data_range=1.0)


def pixel_ssim(reconstructed, original) -> float:
    return image_metrics.ssim(pixels(reconstructed), pixels(original), data_range=1.0)




@pytest.fixture(scope="module")
def aux():
    return smooth_images(512, seed=1)


@pytest.fixture(scope="module")
def held_out():
    return smooth_images(128, seed=2)


# --------------------------------------------------------------------------- distance correlation
def reference_dcor_squared(x: np.ndarray, y: np.ndarray) -> float:
    """dCor^2 straight from the definition of Székely, Rizzo & Bakirov (2007), with loops."""
    n = len(x)

    def centred(s):
        d = np.array([[np.linalg.norm(s[i] - s[j]) for j in range(n)] for i in range(n)])
        return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()

    a, b = centred(x.reshape(n, -1)), centred(y.reshape(n, -1))
    return (a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean())


def reference_r_star(x: np.ndarray, y: np.ndarray) -> float:
    """Bias-corrected R* of Székely & Rizzo (2013, 2014) from the U-centring definition, with loops."""
    n = len(x)

    def u_centred(s):
        d = np.array([[np.linalg.norm(s[i] - s[j]) for j in range(n)] for i in range(n)])
        out = np.zeros_like(d)
        for i in range(n):
            for j in range(n):
                if i != j:
                    out[i, j] = d[i, j] - d[i].sum() / (n - 2) - d[:, j].sum() / (n - 2) + d.sum() / ((n - 1) * (n - 2))
        return out

    a, b = u_centred(x.reshape(n, -1)), u_centred(y.reshape(n, -1))
    inner = lambda p, q: (p * q).sum() / (n * (n - 3))
    return inner(a, b) / np.sqrt(inner(a, a) * inner(b, b))


def test_dcor_matches_definition():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, 3, generator=generator, dtype=torch.float64)
    y = x.flatten(1)[:, :4] ** 2 + 0.5 * torch.randn(12, 4, generator=generator, dtype=torch.float64)
    expected = reference_dcor_squared(x.numpy(), y.numpy())
    assert 0.3 < expected < 0.99  # a genuinely partial dependence
    assert dcor.distance_correlation(x, y).item() ** 2 == pytest.approx(expected, abs=1e-12)
    r_star = dcor.bias_corrected_distance_correlation(x, y).item()
    assert r_star == pytest.approx(reference_r_star(x.numpy(), y.numpy()), abs=1e-12)


def test_dcor_is_one_for_identical_and_similar_samples():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=generator)
    flat = x.flatten(1).double()
    rotation, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64))
    similar = {
        "identical": x,
        "scaled and shifted": -3.5 * x + 2.0,
        "rotated, scaled and shifted": (0.2 * flat @ rotation + 7.0).float(),
    }
    for name, y in similar.items():
        assert dcor.distance_correlation(x, y).item() == pytest.approx(1.0, abs=1e-6), name
        assert dcor.bias_corrected_distance_correlation(x, y).item() == pytest.approx(1.0, abs=1e-6), name


def test_dcor_of_independent_samples():
    # Low-dimensional: the V-statistic is near 0 (0.08-0.16 over 30 seeds at n = 200, d = 1).
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 1, generator=generator), torch.randn(200, 1, generator=generator)
    assert dcor.distance_correlation(x, y).item() < 0.2
    # High-dimensional (images, activations): the V-statistic is inflated towards 1 even
    # though x and y are independent; the bias-corrected R* stays near 0 (spread ~0.007).
    x, y = torch.randn(200, 3, 16, 16, generator=generator), torch.randn(200, 8, 8, 8, generator=generator)
    assert dcor.distance_correlation(x, y).item() > 0.9
    assert abs(dcor.bias_corrected_distance_correlation(x, y).item()) < 0.03


def test_dcor_sees_nonlinear_dependence_that_correlation_misses():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, generator=generator, dtype=torch.float64) * 2 - 1
    y = x ** 2
    pearson = torch.corrcoef(torch.cat([x, y], 1).T)[0, 1].item()
    assert abs(pearson) < 0.15
    assert dcor.distance_correlation(x, y).item() > 0.45  # population value ~0.5
    assert dcor.bias_corrected_distance_correlation(x, y).item() > 0.2  # ~dCor^2


def test_dcor_gradient_flows_in_float32():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, 8, 8, generator=generator)
    layer = nn.Conv2d(3, 4, 3)
    # Duplicate rows have distance 0, where a naive sqrt would give NaN gradients.
    batch = torch.cat([images, images[:4]])
    corr = dcor.distance_correlation(batch, layer(batch))
    assert corr.dtype == torch.float32 and 0 < corr.item() <= 1
    corr.backward()
    grad = layer.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_dcor_of_constant_sample_is_zero_with_finite_gradient():
    x = torch.randn(10, 5)
    y = torch.ones(10, 3, requires_grad=True)
    corr = dcor.distance_correlation(x, y)
    assert corr.item() == 0.0
    corr.backward()
    assert torch.isfinite(y.grad).all()
    assert dcor.bias_corrected_distance_correlation(x, y.detach()).item() == 0.0


def test_dcor_rejects_unpaired_or_too_few_samples():
    with pytest.raises(UserError, match="paired"):
        dcor.distance_correlation(torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(UserError, match="at least 2"):
        dcor.distance_correlation(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(UserError, match="at least 4"):
        dcor.bias_corrected_distance_correlation(torch.zeros(3, 2), torch.zeros(3, 2))


# --------------------------------------------------------------------------- image metrics
def test_denormalize_inverts_the_data_pipeline():
    raw = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    normalised = Normalizer(SimpleNamespace(dataset="cifar10", dtype="float32"))(raw)
    assert torch.allclose(image_metrics.denormalize(normalised, "cifar10"), raw.float() / 255, atol=1e-6)
    with pytest.raises(UserError, match="unknown dataset"):
        image_metrics.denormalize(normalised, "mnist")


def test_psnr_known_values():
    x = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    assert image_metrics.psnr(x, x, data_range=1.0) == image_metrics.PSNR_CAP_DB == 100.0
    # Per-image PSNR is averaged: offsets of 0.1 and 0.01 give 20 dB and 40 dB.
    offset = torch.tensor([0.1, 0.01], dtype=torch.float64).view(2, 1, 1, 1)
    assert image_metrics.psnr(x + offset, x, data_range=1.0) == pytest.approx(30.0, abs=1e-9)
    assert image_metrics.psnr((x + offset) * 255, x * 255, data_range=255.0) == pytest.approx(30.0, abs=1e-9)
    with pytest.raises(UserError, match="differ in shape"):
        image_metrics.psnr(x, x[:1], data_range=1.0)


def reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """SSIM of Wang et al. (2004) window by window: Gaussian weights, population statistics, mean of the map."""
    radius, sigma = 5, 1.5
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma ** 2))
    weights /= weights.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    n, channels, height, width = x.shape
    for i in range(n):
        for c in range(channels):
            for top in range(height - 2 * radius):
                for left in range(width - 2 * radius):
                    px = x[i, c, top:top + 2 * radius + 1, left:left + 2 * radius + 1]
                    py = y[i, c, top:top + 2 * radius + 1, left:left + 2 * radius + 1]
                    mx, my = (weights * px).sum(), (weights * py).sum()
                    vx, vy = (weights * (px - mx) ** 2).sum(), (weights * (py - my) ** 2).sum()
                    cxy = (weights * (px - mx) * (py - my)).sum()
                    values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_windowed_reference():
    generator = torch.Generator().manual_seed(0)
    original = torch.rand(2, 3, 14, 15, generator=generator, dtype=torch.float64)
    cases = {
        "noisy": (original + 0.1 * torch.randn(original.shape, generator=generator, dtype=torch.float64)).clamp(0, 1),
        "darker": 0.7 * original,
        "unrelated": torch.rand(original.shape, generator=generator, dtype=torch.float64),
    }
    for name, reconstructed in cases.items():
        expected = reference_ssim(reconstructed.numpy(), original.numpy(), data_range=1.0)
        assert image_metrics.ssim(reconstructed, original, data_range=1.0) == pytest.approx(expected, abs=1e-10), name
    # data_range enters only through C1 and C2: rescaling images and range together changes nothing.
    noisy = cases["noisy"]
    assert image_metrics.ssim(noisy * 255, original * 255, data_range=255.0) == pytest.approx(
        image_metrics.ssim(noisy, original, data_range=1.0), abs=1e-10)


def test_ssim_basic_facts():
    original = pixels(smooth_images(4, seed=0, size=32))
    assert image_metrics.ssim(original, original, data_range=1.0) == pytest.approx(1.0, abs=1e-12)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(original.shape, generator=generator)
    scores = [image_metrics.ssim((original + level * noise).clamp(0, 1), original, data_range=1.0)
              for level in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] > 0.9 and scores[-1] < 0.3, scores
    with pytest.raises(UserError, match="smaller than"):
        image_metrics.ssim(original[..., :10, :10], original[..., :10, :10], data_range=1.0)


# --------------------------------------------------------------------------- decoder attack
def identity_head() -> nn.Module:
    head = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    return head


def test_decoder_inverts_an_identity_head(aux, held_out):
    head = identity_head()
    decoder = inversion.train_decoder(head, aux, steps=200, lr=3e-3, batch_size=32, hidden_channels=16)
    with torch.no_grad():
        reconstructed = inversion.reconstruct(decoder, head(held_out))
    assert reconstructed.shape == held_out.shape
    assert pixel_psnr(reconstructed, held_out) > 27  # measured 31.4 dB
    assert pixel_ssim(reconstructed, held_out) > 0.95  # measured 0.989


def test_decoder_learns_nothing_from_noise_activations(aux, held_out):
    generator = torch.Generator().manual_seed(5)

    def noise_head(images):  # activations independent of the images
        return torch.randn(len(images), 8, SIZE, SIZE, generator=generator)

    decoder = inversion.train_decoder(noise_head, aux, steps=200, lr=3e-3, batch_size=32, hidden_channels=16)
    reconstructed = inversion.reconstruct(decoder, noise_head(held_out))
    mean_image = aux.mean(0, keepdim=True).expand_as(held_out)
    baseline = pixel_psnr(mean_image, held_out)  # measured 13.35 dB
    assert pixel_psnr(reconstructed, held_out) < min(15.0, baseline + 0.5)  # measured 13.3 dB
    assert pixel_ssim(reconstructed, held_out) < 0.15  # measured 0.073; the mean image scores 0.074


def test_decoder_upsamples_deeper_cuts(aux):
    torch.manual_seed(0)
    head, _ = split_model(build_model("resnet20", width=0.25), 8)  # after the first stride-2 group: 1/4 of the side
    head.eval()
    with torch.no_grad():
        activations = head(aux[:4])
    assert activations.shape[-2:] == (SIZE // 4, SIZE // 4)
    before = copy.deepcopy(head.state_dict())
    head.train()
    decoder = inversion.train_decoder(head, aux[:64], steps=2, batch_size=16)
    assert head.training  # the head's mode is restored after eval-mode use
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # BN statistics untouched
    assert inversion.reconstruct(decoder, activations).shape == (4, 3, SIZE, SIZE)
    with pytest.raises(UserError, match="power-of-two"):
        inversion.Decoder((4, 5, 5), (3, SIZE, SIZE), torch.zeros(4), torch.ones(4))


# --------------------------------------------------------------------------- white-box inversion
def test_white_box_inversion_through_a_real_first_layer():
    torch.manual_seed(0)
    head, _ = split_model(build_model("resnet20", width=0.5), 1)  # conv 3->8, BatchNorm, ReLU
    head.eval()
    images = smooth_images(4, seed=3, size=32, low=8)
    with torch.no_grad():
        activations = head(images)
    before = copy.deepcopy(head.state_dict())
    head.train()
    recovered = inversion.invert_white_box(head, activations, steps=200, lr=0.05, tv_weight=0.01)
    assert head.training and all(p.grad is None for p in head.parameters())
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    mean_image = torch.zeros_like(images)  # the data set's mean is 0 in normalised space
    baseline = pixel_psnr(mean_image, images)  # measured 13.9 dB
    assert pixel_psnr(recovered, images) > baseline + 15  # measured 36.8 dB
    assert pixel_ssim(recovered, images) > 0.95  # measured 0.99


# --------------------------------------------------------------------------- surrogate head and full attack
def tiny_head() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())


@pytest.fixture(scope="module")
def trained_split():
    """(real head, trunk) trained together on the hospitals' data, as after split learning."""
    torch.manual_seed(0)
    head = tiny_head()
    trunk = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))
    images = smooth_images(512, seed=0)
    labels = dominant_colour(images)
    optimizer = torch.optim.Adam([*head.parameters(), *trunk.parameters()], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        rows = torch.randint(0, len(images), (64,), generator=generator)
        loss = F.cross_entropy(trunk(head(images[rows])), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return head.eval(), trunk.train()


def accuracy(head, trunk, images) -> float:
    training = trunk.training
    with torch.no_grad():
        correct = (trunk.eval()(head(images)).argmax(1) == dominant_colour(images)).float().mean().item()
    trunk.train(training)
    return correct


def test_surrogate_head_fits_the_frozen_trunk(trained_split, aux, held_out):
    real_head, trunk = trained_split
    assert accuracy(real_head, trunk, held_out) > 0.8  # measured 0.875: the split model learnt the task
    torch.manual_seed(1)
    template = tiny_head()  # the server knows the architecture, not the weights
    template_accuracy = accuracy(template, trunk, held_out)
    trunk_before = copy.deepcopy(trunk.state_dict())
    template_before = copy.deepcopy(template.state_dict())

    surrogate = inversion.train_surrogate_head(trunk, template, aux, dominant_colour(aux), steps=100, lr=1e-2,
                                             batch_size=64)

    surrogate_accuracy = accuracy(surrogate, trunk, held_out)
    assert template_accuracy < 0.5  # measured 0.36; chance is 1/3
    assert surrogate_accuracy > 0.85  # measured 0.93
    # The trunk is frozen: parameters, BatchNorm statistics, gradients and mode unchanged.
    assert all(torch.equal(trunk_before[k], v) for k, v in trunk.state_dict().items())
    assert all(p.grad is None for p in trunk.parameters())
    assert trunk.training
    assert all(torch.equal(template_before[k], v) for k, v in template.state_dict().items())
    assert not surrogate.training


def test_attack_end_to_end(trained_split, aux, held_out):
    real_head, trunk = trained_split
    torch.manual_seed(1)
    with torch.no_grad():
        received = real_head(held_out)
    reconstructed = inversion.attack(trunk, tiny_head(), aux, dominant_colour(aux), received,
                                   surrogate_steps=50, decoder_steps=50, surrogate_lr=1e-2, decoder_lr=3e-3,
                                   batch_size=32)
    assert reconstructed.shape == held_out.shape and torch.isfinite(reconstructed).all()
    report = inversion.leakage_report(held_out, reconstructed, received, DATASET)
    assert set(report) == {"dcor", "dcor_bias_corrected", "psnr", "ssim", "n"} and report["n"] == len(held_out)
    assert 0 < report["dcor"] <= 1 and -1 <= report["ssim"] <= 1
    # The black-box attack recovers structure that guessing the mean image cannot.
    mean_image = aux.mean(0, keepdim=True).expand_as(held_out)
    assert pixel_ssim(mean_image, held_out) < 0.1  # measured 0.074
    assert pixel_ssim(reconstructed, held_out) > 0.25  # measured 0.40


def test_leakage_report_of_a_perfect_reconstruction(held_out):
    report = inversion.leakage_report(held_out, held_out, 2 * held_out + 1, DATASET)
    assert report["dcor"] == pytest.approx(1.0, abs=1e-6)
    assert report["dcor_bias_corrected"] == pytest.approx(1.0, abs=1e-6)
    assert report["psnr"] == 100.0 and report["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert report["n"] == len(held_out)


def test_a_top_k_head_sends_what_the_codec_sends_and_passes_gradients():
    """bench.privacy's attacker on a --codec topk run sees activations as sparse as it received: per sample
    the k largest values by magnitude, at their places (what the codec decodes to), zeros elsewhere."""
    from bench.privacy import TopK
    from splitrpc.codec import TopK as TopKCodec

    torch.manual_seed(0)
    head = torch.nn.Conv2d(3, 4, 3, padding=1)
    images = torch.randn(5, 3, 8, 8, requires_grad=True)
    codec = TopKCodec(16, "bf16", 0.0, False)
    k = codec.k((5, 4, 8, 8))
    sparse = TopK(head, k)(images)
    dense = head(images)
    decoded = codec.decode(codec.encode(dense, training=False), torch.float32, dense.shape)
    assert ((sparse != 0).sum((1, 2, 3)) == k).all()
    assert torch.equal(sparse != 0, decoded != 0)
    assert torch.allclose(sparse, decoded, rtol=1e-2, atol=1e-2)  # bf16 on the wire
    sparse.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
