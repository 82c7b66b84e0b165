"""The stage messages of secure aggregation, typed once for node and worker.

Each has ``to_json()`` (a JSON object; bytes as base64) and ``from_json()``, which refuses
a malformed message with :class:`~gridfl.ProtocolError` naming the field.

    >>> m = AdvertiseKeys(cipher_key=b"c" * 32, mask_key=b"m" * 32)
    >>> AdvertiseKeys.from_json(m.to_json()) == m
    True
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from gridfl import _messages
from gridfl._exceptions import ProtocolError
from gridfl.secagg import crypto, identity, shamir

#: the four stages, in order; a message names its stage and the receiver checks it
ADVERTISE, SHARE, MASKED, UNMASK = "advertise_keys", "share_keys", "masked_input", "unmask"
STAGES = (ADVERTISE, SHARE, MASKED, UNMASK)

#: one encrypted share: nonce, x (4 bytes), two share values, GCM tag
SEALED_SHARE_BYTES = crypto.NONCE_BYTES + 4 + 2 * shamir.SHARE_BYTES + 16
MAX_ID = 255


def _bytes(data: dict, key: str, size: int | None = None) -> bytes:
    value = data.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{key}: expected base64 text")
    try:
        raw = _messages.b64decode(value)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{key}: not valid base64") from None
    _check_size(key, raw, size)
    return raw


def _check_size(key: str, raw: bytes | memoryview, size: int | None) -> None:
    if size is not None and len(raw) != size:
        raise ProtocolError(f"{key}: expected {size} bytes, got {len(raw)}")


def _b64(raw: bytes | memoryview) -> str:
    return _messages.b64encode(raw)


def _ids(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) and 0 < len(v) <= MAX_ID for v in value
    ):
        raise ProtocolError(f"{key}: expected a list of worker ids")
    if len(set(value)) != len(value):
        raise ProtocolError(f"{key}: lists a worker twice")
    return value


def _id_map(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(0 < len(k) <= MAX_ID for k in value):
        raise ProtocolError(f"{key}: expected an object keyed by worker id")
    return value


def _obj(data: Any) -> dict:
    if not isinstance(data, dict):
        raise ProtocolError("a secure-aggregation message is a JSON object")
    return data


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 1, worker -> node: the worker's two X25519 public keys for this cycle
    (``cipher_key`` to encrypt shares to it, ``mask_key`` for pairwise masks), and, when
    workers authenticate, its Ed25519 ``signature`` over them and the ``credential`` (auth
    token) certifying its identity key (:mod:`gridfl.secagg.identity`)."""

    cipher_key: bytes
    mask_key: bytes
    signature: bytes | None = None
    credential: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cipher_key": _b64(self.cipher_key), "mask_key": _b64(self.mask_key)}
        if self.signature is not None:
            out["signature"] = _b64(self.signature)
            out["credential"] = self.credential
        return out

    @classmethod
    def from_json(cls, data: Any) -> AdvertiseKeys:
        d = _obj(data)
        signature = credential = None
        if d.get("signature") is not None or d.get("credential") is not None:
            signature = _bytes(d, "signature", identity.SIGNATURE_BYTES)
            credential = d.get("credential")
            top = identity.MAX_CREDENTIAL
            if not isinstance(credential, str) or not 0 < len(credential) <= top:
                raise ProtocolError(
                    f"credential: expected the identity credential (text of at most {top} "
                    "characters) next to the signature"
                )
        return cls(
            crypto.check_public(_bytes(d, "cipher_key"), "cipher_key"),
            crypto.check_public(_bytes(d, "mask_key"), "mask_key"),
            signature,
            credential,
        )


@dataclass(frozen=True)
class Roster:
    """Stage 2, node -> worker: its neighbours' advertised keys (with their signatures
    and credentials when workers authenticate)."""

    neighbours: dict[str, AdvertiseKeys]

    def to_json(self) -> dict[str, Any]:
        return {"neighbours": {k: v.to_json() for k, v in sorted(self.neighbours.items())}}

    @classmethod
    def from_json(cls, data: Any) -> Roster:
        raw = _id_map(_obj(data).get("neighbours"), "neighbours")
        out = {}
        for wid, keys in raw.items():
            try:
                out[wid] = AdvertiseKeys.from_json(keys)
            except ProtocolError as e:
                raise ProtocolError(f"neighbours.{wid}: {e}") from None
        return cls(out)


@dataclass(frozen=True)
class EncryptedShares:
    """Stage 2, worker -> node: ``recipient -> sealed share`` (ShareKeys); stage 3, node ->
    worker: ``sender -> sealed share``, the ones addressed to it. The node cannot open them."""

    shares: dict[str, bytes]

    def to_json(self) -> dict[str, Any]:
        return {"shares": {k: _b64(v) for k, v in sorted(self.shares.items())}}

    @classmethod
    def from_json(cls, data: Any) -> EncryptedShares:
        raw = _id_map(_obj(data).get("shares"), "shares")
        return cls({k: _bytes(raw, k, SEALED_SHARE_BYTES) for k in raw})


@dataclass(frozen=True)
class MaskedInput:
    """Stage 3, worker -> node: the masked input vector mod 2**b, each value sent in
    ceil(b/8) little-endian bytes (a 40-bit field costs 5 bytes per parameter, not 8).

    >>> m = MaskedInput(np.array([1, 2**39], np.uint64), bits=40)
    >>> len(_messages.b64decode(m.to_json()["vector"]))
    10
    >>> MaskedInput.from_json(m.to_json(), 2, 40) == m
    True
    """

    vector: np.ndarray
    bits: int = 64

    def to_json(self) -> dict[str, Any]:
        return {"vector": _b64(self.packed())}

    def packed(self) -> memoryview:
        """The vector as it travels: ``ceil(b/8)`` little-endian bytes per value."""
        return pack_values(self.vector, value_bytes(self.bits))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskedInput) and np.array_equal(self.vector, other.vector)

    @classmethod
    def from_json(cls, data: Any, length: int, bits: int) -> MaskedInput:
        size = value_bytes(bits)
        raw = _obj(data).get("vector")
        if isinstance(raw, (bytes, memoryview)):
            # decoded by the node's reader straight from the body, or a binary frame's
            _check_size("vector", raw, size * length)
        else:
            raw = _bytes(data, "vector", size * length)
        vec = unpack_values(raw, size)
        if bits < 64 and vec.size and int(vec.max()) >> bits:
            raise ProtocolError(f"vector: a value is not below 2^{bits}")
        return cls(vec, bits)


def _groups(size: int) -> tuple[np.dtype, list[tuple[str, int]]]:
    """A value of ``size`` little-endian bytes as fields of 8, 4, 2 and 1 bytes (and
    each field's name and byte offset), so that packing and unpacking run as a few
    whole-array casts (a field of 5 bytes copied one value at a time cost 3x as much)."""
    fields, formats, at = [], [], 0
    for width in (8, 4, 2, 1):
        if size - at >= width:
            fields.append((f"b{at}", at))
            formats.append(f"<u{width}")
            at += width
    names = [name for name, _ in fields]
    offsets = [offset for _, offset in fields]
    layout = {"names": names, "formats": formats, "offsets": offsets, "itemsize": size}
    return np.dtype(layout), fields  # type: ignore[call-overload]


#: values per pass of packing and unpacking: a part's temporaries stay in the core's cache
_CHUNK = 1 << 15


def pack_values(vector: np.ndarray, size: int) -> memoryview:
    """The low ``size`` bytes of each value, little-endian, back to back (a view of the
    one buffer they are written into: the vector can be model-sized).

    >>> pack_values(np.array([0x0102030405, 7], np.uint64), 5).hex()
    '05040302010700000000'
    """
    vector = np.asarray(vector, np.uint64)
    layout, fields = _groups(size)
    out = np.empty(vector.shape, layout)
    shifted = np.empty(min(vector.size, _CHUNK), np.uint64)
    for start in range(0, vector.size, _CHUNK):  # a cache-sized part at a time
        part, dst = vector[start : start + _CHUNK], out[start : start + _CHUNK]
        for name, at in fields:  # the field at byte offset k holds the value >> 8k, truncated
            if at:
                dst[name] = np.right_shift(part, np.uint64(8 * at), out=shifted[: part.size])
            else:
                dst[name] = part
    return out.view(np.uint8).data


def unpack_values(raw: bytes | memoryview, size: int) -> np.ndarray:
    """The values :func:`pack_values` packed, as uint64.

    >>> unpack_values(bytes.fromhex('05040302010700000000'), 5).tolist()
    [4328719365, 7]
    """
    layout, fields = _groups(size)
    packed = np.frombuffer(raw, layout)
    vec = np.empty(packed.size, np.uint64)
    field = np.empty(min(packed.size, _CHUNK), np.uint64)
    for start in range(0, packed.size, _CHUNK):  # a cache-sized part at a time
        src, part = packed[start : start + _CHUNK], vec[start : start + _CHUNK]
        part[...] = src[fields[0][0]]
        for name, at in fields[1:]:
            shifted = field[: part.size]
            shifted[...] = src[name]
            shifted <<= np.uint64(8 * at)
            part |= shifted
    return vec


def value_bytes(bits: int) -> int:
    """Bytes per value of a masked vector in a field of ``bits`` bits."""
    return (bits + 7) // 8


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4, node -> worker: which of its neighbours survived (their self-mask seeds
    are wanted) and which dropped after sharing (their mask keys are wanted)."""

    survivors: list[str]
    dropped: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"survivors": sorted(self.survivors), "dropped": sorted(self.dropped)}

    @classmethod
    def from_json(cls, data: Any) -> UnmaskRequest:
        d = _obj(data)
        return cls(_ids(d.get("survivors"), "survivors"), _ids(d.get("dropped"), "dropped"))


@dataclass(frozen=True)
class UnmaskShares:
    """Stage 4, worker -> node: ``id -> (x, y)`` shares of survivors' self-mask seeds and
    of dropped workers' mask keys."""

    seed_shares: dict[str, shamir.Share]
    key_shares: dict[str, shamir.Share]

    def to_json(self) -> dict[str, Any]:
        def enc(m):
            return {k: [x, _b64(shamir.encode_y(y))] for k, (x, y) in sorted(m.items())}

        return {"seed_shares": enc(self.seed_shares), "key_shares": enc(self.key_shares)}

    @classmethod
    def from_json(cls, data: Any) -> UnmaskShares:
        d = _obj(data)

        def dec(key: str) -> dict[str, shamir.Share]:
            out = {}
            for wid, pair in _id_map(d.get(key), key).items():
                if (
                    not isinstance(pair, list)
                    or len(pair) != 2
                    or isinstance(pair[0], bool)
                    or not isinstance(pair[0], int)
                    or not 0 < pair[0] < 1 << 31
                ):
                    raise ProtocolError(f"{key}.{wid}: expected [index, base64 share]")
                y = shamir.decode_y(_bytes({"y": pair[1]}, "y", shamir.SHARE_BYTES))
                out[wid] = (pair[0], y)
            return out

        return cls(dec("seed_shares"), dec("key_shares"))
