"""What a leakage audit keeps of a run (``--capture-dir``): the last batches each side saw.

The server keeps what it received from (and, U-shaped, sent to and got back from) each hospital;
each hospital keeps the inputs and labels behind them. Both keep the same (epoch, batch) keys, so
an auditor holding both files can pair them. By default the run's last batches are kept; with
``--capture-epochs`` the last batches of each of those epochs, so that leakage can be followed
through training.
"""

from __future__ import annotations

from collections import deque


class Capture:
    """The last ``batches`` items of each key (a hospital), overall or per chosen epoch.

    ``epochs``: 1-based epochs to keep (empty: the run's last batches). An item is a dict with
    at least ``epoch`` (0-based, as the training loop counts) and ``batch``.
    """

    def __init__(self, batches: int, epochs=()):
        self.batches = batches
        self.epochs = {int(e) for e in epochs}
        self.kept: dict[tuple, deque] = {}
        self.latest: dict = {}

    def add(self, key, item: dict) -> None:
        epoch = item["epoch"]
        if self.epochs and epoch + 1 not in self.epochs:
            self.latest[key] = None
            return
        slot = (key, epoch if self.epochs else None)
        self.kept.setdefault(slot, deque(maxlen=self.batches)).append(item)
        self.latest[key] = item

    def last(self, key) -> dict | None:
        """The item ``add`` kept last for ``key`` (None if it kept nothing then): to complete it."""
        return self.latest.get(key)

    def items(self, key, epoch: int | None = None) -> list[dict]:
        """What is kept for ``key``, epoch by epoch in the order it came; of one epoch (1-based) if given."""
        slots = sorted((s for s in self.kept if s[0] == key and (epoch is None or s[1] == epoch - 1)),
                       key=lambda s: -1 if s[1] is None else s[1])
        return [item for s in slots for item in self.kept[s]]

    @staticmethod
    def file_name(side: str, epoch: int | None) -> str:
        """``<side>.pt``, or with --capture-epochs one file per epoch, ``<side>-epoch<e>.pt``: written as the
        epoch ends, so that a run stopped later and resumed loses none of the epochs before."""
        return f"{side}.pt" if epoch is None else f"{side}-epoch{epoch}.pt"
