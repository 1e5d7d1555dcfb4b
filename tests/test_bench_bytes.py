"""The deterministic part of the regression benchmarks: bytes per step equal the committed baseline.

Timings in bench/baseline/baseline.json are for `make bench-check`; bytes
depend only on shapes, so CI checks them by re-running the same steps (split and
DDP: the payload our code counts, exactly) and the same RPC round trips (TCP
bytes the kernel counts, against the baseline's payload plus framing).
"""

import json
import subprocess
import sys

import pytest

from bench.rpc_bytes import SIZES
from bench.steps import COMMON, MODELS
from conftest import REPO

pytestmark = pytest.mark.distributed
# TensorPipe frames a request or a response in about 430-480 bytes (results/rpc_bytes.json).
FRAMING_BYTES_MAX = 1024


def baseline() -> dict:
    """Each benchmark's extra info (bytes per step or call) as `make bench-save` recorded it."""
    path = REPO / "bench" / "baseline" / "baseline.json"
    assert path.exists(), "no committed benchmark baseline at bench/baseline/baseline.json (make bench-save)"
    return json.loads(path.read_text())["extra_info"]


def test_fp8_split_bytes_per_step_match_the_baseline(cli):
    committed = baseline()["test_split_step_fp8"]["server_bytes_per_step"]
    result = cli(*COMMON, *MODELS["resnet20"], "--method", "split", "--codec", "fp8", "--max-steps", 2)
    assert result.returncode == 0, result
    server = result.records[0]["comm"]["phases"]["train"]["payload_bytes"]["server"]
    assert {"sent": server["sent"] / 2, "received": server["received"] / 2} == committed


@pytest.mark.parametrize("model", list(MODELS))
def test_split_bytes_per_step_match_the_baseline(cli, model):
    committed = baseline()[f"test_split_step[{model}]"]["server_bytes_per_step"]
    result = cli(*COMMON, *MODELS[model], "--method", "split", "--max-steps", 2)
    assert result.returncode == 0, result
    server = result.records[0]["comm"]["phases"]["train"]["payload_bytes"]["server"]
    assert {"sent": server["sent"] / 2, "received": server["received"] / 2} == committed


@pytest.mark.parametrize("model", list(MODELS))
def test_ddp_bytes_per_step_match_the_baseline(cli, model):
    committed = baseline()[f"test_ddp_step[{model}]"]["bucket_bytes_per_step"]
    result = cli(*COMMON, *MODELS[model], "--method", "ddp", "--max-steps", 2)
    assert result.returncode == 0, result
    assert result.records[0]["comm"]["bucket_bytes_per_step"] == committed


def test_rpc_round_trip_bytes_match_the_baseline():
    # Measured by the kernel: an RPC round trip of each benchmark size between two real
    # processes over TCP carries the baseline's payload (the tensor there and back) plus
    # TensorPipe's framing, which is a few hundred bytes per message at every size.
    info = baseline()
    run = subprocess.run([sys.executable, "-m", "bench.rpc_bytes", "--calls", "4"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout)["sizes"]
    assert measured.keys() == set(SIZES)
    for size, nbytes in SIZES.items():
        payload = info[f"test_rpc_round_trip[{size}]"]["payload_bytes_per_call"]
        m = measured[size]
        assert m["tensor_bytes"] == nbytes
        for direction in ("sent_per_call", "received_per_call"):
            assert nbytes < m[direction] <= nbytes + FRAMING_BYTES_MAX, (size, direction, m)
        assert 0 < m["sent_per_call"] + m["received_per_call"] - payload <= 2 * FRAMING_BYTES_MAX, (size, m)
