"""DDP's bucket timings, which the time model uses to credit all-reduce overlapping the backward pass."""

from splitrpc import comm
from splitrpc.ddp import CountingAllReduce, slowest_overlap, slowest_step


def hand_over(state, monkeypatch, buckets, returned=None):
    """One step: buckets [(bytes, seconds after the step began)] handed to all-reduce in order, then the
    backward pass returns at ``returned`` (default: with the last bucket)."""
    clock = iter([at for _, at in buckets] + [buckets[-1][1] if returned is None else returned])
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


def test_the_wait_after_the_last_bucket_is_timed_from_the_second_step(monkeypatch):
    state = CountingAllReduce(comm.Ledger("hospital1"), ranks=2)
    hand_over(state, monkeypatch, [(400, 0.0), (600, 1.0)], returned=4.0)
    assert state.end_step(first=True) is None  # before DDP's rebuild: not timed
    hand_over(state, monkeypatch, [(400, 1.0), (600, 1.5)], returned=3.75)
    assert state.end_step(first=False) == 2.25  # from the last hand-over, not the first


def test_a_step_is_the_slowest_ranks_compute_and_that_ranks_wait():
    # rank 0 finished its backward pass early and waited 2 s; rank 1 computed 1.5 s longer and waited 0.5 s
    ranks = [{"steps": 3, "step_s": 5.0, "wait_s": 2.0}, {"steps": 3, "step_s": 5.1, "wait_s": 0.5}]
    assert slowest_step(ranks) == {"timed_steps": 3, "step_s": 5.1, "compute_s": 4.6, "allreduce_wait_s": 0.5}
    assert slowest_step([ranks[0], {"steps": 0, "step_s": 0.0, "wait_s": 0.0}]) is None  # one step only
