"""FedBuff's pure parts (gridfl.server.fedbuff): the staleness weight, the buffered fold
and publication against a plain-numpy Algorithm 1 (tests/_fedbuff_reference.py), its
composition with a server optimizer, and the validation of ``mode: "async"``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gridfl._exceptions import ConfigError
from gridfl.server import aggregate as agg
from gridfl.server import fedbuff, optimizers
from gridfl.server.config import validate_server_config
from tests import _fedbuff_reference as ref
from tests import _strategy_reference as sref
from tests.builders import diff_of, model_params


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.5])
def test_polynomial_weight_is_one_over_one_plus_staleness_to_the_exponent(exponent):
    cfg = validate_server_config(
        {"mode": "async", "staleness_weight": {"name": "polynomial", "exponent": exponent}}
    )
    for s in range(0, 30, 3):
        assert fedbuff.staleness_weight(cfg, s) == pytest.approx((1 + s) ** -exponent)


def test_default_weight_is_inverse_square_root_and_constant_is_one():
    cfg = validate_server_config({"mode": "async"})
    assert fedbuff.staleness_weight(cfg, 8) == pytest.approx(1 / 3)
    assert fedbuff.staleness_weight(cfg, 0) == 1.0
    const = validate_server_config({"mode": "async", "staleness_weight": {"name": "constant"}})
    assert [fedbuff.staleness_weight(const, s) for s in (0, 5, 19)] == [1.0, 1.0, 1.0]


def _arrivals(count: int, rng) -> list[tuple[list[np.ndarray], int]]:
    """Reports in arrival order, each trained some updates ago (decided as it arrives)."""
    return [(diff_of(i), int(rng.integers(0, 4))) for i in range(count)]


def _run_buffers(strategy, cfg, arrivals, start):
    """The node's path without the database: fold each report with its scale, publish
    every buffer_size reports with the strategy's aggregate."""
    spec = agg.ModelSpec.of(start)
    params, state, published = start, None, []
    sums, version = agg.RunningSums(spec), 0
    for diff, back in arrivals:
        staleness = min(back, version)
        scale = cfg["server_lr"] * fedbuff.staleness_weight(cfg, staleness)
        fedbuff.fold(strategy, sums, diff, scale)
        if sums.count_x == cfg["buffer_size"]:
            params, state = strategy.aggregate(sums, params, state)
            published.append(params)
            sums, version = agg.RunningSums(spec), version + 1
    return published


@pytest.mark.parametrize(
    ("buffer_size", "server_lr", "weight"),
    [
        (3, 1.0, None),
        (4, 0.7, {"name": "polynomial", "exponent": 1.0}),
        (2, 1.3, {"name": "constant"}),
    ],
)
def test_buffers_publish_algorithm_1(buffer_size, server_lr, weight):
    sc = {"mode": "async", "buffer_size": buffer_size, "server_lr": server_lr}
    if weight is not None:
        sc["staleness_weight"] = weight
    cfg = validate_server_config(sc)
    rng = np.random.default_rng(5)
    raw = _arrivals(5 * buffer_size, rng)
    # the reference takes t_k: the version trained on; arrival i sees version i // K
    arrivals = [(d, max(0, i // buffer_size - back)) for i, (d, back) in enumerate(raw)]
    if weight is not None and weight["name"] == "constant":
        exponent = 0.0
    else:
        exponent = (weight or {}).get("exponent", 0.5)
    want = ref.fedbuff(
        model_params(), arrivals, buffer_size=buffer_size, server_lr=server_lr,
        weight=ref.polynomial(exponent),
    )
    got = _run_buffers(agg.FedAvg(), cfg, raw, model_params())
    assert len(got) == len(want) == 5
    for g, w in zip(got, want, strict=True):
        sref.assert_params_close(g, w)


def test_clip_comes_before_the_staleness_weight():
    start = [np.zeros(2, np.float32)]
    cfg = validate_server_config(
        {"mode": "async", "buffer_size": 1, "strategy": {"name": "fedavg", "clip_norm": 1.0}}
    )
    strategy = agg.FedAvg(clip_norm=1.0)
    sums = agg.RunningSums(agg.ModelSpec.of(start))
    fedbuff.fold(strategy, sums, [np.array([3.0, 4.0], np.float32)], 0.5)
    new, _ = strategy.aggregate(sums, start)
    # clipped to norm 1 (0.6, 0.8), then weighted 0.5
    np.testing.assert_allclose(new[0], [-0.3, -0.4], rtol=1e-6)
    assert cfg["strategy"]["clip_norm"] == 1.0


def test_buffered_mean_is_the_server_optimizers_pseudo_gradient():
    adam = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    cfg = validate_server_config(
        {"mode": "async", "buffer_size": 3, "strategy": {"name": "fedadam", **adam}}
    )
    rng = np.random.default_rng(9)
    raw = _arrivals(9, rng)
    got = _run_buffers(optimizers.FedOpt("fedadam", **adam), cfg, raw, model_params())
    # Reddi et al.'s FedAdam fed, per buffer, the staleness-weighted diffs (equal weights)
    cycles = []
    for version in range(3):  # buffer b trains at version b
        reports = []
        for d, back in raw[3 * version : 3 * version + 3]:
            s = 1 / math.sqrt(1 + min(back, version))
            reports.append(([s * x for x in d], 1))
        cycles.append(reports)
    want = sref.fedadam(model_params(), cycles, **adam)
    for g, w in zip(got, want, strict=True):
        sref.assert_params_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("sc", "says"),
    [
        ({"mode": "later"}, "mode must be 'sync' or 'async'"),
        ({"mode": "async", "compression": {"kind": "int8"}}, "not available with mode 'async'"),
        ({"buffer_size": 5}, "only apply with mode 'async'"),
        ({"mode": "async", "buffer_size": 0}, "buffer_size must be an integer >= 1"),
        ({"mode": "async", "max_staleness": -1}, "max_staleness must be an integer >= 0"),
        ({"mode": "async", "max_staleness": 2.5}, "max_staleness must be an integer"),
        ({"mode": "async", "server_lr": 0}, "server_lr must be a number > 0"),
        ({"mode": "async", "staleness_weight": {"name": "hinge"}}, "name one of"),
        (
            {"mode": "async", "staleness_weight": {"name": "polynomial", "exponent": -1}},
            "exponent must be a number in [0, 10]",
        ),
        ({"mode": "async", "staleness_weight": {"name": "constant", "a": 1}}, "has no ['a']"),
        ({"mode": "async", "max_diffs": 10}, "max_diffs does not apply with mode 'async'"),
        ({"mode": "async", "cycle_length": 60}, "cycle_length does not apply"),
        ({"mode": "async", "max_workers": 4}, "max_workers does not apply"),
        ({"mode": "async", "iterative_plan": True}, "iterative_plan do not apply"),
        (
            {"mode": "async", "strategy": {"name": "fedadam"}, "server_lr": 0.5},
            "the optimizer's own rate is the server learning rate",
        ),
    ],
)
def test_bad_async_configs_are_refused_saying_what_to_fix(sc, says):
    with pytest.raises(ConfigError) as e:
        validate_server_config(sc)
    assert says in str(e.value)


def test_robust_strategies_are_refused_in_async_mode():
    with pytest.raises(ConfigError, match=r"needs every diff"):
        validate_server_config(
            {"mode": "async", "strategy": {"name": "fedmedian"}, "max_diffs": None}
        )


def test_sync_is_the_default_and_async_fills_its_defaults():
    assert validate_server_config({})["mode"] == "sync"
    cfg = validate_server_config({"mode": "async"})
    assert (cfg["buffer_size"], cfg["max_staleness"], cfg["server_lr"]) == (10, 20, 1.0)
    assert cfg["staleness_weight"] == {"name": "polynomial", "exponent": 0.5}
