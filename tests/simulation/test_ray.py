"""The ray backend (a local Ray with 2 CPUs) gives the local pool's results for a seed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gridfl.simulation import SimulationOptions, simulate
from tests.simulation.shared import without_timing

try:
    import ray
except ImportError:  # CI installs the extra: there the test must run, not skip
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip("the ray extra is not installed: pip install 'gridfl[ray]'",
                allow_module_level=True)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_backend_equals_local_pool(process, data, test_data, tmp_path, local_ray):
    results = {}
    for backend in ("local", "ray"):
        opts = SimulationOptions(num_clients=20, partitioner="shards", seed=4, workers=2,
                                 federated_every=1, held_out=0.25, backend=backend,
                                 out_dir=tmp_path / backend)
        run = simulate(**process, data=data, test_data=test_data, options=opts)
        results[backend] = (run.final_params,
                            json.loads((tmp_path / backend / "results.json").read_text()))
    (local_params, local_json), (ray_params, ray_json) = results["local"], results["ray"]
    assert local_json["settings"]["backend"] == "local" and ray_json["settings"]["backend"] == "ray"
    del local_json["settings"]["backend"], ray_json["settings"]["backend"]
    assert without_timing(local_json) == without_timing(ray_json)
    for a, b in zip(local_params, ray_params, strict=True):
        np.testing.assert_array_equal(a, b)
