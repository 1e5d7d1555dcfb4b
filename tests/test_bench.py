"""The benchmark harness: matrices, resumption, failures recorded, per-run timeouts."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from bench import harness
from conftest import REPO
from splitrpc import checkpoint
from splitrpc.errors import UserError

pytestmark = pytest.mark.distributed


def run_bench(config, results_dir, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench", "run", str(config), "--results-dir", str(results_dir),
                           "--checkpoint-root", str(results_dir / "checkpoints")],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_smoke_matrix_runs_and_resumes(tmp_path, cache_dir):
    config = tmp_path / "smoke.toml"
    text = (REPO / "bench" / "configs" / "smoke.toml").read_text().replace("[base]", f'[base]\ncache-dir = "{cache_dir}"')
    config.write_text(text)
    first = run_bench(config, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"run 1/3 \(2 left after this\)", first.stdout)
    # Each run's progress is in the log the harness names.
    logs = re.findall(r"progress: (\S+\.log)", first.stdout)
    assert len(logs) == 3 and all("step" in open(log).read() for log in logs)
    records = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert sorted(r["config"]["method"] for r in records) == ["ddp", "local", "split"]
    assert all(r["status"] == "ok" and r["config"]["run_key"] for r in records)
    second = run_bench(config, tmp_path)
    assert "3 already in" in second.stdout and "0 to run" in second.stdout
    assert len((tmp_path / "smoke.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "checkpoints" / "smoke").exists()  # each finished run's checkpoints, then the config's directory


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


def _local_config(tmp_path, name: str, max_steps: int, cache_dir):
    """A one-run config (local training, synthetic data) that checkpoints every 4 steps."""
    config = tmp_path / f"{name}.toml"
    config.write_text(f"""
name = "{name}"
[base]
dataset = "synthetic"
synthetic-train = 4096
synthetic-test = 64
model = "resnet20"
width = 0.25
batch-size = 32
max-steps = {max_steps}
checkpoint-every = 4
threads = 1
log-every = 100
cache-dir = "{cache_dir}"
[matrix]
method = ["local"]
""")
    return config


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, cache_dir):
    """The harness and its run killed at once (a reboot) after the run's first checkpoint: the next
    `bench run` passes --resume, the record says from which step, and the finished run's checkpoints
    are deleted. The checkpoint options stay out of the run key."""
    config = _local_config(tmp_path, "killed", 60, cache_dir)
    (options,) = harness.expand(harness.load(str(config)))
    key = harness.run_key(options)
    root = tmp_path / "checkpoints"
    directory = root / "killed" / key
    assert harness.with_checkpoints(options, "killed", key, root)[0]["checkpoint_dir"] == str(directory)
    cmd = [sys.executable, "-m", "bench", "run", str(config), "--results-dir", str(tmp_path),
           "--checkpoint-root", str(root)]
    bench = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    while not checkpoint.complete_steps(directory, ["local"]) and bench.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [*harness.descendants(bench.pid), bench.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    bench.wait()
    killed_at = checkpoint.complete_steps(directory, ["local"])
    assert killed_at and killed_at[-1] < 60, "the run must be killed after a checkpoint, before its end"
    assert "ok" not in (tmp_path / "killed.jsonl").read_text() if (tmp_path / "killed.jsonl").exists() else True

    listed = subprocess.run([*cmd[:3], "list", *cmd[4:]], capture_output=True, text=True, cwd=REPO)
    assert "(resumes from step" in listed.stdout, listed.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming from the checkpoint of step" in second.stdout
    (record,) = [json.loads(line) for line in (tmp_path / "killed.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["config"]["run_key"] == key
    assert record["resumed_from_step"] >= killed_at[-1] and record["steps"] == 60
    assert not directory.exists()


def test_a_terminated_harness_stops_its_run_and_keeps_its_checkpoints(tmp_path, cache_dir):
    """`kill <harness>` stops the run in progress with every worker (they run in their own session),
    exits 130, and leaves the run's checkpoints for the next `bench run` to resume from."""
    config = _local_config(tmp_path, "terminated", 400, cache_dir)
    (options,) = harness.expand(harness.load(str(config)))
    directory = tmp_path / "checkpoints" / "terminated" / harness.run_key(options)
    bench = subprocess.Popen([sys.executable, "-m", "bench", "run", str(config), "--results-dir", str(tmp_path),
                              "--checkpoint-root", str(tmp_path / "checkpoints")], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not checkpoint.complete_steps(directory, ["local"]) and bench.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = harness.descendants(bench.pid)
    assert workers, "the run had started"
    bench.terminate()
    _, err = bench.communicate(timeout=60)
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and
             "zombie" not in open(f"/proc/{pid}/status").read().lower()]
    for pid in alive:  # leave nothing running, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert bench.returncode == 130 and "interrupted" in err, err
    assert not alive, f"workers left running: {alive}"
    assert checkpoint.complete_steps(directory, ["local"])  # kept for --resume
    assert not (tmp_path / "terminated.jsonl").exists()  # no record of a run that did not finish
