"""A method written as a user adding one would: one module, one registry entry (tests/test_methods.py).

"Toy" trains nothing: every step reports a fixed loss, and its one process evaluates to 0.5. It
exercises the registry and the shared lifecycle, not learning."""

from splitrpc import data, loop
from splitrpc.methods import Method, Party


class ToyParty(Party):
    who = "toy"

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, run_record: dict) -> None:
        self.plan = data.epoch_plan([3] * self.cfg.hospitals, self.cfg.schedule)
        run_record["hospitals"] = [{"name": f"toy{i}"} for i in range(1, self.cfg.hospitals + 1)]

    def train(self) -> dict:
        return loop.run(self.cfg, self.plan, lambda epoch, index, participants, lr: (1.0, len(participants)),
                        lambda: [0.5], who=self.who, quiet=True)

    def finish(self, run_record: dict) -> None:
        run_record["toy"] = {"steps": len(self.plan) * self.cfg.epochs}


class Toy(Method):
    name = "toy"
    summary = "a method that trains nothing, for the registry's tests"
    one_process = True
    options = frozenset({"schedule"})

    def party(self, cfg, rank, coordinator) -> Party:
        return ToyParty(cfg)


METHOD = Toy()
