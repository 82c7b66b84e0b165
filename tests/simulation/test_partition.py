"""Partitioners against expectations computed here from the papers' definitions."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl._exceptions import ConfigError
from gridfl.simulation import dirichlet, iid, partition, shards


def _class_counts(labels, parts, classes):
    return np.array([np.bincount(labels[p], minlength=classes) for p in parts])


def _disjoint(parts):
    flat = np.concatenate(parts)
    return len(np.unique(flat)) == len(flat)


def test_iid_equal_disjoint_shards_with_the_dataset_class_mix():
    labels = np.repeat(np.arange(10), 1000)  # 10 classes x 1000
    parts = iid(labels, 50, seed=3)
    assert [len(p) for p in parts] == [200] * 50 and _disjoint(parts)
    counts = _class_counts(labels, parts, 10)
    # each class count of a shard is hypergeometric: mean 20, variance
    # n K/N (N-K)/N (N-n)/(N-1) with n=200, K=1000, N=10000
    var = 200 * 0.1 * 0.9 * (10000 - 200) / 9999
    assert abs(counts.mean() - 20) < 1e-9
    assert 0.8 * var < counts.var() < 1.2 * var


def test_mcmahan_shards_give_each_client_at_most_its_shards_classes():
    labels = np.repeat(np.arange(10), 100)  # 20 shards of 50: each shard one class
    parts = shards(labels, 10, shards_per_client=2, seed=1)
    assert [len(p) for p in parts] == [100] * 10 and _disjoint(parts)
    counts = _class_counts(labels, parts, 10)
    # every count is a whole number of 50-example shards, two per client
    assert set(np.unique(counts)) <= {0, 50, 100}
    assert (counts.sum(axis=1) == 100).all()
    assert ((counts > 0).sum(axis=1) <= 2).all()
    assert (counts.sum(axis=0) == 100).all()  # every example dealt once


@pytest.mark.parametrize("alpha", [0.3, 3.0])
def test_dirichlet_proportions_match_dir_alpha_p(alpha):
    """Hsu et al.: q ~ Dir(alpha p); a client's share of class c has mean p_c and variance
    Var(q_c) + E[q_c (1 - q_c)] / n, Var(q_c) = p_c (1 - p_c) / (alpha + 1)."""
    rng = np.random.default_rng(0)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    labels = rng.choice(4, size=400_000, p=p)
    p_hat = np.bincount(labels) / len(labels)
    n, clients = 40, 2000  # 80k of 400k examples: no class runs out
    parts = dirichlet(labels, clients, alpha=alpha, examples_per_client=n, seed=7)
    assert [len(x) for x in parts] == [n] * clients and _disjoint(parts)
    share = _class_counts(labels, parts, 4) / n
    var_q = p_hat * (1 - p_hat) / (alpha + 1)
    expected_var = var_q + (p_hat - (var_q + p_hat**2)) / n
    # standard error of a mean of 2000 shares is at most 0.5 / sqrt(2000) ~ 0.011
    np.testing.assert_allclose(share.mean(axis=0), p_hat, atol=0.03)
    np.testing.assert_allclose(share.var(axis=0), expected_var, rtol=0.15)


def test_dirichlet_uses_every_example_when_sizes_are_not_given():
    labels = np.repeat(np.arange(10), 60)
    parts = dirichlet(labels, 20, alpha=0.1, seed=0)
    assert [len(x) for x in parts] == [30] * 20 and _disjoint(parts)
    counts = _class_counts(labels, parts, 10)
    assert (counts.sum(axis=0) == 60).all()
    # alpha = 0.1: most of a client's examples come from one or two classes
    assert np.median(counts.max(axis=1) / 30) > 0.6


def test_user_function_is_checked():
    labels = np.arange(10) % 2
    parts = partition(labels, 2, lambda y, k, rng: [np.arange(5), np.arange(5, 10)])
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ConfigError, match="more than one client"):
        partition(labels, 2, lambda y, k, rng: [np.arange(6), np.arange(5, 10)])
    with pytest.raises(ConfigError, match="returned 1 clients"):
        partition(labels, 2, lambda y, k, rng: [np.arange(10)])
    with pytest.raises(ConfigError, match="outside"):
        partition(labels, 2, lambda y, k, rng: [np.arange(5), np.arange(5, 11)])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda y: partition(y, 5, "zipf"), "unknown partitioner 'zipf'"),
        (lambda y: partition(y, 5, "dirichlet", alpha=0), "alpha must be a number > 0"),
        (lambda y: partition(y, 5, "dirichlet", alpha=-1.0), "alpha must be a number > 0"),
        (lambda y: partition(y, 5, "dirichlet"), "needs alpha"),
        (lambda y: partition(y, 11, "iid"), "more than the 10 examples"),
        (lambda y: partition(y, 5, "iid", alpha=1.0), "takes no option"),
    ],
)
def test_bad_input_is_refused_with_a_message(call, message):
    with pytest.raises(ConfigError, match=message):
        call(np.arange(10) % 2)
