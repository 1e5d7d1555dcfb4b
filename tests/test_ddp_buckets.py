"""DDP's bucket timings, which the time model uses to credit all-reduce overlapping the backward pass."""

from splitrpc import comm
from splitrpc.ddp import CountingAllReduce, slowest_overlap


def hand_over(state, monkeypatch, buckets):
    """One step: buckets [(bytes, seconds after the step began)] handed to all-reduce in order."""
    clock = iter(at for _, at in buckets)
    monkeypatch.setattr("splitrpc.ddp.time.perf_counter", lambda: next(clock))
    for nbytes, _ in buckets:
        state.book(nbytes)


def test_leads_are_averaged_over_steps_after_the_first_and_restart_on_a_rebuild(monkeypatch):
    state = CountingAllReduce(comm.Ledger("hospital1"), ranks=2)
    hand_over(state, monkeypatch, [(400, 0.0), (600, 9.0)])  # before DDP's rebuild: not timed
    state.end_step(first=True)
    hand_over(state, monkeypatch, [(400, 1.0), (600, 1.5)])
    state.end_step(first=False)
    assert state.buckets() == [{"bytes": 400, "lead_s": 0.5}, {"bytes": 600, "lead_s": 0.0}]
    hand_over(state, monkeypatch, [(400, 2.0), (600, 2.3)])
    state.end_step(first=False)
    assert [b["bytes"] for b in state.buckets()] == [400, 600]
    assert abs(state.buckets()[0]["lead_s"] - 0.4) < 1e-12
    hand_over(state, monkeypatch, [(1000, 5.0)])  # another layout: the averages start again
    state.end_step(first=False)
    assert state.buckets() == [{"bytes": 1000, "lead_s": 0.0}]
    assert state.bucket_bytes == 4 * 1000  # every step is booked, timed or not


def test_the_overlap_window_is_the_shortest_lead_of_any_rank():
    ranks = [[{"bytes": 400, "lead_s": 0.5}, {"bytes": 600, "lead_s": 0.0}],
             [{"bytes": 400, "lead_s": 0.2}, {"bytes": 600, "lead_s": 0.0}]]
    assert slowest_overlap(ranks) == [{"bytes": 400, "lead_s": 0.2}, {"bytes": 600, "lead_s": 0.0}]
    assert slowest_overlap([ranks[0], [{"bytes": 1000, "lead_s": 0.0}]]) is None  # layouts differ
    assert slowest_overlap([[], []]) is None  # nothing timed (one step only)
