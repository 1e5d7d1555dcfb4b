"""One run, the same for every method and every process: join, set up, train, finish, save, leave.

``run`` is the only place that times a run, writes its record and decides how a
process leaves after a failure; a method supplies its ``Party`` (see
``splitrpc.methods``) and never repeats this sequence.
"""

from __future__ import annotations

import time

from splitrpc import methods, record


def run(cfg, rank: int | None = None, coordinator=None) -> int:
    """Run this process's party of ``cfg.method``: ``rank`` and ``coordinator`` under torchrun, else None."""
    started = time.perf_counter()
    party = methods.get(cfg.method).party(cfg, rank, coordinator)
    run_record = record.new_record(cfg) if party.writes_record else {}
    # Joining has nothing to undo when it fails: no group or connection is up before it returns.
    party.join()
    try:
        with party.reporting():
            party.setup(run_record)
            run_record["setup_time_s"] = time.perf_counter() - started
            run_record.update(party.train())
            party.finish(run_record)
            if cfg.save_dir:
                party.save(cfg.save_dir)
            party.synchronize()
    except BaseException:
        party.leave(failed=True)
        raise
    if party.writes_record:
        # Written before leaving: a run whose teardown fails still has its record.
        run_record["status"] = "ok"
        run_record["wall_time_s"] = time.perf_counter() - started
        record.append_jsonl(cfg.out, run_record)
        record.print_summary(run_record, party.who)
    party.leave(failed=False)
    return 0
