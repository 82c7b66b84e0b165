"""Fixtures of the syft.js interop tests: the published npm client @openmined/syft.js 0.1.4
(run by ``syftjs_worker.js`` in Node.js) against a real gridfl node on loopback.

Set-up: ``npm ci`` in tests/interop (``make test`` and ``.ci/run`` do it). The node is one
LiveNode per test module; every test hosts its own FL process on it. The helpers behind
these fixtures are in syftjs_runner.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._vectors import VECTORS
from tests.harness import LiveNode, make_settings

from .compiled_models import CompiledCnn, compile_two_nn
from .syftjs_runner import HERE, Mnist, SyftJs, check_node_setup, plan_compile


@pytest.fixture(scope="session")
def node_bin() -> str:
    return check_node_setup()


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not (VECTORS / "mnist_plan.pb").is_file():
        pytest.fail(f"interop vectors not found in {VECTORS}")
    return VECTORS


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    # start compiling the MNIST onnx plan (~10 s of torch.onnx export) as soon as interop
    # tests are collected, so that it runs in parallel with the tests before it is needed
    if config.option.collectonly or not (VECTORS / "mnist_plan.pb").is_file():
        return
    if any(Path(str(item.path)).is_relative_to(HERE) for item in items):
        config.add_cleanup(plan_compile().stop)


@pytest.fixture(scope="session")
def mnist(vectors, tmp_path_factory):
    assets = Mnist(vectors, tmp_path_factory.mktemp("mnist"))
    yield assets
    assets._compile.stop()


@pytest.fixture(scope="module")
def grid(node_bin, tmp_path_factory):
    """A live node (SQLite file); its uvicorn settings are ``gridfl serve``'s (a 30 s
    keep-alive: syft.js in Node.js reuses an idle connection after a long training step
    and does not retry a report)."""
    pytest.importorskip("starlette")
    # syft.js downloads the whole speed-test body; PyGrid's 64 MiB would only cost time
    node = LiveNode(make_settings(None, tmp_path_factory.mktemp("grid"), speed_test_bytes=4 << 20))
    yield node
    node.stop()


@pytest.fixture(scope="session")
def syftjs(node_bin, mnist) -> SyftJs:
    return SyftJs(node_bin, mnist)


@pytest.fixture(params=["ws", "http"])
def transport(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def two_nn(mnist):
    """McMahan's 2NN compiled with its tfjs variant: (initial params, Plan)."""
    pytest.importorskip("torch")
    return compile_two_nn(mnist)


@pytest.fixture(scope="session")
def cnn(mnist):
    """McMahan's CNN compiled with its tfjs variant, on 8 MNIST images."""
    pytest.importorskip("torch")
    return CompiledCnn(mnist)
