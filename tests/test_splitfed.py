"""SplitFed (--method splitfed, Thapa et al. 2022): version 1's trunk replicas and their average,
version 2's order, the bad combinations, bytes and checkpoints.

The equivalences run in float64 on one intra-op thread per process, so that what is compared is
what is computed (NOTES.md, "Threads and equivalence")."""

import json
import shutil

import pytest
import torch

from conftest import options_for
from splitrpc.config import parse_args
from splitrpc.errors import UserError
from splitrpc.split.splitfed.server import average_replicas, hospital_by_hospital
from test_comm import check_three_ways
from test_split import assert_state_close

EXACT = ["--dataset", "synthetic", "--model", "resnet20", "--width", "0.5", "--threads", "1", "--record-step-losses",
         "--log-every", "1000", "--dtype", "float64", "--optimizer", "sgd", "--momentum", 0.9, "--nesterov",
         "--lr", 0.05, "--weight-decay", 5e-4, "--synthetic-test", 64]


# --- the pieces, in one process ------------------------------------------------------------------------
def test_replicas_average_to_their_shard_weighted_mean(one_thread):
    """Three replicas of a conv + BatchNorm trunk with shards of 600, 300 and 100 samples: every
    parameter and running statistic of the averaged trunk is 0.6 a + 0.3 b + 0.1 c."""
    torch.manual_seed(0)

    def trunk():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).double()

    replicas = [trunk() for _ in range(3)]
    for r in replicas:  # every tensor differs between replicas (BatchNorm's weight starts at 1 in each)
        r.train()(torch.randn(2, 3, 6, 6, dtype=torch.float64))
        with torch.no_grad():
            for t in r.parameters():
                t.add_(torch.randn_like(t))
    replicas[2](torch.randn(2, 3, 6, 6, dtype=torch.float64))
    sizes = [600, 300, 100]
    target = trunk()
    average_replicas(target, replicas, [n / sum(sizes) for n in sizes])
    states = [r.state_dict() for r in replicas]
    for name, value in target.state_dict().items():
        if value.is_floating_point():
            expected = 0.6 * states[0][name] + 0.3 * states[1][name] + 0.1 * states[2][name]
            assert torch.allclose(value, expected, rtol=1e-14, atol=0), name
            assert not torch.allclose(value, (states[0][name] + states[1][name] + states[2][name]) / 3), name
        else:
            assert value.item() == 2, name  # the largest batch count


def test_version_2_trains_each_hospitals_epoch_in_turn():
    assert hospital_by_hospital([2, 3]) == [[(1, 0)], [(1, 1)], [(2, 0)], [(2, 1)], [(2, 2)]]


@pytest.mark.parametrize("args, message", [
    (["--schedule", "sequential"], r"--schedule sequential does not apply to --method splitfed \(it always runs "
                                   r"with --schedule parallel\)"),
    (["--splitfed-version", "2", "--schedule", "parallel"], r"it always runs with --schedule sequential"),
    (["--labels", "hospital"], r"--splitfed-version 1 keeps the labels at the server"),
    (["--on-hospital-failure", "continue"], r"supports --on-hospital-failure abort only"),
    (["--l1", "independent"], r"it always runs with --l1 average"),
    (["--l1-sync-every", "5"], r"--l1-sync-every 5 does not apply to --method splitfed"),
    (["--splitfed-version", "3"], r"--splitfed-version: unknown value '3'"),
    (["--splitfed-sync-every", "-1"], r"--splitfed-sync-every must not be negative"),
])
def test_bad_combinations_are_one_line(args, message):
    with pytest.raises(UserError, match=message):
        parse_args(["--method", "splitfed", *args])


def test_splitfed_options_are_refused_by_split():
    with pytest.raises(UserError, match=r"--splitfed-version 2 does not apply to --method split \(it is read by "
                                        r"--method splitfed\)"):
        parse_args(["--method", "split", "--splitfed-version", "2"])


def test_a_bad_combination_exits_2_with_one_line(cli):
    result = cli("--method", "splitfed", "--labels", "hospital", out=False)
    assert result.returncode == 2, result
    assert result.stderr.strip().count("\n") == 0 and "--labels hospital" in result.stderr, result


# --- runs ----------------------------------------------------------------------------------------------
def _run(cli, tmp_path, name, method, common):
    result = cli("--method", method, *options_for(method, common), "--save-dir", tmp_path / name,
                 "--out", tmp_path / f"{name}.jsonl")
    assert result.returncode == 0, result
    return json.loads((tmp_path / f"{name}.jsonl").read_text())


def _same_weights(a_dir, b_dir, hospitals, rtol):
    assert_state_close(torch.load(a_dir / "trunk.pt"), torch.load(b_dir / "trunk.pt"), rtol)
    for h in range(1, hospitals + 1):
        assert_state_close(torch.load(a_dir / f"head-hospital{h}.pt"), torch.load(b_dir / f"head-hospital{h}.pt"), rtol)


@pytest.mark.distributed
def test_version_1_with_one_hospital_equals_split_learning(cli, tmp_path):
    """One hospital: one replica, averaged with weight 1 at the end of each of two epochs, its L1 averaged
    in a group of one. Every step loss, weight and accuracy equals --method split bit for bit."""
    common = [*EXACT, "--hospitals", 1, "--schedule", "parallel", "--epochs", 2, "--batch-size", 16,
              "--synthetic-train", 128]
    split = _run(cli, tmp_path, "split", "split", common)
    splitfed = _run(cli, tmp_path, "splitfed", "splitfed", common)
    assert splitfed["splitfed"]["trunk_syncs"] == 2 and splitfed["steps"] == split["steps"] == 16
    assert splitfed["step_losses"] == split["step_losses"]
    _same_weights(tmp_path / "split", tmp_path / "splitfed", 1, rtol=0.0)
    assert splitfed["epochs"][-1]["test_acc_per_hospital"] == split["epochs"][-1]["test_acc_per_hospital"]


@pytest.fixture(scope="module")
def two_hospitals(tmp_path_factory, cache_dir):
    """Version 1, 2 hospitals with equal shards, replicas and L1s averaged after every step; group norm
    (a sample's output does not depend on its batch) and SGD with Nesterov momentum."""
    from conftest import run_cli

    tmp = tmp_path_factory.mktemp("splitfed")
    common = [*EXACT, "--hospitals", 2, "--norm", "group", "--epochs", 1, "--batch-size", 16, "--max-steps", 10,
              "--synthetic-train", 512, "--cache-dir", cache_dir]
    args = ["--method", "splitfed", *options_for("splitfed", common), "--splitfed-sync-every", 1,
            "--save-dir", tmp / "splitfed"]
    result = run_cli([str(a) for a in args], tmp)
    assert result.returncode == 0, result
    return tmp, common, result.records[0]


@pytest.mark.distributed
def test_version_1_averaged_every_step_equals_parallel_split_with_averaged_l1s(two_hospitals, cli):
    """Each replica steps on its own hospital's batch mean, with its own momentum; the shard-weighted mean
    of the replicas' updates (equal shards) is then the update of the mean gradient, which parallel split
    learning takes on the concatenated batch, and each L1's gradient is its own batch mean's in both."""
    tmp, common, splitfed = two_hospitals
    split = _run(cli, tmp, "split", "split",
                 [*common, "--schedule", "parallel", "--l1", "average", "--l1-sync-every", 1])
    assert splitfed["splitfed"] == {"version": 1, "weights": {"hospital1": 0.5, "hospital2": 0.5},
                                    "trunk_syncs": 10, "l1_syncs": 10}
    losses_split, losses_fed = torch.tensor(split["step_losses"]), torch.tensor(splitfed["step_losses"])
    assert len(losses_fed) == 10
    assert ((losses_fed - losses_split).abs() / losses_split.abs()).max().item() <= 1e-10
    _same_weights(tmp / "split", tmp / "splitfed", 2, rtol=1e-10)


@pytest.mark.distributed
def test_version_1_bytes_agree_three_ways(two_hospitals):
    """Per step: activations and labels up, the activation gradient down (split learning's); per sync the
    hospitals' ring all-reduce of L1; the replicas are averaged on the server (no bytes)."""
    _, _, record = two_hospitals
    c = check_three_ways(record)
    activation = 16 * 8 * 32 * 32 * 8  # batch 16, 8 channels (ResNet-20's 16 at width 0.5), float64
    ring = (3 * 8 * 9 + 8 * 2) * 8  # 2 hospitals: each sends and receives L1 once (conv, group norm's weight, bias)
    train = c["phases"]["train"]["payload_bytes"]
    for h in ("hospital1", "hospital2"):
        assert train[h] == {"sent": 10 * (activation + 16) + 10 * ring, "received": 10 * activation + 10 * ring}
    assert train["server"] == {"sent": 20 * activation, "received": 20 * (activation + 16)}
    assert c["method"] == "splitfed"


@pytest.mark.distributed
def test_version_1_resumes_with_every_replica_and_its_optimizer(cli, tmp_path):
    """Checkpoints every 5 steps; the run resumed from step 10 (the replicas 2 steps apart since the sync
    at the end of epoch 1, each with its own momentum) ends bit for bit as the uninterrupted run."""
    common = [*EXACT, "--hospitals", 2, "--epochs", 2, "--batch-size", 16, "--synthetic-train", 256, "--width", 0.25]
    ckpt = tmp_path / "ckpt"
    whole = _run(cli, tmp_path, "whole", "splitfed",
                 [*common, "--checkpoint-dir", ckpt, "--checkpoint-every", 5, "--checkpoint-keep", 10])
    assert whole["steps"] == 16
    state = torch.load(ckpt / "step-000000010" / "server.pt", weights_only=False)
    assert set(state["replicas"]) == set(state["replica_optimizers"]) == {1, 2}
    first = next(k for k, v in state["replicas"][1].items() if v.is_floating_point())
    assert not torch.equal(state["replicas"][1][first], state["replicas"][2][first])  # mid-round: they differ
    for step in (15, 16):
        shutil.rmtree(ckpt / f"step-{step:09d}")
    rest = _run(cli, tmp_path, "rest", "splitfed", [*common, "--checkpoint-dir", ckpt, "--resume"])
    assert rest["resumed_from_step"] == 10
    _same_weights(tmp_path / "whole", tmp_path / "rest", 2, rtol=0.0)


@pytest.mark.distributed
def test_version_2_trains_hospital_by_hospital_and_ends_with_equal_l1s(cli, tmp_path):
    common = [*EXACT, "--hospitals", 2, "--epochs", 1, "--batch-size", 32, "--synthetic-train", 384,
              "--splitfed-version", 2]
    record = _run(cli, tmp_path, "v2", "splitfed", common)
    assert record["config"]["schedule"] == "sequential" and record["config"]["l1"] == "average"
    assert record["splitfed"]["trunk_syncs"] == 0 and record["splitfed"]["l1_syncs"] == 1
    assert record["steps"] == 12
    a, b = (torch.load(tmp_path / "v2" / f"head-hospital{h}.pt") for h in (1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    accuracies = record["epochs"][-1]["test_acc_per_hospital"]
    assert accuracies[0] == accuracies[1]
