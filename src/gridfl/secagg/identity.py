"""Signed keys (Bonawitz et al., the active-adversary variant of round 1): when workers
authenticate, each signs the two public keys it advertises with an identity key, so that
a node cannot substitute keys of its own for a worker's.

The trust comes from the authority that issues the workers' auth tokens: it also issues
each worker a *credential*, an RS256 JWT for the audience ``gridfl-secagg`` that carries
the worker's Ed25519 identity public key in the ``secagg_key`` claim. A worker configured
with the authority's public key (got from the authority, never from the node) checks
every neighbour's credential and signature before it shares anything, and refuses a
roster with a forged, missing or repeated identity.

    >>> from cryptography.hazmat.primitives.asymmetric import rsa
    >>> authority = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    >>> key = new_signing_key()
    >>> token = issue_credential(authority, key, sub="alice")  # the authority's job
    >>> me = Identity(key, token)
    >>> sig = me.sign(b"cycle 1", "w1", b"c" * 32, b"m" * 32)
    >>> verifier = Verifier(public_pem(authority))
    >>> verifier.check(b"cycle 1", "w1", b"c" * 32, b"m" * 32, sig, token) == me.public_key
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gridfl import _messages
from gridfl._exceptions import ConfigError, ProtocolError

#: the audience of an identity credential: such a token is refused as an auth token (the
#: node's token check expects no audience), so forwarding it to neighbours lends no one
#: the right to authenticate as its worker
AUDIENCE = "gridfl-secagg"
#: the credential's claim that certifies a worker's Ed25519 identity key (base64, 32 bytes)
CLAIM = "secagg_key"
SIGNATURE_BYTES = 64
#: longest credential (a JWT) a message may carry
MAX_CREDENTIAL = 8192


def new_signing_key() -> bytes:
    """A fresh Ed25519 identity key (raw 32 bytes), from the OS CSPRNG."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def signed_bytes(session: bytes, worker_id: str, cipher_key: bytes, mask_key: bytes) -> bytes:
    """What a worker signs: its keys bound to this cycle and to its id in it."""
    return b"\0".join(
        (b"gridfl secagg keys v1", session, worker_id.encode(), cipher_key, mask_key)
    )


def issue_credential(authority: Any, signing_key: bytes, **claims: Any) -> str:
    """An RS256 credential certifying ``signing_key``'s public half (what the authority
    that authenticates workers issues; ``authority`` is its RSA private key)."""
    public = Identity(signing_key, "").public_key
    body = {**claims, "aud": AUDIENCE, CLAIM: _messages.b64encode(public)}
    return jwt.encode(body, authority, "RS256")


def public_pem(authority: Any) -> str:
    """The PEM of an RSA private key's public half (the workers' trust root)."""
    return (
        authority.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@dataclass(frozen=True)
class Identity:
    """A worker's identity: its Ed25519 signing key (raw 32 bytes) and the credential
    (a JWT from the authority) that certifies the public half."""

    signing_key: bytes
    credential: str

    def __post_init__(self) -> None:
        if not isinstance(self.signing_key, bytes) or len(self.signing_key) != 32:
            raise ConfigError("an identity signing key is 32 raw Ed25519 bytes")

    @classmethod
    def from_pem(cls, key_pem: bytes, credential: str) -> Identity:
        """An identity from an Ed25519 private key in PEM (PKCS#8, as ``openssl genpkey
        -algorithm ed25519`` writes it) and the authority's credential for it."""
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"the identity key is not an unencrypted PEM private key: {exc}"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"the identity key must be Ed25519, not {type(key).__name__}")
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        if not credential.strip():
            raise ConfigError("the identity credential is empty: use the JWT the authority issued")
        return cls(raw, credential.strip())

    @property
    def public_key(self) -> bytes:
        sk = Ed25519PrivateKey.from_private_bytes(self.signing_key)
        return sk.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, session: bytes, worker_id: str, cipher_key: bytes, mask_key: bytes) -> bytes:
        sk = Ed25519PrivateKey.from_private_bytes(self.signing_key)
        return sk.sign(signed_bytes(session, worker_id, cipher_key, mask_key))


def identity_key(claims: dict[str, Any]) -> bytes:
    """The Ed25519 public key a token's claims certify; ProtocolError without one."""
    raw = claims.get(CLAIM)
    try:
        key = _messages.b64decode(raw) if isinstance(raw, str) else b""
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ProtocolError(f"the credential has no {CLAIM!r} claim of 32 base64 bytes")
    return key


def check_signature(
    key: bytes, session: bytes, worker_id: str, cipher_key: bytes, mask_key: bytes, sig: bytes
) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(
            sig, signed_bytes(session, worker_id, cipher_key, mask_key)
        )
    except (InvalidSignature, ValueError):
        raise ProtocolError(
            f"the keys of worker {worker_id} are not signed by the identity its credential "
            "certifies (substituted or replayed keys)"
        ) from None


class Verifier:
    """A worker's trust root: the authority's RSA public key (PEM). :meth:`check` returns
    the identity key a neighbour's keys are signed with, or raises ProtocolError."""

    def __init__(self, issuer_key: str) -> None:
        try:
            self._key = serialization.load_pem_public_key(issuer_key.encode())
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"the authority's public key is not a PEM public key: {e}") from None

    def check(
        self,
        session: bytes,
        worker_id: str,
        cipher_key: bytes,
        mask_key: bytes,
        signature: bytes | None,
        credential: str | None,
    ) -> bytes:
        if signature is None or credential is None:
            raise ProtocolError(f"the keys of worker {worker_id} are not signed")
        try:
            claims = jwt.decode(
                credential,
                self._key,  # type: ignore[arg-type]
                algorithms=["RS256"],
                audience=AUDIENCE,
            )
        except jwt.PyJWTError as e:
            raise ProtocolError(
                f"the credential of worker {worker_id} is not the authority's: {e}"
            ) from None
        key = identity_key(claims)
        check_signature(key, session, worker_id, cipher_key, mask_key, signature)
        return key
