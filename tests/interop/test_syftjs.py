"""The published syft.js 0.1.4 client (npm, run in Node.js) trains on a gridfl node.

Every scenario runs the real client through ``syftjs_worker.js`` the way its README does
(``new Syft({url, verbose: true, authToken})``, ``newJob``, ``on('accepted')`` -> execute
the tfjs plan -> ``createSerializedDiff`` -> ``report``), over ``ws://`` and ``http://``.
The model, plan and batch are syft.js 0.1.4's own MNIST test vectors; the node's new
checkpoint must equal PySyft's reference update (``mnist_upd_model_params.pb``).

What syft.js needs from the node is listed in docs/protocol.md, "syft.js 0.1.4
compatibility".
"""

from __future__ import annotations

import httpx
import jwt
import numpy as np
import pytest

from gridfl import Syft, SyftModel, state
from gridfl.plan import Plan

SECRET = "interop-hs256-secret-that-is-long-enough"
MSG_INVALID = "The 'auth_token' you sent is invalid."
MSG_REQUIRED = "Authentication is required, please pass an 'auth_token'."


def grid_error(transport: str, message: str) -> str:
    """The text of the Error syft.js 0.1.4 throws for a node error reply: the bare
    ``error`` over WebSocket, ``"Grid error: " + error`` for a non-2xx HTTP reply."""
    return message if transport == "ws" else f"Grid error: {message}"


def assert_close(actual, expected, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


def check_trained(grid, mnist, name: str, run) -> None:
    """syft.js was accepted, downloaded model and tfjs plan, trained, reported; the node
    aggregated the one diff (max_diffs 1) into checkpoint 2 == PySyft's reference update."""
    assert run.names() == ["accepted", "reported"], run
    acc = run.one("accepted")
    assert acc["clientConfig"] == {
        "name": name,
        "version": "1.0",
        "batch_size": 64,
        "lr": 0.005,
        "max_updates": 1,
    }
    assert acc["plans"] == ["training_plan"]
    assert acc["shapes"] == [list(p.shape) for p in mnist.params]
    assert len(acc["requestKey"]) == 64
    rep = run.one("reported")
    assert rep["loss"] == pytest.approx(mnist.scalars["MNIST_LOSS"], abs=1e-6)
    assert rep["accuracy"] == pytest.approx(mnist.scalars["MNIST_ACCURACY"], abs=1e-7)
    status = grid.status(name)
    first = status["cycles"][0]
    assert (first["status"], first["accepted"], first["reported"]) == ("completed", 1, 1)
    assert first["result_checkpoint"] == 2
    assert_close(grid.checkpoint(name, 2), mnist.updated)
    assert_close(grid.checkpoint(name, "latest"), mnist.updated)


# --------------------------------------------------------------------------- authentication errors
def test_auth_errors(grid, syftjs, mnist, transport, rsa_keys):
    """The exact Error syft.js surfaces (from newJob) for a bad, a wrongly signed and a
    missing token; HS256 tokens do not pass an RS256 process."""
    _, public = rsa_keys
    # these clients never get past authenticate: the tfjs variant alone will do (and
    # does not wait for the onnx compile, see syftjs_runner.py)
    hs = mnist.host_on(grid, {"authentication": {"secret": SECRET}}, variants=("tfjs",))
    rs = mnist.host_on(grid, {"authentication": {"pub_key": public}}, variants=("tfjs",))
    url = grid.url_for(transport)
    tokens = {
        "garbage": (hs, "not-a-jwt"),
        "wrong-secret": (
            hs,
            jwt.encode({}, "another-secret-that-is-also-long-enough", algorithm="HS256"),
        ),
        "hs256-for-rs256": (rs, jwt.encode({}, SECRET, algorithm="HS256")),
        "missing": (hs, None),
    }
    pending = {k: syftjs.start(url, name, token=tok) for k, (name, tok) in tokens.items()}
    for case, p in pending.items():
        run = p.result()
        err = run.one("error")
        assert err["during"] == "newJob", run
        want = MSG_REQUIRED if case == "missing" else MSG_INVALID
        assert err["message"] == grid_error(transport, want), case
    for name in (hs, rs):
        assert grid.status(name)["cycles"][0]["accepted"] == 0


# --------------------------------------------------------------------------- speed test
def test_speed_test(grid, syftjs, mnist, transport):
    """With minimum speeds set, syft.js runs its speed test (ping GETs with ``is_ping``,
    the multipart download, the upload POST; doubled '?' in the query) and reports the
    results in cycle-request; the node stores them and accepts. A minimum the client
    cannot meet gets a rejection with a numeric timeout."""
    fast = {"minimum_download_speed": 1, "minimum_upload_speed": 1}
    ok = mnist.host_on(grid, fast, variants=("tfjs",))
    slow = mnist.host_on(grid, {**fast, "minimum_download_speed": 1e9}, variants=("tfjs",))
    url = grid.url_for(transport)
    p_ok = syftjs.start(url, ok, train=False)
    p_slow = syftjs.start(url, slow, train=False)
    run = p_ok.result()
    assert run.names() == ["accepted"], run
    acc = run.one("accepted")
    row = grid.worker_row(acc["workerId"])
    assert row.ping > 0 and row.download >= 1 and row.upload >= 1, row
    assert "[0, 0, 0]" not in run.log()
    # the downloads syft.js made are the hosted bytes: the model and the *tfjs* plan
    keys = {"worker_id": acc["workerId"], "request_key": acc["requestKey"]}
    with httpx.Client(base_url=grid.http_url) as http:
        r = http.get("/model-centric/get-model", params={**keys, "model_id": acc["modelId"]})
        assert r.status_code == 200 and r.content == mnist.model_bytes
        assert r.headers["content-type"] == "application/octet-stream"
        plan_id = acc["planIds"]["training_plan"]
        r = http.get(
            "/model-centric/get-plan",
            params={**keys, "plan_id": plan_id, "receive_operations_as": "tfjs"},
        )
        assert r.status_code == 200 and r.content == mnist.tfjs_plan
    assert grid.status(ok)["current"]["accepted"] == 1
    rej = p_slow.result()
    assert rej.names() == ["rejected"], rej
    timeout = rej.one("rejected")["timeout"]
    assert isinstance(timeout, int) and 0 < timeout <= 600


def test_speed_tests_at_once(grid, syftjs, mnist, transport):
    """Five syft.js workers speed-test at the same time (each uploads 64 MiB): every one
    finishes, the three that meet the minimums are accepted with their speeds stored,
    the two that cannot are rejected. (Under this load the node can read an upload's last
    bytes and answer before the client has seen them written; a harness that missed that
    left syft.js waiting forever, in about one such round in 24.)"""
    fast = {"minimum_download_speed": 1, "minimum_upload_speed": 1}
    ok = mnist.host_on(grid, fast, variants=("tfjs",))
    slow = mnist.host_on(grid, {**fast, "minimum_upload_speed": 1e9}, variants=("tfjs",))
    url = grid.url_for(transport)
    pending = [syftjs.start(url, ok, train=False) for _ in range(3)]
    pending += [syftjs.start(url, slow, train=False) for _ in range(2)]
    runs = [p.result() for p in pending]
    for run in runs[:3]:
        assert run.names() == ["accepted"], run
        row = grid.worker_row(run.one("accepted")["workerId"])
        assert row.ping > 0 and row.download >= 1 and row.upload >= 1, row
    for run in runs[3:]:
        assert run.names() == ["rejected"], run
    assert grid.status(ok)["current"]["accepted"] == 3


# --------------------------------------------------------------------------- full flow
def test_auth_train_report_checkpoint(grid, syftjs, mnist, transport, rsa_keys):
    """No auth, HS256 JWT and RS256 JWT; each: auth -> cycle-request (no speed test) ->
    accepted -> get-model + get-plan(tfjs) -> execute -> report -> new checkpoint."""
    private, public = rsa_keys
    cases = {
        "none": (None, None),
        "hs256": ({"type": "jwt", "secret": SECRET}, jwt.encode({}, SECRET, algorithm="HS256")),
        "rs256": (
            {"type": "jwt", "pub_key": public},
            jwt.encode({"sub": "syftjs"}, private, algorithm="RS256"),
        ),
    }
    names, pending = {}, {}
    for case, (auth, _) in cases.items():
        names[case] = mnist.host_on(grid, {"authentication": auth})
    for case, (_, token) in cases.items():  # the three clients run concurrently
        pending[case] = syftjs.start(grid.url_for(transport), names[case], token=token)
    for case, p in pending.items():
        run = p.result()
        check_trained(grid, mnist, names[case], run)
        log = run.log()
        assert "[0, 0, 0]" in log  # no speed test asked: syft.js sends zeros
        assert "Requesting model" in log and "Requesting plan" in log
        if transport == "ws":
            assert "Sending WS message model-centric/report" in log


# --------------------------------------------------------------------------- rejections
def _python_worker(grid, name: str, *, train: bool, mnist=None, transport="http"):
    """A gridfl Python worker (onnx variant): accepted, and optionally trains + reports."""
    got = {}
    with Syft(grid.url_for(transport), timeout=30) as client:
        job = client.new_job(name, "1.0")

        @job.on("accepted")
        def _accepted(model, client_config):
            got["model"] = model
            if train:
                plan = job.plans["training_plan"]
                _, _, *new = plan.execute(
                    mnist.X,
                    mnist.y,
                    client_config["batch_size"],
                    client_config["lr"],
                    *model.params,
                )
                job.report(model.create_serialized_diff(new))

        @job.on("rejected")
        def _rejected(timeout):
            got["rejected"] = timeout

        job.start()
    assert "model" in got, got
    return got


def test_rejected_with_timeout(grid, syftjs, mnist, transport):
    """The cycle is full (max_workers 1): syft.js gets ``rejected`` with the node's integer
    seconds until the cycle's deadline, passed through to its handler."""
    name = mnist.host_on(grid, {"cycle_length": 300, "max_workers": 1, "max_diffs": 1})
    _python_worker(grid, name, train=False)
    run = syftjs.run(grid.url_for(transport), name, train=False)
    assert run.names() == ["rejected"], run
    timeout = run.one("rejected")["timeout"]
    assert isinstance(timeout, int) and 290 <= timeout <= 300
    assert "Rejected from cycle with timeout: " + str(timeout) in run.log()


def test_rejected_without_timeout_when_done(grid, syftjs, mnist, transport):
    """After num_cycles cycles the process is finished: syft.js gets ``rejected`` with no
    timeout (``undefined`` in its handler)."""
    name = mnist.host_on(grid, {"num_cycles": 1, "max_diffs": 1})
    _python_worker(grid, name, train=True, mnist=mnist)
    assert grid.status(name)["status"] == "finished"
    run = syftjs.run(grid.url_for(transport), name, train=False)
    assert run.names() == ["rejected"], run
    assert run.one("rejected")["timeout"] == "<undefined>"


def test_next_cycle_trains_on_gridfl_checkpoint(grid, syftjs, mnist):
    """Cycle 2 serves the checkpoint gridfl wrote itself (gridfl.state, not PySyft bytes):
    syft.js loads it, trains and reports; checkpoint 3 == the onnx plan applied to it."""
    name = mnist.host_on(grid, {"num_cycles": 2})
    _python_worker(grid, name, train=True, mnist=mnist)  # cycle 1
    assert_close(grid.checkpoint(name, 2), mnist.updated)
    run = syftjs.run(grid.ws_url, name)  # cycle 2
    assert run.names() == ["accepted", "reported"], run
    ckpt2 = grid.checkpoint(name, 2)
    plan = Plan.from_bytes(mnist.onnx_plan)
    _, _, *want = plan.execute(mnist.X, mnist.y, mnist.batch_size, mnist.lr, *ckpt2)
    assert_close(grid.checkpoint(name, 3), want, atol=1e-6)
    assert grid.status(name)["status"] == "finished"


# --------------------------------------------------------------------------- mixed cycle
def test_mixed_cycle_syftjs_and_python(grid, syftjs, mnist):
    """One syft.js worker (tfjs variant, ws://) and one gridfl Python worker (onnx variant,
    http://) in the same cycle (max_diffs 2): both diffs go into the aggregate,
    checkpoint 2 == initial - mean(diff_syftjs, diff_python)."""
    name = mnist.host_on(grid, {"max_diffs": 2, "num_cycles": 1})
    with Syft(grid.http_url, timeout=30) as client:
        job = client.new_job(name, "1.0")
        got = {}
        job.on("accepted", lambda model, cfg: got.update(model=model, cfg=cfg))
        job.start()
        model: SyftModel = got["model"]
        plan = job.plans["training_plan"]
        assert isinstance(plan, Plan) and plan.kind == "training"
        assert_close(model.params, mnist.params, atol=0)

        # syft.js joins the same cycle, trains with the tfjs plan and reports first
        run = syftjs.run(grid.ws_url, name)
        assert run.names() == ["accepted", "reported"], run
        current = grid.status(name)["current"]
        assert (current["sequence"], current["accepted"], current["reported"]) == (1, 2, 1)

        # the Python worker executes the onnx plan on the same batch and reports
        loss, acc, *new = plan.execute(
            mnist.X, mnist.y, got["cfg"]["batch_size"], got["cfg"]["lr"], *model.params
        )
        assert float(loss) == pytest.approx(mnist.scalars["MNIST_LOSS"], abs=1e-5)
        assert float(acc) == pytest.approx(mnist.scalars["MNIST_ACCURACY"])
        assert_close(new, mnist.updated, atol=1e-6)
        job.report(model.create_serialized_diff(new))

    status = grid.status(name)
    first = status["cycles"][0]
    assert (first["status"], first["accepted"], first["reported"]) == ("completed", 2, 2)
    diff_js = [p - u for p, u in zip(mnist.params, mnist.updated, strict=True)]
    diff_py = state.loads(model.create_serialized_diff(new))
    want = [p - (a + b) / 2 for p, a, b in zip(mnist.params, diff_js, diff_py, strict=True)]
    assert_close(grid.checkpoint(name, 2), [w.astype(np.float32) for w in want])


# --------------------------------------------------------------------------- async (FedBuff)
def test_async_process_syftjs_reports_into_buffers(grid, syftjs, mnist):
    """``mode: "async"`` (FedBuff, buffer_size 2): syft.js takes part unchanged beside
    plain HTTP workers. Two HTTP workers take checkpoint 1; syft.js trains on it and
    reports; the first HTTP worker's report publishes checkpoint 2; syft.js then trains on
    checkpoint 2, and the second HTTP worker, one checkpoint stale, publishes checkpoint 3
    with weight 1/sqrt(2). Each checkpoint == FedBuff's update computed here."""
    from tests.harness import HttpWorker, join, report

    name = mnist.host_on(
        grid, {"mode": "async", "buffer_size": 2, "cycle_length": None, "max_diffs": None}
    )
    rng = np.random.default_rng(0)
    d1, d2 = ([(0.01 * rng.standard_normal(p.shape)).astype(p.dtype) for p in mnist.params]
              for _ in range(2))
    w = HttpWorker(grid.http_url)
    try:
        first, second = join(w, name=name), join(w, name=name)  # both on checkpoint 1
        run = syftjs.run(grid.ws_url, name)
        assert run.names() == ["accepted", "reported"], run
        assert report(w, first[0], first[1]["request_key"], d1)[0] == 200
        diff_js = [p - u for p, u in zip(mnist.params, mnist.updated, strict=True)]
        want2 = [p - (a + b) / 2 for p, a, b in zip(mnist.params, diff_js, d1, strict=True)]
        ckpt2 = grid.checkpoint(name, 2)
        assert_close(ckpt2, [x.astype(np.float32) for x in want2], atol=1e-6)

        run = syftjs.run(grid.ws_url, name)  # on checkpoint 2
        assert run.names() == ["accepted", "reported"], run
        assert report(w, second[0], second[1]["request_key"], d2)[0] == 200
    finally:
        w.close()
    plan = Plan.from_bytes(mnist.onnx_plan)
    _, _, *trained = plan.execute(mnist.X, mnist.y, mnist.batch_size, mnist.lr, *ckpt2)
    s = 1 / np.sqrt(2)  # the second HTTP worker trained on checkpoint 1: staleness 1
    want3 = [
        c - ((c - t) + s * d) / 2 for c, t, d in zip(ckpt2, trained, d2, strict=True)
    ]
    assert_close(grid.checkpoint(name, 3), [x.astype(np.float32) for x in want3], atol=1e-6)
    assert [c["reported"] for c in grid.status(name)["cycles"][:2]] == [2, 2]


# --------------------------------------------------------------------------- node contract
def test_process_without_tfjs_variant(grid, syftjs, mnist):
    """syft.js 0.1.4 always asks get-plan for ``receive_operations_as=tfjs``: a process
    hosted with only the onnx variant fails its download with the node's 400 text."""
    name = mnist.host_on(grid, variants=("onnx",))
    run = syftjs.run(grid.ws_url, name, train=False)
    err = run.one("error")
    assert err["during"] == "start", run
    assert err["message"] == (
        "Grid error: plan 'training_plan' has no 'tfjs' variant; it has: onnx"
    )


@pytest.mark.parametrize(
    ("path", "method", "headers"),
    [
        ("/model-centric/authenticate", "POST", "content-type"),  # fetch with a JSON body
        ("/model-centric/report", "POST", "content-type"),
        ("/model-centric/speed-test", "POST", ""),  # XHR upload with progress listeners
    ],
)
def test_cors_preflight_for_browser_syftjs(grid, path, method, headers):
    """In a browser, syft.js's JSON POSTs and its speed-test upload (upload listeners
    registered) are preflighted; the node allows any origin."""
    h = {"Origin": "https://app.example", "Access-Control-Request-Method": method}
    if headers:
        h["Access-Control-Request-Headers"] = headers
    r = httpx.options(grid.http_url + path, headers=h)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] in ("*", "https://app.example")
    assert method in r.headers["access-control-allow-methods"]
    if headers:
        assert headers in r.headers["access-control-allow-headers"].lower()
    # and the actual (simple) responses carry the header too
    r = httpx.get(grid.http_url + "/health", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "*"


def test_rejected_from_a_secure_aggregation_process(grid, syftjs, mnist, transport):
    """syft.js 0.1.4 runs no protocols: a process hosted with secure aggregation rejects
    it at once with no timeout (it stops instead of retrying or hanging), and the reason
    says why; it still trains on a process without it (the tests above)."""
    name = mnist.host_on(
        grid, {"max_workers": 5, "secure_aggregation": {"threshold": 3}}, variants=("tfjs",)
    )
    run = syftjs.run(grid.url_for(transport), name, train=False)
    assert run.names() == ["rejected"], run
    assert run.one("rejected")["timeout"] == "<undefined>"
    if transport == "ws":  # syft.js logs the socket's replies; the HTTP one is not shown
        assert "secure_aggregation" in run.log() and "train it with the gridfl" in run.log()
    assert grid.status(name)["current"]["accepted"] == 0


# --------------------------------------------------------------------------- evaluation
def _mnist_evaluation_plan(mnist) -> bytes:
    """``(X, y, W1, b1, W2, b2) -> (cross-entropy loss, accuracy)`` for the vectors' MLP."""
    from onnx import TensorProto, helper

    from tests.builders import _plan_bytes

    f32 = TensorProto.FLOAT
    names = ["W1", "b1", "W2", "b2"]
    inputs = [
        helper.make_tensor_value_info("X", f32, ["N", mnist.X.shape[1]]),
        helper.make_tensor_value_info("y", f32, ["N", mnist.y.shape[1]]),
        *[helper.make_tensor_value_info(n, f32, list(p.shape))
          for n, p in zip(names, mnist.params, strict=True)],
    ]
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["logits"], transB=1),
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=1),
        helper.make_node("Mul", ["logp", "y"], ["ylogp"]),
        helper.make_node("ReduceSum", ["ylogp"], ["rowsum"], keepdims=0),
        helper.make_node("Neg", ["rowsum"], ["negsum"]),
        helper.make_node("Shape", ["X"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["nf"], to=f32),
        helper.make_node("Div", ["negsum", "nf"], ["loss"]),
        helper.make_node("ArgMax", ["logits"], ["pred"], axis=1, keepdims=0),
        helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0),
        helper.make_node("Equal", ["pred", "label"], ["hit"]),
        helper.make_node("Cast", ["hit"], ["hitf"], to=f32),
        helper.make_node("ReduceMean", ["hitf"], ["accuracy"], keepdims=0),
    ]
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    nodes.insert(0, helper.make_node("Constant", [], ["zero"], value=zero))
    outputs = [helper.make_tensor_value_info("loss", f32, []),
               helper.make_tensor_value_info("accuracy", f32, [])]
    return _plan_bytes(
        nodes, inputs, outputs, "evaluation",
        [{"name": "X", "role": "data"}, {"name": "y", "role": "target"},
         *[{"name": n, "role": "model_param", "index": i} for i, n in enumerate(names)]],
        [{"name": "loss", "role": "loss"},
         {"name": "accuracy", "role": "metric", "key": "accuracy"}],
    )


def test_syftjs_only_trains_beside_evaluation_cycles(grid, syftjs, mnist, transport):
    """A process hosted with server_config.evaluation: after cycle 1 an evaluation of
    checkpoint 2 is due, yet syft.js 0.1.4 (which names no ``evaluation`` capability) is
    placed in training cycle 2, trains and reports; a gridfl worker that can evaluate is
    then placed in the evaluation of checkpoint 3 and its metrics are the status's."""
    name = f"mnist-eval-{transport}"
    grid.host(
        name,
        server_config={"cycle_length": 600, "num_cycles": 0, "max_diffs": 1,
                       "evaluation": {"every": 1, "max_workers": 2}},
        client_config={"batch_size": mnist.batch_size, "lr": mnist.lr, "max_updates": 1},
        params=mnist.model_bytes,
        plans={"training_plan": {"tfjs": mnist.tfjs_plan, "onnx": mnist.onnx_plan},
               "evaluation_plan": _mnist_evaluation_plan(mnist)},
    )
    _python_worker(grid, name, train=True, mnist=mnist)  # cycle 1: checkpoint 2 is due
    run = syftjs.run(grid.url_for(transport), name)
    assert run.names() == ["accepted", "reported"], run
    # a training cycle lists the training plan only: syft.js needs no tfjs evaluation plan
    assert run.one("accepted")["plans"] == ["training_plan"]
    cycles = grid.status(name)["cycles"]
    assert [(c["sequence"], c["reported"]) for c in cycles[:2]] == [(1, 1), (2, 1)]
    assert grid.host_client.evaluations(name, "1.0") == []  # syft.js took no seat

    with Syft(grid.url_for(transport), timeout=30) as client:
        job = client.new_job(name, "1.0")
        job.can_evaluate = True
        job.start()
        assert job.kind == "evaluation"
        result = job.evaluate(mnist.X, mnist.y)
        job.report_metrics(result.num_samples, result.metrics)
    (e,) = grid.host_client.evaluations(name, "1.0")
    ckpt3 = grid.checkpoint(name, 3)
    hidden = np.maximum(mnist.X @ ckpt3[0].T + ckpt3[1], 0)
    logits = (hidden @ ckpt3[2].T + ckpt3[3]).astype(np.float64)
    accuracy = float(np.mean(logits.argmax(1) == mnist.y.argmax(1)))
    assert (e["checkpoint"], e["reported"], e["num_samples"]) == (3, 1, len(mnist.X))
    assert e["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
