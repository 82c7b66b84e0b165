"""
The I/O-free core of the worker SDK, shared by :class:`~gridfl.Syft` and
:class:`~gridfl.AsyncSyft` (the httpx pattern: one core, two thin shells).

* :class:`BaseSyft` checks a client's options (the URL through
  :class:`~gridfl.client._endpoints.Endpoints`) and builds its
  :class:`~gridfl.client._transports.Network` (the I/O side, imported lazily).
* :class:`BaseJob` holds a job's state, its event registry and the job flow, a generator
  of the operations in :mod:`gridfl.client._flow`, which the shells drive.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gridfl import _messages
from gridfl._exceptions import (
    ConfigError,
    GridError,
    GridflError,
    ModelLoadFailedError,
    PlanLoadFailedError,
)
from gridfl.client import _replies as replies
from gridfl.client._endpoints import Endpoints
from gridfl.client._events import EventHandlers
from gridfl.client._flow import (
    SECURE_AGGREGATION,
    SUPPORTED_PROTOCOLS,
    Accepted,
    BinaryReports,
    Call,
    Fetch,
    Flow,
    MeasureSpeed,
    Rejected,
)
from gridfl.privacy import privatize_report

_PLAN_CACHE_SIZE = 8

if TYPE_CHECKING:
    import httpx

    from gridfl.client.evaluation import EvaluationResult
    from gridfl.client.trainer import PlanTrainer
    from gridfl.model import SyftModel
    from gridfl.plan import Plan

logger = logging.getLogger("gridfl.client")

#: Events a job emits (``job.on(name, handler)``).
JOB_EVENTS = ("accepted", "rejected", "error")


# --------------------------------------------------------------------------- jobs


class JobState(enum.Enum):
    """Lifecycle of a job: ``CREATED -> STARTING -> ACCEPTED | REJECTED | FAILED``, then
    ``ACCEPTED -> REPORTED``. ``start()`` may be called again from any state but
    ``STARTING`` (it re-authenticates, as syft.js does)."""

    CREATED = "created"
    STARTING = "starting"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"
    REPORTED = "reported"


def _as_error(exc: BaseException) -> GridflError:
    if isinstance(exc, GridflError):
        return exc
    err = GridError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


@dataclass
class _Cycle:
    worker_id: str | None = None
    requires_speed_test: bool = False
    speed: dict[str, float] = field(default_factory=dict)
    request_key: str | None = None
    model_id: Any = None
    version: str | None = None
    timeout: int | None = None
    #: the node's ``compression`` request in the accepted reply (gridfl extension)
    compression: dict[str, Any] | None = None
    #: "training", or "evaluation" when the node placed the job in an evaluation cycle
    kind: str = "training"


class BaseJob:
    """State, events and flow of one training job; the shells add the I/O.

    Attributes set by a successful ``start()``: :attr:`model`, :attr:`plans`,
    :attr:`protocols`, :attr:`client_config`, :attr:`worker_id`, :attr:`request_key`.
    """

    def __init__(
        self,
        client: Any,
        model_name: str,
        model_version: str | None = None,
        *,
        auth_token: str | None = None,
    ) -> None:
        if not isinstance(model_name, str) or not model_name:
            raise ConfigError(f"model_name must be a non-empty string, got {model_name!r}")
        if model_version is not None and not isinstance(model_version, str):
            raise ConfigError(f"model_version must be a string or None, got {model_version!r}")
        self._client = client
        self.model_name = model_name
        self.model_version = model_version
        self.auth_token = auth_token
        self._events = EventHandlers("job", JOB_EVENTS)
        self.state = JobState.CREATED
        self.model: SyftModel | None = None
        self.plans: dict[str, Plan] = {}
        self.protocols: dict[str, bytes] = {}
        self.client_config: dict[str, Any] = {}
        self.error: GridflError | None = None
        self._cycle = _Cycle()
        #: True: the job tells the node it can run evaluation cycles (then ``kind`` may be
        #: "evaluation": run :meth:`evaluate` and :meth:`report_metrics`, not a diff)
        self.can_evaluate = False
        #: (worker_id, requires_speed_test) once authenticated; reused by later starts
        self._identity: tuple[str, bool] | None = None

    # ------------------------------------------------------------------ events
    def on(self, event: str, handler: Callable[..., Any] | None = None) -> Any:
        """Register ``handler`` for ``event`` (``accepted``, ``rejected`` or ``error``).

        Usable directly, ``job.on("rejected", fn)``, or as a decorator::

            @job.on("accepted")
            def on_accepted(model, client_config): ...

        Handlers get keyword-compatible positional arguments: ``accepted(model,
        client_config)``, ``rejected(timeout)``, ``error(exc)``. Unknown event names
        raise :class:`~gridfl.ConfigError` (syft.js ignored them silently).
        """
        return self._events.on(event, handler)

    def _event_calls(self, outcome: Any) -> tuple[str, tuple[Any, ...]]:
        if isinstance(outcome, Accepted):
            return "accepted", (outcome.model, outcome.client_config)
        if isinstance(outcome, Rejected):
            return "rejected", (outcome.timeout,)
        return "error", (outcome,)

    # ------------------------------------------------------------------ properties
    @property
    def worker_id(self) -> str | None:
        """The id the node gave this job at authentication."""
        return self._cycle.worker_id

    @property
    def request_key(self) -> str | None:
        """The key of the accepted cycle (sent back with downloads and the report)."""
        return self._cycle.request_key

    @property
    def timeout(self) -> int | None:
        """Seconds to wait before retrying after a rejection (``None``: training is over)."""
        return self._cycle.timeout

    @property
    def kind(self) -> str:
        """The accepted cycle's kind: ``"training"`` (train, ``report`` a diff) or
        ``"evaluation"`` (``evaluate`` the model, ``report_metrics``); only a job with
        :attr:`can_evaluate` set is placed in evaluation cycles."""
        return self._cycle.kind

    @property
    def speed(self) -> dict[str, float]:
        """The measured ``{ping, download, upload}`` when the node asked for a speed test."""
        return dict(self._cycle.speed)

    def __repr__(self) -> str:
        version = f" {self.model_version}" if self.model_version else ""
        return f"<{type(self).__name__} {self.model_name}{version} {self.state.value}>"

    # ------------------------------------------------------------------ flows
    def _begin(self, wait: float) -> None:
        """Checks and resets shared by the sync and async ``start``."""
        if not 0 <= wait <= 300:
            raise ConfigError(f"wait must be between 0 and 300 seconds, got {wait!r}")
        if self.state is JobState.STARTING:
            raise GridflError(f"{self!r}: start() is already running")
        self.state = JobState.STARTING
        self.model = None
        self.plans = {}
        self.protocols = {}
        self.client_config = {}
        self.error = None
        self._cycle = _Cycle()

    def _finish(self, outcome: Any) -> tuple[str, tuple[Any, ...]]:
        """Record the outcome of the start flow (an Accepted, Rejected or exception)."""
        if isinstance(outcome, Accepted):
            self.state = JobState.ACCEPTED
            logger.info(
                "%s accepted: worker %s, %d plan(s)",
                self.model_name,
                self.worker_id,
                len(self.plans),
            )
        elif isinstance(outcome, Rejected):
            self.state = JobState.REJECTED
            self._cycle.timeout = outcome.timeout
            logger.info("%s rejected, timeout=%s", self.model_name, outcome.timeout)
        else:
            outcome = _as_error(outcome)
            self._identity = None  # authenticate afresh next time
            self.state = JobState.FAILED
            self.error = outcome
            logger.warning("%s failed: %s", self.model_name, outcome)
        return self._event_calls(outcome)

    def _start_job(self, wait: float) -> Flow:
        """All of ``start()`` but calling the handlers, which the shells do (the sync one
        runs them, the async one also awaits them). Returns ``(event, handlers, args)``;
        raises the error itself when it has no ``error`` handler."""
        self._begin(wait)
        try:
            outcome: Any = yield from self._start_flow(wait)
        except Exception as exc:  # noqa: BLE001 - the outcome: recorded, handed to the handlers
            outcome = exc
        event, args = self._finish(outcome)
        handlers = self._handlers_for(event)
        if event == "error" and not handlers:
            raise args[0]
        return event, handlers, args

    def _start_flow(self, wait: float = 0.0) -> Flow:
        """authenticate -> [speed test] -> cycle-request -> downloads.

        ``wait`` > 0 asks the node to hold a rejection for up to that many seconds and
        answer as soon as this worker can be accepted (gridfl's long-polled cycle request;
        PyGrid nodes ignore the field and reject at once).
        """
        from gridfl.model import SyftModel

        c = self._cycle
        # A started job starting again joins the next cycle as the same worker: the node
        # binds a worker id to its process, and PyGrid lets it join each cycle once.
        if self._identity is None:
            auth = _messages.AuthenticateRequest(
                self.model_name, self.model_version, self.auth_token
            )
            identity = _messages.parse_authenticate_response(
                (yield Call(replies.AUTHENTICATE, auth.to_json()))
            )
            self._identity = (identity.worker_id, identity.requires_speed_test)
            logger.debug("%s: authenticated as worker %s", self.model_name, identity.worker_id)
        worker_id, c.requires_speed_test = self._identity
        c.worker_id = worker_id
        if c.requires_speed_test:
            c.speed = dict((yield MeasureSpeed(worker_id)))
            logger.debug("%s: speed test %s", self.model_name, c.speed)
        request = _messages.CycleRequest(
            worker_id=worker_id,
            model=self.model_name,
            version=self.model_version,
            ping=c.speed.get("ping"),
            download=c.speed.get("download"),
            upload=c.speed.get("upload"),
            wait=max(0.0, wait),
            protocols=list(SUPPORTED_PROTOCOLS),
            capabilities=[_messages.EVALUATION] if self.can_evaluate else None,
        )
        call = Call(replies.CYCLE_REQUEST, request.to_json(), idempotent=False, extra_timeout=wait)
        reply = _messages.parse_cycle_response((yield call))
        if isinstance(reply, _messages.CycleRejected):
            return Rejected(reply.timeout)

        c.request_key, c.model_id, c.version = reply.request_key, reply.model_id, reply.version
        c.compression = reply.compression
        c.kind = reply.kind or "training"
        # gridfl nodes name each plan's digest: a plan held from an earlier cycle is not
        # downloaded again (an unknown or malformed digest just means a download)
        digests = reply.plan_digests or {}

        def asset(asset_id: Any, id_key: str, variant: str | None = None) -> dict[str, Any]:
            query = _messages.AssetRequest(worker_id, reply.request_key, asset_id, variant)
            return query.to_json(id_key)

        try:
            raw = yield Fetch(replies.GET_MODEL, asset(reply.model_id, "model_id"))
            model = SyftModel.from_bytes(raw)
        except Exception as exc:
            raise ModelLoadFailedError(f"Failed to load Model: {exc}") from exc

        plans: dict[str, Plan] = {}
        for name, plan_id in reply.plans.items():
            held = self._client._held_plan(digests.get(name))
            if held is not None:
                plans[name] = held
                continue
            try:
                raw = yield Fetch(replies.GET_PLAN, asset(plan_id, "plan_id", replies.PLAN_VARIANT))
                plans[name] = self._client._load_plan(raw)
            except Exception as exc:
                raise PlanLoadFailedError(f"Failed to load {name!r} Plan: {exc}") from exc

        protocols: dict[str, bytes] = {}
        for name, protocol_id in reply.protocols.items():
            try:
                query = asset(protocol_id, "protocol_id")
                protocols[name] = yield Fetch(replies.GET_PROTOCOL, query)
            except Exception as exc:
                raise GridError(f"Failed to load {name!r} Protocol: {exc}") from exc

        self.model = model
        self.plans = plans
        self.protocols = protocols
        self.client_config = dict(reply.client_config)
        return Accepted(model, self.client_config)

    def _report_flow(
        self,
        diff: bytes,
        num_samples: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> Flow:
        if self.state is not JobState.ACCEPTED:
            raise GridflError(
                f"report() needs an accepted job: expected state 'accepted', "
                f"got {self.state.value!r}"
            )
        if not isinstance(diff, (bytes, bytearray, memoryview)):
            raise ConfigError(
                f"diff must be bytes (use model.create_serialized_diff(params)), "
                f"got {type(diff).__name__}"
            )
        if num_samples is not None:
            if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 0:
                raise ConfigError(f"num_samples must be a non-negative int, got {num_samples!r}")
            num_samples = int(num_samples)
        diff = privatize_report(diff, self.client_config)
        if SECURE_AGGREGATION in self.protocols:
            from gridfl import state
            from gridfl.client._secagg import secure_report_flow

            arrays = state.loads(bytes(diff))
            # DP-FedAvg is unweighted: a weight would break the C / m bound on one
            # worker's influence that the noise is calibrated to
            weight = None if "differential_privacy" in self.client_config else num_samples
            reply = yield from secure_report_flow(self, arrays, weight)
            self.state = JobState.REPORTED
            return reply
        payload, kind, commit = bytes(diff), None, None
        setting = self._cycle.compression
        # compressed only where the node asked for it and the report goes as a binary frame
        if setting is not None and self.model is not None and (yield BinaryReports()):
            shapes = [tuple(p.shape) for p in self.model.params]
            key = (self.model_name, self._cycle.version)
            payload, commit = self._client._compressor.compress(setting, key, payload, shapes)
            kind = setting["kind"]
        report = _messages.ReportRequest(
            worker_id=str(self.worker_id),
            request_key=str(self.request_key),
            diff=payload,
            num_samples=num_samples,
            metrics={str(k): float(v) for k, v in dict(metrics or {}).items()},
            compression=kind,
        )
        # The diff stays bytes here: the transport encodes it (base64 in JSON, or raw in a
        # binary WebSocket frame when the node takes those).
        reply = yield Call(replies.REPORT, report.to_json(raw_diff=True), idempotent=False)
        _messages.parse_report_response(reply)
        if commit is not None:
            commit()
        self.state = JobState.REPORTED
        logger.info("%s: reported diff of %d bytes", self.model_name, len(payload))
        return reply

    def _metrics_flow(self, num_samples: int, metrics: Mapping[str, float]) -> Flow:
        if self.state is not JobState.ACCEPTED or self.kind != _messages.EVALUATION:
            raise GridflError(
                "report_metrics() needs a job accepted into an evaluation cycle "
                f"(kind 'evaluation'); this one is {self.state.value!r}, kind {self.kind!r}"
            )
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be a positive int, got {num_samples!r}")
        clean = {str(k): float(v) for k, v in dict(metrics).items()}
        if not clean:
            raise ConfigError("metrics must name at least one metric")
        report = _messages.EvaluationReport(
            str(self.worker_id), str(self.request_key), num_samples, clean
        )
        reply = yield Call(_messages.EVALUATION_REPORT, report.to_json(), idempotent=False)
        _messages.parse_report_response(reply)
        self.state = JobState.REPORTED
        logger.info("%s: reported metrics of %d samples", self.model_name, num_samples)
        return reply

    def evaluate(
        self, data: Any, target: Any, *, plan_name: str | None = None
    ) -> EvaluationResult:
        """Run the evaluation plan (``plan_name``, or the cycle's one plan of kind
        ``evaluation``) on ``data``/``target`` with this cycle's model; the result goes to
        ``report_metrics(result.num_samples, result.metrics)``."""
        from gridfl.client.evaluation import EvaluationResult, evaluate_plan

        if self.model is None or self.state not in (JobState.ACCEPTED, JobState.REPORTED):
            raise GridflError(
                f"evaluate() needs an accepted job; got state {self.state.value!r}"
            )
        if plan_name is None:
            found = [n for n, p in self.plans.items() if p.kind == "evaluation"]
            if len(found) != 1:
                raise ConfigError(
                    f"name the evaluation plan: this cycle has {len(found)} plans of kind "
                    f"'evaluation' ({', '.join(found) or 'none'})"
                )
            plan_name = found[0]
        if plan_name not in self.plans:
            raise ConfigError(
                f"no plan {plan_name!r} in this cycle; plans: {', '.join(self.plans) or 'none'}"
            )
        x, y = np.asarray(data), np.asarray(target)
        if len(x) == 0:
            raise ConfigError("evaluate() needs at least one held-out example")
        metrics = evaluate_plan(self.plans[plan_name], self.model.params, x, y, self.client_config)
        return EvaluationResult(len(x), metrics)

    # ------------------------------------------------------------------ training
    def trainer(
        self,
        plan_name: str,
        data: Any,
        target: Any,
        *,
        batch_size: int | None = None,
        epochs: int | None = None,
        max_updates: int | None = None,
        client_config: Mapping[str, Any] | None = None,
        shuffle: bool = False,
        seed: int | None = None,
        events: Mapping[str, Callable[..., Any]] | None = None,
        checkpoint: bytes | None = None,
    ) -> PlanTrainer:
        """A :class:`~gridfl.client.PlanTrainer` for plan ``plan_name`` on this job's model.

        Defaults come from the cycle's ``client_config`` (``batch_size``, ``max_epochs``,
        ``max_updates``; ``lr`` and other plan inputs by key); ``client_config`` entries
        given here override them. With ``checkpoint`` (bytes from
        :meth:`PlanTrainer.checkpoint`) training continues from that state.
        """
        from gridfl.client.trainer import PlanTrainer

        if self.model is None or self.state not in (JobState.ACCEPTED, JobState.REPORTED):
            raise GridflError(
                f"train() needs an accepted job: expected state 'accepted', "
                f"got {self.state.value!r}"
            )
        if plan_name not in self.plans:
            raise ConfigError(
                f"no plan {plan_name!r} in this cycle; plans: {', '.join(self.plans) or 'none'}"
            )
        plan = self.plans[plan_name]
        cfg = {**self.client_config, **(client_config or {})}
        local_state = getattr(self._client, "local_state", None)
        process = f"{self.model_name}:{self.model_version or ''}"  # what is kept is per process
        if checkpoint is not None:
            return PlanTrainer.from_checkpoint(
                plan, data, target, checkpoint, client_config=cfg, events=events,
                local_state=local_state, process=process,
            )
        return PlanTrainer(
            plan,
            self.model.params,
            data,
            target,
            client_config=cfg,
            batch_size=batch_size,
            epochs=epochs,
            max_updates=max_updates,
            shuffle=shuffle,
            seed=seed,
            events=events,
            local_state=local_state,
            process=process,
        )

    def _handlers_for(self, event: str) -> list[Callable[..., Any]]:
        return self._events.handlers(event)


#: The docstring of ``Job.start`` and ``AsyncJob.start`` (one text for both shells).
START_DOC = """Authenticate, speed-test if asked, request a cycle, download, fire an event.

        Fires ``accepted(model, client_config)``, ``rejected(timeout)`` or
        ``error(exc)``. With no ``error`` handler registered the error is raised instead.
        Exceptions raised by handlers propagate.

        ``wait`` (seconds) lets a gridfl node hold a rejection and answer as soon as the
        worker can join a cycle, instead of the worker sleeping for ``timeout`` and asking
        again; it is how a worker moves to the next cycle the moment it opens.

        Starting the same job again joins the next cycle as the same worker (no new
        authentication); a new job authenticates afresh, as syft.js does.
        """


# --------------------------------------------------------------------------- clients

_verbose_handler: logging.Handler | None = None


def _turn_up_logging() -> None:
    """``verbose=True``: log the SDK at DEBUG, to stderr unless logging is configured."""
    global _verbose_handler
    logger.setLevel(logging.DEBUG)
    if _verbose_handler is None and not logging.getLogger().handlers and not logger.handlers:
        _verbose_handler = logging.StreamHandler()
        _verbose_handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
        )
        logger.addHandler(_verbose_handler)


def _check_transport(transport: Any, endpoints: Endpoints) -> None:
    """Refuse a ``transport=`` the client could not use, before anything is opened."""
    if transport is None:
        return
    import httpx

    if not isinstance(transport, httpx.AsyncBaseTransport):
        raise ConfigError(
            "transport must be an httpx.AsyncBaseTransport (such as "
            f"httpx.ASGITransport(app)), got {type(transport).__name__}: both Syft and "
            "AsyncSyft send their requests with an httpx.AsyncClient"
        )
    if endpoints.transport == "ws":
        raise ConfigError(
            "a transport= carries HTTP requests only, and a ws:// or wss:// URL asks for a "
            "WebSocket; use the node's http:// or https:// URL (same protocol, over HTTP)"
        )


class BaseSyft:
    """Options shared by :class:`~gridfl.Syft` and :class:`~gridfl.AsyncSyft`.

    Args:
        url: the grid node, ``ws://``, ``wss://``, ``http://`` or ``https://``. The scheme
            picks the transport of authenticate, cycle-request and report; downloads and
            the speed test always use HTTP(S) to the same host.
        auth_token: default token of this client's jobs (``new_job`` may override it).
        verbose: log at DEBUG level, and (as in syft.js) allow plain ``ws``/``http`` to a
            non-loopback host.
        allow_insecure: allow plain ``ws``/``http`` to a non-loopback host; ``None``
            follows ``verbose``. Loopback hosts are always allowed.
        timeout: seconds to wait for each request (connect, reply, each read).
        retries: retries of transient network failures per request.
        speed_test: bounds of the speed test (:class:`~gridfl.client.SpeedTestLimits`).
        headers: extra HTTP headers for every request and the WebSocket handshake.
        secagg_identity: this worker's :class:`~gridfl.secagg.identity.Identity` (its
            Ed25519 signing key and the credential the authority issued for it): the keys
            it advertises in secure aggregation are signed, as processes that
            authenticate workers require.
        secagg_authority: the authority's RSA public key (PEM), got from the authority
            and never from the node: the worker then shares secrets only with neighbours
            whose keys are signed by distinct identities the authority certified
            (docs/secure-aggregation.md, "Signed keys").
        local_state_dir: where the worker keeps per-process state between cycles (FedBN
            buffers, optimizer state; see :mod:`gridfl.client.local_state`); ``None``
            keeps it in memory for the client's lifetime.
        transport: an ``httpx.AsyncBaseTransport`` that carries every HTTP request of
            the client (calls, downloads, speed test) instead of a socket; ``None`` (the
            default) opens connections as usual. With ``httpx.ASGITransport(app)`` the
            client talks to a grid node running in the same process (tests, notebooks),
            no port needed. Such a transport carries HTTP only, so the URL must be
            ``http://`` or ``https://``: a ``ws://`` or ``wss://`` URL is refused with a
            :class:`~gridfl.ConfigError` rather than quietly switched to HTTP (the node
            speaks the same protocol over both). :class:`~gridfl.Syft` sends the requests
            from its private I/O thread, so the app's handlers run on that thread's loop,
            not on the one that ran the app's lifespan: plain requests are served as
            usual, but a held cycle request (``start(wait=...)``) misses the node's
            wake-up and is answered only when its ``wait`` runs out. Use
            :class:`~gridfl.AsyncSyft` on the lifespan's loop when that matters.

    Example, a worker and a node in one process::

        import httpx
        from gridfl import AsyncSyft
        from gridfl.server import Settings, create_app

        app = create_app(Settings(data_dir="grid-data"))
        async with app.router.lifespan_context(app):  # opens the node's database
            async with AsyncSyft(
                "http://localhost", transport=httpx.ASGITransport(app)
            ) as client:
                job = client.new_job("mnist", "1.0")
                ...
    """

    def __init__(
        self,
        url: str,
        *,
        auth_token: str | None = None,
        verbose: bool = False,
        allow_insecure: bool | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        speed_test: Any = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        local_state_dir: str | os.PathLike[str] | None = None,
        secagg_identity: Any = None,
        secagg_authority: str | None = None,
    ) -> None:
        from gridfl.client.local_state import LocalState
        from gridfl.secagg.identity import Identity, Verifier

        if secagg_identity is not None and not isinstance(secagg_identity, Identity):
            raise ConfigError("secagg_identity must be a gridfl.secagg.identity.Identity")
        self.secagg_identity = secagg_identity
        self.secagg_verifier = None if secagg_authority is None else Verifier(secagg_authority)

        self.local_state = LocalState(local_state_dir)
        allow = bool(verbose) if allow_insecure is None else bool(allow_insecure)
        self.endpoints = Endpoints.parse(url, allow_insecure=allow)
        _check_transport(transport, self.endpoints)
        self.url = url
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be a non-negative int, got {retries!r}")
        self.auth_token = auth_token
        self.verbose = bool(verbose)
        self.timeout = float(timeout)
        self.retries = retries
        self.speed_test = speed_test
        self.headers = dict(headers or {})
        # Plans do not change within a process. A gridfl node names each plan's digest in
        # the accepted reply, and a plan held with that digest is not downloaded again;
        # other nodes' plans are downloaded every cycle (the protocol gates downloads by
        # request key), and identical bytes reuse the loaded plan: no onnxruntime session
        # is built twice.
        self._plans: OrderedDict[bytes, Plan] = OrderedDict()
        from gridfl.client._compress import Compressor

        #: top-k error feedback, per process, carried across this client's reports
        self._compressor = Compressor()
        if self.verbose:
            _turn_up_logging()
        logger.debug("client for %s (%s transport)", url, self.endpoints.transport)
        from gridfl.client._transports import Network  # the I/O side, kept out of this core

        self._net = Network(
            transport=self.endpoints.transport,
            ws_url=self.endpoints.ws_url,
            http_url=self.endpoints.http_url,
            timeout=self.timeout,
            retries=self.retries,
            headers=self.headers,
            speed_test=self.speed_test,
            http_transport=transport,
        )

    def _job_token(self, auth_token: str | None) -> str | None:
        return self.auth_token if auth_token is None else auth_token

    def _load_plan(self, raw: bytes) -> Plan:
        """``Plan.from_bytes(raw)``, reusing the plan already loaded from the same bytes."""
        from gridfl.plan import Plan

        key = hashlib.sha256(raw).digest()
        plan = self._cached_plan(key)
        if plan is None:
            plan = self._plans[key] = Plan.from_bytes(raw)
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    def _cached_plan(self, key: bytes) -> Plan | None:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def _held_plan(self, digest: Any) -> Plan | None:
        """The plan already loaded from bytes with this SHA-256 (hex), if any."""
        if not isinstance(digest, str) or len(digest) != 64:
            return None
        try:
            return self._cached_plan(bytes.fromhex(digest))
        except ValueError:
            return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"
