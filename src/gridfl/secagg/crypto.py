"""The primitives of secure aggregation, all from ``cryptography``.

* key agreement: X25519 (raw 32-byte public keys);
* key derivation: HKDF-SHA256, bound to the session (process, cycle) and to a purpose, so
  a key agreed for one cycle or one use is worthless for another;
* share encryption: AES-256-GCM with a random 96-bit nonce, the routing header as
  associated data;
* mask PRG: the AES-256-CTR keystream under a 32-byte seed, read as little-endian uint64
  and reduced mod 2**b. AES-CTR is the PRG of Bonawitz et al.'s implementation, runs on
  AES-NI at several GB/s, and with a power-of-two modulus the reduction is a bit mask, so
  every value mod 2**b is exactly equally likely (no modulo bias). It replaces Flower's
  NumPy MT19937 seeded from 32 bits, which is neither a CSPRNG nor full-length keyed.

    >>> a, b = KeyPair.generate(), KeyPair.generate()
    >>> agree(a.private, b.public, b"s", b"p") == agree(b.private, a.public, b"s", b"p")
    True
    >>> mask(b"k" * 32, 3, 16).dtype
    dtype('uint64')
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from gridfl._exceptions import ProtocolError

KEY_BYTES = 32
NONCE_BYTES = 12

#: HKDF purposes: the pairwise mask seed and the share-encryption key never coincide
PURPOSE_MASK = b"gridfl secagg pairwise mask"
PURPOSE_SHARES = b"gridfl secagg share encryption"


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw bytes (the private key is Shamir-shared, so bytes)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        sk = X25519PrivateKey.generate()  # the OS CSPRNG
        raw = sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(raw, public_of(raw))


def public_of(private: bytes) -> bytes:
    sk = X25519PrivateKey.from_private_bytes(private)
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public(raw: bytes, what: str) -> bytes:
    """A peer's public key, refused when it is not 32 bytes or is a low-order point."""
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise ProtocolError(f"{what}: an X25519 public key is {KEY_BYTES} bytes")
    try:
        X25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise ProtocolError(f"{what}: not an X25519 public key: {e}") from None
    return raw


def agree(private: bytes, peer_public: bytes, session: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256(X25519(private, peer), session, purpose)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as e:  # an all-zero shared secret: a low-order peer key
        raise ProtocolError(f"key agreement failed: {e}") from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=session, info=purpose).derive(shared)


def seal(key: bytes, plaintext: bytes, header: bytes) -> bytes:
    """``nonce || AES-256-GCM(key, plaintext, aad=header)``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, header)


def open_sealed(key: bytes, sealed: bytes, header: bytes) -> bytes:
    if len(sealed) < NONCE_BYTES + 16:
        raise ProtocolError("an encrypted share is too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], header)
    except InvalidTag:
        raise ProtocolError(
            "an encrypted share does not authenticate (wrong sender, recipient, cycle or "
            "tampered bytes)"
        ) from None


def mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` values uniform mod 2**bits from the AES-256-CTR keystream under ``seed``."""
    out = np.zeros(length, np.uint64)
    add_masks(out, [(seed, 1)])
    if bits < 64:
        out &= np.uint64((1 << bits) - 1)
    return out


#: values per pass of :func:`add_masks` (256 KiB of uint64): a part of the vector this size
#: stays in the core's cache while every mask is added to it, instead of the whole vector
#: going through memory once per mask
MASK_CHUNK = 1 << 15


def add_masks(acc: np.ndarray, masks: Iterable[tuple[bytes, int]]) -> None:
    """``acc += sum(sign * PRG(seed) for seed, sign in masks)`` in place, mod 2**64, for a
    uint64 ``acc``.

    Each keystream is written straight into a uint64 buffer and added with wrap-around, a
    cache-sized part of ``acc`` at a time (each CTR stream continues where the last part
    ended), so a mask costs one AES pass and one add, with no copy or widening. Callers
    reduce mod 2**bits once at the end: 2**bits divides 2**64, so the result is the same
    as reducing every mask.

    >>> acc = np.zeros(3, np.uint64)
    >>> add_masks(acc, [(b"k" * 32, 1), (b"k" * 32, -1)])
    >>> acc.tolist()
    [0, 0, 0]
    """
    masks = list(masks)
    if any(len(seed) != KEY_BYTES for seed, _ in masks):
        raise ValueError("a mask seed is 32 bytes")
    if acc.dtype != np.uint64 or not acc.flags.c_contiguous:
        raise ValueError("masks are added to a contiguous uint64 vector")
    streams = [
        (Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor(), sign)
        for seed, sign in masks
    ]
    chunk = MASK_CHUNK
    # update_into wants block_size - 1 spare bytes; two spare uint64 words give them
    buf = np.empty(min(acc.size, chunk) + 2, np.uint64)
    out = buf.view(np.uint8).data
    for start in range(0, acc.size, chunk):
        part = acc[start : start + chunk]
        stream = buf[: part.size]
        for enc, sign in streams:
            if enc.update_into(_zeros(8 * part.size), out) != 8 * part.size:
                raise RuntimeError("AES-CTR keystream came out short")  # CTR is a stream mode
            if sys.byteorder != "little":
                stream.byteswap(inplace=True)
            if sign > 0:
                np.add(part, stream, out=part)
            else:
                np.subtract(part, stream, out=part)


_zero_block = memoryview(bytes(0))


def _zeros(size: int) -> memoryview:
    """``size`` zero bytes (the plaintext whose CTR encryption is the keystream), shared."""
    global _zero_block
    if len(_zero_block) < size:
        _zero_block = memoryview(bytes(size))
    return _zero_block[:size]
