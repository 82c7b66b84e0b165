"""The ``gridfl`` commands, in-process with click's runner, against a real node."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from gridfl import state
from gridfl.cli import main
from tests.harness import LiveNode

TOKEN = "cli-tests-admin"

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from gridfl.compiler import SGD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    example_data = torch.randn(4, 6)
    example_target = torch.tensor([0, 1, 2, 1])
    optimizer = SGD(lr=0.5)
    name = "tiny"
    version = "2.0"
    client_config = {"batch_size": 4, "max_updates": 5}
    server_config = {"max_workers": 1, "max_diffs": 1, "num_cycles": 2, "cycle_length": 60}
    """
)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from gridfl.server import Settings

    data = tmp_path_factory.mktemp("node")
    srv = LiveNode(Settings(data_dir=data, admin_token=TOKEN, speed_test_bytes=1 << 16))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    (folder / "model.py").write_text(MODEL_FILE)
    result = CliRunner().invoke(main, ["compile", str(folder / "model.py"), "-o",
                                       str(folder / "out")])
    assert result.exit_code == 0, result.output
    return folder / "out"


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env or {}, catch_exceptions=False)


def test_compile_writes_a_bundle_of_plans_and_the_initial_model(bundle):
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["client_config"] == {"name": "tiny", "version": "2.0", "lr": 0.5,
                                     "batch_size": 4, "max_updates": 5}
    params = state.loads((bundle / "model.pb").read_bytes())
    assert [p.shape for p in params] == [(8, 6), (8,), (3, 8), (3,)]
    from gridfl import Plan

    assert Plan.from_bytes((bundle / "training_plan.onnx").read_bytes()).kind == "training"


def test_host_status_worker_retrieve_round_trip(node, bundle, tmp_path):
    r = run("host", node.url, bundle, "--admin-token", TOKEN)
    assert r.exit_code == 0 and "hosted tiny 2.0" in r.output, r.output

    r = run("status", node.url, "--admin-token", TOKEN)
    assert r.exit_code == 0 and "tiny" in r.output, r.output

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    np.savez(tmp_path / "local.npz", x=x, y=y)
    r = run("worker", node.ws_url, "tiny", "--version", "2.0", "--data", tmp_path / "local.npz")
    assert r.exit_code == 0, r.output
    assert "reported 2 cycle(s)" in r.output and "the node is done" in r.output

    r = run("status", node.url, "tiny", "2.0", "--json", env={"GRIDFL_ADMIN_TOKEN": TOKEN})
    status = json.loads(r.output)
    assert [c["reported"] for c in status["cycles"]] == [1, 1]
    assert [c["number"] for c in status["checkpoints"]] == [1, 2, 3]

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    r = run("retrieve", node.url, "tiny", "2.0", "-o", tmp_path / "latest.npz",
            "--admin-token-file", token_file)
    assert r.exit_code == 0, r.output
    r = run("retrieve", node.url, "tiny", "2.0", "--checkpoint", 1, "-o", tmp_path / "first.pb",
            "--admin-token", TOKEN)
    assert r.exit_code == 0, r.output
    first = state.loads((tmp_path / "first.pb").read_bytes())
    initial = state.loads((bundle / "model.pb").read_bytes())
    for a, b in zip(first, initial, strict=True):
        np.testing.assert_array_equal(a, b)
    with np.load(tmp_path / "latest.npz") as latest:
        trained = [latest[f"p{i}"] for i in range(4)]
    assert any(not np.allclose(a, b) for a, b in zip(initial, trained, strict=True))


def test_status_follow_prints_each_cycle_as_it_closes(node, bundle, tmp_path):
    """``status NAME --follow --json`` (a real process, as users run it) prints the status,
    then one JSON object per cycle as the node closes it, and exits once the process has
    finished; the worker starts only after the follower printed its status."""
    import subprocess
    import sys

    r = run("host", node.url, bundle, "--name", "followed", "--admin-token", TOKEN)
    assert r.exit_code == 0, r.output
    follower = subprocess.Popen(
        [sys.executable, "-m", "gridfl", "status", node.url, "followed", "2.0", "--follow",
         "--json"],
        env={**os.environ, "GRIDFL_ADMIN_TOKEN": TOKEN}, stdout=subprocess.PIPE, text=True,
    )
    try:
        first = []
        while not first or first[-1] != "}\n":  # the status, pretty-printed
            line = follower.stdout.readline()
            assert line, "the follower exited early"
            first.append(line)
        assert json.loads("".join(first))["cycles"][0]["status"] == "open"
        np.savez(tmp_path / "local.npz", x=np.ones((8, 6), np.float32), y=np.zeros(8, np.int64))
        r = run("worker", node.ws_url, "followed", "--version", "2.0", "--data",
                tmp_path / "local.npz")
        assert r.exit_code == 0 and "reported 2 cycle(s)" in r.output, r.output
        out, _ = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 0
    cycles = [json.loads(line) for line in out.splitlines()]
    assert [(c["sequence"], c["status"], c["reported"]) for c in cycles] == [
        (1, "completed", 1), (2, "completed", 1)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["status", "http://127.0.0.1:9"], "admin token is needed"),
        (["status", "http://127.0.0.1:9", "--admin-token", "x"], "GET /processes"),
        (["status", "ftp://nowhere", "--admin-token", "x"], "must start with http"),
        (["status", "NODE", "--follow", "--admin-token", TOKEN], "--follow needs the NAME"),
        (["demo", "--model", "resnet"], "Invalid value for '--model'"),
        (["demo", "--fraction", "0"], "Invalid value for '--fraction'"),
        (["demo", "--compression", "zip"], "Invalid value for '--compression'"),
        (["host", "NODE", "BUNDLE_PARENT", "--admin-token", TOKEN], "not a plan bundle"),
        (["retrieve", "NODE", "nope", "1.0", "-o", "x.pb", "--admin-token", TOKEN], "404"),
        (["host", "NODE", "BUNDLE", "--admin-token", "wrong"], "invalid admin token"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_nonzero(node, bundle, args, message, tmp_path):
    args = [
        {"NODE": node.url, "BUNDLE": bundle, "BUNDLE_PARENT": tmp_path}.get(a, a) for a in args
    ]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code != 0
    assert message in r.output, r.output
    assert "Traceback" not in r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)


def test_every_command_has_help():
    for name in ("serve", "demo", "compile", "host", "status", "retrieve", "worker"):
        r = run(name, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output and len(r.output) > 200, name


def test_status_shows_the_strategy_and_its_state(node):
    from tests.builders import diff_of, host_payload
    from tests.harness import Admin, HttpWorker, join, report

    sc = {"max_diffs": 1, "num_cycles": 2, "strategy": {"name": "fedadam", "eta": 0.01}}
    hosted = Admin(node.url, TOKEN).host(host_payload("adam-cli", server_config=sc))
    assert hosted.status_code == 201, hosted.text
    r = run("status", node.url, "adam-cli", "1.0", "--admin-token", TOKEN)
    assert "strategy: fedadam (eta=0.01, beta_1=0.9, beta_2=0.99, tau=0.001); state: step 0" in (
        r.output.replace("\n", " ")
    ), r.output
    w = HttpWorker(node.url)
    wid, cyc = join(w, "adam-cli")
    assert report(w, wid, cyc["request_key"], diff_of(0))[0] == 200
    w.close()
    r = run("status", node.url, "adam-cli", "1.0", "--admin-token", TOKEN)
    assert "state: step 1, m_norm" in r.output.replace("\n", " "), r.output


def test_worker_with_eval_data_evaluates_and_status_shows_it(node, bundle, tmp_path):
    """``gridfl worker --eval-data`` takes the evaluation cycles of a process hosted with
    server_config.evaluation; ``gridfl status`` prints each evaluation's weighted mean,
    here one worker's own metrics on its held-out data (numpy, from the checkpoint)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server_config": {"evaluation": {"every": 2}}}))
    r = run("host", node.url, bundle, "--admin-token", TOKEN, "--name", "tiny-eval",
            "--config", config)
    assert r.exit_code == 0, r.output
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    np.savez(tmp_path / "local.npz", x=x, y=y)
    np.savez(tmp_path / "held.npz", x=x[:13], y=y[:13])
    r = run("worker", node.ws_url, "tiny-eval", "--version", "2.0", "--data",
            tmp_path / "local.npz", "--eval-data", tmp_path / "held.npz")
    assert r.exit_code == 0, r.output
    # num_cycles 2, every 2: checkpoint 3 (after cycle 2) is the one evaluated
    assert "reported 2 cycle(s)" in r.output and "evaluated 1 checkpoint(s)" in r.output
    r = run("status", node.url, "tiny-eval", "2.0", "--admin-token", TOKEN)
    assert r.exit_code == 0, r.output
    w1, b1, w2, b2 = state.loads(
        run("retrieve", node.url, "tiny-eval", "2.0", "--checkpoint", 3, "-o",
            tmp_path / "c3.pb", "--admin-token", TOKEN) and (tmp_path / "c3.pb").read_bytes()
    )
    logits = np.maximum(x[:13] @ w1.T + b1, 0) @ w2.T + b2
    accuracy = float(np.mean(logits.argmax(1) == y[:13]))
    assert "evaluation of checkpoint 3: 1/1 workers, 13 samples;" in r.output
    assert f"accuracy {accuracy:.4g}" in r.output
def test_compile_with_proximal_mu_hosts_fedprox_and_the_worker_trains_it(node, tmp_path):
    (tmp_path / "model.py").write_text(MODEL_FILE.replace('"tiny"', '"tinyprox"'))
    r = run("compile", tmp_path / "model.py", "-o", tmp_path / "out", "--proximal-mu", 0.2)
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "out" / "bundle.json").read_text())
    assert meta["server_config"]["strategy"] == {"name": "fedprox", "proximal_mu": 0.2}
    from gridfl import Plan

    plan = Plan.from_bytes((tmp_path / "out" / "training_plan.onnx").read_bytes())
    assert sum(s.role == "global_param" for s in plan.inputs) == 4
    r = run("host", node.url, tmp_path / "out", "--admin-token", TOKEN)
    assert r.exit_code == 0, r.output
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    np.savez(tmp_path / "local.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    r = run("worker", node.ws_url, "tinyprox", "--version", "2.0", "--data",
            tmp_path / "local.npz")
    assert r.exit_code == 0 and "reported 2 cycle(s)" in r.output, r.output
    r = run("status", node.url, "tinyprox", "2.0", "--admin-token", TOKEN)
    assert "strategy: fedprox (proximal_mu=0.2)" in r.output, r.output


def test_compile_refuses_a_negative_proximal_mu(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_FILE)
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "model.py"), "-o",
                                  str(tmp_path / "out"), "--proximal-mu", "-0.1"])
    assert r.exit_code == 2 and "--proximal-mu" in r.output and not (tmp_path / "out").exists()


def test_compile_tfjs_writes_both_variants_and_host_serves_them(node, tmp_path):
    """``compile --tfjs``: the bundle names each plan's onnx and tfjs files; hosting it
    serves syft.js the tfjs bytes and gridfl workers the onnx plan, which still trains."""
    from gridfl import Plan
    from tests.harness import HttpWorker, join

    (tmp_path / "model.py").write_text(MODEL_FILE.replace('"tiny"', '"tinytfjs"'))
    r = run("compile", tmp_path / "model.py", "-o", tmp_path / "out", "--tfjs")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["plans"] == {
        "training_plan": {"onnx": "training_plan.onnx", "tfjs": "training_plan.tfjs.pb"},
        "evaluation_plan": {"onnx": "evaluation_plan.onnx", "tfjs": "evaluation_plan.tfjs.pb"},
    }
    tfjs = {n: (out / f"{n}.tfjs.pb").read_bytes() for n in ("training_plan", "evaluation_plan")}
    for name, data in tfjs.items():  # syft-proto Plans of tfjs actions, named as hosted
        assert data.endswith(b"J\x04tfjs") and name.encode() in data and b"tf.matMul" in data
    assert b"tf.relu" in tfjs["training_plan"]
    # a second worker slot: the worker below trains while this test's fetcher holds one
    (tmp_path / "slots.json").write_text(json.dumps({"server_config": {"max_workers": 2}}))
    r = run("host", node.url, out, "--config", tmp_path / "slots.json", "--admin-token", TOKEN)
    assert r.exit_code == 0, r.output
    w = HttpWorker(node.url)
    try:
        wid, cyc = join(w, name="tinytfjs", version="2.0")
        key, pid = cyc["request_key"], cyc["plans"]["training_plan"]
        served = {as_: w.get("get-plan", worker_id=wid, request_key=key, plan_id=pid,
                             receive_operations_as=as_) for as_ in ("tfjs", "onnx")}
    finally:
        w.close()
    assert served["tfjs"].status_code == 200 and served["tfjs"].content == tfjs["training_plan"]
    assert Plan.from_bytes(served["onnx"].content).kind == "training"
    np.savez(tmp_path / "local.npz", x=np.ones((8, 6), np.float32), y=np.zeros(8, np.int64))
    r = run("worker", node.ws_url, "tinytfjs", "--version", "2.0", "--data",
            tmp_path / "local.npz")
    assert r.exit_code == 0 and "reported" in r.output, r.output


def test_compile_tfjs_names_the_op_syftjs_cannot_run(tmp_path):
    (tmp_path / "model.py").write_text(MODEL_FILE.replace("nn.ReLU()", "nn.ELU()"))
    r = CliRunner().invoke(main, ["compile", str(tmp_path / "model.py"), "-o",
                                  str(tmp_path / "out"), "--tfjs"])
    assert r.exit_code == 1 and "op aten::elu has no tfjs translation" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_host_refuses_a_bundle_with_malformed_plans(node, bundle, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    meta = json.loads((broken / "bundle.json").read_text())
    meta["plans"]["training_plan"] = ["training_plan.onnx"]
    (broken / "bundle.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(main, ["host", node.url, str(broken), "--admin-token", TOKEN])
    assert r.exit_code == 1 and "'plans' must map each plan name" in r.output, r.output


def _ed25519_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_workers_with_signed_secagg_keys_complete_a_secure_cycle(node, bundle, tmp_path):
    """Three ``gridfl worker`` processes given an identity key, its credential and the
    authority's public key complete a secure-aggregation cycle on a process that
    authenticates workers (which makes signed keys mandatory)."""
    import subprocess
    import sys

    import jwt
    from cryptography.hazmat.primitives import serialization

    from gridfl.secagg.identity import Identity, issue_credential
    from tests.builders import rsa_key_pair

    private, public = rsa_key_pair()
    authority = serialization.load_pem_private_key(private.encode(), password=None)
    (tmp_path / "authority.pem").write_text(public)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"server_config": {
        "max_workers": 3, "max_diffs": 3, "num_cycles": 1, "authentication": {"pub_key": public},
        "secure_aggregation": {"threshold": 2, "clipping_range": 1.0, "stage_timeout": 20.0},
    }}))
    r = run("host", node.url, bundle, "--admin-token", TOKEN, "--name", "tiny-secagg",
            "--config", config)
    assert r.exit_code == 0, r.output
    rng = np.random.default_rng(2)
    workers = []
    for i in range(3):
        x = rng.normal(size=(40, 6)).astype(np.float32)
        np.savez(tmp_path / f"d{i}.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
        pem = _ed25519_pem()
        (tmp_path / f"id{i}.pem").write_bytes(pem)
        raw = Identity.from_pem(pem, "x").signing_key
        (tmp_path / f"id{i}.jwt").write_text(issue_credential(authority, raw, sub=f"user-{i}"))
        workers.append(subprocess.Popen(
            [sys.executable, "-c", "from gridfl.cli import main; main()", "worker", node.ws_url,
             "tiny-secagg", "--version", "2.0", "--data", tmp_path / f"d{i}.npz",
             "--auth-token", jwt.encode({"sub": f"user-{i}"}, private, "RS256"),
             "--secagg-key", tmp_path / f"id{i}.pem",
             "--secagg-credential", tmp_path / f"id{i}.jwt",
             "--secagg-authority", tmp_path / "authority.pem"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = [w.communicate(timeout=180)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], outputs
    assert all("reported 1 cycle(s)" in o for o in outputs), outputs
    r = run("status", node.url, "tiny-secagg", "2.0", "--json", "--admin-token", TOKEN)
    cycles = json.loads(r.output)["cycles"]
    assert [(c["status"], c["reported"]) for c in cycles] == [("completed", 3)], cycles


@pytest.mark.parametrize(("files", "message"), [
    ({"--secagg-key": "ed25519"}, "--secagg-key and --secagg-credential go together"),
    ({"--secagg-key": "rsa", "--secagg-credential": "jwt"}, "must be Ed25519, not"),
    ({"--secagg-key": "junk", "--secagg-credential": "jwt"}, "not an unencrypted PEM"),
    ({"--secagg-key": "ed25519", "--secagg-credential": "empty"}, "credential is empty"),
])
def test_bad_secagg_identity_files_are_one_line_errors(files, message, tmp_path):
    from tests.builders import rsa_key_pair

    contents = {"ed25519": _ed25519_pem().decode(), "rsa": rsa_key_pair()[0], "junk": "hello",
                "jwt": "a.b.c", "empty": "\n"}
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 6), np.float32), y=np.zeros(4, np.int64))
    args = []
    for option, kind in files.items():
        (tmp_path / option.strip("-")).write_text(contents[kind])
        args += [option, tmp_path / option.strip("-")]
    r = CliRunner().invoke(main, [str(a) for a in ["worker", "ws://127.0.0.1:9", "tiny",
                                                   "--data", tmp_path / "d.npz", *args]])
    assert r.exit_code == 1 and message in r.output, r.output
    assert "Traceback" not in r.output
