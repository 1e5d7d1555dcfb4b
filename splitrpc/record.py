"""The run record (one JSON line per run) and progress output."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import socket
import subprocess
import time
import uuid
from pathlib import Path

import torch

from splitrpc import console

RECORD_VERSION = 1


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def relative_speed(rate: float, reference_rate: float) -> float:
    """The engine-overhead ratio: a method's work per second over its reference's, both measured
    on the same machine in the same session (1.0: the engine adds nothing; 0.5: half as fast).

    The throughput tables' "vs local" and `make bench-check`'s quantities are this one number,
    which carries across CPUs where samples/s do not."""
    return rate / reference_rate


def new_record(cfg) -> dict:
    return {
        "record_version": RECORD_VERSION,
        "run_id": uuid.uuid4().hex[:12],
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "config": cfg.to_dict(),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "threads_per_process": torch.get_num_threads(),
        "epochs": [],
        "comm": None,  # filled by the communication accounting
    }


def append_jsonl(path: str, record: dict) -> None:
    """Append one line atomically: one write() on an O_APPEND file under an exclusive lock."""
    if not path:
        return
    line = (json.dumps(record, sort_keys=False) + "\n").encode()
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(path).expanduser(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class Progress:
    """Periodic one-line progress for long runs: epoch, step, loss, lr and throughput."""

    def __init__(self, cfg, total_steps: int, who: str, quiet: bool = False):
        self.cfg, self.total, self.who, self.quiet = cfg, total_steps, who, quiet
        self._t0 = time.perf_counter()
        self._first_step: int | None = None  # a resumed run starts counting its rate from here
        self._window_samples, self._window_loss, self._window_steps = 0, 0.0, 0
        self._window_t = self._t0

    def step(self, global_step: int, epoch: int, loss: float, samples: int, lr: float) -> None:
        if self._first_step is None:
            self._first_step = global_step
        self._window_samples += samples
        self._window_loss += loss
        self._window_steps += 1
        done = global_step + 1
        if done % self.cfg.log_every == 0 or done == self.total:
            now = time.perf_counter()
            rate = self._window_samples / max(now - self._window_t, 1e-9)
            eta = (now - self._t0) / max(1, done - self._first_step) * (self.total - done)
            self.print(f"epoch {epoch + 1}/{self.cfg.epochs} step {done}/{self.total} "
                       f"loss {self._window_loss / self._window_steps:.4f} lr {lr:.4g} "
                       f"{rate:.0f} samples/s eta {eta:.0f}s")
            self._window_samples, self._window_loss, self._window_steps = 0, 0.0, 0
            self._window_t = now

    def print(self, message: str) -> None:
        if not self.quiet:
            console.line(f"[{self.who}] {message}")


def summarize_epoch(epoch: int, losses: list[float], samples: int, seconds: float, lr: float,
                    accuracies: list[float] | None) -> dict:
    entry = {
        "epoch": epoch + 1,
        "steps": len(losses),
        "samples": samples,
        "train_loss": sum(losses) / max(1, len(losses)),
        "train_time_s": seconds,
        "lr_end": lr,
    }
    if accuracies is not None:
        live = [a for a in accuracies if a is not None]  # None: a hospital lost during the run
        entry["test_acc_per_hospital"] = accuracies
        entry["test_acc_mean"] = sum(live) / len(live)
        entry["test_acc_min"] = min(live)
    return entry


def print_summary(run: dict, who: str) -> None:
    """The run's result in a few lines: accuracy, time, bytes."""
    from splitrpc.comm import human_bytes

    acc = run.get("final_test_acc")
    line = f"final test accuracy {acc:.4f}" if acc is not None else "no evaluation"
    if run.get("final_test_acc_min") is not None and run["final_test_acc_min"] != acc:
        line += f" (min over hospitals {run['final_test_acc_min']:.4f})"
    line += f"; wall time {run.get('wall_time_s', 0):.1f}s"
    console.line(f"[{who}] {line}")
    comm = run.get("comm")
    if comm:
        train = comm["phases"]["train"]
        parts = [f"{kind} {human_bytes(train[f'{kind}_bytes']['total'])}" for kind in ("analytic", "payload", "tcp")
                 if train.get(f"{kind}_bytes")]
        console.line(f"[{who}] training traffic over {comm['measured_steps']} steps: {', '.join(parts)}")
