"""Committed results: every model JSON and table regenerates from the records in results/, and what
the records show still holds (time model checks, the time-to-accuracy verdicts, the privacy tables).

Unit tests of the same code are in test_timemodel.py, test_time_to_accuracy.py, test_label_leakage.py
and test_shared_init.py; the runs over namespaces that make such records are in test_wan.py.
"""

from __future__ import annotations

import json

from bench import time_to_accuracy as tta
from bench import timemodel
from conftest import REPO


def regenerated_model(runs: str, model: str, tmp_path) -> dict:
    """bench.timemodel on a committed results file; its output must equal the committed model file."""
    assert timemodel.main([str(REPO / "results" / runs), "--duplex", str(REPO / "results" / "link_duplex.json"),
                           "--json", str(tmp_path / model)]) == 0
    assert (tmp_path / model).read_text() == (REPO / "results" / model).read_text(), \
        (f"run `python -m bench.timemodel results/{runs} --duplex results/link_duplex.json "
         f"--json results/{model}` and commit")
    return json.loads((tmp_path / model).read_text())


def test_time_model_and_figure_regenerate_from_the_committed_results(tmp_path):
    from plots import wan as wan_plots

    results = REPO / "results" / "wan.jsonl"
    regenerated_model("wan.jsonl", "wan_model.json", tmp_path)
    assert wan_plots.main(["--wan-out-dir", str(tmp_path / "fig")]) == 0
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {p.name for p in (REPO / "plots" / "wan").iterdir()}
    # Every shaped run carries the model's check, written when it ran.
    shaped = [r for r in timemodel.load(str(results)) if not timemodel.is_reference(r)]
    assert shaped and all("error" in r["time_model"] for r in shaped)


def test_ddp_overlap_at_paper_scale_regenerates_and_holds_on_every_run(tmp_path):
    checks = [c["model_check"] for c in regenerated_model("wan_ddp.jsonl", "wan_ddp_model.json", tmp_path)["checks"]]
    assert len(checks) == 12 and all(c["steady"] and c["steady"]["timed_steps"] == 3 for c in checks)
    # From each run's own compute, the predicted wait after the backward pass (bytes / rate less what the
    # buckets hide) gives every step within the 15 % target.
    own = [c["steady"]["own_compute"] for c in checks]
    assert all(abs(o["error"]) <= timemodel.TARGET_ERROR for o in own)
    # The overlap is real: where the model hides more than a third of the transfer (1 Gbit/s and 100 Mbit/s),
    # the measured wait is nearer the predicted one than the whole transfer; and without the credit (the whole
    # transfer waited for) some step misses the target. (At 20 Mbit/s less is hidden than the model says.)
    hiding = [(o, c) for o, c in zip(own, checks) if c["overlap_s"] > c["transfer_s"] / 3]
    assert len(hiding) == 8 and all(abs(o["measured_wait_s"] - o["predicted_wait_s"]) <
                                    abs(o["measured_wait_s"] - c["transfer_s"]) for o, c in hiding)
    additive = [(o["compute_s"] + c["transfer_s"]) / c["steady"]["measured_s"] - 1 for o, c in zip(own, checks)]
    assert max(additive) > timemodel.TARGET_ERROR


def test_fedavg_rounds_over_the_links_cost_what_the_model_says_and_its_compute_drifts(tmp_path):
    checks = regenerated_model("wan_fedavg_rounds.jsonl", "wan_fedavg_rounds_model.json", tmp_path)["checks"]
    timed = [c["model_check"] for c in checks if c["model_check"] is not None]
    assert len(timed) == 6 and all(c["steady"]["unit"] == "round" and c["steady"]["timed_steps"] == 19 for c in timed)
    # From each run's own compute every round is within 15 %, and the link adds to the all-reduce's wait (over
    # the unshaped run of the same pass: gloo's own 0.055 and 0.068 s) what bytes / rate says at 100 and
    # 20 Mbit/s (0.30 and 1.56 s a round), within 5 % + 0.02 s; at 1 Gbit/s less than its 0.03 s.
    records = timemodel.load(str(REPO / "results" / "wan_fedavg_rounds.jsonl"))
    unshaped = {r["config"]["tag"]: r["comm"]["round_timing"] for r in records if timemodel.is_reference(r)}
    tag = {r["config"]["run_key"]: r["config"]["tag"] for r in records}
    for row in (r for r in checks if r["model_check"] is not None):
        own = row["model_check"]["steady"]["own_compute"]
        assert abs(own["error"]) <= timemodel.TARGET_ERROR
        added = own["measured_wait_s"] - unshaped[tag[row["run_key"]]]["allreduce_wait_s"]
        if row["rate_bit_s"] < 1e9:
            assert abs(added - own["predicted_wait_s"]) < 0.02 + 0.05 * own["predicted_wait_s"], row["rate_bit_s"]
        else:
            assert 0 < added < own["predicted_wait_s"]
    # Yet two identical unshaped runs computed their rounds more than 10 % apart: the drift between runs on
    # these 2 shared cores that the one missed whole schedule (wan_tta_full, FedAvg at 1 Gbit/s) carried.
    compute = sorted(t["compute_s"] for t in unshaped.values())
    assert len(compute) == 2 and compute[1] / compute[0] > 1.10
    # That schedule again, its rounds timed: the link cost 0.08 s a round of its 1.39.
    (whole,) = [r for r in records if r["config"]["max_steps"] == 0]
    assert whole["comm"]["round_timing"]["allreduce_wait_s"] < 0.1 * whole["comm"]["round_timing"]["round_s"]


COMMITTED_COMMAND = ("python -m bench.time_to_accuracy results/convergence.jsonl results/wan_tta_n2.jsonl "
                     "results/premise.jsonl "
                     "--shaped results/wan_tta.jsonl results/wan_tta_n2.jsonl results/wan_tta_premise.jsonl "
                     "results/wan_tta_premise_machine.jsonl results/wan_tta_machine.jsonl "
                     "--full results/wan_tta_full.jsonl results/wan_tta_n2.jsonl results/wan_fedavg_rounds.jsonl "
                     "--duplex results/link_duplex.json --json results/time_to_accuracy.json")


def test_committed_time_to_accuracy_regenerates_from_the_committed_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tta.REPO)
    out = tmp_path / "tta.json"
    args = COMMITTED_COMMAND.split()[3:]
    assert tta.main([*args[:-1], str(out)]) == 0
    assert out.read_text() == (tta.REPO / "results" / "time_to_accuracy.json").read_text(), \
        f"run `{COMMITTED_COMMAND}` and commit"
    checks = json.loads(out.read_text())["checks"]
    # Every shaped full first epoch reproduces the curve's first accuracy: the link changes time only.
    assert sorted((c["hospitals"], c["method"]) for c in checks if "epoch1" in c and c["width"] == 0.25) == sorted(
        [(4, "split"), (4, "ddp"), (4, "fedavg"), (4, "fedavg")] + [(2, "split"), (2, "ddp"), (2, "fedavg"), (2, "fedavg")]
        + [(4, "split")] * 3 + [(4, "split-localloss")] * 2  # top-k 1/16, the bottleneck 16, with bf16, local loss
        # wan_tta_machine.toml's, on the newer machine: float32 split and DDP again, the bottleneck 32 with bf16,
        # top-k 1/8 fp8 and SplitFed V1 (twice)
        + [(4, "split"), (4, "ddp")] + [(4, "split")] * 2 + [(4, "splitfed")] * 2
        + [(4, "split"), (4, "fedavg")])  # the bottleneck 16 with bf16 and FedAvg-10 over 20 Mbit/s
    # There float32 split and DDP are within the time model's 15 %; FedAvg-10 took 17 % longer than projected,
    # the compressed cuts and SplitFed V1 25 to 36 % (docs/variants.md): their projections are optimistic.
    newer = [(c["variant"], c["epoch1"]["error"]) for c in checks
             if "epoch1" in c and c["machine"] != "earlier VM" and c["width"] == 0.25]
    assert len(newer) == 8  # SplitFed V1's twice: both repeats are held to it
    for v, e in newer:
        if v in ("ddp", "split (independent L1)"):
            assert abs(e) <= 0.15, v
        elif v == "fedavg (10 local steps)":
            assert -0.20 < e < -0.15, v
        else:
            assert -0.40 < e < -0.24, v
    # Exactly, but for three checks whose curve ran on another machine: the bottleneck's at x0.5 (its check and
    # reference on the first VM, its curve on the second, before records named their CPU): the CPUs' kernels round
    # differently. Its reference taken again on the curve's machine reproduces the curve's accuracy exactly.
    # So do local loss's two checks (wan_tta.toml's, on the first VM; their curves ran on the newer machine).
    # Others set a newer machine's first epoch against an older machine's curve and match it exactly.
    others = [c for c in checks if "epoch1" in c and abs(c["epoch1"]["acc_shaped"] - c["epoch1"]["acc_convergence"]) > 1e-9]
    # And the bottleneck 16 with bf16 over 20 Mbit/s on the newer machine (AMX), its curve on the first VM: bf16
    # kernels differ most between the two (0.3862 against 0.4398 after the first epoch).
    assert sorted((c["width"], c["variant"]) for c in others) == [
        (0.25, "split (independent L1, bottleneck 1/16, bf16)"), (0.25, "split-localloss"),
        (0.25, "split-localloss (top-k 1/16)"), (0.5, "split (independent L1, cut 2, bottleneck 1/16, bf16)")]
    assert all(c["machine"] != c["epoch1"]["curve_machine"] for c in others if c["width"] == 0.25)
    assert all(abs(c["epoch1"]["acc_shaped"] - c["epoch1"]["acc_convergence"]) > 1e-3 for c in others)
    bottleneck = "split (independent L1, cut 2, bottleneck 1/16, bf16)"
    other = next(c for c in others if c["variant"] == bottleneck)
    again = [r for r in timemodel.load(str(tta.REPO / "results" / "wan_tta_premise_machine.jsonl"))
             if r["config"].get("bottleneck") == 16 and timemodel.is_reference(r)]
    assert again and again[0]["epochs"][0]["test_acc_mean"] == other["epoch1"]["acc_convergence"]
    # Where the premise holds (VGG-11 x0.5 cut 2, wan_tta_premise.toml over 20 Mbit/s): the first epochs of split
    # learning, FedAvg-10, the bottleneck and local loss against premise.toml's curves, and every step (DDP's 40)
    # within the time model's 15 %, each on the compute reference of its own machine.
    premise = [c for c in checks if c["width"] == 0.5]
    assert sorted(c["variant"] for c in premise if "epoch1" in c) == [
        "fedavg (10 local steps)", "split (independent L1, cut 2)",
        "split (independent L1, cut 2, bottleneck 1/16, bf16)", "split-localloss (cut 2, top-k 1/16)"]
    assert len(premise) == 5 and all(abs(c["step_check"]["error"]) <= 0.15 for c in premise)
    assert all(abs(c["epoch1"]["error"]) <= 0.15 for c in premise if "epoch1" in c)
    # With 2 hospitals every check is within the time model's 15 %: the first epochs over 100 Mbit/s (and
    # FedAvg's over 20) in seconds, 40 steps of split learning and DDP over 20 Mbit/s, and the seconds per step
    # of the whole schedules over the links against the unshaped whole schedules.
    two = [c for c in checks if c["hospitals"] == 2]
    assert len(two) == 9 and all(abs(c["step_check"]["error"]) <= 0.15 for c in two)
    assert all(abs(c["epoch1"]["error"]) <= 0.15 for c in two if "epoch1" in c)
    # So does every evaluated epoch of the whole schedules (N = 4: unshaped, 1 Gbit/s, 100 Mbit/s, FedAvg 20 Mbit/s;
    # N = 2: unshaped, DDP and FedAvg at 100 Mbit/s, split at 1 Gbit/s), and their
    # measured hours to 0.80 are within the time model's 15 % target of the projection, from the one-epoch
    # compute references and from the unshaped whole schedules', but for FedAvg at 1 Gbit/s: that schedule
    # computed slower than either unshaped run, a cost the model does not have, and its rerun with timed
    # rounds (wan_fedavg_rounds.jsonl) is within the target (README).
    full = json.loads(out.read_text())["full"]
    assert sorted((c["hospitals"], c["method"], tta.rate_name(c["rate_bit_s"])) for c in full) == sorted(
        [(4, m, r) for m in ("ddp", "fedavg", "split") for r in ("unshaped", "1000mbit", "100mbit")]
        + [(4, "fedavg", "20mbit"), (4, "fedavg", "1000mbit")] + [(2, m, "unshaped") for m in ("ddp", "fedavg", "split")]
        + [(2, "ddp", "100mbit"), (2, "fedavg", "100mbit"), (2, "split", "1000mbit")])
    assert all(c["accuracy_matches_curve"] for c in full)
    fedavg_1g = [c for c in full if c["method"] == "fedavg" and c["hospitals"] == 4 and c["rate_bit_s"] == 1e9]
    missed = [c for c in fedavg_1g if c["hours_to"]["0.8"]["error"] < -0.15]
    assert len(fedavg_1g) == 2 and len(missed) == 1 and all(c["hours_to"]["0.8"]["error"] < -0.15 and
                                    c["whole_reference"]["hours_to"]["0.8"]["error"] < -0.15 for c in missed)
    for c in (c for c in full if c not in missed):
        assert abs(c["hours_to"]["0.8"]["error"]) <= 0.15, c["variant"]
        assert c["rate_bit_s"] is None or abs(c["whole_reference"]["hours_to"]["0.8"]["error"]) <= 0.15, c["variant"]


def test_label_leakage_table_regenerates_from_the_committed_results():
    # The table lives on the generated results page of the privacy benchmarks (docs/privacy.md links to it).
    from pathlib import Path

    from bench import label_leakage

    repo = Path(__file__).resolve().parents[1]
    page = (repo / "docs" / "results" / "privacy.md").read_text()
    assert label_leakage.table(str(repo / "results" / "label_leakage.jsonl")) in page


def test_shared_init_table_regenerates_from_the_committed_results():
    # The table lives on the generated results page of the privacy benchmarks (docs/privacy.md links to it).
    from pathlib import Path

    from bench import shared_init

    repo = Path(__file__).resolve().parents[1]
    page = (repo / "docs" / "results" / "privacy.md").read_text()
    assert shared_init.table(str(repo / "results" / "shared_init.jsonl")) in page
