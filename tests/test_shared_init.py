"""The shared-initialisation threat on a case with a known answer: L1 rebuilt from the seed inverts a
batch that the initial L1 produced in train mode; a wrong seed (a private L1) does not (CPU, seconds)."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from splitrpc.privacy import image_metrics, inversion
from splitrpc.models import model_for, split_model

CFG = SimpleNamespace(seed=0, model="resnet20", num_classes=10, width=0.5, norm="batch", dtype="float32", cut=1,
                      bottleneck=1)
SHAPE = (3, 16, 16)  # a convolution runs at any size; 16x16 keeps the inversions under a second

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def normalised_batch(n: int, seed: int) -> torch.Tensor:
    """Smooth images with the statistics of normalised data: mean 0, std 1 per channel over the batch."""
    generator = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 3, 4, 4, generator=generator), size=SHAPE[1:], mode="bilinear",
                      align_corners=False)
    x = x - x.mean(dim=(0, 2, 3), keepdim=True)
    return x / x.std(dim=(0, 2, 3), keepdim=True)


def psnr(a, b) -> float:
    to_pixels = lambda x: image_metrics.denormalize(x, "cifar10").clamp(0, 1)
    return image_metrics.psnr(to_pixels(a), to_pixels(b), data_range=1.0)


@pytest.fixture(scope="module")
def received():
    """(images, activations): one training batch through the hospital's initial L1, BatchNorm in train mode."""
    hospital_l1, _ = split_model(model_for(CFG), 1)
    images = normalised_batch(4, seed=1)
    with torch.no_grad():
        return images, hospital_l1.train()(images)


def invert(head, activations):
    """Batch-statistics inversion, rescaled to the moments of normalised data (0 and 1, as the batch has)."""
    raw = inversion.invert_white_box(head, activations, steps=200, image_shape=SHAPE, batch_statistics=True)
    return inversion.match_batch_moments(raw)


def test_initial_weights_rebuilt_from_the_seed_invert_a_first_batch(received):
    images, activations = received
    rebuilt, _ = split_model(model_for(CFG, CFG.seed), 1)  # what the server knows under --l1-init shared
    before = copy.deepcopy(rebuilt.state_dict())
    recovered = invert(rebuilt, activations)
    assert all(torch.equal(before[k], v) for k, v in rebuilt.state_dict().items())  # running stats untouched
    assert psnr(torch.zeros_like(images), images) < 13  # the mean image: measured 12.6 dB
    assert psnr(recovered, images) > 35  # measured 41.8 dB


def test_matching_batch_moments_sets_each_channel():
    images = 3 * normalised_batch(4, seed=2) + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    matched = inversion.match_batch_moments(images, torch.tensor([0.1, 0.2, 0.3]), 2.0)
    assert torch.allclose(matched.mean(dim=(0, 2, 3)), torch.tensor([0.1, 0.2, 0.3]), atol=1e-6)
    assert torch.allclose(matched.std(dim=(0, 2, 3)), torch.full((3,), 2.0), atol=1e-5)
    assert torch.allclose(matched, (images - images.mean((0, 2, 3), keepdim=True)) * 2 / 3 * (
        1 / normalised_batch(4, seed=2).std((0, 2, 3), keepdim=True)) + torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1),
        atol=1e-5)


def test_a_wrong_seed_recovers_nothing(received):
    images, activations = received
    wrong_l1, _ = split_model(model_for(CFG, CFG.seed + 1), 1)  # a private L1: the server's guess is wrong
    assert psnr(invert(wrong_l1, activations), images) < psnr(torch.zeros_like(images), images)  # measured 8.9 dB


def test_bench_bad_input_is_one_line(tmp_path, capsys):
    from bench import shared_init

    assert shared_init.main(["--inits", "public", "--captures", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "splitrpc: error: --inits takes shared and/or private, --steps positive integers"
    assert shared_init.main(["--steps", "1,x", "--captures", str(tmp_path)]) == 2
    assert "--steps expects comma-separated integers" in capsys.readouterr().err
    assert shared_init.main(["--table", "--out", str(tmp_path / "none.jsonl")]) == 2
    assert "no results yet" in capsys.readouterr().err
