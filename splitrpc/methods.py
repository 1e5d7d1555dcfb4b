"""The method registry: what each training method needs, declared once.

A method is a ``Method`` subclass, exposed as ``METHOD`` by the module that
implements it; ``REGISTRY`` maps the method's name (``--method``) to that
module, which is imported only when the method is asked for (so the server
never imports a hospital's code, and this module imports no torch). Each
declaration says how many processes a run needs, what each is called, which
method-specific options it reads (``Method.options``; any other method given
one of them is told so in one line), its own checks, and the ``Party`` each
process plays. ``splitrpc.lifecycle.run`` drives every party the same way:
join, set up, train with the shared loop, finish the record, save, leave.

Adding a method: write its module (a ``Method`` subclass and its ``Party``,
with a test beside it) and add one line to ``REGISTRY``. ``train.py``, the
harness, the time model and the WAN runner ask the registry. See
docs/methods.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib

from splitrpc.errors import UserError

REGISTRY = {
    "split": "splitrpc.split",
    "local": "splitrpc.local",
    "ddp": "splitrpc.ddp",
    "fedavg": "splitrpc.fedavg",
    "split-local": "splitrpc.reference",
    "split-localloss": "splitrpc.split.localloss",
    "splitfed": "splitrpc.split.splitfed",
}
# Read by every method that checkpoints and resumes (its parties save and restore their whole state).
CHECKPOINT_OPTIONS = frozenset({"checkpoint_dir", "checkpoint_every", "resume"})


class Party:
    """One process's share of a run, in the order ``lifecycle.run`` calls it.

    ``join`` runs before the setup clock stops and outside failure handling (nothing
    to undo yet); everything from ``setup`` to ``synchronize`` runs inside
    ``reporting()``, and ``leave`` always runs last, told whether the run failed."""

    who = ""
    writes_record = True

    def join(self) -> None:
        """Prepare this process's data and meet the other processes."""

    def reporting(self):
        """A context in which a failure is reported to the other processes."""
        return contextlib.nullcontext()

    def setup(self, run_record: dict) -> None:
        """Build the models and the plan; record what the run is made of."""

    def train(self) -> dict:
        """Every step and evaluation; returns the loop's part of the record."""
        return {}

    def finish(self, run_record: dict) -> None:
        """Add what only this method measures (bytes, rounds, lost hospitals...)."""

    def save(self, directory: str) -> None:
        """Write the final weights this process is responsible for."""

    def synchronize(self) -> None:
        """Wait for the other processes before the record is written."""

    def leave(self, failed: bool) -> None:
        """Release groups and connections."""


class Method:
    """A training method's declaration. Subclasses set the class attributes and ``party``."""

    name = ""
    summary = ""
    one_process = False
    has_server = False  # rank 0 is a server that holds no data (its own namespace in bench.wan)
    # What crosses a hospital's link each step, for the time model: "activations" (split
    # learning), "all-reduce" (DDP, FedAvg) or "none" (one process).
    exchange = "none"
    # Options only some methods read (config field names). An option listed by any method
    # and not by this one must keep its default under this method.
    options: frozenset[str] = frozenset()
    # Options whose value the method fixes (DDP's and FedAvg's steps are always parallel): given
    # with another value they are an error; left at their default they are set, so that the
    # record says what ran.
    fixed: dict = {}

    def fixed_options(self, cfg) -> dict:
        """``fixed`` for this configuration: a method whose pinned options depend on another of its
        options (SplitFed's version) overrides it."""
        return self.fixed

    def world_size(self, cfg) -> int:
        return 1 if self.one_process else cfg.hospitals

    def roles(self, cfg) -> str:
        return "one process" if self.one_process else f"{cfg.hospitals} hospitals"

    def who(self, rank: int | None) -> str:
        """How this method's process of ``rank`` signs its output."""
        return self.name if rank is None else f"rank{rank}"

    def validate(self, cfg) -> None:
        """Checks of this method's own options (raise UserError)."""

    def party(self, cfg, rank: int | None, coordinator) -> Party:
        raise NotImplementedError

    def checkpoint_parties(self, cfg) -> list[str]:
        """The files whose presence at a step makes it one a run can resume from (``CHECKPOINT_OPTIONS``):
        by default the one process's, or every rank's (named for its hospital)."""
        if self.one_process:
            return [self.name]
        from splitrpc.transport import hospital_name

        return [hospital_name(r) for r in range(1, self.world_size(cfg) + 1)]

    def node_processes(self, cfg, nnodes: int, node_rank: int, per_node: int) -> int:
        """Processes node ``node_rank`` of a multi-node run starts: by default ``per_node`` ranks each."""
        if self.one_process:
            raise UserError(f"--method {self.name} runs in one process; it has no multi-node layout")
        if nnodes * per_node != self.world_size(cfg):
            raise UserError(f"--nnodes {nnodes} x --nproc-per-node {per_node} = {nnodes * per_node} ranks but "
                            f"--method {self.name} --hospitals {cfg.hospitals} needs {self.world_size(cfg)}")
        return per_node


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise UserError(f"--method: unknown value {name!r} (choose from {', '.join(REGISTRY)})")
    return importlib.import_module(REGISTRY[name]).METHOD


def all_methods() -> list[Method]:
    return [get(name) for name in REGISTRY]


def readers() -> dict[str, list[str]]:
    """{option: the methods that read it} for every method-specific option (``Method.options``)."""
    found: dict[str, list[str]] = {}
    for m in all_methods():
        for option in m.options:
            found.setdefault(option, []).append(m.name)
    return found


def check_options(cfg, fields: dict, given: set[str] | None = None):
    """An option that only other methods read, given to this one, is one clear error; then the
    method's own checks. ``given``: the options set by flags or TOML (None: unknown, judge by
    value). Returns ``cfg`` with the method's fixed options set."""
    method = get(cfg.method)
    read_by = readers()
    fixed = method.fixed_options(cfg)
    for option, value in fixed.items():
        current = getattr(cfg, option)
        explicit = option in given if given is not None else current != fields[option].default
        if current != value and explicit:
            raise UserError(f"{_as_flag(option, current)} does not apply to --method {cfg.method} (it always runs "
                            f"with {_as_flag(option, value)})")
    if fixed:
        cfg = dataclasses.replace(cfg, **fixed)
    for option in sorted(read_by):
        if option in method.options or option in fixed:
            continue
        value = getattr(cfg, option)
        if value != fields[option].default:
            raise UserError(f"{_as_flag(option, value)} does not apply to --method {cfg.method} (it is read by "
                            f"--method {', '.join(read_by[option])})")
    method.validate(cfg)
    return cfg


def _as_flag(option: str, value) -> str:
    flag = option.replace("_", "-")
    return (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}"
