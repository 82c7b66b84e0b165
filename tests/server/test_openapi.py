"""API fuzzing: schemathesis generates requests from the node's OpenAPI description
(``gridfl.server.openapi``, served at ``GET /openapi.json``) and sends them to a live node
(uvicorn on loopback) with a fixed budget, schema-valid ("positive") and schema-violating
("negative") ones. Every response must be a non-5xx whose status code, content type, headers
and body match the description. The node holds a hosted process with an accepted worker.

(schemathesis' own pytest plugin does not run under pytest 9 yet, so each operation's
Hypothesis strategy is driven here directly: ``APIOperation.as_strategy``.)
"""

from __future__ import annotations

import hypothesis
import pytest

from gridfl.server.openapi import spec
from tests.builders import ADMIN, host_payload
from tests.harness import LiveNode, make_settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode, checks  # noqa: E402

#: generated requests per operation and mode (~21 operations x 2 modes: well under a minute)
MAX_EXAMPLES = 20

SCHEMA = schemathesis.openapi.from_dict(spec())
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]

#: examples run, per (operation, mode); summed up in docs/reliability.md
COUNTS: dict[tuple[str, str], int] = {}


@pytest.fixture(scope="module")
def fuzzed_node(tmp_path_factory):
    import httpx

    tmp = tmp_path_factory.mktemp("openapi")
    srv = LiveNode(
        make_settings(
            f"sqlite:///{tmp / 'grid.db'}", tmp, max_body_bytes=1 << 20, speed_test_bytes=1024
        )
    )
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post(
            "/gridfl/v1/processes",
            json=host_payload(server_config={"cycle_length": 3600, "max_diffs": 1000}),
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert r.status_code == 201, r.text
        wid = http.post("/model-centric/authenticate", json={"model_name": "mnist"}).json()
        r = http.post(
            "/model-centric/cycle-request", json={"worker_id": wid["worker_id"], "model": "mnist"}
        )
        assert r.json()["status"] == "accepted", r.text
        assert http.get("/openapi.json").json() == spec()
    yield srv
    srv.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_api_fuzz(fuzzed_node, label, mode):
    operation = OPERATIONS[label]
    COUNTS[label, mode.value] = 0

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(operation.as_strategy(generation_mode=mode))
    def run(case):
        COUNTS[label, mode.value] += 1
        case.call_and_validate(
            base_url=fuzzed_node.url,
            headers={"Authorization": f"Bearer {ADMIN}"},
            checks=CHECKS,
            timeout=30,
        )

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # nothing in this operation can violate the schema (e.g. no parameters): fine for
        # the negative mode only
        assert mode is GenerationMode.NEGATIVE and COUNTS[label, mode.value] == 0
