"""Compressed reports, side by side with plain State in one run
(``python -m benchmarks.bench_compression [--reports N] [--cycles N | --no-accuracy]``).

1. Bytes per report of the McMahan CNN (1,663,370 float32 params): plain State (what a
   binary frame carries), its base64 (a JSON report), and each encoding.
2. Node CPU per report (``time.process_time`` of ``GridNode.report``: decode, validate,
   fold, store the running sums; one node, an open cycle, the encodings interleaved), and
   the same for decode + validate + fold alone (what compression changes; the store of
   the float32 sums is the same for every encoding).
3. Test accuracy of the CNN (``--model 2nn``: the 2NN) after ``--cycles`` cycles of the
   demo (IID, K=100, C=0.1, E=1, B=10) for plain, float16, int8 and top-k 10% with error
   feedback, same seed. ``--engine simulation`` runs the four in the simulation engine
   instead (:mod:`gridfl.simulation`: the same plans, each virtual client encoding as a
   worker does with its own top-k residual, the node's decoding and fold), which is
   what fits the CNN's 80 rounds on a shared two-core machine.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_server import CNN_SHAPES, cnn_params, host_payload

KINDS = ("float16", "int8", "topk")


def _diffs(n: int) -> list[list[np.ndarray]]:
    """Diffs shaped like a trained CNN's: mostly small values, a few large ones."""
    rng = np.random.default_rng(1)
    return [
        [(0.001 * rng.standard_t(3, s)).astype(np.float32) for s in CNN_SHAPES] for _ in range(n)
    ]


def bench_bytes() -> None:
    from gridfl import compression, state

    diff = _diffs(1)[0]
    plain = len(state.dumps(diff))
    b64 = len(base64.b64encode(state.dumps(diff)))
    print(f"bytes per CNN report: State {plain / 1e6:.2f} MB (binary frame), "
          f"base64 {b64 / 1e6:.2f} MB (JSON)")
    for kind in KINDS:
        size = len(compression.encode(kind, diff, 0.1))
        print(f"  {kind:8} {size / 1e6:6.2f} MB  {plain / size:5.2f}x smaller than State")


def bench_cpu(reports: int) -> None:
    from gridfl import _messages, compression, state
    from gridfl.server import GridNode, Settings
    from gridfl.server import aggregate as agg

    diffs = _diffs(reports)
    payloads = {"plain": [state.dumps(d) for d in diffs]}
    for kind in KINDS:
        payloads[kind] = [compression.encode(kind, d, 0.1) for d in diffs]
    spec = agg.ModelSpec.of(cnn_params())
    shapes, dtypes = spec.shapes, spec.dtypes
    names = ["plain", *KINDS]

    # decode + validate + fold alone, into one float32 sum (weighted, as with num_samples)
    fold_cpu: dict[str, list[float]] = {k: [] for k in names}
    total = agg.new_sum(spec)
    for i in range(reports):
        for kind in names if i % 2 == 0 else reversed(names):
            blob = payloads[kind][i]
            t = time.process_time()
            if kind == "plain":
                diff = state.loads(blob, expect=zip(shapes, dtypes, strict=True))
                agg.validate_diff(diff, spec)
            else:
                diff = compression.decode(kind, blob, shapes, dtypes, fraction=0.1)
            agg.fold(total, diff, spec, weight=600)
            fold_cpu[kind].append(time.process_time() - t)

    # the node's whole report handler, one process per encoding, reports interleaved
    report_cpu: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        node = GridNode(Settings(data_dir=Path(tmp), admin_token="x"))
        seats = {}
        for kind in names:
            payload = host_payload(f"cnn-{kind}", reports + 1)
            if kind != "plain":
                cfg = {"kind": kind, **({"fraction": 0.1} if kind == "topk" else {})}
                payload["server_config"]["compression"] = cfg
            node.host(payload)
            seats[kind] = []
            for _ in range(reports):
                a = node.authenticate(_messages.AuthenticateRequest(model_name=f"cnn-{kind}"))
                c = node.cycle_request(
                    _messages.CycleRequest(worker_id=a["worker_id"], model=f"cnn-{kind}")
                )
                seats[kind].append((a["worker_id"], c["request_key"]))
        for i in range(reports):
            for kind in names if i % 2 == 0 else reversed(names):
                wid, key = seats[kind][i]
                req = _messages.ReportRequest(
                    wid, key, payloads[kind][i], num_samples=600,
                    compression=None if kind == "plain" else kind,
                )
                t = time.process_time()
                node.report(req)
                report_cpu[kind].append(time.process_time() - t)
        node.close()

    base_fold = statistics.median(fold_cpu["plain"])
    base_report = statistics.median(report_cpu["plain"])
    print(f"node CPU per CNN report, median of {reports} (ratio to plain State):")
    print(f"  {'':8} {'decode+validate+fold':>22} {'whole report()':>18}")
    for kind in names:
        f, r = statistics.median(fold_cpu[kind]), statistics.median(report_cpu[kind])
        print(f"  {kind:8} {1000 * f:9.2f} ms ({f / base_fold:4.2f}x) "
              f"{1000 * r:9.2f} ms ({r / base_report:4.2f}x)", flush=True)


def bench_accuracy(cycles: int, out: Path, model: str = "cnn") -> None:
    from gridfl.demo.run import DemoOptions, run_demo

    print(f"{model.upper()} test accuracy after {cycles} cycles (IID, K=100, C=0.1, E=1, "
          "B=10, seed 0):")
    results = {}
    for kind in (None, *KINDS):
        options = DemoOptions(
            model=model, cycles=cycles, target=None, compression=kind, evaluate=False,
            data_dir=out / "data", out_dir=out / (kind or "plain"),
        )
        started = time.perf_counter()
        result = run_demo(options)
        accuracy = result.cycles[-1].test_accuracy
        results[kind] = accuracy
        delta = "" if kind is None else f"  ({100 * (accuracy - results[None]):+.2f} points)"
        print(f"  {kind or 'plain':8} {100 * accuracy:6.2f} %{delta}  "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)


def bench_accuracy_simulated(rounds: int, model: str = "cnn", workers: int = 2) -> None:
    from benchmarks.bench_simulation import _process
    from gridfl.datasets import load_mnist
    from gridfl.simulation import SimulationOptions, simulate

    mnist = load_mnist()
    process = _process(model, mnist, 10)
    print(f"{model.upper()} test accuracy after {rounds} rounds, simulation engine (IID, "
          "K=100, C=0.1, E=1, B=10, lr 0.1, seed 0):", flush=True)
    results: dict[str | None, float] = {}
    for kind in (None, *KINDS):
        setting = None if kind is None else {
            "kind": kind, **({"fraction": 0.1} if kind == "topk" else {})}
        started = time.perf_counter()
        result = simulate(
            **{**process, "server_config": {"max_diffs": 10, "compression": setting}},
            data=(mnist.x_train, mnist.y_train), test_data=(mnist.x_test, mnist.y_test),
            options=SimulationOptions(num_clients=100, rounds=rounds, clients_per_round=10,
                                      seed=0, workers=workers, evaluate_every=rounds),
        )
        accuracy = result.rounds[-1].central["accuracy"]
        results[kind] = accuracy
        delta = "" if kind is None else f"  ({100 * (accuracy - results[None]):+.2f} points)"
        print(f"  {kind or 'plain':8} {100 * accuracy:6.2f} %{delta}  "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=20, help="reports per encoding (CPU)")
    parser.add_argument("--cycles", type=int, default=20, help="demo cycles (accuracy)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the demo runs")
    parser.add_argument("--model", choices=["cnn", "2nn"], default="cnn", help="demo model")
    parser.add_argument("--engine", choices=["demo", "simulation"], default="demo",
                        help="where the accuracy runs train")
    parser.add_argument("--workers", type=int, default=2, help="simulation pool processes")
    parser.add_argument("--out", type=Path, default=Path("results/bench-compression"))
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.reports < 1 or args.workers < 1:
        parser.error("--cycles, --reports and --workers must be >= 1")
    bench_bytes()
    bench_cpu(args.reports)
    if args.no_accuracy:
        return
    if args.engine == "simulation":
        bench_accuracy_simulated(args.cycles, args.model, args.workers)
    else:
        bench_accuracy(args.cycles, args.out, args.model)


if __name__ == "__main__":
    main()
