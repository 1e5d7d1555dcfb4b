"""Synthetic overlap for ``--overlap`` experiments: the data layer's duplicates.

``apply_overlap`` copies records between the hospitals' index partitions
(``splitrpc.data.partition``) to make realistic duplicates, which deduplication
(``splitrpc.dedup``) then has to find; ``overlap_ground_truth`` lists them.
"""

from __future__ import annotations

import numpy as np

from splitrpc.errors import UserError

OVERLAP_SEED_DOMAIN = 0x0DE1  # keeps apply_overlap's random stream apart from partition's


def apply_overlap(parts: list[np.ndarray], fraction: float, seed: int) -> list[np.ndarray]:
    """Copy a fraction of each hospital's records to one other hospital each.

    For each hospital in turn, ``round(fraction * len(part))`` (halves rounded up)
    of its own original records are drawn without replacement, and each is added
    to one other hospital drawn uniformly among those that do not hold it yet; a
    record that every other hospital already holds is skipped. With disjoint
    input parts nothing is skipped and every copied record ends up at exactly two
    hospitals. Reproducible from ``seed``; returns sorted index arrays.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"the overlap fraction must be in [0, 1), got {fraction}")
    if fraction > 0 and len(parts) < 2:
        raise UserError("an overlap between hospitals needs at least 2 hospitals")
    rng = np.random.default_rng([seed, OVERLAP_SEED_DOMAIN])
    holdings = [set(map(int, part)) for part in parts]
    for source, part in enumerate(parts):
        count = int(fraction * len(part) + 0.5)
        for index in rng.choice(np.asarray(part), size=count, replace=False):
            index = int(index)
            candidates = [h for h in range(len(parts)) if h != source and index not in holdings[h]]
            if candidates:
                holdings[candidates[rng.integers(len(candidates))]].add(index)
    return [np.array(sorted(held), dtype=np.int64) for held in holdings]


def overlap_ground_truth(parts: list[np.ndarray]) -> set[int]:
    """Data-set indices held by more than one hospital."""
    if not parts:
        return set()
    indices, counts = np.unique(np.concatenate([np.unique(p) for p in parts]), return_counts=True)
    return set(map(int, indices[counts > 1]))

