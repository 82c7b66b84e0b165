"""Shamir's t-of-n secret sharing over the prime field GF(2**521 - 1).

A secret of up to 64 bytes is one field element; a share is ``(x, y)`` with ``x`` in
1..n the recipient's index and ``y = f(x)`` for a random polynomial ``f`` of degree
``t - 1`` with ``f(0) = secret``. Any ``t`` shares give back the secret by Lagrange
interpolation at 0; fewer reveal nothing about it (every value of ``f(0)`` is equally
likely). The prime is the Mersenne prime 2**521 - 1, so 32-byte secrets (a self-mask seed,
an X25519 private key) fit in one element with no chunking or padding.

    >>> shares = split(b"0123456789abcdef0123456789abcdef", threshold=3, count=5)
    >>> combine(shares[1:4], size=32)
    b'0123456789abcdef0123456789abcdef'
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from gridfl._exceptions import ProtocolError

#: the field's prime, the Mersenne prime 2**521 - 1
PRIME = (1 << 521) - 1
#: bytes of a share's ``y`` on the wire (521 bits)
SHARE_BYTES = 66
#: longest secret one field element holds
MAX_SECRET_BYTES = 64

Share = tuple[int, int]


def split(secret: bytes, threshold: int, count: int) -> list[Share]:
    """``count`` shares of ``secret``, any ``threshold`` of which recover it; share ``i``
    (0-based) has ``x = i + 1``."""
    if not 1 <= threshold <= count:
        raise ValueError(f"need 1 <= threshold <= count; got {threshold} of {count}")
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"a secret holds at most {MAX_SECRET_BYTES} bytes")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [(x, _evaluate(coeffs, x)) for x in range(1, count + 1)]


def combine(shares: Sequence[Share], size: int) -> bytes:
    """The ``size``-byte secret from at least ``threshold`` distinct shares.

    With fewer shares than the threshold the result is a random value, not the secret:
    the caller must know it holds enough (the protocol counts them before combining).
    """
    xs = [x for x, _ in shares]
    if not shares or len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ProtocolError("shares to combine must have distinct indexes in 1..p-1")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, (xj, _) in enumerate(shares):
            if j != i:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise ProtocolError("the shares do not combine into a secret of this size")
    return secret.to_bytes(size, "big")


def encode_y(y: int) -> bytes:
    """A share's ``y`` as :data:`SHARE_BYTES` big-endian bytes."""
    return y.to_bytes(SHARE_BYTES, "big")


def decode_y(raw: bytes) -> int:
    y = int.from_bytes(raw, "big")
    if len(raw) != SHARE_BYTES or y >= PRIME:
        raise ProtocolError("a share value is not an element of the field")
    return y


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc
