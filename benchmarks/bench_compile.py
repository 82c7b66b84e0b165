"""Compile time: the RNNs of issue 21 against the McMahan CNN, Scan against unrolled.

    python -m benchmarks.bench_compile [--skip-unrolled] [--seq 20]

In one process, after a warm-up compile that pays the imports (torch.onnx, onnxscript),
compiles the training plan of:

* the McMahan CNN (and its evaluation plan), the reference, then both again from the
  plan cache (a cache hit: no tracing);
* ``Embedding(80, 8)`` + ``LSTM(8, 64)`` + ``Linear(64, 80)`` over sequences of ``--seq``
  (and the same with a GRU), once as gridfl compiles them (one ``Scan`` forward and one
  backward per layer) and once unrolled step by step, as torch decomposes them and as
  gridfl did before (``--skip-unrolled`` leaves those out: about a minute each).

Each row gives wall and CPU seconds (CPU is the process's, all threads: on a shared
machine it is the work done, free of time spent descheduled), the phases (tracing,
export, verification against eager PyTorch), the ONNX node count, and the ratio of its
CPU time to the CNN's training plan. The last lines give unrolled / Scan per RNN.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from typing import Any


def _models(seq: int) -> dict[str, Callable[[], tuple[Any, Any, Any]]]:
    import torch
    from torch import nn

    class SeqNet(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.emb = nn.Embedding(80, 8)
            self.rnn = cell(8, 64, batch_first=True)
            self.fc = nn.Linear(64, 80)

        def forward(self, x):
            h, _ = self.rnn(self.emb(x))
            return self.fc(h[:, -1])

    def cnn():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 10),
        )
        return net, torch.rand(10, 1, 28, 28), torch.randint(0, 10, (10,))

    def rnn(cell):
        def make():
            torch.manual_seed(0)
            return (SeqNet(cell), torch.randint(0, 80, (10, seq)),
                    torch.randint(0, 80, (10,)))
        return make

    return {"cnn": cnn, "lstm": rnn(nn.LSTM), "gru": rnn(nn.GRU)}


class _Phases:
    """Times the compiler's phases by wrapping its functions for one compile."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def patched(self, unrolled: bool):
        import gridfl.compiler as compiler
        from gridfl.compiler import export, trace

        targets = [(trace, "trace_step", "trace"), (compiler, "_verify", "verify")]
        # _compile imports export_onnx from its module at call time
        targets.append((export, "export_onnx", "export"))
        saved = [(mod, name, getattr(mod, name)) for mod, name, _ in targets]
        for mod, name, key in targets:
            setattr(mod, name, self._timed(getattr(mod, name), key))
        if unrolled:  # torch's own decomposition: one set of ops per time step
            saved.append((trace, "rnns_as_scans", trace.rnns_as_scans))
            trace.rnns_as_scans = contextlib.nullcontext  # type: ignore[assignment]
        try:
            yield
        finally:
            for mod, name, fn in saved:
                setattr(mod, name, fn)

    def _timed(self, fn, key):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
        return timed


def _compile(make, *, evaluation: bool = False, unrolled: bool = False,
             cache: Any = False) -> dict[str, Any]:
    import onnx

    from gridfl.compiler import SGD, compile_evaluation_plan, compile_training_plan

    net, X, y = make()
    phases = _Phases()
    with phases.patched(unrolled):
        wall, cpu = time.perf_counter(), time.process_time()
        if evaluation:
            plan = compile_evaluation_plan(net, example_data=X, example_target=y,
                                           cache=cache)
        else:
            plan = compile_training_plan(net, optimizer=SGD(lr=0.1), example_data=X,
                                         example_target=y, cache=cache)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    nodes = len(onnx.load_from_string(plan.to_bytes()).graph.node)
    return {"wall": wall, "cpu": cpu, "nodes": nodes, **phases.seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-unrolled", action="store_true")
    parser.add_argument("--seq", type=int, default=20)
    args = parser.parse_args(argv)

    import torch

    from gridfl.compiler import compile_training_plan

    t0 = time.perf_counter()
    compile_training_plan(torch.nn.Linear(4, 3), example_data=torch.randn(4, 4),
                          example_target=torch.randint(0, 3, (4,)), cache=False)
    print(f"warm-up compile (imports): {time.perf_counter() - t0:.1f} s wall")

    models = _models(args.seq)
    rows: list[tuple[str, dict[str, Any]]] = [
        ("cnn training", _compile(models["cnn"])),
        ("cnn evaluation", _compile(models["cnn"], evaluation=True)),
    ]
    with tempfile.TemporaryDirectory() as tmp:  # the plan cache: filled, then read
        _compile(models["cnn"], cache=tmp)
        _compile(models["cnn"], evaluation=True, cache=tmp)
        rows.append(("cnn train, hit", _compile(models["cnn"], cache=tmp)))
        rows.append(("cnn eval, hit", _compile(models["cnn"], evaluation=True, cache=tmp)))
    for cell in ("lstm", "gru"):
        rows.append((f"{cell} scan", _compile(models[cell])))
        if not args.skip_unrolled:
            rows.append((f"{cell} unrolled", _compile(models[cell], unrolled=True)))
    reference = rows[0][1]["cpu"]
    print(f"\nsequence length {args.seq}; ratio = CPU s / CPU s of the CNN training plan")
    print(f"{'plan':<16}{'wall s':>8}{'cpu s':>8}{'trace':>8}{'export':>8}{'verify':>8}"
          f"{'nodes':>7}{'vs cnn':>8}")
    for name, r in rows:
        print(f"{name:<16}{r['wall']:>8.1f}{r['cpu']:>8.1f}{r.get('trace', 0):>8.1f}"
              f"{r.get('export', 0):>8.1f}{r.get('verify', 0):>8.1f}{r['nodes']:>7}"
              f"{r['cpu'] / reference:>8.2f}")
    found = dict(rows)
    for cell in ("lstm", "gru"):
        if f"{cell} unrolled" in found:
            before, after = found[f"{cell} unrolled"], found[f"{cell} scan"]
            print(f"{cell}: unrolled / scan = {before['cpu'] / after['cpu']:.2f}x CPU, "
                  f"{before['wall'] / after['wall']:.2f}x wall")


if __name__ == "__main__":
    main()
