"""bench.time_to_accuracy with known numbers: accuracy curves on a clock of compute + bytes / rate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import time_to_accuracy as tta
from bench import timemodel

MBIT8 = 8e6  # 1 MB/s
WIRE = 1514 / 1448  # bench.timemodel's Ethernet/IP/TCP framing
SEGMENT = 1448000  # payload bytes per step: 1.514 s on a 1 MB/s wire


def convergence_record(method="split", accs=(0.6, 0.72, 0.81), steps=10, up=SEGMENT, down=SEGMENT, **cfg):
    n = len(accs)
    tcp = {f"hospital{i}": {"sent": up * steps * n, "received": down * steps * n} for i in (1, 2)}
    tcp["server"] = {"sent": 2 * down * steps * n, "received": 2 * up * steps * n}
    return {
        "status": "ok", "steps": steps * n, "steps_per_epoch": steps, "train_time_s": 999.0, "final_test_acc": accs[-1],
        "config": {"method": method, "hospitals": 2, "schedule": "parallel", "model": "vgg11", "width": 0.25,
                   "partition": "iid", "epochs": n, "run_key": f"conv-{method}", "l1": "independent", **cfg},
        "epochs": [{"epoch": i + 1, "steps": steps, "train_time_s": 333.0, "test_acc_mean": a, "test_acc_min": a - 0.01}
                   for i, a in enumerate(accs)],
        "comm": {"phases": {"train": {"tcp_bytes": tcp}}, "round_trips_per_step": 1, "rounds": n},
    }


def shaped_record(method="split", rate=None, train_s=5.0, steps=10, acc=0.6, **cfg):
    record = convergence_record(method, accs=(acc,), steps=steps, **cfg)
    record["config"].update(run_key=f"{method}-{rate}", max_steps=steps, threads=1, epochs=3)
    record["train_time_s"] = train_s
    record["epochs"][0]["train_time_s"] = train_s
    record["wan"] = {"rate_bit_s": rate, "server_rate_bit_s": None,
                     "links": {"hospital1": {"rate_bit_s": rate}, "hospital2": {"rate_bit_s": rate}}}
    return record


def test_split_step_is_compute_then_upload_then_download():
    record = convergence_record()
    assert timemodel.at_rate(record, MBIT8, compute_s=0.5) == pytest.approx(0.5 + 2 * 1.514)
    assert timemodel.at_rate(record, None, compute_s=0.5) == pytest.approx(0.5)


def test_ddp_step_sends_and_receives_at_once():
    record = convergence_record("ddp")
    assert timemodel.at_rate(record, MBIT8, compute_s=0.5) == pytest.approx(0.5 + 1.514)


def test_curve_accumulates_hours_and_the_target_is_the_first_epoch_reaching_it():
    record = convergence_record()  # 10 steps an epoch, 3.528 s a step at 1 MB/s
    points = tta.curve(record, 0.5, MBIT8)
    assert [p["hours"] for p in points] == pytest.approx([35.28 / 3600, 2 * 35.28 / 3600, 3 * 35.28 / 3600])
    assert tta.hours_to(points, 0.72) == pytest.approx(2 * 35.28 / 3600)  # reached exactly at epoch 2
    assert tta.hours_to(points, 0.75) == pytest.approx(3 * 35.28 / 3600)
    assert tta.hours_to(points, 0.9) is None  # never within the run


def test_the_method_that_reaches_the_target_in_fewer_epochs_can_lose_on_a_slow_link():
    # Split reaches 0.8 in 2 epochs at 3.528 s a step; DDP in 3 epochs at 2.014 s a step: faster in time.
    split = convergence_record("split", accs=(0.7, 0.8, 0.82))
    ddp = convergence_record("ddp", accs=(0.6, 0.7, 0.8))
    refs = {(2, "vgg11", 0.25, "batch", "parallel", "split"): shaped_record("split", train_s=5.0),
            (2, "vgg11", 0.25, "batch", "parallel", "ddp"): shaped_record("ddp", train_s=5.0)}
    rows = {r["method"]: r for r in tta.project([split, ddp], refs, rates=(MBIT8, None), targets=(0.8,))}
    assert rows["split"]["rates"]["8mbit"]["hours_to"]["0.8"] == pytest.approx(20 * 3.528 / 3600)
    assert rows["ddp"]["rates"]["8mbit"]["hours_to"]["0.8"] == pytest.approx(30 * 2.014 / 3600)
    assert rows["split"]["rates"]["unshaped"]["hours_to"]["0.8"] < rows["ddp"]["rates"]["unshaped"]["hours_to"]["0.8"]


def test_compute_per_step_comes_from_the_unshaped_full_epoch_run():
    full = shaped_record("split", rate=None, train_s=5.0)
    short = shaped_record("split", rate=None, train_s=1.0, steps=4)
    short["steps_per_epoch"] = 10  # stopped after 4 of an epoch's 10 steps
    shaped = shaped_record("split", rate=MBIT8, train_s=40.0)
    refs = tta.compute_references([full, short, shaped])
    assert list(refs.values()) and all(ref is full for ref in refs.values()) and (2, "vgg11", 0.25, "batch", "parallel", "split") in refs
    (row,) = tta.project([convergence_record()], refs, rates=(None,))
    assert row["compute_s_per_step"] == pytest.approx(0.5)  # not the convergence run's 333 s / 10 steps


def test_a_sequential_curve_never_takes_a_parallel_reference():
    # A sequential step is one hospital's batch: the parallel split reference's seconds a step would put it on
    # a clock about 4x too slow, and the variant's name does not say the schedule.
    sequential = convergence_record(schedule="sequential", run_key="conv-seq")
    refs = tta.compute_references([shaped_record("split", None, 5.0)])
    assert tta.project([sequential], refs, rates=(None,)) == []
    (left,) = tta.unprojected([sequential], refs)
    assert "sequential schedule" in left["why"]
    own = tta.compute_references([shaped_record("split", None, 5.0), shaped_record("split", None, 1.0, schedule="sequential")])
    (row,) = tta.project([sequential], own, rates=(None,))
    assert row["compute_s_per_step"] == pytest.approx(0.1)


def test_repeated_references_give_the_median_of_the_newest_machines_repeats():
    # Three repeats on one machine (0.5, 0.9 and 0.6 s a step, in that order): the median, not the newest.
    repeats = [shaped_record("split", None, t) for t in (5.0, 9.0, 6.0)]
    refs = tta.compute_references(repeats)
    assert tta.reference_for(refs, convergence_record()["config"]) is repeats[2]
    (row,) = tta.project([convergence_record()], refs, rates=(None,), shaped=repeats)
    assert row["compute_s_per_step"] == pytest.approx(0.6)
    assert row["compute_repeats_s_per_step"] == pytest.approx([0.5, 0.6, 0.9])
    # An even count takes the lower of the middle two.
    assert tta.reference_for(tta.compute_references(repeats[:2]), convergence_record()["config"]) is repeats[0]
    # A newer machine's single reference is the clock: the older machine's repeats are not mixed in.
    newer = shaped_record("split", None, 2.0)
    newer["cpu"] = {"key": "fast-cpu"}
    refs = tta.compute_references([*repeats, newer])
    (row,) = tta.project([convergence_record()], refs, rates=(None,), shaped=[*repeats, newer])
    assert row["compute_s_per_step"] == pytest.approx(0.2) and row["compute_repeats_s_per_step"] == [pytest.approx(0.2)]


def test_a_curve_takes_its_compute_from_a_reference_of_its_own_model_width():
    # premise.toml (VGG-11 x0.5) beside convergence.toml (x0.25): each curve on its own width's clock.
    narrow, wide = convergence_record(), convergence_record(width=0.5)
    refs = tta.compute_references([shaped_record("split", train_s=5.0), shaped_record("split", train_s=20.0, width=0.5)])
    rows = tta.project([narrow, wide], refs, rates=(None,))
    assert [r["compute_s_per_step"] for r in rows] == [pytest.approx(0.5), pytest.approx(2.0)]
    # No reference at x0.5: no projection, rather than one on x0.25's clock.
    only_narrow = tta.compute_references([shaped_record("split", train_s=5.0)])
    assert [r["width"] for r in tta.project([narrow, wide], only_narrow, rates=(None,))] == [0.25]


def test_checks_set_a_shaped_first_epoch_against_its_projection_and_the_curve():
    conv = convergence_record()
    reference = shaped_record("split", rate=None, train_s=5.0)
    shaped = shaped_record("split", rate=MBIT8, train_s=40.0, acc=0.61)
    (check,) = tta.checks([conv], [reference, shaped], tta.compute_references([reference, shaped]))
    epoch = check["epoch1"]
    assert epoch["predicted_s"] == pytest.approx(35.28) and epoch["measured_s"] == 40.0
    assert epoch["error"] == pytest.approx(35.28 / 40 - 1)
    assert (epoch["acc_shaped"], epoch["acc_convergence"]) == (0.61, 0.6)
    assert check["step_check"]["predicted_s"] == pytest.approx(3.528)


def test_checks_of_one_setting_on_two_machines_name_their_machines():
    # wan_tta.toml's first epochs (records from before the cpu field) and wan_tta_machine.toml's of the same
    # setting are two rows of one table: each says which machine it measured, and is set against its own.
    conv, old_ref, old = convergence_record(), shaped_record("split", None, 5.0), shaped_record("split", MBIT8, 40.0)
    new_ref, new = shaped_record("split", None, 1.0), shaped_record("split", MBIT8, 30.0)
    for r in (new_ref, new):
        r["cpu"] = {"key": "fast-cpu", "model": "Xeon"}
    shaped = [old_ref, old, new_ref, new]
    checks = tta.checks([conv], shaped, tta.compute_references(shaped))
    assert [c["machine"] for c in checks] == ["earlier VM", "fast-cpu"]
    assert [c["step_check"]["compute_s"] for c in checks] == pytest.approx([0.5, 0.1])
    assert timemodel.machine_name({"cpu": {"model": "Xeon", "capability": "AVX512"}}) == "Xeon, AVX512"


def test_a_newer_record_holding_a_tuple_option_at_its_default_is_the_same_setting():
    # A curve written before --capture-epochs existed lacks it (its default is the tuple ()); a shaped run
    # written since holds it as JSON's []: the same setting, so its first epoch is set against the curve.
    conv = convergence_record()
    reference = shaped_record("split", rate=None, train_s=5.0, capture_epochs=[])
    shaped = shaped_record("split", rate=MBIT8, train_s=40.0, acc=0.6, capture_epochs=[])
    (check,) = tta.checks([conv], [reference, shaped], tta.compute_references([reference, shaped]))
    assert check["epoch1"]["acc_convergence"] == 0.6


def test_a_shaped_run_of_another_setting_is_not_matched_to_the_curve():
    conv = convergence_record(cut=2)
    reference = shaped_record("split", rate=None, cut=1)
    shaped = shaped_record("split", rate=MBIT8, cut=1)
    (check,) = tta.checks([conv], [reference, shaped], tta.compute_references([reference, shaped]))
    assert "epoch1" not in check


def test_each_number_of_hospitals_has_its_own_curves_and_compute_and_only_unshaped_whole_runs_are_curves():
    # wan_tta_n2.jsonl holds N = 2's whole schedules beside one-epoch runs, and is read with N = 4's files.
    two, four = convergence_record(), convergence_record(accs=(0.5, 0.6, 0.7))
    four["config"]["hospitals"] = 4
    ref_two, ref_four = shaped_record("split", train_s=5.0), shaped_record("split", train_s=20.0)
    ref_four["config"]["hospitals"] = 4
    first_epoch = shaped_record("split", rate=MBIT8, train_s=40.0, acc=0.6)  # N = 2, one epoch of 3
    refs = tta.compute_references([ref_two, ref_four, first_epoch])
    over_links = full_record("split", MBIT8)  # a whole schedule over shaped links checks a curve, is not one
    projected = tta.project([two, four, first_epoch, ref_two, over_links], refs, rates=(None,))
    assert [r["run_key"] for r in projected] == ["conv-split", "conv-split"]  # the one-epoch runs drew no curve
    rows = {r["hospitals"]: r for r in projected}
    assert rows[2]["compute_s_per_step"] == pytest.approx(0.5) and rows[4]["compute_s_per_step"] == pytest.approx(2.0)
    assert rows[4]["rates"]["unshaped"]["hours_to"]["0.7"] == pytest.approx(30 * 2.0 / 3600)
    (check,) = tta.checks([four, two, first_epoch, over_links], [ref_two, ref_four, first_epoch], refs)
    assert check["hospitals"] == 2 and check["epoch1"]["predicted_s"] == pytest.approx(35.28)  # N = 2's compute
    assert check["epoch1"]["acc_convergence"] == 0.6  # N = 2's curve, not N = 4's (0.5)


def full_record(method="split", rate=MBIT8, epoch_s=(40.0, 50.0, 60.0), accs=(0.6, 0.72, 0.81), evaluated=(1, 2, 3)):
    """A whole-schedule shaped run of convergence_record's setting (3 epochs of 10 steps)."""
    record = convergence_record(method, accs=accs)
    record["config"].update(run_key=f"full-{method}", threads=1, eval_every=2)
    for e, secs in zip(record["epochs"], epoch_s):
        e["train_time_s"] = secs
        if e["epoch"] not in evaluated:
            del e["test_acc_mean"], e["test_acc_min"]
    record["train_time_s"] = sum(epoch_s)
    record["wan"] = {"rate_bit_s": rate, "server_rate_bit_s": None,
                     "links": {"hospital1": {"rate_bit_s": rate}, "hospital2": {"rate_bit_s": rate}}}
    return record


def test_a_whole_schedule_over_the_link_is_measured_hours_against_the_projection():
    conv, reference = convergence_record(), shaped_record("split", None, 5.0)  # 0.5 s a step of compute
    refs = tta.compute_references([reference])
    (c,) = tta.full_checks([conv], [full_record(evaluated=(2,))], refs)
    # Epoch 2 evaluated and equal to the curve: epochs 1 and 3 carry the curve's accuracy on the run's own clock.
    assert c["accuracy_matches_curve"] and c["evaluated_epochs"] == [2]
    assert [p["hours"] for p in c["measured_curve"]] == pytest.approx([40 / 3600, 90 / 3600, 150 / 3600])
    assert [p["evaluated"] for p in c["measured_curve"]] == [False, True, False]
    # 0.8 is first reached at epoch 3: measured 150 s, projected 3 epochs x 10 steps x 3.528 s.
    assert c["hours_to"]["0.8"]["measured"] == pytest.approx(150 / 3600)
    assert c["hours_to"]["0.8"]["error"] == pytest.approx(3 * 35.28 / 150 - 1)
    assert c["hours_to"]["0.7"]["measured"] == pytest.approx(90 / 3600)
    assert c["hours_total"]["error"] == pytest.approx(3 * 35.28 / 150 - 1)
    # An evaluated epoch off the curve: the curve's accuracy is not lent to the other epochs.
    (off,) = tta.full_checks([conv], [full_record(accs=(0.6, 0.70, 0.81), evaluated=(2, 3))], refs)
    assert not off["accuracy_matches_curve"] and [p["epoch"] for p in off["measured_curve"]] == [2, 3]
    assert off["hours_to"]["0.7"]["measured"] == pytest.approx(90 / 3600)
    assert off["hours_to"]["0.75"]["measured"] == pytest.approx(150 / 3600)


def test_a_whole_schedule_is_checked_against_its_own_machines_reference():
    # Two machines' references of one variant: the newer (a faster CPU, 0.1 s a step) is the projections' clock;
    # the whole schedule ran on the older (no cpu field, 0.5 s a step) and is checked against that one.
    conv, old = convergence_record(), shaped_record("split", None, 5.0)
    new = shaped_record("split", None, 1.0)
    new["cpu"] = {"key": "fast-cpu"}
    refs = tta.compute_references([old, new])
    assert tta.reference_for(refs, conv["config"]) is new
    (c,) = tta.full_checks([conv], [full_record(evaluated=(2,))], refs, shaped=[old, new])
    assert c["compute_s_per_step"] == pytest.approx(0.5)
    assert c["hours_to"]["0.8"]["error"] == pytest.approx(3 * 35.28 / 150 - 1)
    # Without the records, only the newest is known: the check would set another CPU's compute against it.
    (other,) = tta.full_checks([conv], [full_record(evaluated=(2,))], refs)
    assert other["compute_s_per_step"] == pytest.approx(0.1)


def test_an_unshaped_whole_schedule_is_a_second_compute_reference():
    conv, reference = convergence_record(), shaped_record("split", None, 5.0)  # one epoch: 0.5 s a step
    unshaped = full_record(rate=None, epoch_s=(4.0, 4.0, 4.0))  # 0.4 s a step over the whole schedule
    unshaped["config"]["run_key"] = "full-unshaped"
    shaped = full_record(evaluated=(2,))
    checks = tta.full_checks([conv], [unshaped, shaped], tta.compute_references([reference]))
    assert [c["rate_bit_s"] for c in checks] == [None, MBIT8]
    # The unshaped run is checked against the one-epoch reference, and is nobody's reference for itself.
    assert checks[0]["hours_total"]["error"] == pytest.approx(3 * 10 * 0.5 / 12 - 1) and "whole_reference" not in checks[0]
    # The shaped run: from 0.5 s of compute a step (the one-epoch run) and from 0.4 s (the whole schedule).
    transfer = 3.528 - 0.5
    whole = checks[1]["whole_reference"]
    assert whole["compute_s_per_step"] == pytest.approx(0.4) and "full-unshaped" in whole["compute_source"]
    assert whole["hours_to"]["0.8"]["error"] == pytest.approx(30 * (0.4 + transfer) / 150 - 1)
    assert checks[1]["hours_to"]["0.8"]["error"] == pytest.approx(30 * 3.528 / 150 - 1)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bench.time_to_accuracy", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_writes_curves_and_checks(tmp_path):
    conv, shaped = tmp_path / "conv.jsonl", tmp_path / "tta.jsonl"
    conv.write_text(json.dumps(convergence_record()) + "\n")
    shaped.write_text("\n".join(json.dumps(r) for r in (shaped_record("split", None, 5.0),
                                                       shaped_record("split", MBIT8, 40.0))) + "\n")
    out = tmp_path / "tta.json"
    proc = run_cli(str(conv), "--shaped", str(shaped), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["projections"][0]["rates"]["20mbit"]["s_per_step"] == pytest.approx(0.5 + 2 * SEGMENT * WIRE * 8 / 20e6)
    assert data["checks"][0]["epoch1"]["measured_s"] == 40.0
    assert "epoch 1 from the curve's run" in proc.stdout


def test_cli_without_an_unshaped_run_is_one_line(tmp_path, capsys):
    conv, shaped = tmp_path / "conv.jsonl", tmp_path / "tta.jsonl"
    conv.write_text(json.dumps(convergence_record()) + "\n")
    shaped.write_text(json.dumps(shaped_record("split", MBIT8)) + "\n")
    proc = run_cli(str(conv), "--shaped", str(shaped))  # the CLI itself once, exit code and all
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no unshaped one-epoch run" in proc.stderr

    def refused(*args) -> str:  # the rest in this process: the same main(), without 2.5 s of imports each
        assert tta.main([str(conv), "--shaped", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "no such results file" in refused(tmp_path / "absent.jsonl")
    shaped.write_text(json.dumps(shaped_record("split", None)) + "\n")
    assert "negative" in refused(shaped, "--rtt-ms", "-5")
    assert "no such duplex calibration" in refused(shaped, "--duplex", tmp_path / "absent.json")
    assert "no such results file" in refused(shaped, "--full", tmp_path / "absent.jsonl")


def test_figure_draws_the_curves_and_the_measured_first_epoch(tmp_path):
    from plots import wan as wan_plots

    curves = [convergence_record("split"), convergence_record("ddp")]
    shaped = [shaped_record("split", None, 5.0), shaped_record("ddp", None, 5.0), shaped_record("split", 100e6, 9.0)]
    paths = wan_plots.fig_time_to_accuracy(curves, shaped, tmp_path, "tta", full=[full_record("split", 100e6)])
    assert sorted(p.name for p in paths) == ["tta.pdf", "tta.png"] and all(p.stat().st_size > 10000 for p in paths)
    assert wan_plots.fig_time_to_accuracy(curves, [], tmp_path, "none") == []  # no compute reference: no figure


def test_a_variant_takes_its_own_compute_reference_and_else_its_methods():
    one_round = shaped_record("fedavg", None, 5.0, local_steps=10000)  # 0.5 s a step
    ten_steps = shaped_record("fedavg", None, 8.0, local_steps=10)  # 0.8 s a step
    refs = tta.compute_references([one_round, ten_steps])
    rows = tta.project([convergence_record("fedavg", local_steps=10000), convergence_record("fedavg", local_steps=10),
                        convergence_record("fedavg", local_steps=5)], refs, rates=(None,))
    assert [r["compute_s_per_step"] for r in rows] == pytest.approx([0.5, 0.8, 0.8])  # 5 steps: the newest fedavg


def test_a_compressed_cut_takes_the_compute_of_its_cut_and_is_not_projected_without_one():
    plain = shaped_record("split", None, 5.0)  # 0.5 s a step
    bottleneck = shaped_record("split", None, 3.0, bottleneck=16)  # 0.3 s a step, independent L1s
    refs = tta.compute_references([plain, bottleneck])
    averaged = convergence_record("split", l1="average", bottleneck=16, partition="dirichlet", alpha=0.3)
    topk = convergence_record("split", codec="topk", topk_ratio=64)
    group = convergence_record("split", l1="average", norm="group")
    curves = [averaged, topk, group, convergence_record("split", l1="average")]
    rows = tta.project(curves, refs, rates=(None,))
    # Another L1 handling with the same cut: that cut's compute; plain split with averaged L1s: the method's.
    assert [(r["variant"], r["compute_s_per_step"]) for r in rows] == [
        ("split (L1 averaged every step, bottleneck 1/16)", pytest.approx(0.3)),
        ("split (L1 averaged every step)", pytest.approx(0.5))]
    # Top-k 1/64 computes what no reference does, and a GroupNorm model is another model: named, not projected.
    assert [u["variant"] for u in tta.unprojected(curves, refs)] == [
        "split (independent L1, top-k 1/64)", "split (L1 averaged every step, GroupNorm)"]
