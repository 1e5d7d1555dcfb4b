"""Which copies of duplicated records each hospital drops, from tokens alone.

Removal rule (``plan_removals``)
--------------------------------
Within one hospital, of several records with the same token the first in the
hospital's record order is kept. A token held by several hospitals is kept by
exactly one of them: each hospital starts with a count of its distinct tokens
that no other hospital holds; the tokens held by two or more hospitals are
visited in increasing byte order, and each goes to the holder with the smallest
count so far, whose count then grows by one; every other holder drops its copy.
Ties between counts go to the holder whose *fingerprint* is smallest: the
SHA-256 of its sorted distinct tokens. Because each duplicate goes to the
currently smallest holder, when every duplicated record is held by all
hospitals the final sizes differ by at most max(1, the spread of the start
counts). The rule therefore never looks at
hospital numbers or at the order in which hospitals are listed, so relabelling
them keeps the same physical records; only hospitals with identical token sets
have equal fingerprints, and among those (interchangeable: they hold the very
same patients) the lower hospital number wins the tie.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable


def _fingerprint(distinct_tokens: Iterable[bytes]) -> bytes:
    """SHA-256 of a hospital's sorted distinct tokens: its tie-break rank, independent of its number."""
    digest = hashlib.sha256()
    for token in sorted(distinct_tokens):
        digest.update(len(token).to_bytes(4, "big") + token)  # length-prefixed: unambiguous for any token size
    return digest.digest()


def plan_removals(tokens_by_hospital: dict[int, list[bytes]]) -> tuple[dict[int, list[int]], dict]:
    """Which positions each hospital drops so that every token survives exactly once.

    Returns ``(drops, stats)``: ``drops[h]`` are sorted positions into hospital
    h's token list; ``stats`` holds ``records_before`` and ``records_after`` per
    hospital, ``unique_tokens`` (distinct tokens overall, i.e. records kept),
    ``duplicated_tokens`` (distinct tokens with more than one record anywhere),
    ``cross_hospital_tokens`` (held by two or more hospitals),
    ``repeated_within`` (records per hospital dropped as repeats of its own),
    ``dropped_total`` and ``pairs`` ("i-j" with i < j: tokens both hold).
    The rule is described in the module docstring.
    """
    first_position: dict[int, dict[bytes, int]] = {}
    drops: dict[int, list[int]] = {}
    repeated_tokens: set[bytes] = set()
    for hospital, hospital_tokens in tokens_by_hospital.items():
        seen: dict[bytes, int] = {}
        drops[hospital] = []
        for position, token in enumerate(hospital_tokens):
            if token in seen:
                drops[hospital].append(position)
                repeated_tokens.add(token)
            else:
                seen[token] = position
        first_position[hospital] = seen
    repeated_within = {hospital: len(positions) for hospital, positions in drops.items()}

    holders: dict[bytes, list[int]] = {}
    for hospital, seen in first_position.items():
        for token in seen:
            holders.setdefault(token, []).append(hospital)
    shared = sorted(token for token, owners in holders.items() if len(owners) > 1)

    kept = {hospital: sum(len(holders[token]) == 1 for token in seen) for hospital, seen in first_position.items()}
    # Hospital numbers enter only to order hospitals whose fingerprints are equal,
    # i.e. that hold identical token sets and are interchangeable.
    fingerprint = {hospital: _fingerprint(seen) for hospital, seen in first_position.items()}
    for token in shared:
        keeper = min(holders[token], key=lambda h: (kept[h], fingerprint[h], h))
        kept[keeper] += 1
        for hospital in holders[token]:
            if hospital != keeper:
                drops[hospital].append(first_position[hospital][token])

    pairs = {f"{i}-{j}": 0 for i, j in itertools.combinations(sorted(tokens_by_hospital), 2)}
    for token in shared:
        for i, j in itertools.combinations(sorted(holders[token]), 2):
            pairs[f"{i}-{j}"] += 1

    drops = {hospital: sorted(positions) for hospital, positions in drops.items()}
    before = {hospital: len(hospital_tokens) for hospital, hospital_tokens in tokens_by_hospital.items()}
    stats = {
        "records_before": before,
        "records_after": {hospital: before[hospital] - len(drops[hospital]) for hospital in before},
        "unique_tokens": len(holders),
        "duplicated_tokens": len(repeated_tokens.union(shared)),
        "cross_hospital_tokens": len(shared),
        "repeated_within": repeated_within,
        "dropped_total": sum(len(positions) for positions in drops.values()),
        "pairs": pairs,
    }
    return drops, stats

