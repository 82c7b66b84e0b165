"""The mask PRG written into the sum in place (gridfl.secagg.crypto.add_masks), checked
against an independent reference: the AES-256 block cipher applied to the counter blocks
0, 1, 2, ... (what CTR mode is by definition), with the sums done in Python integers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gridfl.secagg import crypto
from gridfl.secagg.worker import add_masks, mask_sign


def reference_mask(seed: bytes, length: int, bits: int) -> list[int]:
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    blocks = (length * 8 + 15) // 16
    stream = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(blocks)))
    words = [int.from_bytes(stream[8 * i : 8 * i + 8], "little") for i in range(length)]
    return [w % (1 << bits) for w in words]


@pytest.mark.parametrize("length", [0, 1, 2, 3, 17, 1001])
@pytest.mark.parametrize("bits", [16, 40, 64])
def test_mask_is_the_aes_ctr_keystream_mod_2_to_the_bits(length, bits):
    seed = os.urandom(32)
    assert crypto.mask(seed, length, bits).tolist() == reference_mask(seed, length, bits)


def reference_sum(start: list[int], masks: list[tuple[bytes, int]]) -> list[int]:
    expected = list(start)
    for seed, sign in masks:
        m = reference_mask(seed, len(start), 64)
        expected = [(e + sign * x) % (1 << 64) for e, x in zip(expected, m, strict=True)]
    return expected


def test_add_masks_adds_and_subtracts_with_wrap_around():
    masks = [(os.urandom(32), sign) for sign in (1, -1, 1, -1)]
    start = [0, 1, (1 << 64) - 1, 12345, 1 << 63]
    acc = np.array(start, np.uint64)
    crypto.add_masks(acc, masks)
    assert acc.tolist() == reference_sum(start, masks)


@pytest.mark.parametrize("length", [7, 8, 9, 17])
def test_add_masks_continues_each_keystream_across_chunks(monkeypatch, length):
    # chunks of 4 values (two AES blocks): the parts must join into one keystream per seed
    monkeypatch.setattr(crypto, "MASK_CHUNK", 4)
    masks = [(os.urandom(32), 1), (os.urandom(32), -1), (os.urandom(32), 1)]
    start = [int(x) for x in np.random.default_rng(length).integers(0, 1 << 63, length)]
    acc = np.array(start, np.uint64)
    crypto.add_masks(acc, masks)
    assert acc.tolist() == reference_sum(start, masks)


def test_add_masks_over_a_vector_longer_than_a_chunk():
    length = 2 * crypto.MASK_CHUNK + 3
    masks = [(os.urandom(32), 1), (os.urandom(32), -1)]
    acc = np.zeros(length, np.uint64)
    crypto.add_masks(acc, masks)
    assert acc.tolist() == reference_sum([0] * length, masks)


def test_add_masks_is_the_masked_input_of_the_paper():
    bits, me = 40, "w2"
    vec = np.array([3, (1 << 40) - 1, 0, 7], np.uint64)
    seed = os.urandom(32)
    pairs = {"w1": os.urandom(32), "w3": os.urandom(32), "w9": os.urandom(32)}
    expected = [int(v) for v in vec]
    for s, sign in [(seed, 1)] + [(p, mask_sign(me, o)) for o, p in pairs.items()]:
        m = reference_mask(s, vec.size, bits)
        expected = [(e + sign * x) % (1 << bits) for e, x in zip(expected, m, strict=True)]
    add_masks(vec, seed, pairs, me, bits)  # in place
    assert vec.tolist() == expected


def test_add_masks_refuses_what_it_cannot_add_into():
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.add_masks(np.zeros(3, np.uint64), [(os.urandom(32), 1), (b"short", 1)])
    with pytest.raises(ValueError, match="uint64"):
        crypto.add_masks(np.zeros(3, np.int64), [(os.urandom(32), 1)])
    with pytest.raises(ValueError, match="uint64"):
        crypto.add_masks(np.zeros(6, np.uint64)[::2], [(os.urandom(32), 1)])


@pytest.mark.parametrize("bits", [8, 12, 16, 20, 24, 32, 40, 48, 56, 64])
@pytest.mark.parametrize("chunk", [3, 1 << 15])
def test_masked_vector_travels_in_the_low_bytes_of_each_value(monkeypatch, bits, chunk):
    from gridfl._messages import b64decode
    from gridfl.secagg import messages
    from gridfl.secagg.messages import MaskedInput, value_bytes

    monkeypatch.setattr(messages, "_CHUNK", chunk)  # 3: the 54 values cross many parts
    size = value_bytes(bits)
    rng = np.random.default_rng(bits)
    drawn = [int(v) >> (64 - bits) for v in rng.integers(0, 2**63, 50, np.uint64) << 1]
    values = [0, 1, (1 << bits) - 1, (1 << (bits - 1)) + 12345 % (1 << (bits - 1)), *drawn]
    packed = b"".join(v.to_bytes(size, "little") for v in values)
    msg = MaskedInput(np.array(values, np.uint64), bits)
    assert b64decode(msg.to_json()["vector"]) == packed
    assert MaskedInput.from_json(msg.to_json(), len(values), bits).vector.tolist() == values


def test_only_the_masked_vector_may_come_as_bytes():
    """The node's reader hands the masked vector over decoded; any other field as bytes
    (which no JSON body makes) is refused, as is a vector of the wrong size."""
    from gridfl._exceptions import ProtocolError
    from gridfl.secagg.messages import AdvertiseKeys, MaskedInput

    vec = np.array([5, 1 << 39], np.uint64)
    raw = b"".join(int(v).to_bytes(5, "little") for v in vec)
    assert MaskedInput.from_json({"vector": raw}, 2, 40).vector.tolist() == vec.tolist()
    with pytest.raises(ProtocolError, match="expected 10 bytes, got 5"):
        MaskedInput.from_json({"vector": raw[:5]}, 2, 40)
    with pytest.raises(ProtocolError, match="cipher_key: expected base64 text"):
        AdvertiseKeys.from_json({"cipher_key": b"c" * 32, "mask_key": "bQ=="})


def test_a_masked_vector_of_the_wrong_length_or_too_large_is_refused():
    from gridfl._exceptions import ProtocolError
    from gridfl.secagg.messages import MaskedInput

    wire = MaskedInput(np.array([1, 2, 3], np.uint64), 40).to_json()
    with pytest.raises(ProtocolError, match="expected 20 bytes, got 15"):
        MaskedInput.from_json(wire, 4, 40)
    with pytest.raises(ProtocolError, match="not below 2\\^36"):  # 5 bytes, 36-bit field
        MaskedInput.from_json(MaskedInput(np.array([1 << 36], np.uint64), 40).to_json(), 1, 36)
