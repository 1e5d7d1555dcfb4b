"""Defences change what crosses the RPC boundary as documented, and cost nothing when off."""

import pytest
import torch

from splitrpc.privacy import dcor

pytestmark = pytest.mark.distributed

BASE = ["--method", "split", "--hospitals", "1", "--dataset", "synthetic", "--synthetic-train", "512",
        "--synthetic-test", "64", "--model", "vgg11", "--width", "0.25", "--batch-size", "32", "--threads", "1",
        "--log-every", "1000", "--lr", "0.05"]


def received(tmp_path, name):
    return torch.cat([b["activations"] for b in torch.load(tmp_path / name / "hospital1-received.pt")])


class EnabledZero(float):
    """0.0 that is true: turns a defence's code path on (``if cfg.noise:``) at strength zero."""

    def __bool__(self):
        return True


def train_l1(cfg, monkeypatch, steps: int):
    """A hospital's side of ``steps`` training steps, in this process: what it sends, and L1 after.

    The server's part is stood in for by a fixed linear loss on the activations, whose
    gradient is handed to the hospital's end of the cut as distributed autograd hands it.
    """
    from splitrpc.split import hospital as hospital_module

    h = hospital_module.Hospital(cfg, 1)
    initial = {k: v.clone() for k, v in h.head.state_dict().items()}
    sent = []
    for step in range(steps):
        activations, _ = h.forward(0, step, cfg.lr, 1.0)
        sent.append(activations.detach().clone())
        weights = torch.empty(activations.shape).normal_(generator=torch.Generator().manual_seed(step))
        torch.autograd.backward(activations, weights)  # runs the hospital's L1 step (on its worker)
        h.settle()
    sent.append(h.eval_forward(0)[0])
    return sent, initial, h.head.state_dict(), h.nopeek_values




def test_zero_strength_defences_are_bit_identical(cache_dir, monkeypatch, one_thread):
    # The defences' code paths forced on at strength 0 (noise 0 x N(0, 1) added to what
    # leaves, NoPeek's penalty gradient 0 x grad dCor added to L1's) against the paths absent.
    from splitrpc.config import parse_args

    plain_cfg = parse_args([*BASE, "--cache-dir", cache_dir, "--momentum", "0.9"])
    zero_cfg = plain_cfg.replace(noise=EnabledZero(0.0), nopeek=EnabledZero(0.0))
    noise_draws = []
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: noise_draws.append(a) or randn(*a, **k))
    plain_sent, initial, plain_l1, plain_dcor = train_l1(plain_cfg, monkeypatch, steps=6)
    assert noise_draws == [] and plain_dcor == []  # no defence ran
    zero_sent, _, zero_l1, zero_dcor = train_l1(zero_cfg, monkeypatch, steps=6)
    assert len(noise_draws) == 7 and len(zero_dcor) == 6  # both ran: 6 training batches + 1 evaluation batch
    assert len(plain_sent) == len(zero_sent) == 7
    assert all(torch.equal(a, b) for a, b in zip(plain_sent, zero_sent))
    assert plain_l1.keys() == zero_l1.keys() and all(torch.equal(plain_l1[k], zero_l1[k]) for k in plain_l1)
    assert not torch.equal(initial["0.0.weight"], plain_l1["0.0.weight"])  # L1 did train in the steps compared


def test_noise_is_present_in_what_the_server_receives(cli, tmp_path):
    # One step: both runs send activations of the same initial L1 on the same batch.
    for name, extra in (("plain", []), ("noisy", ["--noise", 0.7])):
        result = cli(*BASE, "--max-steps", 1, "--capture-dir", tmp_path / name, "--capture-samples", 32, *extra)
        assert result.returncode == 0, result
    difference = received(tmp_path, "noisy") - received(tmp_path, "plain")
    assert difference.std().item() == pytest.approx(0.7, rel=0.03)
    assert abs(difference.mean().item()) < 0.01
    # Noise also lowers how much the received activations depend on the inputs.
    inputs = torch.cat([b["inputs"] for b in torch.load(tmp_path / "plain" / "hospital1-inputs.pt")])
    plain_r = dcor.bias_corrected_distance_correlation(inputs, received(tmp_path, "plain")).item()
    noisy_r = dcor.bias_corrected_distance_correlation(inputs, received(tmp_path, "noisy")).item()
    assert noisy_r < plain_r


def test_nopeek_trains_l1_to_send_less_dependent_activations(cli, tmp_path):
    results = {}
    for name, extra in (("plain", []), ("nopeek", ["--nopeek", 5.0])):
        result = cli(*BASE, "--max-steps", 16, "--capture-dir", tmp_path / name, "--capture-samples", 64, *extra)
        assert result.returncode == 0, result
        results[name] = result.records[-1]
    inputs = torch.cat([b["inputs"] for b in torch.load(tmp_path / "plain" / "hospital1-inputs.pt")])
    inputs_n = torch.cat([b["inputs"] for b in torch.load(tmp_path / "nopeek" / "hospital1-inputs.pt")])
    assert torch.equal(inputs, inputs_n)  # the same batches: only L1 differs
    plain = dcor.distance_correlation(inputs, received(tmp_path, "plain")).item()
    defended = dcor.distance_correlation(inputs, received(tmp_path, "nopeek")).item()
    assert defended < plain
    stats = results["nopeek"]["nopeek"][0]
    assert stats["nopeek_batches"] == 16 and 0 < stats["nopeek_dcor_mean"] <= 1


@pytest.mark.parametrize("cut,shape", [(1, (16, 32, 32)), (2, (32, 16, 16)), (3, (64, 8, 8))])
def test_deeper_cut_sends_the_deeper_stage(cli, tmp_path, cut, shape):
    result = cli(*BASE, "--max-steps", 1, "--cut", cut, "--capture-dir", tmp_path / "c", "--capture-samples", 32)
    assert result.returncode == 0, result
    assert tuple(received(tmp_path, "c").shape[1:]) == shape
    train = result.records[0]["comm"]["phases"]["train"]["payload_bytes"]["hospital1"]
    assert train["sent"] == 32 * (shape[0] * shape[1] * shape[2] * 4 + 1)


def test_defences_need_split(cli):
    r = cli("--method", "local", "--noise", "0.1", timeout=60)
    assert r.returncode == 2 and "--noise 0.1 does not apply to --method local (it is read by --method split, split-localloss, splitfed)" in r.stderr


def test_private_l1_init_is_unknown_to_the_server_and_averaged_once(cli, tmp_path):
    common = ["--method", "split", "--hospitals", "2", "--dataset", "synthetic", "--synthetic-train", "256",
              "--synthetic-test", "64", "--model", "vgg11", "--width", "0.25", "--batch-size", "32",
              "--threads", "1", "--max-steps", "2", "--schedule", "parallel", "--l1", "average"]
    shared = cli(*common, "--save-dir", tmp_path / "shared")
    private = cli(*common, "--l1-init", "private", "--save-dir", tmp_path / "private")
    assert shared.returncode == 0 and private.returncode == 0, (shared, private)
    a, b = (torch.load(tmp_path / "private" / f"head-hospital{h}.pt") for h in (1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # averaged at the start and after every step
    s = torch.load(tmp_path / "shared" / "head-hospital1.pt")
    assert not torch.equal(a["0.0.weight"], s["0.0.weight"])  # not the weights --seed gives
