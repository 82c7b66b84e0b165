"""The node's side of differential privacy (docs/privacy.md): :class:`PrivateAggregation`
wraps a process's strategy, the ``privacy_cycles`` ledger persists the accountant's state,
and :func:`status` reports it.

Central mode: each report's diff is clipped to the cycle's clip norm ``C`` before it is
folded (unweighted: ``num_samples`` is ignored, a weight would break the ``C / m`` bound on
one worker's influence); at completion ``N(0, (z C)^2)`` is added to the sum once, the sum
is divided by the fixed expected count ``m``, and the inner strategy's ``step`` applies the
result as the cycle's mean diff (a server optimizer after it is post-processing). Distributed mode:
workers clip and noise; the node refuses a report whose norm cannot come from a clipped,
noised diff, and divides the sum by ``m``. Under secure aggregation the node sees only the
unmasked sum (:mod:`gridfl.server.secagg` folds it on the plain side) and divides it by
``m`` the same way; the accountant charges ``z sqrt(min_survivors / m)`` per cycle
(:func:`gridfl.server.dp_config.accounted_noise_multiplier`).

After each completed cycle the ledger row holds the accountant's steps and ε; when one
more cycle would pass ``max_epsilon`` the process finishes ("privacy budget spent") before
that cycle opens.

    >>> import numpy as np
    >>> from gridfl.server.dp_config import DPConfig
    >>> cfg = {"max_workers": 4, "max_diffs": None, "over_selection": 1.0,
    ...        "differential_privacy": {"mode": "central", "noise_multiplier": 0.0,
    ...        "clip_norm": 1.0, "delta": 1e-5, "population_size": 100,
    ...        "max_epsilon": None, "accountant": "rdp"}}
    >>> dp = PrivateAggregation(agg.FED_AVG, DPConfig.of(cfg), conn=None, process_id=1)
    >>> sums = agg.RunningSums(agg.ModelSpec.of([np.zeros(2)]))
    >>> sums.fold(privacy.clip([np.array([30.0, 40.0])], 1.0)[0])  # what fold() folds
    >>> dp.noised_mean(sums, 1.0).tolist()  # z = 0: the clipped sum over m = 4
    [0.15, 0.2]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gridfl import privacy
from gridfl._exceptions import ConfigError, InvalidRequestError
from gridfl.server import aggregate as agg
from gridfl.server import storage
from gridfl.server.dp_config import DPConfig
from gridfl.server.tables import cycles, privacy_cycles

BUDGET_SPENT = "privacy budget spent"

#: the slack of the distributed-mode norm checks, in noise standard deviations around
#: sqrt(d): an honest report (clipped diff plus its noise) fails them with probability
#: below exp(-50), by the Gaussian norm's concentration
_NORM_SLACK = 10.0

_latest = (
    sa.select(privacy_cycles)
    .where(privacy_cycles.c.process_id == sa.bindparam("process_id"))
    .where(privacy_cycles.c.steps.is_not(None))
    .order_by(privacy_cycles.c.steps.desc())
    .limit(1)
)
_count_fold = (
    privacy_cycles.update()
    .where(privacy_cycles.c.cycle_id == sa.bindparam("b_cycle_id"))
    .values(unclipped=privacy_cycles.c.unclipped + sa.bindparam("bit"))
)


def latest(conn: Connection, process_id: int):
    """The process's privacy state: its completed ledger row with the most steps, or None."""
    return conn.execute(_latest, {"process_id": process_id}).first()


def current_clip_norm(dp: DPConfig, state) -> float:
    return dp.initial_clip_norm if state is None else float(state.next_clip_norm)


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x


class PrivateAggregation(agg.Strategy):
    """DP-FedAvg around ``inner`` (module docstring); built per use with the transaction's
    connection, which holds the open cycle's lock."""

    def __init__(
        self,
        inner: agg.Strategy,
        dp: DPConfig,
        conn: Connection,
        process_id: int,
        rng: np.random.Generator | None = None,
    ) -> None:
        if inner.needs_every_diff or isinstance(inner, agg.IterativeAveraging):
            raise ConfigError(
                f"differential privacy needs a strategy that works from the sum of diffs, "
                f"not {type(inner).__name__}"
            )
        super().__init__()
        self.inner = inner
        self.dp = dp
        self.conn = conn
        self.process_id = process_id
        self.rng = rng or privacy.secure_rng()
        #: set by :meth:`aggregate` when the next cycle would pass max_epsilon
        self.stop_reason: str | None = None

    # the ledger: the node keeps it in privacy_cycles rows (these methods); a simulation
    # keeps it in memory (gridfl.simulation.privacy), around the same arithmetic
    def _cycle_id(self) -> int:
        cycle = storage.open_cycle(self.conn, self.process_id)
        assert cycle is not None  # folds and completions run on the open cycle
        return int(cycle.id)

    def round_clip_norm(self) -> float:
        """The clip norm of the open cycle's reports."""
        return current_clip_norm(self.dp, latest(self.conn, self.process_id))

    def previous(self) -> tuple[int, float]:
        """The accountant's steps so far and the ε one more step costs (stored)."""
        prev = latest(self.conn, self.process_id)
        return (0, math.nan) if prev is None else (int(prev.steps), _stored(prev.epsilon_next))

    def count(self, clip_norm: float, bit: int) -> None:
        """Count one report of the open cycle, ``bit`` 1 when it fit under the clip norm."""
        cycle_id = self._cycle_id()
        if self.conn.execute(_count_fold, {"b_cycle_id": cycle_id, "bit": bit}).rowcount == 0:
            self.conn.execute(
                privacy_cycles.insert().values(
                    cycle_id=cycle_id, process_id=self.process_id, clip_norm=clip_norm,
                    unclipped=bit,
                )
            )

    def unclipped(self) -> int:
        """How many of the open cycle's reports fit under the clip norm."""
        row = self.conn.execute(
            sa.select(privacy_cycles.c.unclipped)
            .where(privacy_cycles.c.cycle_id == self._cycle_id())
        ).first()
        return 0 if row is None else int(row.unclipped)

    def record(self, clip_norm: float, values: dict[str, Any]) -> None:
        """Store the completed cycle's steps, ε, ε next and next clip norm."""
        cycle_id = self._cycle_id()
        done = self.conn.execute(
            privacy_cycles.update().where(privacy_cycles.c.cycle_id == cycle_id).values(**values)
        )
        if done.rowcount == 0:
            self.conn.execute(
                privacy_cycles.insert().values(
                    cycle_id=cycle_id, process_id=self.process_id, clip_norm=clip_norm,
                    unclipped=0, **values,
                )
            )

    def fold(self, sums: agg.RunningSums, diff: Sequence[np.ndarray], num_samples) -> None:
        c = self.round_clip_norm()
        norm = privacy.l2_norm(diff)
        if self.dp.mode == "distributed":
            self.check_distributed_report(norm, c, sums.spec.total)
            sums.fold(diff, None)
        else:
            clipped, _ = privacy.clip(diff, c)
            sums.fold(clipped, None)
        self.count(c, int(norm <= c))

    def check_distributed_report(self, norm: float, clip_norm: float, size: int) -> None:
        """Refuse a report whose norm a diff clipped to C plus the worker's noise (std
        sigma on each of ``size`` values) cannot have: more than C + sigma (sqrt(d) + 10)
        (not clipped), or, when the noise dominates, less than sigma (sqrt(d) - 10) - C
        (the noise is missing)."""
        low, high = _norm_range(clip_norm, self.worker_noise_std(clip_norm), size)
        if norm > high or norm < low:
            what = "more than" if norm > high else "less than"
            raise InvalidRequestError(
                f"the diff's L2 norm {norm:.6g} is {what} a report clipped to {clip_norm:g} "
                f"and noised can have ({low if norm < low else high:.6g}): this process uses "
                "distributed differential privacy; report with gridfl's worker SDK, which "
                "clips and adds the noise"
            )

    def worker_noise_std(self, clip_norm: float) -> float:
        """A worker's share of the noise in distributed mode: ``z C / sqrt(m)``."""
        return self.dp.noise_multiplier * clip_norm / math.sqrt(self.dp.expected_reports)

    def noised_mean(self, sums: agg.RunningSums, clip_norm: float) -> np.ndarray:
        """``(sum of clipped diffs + N(0, (z C)^2)) / m`` (central; no noise added in
        distributed mode, where the reports carry it)."""
        total = np.zeros(sums.spec.total) if sums.sum_x is None else sums.sum_x.astype(np.float64)
        std = self.dp.update_noise_multiplier * clip_norm
        if self.dp.mode == "central" and std > 0:
            total += self.rng.normal(0.0, std, size=total.shape)
        return total / self.dp.expected_reports

    def combine(self, sums: agg.RunningSums) -> np.ndarray:
        """The cycle's noised mean at the clip norm its reports were clipped to."""
        return self.noised_mean(sums, self.round_clip_norm())

    def step(self, update, params, spec, state):
        return self.inner.step(update, params, spec, state)

    def describe(self, state: agg.StrategyState) -> dict[str, Any]:
        return self.inner.describe(state)

    def aggregate(self, sums, params, state=None):
        dp = self.dp
        c = self.round_clip_norm()
        # the inner strategy's state (a server optimizer's moments) passes through
        new_params, inner_state = self.inner.step(
            self.noised_mean(sums, c), params, sums.spec, state
        )
        next_c = c
        if dp.adaptive is not None:
            next_c, _ = privacy.adaptive_clip_update(
                c,
                self.unclipped(),
                sums.count_x,
                dp.expected_reports,
                dp.adaptive["target_quantile"],
                dp.adaptive["learning_rate"],
                dp.adaptive["count_stddev"],
                self.rng,
            )
        prev_steps, prev_eps_next = self.previous()
        steps = prev_steps + 1
        eps = dp.epsilon(steps) if prev_steps == 0 else prev_eps_next
        eps_next = dp.epsilon(steps + 1)
        self.record(c, dict(
            steps=steps,
            epsilon=_finite(eps),
            epsilon_next=_finite(eps_next),
            next_clip_norm=next_c,
        ))
        if dp.max_epsilon is not None and eps_next > dp.max_epsilon:
            self.stop_reason = _spent(eps, eps_next, dp.max_epsilon)
        return new_params, inner_state


def _norm_range(clipped: float, sigma: float, size: int) -> tuple[float, float]:
    """Where the norm of a vector of norm at most ``clipped`` plus N(0, sigma^2) on each of
    ``size`` values falls, but with probability below exp(-50) (Gaussian concentration)."""
    high = clipped + sigma * (math.sqrt(size) + _NORM_SLACK)
    low = sigma * (math.sqrt(size) - _NORM_SLACK) - clipped
    return low, high


def secure_sums(
    server_config: dict, spec: agg.ModelSpec, total: np.ndarray, reports: int, scale: float
) -> agg.RunningSums:
    """A secure cycle's unmasked signed sum ``[sum of weights, sum of quantized values...]``
    (``scale`` steps per unit) as the plain running sums the privacy wrapper divides by m.
    Raises :class:`InvalidRequestError` when the sum cannot come from ``reports`` honest
    workers: weights other than 1 (DP-FedAvg is unweighted), or a norm outside what
    ``reports`` diffs clipped to C plus their noise and rounding can have (too large: a
    worker did not clip; too small, where the noise dominates: the noise is missing).

        >>> import numpy as np
        >>> cfg = {"max_workers": 2, "max_diffs": 2, "over_selection": 1.0,
        ...        "secure_aggregation": {"min_survivors": 2},
        ...        "differential_privacy": {"mode": "distributed", "noise_multiplier": 0.0,
        ...        "clip_norm": 1.0, "delta": 1e-5, "population_size": 10,
        ...        "max_epsilon": None, "accountant": "rdp"}}
        >>> spec = agg.ModelSpec.of([np.zeros(2)])
        >>> secure_sums(cfg, spec, np.array([2, 100, -50]), 2, 100.0).sum_x.tolist()
        [1.0, -0.5]
        >>> try:  # norm 9 > 2 C: a worker did not clip
        ...     secure_sums(cfg, spec, np.array([2, 900, 0]), 2, 100.0)
        ... except InvalidRequestError as e:
        ...     print(str(e)[:45])
        its unmasked sum has L2 norm 9, outside [-2.0
    """
    dp = DPConfig.of(server_config)
    assert dp is not None and dp.mode == "distributed"
    if int(total[0]) != reports:
        raise InvalidRequestError(
            f"its unmasked weights sum to {int(total[0])}, not to the {reports} reports: a "
            "worker weighted its input, which differential privacy forbids"
        )
    sums = agg.RunningSums(spec)
    sums.count_x = reports
    sums.sum_x = total[1:].astype(np.float64) / scale
    c = dp.initial_clip_norm  # fixed: adaptive clipping is refused with secure aggregation
    sigma = dp.noise_multiplier * c * math.sqrt(reports / dp.expected_reports)
    low, high = _norm_range(reports * c, sigma, spec.total)
    # each worker's rounding moves each value by less than one step
    rounding = reports * math.sqrt(spec.total) / scale
    low, high = low - rounding, high + rounding
    norm = float(np.linalg.norm(sums.sum_x))
    if not low <= norm <= high:
        raise InvalidRequestError(
            f"its unmasked sum has L2 norm {norm:.6g}, outside [{low:.6g}, {high:.6g}] where "
            f"{reports} reports clipped to {c:g} and noised fall: a worker did not clip or "
            "did not add its noise"
        )
    return sums


def _stored(x: float | None) -> float:
    return math.inf if x is None else float(x)


def _spent(eps: float, eps_next: float, max_eps: float) -> str:
    return (
        f"{BUDGET_SPENT}: epsilon is {eps:.4g}, one more cycle would make it {eps_next:.4g} "
        f"> max_epsilon {max_eps:g}"
    )


def wrap(inner: agg.Strategy, server_config: dict, conn: Connection, process_id: int):
    """``inner`` as is, or wrapped in :class:`PrivateAggregation` when the process was
    hosted with ``differential_privacy``."""
    dp = DPConfig.of(server_config)
    return inner if dp is None else PrivateAggregation(inner, dp, conn, process_id)


def worker_settings(client_config: dict, server_config: dict) -> dict:
    """The ``client_config`` workers receive: in distributed mode with the clip norm and
    noise each must apply (``differential_privacy``, a key the host may not set)."""
    if "differential_privacy" in client_config:
        raise ConfigError(
            "client_config.differential_privacy is set by the node; configure privacy in "
            "server_config.differential_privacy"
        )
    dp = DPConfig.of(server_config)
    if dp is None or dp.mode != "distributed":
        return client_config
    return {**client_config, "differential_privacy": dp.for_workers()}


def finished_reason(conn: Connection, process_id: int, server_config: dict) -> str | None:
    """Why a finished process finished, when its privacy budget is what ended it."""
    dp = DPConfig.of(server_config)
    if dp is None or dp.max_epsilon is None:
        return None
    state = latest(conn, process_id)
    if state is None or _stored(state.epsilon_next) <= dp.max_epsilon:
        return None
    return _spent(_stored(state.epsilon), _stored(state.epsilon_next), dp.max_epsilon)


def annotate_status(conn: Connection, process, out: dict[str, Any]) -> None:
    """Add the privacy figures to an admin status reply ``out``: ``out["privacy"]``
    (:func:`status`), and to each listed cycle the ``epsilon`` spent once it completed
    (null while open, expired, or infinite with z = 0) and the ``clip_norm`` its reports
    were clipped to."""
    figures = status(conn, process)
    if figures is None:
        return
    out["privacy"] = figures
    listed = [c["sequence"] for c in out.get("cycles", [])]
    rows = conn.execute(
        sa.select(cycles.c.sequence, privacy_cycles.c.epsilon, privacy_cycles.c.clip_norm)
        .join(cycles, cycles.c.id == privacy_cycles.c.cycle_id)
        .where(privacy_cycles.c.process_id == process.id, cycles.c.sequence.in_(listed))
    ).all()
    by_sequence = {r.sequence: r for r in rows}
    for entry in out.get("cycles", []):
        row = by_sequence.get(entry["sequence"])
        entry["epsilon"] = None if row is None else row.epsilon
        entry["clip_norm"] = None if row is None else row.clip_norm


def status(conn: Connection, process) -> dict[str, Any] | None:
    """The process's privacy figures (``None`` without DP): its configuration, the
    sampling rate and expected count, steps and ε spent, ε after one more cycle, the
    current clip norm, and whether the budget is spent (and why)."""
    dp = DPConfig.of(process.server_config)
    if dp is None:
        return None
    state = latest(conn, process.id)
    reason = finished_reason(conn, process.id, process.server_config)
    return {
        "mode": dp.mode,
        "noise_multiplier": dp.noise_multiplier,
        "accounted_noise_multiplier": dp.accounted_noise_multiplier,
        "clip_norm": current_clip_norm(dp, state),
        "adaptive_clipping": dp.adaptive is not None,
        "delta": dp.delta,
        "population_size": dp.population_size,
        "expected_reports": dp.expected_reports,
        "sampling_rate": dp.sampling_rate,
        "accountant": dp.accountant,
        "accountant_version": f"dp-accounting {metadata.version('dp-accounting')}",
        "max_epsilon": dp.max_epsilon,
        "steps": 0 if state is None else int(state.steps),
        # null: infinite (noise_multiplier 0)
        "epsilon": 0.0 if state is None else state.epsilon,
        "epsilon_next": None if state is None else state.epsilon_next,
        "budget_spent": reason is not None,
        "reason": reason,
    }
