"""splitrpc.heap (--heap fixed): freed tensors of a few MB go back to the kernel, not to malloc's arenas."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitrpc import heap

# After an 8 MB block (mmapped) is freed, glibc's dynamic threshold would rise to 8 MB and serve the
# next 4 MB block from the heap; with the threshold fixed it is mmapped too (mallinfo2's hblkhd counts
# the bytes held in mmapped blocks). malloc and free are called directly: no allocator in between.
PROBE = r"""
import ctypes, sys
from splitrpc import heap
if sys.argv[1] == "fix":
    assert heap.fix_mmap_threshold(), "mallopt refused"
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(4 << 20)
print(libc.mallinfo2().hblkhd - before >= 4 << 20)
"""


def _mmapped_after_free(mode: str) -> bool:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).parents[1])
    return out.stdout.strip() == "True"


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc 2.33 or later
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc's mallinfo2")
def test_fixed_threshold_keeps_mapping_blocks_after_a_large_free():
    assert not _mmapped_after_free("dynamic"), "glibc no longer raises its threshold: the probe shows nothing"
    assert _mmapped_after_free("fix")


def test_a_users_own_threshold_is_kept_and_the_run_says_so(monkeypatch, capsys):
    monkeypatch.setenv(heap.ENV, "65536")
    assert heap.fix_mmap_threshold() is False
    assert heap.apply("fixed") is False
    assert capsys.readouterr().err.strip() == \
        f"splitrpc: warning: --heap fixed not applied ({heap.ENV} is set)"


@pytest.mark.parametrize("choice,fixed", [("dynamic", 0), ("fixed", 1)])
def test_every_process_applies_its_heap_option(monkeypatch, cli_check, choice, fixed):
    """train.main (every party of every method, the local baseline included) applies --heap."""
    calls = []
    monkeypatch.setattr(heap, "fix_mmap_threshold", lambda: calls.append(1) or True)
    # Past the option checks (a missing data directory is found after them, before any process starts).
    assert cli_check("--method", "split", "--heap", choice, "--dataset", "imagefolder", "--data-dir",
                     "/nonexistent").returncode == 2
    assert len(calls) == fixed


def test_a_bad_heap_choice_is_one_line(cli_check):
    result = cli_check("--heap", "tcmalloc")
    assert result.returncode == 2 and "--heap" in result.stderr and "Traceback" not in result.stderr


def test_the_heap_table_reports_medians_spread_and_the_ratio():
    from plots.docs import heap_table

    runs = [("local", "dynamic", 2000), ("local", "dynamic", 2400), ("local", "dynamic", 2200),
            ("local", "fixed", 1300), ("local", "fixed", 1400), ("local", "fixed", 1100)]
    records = [{"status": "ok", "config": {"method": m, "heap": h}, "samples_per_s": v} for m, h, v in runs]
    records.append({"status": "failed", "config": {"method": "local", "heap": "fixed"}, "samples_per_s": 1})
    row = next(line for line in heap_table(records) if line.startswith("| local"))
    assert row == "| local | 2200 (2000-2400, 3 runs) | 1300 (1100-1400, 3 runs) | 0.59 |"


def test_bench_scale_runs_and_keys_each_heap(monkeypatch, tmp_path):
    from bench import scale

    monkeypatch.setattr(scale.tempfile, "mkdtemp", lambda **_kwargs: str(tmp_path))

    started = []

    class Started(Exception):
        pass

    def popen(argv, **_kwargs):
        started.append(argv)
        raise Started

    monkeypatch.setattr(scale.subprocess, "Popen", popen)
    with pytest.raises(Started):
        scale.run_one("split", 2, "fork", [], 1.0, "fixed")
    assert started[0][-2:] == ["--heap", "fixed"]
    old = {"method": "split", "hospitals": 2, "start": "fork", "options": []}  # a record from before --heap
    assert scale.key_of(old) == scale.key_of({**old, "heap": "dynamic"}) != scale.key_of({**old, "heap": "fixed"})


def test_bench_scale_refuses_a_heap_among_the_training_options(capsys):
    from bench import scale

    assert scale.main(["--hospitals", "2", "--", "--heap", "fixed"]) == 2
    assert "give --heap before '--'" in capsys.readouterr().err


def test_a_checkpoint_resumes_under_either_heap():
    """--heap changes no arithmetic: a run checkpointed before the option existed (or under the other
    heap) resumes; the first harness resume after --heap was added failed on exactly this."""
    from splitrpc import checkpoint
    from splitrpc.config import parse_args

    assert checkpoint.fingerprint(parse_args(["--heap", "fixed"])) == checkpoint.fingerprint(parse_args([]))
