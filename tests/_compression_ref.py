"""Independent numpy references of the compressed-diff encodings (written from their
formulas in docs/protocol.md, not from gridfl.compression): each returns the dequantized
diff a node should fold in, tensor by tensor, in float64."""

from __future__ import annotations

import math

import numpy as np


def ref_float16(arrays):
    return [a.astype(np.float16).astype(np.float64) for a in arrays]


def ref_int8(arrays):
    out = []
    for a in arrays:
        a = a.astype(np.float64)
        scale = np.float32(np.max(np.abs(a)) / 127.0)
        q = np.clip(np.round(a / float(scale)), -127, 127) if scale > 0 else np.zeros_like(a)
        out.append(q * float(scale))
    return out


def ref_topk(arrays, fraction):
    flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    k = max(1, math.ceil(fraction * flat.size - 1e-9))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    sparse = np.zeros_like(flat)
    sparse[keep] = flat[keep]
    out, off = [], 0
    for a in arrays:
        out.append(sparse[off : off + a.size].reshape(a.shape))
        off += a.size
    return out
