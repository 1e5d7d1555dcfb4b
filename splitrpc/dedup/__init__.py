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

Where it lives (importers name the submodule they use):

* ``splitrpc.dedup.identities``: a record's identity, from its pixels or from a
  patient manifest (step 1);
* ``splitrpc.dedup.hmac_tokens``: the shared key, HMAC tokens, the key check and
  the message a hospital sends, and the server's validation of those messages
  (step 2 and the start of 3);
* ``splitrpc.dedup.removal``: ``plan_removals``, which copies to drop (step 3);
* ``splitrpc.dedup.psi``: the keyless variant, a Diffie-Hellman private set
  intersection whose tokens go to the same ``plan_removals``.

The synthetic overlap of ``--overlap`` experiments (records copied between
hospitals to make duplicates) is part of the data layer: ``splitrpc.overlap``.
"""
