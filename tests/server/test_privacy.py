"""Differential privacy on a node: clipping bounds one worker's influence, the noise is
really there at z*C/m, the clip norm adapts by Andrew et al.'s rule, epsilon equals what
dp-accounting computes here, the process stops before passing max_epsilon, the state
survives a restart, distributed mode's workers clip and noise, and bad configs are
refused with nothing stored. References are numpy and dp-accounting calls in this file."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.builders import b64, diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, join, report

dp_accounting = pytest.importorskip("dp_accounting")
stats = pytest.importorskip("scipy.stats")


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _clip_ref(arrays, c) -> np.ndarray:
    """McMahan et al.'s flat clipping, as one float64 vector."""
    flat = _flat(arrays)
    return flat * min(1.0, c / np.linalg.norm(flat))


def _eps_ref(q, z, steps, delta, accountant="rdp") -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    acct = (
        dp_accounting.pld.PLDAccountant()
        if accountant == "pld"
        else dp_accounting.rdp.RdpAccountant()
    )
    return acct.compose(event).get_epsilon(delta)


def _host(url, dp, m=2, **server):
    sc = {"max_workers": m, "max_diffs": m, "num_cycles": 0, "differential_privacy": dp}
    r = Admin(url).host(host_payload(server_config={**sc, **server}))
    assert r.status_code == 201, r.text


def _cycle(url, diffs, samples=None) -> dict | None:
    """One cycle: a worker per diff joins and reports (with ``num_samples`` from
    ``samples``, if given); the first rejection, else None."""
    for i, d in enumerate(diffs):
        extra = {} if samples is None else {"num_samples": samples[i]}
        w = HttpWorker(url)
        try:
            wid, cyc = join(w)
            if cyc["status"] != "accepted":
                return cyc
            st, body = report(w, wid, cyc["request_key"], d, **extra)
            assert st == 200, body
        finally:
            w.close()
    return None


def _chi2_std_interval(n, p=1e-6):
    """Where the sample std of n standard normal draws falls but with probability p."""
    lo, hi = stats.chi2.ppf([p / 2, 1 - p / 2], n - 1)
    return math.sqrt(lo / (n - 1)), math.sqrt(hi / (n - 1))


# ---------------------------------------------------------------------------- central mode
def test_clipping_bounds_one_workers_influence(in_process_node):
    """z = 0: a report 10^6 times too large moves the aggregate by at most C / m, and
    num_samples weighs nothing (a weight would break that bound)."""
    c, m = 0.05, 2
    _host(in_process_node.url, {"noise_multiplier": 0.0, "clip_norm": c, "population_size": 100})
    honest, attack = diff_of(0), [1e6 * a for a in diff_of(1)]
    # a num_samples-weighted mean would give the attacker almost all of the weight
    assert _cycle(in_process_node.url, [honest, attack], samples=[1, 10**6]) is None
    new = _flat(Admin(in_process_node.url).checkpoint("latest"))
    start = _flat(model_params())
    want = start - (_clip_ref(honest, c) + _clip_ref(attack, c)) / m
    np.testing.assert_allclose(new, want, rtol=0, atol=1e-6)
    without_attacker = start - _clip_ref(honest, c) / m
    assert np.linalg.norm(new - without_attacker) <= c / m * (1 + 1e-5)


def test_a_server_optimizer_steps_on_the_private_mean(in_process_node):
    """FedAvgM's step (lr 2, no momentum) applies the clipped, fixed-denominator mean: the
    optimizer is post-processing of the private aggregate."""
    c, m = 0.02, 2
    _host(
        in_process_node.url,
        {"noise_multiplier": 0.0, "clip_norm": c, "population_size": 100},
        strategy={"name": "fedavgm", "server_learning_rate": 2.0},
    )
    diffs = [diff_of(0), diff_of(1)]
    assert _cycle(in_process_node.url, diffs) is None
    new = _flat(Admin(in_process_node.url).checkpoint("latest"))
    want = _flat(model_params()) - 2.0 * (_clip_ref(diffs[0], c) + _clip_ref(diffs[1], c)) / m
    np.testing.assert_allclose(new, want, rtol=0, atol=1e-6)


def test_noise_on_the_sum_has_std_z_c_over_m(in_process_node):
    """Identical reports over many cycles: the aggregate's deviation from the noiseless
    mean has the standard deviation z*C/m (chi-square interval, p = 1e-6)."""
    z, c, m, cycles = 1.5, 0.2, 2, 50
    _host(in_process_node.url, {"noise_multiplier": z, "clip_norm": c, "population_size": 100})
    diffs = [diff_of(0), diff_of(1)]
    clean = (_clip_ref(diffs[0], c) + _clip_ref(diffs[1], c)) / m
    admin = Admin(in_process_node.url)
    residuals = []
    for t in range(1, cycles + 1):
        before = _flat(admin.checkpoint(t))
        assert _cycle(in_process_node.url, diffs) is None
        residuals.append(before - _flat(admin.checkpoint(t + 1)) - clean)
    noise = np.concatenate(residuals)
    sigma = z * c / m
    lo, hi = _chi2_std_interval(noise.size)
    assert lo * sigma <= noise.std(ddof=1) <= hi * sigma, noise.std(ddof=1) / sigma
    assert abs(noise.mean()) < 6 * sigma / math.sqrt(noise.size)


def test_adaptive_clipping_noise_uses_the_clip_norm_of_its_cycle(in_process_node):
    """Adaptive clipping: each cycle's noise has std z_delta * C_t / m with C_t the norm
    that cycle clipped to (Flower scales it to C_t+1), and C follows
    C_t+1 = C_t exp(-lr (b - target)) with every report above C (b noised around 0)."""
    z, m, lr = 1.0, 2, 0.5
    _host(
        in_process_node.url,
        {
            "noise_multiplier": z,
            "clip_norm": {"initial": 0.002, "learning_rate": lr},
            "population_size": 100,
        },
    )
    admin = Admin(in_process_node.url)
    diffs = [diff_of(0), diff_of(1)]
    normalized = []
    for t in range(1, 31):
        before = _flat(admin.checkpoint(t))
        assert _cycle(in_process_node.url, diffs) is None
        c_t = admin.status()["cycles"][-2]["clip_norm"]  # the last completed
        clean = (_clip_ref(diffs[0], c_t) + _clip_ref(diffs[1], c_t)) / m
        sigma_b = max(m / 20, z)  # the documented default count noise
        z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
        residual = before - _flat(admin.checkpoint(t + 1)) - clean
        normalized.append(residual / (z_delta * c_t / m))
    noise = np.concatenate(normalized)
    lo, hi = _chi2_std_interval(noise.size)
    assert lo <= noise.std(ddof=1) <= hi
    norms = [r["clip_norm"] for r in admin.status()["cycles"][:-1]]
    steps = np.log(np.array(norms[1:]) / np.array(norms[:-1]))
    # each step is -lr (b - 0.5) with b in [0, 1]
    assert np.all(np.abs(steps) <= lr * 0.5 + 1e-12)


def test_adaptive_clip_norm_rises_to_the_update_norms(in_process_node):
    """Every report above C (z = 0, so the count is exact): C grows by exp(lr * target) a
    cycle, the paper's rule, where Flower 1.42 shrank it."""
    _host(
        in_process_node.url,
        {"noise_multiplier": 0.0, "clip_norm": {"initial": 1e-4}, "population_size": 100},
    )
    for _ in range(10):
        assert _cycle(in_process_node.url, [diff_of(0), diff_of(1)]) is None
    cycles = Admin(in_process_node.url).status()["cycles"][:-1]  # the open one has none
    want = [1e-4 * math.exp(0.2 * 0.5) ** k for k in range(10)]
    np.testing.assert_allclose([c["clip_norm"] for c in cycles], want, rtol=1e-12)


@pytest.mark.slow
def test_adaptive_clip_norm_tracks_the_median_update_norm(in_process_node):
    """Ten reports a cycle with update norms at the deciles of a log-normal (median 1):
    from C = 0.3 the clip norm reaches the median within 10% by cycle 30 and stays there,
    with the count noised (z = 0.5)."""
    m = 10
    norms = np.exp(0.5 * stats.norm.ppf((np.arange(m) + 0.5) / m))
    rng = np.random.default_rng(5)
    diffs = []
    for r in norms:
        direction = [rng.standard_normal(s) for s in [(4, 3), (3,)]]
        scale = r / np.linalg.norm(_flat(direction))
        diffs.append([(scale * a).astype(np.float32) for a in direction])
    _host(
        in_process_node.url,
        {"noise_multiplier": 0.5, "clip_norm": {"initial": 0.3}, "population_size": 1000},
        m=m,
    )
    for _ in range(40):
        assert _cycle(in_process_node.url, diffs) is None
    cycles = Admin(in_process_node.url).status()["cycles"]
    late = np.array([c["clip_norm"] for c in cycles[29:40]])
    median = float(np.median(norms))
    assert np.all(np.abs(late / median - 1) < 0.10), late / median


# ---------------------------------------------------------------------------- the accountant
@pytest.mark.parametrize(
    ("population", "m", "z", "cycles"), [(4, 2, 2.0, 3), (20, 2, 0.8, 4), (100, 3, 1.3, 2)]
)
def test_epsilon_after_each_cycle_is_dp_accountings(server, population, m, z, cycles):
    """Three (q, z, cycles) configurations on a live node: the epsilon stored with each
    completed cycle, and the one the status reports, equal dp-accounting's here."""
    q, delta = m / population, 1e-5
    dp = {"noise_multiplier": z, "clip_norm": 1.0, "population_size": population,
          "delta": delta}
    _host(server.url, dp, m=m)
    for _ in range(cycles):
        assert _cycle(server.url, [diff_of(i % 2) for i in range(m)]) is None
    status = Admin(server.url).status()
    want = [_eps_ref(q, z, t, delta) for t in range(1, cycles + 2)]
    assert [c["status"] for c in status["cycles"][:cycles]] == ["completed"] * cycles
    got = [c["epsilon"] for c in status["cycles"][:cycles]]
    np.testing.assert_allclose(got, want[:cycles], rtol=1e-9)
    privacy = status["privacy"]
    assert privacy["sampling_rate"] == q and privacy["steps"] == cycles
    assert privacy["epsilon"] == pytest.approx(want[cycles - 1], rel=1e-9)
    assert privacy["epsilon_next"] == pytest.approx(want[cycles], rel=1e-9)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_budget_stops_the_process_before_max_epsilon(server_factory, db_url, accountant):
    """q = 2 / 4, z = 2: max_epsilon between epsilon(3) and epsilon(4), both computed here
    with dp-accounting, lets exactly three cycles complete; the fourth never opens."""
    node = server_factory(db_url)
    q, z, delta = 2 / 4, 2.0, 1e-5
    eps = [_eps_ref(q, z, t, delta, accountant) for t in range(1, 5)]
    max_eps = (eps[2] + eps[3]) / 2
    dp = {
        "noise_multiplier": z,
        "clip_norm": 1.0,
        "population_size": 4,
        "delta": delta,
        "max_epsilon": max_eps,
        "accountant": accountant,
    }
    _host(node.url, dp)
    rejection = None
    for _ in range(6):
        rejection = _cycle(node.url, [diff_of(0), diff_of(1)])
        if rejection is not None:
            break
    assert rejection is not None and rejection["status"] == "rejected"
    assert "privacy budget spent" in rejection["reason"], rejection
    status = Admin(node.url).status()
    assert status["status"] == "finished"
    assert [c["status"] for c in status["cycles"]] == ["completed"] * 3
    privacy = status["privacy"]
    assert privacy["steps"] == 3 and privacy["budget_spent"] is True
    assert "privacy budget spent" in privacy["reason"]
    np.testing.assert_allclose(
        [c["epsilon"] for c in status["cycles"]], eps[:3], rtol=1e-9
    )
    assert privacy["epsilon"] == pytest.approx(eps[2], rel=1e-9)
    assert privacy["epsilon_next"] == pytest.approx(eps[3], rel=1e-9) and eps[3] > max_eps
    assert privacy["sampling_rate"] == q and privacy["expected_reports"] == 2
    # the host SDK's view, and the last checkpoint stays retrievable
    assert node.host_client.privacy(status["name"], "1.0") == privacy
    assert len(node.checkpoint(status["name"], 4)) == 2


def test_accountant_and_clip_norm_survive_a_restart(server_factory, sqlite_url):
    q, z, delta = 2 / 50, 1.0, 1e-5
    dp = {
        "noise_multiplier": z,
        "clip_norm": {"initial": 0.001, "learning_rate": 0.5},
        "population_size": 50,
    }
    first = server_factory(sqlite_url)
    _host(first.url, dp)
    for _ in range(3):
        assert _cycle(first.url, [diff_of(0), diff_of(1)]) is None
    before = Admin(first.url).status()["privacy"]
    first.stop()
    second = server_factory(sqlite_url)
    assert Admin(second.url).status()["privacy"] == before
    assert _cycle(second.url, [diff_of(0), diff_of(1)]) is None
    after = Admin(second.url).status()["privacy"]
    assert after["steps"] == 4
    # cycle 4 clipped with the norm adapted in cycle 3, before the restart
    assert Admin(second.url).status()["cycles"][-2]["clip_norm"] == before["clip_norm"]
    assert after["epsilon"] == pytest.approx(_eps_ref(q, z, 4, delta), rel=1e-9)


def test_crash_inside_aggregation_counts_each_report_once(serve_factory, db_url):
    """``gridfl serve`` dies inside the completing transaction (GRIDFL_TEST_CRASH_AT):
    the ledger keeps the first report's clip bit and no step; after the restart the last
    report completes the cycle once, and the adapted clip norm counts each report once."""
    import httpx
    import sqlalchemy as sa

    from gridfl.server.tables import privacy_cycles

    def ledger():
        eng = sa.create_engine(db_url)
        try:
            with eng.connect() as conn:
                return conn.execute(
                    sa.select(privacy_cycles.c.unclipped, privacy_cycles.c.steps)
                ).all()
        finally:
            eng.dispose()

    norms = [np.linalg.norm(_flat(diff_of(i))) for i in range(2)]
    c0 = float(np.mean(norms))  # one report fits under C, the other does not
    gamma, lr = 0.3, 0.2
    srv = serve_factory(db_url, env={"GRIDFL_TEST_CRASH_AT": "aggregate"})
    dp = {
        "noise_multiplier": 0.0,
        "clip_norm": {"initial": c0, "target_quantile": gamma, "learning_rate": lr},
        "population_size": 100,
    }
    _host(srv.url, dp)
    w = HttpWorker(srv.url)
    joined = [join(w) for _ in range(2)]
    order = np.argsort(norms)[::-1]  # the clipped report first, then the one that fits
    wid, cyc = joined[0]
    assert report(w, wid, cyc["request_key"], diff_of(int(order[0])))[0] == 200
    wid, cyc = joined[1]
    with pytest.raises(httpx.TransportError):
        report(w, wid, cyc["request_key"], diff_of(int(order[1])))
    assert srv.wait() == 137
    assert ledger() == [(0, None)]

    srv.start(env={})
    w = HttpWorker(srv.url)
    assert report(w, wid, cyc["request_key"], diff_of(int(order[1])))[0] == 200
    assert ledger() == [(1, 1)]
    fraction = (1 - 2 / 2) / 2 + 0.5  # Andrew et al.'s centred bits over m = 2
    want = c0 * math.exp(-lr * (fraction - gamma))
    assert Admin(srv.url).status()["privacy"]["clip_norm"] == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------- distributed mode
def test_distributed_mode_workers_clip_and_noise(server_factory):
    """The worker SDK clips to C and adds N(0, z^2 C^2 / m) before reporting; the node
    adds nothing and divides by m; a report no clipped, noised diff can reach is refused."""
    from gridfl.client import Syft

    node = server_factory()
    z, c, m = 0.5, 0.05, 2
    dp = {"mode": "distributed", "noise_multiplier": z, "clip_norm": c, "population_size": 10}
    _host(node.url, dp, min_diffs=m, max_workers=3)
    # a raw report far beyond the ball is refused with the reason
    w = HttpWorker(node.url)
    wid, cyc = join(w)
    settings = cyc["client_config"]["differential_privacy"]
    assert settings == {"mode": "distributed", "clip_norm": c, "noise_stddev": z * c / m**0.5}
    st, body = report(w, wid, cyc["request_key"], [1e3 * a for a in diff_of(0)])
    assert st == 400 and "distributed differential privacy" in body["error"], body
    w.close()
    # two SDK workers report huge diffs: each arrives clipped and noised
    start = model_params()
    for i in range(m):
        client = Syft(node.http_url)
        try:
            job = client.new_job("mnist", "1.0")
            job.start()
            trained = [p - 1e3 * d for p, d in zip(start, diff_of(i), strict=True)]
            job.report(job.model.create_serialized_diff(trained))
        finally:
            client.close()
    admin = Admin(node.url)
    # the stray seat of the refused report leaves the cycle to complete at max_diffs
    status = admin.status()
    assert status["cycles"][0]["status"] == "completed", status["cycles"]
    moved = _flat(start) - _flat(admin.checkpoint("latest"))
    clean = sum(_clip_ref([1e3 * a for a in diff_of(i)], c) for i in range(m)) / m
    noise = moved - clean  # sum of m worker noises / m: std z * C / m per value
    assert np.linalg.norm(clean) <= c * (1 + 1e-6)
    lo, hi = _chi2_std_interval(noise.size)
    assert lo * z * c / m <= noise.std(ddof=1) <= hi * z * c / m


def test_distributed_mode_refuses_a_report_without_its_noise(in_process_node):
    """1,230 model values, C = 0.05, z = 1, m = 2: a worker's noise has norm about
    sigma sqrt(d) = 1.24, far above C; a raw diff (syft.js ignores the settings) has norm
    at most ~C and is refused, and an honest report passes."""
    from gridfl import privacy as dp_math
    from tests.builders import training_plan

    shapes = [(40, 30), (30,)]
    z, c, m = 1.0, 0.05, 2
    payload = host_payload(
        params=model_params(shapes=shapes),
        plans={"training_plan": b64(training_plan(shapes))},
        server_config={
            "max_workers": m,
            "max_diffs": m,
            "min_diffs": m,
            "num_cycles": 0,
            "differential_privacy": {
                "mode": "distributed",
                "noise_multiplier": z,
                "clip_norm": c,
                "population_size": 10,
            },
        },
    )
    assert Admin(in_process_node.url).host(payload).status_code == 201
    w = HttpWorker(in_process_node.url)
    wid, cyc = join(w)
    raw = diff_of(0, shapes=shapes)
    st, body = report(w, wid, cyc["request_key"], raw)
    assert st == 400 and "less than a report clipped" in body["error"], body
    honest = dp_math.privatize(raw, c, z * c / math.sqrt(m))
    assert report(w, wid, cyc["request_key"], honest)[0] == 200
    w.close()


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("dp", "server", "message"),
    [
        ({"noise_multiplier": -1}, {}, "noise_multiplier must be a number >= 0"),
        ({"clip_norm": 0}, {}, "clip_norm must be a number > 0"),
        ({"delta": 1.5}, {}, "delta must be a number in (0, 1)"),
        ({"population_size": 1}, {}, "population_size (1) is smaller than the workers"),
        ({}, {"iterative_plan": True}, "iterative averaging plan"),
        ({}, {"secure_aggregation": {"threshold": 2}}, "cannot be used with secure aggregation"),
        ({"max_epsilon": 1e-4}, {}, "one cycle alone spends epsilon"),
    ],
)
def test_bad_dp_config_is_a_400_with_nothing_stored(in_process_node, dp, server, message):
    admin = Admin(in_process_node.url)
    base = {"noise_multiplier": 1.0, "clip_norm": 1.0, "population_size": 100}
    sc = {"max_workers": 2, "max_diffs": 2, "differential_privacy": {**base, **dp}, **server}
    r = admin.host(host_payload(server_config=sc))
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert admin.http.get("/gridfl/v1/processes").json() == {"processes": []}


def test_client_config_may_not_carry_the_nodes_privacy_settings(in_process_node):
    payload = host_payload()
    payload["client_config"]["differential_privacy"] = {"clip_norm": 100}
    r = Admin(in_process_node.url).host(payload)
    assert r.status_code == 400 and "set by the node" in r.json()["error"]


def test_process_without_dp_reports_no_privacy(server):
    admin = Admin(server.url)
    assert admin.host(host_payload()).status_code == 201
    status = admin.status()
    assert "privacy" not in status and "epsilon" not in status["cycles"][0]
    assert server.host_client.privacy("mnist", "1.0") is None


def test_gridfl_status_shows_epsilon(server):
    from click.testing import CliRunner

    from gridfl.cli import main
    from tests.builders import ADMIN

    q, z, delta = 2 / 20, 1.0, 1e-5
    _host(server.url, {"noise_multiplier": z, "clip_norm": 1.0, "population_size": 20,
                       "max_epsilon": 50})
    for _ in range(2):
        assert _cycle(server.url, [diff_of(0), diff_of(1)]) is None
    r = CliRunner().invoke(main, ["status", server.url, "mnist", "1.0", "--admin-token", ADMIN])
    assert r.exit_code == 0, r.output
    eps = _eps_ref(q, z, 2, delta)
    assert (
        f"privacy (central): epsilon {eps:.4g} of max 50 at delta 1e-05 after 2 cycles "
        f"(rdp, q = 0.1, z = 1); clip norm 1" in r.output
    ), r.output
