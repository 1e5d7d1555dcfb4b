"""bench.flaky: repeats read from JUnit XML; a test that fails once in K is reported with its repeat."""

import json

from bench import flaky


def test_a_test_that_fails_in_one_repeat_is_reported(tmp_path, monkeypatch):
    # A test file that fails on its second run only (a counter file beside it).
    counter = tmp_path / "count"
    test = tmp_path / "test_sometimes.py"
    test.write_text(f"""
from pathlib import Path
def test_sometimes():
    p = Path({str(counter)!r}); n = int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n))
    assert n != 2, "the second run fails"
def test_always():
    pass
""")
    out = tmp_path / "flaky.json"
    code = flaky.main(["-k", "3", str(test), "--json", str(out)])
    assert code == 1
    data = json.loads(out.read_text())
    assert data["failures"] == {next(t for t in data["repeats"][1]["tests"] if "sometimes" in t): [2]}
    assert [r["tests"][next(t for t in r["tests"] if "always" in t)]["outcome"] for r in data["repeats"]] == \
        ["passed"] * 3


def test_no_failure_is_exit_0_and_bad_input_is_one_line(tmp_path, capsys):
    test = tmp_path / "test_fine.py"
    test.write_text("def test_fine():\n    pass\n")
    assert flaky.main(["-k", "2", str(test)]) == 0
    assert flaky.main(["-k", "0", str(test)]) == 2
    assert flaky.main([str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("splitrpc[flaky]: error: no such test file")
