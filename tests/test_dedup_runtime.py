"""Deduplication wired into split learning: the server removes exactly the copies --overlap made,
learns no identity or key, and bad keys or manifests stop the run with one line."""

import pickle

import pytest

from splitrpc import data, overlap
from splitrpc.dedup import identities
from splitrpc.config import parse_args
from splitrpc.split.hospital import Hospital

SYNTH = ["--dataset", "synthetic", "--synthetic-train", 900, "--synthetic-test", 64, "--model", "resnet20",
         "--width", 0.25, "--batch-size", 16, "--max-steps", 2, "--threads", 1, "--log-every", 100]


@pytest.fixture
def key_files(tmp_path):
    for h, key in ((1, "a" * 64), (2, "a" * 64), (3, "a" * 64), (4, "b" * 64)):
        (tmp_path / f"{h}.key").write_text(key + "\n")
    return tmp_path


def expected_duplicates(args, cache_dir):
    cfg = parse_args([*map(str, args), "--cache-dir", cache_dir])
    parts = data.shard_indices(cfg, data.load_split(cfg, "train").labels)
    return parts, overlap.overlap_ground_truth(parts)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["hmac", "psi"])
def test_split_run_keeps_exactly_one_copy_of_each_record(cli, cache_dir, key_files, mode):
    args = ["--method", "split", "--hospitals", 3, *SYNTH, "--overlap", 0.3, "--dedup", mode]
    if mode == "hmac":
        args += ["--dedup-key-file", key_files / "{hospital}.key"]
    result = cli(*args)
    assert result.returncode == 0, result
    record = result.records[0]
    parts, truth = expected_duplicates(["--hospitals", 3, *SYNTH, "--overlap", 0.3], cache_dir)
    d = record["dedup"]
    assert d["records_before"] == [len(p) for p in parts]
    assert d["dropped"] == len(truth) > 0  # every duplicate found, one copy of each kept
    assert sum(d["records_after"]) == 900  # nothing else dropped: every distinct record once
    # Balanced: each duplicate goes to its smaller holder (pairs of holders here, so within 1% rather than 1).
    assert max(d["records_after"]) - min(d["records_after"]) <= 3
    assert sum(d["stats"]["pairs"].values()) == len(truth)
    assert [h["train_samples"] for h in record["hospitals"]] == d["records_after"]
    assert d["training_bytes_saved_per_epoch"] == len(truth) * (2 * 4 * 32 * 32 * 4 + 1)
    phase = record["comm"]["phases"]["dedup"]
    payload = phase["payload_bytes"]
    assert payload["total"] > 0 and phase["tcp_bytes"]["total"] >= payload["total"]
    # Both ends count every protocol message: what the hospitals sent is what the server received, and back.
    hospitals = [name for name in payload if name.startswith("hospital")]
    assert sum(payload[h]["sent"] for h in hospitals) == payload["server"]["received"]
    assert sum(payload[h]["received"] for h in hospitals) == payload["server"]["sent"] > 0


@pytest.mark.distributed
def test_without_dedup_duplicates_are_trained_on(cli, cache_dir):
    result = cli("--method", "split", "--hospitals", 3, *SYNTH, "--overlap", 0.3)
    assert result.returncode == 0, result
    parts, truth = expected_duplicates(["--hospitals", 3, *SYNTH, "--overlap", 0.3], cache_dir)
    assert [h["train_samples"] for h in result.records[0]["hospitals"]] == [len(p) for p in parts]
    assert sum(len(p) for p in parts) == 900 + len(truth)


def test_what_the_server_receives_holds_no_identity_or_key(tmp_path, cache_dir):
    """The return values of the RPC-invoked methods are exactly what crosses to the server."""
    key_path = tmp_path / "k.key"
    key_hex = "0123456789abcdef" * 4
    key_path.write_text(key_hex)
    cfg = parse_args(["--hospitals", "2", *map(str, SYNTH), "--overlap", "0.2", "--dedup", "hmac",
                      "--dedup-key-file", str(key_path), "--cache-dir", cache_dir])
    hospital = Hospital(cfg, 1)
    record_ids = identities.pixel_identities(hospital.shard.images.numpy())
    message = hospital.dedup_message()
    wire = pickle.dumps(message)
    assert sorted(message) == ["key_check", "tokens"] and len(message["tokens"]) == len(record_ids)
    key = bytes.fromhex(key_hex)
    forbidden = [key, key_hex.encode(), key.hex().upper().encode()]
    for identity in record_ids[:50]:
        forbidden += [identity, identity.hex().encode()]
    raw = hospital.shard.images.numpy()
    forbidden += [raw[i].tobytes()[:64] for i in range(5)]  # pixels
    for needle in forbidden:
        assert needle not in wire
    psi_values = hospital.psi_first()
    wire = pickle.dumps(psi_values)
    for needle in forbidden:
        assert needle not in wire


@pytest.mark.parametrize("setup,pattern", [
    ("mismatch", r"hospitals? 4 holds? a different --dedup-key-file"),
    ("missing", r"key"),
    ("short", r"at least 16"),
])
def test_bad_keys_stop_with_one_line(cli, key_files, setup, pattern):
    import re

    if setup == "mismatch":
        key = key_files / "{hospital}.key"
    elif setup == "missing":
        key = key_files / "absent.key"
    else:
        (key_files / "short.key").write_text("abcd")
        key = key_files / "short.key"
    result = cli("--method", "split", "--hospitals", 4, *SYNTH, "--overlap", 0.2, "--dedup", "hmac",
                 "--dedup-key-file", key, timeout=120)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result


def test_malformed_manifest_stops_with_one_line(cli, tmp_path):
    from test_data import _make_tree

    _make_tree(tmp_path / "tree")
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,patient\nx,1\n")
    result = cli("--method", "split", "--dataset", "imagefolder", "--data-dir", tmp_path / "tree", "--dedup", "psi",
                 "--dedup-manifest", manifest, timeout=60)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "m.csv" in lines[0], result


def test_dedup_needs_split_and_a_key(cli):
    r = cli("--method", "ddp", "--dedup", "psi", timeout=60)
    assert r.returncode == 2 and "--dedup psi does not apply to --method ddp" in r.stderr
    r = cli("--method", "split", "--dedup", "hmac", timeout=60)
    assert r.returncode == 2 and "--dedup hmac needs --dedup-key-file" in r.stderr
