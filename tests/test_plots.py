"""Figures and the summary come from the committed raw results, and from nothing else."""

import json
import re

from conftest import REPO
from splitrpc.record import variant

from plots.figures import main


def test_summary_and_figures_are_regenerated_byte_for_byte_from_the_committed_results(tmp_path):
    # `make plots` on a clean checkout must leave a clean tree: same summary, same set of
    # figures, and the same bytes in each (no creation date or version stamp in the files).
    summary = tmp_path / "summary.md"
    assert main(["--out-dir", str(tmp_path / "figures"), "--summary", str(summary)]) == 0
    assert summary.read_text() == (REPO / "plots" / "summary.md").read_text(), "run `make plots` and commit"
    committed = {p.name: p.read_bytes() for p in (REPO / "plots" / "figures").iterdir()}
    regenerated = {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()}
    assert regenerated.keys() == committed.keys()
    changed = [name for name in committed if regenerated[name] != committed[name]]
    assert not changed, f"regenerated figures differ from the committed ones: {changed}"


def test_every_successful_run_has_a_row(tmp_path):
    summary = tmp_path / "summary.md"
    main(["--out-dir", str(tmp_path / "figures"), "--summary", str(summary)])
    # Tables derived from several runs with no row of their own (the round trip's cap) are left out.
    text = re.sub(r"\n## the round trip's cap.*?(?=\n## )", "", summary.read_text(), flags=re.S)
    assert "round trip's cap" not in text and "## throughput (" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    runs = 0
    for path in (REPO / "results").glob("*.jsonl"):
        if path.stem == "privacy_attacks":
            runs += sum(1 for line in path.read_text().splitlines() if line.strip())
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        # A record with a "kind" is not a training run (bench.scale, bench.chaos): its own page lists it.
        ok = [r for r in records if r.get("status") == "ok" and "kind" not in r]
        if path.stem == "throughput":
            # Repeated passes: one row per setting, whose "n = k" counts its runs; single runs a row each.
            repeated = [r for r in ok if (r["config"].get("tag") or "").startswith("repeat ")]
            settings = {(r["config"]["model"], variant(r["config"], "engine")) for r in repeated}
            runs += len(settings) + len(ok) - len(repeated)
            table = summary.read_text().split("## throughput (")[1].split("\n## ")[0]
            samples = [line.split("|")[4] for line in table.splitlines()[4:] if line.startswith("| ")]
            assert sum(int(re.search(r"n = (\d+)\)", cell).group(1)) for cell in samples) == len(repeated)
            continue
        if path.stem in ("convergence", "premise"):
            # Also one row per variant over its seeds (the whole schedules).
            from plots.convergence import by_variant

            runs += sum(len(variants) for variants in by_variant(records).values())
        runs += len(ok) * (2 if path.stem == "dedup" else 1)  # dedup runs also get a row in the dedup table
    header_rows = sum(1 for line in text.splitlines() if line.startswith("| ") and "---" not in line
                      and line.startswith(("| method", "| overlap", "| defence", "| model |")))
    assert len(rows) - header_rows == runs


def test_no_results_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "f"), "--summary",
                 str(tmp_path / "s.md")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_pareto_front_keeps_the_points_nothing_beats_on_both_bytes_and_accuracy():
    from plots.convergence import pareto

    points = [(100.0, 0.80, "a"), (10.0, 0.78, "b"), (50.0, 0.77, "c"), (5.0, 0.70, "d"), (200.0, 0.79, "e")]
    assert [p[2] for p in pareto(points)] == ["d", "b", "a"]


def test_a_codec_variant_is_compared_with_float32_split_of_the_same_l1_handling():
    from plots.convergence import _float32_split

    assert _float32_split("split (L1 averaged every step, top-k 1/16 fp8, random 0.1, feedback)") == \
        "split (L1 averaged every step)"
    assert _float32_split("split (independent L1, cut 2, fp8)") == "split (independent L1, cut 2)"
    assert _float32_split("ddp") is None
    assert _float32_split("split-localloss (top-k 1/16)") == _float32_split("split-localloss") == \
        "split (independent L1)"
    assert _float32_split("splitfed (V1, averaged every epoch, cut 2)") == "split (independent L1, cut 2)"


def test_a_resumed_run_says_its_wall_time_covers_only_what_ran_after_the_resume():
    from plots.convergence import _wall

    assert _wall({"wall_time_s": 1642.4}) == "1642"
    assert _wall({"wall_time_s": 648.9, "resumed_from_step": 585}) == "649 (resumed at step 585)"


def test_the_round_trip_cap_interpolates_the_benchmarked_round_trips(tmp_path):
    """The cap table's round trip: the benchmark's own medians at the sizes it timed, linear between."""
    import json

    from plots import engine

    baseline = tmp_path / "baseline.json"
    sizes = {"64KB": 2**16, "1MB": 2**20, "8MB": 2**23}
    baseline.write_text(json.dumps({
        "saved_on": "cpu", "absolute": {"cpu": {
            **{f"test_rpc_round_trip[{k}]": 0.001 * (1 + i) for i, k in enumerate(sizes)},
            **{f"test_rpc_round_trip[{k}]/reference": 9.0 for k in sizes}}},
        "extra_info": {f"test_rpc_round_trip[{k}]": {"payload_bytes_per_call": 2 * v} for k, v in sizes.items()}}))
    assert engine.round_trip_seconds(2**20, baseline) == (0.002, "cpu")
    assert engine.round_trip_seconds(2**23, baseline) == (0.003, "cpu")
    halfway = engine.round_trip_seconds((2**20 + 2**23) / 2, baseline)[0]
    assert abs(halfway - 0.0025) < 1e-12
    assert engine.round_trip_seconds(2**20, tmp_path / "absent.json") is None


def test_first_to_the_target_names_the_fastest_run_of_each_kind_at_each_rate():
    from plots.docs import first_table

    def run(method, variant, hours, seed=0):
        return {"method": method, "variant": variant, "seed": seed, "model": "vgg11", "width": 0.5,
                "partition": "iid", "alpha": 0.5, "hospitals": 4,
                "rates": {name: {"rate_bit_s": rate, "hours_to": {"0.7": h / 2, "0.8": h}}
                          for name, rate, h in zip(("unshaped", "20mbit"), (None, 20e6), hours)}}
    rows = [line for line in first_table([run("split", "split float32", (0.3, 2.5)),
                                          run("split", "split bottleneck", (0.3, 0.4)),
                                          run("split", "split bottleneck", (0.1, 0.1), seed=1),  # other seed
                                          run("ddp", "ddp", (0.2, 3.8)),
                                          run("fedavg", "fedavg-10", (0.25, 0.6))], ["0.7", "0.8"])
            if line.startswith("| vgg11")]
    assert rows == [
        "| vgg11 x0.5 | IID | 4 | 0.8 | unshaped | ddp (0.200) | split float32 (0.300) | ddp (0.200) | fedavg-10 (0.250) |",
        "| vgg11 x0.5 | IID | 4 | 0.8 | 20 Mbit/s | split bottleneck (0.400) | split bottleneck (0.400) | ddp (3.800) | "
        "fedavg-10 (0.600) |"]
