"""bench.chaos: the plan of a campaign, its table, the blame of a failed collective, and one real trial
with a hospital's link cut for longer than the RPC timeout (needs root: network namespaces)."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from bench import chaos
from splitrpc.ranks import StoreGone, blame
from tests.test_wan import needs_netns


def test_a_campaign_is_a_function_of_its_seed_and_covers_every_fault_first():
    first = [chaos.plan(0, i) for i in range(len(chaos.FAULTS))]
    assert [t.fault for t in first] == chaos.FAULTS
    assert first == [chaos.plan(0, i) for i in range(len(chaos.FAULTS))]
    assert [chaos.plan(1, i) for i in range(8)] != [chaos.plan(0, i) for i in range(8)]
    for t in (chaos.plan(0, i) for i in range(40)):
        assert t.victim in chaos.party_names(t.method)
        assert (t.duration_s > chaos.RPC_TIMEOUT_S) == t.fault.endswith("-long")


def test_the_silent_rank_is_named_and_a_lost_store_blames_rank_0():
    store = dist.HashStore()
    store.set("collective_failed/2", "1")  # rank 2's collective failed too; rank 1 never says so
    assert blame(store, 0, 3, wait_s=0.2) == "no word from hospital2 (rank 1): dead, stopped or cut off"
    store.set("collective_failed/1", "1")
    assert blame(store, 2, 3, wait_s=0.2) == "every rank's collective failed at once"

    class Gone:
        def set(self, *args):
            raise RuntimeError("Connection reset by peer")

    with pytest.raises(StoreGone, match=r"hospital1 \(rank 0, which holds the coordination store\) is unreachable"):
        blame(Gone(), 1, 3, 0.2)


def test_the_table_counts_outcomes_by_fault(tmp_path):
    rows = [{"kind": "chaos_trial", **chaos.plan(0, i).__dict__, "outcome": o, "detail": "", "restarts": r}
            for i, (o, r) in enumerate([("resumed", 1), ("survived", 0), ("hang", 0)])]
    path = tmp_path / "chaos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = chaos.table(str(path))
    assert text.startswith("3 trials; failures (hang, unnamed stop, partial record, wrong state, no finish): 1.")
    assert "| kill | 0 | 1 | 0 | 1 |" in text and "| stop-long | 1 | 0 | 0 | 1 |" in text


@needs_netns
def test_a_cut_link_ends_as_the_contract_says(tmp_path, monkeypatch):
    """hospital2's link down for 2.5x the RPC timeout. Either the server names it and stops within the bound,
    no record is written, and the run resumed from its checkpoint ends with the undisturbed run's weights;
    or the run stalls for the outage and goes on when the link is back, ending with those weights (seen with
    the same cut; docs/faults.md says what is known of why). Both are what bench.chaos accepts; anything
    else fails."""
    epochs = chaos.BASE.index("--epochs") + 1
    monkeypatch.setattr(chaos, "BASE", [*chaos.BASE[:epochs], "1", *chaos.BASE[epochs + 1:]])  # half the steps
    refs = {("split", ()): chaos.reference("split", [], tmp_path / "reference", 29610)}
    trial = chaos.Trial(seed=-1, index=0, method="split", extra=[], policy="abort", fault="link-long",
                        victim="hospital2", at_step=9, duration_s=2.5 * chaos.RPC_TIMEOUT_S, damage="flip")
    result = chaos.run_trial(trial, tmp_path, refs, 29620)
    assert result["outcome"] in ("resumed", "survived"), result
    if result["outcome"] == "resumed":
        assert "hospital2" in result["error"] and "timeout" in result["error"], result
        assert result["exit_after_start_s"] < chaos.BOUND_S + trial.duration_s, result
        assert result["resumed_from_step"] in (5, 10), result


def test_after_a_store_timeout_the_store_is_not_asked_again():
    """A late reply on a timed-out store connection would be read as the next call's: once a call timed out,
    a failure is this process's to report, without asking the store who was first."""
    from splitrpc.transport import Coordinator

    class Desynced:
        def set_timeout(self, timeout):
            pass

        def compare_set(self, key, expected, value):
            return b"hospital2: a reply that belongs to another call"

    coordinator = Coordinator.__new__(Coordinator)
    coordinator.store, coordinator.store_gone = Desynced(), False
    assert coordinator.fail("rank1", "x") is False  # the store's word is taken while it is trusted
    coordinator.store_gone = True
    assert coordinator.fail("rank1", "x") is True
