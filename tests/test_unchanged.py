"""Restructuring must not change the mathematics: 40 steps of split learning give the same
per-step losses as before issue #21's restructuring (tests/data/step_losses_before_21.json),
sequential with prefetch, parallel U-shaped with L1s averaged, and parallel with fp8 at the cut."""

import json

import pytest

from bench.check import cpu_key
from conftest import REPO

pytestmark = pytest.mark.distributed
BEFORE = json.loads((REPO / "tests" / "data" / "step_losses_before_21.json").read_text())


@pytest.mark.parametrize("run", BEFORE["runs"], ids=[" ".join(r["args"]) for r in BEFORE["runs"]])
def test_split_step_losses_are_those_before_the_restructuring(cli, run):
    result = cli(*BEFORE["common"], *run["args"], timeout=300)
    assert result.returncode == 0, result
    (record,) = result.records
    if cpu_key() == BEFORE["cpu"]:  # the same kernels: the same floats, bit for bit
        assert record["step_losses"] == run["step_losses"]
        assert record["final_test_acc"] == run["final_test_acc"]
    else:
        # Another CPU's kernels round differently, and 40 SGD steps amplify that (thread counts alone
        # move the loss by ~2 % over 40 steps, ../shared/NOTES.md): the first steps still agree to
        # 1e-4, and the whole curve to 5 %. With an fp8 cut (3 mantissa bits) a value that another CPU rounds to
        # the other side of a quantization boundary moves by up to 1/8 of itself, so its first steps agree to
        # 2e-3 only (5e-4 apart on the AVX-512/AMX VM of issue 22's premise runs).
        first = 2e-3 if "fp8" in run["args"] else 1e-4
        assert record["step_losses"][:5] == pytest.approx(run["step_losses"][:5], rel=first)
        assert record["step_losses"] == pytest.approx(run["step_losses"], rel=5e-2)
