"""The syft.js side of the interop tests: the Node.js set-up check, the MNIST assets (and
the onnx plan compiled in a child process), and runs of ``syftjs_worker.js``. The fixtures
wrapping them are in conftest.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from gridfl import state
from tests._vectors import VECTORS
from tests.harness import LiveNode

HERE = Path(__file__).resolve().parent
WORKER_JS = HERE / "syftjs_worker.js"
NODE_TIMEOUT = 60  # seconds one syft.js run may take


# --------------------------------------------------------------------------- environment
def check_node_setup() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "Node.js is not installed: the syft.js interop tests need `node` (>= 18) on PATH",
            pytrace=False,
        )
    pkg = HERE / "node_modules" / "@openmined" / "syft.js" / "package.json"
    if not pkg.is_file():
        pytest.fail(
            f"tests/interop/node_modules is missing: run `npm ci` in {HERE} "
            "(installs @openmined/syft.js 0.1.4 from the committed package-lock.json)",
            pytrace=False,
        )
    version = json.loads(pkg.read_text())["version"]
    if version != "0.1.4":
        pytest.fail(
            f"tests/interop/node_modules has syft.js {version}, not 0.1.4: run `npm ci` in {HERE}",
            pytrace=False,
        )
    return node


# --------------------------------------------------------------------------- MNIST assets
class _PlanCompile:
    """``mnist_plan.py`` compiling the onnx variant in a child process (it takes ~10 s of
    torch.onnx export), started as soon as interop tests are collected so that it runs in
    parallel with the tests (or, in a full run, the test directories) before it is needed."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gridfl-interop-"))
        self.out = self.dir / "mnist_training_plan.onnx"
        self.log = open(self.dir / "compile.log", "w+")  # noqa: SIM115 - closed in result/stop
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "mnist_plan.py"), str(VECTORS), str(self.out)],
            cwd=HERE.parents[1],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._data: bytes | None = None

    def result(self) -> bytes:
        if self._data is None:
            try:
                rc = self.proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                self.stop()
                pytest.fail("compiling the MNIST onnx plan took more than 600 s")
            if rc != 0 or not self.out.is_file():
                self.log.seek(0)
                pytest.fail(
                    f"compiling the MNIST onnx plan (tests/interop/mnist_plan.py) failed "
                    f"with exit code {rc}:\n{self.log.read()[-6000:]}"
                )
            self._data = self.out.read_bytes()
        return self._data

    def stop(self) -> None:
        """Kill the compile if it still runs and remove its files (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_compile: _PlanCompile | None = None


def plan_compile() -> _PlanCompile:
    """The one MNIST plan compile of this session (started on first call)."""
    global _compile
    if _compile is None:
        _compile = _PlanCompile()
    return _compile


def write_batch(prefix: Path, X: np.ndarray, y: np.ndarray) -> str:
    """A batch as the raw little-endian float32 files syftjs_worker.js reads; the prefix."""
    np.ascontiguousarray(X, dtype="<f4").tofile(f"{prefix}.X.f32")
    np.ascontiguousarray(y, dtype="<f4").tofile(f"{prefix}.y.f32")
    Path(f"{prefix}.json").write_text(json.dumps({"X": list(X.shape), "y": list(y.shape)}))
    return str(prefix)


class Mnist:
    """The syft.js 0.1.4 MNIST conformance vectors and the onnx plan compiled from the
    same training function (tests/vectors/README.md, mnist_plan.py)."""

    def __init__(self, vectors: Path, tmp: Path):
        self.model_bytes = (vectors / "mnist_model_params.pb").read_bytes()
        self.params = state.loads(self.model_bytes)
        self.updated = state.loads((vectors / "mnist_upd_model_params.pb").read_bytes())
        self.tfjs_plan = (vectors / "mnist_plan.pb").read_bytes()
        self.X, self.y = state.loads((vectors / "mnist_batch_data.pb").read_bytes())
        self.scalars = json.loads((vectors / "scalars.json").read_text())
        self.batch_size = int(self.scalars["MNIST_BATCH_SIZE"])
        self.lr = self.scalars["MNIST_LR"]
        self.batch_prefix = write_batch(tmp / "mnist_batch", self.X, self.y)
        self._compile = plan_compile()

    @property
    def onnx_plan(self) -> bytes:
        """gridfl's onnx variant of the training plan (waits for the compile)."""
        return self._compile.result()

    def host_on(
        self,
        grid: LiveNode,
        server_config: dict | None = None,
        *,
        name: str | None = None,
        variants: tuple[str, ...] = ("tfjs", "onnx"),
    ) -> str:
        """Host the MNIST process on ``grid`` (version "1.0", plan ``training_plan`` with the
        tfjs bytes of mnist_plan.pb and the compiled onnx plan); return its name."""
        blobs = {"tfjs": lambda: self.tfjs_plan, "onnx": lambda: self.onnx_plan}
        return grid.host(
            name or f"mnist-{uuid.uuid4().hex[:8]}",
            server_config={"cycle_length": 600, "num_cycles": 0, "max_diffs": 1,
                           **(server_config or {})},
            client_config={"batch_size": self.batch_size, "lr": self.lr, "max_updates": 1},
            params=self.model_bytes,
            plans={"training_plan": {v: blobs[v]() for v in variants}},
        )


# --------------------------------------------------------------------------- syft.js runs
class SyftJsRun:
    """One finished ``node syftjs_worker.js`` run: its JSON events and raw output."""

    def __init__(self, cfg: dict, proc: subprocess.CompletedProcess):
        self.cfg = cfg
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.events: list[dict] = []
        for line in proc.stdout.splitlines():
            if line.startswith('{"event"'):
                self.events.append(json.loads(line))

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]

    def one(self, event: str) -> dict:
        found = [e for e in self.events if e["event"] == event]
        assert len(found) == 1, f"expected one {event!r} event, got {self.names()}\n{self}"
        return found[0]

    def log(self) -> str:
        """syft.js's verbose log lines (everything that is not an event)."""
        return "\n".join(
            line for line in self.stdout.splitlines() if not line.startswith('{"event"')
        )

    def __str__(self) -> str:
        tail = "\n".join(self.stdout.splitlines()[-40:])
        return (
            f"events: {self.events}\n--- stdout (tail) ---\n{tail}\n"
            f"--- stderr ---\n{self.stderr[-4000:]}"
        )

    __repr__ = __str__


class SyftJs:
    """Runs syft.js 0.1.4 workers: ``run(url, model, ...)`` blocks, ``start(...)`` doesn't."""

    def __init__(self, node_bin: str, mnist: Mnist):
        self.node_bin = node_bin
        self.mnist = mnist

    def _cmd(self, url, model, *, version="1.0", token=None, train=True, params_out=None,
             batch=None):
        cfg = {
            "url": url,
            "model": model,
            "version": version,
            "authToken": token,
            "batch": batch or self.mnist.batch_prefix,  # a write_batch prefix
            "train": train,
            "paramsOut": params_out,  # a file for the updated params (raw float32)
        }
        return cfg, [self.node_bin, str(WORKER_JS), json.dumps(cfg)]

    def start(self, url: str, model: str, **kw):
        """Start a run in the background; ``.result()`` of the returned handle waits."""
        cfg, cmd = self._cmd(url, model, **kw)
        proc = subprocess.Popen(
            cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return _Pending(cfg, proc)

    def run(self, url: str, model: str, **kw) -> SyftJsRun:
        return self.start(url, model, **kw).result()


class _Pending:
    def __init__(self, cfg: dict, proc: subprocess.Popen):
        self.cfg, self.proc = cfg, proc

    def result(self) -> SyftJsRun:
        try:
            out, err = self.proc.communicate(timeout=NODE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"syft.js worker timed out\n{out[-4000:]}\n{err[-4000:]}")
        return SyftJsRun(
            self.cfg, subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        )
