"""Cut-layer codecs: what they put on the wire, that gradients survive them, and their byte counts."""

import math

import pytest
import torch

from splitrpc import codec
from splitrpc.models import model_for, split_model
from splitrpc.config import parse_args

SHAPE = (16, 8, 32, 32)


@pytest.mark.parametrize("name,element_bytes,max_relative_error", [
    ("none", 4, 0.0), ("bf16", 2, 2 ** -8), ("fp16", 2, 2 ** -11), ("fp8", 1, 2 ** -4)])
def test_round_trip_error_and_wire_bytes(name, element_bytes, max_relative_error):
    torch.manual_seed(0)
    # Channels of very different magnitudes: a per-channel scale keeps each of them in range.
    x = torch.randn(SHAPE) * torch.logspace(-6, 2, SHAPE[1]).view(1, -1, 1, 1)
    wire = codec.encode(name, x)
    assert [(tuple(t.shape), t.dtype) for t in wire] == codec.wire_spec(name, SHAPE, torch.float32)
    scale_bytes = 4 * SHAPE[1] if name == "fp8" else 0
    assert sum(t.numel() * t.element_size() for t in wire) == codec.wire_bytes(name, SHAPE, torch.float32) \
        == math.prod(SHAPE) * element_bytes + scale_bytes
    y = codec.decode(name, wire, torch.float32)
    assert y.dtype == torch.float32
    # Relative error per element, away from the subnormal range of each format.
    normal = x.abs() > x.abs().amax(dim=(0, 2, 3), keepdim=True) * 2 ** -6
    if name == "fp16":
        normal &= x.abs() > 2 ** -14  # float16 has no scale: below its normal range it loses precision
    relative = ((y - x).abs() / x.abs())[normal]
    assert relative.max().item() <= max_relative_error


def cut(name, activations, gradient):
    """What the hospital's L1 receives as the gradient of ``activations`` when the server's loss has
    ``gradient`` as the gradient of what it decoded: both ends of the cut, without the network."""
    delivered = []
    wire = codec.hospital_send(activations, name, lambda g, wire_g: delivered.append((g, wire_g)))
    # The network is replaced by handing the server's wire gradient to the hospital's function by hand.
    wire_for_server = [w.detach().requires_grad_(w.is_floating_point()) for w in wire]
    received = codec.server_receive(wire_for_server, name, torch.float32, lambda w: None, activations.shape)
    (received * gradient).sum().backward()
    floating = [(w, s) for w, s in zip(wire, wire_for_server) if s.requires_grad]  # top-k's positions carry none
    torch.autograd.backward([w for w, _ in floating], [s.grad for _, s in floating])
    (g, wire_gradient), = delivered
    return received.detach(), g, wire_gradient


@pytest.mark.parametrize("name", [*codec.DENSE, "topk"])
def test_the_hospitals_step_graph_is_freed_with_its_wire(name):
    # A 15-epoch fp8 run was killed for memory: the wire kept on the send node's ctx made a cycle
    # through the autograd graph, which kept each step's L1 graph (the activations) alive for good.
    import gc
    import weakref
    kept = []
    for _ in range(3):
        activations = torch.randn(4, 8, 8, 8, requires_grad=True) * 2
        # The hospital's on_gradient holds its activations (L1's graph), as here.
        wire = codec.hospital_send(activations, codec.TopK(8) if name == "topk" else name,
                                   lambda g, w, held=activations: None)
        kept.append(weakref.ref(activations))
        del wire, activations
    gc.collect()
    assert [ref() for ref in kept] == [None] * 3


@pytest.mark.parametrize("name", codec.DENSE)
def test_small_gradients_reach_the_hospital(name):
    torch.manual_seed(1)
    activations = torch.randn(4, 3, 5, 5, requires_grad=True) * 1.0
    gradient = torch.randn(4, 3, 5, 5) * 1e-9  # far below float8's smallest subnormal (2**-9) and float16's
    received, delivered, wire_gradient = cut(name, activations, gradient)
    assert [t.dtype for t in wire_gradient] == [d for _, d in codec.wire_spec(name, gradient.shape, torch.float32)]
    tolerance = {"none": 0, "bf16": 2 ** -8, "fp16": 2 ** -11, "fp8": 2 ** -4}[name]
    if name == "fp16":
        # float16 has no scale: 1e-9 is below its smallest subnormal, so the gradient is lost. This is
        # why --codec fp16 is offered for the activations' sake only with care; bf16 keeps float32's range.
        assert delivered.abs().max().item() == 0
        return
    assert ((delivered - gradient).abs() <= tolerance * gradient.abs() + 1e-30).all()


def test_fp8_without_its_own_gradient_scale_would_lose_small_gradients():
    # The plain cast that distributed autograd would do for a float8 tensor: the same tiny gradient is zero.
    gradient = torch.randn(4, 3, 5, 5) * 1e-9
    assert gradient.to(codec.FP8).float().abs().max().item() == 0


def test_codec_options_are_checked():
    assert parse_args(["--codec", "fp8"]).codec == "fp8"
    assert codec.check("xyz", "float32") and codec.check("fp8", "float64")
    assert codec.check("fp8", "float32") is None


@pytest.mark.distributed
@pytest.mark.parametrize("args,message", [
    (["--codec", "xyz"], "--codec: unknown value 'xyz'"),
    (["--codec", "fp8", "--dtype", "float64"], "cannot be combined with --dtype float64"),
    (["--codec", "bf16", "--method", "ddp"], "--codec bf16 does not apply to --method ddp"),
])
def test_bad_codec_values_are_one_line(cli_check, args, message):
    result = cli_check("--dataset", "synthetic", *args)
    assert result.returncode == 2 and message in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1, result


RUN = ["--method", "split", "--hospitals", "2", "--dataset", "synthetic", "--synthetic-train", "512",
       "--synthetic-test", "128", "--model", "resnet20", "--width", "0.5", "--batch-size", "32", "--threads", "1",
       "--schedule", "parallel", "--max-steps", "6", "--log-every", "1000", "--eval-batch-size", "100"]


@pytest.mark.distributed
def test_fp8_bytes_match_their_count_and_every_l1_learns(cli, tmp_path):
    # No weight decay: L1's weights can then move only by the gradients that came through the cut.
    result = cli(*RUN, "--codec", "fp8", "--weight-decay", 0, "--save-dir", tmp_path / "fp8")
    assert result.returncode == 0, result
    record = result.records[-1]
    # The analytic count written out here from the shapes: ResNet-20 x0.5 sends 8x32x32 activations
    # at cut 1, one byte each, plus 8 float32 scales; one byte per label; the gradient likewise, down.
    per_batch = 32 * 8 * 32 * 32 + 8 * 4
    train = record["comm"]["phases"]["train"]
    for h in ("hospital1", "hospital2"):
        assert train["analytic_bytes"][h] == {"sent": 6 * (per_batch + 32), "received": 6 * per_batch}
        assert train["payload_bytes"][h] == train["analytic_bytes"][h]
    # Evaluation sends 128 test images in batches of 100 and 28, each with its own scales.
    evaluation = record["comm"]["phases"]["eval"]["analytic_bytes"]["hospital1"]["sent"]
    assert evaluation == 128 * (8 * 32 * 32 + 1) + 2 * 8 * 4
    # The kernel's count: within the framing overhead of what the code handed over.
    assert 1.0 <= train["tcp_delivered_over_payload"] <= 1.05
    assert record["comm"]["round_trips_per_step"] == 1.0 and record["comm"]["gradient_pushes_per_step"] == 1.0
    # Distributed autograd reached every hospital's L1 through the fp8 cut: each moved from the
    # initial weights that every party builds from the seed.
    cfg = parse_args(["--model", "resnet20", "--width", "0.5", "--dataset", "synthetic"])
    initial, _ = split_model(model_for(cfg, cfg.seed), cfg.cut)
    weights = [k for k, v in initial.state_dict().items() if v.dim() == 4]  # the convolution's
    assert weights
    for h in (1, 2):
        trained = torch.load(tmp_path / "fp8" / f"head-hospital{h}.pt")
        for k in weights:
            assert (trained[k] - initial.state_dict()[k]).abs().max().item() > 1e-3, (h, k)


# --- top-k -------------------------------------------------------------------------------------------


def test_topk_sends_the_largest_values_and_their_positions_and_counts_its_bytes():
    torch.manual_seed(2)
    x = torch.randn(SHAPE)
    topk = codec.TopK(ratio=16)
    wire = topk.encode(x)
    d, k = math.prod(SHAPE[1:]), math.prod(SHAPE[1:]) // 16
    assert [(tuple(t.shape), t.dtype) for t in wire] == topk.wire_spec(SHAPE, torch.float32) \
        == [((SHAPE[0], k), torch.bfloat16), ((SHAPE[0], k), torch.int16)]
    # Written out from shapes: per sample k bfloat16 values and k int16 positions up, k bfloat16 values down.
    assert codec.wire_bytes(topk, SHAPE, torch.float32) == SHAPE[0] * k * (2 + 2)
    assert codec.gradient_bytes(topk, SHAPE, torch.float32) == SHAPE[0] * k * 2
    y = codec.decode(topk, wire, torch.float32, SHAPE)
    flat, kept = x.reshape(SHAPE[0], -1), y.reshape(SHAPE[0], -1) != 0
    assert (kept.sum(1) == k).all()
    # The kept values are each sample's k largest magnitudes, in bfloat16.
    threshold = flat.abs().topk(k, dim=1).values[:, -1:]
    assert torch.equal(kept, flat.abs() >= threshold)
    assert torch.equal(y.reshape(SHAPE[0], -1)[kept], flat[kept].to(torch.bfloat16).float())
    assert d > 2 ** 15 or wire[-1].dtype == torch.int16


def test_topk_fp8_values_have_one_scale_per_sample():
    x = torch.randn(SHAPE) * torch.logspace(-4, 2, SHAPE[0]).view(-1, 1, 1, 1)  # samples of very different sizes
    topk = codec.TopK(ratio=8, values="fp8")
    values, scale, positions = topk.encode(x)
    assert values.dtype == codec.FP8 and scale.shape == (SHAPE[0], 1)
    y = codec.decode(topk, (values, scale, positions), torch.float32, SHAPE).reshape(SHAPE[0], -1)
    kept = y != 0
    relative = ((y - x.reshape(SHAPE[0], -1)).abs() / x.reshape(SHAPE[0], -1).abs())[kept]
    assert relative.max().item() <= 2 ** -4


@pytest.mark.parametrize("values", ["bf16", "fp8"])
def test_topk_gradient_comes_back_at_the_positions_that_went_up_only(values):
    """The trunk sees mask * x, whose exact gradient is mask * g: the hospital receives g at the k positions
    it sent (rounded to the value type) and zero elsewhere, from values alone (no positions down)."""
    torch.manual_seed(3)
    topk = codec.TopK(ratio=4, values=values)
    activations = torch.randn(4, 3, 5, 5)
    gradient = torch.randn(4, 3, 5, 5)
    received, delivered, wire_gradient = cut(topk, activations, gradient)
    assert [t.dtype for t in wire_gradient] == [d for _, d in topk.gradient_spec(gradient.shape, torch.float32)]
    mask = received != 0
    assert torch.equal(delivered != 0, mask)
    tolerance = 2 ** -8 if values == "bf16" else 2 ** -4
    assert ((delivered - gradient).abs() <= tolerance * gradient.abs().amax())[mask].all()


def test_topk_error_feedback_keeps_the_residual_for_the_next_batch():
    """A known case: [4, 3, 2, 1] at ratio 2 sends 4 and 3 and keeps [0, 0, 2, 1]; an all-zero next batch
    then sends that residual's 2 and 1. Without feedback it sends zeros."""
    x1, x2 = torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.zeros(1, 4)
    with_feedback = codec.TopK(ratio=2, feedback=True)
    first = with_feedback.encode(x1)
    assert first[-1].tolist() == [[0, 1]] and first[0].float().tolist() == [[4.0, 3.0]]
    assert with_feedback.residual.tolist() == [[0.0, 0.0, 2.0, 1.0]]
    second = with_feedback.encode(x2)
    assert second[-1].tolist() == [[2, 3]] and second[0].float().tolist() == [[2.0, 1.0]]
    assert with_feedback.residual.tolist() == [[0.0, 0.0, 0.0, 0.0]]
    # Evaluation neither reads nor changes the residual.
    with_feedback.residual = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    assert with_feedback.encode(x1, training=False)[-1].tolist() == [[0, 1]]
    assert with_feedback.residual.tolist() == [[0.0, 0.0, 9.0, 9.0]]
    plain = codec.TopK(ratio=2)
    plain.encode(x1)
    assert plain.encode(x2)[0].float().abs().sum().item() == 0.0


def test_randomized_topk_also_draws_positions_outside_the_top_k_and_evaluates_with_the_top_k():
    torch.manual_seed(4)
    x = torch.randn(8, 1024)
    randomized = codec.TopK(ratio=8, random=0.5)
    top = x.abs().topk(128, dim=1).indices.sort(dim=1).values
    drawn = randomized.encode(x, generator=torch.Generator().manual_seed(0))[-1].long()
    outside = sum(len(set(d.tolist()) - set(t.tolist())) for d, t in zip(drawn, top))
    # Each position is a top-k one with probability 1 - 0.5 per draw: about half of the 1024 drawn are not.
    assert 300 < outside < 700, outside
    again = randomized.encode(x, generator=torch.Generator().manual_seed(0))[-1].long()
    assert torch.equal(drawn, again)  # the same seed, the same draw (a retried or resumed step)
    assert torch.equal(randomized.encode(x, training=False)[-1].long(), top)


@pytest.mark.parametrize("corrupt,message", [
    (lambda w: (w[0], torch.zeros_like(w[1])), "repeated top-k positions"),
    (lambda w: (w[0], w[1] + 30000), "positions outside"),
])
def test_topk_messages_with_bad_positions_are_rejected(corrupt, message):
    from splitrpc.split.protocol import message_problem

    topk = codec.TopK(ratio=4)
    wire = topk.encode(torch.randn(2, 4, 4, 4))
    labels = torch.zeros(2, dtype=torch.uint8)
    assert message_problem((*wire, labels), 2, (4, 4, 4), torch.float32, torch.uint8, 10, topk) is None
    assert message in message_problem((*corrupt(wire), labels), 2, (4, 4, 4), torch.float32, torch.uint8, 10, topk)
