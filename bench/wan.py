"""Hospitals on slow links: one run over an emulated multi-site network on this machine.

    python -m bench.wan --rate 100mbit [--server-rate 1gbit] [--out runs.jsonl] -- <training options>
    launch/wan.sh      --rate 20mbit  -- --method split --hospitals 2 --model vgg16 ...

Every party gets a network namespace of its own (``srpc<id>-server``,
``srpc<id>-h1`` ...; ``<id>`` is unique per invocation, so concurrent runs never
meet), connected by a veth pair to a bridge that lives in one more namespace
(``srpc<id>-br``). Both ends of a hospital's veth are shaped with ``tbf`` to
``--rate`` (so upload and download are each limited), the server's to
``--server-rate`` (default: unshaped, a data centre's link). Addresses come from
198.18.0.0/15 (RFC 2544, benchmarking) and exist inside the namespaces only;
the host's own interfaces and its root namespace are never touched: the veths
are created inside the bridge's namespace and pushed into the party's.

Each party is started inside its namespace with ``launch/multinode.sh`` (torchrun's
static rendezvous across the namespaces, TensorPipe and gloo bound to the veth
through TP_SOCKET_IFNAME / GLOO_SOCKET_IFNAME): a real multi-host launch whose
bytes cross shaped links. Rank layout as in multinode.sh: under ``--method
split`` node 0 is the server and node i hospital i; under ``--method ddp`` and
``fedavg`` there is no server and node i-1 is hospital i (hospital1 holds the rendezvous).

With ``--out``, the run record (written by the server, or DDP's rank 0) gains a
``wan`` object: the rate of every link, the bytes each link's qdiscs passed in
each direction, and the achieved throughput of every link over training.

Everything created is removed on exit, on failure, on SIGTERM/SIGINT and when
``--timeout`` passes (processes inside the namespaces are killed first). Needs
root and the kernel's ``tbf`` qdisc; without them it stops with one line, exit 2.
There is no delay emulation (no ``netem`` in this kernel): links have bandwidth
but no added latency, see bench/timemodel.py for the latency projection.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import timemodel
from splitrpc import methods
from splitrpc.errors import UserError, report

REPO = Path(__file__).resolve().parents[1]
SUBNET_PREFIX = "198.18.0."  # inside 198.18.0.0/15, the benchmarking range
SUBNET_BITS = 24
SERVER_HOST = 1
HOSPITAL_HOST0 = 10  # hospital i is .10+i
PARTY_IFNAME = "wan0"
MASTER_PORT = 29500  # every run has its own namespaces, so a fixed port cannot collide
DEFAULT_TIMEOUT_S = 900
TBF_MIN_BURST_B = 64 * 1024  # at least one 64 KiB GSO segment, or tbf drops it
TBF_BURST_S = 0.005  # bucket depth in time at high rates (timer granularity)
# Queue before tbf drops. A drop costs TCP a retransmission and a window cut, and leaves the
# TCP counters (which count what was handed to the link) above what crossed it: deep enough that
# TCP's window (autotuned to a few MB) fits.
TBF_QUEUE_S = 1.0
TBF_MIN_QUEUE_B = 8 * 1024 * 1024
KILL_WAIT_S = 5
NS_PREFIX = "srpc"
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(bit|bps)?(?:/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rate(text: str) -> float | None:
    """'100mbit', '1gbit', '20Mbit/s', '5e6' (bit/s) -> bits per second; 'none'/'0' -> None (unshaped)."""
    if str(text).strip().lower() in ("", "none", "0", "unshaped", "off"):
        return None
    m = _RATE.match(str(text))
    if m is None:
        raise UserError(f"link rate: expected e.g. 100mbit, 1gbit or bits per second, got {text!r}")
    # tc's units: bit is bits per second, bps bytes per second.
    value = float(m.group(1)) * _UNITS[m.group(2).lower()] * (8 if (m.group(3) or "").lower() == "bps" else 1)
    if not value > 0:
        raise UserError(f"link rate must be positive, got {text!r}")
    return value


def format_rate(bits: float | None) -> str:
    if bits is None:
        return "unshaped"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"


@dataclass
class Party:
    name: str  # server, hospital1, ...
    node_rank: int
    netns: str
    bridge_port: str  # the veth end in the bridge's namespace
    address: str
    rate: float | None  # bits/s both ways, None = unshaped


def _run(cmd: list[str], what: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"{what} failed: {detail[0] if detail else f'exit code {proc.returncode}'} "
                        f"({' '.join(cmd)})")
    return proc


def _tbf(rate: float) -> list[str]:
    byte_rate = rate / 8
    burst = max(TBF_MIN_BURST_B, int(byte_rate * TBF_BURST_S))
    return ["tbf", "rate", f"{int(rate)}bit", "burst", str(burst), "limit",
            str(max(TBF_MIN_QUEUE_B, int(byte_rate * TBF_QUEUE_S)) + burst)]


def check_environment() -> None:
    """Root, ip and tc on PATH, and a kernel that accepts a tbf qdisc; else UserError (one line)."""
    if os.geteuid() != 0:
        raise UserError("bench.wan needs root (network namespaces, veth pairs and tc); run it as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise UserError(f"bench.wan needs `{tool}` (iproute2) on PATH")
    # The real test: a tbf qdisc on the loopback of a scratch namespace (which only this check sees).
    probe = f"{NS_PREFIX}{os.getpid():x}{secrets.token_hex(2)}-probe"
    _run(["ip", "netns", "add", probe], "creating a network namespace")
    try:
        proc = _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", *_tbf(1e6)],
                    "tc", check=False)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise UserError(f"the kernel refuses the tbf qdisc that shapes the links "
                            f"({detail[0] if detail else f'tc exit code {proc.returncode}'}); load sch_tbf")
    finally:
        _run(["ip", "netns", "del", probe], "removing a network namespace", check=False)


class Network:
    """The namespaces, bridge and shaped veths of one run; ``close()`` removes all of it."""

    def __init__(self, method: str, hospitals: int, rate: float | None, server_rate: float | None,
                 hospital_rates: list[float | None] | None = None):
        self.id = f"{os.getpid():x}{secrets.token_hex(2)}"
        self.bridge_ns = f"{NS_PREFIX}{self.id}-br"
        self.created: list[str] = []
        rates = hospital_rates or [rate] * hospitals
        if len(rates) != hospitals:
            raise UserError(f"--hospital-rates lists {len(rates)} rates for {hospitals} hospitals")
        self.parties: list[Party] = []
        has_server = methods.get(method).has_server
        if has_server:
            self.parties.append(Party("server", 0, f"{NS_PREFIX}{self.id}-server", "server",
                                      f"{SUBNET_PREFIX}{SERVER_HOST}", server_rate))
        first = 1 if has_server else 0
        for i in range(1, hospitals + 1):
            self.parties.append(Party(f"hospital{i}", first + i - 1, f"{NS_PREFIX}{self.id}-h{i}", f"h{i}",
                                      f"{SUBNET_PREFIX}{HOSPITAL_HOST0 + i}", rates[i - 1]))
        self.master = self.parties[0].address  # node 0: the server, or DDP's hospital1

    def namespaces(self) -> list[str]:
        return [self.bridge_ns] + [p.netns for p in self.parties]

    def build(self) -> None:
        ns = self.bridge_ns
        _run(["ip", "netns", "add", ns], "creating the bridge's namespace")
        self.created.append(ns)
        _run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"], "creating the bridge")
        _run(["ip", "-n", ns, "link", "set", "br0", "up"], "bringing the bridge up")
        for p in self.parties:
            _run(["ip", "netns", "add", p.netns], f"creating {p.name}'s namespace")
            self.created.append(p.netns)
            _run(["ip", "-n", p.netns, "link", "set", "lo", "up"], f"{p.name}: loopback")
            # Created inside the bridge's namespace, one end pushed into the party's: never in the host's.
            _run(["ip", "-n", ns, "link", "add", p.bridge_port, "type", "veth", "peer", "name", PARTY_IFNAME,
                  "netns", p.netns], f"{p.name}: veth pair")
            _run(["ip", "-n", ns, "link", "set", p.bridge_port, "master", "br0", "up"], f"{p.name}: bridge port")
            _run(["ip", "-n", p.netns, "addr", "add", f"{p.address}/{SUBNET_BITS}", "dev", PARTY_IFNAME],
                 f"{p.name}: address")
            _run(["ip", "-n", p.netns, "link", "set", PARTY_IFNAME, "up"], f"{p.name}: link up")
            if p.rate is not None:
                for where, dev in ((p.netns, PARTY_IFNAME), (ns, p.bridge_port)):
                    _run(["ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", *_tbf(p.rate)],
                         f"{p.name}: shaping {dev} with tbf")

    def qdisc_counts(self) -> dict[str, dict[str, tuple[int, int]]]:
        """(bytes passed, packets dropped) so far per link: ``up`` (party -> bridge), ``down`` (bridge -> party)."""
        out = {}
        for p in self.parties:
            out[p.name] = {"up": _qdisc_stats(p.netns, PARTY_IFNAME), "down": _qdisc_stats(self.bridge_ns, p.bridge_port)}
        return out

    def kill_processes(self) -> None:
        """SIGKILL whatever still runs inside this run's namespaces (all of it started by this run)."""
        for netns in self.created:
            proc = _run(["ip", "netns", "pids", netns], "listing processes", check=False)
            for pid in proc.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass

    def close(self) -> None:
        self.kill_processes()
        deadline = time.monotonic() + KILL_WAIT_S
        for netns in reversed(self.created):
            # Deleting a namespace destroys its veth ends, and with them their peers and the bridge.
            while True:
                proc = _run(["ip", "netns", "del", netns], "removing a namespace", check=False)
                if proc.returncode == 0 or "No such file" in proc.stderr or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        self.created.clear()


def stale_namespaces() -> list[str]:
    """Namespaces of runs whose launcher is dead (killed with SIGKILL, so it could not tear down)."""
    listing = _run(["ip", "netns", "list"], "listing namespaces", check=False).stdout
    stale = []
    for name in (line.split()[0] for line in listing.splitlines() if line.strip()):
        m = re.fullmatch(rf"{NS_PREFIX}([0-9a-f]+)[0-9a-f]{{4}}-(br|server|h\d+|probe)", name)
        if m and not Path(f"/proc/{int(m.group(1), 16)}").exists():
            stale.append(name)
    return stale


def cleanup() -> int:
    """Remove what killed runs left behind: processes inside their namespaces, then the namespaces."""
    stale = stale_namespaces()
    for netns in stale:
        for pid in _run(["ip", "netns", "pids", netns], "listing processes", check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for netns in stale:
        _run(["ip", "netns", "del", netns], f"removing {netns}", check=False)
    print(f"bench.wan: removed {len(stale)} stale namespace(s){': ' + ' '.join(stale) if stale else ''}")
    return 0


def _qdisc_stats(netns: str, dev: str) -> tuple[int, int]:
    proc = _run(["ip", "netns", "exec", netns, "tc", "-s", "-j", "qdisc", "show", "dev", dev], "tc -s", check=False)
    try:
        roots = [q for q in json.loads(proc.stdout or "[]") if q.get("root")]
    except ValueError:
        return 0, 0
    return sum(int(q.get("bytes", 0)) for q in roots), sum(int(q.get("drops", 0)) for q in roots)


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, frame):
    raise _Stop(signum)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + KILL_WAIT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _first_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[-1]


def run(train_argv: list[str], rate: float | None, server_rate: float | None = None,
        hospital_rates: list[float | None] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
        out: str = "", log_dir: str = "", echo: bool = True, compute_reference: str = "", duplex: str = "") -> int:
    from splitrpc.config import parse_args
    from splitrpc.record import append_jsonl

    cfg = parse_args(train_argv)  # bad training options: one line before any namespace exists
    calibration = timemodel.load_duplex(duplex) if duplex else None
    if methods.get(cfg.method).one_process:
        raise UserError(f"bench.wan runs the methods of several processes across namespaces, not {cfg.method!r}")
    if "--out" in train_argv or any(a.startswith("--out=") for a in train_argv):
        raise UserError("give --out to bench.wan (before `--`): it adds the link measurements to the record")
    check_environment()
    net = Network(cfg.method, cfg.hospitals, rate, server_rate, hospital_rates)
    workdir = Path(tempfile.mkdtemp(prefix=f"splitrpc-wan-{net.id}-"))
    logs = Path(log_dir) if log_dir else workdir
    logs.mkdir(parents=True, exist_ok=True)
    record_file = workdir / "record.jsonl"
    procs: list[subprocess.Popen] = []
    log_files = []
    keep_logs = False  # a failed run keeps its scratch logs, which its error line points to
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    started = time.perf_counter()
    try:
        net.build()
        before = net.qdisc_counts()
        env_python = os.environ.get("PYTHON", sys.executable)
        for p in net.parties:
            cmd = ["ip", "netns", "exec", p.netns, "env", f"TP_SOCKET_IFNAME={PARTY_IFNAME}",
                   f"GLOO_SOCKET_IFNAME={PARTY_IFNAME}", f"PYTHON={env_python}",
                   str(REPO / "launch" / "multinode.sh"), "--nnodes", str(len(net.parties)),
                   "--node-rank", str(p.node_rank), "--master-addr", net.master, "--master-port", str(MASTER_PORT),
                   "--local-addr", p.address, "--run-id", f"wan-{net.id}",
                   "--rdzv-timeout", str(int(min(timeout_s, cfg.setup_timeout))),
                   "--", *train_argv, "--out", str(record_file)]
            log = open(logs / f"{p.name}.log", "w")
            log_files.append(log)
            # The record writer's output is the run's output; the others' goes to their logs.
            to = None if (p.node_rank == 0 and echo) else log
            procs.append(subprocess.Popen(cmd, stdout=to, stderr=log if to else subprocess.STDOUT,
                                          cwd=REPO, start_new_session=True))
        deadline = started + timeout_s
        codes: dict[str, int] = {}
        while len(codes) < len(procs):
            for p, proc in zip(net.parties, procs):
                if p.name not in codes and proc.poll() is not None:
                    codes[p.name] = proc.returncode
            failed = [name for name, code in codes.items() if code != 0]
            if failed:
                break
            if time.perf_counter() > deadline:
                _stop_all(procs)
                keep_logs = True
                print(f"splitrpc: error: bench.wan: the run did not finish within --timeout {timeout_s:g} s; "
                      f"stopped (logs in {logs})", file=sys.stderr, flush=True)
                return 124
            time.sleep(0.2)
        after = net.qdisc_counts()
        if failed := [name for name, code in codes.items() if code != 0]:
            _stop_all(procs)
            keep_logs = True
            name = failed[0]
            print(f"splitrpc: error: bench.wan: {name} exited with code {codes[name]}: "
                  f"{_first_error(logs / f'{name}.log')} (logs in {logs})", file=sys.stderr, flush=True)
            return codes[name]
        if out:
            records = record_file.read_text().splitlines() if record_file.exists() else []
            if not records:
                keep_logs = True
                raise UserError(f"the run wrote no record (logs in {logs})")
            run_record = json.loads(records[-1])
            run_record["config"]["out"] = out  # not the scratch file the parties wrote to
            run_record["wan"] = link_summary(net, before, after, run_record, time.perf_counter() - started)
            if compute_reference and Path(compute_reference).exists() and not timemodel.is_reference(run_record):
                reference = timemodel.find_reference(timemodel.load(compute_reference), run_record)
                if reference is not None:
                    run_record["time_model"] = timemodel.check(run_record, reference, calibration)
                    run_record["time_model"]["duplex_calibration"] = duplex or None
            append_jsonl(out, run_record)
        return 0
    except _Stop as stop:
        _stop_all(procs)
        print(f"splitrpc: stopped by signal {stop}; network removed", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        _stop_all(procs)
        net.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        for log in log_files:
            log.close()
        if keep_logs and not log_dir:
            (workdir / "record.jsonl").unlink(missing_ok=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def link_summary(net: Network, before: dict, after: dict, run_record: dict, wall_s: float) -> dict:
    """The ``wan`` object of the record: every link's rate, bytes (qdisc and TCP) and achieved throughput."""
    comm = run_record.get("comm") or {}
    train = (comm.get("phases") or {}).get("train") or {}
    tcp = train.get("tcp_bytes") or {}
    train_s = run_record.get("train_time_s") or 0.0
    links = {}
    for p in net.parties:
        sent = (tcp.get(p.name) or {}).get("sent")
        received = (tcp.get(p.name) or {}).get("received")
        links[p.name] = {
            "rate_bit_s": p.rate,
            "address": p.address,
            # The whole run (set-up, training, evaluation), counted by the link's shapers.
            "qdisc_bytes": {d: after[p.name][d][0] - before[p.name][d][0] for d in ("up", "down")},
            "qdisc_drops": {d: after[p.name][d][1] - before[p.name][d][1] for d in ("up", "down")},
            # Training only, counted by the party's own TCP sockets (the comm object's numbers).
            "train_tcp_bytes": {"up": sent, "down": received},
            "train_achieved_bit_s": ({"up": 8 * sent / train_s, "down": 8 * received / train_s}
                                     if train_s and sent is not None else None),
            "train_utilisation": ({"up": 8 * sent / train_s / p.rate, "down": 8 * received / train_s / p.rate}
                                  if train_s and sent is not None and p.rate else None),
        }
    return {
        "emulated": "network namespaces, veth pairs on a bridge, tbf on both ends (no added delay)",
        "namespaces": net.namespaces(),  # all removed when the run ended
        "rate_bit_s": net.parties[-1].rate,
        "server_rate_bit_s": net.parties[0].rate if net.parties[0].name == "server" else None,
        "links": links,
        "launcher_wall_s": wall_s,
        "measured_steps": run_record.get("steps"),
        "seconds_per_step": train_s / run_record["steps"] if run_record.get("steps") else None,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m bench.wan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="none", help="every hospital's link, both ways (e.g. 100mbit; none = unshaped)")
    parser.add_argument("--hospital-rates", default="", help="comma-separated, one per hospital (instead of --rate)")
    parser.add_argument("--server-rate", default="none", help="the server's link (default: unshaped)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before the run is stopped")
    parser.add_argument("--out", default="", help="append the run record, with the link measurements, here")
    parser.add_argument("--compute-reference", default="",
                        help="a results file holding an unshaped run of the same setting: the record then gets the "
                             "time model's prediction and its error (bench/timemodel.py)")
    parser.add_argument("--duplex", default="",
                        help="bench.link_duplex's --json: the time model's goodput of a link busy both ways "
                             "(DDP, FedAvg); default: the one-way rate")
    parser.add_argument("--cleanup", action="store_true",
                        help="remove the namespaces (and processes in them) of runs whose launcher was SIGKILLed")
    parser.add_argument("--log-dir", default="", help="keep every party's log here (default: removed)")

    def fail(message):
        raise UserError(message)

    parser.error = fail
    try:
        args = parser.parse_args(ours)
        if args.cleanup:
            if os.geteuid() != 0:
                raise UserError("bench.wan needs root (network namespaces, veth pairs and tc); run it as root")
            return cleanup()
        if not train_argv:
            raise UserError("give the training options after `--`, e.g. -- --method split --hospitals 2")
        if not args.timeout > 0:
            raise UserError(f"--timeout must be positive, got {args.timeout}")
        hospital_rates = [parse_rate(r) for r in args.hospital_rates.split(",")] if args.hospital_rates else None
        return run(train_argv, parse_rate(args.rate), parse_rate(args.server_rate), hospital_rates,
                   args.timeout, args.out, args.log_dir, compute_reference=args.compute_reference,
                   duplex=args.duplex)
    except UserError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
