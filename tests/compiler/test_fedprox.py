"""FedProx plans (compile_training_plan(proximal_mu=...)) against a numpy reference from
the paper's formula (tests/_fedprox_reference.py), run by onnxruntime, and the worker's
trainer binding the global params itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gridfl import CompileError, PlanInputError
from gridfl.client.trainer import PlanTrainer
from gridfl.compiler import SGD, compile_training_plan
from tests import _fedprox_reference as ref

MU = 0.5
LR = 0.1


def two_nn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 3, 64)


@pytest.fixture(scope="module")
def net():
    return two_nn()


@pytest.fixture(scope="module")
def plan(net, data):
    x, y = data
    return compile_training_plan(net, optimizer=SGD(lr=LR), example_data=x[:16],
                                 example_target=y[:16], proximal_mu=MU)


def params_of(net):
    return [p.detach().numpy().copy() for p in net.parameters()]


def test_plan_takes_global_params_and_mu(plan):
    roles = [(s.role, s.index, s.key) for s in plan.inputs]
    assert roles[-5:] == [("global_param", i, None) for i in range(4)] + [
        ("client_config", None, "proximal_mu")]
    assert plan.client_config_keys == ["lr", "proximal_mu"]
    assert not [s for s in plan.outputs if s.role == "global_param"]


def test_plan_without_proximal_mu_has_no_global_params(net, data):
    x, y = data
    plain = compile_training_plan(net, optimizer=SGD(lr=LR), example_data=x[:16],
                                  example_target=y[:16])
    assert [s.role for s in plain.inputs] == (
        ["data", "target", "batch_size", "client_config"] + ["model_param"] * 4)
    assert plain.client_config_keys == ["lr"]


def test_one_step_equals_the_paper_formula(plan, net, data):
    """w' = w - lr (grad F(w) + mu (w - w_t)) with w != w_t, and the reported loss is
    h(w) = F(w) + mu/2 ||w - w_t||^2."""
    x, y = data
    w_t = params_of(net)
    rng = np.random.default_rng(2)
    w = [p + rng.normal(scale=0.3, size=p.shape).astype(np.float32) for p in w_t]
    out = plan.execute(*plan.bind(data=x[:16], target=y[:16], params=w, global_params=w_t,
                                  client_config={"lr": LR, "proximal_mu": MU}))
    want = ref.fedprox_step([p.astype(np.float64) for p in w],
                            [p.astype(np.float64) for p in w_t],
                            x[:16].astype(np.float64), y[:16], LR, MU)
    for got, exp in zip(out[2:], want, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-6)
    # the proximal term moved the params: not the FedAvg step
    fedavg = ref.fedprox_step([p.astype(np.float64) for p in w], w_t, x[:16], y[:16], LR, 0.0)
    assert max(float(np.abs(a - b).max()) for a, b in zip(want, fedavg, strict=True)) > 1e-2
    assert float(out[0]) == pytest.approx(ref.objective(w, w_t, x[:16], y[:16], MU), rel=1e-5)


@pytest.mark.parametrize("mu", [0.0, 0.01, 2.0])
def test_mu_is_read_from_client_config(plan, net, data, mu):
    x, y = data
    w_t = params_of(net)
    w = [p * 1.5 + 0.05 for p in w_t]
    out = plan.execute(*plan.bind(data=x[:8], target=y[:8], params=w, global_params=w_t,
                                  client_config={"lr": LR, "proximal_mu": mu}))
    want = ref.fedprox_step(w, w_t, x[:8], y[:8], LR, mu)
    for got, exp in zip(out[2:], want, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-6)


def test_trainer_keeps_the_global_params_fixed_over_several_steps(plan, net, data):
    """PlanTrainer binds the global params to the params it started from, and they stay
    fixed while the params move: 6 steps equal the numpy loop with w_t fixed."""
    x, y = data
    w_t = params_of(net)
    trainer = PlanTrainer(plan, w_t, x, y, client_config={"lr": LR, "proximal_mu": MU},
                          batch_size=8, max_updates=6)
    result = trainer.run()
    want = ref.local_run(w_t, x, y, lr=LR, mu=MU, batch_size=8, steps=6)
    for got, exp in zip(result.params, want, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5)
    # a wrong anchor (the current params each step) would be plain SGD: tell them apart
    sgd = ref.local_run(w_t, x, y, lr=LR, mu=0.0, batch_size=8, steps=6)
    assert max(float(np.abs(a - b).max()) for a, b in zip(want, sgd, strict=True)) > 1e-4


def test_trainer_checkpoint_keeps_the_anchor(plan, net, data):
    x, y = data
    w_t = params_of(net)
    cfg = {"lr": LR, "proximal_mu": MU}
    trainer = PlanTrainer(plan, w_t, x, y, client_config=cfg, batch_size=8, max_updates=6)
    trainer.on("batch_end", lambda e, b, loss, m: trainer.stop() if b == 2 else None)
    assert trainer.run().stopped
    resumed = PlanTrainer.from_checkpoint(plan, x, y, trainer.checkpoint())
    result = resumed.run()
    want = ref.local_run(w_t, x, y, lr=LR, mu=MU, batch_size=8, steps=6)
    for got, exp in zip(result.params, want, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5)


def test_bind_without_global_params_is_refused(plan, net, data):
    x, y = data
    with pytest.raises(PlanInputError, match="FedProx global param: pass global_params="):
        plan.bind(data=x, target=y, params=params_of(net),
                  client_config={"lr": LR, "proximal_mu": MU})


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_proximal_mu_is_refused(net, data, mu):
    x, y = data
    with pytest.raises(CompileError, match="proximal_mu must be a finite number >= 0"):
        compile_training_plan(net, example_data=x[:8], example_target=y[:8], proximal_mu=mu)


def test_plan_compiled_with_mu_zero_reads_mu_at_run_time(net, data):
    """proximal_mu=0 compiles a plan whose mu is still an input: 0.3 from client_config
    pulls toward w_t as the formula says."""
    x, y = data
    plan = compile_training_plan(net, optimizer=SGD(lr=LR), example_data=x[:8],
                                 example_target=y[:8], proximal_mu=0.0)
    w_t = params_of(net)
    w = [p - 0.2 for p in w_t]
    out = plan.execute(*plan.bind(data=x[:8], target=y[:8], params=w, global_params=w_t,
                                  client_config={"lr": LR, "proximal_mu": 0.3}))
    for got, exp in zip(out[2:], ref.fedprox_step(w, w_t, x[:8], y[:8], LR, 0.3), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-6)


def test_the_compilers_eager_check_covers_the_proximal_term(net, data, monkeypatch):
    """The eager-PyTorch outputs the compiled plan is checked against are h(w) and the
    FedProx step, at example global params that differ from the params (so the term's
    gradient is not zero)."""
    import gridfl.compiler as compiler

    seen = []
    real = compiler.verify_plan

    def spy(plan, args, ref_out, other, batch_inputs):
        seen.append(([a.detach().numpy().copy() for a in args], [r.numpy() for r in ref_out]))
        return real(plan, args, ref_out, other, batch_inputs)

    monkeypatch.setattr(compiler, "verify_plan", spy)
    x, y = data
    compile_training_plan(net, optimizer=SGD(lr=LR), example_data=x[:8], example_target=y[:8],
                          proximal_mu=MU)
    (args, eager), = seen
    w, w_t, mu = args[4:8], args[8:12], float(args[12])
    assert mu == MU and max(float(np.abs(a - b).max()) for a, b in zip(w, w_t, strict=True)) > 0.01
    assert float(eager[0]) == pytest.approx(ref.objective(w, w_t, x[:8], y[:8], MU), rel=1e-5)
    for got, exp in zip(eager[2:], ref.fedprox_step(w, w_t, x[:8], y[:8], LR, MU), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-6)
