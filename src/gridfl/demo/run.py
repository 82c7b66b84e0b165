"""Federated MNIST from one call: node, plans, workers, progress, results.

``gridfl demo`` calls :func:`run_demo`. It starts a grid node (a separate process, an
SQLite file in the data directory), compiles the McMahan CNN or 2NN training plan and an
evaluation plan from PyTorch, hosts them, starts worker processes that hold MNIST shards
and import only the worker SDK, and evaluates each new checkpoint on the 10k test set.

How McMahan's K clients map onto processes: the K shards are dealt round-robin to the
worker processes; the node accepts ``round(C * K)`` workers per cycle, and each accepted
process trains on one of its own shards, picked at random.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from gridfl import Plan, state
from gridfl._exceptions import GridflError
from gridfl._resources import usable_cpus
from gridfl.datasets import Mnist, load_mnist
from gridfl.demo import norms
from gridfl.demo.data import ReadyData
from gridfl.demo.launch import Workers, compute_slots, killed_on_error
from gridfl.demo.memory import PeakMemory
from gridfl.demo.node import LEAN_MALLOC, node_process, token_file, wait_healthy
from gridfl.demo.options import DemoOptions
from gridfl.demo.plans import demo_plans
from gridfl.demo.report import CycleResult, RunResult
from gridfl.host import HostClient, closed_cycles

__all__ = ["DemoOptions", "run_demo"]


def run_demo(
    options: DemoOptions,
    *,
    on_cycle: Callable[[CycleResult], None] | None = None,
    on_step: Callable[[str], None] | None = None,
    on_dashboard: Callable[[str, Path], None] | None = None,
) -> RunResult:
    """Run a whole federated training and return its results (also saved to ``out_dir``).

    ``on_cycle`` gets each cycle's result as it is taken in; ``on_step`` gets a short line
    as each start-up step begins (shards, each plan's compilation, the node and workers,
    hosting), since start-up can take half a minute before the first cycle closes::

        run_demo(DemoOptions(model="2nn"), on_step=print)

    ``on_dashboard`` gets the node's dashboard URL and the file holding the admin token
    to sign in with (readable by this user only) once the node is up.
    """
    step = on_step or (lambda message: None)
    options.validate()
    options.data_dir.mkdir(parents=True, exist_ok=True)
    ready = ReadyData.of(options)
    name, version = f"mnist-{options.model}", "1"
    result = RunResult(settings={**_jsonable(asdict(options)), "per_cycle": options.per_cycle})

    for i in range(options.workers):  # a crashed earlier run's logs
        _norms_log(options, i).unlink(missing_ok=True)
    token = secrets.token_urlsafe(16)
    parallel = usable_cpus() if options.parallel is None else options.parallel
    # The node and the workers start first: their start-up (a second or two of imports,
    # migrations, connections) overlaps loading the data and the plans. Workers open
    # their shards only once told to go, when the shards are surely written.
    step(f"starting the grid node and {options.workers} worker processes")
    with (
        compute_slots(parallel) as slots,
        node_process(options.data_dir, token) as (url, node_proc, node_started),
        HostClient(url, admin_token=token) as host,
    ):
        # ten processes share the cores: one plan thread each. They run at a lower
        # priority than the node, as if on machines of their own: a node request never
        # waits behind a worker's training step.
        forked = Workers.start(
            [_worker_argv(options, i, url, name, version, ready, slots)
             for i in range(options.workers)],
            env={**LEAN_MALLOC, "OMP_NUM_THREADS": "1", "GRIDFL_PLAN_THREADS": "1"},
        )
        workers = forked.processes
        with killed_on_error(workers):  # a node that never came up: no orphans
            mnist = _ready_data(options, ready, step)
            model_bytes, training_bytes, evaluation_bytes = demo_plans(options, mnist, step)
            initial_params = state.loads(model_bytes)
            training_plan = Plan.from_bytes(training_bytes)
            evaluation_plan = Plan.from_bytes(evaluation_bytes)
            x_test, y_test = ready.test_set()  # all the demo itself keeps of MNIST
            mnist = Mnist(x_test[:0], y_test[:0], x_test, y_test)
            wait_healthy(url, node_proc)
            node_up = time.perf_counter()
            result.node_boot_seconds = round(node_up - node_started, 2)
            if on_dashboard is not None:
                on_dashboard(f"{url}/dashboard/", token_file(options.data_dir, token))
            step(f"node up in {result.node_boot_seconds:.1f} s; hosting {name} version {version}")
            with contextlib.suppress(GridflError):
                host.delete(name, version)  # a previous run in the same data dir
            host.host(
                model=initial_params,
                plans={
                    "training_plan": training_plan,
                    **({"evaluation_plan": evaluation_bytes} if options.federated_every else {}),
                },
                client_config={
                    "name": name,
                    "version": version,
                    "batch_size": options.batch_size,
                    "lr": options.lr,
                    "max_epochs": options.epochs,
                },
                server_config=options.server_config(),
            )
            result.host_seconds = round(time.perf_counter() - node_up, 2)
        step(
            f"training: buffers of {options.buffer_size} reports (async), up to "
            f"{options.cycles} checkpoints"
            if options.asynchronous
            else f"training: {options.per_cycle} workers per cycle, up to {options.cycles} cycles"
        )
        forked.go()
        windows: dict[int, tuple[float, float]] = {}
        try:
            _watch(
                host,
                name,
                version,
                node_up,
                options,
                mnist,
                evaluation_plan,
                result,
                [node_proc, *workers],
                on_cycle,
                windows,
            )
            _await_last_evaluation(host, name, version, options, result)
        finally:
            with contextlib.suppress(GridflError):
                host.stop(name, version)
            for w in workers:
                try:
                    w.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    w.kill()
        _take_federated(host.evaluations(name, version), result)
        if options.dp_noise is not None:
            _take_norms(options, windows, result)
        if not options.evaluate:  # evaluate afterwards, so it never slows the cycles
            for entry in result.cycles:
                params = host.retrieve(name, version, entry.checkpoint)
                entry.test_loss, entry.test_accuracy = _evaluate(evaluation_plan, mnist, params)
    result.save(options.out_dir)
    return result


def _worker_argv(options: DemoOptions, i: int, url: str, name: str, version: str,
                 ready: ReadyData, slots: Path | None) -> list[str]:
    """``gridfl.demo.worker``'s arguments for worker process ``i``."""
    return [
        url.replace("http", "ws", 1), name, version, str(ready.shard(i)),
        "--seed", str(options.seed * 1000 + i),
        "--nice", "10",
        *(["--compute-slots", str(slots)] if slots else []),
        *(["--evaluate"] if options.federated_every else []),
        *(["--norms-log", str(_norms_log(options, i))] if options.dp_noise is not None
          else []),
        *(["--attack", options.attack] if i < options.byzantine else []),
        # the last slow_workers processes (the Byzantine ones are the first)
        *(["--slowdown", str(options.slowdown)]
          if i >= options.workers - options.slow_workers else []),
    ]


def _ready_data(options: DemoOptions, ready: ReadyData,
                step: Callable[[str], None]) -> Mnist | None:
    """Make sure the shards and the test set are in place; MNIST if it was loaded."""
    if ready.complete():
        step(f"shards found in {ready.directory}")
        return None
    step("loading MNIST and writing the shards")
    mnist = load_mnist()
    ready.write(mnist, options)
    return mnist


_WATCH_WINDOW = 4
_MEMORY_EVERY = 2.0  # seconds between memory readings while the demo runs
# longest a status request is held by the node waiting for the next cycle to close: the
# demo notices a crashed worker within about this long
_HOLD = 1.0


def _watch(
    host, name, version, node_up, options, mnist, evaluation_plan, result, procs, on_cycle,
    windows,
) -> None:
    """Follow the node's status; evaluate each new checkpoint; stop at the target. Each
    aggregated cycle's (start, closed_at) on the node's clock goes into ``windows``."""
    seen = 0  # the newest cycle taken in
    memory = PeakMemory(procs[0], procs[1:])
    # the node's clock (same machine) at node_up: start-up is read off the node's own
    # closing time of the first cycle, not off when a poll happened to see it
    node_up_at = time.time() - (time.perf_counter() - node_up)
    while True:
        # held by the node until a cycle after the last one taken in closes, or _HOLD
        status, closed = closed_cycles(
            host, name, version, seen, wait=_HOLD, window=_WATCH_WINDOW
        )
        memory.sample(every=_MEMORY_EVERY)
        first = not result.cycles
        for c in closed:
            seen = c["sequence"]
            if not c["result_checkpoint"]:  # expired or stopped: no new model to take in
                continue
            entry = CycleResult(
                cycle=c["sequence"],
                checkpoint=c["result_checkpoint"],
                reports=c["reported"],
                seconds=round(c["closed_at"] - c["start"], 4),
                elapsed=round(time.perf_counter() - node_up, 2),
                train_loss=c["metrics"].get("loss"),
                epsilon=c.get("epsilon"),
                clip_norm=c.get("clip_norm"),
            )
            windows[c["sequence"]] = (c["start"], c["closed_at"])
            if result.startup_seconds is None:
                result.startup_seconds = round(c["closed_at"] - node_up_at, 2)
                result.first_checkpoint_at = c["closed_at"]
            if options.evaluate:
                params = host.retrieve(name, version, c["result_checkpoint"])
                entry.test_loss, entry.test_accuracy = _evaluate(evaluation_plan, mnist, params)
            result.cycles.append(entry)
            if on_cycle:
                on_cycle(entry)
        _take_federated(status.get("evaluations"), result)
        if first and result.cycles:  # every process has loaded and trained once by now
            memory.sample()
        last = result.cycles[-1] if result.cycles else None
        reached = (
            options.target is not None
            and last is not None
            and last.test_accuracy is not None
            and last.test_accuracy >= options.target
        )
        if reached or (status["current"] is None and result.cycles and _done(status)):
            break
        if any(p.poll() not in (None, 0) for p in procs):
            raise GridflError("a worker or the node crashed; see its output above")
    memory.sample()
    result.peak_rss_mb, result.peak_pss_mb = memory.peak_rss_mb, memory.peak_pss_mb
    result.memory_mb = memory.breakdown()


def _await_last_evaluation(host, name, version, options, result, limit: float = 60.0) -> None:
    """Once training finished, give the workers up to ``limit`` seconds to evaluate the
    last due checkpoint before the demo stops the process (which ends evaluations too)."""
    every = options.federated_every
    if not every or not result.cycles or host.status(name, version, cycles=1)["status"] != (
        "finished"
    ):
        return
    due = 1 + every * ((result.cycles[-1].checkpoint - 1) // every)
    deadline = time.monotonic() + limit
    while due > 1 and time.monotonic() < deadline:
        evaluations = host.evaluations(name, version) or []
        if any(e["checkpoint"] == due and e["reported"] >= options.per_cycle
               for e in evaluations):
            return
        time.sleep(0.2)


def _take_federated(evaluations: list[dict] | None, result: RunResult) -> None:
    """The node's federated evaluations (weighted means over the workers' held-out data)
    into the cycles whose checkpoints they evaluated."""
    by_checkpoint = {e["checkpoint"]: e for e in evaluations or [] if e["reported"]}
    for entry in result.cycles:
        e = by_checkpoint.get(entry.checkpoint)
        if e is not None:
            entry.federated_loss = e["metrics"].get("loss")
            entry.federated_accuracy = e["metrics"].get("accuracy")


def _norms_log(options: DemoOptions, worker: int) -> Path:
    return options.data_dir / f"norms-{worker}"


def _take_norms(options: DemoOptions, windows: dict, result: RunResult) -> None:
    """The update norms the workers logged (:mod:`gridfl.demo.norms`) into the cycles
    they were reported to, with their target quantile (adaptive clipping's goal for C)."""
    logs = [_norms_log(options, i) for i in range(options.workers)]
    found = norms.by_cycle(logs, windows)
    for entry in result.cycles:
        entry.update_norms = found.get(entry.cycle, [])
        entry.norm_quantile = norms.quantile(entry.update_norms, options.dp_target_quantile)
    for log in logs:
        log.unlink(missing_ok=True)  # read: a later run in this data dir starts afresh


def _done(status: dict) -> bool:
    return status.get("status") in ("finished", "stopped") or status["current"] is None


def _evaluate(plan, mnist, params, batch: int = 2000) -> tuple[float, float]:
    """Test loss and accuracy of ``params`` on the 10k test set."""
    losses, correct = 0.0, 0.0
    n = len(mnist.y_test)
    for i in range(0, n, batch):
        x, y = mnist.x_test[i : i + batch], mnist.y_test[i : i + batch]
        loss, acc = plan.execute(x, y, *params)[:2]
        losses += float(loss) * len(y)
        correct += float(acc) * len(y)
    return round(losses / n, 5), round(correct / n, 5)



def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
