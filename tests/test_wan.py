"""bench.wan: runs across network namespaces on shaped links (needs root; skipped with a reason otherwise),
and its option parsing. What the committed records of such runs show is tested in test_committed_results.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench import timemodel
from bench.wan import parse_rate
from splitrpc.errors import UserError
from tests.conftest import REPO

RATE = "10mbit"
# vgg11 at width 1/4, cut 1: 16 x 32 x 32 float32 activations = 64 KiB a sample, 2 MiB a batch of 32 each
# way per step, ~1.8 s on a 10 Mbit/s link, against a few tens of ms of compute.
TINY = ["--method", "split", "--hospitals", "2", "--model", "vgg11", "--width", "0.25", "--dataset", "synthetic",
        "--synthetic-train", "512", "--synthetic-test", "8", "--batch-size", "32", "--eval-batch-size", "32",
        "--max-steps", "2", "--schedule", "parallel", "--threads", "1", "--log-every", "100"]


def _namespaces_unavailable() -> str:
    if os.geteuid() != 0:
        return "not root: network namespaces cannot be created"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"srpctest{os.getpid():x}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


REASON = _namespaces_unavailable()
needs_netns = pytest.mark.skipif(bool(REASON), reason=REASON)
if REASON:
    print(f"tests/test_wan.py: namespace tests skipped: {REASON}", file=sys.stderr)


def wan(*args, timeout=120, env=None, user=None):
    cmd = [sys.executable, "-m", "bench.wan", *map(str, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def netns_names() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                      text=True).stdout.splitlines() if line.strip()}


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


@needs_netns
def test_split_transfer_time_matches_bytes_over_rate_and_network_is_removed(tmp_path):
    links_before = host_links()
    out = tmp_path / "runs.jsonl"
    proc = wan("--rate", RATE, "--timeout", 100, "--out", out, "--", *TINY, "--cache-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = [__import__("json").loads(line) for line in out.read_text().splitlines()][-1]
    wan_record = record["wan"]
    rate = parse_rate(RATE)
    assert wan_record["rate_bit_s"] == rate
    for name in ("hospital1", "hospital2"):
        link = wan_record["links"][name]
        assert link["rate_bit_s"] == rate
        assert link["qdisc_drops"] == {"up": 0, "down": 0}  # else TCP counts bytes that never crossed
        # The shapers passed at least the training bytes (they also saw set-up and evaluation).
        assert link["qdisc_bytes"]["up"] >= link["train_tcp_bytes"]["up"] > 2 * 2**20 * record["steps"]
        assert link["qdisc_bytes"]["down"] >= link["train_tcp_bytes"]["down"] > 2 * 2**20 * record["steps"]
    assert wan_record["links"]["server"]["rate_bit_s"] is None
    # Bytes / rate, from the kernel's counters and the configured rate, against the clock: the
    # training time less the server's own compute (forward and optimizer of the trunk).
    links, server = timemodel.step_links(record)
    predicted = timemodel.transfer_seconds("split", links, "parallel", server)
    server_compute = record["comm"]["server_time_s"]["trunk_forward"] + record["comm"]["server_time_s"]["trunk_optimizer"]
    measured = (record["train_time_s"] - server_compute) / record["steps"]
    assert predicted == pytest.approx(measured, rel=0.20), (predicted, measured)
    # Everything the run created is gone, and the host's own links are as they were.
    assert not set(wan_record["namespaces"]) & netns_names()
    assert host_links() == links_before


@needs_netns
def test_timeout_kills_the_parties_and_removes_the_network(tmp_path):
    before = netns_names()
    links_before = host_links()
    proc = wan("--rate", RATE, "--timeout", 6, "--log-dir", tmp_path / "logs", "--", *TINY, "--cache-dir", tmp_path)
    assert proc.returncode == 124, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "did not finish within --timeout 6 s" in lines[0], proc.stderr
    assert netns_names() <= before
    assert host_links() == links_before
    # No training process outlives the run (their logs name the command line).
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps


def test_refuses_without_root_in_one_line():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the check as another user")
    proc = wan("--rate", RATE, "--", *TINY, user=65534)
    assert proc.returncode == 2, proc
    assert proc.stderr.strip() == "splitrpc: error: bench.wan needs root (network namespaces, veth pairs and tc); " \
                                  "run it as root"


@needs_netns
def test_refuses_when_the_kernel_has_no_tbf(tmp_path):
    # A `tc` that answers as iproute2 does for a qdisc the kernel lacks; `ip` stays the real one.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "tc").write_text("#!/bin/sh\necho 'Error: Specified qdisc kind is unknown.' >&2\nexit 2\n")
    (fake / "tc").chmod(0o755)
    before = netns_names()
    proc = wan("--rate", RATE, "--", *TINY, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert lines == ["splitrpc: error: the kernel refuses the tbf qdisc that shapes the links "
                     "(Error: Specified qdisc kind is unknown.); load sch_tbf"]
    assert netns_names() <= before  # the probe namespace is gone too


@pytest.mark.parametrize("text, bits", [("100mbit", 100e6), ("1gbit", 1e9), ("20Mbit/s", 20e6), ("5e6", 5e6),
                                        ("1mbps", 8e6), ("none", None), ("0", None)])
def test_rates_parse_in_tc_units(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["fast", "-5mbit", "10 furlongs"])
def test_bad_rate_is_a_user_error(text):
    with pytest.raises(UserError):
        parse_rate(text)


def test_bad_options_are_one_line_before_any_namespace():
    proc = wan("--rate", "fast", "--", *TINY)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "link rate" in proc.stderr, proc
    proc = wan("--rate", RATE, "--", *TINY[:-2], "--method", "local")
    assert proc.returncode == 2 and "runs the methods of several processes" in proc.stderr, proc
    proc = wan("--rate", RATE, "--duplex", "/nonexistent/link_duplex.json", "--", *TINY)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such duplex calibration" in proc.stderr, proc


def test_harness_runs_link_cases_through_bench_wan(tmp_path):
    from bench import harness

    config = tmp_path / "links.toml"
    config.write_text('name = "links"\ntimeout = 300\n[base]\nmethod = "split"\nhospitals = 2\n'
                      '[matrix]\nlink-rate = ["none", "20mbit"]\n')
    runs = harness.expand(harness.load(str(config)))
    assert [r["link_rate"] for r in runs] == ["none", "20mbit"]
    assert len({harness.run_key(r) for r in runs}) == 2
    cmd = harness.command(runs[1], "KEY", tmp_path / "links.jsonl", 300)
    assert cmd[1:3] == ["-m", "bench.wan"]
    wan_part, train_part = cmd[:cmd.index("--")], cmd[cmd.index("--") + 1:]
    assert wan_part[wan_part.index("--rate") + 1] == "20mbit"
    assert wan_part[wan_part.index("--compute-reference") + 1] == str(tmp_path / "links.jsonl")
    assert float(wan_part[wan_part.index("--timeout") + 1]) < 300  # it tears down before the harness kills it
    assert train_part == ["--method", "split", "--hospitals", "2", "--run-key", "KEY"]
    assert "--duplex" not in wan_part  # no calibration beside the results
    (tmp_path / "link_duplex.json").write_text("[]")
    calibrated = harness.command(runs[1], "KEY", tmp_path / "links.jsonl", 300)
    assert calibrated[calibrated.index("--duplex") + 1] == str(tmp_path / "link_duplex.json")
    plain = harness.command({"method": "split"}, "KEY", tmp_path / "x.jsonl", 300)
    assert plain[1:3] == ["-m", "splitrpc.train"]


@pytest.mark.parametrize("matrix, message", [('link-rate = ["fast"]', "link rate"),
                                             ('link-delay = ["10ms"]', "unknown link option")])
def test_harness_rejects_bad_link_options_before_running(tmp_path, matrix, message):
    from bench import harness

    config = tmp_path / "bad.toml"
    config.write_text(f'name = "bad"\n[base]\nmethod = "split"\n[matrix]\n{matrix}\n')
    with pytest.raises(UserError, match=message):
        harness.expand(harness.load(str(config)))


@needs_netns
def test_cleanup_removes_what_a_killed_launcher_left_and_nothing_else():
    dead = f"srpc{0x7ffffff:x}beef-h1"  # a pid above any pid_max: that launcher is gone
    alive = f"srpc{os.getpid():x}beef-h1"  # this process: a live launcher's namespace stays
    for name in (dead, alive):
        subprocess.run(["ip", "netns", "add", name], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", dead, "sleep", "60"])
    try:
        proc = wan("--cleanup")
        assert proc.returncode == 0, proc
        assert proc.stdout.strip() == f"bench.wan: removed 1 stale namespace(s): {dead}"
        assert sleeper.wait(timeout=10) == -9  # the process inside was killed
        assert dead not in netns_names() and alive in netns_names()
    finally:
        sleeper.kill()
        for name in (dead, alive):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@needs_netns
def test_ddp_ranks_are_the_hospitals_and_their_gradients_cross_the_shaped_links(tmp_path):
    out = tmp_path / "runs.jsonl"
    ddp = [a if a != "split" else "ddp" for a in TINY]
    proc = wan("--rate", "50mbit", "--timeout", 100, "--out", out, "--", *ddp, "--cache-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = [__import__("json").loads(line) for line in out.read_text().splitlines()][-1]
    assert record["comm"]["method"] == "ddp"
    links = record["wan"]["links"]
    assert sorted(links) == ["hospital1", "hospital2"]  # no server under DDP; hospital1 (node 0) holds the rendezvous
    assert [n.rsplit("-", 1)[1] for n in record["wan"]["namespaces"]] == ["br", "h1", "h2"]
    gradient = record["comm"]["gradient_bytes_per_step"] * record["steps"]  # a 2-rank ring moves all of it each way
    for link in links.values():
        assert link["rate_bit_s"] == 50e6
        for direction in ("up", "down"):
            # The gradient crossed this link's shapers: traffic that bypassed them would leave them near 0.
            # Not ">= gradient": in 2 of 6 runs on a loaded machine one direction's shaper passed 4.56 MB
            # and 4.62 MB, and once a rank's TCP count was 4.62 MB, against a 4.64 MB gradient (typically
            # 4.94 MB through the shaper); the shortfall is not explained. Not ">= TCP" either: a rank's
            # TCP count also holds its connections that stay inside its namespace, which no shaper sees.
            assert link["qdisc_bytes"][direction] >= 0.9 * gradient
            assert link["train_tcp_bytes"][direction] >= 0.9 * gradient
    assert not set(record["wan"]["namespaces"]) & netns_names()


@needs_netns
def test_link_duplex_one_way_goodput_is_the_link_rate_and_nothing_is_left(tmp_path):
    before = netns_names()
    out = tmp_path / "duplex.json"
    proc = subprocess.run([sys.executable, "-m", "bench.link_duplex", "--rate", RATE, "--mbytes", "3", "--json",
                           str(out)], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(out.read_text())
    payload_rate = parse_rate(RATE) / timemodel.WIRE_FACTOR  # what a saturated link carries as TCP payload
    # One way: the shaper's rate, less framing (slow start and tbf's burst move it a few per cent).
    assert 0.85 * payload_rate < result["one_way"]["goodput_bit_s"] < 1.1 * payload_rate, result
    assert 0 < result["both_ways"]["goodput_bit_s"] <= 1.1 * payload_rate, result
    assert netns_names() == before


def test_link_duplex_bad_rate_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "bench.link_duplex", "--rate", "fast"], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "link rate" in proc.stderr, proc.stderr


def test_link_duplex_bad_size_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "bench.link_duplex", "--rate", RATE, "--mbytes", "0"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--mbytes must be positive" in proc.stderr, proc.stderr
