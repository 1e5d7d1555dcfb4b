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
    rows = [line for line in summary.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    runs = 0
    for path in (REPO / "results").glob("*.jsonl"):
        if path.stem == "privacy_attacks":
            runs += sum(1 for line in path.read_text().splitlines() if line.strip())
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ok = [r for r in records if r.get("status") == "ok"]
        if path.stem == "throughput":
            # Repeated passes: one row per setting, whose "n = k" counts its runs; single runs a row each.
            repeated = [r for r in ok if (r["config"].get("tag") or "").startswith("repeat ")]
            settings = {(r["config"]["model"], variant(r["config"], "engine")) for r in repeated}
            runs += len(settings) + len(ok) - len(repeated)
            table = summary.read_text().split("## throughput (")[1].split("\n## ")[0]
            samples = [line.split("|")[4] for line in table.splitlines()[4:] if line.startswith("| ")]
            assert sum(int(re.search(r"n = (\d+)\)", cell).group(1)) for cell in samples) == len(repeated)
            continue
        runs += len(ok) * (2 if path.stem == "dedup" else 1)  # dedup runs also get a row in the dedup table
    header_rows = sum(1 for line in summary.read_text().splitlines() if line.startswith("| ") and "---" not in line
                      and line.startswith(("| method", "| overlap", "| defence", "| model |")))
    assert len(rows) - header_rows == runs


def test_no_results_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "f"), "--summary",
                 str(tmp_path / "s.md")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
