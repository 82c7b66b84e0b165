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
import multiprocessing
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gridfl import Plan, state
from gridfl._exceptions import ConfigError, GridflError
from gridfl.compression import KINDS, validate_config
from gridfl.datasets import Mnist, load_mnist
from gridfl.demo import norms
from gridfl.demo.data import ReadyData
from gridfl.demo.launch import WorkerProcess, Workers
from gridfl.demo.report import CycleResult, RunResult
from gridfl.demo.worker import ATTACKS
from gridfl.host import HostClient, closed_cycles
from gridfl.plan_cache import plan_key, resolve_cache

__all__ = ["DemoOptions", "run_demo"]

# glibc keeps freed multi-MB buffers (diffs, base64 text) in per-thread arenas; two arenas
# and a fixed mmap threshold hand them back to the system (docs/deployment.md).
_LEAN_MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


@dataclass
class DemoOptions:
    """Knobs of the demo (McMahan et al.'s names in comments)."""

    model: str = "cnn"
    clients: int = 100  # K
    fraction: float = 0.1  # C: share of clients trained per cycle
    epochs: int = 1  # E
    batch_size: int = 10  # B
    lr: float = 0.1
    cycles: int = 20
    target: float | None = 0.98  # stop once the test accuracy reaches this
    iid: bool = True
    seed: int = 0
    workers: int = 10  # OS processes holding the K clients
    parallel: int | None = None  # workers training at once (None: the CPU count; 0: all)
    examples_per_client: int | None = None  # cut shards (quick runs, tests)
    evaluate: bool = True  # evaluate each checkpoint while training runs
    strategy: str = "fedavg"  # server_config.strategy name (docs/configs.md)
    server_lr: float | None = None  # eta / server_learning_rate of a server optimizer
    proximal_mu: float | None = None  # FedProx's mu: strategy fedprox, plan compiled with it
    byzantine: int = 0  # worker processes that report poisoned diffs
    attack: str = "scale"  # what they send: scale (x100), signflip or noise
    # differential privacy (docs/privacy.md): noise multiplier z and clip norm C (the
    # initial one when adaptive); the population is the K clients
    dp_noise: float | None = None
    dp_clip: float | None = None
    dp_adaptive: bool = False
    dp_target_quantile: float = 0.5  # adaptive: the share of update norms C is to sit above
    #: reports compressed as float16, int8 or topk (10%, error feedback); None = plain
    compression: str | None = None
    asynchronous: bool = False  # server_config.mode "async" (FedBuff) instead of cycles
    buffer_size: int = 10  # async: reports per published checkpoint (FedBuff's K)
    slow_workers: int = 0  # worker processes that are `slowdown` times slower
    slowdown: float = 5.0  # how much slower: they sleep (slowdown - 1) x their training time
    secure_aggregation: bool = False  # the node learns only each cycle's sum
    #: federated evaluation (server_config.evaluation) of every n-th checkpoint on each
    #: worker's held-out 10% of its client's examples; None = off
    federated_every: int | None = None
    data_dir: Path = field(default_factory=lambda: Path("data/demo"))
    out_dir: Path = field(default_factory=lambda: Path("results"))

    def validate(self) -> None:
        if self.model not in ("cnn", "2nn"):
            raise ConfigError(f"model must be cnn or 2nn, got {self.model!r}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction C must be in (0, 1], got {self.fraction}")
        if self.parallel is not None and self.parallel < 0:
            raise ConfigError(f"parallel must be 0 (no limit) or more, got {self.parallel}")
        for name in ("clients", "epochs", "batch_size", "cycles", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers > self.clients:
            raise ConfigError(f"workers ({self.workers}) cannot exceed clients ({self.clients})")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        self.secure_aggregation_config()
        if self.compression is not None and self.compression not in KINDS:
            raise ConfigError(
                f"compression must be one of {', '.join(KINDS)} (or None), "
                f"got {self.compression!r}"
            )
        if not 0 <= self.byzantine <= self.workers:
            raise ConfigError(
                f"byzantine must be 0 to workers ({self.workers}), got {self.byzantine}"
            )
        if self.attack not in ATTACKS:
            raise ConfigError(f"attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        self.strategy_config()  # the node would refuse it: say so before starting anything
        if (self.dp_noise is None) != (self.dp_clip is None):
            raise ConfigError("differential privacy needs both dp_noise (z) and dp_clip (C)")
        if self.dp_adaptive and self.dp_noise is None:
            raise ConfigError("dp_adaptive needs dp_noise and dp_clip")
        if not 0 <= self.slow_workers <= self.workers:
            raise ConfigError(
                f"slow_workers must be 0 to workers ({self.workers}), got {self.slow_workers}"
            )
        if not 1 <= self.slowdown <= 100:
            raise ConfigError(f"slowdown must be in [1, 100], got {self.slowdown}")
        from gridfl.server.config import validate_server_config  # the node's own rules

        validate_server_config(self.server_config())  # refused: say so before starting

    def strategy_config(self) -> dict | None:
        """``server_config.strategy`` for these options (``None``: FedAvg). Krum and Bulyan
        assume as many Byzantine reports as there are Byzantine workers."""
        from gridfl.server.strategies import OPTIMIZERS, normalize  # the node's own rules

        if self.proximal_mu is not None or self.strategy == "fedprox":
            return self._fedprox_config()
        if self.strategy == "fedavg" and (self.server_lr is None or self.asynchronous):
            return None  # async FedAvg takes --server-lr as server_config.server_lr
        cfg: dict = {"name": self.strategy}
        if self.server_lr is not None:
            key = {"fedavgm": "server_learning_rate"}.get(self.strategy, "eta")
            if self.strategy not in OPTIMIZERS:
                raise ConfigError(
                    f"--server-lr sets a server optimizer's rate ({', '.join(sorted(OPTIMIZERS))});"
                    f" {self.strategy} has none"
                )
            cfg[key] = self.server_lr
        if self.strategy in ("krum", "multikrum", "bulyan"):
            cfg["num_malicious_nodes"] = self.byzantine
        normalize(cfg, max_diffs=self.per_cycle, min_diffs=self.per_cycle)
        return cfg

    def _fedprox_config(self) -> dict:
        from gridfl.server.strategies import normalize

        if self.strategy not in ("fedavg", "fedprox") or self.server_lr is not None:
            raise ConfigError(
                "--proximal-mu runs FedProx, which aggregates with FedAvg: drop --strategy "
                f"{self.strategy}" + (" and --server-lr" if self.server_lr is not None else "")
            )
        if self.proximal_mu is None:
            raise ConfigError("--strategy fedprox needs --proximal-mu (e.g. 0.01)")
        cfg = {"name": "fedprox", "proximal_mu": self.proximal_mu}
        normalize(cfg, max_diffs=self.per_cycle, min_diffs=self.per_cycle)
        return cfg

    def differential_privacy(self) -> dict | None:
        """The process's ``server_config.differential_privacy``, or None."""
        if self.dp_noise is None:
            return None
        clip = (
            {"initial": self.dp_clip, "target_quantile": self.dp_target_quantile}
            if self.dp_adaptive
            else self.dp_clip
        )
        return {"noise_multiplier": self.dp_noise, "clip_norm": clip,
                "population_size": self.clients}

    @property
    def compression_config(self) -> dict | None:
        """``server_config.compression`` for :attr:`compression` (top-k: its default 10%)."""
        return None if self.compression is None else validate_config({"kind": self.compression})

    def secure_aggregation_config(self) -> dict | None:
        """``server_config.secure_aggregation`` for :attr:`secure_aggregation`: every worker
        of a cycle shares with every other, and a bare majority must survive."""
        if not self.secure_aggregation:
            return None
        if self.asynchronous or self.per_cycle < 2:
            raise ConfigError(
                "secure aggregation needs cycles (not --async) of at least 2 workers (C * K)"
            )
        return {"threshold": self.per_cycle // 2 + 1}

    def evaluation_config(self) -> dict | None:
        """``server_config.evaluation`` for :attr:`federated_every`: as many workers
        evaluate as train in a cycle."""
        if self.federated_every is None:
            return None
        return {"every": self.federated_every, "max_workers": self.per_cycle}

    def server_config(self) -> dict:
        """The process's ``server_config``: cycles of ``per_cycle`` workers, or (async)
        FedBuff buffers of ``buffer_size`` reports; ``cycles`` checkpoints either way."""
        if not self.asynchronous:
            return {
                "max_workers": self.per_cycle,
                "min_diffs": self.per_cycle,
                "max_diffs": self.per_cycle,
                "num_cycles": self.cycles,
                "cycle_length": 600,
                "strategy": self.strategy_config(),
                "differential_privacy": self.differential_privacy(),
                "compression": self.compression_config,
                "secure_aggregation": self.secure_aggregation_config(),
                "evaluation": self.evaluation_config(),
            }
        cfg = {
            "mode": "async",
            "buffer_size": self.buffer_size,
            "num_cycles": self.cycles,
            "strategy": self.strategy_config(),
            "differential_privacy": self.differential_privacy(),
            "compression": self.compression_config,
            "evaluation": self.evaluation_config(),
        }
        if self.strategy == "fedavg" and self.server_lr is not None:
            cfg["server_lr"] = self.server_lr
        return cfg

    @property
    def per_cycle(self) -> int:
        """Workers the node accepts per cycle: round(C * K), at most one per process."""
        return max(1, min(self.workers, round(self.fraction * self.clients)))


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
    parallel = _usable_cpus() if options.parallel is None else options.parallel
    # The node and the workers start first: their start-up (a second or two of imports,
    # migrations, connections) overlaps loading the data and the plans. Workers open
    # their shards only once told to go, when the shards are surely written.
    step(f"starting the grid node and {options.workers} worker processes")
    with (
        _compute_slots(parallel) as slots,
        _node(options.data_dir, token) as (url, node_proc, node_started),
        HostClient(url, admin_token=token) as host,
    ):
        # ten processes share the cores: one plan thread each. They run at a lower
        # priority than the node, as if on machines of their own: a node request never
        # waits behind a worker's training step.
        forked = Workers.start(
            [_worker_argv(options, i, url, name, version, ready, slots)
             for i in range(options.workers)],
            env={**_LEAN_MALLOC, "OMP_NUM_THREADS": "1", "GRIDFL_PLAN_THREADS": "1"},
        )
        workers = forked.processes
        with _killed_on_error(workers):  # a node that never came up: no orphans
            mnist = _ready_data(options, ready, step)
            model_bytes, training_bytes, evaluation_bytes = _plans(options, mnist, step)
            initial_params = state.loads(model_bytes)
            training_plan = Plan.from_bytes(training_bytes)
            evaluation_plan = Plan.from_bytes(evaluation_bytes)
            x_test, y_test = ready.test_set()  # all the demo itself keeps of MNIST
            mnist = Mnist(x_test[:0], y_test[:0], x_test, y_test)
            _wait_healthy(url, node_proc)
            node_up = time.perf_counter()
            result.node_boot_seconds = round(node_up - node_started, 2)
            if on_dashboard is not None:
                on_dashboard(f"{url}/dashboard/", _token_file(options.data_dir, token))
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


# --------------------------------------------------------------------------- pieces
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


def _plans(options: DemoOptions, mnist: Mnist | None,
           step: Callable[[str], None]) -> tuple[bytes, bytes, bytes]:
    """The initial model and its training and evaluation plans: from the plan cache
    (read without torch) or compiled, then cached. The demo's models are named by
    gridfl's sources, which the key's versions cover (named without torch: the
    compiler's own keys describe a torch module)."""
    store = resolve_cache(None)
    key = plan_key("demo", {"model": options.model, "seed": options.seed},
                   batch_size=options.batch_size, loss="cross_entropy", lr=options.lr,
                   proximal_mu=options.proximal_mu)
    blobs = None if store is None else store.get(key)
    if store is not None and blobs is not None and set(blobs) == {
        "model", "training", "evaluation"
    }:
        step(f"plans found in the cache ({store.directory})")
        return blobs["model"], blobs["training"], blobs["evaluation"]
    if mnist is None:  # the shards were ready: MNIST only for the example batch
        mnist = load_mnist()
    x, y = mnist.x_train[: options.batch_size], mnist.y_train[: options.batch_size]
    # torch lives only in a short-lived compiler process: this one stays small.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        step(f"compiling the {options.model.upper()} training plan (imports PyTorch)")
        model_bytes, training_bytes = pool.submit(_compile_training, options, x, y).result()
        step("compiling the evaluation plan")
        evaluation_bytes = pool.submit(_compile_evaluation, options, x, y).result()
    if store is not None:
        store.put(key, {"model": model_bytes, "training": training_bytes,
                        "evaluation": evaluation_bytes})
        step(f"plans cached in {store.directory}")
    return model_bytes, training_bytes, evaluation_bytes


def _compile_training(options: DemoOptions, x: np.ndarray, y: np.ndarray) -> tuple[bytes, bytes]:
    """The initial model's State bytes and its training plan's bytes (runs in a child
    process: imports torch)."""
    from gridfl.compiler import SGD, compile_training_plan
    from gridfl.demo.models import build_model

    model = build_model(options.model, seed=options.seed)
    training = compile_training_plan(
        model,
        loss="cross_entropy",
        optimizer=SGD(lr=options.lr),
        example_data=x,
        example_target=y,
        proximal_mu=options.proximal_mu,
        cache=False,  # the demo caches its plans, model included, in the parent
    )
    return state.dumps([p.detach().numpy() for p in model.parameters()]), training.to_bytes()


def _compile_evaluation(options: DemoOptions, x: np.ndarray, y: np.ndarray) -> bytes:
    """The evaluation plan's bytes (a second call to the same child process, so the two
    compilations are told apart; the plan takes the parameters as inputs, so the model
    built again here only gives it its shapes)."""
    from gridfl.compiler import compile_evaluation_plan
    from gridfl.demo.models import build_model

    model = build_model(options.model, seed=options.seed)
    return compile_evaluation_plan(
        model, loss="cross_entropy", example_data=x, example_target=y, cache=False
    ).to_bytes()


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def _compute_slots(n: int) -> Iterator[Path | None]:
    """A FIFO holding ``n`` slot bytes for the workers' ``ComputeSlots`` (None: no limit,
    when ``n`` is 0 or the platform has no FIFOs)."""
    if n <= 0 or not hasattr(os, "mkfifo"):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="gridfl-slots-") as tmp:
        path = Path(tmp) / "slots"
        os.mkfifo(path)
        fd = os.open(path, os.O_RDWR)  # held open: the bytes live as long as the run
        try:
            os.write(fd, b"+" * n)
            yield path
        finally:
            os.close(fd)


def _token_file(data_dir: Path, token: str) -> Path:
    """This run's admin token in ``data_dir/demo-admin-token``, mode 0600 (never printed:
    terminals and CI logs are kept)."""
    path = data_dir / "demo-admin-token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


@contextlib.contextmanager
def _node(data_dir: Path, token: str) -> Iterator[tuple[str, subprocess.Popen, float]]:
    """A grid node in its own process (its own GIL), on a free loopback port; yields its
    URL, its process and when it was started (``time.perf_counter``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = data_dir / "gridfl.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)  # a fresh grid per run
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gridfl",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
        ],
        env={**os.environ, **_LEAN_MALLOC, "GRIDFL_ADMIN_TOKEN": token},
    )
    try:
        yield f"http://127.0.0.1:{port}", proc, started
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def _killed_on_error(procs: list[WorkerProcess]) -> Iterator[None]:
    """Kill ``procs`` if the block raises (workers would retry a dead node forever)."""
    try:
        yield
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        raise


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GridflError(f"the grid node exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).is_success:
                return
        time.sleep(0.05)
    raise GridflError(f"the grid node did not answer on {url} within {timeout:.0f} s")


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
    memory = _PeakMemory(procs[0], procs[1:])
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


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB; (0, 0) once it is gone.

    RSS counts every page mapped, so the onnxruntime and numpy libraries that eleven
    processes share are counted eleven times in a sum of RSS; PSS divides each shared page
    among the processes that map it, so a sum of PSS is the physical memory they use.
    """
    rss = pss = 0
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except FileNotFoundError:  # gone, or a kernel before 4.14: fall back to VmRSS
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = pss = int(line.split()[1])
        return rss, pss
    except OSError:
        return 0, 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


class _PeakMemory:
    """Peaks of the node + workers' summed RSS and summed PSS (over samples), and of each
    process's own RSS and PSS."""

    def __init__(self, node, workers) -> None:
        self.node, self.workers = node, list(workers)
        self.rss_sum = self.pss_sum = 0  # kB
        self.node_kb = [0, 0]
        self.worker_kb = [0, 0]  # the largest worker's
        self._last = -float("inf")

    def sample(self, *, every: float = 0.0) -> None:
        """Read every process's memory, unless the last reading is under ``every``
        seconds old: reading PSS walks each process's page tables (about 40 ms of CPU for
        a 2NN demo's eleven processes, more for the CNN's), too much for every status poll."""
        now = time.monotonic()
        if now - self._last < every:
            return
        self._last = now
        node = _memory_kb(self.node.pid)
        workers = [_memory_kb(w.pid) for w in self.workers]
        self.rss_sum = max(self.rss_sum, node[0] + sum(w[0] for w in workers))
        self.pss_sum = max(self.pss_sum, node[1] + sum(w[1] for w in workers))
        self.node_kb = [max(a, b) for a, b in zip(self.node_kb, node, strict=True)]
        for w in workers:
            self.worker_kb = [max(a, b) for a, b in zip(self.worker_kb, w, strict=True)]

    @property
    def peak_rss_mb(self) -> float:
        return round(self.rss_sum / 1024, 1)

    @property
    def peak_pss_mb(self) -> float:
        return round(self.pss_sum / 1024, 1)

    def breakdown(self) -> dict[str, float]:
        mb = [round(kb / 1024, 1) for kb in (*self.node_kb, *self.worker_kb)]
        return dict(zip(("node_rss", "node_pss", "worker_rss", "worker_pss"), mb, strict=True))


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
