"""The run record (one JSON line per run): writing it, reading it, naming its run; and progress output.

Writing: ``new_record``, ``summarize_epoch``, ``append_jsonl``. Reading: ``RunRecord``,
a typed read-only view of one record (config, epochs and their accuracies, bytes,
timing, status), and ``variant``, the one function that names a run's variant in
tables, figures and the generated results (the names committed files hold).
"""

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

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


def cpu() -> dict:
    """What decides a CPU run's kernels, and so its clock and the last bits of its arithmetic: two VMs both
    called "vm" with the same core count may differ here, and the records must say which one ran what
    (docs/variants.md: the premise regime's curves and references came from two machines). ``key``:
    vendor-family-model-stepping-cores (the brand string, "Intel(R) Xeon(R) Processor", names several chips),
    the key of bench/check.py's per-CPU baselines."""
    fields, isa = {}, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "stepping", "model name") and key not in fields:
                fields[key] = value.strip()
            elif key == "flags":
                isa = sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    parts = [fields.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping")]
    return {"key": "-".join(parts + [f"{os.cpu_count()}cores"]),
            "model": fields.get("model name") or platform.processor() or None,
            "capability": torch.backends.cpu.get_cpu_capability(), "isa": isa}


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
        "cpu": cpu(),
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


# --------------------------------------------------------------------------- reading records
VARIANT_DETAILS = ("codec", "training", "engine")


def variant(cfg: Mapping, detail: str = "training") -> str:
    """How a run is named in tables, figures and generated results: its method and, by ``detail``, what
    distinguishes it from the method's other runs. Committed files hold these names: they never change.

    * ``"training"``: what changes the accuracy curve (plots.convergence, bench.time_to_accuracy):
      ``fedavg (10 local steps)``, ``fedavg (1 round per epoch)``, ``split (independent L1, cut 2)``,
      ``split (L1 averaged every 10 steps)``, ``split (independent L1, L1 gradient unscaled)``,
      ``split (independent L1, top-k 1/16)``; other methods by name. A model normalised otherwise than
      with BatchNorm (``--norm``) is another model: ``local (GroupNorm)``,
      ``split (L1 averaged every step, GroupNorm)``.
    * ``"codec"``: what changes the bytes on a link (bench.timemodel, plots.wan, the keys of
      results/wan_model.json): the method, with the cut-layer codec when one is used (``split+fp8``).
    * ``"engine"``: what changes the speed of the engine (plots.engine's throughput table): the schedule
      of local and split learning, split's prefetch and codec: ``local (parallel)``,
      ``split (sequential, no prefetch)``, ``split (parallel, fp8)``; other methods by name.
    """
    method = cfg["method"]
    bottleneck = f"bottleneck 1/{cfg['bottleneck']}" if cfg.get("bottleneck", 1) != 1 else None
    if detail == "codec":
        codec = cfg.get("codec", "none")
        cut = [codec_name(cfg)] if codec not in (None, "none") else []
        return "+".join([method, *([bottleneck] if bottleneck else []), *cut])
    if detail == "engine":
        if method == "local":
            return f"local ({cfg.get('schedule', 'sequential')})"
        if method != "split":
            return method
        parts = [cfg.get("schedule", "sequential")]
        if not cfg.get("prefetch", True) and cfg.get("schedule") == "sequential":
            parts.append("no prefetch")
        if cfg.get("codec", "none") != "none":
            parts.append(codec_name(cfg))
        return f"split ({', '.join(parts)})"
    if detail != "training":
        raise ValueError(f"unknown variant detail {detail!r}: choose from {', '.join(VARIANT_DETAILS)}")
    norm = NORM_NAMES.get(cfg.get("norm", "batch"), f"norm {cfg.get('norm')}")
    name = _training_name(cfg, method, bottleneck)
    if not norm:
        return name
    return f"{name[:-1]}, {norm})" if name.endswith(")") else f"{name} ({norm})"


# How a training variant's name says its normalisation (BatchNorm, the default, says nothing: the
# names committed before --norm existed stay as they were).
NORM_NAMES = {"batch": "", "group": "GroupNorm", "none": "no normalisation"}


def _training_name(cfg: Mapping, method: str, bottleneck: str | None) -> str:
    if method == "fedavg":
        steps = cfg.get("local_steps", 1)
        rounds = "1 round per epoch" if steps >= 10000 else f"{steps} local steps"
        return f"fedavg ({rounds}{', ' + bottleneck if bottleneck else ''})"
    if method in ("split-localloss", "splitfed"):  # split learning's variants: what sets them apart, then the cut
        parts = []
        if method == "splitfed":
            parts.append(f"V{cfg.get('splitfed_version', '1')}")
            every = cfg.get("splitfed_sync_every", 0)
            parts.append("averaged every epoch" if not every else f"averaged every {every} steps")
        parts += _cut_parts(cfg, bottleneck)
        return f"{method} ({', '.join(parts)})" if parts else method
    if method != "split":
        return f"{method} ({bottleneck})" if bottleneck else method
    parts = []
    if cfg.get("l1") == "average":
        every = cfg.get("l1_sync_every", 1)
        parts.append("L1 averaged every step" if every == 1 else f"L1 averaged every {every} steps")
    else:
        parts.append("independent L1")
    if cfg.get("l1_grad_scale", "participants") == "none":
        parts.append("L1 gradient unscaled")
    return f"split ({', '.join(parts + _cut_parts(cfg, bottleneck))})"


def _cut_parts(cfg: Mapping, bottleneck: str | None) -> list[str]:
    """What a split variant's name says of its cut: a deeper cut, the bottleneck, the codec."""
    parts = [f"cut {cfg['cut']}"] if cfg.get("cut", 1) != 1 else []
    if bottleneck:
        parts.append(bottleneck)
    if cfg.get("codec", "none") != "none":
        parts.append(codec_name(cfg))
    return parts


def codec_name(cfg: Mapping) -> str:
    """The cut's codec as tables name it: ``fp8``, ``top-k 1/16``, ``top-k 1/16 fp8, random 0.1, feedback``."""
    codec = cfg.get("codec", "none")
    if codec != "topk":
        return codec
    name = f"top-k 1/{cfg.get('topk_ratio', 16)}"
    if cfg.get("topk_values", "bf16") != "bf16":
        name += f" {cfg['topk_values']}"
    extras = ([f"random {cfg['topk_random']:g}"] if cfg.get("topk_random", 0) else []) + \
        (["feedback"] if cfg.get("topk_feedback") else [])
    return ", ".join([name, *extras])


@dataclass(frozen=True)
class Epoch:
    """One entry of a record's ``epochs`` (``summarize_epoch``); the accuracies are None when not evaluated,
    any other field the entry lacks is None too."""
    epoch: int
    steps: int | None
    train_time_s: float | None
    train_loss: float | None
    test_acc_mean: float | None
    test_acc_min: float | None

    @property
    def evaluated(self) -> bool:
        return self.test_acc_mean is not None


def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(mapping or {})


@dataclass(frozen=True)
class RunRecord:
    """A typed, read-only view of one run record (a dict as ``json.loads`` gives it): ``RunRecord.of(record)``.

    Fields a record lacks read as None (``config``, ``comm``: empty, ``epochs``: none); ``config`` and ``comm``
    are read-only views of the record's own dicts, not copies.
    """
    config: Mapping
    status: str | None
    epochs: tuple[Epoch, ...]
    final_acc: float | None
    final_acc_min: float | None
    steps: int | None
    steps_per_epoch: int | None
    train_time_s: float | None
    wall_time_s: float | None
    comm: Mapping

    @classmethod
    def of(cls, record: Mapping) -> RunRecord:
        epochs = tuple(Epoch(e["epoch"], e.get("steps"), e.get("train_time_s"), e.get("train_loss"),
                             e.get("test_acc_mean"), e.get("test_acc_min")) for e in record.get("epochs") or ())
        return cls(_frozen(record.get("config")), record.get("status"), epochs, record.get("final_test_acc"),
                   record.get("final_test_acc_min"), record.get("steps"), record.get("steps_per_epoch"),
                   record.get("train_time_s"), record.get("wall_time_s"), _frozen(record.get("comm")))

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def hospitals(self) -> int:
        return self.config["hospitals"]

    def variant(self, detail: str = "training") -> str:
        return variant(self.config, detail)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def whole_schedule(self) -> bool:
        """Ended ok after every epoch of its schedule (not a run cut short by --max-steps or an error)."""
        return self.ok and len(self.epochs) == self.config["epochs"]

    def curve(self, key: str = "test_acc_mean") -> tuple[list[int], list[float]]:
        """(epoch numbers, ``key``: test_acc_mean or test_acc_min) over the evaluated epochs."""
        evaluated = [e for e in self.epochs if getattr(e, key) is not None]
        return [e.epoch for e in evaluated], [getattr(e, key) for e in evaluated]

    @property
    def seconds_per_step(self) -> float:
        """Training seconds per step, measured (evaluations not counted)."""
        return self.train_time_s / self.steps

    def bytes_per_epoch_per_hospital(self, kind: str = "tcp") -> float | None:
        """Training bytes per hospital per epoch (``kind``: tcp, the kernel's counters; payload; analytic);
        None for a run without them (local training: nothing crosses a network)."""
        return ((self.comm.get("per_epoch") or {}).get(kind) or {}).get("per_hospital")

    def hospital_bytes_per_step(self) -> dict[str, dict[str, float]]:
        """{hospital: {"up", "down"}}: bytes per training step on each hospital's link (the kernel's TCP counters)."""
        tcp, steps = self.comm["phases"]["train"]["tcp_bytes"], self.steps
        return {party: {"up": tcp[party]["sent"] / steps, "down": tcp[party]["received"] / steps}
                for party in tcp if party.startswith("hospital")}
