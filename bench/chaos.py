"""Random faults, survived or stopped cleanly: real runs across network namespaces, one fault each.

    python -m bench.chaos --trials 30 [--seed 0] [--out results/chaos.jsonl]
    python -m bench.chaos --table results/chaos.jsonl     # the table of docs/results/chaos.md

Every trial is a short real run (3 hospitals, ResNet-20 x0.25 on synthetic data, 2 epochs of
20 batches per hospital, checkpoints every 5 steps, ``--rpc-timeout 8``) of one method, each party a process of its own in
a network namespace of its own (``bench.wan.Network``, unshaped links): as on separate sites, no
torchrun agent ends the group for it. At a random step one fault is injected:

* ``kill``: SIGKILL of one party, the server included;
* ``stop-short`` / ``stop-long``: SIGSTOP of one party for 0.3x / 2.5x the RPC timeout, then SIGCONT;
* ``link-short`` / ``link-long``: one party's link taken down for 0.3x / 2.5x the RPC timeout (longer than
  a timeout and the wait of DDP's and FedAvg's ranks before naming a silent one, see ``splitrpc.ranks.blame``);
* ``corrupt``: every party killed (a crash), then the newest complete checkpoint of one party
  truncated or one of its bytes flipped, before the run is started again.

The trial then plays the operator: a run that stopped is started again with ``--resume`` (up to
``RESTARTS`` times). What must hold, and what a trial's ``outcome`` says:

* ``survived``: the run finished without a restart, and its final weights equal the undisturbed
  run's bit for bit;
* ``resumed``: the run stopped (every party exited within ``bound_s`` of the fault's end, with a
  non-zero exit and a line naming the party at fault, and no record line), was resumed, and its
  final weights equal the undisturbed run's bit for bit;
* ``continued``: under ``--on-hospital-failure continue`` the run went on without the hospital
  (the record names it in ``lost_hospitals``); the weights differ from the undisturbed run's by
  design (a hospital's data left the training), so they are not compared;
* anything else is a failure and says which: ``hang`` (a party still running ``bound_s`` after
  the fault's end; killed), ``unnamed`` (stopped without a line naming the party), ``partial-record``
  (a run that failed wrote a record line, or the finished run's record lacks steps), ``wrong-state``
  (the final weights differ from the undisturbed run's), ``no-finish`` (the resumed run did not finish).

The undisturbed run of each method (same options, same threads, no fault) is run once per
invocation as the reference. Records are appended to ``--out`` one per trial, keyed by the seed and
the trial's number, so an interrupted campaign continues where it stopped. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import wan
from splitrpc import methods
from splitrpc.errors import UserError, report
from splitrpc.record import append_jsonl

RPC_TIMEOUT_S = 8
HOSPITALS = 3
CHECKPOINT_EVERY = 5
RESTARTS = 2
# After the fault ends, every party must have exited (or the run finished) within this: the RPC
# timeout, the hospitals' heartbeat and shutdown grace, and start-up noise on 2 shared cores.
BOUND_S = 3 * RPC_TIMEOUT_S + 30
RUN_TIMEOUT_S = 300  # a whole attempt, start-up included
BASE = ["--hospitals", str(HOSPITALS), "--dataset", "synthetic", "--synthetic-train", "960",
        "--synthetic-test", "64", "--model", "resnet20", "--width", "0.25", "--batch-size", "16",
        "--epochs", "2", "--momentum", "0.9", "--lr", "0.05", "--threads", "1", "--log-every", "1",
        "--rpc-timeout", str(RPC_TIMEOUT_S), "--checkpoint-every", str(CHECKPOINT_EVERY)]
# (method, extra options, on-hospital-failure); split weighs most, as the method the design is about.
METHODS = [("split", [], "abort"), ("split", [], "abort"), ("split", [], "continue"),
           ("split-localloss", [], "abort"), ("splitfed", ["--l1", "average"], "abort"),
           ("ddp", [], "abort"), ("fedavg", ["--local-steps", "4"], "abort")]
FAULTS = ["kill", "stop-short", "stop-long", "link-short", "link-long", "corrupt"]
FAILURES = {"hang", "unnamed", "partial-record", "wrong-state", "no-finish"}
_STEP = re.compile(r"step (\d+)/(\d+)")
_SAID = re.compile(r"^splitrpc(\[[^\]]*\])?: (error|warning)")


@dataclass
class Trial:
    seed: int
    index: int
    method: str
    extra: list
    policy: str
    fault: str
    victim: str  # server, hospital<i>
    at_step: int
    duration_s: float  # stop and link faults
    damage: str  # corrupt: truncate | flip


def plan(seed: int, index: int) -> Trial:
    """Trial ``index`` of campaign ``seed``: a function of both, so a campaign resumes identically."""
    rng = random.Random(seed * 1_000_003 + index)
    method, extra, policy = rng.choice(METHODS)
    fault = FAULTS[index % len(FAULTS)] if index < len(FAULTS) else rng.choice(FAULTS)  # every kind early
    has_server = methods.get(method).has_server
    victims = (["server"] if has_server else []) + [f"hospital{i}" for i in range(1, HOSPITALS + 1)]
    duration = {"stop-short": 0.3, "link-short": 0.3, "stop-long": 2.5, "link-long": 2.5}.get(fault, 0.0) * RPC_TIMEOUT_S
    return Trial(seed, index, method, list(extra), policy, fault, rng.choice(victims),
                 rng.randint(CHECKPOINT_EVERY + 3, 36), duration, rng.choice(["truncate", "flip"]))


def party_names(method: str) -> list[str]:
    return (["server"] if methods.get(method).has_server else []) + [f"hospital{i}" for i in range(1, HOSPITALS + 1)]


def victim_aliases(trial: Trial) -> list[str]:
    """How a party can be named in an error line: DDP and FedAvg's ranks are hospitals 1..N as ranks 0..N-1."""
    names = [trial.victim]
    if trial.victim.startswith("hospital"):
        i = int(trial.victim[len("hospital"):])
        if not methods.get(trial.method).has_server:
            names.append(f"rank{i - 1}")
    return names


class Attempt:
    """One start of every party of a run, each in its namespace, its output in a log file."""

    def __init__(self, net: wan.Network, argv: list[str], logs: Path, port: int):
        self.net, self.logs = net, logs
        self.procs: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)
        world = len(net.parties)
        for p in net.parties:
            env = {"TP_SOCKET_IFNAME": wan.PARTY_IFNAME, "GLOO_SOCKET_IFNAME": wan.PARTY_IFNAME,
                   "MASTER_ADDR": net.master, "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                   "RANK": str(p.node_rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "PYTHONUNBUFFERED": "1",
                   "TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONPATH": str(wan.REPO)}
            cmd = ["ip", "netns", "exec", p.netns, "env", *[f"{k}={v}" for k, v in env.items()],
                   sys.executable, "-m", "splitrpc.train", *argv]
            with open(logs / f"{p.name}.log", "w") as log:
                self.procs[p.name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=wan.REPO,
                                                      start_new_session=True)

    def text(self, name: str) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def step(self) -> int:
        """The newest step node 0 reported (the server, or DDP's rank 0)."""
        steps = _STEP.findall(self.text(self.net.parties[0].name))
        return int(steps[-1][0]) if steps else 0

    def running(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def pids(self, name: str) -> list[int]:
        """Every process in the party's namespace (the party is all that runs there)."""
        netns = next(p.netns for p in self.net.parties if p.name == name)
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30).stdout
        return [int(pid) for pid in out.split()]

    def signal(self, name: str, sig: int) -> None:
        for pid in self.pids(name):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        """True if every party exited within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        return not self.running()

    def wait_quiet(self, quiet_s: float, cap_s: float) -> bool:
        """True if every party exited before any ``quiet_s`` seconds passed with no new output from any
        party (a run that goes on after a fault keeps printing its steps; a hung one falls silent),
        and within ``cap_s`` in all."""
        cap = time.monotonic() + cap_s
        last, sizes = time.monotonic(), None
        while self.running():
            now = time.monotonic()
            current = [len(self.text(name)) for name in self.procs]
            if current != sizes:
                last, sizes = now, current
            if now - last > quiet_s or now > cap:
                return False
            time.sleep(0.2)
        return True

    def kill(self) -> None:
        for name in self.procs:
            self.signal(name, signal.SIGCONT)  # a stopped process dies of SIGKILL too, but its peers may wait
            self.signal(name, signal.SIGKILL)
        self.wait(10)

    def codes(self) -> dict[str, int | None]:
        return {name: proc.poll() for name, proc in self.procs.items()}

    def error_lines(self, besides: str = "") -> list[str]:
        """The error and warning lines of every party (but ``besides``: a party naming itself names no one)."""
        return [ln.strip() for name in self.procs if name != besides for ln in self.text(name).splitlines()
                if _SAID.match(ln)]


def run_argv(method: str, extra: list, policy: str, workdir: Path, resume: bool) -> list[str]:
    argv = ["--method", method, *BASE, *extra, "--checkpoint-dir", str(workdir / "ckpt"),
            "--save-dir", str(workdir / "final"), "--out", str(workdir / "runs.jsonl")]
    if policy != "abort":
        argv += ["--on-hospital-failure", policy]
    return argv + (["--resume"] if resume else [])


def same_weights(a: Path, b: Path) -> tuple[bool, str]:
    """Every file of two --save-dir directories holds the same tensors, bit for bit."""
    names = sorted(p.name for p in a.glob("*.pt"))
    if not names or names != sorted(p.name for p in b.glob("*.pt")):
        return False, f"saved files differ: {names} against {sorted(p.name for p in b.glob('*.pt'))}"
    for name in names:
        x, y = torch.load(a / name), torch.load(b / name)
        if x.keys() != y.keys():
            return False, f"{name}: keys differ"
        for key in x:
            if not torch.equal(x[key], y[key]):
                return False, f"{name}: {key} differs"
    return True, ""


def records(workdir: Path) -> list[dict]:
    path = workdir / "runs.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def reference(method: str, extra: list, workdir: Path, port: int) -> tuple[Path, int]:
    """The undisturbed run's final weights and its number of steps (run once per method and options)."""
    final = workdir / "final"
    if (workdir / "done").exists():
        return final, records(workdir)[-1]["steps"]
    shutil.rmtree(workdir, ignore_errors=True)
    net = wan.Network(method, HOSPITALS, None, None)
    try:
        net.build()
        attempt = Attempt(net, run_argv(method, extra, "abort", workdir, False), workdir / "logs", port)
        if not attempt.wait(RUN_TIMEOUT_S) or any(attempt.codes().values()):
            attempt.kill()
            raise UserError(f"the undisturbed {method} run failed: {(attempt.error_lines() or ['no error line'])[-1]} "
                            f"(logs in {workdir / 'logs'})")
    finally:
        net.close()
    (workdir / "done").touch()
    return final, records(workdir)[-1]["steps"]


def damage(ckpt: Path, parties: list[str], victim: str, how: str) -> str:
    """Truncate, or flip one byte of, the victim's file in the newest step every party has; returns its path."""
    from splitrpc import checkpoint

    steps = checkpoint.complete_steps(ckpt, parties)
    if not steps:
        return ""
    path = checkpoint.step_dir(ckpt, steps[-1]) / f"{victim}.pt"
    damage_file(path, how)
    return str(path)


def damage_file(path: Path, how: str) -> None:
    """Cut a file to half its length (``truncate``) or flip one bit in its middle (``flip``)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def inject(attempt: Attempt, trial: Trial) -> None:
    """The fault, at the moment it is due; returns when it has ended (stop and link faults restored)."""
    if trial.fault == "kill":
        attempt.signal(trial.victim, signal.SIGKILL)
    elif trial.fault.startswith("stop"):
        attempt.signal(trial.victim, signal.SIGSTOP)
        time.sleep(trial.duration_s)
        attempt.signal(trial.victim, signal.SIGCONT)
    elif trial.fault.startswith("link"):
        netns = next(p.netns for p in attempt.net.parties if p.name == trial.victim)
        wan._run(["ip", "-n", netns, "link", "set", wan.PARTY_IFNAME, "down"], "taking a link down")
        time.sleep(trial.duration_s)
        wan._run(["ip", "-n", netns, "link", "set", wan.PARTY_IFNAME, "up"], "bringing a link up")
    elif trial.fault == "corrupt":
        attempt.kill()


def run_trial(trial: Trial, root: Path, refs: dict, port: int) -> dict:
    workdir = root / f"trial-{trial.seed}-{trial.index}"
    shutil.rmtree(workdir, ignore_errors=True)
    result = {"kind": "chaos_trial", **asdict(trial), "git_commit": _commit(), "rpc_timeout_s": RPC_TIMEOUT_S,
              "bound_s": BOUND_S, "steps": refs[(trial.method, tuple(trial.extra))][1], "hospitals": HOSPITALS,
              "restarts": 0}
    started = time.monotonic()
    net = wan.Network(trial.method, HOSPITALS, None, None)
    try:
        net.build()
        attempt = Attempt(net, run_argv(trial.method, trial.extra, trial.policy, workdir, False),
                          workdir / "logs-0", port)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while attempt.step() < trial.at_step and attempt.running() == list(attempt.procs) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        if attempt.step() < trial.at_step:
            attempt.kill()
            return {**result, "outcome": "no-fault", "detail": "the run ended or stalled before the fault's step: "
                    + (attempt.error_lines() or ["no error line"])[-1], "wall_s": time.monotonic() - started}
        result["fault_step"] = attempt.step()
        fault_start = time.monotonic()
        inject(attempt, trial)
        fault_end = time.monotonic()
        if trial.fault == "corrupt":
            result["damaged"] = damage(workdir / "ckpt", party_names(trial.method), trial.victim, trial.damage)
        elif not attempt.wait_quiet(BOUND_S, RUN_TIMEOUT_S):
            left = attempt.running()
            attempt.kill()
            return {**result, "outcome": "hang", "detail": f"{left} still running, silent for {BOUND_S} s after "
                    "the fault", "wall_s": time.monotonic() - started}
        result["exit_s"] = round(time.monotonic() - fault_end, 2)  # after the fault ended
        result["exit_after_start_s"] = round(time.monotonic() - fault_start, 2)
        codes = attempt.codes()
        result["codes"] = codes
        # Under `continue` the run goes on without the victim, which may itself exit non-zero.
        if all(code == 0 for name, code in codes.items() if name != trial.victim or trial.policy == "abort"):
            return {**result, **finished(trial, workdir, refs, restarts=0), "wall_s": time.monotonic() - started}
        errors = attempt.error_lines(besides=trial.victim)
        result["error"] = next((ln for ln in errors if any(a in ln for a in victim_aliases(trial))),
                               errors[-1] if errors else "")
        if trial.fault != "corrupt":
            if not any(any(a in ln for a in victim_aliases(trial)) for ln in errors):
                return {**result, "outcome": "unnamed", "detail": " | ".join(errors[-3:]) or "no error line",
                        "wall_s": time.monotonic() - started}
            if records(workdir):
                return {**result, "outcome": "partial-record", "detail": "the failed run wrote a record line",
                        "wall_s": time.monotonic() - started}
        for restart in range(1, RESTARTS + 1):
            attempt = Attempt(net, run_argv(trial.method, trial.extra, trial.policy, workdir, True),
                              workdir / f"logs-{restart}", port + restart)
            if not attempt.wait(RUN_TIMEOUT_S):
                attempt.kill()
                return {**result, "outcome": "hang", "detail": f"the resumed run ran past {RUN_TIMEOUT_S} s",
                        "wall_s": time.monotonic() - started}
            result["restarts"] = restart
            if trial.fault == "corrupt":
                result["warning"] = next((ln for ln in attempt.error_lines() if "skipped" in ln), "")
            if all(code == 0 for code in attempt.codes().values()):
                return {**result, **finished(trial, workdir, refs, restarts=restart),
                        "wall_s": time.monotonic() - started}
        return {**result, "outcome": "no-finish", "detail": (attempt.error_lines() or ["no error line"])[-1],
                "wall_s": time.monotonic() - started}
    finally:
        net.close()


def finished(trial: Trial, workdir: Path, refs: dict, restarts: int) -> dict:
    """The outcome of a run whose last attempt exited 0: one record with every step, and the weights."""
    final, steps = refs[(trial.method, tuple(trial.extra))]
    recs = records(workdir)
    if len(recs) != 1 or recs[0].get("steps") != steps:
        return {"outcome": "partial-record", "detail": f"{len(recs)} record lines, steps "
                f"{[r.get('steps') for r in recs]} (expected 1 line of {steps})"}
    lost = recs[0].get("lost_hospitals") or []
    out = {"resumed_from_step": recs[0].get("resumed_from_step"), "lost_hospitals": [h.get("name") for h in lost]
           if lost and isinstance(lost[0], dict) else lost}
    if lost:
        return {**out, "outcome": "continued" if trial.policy == "continue" else "wrong-state",
                "detail": "went on without a hospital"}
    same, why = same_weights(final, workdir / "final")
    if not same:
        return {**out, "outcome": "wrong-state", "detail": why}
    return {**out, "outcome": "survived" if restarts == 0 else "resumed", "detail": ""}


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=wan.REPO)
    return proc.stdout.strip()


def done_trials(out: str) -> set[tuple[int, int]]:
    if not out or not Path(out).exists():
        return set()
    done = set()
    for line in Path(out).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("kind") == "chaos_trial":
            done.add((r["seed"], r["index"]))
    return done


def table(path: str) -> str:
    """Markdown: the count of every outcome by fault, then one row per trial."""
    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("kind") == "chaos_trial"]
    outcomes = sorted({r["outcome"] for r in rows})
    lines = [f"{len(rows)} trials; failures (hang, unnamed stop, partial record, wrong state, no finish): "
             f"{sum(r['outcome'] in FAILURES for r in rows)}.", "",
             "| fault | " + " | ".join(outcomes) + " | trials |", "|---|" + "---|" * (len(outcomes) + 1)]
    for fault in FAULTS:
        of = [r for r in rows if r["fault"] == fault]
        if of:
            lines.append(f"| {fault} | " + " | ".join(str(sum(r["outcome"] == o for r in of)) for o in outcomes)
                         + f" | {len(of)} |")
    lines += ["", "| # | method | policy | fault | party | at step | outcome | exit after fault (s) | restarts "
              "| resumed from | what the run said |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seed"], r["index"])):
        said = (r.get("warning") or r.get("error") or r.get("detail") or "").replace("|", "\\|")
        if len(said) > 140:
            said = said[:137] + "..."
        fault = r["fault"] + (f" {r['duration_s']:g} s" if r.get("duration_s") else "")
        lines.append(f"| {r['seed']}.{r['index']} | {r['method']} | {r['policy']} | {fault} | {r['victim']} | "
                     f"{r.get('fault_step', r['at_step'])} | {r['outcome']} | {r.get('exit_s', '')} | "
                     f"{r.get('restarts', 0)} | {r.get('resumed_from_step') or ''} | {said} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="number of the first trial (default 0)")
    parser.add_argument("--out", default="", help="append one JSON line per trial here; trials already in it are skipped")
    parser.add_argument("--workdir", default="", help="where runs, logs and checkpoints go (default: a temporary "
                        "directory, removed at the end unless a trial failed)")
    parser.add_argument("--table", default="", help="print the Markdown table of this file and exit")
    args = parser.parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C, so that every trial's namespaces and processes go with it.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        return campaign(args)
    except UserError as exc:
        return report(exc)
    except KeyboardInterrupt:
        print("splitrpc: bench.chaos stopped by a signal; the trial in progress is not recorded and its "
              "network is removed (run the same command again to continue)", file=sys.stderr, flush=True)
        return 130


def campaign(args) -> int:
    if args.table:
        print(table(args.table))
        return 0
    if args.trials < 1:
        raise UserError("--trials must be at least 1")
    wan.check_environment()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="splitrpc-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    done = done_trials(args.out)
    trials = [plan(args.seed, i) for i in range(args.first, args.first + args.trials)]
    todo = [t for t in trials if (t.seed, t.index) not in done]
    print(f"[chaos] {len(trials)} trials, {len(trials) - len(todo)} already in {args.out or '(no --out)'}; "
          f"work in {root}", flush=True)
    refs, failures, port = {}, 0, 29600
    for n, trial in enumerate(todo, 1):
        key = (trial.method, tuple(trial.extra))
        if key not in refs:
            print(f"[chaos] undisturbed {trial.method} {' '.join(trial.extra)} (the reference)", flush=True)
            refs[key] = reference(trial.method, trial.extra, root / f"reference-{trial.method}", port)
        print(f"[chaos] trial {n}/{len(todo)} #{trial.index}: {trial.method} ({trial.policy}), {trial.fault} "
              f"of {trial.victim} at step {trial.at_step}", flush=True)
        result = run_trial(trial, root, refs, port)
        failures += result["outcome"] in FAILURES
        print(f"[chaos]   -> {result['outcome']} in {result['wall_s']:.0f} s"
              f"{': ' + result['detail'] if result.get('detail') else ''}", flush=True)
        if args.out:
            append_jsonl(args.out, result)
    print(f"[chaos] {len(todo)} trials run, {failures} failed", flush=True)
    if not failures and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
