"""A report's body with its base64 ``diff`` (or a secure-aggregation message's masked
``vector``) decoded straight from the bytes (:func:`gridfl.server.bodies.parse_worker_json`):
for every body, valid or not, the result is what parsing the whole body with the JSON
decoder gives (that value as the bytes its base64 text decodes to), and an invalid body
gets the same error."""

from __future__ import annotations

import base64
import os

import pytest

from gridfl import _messages
from gridfl._exceptions import InvalidRequestError
from gridfl.server.bodies import parse_worker_json

BIG = base64.b64encode(os.urandom(100_000)).decode()  # above the shortcut's threshold

BODIES = {
    "report": '{"worker_id": "w", "request_key": "k", "diff": "%s"}',
    "spaces and more fields": '{"diff" : "%s", "num_samples": 3, "metrics": {"a": 1}}',
    "websocket frame": '{"type": "model-centric/report", "data": {"worker_id": "w", "diff": "%s"}}',
    "key inside another key": '{"a\\\\"diff": "%s", "diff": ""}',
    "key inside another key, then a diff": '{"a\\\\"diff": "%s", "diff": "QUJD"}',
    "duplicate diff, the last wins": '{"diff": "%s", "diff": "QUJD"}',
    "diff key in metrics": '{"metrics": {"diff": "%s"}, "diff": "QUJD"}',
    "escape in the string": '{"diff": "%s\\\\u0041"}',
    "not base64": '{"diff": "%s!"}',
    "trailing comma": '{"diff": "%s", }',
    "truncated": '{"diff": "%s"',
    "array": '["diff", "%s"]',
    "non-ASCII": '{"diff": "%sé"}',
    "NaN elsewhere": '{"diff": "%s", "x": NaN}',
    "masked input": '{"worker_id": "w", "stage": "masked_input", "message": {"vector": "%s"}}',
    "masked input frame": '{"type": "t", "data": {"message": {"vector": "%s"}}}',
    "vector outside a message": '{"vector": "%s"}',
    "vector deeper in a message": '{"message": {"x": {"vector": "%s"}}}',
    "diff inside a message": '{"message": {"diff": "%s"}}',
    "vector, not base64": '{"message": {"vector": "%s!"}}',
    # the payload's closing quote is looked for in the body's last 4 KB first
    "a long value after the diff": '{"diff": "%s", "metrics": {"note": "' + "x" * 5000 + '"}}',
    "a short diff before a long value": '{"diff": "QUJD", "worker_id": "%s"}',
    "quotes after the diff": '{"diff": "%s", "a": "QUJD", "b": "\\"QUJD"}',
}


def _whole(body: str | bytes):
    """The reference: the JSON decoder on the whole body."""
    try:
        return _messages.parse_json(body, "the body", max_values=_messages.MAX_MESSAGE_VALUES)
    except InvalidRequestError as e:
        return ("refused", str(e))


def _fast(body: str | bytes):
    """The shortcut, its decoded diff (if it took it) written back as base64 text."""
    try:
        value = parse_worker_json(body)
    except InvalidRequestError as e:
        return ("refused", str(e))
    for outer in (value, value.get("data") if isinstance(value, dict) else None):
        message = outer.get("message") if isinstance(outer, dict) else None
        for holder, key in ((outer, "diff"), (message, "vector")):
            if isinstance(holder, dict) and isinstance(holder.get(key), bytes):
                holder[key] = base64.b64encode(holder[key]).decode()
    return value


@pytest.mark.parametrize("as_bytes", [True, False], ids=["http-bytes", "ws-text"])
@pytest.mark.parametrize("template", list(BODIES.values()), ids=list(BODIES))
def test_same_as_parsing_the_whole_body(template, as_bytes):
    body = template % BIG
    data = body.encode() if as_bytes else body
    assert _fast(data) == _whole(data)


def test_the_diff_comes_decoded_and_parse_report_takes_it():
    raw = os.urandom(80_000)
    body = b'{"worker_id": "w", "request_key": "k", "diff": "%s"}' % base64.b64encode(raw)
    data = parse_worker_json(body)
    assert isinstance(data["diff"], bytes)  # decoded from the body, not copied to a str
    assert _messages.parse_report(data).diff == raw


def test_the_masked_vector_comes_decoded_and_the_node_takes_it():
    import numpy as np

    from gridfl.secagg.messages import MaskedInput

    values = np.arange(20_000, dtype=np.uint64) * 12345
    wire = MaskedInput(values, 40).to_json()
    body = b'{"stage": "masked_input", "message": {"vector": "%s"}}' % wire["vector"].encode()
    data = parse_worker_json(body)
    assert isinstance(data["message"]["vector"], bytes)
    assert MaskedInput.from_json(data["message"], values.size, 40).vector.tolist() == (
        values.tolist()
    )

