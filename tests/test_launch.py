"""Launch scripts: one host, and two torchrun agents on this host acting as two nodes."""

import json
import re
import socket
import subprocess
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.distributed

TRAIN = ["--dataset", "synthetic", "--synthetic-train", "384", "--synthetic-test", "64", "--model", "resnet20",
         "--width", "0.25", "--batch-size", "16", "--max-steps", "4", "--threads", "1", "--log-every", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_sh_works_out_the_process_count(tmp_path, cache_dir):
    out = tmp_path / "runs.jsonl"
    proc = subprocess.run(["launch/local.sh", "--method", "split", "--hospitals", "3", *TRAIN, "--cache-dir",
                           cache_dir, "--out", str(out)], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(out.read_text())["hospitals"]) == 3
    printed = subprocess.run(["launch/local.sh", "--method", "ddp", "--hospitals", "5"], capture_output=True,
                             text=True, timeout=60, cwd=REPO, env={"PRINT": "1", "PATH": "/usr/bin:/bin"})
    assert "--nproc-per-node 5 -m splitrpc.train --method ddp --hospitals 5" in printed.stdout


def two_nodes(method, hospitals, per_node, tmp_path, cache_dir, rdzv_timeout=60):
    port = free_port()
    out = tmp_path / f"{method}.jsonl"
    common = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
              "--rdzv-timeout", str(rdzv_timeout), "--nproc-per-node", str(per_node)]
    train = ["--", "--method", method, "--hospitals", str(hospitals), *TRAIN, "--cache-dir", cache_dir,
             "--out", str(out)]
    nodes = [subprocess.Popen(["launch/multinode.sh", *common, "--node-rank", str(rank), *train],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for rank in (0, 1)]
    outputs = [n.communicate(timeout=240) for n in nodes]
    return nodes, outputs, out


def test_two_nodes_split(tmp_path, cache_dir):
    # Node 0: the server alone; node 1: two hospitals.
    nodes, outputs, out = two_nodes("split", 2, 2, tmp_path, cache_dir)
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr
    assert "[server]" in outputs[0][0] and "[hospital1]" in outputs[1][0] and "[hospital2]" in outputs[1][0]
    record = json.loads(out.read_text())
    assert record["steps"] == 4 and [h["name"] for h in record["hospitals"]] == ["hospital1", "hospital2"]


def test_two_nodes_ddp(tmp_path, cache_dir):
    nodes, outputs, out = two_nodes("ddp", 2, 1, tmp_path, cache_dir)
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr
    record = json.loads(out.read_text())
    assert record["steps"] == 4 and record["comm"]["method"] == "ddp"


def test_rendezvous_that_never_completes_fails_with_one_line(cache_dir):
    port = free_port()
    started = time.monotonic()
    proc = subprocess.run(["launch/multinode.sh", "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1",
                           "--master-port", str(port), "--rdzv-timeout", "5", "--", "--method", "ddp",
                           "--hospitals", "2", *TRAIN, "--cache-dir", cache_dir],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert time.monotonic() - started < 60
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(rf"rendezvous at 127.0.0.1:{port} did not complete within --rdzv-timeout 5 s",
                                         lines[0]), proc.stderr


@pytest.mark.parametrize("args,pattern", [
    (["--nnodes", "3", "--node-rank", "0", "--master-addr", "h", "--", "--method", "split", "--hospitals", "3"],
     r"gives 3 processes .* needs 4"),
    (["--nnodes", "2", "--node-rank", "5", "--master-addr", "h", "--", "--method", "ddp", "--hospitals", "2"],
     r"--node-rank 5 is outside 0..1"),
    (["--nnodes", "2", "--node-rank", "0", "--", "--method", "ddp", "--hospitals", "2"], r"give --master-addr"),
])
def test_bad_layouts(args, pattern):
    proc = subprocess.run(["launch/multinode.sh", *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and re.search(pattern, proc.stderr), proc.stderr
