"""Many hospitals on one host: --start fork (every party forked from one torch import), the memory check
before any party starts, and bench.scale's measurements."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from bench import scale
from splitrpc import launch
from splitrpc.config import parse_args
from splitrpc.errors import UserError

pytestmark = pytest.mark.distributed

SMALL = ["--method", "split", "--hospitals", 3, "--dataset", "synthetic", "--synthetic-train", 384,
         "--synthetic-test", 32, "--model", "resnet20", "--width", 0.25, "--batch-size", 16, "--max-steps", 6,
         "--threads", 1, "--schedule", "parallel", "--log-every", 100, "--rpc-timeout", 30]


def _cfg(*args):
    return parse_args([str(a) for a in args])


def test_the_memory_check_refuses_what_cannot_fit_and_points_to_fork():
    cfg = _cfg("--method", "split", "--hospitals", 64)  # 65 parties
    with pytest.raises(UserError, match=r"65 parties need at least 26\.0 GiB of memory \(about 410 MB each with "
                                        r"--start spawn\) but 23\.4 GiB is available; --start fork shares torch"):
        launch.check_memory(cfg, available=24000)
    launch.check_memory(_cfg("--method", "split", "--hospitals", 64, "--start", "fork"), available=24000)
    with pytest.raises(UserError, match=r"with --start fork\) but 9\.8 GiB is available; or run fewer"):
        launch.check_memory(_cfg("--method", "split", "--hospitals", 64, "--start", "fork"), available=10000)


def test_a_run_too_big_for_the_machine_is_one_line_before_any_party_starts(cli):
    started = time.monotonic()
    result = cli("--method", "split", "--hospitals", 5000, "--dataset", "synthetic", timeout=60)
    assert result.returncode == 2, result
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("splitrpc: error: 5001 parties need at least"), result.stderr
    assert time.monotonic() - started < 30


def test_max_restarts_needs_spawn():
    with pytest.raises(UserError, match="--max-restarts needs torchrun's agent"):
        _cfg("--method", "split", "--start", "fork", "--max-restarts", 1)


def test_forked_parties_compute_what_spawned_ones_do(cli, tmp_path):
    """The same run started both ways ends with the same weights, bit for bit."""
    for start in ("spawn", "fork"):
        result = cli(*SMALL, "--start", start, "--save-dir", tmp_path / start)
        assert result.returncode == 0, result
        assert result.records[-1]["steps"] == 6
    for name in ("trunk.pt", "head-hospital1.pt", "head-hospital2.pt", "head-hospital3.pt"):
        a, b = torch.load(tmp_path / "spawn" / name), torch.load(tmp_path / "fork" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_forked_party_that_fails_ends_the_run_with_one_line_and_no_process_left(cli):
    result = cli(*SMALL, "--start", "fork", "--fault", "hospital2:nan@2", timeout=120)
    assert result.returncode != 0, result
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("splitrpc")]
    assert errors and "hospital2" in errors[0] and "Traceback" not in result.stderr, result.stderr
    left = subprocess.run(["pgrep", "-f", "splitrpc.zygote"], capture_output=True, text=True).stdout.split()
    assert not [pid for pid in left if int(pid) != os.getpid()], left


def test_scale_measures_private_memory_and_renders_its_table(tmp_path):
    mine = scale.memory_of(os.getpid())
    assert mine["rss"] >= mine["private"] > 0 and mine["pss"] > 0
    assert scale.memory_of(2 ** 22 + 7) is None  # no such process
    row = {"method": "split", "hospitals": 64, "start": "fork", "status": "ok", "launch_to_first_step_s": 100.0,
           "hospital_private_mb_median": 170.0, "hospital_private_mb_max": 180.0, "hospital_rss_mb_median": 500.0,
           "server_private_mb": 300.0, "run_pss_peak_mb": 12 * 1024, "machine_used_peak_mb": 13 * 1024,
           "seconds_per_step": 1.5, "samples_per_s": 341.0, "payload_bytes_per_hospital_step": 2048.0,
           "options": ["--dataset", "synthetic", "--model", "resnet20", "--width", "0.25", "--batch-size", "8",
                       "--schedule", "parallel"]}
    path = tmp_path / "scale.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "heap": "fixed", "options": []}) + "\n")
    table = scale.table(str(path))
    assert ("| split (parallel) | synthetic, resnet20 x0.25, batch 8 | fork | 64 | ok | 100.0 | 170 / 180 | 500 | 300 | "
            "12.00 | 13.00 | 1.500 | 341 | 2.0 |") in table
    # Options left out are the training defaults (the schedule too); a run with --heap fixed says so.
    assert "| split (sequential), --heap fixed | cifar10, resnet20 x1.0, batch 128 | fork | 64 |" in table
