"""Differential privacy's pure parts (gridfl.privacy, gridfl.server.dp_config): clipping and
noise against numpy references written from the papers' formulas, epsilon against
dp-accounting (and Opacus) called here, adaptive clipping against Andrew et al.'s rule, and
the configuration's refusals. The node's side is in tests/server/test_privacy.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gridfl import privacy
from gridfl._exceptions import ConfigError
from gridfl.server.config import validate_server_config

dp_accounting = pytest.importorskip("dp_accounting")
stats = pytest.importorskip("scipy.stats")

SHAPES = [(5, 4), (4,), (2, 3, 2)]


def _diff(rng, scale):
    return [(scale * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]


def _reference_clip(arrays, c):
    """McMahan et al.'s flat clipping: all tensors as one vector, scaled to norm <= C."""
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    norm = np.linalg.norm(flat)
    return [np.asarray(a, np.float64) * min(1.0, c / norm) for a in arrays], norm


@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 1e6])
def test_clip_matches_the_flat_numpy_reference(scale):
    rng = np.random.default_rng(7)
    for c in (0.01, 0.5, 3.0):
        diff = _diff(rng, scale)
        got, norm = privacy.clip(diff, c)
        want, want_norm = _reference_clip(diff, c)
        assert norm == pytest.approx(want_norm, rel=1e-12)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=0)
        out_norm = np.linalg.norm(np.concatenate([g.ravel() for g in got]))
        assert out_norm <= c * (1 + 1e-12)
        if want_norm <= c:  # within the ball: untouched
            for g, d in zip(got, diff, strict=True):
                np.testing.assert_array_equal(g, d.astype(np.float64))


def _std_interval(n, sigma, p=1e-6):
    """Where the sample standard deviation of n N(0, sigma^2) draws falls but with
    probability p: (n-1) s^2 / sigma^2 follows chi-square with n-1 degrees of freedom."""
    lo, hi = stats.chi2.ppf([p / 2, 1 - p / 2], n - 1)
    return sigma * math.sqrt(lo / (n - 1)), sigma * math.sqrt(hi / (n - 1))


def test_worker_noise_is_clipped_diff_plus_gaussian_of_the_share():
    z, c, m = 1.3, 0.5, 8
    std = z * c / math.sqrt(m)
    diff = _diff(np.random.default_rng(1), 10.0)
    got = privacy.privatize(diff, c, std, np.random.default_rng(99))
    # the reference: clip, then one draw per tensor in order from the same generator
    clipped, _ = _reference_clip(diff, c)
    ref_rng = np.random.default_rng(99)
    want = [(a + ref_rng.normal(0.0, std, size=a.shape)).astype(np.float32) for a in clipped]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, w)


def test_worker_noise_statistics_from_the_secure_generator():
    """Many reports of a zero diff: the noise each worker adds has std z*C/sqrt(m), so m of
    them sum to std z*C, DP-FedAvg's noise on the sum."""
    z, c, m = 1.0, 2.0, 4
    std = z * c / math.sqrt(m)
    zero = [np.zeros(s, np.float64) for s in SHAPES]
    samples = np.concatenate(
        [np.concatenate([a.ravel() for a in privacy.privatize(zero, c, std)]) for _ in range(400)]
    )
    lo, hi = _std_interval(samples.size, std)
    assert lo <= samples.std(ddof=1) <= hi
    assert abs(samples.mean()) < 6 * std / math.sqrt(samples.size)


def test_secure_rng_is_seeded_afresh():
    assert privacy.secure_rng().integers(1 << 62) != privacy.secure_rng().integers(1 << 62)


# ---------------------------------------------------------------------------- the accountant
def _dp_accounting_epsilon(q, z, steps, delta, pld=False):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    acct = dp_accounting.pld.PLDAccountant() if pld else dp_accounting.rdp.RdpAccountant()
    acct.compose(event)
    return acct.get_epsilon(delta)


CONFIGS = [(0.1, 1.0, 100, 1e-5), (0.01, 1.1, 1000, 1e-5), (0.5, 2.0, 20, 1e-6)]


@pytest.mark.parametrize(("q", "z", "steps", "delta"), CONFIGS)
def test_epsilon_is_dp_accountings(q, z, steps, delta):
    assert privacy.epsilon(q, z, steps, delta) == _dp_accounting_epsilon(q, z, steps, delta)
    assert privacy.epsilon(q, z, steps, delta, "pld") == _dp_accounting_epsilon(
        q, z, steps, delta, pld=True
    )
    # PLD is the tighter bound of the two
    assert privacy.epsilon(q, z, steps, delta, "pld") < privacy.epsilon(q, z, steps, delta)


@pytest.mark.parametrize(("q", "z", "steps", "delta"), CONFIGS)
def test_epsilon_agrees_with_opacus_rdp(q, z, steps, delta):
    """Opacus's RDP accountant, on dp-accounting's orders: its RDP-to-(epsilon, delta)
    conversion differs from dp-accounting's in the third significant digit at most."""
    opacus_rdp = pytest.importorskip("opacus.accountants.analysis.rdp")
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    orders = list(DEFAULT_RDP_ORDERS)
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert privacy.epsilon(q, z, steps, delta) == pytest.approx(eps, rel=1e-3)


def test_pld_bounds_its_cost():
    """Small z is refused; far beyond any useful epsilon, RDP's value (an upper bound on
    PLD's) is returned without building the distributions."""
    with pytest.raises(ValueError, match=r"needs z >= 0\.5"):
        privacy.epsilon(0.5, 0.1, 3, 1e-5, "pld")
    q, z, steps, delta = 1.0, 0.5, 30, 1e-5
    rdp = _dp_accounting_epsilon(q, z, steps, delta)
    assert rdp > privacy.PLD_MAX_EPSILON
    assert privacy.epsilon(q, z, steps, delta, "pld") == rdp


def test_epsilon_edges():
    assert privacy.epsilon(0.1, 1.0, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.1, 0.0, 3, 1e-5) == math.inf
    # more cycles, more epsilon; more noise, less
    assert privacy.epsilon(0.1, 1.0, 10, 1e-5) < privacy.epsilon(0.1, 1.0, 11, 1e-5)
    assert privacy.epsilon(0.1, 2.0, 10, 1e-5) < privacy.epsilon(0.1, 1.0, 10, 1e-5)


# ---------------------------------------------------------------------------- adaptive clipping
def test_noise_split_composes_to_one_gaussian_of_multiplier_z():
    """Andrew et al.: update (multiplier z_delta) and centred count (sensitivity 1/2, std
    sigma_b, so multiplier 2 sigma_b) compose like one Gaussian: z^-2 = z_d^-2 + (2 s_b)^-2."""
    for z, sb in [(1.0, 5.0), (0.5, 0.3), (2.0, 1.5)]:
        zd = privacy.noise_split(z, sb)
        assert zd**-2 + (2 * sb) ** -2 == pytest.approx(z**-2, rel=1e-12)
    with pytest.raises(ValueError, match="more than z/2"):
        privacy.noise_split(1.0, 0.5)


def test_adaptive_update_moves_the_right_way():
    """Every update at norm 1 and C starting at 0.1 (Flower 1.42 shrank it to 0.037 in 10
    rounds): with no report under C, the paper's rule raises C by exp(lr * target) a round."""
    c = 0.1
    for _ in range(10):
        c, fraction = privacy.adaptive_clip_update(c, 0, 10, 10, 0.5, 0.2, 0.0)
        assert fraction == 0.0
    assert c == pytest.approx(0.1 * math.exp(0.2 * 0.5) ** 10, rel=1e-12)


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_adaptive_clipping_converges_to_the_target_quantile(target):
    """Synthetic update norms (log-normal, median 1): from C = 0.1, with the count noised
    at m/20 as the paper advises, C tracks the target quantile within 10% after 30 rounds."""
    rng = np.random.default_rng(3)
    m, lr = 100, 0.2
    true_quantile = math.exp(stats.norm.ppf(target) * 0.5)  # of lognormal(0, 0.5)
    c, history = 0.1, []
    for _ in range(80):
        norms = rng.lognormal(0.0, 0.5, size=m)
        unclipped = int((norms <= c).sum())
        c, _ = privacy.adaptive_clip_update(c, unclipped, m, m, target, lr, m / 20, rng)
        history.append(c)
    late = np.array(history[30:])
    assert np.all(np.abs(late / true_quantile - 1) < 0.10), late / true_quantile


# ---------------------------------------------------------------------------- configuration
BASE = {"max_workers": 10, "max_diffs": 10, "min_diffs": None, "cycle_length": 60}
DP = {"noise_multiplier": 1.0, "clip_norm": 0.5, "population_size": 1000}


def _validate(dp_overrides=None, **server):
    dp = {**DP, **(dp_overrides or {})}
    return validate_server_config({**BASE, **server, "differential_privacy": dp})


def test_defaults_are_filled_in():
    dp = _validate({"clip_norm": {"initial": 0.1}})["differential_privacy"]
    assert dp == {
        "mode": "central",
        "noise_multiplier": 1.0,
        "clip_norm": {
            "initial": 0.1,
            "target_quantile": 0.5,
            "learning_rate": 0.2,
            "count_stddev": max(10 / 20, 1.0),  # m/20, at least z
        },
        "delta": 1e-5,
        "population_size": 1000,
        "max_epsilon": None,
        "accountant": "rdp",
    }
    assert validate_server_config({})["differential_privacy"] is None


@pytest.mark.parametrize(
    ("dp", "server", "message"),
    [
        ({"noise_multiplier": -0.1}, {}, "noise_multiplier must be a number >= 0"),
        ({"clip_norm": 0}, {}, "clip_norm must be a number > 0"),
        ({"clip_norm": -1.0}, {}, "clip_norm must be a number > 0"),
        ({"delta": 0}, {}, "delta must be a number in (0, 1)"),
        ({"delta": 1.0}, {}, "delta must be a number in (0, 1)"),
        ({"delta": 0.01}, {}, "must be below 1 / population_size"),
        ({"population_size": 5}, {}, "population_size (5) is smaller than the workers"),
        ({"population_size": 0}, {}, "population_size must be an integer >= 1"),
        ({"mode": "local"}, {}, "mode must be 'central' or 'distributed'"),
        ({"accountant": "moments"}, {}, "accountant must be 'rdp' or 'pld'"),
        ({"accountant": "pld", "noise_multiplier": 0.3}, {}, "'pld' needs noise_multiplier"),
        ({"max_epsilon": 0}, {}, "max_epsilon must be a number > 0 or null"),
        ({"noise_multiplier": 0.0, "max_epsilon": 5.0}, {}, "epsilon is infinite"),
        ({"max_epsilon": 1e-3}, {}, "one cycle alone spends epsilon"),
        ({"sigma": 1}, {}, "unknown keys ['sigma']"),
        ({"clip_norm": {"target_quantile": 0.5}}, {}, "initial required"),
        ({"clip_norm": {"initial": 1, "target_quantile": 1.0}}, {}, "target_quantile must"),
        ({"clip_norm": {"initial": 1, "learning_rate": 0}}, {}, "learning_rate must"),
        ({"clip_norm": {"initial": 1, "count_stddev": 0.4}}, {}, "count_stddev (0.4) must be"),
        ({"mode": "distributed", "clip_norm": {"initial": 1}}, {"min_diffs": 10}, "adaptive"),
        ({"mode": "distributed"}, {}, "needs server_config.min_diffs >= 10"),
        ({}, {"max_workers": None, "max_diffs": None}, "needs server_config.max_workers"),
        ({}, {"iterative_plan": True}, "iterative averaging plan"),
        ({}, {"strategy": {"name": "fedmedian"}}, "needs a strategy that works from the sum"),
        ({}, {"strategy": {"name": "fedadam", "clip_norm": 1.0}}, "without strategy.clip_norm"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(dp, server, message):
    with pytest.raises(ConfigError) as err:
        _validate(dp, **server)
    assert message in str(err.value)


def test_required_keys_and_type():
    for key in ("noise_multiplier", "clip_norm", "population_size"):
        with pytest.raises(ConfigError, match=f"{key} required"):
            validate_server_config(
                {**BASE, "differential_privacy": {k: v for k, v in DP.items() if k != key}}
            )
    with pytest.raises(ConfigError, match="must be an object or null"):
        validate_server_config({**BASE, "differential_privacy": [1]})


def _secure(dp_overrides=None, **secure):
    return validate_server_config({
        **BASE,
        "differential_privacy": {**DP, "mode": "distributed", **(dp_overrides or {})},
        "secure_aggregation": {"threshold": 6, **secure},
    })


def test_central_mode_with_secure_aggregation_is_refused():
    """The node never sees a report to clip when it only learns the masked sum; distributed
    mode is accepted, without min_diffs (dropouts are accounted for instead)."""
    with pytest.raises(ConfigError, match="cannot be used with secure aggregation"):
        _secure({"mode": "central"}, clipping_range=3.0)
    out = _secure(clipping_range=3.0)["differential_privacy"]
    assert out is not None and out["mode"] == "distributed"


def test_secure_range_must_hold_clip_norm_plus_six_sigma():
    """C = 0.5, z = 1, m = 10: a worker's noise has std 0.5 / sqrt(10); the range must be
    at least 0.5 + 6 of those."""
    need = 0.5 + 6 * 0.5 / math.sqrt(10)
    assert _secure(clipping_range=need * (1 + 1e-12))["differential_privacy"]
    with pytest.raises(ConfigError, match=r"clipping_range .* must hold"):
        _secure(clipping_range=need * (1 - 1e-9))
    # z = 0: C itself fits
    assert _secure({"noise_multiplier": 0.0}, clipping_range=0.5)["differential_privacy"]


@pytest.mark.parametrize("survivors", [6, 8, 10])
def test_secure_cycles_are_accounted_at_min_survivors(survivors):
    """Each of s survivors adds variance z^2 C^2 / m: the sum has z sqrt(s / m) of noise,
    and the accountant charges min_survivors' worst case."""
    from gridfl.server.dp_config import DPConfig

    cfg = _secure(clipping_range=3.0, min_survivors=survivors)
    dp = DPConfig.of(cfg)
    assert dp is not None
    assert dp.accounted_noise_multiplier == pytest.approx(math.sqrt(survivors / 10), rel=1e-12)
    assert dp.epsilon(3) == pytest.approx(
        _dp_accounting_epsilon(10 / 1000, math.sqrt(survivors / 10), 3, 1e-5), rel=1e-12
    )
