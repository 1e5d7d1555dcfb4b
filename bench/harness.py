"""Run a matrix of training runs, one process group per run, resumably.

    python -m bench run bench/configs/<name>.toml     # results/<name>.jsonl
    python -m bench list bench/configs/<name>.toml    # what would run, and what is done

A config file has ``[base]`` options shared by every run, a ``[matrix]`` whose
keys each list values (a value may be a table of several options that go
together), and optional ``[[include]]`` extra runs and ``[[exclude]]`` rules.
Top-level keys: ``name`` (results file stem), ``timeout`` (seconds per run),
``description``.

Options named ``link-*`` are not training options: a run with ``link-rate``
(every hospital's link, e.g. "20mbit"; "none" = unshaped) and optionally
``link-server-rate`` runs across network namespaces on shaped links through
``bench.wan`` (root only), and its record gains the link measurements and the
time model's check against the unshaped run of the same setting (list "none"
first so that it runs before the shaped ones).

Each run is ``python -m splitrpc.train`` in its own process (which starts its
own torchrun group) with ``--run-key``: a hash of its options. Runs already
in the results file with status "ok" are skipped, so an interrupted matrix
resumes where it stopped. A failed or timed-out run is recorded with its
error and the matrix goes on.

A run also resumes within itself: every run of a method that checkpoints
(``Method.options`` has the checkpoint options) saves a checkpoint every epoch
(unless the config sets ``checkpoint-every``) under
``.cache/bench-checkpoints/<name>/<run_key>/`` (or the config's own
``checkpoint-dir``). If the harness was killed or the machine rebooted, the
next ``python -m bench run`` finds a step there at which every party has its
file, passes ``--resume``, and the record says ``resumed_from_step``. These
options are added to the command only, never to the run key, so results
recorded before keep matching. A finished run's checkpoints are deleted once
its record is written (a directory the config named is left alone). A
checkpoint made by a run with other options (e.g. the code's defaults
changed) cannot be resumed and the run fails saying so: delete the directory
to start that run over.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import deque
from pathlib import Path

from bench.wan import parse_rate
from splitrpc import checkpoint, methods
from splitrpc.config import from_dict
from splitrpc.errors import UserError, report
from splitrpc.record import append_jsonl

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 3600
CHECKPOINT_ROOT = REPO / ".cache" / "bench-checkpoints"  # ignored by git (/.cache/)
CHECKPOINT_EVERY = "1e"
STOP_GRACE_S = 20
ERROR_TAIL_LINES = 5


def load(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            spec = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"no such benchmark config: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(spec) - {"name", "timeout", "description", "base", "matrix", "include", "exclude"}
    if unknown:
        raise UserError(f"{path}: unknown top-level keys {sorted(unknown)}")
    spec.setdefault("name", Path(path).stem)
    return spec


def _norm(options: dict) -> dict:
    return {k.replace("-", "_"): v for k, v in options.items()}


def expand(spec: dict) -> list[dict]:
    """Every run's options (explicit ones only), in matrix order, validated."""
    base = _norm(spec.get("base", {}))
    matrix = spec.get("matrix", {})
    axes = []
    for key, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"[matrix] {key}: expected a non-empty list")
        axes.append([_norm(v) if isinstance(v, dict) else {key.replace("-", "_"): v} for v in values])
    runs = []
    for combo in itertools.product(*axes) if axes else [()]:
        options = dict(base)
        for part in combo:
            options.update(part)
        runs.append(options)
    runs += [{**base, **_norm(extra)} for extra in spec.get("include", [])]
    excludes = [_norm(rule) for rule in spec.get("exclude", [])]
    runs = [r for r in runs if not any(all(r.get(k) == v for k, v in rule.items()) for rule in excludes)]
    seen, unique = set(), []
    for options in runs:
        key = run_key(options)
        if key not in seen:
            # A bad option stops the matrix before anything runs (checked as the run will be: with its checkpoints).
            from_dict(training_options(with_checkpoints(options, spec.get("name", ""), key, CHECKPOINT_ROOT)[0]))
            for rate in link_options(options).values():
                parse_rate(str(rate))
            seen.add(key)
            unique.append(options)
    return unique


LINK_PREFIX = "link_"
LINK_FLAGS = {"link_rate": "--rate", "link_server_rate": "--server-rate"}
DUPLEX_CALIBRATION = "link_duplex.json"  # python -m bench.link_duplex --json, beside the results


def training_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if not k.startswith(LINK_PREFIX)}


def link_options(options: dict) -> dict:
    links = {k: v for k, v in options.items() if k.startswith(LINK_PREFIX)}
    unknown = set(links) - set(LINK_FLAGS)
    if unknown:
        raise UserError(f"unknown link option(s) {sorted(unknown)}; known: {sorted(LINK_FLAGS)}")
    return links


def command(options: dict, key: str, results: Path, timeout: float) -> list[str]:
    """The run's command: the trainer itself, or bench.wan around it when the options name links."""
    train = [*flags(training_options(options)), "--run-key", key]
    links = link_options(options)
    if not links:
        return [sys.executable, "-m", "splitrpc.train", *train, "--out", str(results)]
    wan = [sys.executable, "-m", "bench.wan", "--out", str(results), "--compute-reference", str(results),
           # bench.wan stops and tears its network down itself, before the harness would kill it.
           "--timeout", f"{max(1.0, timeout - 2 * STOP_GRACE_S):g}"]
    duplex = results.parent / DUPLEX_CALIBRATION
    if duplex.exists():  # the shaped runs' in-record model check uses the emulator's measured duplex goodput
        wan += ["--duplex", str(duplex)]
    for name, value in links.items():
        wan += [LINK_FLAGS[name], str(value)]
    return [*wan, "--", *train]


def run_key(options: dict) -> str:
    canonical = json.dumps({k: options[k] for k in sorted(options)}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def done_keys(results: Path) -> set[str]:
    if not results.exists():
        return set()
    keys = set()
    for line in results.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a crash is ignored, not fatal
        if record.get("status") == "ok":
            keys.add(record.get("config", {}).get("run_key"))
    return keys


def flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def describe(options: dict, base: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items() if base.get(k) != v or k in ("method",)) or "base"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own, out of its group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> str:
    """Stop a run and all its workers: SIGTERM (the agent stops its workers), then SIGKILL what is left."""
    workers = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=grace_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        err = ""
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.communicate()
    return err or ""


def for_run(options: dict, key: str) -> dict:
    """``{run_key}`` in an option's value is replaced by the run's key (a directory per run)."""
    return {k: v.replace("{run_key}", key) if isinstance(v, str) else v for k, v in options.items()}


def with_checkpoints(options: dict, name: str, key: str, root: Path) -> tuple[dict, Path | None, int | None]:
    """The run's options with its checkpoints, for a method that takes them: (options, the directory
    to delete once the run is recorded (None: none, or the config's own), the step it resumes from
    or None). The run key is the caller's, computed before: these options never enter it."""
    options = for_run(options, key)
    method = methods.get(options.get("method", from_dict({}).method))
    if not methods.CHECKPOINT_OPTIONS <= method.options:
        return options, None, None
    own = not options.get("checkpoint_dir")
    directory = root / name / key if own else REPO / Path(options["checkpoint_dir"]).expanduser()
    options = {**options, "checkpoint_dir": str(directory)}
    options.setdefault("checkpoint_every", CHECKPOINT_EVERY)
    cfg = from_dict(training_options(options))
    complete = checkpoint.complete_steps(directory, method.checkpoint_parties(cfg))
    if complete:
        options["resume"] = True
    return options, directory if own else None, complete[-1] if complete else None


def execute(options: dict, key: str, results: Path, log: Path, timeout: float) -> tuple[bool, str]:
    """One run in its own process group; True if it wrote its record."""
    options = for_run(options, key)
    cmd = command(options, key, results, timeout)
    log.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            err = stop(proc)
            fh.write(err)
            return False, f"timed out after {timeout:g} s"
        except BaseException:
            stop(proc)  # Ctrl-C: leave no worker behind
            raise
        fh.write(err)
    for line in err.splitlines():
        if line.strip():
            tail.append(line.strip())
    if proc.returncode == 0:
        return True, ""
    errors = [ln for ln in tail if "error" in ln.lower()] or list(tail)
    return False, errors[-1] if errors else f"exit code {proc.returncode}"


def run_matrix(config_path: str, results_dir: str = "results", dry_run: bool = False,
               checkpoint_root: Path = CHECKPOINT_ROOT) -> int:
    spec = load(config_path)
    runs = expand(spec)
    # Absolute: the runs execute in the repository root, wherever this was started from.
    results = Path(results_dir).resolve() / f"{spec['name']}.jsonl"
    timeout = float(spec.get("timeout", DEFAULT_TIMEOUT_S))
    done = done_keys(results)
    todo = [(run_key(o), o) for o in runs if run_key(o) not in done]
    base = _norm(spec.get("base", {}))
    print(f"[bench] {spec['name']}: {len(runs)} runs, {len(runs) - len(todo)} already in {results}, "
          f"{len(todo)} to run", flush=True)
    if dry_run:
        for key, options in todo:
            resumes = with_checkpoints(options, spec["name"], key, checkpoint_root)[2]
            print(f"[bench]   {key} {describe(options, base)}" + (f" (resumes from step {resumes})" if resumes else ""))
        return 0
    failures, durations = 0, []
    for i, (key, options) in enumerate(todo, start=1):
        eta = ""
        if durations:
            left = sum(durations) / len(durations) * (len(todo) - i + 1)
            eta = f", eta {datetime.timedelta(seconds=int(left))}"
        print(f"[bench] run {i}/{len(todo)} ({len(todo) - i} left after this{eta}): {describe(options, base)}",
              flush=True)
        command_options, checkpoints, resumes = with_checkpoints(options, spec["name"], key, checkpoint_root)
        if resumes is not None:
            print(f"[bench]   resuming from the checkpoint of step {resumes} in {command_options['checkpoint_dir']} "
                  "(delete it to start the run over)", flush=True)
        # The run's own progress (steps, loss, eta) goes to its log, not here: say where.
        log = results.parent / "logs" / spec["name"] / f"{key}.log"
        print(f"[bench]   progress: {log}", flush=True)
        started = time.perf_counter()
        ok, error = execute(command_options, key, results, log, timeout)
        seconds = time.perf_counter() - started
        durations.append(seconds)
        if ok:
            print(f"[bench]   done in {seconds:.0f}s", flush=True)
            if checkpoints is not None:  # the record is written: the checkpoints are only disk now
                shutil.rmtree(checkpoints, ignore_errors=True)
                with contextlib.suppress(OSError):
                    checkpoints.parent.rmdir()  # the config's directory, once its last run is done
            continue
        failures += 1
        print(f"[bench]   FAILED after {seconds:.0f}s: {error}", flush=True)
        append_jsonl(str(results), {
            "record_version": 1, "status": "failed", "error": error, "wall_time_s": seconds,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {**options, "run_key": key},
        })
    print(f"[bench] {spec['name']}: {len(todo) - failures} ran, {failures} failed; results in {results}", flush=True)
    return 1 if failures else 0


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "list"])
    parser.add_argument("config", help="bench/configs/<name>.toml")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--checkpoint-root", type=Path, default=CHECKPOINT_ROOT,
                        help="where runs keep their checkpoints, under <name>/<run_key>/ (default: %(default)s)")
    args = parser.parse_args(argv)
    # `kill <harness>` (a scheduler, a session's end) is a Ctrl-C: the run in progress is stopped with its
    # workers (they run in their own session, so they would outlive the harness) and keeps its checkpoints.
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        return run_matrix(args.config, args.results_dir, dry_run=args.command == "list",
                          checkpoint_root=args.checkpoint_root.resolve())
    except UserError as exc:
        return report(exc)
    except KeyboardInterrupt:
        print("[bench] interrupted; finished runs are kept and will be skipped next time", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python -m bench list ... | head`
        return 0
