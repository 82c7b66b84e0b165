"""The plan cache: hits, misses on any change of what a plan depends on, corrupt
entries, and concurrent writers."""

from __future__ import annotations

import hashlib
import multiprocessing
import time

import numpy as np
import pytest
import torch

from gridfl.compiler import SGD, Adam, compile_evaluation_plan, compile_training_plan
from gridfl.plan_cache import PlanCache, default_cache_dir, resolve_cache


def _net(hidden: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 3))


X = torch.rand(10, 6)
Y = torch.randint(0, 3, (10,))


def _compile(cache, net=None, **kw):
    kw.setdefault("optimizer", SGD(lr=0.1))
    return compile_training_plan(net or _net(), example_data=kw.pop("X", X),
                                 example_target=kw.pop("y", Y), cache=cache, **kw)


def test_second_compile_is_a_hit_with_the_same_bytes(tmp_path):
    cache = PlanCache(tmp_path)
    t0 = time.perf_counter()
    first = _compile(cache)
    cold = time.perf_counter() - t0
    assert len(list(tmp_path.glob("*.entry"))) == 1
    t0 = time.perf_counter()
    second = _compile(cache)
    warm = time.perf_counter() - t0
    assert second.to_bytes() == first.to_bytes()
    assert warm < cold / 5  # no tracing happened
    # the cached plan trains: SGD's step, computed independently in numpy
    params = [p.detach().numpy() for p in _net().parameters()]
    out = second.execute(X.numpy(), Y.numpy(), 10.0, 0.1, *params)
    x, w1, b1, w2, b2 = X.numpy(), *params
    h = np.maximum(x @ w1.T + b1, 0)
    logits = h @ w2.T + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[Y.numpy()]
    g = (p - onehot) / 10
    np.testing.assert_allclose(out[0], -np.log(p[np.arange(10), Y.numpy()]).mean(), rtol=1e-5)
    np.testing.assert_allclose(out[4], w2 - 0.1 * g.T @ h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change", [
    {"net": "hidden"}, {"loss": "cross_entropy_onehot"}, {"optimizer": "adam"},
    {"optimizer": "momentum"}, {"X": "shape"}, {"proximal_mu": 0.1}, {"verify": False},
    {"net": "eval"},
])
def test_any_change_is_a_miss(tmp_path, change):
    cache = PlanCache(tmp_path)
    _compile(cache)
    kw: dict = {}
    net = None
    if change.get("net") == "hidden":
        net = _net(hidden=9)
    elif change.get("net") == "eval":
        net = _net().eval()
    if change.get("loss"):
        kw["loss"] = change["loss"]
        kw["y"] = torch.nn.functional.one_hot(Y, 3).float()
    if change.get("optimizer") == "adam":
        kw["optimizer"] = Adam(lr=0.1)
    if change.get("optimizer") == "momentum":
        kw["optimizer"] = SGD(lr=0.1, momentum=0.9)
    if change.get("X") == "shape":
        kw["X"] = torch.rand(12, 6)
        kw["y"] = torch.randint(0, 3, (12,))
    for k in ("proximal_mu", "verify"):
        if k in change:
            kw[k] = change[k]
    _compile(cache, net, **kw)
    assert len(list(tmp_path.glob("*.entry"))) == 2


def test_evaluation_and_training_plans_are_distinct_entries(tmp_path):
    cache = PlanCache(tmp_path)
    training = _compile(cache)
    evaluation = compile_evaluation_plan(_net(), example_data=X, example_target=Y, cache=cache)
    again = compile_evaluation_plan(_net(), example_data=X, example_target=Y, cache=cache)
    assert evaluation.kind == "evaluation" and training.kind == "training"
    assert again.to_bytes() == evaluation.to_bytes()
    assert len(list(tmp_path.glob("*.entry"))) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other_key"])
def test_corrupt_entry_is_ignored_and_rebuilt(tmp_path, damage):
    cache = PlanCache(tmp_path)
    good = _compile(cache).to_bytes()
    (entry,) = tmp_path.glob("*.entry")
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        del data[-10:]
    elif damage == "garbage":
        data = bytearray(b"not a cache entry")
    else:  # a whole, valid entry written for another key under this name
        other = PlanCache(tmp_path / "other")
        _compile(other, _net(hidden=9))
        (data_path,) = (tmp_path / "other").glob("*.entry")
        data = bytearray(data_path.read_bytes())
    entry.write_bytes(bytes(data))
    assert cache.get({"x": 1}) is None
    rebuilt = _compile(cache)
    assert rebuilt.to_bytes() == good
    assert hashlib.sha256(entry.read_bytes()).digest() != hashlib.sha256(data).digest()


def _writer(directory: str, i: int, rounds: int) -> None:
    cache = PlanCache(directory)
    for r in range(rounds):
        cache.put({"k": 1}, {"plan": bytes([i]) * (200_000 + r)})


def test_concurrent_writers_leave_one_whole_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i, 30)) for i in range(4)]
    for p in procs:
        p.start()
    cache = PlanCache(tmp_path)
    while any(p.is_alive() for p in procs):
        blobs = cache.get({"k": 1})
        if blobs is not None:  # whatever a reader finds is one writer's whole entry
            plan = blobs["plan"]
            assert plan == plan[:1] * len(plan)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert cache.get({"k": 1}) is not None
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary file left behind


def test_cache_location_and_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDFL_PLAN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert resolve_cache(None).directory == tmp_path / "c"
    assert resolve_cache(False) is None
    assert resolve_cache(tmp_path).directory == tmp_path
    monkeypatch.setenv("GRIDFL_PLAN_CACHE", "off")
    assert resolve_cache(None) is None
    monkeypatch.delenv("GRIDFL_PLAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "gridfl" / "plans"


def test_unwritable_cache_warns_and_still_compiles(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write the plan cache"):
        plan = _compile(PlanCache(blocker / "sub"))
    assert plan.kind == "training"
