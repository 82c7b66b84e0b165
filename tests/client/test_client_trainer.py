"""job.train's loop (PlanTrainer) on a real ONNX plan: binding, steps, events, checkpoints."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gridfl import ConfigError, GridflError, PlanError
from gridfl.client import PlanTrainer
from gridfl.plan import Plan
from tests.builders import linear_data, linear_params, linear_sgd_plan


@pytest.fixture(scope="module")
def plan():
    return Plan.from_bytes(linear_sgd_plan(), threads=1)


@pytest.fixture(scope="module")
def momentum_plan():
    return Plan.from_bytes(linear_sgd_plan(momentum=0.5), threads=1)


@pytest.fixture(scope="module")
def data():
    return linear_data(n=200)


def manual_steps(x, y, params, lr, batch, steps):
    """The same SGD in numpy, for comparison."""
    w, b = (p.astype(np.float64) for p in params)
    for i in range(steps):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        err = xb @ w + b - yb
        gw = 2 / batch * xb.T @ err
        gb = 2 / batch * err.sum(0)
        w, b = w - lr * gw, b - lr * gb
    return w, b


def _count_calls(obj, *names) -> dict[str, int]:
    """Wrap obj's methods ``names`` to count their calls (in the returned dict)."""
    calls = dict.fromkeys(names, 0)

    def spy(name, method):
        def counted(*args):
            calls[name] += 1
            return method(*args)
        return counted

    for name in names:
        setattr(obj, name, spy(name, getattr(obj, name)))
    return calls


class TestRun:
    def test_exactly_max_updates_steps(self, plan, data):
        """max_updates=3 runs 3 batches per epoch, not 4 (syft.js's off-by-one)."""
        x, y = data
        trainer = PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 0.01},
                              batch_size=10, epochs=2, max_updates=3)
        batches = []
        trainer.on("batch_end", lambda e, b, loss, m: batches.append((e, b)))
        result = trainer.run()
        assert batches == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
        assert result.steps == 6 and result.epochs == 2 and result.num_samples == 30

    def test_matches_numpy_sgd(self, plan, data):
        """Inputs are bound by role: batch, batch size, lr from client_config, params."""
        x, y = data
        result = PlanTrainer(plan, linear_params(), x, y,
                             client_config={"lr": 0.05, "batch_size": 20, "max_updates": 4}).run()
        w, b = manual_steps(x, y, linear_params(), 0.05, 20, 4)
        np.testing.assert_allclose(result.params[0], w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.params[1], b, rtol=1e-4, atol=1e-5)
        assert set(result.metrics) == {"mae"} and result.loss > 0

    def test_later_steps_skip_execute_and_give_the_same_params(self, plan, momentum_plan, data):
        """Only a run's first step goes through Plan.execute (every input checked); the
        rest go through Plan.run. A duck-typed plan with only execute() takes every step
        through it. Both give the same params and optimizer state."""

        class OnlyExecute:  # what a duck-typed plan offers
            def __init__(self, real):
                self.inputs, self.outputs, self.kind = real.inputs, real.outputs, real.kind
                self.execute = real.execute

        x, y = data
        for p in (plan, momentum_plan):
            counted = Plan.from_bytes(p.to_bytes(), threads=1)
            calls = _count_calls(counted, "execute", "run")
            cfg = {"lr": 0.05, "batch_size": 10, "max_updates": 5}
            fast = PlanTrainer(counted, linear_params(), x, y, client_config=cfg, epochs=2)
            fast_result = fast.run()
            assert calls == {"execute": 1, "run": 9 + 1}  # execute itself calls run once
            slow = PlanTrainer(OnlyExecute(p), linear_params(), x, y, client_config=cfg,
                               epochs=2)
            slow_result = slow.run()
            for a, b in zip(fast_result.params + fast.optimizer_state,
                            slow_result.params + slow.optimizer_state, strict=True):
                np.testing.assert_array_equal(a, b)

    def test_defaults_from_client_config(self, plan, data):
        x, y = data
        t = PlanTrainer(plan, linear_params(), x, y,
                        client_config={"lr": 0.1, "batch_size": 50, "max_epochs": 3})
        assert (t.batch_size, t.epochs, t.steps_per_epoch) == (50, 3, 4)  # last batch dropped
        t2 = PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 0.1, "batch_size": 50},
                         batch_size=8, epochs=1, max_updates=2)
        assert (t2.batch_size, t2.epochs, t2.steps_per_epoch) == (8, 1, 2)

    def test_loss_goes_down(self, plan, data):
        x, y = data
        losses = []
        PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 0.05}, batch_size=10,
                    epochs=3, events={"batch_end": lambda e, b, loss, m: losses.append(loss)}).run()
        assert losses[-1] < losses[0] / 10

    def test_event_order(self, plan, data):
        x, y = data
        log = []
        t = PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 0.01}, batch_size=50,
                        epochs=2, max_updates=1)
        for ev in ("start", "end", "epoch_start", "epoch_end", "batch_start", "batch_end"):
            t.on(ev, lambda *a, ev=ev: log.append((ev, *a[:2])))
        t.run()
        assert log == [("start",), ("epoch_start", 0), ("batch_start", 0, 0),
                       ("batch_end", 0, 0), ("epoch_end", 0), ("epoch_start", 1),
                       ("batch_start", 1, 0), ("batch_end", 1, 0), ("epoch_end", 1), ("end",)]

    def test_optimizer_state_starts_at_zero_and_carries(self, momentum_plan, data):
        x, y = data
        t = PlanTrainer(momentum_plan, linear_params(), x, y, client_config={"lr": 0.01},
                        batch_size=20, max_updates=1)
        assert all(not o.any() for o in t.optimizer_state)
        r = t.run()
        # after one step from zero momentum the buffer equals the gradient: step = lr * v
        np.testing.assert_allclose(r.params[0], -0.01 * r.optimizer_state[0], rtol=1e-5)


class TestStopResumeCheckpoint:
    def run_all(self, plan, x, y, **kw):
        return PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 0.05},
                           batch_size=10, epochs=2, max_updates=5, **kw).run()

    def test_stop_and_resume_equals_uninterrupted(self, momentum_plan, data):
        x, y = data
        full = self.run_all(momentum_plan, x, y)
        t = PlanTrainer(momentum_plan, linear_params(), x, y, client_config={"lr": 0.05},
                        batch_size=10, epochs=2, max_updates=5)
        stops = []
        t.on("batch_end", lambda e, b, loss, m: t.stop() if (e, b) == (0, 3) else None)
        t.on("stop", lambda: stops.append(t.steps))
        part = t.run()
        assert part.stopped and part.steps == 4 and stops == [4]
        rest = t.resume()
        assert not rest.stopped and rest.steps == 10
        for a, b in zip(rest.params, full.params, strict=True):
            np.testing.assert_array_equal(a, b)

    def test_checkpoint_bytes_continue(self, momentum_plan, data):
        """A checkpoint taken mid-training continues in a new trainer to the same result."""
        x, y = data
        full = self.run_all(momentum_plan, x, y, shuffle=True, seed=3)
        t = PlanTrainer(momentum_plan, linear_params(), x, y, client_config={"lr": 0.05},
                        batch_size=10, epochs=2, max_updates=5, shuffle=True, seed=3)
        t.on("batch_end", lambda e, b, loss, m: t.stop() if (e, b) == (1, 1) else None)
        t.run()
        blob = t.checkpoint()
        assert isinstance(blob, bytes)
        t2 = PlanTrainer.from_checkpoint(momentum_plan, x, y, blob)
        assert (t2.epoch, t2.batch, t2.steps) == (1, 2, 7)
        events = []
        t2.on("epoch_start", events.append)
        rest = t2.run()
        assert events == [] and rest.steps == 10  # epoch 1 was already open
        for a, b in zip(rest.params, full.params, strict=True):
            np.testing.assert_array_equal(a, b)

    def test_checkpoint_rejects_garbage_and_other_plan(self, plan, momentum_plan, data):
        x, y = data
        with pytest.raises(ConfigError, match="not a gridfl trainer checkpoint"):
            PlanTrainer.from_checkpoint(plan, x, y, b"nope")
        blob = PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 0.1},
                           batch_size=10).checkpoint()
        with pytest.raises(ConfigError, match="different plan"):
            PlanTrainer.from_checkpoint(momentum_plan, x, y, blob)

    def test_stop_from_another_thread(self, plan):
        x, y = linear_data(n=4000)
        t = PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 0.01}, batch_size=1,
                        epochs=50)
        started = threading.Event()
        t.on("batch_end", lambda *a: started.set())
        th = threading.Thread(target=lambda: (started.wait(5), t.stop()))
        th.start()
        r = t.run()
        th.join()
        assert r.stopped and 0 < r.steps < 200000


class TestErrors:
    def test_missing_client_config_key(self, plan, data):
        with pytest.raises(ConfigError, match="client_config lacks 'lr'"):
            PlanTrainer(plan, linear_params(), *data, batch_size=4)

    def test_bad_values(self, plan, data):
        x, y = data
        with pytest.raises(ConfigError, match="batch_size"):
            PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 1})
        with pytest.raises(ConfigError, match="fewer than one batch"):
            PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 1}, batch_size=1000)
        with pytest.raises(ConfigError, match="target has"):
            PlanTrainer(plan, linear_params(), x, y[:5], client_config={"lr": 1}, batch_size=2)
        with pytest.raises(ConfigError, match="model params"):
            PlanTrainer(plan, linear_params()[:1], x, y, client_config={"lr": 1}, batch_size=2)
        with pytest.raises(ValueError, match="unknown trainer event"):
            PlanTrainer(plan, linear_params(), x, y, client_config={"lr": 1},
                        batch_size=2).on("batchend", print)

    def test_not_a_training_plan(self, data):
        class Fake:
            kind = "averaging"
            inputs = outputs = ()

        with pytest.raises(PlanError, match="training plan"):
            PlanTrainer(Fake(), [], *data, batch_size=2)

    def test_checkpoint_while_running(self, plan, data):
        t = PlanTrainer(plan, linear_params(), *data, client_config={"lr": 0.1}, batch_size=10)
        errors = []

        def grab(*a):
            try:
                t.checkpoint()
            except GridflError as e:
                errors.append(e)
            t.stop()

        t.on("batch_end", grab)
        t.run()
        assert errors and "stop()" in str(errors[0])
