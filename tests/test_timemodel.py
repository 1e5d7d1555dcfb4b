"""bench.timemodel with known numbers: bytes on the wire / rate, round trips, checks and projections."""

from __future__ import annotations

import pytest

from bench import timemodel
from bench.timemodel import transfer_seconds

MBIT8 = 8e6  # 1 MB/s
FRAMES = 1514 / 1448  # a 1448-byte TCP segment is a 1514-byte Ethernet frame


def test_wire_factor_is_ethernet_ip_tcp_framing():
    assert timemodel.WIRE_FACTOR == pytest.approx(FRAMES, abs=0)


def links(up1, down1, up2, down2, rate=MBIT8):
    return {"hospital1": {"rate": rate, "up": up1, "down": down1},
            "hospital2": {"rate": rate, "up": up2, "down": down2}}


def test_split_parallel_is_slowest_upload_then_slowest_download():
    # 1,448,000 payload bytes = 1,514,000 on the wire = 1.514 s at 1 MB/s.
    assert transfer_seconds("split", links(1448000, 724000, 724000, 1448000)) == pytest.approx(1.514 + 1.514)


def test_split_sequential_adds_the_hospitals():
    assert transfer_seconds("split", links(1448000, 724000, 724000, 1448000), "sequential") == \
        pytest.approx(2 * (1.514 + 0.757))


def test_a_shaped_server_link_carries_every_hospital():
    server = {"rate": MBIT8, "up": 2172000, "down": 2172000}  # the server's received and sent bytes
    assert transfer_seconds("split", links(1448000, 724000, 724000, 1448000), "parallel", server) == \
        pytest.approx(2 * 2.271)
    # A fast server link does not slow the step.
    server_fast = {**server, "rate": 100 * MBIT8}
    assert transfer_seconds("split", links(1448000, 724000, 724000, 1448000), "parallel", server_fast) == \
        pytest.approx(1.514 + 1.514)


def test_ddp_sends_and_receives_at_once():
    assert transfer_seconds("ddp", links(1448000, 1448000, 724000, 1448000)) == pytest.approx(1.514)


def test_ddp_transfer_is_slowed_by_the_measured_duplex_goodput_and_split_is_not():
    # A link busy both ways that keeps half its one-way goodput doubles DDP's transfer; split
    # learning uses a link one way at a time.
    duplex = [(MBIT8, 0.5)]
    assert transfer_seconds("ddp", links(1448000, 1448000, 724000, 1448000), duplex=duplex) == \
        pytest.approx(2 * 1.514)
    assert transfer_seconds("split", links(1448000, 724000, 724000, 1448000), duplex=duplex) == \
        pytest.approx(1.514 + 1.514)


def test_duplex_factor_interpolates_in_log_rate_and_holds_the_nearest_outside():
    duplex = [(1e7, 0.8), (1e9, 1.0)]
    assert timemodel.duplex_factor(1e8, duplex) == pytest.approx(0.9)  # halfway in log(rate)
    assert timemodel.duplex_factor(1e6, duplex) == 0.8 and timemodel.duplex_factor(1e10, duplex) == 1.0
    assert timemodel.duplex_factor(None, duplex) == 1.0 and timemodel.duplex_factor(1e8, None) == 1.0


def test_duplex_calibration_is_read_from_bench_link_duplex_json(tmp_path):
    path = tmp_path / "duplex.json"
    path.write_text('[{"rate_bit_s": 2e7, "both_over_one": 0.9}, {"rate_bit_s": 1e8, "both_over_one": 0.98}]')
    assert timemodel.load_duplex(str(path)) == [(2e7, 0.9), (1e8, 0.98)]
    path.write_text('[{"rate": 1}]')
    with pytest.raises(timemodel.UserError, match="not a bench.link_duplex result"):
        timemodel.load_duplex(str(path))
    with pytest.raises(timemodel.UserError, match="no such duplex calibration"):
        timemodel.load_duplex(str(tmp_path / "absent.json"))


def test_unshaped_links_cost_no_time():
    assert transfer_seconds("split", links(1448000, 1448000, 1448000, 1448000, rate=None)) == 0.0


def record(method="split", hospitals=2, schedule="parallel", comm_extra=None, train_s=7.056, steps=2, rate=MBIT8):
    tcp = {"hospital1": {"sent": 2 * 1448000, "received": 2 * 724000},
           "hospital2": {"sent": 2 * 724000, "received": 2 * 1448000},
           "server": {"sent": 2 * 2172000, "received": 2 * 2172000}}
    return {
        "status": "ok", "run_id": "r", "steps": steps, "train_time_s": train_s, "steps_per_epoch": 100,
        "config": {"method": method, "hospitals": hospitals, "schedule": schedule, "model": "m", "width": 1.0,
                   "run_key": "k" + str(rate), "out": "/tmp/x"},
        "comm": {"phases": {"train": {"tcp_bytes": tcp}}, **(comm_extra or {})},
        "wan": {"rate_bit_s": rate, "server_rate_bit_s": None,
                "links": {"server": {"rate_bit_s": None}, "hospital1": {"rate_bit_s": rate},
                          "hospital2": {"rate_bit_s": rate}}},
    }


def test_round_trips_fall_back_to_two_and_say_so():
    trips, source = timemodel.round_trips(record())
    assert trips == 2 and "2 assumed" in source
    trips, source = timemodel.round_trips(record(comm_extra={"round_trips_per_step": 1}))
    assert trips == 1 and "record" in source
    assert timemodel.round_trips(record(hospitals=3, schedule="sequential"))[0] == 6


def test_running_ahead_hides_all_but_one_round_trip_in_k_plus_one():
    r = record("split-localloss", comm_extra={"round_trips_per_step": 1})
    assert timemodel.round_trips(r)[0] == 1  # --run-ahead 0 (absent): lockstep, one round trip a step
    r["config"]["run_ahead"] = 3
    trips, source = timemodel.round_trips(r)
    assert trips == 0.25 and "--run-ahead 3" in source


def test_ddp_round_trips_are_buckets_times_ring_hops():
    # 58,913,064 gradient bytes: a 1 MiB first bucket and 3 buckets of up to 25 MiB; a 4-rank ring: 3 RTTs each.
    trips, _ = timemodel.round_trips(record("ddp", 4, comm_extra={"gradient_bytes_per_step": 58913064}))
    assert trips == 4 * 3


def test_fedavg_round_trips_are_one_ring_all_reduce_per_round():
    # 2 rounds over 2 steps, 4 hospitals: a round's all-reduce is 3 RTTs, so 3 a step.
    trips, source = timemodel.round_trips(record("fedavg", 4, comm_extra={"rounds": 2}))
    assert trips == 3 and "round" in source
    assert timemodel.round_trips(record("fedavg", 4, comm_extra={"rounds": 1}, steps=10))[0] == pytest.approx(0.3)


def test_fedavg_transfer_is_an_all_reduce_like_ddp():
    # Both directions at once (the busier one counts), at the duplex goodput, unlike split learning.
    assert transfer_seconds("fedavg", links(1448000, 1448000, 724000, 1448000)) == pytest.approx(1.514)
    assert transfer_seconds("fedavg", links(1448000, 1448000, 724000, 1448000), duplex=[(MBIT8, 0.5)]) == \
        pytest.approx(2 * 1.514)


def test_check_against_a_run_and_its_unshaped_reference():
    shaped = record()  # 7.056 s over 2 steps = 3.528 s a step
    reference = record(train_s=1.0, rate=None)  # 0.5 s a step of compute
    assert timemodel.find_reference([reference, shaped], shaped) is reference
    result = timemodel.check(shaped, reference)
    assert result["compute_s"] == pytest.approx(0.5)
    assert result["transfer_s"] == pytest.approx(3.028)
    assert result["predicted_s"] == pytest.approx(3.528)
    assert result["error"] == pytest.approx(0.0, abs=1e-12) and result["within_target"]
    slow = timemodel.check(record(train_s=2 * 3.528 / 0.8), reference)  # measured 25 % above the model
    assert slow["error"] == pytest.approx(-0.2) and not slow["within_target"]


def test_a_reference_must_be_the_same_setting():
    other = record(train_s=1.0, rate=None)
    other["config"]["hospitals"] = 4
    assert timemodel.find_reference([other], record()) is None


def test_a_shaped_run_is_checked_against_a_reference_of_its_own_machine():
    # Two VMs alike in name and cores computed the same step 1.5x apart (docs/variants.md, premise regime): a
    # newer reference from another CPU must not become a shaped run's clock while one of its own CPU exists.
    here, there = {"capability": "AVX512", "isa": ["amx_bf16"]}, {"capability": "AVX2", "isa": []}
    own, newer = record(train_s=1.0, rate=None), record(train_s=0.6, rate=None)
    shaped = record()
    own["cpu"], newer["cpu"], shaped["cpu"] = here, there, here
    assert timemodel.find_reference([own, newer], shaped) is own
    shaped["cpu"] = {"capability": "DEFAULT", "isa": []}  # none of its machine: the newest of the setting
    assert timemodel.find_reference([own, newer], shaped) is newer


def test_projection_adds_round_trips_times_rtt_per_step_and_scales_to_an_epoch():
    shaped, reference = record(), record(train_s=1.0, rate=None)
    projection = timemodel.project(shaped, timemodel.check(shaped, reference))
    assert projection["s_per_step"]["0ms"] == pytest.approx(3.528)
    assert projection["s_per_step"]["100ms"] == pytest.approx(3.528 + 2 * 0.1)
    assert projection["s_per_epoch"]["10ms"] == pytest.approx(100 * (3.528 + 2 * 0.01))
    assert "projection" in projection["note"]


def reference(method, compute_s, up, down, steps=2):
    r = record(method, train_s=compute_s * steps, steps=steps, rate=None)
    r["comm"]["phases"]["train"]["tcp_bytes"] = {h: {"sent": up * steps, "received": down * steps}
                                                for h in ("hospital1", "hospital2")}
    del r["wan"]["links"]["server"]
    return r


def test_crossover_is_where_compute_saved_equals_transfer_lost():
    # split: 2 s compute + 2 x 1,514,000 wire bytes (up, then down); DDP: 1 s + 4,542,000 both ways at once.
    # 2 + 24.224e6 / r = 1 + 36.336e6 / r at r = 12.112 Mbit/s; below it split is faster.
    split, ddp = reference("split", 2.0, 1448000, 1448000), reference("ddp", 1.0, 4344000, 4344000)
    assert timemodel.at_rate(split, 12.112e6) == pytest.approx(4.0)
    assert timemodel.at_rate(ddp, 12.112e6) == pytest.approx(4.0)
    cross = timemodel.crossover(split, ddp)
    assert cross["rate_bit_s"] == pytest.approx(12.112e6, rel=1e-9) and cross["split_faster_below"]


def test_no_crossover_when_one_method_wins_everywhere():
    split, ddp = reference("split", 2.0, 4344000, 4344000), reference("ddp", 1.0, 4344000, 4344000)
    assert timemodel.crossover(split, ddp) == {"rate_bit_s": None, "winner": "ddp", "range_bit_s": [1e5, 1e11]}


def test_a_codec_reference_is_its_own_setting_and_gets_its_own_crossover():
    # Float32 split crosses DDP at 12.112 Mbit/s (above); an fp8 cut (a quarter of the bytes, more
    # compute) must not replace it, and crosses where 2.5 + 6.056e6 / r = 1 + 36.336e6 / r: 20.187 Mbit/s.
    split, ddp = reference("split", 2.0, 1448000, 1448000), reference("ddp", 1.0, 4344000, 4344000)
    fp8 = reference("split", 2.5, 362000, 362000)
    for r in (split, ddp, fp8):
        r["config"].update(batch_size=128, codec="fp8" if r is fp8 else "none")
    (entry,) = timemodel.projections([split, ddp, fp8], rtts_s=(0.0,))
    assert sorted(entry["methods"]) == ["ddp", "split", "split+fp8"]
    assert entry["crossover"]["0ms"]["rate_bit_s"] == pytest.approx(12.112e6, rel=1e-9)
    assert entry["crossover_split+fp8"]["0ms"]["rate_bit_s"] == pytest.approx(20.187e6, rel=1e-4)


def test_ddp_buckets_cross_the_link_in_order_each_once_it_is_ready():
    # 1 s of transfer; the last bucket is ready when the backward pass ends (t = 0).
    assert timemodel.exposed_transfer(1.0, None) == 1.0  # no timings: nothing hidden
    two = [{"bytes": 40, "lead_s": 0.3}, {"bytes": 60, "lead_s": 0.0}]
    # The first bucket crosses from -0.3 to +0.1, the second from +0.1 to +0.7.
    assert timemodel.exposed_transfer(1.0, two) == pytest.approx(0.7)
    # A longer lead cannot hide more than the first bucket's own 0.4 s.
    assert timemodel.exposed_transfer(1.0, [{**two[0], "lead_s": 5.0}, two[1]]) == pytest.approx(0.6)
    three = [{"bytes": 20, "lead_s": 1.0}, {"bytes": 30, "lead_s": 0.1}, {"bytes": 50, "lead_s": 0.0}]
    # -1.0..-0.8, then -0.1..0.2 (ready at -0.1), then 0.2..0.7 (the link is busy until 0.2).
    assert timemodel.exposed_transfer(1.0, three) == pytest.approx(0.7)


def test_check_credits_ddp_overlap_from_the_run_or_its_reference_and_never_split():
    halves = {"buckets": [{"bytes": 1, "lead_s": 10.0}, {"bytes": 1, "lead_s": 0.0}]}
    reference = record("ddp", train_s=1.0, rate=None)  # 0.5 s a step of compute
    # DDP's busier direction: 1,448,000 B = 1.514 s a step; half of it crosses during the backward pass.
    timed = timemodel.check(record("ddp", comm_extra=halves), reference)
    assert timed["transfer_s"] == pytest.approx(1.514) and timed["overlap_s"] == pytest.approx(0.757)
    assert timed["predicted_s"] == pytest.approx(0.5 + 0.757) and "this run" in timed["overlap_source"]
    from_reference = timemodel.check(record("ddp"), record("ddp", train_s=1.0, rate=None, comm_extra=halves))
    assert from_reference["predicted_s"] == pytest.approx(0.5 + 0.757) and "reference" in from_reference["overlap_source"]
    untimed = timemodel.check(record("ddp"), reference)
    assert untimed["overlap_s"] == 0 and untimed["predicted_s"] == pytest.approx(0.5 + 1.514)
    split = timemodel.check(record("split", comm_extra=halves), record("split", train_s=1.0, rate=None))
    assert split["overlap_s"] == 0 and split["predicted_s"] == pytest.approx(3.528)
    # The same credit in the projections at other rates (at_rate), from the reference's timings.
    assert timemodel.at_rate(record("ddp", train_s=1.0, comm_extra=halves), MBIT8) == pytest.approx(0.5 + 0.757)
    assert timemodel.at_rate(record("ddp", train_s=1.0), MBIT8, buckets=halves["buckets"]) == pytest.approx(0.5 + 0.757)


def test_ddp_steady_steps_are_checked_from_the_reference_and_from_the_runs_own_compute():
    halves = {"buckets": [{"bytes": 1, "lead_s": 10.0}, {"bytes": 1, "lead_s": 0.0}]}  # 0.757 s exposed (above)
    # The shaped run computed 0.9 s a step (it was slower than its reference) and waited 0.8 s after its last bucket.
    shaped = record("ddp", comm_extra={**halves, "step_timing": {"timed_steps": 3, "step_s": 1.7,
                                                                 "compute_s": 0.9, "allreduce_wait_s": 0.8}})
    reference = record("ddp", train_s=1.0, rate=None,
                       comm_extra={"step_timing": {"timed_steps": 3, "step_s": 0.6, "compute_s": 0.58,
                                                   "allreduce_wait_s": 0.02}})
    steady = timemodel.check(shaped, reference)["steady"]
    assert steady["measured_s"] == 1.7 and steady["timed_steps"] == 3
    # From the reference's steady step (0.6 s, not its whole-run 0.5 s): off by the compute drift.
    assert steady["reference"]["predicted_s"] == pytest.approx(0.6 + 0.757)
    assert steady["reference"]["error"] == pytest.approx((0.6 + 0.757) / 1.7 - 1)
    # From the run's own compute: only the wait is predicted.
    own = steady["own_compute"]
    assert own["predicted_wait_s"] == pytest.approx(0.757) and own["measured_wait_s"] == 0.8
    assert own["error"] == pytest.approx((0.9 + 0.757) / 1.7 - 1)
    assert steady["compute_ratio"] == pytest.approx(0.9 / 0.58)
    assert timemodel.check(record("ddp", comm_extra=halves), reference)["steady"] is None  # untimed run


def test_fedavg_rounds_are_checked_like_ddp_steps_with_a_rounds_transfer():
    # 2 steps, 1 round: the round moves the model once, the 1.514 s a step the bytes per step say, twice.
    timing = {"timed_rounds": 4, "round_s": 4.0, "compute_s": 1.0, "allreduce_wait_s": 3.1}
    shaped = record("fedavg", comm_extra={"rounds": 1, "round_timing": timing})
    reference = record("fedavg", train_s=1.0, rate=None, comm_extra={
        "rounds": 1, "round_timing": {"timed_rounds": 4, "round_s": 1.2, "compute_s": 1.15, "allreduce_wait_s": 0.05}})
    steady = timemodel.check(shaped, reference)["steady"]
    assert steady["unit"] == "round" and steady["timed_steps"] == 4 and steady["measured_s"] == 4.0
    assert steady["reference"]["predicted_s"] == pytest.approx(1.2 + 2 * 1.514)
    own = steady["own_compute"]
    assert own["predicted_wait_s"] == pytest.approx(2 * 1.514) and own["measured_wait_s"] == 3.1
    assert own["error"] == pytest.approx((1.0 + 2 * 1.514) / 4.0 - 1)
    assert steady["compute_ratio"] == pytest.approx(1.0 / 1.15)
