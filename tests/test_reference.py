"""--method split against its single-process reference (--method split-local), step by step.

The reference keeps N L1 copies and one trunk in one process: no RPC, no
distributed autograd, no concurrency. float64 and one thread on both sides keep
rounding out of comparisons that are about what is computed (NOTES.md,
"Threads and equivalence").
"""

import json

import pytest
import torch

from conftest import options_for

from test_split import SMALL, assert_state_close, relative_error

pytestmark = pytest.mark.distributed

EXACT = [*SMALL, "--dtype", "float64", "--optimizer", "sgd", "--momentum", 0.9, "--nesterov", "--lr", 0.05,
         "--weight-decay", 5e-4, "--synthetic-test", 128]
RTOL = 1e-10


def run_both(cli, tmp_path, common):
    runs = {}
    for method in ("split-local", "split"):
        runs[method] = cli("--method", method, *common, "--save-dir", tmp_path / method,
                           "--out", tmp_path / f"{method}.jsonl")
        runs[method].out = tmp_path / f"{method}.jsonl"
        assert runs[method].returncode == 0, runs[method]
    return runs["split-local"].records[0], runs["split"].records[0]


def assert_split_equals_reference(tmp_path, reference, split, hospitals, steps):
    ref_losses, split_losses = torch.tensor(reference["step_losses"]), torch.tensor(split["step_losses"])
    assert len(ref_losses) == len(split_losses) == steps
    assert ((split_losses - ref_losses).abs() / ref_losses.abs()).max().item() <= RTOL
    assert_state_close(torch.load(tmp_path / "split-local" / "trunk.pt"),
                       torch.load(tmp_path / "split" / "trunk.pt"), RTOL)
    heads = [torch.load(tmp_path / "split-local" / f"head-hospital{h}.pt") for h in range(1, hospitals + 1)]
    for h, head in enumerate(heads, start=1):
        assert_state_close(head, torch.load(tmp_path / "split" / f"head-hospital{h}.pt"), RTOL)
    assert split["epochs"][-1]["test_acc_per_hospital"] == reference["epochs"][-1]["test_acc_per_hospital"]
    return heads


def test_parallel_batchnorm_independent_l1_equals_reference(cli, tmp_path):
    # The path behind the accuracy table: BatchNorm in every L1 (each sees only its own
    # hospital's batch), one trunk pass over the concatenated activations, L1 gradients
    # scaled by the number of participants.
    common = [*EXACT, "--hospitals", 3, "--schedule", "parallel", "--l1", "independent", "--batch-size", 16,
              "--max-steps", 8, "--synthetic-train", 768]
    reference, split = run_both(cli, tmp_path, common)
    heads = assert_split_equals_reference(tmp_path, reference, split, 3, 8)
    # Independent L1s really are independent (else the test would not tell them apart).
    assert relative_error(heads[0]["0.0.weight"], heads[1]["0.0.weight"]) > 1e-4
    assert relative_error(heads[0]["0.1.running_mean"], heads[2]["0.1.running_mean"]) > 1e-4


def test_sequential_batchnorm_independent_l1_equals_reference(cli, tmp_path):
    common = [*EXACT, "--hospitals", 2, "--schedule", "sequential", "--l1", "independent", "--batch-size", 16,
              "--max-steps", 8, "--synthetic-train", 512]
    reference, split = run_both(cli, tmp_path, common)
    heads = assert_split_equals_reference(tmp_path, reference, split, 2, 8)
    assert relative_error(heads[0]["0.0.weight"], heads[1]["0.0.weight"]) > 1e-4


def test_ablations_unscaled_l1_gradient_and_periodic_average_equal_reference(cli, tmp_path):
    # --l1-grad-scale none and --l1 average every 3 steps, with BatchNorm: 7 steps end
    # between two averages, so the L1s differ at the end and are compared one by one.
    common = [*EXACT, "--hospitals", 2, "--schedule", "parallel", "--l1", "average", "--l1-sync-every", 3,
              "--l1-grad-scale", "none", "--batch-size", 16, "--max-steps", 7, "--synthetic-train", 512]
    reference, split = run_both(cli, tmp_path, common)
    heads = assert_split_equals_reference(tmp_path, reference, split, 2, 7)
    assert reference["l1_syncs"] == 2
    assert relative_error(heads[0]["0.0.weight"], heads[1]["0.0.weight"]) > 1e-6


def _local_and_reference(cli, tmp_path, common):
    for method in ("local", "split-local"):
        result = cli("--method", method, *options_for(method, common), "--save-dir", tmp_path / method, "--out",
                     tmp_path / f"{method}.jsonl")
        assert result.returncode == 0, result
    return [json.loads((tmp_path / f"{method}.jsonl").read_text()) for method in ("local", "split-local")]


def test_reference_with_l1_averaged_every_step_equals_local_training(cli, tmp_path):
    # The reference's own arithmetic against the mathematics, not against the server:
    # group norm (per-sample statistics) and L1s averaged after every step make split
    # learning's parallel step exactly one model's step on the concatenated batches,
    # which holds only with the per-participant L1 gradient scale.
    common = [*EXACT, "--hospitals", 3, "--schedule", "parallel", "--l1", "average", "--norm", "group",
              "--batch-size", 16, "--max-steps", 10, "--synthetic-train", 768]
    local, reference = _local_and_reference(cli, tmp_path, common)
    losses_local, losses_ref = torch.tensor(local["step_losses"]), torch.tensor(reference["step_losses"])
    assert len(losses_ref) == 10
    assert ((losses_ref - losses_local).abs() / losses_local.abs()).max().item() <= RTOL
    assert_state_close(torch.load(tmp_path / "local" / "trunk.pt"), torch.load(tmp_path / "split-local" / "trunk.pt"),
                       RTOL)
    for h in (1, 2, 3):
        assert_state_close(torch.load(tmp_path / "local" / "head-local.pt"),
                           torch.load(tmp_path / "split-local" / f"head-hospital{h}.pt"), RTOL)
