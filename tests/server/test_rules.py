"""The node's rules as pure functions (gridfl.server.rules), checked against the rules as
docs/configs.md states them, and the aggregation seam (RunningSums, strategies)."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl._exceptions import ModelError
from gridfl.server import aggregate as agg
from gridfl.server import rules


def _never() -> float:
    raise AssertionError("not to be asked under this config")


def admit(cfg, **kw):
    kw.setdefault("sequence", 1)
    kw.setdefault("accepted", 0)
    kw.setdefault("taken", False)
    return rules.admit(cfg, **kw)


# ------------------------------------------------------------------ admission
def test_no_cap_accepts_everyone_and_never_draws():
    assert admit({}, accepted=10_000, last_joined=_never, draw=_never) == rules.ACCEPT


def test_a_worker_joins_a_cycle_once():
    assert admit({}, taken=True) == rules.Admission(False, "already accepted into this cycle")


@pytest.mark.parametrize(
    ("max_workers", "over_selection", "cap"),
    [(1, 1.0, 1), (10, 1.3, 13), (3, 1.5, 5), (7, 1.0, 7), (2, 1.01, 3)],
)
def test_capacity_is_ceil_max_workers_times_over_selection(max_workers, over_selection, cap):
    cfg = {"max_workers": max_workers, "over_selection": over_selection}
    assert admit(cfg, accepted=cap - 1).accepted
    full = admit(cfg, accepted=cap)
    assert not full.accepted and full.reason == "the cycle is full"


def test_over_selection_defaults_to_one():
    assert admit({"max_workers": 4}, accepted=3).accepted
    assert admit({"max_workers": 4}, accepted=4).reason == "the cycle is full"


def test_random_pool_accepts_with_probability_free_slots_over_cap():
    cfg = {"max_workers": 4, "pool_selection": "random"}
    # the first request is always accepted: probability 4/4
    assert admit(cfg, accepted=0, draw=lambda: 0.999).accepted
    # three of four seats taken: probability 1/4
    assert admit(cfg, accepted=3, draw=lambda: 0.24).accepted
    lost = admit(cfg, accepted=3, draw=lambda: 0.25)
    assert lost == rules.Admission(False, "not selected (random pool selection)")
    # a full cycle is full, whatever the draw
    assert admit(cfg, accepted=4, draw=_never).reason == "the cycle is full"


def test_iterate_pool_never_draws():
    assert admit({"max_workers": 4, "pool_selection": "iterate"}, accepted=3, draw=_never).accepted


@pytest.mark.parametrize("k", [0, 1])
def test_reuse_values_0_and_1_only_forbid_the_same_cycle(k):
    cfg = {"do_not_reuse_workers_until_cycle": k}
    assert admit(cfg, sequence=3, last_joined=_never).accepted
    assert admit(cfg, taken=True).reason == "already accepted into this cycle"


def test_worker_of_cycle_s_waits_until_cycle_s_plus_k():
    cfg = {"do_not_reuse_workers_until_cycle": 3}
    for sequence in (3, 4):
        no = admit(cfg, sequence=sequence, last_joined=lambda: 2)
        assert no == rules.Admission(
            False, "this worker took part in cycle 2; it may join again from cycle 5"
        )
    assert admit(cfg, sequence=5, last_joined=lambda: 2).accepted
    assert admit(cfg, sequence=1, last_joined=lambda: None).accepted  # never joined


def test_minimum_speeds_reject_below_and_name_the_speed():
    cfg = {"minimum_download_speed": 10, "minimum_upload_speed": 2.5}
    slow = admit(cfg, download=5, upload=3)
    assert slow == rules.Admission(False, "download speed 5 Mbit/s is below the minimum 10")
    slow = admit(cfg, download=10, upload=2)
    assert slow == rules.Admission(False, "upload speed 2 Mbit/s is below the minimum 2.5")
    assert admit(cfg, download=10, upload=2.5).accepted  # at the minimum: enough


def test_rejections_come_in_order_taken_speed_reuse_cap():
    cfg = {"max_workers": 1, "minimum_download_speed": 10, "minimum_upload_speed": 0,
           "do_not_reuse_workers_until_cycle": 5}
    kw = {"sequence": 2, "accepted": 1, "last_joined": lambda: 1}
    assert admit(cfg, taken=True, download=1, upload=1, **kw).reason.startswith("already")
    assert admit(cfg, download=1, upload=1, **kw).reason.startswith("download speed")
    assert admit(cfg, download=10, upload=1, **kw).reason.startswith("this worker took part")
    assert admit(cfg, download=10, upload=1, sequence=6, accepted=1,
                 last_joined=lambda: 1).reason == "the cycle is full"


def test_speed_test_fields_required_only_with_a_minimum():
    assert rules.missing_speed_field({}, None, None, None) is None
    # 0 still forces the test; ping (ms), download and upload (Mbit/s) are all required
    cfg = {"minimum_upload_speed": 0}
    assert rules.missing_speed_field(cfg, None, 1.0, 1.0) == "ping"
    assert rules.missing_speed_field(cfg, 20, None, None) == "download"
    assert rules.missing_speed_field(cfg, 20, 1.0, None) == "upload"
    assert rules.missing_speed_field(cfg, 20, 1.0, 1.0) is None
    assert rules.missing_speed_field({"minimum_download_speed": 5}, None, 1, 1) == "ping"


def test_full_cycle_fast_path():
    cfg = {"max_workers": 2}
    assert rules.full_cycle_reason(cfg, accepted=1, taken=False) is None
    assert rules.full_cycle_reason(cfg, accepted=2, taken=False) == "the cycle is full"
    assert rules.full_cycle_reason(cfg, accepted=2, taken=True) == (
        "already accepted into this cycle")
    assert rules.full_cycle_reason({}, accepted=99, taken=False) is None  # no cap
    # a speed test must be validated and stored first: only the locked path can answer
    speed = {"max_workers": 2, "minimum_download_speed": 1}
    assert rules.full_cycle_reason(speed, accepted=2, taken=False) is None


# ------------------------------------------------------------------ completion
def ready(cfg, received, accepted, end_at=None, now=100.0):
    return rules.ready(cfg, received=received, accepted=lambda: accepted, end_at=end_at, now=now)


def test_pygrid_default_every_report_completes():
    # max_diffs and cycle_length both null: every report completes (min_diffs null = 1)
    assert not ready({}, received=0, accepted=5)
    assert ready({}, received=1, accepted=5)


def test_max_diffs_completes_as_soon_as_reached():
    cfg = {"max_diffs": 3}
    assert not ready(cfg, received=2, accepted=10)
    assert ready(cfg, received=3, accepted=10)


def test_deadline_completes_with_enough_reports():
    cfg = {"max_diffs": 10, "min_diffs": 2, "cycle_length": 60}
    assert not ready(cfg, received=5, accepted=10, end_at=160.0, now=100.0)
    assert ready(cfg, received=5, accepted=10, end_at=160.0, now=160.0)
    # past the deadline without min_diffs reports: not ready (the cycle expires instead)
    assert not ready(cfg, received=1, accepted=10, end_at=160.0, now=200.0)


def test_min_diffs_and_min_workers_gate_everything():
    assert not ready({"min_diffs": 3}, received=2, accepted=2)
    assert ready({"min_diffs": 3}, received=3, accepted=3)
    assert not ready({"min_workers": 5, "max_diffs": 2}, received=2, accepted=4)
    assert ready({"min_workers": 5, "max_diffs": 2}, received=2, accepted=5)
    assert not ready({"min_workers": 5}, received=4, accepted=4, end_at=1.0, now=2.0)


def test_full_cycle_whose_workers_all_reported_is_done():
    # max_workers 2 (x 1.5 = 3 seats), max_diffs far off, deadline in the future
    cfg = {"max_workers": 2, "over_selection": 1.5, "max_diffs": 10, "cycle_length": 600}
    future = 700.0
    assert ready(cfg, received=3, accepted=3, end_at=future)
    assert not ready(cfg, received=2, accepted=3, end_at=future)  # one still training
    assert not ready(cfg, received=2, accepted=2, end_at=future)  # not full: more may join


def test_seats_are_counted_only_when_the_answer_depends_on_them():
    """Counting a cycle's seats scans them; every report has a seat of its own, so with
    at least min_workers reports, or fewer reports than the cap, the count cannot change
    the answer."""
    counted = []

    def seats(n):
        return lambda: counted.append(n) or n

    cfg = {"max_workers": 10, "max_diffs": 20, "min_workers": 3, "cycle_length": 600}
    for received, accepted, expected, asked in [
        (5, 8, False, False),  # under the cap of 10 seats: cannot be full and all reported
        (2, 8, False, True),  # under min_workers: the seats decide
        (2, 2, False, True),
        (10, 10, True, True),  # at the cap: full only if every seat reported
        (10, 11, False, True),
    ]:
        counted.clear()
        got = rules.ready(cfg, received=received, accepted=seats(accepted), end_at=700.0, now=100.0)
        assert got is expected, (received, accepted)
        assert bool(counted) is asked, (received, accepted)
    # each answer agrees with counting first and applying the rule to the number
    for received in range(13):
        for accepted in range(received, 13):
            lazy = rules.ready(cfg, received=received, accepted=seats(accepted), end_at=700.0,
                               now=100.0)
            eager = (received >= 1 and accepted >= 3 and
                     (received >= 20 or (accepted >= 10 and received >= accepted)))
            assert lazy is eager, (received, accepted)


def test_deadline_and_retry_timeout():
    assert rules.cycle_deadline({"cycle_length": 60}, 1000.0) == 1060.0
    assert rules.cycle_deadline({"cycle_length": None}, 1000.0) is None
    assert rules.cycle_deadline({}, 1000.0) is None
    # rejected workers wait the whole seconds to the deadline, 0 once past it
    assert rules.retry_timeout(1060.0, 1000.0, 60) == 60
    assert rules.retry_timeout(1060.0, 1000.5, 60) == 60  # 59.5 rounds up
    assert rules.retry_timeout(1060.0, 1059.9, 60) == 1
    assert rules.retry_timeout(1060.0, 2000.0, 60) == 0
    # no deadline: the node's retry_seconds
    assert rules.retry_timeout(None, 1000.0, 42) == 42


# ------------------------------------------------------------------ aggregation seam
def _diff(value, shapes=((2, 2), (3,))):
    return [np.full(s, value, dtype=np.float32) for s in shapes]


def test_running_sums_mean_rules():
    params = _diff(0.0)
    spec = agg.ModelSpec.of(params)
    plain = agg.RunningSums(spec)
    for v in (1.0, 2.0, 6.0):
        plain.fold(_diff(v))
    np.testing.assert_allclose(plain.result(), 3.0)  # plain mean
    weighted = agg.RunningSums(spec)
    weighted.fold(_diff(1.0), 1)
    weighted.fold(_diff(4.0), 3)
    np.testing.assert_allclose(weighted.result(), (1 + 12) / 4)  # num_samples-weighted
    # mixed: the report without num_samples weighs the others' mean num_samples (2)
    weighted.fold(_diff(2.0))
    np.testing.assert_allclose(weighted.result(), (1 + 12 + 2 * 2) / 6)
    assert (weighted.count_w, weighted.weight, weighted.count_x) == (2, 4, 1)


def test_fedavg_applies_the_mean_and_keeps_no_state():
    params = _diff(10.0)
    sums = agg.RunningSums(agg.ModelSpec.of(params))
    agg.FED_AVG.fold(sums, _diff(1.0), None)
    agg.FED_AVG.fold(sums, _diff(3.0), None)
    new, state = agg.FED_AVG.aggregate(sums, params)
    assert state is None and not agg.FedAvg.needs_every_diff
    for p in new:
        assert p.dtype == np.float32
        np.testing.assert_allclose(p, 8.0)


def test_a_result_beyond_the_dtype_is_a_model_error():
    params = [np.full((2,), 60000.0, dtype=np.float16)]
    sums = agg.RunningSums(agg.ModelSpec.of(params))
    sums.fold([np.full((2,), -10000.0, dtype=np.float16)])
    with pytest.raises(ModelError, match="beyond the range of float16"):
        agg.FED_AVG.aggregate(sums, params)


def test_a_strategy_cannot_need_every_diff_and_only_sums():
    with pytest.raises(TypeError, match="cannot work from their sum alone"):
        type("MedianUnderSecureAggregation", (agg.Strategy,),
             {"needs_every_diff": True, "sums_only": True})


def test_enough_reports_is_max_1_min_diffs():
    assert not rules.enough_reports({}, 0)
    assert rules.enough_reports({}, 1)
    assert rules.enough_reports({"min_diffs": None}, 1)
    assert not rules.enough_reports({"min_diffs": 4}, 3)
    assert rules.enough_reports({"min_diffs": 4}, 4)


# --------------------------------------------------------------------------- pace steering
def test_paced_timeout_waits_for_the_next_cycle_then_spreads_over_one_window():
    # no oversupply: the comeback is uniform over (wait, wait + window]
    draws = np.arange(6000) / 6000
    back = np.array([rules.paced_timeout(30, 60, 1.0, 5.0, d) for d in draws])
    assert back.min() == 30 and back.max() == 90
    counts = np.bincount(back - 30)[1:]  # whole seconds 31..90
    assert len(counts) == 60 and counts.min() >= 99 and counts.max() <= 101


def test_paced_timeout_horizon_grows_with_the_oversupply():
    # 10x more check-ins than needed: spread over 10 windows, so the comeback rate of a
    # second's arrivals is arrival_rate / (10 x window) = needed_rate / window
    arrivals, needed, window = 200.0, 20.0, 60.0
    draws = np.random.default_rng(0).random(200_000)
    back = np.array([rules.paced_timeout(0, window, arrivals, needed, d) for d in draws])
    assert back.max() == window * arrivals / needed
    per_second = np.bincount(back)[1:-1].mean() / len(draws) * arrivals
    np.testing.assert_allclose(per_second, needed / window, rtol=0.02)


@pytest.mark.parametrize("needed_rate", [0.0, -1.0])
def test_paced_timeout_without_a_needed_rate_is_one_window(needed_rate):
    assert rules.paced_timeout(5, 60, 100.0, needed_rate, 0.999) == 65
