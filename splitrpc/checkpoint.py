"""Per-party checkpoints, tagged with a common step.

Every party writes only its own state, to its own disk:

    <checkpoint-dir>/step-000001200/server.pt
    <checkpoint-dir>/step-000001200/hospital2.pt

A file is written to a temporary name and renamed, so a crash leaves either
the old set or a complete new file, never half of one. Beside it,
``<party>.pt.sha256`` holds the digest of its bytes: a file damaged after it was
written (a truncated copy, a flipped bit, a full disk's half write by another
tool) does not match, and is skipped as if it were absent, with one line that
names it, so a run never resumes into a state other than the one saved. (A file
without a digest, written before digests existed, is trusted.) A *consistent*
set is a step for which every party has a sound file; resuming uses the newest
such step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable

import torch

from splitrpc import console
from splitrpc.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d{9})$")
# Options that may change between a run and its resumption without changing what is computed.
RUNTIME_OPTIONS = {
    "out", "tag", "run_key", "config", "resume", "checkpoint_dir", "checkpoint_every", "checkpoint_keep",
    "max_restarts", "rpc_timeout", "setup_timeout", "rpc_threads", "log_every", "save_dir", "fault",
    "on_hospital_failure", "cache_dir", "data_dir", "download", "transport", "max_steps", "eval_every",
    "record_step_losses", "dedup_key_file", "prefetch", "run_ahead", "start", "heap",
}


def _relevant(cfg) -> dict:
    """The options that determine the computation, as JSON values (what a checkpoint keeps of them)."""
    return json.loads(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_OPTIONS}, default=str))


def fingerprint(cfg) -> str:
    """Digest of the options that determine the computation; a checkpoint only resumes a run with the same."""
    return hashlib.sha256(json.dumps(_relevant(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity(cfg) -> dict:
    """What every checkpoint file carries of its run: the fingerprint, and the options behind it."""
    return {"fingerprint": fingerprint(cfg), "options": _relevant(cfg)}


def changed_options(saved: dict | None, cfg) -> list[str] | None:
    """The options in which ``cfg`` differs from those a checkpoint was written with; None where the file
    predates keeping them. An option added since (absent from ``saved``) counts as unchanged at its default:
    a new option's default keeps the computation it had before the option existed."""
    if saved is None:
        return None
    # type(cfg)(): the defaults of the config's own class (importing Config here would close a cycle,
    # since config imports this module to parse --checkpoint-every).
    now, defaults, missing = _relevant(cfg), _relevant(type(cfg)()), object()
    return sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k, missing)) != now.get(k, missing))


def should_resume(cfg) -> bool:
    """--resume, or torchrun restarted the group after a failure and there are checkpoints."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    return cfg.resume or (restarted and bool(cfg.checkpoint_dir))


def due(every: int, steps_done: int, total_steps: int) -> bool:
    """A checkpoint after this step: every ``every`` steps (0: never), and after the run's last step
    (the final state, so that a longer run can continue from it)."""
    return steps_done == total_steps or bool(every) and steps_done % every == 0


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root).expanduser() / f"step-{step:09d}"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_atomically(final: Path, write) -> None:
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def save(root: str | Path, step: int, party: str, state: dict) -> Path:
    directory = step_dir(root, step)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{party}.pt"
    tmp = directory / f".{party}.pt.tmp{os.getpid()}"
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    # The digest goes first: a crash between the two renames leaves a digest without its file
    # (the step is incomplete, as before), never a file without its digest.
    _write_atomically(_digest_path(final), lambda p: p.write_text(_digest(tmp) + "\n"))
    os.replace(tmp, final)
    return final


_reported: set[Path] = set()


def problem(path: Path) -> str:
    """Why a checkpoint file cannot be trusted ('' if it can): its bytes do not match the digest written with it."""
    digest = _digest_path(path)
    try:
        expected = digest.read_text().strip()
    except FileNotFoundError:
        return ""  # written before digests existed
    except OSError as exc:
        return f"its digest {digest.name} is unreadable ({exc})"
    try:
        actual = _digest(path)
    except OSError as exc:
        return f"it is unreadable ({exc})"
    return "" if actual == expected else "its bytes do not match the sha256 written with it (damaged since)"


def sound(path: Path) -> bool:
    """Whether ``path`` is there and matches its digest; a damaged file is named once on stderr."""
    if not path.is_file():
        return False
    why = problem(path)
    if why and path not in _reported:
        _reported.add(path)
        console.line(f"splitrpc: warning: checkpoint {path} is skipped: {why}", sys.stderr)
    return not why


def load(root: str | Path, step: int, party: str, cfg) -> dict:
    path = step_dir(root, step) / f"{party}.pt"
    if path.is_file() and (why := problem(path)):
        raise UserError(f"{party}: checkpoint {path} cannot be used: {why}")
    try:
        state = torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"{party}: no checkpoint at {path}") from None
    except Exception as exc:
        raise UserError(f"{party}: checkpoint {path} is unreadable ({exc})") from None
    if state.get("fingerprint") != fingerprint(cfg):
        changed = changed_options(state.get("options"), cfg)
        if changed is None or changed:
            which = f" ({', '.join('--' + k.replace('_', '-') for k in changed)})" if changed else ""
            raise UserError(f"{party}: checkpoint {path} was written by a run with different options{which}; "
                            f"resume with the options it was written with, or use another --checkpoint-dir")
    return state


def available_steps(root: str | Path, party: str) -> list[int]:
    """Steps for which this party has a sound checkpoint file (see ``sound``), oldest first."""
    base = Path(root).expanduser()
    if not base.is_dir():
        return []
    steps = []
    for entry in base.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and sound(entry / f"{party}.pt"):
            steps.append(int(m.group(1)))
    return sorted(steps)


def newest_common(steps_by_party: Iterable[Iterable[int]]) -> int | None:
    """The newest step that every party has (each party's list from ``available_steps``), or None."""
    sets = [set(steps) for steps in steps_by_party]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def complete_steps(root: str | Path, parties: Iterable[str]) -> list[int]:
    """Steps at which every one of ``parties`` has its file, oldest first: the steps a run can resume from."""
    sets = [set(available_steps(root, party)) for party in parties]
    return sorted(set.intersection(*sets)) if sets else []


def prune(root: str | Path, party: str, keep: int) -> None:
    """Delete this party's files older than its ``keep`` newest; remove step directories left empty."""
    for step in available_steps(root, party)[:-keep] if keep > 0 else []:
        directory = step_dir(root, step)
        (directory / f"{party}.pt").unlink(missing_ok=True)
        _digest_path(directory / f"{party}.pt").unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass  # other parties' files are still there


def parse_every(text: str, steps_per_epoch: int) -> int:
    """'500' -> every 500 steps; '2e' or '2epochs' -> every 2 epochs (in steps); '' or '0' -> never."""
    text = text.strip().lower()
    if text in ("", "0"):
        return 0
    m = re.fullmatch(r"(\d+)\s*(e|ep|epoch|epochs)?", text)
    if not m:
        raise UserError(f"--checkpoint-every: expected a number of steps or epochs like '500' or '2e', got {text!r}")
    count = int(m.group(1))
    return count * steps_per_epoch if m.group(2) else count
