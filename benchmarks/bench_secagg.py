"""Secure aggregation's CPU cost per cycle, per worker and on the node, against the plain
report it replaces, for n workers and k neighbours (plain SecAgg: k = n - 1).

The protocol core (gridfl.secagg) runs in this one process for n simulated workers, with
no network and no database, so the figures are the protocol's own CPU. Side by side in the
same run, the plain path: the worker serializes its diff (``state.dumps``) and the node
parses it and folds it into the float32 running sum. Training is not included (it is the
same with and without secure aggregation; see bench_fl for a cycle's full time).

Printed per row: the worker's CPU per stage (mean over workers), the node's CPU per cycle,
and the ratios to the plain path. Models: McMahan's 2NN (199,210 parameters) and CNN
(1,663,370 parameters), as flat float32 diffs.

Then, in the same run, full cycles on a real node (:mod:`benchmarks.secagg_cycle`): cycle
time with and without secure aggregation, per-stage CPU on the worker and the node.

    python -m benchmarks.bench_secagg [--n 10 50 100] [--model 2nn cnn] [--all]
        [--part cpu cycle] [--transport http ws] [--train] [--durability report|cycle]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

MODELS = {"2nn": 199_210, "cnn": 1_663_370}


def _plain(length: int, n: int) -> tuple[float, float]:
    """(worker s, node s per cycle) of the plain report: dumps, then loads + fold."""
    from gridfl import state
    from gridfl.server import aggregate as agg

    rng = np.random.default_rng(0)
    diff = [(0.01 * rng.standard_normal(length)).astype(np.float32)]
    spec = agg.ModelSpec.of(diff)
    reps = 20  # one dumps is a millisecond or less: below the clock's resolution alone
    t = time.process_time()
    for _ in range(reps):
        blob = state.dumps(diff)
    worker = (time.process_time() - t) / reps
    total = agg.new_sum(spec)
    t = time.process_time()
    for _ in range(n):
        agg.fold(total, state.loads(blob), spec, weight=10)
    return worker, time.process_time() - t


def _secagg(length: int, n: int, k: int | None) -> dict[str, float]:
    """CPU seconds: each worker stage (mean per worker) and the node's cycle total."""
    from gridfl.secagg import NodeSession, SecAggParams, WorkerSession

    t_share = max(2, (k + 1) // 2 + 1 if k else n // 2 + 1)
    p = SecAggParams.from_config(
        {"threshold": t_share, "neighbours": k, "clipping_range": 0.5}, max_workers=n
    )
    rng = np.random.default_rng(1)
    ids = [f"w{i:03d}" for i in range(n)]
    node = NodeSession(p, b"bench", length + 1)
    cpu = {"advertise": 0.0, "share": 0.0, "masked": 0.0, "unmask": 0.0, "node": 0.0}
    diff = [(0.01 * rng.standard_normal(length)).astype(np.float32)]

    def timed(key, fn, *a):
        t = time.process_time()
        out = fn(*a)
        cpu[key] += time.process_time() - t
        return out

    workers = {}
    for u in ids:  # the session's key pairs are made for the advertisement
        workers[u] = timed("advertise", WorkerSession, p, u, b"bench")
        timed("node", node.add_keys, u, timed("advertise", workers[u].advertise))
    rosters = timed("node", node.close_stage)
    for u in ids:
        timed("node", node.add_shares, u, timed("share", workers[u].share_keys, rosters[u]))
    forwarded = timed("node", node.close_stage)
    for u in ids:
        msg = timed("masked", workers[u].masked_input, forwarded[u], diff, 10)
        timed("node", node.add_masked, u, msg)
    requests = timed("node", node.close_stage)
    for u in ids:
        timed("node", node.add_unmask, u, timed("unmask", workers[u].unmask, requests[u]))
    timed("node", node.close_stage)
    return {key: (v if key == "node" else v / n) for key, v in cpu.items()}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument(
        "--all", action="store_true", help="also plain SecAgg (k = n - 1) on the CNN at n >= 50"
    )
    ap.add_argument("--part", nargs="+", default=["cpu", "cycle"], choices=["cpu", "cycle"])
    ap.add_argument(
        "--transport", nargs="+", default=["http"], choices=["http", "ws"],
        help="the full cycles' worker transport (ws: masked inputs go as binary frames)",
    )
    ap.add_argument(
        "--train", action="store_true",
        help="full cycles: each worker trains its 600 MNIST examples (E = 1, B = 10) "
        "before it reports, instead of reporting a fixed diff",
    )
    ap.add_argument(
        "--durability", choices=["report", "cycle"], default="report",
        help="full cycles: server_config.durability of both processes (cycle: the running "
        "sums, and the masked sum, stay in the node's memory)",
    )
    args = ap.parse_args(argv)
    if "cpu" in args.part:
        _cpu_table(args)
    if "cycle" in args.part:
        from benchmarks import secagg_cycle

        for transport in args.transport:
            print(f"\nfull cycles on a node (gridfl serve, SQLite), simulated workers, "
                  f"{transport.upper()}{', local training' if args.train else ''}, "
                  f"durability {args.durability!r}:")
            secagg_cycle.main(ns=tuple(args.n), models=tuple(args.model), transport=transport,
                              train=args.train, durability=args.durability)


def _cpu_table(args) -> None:
    head = (
        f"{'model':5} {'n':>4} {'k':>4} | {'adv ms':>7} {'share ms':>8} {'mask ms':>8} "
        f"{'unmask ms':>9} {'worker ms':>9} {'x plain':>7} | {'node s':>7} {'x plain':>7}"
    )
    print(head)
    print("-" * len(head))
    for model in args.model:
        length = MODELS[model] + 1
        for n in args.n:
            plain_w, plain_node = _plain(length - 1, n)
            log_k = 2 * math.ceil(math.log2(n) / 2)
            for k in (log_k, None):
                if k is None and model == "cnn" and n >= 50 and not args.all:
                    continue
                c = _secagg(length - 1, n, k)
                worker = c["advertise"] + c["share"] + c["masked"] + c["unmask"]
                print(
                    f"{model:5} {n:>4} {('all' if k is None else k):>4} | "
                    f"{1e3 * c['advertise']:7.2f} {1e3 * c['share']:8.2f} "
                    f"{1e3 * c['masked']:8.1f} {1e3 * c['unmask']:9.2f} "
                    f"{1e3 * worker:9.1f} {worker / plain_w:7.1f} | "
                    f"{c['node']:7.2f} {c['node'] / plain_node:7.1f}",
                    flush=True,
                )
    print(
        "\nworker ms: the worker's protocol CPU; x plain: over serializing its diff for a plain"
        "\nreport. node s: the node's protocol CPU per cycle; x plain: over parsing and folding"
        "\nn plain reports. k: neighbours (~log2 n, even; all = plain SecAgg)."
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
