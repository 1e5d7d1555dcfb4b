"""Remove patients duplicated across hospitals without showing the server who they are.

The same patient often has records at several hospitals. Duplicated records
weigh double in training, skew the model and are sent twice. Before training:

1. Each hospital computes an *identity* per record: the SHA-256 of the decoded
   uint8 pixels (the same image stored twice is one record), or, with a
   manifest, ``"patient:" + patient_id`` (several images of one patient are one
   record).
2. It turns identities into *tokens*, HMAC-SHA256 under a key that only the
   hospitals share (``--dedup-key-file``), and sends the server exactly
   ``{"key_check": ..., "tokens": [...]}`` (see ``hospital_message``). Without
   the key the server can neither invert a token nor test a guessed identity.
3. The server checks that every hospital holds the same key
   (``verify_key_checks``), decides which copies to drop (``plan_removals``)
   and returns to each hospital the positions in its token list to drop.

What the server learns: how many records each hospital holds, which token
positions are equal (so how many records are duplicated, within a hospital and
between each pair of hospitals), nothing else. Tokens are deterministic for a
key, so a server that sees two runs under the same key can link the same
patient across the runs: use a fresh key per study. A hospital that hands the
key to the server lets it test guessed identities (patient ids are often
guessable; pixel digests are not without the image).

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

Keyless variant (``PsiHospital``, ``psi_server_tokens``)
--------------------------------------------------------
A Diffie-Hellman private set intersection in RFC 3526 group 14: each hospital
keeps its own secret exponent, the server relays blinded lists between hospitals
and obtains tokens equal for equal identities, then applies the same
``plan_removals``. There is no shared key to distribute, leak or mismatch, and a
hospital that passes its own secret to the server does not let the server test
guessed identities (a leaked shared key does).
The server learns what it learns with keyed tokens; each hospital additionally
learns the other hospitals' record counts and, for the one list it blinds last,
how many of that list's records repeat within it. It protects against an
honest-but-curious server only: a server that injects H(guess) into the relay
gets it blinded by everyone and can test whether a guessed identity is held
(keyed tokens resist this as long as no hospital reveals the key). It costs one
2048-bit modular exponentiation per record per hospital and tokens change with
every run, so which copy of a duplicate is kept is not reproducible across runs
(the counts are).

Also here: ``apply_overlap`` copies records between index partitions to make
realistic duplicates for experiments, and ``overlap_ground_truth`` lists them.
"""

from __future__ import annotations

import binascii
import csv
import hashlib
import hmac
import itertools
import secrets
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath

import numpy as np

from splitrpc.errors import PeerError, UserError

TOKEN_BYTES = 32  # HMAC-SHA256 output
MIN_KEY_BYTES = 16
NEW_KEY_BYTES = 32
# Identities are 32-byte pixel digests or start with PATIENT_PREFIX, so no
# identity equals this label and a key check is never also a token.
KEY_CHECK_LABEL = b"splitrpc/dedup/key-check/v1"
PATIENT_PREFIX = "patient:"
MANIFEST_COLUMNS = ("path", "patient_id")
MESSAGE_FIELDS = ("key_check", "tokens")
OVERLAP_SEED_DOMAIN = 0x0DE1  # keeps apply_overlap's random stream apart from partition's


# --------------------------------------------------------------------------- identities
def pixel_identities(images: np.ndarray) -> list[bytes]:
    """SHA-256 of each image's uint8 pixels (row-major bytes), one per record."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 2:
        raise UserError(f"pixel identities need uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    return [hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest() for image in images]


def _normal_path(path: str) -> str:
    # "./train/cat/1.png" and "train/cat/1.png" name the same sample.
    return str(PurePosixPath(path.strip().replace("\\", "/")))


def read_manifest(path: str) -> dict[str, str]:
    """Map each sample's relative path (``train/<class>/<file>``) to its patient id.

    The file is CSV (UTF-8, optional BOM) with a header naming at least the
    columns ``path`` and ``patient_id``; other columns are ignored. Surrounding
    spaces are stripped. A path listed twice must carry the same id both times.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return _parse_manifest(csv.reader(fh), path)
    except OSError as exc:
        raise UserError(f"manifest {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"manifest {path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise UserError(f"manifest {path}: malformed CSV ({exc})") from None


def _parse_manifest(reader, path: str) -> dict[str, str]:
    """Rows of a csv.reader into {path: patient_id}; errors name the file line (reader.line_num)."""
    header = [name.strip() for name in next(reader, [])]
    missing = [name for name in MANIFEST_COLUMNS if name not in header]
    if missing:
        raise UserError(f"manifest {path}: the header must name the columns {','.join(MANIFEST_COLUMNS)}; "
                        f"missing {', '.join(missing)}")
    path_column, id_column = (header.index(name) for name in MANIFEST_COLUMNS)
    patients: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) <= max(path_column, id_column):
            raise UserError(f"manifest {path} line {line}: the row has {len(row)} fields, "
                            f"too few for the header's columns")
        if not row[path_column].strip():
            raise UserError(f"manifest {path} line {line}: empty path")
        sample, patient = _normal_path(row[path_column]), row[id_column].strip()
        if not patient:
            raise UserError(f"manifest {path} line {line}: empty patient_id for {sample}")
        if sample in patients and patients[sample] != patient:
            raise UserError(f"manifest {path} line {line}: {sample} has patient_id {patient!r} but line "
                            f"{first_line[sample]} gave {patients[sample]!r}")
        patients.setdefault(sample, patient)
        first_line.setdefault(sample, line)
    if not patients:
        raise UserError(f"manifest {path}: no rows after the header")
    return patients


def manifest_identities(paths: list[str], manifest: dict[str, str]) -> list[bytes]:
    """``"patient:" + id`` (UTF-8) per sample, so all images of one patient share an identity."""
    normal = {_normal_path(p): patient for p, patient in manifest.items()}
    missing = [p for p in paths if _normal_path(p) not in normal]
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} samples are not in the manifest, "
                        f"the first is {_normal_path(missing[0])}")
    return [(PATIENT_PREFIX + normal[_normal_path(p)]).encode() for p in paths]


# --------------------------------------------------------------------------- the shared key
def load_key(path: str) -> bytes:
    """Read the hospitals' shared secret.

    Leading and trailing whitespace (spaces, tabs, newlines) is stripped. If what
    remains is an even number of hex digits (either case), it is hex text and the
    key is the bytes it encodes (``new_key`` writes this form); otherwise the key
    is the remaining bytes as they are. Either way it must be at least
    MIN_KEY_BYTES (16) bytes long.
    """
    try:
        with open(path, "rb") as fh:
            content = fh.read().strip()
    except OSError as exc:
        raise UserError(f"--dedup-key-file {path}: cannot read it ({exc.strerror or exc})") from None
    if not content:
        raise UserError(f"--dedup-key-file {path}: the file is empty")
    try:
        key, form = binascii.unhexlify(content), "hex text decoding to "
    except binascii.Error:  # odd length or not hex digits: the raw bytes are the key
        key, form = content, ""
    if len(key) < MIN_KEY_BYTES:
        raise UserError(f"--dedup-key-file {path}: the key is {form}{len(key)} bytes, it must be at least "
                        f"{MIN_KEY_BYTES} (create one with: python -c 'import secrets; print(secrets.token_hex({NEW_KEY_BYTES}))')")
    return key


def new_key() -> str:
    """A fresh key as hex text, to be written to every hospital's --dedup-key-file."""
    return secrets.token_hex(NEW_KEY_BYTES)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise UserError(f"the deduplication key must be at least {MIN_KEY_BYTES} bytes")


def tokens(key: bytes, identities: list[bytes]) -> list[bytes]:
    """HMAC-SHA256(key, identity), 32 bytes per identity, in the same order."""
    _check_key(key)
    return [hmac.new(key, identity, hashlib.sha256).digest() for identity in identities]


def key_check(key: bytes) -> bytes:
    """A value equal for equal keys that reveals nothing about the key (HMAC of a fixed label)."""
    _check_key(key)
    return hmac.new(key, KEY_CHECK_LABEL, hashlib.sha256).digest()


def _hospitals(ids: list[int]) -> str:
    ids = sorted(ids)
    if len(ids) == 1:
        return f"hospital {ids[0]}"
    return f"hospitals {', '.join(map(str, ids[:-1]))} and {ids[-1]}"


def verify_key_checks(checks: dict[int, bytes]) -> None:
    """Fail with a UserError naming the hospitals whose keys differ.

    With different keys no token matches and deduplication would silently find
    nothing. The largest group of agreeing hospitals is named as the reference
    (ties: the group with the lowest hospital number).
    """
    groups: dict[bytes, list[int]] = {}
    for hospital in sorted(checks):
        groups.setdefault(checks[hospital], []).append(hospital)
    if len(groups) <= 1:
        return
    ordered = sorted(groups.values(), key=lambda members: (-len(members), members[0]))
    reference, others = ordered[0], ordered[1:]
    if len(others) == 1:
        verb = "holds" if len(others[0]) == 1 else "hold"
        raise UserError(f"{_hospitals(others[0])} {verb} a different --dedup-key-file than {_hospitals(reference)}; "
                        f"no duplicates can be matched")
    listing = " | ".join(_hospitals(members) for members in ordered)
    raise UserError(f"the hospitals hold {len(ordered)} different --dedup-key-file keys ({listing}); "
                    f"no duplicates can be matched")


# --------------------------------------------------------------------------- what crosses the wire
def hospital_message(key: bytes, identities: list[bytes]) -> dict:
    """Everything a hospital sends the server for deduplication, and nothing more."""
    return {"key_check": key_check(key), "tokens": tokens(key, identities)}


def server_plan(messages: dict[int, dict]) -> tuple[dict[int, list[int]], dict]:
    """The server's side: validate the hospitals' messages, check keys agree, plan removals."""
    for hospital, message in messages.items():
        if not isinstance(message, dict) or sorted(message) != sorted(MESSAGE_FIELDS):
            raise PeerError(f"hospital {hospital} sent a deduplication message without exactly the fields "
                            f"{', '.join(MESSAGE_FIELDS)}")
        if not isinstance(message["key_check"], bytes) or not isinstance(message["tokens"], list):
            raise PeerError(f"hospital {hospital} sent a deduplication message of the wrong types")
        bad = [t for t in message["tokens"] if not isinstance(t, bytes) or len(t) != TOKEN_BYTES]
        if bad:
            raise PeerError(f"hospital {hospital} sent {len(bad)} tokens that are not {TOKEN_BYTES} bytes")
    verify_key_checks({hospital: message["key_check"] for hospital, message in messages.items()})
    return plan_removals({hospital: message["tokens"] for hospital, message in messages.items()})


# --------------------------------------------------------------------------- the removal rule
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


# --------------------------------------------------------------------------- synthetic overlap for experiments
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


# --------------------------------------------------------------------------- keyless variant: DH-based PSI
# RFC 3526 group 14 (2048-bit MODP): p = 2^2048 - 2^1984 - 1 + 2^64 * (floor(2^1918 pi) + 124476),
# a safe prime, so the squares mod p form a subgroup of prime order q = (p - 1) / 2.
PSI_PRIME = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF", 16)
PSI_ORDER = (PSI_PRIME - 1) // 2
PSI_ELEMENT_BYTES = 256
# RFC 3526 section 8 puts group 14 at 110-160 bits of strength and suggests exponents
# of 220-320 bits; the upper figure is used (a full-size exponent costs ~6x more).
PSI_EXPONENT_BITS = 320
PSI_HASH_DOMAIN = b"splitrpc/dedup/psi-hash/v1"
# 64 bits beyond the prime's size make the reduction mod p statistically uniform.
PSI_HASH_BYTES = PSI_ELEMENT_BYTES + 8


def psi_hash_to_group(identity: bytes) -> int:
    """Hash an identity onto the prime-order subgroup of squares mod PSI_PRIME."""
    wide = hashlib.shake_256(PSI_HASH_DOMAIN + identity).digest(PSI_HASH_BYTES)
    return pow(int.from_bytes(wide, "big") % PSI_PRIME, 2, PSI_PRIME)


def _check_group_values(values: list[int], who: str) -> None:
    # 0, 1 and p - 1 are the elements of order below 3 (or not in the group at all);
    # anything else of the right size is accepted (see PsiHospital on the other subgroup).
    for value in values:
        if not isinstance(value, int) or not 1 < value < PSI_PRIME - 1:
            raise PeerError(f"{who} received a value that is not a valid group element")


class PsiHospital:
    """A hospital's side of the keyless variant (commutative blinding, Huberman-Franklin-Hogg style).

    Each hospital draws a secret exponent a = 2b (b a random PSI_EXPONENT_BITS-bit
    number) that never leaves this object. Its first message is H(x)^a for its own
    records, in record order; it then raises every list the server relays to it to
    its own a. Exponentiation commutes, so a record's value after all hospitals have
    blinded it, H(x)^(a_1 ... a_N), is the same whichever hospital holds it, and
    nobody without all exponents can compute it for a guessed identity. The
    exponent is even so that whatever value it is applied to lands in the subgroup
    of squares: a relayed value outside that subgroup cannot reveal the parity of a.
    """

    def __init__(self, identities: list[bytes]):
        self._identities = list(identities)
        self._secret = 2 * (secrets.randbelow(2**PSI_EXPONENT_BITS - 1) + 1)

    def first_message(self) -> list[int]:
        return [pow(psi_hash_to_group(identity), self._secret, PSI_PRIME) for identity in self._identities]

    def reblind(self, values: list[int]) -> list[int]:
        _check_group_values(values, "a hospital")
        return [pow(value, self._secret, PSI_PRIME) for value in values]


def psi_server_tokens(first_messages: dict[int, list[int]],
                      reblinders: dict[int, Callable[[list[int]], list[int]]]) -> dict[int, list[bytes]]:
    """The server's relay: pass each hospital's list through every other hospital, return final tokens.

    ``reblinders[h]`` stands for the RPC to hospital h's ``PsiHospital.reblind``.
    The list of hospital i visits the others in ring order i+1, i+2, ..., i-1, so
    each hospital applies the last exponent to one list only and never sees two
    lists fully blinded (it cannot count the overlap between two other hospitals).
    A token is the SHA-256 of the fully blinded value, fed to ``plan_removals``.
    """
    ring = sorted(first_messages)
    result = {}
    for start, origin in enumerate(ring):
        values = first_messages[origin]
        _check_group_values(values, "the server")
        for step in range(1, len(ring)):
            hop = ring[(start + step) % len(ring)]
            blinded = reblinders[hop](values)
            if len(blinded) != len(values):
                raise PeerError(f"hospital {hop} returned {len(blinded)} values for {len(values)}")
            _check_group_values(blinded, "the server")
            values = blinded
        result[origin] = [hashlib.sha256(v.to_bytes(PSI_ELEMENT_BYTES, "big")).digest() for v in values]
    return result
