"""The node's CPU per report next to the floor, in one process
(``python -m benchmarks.bench_report_path [--reports K]``).

For the McMahan CNN (1,663,370 float32 parameters) and the 2NN (784-200-200-10,
199,210), each report goes through the node's real code path: the HTTP JSON body (base64
diff) or a binary WebSocket frame's header and payload, :func:`parse_report`,
:meth:`GridNode.report` (State decode, validation, fold, the SQLite transaction), on a
real SQLite file, with ``durability`` ``"report"`` (running sums written with each
report) and ``"cycle"`` (in memory until the cycle completes). The cycle's goal is one
report more than the reports sent, so no checkpoint is written inside the timed loop.
The reports carry no ``num_samples`` unless ``--num-samples`` gives one (the gridfl
worker sends it; the node then folds ``num_samples x diff``).

The floor is what a report cannot avoid: decoding the same bytes (base64 for the JSON
body; nothing for the binary frame) into float32 views, plus
``np.add(acc, diff, out=acc)`` per tensor, both memory-bound.
Figures are process CPU time (``time.process_time``) per report, medians of rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pybase64

from benchmarks.bench_server import CNN_SHAPES, plan_bytes
from gridfl import _messages, state
from gridfl.server import GridNode, Settings
from gridfl.server.bodies import parse_worker_json

TWO_NN_SHAPES = [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)]


def _floor(payload: bytes, base64: bool, where: list[tuple[int, int, int]], acc) -> None:
    """Decode, then add each tensor (a float32 view of the decoded bytes) into ``acc``."""
    raw = pybase64.b64decode(payload, validate=True) if base64 else payload
    for offset, count, at in where:
        view = acc[at : at + count]
        np.add(view, np.frombuffer(raw, np.float32, count=count, offset=offset), out=view)


def _tensor_offsets(blob: bytes, diff) -> list[tuple[int, int, int]]:
    """(byte offset in the State, count, offset in the flat sum) of each tensor's values,
    found once: the State's structure is a few dozen bytes per tensor."""
    out, at = [], 0
    for a in diff:
        out.append((blob.find(a.tobytes()), a.size, at))
        at += a.size
    return out


def _host(node: GridNode, name: str, shapes, k: int, durability: str | None) -> None:
    rng = np.random.default_rng(1)
    params = [(0.05 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    cfg: dict = {"max_workers": k + 1, "max_diffs": k + 1, "cycle_length": 3600}
    if durability is not None:
        cfg["durability"] = durability
    node.host(
        {
            "client_config": {"name": name, "version": "1", "lr": 0.05, "batch_size": 10},
            "server_config": cfg,
            "model": _messages.b64encode(state.dumps(params)),
            "plans": {"training_plan": _messages.b64encode(plan_bytes(shapes))},
        }
    )


def _seats(node: GridNode, name: str, k: int) -> list[tuple[str, str]]:
    """k accepted workers, each having downloaded the model as a worker does before it
    trains (which loads the checkpoint into the node's cache once per cycle, not per
    report)."""
    out = []
    for _ in range(k):
        a = node.authenticate(_messages.AuthenticateRequest(model_name=name))
        c = node.cycle_request(_messages.CycleRequest(worker_id=a["worker_id"], model=name))
        node.get_model(_messages.AssetRequest(a["worker_id"], c["request_key"], c["model_id"]))
        out.append((a["worker_id"], c["request_key"]))
    return out


def _node_cpu(
    tmp: Path, shapes, blob: bytes, k: int, durability: str | None, binary: bool,
    num_samples: int | None,
):
    node = GridNode(Settings(data_dir=tmp, admin_token="x"))
    try:
        name = f"m{len(list(tmp.iterdir()))}-{time.monotonic_ns()}"
        _host(node, name, shapes, k, durability)
        seats = _seats(node, name, k)
        text = _messages.b64encode(blob)
        weighed = {} if num_samples is None else {"num_samples": num_samples}
        frames = [
            _messages.encode_binary_report(
                {"worker_id": w, "request_key": key, "diff": blob, **weighed}
            )
            if binary
            else json.dumps({"worker_id": w, "request_key": key, "diff": text, **weighed}).encode()
            for w, key in seats
        ]
        t = time.process_time()
        for body in frames:
            if binary:  # as the WebSocket endpoint reads a binary frame
                head, payload = _messages.split_binary_report(body)
                header = json.loads(head)
                data = _messages.binary_report_data(header["type"], header["data"], payload)
            else:
                data = parse_worker_json(body)
            node.report(_messages.parse_report(data))
        return (time.process_time() - t) / k
    finally:
        node.close()


def _floor_cpu(blob: bytes, diff, k: int, binary: bool) -> float:
    """The floor over k distinct copies of the body, as the node gets k distinct
    reports: one buffer read k times would stay in the CPU's cache (a CNN diff is 6.6 MB),
    which the node's reads do not."""
    where = _tensor_offsets(blob, diff)
    acc = np.zeros(sum(a.size for a in diff), np.float32)
    one = blob if binary else _messages.b64encode(blob).encode()
    payloads = [bytes(bytearray(one)) for _ in range(k)]
    t = time.process_time()
    for payload in payloads:
        _floor(payload, not binary, where, acc)
    return (time.process_time() - t) / k


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=20, help="reports per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--durability", nargs="+", default=["report", "cycle"])
    ap.add_argument("--num-samples", type=int, default=None,
                    help="reports carry num_samples, as the gridfl worker's do (folded as "
                    "num_samples x diff; the floor stays an unweighted add)")
    args = ap.parse_args(argv)
    models = {"CNN": CNN_SHAPES, "2NN": TWO_NN_SHAPES}
    print(f"{'model':5} {'body':12} {'durability':10} {'node ms':>8} {'floor ms':>8} {'ratio':>6}")
    for model, shapes in models.items():
        rng = np.random.default_rng(0)
        diff = [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
        blob = state.dumps(diff)
        for binary in (False, True):
            for durability in args.durability:
                node, floor = [], []
                for _ in range(args.rounds):
                    with tempfile.TemporaryDirectory() as tmp:
                        cfg = None if durability == "report" else durability
                        node.append(_node_cpu(Path(tmp), shapes, blob, args.reports, cfg, binary,
                                              args.num_samples))
                    floor.append(_floor_cpu(blob, diff, args.reports, binary))
                n, f = statistics.median(node) * 1e3, statistics.median(floor) * 1e3
                body = "WS binary" if binary else "HTTP base64"
                print(f"{model:5} {body:12} {durability:10} {n:8.2f} {f:8.2f} {n / f:6.1f}x",
                      flush=True)


if __name__ == "__main__":
    main()
