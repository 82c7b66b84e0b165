"""
Training loop for a downloaded plan: the Python equivalent of syft.js's ``PlanTrainer``.

The plan's metadata says what each input is (:attr:`gridfl.Plan.inputs`), so no input or
output specs are needed: ``data`` and ``target`` get the batch, ``batch_size`` the batch
size, ``client_config`` inputs the value under their key, ``model_param`` inputs the
current params by index, ``model_buffer`` inputs the model's tensors after the params
(BatchNorm statistics), ``optimizer_state`` inputs the optimizer buffers (zeros at
first) and a FedProx plan's ``global_param`` inputs the params as given, fixed for the
whole run (the downloaded checkpoint). Outputs are read the same way: ``loss``,
``metric`` (by key), updated ``model_param``, ``model_buffer`` and ``optimizer_state``.

What is kept between cycles follows the process's ``client_config`` (see
:mod:`gridfl.client.local_state`): with ``"buffers": "local"`` (FedBN) the buffers
start from the worker's own and ``result.params`` carries the downloaded ones (a zero
diff); with ``"keep_optimizer_state": true`` the optimizer state continues.

Exactly ``max_updates`` batches run per epoch (syft.js and PySyft ran one more). The last
partial batch is dropped, as in syft.js. Example::

    >>> trainer = PlanTrainer(plan, model.params, X, y, client_config={"lr": 0.1},
    ...                       batch_size=16, max_updates=10)
    >>> losses = []
    >>> _ = trainer.on("batch_end", lambda epoch, batch, loss, metrics: losses.append(loss))
    >>> result = trainer.run()
    >>> len(losses), result.num_samples  # 64 examples: 4 batches of 16
    (4, 64)
    >>> diff = model.create_serialized_diff(result.params)

Stop and resume: ``trainer.stop()`` (from a handler or another thread) ends :meth:`run`
after the current batch with ``result.stopped`` set; :meth:`resume` continues.
:meth:`checkpoint` returns the whole training state as bytes, and
:meth:`PlanTrainer.from_checkpoint` continues from them later (another process, after a
restart). Checkpoints are ``.npz`` archives read without pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gridfl._exceptions import ConfigError, GridflError, PlanError
from gridfl.client._events import EventHandlers
from gridfl.client.local_state import LocalState, read_local_options

if TYPE_CHECKING:
    from gridfl.plan import Plan

__all__ = ["TRAINER_EVENTS", "PlanTrainer", "TrainResult"]

logger = logging.getLogger("gridfl.client")

#: Trainer events and the positional arguments their handlers get.
TRAINER_EVENTS = {
    "start": (),
    "end": (),
    "stop": (),
    "epoch_start": ("epoch",),
    "epoch_end": ("epoch",),
    "batch_start": ("epoch", "batch"),
    "batch_end": ("epoch", "batch", "loss", "metrics"),
}

_CKPT_FORMAT = "gridfl.trainer/1"
_INPUT_ROLES = {"data", "target", "batch_size", "client_config", "model_param",
                "model_buffer", "optimizer_state", "global_param"}
_MODEL_ROLES = ("model_param", "model_buffer")


@dataclass
class TrainResult:
    """What a training run produced.

    ``params`` are ready for ``model.create_serialized_diff(params)`` (the model's
    params, then its buffers: the trained ones, or in FedBN mode the downloaded ones);
    ``buffers`` are the trained buffers in every mode; ``num_samples`` is
    the number of samples one epoch trained on (``steps_per_epoch * batch_size``), the
    weight a node may give this worker's diff; ``loss`` and ``metrics`` are from the last
    batch. ``stopped`` is true when :meth:`PlanTrainer.stop` ended the run early.
    """

    params: list[np.ndarray]
    loss: float | None
    metrics: dict[str, float]
    num_samples: int
    steps: int
    epochs: int
    stopped: bool = False
    optimizer_state: list[np.ndarray] = field(default_factory=list)
    buffers: list[np.ndarray] = field(default_factory=list)


def _array(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor, no import
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise ConfigError(f"{what} cannot be converted to an array: {exc}") from exc


def _plan_digest(plan: Plan) -> str:
    try:
        return hashlib.sha256(plan.to_bytes()).hexdigest()
    except Exception:  # noqa: BLE001  # pragma: no cover - a plan-like object without bytes
        return ""


class PlanTrainer:
    """Runs a training plan over ``data``/``target`` in batches.

    Args:
        plan: a training :class:`~gridfl.Plan`.
        params: the model params to start from (``model.params``).
        data: an array with the samples on the first axis.
        target: an array with the targets on the first axis.
        client_config: values for the plan's ``client_config`` inputs (e.g. ``lr``) and
            the defaults below.
        batch_size: default ``client_config["batch_size"]``.
        epochs: default ``client_config["max_epochs"]``, else 1.
        max_updates: batches per epoch; default ``client_config["max_updates"]``, else
            every full batch.
        shuffle: draw a new sample order each epoch (reproducible from ``seed``).
        events: ``{event: handler}`` to register at once (see :data:`TRAINER_EVENTS`).
        local_state: where the worker keeps state between cycles, under the key
            ``process`` (a :class:`~gridfl.client.LocalState`; jobs pass their client's).
    """

    def __init__(
        self,
        plan: Plan,
        params: Sequence[Any],
        data: Any,
        target: Any,
        *,
        client_config: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        epochs: int | None = None,
        max_updates: int | None = None,
        shuffle: bool = False,
        seed: int | None = None,
        events: Mapping[str, Callable[..., Any]] | None = None,
        local_state: LocalState | None = None,
        process: str | None = None,
    ) -> None:
        self.plan = plan
        self.client_config = dict(client_config or {})
        cfg = self.client_config
        self._events = EventHandlers("trainer", TRAINER_EVENTS)
        for event, handler in (events or {}).items():
            self.on(event, handler)

        self._check_plan()
        self.data = _array(data, "data")
        self.target = _array(target, "target")
        if self.data.ndim == 0 or self.target.ndim == 0:
            raise ConfigError("data and target need the samples on their first axis")
        if len(self.data) != len(self.target):
            raise ConfigError(
                f"data has {len(self.data)} samples but target has {len(self.target)}"
            )

        self.batch_size = self._positive_int(
            "batch_size", batch_size if batch_size is not None else cfg.get("batch_size"),
            fallback=self._fixed_batch(),
        )
        self.epochs = self._positive_int(
            "epochs", epochs if epochs is not None else cfg.get("max_epochs"), fallback=1
        )
        mu = max_updates if max_updates is not None else cfg.get("max_updates")
        self.max_updates = None if mu is None else self._positive_int("max_updates", mu)
        full_batches = len(self.data) // self.batch_size
        if full_batches == 0:
            raise ConfigError(
                f"{len(self.data)} samples are fewer than one batch of {self.batch_size}; "
                "pass a smaller batch_size"
            )
        self.steps_per_epoch = (
            full_batches if self.max_updates is None else min(full_batches, self.max_updates)
        )
        self.shuffle = bool(shuffle)
        entropy = np.random.SeedSequence().entropy
        assert isinstance(entropy, int)  # drawn from the OS when no entropy is given
        self.seed = int(seed) if seed is not None else entropy % 2**63

        self.params = [_array(p, f"param #{i}") for i, p in enumerate(params)]
        n_model = self._num_params + self._num_buffers
        if len(self.params) != n_model:
            raise ConfigError(
                f"the plan takes {self._num_params} model params and {self._num_buffers} "
                f"buffers but {len(self.params)} model tensors were given"
            )
        self.optimizer_state = [
            np.zeros([d or 0 for d in s.shape], dtype=s.dtype) for s in self._opt_slots
        ]
        #: FedProx's anchor: the params training started from, never updated
        self.global_params = (
            [p.copy() for p in self.params[:self._num_params]] if self._num_global else []
        )
        self.local_buffers, self.keep_optimizer_state = read_local_options(cfg)
        self.local_state, self.process = local_state, process
        #: the buffers a FedBN result reports: the downloaded ones, so their diff is zero
        self.reported_buffers = [b.copy() for b in self.params[self._num_params:]]
        self._restore_local()
        # position
        self.epoch = 0
        self.batch = 0
        self.steps = 0
        self._epoch_open = False
        self._started = False
        self.done = False
        self.loss: float | None = None
        self.metrics: dict[str, float] = {}
        self._stop = threading.Event()
        self._running = threading.Lock()
        # Steps after the first go through Plan.run (see _fast_feed): None until the
        # first step ran through Plan.execute, False when the plan does not allow it.
        self._fast: dict[str, Any] | bool | None = None

    # ------------------------------------------------------------------ set-up
    def _check_plan(self) -> None:
        plan = self.plan
        kind = getattr(plan, "kind", "training")
        if kind != "training":
            raise PlanError(f"job.train needs a training plan, got a {kind!r} plan")
        for s in plan.inputs:
            if s.role not in _INPUT_ROLES:
                raise PlanError(f"a training plan cannot take input {s.describe()}")
            if s.role == "client_config" and s.key not in self.client_config:
                raise ConfigError(
                    f"client_config lacks {s.key!r}, which plan input {s.describe()} needs"
                )
        self._num_params = _count_indexed(plan, "model_param")
        self._num_buffers = _count_indexed(plan, "model_buffer")
        # an input only: the plan does not return the global params
        self._num_global = sum(s.role == "global_param" for s in plan.inputs)
        if self._num_global not in (0, self._num_params):
            raise PlanError(
                f"the plan takes {self._num_global} global params for {self._num_params} "
                "model params; a FedProx plan takes one per param"
            )
        self._opt_slots = sorted(
            (s for s in plan.inputs if s.role == "optimizer_state"),
            key=lambda s: s.required_index,
        )

    def _restore_local(self) -> None:
        """Start from the kept buffers / optimizer state when the process asks for it
        and the worker has some that fit the plan."""
        if self.local_state is None or self.process is None:
            return
        if not (self.local_buffers or self.keep_optimizer_state):
            return
        kept = self.local_state.load(self.process)
        n = self._num_params
        if self.local_buffers and _fits(kept.buffers, self.params[n:]):
            self.params[n:] = kept.buffers
        if self.keep_optimizer_state and _fits(kept.optimizer_state, self.optimizer_state):
            self.optimizer_state = kept.optimizer_state

    def _keep_local(self) -> None:
        if self.local_state is None or self.process is None:
            return
        self.local_state.save(
            self.process,
            buffers=self.params[self._num_params:] if self.local_buffers else None,
            optimizer_state=self.optimizer_state if self.keep_optimizer_state else None,
        )

    def _model_index(self, slot: Any) -> int:
        """Position of a ``model_param``/``model_buffer`` slot in :attr:`params`."""
        i: int = slot.required_index
        return i + self._num_params if slot.role == "model_buffer" else i

    def _fixed_batch(self) -> int | None:
        for s in self.plan.inputs:
            if s.role == "data" and s.shape and s.shape[0] is not None:
                return int(s.shape[0])
        return None

    @staticmethod
    def _positive_int(name: str, value: Any, fallback: int | None = None) -> int:
        if value is None:
            value = fallback
        if value is None:
            raise ConfigError(
                f"no {name}: pass {name}=... or set it in the process's client_config"
            )
        if isinstance(value, bool) or not float(value).is_integer() or int(value) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        return int(value)

    # ------------------------------------------------------------------ events
    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Register ``handler`` for a trainer event; also usable as a decorator.

        Handlers get positional arguments: ``start()``, ``end()``, ``stop()``,
        ``epoch_start(epoch)``, ``epoch_end(epoch)``, ``batch_start(epoch, batch)``,
        ``batch_end(epoch, batch, loss, metrics)``. Unknown names raise
        :class:`~gridfl.ConfigError`.
        """
        return self._events.on(event, handler)

    def _fire(self, event: str, *args: Any) -> None:
        self._events.fire(event, *args)

    # ------------------------------------------------------------------ running
    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch (thread-safe)."""
        self._stop.set()

    def resume(self) -> TrainResult:
        """Continue a stopped run; same as :meth:`run`."""
        return self.run()

    @property
    def num_samples(self) -> int:
        return self.steps_per_epoch * self.batch_size

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def _step(self, order: np.ndarray | None) -> None:
        lo, hi = self.batch * self.batch_size, (self.batch + 1) * self.batch_size
        if order is None:
            xb, yb = self.data[lo:hi], self.target[lo:hi]
        else:
            idx = order[lo:hi]
            xb, yb = self.data[idx], self.target[idx]
        outputs = self._fast_step(xb, yb) if self._fast else self._execute_step(xb, yb)
        params = list(self.params)
        opt = list(self.optimizer_state)
        metrics: dict[str, float] = {}
        for s, value in zip(self.plan.outputs, outputs, strict=True):
            if s.role == "loss":
                self.loss = float(np.asarray(value).reshape(-1)[0])
            elif s.role == "metric":
                metrics[s.required_key] = float(np.asarray(value).reshape(-1)[0])
            elif s.role in _MODEL_ROLES:
                params[self._model_index(s)] = np.asarray(value)
            elif s.role == "optimizer_state":
                opt[s.required_index] = np.asarray(value)
        self.params, self.optimizer_state, self.metrics = params, opt, metrics
        if self._fast is None:
            self._fast = self._fast_feed()

    def _execute_step(self, xb: np.ndarray, yb: np.ndarray) -> list[Any]:
        """One step through :meth:`Plan.execute`, which checks and converts every input."""
        args: list[Any] = []
        for s in self.plan.inputs:
            r = s.role
            if r == "data":
                args.append(xb)
            elif r == "target":
                args.append(yb)
            elif r == "batch_size":
                args.append(self.batch_size)
            elif r == "client_config":
                args.append(self.client_config[s.required_key])
            elif r in _MODEL_ROLES:
                args.append(self.params[self._model_index(s)])
            elif r == "global_param":
                args.append(self.global_params[s.required_index])
            else:  # optimizer_state
                args.append(self.optimizer_state[s.required_index])
        return self.plan.execute(*args)

    def _fast_feed(self) -> dict[str, Any] | bool:
        """After a first step through ``Plan.execute``: the feed of the inputs that stay
        the same every step (``batch_size``, ``client_config`` values, converted once),
        or False when steps must keep going through ``execute``.

        ``execute`` checks and converts all inputs each step (~10 per step for a 3-layer
        model): a few microseconds each, a millisecond or more per epoch. Later steps
        convert only the batch, and feed back the params and optimizer state, which are
        the plan's own outputs of the step before, as they are when the first step's
        outputs match the inputs they feed (always, for compiled plans).
        """
        from gridfl.plan import Plan

        plan = self.plan
        if type(plan) is not Plan:  # a duck-typed plan: only its execute() is known
            return False
        const: dict[str, Any] = {}
        for pos, s in enumerate(plan.inputs):
            if s.role == "batch_size":
                const[s.name] = plan.convert(pos, self.batch_size)
            elif s.role == "client_config":
                const[s.name] = plan.convert(pos, self.client_config[s.required_key])
            elif s.role == "global_param":
                const[s.name] = plan.convert(pos, self.global_params[s.required_index])
            elif s.role in _MODEL_ROLES or s.role == "optimizer_state":
                value = (self.optimizer_state[s.required_index] if s.role == "optimizer_state"
                         else self.params[self._model_index(s)])
                if not s.matches(value):
                    return False
        return const

    def _fast_step(self, xb: np.ndarray, yb: np.ndarray) -> list[Any]:
        """One step through ``Plan.run`` (see :meth:`_fast_feed`)."""
        plan = self.plan
        feed = dict(self._fast)  # type: ignore[arg-type]
        for pos, s in enumerate(plan.inputs):
            r = s.role
            if r == "data":
                feed[s.name] = plan.convert(pos, xb)
            elif r == "target":
                feed[s.name] = plan.convert(pos, yb)
            elif r in _MODEL_ROLES:
                feed[s.name] = self.params[self._model_index(s)]
            elif r == "optimizer_state":
                feed[s.name] = self.optimizer_state[s.required_index]
        return plan.run(feed)

    def run(self) -> TrainResult:
        """Train until done (or stopped); return the params and last loss/metrics."""
        if not self._running.acquire(blocking=False):
            raise GridflError("this trainer is already running")
        try:
            self._stop.clear()
            self._fast = None  # the first step of every run goes through Plan.execute
            if not self._started:
                self._started = True
                self._fire("start")
            while not self.done:
                if self.epoch >= self.epochs:
                    self.done = True
                    self._keep_local()
                    self._fire("end")
                    break
                if not self._epoch_open:
                    self._epoch_open = True
                    self._fire("epoch_start", self.epoch)
                order = self._order(self.epoch)
                while self.batch < self.steps_per_epoch:
                    if self._stop.is_set():
                        logger.debug("training stopped at epoch %d batch %d", self.epoch,
                                     self.batch)
                        self._fire("stop")
                        return self._result(stopped=True)
                    self._fire("batch_start", self.epoch, self.batch)
                    self._step(order)
                    self.batch += 1
                    self.steps += 1
                    if self._events.has("batch_end"):
                        self._fire("batch_end", self.epoch, self.batch - 1, self.loss,
                                   dict(self.metrics))
                self._fire("epoch_end", self.epoch)
                self._epoch_open = False
                self.epoch += 1
                self.batch = 0
            return self._result(stopped=False)
        finally:
            self._running.release()

    def _result(self, *, stopped: bool) -> TrainResult:
        n = self._num_params
        reported = self.reported_buffers if self.local_buffers else self.params[n:]
        return TrainResult(
            params=[np.array(p, copy=True) for p in (*self.params[:n], *reported)],
            loss=self.loss,
            metrics=dict(self.metrics),
            num_samples=self.num_samples,
            steps=self.steps,
            epochs=self.epoch,
            stopped=stopped,
            optimizer_state=[np.array(o, copy=True) for o in self.optimizer_state],
            buffers=[np.array(b, copy=True) for b in self.params[n:]],
        )

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> bytes:
        """The training state as bytes (params, optimizer state, position, settings)."""
        if self._running.locked():
            raise GridflError("stop() the trainer before taking a checkpoint")
        config = {k: v for k, v in self.client_config.items() if _jsonable(v)}
        meta = {
            "format": _CKPT_FORMAT,
            "plan_sha256": _plan_digest(self.plan),
            "num_samples_data": len(self.data),
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "max_updates": self.max_updates,
            "steps_per_epoch": self.steps_per_epoch,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "client_config": config,
            "epoch": self.epoch,
            "batch": self.batch,
            "steps": self.steps,
            "epoch_open": self._epoch_open,
            "started": self._started,
            "done": self.done,
            "loss": self.loss,
            "metrics": self.metrics,
            "num_params": len(self.params),
            "num_optimizer_state": len(self.optimizer_state),
            "num_reported_buffers": len(self.reported_buffers),
            "num_global_params": len(self.global_params),
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        }
        for i, p in enumerate(self.params):
            arrays[f"param_{i}"] = p
        for i, o in enumerate(self.optimizer_state):
            arrays[f"opt_{i}"] = o
        for i, b in enumerate(self.reported_buffers):
            arrays[f"reported_buffer_{i}"] = b
        for i, g in enumerate(self.global_params):
            arrays[f"global_param_{i}"] = g
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwds
        return buf.getvalue()

    @classmethod
    def from_checkpoint(
        cls,
        plan: Plan,
        data: Any,
        target: Any,
        checkpoint: bytes,
        *,
        client_config: Mapping[str, Any] | None = None,
        events: Mapping[str, Callable[..., Any]] | None = None,
        local_state: LocalState | None = None,
        process: str | None = None,
    ) -> PlanTrainer:
        """A trainer that continues where :meth:`checkpoint` left off.

        ``client_config`` entries override the saved ones (e.g. values that were not
        JSON). The data must be the same samples in the same order. ``local_state``
        receives what the finished run keeps (its buffers and optimizer state come from
        the checkpoint, not from it).
        """
        try:
            with np.load(io.BytesIO(checkpoint), allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != _CKPT_FORMAT:
                    raise ValueError(f"unknown format {meta.get('format')!r}")
                params = [z[f"param_{i}"] for i in range(meta["num_params"])]
                opt = [z[f"opt_{i}"] for i in range(meta["num_optimizer_state"])]
                reported = [z[f"reported_buffer_{i}"]
                            for i in range(meta.get("num_reported_buffers", 0))]
                global_params = [z[f"global_param_{i}"]
                                 for i in range(meta.get("num_global_params", 0))]
        except Exception as exc:
            raise ConfigError(f"not a gridfl trainer checkpoint: {exc}") from exc
        digest = _plan_digest(plan)
        if meta["plan_sha256"] and digest and digest != meta["plan_sha256"]:
            raise ConfigError("this checkpoint was made with a different plan")
        cfg = {**meta["client_config"], **(client_config or {})}
        trainer = cls(
            plan, params, data, target, client_config=cfg, batch_size=meta["batch_size"],
            epochs=meta["epochs"], max_updates=meta["max_updates"], shuffle=meta["shuffle"],
            seed=meta["seed"], events=events,
        )
        if len(trainer.data) != meta["num_samples_data"]:
            raise ConfigError(
                f"the checkpoint was made on {meta['num_samples_data']} samples, "
                f"got {len(trainer.data)}"
            )
        if len(opt) != len(trainer.optimizer_state):
            raise ConfigError("the checkpoint's optimizer state does not match the plan")
        trainer.optimizer_state = opt
        if len(reported) != len(trainer.reported_buffers):
            raise ConfigError("the checkpoint's buffers do not match the plan")
        trainer.reported_buffers = reported
        if global_params:  # FedProx: the anchor is the downloaded params, not the trained
            trainer.global_params = global_params
        trainer.local_state, trainer.process = local_state, process
        trainer.epoch, trainer.batch, trainer.steps = meta["epoch"], meta["batch"], meta["steps"]
        trainer._epoch_open = meta["epoch_open"]
        trainer._started = meta["started"]
        trainer.done = meta["done"]
        trainer.loss = meta["loss"]
        trainer.metrics = dict(meta["metrics"])
        return trainer


def _count_indexed(plan: Plan, role: str) -> int:
    """How many slots of ``role`` the plan has; inputs and outputs must both be 0..n-1."""
    ins = sorted(s.required_index for s in plan.inputs if s.role == role)
    outs = sorted(s.required_index for s in plan.outputs if s.role == role)
    if ins != list(range(len(ins))) or outs != ins:
        raise PlanError(
            f"the plan's {role} inputs {ins} and outputs {outs} must both be 0..n-1"
        )
    return len(ins)


def _fits(values: Sequence[np.ndarray], like: Sequence[np.ndarray]) -> bool:
    """Kept arrays that match the plan's, shapes and dtypes (a new model version may
    differ: then the worker starts afresh)."""
    return len(values) == len(like) and len(values) > 0 and all(
        a.shape == b.shape and a.dtype == b.dtype for a, b in zip(values, like, strict=True)
    )


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return not (isinstance(value, float) and not math.isfinite(value))
