"""U-shaped split learning (--labels hospital): the hospital keeps L1, the tail and the loss."""

import pytest
import torch

from splitrpc.config import parse_args
from splitrpc.split.hospital import Hospital
from splitrpc.models import stage_count

pytestmark = pytest.mark.distributed

SMALL = ["--dataset", "synthetic", "--model", "resnet20", "--width", "0.5", "--epochs", "1", "--threads", "1",
         "--record-step-losses", "--log-every", "1000"]


def test_one_hospital_u_shaped_equals_local(cli, tmp_path):
    """Sequential, BatchNorm, SGD with momentum, float64: per-step losses and every weight (L1 and tail at
    the hospital, the middle at the server) equal local training's on the same batches."""
    common = [*SMALL, "--hospitals", 1, "--schedule", "sequential", "--batch-size", 16, "--max-steps", 16,
              "--momentum", 0.9, "--lr", 0.05, "--synthetic-train", 512, "--synthetic-test", 64, "--dtype", "float64"]
    local = cli("--method", "local", *common, "--save-dir", tmp_path / "local", "--out", tmp_path / "local.jsonl")
    split = cli("--method", "split", "--labels", "hospital", "--tail", 2, *common, "--save-dir", tmp_path / "u",
                "--out", tmp_path / "u.jsonl")
    assert local.returncode == 0 and split.returncode == 0, (local, split)
    local.out, split.out = tmp_path / "local.jsonl", tmp_path / "u.jsonl"
    losses_local = torch.tensor(local.records[0]["step_losses"], dtype=torch.float64)
    losses_u = torch.tensor(split.records[0]["step_losses"], dtype=torch.float64)
    assert len(losses_u) == 16
    assert ((losses_u - losses_local).abs() / losses_local).max().item() <= 1e-12
    # local's trunk.pt holds stages 1..10 as 0..9; the server's middle 0..7 and the hospital's tail 8..9.
    trunk = torch.load(tmp_path / "local" / "trunk.pt")
    middle, tail = torch.load(tmp_path / "u" / "trunk.pt"), torch.load(tmp_path / "u" / "tail-hospital1.pt")
    middle_stages = stage_count("resnet20") - 1 - 2
    for key, value in trunk.items():
        index, rest = key.split(".", 1)
        mine = middle[key] if int(index) < middle_stages else tail[f"{int(index) - middle_stages}.{rest}"]
        assert torch.allclose(mine, value, rtol=1e-10, atol=1e-14), key
    assert len(middle) + len(tail) == len(trunk)
    head, head_u = torch.load(tmp_path / "local" / "head-local.pt"), torch.load(tmp_path / "u" / "head-hospital1.pt")
    for key in head:
        assert torch.allclose(head_u[key], head[key], rtol=1e-10, atol=1e-14), key


def test_u_shaped_bytes_and_what_the_server_receives(cli, tmp_path):
    """Two hospitals, parallel: bytes written out from shapes, the kernel's count, and no labels at the server."""
    result = cli("--method", "split", "--labels", "hospital", *SMALL, "--hospitals", 2, "--schedule", "parallel",
                 "--batch-size", 32, "--max-steps", 4, "--synthetic-train", 512, "--synthetic-test", 100,
                 "--eval-batch-size", 100, "--capture-dir", tmp_path / "capture", "--capture-samples", 64)
    assert result.returncode == 0, result
    record = result.records[0]
    # ResNet-20 x0.5 at cut 1 sends 8x32x32 activations; its tail (the classifier) takes 32x8x8.
    activations, output = 32 * 8 * 32 * 32 * 4, 32 * 32 * 8 * 8 * 4
    phases = record["comm"]["phases"]
    for h in ("hospital1", "hospital2"):
        assert phases["train"]["analytic_bytes"][h] == {"sent": 4 * (activations + output + 4),
                                                        "received": 4 * (activations + output)}
        assert phases["train"]["payload_bytes"][h] == phases["train"]["analytic_bytes"][h]
        assert phases["eval"]["analytic_bytes"][h] == {"sent": 100 * 8 * 32 * 32 * 4 + 8,
                                                       "received": 100 * 32 * 8 * 8 * 4}
    assert 1.0 <= phases["train"]["tcp_delivered_over_payload"] <= 1.05
    assert record["comm"]["round_trips_per_step"] == 2.0  # activations, then the trunk's output
    # What the server kept of what it received: activations and loss gradients, never a label.
    for h in ("hospital1", "hospital2"):
        for batch in torch.load(tmp_path / "capture" / f"{h}-received.pt"):
            assert batch["labels"] is None
            assert batch["activations"].shape == (32, 8, 32, 32)
            assert batch["output_gradient"].shape == (32, 32, 8, 8)


def test_a_hospital_hands_the_server_no_labels(tmp_path, cache_dir):
    """Every reply a U-shaped hospital gives the server, called in this process: floating-point activations
    and gradients and one loss value (training), or one count (evaluation); no tensor of labels."""
    cfg = parse_args(["--method", "split", "--labels", "hospital", "--dataset", "synthetic", "--model", "resnet20",
                      "--width", "0.5", "--batch-size", "16", "--synthetic-train", "64", "--synthetic-test", "32",
                      "--eval-batch-size", "32", "--cache-dir", cache_dir])
    hospital = Hospital(cfg, 1)
    _, labels = hospital.shard.batch(0, 0)
    forward = hospital.forward(0, 0, 0.05, 1.0)
    assert [(tuple(t.shape), t.dtype) for t in forward] == [((16, 8, 32, 32), torch.float32)]
    reply = hospital.tail_loss(torch.randn(16, 32, 8, 8))
    assert [(tuple(t.shape), t.dtype) for t in reply] == [((16, 32, 8, 8), torch.float32), ((1,), torch.float32)]
    evaluation = hospital.eval_forward(0)
    assert [(tuple(t.shape), t.dtype) for t in evaluation] == [((32, 8, 32, 32), torch.float32)]
    count = hospital.eval_tail(0, torch.randn(32, 32, 8, 8))
    assert count.shape == (1,) and 0 <= int(count) <= 32
    assert len(labels) == 16  # the batch had labels; none of them is in any reply above


@pytest.mark.parametrize("args,message", [
    (["--labels", "hospital", "--tail", "10"], "leaves the server no stage"),
    (["--labels", "hospital", "--cut", "5", "--tail", "6"], "leaves the server no stage"),
    (["--labels", "hospital", "--tail", "0"], "--tail >= 1"),
    (["--labels", "hospital", "--method", "ddp"], "--labels hospital does not apply to --method ddp"),
    (["--labels", "xyz"], "--labels: unknown value"),
])
def test_bad_u_shapes_are_one_line(cli_check, args, message):
    result = cli_check("--dataset", "synthetic", "--model", "resnet20", *args)
    assert result.returncode == 2 and message in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1, result


def test_u_shaped_run_stopped_at_a_checkpoint_continues_exactly(cli, tmp_path):
    """Sequential with prefetch, 2 hospitals: stopped after 6 of 12 steps and resumed, every party ends with
    exactly the weights of an uninterrupted run (the tails and their optimizers come back too)."""
    common = ["--method", "split", "--labels", "hospital", *SMALL, "--hospitals", 2, "--schedule", "sequential",
              "--batch-size", 16, "--synthetic-train", 512, "--synthetic-test", 64, "--momentum", 0.9]
    whole = cli(*common, "--max-steps", 12, "--save-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole
    ckpt = tmp_path / "ckpt"
    first = cli(*common, "--max-steps", 6, "--checkpoint-dir", ckpt, "--checkpoint-every", 3)
    assert first.returncode == 0, first
    second = cli(*common, "--max-steps", 12, "--checkpoint-dir", ckpt, "--resume", "--save-dir", tmp_path / "resumed")
    assert second.returncode == 0 and "resumed at step 6" in second.stdout, second
    for name in ("trunk.pt", "head-hospital1.pt", "head-hospital2.pt", "tail-hospital1.pt", "tail-hospital2.pt"):
        a, b = torch.load(tmp_path / "whole" / name), torch.load(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
