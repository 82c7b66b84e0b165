"""Aggregation strategies on a real node (uvicorn on loopback, SQLite and PostgreSQL):
FedAdam over 3 cycles, and median and Krum with 2 of 10 reports poisoned, each checkpoint
equal to a plain-numpy reference from the papers (tests/_strategy_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa

from gridfl.server.tables import cycle_diffs, strategy_states
from tests import _strategy_reference as ref
from tests.builders import diff_of, host_payload, model_params
from tests.harness import Admin, HttpWorker, join, report

ADAM = {"name": "fedadam", "eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


def run_cycle(url: str, reports) -> None:
    """Join len(reports) workers, then each reports its (diff, num_samples)."""
    w = HttpWorker(url)
    try:
        joined = [join(w) for _ in reports]
        for (wid, cyc), (diff, n) in zip(joined, reports, strict=True):
            extra = {} if n is None else {"num_samples": n}
            st, body = report(w, wid, cyc["request_key"], diff, **extra)
            assert st == 200, body
    finally:
        w.close()


def adam_cycles(count: int, per_cycle: int = 3):
    return [
        [(diff_of(10 * c + i), 10 * (i + 1)) for i in range(per_cycle)] for c in range(count)
    ]


def test_fedadam_three_cycles_match_the_paper(server_factory, db_url):
    srv = server_factory(db_url)
    admin = Admin(srv.url)
    sc = {"max_diffs": 3, "num_cycles": 3, "strategy": ADAM}
    assert admin.host(host_payload(server_config=sc)).status_code == 201
    cycles = adam_cycles(3)
    for reports in cycles:
        run_cycle(srv.url, reports)
    want = ref.fedadam(model_params(), cycles, **{k: v for k, v in ADAM.items() if k != "name"})
    for number, params in enumerate(want, start=2):
        ref.assert_params_close(admin.checkpoint(number), params)
    st = admin.status()
    assert st["status"] == "finished"
    assert st["strategy"]["name"] == "fedadam" and st["strategy"]["params"]["eta"] == 0.05
    assert st["strategy"]["state"]["step"] == 3
    eng = sa.create_engine(srv.db_url)
    try:
        with eng.connect() as c:  # the newest state only, written with its checkpoint
            assert c.execute(sa.select(strategy_states.c.step)).scalars().all() == [3]
    finally:
        eng.dispose()


def poisoned_cycles(count: int, attack: str):
    rng = np.random.default_rng(3)
    cycles = []
    for c in range(count):
        reports = [(diff_of(100 * c + i), 10) for i in range(10)]
        for i in (3, 7):  # 2 of 10 poisoned
            d = reports[i][0]
            if attack == "scale":
                bad = [x * 100 for x in d]
            elif attack == "signflip":
                bad = [-x * 10 for x in d]
            else:
                bad = [x + rng.normal(scale=5.0, size=x.shape).astype(np.float32) for x in d]
            reports[i] = (bad, 1_000_000)  # and a heavy weight claim, ignored
        cycles.append(reports)
    return cycles


@pytest.mark.parametrize(
    ("strategy", "attack"),
    [
        ({"name": "fedmedian"}, "scale"),
        ({"name": "krum", "num_malicious_nodes": 2}, "noise"),
        ({"name": "krum", "num_malicious_nodes": 2, "clip_norm": 1.0}, "signflip"),
    ],
    ids=["median-scale", "krum-noise", "krum-signflip-clipped"],
)
def test_robust_rules_with_two_of_ten_poisoned(server_factory, db_url, strategy, attack):
    srv = server_factory(db_url)
    admin = Admin(srv.url)
    sc = {"max_diffs": 10, "num_cycles": 2, "strategy": strategy}
    assert admin.host(host_payload(server_config=sc)).status_code == 201
    cycles = poisoned_cycles(2, attack)
    for reports in cycles:
        run_cycle(srv.url, reports)
    if strategy["name"] == "fedmedian":
        want = ref.median(model_params(), cycles)
    else:  # the clip (norm 1) leaves honest diffs (norm ~0.04) untouched: Krum skips poison
        want = ref.krum(model_params(), cycles, f=2)
    for number, params in enumerate(want, start=2):
        ref.assert_params_close(admin.checkpoint(number), params)
    # the poisoned run stays near FedAvg of the 8 honest reports
    clean = [[(d, n) for i, (d, n) in enumerate(r) if i not in (3, 7)] for r in cycles]
    start = np.concatenate([p.ravel() for p in model_params()])
    got = np.concatenate([p.ravel() for p in admin.checkpoint(3)])
    fedavg_clean = start - sum(
        np.mean([np.concatenate([x.ravel() for x in d]) for d, _ in r], axis=0) for r in clean
    )
    assert np.linalg.norm(got - fedavg_clean) < 0.1
    eng = sa.create_engine(srv.db_url)
    try:
        with eng.connect() as c:  # kept diffs go with their cycle
            assert c.execute(sa.select(sa.func.count()).select_from(cycle_diffs)).scalar() == 0
    finally:
        eng.dispose()
