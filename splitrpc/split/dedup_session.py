"""Deduplication before training, both sides (``--dedup hmac`` or ``psi``): the hospitals send keyed
tokens (or doubly blinded group values) of their records' identities; the server decides which
copies go without seeing an identity, a pixel or a key; each hospital drops its own.

``ServerDedup`` and ``HospitalDedup`` are mixed into ``Server`` and ``Hospital``; the
cryptography is ``splitrpc.dedup``.
"""

from __future__ import annotations

import time

from splitrpc.dedup import hmac_tokens, identities, psi, removal
from splitrpc.split.protocol import key_file


class ServerDedup:
    """The server's side: one round of tokens (hmac) or of relayed blindings (psi), then the removal plan."""

    def deduplicate(self) -> dict:
        """Before training: keep exactly one copy of every record that several hospitals hold.

        The server sees keyed tokens (or, keyless, doubly blinded group values)
        and decides which copies go; it never sees an identity, a pixel or a key.
        """
        cfg, hospitals, ids = self.cfg, self.hospitals, self.hospitals.live
        started = time.perf_counter()
        self.switch_phase("dedup")
        before = [i["train_samples"] for i in self.info]

        def call(h, method, *args):
            # Bounded by --setup-timeout: tokens for a large shard take a while to compute.
            return hospitals.wait(h, hospitals.call_async(h, method, *args, timeout=cfg.setup_timeout))

        if cfg.dedup == "hmac":
            futures = {h: hospitals.call_async(h, "dedup_message", timeout=cfg.setup_timeout) for h in ids}
            messages = {h: hospitals.wait(h, f) for h, f in futures.items()}
            drops, stats = hmac_tokens.server_plan(messages)
        else:
            firsts = {h: call(h, "psi_first") for h in ids}
            tokens = psi.psi_server_tokens(firsts, {h: (lambda values, h=h: call(h, "psi_reblind", values))
                                                      for h in ids})
            drops, stats = removal.plan_removals(tokens)
        self.info = [call(h, "dedup_drop", drops.get(h, [])) for h in ids]
        self.switch_phase("setup")
        per_sample = sum(self.bytes.batch(cfg.batch_size)) / cfg.batch_size  # a step's messages, per sample
        dropped = sum(before) - sum(i["train_samples"] for i in self.info)
        return {
            "mode": cfg.dedup,
            "identity": "manifest" if cfg.dedup_manifest else "pixels",
            "records_before": before,
            "records_after": [i["train_samples"] for i in self.info],
            "dropped": dropped,
            "stats": stats,
            "seconds": time.perf_counter() - started,
            "training_bytes_saved_per_epoch": dropped * per_sample,
        }


class HospitalDedup:
    """A hospital's side: its records' identities, tokens or blinded values, and the removal."""

    def _identities(self) -> list[bytes]:
        """A record's identity: its patient from the manifest, else the digest of its decoded pixels."""
        if self.cfg.dedup_manifest:
            manifest = identities.read_manifest(self.cfg.dedup_manifest)
            return identities.manifest_identities([str(n) for n in self.shard.names], manifest)
        return identities.pixel_identities(self.shard.images.numpy())

    def dedup_message(self) -> dict:
        """Keyed tokens of this shard's records and the key check: all the server gets (no key, no identity)."""
        return hmac_tokens.hospital_message(hmac_tokens.load_key(key_file(self.cfg, self.index)), self._identities())

    def psi_first(self) -> list[int]:
        """Keyless variant: this shard's identities blinded by this hospital's secret exponent."""
        self.psi = psi.PsiHospital(self._identities())
        return self.psi.first_message()

    def psi_reblind(self, values: list[int]) -> list[int]:
        """Keyless variant: add this hospital's blinding to another hospital's list, relayed by the server."""
        return self.psi.reblind(values)

    def dedup_drop(self, positions: list[int]) -> dict:
        """Drop the copies the server assigned elsewhere; return the new sizes."""
        with self.lock:
            self.shard.drop(positions)
            self.dropped = list(positions)
        self.psi = None
        return self.describe()
