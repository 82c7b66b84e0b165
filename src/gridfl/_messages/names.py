"""Message types, plan variants and the error texts clients match on (PyGrid's wording)."""

from __future__ import annotations

AUTHENTICATE = "model-centric/authenticate"
CYCLE_REQUEST = "model-centric/cycle-request"
REPORT = "model-centric/report"
HOST_TRAINING = "model-centric/host-training"
SOCKET_PING = "socket-ping"
#: gridfl extension: one stage of secure aggregation (docs/secure-aggregation.md)
SECURE_AGGREGATION = "model-centric/secure-aggregation"
#: downloads: HTTP ``GET /`` + type; WebSocket requests only with :data:`BINARY_SUBPROTOCOL`
GET_MODEL = "model-centric/get-model"
GET_PLAN = "model-centric/get-plan"
GET_PROTOCOL = "model-centric/get-protocol"
#: gridfl extension: the metrics of an evaluation cycle (no diff; docs/worker.md)
EVALUATION_REPORT = "model-centric/evaluation-report"
WS_TYPES = frozenset(
    {AUTHENTICATE, CYCLE_REQUEST, REPORT, SOCKET_PING, SECURE_AGGREGATION, EVALUATION_REPORT}
)
#: the capability a worker names in its cycle request (``capabilities``) to be placed in
#: evaluation cycles, and the ``kind`` of such a cycle in the accepted reply; syft.js
#: never sends it, so it only ever receives training cycles
EVALUATION = "evaluation"

#: plan variants ``get-plan`` serves (``receive_operations_as``)
PLAN_VARIANTS = ("onnx", "tfjs", "torchscript", "list")

# --- error texts clients match on (PyGrid's wording) --------------------------------------
MSG_AUTH_REQUIRED = "Authentication is required, please pass an 'auth_token'."
MSG_AUTH_INVALID = "The 'auth_token' you sent is invalid."
MSG_AUTH_THIRD_PARTY = "The 'auth_token' you sent did not pass 3rd party validation."
MSG_INVALID_REQUEST_KEY = "Invalid request key!"
MSG_MODEL_NOT_FOUND = "Model ID not found!"
MSG_PLAN_NOT_FOUND = "Plan ID not found!"
MSG_PROTOCOL_NOT_FOUND = "Protocol ID not found!"
MSG_WORKER_NOT_FOUND = "Worker ID not found!"
