"""Federated MNIST speed and accuracy: a real grid node and 10 worker processes on
loopback, McMahan's K = 100 IID shards, C = 0.1, B = 10, lr 0.1 (Flower 1.42's baseline
workloads, docs/performance.md).

In one run, per workload (2NN E=1, CNN E=1):

* seconds per cycle on the node (median over cycles 2..N; checkpoints are evaluated
  after training, so evaluation never slows a cycle);
* the compute floor measured side by side: the same plan running the same ten local
  epochs (600 examples, B = 10) in two processes on the two cores, with no node and no
  protocol; ``cycle / compute`` is what the node and protocol cost on top;
* start-up (node healthy -> first aggregated checkpoint), peak memory of node + workers
  (the sum of RSS, which counts libraries shared by the 11 processes once per process,
  and the sum of PSS, which shares those pages out: the physical memory used), and
  test accuracy per cycle.

Flower 1.42's figures, measured on a machine of the same kind, are printed next to ours.

    python -m benchmarks.bench_fl [--cycles 20] [--workload 2nn cnn]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FLOWER = {  # Flower 1.42 measured on this machine: s/round, torch compute/round, accuracy
    "2nn": {"simulation": 0.72, "deployment": 39.5, "torch_compute": 0.21,
            "acc": {20: 0.946}},
    "cnn": {"simulation": 3.78, "deployment": None, "torch_compute": 2.81,
            "acc": {10: 0.977, 20: 0.983}},
}
GOALS = {"2nn": 0.36, "cnn": 3.0}


def _local_epochs(args) -> float:
    """Run ``n`` clients' local epochs with the plan, one thread; returns seconds."""
    import os

    os.environ["GRIDFL_PLAN_THREADS"] = "1"
    from gridfl import Plan, state

    plan_bytes, params_bytes, x, y, n, batch = args
    plan, params = Plan.from_bytes(plan_bytes), state.loads(params_bytes)
    start = time.perf_counter()
    for c in range(n):
        xs, ys = x[c * 600 : (c + 1) * 600], y[c * 600 : (c + 1) * 600]
        ps = params
        for i in range(0, 600, batch):
            out = plan.execute(*plan.bind(data=xs[i : i + batch], target=ys[i : i + batch],
                                          params=ps, client_config={"lr": 0.1}))
            ps = out[2 : 2 + len(params)]
    return time.perf_counter() - start


def _torch_epochs(args) -> float:
    """The same local epochs in eager PyTorch (torch.optim.SGD), one thread; seconds."""
    import torch

    from gridfl.demo.models import build_model

    torch.set_num_threads(1)
    model_name, x, y, n, batch = args
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    start = time.perf_counter()
    for c in range(n):
        net = build_model(model_name)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        xs, ys = x[c * 600 : (c + 1) * 600], y[c * 600 : (c + 1) * 600]
        for i in range(0, 600, batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xs[i : i + batch]), ys[i : i + batch]).backward()
            opt.step()
    return time.perf_counter() - start


def compute_floor(model_name: str, repeats: int = 3) -> tuple[float, float]:
    """Seconds for ten local epochs on two cores (two processes, five clients each), with
    the plan and with eager PyTorch, alternating; medians."""
    from gridfl import state
    from gridfl.compiler import SGD, compile_training_plan
    from gridfl.datasets import load_mnist
    from gridfl.demo.models import build_model

    mnist = load_mnist()
    model = build_model(model_name)
    plan = compile_training_plan(model, loss="cross_entropy", optimizer=SGD(lr=0.1),
                                 example_data=mnist.x_train[:10],
                                 example_target=mnist.y_train[:10])
    params = state.dumps([p.detach().numpy() for p in model.parameters()])
    x, y = mnist.x_train[:6000], mnist.y_train[:6000]
    jobs = [(plan.to_bytes(), params, x[:3000], y[:3000], 5, 10),
            (plan.to_bytes(), params, x[3000:], y[3000:], 5, 10)]
    torch_jobs = [(model_name, x[:3000], y[:3000], 5, 10), (model_name, x[3000:], y[3000:], 5, 10)]
    plan_times, torch_times = [], []
    with ProcessPoolExecutor(2) as pool:
        for _ in range(repeats):
            for fn, work, times in ((_local_epochs, jobs, plan_times),
                                    (_torch_epochs, torch_jobs, torch_times)):
                start = time.perf_counter()
                list(pool.map(fn, work))
                times.append(time.perf_counter() - start)
    return statistics.median(plan_times), statistics.median(torch_times)


def run_workload(model_name: str, cycles: int) -> dict:
    from gridfl.demo.run import DemoOptions, run_demo

    with tempfile.TemporaryDirectory() as tmp:
        options = DemoOptions(
            model=model_name, clients=100, fraction=0.1, epochs=1, batch_size=10, lr=0.1,
            cycles=cycles, target=None, workers=10, evaluate=False,
            data_dir=Path(tmp) / "data", out_dir=Path(tmp) / "out",
        )
        result = run_demo(options)
    per_cycle = [c.seconds for c in result.cycles]
    return {
        "seconds_per_cycle": statistics.median(per_cycle[1:]),
        "cycle_range": [min(per_cycle[1:]), max(per_cycle[1:])],
        "startup": result.startup_seconds,
        "peak_rss_mb": result.peak_rss_mb,
        "peak_pss_mb": result.peak_pss_mb,
        "memory_mb": result.memory_mb,
        "accuracy": {c.cycle: c.test_accuracy for c in result.cycles},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--workload", nargs="+", default=["2nn", "cnn"], choices=["2nn", "cnn"])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    report = {}
    for name in args.workload:
        print(f"[{name}] compute floor (10 local epochs, 2 processes)...", flush=True)
        floor, torch_floor = compute_floor(name)
        print(f"[{name}] {args.cycles} federated cycles...", flush=True)
        fl = run_workload(name, args.cycles)
        report[name] = {**fl, "compute_floor": floor, "torch_compute_floor": torch_floor}
        flower = FLOWER[name]
        acc = fl["accuracy"]
        per_cycle = fl["seconds_per_cycle"]
        mem = fl["memory_mb"]
        flower_x = flower["simulation"] / flower["torch_compute"]
        print(
            f"\n{name.upper()} E=1, K=100, C=0.1, B=10:\n"
            f"  s/cycle (median 2..N)   {per_cycle:.3f} "
            f"[{fl['cycle_range'][0]:.3f}-{fl['cycle_range'][1]:.3f}]   goal <= {GOALS[name]}\n"
            f"  compute, plan           {floor:.3f} s for the 10 local epochs on 2 cores\n"
            f"  compute, eager torch    {torch_floor:.3f} s "
            f"(plan/torch x{floor / torch_floor:.2f})\n"
            f"  cycle / plan compute    x{per_cycle / floor:.2f}   (node + protocol + "
            f"scheduling 10 processes on 2 cores)\n"
            f"  cycle / torch compute   x{per_cycle / torch_floor:.2f}   Flower simulation: "
            f"x{flower_x:.2f} ({flower['simulation']} s / {flower['torch_compute']} s on its "
            f"machine)\n"
            f"  Flower deployment       {flower['deployment'] or '-'} s/round on its machine\n"
            f"  start-up                {fl['startup']} s (node healthy -> first checkpoint)\n"
            f"  peak memory, PSS sum    {fl['peak_pss_mb']} MB (node + 10 workers: physical "
            f"memory, shared pages counted once)\n"
            f"  peak memory, RSS sum    {fl['peak_rss_mb']} MB (counts the libraries the 11 "
            f"processes share 11 times)\n"
            f"  per process (peak)      node RSS {mem.get('node_rss')} / PSS "
            f"{mem.get('node_pss')} MB, largest worker RSS {mem.get('worker_rss')} / PSS "
            f"{mem.get('worker_pss')} MB\n"
            f"  accuracy                "
            + ", ".join(f"c{k}: {100 * v:.2f}%" for k, v in acc.items() if k in (1, 5, 10, 20))
            + "   Flower: "
            + ", ".join(f"c{k}: {100 * v:.1f}%" for k, v in flower["acc"].items()),
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
