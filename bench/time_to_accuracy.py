"""Time to accuracy over slow links: the 15-epoch accuracy curves on a clock that runs at a link's rate.

    python -m bench.time_to_accuracy results/convergence.jsonl [results/wan_tta_n2.jsonl results/premise.jsonl] \\
        --shaped results/wan_tta.jsonl [results/wan_tta_n2.jsonl results/wan_tta_premise.jsonl \\
                 results/wan_tta_premise_machine.jsonl results/wan_tta_machine.jsonl] \\
        [--full results/wan_tta_full.jsonl [results/wan_tta_n2.jsonl]] [--duplex results/link_duplex.json] \\
        [--json results/time_to_accuracy.json]

A 15-epoch run over a 20 Mbit/s link costs hours of this machine per method, so
time to accuracy is put together from three measured things, and checked:

* **accuracy after every epoch**: the runs of ``results/convergence.jsonl``
  (bench/configs/convergence.toml), trained over loopback;
* **seconds per step at a link rate**: bench/timemodel.py, i.e. the compute per
  step of the method's unshaped run in ``--shaped`` (bench/configs/wan_tta.toml:
  the same setting, each party in its own namespace, one run at a time) plus the
  convergence run's own bytes per step on each hospital's link / the rate. The
  compute comes from those quiet runs, not from the convergence runs' clocks,
  which other work on this machine slowed by up to 2x in some epochs;
* **the check**: the shaped runs of ``--shaped`` train the first epoch of the
  same schedule over 100 Mbit/s (and FedAvg over 20 Mbit/s), so their measured
  epoch seconds are set against the projection of that epoch, and their epoch-1
  accuracy against the curve's first point. Shorter 20 Mbit/s runs check seconds
  per step only (bench.timemodel's check, printed too);
* **the check on a whole schedule** (``--full``, bench/configs/wan_tta_full.toml):
  runs of all 15 epochs over unshaped, 1 Gbit/s and 100 Mbit/s links give
  measured time to accuracy, set against the projection. Where a run evaluates
  only some epochs, those must equal the curve's, and its measured seconds of
  every epoch then carry the curve's accuracy of that epoch. The unshaped
  whole schedules are a second compute reference (``whole_reference``).

Each number of hospitals and each model width has its own curves and compute references
(premise.toml's VGG-11 x0.5 takes its compute from wan_tta_premise.toml's runs). With N = 2
(bench/configs/wan_tta_n2.toml) one results file holds all three parts, the
whole unshaped schedules (the curves; one-epoch runs are never taken for one),
the one-epoch compute references and the shaped first epochs, so it is given
in each role.

One clock per regime: where ``--shaped`` holds a variant's references from
several machines, the newest file's machine sets the projections' clock (the
median of its repeats; wan_tta_machine.jsonl retakes wan_tta.jsonl's on the
current machine), while every check, of a first epoch or a whole schedule, is
set against a reference from its own machine.

Training time only: evaluations (which under split learning send the test set's
activations over the link too) are not counted. RTT is 0 as in every measured
run here; ``--rtt-ms`` adds round trips x RTT as a projection. The server's link
is unshaped (a data centre) and the hospitals' are all at the same rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import timemodel
from splitrpc import methods
from splitrpc.config import Config
from splitrpc.errors import UserError, report
from splitrpc.record import RunRecord, variant

REPO = Path(__file__).resolve().parents[1]

# The registry's methods that run across hospitals (a one-process method pools the data: no links).
METHODS = tuple(m.name for m in methods.all_methods() if not m.one_process)
RATES_BIT_S = (None, 1e9, 100e6, 50e6, 20e6, 10e6)  # None: the links of the unshaped runs (veth speed)
TARGETS = (0.70, 0.75, 0.80)
# Keys that may differ between a convergence run and the shaped run of its first epoch.
NOT_THE_SETTING = timemodel.IGNORED_KEYS | {"max_steps", "threads", "hospital_threads", "server_threads",
                                            "limit_test", "rpc_timeout", "log_every", "eval_every"}


def rate_name(rate: float | None) -> str:
    return "unshaped" if rate is None else f"{rate / 1e6:g}mbit"


def same_setting(a: dict, b: dict) -> bool:
    # An option added after a record was written is missing from it, at its default: as a record holds it,
    # through JSON (a tuple default, () for --capture-epochs, reads back from a newer record as []).
    defaults = json.loads(json.dumps(Config().to_dict()))

    def key(r):
        return {k: v for k, v in {**defaults, **r["config"]}.items() if k not in NOT_THE_SETTING}
    return key(a) == key(b)


def scale(cfg: dict) -> tuple[int, str, float, str, str]:
    """What a compute reference must share with a curve besides its variant: the number of hospitals, the
    model at its width and normalisation (VGG-11 x0.5 computes about 4x what x0.25 does; premise.toml's curves
    need their own; a GroupNorm model is another model) and the schedule (a ``sequential`` step is one
    hospital's batch, a ``parallel`` one every hospital's: the variant's name does not say it)."""
    return cfg["hospitals"], cfg["model"], cfg["width"], cfg.get("norm", "batch"), cfg.get("schedule", "parallel")


def is_compute_reference(r: dict) -> bool:
    """An unshaped run of one whole epoch (wan_tta's references; not a shorter step check)."""
    return r.get("status") == "ok" and timemodel.is_reference(r) and r["steps"] == r["steps_per_epoch"]


def per_step(r: dict) -> float:
    return r["train_time_s"] / r["steps"]


def repeats(records: list[dict], ref: dict) -> list[dict]:
    """The references among ``records`` of ``ref``'s variant and scale on its machine, fastest first."""
    key = (*scale(ref["config"]), variant(ref["config"]))
    return sorted((r for r in records if (*scale(r["config"]), variant(r["config"])) == key
                   and timemodel.same_machine(r, ref)), key=per_step)


def newest_median(records: list[dict]) -> dict:
    """Of one name's references, the newest's variant on the newest's machine: the median of its repeats in
    compute per step (the lower of the middle two for an even count). One epoch's compute varied by up to
    about 20 % between runs here (wan_tta_machine.toml), so a variant that decides the verdict is measured
    three times; a method's name may hold several variants, whose compute differs for a reason."""
    same = repeats(records, records[-1])
    return same[(len(same) - 1) // 2]


def compute_references(shaped: list[dict]) -> dict[tuple, dict]:
    """{(hospitals, model, width, norm, name): the unshaped one-epoch run of wan_tta to take compute from}, under
    three names: its training variant (``fedavg (10 local steps)``); its cut (``split+bottleneck 1/16+bf16``:
    the compute of every variant with that cut, whatever its L1 handling); and, for a reference with the
    method's uncompressed cut, its method (the compute of the method's variants without a reference of their
    own). Of several references under a name, the median of the newest's repeats (``newest_median``)."""
    named: dict[str, dict] = {"method": {}, "cut": {}, "variant": {}}
    for r in filter(is_compute_reference, shaped):
        cfg = r["config"]
        named["variant"].setdefault((*scale(cfg), variant(cfg)), []).append(r)
        named["cut"].setdefault((*scale(cfg), "cut " + variant(cfg, "codec")), []).append(r)
        if variant(cfg, "codec") == cfg["method"]:  # a compressed cut's compute is its own, not the method's
            named["method"].setdefault((*scale(cfg), cfg["method"]), []).append(r)
    return {key: newest_median(records) for names in (named["method"], named["cut"], named["variant"])
            for key, records in names.items()}


def repeats_of(shaped: list[dict], ref: dict) -> list[float]:
    """Compute per step of every reference of ``ref``'s variant and scale on its machine (its spread)."""
    return [per_step(r) for r in repeats(list(filter(is_compute_reference, shaped)), ref)]


def reference_for(refs: dict[tuple, dict], cfg: dict) -> dict | None:
    """The compute reference of a run's variant, else of its cut, else (for a run whose cut is the method's
    uncompressed one) of its method, at the same scale. None: no reference computes what this run does (top-k,
    a bottleneck or a codec without a reference of their own): such a curve is not projected, and says so."""
    own = refs.get((*scale(cfg), variant(cfg))) or refs.get((*scale(cfg), "cut " + variant(cfg, "codec")))
    if own is not None or variant(cfg, "codec") != cfg["method"]:
        return own
    return refs.get((*scale(cfg), cfg["method"]))


def whole_schedules(records: list[dict]) -> list[dict]:
    """The runs that trained every epoch of their schedule (wan_tta_n2.jsonl holds one-epoch runs beside them)."""
    return [r for r in records if RunRecord.of(r).whole_schedule]


def curves_of(records: list[dict]) -> list[dict]:
    """The accuracy curves: whole schedules trained without shaped links (convergence.toml's, over loopback,
    or unshaped in namespaces); a whole schedule over shaped links is a check of the curve, not one."""
    return [r for r in whole_schedules(records) if not r.get("wan") or timemodel.is_reference(r)]


def curve(record: dict, compute_s: float, rate: float | None, rtt_s: float = 0.0, duplex=None,
          buckets=None) -> list[dict]:
    """[{epoch, hours, acc, acc_min}]: cumulative training hours at ``rate`` and the test accuracy then.
    ``buckets``: DDP's bucket timings from the compute reference (the convergence runs predate them)."""
    per_step = timemodel.at_rate(record, rate, rtt_s, duplex, compute_s, buckets)
    hours, points = 0.0, []
    for e in record["epochs"]:
        hours += e["steps"] * per_step / 3600
        if "test_acc_mean" in e:
            points.append({"epoch": e["epoch"], "hours": hours, "acc": e["test_acc_mean"], "acc_min": e["test_acc_min"]})
    return points


def hours_to(points: list[dict], target: float) -> float | None:
    """Training hours until the mean test accuracy first reaches ``target`` (None: never in the run)."""
    return next((p["hours"] for p in points if p["acc"] >= target), None)


def project(convergence: list[dict], refs: dict[tuple, dict], rates=RATES_BIT_S, targets=TARGETS, rtt_s=0.0,
            duplex=None, shaped: list[dict] = ()) -> list[dict]:
    """One row per curve with a compute reference: its hours to each target at each rate. ``shaped``: the
    records ``refs`` was made from; each row then lists its reference's repeats (``compute_repeats_s_per_step``)."""
    rows = []
    for r in curves_of(convergence):
        cfg = r["config"]
        ref = reference_for(refs, cfg)
        if cfg["method"] not in METHODS or ref is None:
            continue  # unprojected() names the curves left out for want of a reference
        compute, buckets = per_step(ref), timemodel.buckets_of(ref)
        row = {"run_key": cfg.get("run_key"), "method": cfg["method"], "variant": variant(cfg),
               "partition": cfg["partition"], "alpha": cfg.get("alpha"), "model": cfg["model"],
               "width": cfg["width"], "hospitals": cfg["hospitals"], "seed": cfg.get("seed", 0),
               "epochs": len(r["epochs"]), "final_acc": r["final_test_acc"], "compute_s_per_step": compute,
               "compute_source": f"unshaped run {ref['config'].get('run_key')} (wan_tta, {variant(ref['config'])})",
               "bytes_per_step": RunRecord.of(r).hospital_bytes_per_step(), "rtt_s": rtt_s, "rates": {}}
        if shaped:
            row["compute_repeats_s_per_step"] = repeats_of(shaped, ref)
        for rate in rates:
            points = curve(r, compute, rate, rtt_s, duplex, buckets)
            row["rates"][rate_name(rate)] = {
                "rate_bit_s": rate, "s_per_step": timemodel.at_rate(r, rate, rtt_s, duplex, compute, buckets),
                "curve": points, "hours_to": {f"{t:g}": hours_to(points, t) for t in targets}}
        rows.append(row)
    return rows


def checks(convergence: list[dict], shaped: list[dict], refs: dict[tuple, dict], duplex=None) -> list[dict]:
    """Every shaped run of wan_tta: seconds per step against bench.timemodel (its own unshaped reference), and
    for a full first epoch, the projection of that epoch and the convergence curve's first accuracy."""
    out, curves = [], curves_of(convergence)
    for s in shaped:
        if s.get("status") != "ok" or timemodel.is_reference(s):
            continue
        cfg = s["config"]
        row = {"run_key": cfg.get("run_key"), "method": cfg["method"], "variant": variant(cfg),
               "model": cfg["model"], "width": cfg["width"], "hospitals": cfg["hospitals"],
               "rate_bit_s": s["wan"]["rate_bit_s"], "steps": s["steps"], "machine": timemodel.machine_name(s)}
        reference = timemodel.find_reference(shaped, s)
        if reference is not None:
            model = timemodel.check(s, reference, duplex)
            row["step_check"] = {k: model[k] for k in ("compute_s", "transfer_s", "predicted_s", "measured_s",
                                                       "error", "within_target")}
        match = [c for c in curves if same_setting(c, s)]
        # The epoch's projection on the clock of the shaped run's own machine (its step check's reference), not
        # on the projections' clock, which may be another machine's (premise.toml's, docs/variants.md).
        ref = reference if reference is not None else reference_for(refs, cfg)
        if s["steps"] == s["steps_per_epoch"] and match and ref is not None:
            conv = match[-1]
            predicted = curve(conv, per_step(ref), s["wan"]["rate_bit_s"], duplex=duplex,
                              buckets=timemodel.buckets_of(ref))[0]
            measured = s["epochs"][0]
            row["epoch1"] = {
                "convergence_run": conv["config"].get("run_key"), "curve_machine": timemodel.machine_name(conv),
                "predicted_s": predicted["hours"] * 3600, "measured_s": measured["train_time_s"],
                "error": predicted["hours"] * 3600 / measured["train_time_s"] - 1,
                "acc_shaped": measured["test_acc_mean"], "acc_convergence": conv["epochs"][0]["test_acc_mean"]}
        out.append(row)
    return out


def measured_curve(run: dict, conv: dict) -> tuple[list[dict], bool]:
    """([{epoch, hours, acc, acc_min, evaluated}], matches): the run's own cumulative training hours per
    epoch. ``matches``: every epoch the run evaluated has the curve's accuracy; then the epochs it did not
    evaluate carry the curve's accuracy (same seed, same steps), else only its own evaluations count."""
    by_epoch = {e["epoch"]: e for e in conv["epochs"]}
    evaluated = [e for e in run["epochs"] if "test_acc_mean" in e]
    matches = bool(evaluated) and all(e["epoch"] in by_epoch and by_epoch[e["epoch"]].get("test_acc_mean") ==
                                      e["test_acc_mean"] for e in evaluated)
    hours, points = 0.0, []
    for e in run["epochs"]:
        hours += e["train_time_s"] / 3600
        source = e if "test_acc_mean" in e else by_epoch.get(e["epoch"], {}) if matches else {}
        if "test_acc_mean" in source:
            points.append({"epoch": e["epoch"], "hours": hours, "acc": source["test_acc_mean"],
                           "acc_min": source["test_acc_min"], "evaluated": "test_acc_mean" in e})
    return points, matches


def against(conv: dict, run: dict, measured: list[dict], ref: dict, duplex=None) -> dict:
    """A whole-schedule run's measured hours to each target and in all, against the projection from ``ref``'s
    compute per step."""
    predicted = curve(conv, per_step(ref), run["wan"]["rate_bit_s"], duplex=duplex,
                      buckets=timemodel.buckets_of(ref))
    hours = {}
    for t in TARGETS:
        p, m = hours_to(predicted, t), hours_to(measured, t)
        hours[f"{t:g}"] = {"predicted": p, "measured": m, "error": p / m - 1 if p is not None and m else None}
    total_p, total_m = predicted[-1]["hours"], sum(e["train_time_s"] for e in run["epochs"]) / 3600
    return {"compute_source": f"unshaped run {ref['config'].get('run_key')}",
            "compute_s_per_step": per_step(ref), "hours_to": hours,
            "hours_total": {"predicted": total_p, "measured": total_m, "error": total_p / total_m - 1}}


def unprojected(convergence: list[dict], refs: dict[tuple, dict]) -> list[dict]:
    """The curves of methods that run across hospitals that ``project`` leaves out: no compute reference of
    their own cut or model at their scale (run one in wan_tta.toml's setting to project them)."""
    left_out = []
    for r in curves_of(convergence):
        cfg = r["config"]
        if cfg["method"] not in METHODS or reference_for(refs, cfg) is not None:
            continue
        hospitals, model, width, norm, schedule = scale(cfg)
        left_out.append({"run_key": cfg.get("run_key"), "variant": variant(cfg), "partition": cfg["partition"],
                         "model": model, "width": width, "hospitals": hospitals, "seed": cfg.get("seed", 0),
                         "final_acc": r["final_test_acc"],
                         "why": f"no unshaped one-epoch reference of its cut ({variant(cfg, 'codec')}) at "
                                f"N={hospitals} {model} x{width:g} ({norm} norm, {schedule} schedule)"})
    return left_out


def full_checks(convergence: list[dict], full: list[dict], refs: dict[tuple, dict], duplex=None,
                shaped: list[dict] = ()) -> list[dict]:
    """Whole-schedule runs over shaped links: measured hours to each target and in all, against the projection
    from wan_tta's one-epoch compute references; and, where ``full`` has an unshaped whole schedule of the same
    variant, against the projection from that run's compute too (``whole_reference``: the same length of run,
    with the same evaluations between epochs, so what is left of the error is the links').

    ``shaped``: the records ``refs`` was made from. A run is checked against a reference from its own machine
    where one of them has one (``refs`` holds the newest, which may be another CPU's: the projections' clock),
    as ``checks`` does: set against another CPU's compute, the check would measure the CPUs, not the links."""
    full, curves = whole_schedules(full), curves_of(convergence)
    whole_refs = {(*scale(r["config"]), variant(r["config"])): r for r in full if timemodel.is_reference(r)}
    out = []
    for s in full:
        cfg = s["config"]
        match = [c for c in curves if same_setting(c, s)]
        own_machine = compute_references([r for r in shaped if timemodel.same_machine(r, s)])
        ref = reference_for(own_machine, cfg) or reference_for(refs, cfg)
        if not match or ref is None:
            continue
        conv = match[-1]
        measured, matches = measured_curve(s, conv)
        entry = {"run_key": cfg.get("run_key"), "method": cfg["method"], "variant": variant(cfg),
                 "model": cfg["model"], "width": cfg["width"], "hospitals": cfg["hospitals"], "rate_bit_s": s["wan"]["rate_bit_s"], "convergence_run": conv["config"].get("run_key"),
                 "epochs": len(s["epochs"]), "evaluated_epochs": [e["epoch"] for e in s["epochs"] if "test_acc_mean" in e],
                 "accuracy_matches_curve": matches, "final_acc": s["final_test_acc"], "measured_curve": measured,
                 **against(conv, s, measured, ref, duplex), "s_per_step_measured": per_step(s)}
        own = whole_refs.get((*scale(cfg), variant(cfg)))
        if own is not None and own is not s:
            entry["whole_reference"] = against(conv, s, measured, own, duplex)
        out.append(entry)
    return out


def load_ok(*paths: str) -> list[dict]:
    return [r for path in paths for r in timemodel.load(path) if r.get("status") == "ok"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("convergence", nargs="+", help="the accuracy curves: whole schedules (results/convergence.jsonl; "
                                                       "results/wan_tta_n2.jsonl for N = 2)")
    parser.add_argument("--shaped", nargs="+", required=True,
                        help="bench/configs/wan_tta.toml's results (results/wan_tta.jsonl, and wan_tta_n2.jsonl)")
    parser.add_argument("--full", nargs="*", default=[], help="whole schedules over shaped links, checked against "
                                                              "the projection (results/wan_tta_full.jsonl, ...)")
    parser.add_argument("--duplex", default="", help="bench.link_duplex's --json (DDP's and FedAvg's goodput "
                                                     "with both directions of a link busy)")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="projected round-trip time (default 0, as measured)")
    parser.add_argument("--json", default="", help="also write curves, hours to each target and the checks here")
    args = parser.parse_args(argv)
    try:
        convergence, shaped, full = load_ok(*args.convergence), load_ok(*args.shaped), load_ok(*args.full)
        duplex = timemodel.load_duplex(args.duplex) if args.duplex else None
        refs = compute_references(shaped)
        if not refs:
            raise UserError(f"{' '.join(args.shaped)}: no unshaped one-epoch run to take compute per step from "
                            f"(python -m bench run bench/configs/wan_tta.toml)")
        if args.rtt_ms < 0:
            raise UserError(f"--rtt-ms {args.rtt_ms:g}: a round trip cannot take negative time")
    except UserError as exc:
        return report(exc)
    rows = project(convergence, refs, rtt_s=args.rtt_ms / 1000, duplex=duplex, shaped=shaped)
    checked = checks(convergence, shaped, refs, duplex)
    whole = full_checks(convergence, full, refs, duplex, shaped)
    for c in checked:
        text = f"check {c['method']:6} N={c['hospitals']} {rate_name(c['rate_bit_s']):>8} {c['steps']:>3} steps:"
        if "step_check" in c:
            m = c["step_check"]
            text += f" s/step predicted {m['predicted_s']:.3f} measured {m['measured_s']:.3f} ({m['error']:+.1%})"
        if "epoch1" in c:
            e = c["epoch1"]
            text += (f"; epoch 1 from the curve's run: predicted {e['predicted_s']:.0f} s, measured "
                     f"{e['measured_s']:.0f} s ({e['error']:+.1%}), accuracy {e['acc_shaped']:.4f} shaped vs "
                     f"{e['acc_convergence']:.4f} in the curve")
        print(text)
    targets = [f"{t:g}" for t in TARGETS]
    for c in whole:
        hours = " / ".join("-" if h["measured"] is None else
                           f"{h['measured']:.2f} ({'-' if h['error'] is None else format(h['error'], '+.1%')})"
                           for h in c["hours_to"].values())
        print(f"whole schedule {c['variant']} N={c['hospitals']} at {rate_name(c['rate_bit_s'])}: measured hours to "
              f"{' / '.join(targets)} {hours} (projection's error); all {c['epochs']} epochs "
              f"{c['hours_total']['measured']:.3f} h ({c['hours_total']['error']:+.1%}); evaluated epochs "
              f"{'match' if c['accuracy_matches_curve'] else 'DO NOT match'} the curve")
        if "whole_reference" in c:
            w = c["whole_reference"]
            print(f"{'':15} from the unshaped whole schedule's compute ({w['compute_s_per_step']:.3f} s a step, "
                  f"one-epoch reference {c['compute_s_per_step']:.3f}): to 0.8 {w['hours_to']['0.8']['error']:+.1%}, "
                  f"all epochs {w['hours_total']['error']:+.1%}")
    print(f"{'partition':9} {'N':>2} {'variant':44} {'rate':>9} {'s/step':>7}  hours to test accuracy "
          + " / ".join(targets))
    for row in rows:
        for name, at in row["rates"].items():
            hours = " / ".join("-" if at["hours_to"][t] is None else f"{at['hours_to'][t]:.2f}" for t in targets)
            print(f"{row['partition']:9} {row['hospitals']:>2} {row['variant']:44} {name:>9} {at['s_per_step']:7.3f}  "
                  f"{hours}")
    left_out = unprojected(convergence, refs)
    for u in left_out:
        print(f"not projected: {u['variant']} ({u['partition']}, seed {u['seed']}): {u['why']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"projections": rows, "checks": checked, "full": whole, "duplex": duplex,
                                               "not_projected": left_out,
                                               "targets": list(TARGETS), "note": __doc__.split("\n\n")[1]},
                                              indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
