"""The deterministic part of the regression benchmarks: bytes per step equal the committed baseline.

Timings in bench/baseline/ are for `make bench-check` on a quiet machine; bytes
depend only on shapes, so CI checks them exactly by re-running the same steps.
"""

import json

import pytest

from bench.steps import COMMON, MODELS
from conftest import REPO

pytestmark = pytest.mark.distributed


def baseline() -> dict:
    files = sorted((REPO / "bench" / "baseline").glob("*/*_baseline.json"))
    assert files, "no committed benchmark baseline in bench/baseline/ (make bench-save)"
    runs = json.loads(files[-1].read_text())["benchmarks"]
    return {b["name"]: b["extra_info"] for b in runs}


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
    from bench.test_regression import SIZES

    info = baseline()
    for size, nbytes in SIZES.items():
        assert info[f"test_rpc_round_trip[{size}]"]["payload_bytes_per_call"] == 2 * nbytes
        assert info[f"test_tcp_round_trip_floor[{size}]"]["payload_bytes_per_call"] == 2 * nbytes
