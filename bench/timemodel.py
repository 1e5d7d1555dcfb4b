"""Seconds per training step over slow links: a model checked against shaped runs, and projections.

    python -m bench.timemodel results/wan.jsonl [--duplex results/link_duplex.json] [--json results/wan_model.json]

A step costs its compute, plus the time its bytes take on the links, plus
round trips x RTT::

    t_step = t_compute + t_transfer + round_trips x RTT

* ``t_compute``: seconds per step of the same setting on an unshaped network
  (the reference run: same options, links at veth speed), measured.
* ``t_transfer``: bytes per link per step (the kernel's TCP counters of each
  party, ``comm.phases.train.tcp_bytes``) / link rate, with Ethernet/IP/TCP
  framing added (the shaper counts frames, TCP counts payload). Split
  learning moves activations up and then gradients down, one after the other:
  the up phase lasts as long as its slowest link (hospitals in parallel under
  ``--schedule parallel``; their sum under ``sequential``), then the down
  phase likewise; a shaped server link carries the sum of the hospitals'
  bytes. DDP's ring all-reduce sends and receives at once (and so does
  FedAvg's, once per round; its bytes per step are a round's over the round's
  steps): a step lasts as long as the busiest direction of the slowest link, at the goodput a link
  keeps when both its directions are busy. With ``--duplex`` (the output of
  ``python -m bench.link_duplex``) that goodput is the measured fraction of
  the one-way goodput at the link's rate (interpolated in log(rate) between
  the measured rates, the nearest one's outside them); without, 1.
* DDP hides part of that transfer behind its backward pass: a gradient bucket
  is all-reduced as soon as it is ready, while the gradients of earlier layers
  are still being computed. Where the record has DDP's bucket timings
  (``comm.buckets``: each bucket's bytes and its *lead*, how long before the
  last bucket it was handed over, the slowest rank's, measured), the buckets
  are put through the link one after another, each starting when it is ready
  and the link is free, and only the time after the last bucket is ready
  counts (``overlap_s`` is the rest). Without them (records before the
  timings), no overlap: an upper bound. FedAvg and split learning do not overlap.
  Where DDP's steps after the first are timed as well (``comm.step_timing``),
  the check is repeated on those steady steps, once from the unshaped run's
  steady step and once from the run's own compute (``steady_check``); the
  same for FedAvg's rounds after the first (``comm.round_timing``).
* ``round_trips x RTT``: **a projection**. This machine cannot add delay
  (no ``netem``), so every measured run has RTT ~ 0 and this term is only
  ever extrapolated. Split learning makes ``comm["round_trips_per_step"]``
  RPC round trips per hospital per step when the record says so, else 2
  (forward, then step; issue 10 reduces this to 1); local-loss split
  learning with ``--run-ahead k`` sends each request k steps early, so
  at most one round trip in k+1 is exposed (its bytes need no rule: the
  TCP counts already show no gradient down). A DDP step is a ring
  all-reduce per gradient bucket, each 2(N-1) one-way hops, i.e. N-1 RTTs;
  a FedAvg round is one all-reduce of the flattened model, N-1 RTTs per round.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from splitrpc.errors import UserError, report
from splitrpc.record import RunRecord, variant

# Ethernet (14) + IPv4 (20) + TCP with timestamps (32) per 1448-byte segment at MTU 1500:
# tbf meters whole frames, the TCP counters count payload.
MSS_B = 1448
FRAME_OVERHEAD_B = 14 + 20 + 32
WIRE_FACTOR = (MSS_B + FRAME_OVERHEAD_B) / MSS_B
SPLIT_ROUND_TRIPS_FALLBACK = 2  # forward, step (one RPC each per hospital and step) until issue 10
DDP_FIRST_BUCKET_B = 1024 * 1024  # torch DDP: the first bucket is 1 MiB, the others bucket_cap_mb = 25 MiB
DDP_BUCKET_B = 25 * 1024 * 1024
TARGET_ERROR = 0.15
PROJECTED_RTTS_S = (0.0, 0.010, 0.030, 0.100)
# Not part of a setting; the checkpoint options differ per run (the harness keys a run's directory by
# its run key) and between a run and its resumption.
IGNORED_KEYS = {"run_key", "out", "tag", "config", "checkpoint_dir", "checkpoint_every", "checkpoint_keep", "resume",
                "max_restarts"}


def _all_reduce_methods() -> tuple[str, ...]:
    from splitrpc import methods

    return tuple(m.name for m in methods.all_methods() if m.exchange == "all-reduce")


# The registry's methods whose hospitals all-reduce among themselves: both directions of a link at once.
ALL_REDUCE_METHODS = _all_reduce_methods()


def load_duplex(path: str) -> list[tuple[float, float]]:
    """[(rate bit/s, both-ways goodput / one-way goodput)] from bench.link_duplex's --json, by rate."""
    try:
        rows = json.loads(Path(path).read_text())
        return sorted((float(r["rate_bit_s"]), float(r["both_over_one"])) for r in rows)
    except FileNotFoundError:
        raise UserError(f"no such duplex calibration: {path} (python -m bench.link_duplex --json ...)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a bench.link_duplex result ({exc})") from None


def duplex_factor(rate: float | None, duplex: list[tuple[float, float]] | None) -> float:
    """The fraction of one-way goodput a link at ``rate`` keeps with both directions busy (1 uncalibrated)."""
    if rate is None or not duplex:
        return 1.0
    if rate <= duplex[0][0]:
        return duplex[0][1]
    if rate >= duplex[-1][0]:
        return duplex[-1][1]
    for (r0, f0), (r1, f1) in zip(duplex, duplex[1:]):
        if r0 <= rate <= r1:
            w = (math.log(rate) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return f0 + w * (f1 - f0)
    raise AssertionError("unreachable: the calibration is sorted")


def transfer_seconds(method: str, links: dict, schedule: str = "parallel", server: dict | None = None,
                     duplex: list[tuple[float, float]] | None = None) -> float:
    """Seconds a step spends on the links.

    ``links``: {hospital: {"rate": bit/s or None, "up": bytes, "down": bytes}} per step;
    ``server``: the same for a shaped server link under split (None: unshaped);
    ``duplex``: a link's goodput with both directions busy (``load_duplex``), for DDP.
    """
    def secs(nbytes: float, rate: float | None) -> float:
        return 0.0 if rate is None else nbytes * WIRE_FACTOR * 8 / rate

    if method in ALL_REDUCE_METHODS:
        return max((max(secs(l["up"], l["rate"]), secs(l["down"], l["rate"])) / duplex_factor(l["rate"], duplex)
                    for l in links.values()), default=0.0)
    combine = max if schedule == "parallel" else sum
    total = 0.0
    for direction in ("up", "down"):
        hospitals = combine([secs(l[direction], l["rate"]) for l in links.values()] or [0.0])
        shaped_server = secs(server[direction], server["rate"]) if server else 0.0
        total += max(hospitals, shaped_server)
    return total


def buckets_of(record: dict | None) -> list[dict] | None:
    """DDP's measured bucket layout and leads (``splitrpc.ddp``), None when the record has none."""
    return ((record or {}).get("comm") or {}).get("buckets") or None


def exposed_transfer(transfer_s: float, buckets: list[dict] | None) -> float:
    """Seconds of a DDP step's transfer left after its backward pass: the buckets cross the link in order,
    each when ready (``lead_s`` before the last) and the link is free, each taking its share of the bytes."""
    if not buckets:
        return transfer_s
    total = sum(b["bytes"] for b in buckets)
    link_free = -math.inf
    for b in buckets:
        link_free = max(link_free, -b["lead_s"]) + transfer_s * b["bytes"] / total
    return max(0.0, link_free)


def round_trips(record: dict) -> tuple[float, str]:
    """(round trips per step on the critical path, where the number comes from)."""
    comm = record.get("comm") or {}
    cfg = record["config"]
    if cfg["method"] == "fedavg":
        rounds_per_step = comm.get("rounds", 0) / max(1, record.get("steps") or 1)
        return rounds_per_step * (cfg["hospitals"] - 1), "fedavg: one all-reduce ((N-1) RTTs) per round"
    if cfg["method"] == "ddp":
        gradient = comm.get("gradient_bytes_per_step") or 0
        buckets = 1 + math.ceil(max(0, gradient - DDP_FIRST_BUCKET_B) / DDP_BUCKET_B) if gradient else 1
        return buckets * (cfg["hospitals"] - 1), f"ddp: {buckets} gradient buckets x (N-1) RTTs of a ring all-reduce"
    per_hospital = comm.get("round_trips_per_step")
    source = "record comm.round_trips_per_step"
    if per_hospital is None:
        per_hospital, source = SPLIT_ROUND_TRIPS_FALLBACK, "not in the record: 2 assumed (forward, step)"
    # Parallel: the hospitals' round trips overlap; sequential: they queue.
    factor = 1 if cfg.get("schedule", "parallel") == "parallel" else cfg["hospitals"]
    ahead = cfg.get("run_ahead", 0)
    if ahead:
        # split-localloss --run-ahead k: no gradient to wait for, so a hospital's request goes out k of its
        # steps early and its round trip overlaps them; at most one in k+1 is exposed.
        return per_hospital * factor / (ahead + 1), f"{source}, / {ahead + 1} (--run-ahead {ahead})"
    return per_hospital * factor, source


def step_links(record: dict) -> tuple[dict, dict | None]:
    """Per-step bytes and rate of every hospital link (and the server's if shaped) from a shaped run's record."""
    steps = record["steps"]
    tcp = record["comm"]["phases"]["train"]["tcp_bytes"]
    wan = record["wan"]["links"]
    links, server = {}, None
    for party, link in wan.items():
        entry = {"rate": link["rate_bit_s"], "up": tcp[party]["sent"] / steps, "down": tcp[party]["received"] / steps}
        if party == "server":
            server = entry if link["rate_bit_s"] else None
        else:
            links[party] = entry
    return links, server


def setting(record: dict) -> str:
    return json.dumps({k: v for k, v in record["config"].items() if k not in IGNORED_KEYS}, sort_keys=True)


def is_reference(record: dict) -> bool:
    wan = record.get("wan")
    return bool(wan) and all(link["rate_bit_s"] is None for link in wan["links"].values())


def same_machine(a: dict, b: dict) -> bool:
    """Whether two records ran on the same kind of CPU (``splitrpc.record.cpu``). Records from before the field
    have none and match each other: the references and shaped runs among them came from one machine (their
    checks reproduce their curves' accuracies to the last bit, which runs on CPUs with other kernels do not;
    docs/variants.md, the premise regime, where a few curves from before the field came from a second one)."""
    return a.get("cpu") == b.get("cpu")


def machine_name(record: dict) -> str:
    """How tables name the machine a record ran on (``same_machine``'s key): two machines' checks of one
    setting are two rows, which a reader must tell apart."""
    cpu = record.get("cpu")
    if not cpu:
        return "earlier VM"  # records from before the field (same_machine: they came from one machine)
    return cpu.get("key") or f"{cpu.get('model', '?')}, {cpu.get('capability', '?')}"


def find_reference(records: list[dict], record: dict) -> dict | None:
    """The newest ok unshaped run of the same setting, from the same machine where there is one: a shaped run
    checked against another CPU's compute would measure the CPUs, not the link."""
    key = setting(record)
    matches = [r for r in records if r.get("status") == "ok" and is_reference(r) and setting(r) == key]
    same = [r for r in matches if same_machine(r, record)]
    return (same or matches)[-1] if matches else None


def predict(record: dict, compute_s: float, rtt_s: float = 0.0, duplex=None, buckets=None) -> dict:
    """``buckets``: DDP's bucket timings (``buckets_of``); default the record's own."""
    links, server = step_links(record)
    method = record["config"]["method"]
    transfer = transfer_seconds(method, links, record["config"].get("schedule", "parallel"), server, duplex)
    buckets = (buckets or buckets_of(record)) if method == "ddp" else None
    overlap = transfer - exposed_transfer(transfer, buckets)
    trips, source = round_trips(record)
    return {
        "compute_s": compute_s,
        "transfer_s": transfer,
        "overlap_s": overlap,
        "overlap_source": ("DDP bucket timings of this run" if buckets_of(record) else
                           "DDP bucket timings of the reference run" if buckets else
                           "none" if method != "ddp" else "no bucket timings in the records: no overlap (upper bound)"),
        "round_trips_per_step": trips,
        "round_trips_source": source,
        "rtt_s": rtt_s,
        "latency_s": trips * rtt_s,
        "latency_note": "projection: no delay can be emulated here (no netem); measured runs have RTT ~ 0",
        "predicted_s": compute_s + transfer - overlap + trips * rtt_s,
        "duplex_factor": (min(duplex_factor(link["rate"], duplex) for link in links.values())
                          if record["config"]["method"] in ALL_REDUCE_METHODS and links else 1.0),
    }


def check(record: dict, reference: dict, duplex=None) -> dict:
    """The model against one shaped run: predicted vs measured seconds per step."""
    compute = reference["train_time_s"] / reference["steps"]
    model = predict(record, compute, duplex=duplex, buckets=buckets_of(record) or buckets_of(reference))
    measured = record["train_time_s"] / record["steps"]
    model.update({
        "compute_source": f"unshaped run {reference['config'].get('run_key') or reference['run_id']}",
        "measured_s": measured,
        "error": model["predicted_s"] / measured - 1,
        "within_target": abs(model["predicted_s"] / measured - 1) <= TARGET_ERROR,
        "target": TARGET_ERROR,
        "server_compute_ratio": server_compute_ratio(record, reference),
        "steady": steady_check(record, reference, model),
    })
    return model


def timed_units(record: dict) -> dict | None:
    """A run's timed steady units as one shape: DDP's steps after its bucket rebuild (``comm.step_timing``),
    FedAvg's rounds after the first (``comm.round_timing``). ``steps``: training steps per unit, to scale the
    model's per-step transfer (a round moves one model, whatever its number of local steps)."""
    c = record.get("comm") or {}
    if c.get("step_timing"):
        t = c["step_timing"]
        return {"units": t["timed_steps"], "unit_s": t["step_s"], "compute_s": t["compute_s"],
                "wait_s": t["allreduce_wait_s"], "steps": 1.0, "unit": "step"}
    if c.get("round_timing"):
        t = c["round_timing"]
        return {"units": t["timed_rounds"], "unit_s": t["round_s"], "compute_s": t["compute_s"],
                "wait_s": t["allreduce_wait_s"], "steps": record["steps"] / c["rounds"], "unit": "round"}
    return None


def steady_check(record: dict, reference: dict, model: dict) -> dict | None:
    """Runs with timed steady steps (DDP) or rounds (FedAvg) (``timed_units``): the model checked twice more.
    ``reference``: the unshaped run's steady step + the transfer left after the backward pass, against this
    run's steady step (a prediction, like ``check``, without the first step's one-time costs).
    ``own_compute``: this run's own compute (its step less the measured wait in the all-reduce) + that
    predicted transfer, i.e. the predicted wait against the measured one: the link and overlap terms alone,
    free of the compute drift between two runs on a shared machine. For FedAvg a "step" here is a round."""
    mine, ref = timed_units(record), timed_units(reference)
    if not mine or not ref:
        return None
    exposed = (model["transfer_s"] - model["overlap_s"]) * mine["steps"]
    predicted = ref["unit_s"] + exposed
    own = mine["compute_s"] + exposed
    return {
        "timed_steps": mine["units"],
        "unit": mine["unit"],
        "measured_s": mine["unit_s"],
        "reference": {"compute_s": ref["unit_s"], "predicted_s": predicted,
                      "error": predicted / mine["unit_s"] - 1},
        "own_compute": {"compute_s": mine["compute_s"], "predicted_wait_s": exposed,
                        "measured_wait_s": mine["wait_s"], "predicted_s": own,
                        "error": own / mine["unit_s"] - 1},
        # this run's compute over the reference's: far from 1, the two runs did not compute alike
        "compute_ratio": mine["compute_s"] / ref["compute_s"],
    }


def server_compute_ratio(record: dict, reference: dict) -> float | None:
    """Split only: the server's pure-compute timers (trunk forward + optimizer) per step in this run over the
    reference's. Far from 1 means the machine's load changed between the two runs (a shared host), which the
    model cannot see: the reference's compute is then the wrong compute for this run."""
    def per_step(r):
        t = (r.get("comm") or {}).get("server_time_s")
        return (t["trunk_forward"] + t["trunk_optimizer"]) / r["steps"] if t else None

    a, b = per_step(record), per_step(reference)
    return a / b if a and b else None


def project(record: dict, model: dict, rtts_s=PROJECTED_RTTS_S) -> dict:
    """Seconds per full epoch at each RTT (steps per epoch from the record)."""
    steps = record.get("steps_per_epoch") or record["comm"].get("steps_per_epoch")
    per_step = {f"{rtt * 1000:g}ms": model["compute_s"] + model["transfer_s"] - model["overlap_s"]
                + model["round_trips_per_step"] * rtt for rtt in rtts_s}
    return {"steps_per_epoch": steps, "s_per_step": per_step,
            "s_per_epoch": {k: v * steps for k, v in per_step.items()},
            "note": "RTT > 0 is a projection (no delay emulation here)"}


def at_rate(record: dict, rate: float | None, rtt_s: float = 0.0, duplex=None, compute_s: float | None = None,
            buckets=None) -> float:
    """Predicted seconds per step of a run's setting with every hospital link at ``rate``: ``compute_s``
    (default: the run's own seconds per step, i.e. an unshaped run's) + its bytes / rate, less what DDP
    hides behind its backward pass (``buckets``, default the run's own), + round trips x RTT."""
    links = {party: {**b, "rate": rate} for party, b in RunRecord.of(record).hospital_bytes_per_step().items()}
    cfg = record["config"]
    trips, _ = round_trips(record)
    compute = record["train_time_s"] / record["steps"] if compute_s is None else compute_s
    transfer = transfer_seconds(cfg["method"], links, cfg.get("schedule", "parallel"), duplex=duplex)
    if cfg["method"] == "ddp":
        transfer = exposed_transfer(transfer, buckets or buckets_of(record))
    return compute + transfer + trips * rtt_s


def crossover(split_reference: dict, ddp_reference: dict, rtt_s: float = 0.0, low: float = 1e5,
              high: float = 1e11, duplex=None) -> dict:
    """The link rate below which split learning's step is faster than DDP's, by the model.

    ``{"rate_bit_s": r or None, "split_faster_below": bool}``: split wins at every rate below r
    (None when one method wins at every rate in [low, high]; then ``winner`` names it).
    Both times are c + b / rate (+ trips x RTT), so they cross at most once.
    """
    def gap(rate):  # > 0: split slower
        return at_rate(split_reference, rate, rtt_s, duplex) - at_rate(ddp_reference, rate, rtt_s, duplex)

    g_low, g_high = gap(low), gap(high)
    if (g_low > 0) == (g_high > 0):
        return {"rate_bit_s": None, "winner": "ddp" if g_low > 0 else "split", "range_bit_s": [low, high]}
    lo, hi = math.log(low), math.log(high)
    for _ in range(100):  # bisection on log(rate)
        mid = (lo + hi) / 2
        if (gap(math.exp(mid)) > 0) == (g_low > 0):
            lo = mid
        else:
            hi = mid
    return {"rate_bit_s": math.exp((lo + hi) / 2), "split_faster_below": g_low < 0, "range_bit_s": [low, high]}


def load(path: str) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"no such results file: {path}") from None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def evaluate(records: list[dict], duplex=None) -> list[dict]:
    rows = []
    for rec in records:
        if rec.get("status") != "ok" or not rec.get("wan") or is_reference(rec):
            continue
        reference = find_reference(records, rec)
        cfg = rec["config"]
        row = {"run_key": cfg.get("run_key"), "method": variant(cfg, "codec"), "model": cfg["model"],
               "width": cfg["width"], "hospitals": cfg["hospitals"], "rate_bit_s": rec["wan"]["rate_bit_s"],
               "server_rate_bit_s": rec["wan"]["server_rate_bit_s"]}
        if reference is None:
            row["model_check"] = None  # no unshaped run of this setting yet
        else:
            row["model_check"] = check(rec, reference, duplex)  # recomputed: the record's copy may predate a newer reference
            row["projection"] = project(rec, row["model_check"])
        rows.append(row)
    return rows


PROJECTED_RATES_BIT_S = (1e9, 100e6, 50e6, 20e6, 10e6)


def projections(records: list[dict], rates=PROJECTED_RATES_BIT_S, rtts_s=PROJECTED_RTTS_S, duplex=None) -> list[dict]:
    """Per setting (from its unshaped run): seconds per full epoch at each rate and RTT, and the
    split/DDP crossover rate at each RTT. All of it model output; RTT > 0 is never measured here."""
    refs: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r.get("status") == "ok" and is_reference(r):
            cfg = r["config"]
            refs.setdefault((cfg["model"], cfg["hospitals"], cfg["batch_size"]), {})[variant(cfg, "codec")] = r
    out = []
    for (model, n, batch), by_method in sorted(refs.items()):
        entry = {"model": model, "hospitals": n, "batch_size": batch, "methods": {}}
        for method, ref in sorted(by_method.items()):
            steps = ref["steps_per_epoch"]
            entry["methods"][method] = {
                "compute_s_per_step": ref["train_time_s"] / ref["steps"],
                "steps_per_epoch": steps,
                "round_trips_per_step": round_trips(ref)[0],
                "round_trips_source": round_trips(ref)[1],
                "s_per_epoch": {f"{rate / 1e6:g}mbit": {f"{rtt * 1000:g}ms": at_rate(ref, rate, rtt, duplex) * steps
                                                        for rtt in rtts_s} for rate in rates},
            }
        if "split" in by_method and "ddp" in by_method:
            entry["crossover"] = {f"{rtt * 1000:g}ms": crossover(by_method["split"], by_method["ddp"], rtt,
                                                                 duplex=duplex) for rtt in rtts_s}
        for name in sorted(m for m in by_method if m.startswith("split+") and "ddp" in by_method):
            entry[f"crossover_{name}"] = {f"{rtt * 1000:g}ms": crossover(by_method[name], by_method["ddp"], rtt,
                                                                        duplex=duplex) for rtt in rtts_s}
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timemodel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results file with bench.wan records (e.g. results/wan.jsonl)")
    parser.add_argument("--json", default="", help="also write every check and projection here")
    parser.add_argument("--duplex", default="", help="bench.link_duplex's --json: DDP's goodput with both "
                                                     "directions of a link busy (default: the one-way rate)")
    args = parser.parse_args(argv)
    try:
        records = load(args.results)
        duplex = load_duplex(args.duplex) if args.duplex else None
    except UserError as exc:
        return report(exc)
    rows = evaluate(records, duplex)
    projected = projections(records, duplex=duplex)
    print(f"{'model':9} {'method':6} {'N':>2} {'rate':>9} {'compute':>8} {'transfer':>9} {'hidden':>7} {'predicted':>10} "
          f"{'measured':>9} {'error':>7} {'load':>5}   s/epoch at RTT 0 / 10 / 100 ms")
    for row in rows:
        m = row["model_check"]
        rate = f"{row['rate_bit_s'] / 1e6:g}M" if row["rate_bit_s"] else "-"
        if m is None:
            print(f"{row['model']:9} {row['method']:6} {row['hospitals']:>2} {rate:>9}   (no unshaped reference run)")
            continue
        epoch = row["projection"]["s_per_epoch"]
        print(f"{row['model']:9} {row['method']:6} {row['hospitals']:>2} {rate:>9} {m['compute_s']:8.2f} "
              f"{m['transfer_s']:9.2f} {m['overlap_s']:7.2f} {m['predicted_s']:10.2f} {m['measured_s']:9.2f} {m['error']:+7.1%} "
              f"{'' if m.get('server_compute_ratio') is None else format(m['server_compute_ratio'], '.2f'):>5}   "
              f"{epoch['0ms']:.0f} / {epoch['10ms']:.0f} / {epoch['100ms']:.0f}")
        if m.get("steady"):
            st = m["steady"]
            print(f"{'':9} {'':6} {'':>2} {'steady ' + st['unit']:>9} {st['reference']['compute_s']:8.2f} {'':9} {'':7} "
                  f"{st['reference']['predicted_s']:10.2f} {st['measured_s']:9.2f} {st['reference']['error']:+7.1%} "
                  f"{st['compute_ratio']:5.2f}   own compute {st['own_compute']['compute_s']:.2f} s: wait "
                  f"{st['own_compute']['predicted_wait_s']:.2f} predicted, {st['own_compute']['measured_wait_s']:.2f} "
                  f"measured, step {st['own_compute']['error']:+.1%}")
    for entry in projected:
        for key, crossings in sorted(entry.items()):
            if not key.startswith("crossover"):
                continue
            against = "split" if key == "crossover" else key[len("crossover_"):]
            for rtt, cross in crossings.items():
                text = (f"split faster below {cross['rate_bit_s'] / 1e6:.1f} Mbit/s" if cross["rate_bit_s"] and
                        cross["split_faster_below"] else f"split faster above {cross['rate_bit_s'] / 1e6:.1f} Mbit/s"
                        if cross["rate_bit_s"] else f"{cross['winner']} faster at every rate")
                print(f"crossover {entry['model']} N={entry['hospitals']} {against} vs ddp RTT {rtt}: {text}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checks": rows, "projections": projected, "duplex": duplex},
                                              indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
