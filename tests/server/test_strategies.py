"""Each aggregation strategy against a plain-numpy reference written here from its paper,
over several cycles, with the optimizer state carried (and round-tripped through its
stored encoding) from one cycle to the next.

References use the papers' own sign (Reddi et al.: Δ = trained - original, x += η m/(√v+τ);
Hsu et al.: Δw = original - mean trained, x -= lr v), not gridfl's, so a sign slip in the
strategies shows up here. Robust rules are checked against loops over coordinates and
pairs (and SciPy's trim_mean for the trimmed mean).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gridfl._exceptions import ConfigError, ModelError
from gridfl.server import aggregate as agg
from gridfl.server import strategies

SHAPES = [(3, 2), (4,)]
CYCLES = 4


def _params(rng) -> list[np.ndarray]:
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _unflat(flat: np.ndarray) -> list[np.ndarray]:
    out, i = [], 0
    for s in SHAPES:
        n = math.prod(s)
        out.append(flat[i : i + n].reshape(s))
        i += n
    return out


def _run(cfg: dict, reports_per_cycle, *, max_diffs=None):
    """Run ``cfg``'s strategy over cycles of (diffs, num_samples) reports, as the node
    does: fold each (keeping diffs for robust rules), aggregate with the stored state."""
    cfg = strategies.normalize(cfg, max_diffs=max_diffs)
    strategy = strategies.strategy_for(cfg)
    rng = np.random.default_rng(7)
    params = _params(rng)
    start = [p.copy() for p in params]
    state, history = None, []
    for reports in reports_per_cycle:
        sums = agg.RunningSums(agg.ModelSpec.of(params))
        kept = []
        for diff, n in reports:
            strategy.fold(sums, [d.astype(np.float32) for d in diff], n)
            if sums.changed == "kept":
                kept.append(sums.kept.copy())
        if kept:
            sums.diffs = np.stack(kept).astype(np.float64)
        params, state = strategy.aggregate(sums, params, state)
        if state is not None:  # as the node stores and reloads it
            state = agg.StrategyState.decode(*state.encode())
        history.append([p.copy() for p in params])
    return start, history, state


def _cycles(rng, k=5, weighted=True):
    out = []
    for _ in range(CYCLES):
        out.append(
            [
                (
                    [rng.normal(scale=0.1, size=s) for s in SHAPES],
                    int(rng.integers(1, 50)) if weighted else None,
                )
                for _ in range(k)
            ]
        )
    return out


def _as32(reports):
    """The diffs as the node receives them (float32), float64 for the reference."""
    return [([d.astype(np.float32).astype(np.float64) for d in diff], n) for diff, n in reports]


def _mean_trained_minus_original(reports) -> np.ndarray:
    """Reddi's Δ_t: the (num_samples-weighted) mean of y_i - x_t = -diff_i."""
    w = np.array([n for _, n in reports], dtype=np.float64)
    deltas = np.stack([-_flat(d) for d, _ in _as32(reports)])
    return (w[:, None] * deltas).sum(axis=0) / w.sum()


@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_optimizers_follow_reddi_algorithm_2(rule):
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-2
    cfg = {"name": rule, "eta": eta, "beta_1": b1, "tau": tau}
    if rule != "fedadagrad":
        cfg["beta_2"] = b2
    rng = np.random.default_rng(1)
    cycles = _cycles(rng)
    start, history, state = _run(cfg, cycles)
    x = _flat(start)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)  # v_{-1} = τ²
    for t, reports in enumerate(cycles):
        delta = _mean_trained_minus_original(reports)
        m = b1 * m + (1 - b1) * delta
        if rule == "fedadagrad":
            v = v + delta**2
        elif rule == "fedadam":
            v = b2 * v + (1 - b2) * delta**2
        else:
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        x = _flat([a.astype(np.float32) for a in _unflat(x + eta * m / (np.sqrt(v) + tau))])
        np.testing.assert_allclose(_flat(history[t]), x, rtol=1e-5, atol=1e-6)
    assert state.step == CYCLES
    np.testing.assert_allclose(state.tensors["v"], v, rtol=1e-6)
    np.testing.assert_allclose(-state.tensors["m"], m, rtol=1e-6, atol=1e-12)


def test_fedadam_first_step_moves_toward_the_trained_model():
    """Pitfall check: one report, τ→0, the step is η·sign toward trained (no bias
    correction: exactly η, not Flower's 0.7425·η)."""
    params = [np.zeros(3, np.float32)]
    trained = np.array([0.5, -2.0, 1e-3])
    strategy = strategies.strategy_for(
        strategies.normalize({"name": "fedadam", "eta": 0.1, "tau": 1e-9}, max_diffs=None)
    )
    sums = agg.RunningSums(agg.ModelSpec.of(params))
    strategy.fold(sums, [(params[0] - trained).astype(np.float32)], None)
    new, _ = strategy.aggregate(sums, params, None)
    # m = 0.1 Δ, v = 0.01 Δ² → m/√v = sign(Δ)
    np.testing.assert_allclose(new[0], 0.1 * np.sign(trained), rtol=1e-4)


def test_fedavgm_is_momentum_sgd_on_the_mean_diff():
    lr, mu = 0.7, 0.9
    rng = np.random.default_rng(2)
    cycles = _cycles(rng)
    start, history, state = _run(
        {"name": "fedavgm", "server_learning_rate": lr, "server_momentum": mu}, cycles
    )
    x, v = _flat(start), None
    for t, reports in enumerate(cycles):
        w = np.array([n for _, n in reports], dtype=np.float64)
        trained = [x - _flat(d) for d, _ in _as32(reports)]
        mean_trained = sum(wi * y for wi, y in zip(w, trained, strict=True)) / w.sum()
        dw = x - mean_trained  # Hsu et al.'s Δw
        v = dw if v is None else mu * v + dw
        x = _flat([a.astype(np.float32) for a in _unflat(x - lr * v)])
        np.testing.assert_allclose(_flat(history[t]), x, rtol=1e-5, atol=1e-6)
    assert state.step == CYCLES


def test_fedavgm_defaults_are_plain_fedavg():
    rng = np.random.default_rng(3)
    cycles = _cycles(rng)
    _, avgm, _ = _run({"name": "fedavgm"}, cycles)
    _, avg, _ = _run({"name": "fedavg"}, cycles)
    for a, b in zip(avgm, avg, strict=True):
        np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-6, atol=1e-7)


def _clip_reference(diff, c):
    norm = math.sqrt(sum(float((np.asarray(d, np.float64) ** 2).sum()) for d in diff))
    return [np.asarray(d, np.float64) * min(1.0, c / norm) for d in diff]


def test_clip_norm_bounds_each_report_before_folding():
    rng = np.random.default_rng(4)
    cycles = _cycles(rng, weighted=False)
    cycles[1][0] = ([d * 1000 for d in cycles[1][0][0]], None)  # one huge report
    c = 0.2
    start, history, _ = _run({"name": "fedavg", "clip_norm": c}, cycles)
    x = _flat(start)
    for t, reports in enumerate(cycles):
        clipped = [_flat(_clip_reference(d, c)) for d, _ in _as32(reports)]
        assert all(np.linalg.norm(d) <= c * (1 + 1e-6) for d in clipped)
        x = _flat([a.astype(np.float32) for a in _unflat(x - np.mean(clipped, axis=0))])
        np.testing.assert_allclose(_flat(history[t]), x, rtol=1e-5, atol=1e-6)


def _robust_cycles(rng, n=10, poisoned=2):
    cycles = []
    for _ in range(CYCLES):
        reports = [([rng.normal(scale=0.1, size=s) for s in SHAPES], 10) for _ in range(n)]
        for i in range(poisoned):
            reports[i] = ([d * 100 for d in reports[i][0]], 10_000)  # scaled, heavy claim
        cycles.append(reports)
    return cycles


def _ref_krum_scores(rows, f):
    n = len(rows)
    scores = []
    for i in range(n):
        dists = sorted(float(((rows[i] - rows[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    return scores


def _ref_bulyan(rows, f):
    rest = list(range(len(rows)))
    chosen = []
    for _ in range(len(rows) - 2 * f):
        sub = [rows[i] for i in rest]
        scores = _ref_krum_scores(sub, f)
        pick = rest[scores.index(min(scores))]
        chosen.append(pick)
        rest.remove(pick)
    beta = len(chosen) - 2 * f  # θ - 2f
    out = np.empty(rows[0].shape)
    for c in range(out.size):
        vals = sorted(rows[i][c] for i in chosen)
        med = float(np.median(vals))
        out[c] = np.mean(sorted(vals, key=lambda v: abs(v - med))[:beta])
    return out


def _ref_rule(name, rows, cfg):
    f = cfg.get("num_malicious_nodes", 0)
    if name == "fedmedian":
        middle = [sorted(col)[len(col) // 2 - 1 : len(col) // 2 + 1] for col in rows.T]
        return np.array(middle).mean(axis=1)  # n is even here
    if name == "fedtrimmedavg":
        return stats.trim_mean(rows, cfg["beta"], axis=0)
    scores = _ref_krum_scores(rows, f)
    if name == "krum":
        return rows[scores.index(min(scores))]
    if name == "multikrum":
        best = sorted(range(len(rows)), key=lambda i: scores[i])[: cfg["num_nodes_to_select"]]
        return rows[best].mean(axis=0)  # the paper's plain mean, not weighted by examples
    return _ref_bulyan(rows, f)


@pytest.mark.parametrize(
    ("name", "cfg", "n"),
    [
        ("fedmedian", {}, 10),
        ("fedtrimmedavg", {"beta": 0.2}, 10),
        ("krum", {"num_malicious_nodes": 2}, 10),
        ("multikrum", {"num_malicious_nodes": 2, "num_nodes_to_select": 4}, 10),
        ("bulyan", {"num_malicious_nodes": 2}, 11),
    ],
)
def test_robust_rules_match_their_definitions(name, cfg, n):
    rng = np.random.default_rng(5)
    cycles = _robust_cycles(rng, n=n)
    start, history, state = _run({"name": name, **cfg}, cycles, max_diffs=n)
    assert state is None
    x = _flat(start)
    for t, reports in enumerate(cycles):
        rows = np.stack([_flat(d) for d, _ in _as32(reports)])
        x = _flat([a.astype(np.float32) for a in _unflat(x - _ref_rule(name, rows, cfg))])
        np.testing.assert_allclose(_flat(history[t]), x, rtol=1e-5, atol=1e-6)
        # the poisoned reports (x100) moved nothing by more than an honest diff would
        assert np.abs(_flat(history[t]) - _flat(history[t - 1] if t else start)).max() < 1.0


def test_robust_rule_with_too_few_reports_is_a_model_error():
    strategy = strategies.strategy_for(
        strategies.normalize({"name": "krum", "num_malicious_nodes": 1}, max_diffs=5)
    )
    params = [np.zeros(2, np.float32)]
    sums = agg.RunningSums(agg.ModelSpec.of(params))
    for v in (1.0, 2.0, 3.0):
        strategy.fold(sums, [np.full(2, v, np.float32)], None)
    sums.diffs = np.ones((3, 2))
    with pytest.raises(ModelError, match="needs at least 5 reports; the cycle has 3"):
        strategy.aggregate(sums, params, None)


@pytest.mark.parametrize(
    ("cfg", "max_diffs", "message"),
    [
        ({"name": "fedsgd"}, None, "strategy.name must be one of"),
        ("fedadam", None, "server_config.strategy must be an object"),
        ({"name": "fedadam", "eta": -0.1}, None, "strategy.eta must be a number > 0"),
        ({"name": "fedadam", "beta_1": 1.0}, None, "strategy.beta_1 must be a number in [0, 1)"),
        ({"name": "fedyogi", "beta_2": -0.5}, None, "strategy.beta_2 must be a number in [0, 1)"),
        ({"name": "fedadam", "tau": 0}, None, "strategy.tau must be a number > 0"),
        ({"name": "fedavgm", "server_momentum": 1}, None, "server_momentum must be a number in"),
        ({"name": "fedadam", "eta_l": 0.1}, None, "fedadam has no ['eta_l']"),
        ({"name": "fedavg", "clip_norm": 0}, None, "clip_norm must be a number > 0"),
        ({"name": "fedprox"}, None, "fedprox needs proximal_mu (a number >= 0)"),
        ({"name": "fedprox", "proximal_mu": -0.01}, None, "proximal_mu must be a number >= 0"),
        ({"name": "fedprox", "proximal_mu": "0.1"}, None, "proximal_mu must be a number >= 0"),
        ({"name": "fedprox", "proximal_mu": 0.1, "eta": 1}, None, "fedprox has no ['eta']"),
        ({"name": "fedtrimmedavg", "beta": 0.5}, 10, "beta must be a number in [0, 0.5)"),
        ({"name": "fedmedian"}, None, "set server_config.max_diffs"),
        ({"name": "krum", "num_malicious_nodes": 4}, 10, "needs max_diffs >= 11"),
        ({"name": "bulyan", "num_malicious_nodes": 2}, 10, "needs max_diffs >= 11"),
        ({"name": "krum", "num_malicious_nodes": True}, 10, "an integer >= 0"),
        (
            {"name": "multikrum", "num_malicious_nodes": 2, "num_nodes_to_select": 9},
            10,
            "num_nodes_to_select must be <= max_diffs - num_malicious_nodes = 8",
        ),
    ],
)
def test_bad_strategy_objects_are_refused(cfg, max_diffs, message):
    with pytest.raises(ConfigError) as e:
        strategies.normalize(cfg, max_diffs=max_diffs)
    assert message in str(e.value)


def test_defaults_follow_flower():
    def norm(name):
        return strategies.normalize({"name": name}, max_diffs=10)

    assert norm("fedadam") == {
        "name": "fedadam", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3,
        "clip_norm": None,
    }
    assert norm("fedyogi")["eta"] == 0.01
    assert norm("fedadagrad")["beta_1"] == 0.0
    assert norm("fedavgm")["server_learning_rate"] == 1.0
    assert norm("fedtrimmedavg")["beta"] == 0.2
    assert norm("multikrum")["num_nodes_to_select"] == 1
    assert strategies.normalize(None, max_diffs=None) is None


def test_fedprox_aggregates_with_fedavg_and_takes_flowers_proximal_mu():
    """Li et al. change only the local objective: the node's rule is FedAvg's weighted
    mean, clip_norm included."""
    cfg = strategies.normalize({"name": "fedprox", "proximal_mu": 0.0}, max_diffs=None)
    assert cfg == {"name": "fedprox", "proximal_mu": 0.0, "clip_norm": None}
    assert isinstance(strategies.strategy_for(cfg), agg.FedAvg)
    clipped = strategies.normalize(
        {"name": "fedprox", "proximal_mu": 0.1, "clip_norm": 2.0}, max_diffs=None)
    assert strategies.strategy_for(clipped).clip_norm == 2.0


def test_fedprox_runs_with_what_fedavg_runs_with():
    """The node's side of FedProx is FedAvg's: async buffers, secure aggregation,
    differential privacy and compression all take it (docs/configs.md#fedprox)."""
    from gridfl.server.config import validate_server_config

    fp = {"name": "fedprox", "proximal_mu": 0.1}
    for extra in (
        {"mode": "async", "buffer_size": 5},
        {"max_diffs": 5, "min_diffs": 5, "max_workers": 5, "secure_aggregation": {"threshold": 3}},
        {"max_diffs": 5, "max_workers": 5, "differential_privacy": {
            "noise_multiplier": 1.0, "clip_norm": 1.0, "population_size": 100}},
        {"compression": {"kind": "int8"}},
    ):
        cfg = validate_server_config({"strategy": fp, **extra})
        assert cfg["strategy"]["proximal_mu"] == 0.1
        assert all(cfg[k] is not None for k in extra if k != "mode")
