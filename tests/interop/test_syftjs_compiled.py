"""syft.js 0.1.4 (npm, in Node.js) trains models gridfl compiled, with their tfjs variant.

McMahan et al.'s 2NN (784-200-200-10, ReLU) and CNN (two 5x5 convolutions with 2x2
max-pooling, 512 units) are compiled with ``compile_training_plan(..., tfjs=True)``;
hosting that one Plan sends both variants, so syft.js runs the tfjs plan and the gridfl
worker the onnx plan in the same process. The 2NN's expected step is a numpy reference
written here from the formulas (softmax cross-entropy over one-hot targets divided by the
batch size, its gradients, plain SGD); the CNN's is eager PyTorch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest

from gridfl import CompileError, Syft, state

from .compiled_models import LR, TOL, host_compiled, reference_step
from .syftjs_runner import write_batch

torch = pytest.importorskip("torch")

def _syftjs_params(run, like) -> list[np.ndarray]:
    flat = np.fromfile(run.one("params")["path"], dtype="<f4")
    assert flat.size == sum(p.size for p in like)
    offsets = np.cumsum([0] + [p.size for p in like])
    return [flat[a:b].reshape(p.shape) for a, b, p in zip(offsets, offsets[1:], like, strict=False)]


def test_syftjs_trains_compiled_2nn_like_onnx(grid, syftjs, mnist, two_nn, tmp_path):
    """syft.js downloads the tfjs variant, trains one batch and reports; its loss, accuracy
    and updated params match the onnx plan on the same batch and the numpy reference,
    and the node's checkpoint 2 is syft.js's update."""
    params, plan = two_nn
    name = host_compiled(grid, two_nn, max_diffs=1)
    run = syftjs.run(grid.ws_url, name, params_out=str(tmp_path / "js.f32"))
    assert run.names() == ["accepted", "reported", "params"], run
    assert run.one("accepted")["plans"] == ["training_plan"]

    ref_loss, ref_acc, ref_params = reference_step(mnist.X, mnist.y, params, LR)
    loss, acc, *onnx_params = plan.execute(mnist.X, mnist.y, 64, LR, *params)
    js = _syftjs_params(run, params)
    reported = run.one("reported")
    assert reported["loss"] == pytest.approx(float(loss), abs=TOL)
    assert reported["loss"] == pytest.approx(ref_loss, abs=TOL)
    assert reported["accuracy"] == pytest.approx(float(acc), abs=1e-7)
    assert reported["accuracy"] == pytest.approx(ref_acc, abs=1e-7)
    for j, o, r in zip(js, onnx_params, ref_params, strict=True):
        np.testing.assert_allclose(j, o, rtol=0, atol=TOL)
        np.testing.assert_allclose(j, r, rtol=0, atol=TOL)
    assert not all(np.array_equal(j, p) for j, p in zip(js, params, strict=True))

    first = grid.status(name)["cycles"][0]
    assert (first["status"], first["reported"], first["result_checkpoint"]) == ("completed", 1, 2)
    for c, j in zip(grid.checkpoint(name, 2), js, strict=True):
        np.testing.assert_allclose(c, j, rtol=0, atol=1e-6)


def test_mixed_cycle_syftjs_tfjs_and_gridfl_onnx(grid, syftjs, mnist, two_nn, tmp_path):
    """syft.js (tfjs variant, ws://) and a gridfl worker (onnx variant, http://, another
    batch) in one cycle with max_diffs 2: checkpoint 2 == initial - mean of the two diffs."""
    params, _ = two_nn
    name = host_compiled(grid, two_nn, max_diffs=2)
    rng = np.random.default_rng(5)
    X2 = rng.random((64, 784), dtype=np.float32)
    Y2 = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 64)]
    with Syft(grid.http_url, timeout=30) as client:
        job = client.new_job(name, "1.0")
        got: dict = {}
        job.on("accepted", lambda model, cfg: got.update(model=model, cfg=cfg))
        job.start()
        onnx_plan = job.plans["training_plan"]

        run = syftjs.run(grid.ws_url, name, params_out=str(tmp_path / "js.f32"))  # reports first
        assert run.names() == ["accepted", "reported", "params"], run
        _, _, *new_py = onnx_plan.execute(X2, Y2, 64, got["cfg"]["lr"], *got["model"].params)
        job.report(got["model"].create_serialized_diff(new_py))

    first = grid.status(name)["cycles"][0]
    assert (first["status"], first["accepted"], first["reported"]) == ("completed", 2, 2)
    _, _, ref_py = reference_step(X2, Y2, params, LR)
    for n, r in zip(new_py, ref_py, strict=True):
        np.testing.assert_allclose(n, r, rtol=0, atol=TOL)
    js = _syftjs_params(run, params)
    diff_js = [p - j for p, j in zip(params, js, strict=True)]
    diff_py = state.loads(got["model"].create_serialized_diff(new_py))
    want = [p - (a + b) / 2 for p, a, b in zip(params, diff_js, diff_py, strict=True)]
    for c, w in zip(grid.checkpoint(name, 2), want, strict=True):
        np.testing.assert_allclose(c, w, rtol=0, atol=1e-6)


def test_unsupported_op_in_tfjs_mode_fails_at_compile_time():
    """An op the tfjs form cannot express fails the compile, naming the op; the same
    function still compiles for onnx workers."""
    from gridfl.compiler import compile_plan

    def step(X, y, batch_size, lr, W):
        out = torch.sin(X @ W.T)
        loss = ((out - y) ** 2).sum() / batch_size
        (g,) = torch.autograd.grad(loss, [W])
        return loss, W - lr * g

    W = torch.randn(3, 4)
    args = (torch.randn(8, 4), torch.randn(8, 3), 8, 0.1, W)
    roles = ["data", "target", "batch_size", "client_config:lr", "model_param"]
    out_roles = ["loss", "model_param"]
    with pytest.raises(CompileError, match=r"op aten::sin\b.*no tfjs translation"):
        compile_plan(step, args, input_roles=roles, output_roles=out_roles, tfjs=True)
    plan = compile_plan(step, args, input_roles=roles, output_roles=out_roles)
    assert plan.tfjs is None


def test_syftjs_trains_compiled_cnn_like_onnx(grid, syftjs, cnn, tmp_path):
    """The CNN (conv, max-pool and their backward passes in tfjs-core ops) on 8 MNIST
    images: syft.js's loss and updated params match the onnx plan and eager PyTorch."""
    name = host_compiled(grid, (cnn.params, cnn.plan), max_diffs=1, batch_size=8)
    batch = write_batch(tmp_path / "cnn_batch", cnn.X, cnn.Y)
    run = syftjs.run(grid.ws_url, name, params_out=str(tmp_path / "js.f32"), batch=batch)
    assert run.names() == ["accepted", "reported", "params"], run

    loss, _, *onnx_params = cnn.plan.execute(cnn.X, cnn.Y, 8, LR, *cnn.params)
    eager_loss, eager = cnn.eager_step()
    assert run.one("reported")["loss"] == pytest.approx(float(loss), abs=TOL)
    assert run.one("reported")["loss"] == pytest.approx(eager_loss, abs=TOL)
    js = _syftjs_params(run, cnn.params)
    for j, o, e in zip(js, onnx_params, eager, strict=True):
        np.testing.assert_allclose(j, o, rtol=0, atol=TOL)
        np.testing.assert_allclose(j, e, rtol=0, atol=TOL)
    for c, j in zip(grid.checkpoint(name, 2), js, strict=True):
        np.testing.assert_allclose(c, j, rtol=0, atol=1e-6)
