"""The simulation loop: rounds of training over virtual clients, aggregated by the node's
own strategy, evaluated centrally and/or federatedly.

Per round, ``clients_per_round`` clients are drawn (without replacement, from a generator
seeded by ``(seed, round)``), train in the backend, and their reports are folded into the
node's :class:`~gridfl.server.aggregate.RunningSums` in the order drawn, through the
strategy :func:`gridfl.server.strategies.strategy_for` builds for the process's
``server_config`` (a robust rule's diffs are kept in memory, where the node keeps them
in its database): what a node does with the same reports in the same order. Each
client's training seed is drawn from ``(seed, round, client)``, so a run is a function of
its seed, on any backend and any number of workers.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gridfl import state
from gridfl._exceptions import (
    AggregationAbortedError,
    ConfigError,
    InvalidRequestError,
    ModelError,
)
from gridfl._resources import memory_kb, usable_cpus
from gridfl.server import aggregate as agg
from gridfl.server.dp_config import DPConfig
from gridfl.simulation import clients
from gridfl.simulation.backends import BACKENDS, LocalPool, RayPool, open_backend
from gridfl.simulation.central import AT_MOST, evaluate_towards
from gridfl.simulation.compress import SimulatedCompression
from gridfl.simulation.partition import partition
from gridfl.simulation.privacy import SimulatedPrivacy, check_population
from gridfl.simulation.results import RoundResult, SimulationResult
from gridfl.simulation.store import ShardStore, map_npz

__all__ = ["SimulationOptions", "simulate"]

Data = tuple[Any, Any] | str | Path


@dataclass
class SimulationOptions:
    """The knobs of a simulation (the process itself is given as to the host SDK).

    ``rounds`` defaults to ``server_config["num_cycles"]`` and ``clients_per_round`` to
    ``server_config["max_diffs"]``, else ``max_workers``. ``evaluate_every`` rounds the
    new model is evaluated centrally (on ``test_data``); ``federated_every`` rounds,
    ``federated_clients`` drawn clients evaluate it on their held-out share
    (``held_out`` of each client's examples, kept out of training); they default to the
    node's ``server_config.evaluation`` ``every`` and ``max_workers``.

    With ``target_accuracy`` (and ``test_data``), the run stops after the first round
    whose model reaches that central accuracy (``result.target_round``); it is evaluated
    every ``evaluate_every`` rounds while its accuracy is more than ``near_target`` below
    the target, then every round, so the round reported is exact once the run gets near.
    """

    num_clients: int = 100
    partitioner: str | Callable[..., Any] = "iid"
    partition_options: dict[str, Any] = field(default_factory=dict)
    rounds: int | None = None
    clients_per_round: int | None = None
    evaluate_every: int = 1
    federated_every: int | None = None
    federated_clients: int | None = None
    held_out: float | None = None
    seed: int = 0
    workers: int | None = None
    backend: str = "local"
    ray_address: str | None = None
    out_dir: Path | None = None
    progress: bool = False
    byzantine: int = 0
    attack: str = "scale"
    target_accuracy: float | None = None
    near_target: float = 0.01

    def resolve(self, server_config: Mapping[str, Any]) -> None:
        """Fill the defaults from ``server_config`` and refuse what cannot run."""
        if self.rounds is None:
            self.rounds = server_config.get("num_cycles") or None
        if self.clients_per_round is None:
            self.clients_per_round = (
                server_config.get("max_diffs") or server_config.get("max_workers")
            )
        node_evaluation = server_config.get("evaluation")
        if node_evaluation is not None and self.federated_every is None:
            self.federated_every = node_evaluation["every"]
            self.federated_clients = self.federated_clients or node_evaluation["max_workers"]
        for name in ("rounds", "clients_per_round"):
            value = getattr(self, name)
            if value is None:
                raise ConfigError(
                    f"{name} is not set: pass it, or set server_config "
                    f"{'num_cycles' if name == 'rounds' else 'max_diffs'}"
                )
            _positive(name, value)
        assert self.clients_per_round is not None
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients_per_round ({self.clients_per_round}) is more than the "
                f"{self.num_clients} clients"
            )
        _positive("evaluate_every", self.evaluate_every)
        for name in ("target_accuracy", "near_target"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)
                                      or not 0 <= value <= 1):
                raise ConfigError(f"{name} must be a number from 0 to 1, got {value!r}")
        self._check_attack()
        if self.federated_every is not None:
            _positive("federated_every", self.federated_every)
            self.federated_clients = self.federated_clients or self.clients_per_round
            _positive("federated_clients", self.federated_clients)
            if self.federated_clients > self.num_clients:
                raise ConfigError(
                    f"federated_clients ({self.federated_clients}) is more than the "
                    f"{self.num_clients} clients"
                )
            if self.held_out is None:
                self.held_out = 0.1
        if self.held_out is None:
            self.held_out = 0.0
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}"
            )
        self.workers = self.workers or usable_cpus()
        _positive("workers", self.workers)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")

    def _check_attack(self) -> None:
        from gridfl.demo.worker import ATTACKS

        assert self.clients_per_round is not None
        if (isinstance(self.byzantine, bool) or not isinstance(self.byzantine, int)
                or not 0 <= self.byzantine <= self.clients_per_round):
            raise ConfigError(f"byzantine must be an integer from 0 to clients_per_round "
                              f"({self.clients_per_round}), got {self.byzantine!r}")
        if self.attack not in ATTACKS:
            raise ConfigError(f"attack must be one of {', '.join(ATTACKS)}, "
                              f"got {self.attack!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def load_data(data: Data, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from a pair of arrays or an ``.npz`` with arrays ``x`` and ``y`` (mapped,
    not read, when it is not compressed: the workers then map the same file)."""
    mapped = map_npz(data) if isinstance(data, str | Path) and zipfile.is_zipfile(data) else None
    if mapped is not None and {"x", "y"} <= mapped.keys():
        x, y = mapped["x"], mapped["y"]
    elif isinstance(data, str | Path):
        with np.load(data, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                raise ConfigError(f"{what} {data} must hold arrays 'x' and 'y' (has {npz.files})")
            x, y = npz["x"], npz["y"]
    else:
        if len(data) != 2:
            raise ConfigError(f"{what} must be (x, y) or an .npz path")
        x, y = np.asarray(data[0]), np.asarray(data[1])
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise ConfigError(f"{what}: x and y need the same number of examples on the first axis")
    return x, y


def check_shapes(plan, x: np.ndarray, y: np.ndarray, what: str) -> None:
    """Refuse data whose examples do not have the shape the plan's inputs take."""
    for s in plan.inputs:
        if s.role not in ("data", "target"):
            continue
        arr = x if s.role == "data" else y
        want, got = s.shape[1:], arr.shape[1:]
        if len(want) != len(got) or any(d is not None and d != g for d, g in zip(want, got,
                                                                               strict=False)):
            raise ConfigError(
                f"the {what} takes {s.role} of shape {s.shape_str()}, but the {s.role} "
                f"given is {tuple(arr.shape)}: the plan does not match the data"
            )


#: server_config keys a simulation refuses rather than ignore, with their "off" value
_NOT_SIMULATED = {"mode": "sync"}


def simulate(
    *,
    model: Any,
    plans: Mapping[str, Any],
    client_config: Mapping[str, Any],
    data: Data,
    server_config: Mapping[str, Any] | None = None,
    averaging_plan: Any = None,
    test_data: Data | None = None,
    options: SimulationOptions | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
) -> SimulationResult:
    """Run a hosted process definition over virtual clients; see the module docstring.

    ``model``, ``plans``, ``client_config``, ``server_config`` and ``averaging_plan`` are
    what :meth:`gridfl.host.HostClient.host` takes, validated as the node validates them.
    ``plans`` needs a ``training_plan``, and an ``evaluation_plan`` for any evaluation.
    ``data`` and ``test_data`` are ``(x, y)`` or an ``.npz`` with ``x`` and ``y``.
    With ``options.out_dir``, ``results.json`` and ``results.png`` are written there::

        result = simulate(model=params, plans={"training_plan": plan,
                          "evaluation_plan": evaluation}, client_config={"name": "m",
                          "version": "1", "batch_size": 10, "lr": 0.1},
                          data=(x, y), test_data=(x_test, y_test),
                          options=SimulationOptions(num_clients=1000, rounds=20,
                                                    clients_per_round=10))  # doctest: +SKIP
        print(result.rounds[-1].central)                                   # doctest: +SKIP
    """
    started = time.perf_counter()
    # a copy: resolving fills defaults from this process's server_config only
    opts = dataclasses.replace(options) if options is not None else SimulationOptions()
    with tempfile.TemporaryDirectory(prefix="gridfl-sim-") as tmp:
        # the pool's processes start (interpreter, numpy, onnxruntime) while this one
        # validates the process and writes the clients' shards
        early = (LocalPool(tmp, opts.workers or usable_cpus())
                 if opts.backend == "local" and _is_count(opts.workers) else None)
        try:
            return _simulate(opts, started, tmp, early, on_round, data, test_data, dict(
                model=model, plans=plans, client_config=client_config,
                server_config=server_config, averaging_plan=averaging_plan))
        finally:
            if early is not None:
                early.close()


def _is_count(value: Any) -> bool:
    """``None`` (one per core) or an integer >= 1; anything else is refused later."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool)
                             and value >= 1)


def _simulate(opts: SimulationOptions, started: float, tmp: str, early: LocalPool | None,
              on_round: Callable[[RoundResult], None] | None, data: Data,
              test_data: Data | None, process: dict[str, Any]) -> SimulationResult:
    from gridfl.host import host_payload
    from gridfl.plan import Plan
    from gridfl.server.hosting import validate
    from gridfl.server.strategies import strategy_for

    request = validate(host_payload(**process))
    unsupported = [key for key, off in _NOT_SIMULATED.items()
                   if request.server_config.get(key) != off]
    if unsupported:
        raise ConfigError(
            f"server_config {', '.join(unsupported)}: not simulated yet (a simulation runs "
            "synchronous rounds); remove it to simulate"
        )
    opts.resolve(request.server_config)
    dp = DPConfig.of(request.server_config)
    if dp is not None:
        assert opts.clients_per_round is not None  # resolved
        check_population(dp, opts.num_clients, opts.clients_per_round)
    rows = {r["name"]: r for r in request.plan_rows}
    if "training_plan" not in rows or rows["training_plan"].get("onnx") is None:
        raise ConfigError("plans needs a 'training_plan' with an ONNX variant")
    evaluation = rows.get("evaluation_plan", {}).get("onnx")
    central = test_data is not None
    if opts.target_accuracy is not None and not central:
        raise ConfigError("target_accuracy needs test_data: the target is a central accuracy")
    if (central or opts.federated_every) and evaluation is None:
        raise ConfigError(
            "evaluation needs an 'evaluation_plan' among the plans: host one, or run "
            "without test_data and federated_every"
        )
    if opts.out_dir is not None and Path(opts.out_dir).exists() and not Path(
            opts.out_dir).is_dir():
        raise ConfigError(f"out_dir {opts.out_dir} is a file, not a directory")
    x, y = load_data(data, "data")
    training = Plan.from_bytes(rows["training_plan"]["onnx"], threads=1)
    for name, plan_kind in (("training_plan", "training"), ("evaluation_plan", "evaluation")):
        blob = rows.get(name, {}).get("onnx")
        if blob is not None and Plan.from_bytes(blob).kind != plan_kind:
            raise ConfigError(f"plans.{name} must be a {plan_kind} plan")
    check_shapes(training, x, y, "training plan")
    # one thread: it runs beside the pool's workers (see _Rounds)
    eval_plan = Plan.from_bytes(evaluation, threads=1) if evaluation is not None else None
    test = load_data(test_data, "test_data") if test_data is not None else None
    if eval_plan is not None:
        check_shapes(eval_plan, x, y, "evaluation plan")
        if test is not None:
            check_shapes(eval_plan, *test, "evaluation plan")
    averaging = rows.get("averaging_plan")
    strategy = strategy_for(
        request.server_config["strategy"],
        Plan.from_bytes(averaging["onnx"], threads=1) if averaging else None,
    )
    if dp is not None:  # the node's DP-FedAvg; noise seeded from the run's seed
        strategy = SimulatedPrivacy(strategy, dp, opts.seed)
    secure = None
    if request.server_config.get("secure_aggregation") is not None:
        from gridfl.simulation.secure import SimulatedSecureAggregation

        assert opts.clients_per_round is not None  # resolved
        secure = SimulatedSecureAggregation(request.server_config, opts.clients_per_round,
                                            opts.seed)
    parts = partition(y, opts.num_clients, opts.partitioner, seed=opts.seed,
                      **opts.partition_options)

    params = state.loads(request.model_bytes)
    spec = request.spec
    job = clients.ClientJob(rows["training_plan"]["onnx"], evaluation, request.client_config)
    result = SimulationResult(settings=_settings(opts, request))
    store = ShardStore.write(tmp, x, y, parts, held_out=opts.held_out or 0.0)
    _check_batches(store, request.client_config)
    del x, y, parts  # the workers read the files; this process keeps no copy
    backend = (early.open(job, store) if early is not None
               else open_backend(opts.backend, job, store, workers=opts.workers or 1,
                                 ray_address=opts.ray_address))
    bar, stop_bar = _progress(opts)
    try:
        rounds = _Rounds(opts, backend, strategy, spec, params, result, started)
        rounds.secure = secure
        setting = request.server_config.get("compression")
        rounds.compression = SimulatedCompression(setting, spec) if setting else None
        rounds.central = (
            None if test is None or eval_plan is None
            else lambda model, target: evaluate_towards(eval_plan, model, *test,
                                                        request.client_config, target)
        )
        rounds.emit = lambda entry: (bar(entry), on_round and on_round(entry))
        params = rounds.run()
    finally:
        stop_bar()
        backend.close()
    result.total_seconds = round(time.perf_counter() - started, 3)
    result.peak_memory_mb = rounds.memory.peak_mb()
    result.final_params = params
    if opts.out_dir is not None:
        result.save(Path(opts.out_dir))
    return result


class _Rounds:
    """The round loop. Round ``r``'s central evaluation runs in this process while the
    pool trains round ``r + 1`` from the same model (it is that round's starting point),
    so the evaluation takes no time of its own; each round is reported once evaluated."""

    def __init__(self, opts: SimulationOptions, backend: LocalPool | RayPool, strategy,
                 spec, params: list[np.ndarray], result: SimulationResult,
                 started: float) -> None:
        self.opts, self.backend, self.strategy, self.spec = opts, backend, strategy, spec
        self.params, self.result, self.started = params, result, started
        self.strategy_state: Any = None
        #: why the run ended before its last round (the privacy budget), or None
        self.stop_reason: str | None = None
        #: the last central accuracy, to evaluate every round once near the target
        self.accuracy: float | None = None
        self.reached = False
        self.memory = _Memory(backend)
        #: the central evaluation of a model; given the target once near it, it may stop
        #: as soon as the target is out of reach (gridfl.simulation.central)
        self.central: Callable[[list[np.ndarray], float | None], dict[str, float]] | None = None
        self.emit: Callable[[RoundResult], Any] = lambda entry: None
        #: the process's compressed reports, per client (None: plain State)
        self.compression: SimulatedCompression | None = None
        #: the process's secure aggregation (None: reports folded in the clear)
        self.secure: Any = None

    def run(self) -> list[np.ndarray]:
        pending: RoundResult | None = None
        for r in range(1, (self.opts.rounds or 0) + 1):
            t0 = time.perf_counter()
            chosen = np.random.default_rng([self.opts.seed, 1, r]).choice(
                self.opts.num_clients, size=self.opts.clients_per_round, replace=False)
            tasks = [(int(c), _client_seed(self.opts.seed, r, int(c))) for c in chosen]
            reports = self.backend.fit(self.params, tasks)  # submitted: training starts
            if pending is not None:
                self._finish(pending)
                if self.reached:  # round r's training is dropped: the model is round r-1's
                    pending = None
                    break
            pending = self._aggregate(r, tasks, reports)
            done = time.perf_counter()
            pending.seconds = round(done - t0, 4)
            if r == 1:  # as Flower's is measured: the call -> the first aggregated model
                self.result.startup_seconds = round(done - self.started, 3)
            if self.stop_reason is not None:  # as the node: before the next round opens
                self.result.stop_reason = self.stop_reason
                break
        if pending is not None:
            self._finish(pending)
        return self.params

    def _aggregate(self, r: int, tasks: list[tuple[int, int]], reports) -> RoundResult:
        """Fold the reports in the order drawn, as the node folds them; the new model."""
        sums = agg.RunningSums(self.spec)
        losses, weights, kept = [], [], []
        private = self.strategy if isinstance(self.strategy, SimulatedPrivacy) else None
        if private is not None:
            private.new_round()
        entry = RoundResult(round=r, clients=[c for c, _ in tasks])
        # under secure aggregation the clients exchange keys now, while they train
        secure = self.secure.start(self.spec, r, entry.clients) if self.secure else None
        for i, report in enumerate(reports):
            sent = self._sent(r, i, tasks[i][0], report)
            if sent is None:  # the node answers 400; its cycle goes on
                entry.refused.append(tasks[i][0])
                continue
            if private is not None:
                sent = private.report(list(sent))
            if secure is not None:  # masked as it arrives, summed by the node
                secure.add(tasks[i][0], sent, report.num_samples)
            else:
                self.strategy.fold(sums, sent, report.num_samples)
            if sums.kept is not None:  # a rule that needs every diff (median, Krum)
                kept.append(sums.kept)
                sums.kept = None
            if report.loss is not None:
                losses.append(report.loss)
                weights.append(report.num_samples)
        if kept:
            sums.diffs = np.stack(kept).astype(np.float64)
        if len(entry.refused) == len(tasks):
            entry.error = "every report was refused (values beyond the diff bound): the model stays"
        else:
            self._step(sums, secure, entry)
        if private is not None and entry.error is None:
            entry.privacy = dict(private.last)
            self.stop_reason = private.stop_reason
        if losses:
            entry.train_loss = float(np.average(losses, weights=weights))
        if self.opts.federated_every and r % self.opts.federated_every == 0:
            entry.federated, entry.evaluated = _federated(self.backend, self.params,
                                                          self.opts, r)
        entry.model = self.params
        return entry

    def _step(self, sums: agg.RunningSums, secure, entry: RoundResult) -> None:
        """The new model from the round's sums (under secure aggregation, from its masked
        inputs' sum); a round the node would expire keeps the model and says why."""
        try:
            if secure is not None:
                sums = secure.finish()
            self.params, self.strategy_state = self.strategy.aggregate(
                sums, self.params, self.strategy_state)
        except (AggregationAbortedError, ModelError) as exc:  # the node expires the cycle
            entry.error = str(exc)

    def _sent(self, r: int, i: int, client: int, report) -> Sequence[np.ndarray] | None:
        """What client ``client`` (the round's ``i``-th) sends, as the node reads it; None
        for a diff the node refuses (values beyond the bound, NaN)."""
        diff = state.loads(report.diff)
        if i < self.opts.byzantine:
            diff = _poison(diff, self.opts, r, i)
        try:
            agg.validate_diff(diff, self.spec)
            return diff if self.compression is None else self.compression.report(client, diff)
        except InvalidRequestError:
            return None

    def _finish(self, entry: RoundResult) -> None:
        """Central evaluation of the round's model, then the round is reported."""
        model, entry.model = entry.model, None
        if self.central is not None and self._due(entry.round):
            assert model is not None  # set by _aggregate
            entry.central = self.central(
                model, self.opts.target_accuracy if self._near() else None)
            self._check_target(entry)
        self.memory.sample()
        self.result.rounds.append(entry)
        self.emit(entry)


    def _due(self, r: int) -> bool:
        """Whether round ``r``'s model is evaluated centrally."""
        return r % self.opts.evaluate_every == 0 or r == self.opts.rounds or self._near()

    def _near(self) -> bool:
        """Whether the last central accuracy was within ``near_target`` of the target."""
        target = self.opts.target_accuracy
        return (target is not None and self.accuracy is not None
                and self.accuracy >= target - self.opts.near_target)

    def _check_target(self, entry: RoundResult) -> None:
        target = self.opts.target_accuracy
        accuracy = entry.central.get("accuracy")
        if target is None:
            return
        if AT_MOST in entry.central:  # stopped early: below the target, by at most this
            self.accuracy = entry.central[AT_MOST]
            return
        if accuracy is None:
            raise ConfigError("target_accuracy needs an evaluation plan that reports "
                              "'accuracy' (its metrics are "
                              f"{', '.join(entry.central) or 'none'})")
        self.accuracy = accuracy
        if accuracy >= target:
            self.reached = True
            self.result.target_round = entry.round
            self.result.stop_reason = (f"target accuracy {target} reached at round "
                                       f"{entry.round} ({accuracy:.4f})")


def _check_batches(store: ShardStore, client_config: Mapping[str, Any]) -> None:
    """Refuse a population where a client has fewer training examples than one batch
    (it could not train: the last partial batch is dropped, as in syft.js)."""
    batch = client_config.get("batch_size")
    sizes = store.train_sizes()
    if isinstance(batch, int) and sizes.min() < batch:
        k = int(np.argmin(sizes))
        raise ConfigError(
            f"client {k} has {sizes[k]} training examples, fewer than one batch of {batch}: "
            "use fewer clients, a smaller client_config.batch_size or less held out"
        )


def _poison(diff: list[np.ndarray], opts: SimulationOptions, r: int, i: int) -> list:
    """The ``i``-th report of round ``r`` as a Byzantine client sends it."""
    from gridfl.demo.worker import poison

    return poison(diff, opts.attack, np.random.default_rng([opts.seed, 2, r, i]))


def _client_seed(seed: int, r: int, client: int) -> int:
    return int(np.random.SeedSequence([seed, 2, r, client]).generate_state(1, np.uint64)[0]
               % 2**63)


def _federated(backend: LocalPool | RayPool, params: Sequence[np.ndarray],
               opts: SimulationOptions, r: int) -> tuple[dict[str, float], list[int]]:
    """Metrics of the drawn clients on their held-out data, weighted by their examples,
    and the clients."""
    chosen = np.random.default_rng([opts.seed, 3, r]).choice(
        opts.num_clients, size=opts.federated_clients, replace=False)
    totals: dict[str, float] = {}
    n = 0
    evaluated = [int(c) for c in chosen]
    for report in backend.evaluate(params, evaluated):
        n += report.num_samples
        for k, v in report.metrics.items():
            totals[k] = totals.get(k, 0.0) + v * report.num_samples
    return ({k: v / n for k, v in totals.items()} if n else {}), evaluated


def _settings(opts: SimulationOptions, request) -> dict[str, Any]:
    partitioner = opts.partitioner if isinstance(opts.partitioner, str) else getattr(
        opts.partitioner, "__name__", "user function")
    return {
        "num_clients": opts.num_clients, "partitioner": partitioner,
        "partition_options": opts.partition_options, "rounds": opts.rounds,
        "clients_per_round": opts.clients_per_round, "evaluate_every": opts.evaluate_every,
        "federated_every": opts.federated_every, "federated_clients": opts.federated_clients,
        "held_out": opts.held_out, "seed": opts.seed, "backend": opts.backend,
        **({"target_accuracy": opts.target_accuracy, "near_target": opts.near_target}
           if opts.target_accuracy is not None else {}),
        **({"byzantine": opts.byzantine, "attack": opts.attack} if opts.byzantine else {}),
        "client_config": request.client_config, "server_config": request.server_config,
    }


def _progress(
    opts: SimulationOptions,
) -> tuple[Callable[[RoundResult], None], Callable[[], None]]:
    """A progress bar (``rich``, the cli extra) when asked for, else nothing: the
    function that advances it, and the one that takes it down."""
    if not opts.progress:
        return (lambda entry: None), (lambda: None)
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError as exc:
        raise ConfigError("progress=True needs rich: pip install 'gridfl[cli]'") from exc

    bar = Progress(console=Console(stderr=True))
    task = bar.add_task("rounds", total=opts.rounds)
    bar.start()

    def advance(entry: RoundResult) -> None:
        desc = f"round {entry.round}"
        if entry.central.get("loss") is not None:
            desc += f" test loss {entry.central['loss']:.4f}"
        bar.update(task, advance=1, description=desc)

    return advance, bar.stop


class _Memory:
    """Peak PSS of this process plus the local pool's workers (the physical memory the run
    holds; Ray's workers are not counted)."""

    def __init__(self, backend: LocalPool | RayPool) -> None:
        self.backend, self.peak_kb = backend, 0

    def sample(self) -> None:
        pids = [os.getpid(), *self.backend.pids()]
        self.peak_kb = max(self.peak_kb, sum(memory_kb(p)[1] for p in pids))

    def peak_mb(self) -> float:
        return round(self.peak_kb / 1024, 1)
