"""Shared helpers: where the real CIFAR-10 archive is, a data cache that
outlives one session, and a runner for the CLI as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# Decoded data sets are cached here across test sessions (the archive takes ~15 s to decode).
CACHE_DIR = Path(os.environ.get("SPLITRPC_TEST_CACHE", REPO / ".cache" / "test-data"))


def options_for(method: str, args) -> list:
    """``args`` without the options that ``method`` does not read (they are an error there): one
    list of options serves a method and its reference, e.g. split and local training."""
    from splitrpc import methods
    from splitrpc.config import FIELDS

    others = set(methods.readers()) - set(methods.get(method).options)
    kept, args, i = [], list(args), 0
    while i < len(args):
        name = str(args[i]).removeprefix("--").removeprefix("no-").replace("-", "_")
        if str(args[i]).startswith("--") and name in others:
            i += 1 if type(FIELDS[name].default) is bool else 2
            continue
        kept.append(args[i])
        i += 1
    return kept


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small tensors on a shared 2-core machine run faster without
    threads that spin against other processes (50 s instead of 1 s), and timings stay steady."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir() -> str:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return str(CACHE_DIR)


@pytest.fixture(scope="session")
def cifar_jpeg() -> str:
    if not CIFAR_JPEG.exists():
        pytest.fail(f"the real CIFAR-10 archive is expected at {CIFAR_JPEG}")
    return str(CIFAR_JPEG)


class Result:
    def __init__(self, proc: subprocess.CompletedProcess, out: Path | None):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.out = out

    @property
    def records(self) -> list[dict]:
        if self.out is None or not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def __repr__(self):
        return f"<rc={self.returncode}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}>"


def run_cli(args: list[str], tmp_path: Path | None = None, timeout: float = 300, env: dict | None = None,
            module: str = "splitrpc.train") -> Result:
    """Run ``python -m splitrpc.train <args>`` in a fresh process; a record file goes in tmp_path."""
    out = None
    if tmp_path is not None and "--out" not in args:
        out = tmp_path / "runs.jsonl"
        args = [*args, "--out", str(out)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)
    return Result(proc, out)


@pytest.fixture
def cli(tmp_path, cache_dir):
    def _run(*args, timeout: float = 300, env: dict | None = None, out: bool = True):
        return run_cli([*map(str, args), "--cache-dir", cache_dir], tmp_path if out else None, timeout, env)
    return _run


class CheckResult(Result):
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr, self.out = returncode, stdout, stderr, None


@pytest.fixture
def cli_check(cache_dir, monkeypatch):
    """``python -m splitrpc.train <args>``'s input checks, run in this process up to where processes
    would start. A fresh interpreter costs about 2.5 s of imports per case, which the many bad-input
    cases would pay for nothing; ``test_errors.py`` keeps a fresh-process case for the exit code
    itself. Input the checks let through fails the test instead of starting a run."""
    import contextlib
    import io

    from splitrpc import launch, lifecycle, train

    def started(*_args, **_kwargs):
        raise AssertionError("the checks let this input through: a run would start")

    for module, name in ((launch, "launch"), (launch, "forked"), (lifecycle, "run")):
        monkeypatch.setattr(module, name, started)

    def _run(*args) -> CheckResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train.main([*map(str, args), "--cache-dir", cache_dir])
        return CheckResult(code, out.getvalue(), err.getvalue())
    return _run
