"""The keyless variant of deduplication: a Diffie-Hellman private set intersection.

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
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

from splitrpc.errors import PeerError

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
