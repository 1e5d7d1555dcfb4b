"""Deduplication of records across hospitals: every duplicate found, one copy kept,
nothing revealed to the server, and the outcome independent of hospital numbering."""

import base64
import hashlib
import itertools
import pickle
from collections import Counter

import numpy as np
import pytest

from splitrpc import data, overlap
from splitrpc.dedup import hmac_tokens, identities, psi, removal
from splitrpc.errors import PeerError, UserError

KEY = bytes(range(32))
RECORDS = 600
HOSPITALS = 4
FRACTION = 0.2


def distinct_images(n: int, seed: int = 0) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    assert len({img.tobytes() for img in images}) == n
    return images


def overlapped_parts(seed: int = 5) -> list[np.ndarray]:
    parts = data.partition(np.zeros(RECORDS, dtype=np.int64), HOSPITALS, "iid", 0.5, seed=1)
    return overlap.apply_overlap(parts, FRACTION, seed)


def kept_records(parts_by_hospital: dict[int, np.ndarray], drops: dict[int, list[int]]) -> set[tuple[int, int]]:
    """(hospital, data-set index) of every record a hospital keeps."""
    kept = set()
    for hospital, part in parts_by_hospital.items():
        kept |= {(hospital, int(part[p])) for p in np.setdiff1d(np.arange(len(part)), drops[hospital])}
    return kept


def assert_one_line_error(excinfo, *fragments: str):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def images():
    return distinct_images(RECORDS)


# --------------------------------------------------------------------------- finding duplicates
def test_known_overlap_is_removed_exactly(images):
    parts = overlapped_parts()
    truth = overlap.overlap_ground_truth(parts)
    assert len(truth) == HOSPITALS * round(FRACTION * RECORDS / HOSPITALS) == 120
    by_hospital = {h: part for h, part in enumerate(parts, start=1)}
    token_lists = {h: hmac_tokens.tokens(KEY, identities.pixel_identities(images[part])) for h, part in by_hospital.items()}

    drops, stats = removal.plan_removals(token_lists)

    kept = sorted(index for _, index in kept_records(by_hospital, drops))
    assert kept == list(range(RECORDS))  # every record survives, exactly once
    dropped = [int(by_hospital[h][p]) for h in drops for p in drops[h]]
    assert sorted(dropped) == sorted(truth)  # only duplicates are dropped, one copy each
    assert stats["records_before"] == {h: len(p) for h, p in by_hospital.items()}
    assert sum(stats["records_before"].values()) == RECORDS + 120
    assert sum(stats["records_after"].values()) == stats["unique_tokens"] == RECORDS
    assert stats["duplicated_tokens"] == stats["cross_hospital_tokens"] == stats["dropped_total"] == 120
    assert stats["repeated_within"] == {1: 0, 2: 0, 3: 0, 4: 0}
    expected_pairs = {f"{i}-{j}": len(set(by_hospital[i].tolist()) & set(by_hospital[j].tolist()))
                      for i, j in itertools.combinations(range(1, HOSPITALS + 1), 2)}
    assert stats["pairs"] == expected_pairs
    assert sum(expected_pairs.values()) == 120


def test_relabelling_and_reordering_keep_the_same_physical_records(images):
    parts = overlapped_parts()
    reference, _ = removal.plan_removals(
        {h: hmac_tokens.tokens(KEY, identities.pixel_identities(images[p])) for h, p in enumerate(parts)})
    reference_kept = kept_records(dict(enumerate(parts)), reference)
    rng = np.random.default_rng(11)
    for trial in range(6):
        labels = rng.permutation([3, 7, 40, 41, 99, 5])[:HOSPITALS].tolist()  # new, non-contiguous numbers
        insertion = rng.permutation(HOSPITALS)  # and a shuffled dict order
        shuffled = {labels[h]: rng.permutation(parts[h]) for h in insertion}  # and shuffled record order
        drops, stats = removal.plan_removals(
            {label: hmac_tokens.tokens(KEY, identities.pixel_identities(images[p])) for label, p in shuffled.items()})
        back = {label: h for h, label in enumerate(labels)}
        kept = {(back[label], index) for label, index in kept_records(shuffled, drops)}
        assert kept == reference_kept, f"trial {trial}"
        assert stats["dropped_total"] == 120


def test_hospitals_with_identical_records_are_interchangeable():
    common = [bytes([i]) * 32 for i in range(10)]
    other = [bytes([100 + i]) * 32 for i in range(4)]
    outcomes = []
    for a, b, c in [(1, 2, 3), (2, 1, 3), (3, 1, 2), (2, 3, 1)]:
        token_lists = {a: common, b: list(reversed(common)), c: common[:4] + other}
        drops, stats = removal.plan_removals(token_lists)
        kept = {h: frozenset(t for p, t in enumerate(token_lists[h]) if p not in drops[h]) for h in (a, b, c)}
        # The third hospital (a fingerprint of its own) keeps the same records whatever its
        # number; the two identical ones split the rest between them the same way.
        outcomes.append((kept[c], frozenset({kept[a], kept[b]})))
        assert stats["unique_tokens"] == 14 and stats["dropped_total"] == 10 + 10 + 8 - 14
    assert len(set(outcomes)) == 1
    third, pair = outcomes[0]
    # The third starts with its 4 own records, the identical pair at 0: they take the 10 shared in turns.
    assert len(third) == 4 and sorted(len(s) for s in pair) == [5, 5]


def test_repeats_within_one_hospital_keep_the_first():
    a, b, c = (bytes([i]) * 32 for i in range(3))
    drops, stats = removal.plan_removals({1: [a, b, a, a, c], 2: [c]})
    assert drops[1][:2] == [2, 3]
    assert stats["repeated_within"] == {1: 2, 2: 0}
    assert stats["duplicated_tokens"] == 2 and stats["cross_hospital_tokens"] == 1
    assert stats["unique_tokens"] == 3 and stats["dropped_total"] == 3
    # c: hospital 2 holds nothing else (count 0), hospital 1 holds a and b (count 2): 2 keeps it.
    assert drops == {1: [2, 3, 4], 2: []}
    assert stats["records_after"] == {1: 2, 2: 1}


# --------------------------------------------------------------------------- balance
def test_duplicates_held_by_all_end_up_spread_evenly():
    shared = [f"shared{i}".encode() for i in range(10)]
    token_lists = {h: [f"h{h}-{i}".encode() for i in range(100)] + shared for h in (1, 2, 3)}
    drops, stats = removal.plan_removals(token_lists)
    assert sorted(stats["records_after"].values()) == [103, 103, 104]  # 10 = 3 + 3 + 4
    assert stats["dropped_total"] == 20
    assert stats["pairs"] == {"1-2": 10, "1-3": 10, "2-3": 10}


def test_duplicates_fill_the_smaller_hospital_first():
    shared = [f"shared{i}".encode() for i in range(60)]
    token_lists = {1: [f"a{i}".encode() for i in range(50)] + shared,
                   2: [f"b{i}".encode() for i in range(100)] + shared}
    _, stats = removal.plan_removals(token_lists)
    # 50 shared records lift hospital 1 to 100, the other 10 alternate: 105 and 105.
    # (Keeping every copy at one hospital would give 110 and 100.)
    assert stats["records_after"] == {1: 105, 2: 105}


# --------------------------------------------------------------------------- what the server sees
def encodings(secret: bytes) -> list[bytes]:
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode(), str(secret).encode(),
             base64.b64encode(secret), repr(secret).encode()]
    if secret.isascii():
        forms.append(secret.decode().encode("utf-16-le"))
    return forms


@pytest.mark.parametrize("kind", ["pixels", "manifest"])
def test_hospital_message_reveals_no_identity_and_no_key(images, kind):
    if kind == "pixels":
        record_ids = identities.pixel_identities(images[:50])
        secrets_ = record_ids
    else:
        ids = [f"MRN-{100000 + i}" for i in range(50)]
        record_ids = identities.manifest_identities([f"train/c/{i}.png" for i in range(50)],
                                               {f"train/c/{i}.png": ids[i] for i in range(50)})
        secrets_ = record_ids + [i.encode() for i in ids]
    message = hmac_tokens.hospital_message(KEY, record_ids)
    assert sorted(message) == ["key_check", "tokens"]
    assert len(message["tokens"]) == 50 and all(len(t) == 32 for t in message["tokens"])
    blob = pickle.dumps(message)
    for secret in [*secrets_, KEY]:
        for form in encodings(secret):
            assert form not in blob, (secret, form)


def test_server_plan_accepts_messages_and_rejects_a_key_mismatch():
    record_ids = [f"patient:{i}".encode() for i in range(20)]
    messages = {1: hmac_tokens.hospital_message(KEY, record_ids[:12]), 2: hmac_tokens.hospital_message(KEY, record_ids[8:])}
    drops, stats = hmac_tokens.server_plan(messages)
    assert stats["cross_hospital_tokens"] == 4 and stats["unique_tokens"] == 20
    assert sum(stats["records_after"].values()) == 20
    messages[2] = hmac_tokens.hospital_message(b"another key of 16+ bytes", record_ids[8:])
    with pytest.raises(UserError) as excinfo:
        hmac_tokens.server_plan(messages)
    assert_one_line_error(excinfo, "hospital 2 holds a different --dedup-key-file than hospital 1")


@pytest.mark.parametrize("keys,expected", [
    ({1: "A", 2: "B", 3: "B", 4: "A"},
     "hospitals 2 and 3 hold a different --dedup-key-file than hospitals 1 and 4; no duplicates can be matched"),
    ({1: "A", 2: "B", 3: "B"}, "hospital 1 holds a different --dedup-key-file than hospitals 2 and 3"),
    ({1: "A", 2: "B", 3: "A", 4: "C", 5: "A"},
     "the hospitals hold 3 different --dedup-key-file keys (hospitals 1, 3 and 5 | hospital 2 | hospital 4)"),
])
def test_mismatched_keys_name_the_hospitals(keys, expected):
    checks = {h: hmac_tokens.key_check(name.encode() * 16) for h, name in keys.items()}
    with pytest.raises(UserError) as excinfo:
        hmac_tokens.verify_key_checks(checks)
    assert_one_line_error(excinfo, expected)


def test_matching_keys_pass():
    hmac_tokens.verify_key_checks({h: hmac_tokens.key_check(KEY) for h in (1, 2, 3)})
    assert hmac_tokens.key_check(KEY) != hmac_tokens.key_check(KEY[::-1])
    # A key check could only equal a token if an identity equalled the label: no identity can.
    assert len(hmac_tokens.KEY_CHECK_LABEL) != 32 and not hmac_tokens.KEY_CHECK_LABEL.startswith(identities.PATIENT_PREFIX.encode())


# --------------------------------------------------------------------------- the key file
def test_load_key_forms(tmp_path):
    hex_key = hmac_tokens.new_key()
    assert len(hex_key) == 64
    (tmp_path / "hex").write_text(hex_key + "\n")
    (tmp_path / "HEX").write_text("  " + hex_key.upper() + "\r\n")
    raw = b"\x00\xff not hex, a passphrase!"
    (tmp_path / "raw").write_bytes(raw + b"\n")
    assert hmac_tokens.load_key(str(tmp_path / "hex")) == hmac_tokens.load_key(str(tmp_path / "HEX")) == bytes.fromhex(hex_key)
    assert hmac_tokens.load_key(str(tmp_path / "raw")) == raw
    assert hmac_tokens.new_key() != hex_key


@pytest.mark.parametrize("content,expected", [
    (None, "cannot read it (No such file or directory)"),
    ("dir", "cannot read it (Is a directory)"),
    (b"\n \n", "the file is empty"),
    (b"short secret\n", "the key is 12 bytes, it must be at least 16"),
    (b"00112233445566778899\n", "the key is hex text decoding to 10 bytes, it must be at least 16"),
])
def test_load_key_errors(tmp_path, content, expected):
    path = tmp_path / "key"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as excinfo:
        hmac_tokens.load_key(str(path))
    assert_one_line_error(excinfo, f"--dedup-key-file {path}: {expected}")


def test_short_keys_are_refused_by_tokens():
    with pytest.raises(UserError, match="at least 16 bytes"):
        hmac_tokens.tokens(b"too short", [b"x"])


# --------------------------------------------------------------------------- manifests
def test_manifest_groups_images_of_one_patient(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("\ufeffpath,patient_id,site\n"
                    "train/cat/1.png,P1,A\n"
                    "./train/cat/2.png, P1 ,A\n"
                    "\n"
                    "train/dog/3.png,P2,B\n"
                    "train/dog/3.png,P2,B\n", encoding="utf-8")
    manifest = identities.read_manifest(str(path))
    assert manifest == {"train/cat/1.png": "P1", "train/cat/2.png": "P1", "train/dog/3.png": "P2"}
    record_ids = identities.manifest_identities(["train/dog/3.png", "train/cat/2.png", "train/cat/1.png"], manifest)
    assert record_ids == [b"patient:P2", b"patient:P1", b"patient:P1"]
    drops, stats = removal.plan_removals({1: hmac_tokens.tokens(KEY, record_ids[:2]), 2: hmac_tokens.tokens(KEY, record_ids[2:])})
    assert stats["unique_tokens"] == 2 and stats["dropped_total"] == 1
    assert drops == {1: [1], 2: []}  # P1 goes to hospital 2, which holds nothing else (hospital 1 holds P2)


@pytest.mark.parametrize("text,expected", [
    ("file,patient\ntrain/a/1.png,P1\n", "the header must name the columns path,patient_id; missing path, patient_id"),
    ("path,patient\ntrain/a/1.png,P1\n", "missing patient_id"),
    ("", "missing path, patient_id"),
    ("path,patient_id\ntrain/a/1.png,P1\ntrain/a/2.png,\n", "line 3: empty patient_id for train/a/2.png"),
    ("path,patient_id\n,P1\n", "line 2: empty path"),
    ("path,patient_id\ntrain/a/1.png,P1\ntrain/a/2.png,P2\ntrain/a/1.png,P3\n",
     "line 4: train/a/1.png has patient_id 'P3' but line 2 gave 'P1'"),
    ("path,patient_id\ntrain/a/1.png\n", "line 2: the row has 1 fields, too few for the header's columns"),
    ("path,patient_id\n", "no rows after the header"),
])
def test_malformed_manifests(tmp_path, text, expected):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    with pytest.raises(UserError) as excinfo:
        identities.read_manifest(str(path))
    assert_one_line_error(excinfo, f"manifest {path}", expected)


def test_unreadable_manifest_and_missing_paths(tmp_path):
    with pytest.raises(UserError) as excinfo:
        identities.read_manifest(str(tmp_path / "absent.csv"))
    assert_one_line_error(excinfo, "absent.csv: cannot read it (No such file or directory)")
    (tmp_path / "latin1.csv").write_bytes(b"path,patient_id\ntrain/a/1.png,J\xf6rg\n")
    with pytest.raises(UserError) as excinfo:
        identities.read_manifest(str(tmp_path / "latin1.csv"))
    assert_one_line_error(excinfo, "not UTF-8 text")
    with pytest.raises(UserError) as excinfo:
        identities.manifest_identities(["train/a/1.png", "train/a/2.png", "train/b/3.png"], {"train/a/1.png": "P1"})
    assert_one_line_error(excinfo, "2 of 3 samples are not in the manifest, the first is train/a/2.png")


# --------------------------------------------------------------------------- pixel identities
def test_pixel_identities():
    images = distinct_images(3, seed=1)
    copy = images.copy()
    assert identities.pixel_identities(images) == identities.pixel_identities(copy)
    copy[1, 31, 0, 2] ^= 1
    ids, changed = identities.pixel_identities(images), identities.pixel_identities(copy)
    assert [a == b for a, b in zip(ids, changed)] == [True, False, True]
    assert all(len(i) == 32 for i in ids) and len(set(ids)) == 3
    # A strided view (e.g. a column slice of a larger array) hashes like its contiguous copy.
    wide = np.concatenate([images, images], axis=2)[:, :, :32]
    assert identities.pixel_identities(wide) == ids
    with pytest.raises(UserError, match="need uint8 images"):
        identities.pixel_identities(images.astype(np.float32))


# --------------------------------------------------------------------------- synthetic overlap
def test_apply_overlap_is_reproducible_and_counts_add_up():
    parts = data.partition(np.zeros(RECORDS, dtype=np.int64), HOSPITALS, "iid", 0.5, seed=1)
    a, b = overlap.apply_overlap(parts, FRACTION, 5), overlap.apply_overlap(parts, FRACTION, 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, overlap.apply_overlap(parts, FRACTION, 6)))
    for before, after in zip(parts, a):
        assert set(before.tolist()) <= set(after.tolist())
        assert len(np.unique(after)) == len(after) and np.all(np.diff(after) > 0)
    assert sum(map(len, a)) == RECORDS + 120
    held = Counter(int(i) for part in a for i in part)
    assert set(held.values()) == {1, 2}  # disjoint input: a copied record sits at exactly two hospitals
    assert [len(p) for p in overlap.apply_overlap(parts, 0.0, 5)] == [150] * 4
    assert [len(p) for p in overlap.apply_overlap([np.arange(5), np.arange(5, 8)], 0.5, 0)] == [5 + 2, 3 + 3]


def test_apply_overlap_skips_records_held_everywhere_and_rejects_bad_input():
    everything = [np.arange(10), np.arange(10)]
    assert all(np.array_equal(p, np.arange(10)) for p in overlap.apply_overlap(everything, 0.5, 0))
    with pytest.raises(UserError, match=r"must be in \[0, 1\), got 1.0"):
        overlap.apply_overlap(everything, 1.0, 0)
    with pytest.raises(UserError, match="at least 2 hospitals"):
        overlap.apply_overlap([np.arange(10)], 0.1, 0)
    assert overlap.overlap_ground_truth([np.arange(3), np.arange(2, 5), np.array([4, 9])]) == {2, 4}


# --------------------------------------------------------------------------- keyless variant (DH-based PSI)
PSI_RECORDS = 45
PSI_HOSPITALS = 3


def floor_pi_times_power_of_two(bits: int) -> int:
    """floor(2^bits * pi) by Machin's formula in integer arithmetic (64 guard bits)."""
    guard = 64
    one = 1 << (bits + guard)

    def arctan_inverse(x: int) -> int:
        total, term, n, sign = 0, one // x, 1, 1
        while term:
            total, term, n, sign = total + sign * (term // n), term // (x * x), n + 2, -sign
        return total

    return (4 * (4 * arctan_inverse(5) - arctan_inverse(239))) >> guard


def test_psi_group_is_rfc3526_group_14():
    # RFC 3526 defines the prime by this formula; the digits in the module must match it.
    assert psi.PSI_PRIME == 2**2048 - 2**1984 - 1 + 2**64 * (floor_pi_times_power_of_two(1918) + 124476)
    assert pow(2, psi.PSI_PRIME - 1, psi.PSI_PRIME) == 1
    h = psi.psi_hash_to_group(b"patient:P1")
    assert 1 < h < psi.PSI_PRIME - 1 and pow(h, psi.PSI_ORDER, psi.PSI_PRIME) == 1  # a square
    assert h != psi.psi_hash_to_group(b"patient:P2")


class Transcript:
    """Every value that crosses the RPC boundary, in order."""

    def __init__(self):
        self.messages: list = []

    def relay(self, hospital: psi.PsiHospital):
        def reblind(values):
            self.messages.append(("to hospital", list(values)))
            answer = hospital.reblind(values)
            self.messages.append(("from hospital", answer))
            return answer
        return reblind


@pytest.fixture(scope="module")
def psi_run():
    images = distinct_images(PSI_RECORDS, seed=2)
    parts = data.partition(np.zeros(PSI_RECORDS, dtype=np.int64), PSI_HOSPITALS, "iid", 0.5, seed=1)
    parts = {h: part for h, part in enumerate(overlap.apply_overlap(parts, FRACTION, seed=3), start=1)}
    record_ids = {h: identities.pixel_identities(images[part]) for h, part in parts.items()}
    hospitals = {h: psi.PsiHospital(ids) for h, ids in record_ids.items()}
    transcript = Transcript()
    first = {h: hospital.first_message() for h, hospital in hospitals.items()}
    transcript.messages.append(("first messages", first))
    token_lists = psi.psi_server_tokens(first, {h: transcript.relay(x) for h, x in hospitals.items()})
    return parts, record_ids, hospitals, transcript, token_lists


def test_psi_finds_the_known_overlap(psi_run):
    parts, _, _, _, token_lists = psi_run
    truth = overlap.overlap_ground_truth(list(parts.values()))
    assert len(truth) == PSI_HOSPITALS * 3  # 20% of 15 records per hospital
    drops, stats = removal.plan_removals(token_lists)
    kept = sorted(index for _, index in kept_records(parts, drops))
    assert kept == list(range(PSI_RECORDS))
    assert sorted(int(parts[h][p]) for h in drops for p in drops[h]) == sorted(truth)
    assert stats["duplicated_tokens"] == stats["dropped_total"] == len(truth)
    assert stats["pairs"] == {f"{i}-{j}": len(set(parts[i].tolist()) & set(parts[j].tolist()))
                              for i, j in itertools.combinations(parts, 2)}


def test_psi_tokens_do_not_depend_on_the_relay_order(psi_run):
    _, _, hospitals, _, token_lists = psi_run
    values = hospitals[2].first_message()[:3]
    for order in ([1, 3], [3, 1]):
        blinded = values
        for h in order:
            blinded = hospitals[h].reblind(blinded)
        assert [hashlib.sha256(v.to_bytes(psi.PSI_ELEMENT_BYTES, "big")).digest() for v in blinded] == token_lists[2][:3]


def test_psi_transcript_reveals_no_identity_and_no_secret(psi_run):
    _, record_ids, hospitals, transcript, _ = psi_run
    blob = pickle.dumps(transcript.messages)
    all_identities = [i for ids in record_ids.values() for i in ids]
    hashed = [psi.psi_hash_to_group(i) for i in all_identities]
    for identity in all_identities:
        for form in encodings(identity):
            assert form not in blob
    sent = {v for _, payload in transcript.messages
            for v in (itertools.chain(*payload.values()) if isinstance(payload, dict) else payload)}
    assert not sent & set(hashed)  # nothing unblinded crosses the wire
    for hospital in hospitals.values():
        secret = hospital._secret
        assert secret not in sent
        for form in encodings(secret.to_bytes((secret.bit_length() + 7) // 8, "big")) + [str(secret).encode()]:
            assert form not in blob
        pickled_form = secret.to_bytes(secret.bit_length() // 8 + 1, "little", signed=True)  # as pickle stores ints
        assert pickled_form not in blob


def test_psi_rejects_invalid_relayed_values():
    hospital = psi.PsiHospital([b"x" * 32])
    for bad in (0, 1, psi.PSI_PRIME - 1, psi.PSI_PRIME, "7"):
        with pytest.raises(PeerError, match="not a valid group element"):
            hospital.reblind([bad])
    with pytest.raises(PeerError, match="hospital 2 returned 0 values for 1"):
        psi.psi_server_tokens({1: hospital.first_message(), 2: []}, {1: hospital.reblind, 2: lambda values: []})
