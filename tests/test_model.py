"""gridfl.model.SyftModel."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gridfl import ModelError, StateError
from gridfl.model import SyftModel
from gridfl.state import dumps, loads
from tests._vectors import VECTORS


def vector(name: str) -> bytes:
    path = VECTORS / name
    if not path.exists():
        pytest.fail(f"interop vector {path} is missing")
    return path.read_bytes()


def small_model() -> SyftModel:
    return SyftModel([np.ones((2, 3), np.float32), np.arange(3, dtype=np.float32)])


def test_from_bytes_mnist():
    model = SyftModel.from_bytes(vector("mnist_model_params.pb"))
    assert [p.shape for p in model.params] == [(392, 784), (392,), (10, 392), (10,)]
    assert all(p.dtype == np.float32 for p in model.params)
    again = loads(model.to_bytes())
    for a, b in zip(model.params, again, strict=True):
        assert np.array_equal(a, b)


def test_diff_is_original_minus_updated_on_the_mnist_vectors():
    model = SyftModel.from_bytes(vector("mnist_model_params.pb"))
    updated = loads(vector("mnist_upd_model_params.pb"))
    original = loads(vector("mnist_model_params.pb"))
    diff = loads(model.create_serialized_diff(updated))
    assert len(diff) == 4
    for d, o, u in zip(diff, original, updated, strict=True):
        assert d.dtype == np.float32 and d.shape == o.shape
        assert np.array_equal(d, o - u)
        assert np.abs(d).max() > 0  # a real step, not all zeros
    # the node's update new = current - diff restores the trained params
    for d, o, u in zip(diff, original, updated, strict=True):
        np.testing.assert_allclose(o - d, u, rtol=0, atol=1e-7)


def test_diff_sign():
    model = SyftModel([np.array([5.0, 5.0], np.float32)])
    (d,) = loads(model.create_serialized_diff([np.array([4.0, 7.0], np.float32)]))
    assert d.tolist() == [1.0, -2.0]


def test_count_mismatch():
    with pytest.raises(ModelError, match="expected 2 parameters, got 1"):
        small_model().create_serialized_diff([np.ones((2, 3), np.float32)])


def test_shape_mismatch_names_the_parameter():
    with pytest.raises(ModelError, match=r"parameter 1: expected shape \(3,\), got \(1, 3\)"):
        small_model().create_serialized_diff(
            [np.ones((2, 3), np.float32), np.ones((1, 3), np.float32)]
        )


def test_dtype_mismatch_names_the_parameter():
    with pytest.raises(ModelError, match="parameter 0: expected dtype float32, got float64"):
        small_model().create_serialized_diff([np.ones((2, 3)), np.ones(3, np.float32)])


def test_bad_updated_params():
    with pytest.raises(ModelError):
        small_model().create_serialized_diff(np.ones((2, 3), np.float32))
    with pytest.raises(ModelError, match="parameter 1"):
        small_model().create_serialized_diff([np.ones((2, 3), np.float32), "nope"])
    model = SyftModel([np.array([True])])
    with pytest.raises(ModelError, match="bool"):
        model.create_serialized_diff([np.array([False])])


def test_training_in_place_still_gives_the_right_diff():
    model = small_model()
    before = [p.copy() for p in model.params]
    for p in model.params:
        p -= 0.25  # e.g. torch.from_numpy(p) and an in-place optimizer step
    diff = loads(model.create_serialized_diff(model.params))
    for d, b in zip(diff, before, strict=True):
        assert np.allclose(d, 0.25)
        assert d.shape == b.shape
    # to_bytes() reflects the current params
    assert np.allclose(loads(model.to_bytes())[0], 0.75)


def test_constructor_copies_its_input():
    a = np.zeros(3, np.float32)
    model = SyftModel([a])
    a += 1
    assert model.params[0].tolist() == [0, 0, 0]


def test_constructor_wants_arrays_not_bytes():
    with pytest.raises(TypeError, match="from_bytes"):
        SyftModel(dumps([np.zeros(1, np.float32)]))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SyftModel(np.zeros((2, 2), np.float32))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="parameter 0"):
        SyftModel([[1.0, 2.0]])


def test_from_bytes_propagates_state_errors():
    with pytest.raises(StateError):
        SyftModel.from_bytes(b"\x12\xff\xff\xff\xff\x0f")


class ArrayLike:
    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a


def test_array_likes_are_accepted():
    model = SyftModel([ArrayLike(np.ones(2, np.float32))])
    (d,) = loads(model.create_serialized_diff([ArrayLike(np.zeros(2, np.float32))]))
    assert d.tolist() == [1.0, 1.0]


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    w = torch.nn.Parameter(torch.ones(2, 3))  # requires grad: needs .detach()
    model = SyftModel([w, torch.zeros(3)])
    assert model.params[0].dtype == np.float32
    updated = [w.detach() * 0.5, torch.ones(3)]
    diff = loads(model.create_serialized_diff(updated))
    assert np.allclose(diff[0], 0.5) and np.allclose(diff[1], -1)
    with pytest.raises(ModelError, match="dtype"):
        model.create_serialized_diff([w, torch.zeros(3, dtype=torch.float64)])


def test_gridfl_model_does_not_import_torch():
    code = "import sys, gridfl.model, gridfl.state; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_repr():
    assert repr(small_model()) == "SyftModel([float32[2, 3], float32[3]])"
