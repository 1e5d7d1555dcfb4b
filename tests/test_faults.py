"""Faults: checkpoints and resumption, a lost hospital (abort or continue), invalid messages.

Each scenario finishes within a bounded time with the stated behaviour."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from test_errors import Run, _exit_times
from splitrpc.split.server import message_problem

pytestmark = pytest.mark.distributed

RPC_TIMEOUT = 8
BASE = ["--method", "split", "--hospitals", "2", "--dataset", "synthetic", "--synthetic-train", "640",
        "--synthetic-test", "128", "--model", "resnet20", "--width", "0.25", "--batch-size", "16", "--epochs", "2",
        "--threads", "1", "--log-every", "1", "--rpc-timeout", str(RPC_TIMEOUT), "--lr", "0.05"]


def same_state(a_dir, b_dir):
    for name in ("trunk.pt", "head-hospital1.pt", "head-hospital2.pt"):
        a, b = torch.load(a_dir / name), torch.load(b_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)  # bit for bit


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted run: 80 steps over 2 epochs."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run([sys.executable, "-m", "splitrpc.train", *BASE, "--cache-dir", cache_dir,
                           "--save-dir", str(out / "final"), "--out", str(out / "runs.jsonl")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return out


def test_resume_after_killing_the_server_matches_an_uninterrupted_run(reference, tmp_path, cache_dir):
    ckpt = tmp_path / "ckpt"
    run = Run([*BASE, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "10", "--out", str(tmp_path / "a.jsonl")],
              cache_dir)
    server = int(run.wait_for(r"\[server\] pid (\d+)").group(1))
    run.wait_for(r"step 47/80")  # into the second epoch, past the checkpoint of step 40
    os.kill(server, signal.SIGKILL)
    assert run.finish(timeout=60) != 0
    assert not (tmp_path / "a.jsonl").exists()  # no partial record line
    steps = sorted(int(p.name.split("-")[1]) for p in ckpt.iterdir())
    # --checkpoint-keep 2; a kill between the hospitals' pruning and the server's may leave one more.
    assert steps[-1] >= 40 and len(steps) <= 3
    # The kill can land while a checkpoint is being written (some parties' files, not all):
    # resuming takes the newest step that every party finished.
    parties = ("server.pt", "hospital1.pt", "hospital2.pt")
    complete = [s for s in steps if all((ckpt / f"step-{s:09d}" / name).is_file() for name in parties)]
    assert complete and complete[-1] >= 40
    resumed = subprocess.run([sys.executable, "-m", "splitrpc.train", *BASE, "--cache-dir", cache_dir,
                              "--checkpoint-dir", str(ckpt), "--resume", "--save-dir", str(tmp_path / "final"),
                              "--out", str(tmp_path / "b.jsonl")],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {complete[-1]}" in resumed.stdout
    same_state(reference / "final", tmp_path / "final")
    import json

    record = json.loads((tmp_path / "b.jsonl").read_text())
    assert record["resumed_from_step"] == complete[-1] and record["steps"] == 80
    assert len(record["epochs"]) == 2  # the history of the first epoch came back with the checkpoint


def test_torchrun_restart_resumes_by_itself(reference, tmp_path, cache_dir):
    ckpt = tmp_path / "ckpt"
    run = Run([*BASE, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "10", "--max-restarts", "1",
               "--save-dir", str(tmp_path / "final")], cache_dir)
    victim = int(run.wait_for(r"\[hospital2\] pid (\d+)").group(1))
    run.wait_for(r"step 25/80")
    os.kill(victim, signal.SIGKILL)
    code = run.finish(timeout=240)
    assert code == 0, run.stderr
    assert re.search(r"resumed at step (20|30)", "".join(run.lines))
    same_state(reference / "final", tmp_path / "final")


def test_killed_hospital_abort_stops_with_a_checkpoint(tmp_path, cache_dir):
    ckpt = tmp_path / "ckpt"
    run = Run([*BASE, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "10", "--out", str(tmp_path / "a.jsonl")],
              cache_dir)
    server = int(run.wait_for(r"\[server\] pid (\d+)").group(1))
    victim = int(run.wait_for(r"\[hospital2\] pid (\d+)").group(1))
    run.wait_for(r"step 15/80")
    os.kill(victim, signal.SIGKILL)
    times = _exit_times([server], deadline=RPC_TIMEOUT + 20)
    assert times[server] is not None and times[server] < RPC_TIMEOUT + 5, times
    assert run.finish(timeout=60) != 0
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "a.jsonl").exists()
    assert (ckpt / "step-000000010" / "server.pt").exists() and (ckpt / "step-000000010" / "hospital2.pt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_parties(args, cache_dir, hospitals=2):
    """Each party in its own process, as on separate sites (no torchrun agent to end the group when one dies)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(hospitals + 1),
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    return [subprocess.Popen([sys.executable, "-m", "splitrpc.train", *args, "--cache-dir", cache_dir],
                             env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO) for rank in range(hospitals + 1)]


def test_killed_hospital_continue_goes_on_without_it(tmp_path, cache_dir):
    out = tmp_path / "runs.jsonl"
    parties = spawn_parties([*BASE, "--on-hospital-failure", "continue", "--out", str(out)], cache_dir)
    time.sleep(1)
    server, survivor, victim = parties
    # Let training start, then take hospital2 away for good.
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline:
        line = server.stdout.readline()
        if re.search(r"step 12/80", line):
            victim.kill()
            break
    outputs = [p.communicate(timeout=RPC_TIMEOUT + 120) for p in (server, survivor)]
    assert server.returncode == 0, outputs[0]
    assert survivor.returncode == 0, outputs[1]
    import json

    record = json.loads(out.read_text())
    assert [lost["name"] for lost in record["lost_hospitals"]] == ["hospital2"]
    assert record["lost_hospitals"][0]["step"] in range(10, 16)
    assert record["epochs"][-1]["test_acc_per_hospital"][1] is None
    assert record["epochs"][-1]["test_acc_per_hospital"][0] is not None
    train = record["comm"]["phases"]["train"]
    assert "hospital2" not in train["payload_bytes"] and "hospital2" not in train["analytic_bytes"]
    assert train["payload_bytes"]["hospital1"] == train["analytic_bytes"]["hospital1"]
    assert "lost hospital2" in outputs[0][0]


def test_hung_hospital_continue_goes_on_without_it(tmp_path, cache_dir):
    out = tmp_path / "runs.jsonl"
    run = Run([*BASE, "--on-hospital-failure", "continue", "--out", str(out)], cache_dir)
    victim = int(run.wait_for(r"\[hospital2\] pid (\d+)").group(1))
    run.wait_for(r"step 12/80")
    os.kill(victim, signal.SIGSTOP)
    started = time.monotonic()
    run.wait_for(r"lost hospital2", timeout=RPC_TIMEOUT + 30)
    assert time.monotonic() - started < RPC_TIMEOUT + 10
    run.wait_for(r"final test accuracy", timeout=120)
    os.kill(victim, signal.SIGCONT)  # the stopped process sees the run has finished and leaves
    assert run.finish(timeout=60) == 0, run.stderr
    import json

    record = json.loads(out.read_text())
    assert [lost["name"] for lost in record["lost_hospitals"]] == ["hospital2"]
    assert "timeout" in record["lost_hospitals"][0]["error"].lower()


@pytest.mark.parametrize("mode", ["abort", "continue"])
def test_nan_activations_are_rejected_before_the_trunk(cli, tmp_path, mode):
    result = cli(*BASE, "--fault", "hospital2:nan@3", "--on-hospital-failure", mode, "--record-step-losses",
                 timeout=180)
    if mode == "abort":
        assert result.returncode == 1
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and re.search(r"hospital2 sent 1 non-finite activation values; rejected before the "
                                             r"trunk", lines[0]), result
        assert not result.records
    else:
        assert result.returncode == 0, result
        (record,) = result.records
        assert record["lost_hospitals"][0]["name"] == "hospital2"
        assert "non-finite" in record["lost_hospitals"][0]["error"]
        # hospital1's 40 batches (2 epochs of 20) and hospital2's two before its fault, all finite:
        # the NaN batch was rejected before the trunk and the steps after it went on without hospital2.
        assert len(record["step_losses"]) == 40 + 2
        assert torch.isfinite(torch.tensor(record["step_losses"])).all()


SHAPE = (4, 32, 32)


@pytest.mark.parametrize("activations,labels,problem", [
    (torch.zeros(8, *SHAPE), torch.zeros(8, dtype=torch.uint8), None),
    (torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.uint8), r"shape \(8, 3, 32, 32\)"),
    (torch.zeros(7, *SHAPE), torch.zeros(7, dtype=torch.uint8), r"expected \(8, 4, 32, 32\)"),
    (torch.zeros(8, *SHAPE, dtype=torch.float16), torch.zeros(8, dtype=torch.uint8), "dtype torch.float16"),
    (torch.full((8, *SHAPE), float("inf")), torch.zeros(8, dtype=torch.uint8), "non-finite"),
    (torch.zeros(8, *SHAPE), torch.full((8,), 10, dtype=torch.uint8), r"labels outside 0..9 \(found 10..10\)"),
    (torch.zeros(8, *SHAPE), torch.zeros(8, dtype=torch.int64), "labels of dtype torch.int64"),
    ("not a tensor", torch.zeros(8, dtype=torch.uint8), "other than"),
])
def test_message_validation(activations, labels, problem):
    found = message_problem((activations, labels), 8, SHAPE, torch.float32, torch.uint8, 10)
    if problem is None:
        assert found is None
    else:
        assert found and re.search(problem, found), found


@pytest.mark.parametrize("kind,pattern", [("shape", "activations of shape"), ("labels", "labels outside"),
                                          ("dtype", "activations of dtype torch.float16")])
def test_faulty_hospital_message_kinds_stop_the_run(cli, kind, pattern):
    result = cli(*BASE, "--fault", f"hospital1:{kind}@2", timeout=120)
    assert result.returncode == 1 and re.search(rf"hospital1 sent {pattern}", result.stderr), result


def test_a_stopped_deduplicated_run_continues_exactly(tmp_path, cache_dir):
    """--max-steps stops mid-epoch with a final checkpoint; --resume continues it to the end. The shards
    come back deduplicated from the hospitals' checkpoints, so the step plan is the original one."""
    key = tmp_path / "k.key"
    key.write_text("ab" * 32)
    dedup = [*BASE, "--overlap", "0.3", "--dedup", "hmac", "--dedup-key-file", str(key), "--cache-dir", cache_dir]

    def train(*extra, out):
        proc = subprocess.run([sys.executable, "-m", "splitrpc.train", *dedup, *extra, "--out", str(tmp_path / out)],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return proc

    train("--save-dir", str(tmp_path / "whole"), out="whole.jsonl")
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt")]
    train(*ckpt, "--max-steps", "30", out="part.jsonl")
    resumed = train(*ckpt, "--resume", "--save-dir", str(tmp_path / "final"), out="rest.jsonl")
    assert "resumed at step 30" in resumed.stdout
    same_state(tmp_path / "whole", tmp_path / "final")
    import json

    whole = json.loads((tmp_path / "whole.jsonl").read_text())
    rest = json.loads((tmp_path / "rest.jsonl").read_text())
    assert rest["steps"] == whole["steps"] == 80
    assert [e["epoch"] for e in rest["epochs"]] == [1, 2]
    assert rest["dedup"]["dropped"] == whole["dedup"]["dropped"] > 0
    assert rest["epochs"][-1]["test_acc_per_hospital"] == whole["epochs"][-1]["test_acc_per_hospital"]


def test_a_retried_step_is_taken_once_at_the_hospital(cache_dir):
    """The server retries a step without a hospital that failed in it. A survivor may already have
    received its gradient and stepped L1; when the retry's forward for the same step arrives, it undoes
    that first attempt (L1, BatchNorm statistics, optimizer), so it sends exactly what it sent the first
    time and ends the step as if the first attempt had never happened."""
    from splitrpc.config import parse_args
    from splitrpc.split.hospital import Hospital

    cfg = parse_args(["--dataset", "synthetic", "--model", "vgg11", "--width", "0.25", "--batch-size", "16",
                      "--synthetic-train", "64", "--synthetic-test", "16", "--momentum", "0.9",
                      "--cache-dir", cache_dir])
    torch.set_num_threads(1)
    hospital, untouched = Hospital(cfg, 1), Hospital(cfg, 1)
    gradient = torch.ones(16, 16, 32, 32) * 1e-2

    def take(h, step, deliver=True):
        activations, _ = h.forward(0, 0, 0.1, 1.0, step)
        if deliver:
            torch.autograd.backward(activations, gradient)
            h.settle()
        return activations.detach().clone()

    first = take(hospital, 7)                     # first attempt: forward, gradient, L1 step
    retried = take(hospital, 7)                   # the retry of step 7
    once = take(untouched, 7)                     # a hospital that saw step 7 once
    assert torch.equal(first, retried) and torch.equal(first, once)
    for key, value in untouched.head.state_dict().items():
        assert torch.equal(hospital.head.state_dict()[key], value), key
    following = take(hospital, 8, deliver=False)  # the next step moves on from the stepped L1
    assert not torch.equal(following, first)


def test_a_dead_rank_is_named_in_one_line_by_the_others(tmp_path, cache_dir):
    """FedAvg's ranks as separate sites: hospital3 (rank 2) killed mid-run; the others' collective fails on the
    lost connection, and what they say (one line each at most, no traceback) names hospital3 alone."""
    world = 3
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    args = ["--method", "fedavg", "--local-steps", "2", "--hospitals", str(world), *BASE[4:], "--cache-dir", cache_dir]
    logs = [tmp_path / f"rank{r}.log" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, "-m", "splitrpc.train", *args], env={**env, "RANK": str(r)},
                              stdout=open(logs[r], "w"), stderr=subprocess.STDOUT, cwd=REPO) for r in range(world)]
    try:
        deadline = time.monotonic() + 120
        while "step 5/" not in logs[0].read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "step 5/" in logs[0].read_text(), logs[0].read_text()
        procs[2].kill()
        for proc in procs[:2]:
            proc.wait(timeout=RPC_TIMEOUT + 30)
    finally:
        for proc in procs:
            proc.kill()
    # The first rank to fail reports; the other may stay quiet as its consequence (the run's one line).
    errors = []
    for r in (0, 1):
        text = logs[r].read_text()
        assert procs[r].returncode != 0 and "Traceback" not in text, text
        errors += [ln for ln in text.splitlines() if ln.startswith("splitrpc")]
    assert errors and all("no word from hospital3 (rank 2): dead" in ln for ln in errors), errors
