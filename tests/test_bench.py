"""The benchmark harness: matrices, resumption, failures recorded, per-run timeouts."""

import json
import re
import subprocess
import sys

import pytest

from bench import harness
from conftest import REPO
from splitrpc.errors import UserError

pytestmark = pytest.mark.distributed


def run_bench(config, results_dir, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench", "run", str(config), "--results-dir", str(results_dir)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_smoke_matrix_runs_and_resumes(tmp_path, cache_dir):
    config = tmp_path / "smoke.toml"
    text = (REPO / "bench" / "configs" / "smoke.toml").read_text().replace("[base]", f'[base]\ncache-dir = "{cache_dir}"')
    config.write_text(text)
    first = run_bench(config, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"run 1/3 \(2 left after this\)", first.stdout)
    records = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert sorted(r["config"]["method"] for r in records) == ["ddp", "local", "split"]
    assert all(r["status"] == "ok" and r["config"]["run_key"] for r in records)
    second = run_bench(config, tmp_path)
    assert "3 already in" in second.stdout and "0 to run" in second.stdout
    assert len((tmp_path / "smoke.jsonl").read_text().splitlines()) == 3


def test_failed_and_timed_out_runs_are_recorded_and_the_matrix_goes_on(tmp_path, cache_dir):
    config = tmp_path / "mixed.toml"
    config.write_text(f"""
name = "mixed"
timeout = 20
[base]
dataset = "synthetic"
synthetic-train = 256
synthetic-test = 64
model = "resnet20"
width = 0.25
batch-size = 32
max-steps = 2
threads = 1
cache-dir = "{cache_dir}"
[matrix]
method = ["local"]
[[include]]
method = "split"
dataset = "imagefolder"
data-dir = "{tmp_path / 'missing'}"
[[include]]
method = "local"
epochs = 1000
max-steps = 0
synthetic-train = 50000
""")
    result = run_bench(config, tmp_path)
    assert result.returncode == 1  # some runs failed
    records = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    by_status = {}
    for r in records:
        by_status.setdefault(r["status"], []).append(r)
    assert len(by_status["ok"]) == 1 and len(by_status["failed"]) == 2
    errors = sorted(r["error"] for r in by_status["failed"])
    assert any("no such file or directory" in e for e in errors)
    assert any("timed out after 20 s" in e for e in errors)


def test_bad_matrix_is_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[matrix]\nmodel = ['alexnet']\n")
    with pytest.raises(UserError, match="--model: unknown value 'alexnet'"):
        harness.expand(harness.load(str(config)))
    result = run_bench(config, tmp_path, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
