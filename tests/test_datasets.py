"""MNIST loading (checksum-verified) and the McMahan client splits."""

import numpy as np
import pytest

from gridfl import GridflError
from gridfl.datasets import load_mnist, mnist_path, split_iid, split_noniid


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_mnist_has_60k_train_and_10k_test_in_unit_range(mnist):
    """The package's 50k+10k train/validation parts are joined into the usual 60k."""
    assert mnist.x_train.shape == (60000, 784) and mnist.x_train.dtype == np.float32
    assert mnist.x_test.shape == (10000, 784)
    assert mnist.y_train.shape == (60000,) and set(np.unique(mnist.y_test)) == set(range(10))
    assert mnist.x_train.min() >= 0.0 and mnist.x_train.max() <= 1.0


def test_a_changed_file_is_refused_before_unpickling(tmp_path):
    """A file whose checksum differs is never unpickled."""
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(mnist_path().read_bytes()[:-1] + b"\0")
    with pytest.raises(GridflError, match="SHA-256"):
        load_mnist(bad)


def test_iid_split_gives_disjoint_equal_shards():
    shards = split_iid(60000, 100, seed=1)
    assert len(shards) == 100 and {len(s) for s in shards} == {600}
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == 60000


def test_iid_split_is_reproducible_and_seeded():
    assert np.array_equal(split_iid(100, 10, seed=3)[0], split_iid(100, 10, seed=3)[0])
    assert not np.array_equal(split_iid(100, 10, seed=3)[0], split_iid(100, 10, seed=4)[0])


def test_noniid_split_gives_each_client_two_label_shards(mnist):
    """200 shards of 300 sorted by label, two per client: most clients see at most 2 labels."""
    shards = split_noniid(mnist.y_train, 100, seed=0)
    assert {len(s) for s in shards} == {600}
    assert len(np.unique(np.concatenate(shards))) == 60000
    labels_per_client = [len(np.unique(mnist.y_train[s])) for s in shards]
    assert np.median(labels_per_client) <= 2
    assert max(labels_per_client) <= 4  # a shard can straddle a label boundary


def test_bad_split_sizes_are_refused():
    with pytest.raises(ValueError, match="num_clients"):
        split_iid(10, 0)
    with pytest.raises(ValueError, match="does not fit"):
        split_noniid(np.zeros(10), 10, shards_per_client=2)
