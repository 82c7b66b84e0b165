"""A worker's masks for secure aggregation: 1 + k AES-256-CTR streams of the model's
length added into its input, as gridfl does it (keystream written into a reused uint64
buffer, added in place a cache-sized part at a time, one reduction mod 2**b) side by
side with the straightforward way (a fresh keystream per mask, copied to uint64,
reduced, added into a new vector).

    python -m benchmarks.bench_secagg_masks
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from benchmarks.secagg_cycle import SHAPES
from gridfl.secagg.worker import add_masks

BITS = 40
K = 8  # k ~ log2(100), the SecAgg+ neighbours at n = 100


def straightforward(vec: np.ndarray, seeds: list[bytes], bits: int) -> np.ndarray:
    out = vec
    for i, seed in enumerate(seeds):
        enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
        stream = enc.update(bytes(8 * vec.size)) + enc.finalize()
        m = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
        m &= np.uint64((1 << bits) - 1)
        out = out + m if i % 2 == 0 else out - m
    return out & np.uint64((1 << bits) - 1)


def best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1000 * min(times)


def main(argv: list[str]) -> None:
    print(f"a worker's 1 + k = {1 + K} masks, field {BITS} bits, best CPU ms of repeated runs")
    print(f"{'model':5} {'params':>9} | {'in place':>8} {'before':>8} {'ratio':>6}")
    for model, shapes in SHAPES.items():
        length = sum(int(np.prod(s)) for s in shapes)
        vec = np.random.default_rng(0).integers(0, 1 << BITS, length, dtype=np.uint64)
        seed, pairs = os.urandom(32), {f"w{i}": os.urandom(32) for i in range(K)}
        seeds = [seed, *pairs.values()]
        repeat = 20 if length < 10**6 else 5
        new = best_ms(lambda: add_masks(vec, seed, pairs, "w", BITS), repeat)  # noqa: B023
        old = best_ms(lambda: straightforward(vec, seeds, BITS), repeat)  # noqa: B023
        print(f"{model:5} {length:>9,} | {new:8.2f} {old:8.2f} {old / new:5.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
