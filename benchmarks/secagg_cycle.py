"""Full cycles with and without secure aggregation on a real node (``gridfl serve``, one
process, SQLite on loopback), for :mod:`benchmarks.bench_secagg`.

n simulated workers in a few client processes (asyncio, the shipped ``AsyncSyft`` over
HTTP, or over one WebSocket each with ``transport="ws"``) each authenticate, request the
cycle, download the model and plan, and report a fixed diff: no local training, which costs
the same with and without secure aggregation, so leaving it out makes the ratio an upper
bound. With ``train=True`` each worker instead trains as in McMahan et al.'s setting and
the demo (its own IID shard of 600 MNIST examples, E = 1, B = 10, lr 0.1, the real
compiled plan through onnxruntime in the SDK's ``job.train``) and reports that diff: a
real cycle, the workload the Flower comparison runs. The cycle time is from the workers' start
to the last report's reply (for secure aggregation: the end of the unmask stage, when the
node has completed the cycle). Per stage: the workers' CPU in the protocol's worker
methods (mean per worker), and the node process's CPU between stage closes, sampled from
/proc while the bench watches the round's stage in the database.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.bench_server import _proc_cpu, plan_bytes

SHAPES = {
    "2nn": [(200, 784), (200,), (200, 200), (200,), (10, 200), (10,)],
    "cnn": [(32, 1, 5, 5), (32,), (64, 32, 5, 5), (64,), (512, 3136), (512,), (10, 512), (10,)],
}
ADMIN = "bench-secagg-token"
STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")
CLIENT_PROCESSES = 4


def neighbours(n: int) -> int:
    """k ~ log2 n, even (the ring has k/2 neighbours each side)."""
    return max(2, 2 * math.ceil(math.log2(n) / 2))


def secagg_config(n: int) -> dict:
    k = neighbours(n)
    shares = min(k, n - 1) + 1
    return {
        "threshold": shares // 2 + 1,  # the least the node accepts: more than half
        "neighbours": k,
        "clipping_range": 0.5,
        "stage_timeout": 300.0,
        # the smallest field that holds the sum (n <= 100, 1024 samples, 16-bit values):
        # 5 bytes per parameter on the wire instead of 8
        "field_bits": 40,
        "max_num_samples": 1024,
    }


#: McMahan et al.'s clients: K = 100 IID shards of 600 examples, E = 1, B = 10, lr 0.1
EXAMPLES_PER_WORKER = 600
LR = 0.1
#: the workers' shards when they train (set before the client processes fork)
_SHARDS: list[tuple[np.ndarray, np.ndarray]] = []


def training_inputs(model: str, n: int) -> tuple[bytes, bytes]:
    """The demo's initial model and training plan (its plan cache, or compiled once), and
    n IID shards of MNIST for the workers (kept in ``_SHARDS``)."""
    from gridfl.datasets import load_mnist
    from gridfl.demo.options import DemoOptions
    from gridfl.demo.plans import demo_plans

    mnist = load_mnist()
    options = DemoOptions(model=model, batch_size=10, lr=LR)
    model_bytes, training, _ = demo_plans(options, mnist, step=lambda _: None)
    order = np.random.default_rng(0).permutation(len(mnist.x_train))
    _SHARDS[:] = [
        (mnist.x_train[idx], mnist.y_train[idx])
        for idx in np.array_split(order[: n * EXAMPLES_PER_WORKER], n)
    ]
    return model_bytes, training


def _payload(name: str, model: str, n: int, secure: bool,
             trained: tuple[bytes, bytes] | None = None, durability: str = "report") -> dict:
    from gridfl import state

    if trained is None:  # a stand-in plan: the workers report a fixed diff
        rng = np.random.default_rng(0)
        params = [(0.05 * rng.standard_normal(s)).astype(np.float32) for s in SHAPES[model]]
        model_bytes, plan = state.dumps(params), plan_bytes(SHAPES[model])
    else:
        model_bytes, plan = trained
    sc: dict = {"max_workers": n, "max_diffs": n, "cycle_length": 3600, "num_cycles": 1,
                "durability": durability}
    if secure:
        sc["secure_aggregation"] = secagg_config(n)
    b64 = base64.b64encode
    return {
        "client_config": {"name": name, "version": "1", "lr": LR, "batch_size": 10,
                          "max_epochs": 1},
        "server_config": sc,
        "model": b64(model_bytes).decode(),
        "plans": {"training_plan": b64(plan).decode()},
    }


def _instrument(cpu: dict[str, float]) -> None:
    """Time the worker's protocol methods (thread CPU: the loop runs them inline)."""
    from gridfl.secagg import worker as w

    for stage, meth in zip(
        STAGES, ("advertise", "share_keys", "masked_input", "unmask"), strict=True
    ):
        orig = getattr(w.WorkerSession, meth)

        def timed(self, *a, _orig=orig, _stage=stage, **kw):
            t = time.thread_time()
            try:
                return _orig(self, *a, **kw)
            finally:
                cpu[_stage] += time.thread_time() - t

        setattr(w.WorkerSession, meth, timed)


async def _workers(url: str, name: str, ids: range, shapes, start_at: float,
                   train: bool = False) -> dict:
    from gridfl import AsyncSyft, state

    cpu = dict.fromkeys(STAGES, 0.0)
    _instrument(cpu)
    rng = np.random.default_rng(ids.start)
    diffs = {} if train else {
        i: state.dumps([(0.01 * rng.standard_normal(s)).astype(np.float32) for s in shapes])
        for i in ids
    }
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0 = time.process_time()

    errors: list[str] = []

    async def one(i: int) -> float:
        try:
            async with AsyncSyft(url, timeout=600) as grid:
                job = grid.new_job(name, "1")
                await job.start()
                if train:
                    x, y = _SHARDS[i]
                    result = await job.train("training_plan", x, y, shuffle=True, seed=i)
                    assert job.model is not None
                    diff = job.model.create_serialized_diff(result.params)
                    await job.report(diff, num_samples=result.num_samples)
                else:
                    await job.report(diffs[i], num_samples=10)
        except Exception as e:  # noqa: BLE001 - counted and shown in the table
            errors.append(f"{type(e).__name__}: {str(e)[:120]}")
        return time.time()

    ends = await asyncio.gather(*(one(i) for i in ids))
    return {"end": max(ends), "cpu": cpu, "process_cpu": time.process_time() - cpu0,
            "errors": errors}


def _client(args) -> dict:
    return asyncio.run(_workers(*args))


def _watch_stages(db_url: str, pid: int, stop: threading.Event, marks: dict) -> None:
    """Node CPU at each stage close: poll the round's stage, sample /proc on a change."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    last = None
    with engine.connect() as conn:
        while not stop.is_set():
            row = conn.execute(
                sa.text("SELECT stage FROM secagg_rounds ORDER BY cycle_id DESC LIMIT 1")
            ).first()
            conn.rollback()
            stage = row[0] if row else None
            if stage != last:
                marks[stage] = _proc_cpu(pid)
                last = stage
            time.sleep(0.01)
    engine.dispose()


class Node:
    """``gridfl serve`` on a free port with its own data directory."""

    def __init__(self, tmp: str) -> None:
        import socket

        import httpx

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_url = f"sqlite:///{Path(tmp) / 'gridfl.db'}"
        cmd = [sys.executable, "-c", "from gridfl.cli import main; main()", "serve", "--port",
               str(self.port), "--data-dir", tmp, "--admin-token", ADMIN, "--log-level",
               "warning"]
        self.proc = subprocess.Popen(cmd)
        for _ in range(300):
            try:
                httpx.get(self.url + "/health", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("gridfl serve did not start")

    def host(self, payload: dict) -> None:
        import httpx

        r = httpx.post(self.url + "/gridfl/v1/processes", json=payload, timeout=120,
                       headers={"Authorization": f"Bearer {ADMIN}"})
        r.raise_for_status()

    def status(self, name: str) -> dict:
        import httpx

        r = httpx.get(f"{self.url}/gridfl/v1/processes/{name}/1", timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN}"})
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_cycle(node: Node, model: str, n: int, secure: bool, transport: str = "http",
              trained: tuple[bytes, bytes] | None = None, durability: str = "report") -> dict:
    """One cycle of n workers; wall seconds, node CPU (per stage) and worker CPU. With
    ``trained`` (:func:`training_inputs`' model and plan) the workers train first;
    ``durability`` is the process's, with and without secure aggregation alike."""
    url = node.url if transport == "http" else "ws" + node.url.removeprefix("http")
    name = (f"{model}-{n}-{'sa' if secure else 'plain'}-{transport}{'-t' if trained else ''}"
            f"-{durability}")
    node.host(_payload(name, model, n, secure, trained, durability))
    procs = min(CLIENT_PROCESSES, n)
    step = math.ceil(n / procs)
    parts = [range(a, min(n, a + step)) for a in range(0, n, step)]
    marks: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch_stages, args=(node.db_url, node.proc.pid, stop, marks), daemon=True
    )
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(len(parts), mp_context=ctx) as ex:
        start_at = time.time() + 1.5  # every client process forked and its diffs made
        futures = [
            ex.submit(_client, (url, name, r, SHAPES[model], start_at, trained is not None))
            for r in parts
        ]
        while time.time() < start_at:
            time.sleep(0.005)
        cpu0 = _proc_cpu(node.proc.pid)
        if secure:
            watcher.start()
        outs = [f.result() for f in futures]
    stop.set()
    node_cpu = _proc_cpu(node.proc.pid) - cpu0
    wall = max(o["end"] for o in outs) - start_at
    cycles = node.status(name)["cycles"]
    errors = [e for o in outs for e in o["errors"]]
    status = cycles[0]["status"] if cycles else "none"
    if errors or status != "completed":
        print(f"  {name}: cycle {status}, {len(errors)} workers failed, first: "
              f"{errors[0] if errors else '-'}", flush=True)
    worker = {s: sum(o["cpu"][s] for o in outs) / n for s in STAGES}
    proc_cpu = sum(o["process_cpu"] for o in outs) / n
    node_stage: dict[str, float] = {}
    if secure:
        watcher.join(5)
        # marks[stage] = node CPU when the round entered that stage; "done" at the end
        points = [(None, cpu0)] + [(s, marks[s]) for s in (*STAGES, "done") if s in marks]
        for (stage, a), (_, b) in itertools.pairwise(points):
            node_stage[stage or "advertise_keys"] = node_stage.get(stage or "advertise_keys",
                                                                   0.0) + (b - a)
    return {"status": status, "wall": wall, "node": node_cpu, "node_stage": node_stage,
            "worker": worker, "worker_all": proc_cpu}


def main(ns=(10, 50, 100), models=("2nn", "cnn"), transport: str = "http",
         train: bool = False, durability: str = "report") -> None:
    head = (f"{'model':5} {'n':>4} {'k':>3} | {'plain s':>7} {'secagg s':>8} {'x':>5} | "
            f"{'node plain':>10} {'node sa':>7} | node s per stage (adv/share/mask/unmask) | "
            f"worker ms per stage (adv/share/mask/unmask) | {'worker ms':>9} {'plain':>6}")
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory() as tmp:
        node = Node(tmp)
        try:
            for model in models:
                trained = training_inputs(model, max(ns)) if train else None
                for n in ns:
                    plain = run_cycle(node, model, n, False, transport, trained, durability)
                    sa = run_cycle(node, model, n, True, transport, trained, durability)
                    ns_ = "/".join(f"{sa['node_stage'].get(s, 0):.2f}" for s in STAGES)
                    ws = "/".join(f"{1e3 * sa['worker'][s]:.1f}" for s in STAGES)
                    ok = plain["status"] == sa["status"] == "completed"
                    print(
                        f"{model:5} {n:>4} {neighbours(n):>3} | {plain['wall']:7.2f} "
                        f"{sa['wall']:8.2f} {sa['wall'] / plain['wall']:5.2f} | "
                        f"{plain['node']:10.2f} {sa['node']:7.2f} | {ns_:>40} | {ws:>42} | "
                        f"{1e3 * sa['worker_all']:9.1f} {1e3 * plain['worker_all']:6.1f}"
                        + ("" if ok else f"  (NOT COMPLETED: {plain['status']}/{sa['status']})"),
                        flush=True,
                    )
        finally:
            node.stop()
    print(
        "\nplain s / secagg s: one cycle's wall time, workers' start to the last reply; x: the"
        "\nratio (goal at n = 100, k ~ log2 n: <= 1.5). node: the node process's CPU seconds"
        "\nfor the cycle. worker ms: a worker's whole CPU for the cycle (client process CPU / n)"
        "\nwith secure aggregation, then plain. Simulated workers share the machine's cores."
        + ("\nEach worker trained its 600 examples (E = 1, B = 10) before reporting." if train
           else "\nNo local training: the ratio is an upper bound for a real cycle.")
    )


if __name__ == "__main__":
    os.nice(0)
    main()
