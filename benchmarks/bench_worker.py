"""A worker's CPU per cycle beyond the plan compute, and the node's CPU per cycle.

One grid node (``gridfl serve``, its own process) hosts the McMahan 2NN (199,210 float32
params, an ~800 KB diff); one worker process (the demo worker's loop: ``job.start(wait)``,
``job.train``, ``model.create_serialized_diff``, ``job.report``) runs ``--cycles`` cycles
of one local epoch (``--samples`` examples, B = 10) on random data. The worker measures
its own CPU (``time.process_time``, all threads) per phase, and the CPU spent inside
onnxruntime's ``InferenceSession.run`` (the plan compute); the node's CPU is read from
``/proc/<pid>/stat`` around the cycles.

    python -m benchmarks.bench_worker [--cycles 30] [--samples 600] [--transport ws]
    python -m benchmarks.bench_worker --profile     # cProfile of the worker's cycles

Measured on the 2-core dev box while other test suites ran (2NN, 600 samples, 60 steps per
cycle, medians of 30 cycles, two runs each; worker CPU ms per cycle):

    phase                       before     after   what changed
    report (job.report)        10.3-12.5   3.1-4.4  binary WebSocket report frame (no base64,
                                                    no 1 MB JSON string)
    trainer beyond compute      6.9-7.3    3.8-4.8  steps after the first feed onnxruntime
                                                    directly; no event calls without handlers
    start (cycle req+download) 12.3-14.6  12.0-12.6 sniffio installed (httpcore retried a
                                                    failing import on every lock: ~1.2 ms
                                                    per HTTP request)
    overhead (total - compute) 30.7-37.4  22.2-24.0
    Syft(url) construction     54-98      43-47     verify=False for http:// (no CA bundle);
                                                    the rest is httpcore's lazy import

Downloads over the socket (gridfl.binary.2: get-model and get-plan as WebSocket request
frames answered by binary frames, no HTTP GET per cycle), same setup, four runs each,
before and after alternating (worker CPU ms per cycle, median of 30 cycles):

    phase                       before     after
    start (cycle req+download) 13.8-14.3   5.1-6.1  (over http://: 13.5)
    report (job.report)         4.4-4.5    2.2-2.4
    overhead (total - compute) 25.9-28.8  12.1-19.6
    node CPU per cycle (mean)  44-48      40-46     (noisy: the box ran other suites)

``--transport http`` measures the HTTP-only worker (every download a GET).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 10


def _compile(path: Path) -> None:
    """Compile the 2NN training plan and its initial params (a torch child process)."""
    code = (
        "import sys, torch\n"
        "from gridfl import state\n"
        "from gridfl.compiler import SGD, compile_training_plan\n"
        "from gridfl.demo.models import build_model\n"
        "m = build_model('2nn')\n"
        f"x, y = torch.rand({BATCH}, 784), torch.randint(0, 10, ({BATCH},))\n"
        "p = compile_training_plan(m, loss='cross_entropy', optimizer=SGD(lr=0.1),\n"
        "                          example_data=x, example_target=y)\n"
        "open(sys.argv[1] + '/plan.onnx', 'wb').write(p.to_bytes())\n"
        "open(sys.argv[1] + '/model.state', 'wb').write(\n"
        "    state.dumps([t.detach().numpy() for t in m.parameters()]))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _call(fn) -> None:
    fn()


def worker(args) -> None:
    """The measured worker (runs in its own process); prints one JSON line."""
    t_proc0 = time.process_time()
    import cProfile

    import numpy as np
    import onnxruntime as ort

    from gridfl.client import Syft

    t_imports = time.process_time()
    compute = [0.0]
    real_run = ort.InferenceSession.run

    def timed_run(self, *a, **kw):
        t = time.process_time()
        try:
            return real_run(self, *a, **kw)
        finally:
            compute[0] += time.process_time() - t

    ort.InferenceSession.run = timed_run  # a benchmark probe, not a behaviour change

    rng = np.random.default_rng(0)
    x = rng.random((args.samples, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.samples).astype(np.int64)
    phases: dict[str, list[float]] = {k: [] for k in
                                      ("start", "train", "compute", "diff", "report", "total")}
    prof = cProfile.Profile() if args.profile else None
    t0 = time.process_time()
    client = Syft(args.url)
    t_client = time.process_time() - t0
    with client:
        job = client.new_job("bench", "1")
        cycle: dict[str, float] = {}

        @job.on("accepted")
        def on_accepted(model, client_config):
            t = time.process_time()
            cycle["start"] = t - cycle["t0"]
            c0 = compute[0]
            result = job.train("training_plan", x, y)
            t2 = time.process_time()
            cycle["train"], cycle["compute"] = t2 - t, compute[0] - c0
            diff = model.create_serialized_diff(result.params)
            t3 = time.process_time()
            cycle["diff"] = t3 - t2
            job.report(diff, num_samples=result.num_samples, metrics={"loss": result.loss})
            cycle["report"] = time.process_time() - t3

        io_prof = cProfile.Profile() if args.profile else None
        for i in range(args.cycles + 1):  # cycle 0 warms up (plan session, first connect)
            cycle.clear()
            if prof is not None and i == 1:
                prof.enable()
                client._io.run(_call(io_prof.enable))  # the client's I/O thread too
            cycle["t0"] = time.process_time()
            job.start(wait=30)
            cycle["total"] = time.process_time() - cycle["t0"]
            if "report" not in cycle:
                raise SystemExit(f"cycle {i} was not accepted: {job.state}")
            if i > 0:
                for k in phases:
                    phases[k].append(cycle[k])
        if prof is not None:
            prof.disable()
            client._io.run(_call(io_prof.disable))
    if prof is not None:
        import pstats

        print("--- the calling thread (handlers, training)", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
        print("--- the client's I/O thread (transports)", file=sys.stderr)
        pstats.Stats(io_prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    out = {k: statistics.median(v) * 1000 for k, v in phases.items()}
    out["overhead"] = statistics.median(
        [t - c for t, c in zip(phases["total"], phases["compute"], strict=True)]
    ) * 1000
    out["imports"] = (t_imports - t_proc0) * 1000
    out["client"] = t_client * 1000
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--transport", choices=("ws", "http"), default="ws")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import numpy as np

    from gridfl import state
    from gridfl.host import HostClient

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        _compile(tmpdir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        token = secrets.token_urlsafe(16)
        env = {**os.environ, "GRIDFL_ADMIN_TOKEN": token, "OMP_NUM_THREADS": "1",
               "GRIDFL_PLAN_THREADS": "1"}
        node = subprocess.Popen(
            [sys.executable, "-m", "gridfl", "serve", "--port", str(port), "--data-dir",
             str(tmpdir), "--log-level", "warning"], env=env,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            import httpx

            for _ in range(300):
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            params = state.loads((tmpdir / "model.state").read_bytes())
            with HostClient(url, admin_token=token) as host:
                host.host(
                    model=[np.asarray(p) for p in params],
                    plans={"training_plan": (tmpdir / "plan.onnx").read_bytes()},
                    client_config={"name": "bench", "version": "1", "batch_size": BATCH,
                                   "lr": 0.1, "max_epochs": 1},
                    server_config={"max_workers": 1, "min_diffs": 1, "max_diffs": 1,
                                   "num_cycles": args.cycles + 1, "cycle_length": 600},
                )
            wurl = url.replace("http", "ws", 1) if args.transport == "ws" else url
            node_cpu0 = _cpu_of(node.pid)
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "benchmarks.bench_worker", "--worker", "--url", wurl,
                   "--cycles", str(args.cycles), "--samples", str(args.samples)]
            if args.profile:
                cmd.append("--profile")
            out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
            wall = time.perf_counter() - t0
            node_cpu = (_cpu_of(node.pid) - node_cpu0) / (args.cycles + 1) * 1000
        finally:
            node.terminate()
            node.wait(timeout=10)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"2NN, {args.samples} samples/cycle (B={BATCH}), {args.cycles} cycles over "
          f"{args.transport}; worker CPU ms per cycle (median):")
    for k in ("total", "compute", "overhead", "start", "train", "diff", "report"):
        print(f"  {k:9s} {res[k]:8.2f}")
    print(f"  train - compute (trainer overhead) {res['train'] - res['compute']:.2f}")
    print(f"worker start-up CPU ms: imports {res['imports']:.0f}, Syft(url) {res['client']:.1f}")
    print(f"node CPU ms per cycle (mean, incl. long-poll, download, aggregation): "
          f"{node_cpu:.2f}; wall {wall:.1f} s")


if __name__ == "__main__":
    main()
