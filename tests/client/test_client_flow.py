"""The sans-I/O job flow, driven with scripted replies (pure logic, no network)."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl import (
    AuthenticationError,
    ConfigError,
    CycleStatusError,
    GridflError,
    ModelLoadFailedError,
    NotFoundError,
    PlanLoadFailedError,
    TransportError,
)
from gridfl.client import Job, JobState, Syft
from gridfl.client._flow import Call, Fetch, MeasureSpeed, drive_sync
from gridfl.state import dumps, loads
from tests.builders import linear_params, linear_sgd_plan

ACCEPTED = {
    "status": "accepted", "request_key": "k" * 64, "version": "1.0", "model": "m",
    "plans": {"training_plan": 3}, "protocols": {}, "client_config": {"lr": 0.1},
    "model_id": 7,
}


class Script:
    """A fake node: answers each operation from a table and records what was asked."""

    def __init__(self, **answers):
        self.answers = {"auth": {"status": "success", "worker_id": "w1",
                                 "requires_speed_test": False},
                        "cycle": ACCEPTED, "model": dumps(linear_params()),
                        "plan": linear_sgd_plan(), "report": {"status": "success"},
                        "speed": {"ping": 1.0, "download": 90.0, "upload": 80.0}}
        self.answers.update(answers)
        self.ops = []

    def __call__(self, op):
        self.ops.append(op)
        key = {
            "model-centric/authenticate": "auth", "model-centric/cycle-request": "cycle",
            "model-centric/report": "report", "model-centric/get-model": "model",
            "model-centric/get-plan": "plan", "model-centric/get-protocol": "protocol",
        }.get(getattr(op, "type", None) or getattr(op, "path", None), "speed")
        value = self.answers[key]
        if isinstance(value, Exception):
            raise value
        return value


def make_job(script, **kw):
    client = Syft("ws://127.0.0.1:1")
    client._perform = script  # pure-logic test: replace the I/O with the script
    return client.new_job("m", "1.0", **kw)


class TestEvents:
    def test_unknown_event_raises_value_error(self):
        job = make_job(Script())
        with pytest.raises(ValueError, match="unknown job event 'acepted'"):
            job.on("acepted", print)

    def test_decorator_and_direct_registration(self):
        job = make_job(Script())
        seen = []

        @job.on("accepted")
        def first(model, client_config):
            seen.append(("deco", client_config))

        job.on("accepted", lambda model, cfg: seen.append(("direct", model.params[0].shape)))
        job.start()
        assert seen == [("deco", {"lr": 0.1}), ("direct", (3, 1))]
        assert first.__name__ == "first"  # the decorator returns the function

    def test_error_without_handler_raises(self):
        job = make_job(Script(auth=AuthenticationError("The 'auth_token' you sent is invalid.")))
        with pytest.raises(AuthenticationError, match="auth_token"):
            job.start()
        assert job.state is JobState.FAILED


class TestStartFlow:
    def test_accepted_flow_requests(self):
        """authenticate -> cycle-request -> get-model -> get-plan(onnx), with the job's token."""
        script = Script()
        job = make_job(script, auth_token="tok")
        job.start()
        assert job.state is JobState.ACCEPTED and job.worker_id == "w1"
        auth, cycle, model, plan = script.ops
        assert auth == Call("model-centric/authenticate",
                            {"model_name": "m", "model_version": "1.0", "auth_token": "tok"})
        assert cycle.data == {
            "worker_id": "w1", "model": "m", "version": "1.0", "protocols": ["secure_aggregation"]
        }
        assert not cycle.idempotent
        assert model == Fetch("model-centric/get-model",
                              {"worker_id": "w1", "request_key": "k" * 64, "model_id": 7})
        assert plan.params["receive_operations_as"] == "onnx" and plan.params["plan_id"] == 3
        assert list(job.plans) == ["training_plan"] and job.client_config == {"lr": 0.1}

    @pytest.mark.parametrize(
        ("digest", "fetched_again"),
        [
            ("held", False),  # the bytes this client loaded last cycle: no download
            ("0" * 64, True),  # a plan it does not hold
            ("zz" * 32, True),  # malformed digests only mean a download
            (12345, True),
            (None, True),  # a node that names no digest (PyGrid)
        ],
    )
    def test_plan_digest_skips_the_download_of_a_held_plan(self, digest, fetched_again):
        import hashlib

        plan_bytes = linear_sgd_plan()
        if digest == "held":
            digest = hashlib.sha256(plan_bytes).hexdigest()
        cycle = dict(ACCEPTED)
        if digest is not None:
            cycle["plan_digests"] = {"training_plan": digest}
        script = Script(cycle=cycle, plan=plan_bytes)
        job = make_job(script)
        job.start()
        first = job.plans["training_plan"]
        script.ops.clear()
        job.start()  # the next cycle
        plan_fetches = [op for op in script.ops if getattr(op, "path", None)
                        == "model-centric/get-plan"]
        assert len(plan_fetches) == int(fetched_again)
        assert job.plans["training_plan"] is first  # the same loaded plan either way

    def test_speed_test_only_when_required(self):
        script = Script(auth={"status": "success", "worker_id": "w", "requires_speed_test": True})
        job = make_job(script)
        job.start()
        assert isinstance(script.ops[1], MeasureSpeed)
        assert script.ops[2].data["download"] == 90.0 and job.speed["ping"] == 1.0
        script2 = Script()
        make_job(script2).start()
        assert not any(isinstance(op, MeasureSpeed) for op in script2.ops)
        assert "ping" not in script2.ops[1].data

    @pytest.mark.parametrize(("timeout", "expected"),
                             [(100500, 100500), ("0:01:40", 100), (None, None)])
    def test_rejected(self, timeout, expected):
        cycle = {"status": "rejected"} | ({} if timeout is None else {"timeout": timeout})
        job = make_job(Script(cycle=cycle))
        got = []
        job.on("rejected", got.append)
        job.start()
        assert got == [expected] and job.state is JobState.REJECTED and job.timeout == expected

    @pytest.mark.parametrize(
        ("answers", "error", "text"),
        [
            ({"model": NotFoundError("Model ID not found!")}, ModelLoadFailedError,
             "Failed to load Model: Model ID not found!"),
            ({"model": b"junk"}, ModelLoadFailedError, "Failed to load Model: "),
            ({"plan": NotFoundError("Plan ID not found!")}, PlanLoadFailedError,
             "Failed to load 'training_plan' Plan: Plan ID not found!"),
            ({"plan": b"junk"}, PlanLoadFailedError, "Failed to load 'training_plan' Plan: "),
            ({"cycle": {"status": "maybe"}}, CycleStatusError, "unknown cycle status"),
            ({"cycle": TransportError("down")}, TransportError, "down"),
        ],
    )
    def test_errors_fire_error_with_cause(self, answers, error, text):
        job = make_job(Script(**answers))
        got = []
        job.on("error", got.append)
        job.start()
        assert len(got) == 1 and isinstance(got[0], error) and text in str(got[0])
        if error in (ModelLoadFailedError, PlanLoadFailedError):
            assert got[0].__cause__ is not None

    def test_non_gridfl_exception_is_wrapped(self):
        job = make_job(Script(auth={"status": "success"}))  # no worker_id
        got = []
        job.on("error", got.append)
        job.start()
        assert isinstance(got[0], GridflError) and "worker_id" in str(got[0])

    def test_coroutine_handler_is_refused_by_sync_job(self):
        job = make_job(Script())

        async def handler(model, cfg):  # pragma: no cover - never awaited
            pass

        job.on("accepted", handler)
        with pytest.raises(ConfigError, match="AsyncSyft"):
            job.start()


class TestReport:
    def test_report_payload(self):
        script = Script()
        job = make_job(script)
        job.start()
        diff = job.model.create_serialized_diff([np.ones((3, 1), np.float32),
                                                 np.ones(1, np.float32)])
        job.report(diff, num_samples=64, metrics={"loss": 0.5})
        op = script.ops[-1]
        assert op.type == "model-centric/report" and not op.idempotent
        assert op.data["worker_id"] == "w1" and op.data["request_key"] == "k" * 64
        assert op.data["diff"] == diff  # bytes: the transport encodes them
        assert op.data["num_samples"] == 64 and op.data["metrics"] == {"loss": 0.5}
        assert loads(diff)[0].ravel().tolist() == [-1.0, -1.0, -1.0]
        assert job.state is JobState.REPORTED

    def test_optional_fields_omitted(self):
        script = Script()
        job = make_job(script)
        job.start()
        job.report(b"\x00")
        assert set(script.ops[-1].data) == {"worker_id", "request_key", "diff"}

    def test_report_before_accepted(self):
        job = make_job(Script())
        with pytest.raises(GridflError, match="expected state 'accepted', got 'created'"):
            job.report(b"x")

    def test_report_needs_bytes(self):
        job = make_job(Script())
        job.start()
        with pytest.raises(ConfigError, match="create_serialized_diff"):
            job.report([np.zeros(1)])


def test_drive_sync_throws_into_flow():
    """A failed operation is thrown into the generator, which may handle it."""

    def flow():
        try:
            yield "op"
        except KeyError:
            return "handled"

    def perform(op):
        raise KeyError(op)

    assert drive_sync(flow(), perform) == "handled"


def test_job_constructor_checks():
    client = Syft("ws://127.0.0.1:1")
    with pytest.raises(ConfigError):
        client.new_job("")
    assert isinstance(client.new_job("m"), Job)
    assert client.new_job("m", auth_token="a").auth_token == "a"
    assert Syft("ws://127.0.0.1:1", auth_token="c").new_job("m").auth_token == "c"


def test_job_train_continues_from_checkpoint():
    """job.trainer(...).checkpoint() bytes continue through job.train(checkpoint=...)."""
    from tests.builders import linear_data

    job = make_job(Script())
    job.start()
    x, y = linear_data(n=80)
    trainer = job.trainer("training_plan", x, y, batch_size=8, max_updates=6)
    trainer.on("batch_end", lambda e, b, loss, m: trainer.stop() if b == 2 else None)
    trainer.run()
    rest = job.train("training_plan", x, y, checkpoint=trainer.checkpoint())
    whole = job.train("training_plan", x, y, batch_size=8, max_updates=6)
    assert rest.steps == whole.steps == 6
    for a, b in zip(rest.params, whole.params, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="no plan 'nope'"):
        job.train("nope", x, y)
