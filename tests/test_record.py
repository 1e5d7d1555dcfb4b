"""The run record's typed view and the one naming of runs, against the committed results that hold the names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitrpc.record import RunRecord, summarize_epoch, variant

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def records(*names: str) -> list[dict]:
    out = []
    for name in names:
        for line in (RESULTS / name).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def by_run_key(*names: str) -> dict[str, dict]:
    return {r["config"]["run_key"]: r for r in records(*names) if r.get("config", {}).get("run_key")}


def table_column(section: str, column: int) -> set[str]:
    """The cells of one column of a table in plots/summary.md, under the heading that starts with ``section``."""
    lines = (REPO / "plots" / "summary.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {section}"))
    cells = set()
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        cells.add(line.split("|")[column + 1].strip())
    return cells


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize("cfg, training, codec, engine", [
    ({"method": "ddp"}, "ddp", "ddp", "ddp"),
    ({"method": "local", "schedule": "parallel"}, "local", "local", "local (parallel)"),
    ({"method": "local"}, "local", "local", "local (sequential)"),
    ({"method": "fedavg", "local_steps": 10}, "fedavg (10 local steps)", "fedavg", "fedavg"),
    ({"method": "fedavg", "local_steps": 10000}, "fedavg (1 round per epoch)", "fedavg", "fedavg"),
    ({"method": "split", "schedule": "parallel", "codec": "fp8"}, "split (independent L1, fp8)", "split+fp8",
     "split (parallel, fp8)"),
    ({"method": "split", "codec": "topk", "topk_ratio": 64, "topk_values": "fp8", "topk_random": 0.1,
      "topk_feedback": True}, "split (independent L1, top-k 1/64 fp8, random 0.1, feedback)",
     "split+top-k 1/64 fp8, random 0.1, feedback", "split (sequential, top-k 1/64 fp8, random 0.1, feedback)"),
    ({"method": "split", "codec": "topk", "topk_ratio": 16}, "split (independent L1, top-k 1/16)",
     "split+top-k 1/16", "split (sequential, top-k 1/16)"),
    ({"method": "split", "bottleneck": 16, "codec": "bf16"}, "split (independent L1, bottleneck 1/16, bf16)",
     "split+bottleneck 1/16+bf16", "split (sequential, bf16)"),
    ({"method": "ddp", "bottleneck": 4}, "ddp (bottleneck 1/4)", "ddp+bottleneck 1/4", "ddp"),
    ({"method": "split-localloss", "codec": "topk", "topk_ratio": 16, "run_ahead": 2},
     "split-localloss (top-k 1/16)", "split-localloss+top-k 1/16", "split-localloss"),
    ({"method": "split-localloss"}, "split-localloss", "split-localloss", "split-localloss"),
    ({"method": "splitfed", "splitfed_version": "2", "splitfed_sync_every": 10, "cut": 2},
     "splitfed (V2, averaged every 10 steps, cut 2)", "splitfed", "splitfed"),
    ({"method": "fedavg", "local_steps": 10, "bottleneck": 4}, "fedavg (10 local steps, bottleneck 1/4)",
     "fedavg+bottleneck 1/4", "fedavg"),
    ({"method": "split", "schedule": "sequential", "prefetch": False, "cut": 2}, "split (independent L1, cut 2)",
     "split", "split (sequential, no prefetch)"),
    ({"method": "split", "l1": "average", "l1_sync_every": 10, "l1_grad_scale": "none"},
     "split (L1 averaged every 10 steps, L1 gradient unscaled)", "split", "split (sequential)"),
    ({"method": "split", "l1": "average", "codec": "none"}, "split (L1 averaged every step)", "split",
     "split (sequential)"),
    # Another normalisation is another model (BatchNorm, the default, is not named).
    ({"method": "split", "l1": "average", "norm": "group"}, "split (L1 averaged every step, GroupNorm)", "split",
     "split (sequential)"),
    ({"method": "local", "norm": "group"}, "local (GroupNorm)", "local", "local (sequential)"),
    ({"method": "fedavg", "local_steps": 10, "norm": "none"}, "fedavg (10 local steps, no normalisation)", "fedavg",
     "fedavg"),
    ({"method": "ddp", "norm": "batch"}, "ddp", "ddp", "ddp"),
])
def test_variant_names_each_detail(cfg, training, codec, engine):
    assert variant(cfg) == variant(cfg, "training") == training
    assert variant(cfg, "codec") == codec
    assert variant(cfg, "engine") == engine


def test_no_codec_is_named_like_the_default():
    assert variant({"method": "split", "codec": None}, "codec") == variant({"method": "split"}, "codec") == "split"


def test_an_unknown_detail_is_refused():
    with pytest.raises(ValueError, match="codec, training, engine"):
        variant({"method": "ddp"}, "colour")


def test_training_names_are_those_of_results_time_to_accuracy_json():
    runs = by_run_key("convergence.jsonl", "wan_tta_full.jsonl", "wan_tta_n2.jsonl", "wan_fedavg_rounds.jsonl",
                      "premise.jsonl", "wan_tta.jsonl", "wan_tta_premise.jsonl", "wan_tta_premise_machine.jsonl",
                      "wan_tta_machine.jsonl")
    committed = json.loads((RESULTS / "time_to_accuracy.json").read_text())
    rows = committed["projections"] + committed["full"] + committed["checks"]
    assert rows
    for row in rows:
        assert variant(runs[row["run_key"]]["config"]) == row["variant"]


def test_codec_names_are_those_of_results_wan_model_json():
    runs = by_run_key("wan.jsonl")
    committed = json.loads((RESULTS / "wan_model.json").read_text())
    assert {"split+fp8", "split+bf16"} <= {m for p in committed["projections"] for m in p["methods"]}
    for row in committed["checks"]:
        assert variant(runs[row["run_key"]]["config"], "codec") == row["method"]
    named = {variant(r["config"], "codec") for r in records("wan.jsonl") if r.get("status") == "ok"}
    assert {m for p in committed["projections"] for m in p["methods"]} <= named


def test_engine_and_training_names_are_those_of_plots_summary_md():
    ok = [r for r in records("throughput.jsonl") if r.get("status") == "ok"]
    assert table_column("throughput", 1) == {variant(r["config"], "engine") for r in ok}
    ok = [r for r in records("convergence.jsonl") if r.get("status") == "ok"]
    assert table_column("convergence", 2) == {variant(r["config"]) for r in ok}


# --------------------------------------------------------------------------- the view
def record() -> dict:
    epochs = [summarize_epoch(0, [2.0, 1.0], 256, 10.0, 0.1, None),
              summarize_epoch(1, [0.5, 0.5], 256, 12.0, 0.05, [0.6, 0.8])]
    return {"status": "ok", "run_id": "abc", "config": {"method": "split", "hospitals": 2, "epochs": 2, "cut": 2},
            "epochs": epochs, "final_test_acc": 0.7, "final_test_acc_min": 0.6, "steps": 4, "steps_per_epoch": 2,
            "train_time_s": 22.0, "wall_time_s": 30.0,
            "comm": {"per_epoch": {"tcp": {"per_hospital": 1e6}, "payload": {"per_hospital": 9e5}},
                     "phases": {"train": {"tcp_bytes": {"server": {"sent": 1, "received": 1},
                                                        "hospital1": {"sent": 400, "received": 200},
                                                        "hospital2": {"sent": 800, "received": 40}}}}}}


def test_the_view_reads_config_epochs_bytes_timing_and_status():
    raw = record()
    run = RunRecord.of(raw)
    assert (run.method, run.hospitals, run.variant(), run.variant("codec")) == ("split", 2, "split (independent L1, "
                                                                                 "cut 2)", "split")
    assert run.ok and run.status == "ok" and run.whole_schedule
    assert [e.epoch for e in run.epochs] == [1, 2] and [e.evaluated for e in run.epochs] == [False, True]
    assert run.epochs[1].test_acc_mean == pytest.approx(0.7) and run.epochs[0].train_loss == 1.5
    assert run.curve() == ([2], [pytest.approx(0.7)]) and run.curve("test_acc_min") == ([2], [0.6])
    assert (run.final_acc, run.final_acc_min) == (0.7, 0.6)
    assert (run.steps, run.steps_per_epoch, run.train_time_s, run.wall_time_s) == (4, 2, 22.0, 30.0)
    assert run.seconds_per_step == 5.5
    assert run.bytes_per_epoch_per_hospital() == 1e6 and run.bytes_per_epoch_per_hospital("payload") == 9e5
    assert run.hospital_bytes_per_step() == {"hospital1": {"up": 100, "down": 50}, "hospital2": {"up": 200, "down": 10}}


def test_the_view_is_read_only_and_tells_what_is_missing():
    raw = record()
    run = RunRecord.of(raw)
    with pytest.raises(TypeError):
        run.config["method"] = "ddp"
    with pytest.raises(AttributeError):
        run.status = "failed"
    assert raw["config"]["method"] == "split" and raw["status"] == "ok"
    local = RunRecord.of({"status": "failed", "config": {"method": "local", "epochs": 3}, "epochs": [], "comm": None})
    assert not local.ok and not local.whole_schedule and local.final_acc is None
    assert local.bytes_per_epoch_per_hospital() is None and dict(local.comm) == {}
    cut_short = record()
    cut_short["epochs"] = cut_short["epochs"][:1]
    assert not RunRecord.of(cut_short).whole_schedule


def test_a_record_names_the_cpu_that_ran_it():
    # Records of two VMs called alike differed in their last bits (docs/variants.md, premise regime):
    # every record says which instruction sets its kernels could use.
    import torch

    from splitrpc.config import Config
    from splitrpc.record import new_record

    cpu = new_record(Config())["cpu"]
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert ("avx2" in flags.split()) == ("avx2" in cpu["isa"])
    from bench.check import cpu_key  # one reading of /proc/cpuinfo: the baselines' key is the records'

    assert cpu["key"] == cpu_key() and cpu["key"].endswith("cores")
