"""The package root is lazy: ``import gridfl`` loads no SDK, numpy or onnxruntime, and
the public names still import from it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


def test_import_gridfl_loads_no_sdk_numpy_or_onnxruntime():
    loaded = _run(
        "import sys, gridfl; print(sorted(m for m in ('numpy', 'onnxruntime', 'httpx', "
        "'websockets', 'gridfl.client', 'gridfl.plan', 'gridfl.model') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_public_names_import_from_the_root_and_stay_the_same_objects():
    import gridfl
    from gridfl import AsyncJob, AsyncSyft, Job, Plan, StateError, Syft, SyftModel, state
    from gridfl.client import Syft as ClientSyft
    from gridfl.model import SyftModel as ModelSyftModel
    from gridfl.plan import Plan as PlanPlan

    assert Syft is ClientSyft is gridfl.Syft
    assert SyftModel is ModelSyftModel and Plan is PlanPlan
    assert {AsyncJob.__name__, AsyncSyft.__name__, Job.__name__} == {"AsyncJob", "AsyncSyft",
                                                                     "Job"}
    assert issubclass(StateError, gridfl.GridflError)
    assert state.__name__ == "gridfl.state"
    assert set(gridfl.__all__) <= set(dir(gridfl))
    assert "Plan" in dir(gridfl) and gridfl.__version__


def test_star_import_gives_every_public_name():
    names = _run("ns = {}; exec('from gridfl import *', ns); "
                 "import gridfl; print(all(n in ns for n in gridfl.__all__))")
    assert names == "True"


def test_unknown_attribute_is_an_attribute_error():
    import gridfl

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gridfl.Nope  # noqa: B018
    assert not hasattr(gridfl, "also_missing")


def test_validating_a_process_for_a_simulation_loads_no_http_client_or_secagg():
    """What a simulation does before its first round: host_payload and the node's
    validate, which need neither httpx (the host SDK's client) nor gridfl.secagg
    (cryptography) for a process without secure aggregation."""
    loaded = _run(
        "import sys, numpy as np\n"
        "from gridfl.host import host_payload\n"
        "from gridfl.server.hosting import secure_aggregation_rows\n"
        "assert secure_aggregation_rows({'secure_aggregation': None}, {}) == []\n"
        "host_payload(model=[np.zeros(2, np.float32)], plans={'p': b'onnx'},\n"
        "             client_config={'name': 'm', 'version': '1'})\n"
        "print(sorted(m for m in ('httpx', 'gridfl.secagg', 'cryptography') if m in sys.modules))"
    )
    assert loaded == "[]"
