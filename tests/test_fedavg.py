"""--method fedavg: one local step on equal shards is a DDP step; rounds and bytes counted three ways."""

import pytest
import torch

from test_comm import SMALL, check_three_ways

pytestmark = pytest.mark.distributed

RESNET20_HALF_PARAMETERS = 68_050
RESNET20_HALF_BN_STATISTICS = 688  # running mean and variance of every BatchNorm layer


def test_one_local_step_on_equal_shards_equals_ddp(cli, tmp_path):
    # BatchNorm, SGD with Nesterov momentum and weight decay, float64. Each replica keeps its
    # own momentum; because SGD is linear in the gradient and the momentum buffer, averaging
    # the replicas after every step gives DDP's update of the averaged gradient, and averaging
    # the BatchNorm statistics every step gives DDP's per-replica statistics averaged at the end.
    common = [*SMALL, "--hospitals", 2, "--dtype", "float64", "--batch-size", 16, "--max-steps", 8,
              "--synthetic-train", 512, "--synthetic-test", 128, "--momentum", 0.9, "--nesterov",
              "--weight-decay", 5e-4, "--lr", 0.05, "--record-step-losses"]
    runs = {}
    for method in ("ddp", "fedavg"):
        runs[method] = cli("--method", method, *common, "--save-dir", tmp_path / method,
                           "--out", tmp_path / f"{method}.jsonl")
        runs[method].out = tmp_path / f"{method}.jsonl"
        assert runs[method].returncode == 0, runs[method]
    ddp, fedavg = runs["ddp"].records[0], runs["fedavg"].records[0]
    assert fedavg["rounds"] == 8 and fedavg["comm"]["local_steps"] == 1
    d, f = torch.tensor(ddp["step_losses"]), torch.tensor(fedavg["step_losses"])
    assert len(f) == 8 and ((d - f).abs() / d.abs()).max().item() < 1e-10
    for mine, theirs in (("trunk.pt", "trunk.pt"), ("head-fedavg.pt", "head-ddp.pt")):
        a, b = torch.load(tmp_path / "fedavg" / mine), torch.load(tmp_path / "ddp" / theirs)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-10, atol=1e-13), key
    assert fedavg["final_test_acc"] == ddp["final_test_acc"]


def test_rounds_and_bytes_three_ways(cli):
    # 3 hospitals of 512 samples, batches of 32: 16 steps per epoch. Rounds of 4 local steps,
    # stopped after 10 steps: rounds end at steps 4 and 8 and with the run at step 10.
    result = cli("--method", "fedavg", "--hospitals", 3, *SMALL, "--synthetic-train", 1536, "--local-steps", 4,
                 "--max-steps", 10)
    assert result.returncode == 0, result
    record = result.records[0]
    c = check_three_ways(record, phases=("train",))
    assert record["rounds"] == c["rounds"] == 3 and c["steps_per_epoch"] == 16 and c["measured_steps"] == 10
    model_bytes = (RESNET20_HALF_PARAMETERS + RESNET20_HALF_BN_STATISTICS) * 4
    assert c["model_bytes_per_round"] == model_bytes
    # A ring all-reduce over 3 ranks sends and receives 2(N-1)/N = 4/3 of the model per round.
    per_round = 4 / 3 * model_bytes
    for h in (1, 2, 3):
        assert c["phases"]["train"]["payload_bytes"][f"hospital{h}"] == {"sent": round(3 * per_round),
                                                                         "received": round(3 * per_round)}
    # An epoch is 4 rounds (16 steps / 4), whatever share of it ran.
    assert c["rounds_per_epoch"] == 4
    assert c["per_epoch"]["analytic"]["per_hospital"] == pytest.approx(4 * 2 * per_round, abs=2)
    assert c["per_epoch"]["payload"]["per_hospital"] == pytest.approx(4 * 2 * per_round, abs=2)
    # The rounds after the first are timed: 4 local steps then the all-reduce (2), 2 steps then the last (3).
    timing = c["round_timing"]
    assert timing["timed_rounds"] == 2 and 0 <= timing["allreduce_wait_s"] < timing["compute_s"] <= timing["round_s"]
    assert timing["compute_s"] > 0.01  # (4 + 2) / 2 batches of 32 through ResNet-20 x0.5


@pytest.mark.parametrize("args,pattern", [
    (["--local-steps", "0"], "--local-steps must be at least 1"),
    (["--on-hospital-failure", "continue"], "--method fedavg supports --on-hospital-failure abort only"),
    (["--resume"], "--resume and --checkpoint-every need --checkpoint-dir"),
])
def test_bad_values_are_one_line_exit_2(cli_check, args, pattern):
    result = cli_check("--method", "fedavg", "--dataset", "synthetic", *args)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1 and pattern in lines[0], result
