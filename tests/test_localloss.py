"""Local-loss split learning (--method split-localloss) over real torchrun process groups and TCP:
run-ahead changes nothing, no gradient crosses the wire, checkpoints carry the auxiliary head,
a failing hospital is handled by --on-hospital-failure, and the combinations that make no sense
are one line."""

import re

import pytest
import torch

from splitrpc.config import parse_args
from splitrpc.errors import UserError

SMALL = ["--method", "split-localloss", "--dataset", "synthetic", "--model", "resnet20", "--width", "0.25",
         "--epochs", "1", "--threads", "1", "--record-step-losses", "--log-every", "1000", "--batch-size", "16",
         "--synthetic-train", "512", "--synthetic-test", "64", "--momentum", "0.9"]
FILES = ("trunk.pt", "head-hospital1.pt", "head-hospital2.pt", "aux-hospital1.pt", "aux-hospital2.pt")


def same_weights(a_dir, b_dir):
    for name in FILES:
        a, b = torch.load(a_dir / name), torch.load(b_dir / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bit for bit


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["parallel", "sequential"])
def test_running_ahead_changes_nothing(cli, tmp_path, schedule):
    """A hospital's L1 depends only on its own data: k=0 and k=3 end with the same weights, bit for bit,
    and k=3 did keep later steps' requests in flight."""
    records = {}
    for k in (0, 3):
        result = cli(*SMALL, "--hospitals", 2, "--schedule", schedule, "--max-steps", 12, "--run-ahead", k,
                     "--save-dir", tmp_path / str(k), "--out", tmp_path / f"{k}.jsonl")
        result.out = tmp_path / f"{k}.jsonl"
        assert result.returncode == 0, result
        records[k] = result.records[0]
    same_weights(tmp_path / "0", tmp_path / "3")
    assert records[0]["step_losses"] == records[3]["step_losses"]
    # Parallel k=0 is lockstep; sequential k=0 already asks the other hospital ahead (one request each).
    assert records[0]["comm"]["prefetched_steps"] == (0 if schedule == "parallel" else 11)
    assert records[3]["comm"]["prefetched_steps"] == 11


@pytest.mark.distributed
def test_local_loss_sends_no_gradient_on_the_wire(cli):
    """Training traffic: activations and labels up, nothing down, in the analytic count and in what each
    party booked; the kernel's TCP count is within 5 % of the analytic one (fp8 codec, 2 hospitals)."""
    result = cli(*SMALL, "--hospitals", 2, "--schedule", "parallel", "--max-steps", 8, "--run-ahead", 1,
                 "--codec", "fp8")
    assert result.returncode == 0, result
    record = result.records[0]
    train = record["comm"]["phases"]["train"]
    activations = 16 * 4 * 32 * 32 + 4 * 4  # fp8 values + one float32 scale per channel, a batch of 16
    for h in ("hospital1", "hospital2"):
        assert train["analytic_bytes"][h] == {"sent": 8 * (activations + 16), "received": 0}
        assert train["payload_bytes"][h] == train["analytic_bytes"][h]
    assert train["analytic_bytes"]["server"]["sent"] == train["payload_bytes"]["server"]["sent"] == 0
    assert abs(train["tcp_bytes"]["total"] / train["analytic_bytes"]["total"] - 1) <= 0.05
    assert record["comm"]["gradient_pushes_per_step"] == 0.0 and record["comm"]["round_trips_per_step"] == 1.0
    for hospital in record["local_loss"]["hospitals"]:
        assert hospital["steps"] == 8 and hospital["aux_head_parameters"] == 4 * 10 + 10
        assert hospital["seconds"]["aux_forward"] > 0


@pytest.mark.distributed
def test_resumed_run_matches_an_uninterrupted_one(cli, tmp_path):
    """Stopped at step 6 with a checkpoint, resumed (with another --run-ahead) to step 12: the same
    weights as 12 steps in one go, the auxiliary heads included (they are in the hospitals' checkpoints)."""
    common = [*SMALL, "--hospitals", 2, "--schedule", "sequential", "--checkpoint-every", 3]
    whole = cli(*common, "--max-steps", 12, "--checkpoint-dir", tmp_path / "c1", "--save-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole
    first = cli(*common, "--max-steps", 6, "--checkpoint-dir", tmp_path / "c2", "--run-ahead", 2)
    assert first.returncode == 0, first
    resumed = cli(*common, "--max-steps", 12, "--checkpoint-dir", tmp_path / "c2", "--resume", "--run-ahead", 2,
                  "--save-dir", tmp_path / "resumed")
    assert resumed.returncode == 0, resumed
    assert "resumed at step 6" in resumed.stdout
    same_weights(tmp_path / "whole", tmp_path / "resumed")


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["abort", "continue"])
def test_a_failing_hospital_under_run_ahead(cli, mode):
    """hospital2 sends NaN activations from its 3rd batch while it runs ahead: abort stops with one line;
    continue goes on with hospital1, whose later requests were in flight and stand."""
    result = cli(*SMALL, "--hospitals", 2, "--schedule", "parallel", "--max-steps", 10, "--run-ahead", 2,
                 "--fault", "hospital2:nan@3", "--on-hospital-failure", mode, timeout=180)
    if mode == "abort":
        assert result.returncode == 1
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "hospital2 sent 1 non-finite activation values" in lines[0], result
        return
    assert result.returncode == 0, result
    record = result.records[0]
    assert [lost["name"] for lost in record["lost_hospitals"]] == ["hospital2"]
    assert len(record["step_losses"]) == 10 and torch.isfinite(torch.tensor(record["step_losses"])).all()
    train = record["comm"]["phases"]["train"]
    assert train["payload_bytes"]["hospital1"] == train["analytic_bytes"]["hospital1"]
    assert record["local_loss"]["hospitals"][0]["steps"] == 10


@pytest.mark.parametrize("args,message", [
    (["--labels", "hospital"], r"--labels hospital does not apply to --method split-localloss"),
    (["--nopeek", "0.1"], r"--nopeek 0.1 does not apply to --method split-localloss"),
    (["--run-ahead", "2", "--l1", "average"], r"--run-ahead cannot be combined with --l1 average"),
    (["--run-ahead", "8", "--rpc-threads", "16"], r"needs --rpc-threads of at least 18"),
    (["--run-ahead", "-1"], r"--run-ahead must not be negative"),
])
def test_combinations_that_make_no_sense_are_one_line(args, message):
    with pytest.raises(UserError, match=message):
        parse_args(["--method", "split-localloss", *args])


def test_run_ahead_is_read_by_local_loss_only():
    with pytest.raises(UserError, match=re.escape("--run-ahead 2 does not apply to --method split (it is read by "
                                                  "--method split-localloss)")):
        parse_args(["--method", "split", "--run-ahead", "2"])
    assert parse_args(["--method", "split-localloss", "--hospitals", "3"]).world_size == 4
