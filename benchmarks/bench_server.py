"""Grid node benchmarks (``python -m benchmarks.bench_server [N ...] [--durability D[,D]]``).

1. Load: N concurrent simulated workers (default 100 and 1000), each doing
   authenticate -> cycle-request -> get-model -> get-plan -> report over HTTP on the
   McMahan CNN (1,663,370 float32 params), against ONE ``gridfl serve`` process on loopback
   (SQLite file). One cycle of N workers (max_workers = max_diffs = N). Reported: cycles/s,
   p50/p99 latency per call, server CPU seconds per worker (all its calls), server RSS
   after 10, 100, ...
   reports (must stay flat: the aggregate is folded in, O(model)). ``--durability cycle``
   hosts with ``server_config.durability: "cycle"`` (running sums in memory) and runs
   only this part; ``--durability report,cycle`` runs both, side by side on the same
   server process, one FL process each.
2. Aggregation: 100 CNN diffs folded by the node (decode, validate, fold, write; in process)
   vs ``numpy.mean`` of the same 100 arrays already in memory (the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CNN_SHAPES = [(32, 1, 5, 5), (32,), (64, 32, 5, 5), (64,), (512, 3136), (512,), (10, 512), (10,)]
ADMIN = "bench-admin-token"


def cnn_params(seed=0):
    rng = np.random.default_rng(seed)
    return [(0.05 * rng.standard_normal(s)).astype(np.float32) for s in CNN_SHAPES]


def plan_bytes(shapes=CNN_SHAPES) -> bytes:
    """A loadable training plan with the CNN's parameter slots (p - lr * p)."""
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("X", f, ["N", 1, 28, 28]),
        helper.make_tensor_value_info("y", f, ["N", 10]),
        helper.make_tensor_value_info("batch_size", TensorProto.INT64, []),
        helper.make_tensor_value_info("lr", f, []),
    ]
    in_meta = [
        {"name": "X", "role": "data"},
        {"name": "y", "role": "target"},
        {"name": "batch_size", "role": "batch_size"},
        {"name": "lr", "role": "client_config", "key": "lr"},
    ]
    outputs = [helper.make_tensor_value_info("loss", f, [])]
    out_meta = [{"name": "loss", "role": "loss"}]
    nodes = [helper.make_node("ReduceMean", ["X"], ["loss"], keepdims=0)]
    for i, s in enumerate(shapes):
        inputs.append(helper.make_tensor_value_info(f"p{i}", f, list(s)))
        in_meta.append({"name": f"p{i}", "role": "model_param", "index": i})
        outputs.append(helper.make_tensor_value_info(f"n{i}", f, list(s)))
        out_meta.append({"name": f"n{i}", "role": "model_param", "index": i})
        nodes += [
            helper.make_node("Mul", [f"p{i}", "lr"], [f"m{i}"]),
            helper.make_node("Sub", [f"p{i}", f"m{i}"], [f"n{i}"]),
        ]
    model = helper.make_model(
        helper.make_graph(nodes, "bench", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    meta = {
        "gridfl.format": "1",
        "gridfl.kind": "training",
        "gridfl.inputs": json.dumps(in_meta),
        "gridfl.outputs": json.dumps(out_meta),
    }
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    return model.SerializeToString()


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def host_payload(name: str, n: int, durability: str = "report") -> dict:
    from gridfl import state

    cfg = {"max_workers": n, "max_diffs": n, "cycle_length": 3600}
    if durability != "report":  # the default (and what nodes before it take)
        cfg["durability"] = durability
    return {
        "client_config": {"name": name, "version": "1", "lr": 0.05, "batch_size": 10},
        "server_config": cfg,
        "model": b64(state.dumps(cnn_params())),
        "plans": {"training_plan": b64(plan_bytes())},
    }


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_mem(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pct(xs, q):
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


#: simulated workers per client process: one Python event loop cannot drive 1,000 workers
#: moving ~15 MB each without falling tens of seconds behind (see _load)
WORKERS_PER_CLIENT = 250
_reported = None  # multiprocessing.Value shared by the client processes (fork)


async def _load(url: str, ids: range, name: str, pid: int, diff_b64: bytes, n: int) -> dict:
    """One client process: the simulated workers ``ids`` (of ``n``), each on its own
    connection, as real workers are.

    Why not one process and one shared pool (the old harness, which failed at 1,000 with
    ``httpx.ReadError`` on cycle-request after a few minutes): that event loop fell tens
    of seconds behind (auth p50 24 s), so a keep-alive connection sat idle past the
    server's keep-alive timeout (30 s, counted from when the server finished writing) and
    was closed by the server just as the lagging client sent the next POST on it. The
    node was fine; the harness measured itself. Now: several client processes, report
    bodies streamed from one shared buffer (no 9 MB json.dumps per worker), and a POST
    that fails because the server had closed the idle connection before reading it is
    re-sent once (the node never saw it; browsers do the same).
    """
    import httpx

    lat: dict[str, list[float]] = {k: [] for k in ("auth", "cycle", "model", "plan", "report")}
    mem: dict[int, float] = {}
    marks = {m for m in (10, 100, 1000, 10000) if m <= n}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=10)

    async def post(client, path, **kw):
        for attempt in range(2):
            try:
                return await client.post(path, **kw)
            except httpx.RemoteProtocolError as e:  # "Server disconnected without sending
                if attempt or "without sending" not in str(e):  # a response": not processed
                    raise

    async def worker(i):
        await asyncio.sleep(i * 0.003)  # workers arrive over ~3 s per 1000, not in 1 ms
        async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:

            async def timed(kind, coro):
                t = time.perf_counter()
                r = await coro
                lat[kind].append(time.perf_counter() - t)
                return r

            async def drain(path, params):
                async with client.stream("GET", path, params=params) as r:
                    async for _ in r.aiter_raw():
                        pass
                    return r.status_code

            r = await timed("auth", post(client, "/model-centric/authenticate",
                                         json={"model_name": name}))
            wid = r.json()["worker_id"]
            r = await timed("cycle", post(client, "/model-centric/cycle-request",
                                          json={"worker_id": wid, "model": name}))
            cyc = r.json()
            assert cyc["status"] == "accepted", cyc
            key = cyc["request_key"]
            q = {"worker_id": wid, "request_key": key}
            st = await timed(
                "model", drain("/model-centric/get-model", {**q, "model_id": cyc["model_id"]})
            )
            assert st == 200
            for pid_ in cyc["plans"].values():
                st = await timed("plan", drain("/model-centric/get-plan", {**q, "plan_id": pid_}))
                assert st == 200
            head = json.dumps({"worker_id": wid, "request_key": key})[:-1].encode()
            head += b', "diff": "'
            size = len(head) + len(diff_b64) + 2

            async def body():
                yield head
                view = memoryview(diff_b64)
                for k in range(0, len(view), 1 << 20):
                    yield view[k : k + (1 << 20)]
                yield b'"}'

            r = await timed("report", client.post(
                "/model-centric/report", content=body(),
                headers={"content-type": "application/json", "content-length": str(size)},
            ))
            assert r.status_code == 200, r.text
            with _reported.get_lock():
                _reported.value += 1
                k = _reported.value
            if k in marks:
                mem[k] = _proc_mem(pid)

    await asyncio.gather(*(worker(i) for i in ids))
    return {"lat": lat, "mem": mem}


def _client_process(args) -> dict:
    return asyncio.run(_load(*args))


def _run_load(url: str, n: int, name: str, pid: int, diff_b64: bytes) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    global _reported
    _reported = mp.get_context("fork").Value("i", 0)
    step = min(n, WORKERS_PER_CLIENT)
    parts = [range(a, min(n, a + step)) for a in range(0, n, step)]
    cpu0 = _proc_cpu(pid)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(len(parts), mp_context=mp.get_context("fork")) as ex:
        outs = list(ex.map(_client_process, [(url, r, name, pid, diff_b64, n) for r in parts]))
    wall = time.perf_counter() - t0
    lat = {k: [x for o in outs for x in o["lat"][k]] for k in outs[0]["lat"]}
    mem = {k: v for o in outs for k, v in o["mem"].items()}
    return {"wall": wall, "lat": lat, "mem": mem, "cpu_per_report": (_proc_cpu(pid) - cpu0) / n}


def bench_load(ns=(100, 1000), durabilities: tuple[str, ...] = ("report",)) -> None:
    from gridfl import state

    diff = [(0.001 * np.ones(s)).astype(np.float32) for s in CNN_SHAPES]
    diff_b64 = b64(state.dumps(diff)).encode("ascii")
    print(
        f"diff State {len(base64.b64decode(diff_b64)) / 1e6:.2f} MB, "
        f"base64 {len(diff_b64) / 1e6:.2f} MB"
    )
    with tempfile.TemporaryDirectory() as tmp:
        import httpx

        port = 5391
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from gridfl.cli import main; main()",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                tmp,
                "--admin-token",
                ADMIN,
                "--log-level",
                "warning",
            ],
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    httpx.get(url + "/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            admin = httpx.Client(
                base_url=url, timeout=600, headers={"Authorization": f"Bearer {ADMIN}"}
            )
            print(
                f"{'durability':>10} {'N':>5} {'wall s':>7} {'cyc/s':>6} {'cpu s/wkr':>9}  "
                "p50/p99 ms: auth cycle model plan report   RSS MB after k reports"
            )
            for durability, n in ((d, n) for n in ns for d in durabilities):
                name = f"cnn{n}-{durability}"
                r = admin.post("/gridfl/v1/processes", json=host_payload(name, n, durability))
                assert r.status_code == 201, r.text
                res = _run_load(url, n, name, proc.pid, diff_b64)
                st = admin.get(f"/gridfl/v1/processes/{name}/1").json()
                assert st["cycles"][0]["status"] == "completed", st["cycles"][0]
                lat = "  ".join(f"{_pct(v, 50):.0f}/{_pct(v, 99):.0f}" for v in res["lat"].values())
                mem = " ".join(f"{k}:{v:.0f}" for k, v in sorted(res["mem"].items()))
                print(
                    f"{durability:>10} {n:>5} {res['wall']:>7.1f} {1 / res['wall']:>6.3f} "
                    f"{res['cpu_per_report']:>9.3f}  {lat}   {mem}",
                    flush=True,
                )
            print(f"server peak RSS (VmHWM) {_proc_mem(proc.pid, 'VmHWM'):.0f} MB")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def bench_aggregation(k: int = 100) -> None:
    from gridfl import _messages, state
    from gridfl.server import GridNode, Settings

    rng = np.random.default_rng(0)
    diffs = [
        [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in CNN_SHAPES] for _ in range(k)
    ]
    blobs = [state.dumps(d) for d in diffs]
    t = time.perf_counter()
    floor = [np.mean(np.stack([d[j] for d in diffs]), axis=0) for j in range(len(CNN_SHAPES))]
    t_numpy = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        node = GridNode(Settings(data_dir=Path(tmp), admin_token="x"))
        payload = host_payload("agg", k)
        node.host(payload)
        joined = []
        for _ in range(k):
            a = node.authenticate(_messages.AuthenticateRequest(model_name="agg"))
            c = node.cycle_request(_messages.CycleRequest(worker_id=a["worker_id"], model="agg"))
            joined.append((a["worker_id"], c["request_key"]))
        t = time.perf_counter()
        for (wid, key), blob in zip(joined, blobs, strict=True):
            node.report(_messages.ReportRequest(wid, key, blob))
        t_node = time.perf_counter() - t
        new = state.loads(node.checkpoint("agg", "1", "latest"))
        base = cnn_params()
        err = max(
            float(np.abs((b - f) - n).max()) for b, f, n in zip(base, floor, new, strict=True)
        )
        node.close()
    print(
        f"aggregation of {k} CNN diffs: node {t_node:.2f} s ({1000 * t_node / k:.1f} ms/report:"
        f" decode + validate + fold + write + final checkpoint), numpy in-memory mean "
        f"{t_numpy:.2f} s; max |node - numpy| = {err:.2e}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workers", type=int, nargs="*", default=[100, 1000],
                    help="concurrent workers of each load run (default 100 1000)")
    ap.add_argument("--durability", type=_durabilities, default=None,
                    help="report, cycle or report,cycle: only the load runs, one FL process "
                    "per durability on the same server")
    args = ap.parse_args(argv)
    if args.durability is None:
        bench_aggregation()
    bench_load(tuple(args.workers), args.durability or ("report",))


def _durabilities(text: str) -> tuple[str, ...]:
    chosen = tuple(text.split(","))
    if not chosen or not set(chosen) <= {"report", "cycle"}:
        raise argparse.ArgumentTypeError("takes report, cycle or report,cycle")
    return chosen


if __name__ == "__main__":
    main()
