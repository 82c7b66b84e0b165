"""Distributed differential privacy under secure aggregation on a real node (uvicorn on
loopback; SQLite, and PostgreSQL where cheap), with workers on the SDK: each worker clips
its diff to C and adds N(0, z^2 C^2 / m) before quantization and masking, unweighted; the
node divides the unmasked sum by the fixed m, whatever the number of survivors, and
accounts each cycle at z sqrt(min_survivors / m). References (clipping, means, epsilon)
are computed here with numpy, scipy and dp-accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from gridfl import _messages
from gridfl.cli import main
from gridfl.secagg import NAME, SecAggParams
from gridfl.secagg import messages as m
from tests.builders import ADMIN, b64, host_payload, model_params, training_plan
from tests.harness import Admin, HttpWorker, in_threads
from tests.secagg.test_live import _dropping_worker, _sdk_worker

dp_accounting = pytest.importorskip("dp_accounting")
stats = pytest.importorskip("scipy.stats")
pytest.importorskip("starlette")

M = 3  # expected reports (max_workers = max_diffs)
SHAPES = [(40, 30), (30,)]  # a model of d = 1,230 values


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _clip_ref(flat: np.ndarray, c: float) -> np.ndarray:
    """McMahan et al.'s flat clipping of one report."""
    return flat * min(1.0, c / np.linalg.norm(flat))


def _eps_ref(q, z, steps, delta) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


def _host(url, dp, secure, shapes=None, **server) -> Admin:
    sc = {
        "max_workers": M,
        "max_diffs": M,
        "num_cycles": 0,
        "differential_privacy": {"mode": "distributed", **dp},
        "secure_aggregation": {"threshold": 2, "stage_timeout": 2.0, **secure},
        **server,
    }
    admin = Admin(url)
    extra = {} if shapes is None else {
        "params": model_params(shapes=shapes),
        "plans": {"training_plan": b64(training_plan(shapes))},
    }
    r = admin.host(host_payload(server_config=sc, **extra))
    assert r.status_code == 201, r.text
    return admin


def _diffs_like(params, flats):
    """Flat float64 vectors back into float32 arrays shaped like ``params``."""
    out = []
    for flat in flats:
        arrays, at = [], 0
        for p in params:
            arrays.append(flat[at : at + p.size].reshape(p.shape).astype(np.float32))
            at += p.size
        out.append(arrays)
    return out


def _secure_cycle(url, diffs, drop=(), params=None) -> None:
    """One cycle: an SDK worker per diff (reporting num_samples, which DP must ignore),
    and a hand-driven worker for each index in ``drop`` that goes silent after
    advertising its keys."""
    out: list = [None] * len(diffs)

    def one(i, d):
        if i in drop:
            _dropping_worker(url, "mnist", params, m.ADVERTISE, out, i)
        else:
            _sdk_worker(url, "mnist", d, 10 * (i + 1), out, i)

    in_threads(one, enumerate(diffs), timeout=60)
    errors = [o for o in out if isinstance(o, BaseException)]
    assert not errors, errors


def test_clipped_unweighted_sum_over_m_and_one_huge_worker(server_factory, db_url):
    """z = 0, C = 0.5. Cycle 1: three workers with diffs of norm 0.2, 2 and 3. Cycle 2:
    the same, but the first worker's diff is 10^6 times too large. Each checkpoint equals
    the current model minus the sum of the clipped diffs over m, within the quantization
    bound 1/scale; the huge report moves the aggregate by at most C/m."""
    node = server_factory(db_url)
    c = 0.5
    dp = {"noise_multiplier": 0.0, "clip_norm": c, "population_size": 10}
    admin = _host(node.url, dp, {"clipping_range": 1.0, "quantization_bits": 16})
    scale = SecAggParams(**admin.status()["server_config"]["secure_aggregation"]).scale
    start = model_params()
    rng = np.random.default_rng(3)
    size = sum(p.size for p in start)
    flats = [v / np.linalg.norm(v) * n for v, n in
             zip(rng.normal(size=(M, size)), (0.2, 2.0, 3.0), strict=True)]
    moves = []
    for cycle, first_scale in enumerate((1.0, 1e6)):
        flats_now = [flats[0] * first_scale, *flats[1:]]
        current = _flat(admin.checkpoint("latest"))
        _secure_cycle(node.url, _diffs_like(start, flats_now))
        status = admin.status()
        assert status["cycles"][cycle]["status"] == "completed", status["cycles"]
        moved = current - _flat(admin.checkpoint("latest"))
        expected = sum(_clip_ref(f, c) for f in flats_now) / M  # not / survivors, unweighted
        # each worker's stochastic rounding errs by < 1/scale per value; plus float32
        np.testing.assert_allclose(moved, expected, rtol=0, atol=1 / scale + 1e-6)
        moves.append(moved)
    influence = np.linalg.norm(moves[1] - moves[0])
    assert influence <= c / M + 2 * math.sqrt(size) / scale
    assert influence > 0.5 * (c - 0.2) / M  # the huge report did move it, clipped


def test_a_dropout_still_divides_by_m(server):
    """z = 0, one of three workers silent after advertising: the checkpoint moves by the
    two survivors' clipped diffs over m = 3 (DP-FedAvg's fixed denominator)."""
    c = 0.5
    dp = {"noise_multiplier": 0.0, "clip_norm": c, "population_size": 10}
    admin = _host(server.url, dp, {"clipping_range": 1.0, "min_survivors": 2})
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    start = model_params()
    rng = np.random.default_rng(5)
    flats = [rng.normal(size=sum(p.size for p in start)) for _ in range(M)]
    _secure_cycle(server.url, _diffs_like(start, flats), drop={1}, params=params)
    status = admin.status()
    assert status["cycles"][0]["status"] == "completed", status["cycles"]
    moved = _flat(start) - _flat(admin.checkpoint("latest"))
    expected = (_clip_ref(flats[0], c) + _clip_ref(flats[2], c)) / M
    np.testing.assert_allclose(moved, expected, rtol=0, atol=1 / params.scale + 1e-6)


def _weighted(monkeypatch):
    import gridfl.client._secagg as flow

    honest = flow.secure_report_flow
    monkeypatch.setattr(
        flow, "secure_report_flow", lambda job, diff, _samples: honest(job, diff, 5)
    )


def _unclipped(monkeypatch):
    monkeypatch.setattr("gridfl.client._base.privatize_report", lambda diff, _cfg: diff)


def _noiseless(monkeypatch):
    from gridfl import privacy

    def no_noise(diff, cfg):
        settings = {**cfg["differential_privacy"], "noise_stddev": 0.0}
        return privacy.privatize_report(diff, {"differential_privacy": settings})

    monkeypatch.setattr("gridfl.client._base.privatize_report", no_noise)


@pytest.mark.parametrize(
    ("cheat", "z", "size"),
    [(_weighted, 0.0, 0.01), (_unclipped, 0.0, 0.1), (_noiseless, 1.0, 0.01)],
)
def test_a_cheating_sdk_expires_the_cycle(server, monkeypatch, cheat, z, size):
    """Modified SDKs, detected in the unmasked sum: inputs weighted by num_samples (the
    weights do not sum to the number of inputs); diffs of norm 3.5 not clipped to C = 0.5
    (the sum's norm exceeds 3 C plus rounding); no noise from any worker at z = 1 (the
    sum's norm is far below sigma sqrt(d) - 10 sigma - 3 C). The node expires the cycle,
    publishing nothing."""
    cheat(monkeypatch)
    dp = {"noise_multiplier": z, "clip_norm": 0.5, "population_size": 10}
    admin = _host(server.url, dp, {"clipping_range": 3.0, "quantization_bits": 20}, SHAPES)
    start = model_params(shapes=SHAPES)
    _secure_cycle(server.url, [[np.full_like(p, size) for p in start]] * M)
    cycles = admin.status()["cycles"]
    assert [c["status"] for c in cycles] == ["expired", "open"], cycles
    np.testing.assert_array_equal(_flat(admin.checkpoint("latest")), _flat(start))


def test_noise_std_epsilon_and_budget_stop(server):
    """z = 1, C = 0.5, m = 3, min_survivors 2, q = 3 / 30, d = 1,230: workers report zero
    diffs, so the checkpoint moves by the sum of their noise over m, std z C / m per value.
    Over 2 cycles x 1,230 values, the sample std must fall in the chi-square interval a
    correct node leaves with probability 1e-6 (widened by the quantization's variance).
    Each completed cycle stores the epsilon that dp-accounting gives here at
    z sqrt(2 / 3); max_epsilon between epsilon(2) and epsilon(3) finishes the process
    after two cycles, and the next request is refused."""
    z, c, population = 1.0, 0.5, 30
    q, z_accounted, delta = M / population, z * math.sqrt(2 / M), 1e-5
    eps = [_eps_ref(q, z_accounted, t, delta) for t in (1, 2, 3)]
    dp = {
        "noise_multiplier": z,
        "clip_norm": c,
        "population_size": population,
        "delta": delta,
        "max_epsilon": (eps[1] + eps[2]) / 2,
    }
    # range >= C + 6 z C / sqrt(m) = 2.23
    secure = {"clipping_range": 3.0, "quantization_bits": 24, "max_num_samples": 1,
              "min_survivors": 2}
    admin = _host(server.url, dp, secure, SHAPES)
    scale = SecAggParams(**admin.status()["server_config"]["secure_aggregation"]).scale
    start = model_params(shapes=SHAPES)
    zeros = [[np.zeros_like(p) for p in start] for _ in range(M)]
    noise = []
    for _ in range(2):
        current = _flat(admin.checkpoint("latest"))
        _secure_cycle(server.url, zeros)
        noise.append(current - _flat(admin.checkpoint("latest")))
    noise_all = np.concatenate(noise)
    want = z * c / M
    # stochastic rounding adds at most 1/(4 scale^2) of variance per worker and value
    quantization = math.sqrt(M / 4) / (scale * M)
    lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], noise_all.size - 1)
    std = noise_all.std(ddof=1)
    assert math.sqrt(lo / (noise_all.size - 1)) * want <= std
    assert std <= math.sqrt(hi / (noise_all.size - 1)) * math.hypot(want, quantization)
    assert abs(noise_all.mean()) < 6 * want / math.sqrt(noise_all.size)
    # the accountant, after each secure cycle
    status = admin.status()
    assert [x["status"] for x in status["cycles"]] == ["completed"] * 2
    np.testing.assert_allclose([x["epsilon"] for x in status["cycles"]], eps[:2], rtol=1e-9)
    privacy = status["privacy"]
    assert privacy["steps"] == 2 and privacy["budget_spent"] is True, privacy
    assert privacy["accounted_noise_multiplier"] == pytest.approx(z_accounted, rel=1e-12)
    assert privacy["epsilon"] == pytest.approx(eps[1], rel=1e-9)
    assert privacy["epsilon_next"] == pytest.approx(eps[2], rel=1e-9)
    assert server.host_client.privacy("mnist", "1.0") == privacy
    assert status["status"] == "finished"
    r = CliRunner().invoke(main, ["status", server.url, "mnist", "1.0", "--admin-token", ADMIN])
    assert r.exit_code == 0, r.output
    assert (
        f"privacy (distributed): epsilon {eps[1]:.4g} of max {dp['max_epsilon']:g} at delta "
        f"1e-05 after 2 cycles (rdp, q = 0.1, z = 1, accounted {z_accounted:.4g}); clip norm "
        "0.5; finished: privacy budget spent" in r.output
    ), r.output
    w = HttpWorker(server.url)
    try:
        st, auth = w.call(_messages.AUTHENTICATE, {"model_name": "mnist"})
        req = {"worker_id": auth["worker_id"], "model": "mnist", "protocols": [NAME]}
        st, cyc = w.call(_messages.CYCLE_REQUEST, req)
    finally:
        w.close()
    assert st == 200, cyc
    assert cyc["status"] == "rejected" and "privacy budget spent" in cyc["reason"], cyc


DP = {"mode": "distributed", "noise_multiplier": 1.0, "clip_norm": 0.5, "population_size": 30}


@pytest.mark.parametrize(
    ("dp", "secure", "message"),
    [
        ({**DP, "mode": "central"}, {"clipping_range": 3.0}, "mode 'central' cannot"),
        (DP, {"clipping_range": 2.0}, "clipping_range (2) must hold"),
        (
            {**DP, "clip_norm": {"initial": 0.5}},
            {"clipping_range": 3.0},
            "adaptive clipping needs each report's clipped-or-not bit",
        ),
        (
            {**DP, "noise_multiplier": 0.6, "accountant": "pld"},
            {"clipping_range": 3.0, "min_survivors": 2},
            "accountant 'pld' needs",
        ),
        (
            {**DP, "max_epsilon": 0.01},
            {"clipping_range": 3.0},
            "one cycle alone spends",
        ),
    ],
)
def test_hosting_refuses_what_cannot_hold(server, dp, secure, message):
    """Central DP with secure aggregation, a range that clips honest noise, adaptive
    clipping, the PLD accountant below its noise floor once dropouts are accounted for,
    and a budget one cycle exceeds: each a 400 naming the problem, nothing stored."""
    sc = {
        "max_workers": M,
        "max_diffs": M,
        "differential_privacy": dp,
        "secure_aggregation": {"threshold": 2, **secure},
    }
    admin = Admin(server.url)
    r = admin.host(host_payload(server_config=sc))
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.json()
    assert admin.http.get("/gridfl/v1/processes/mnist/1.0").status_code == 404
