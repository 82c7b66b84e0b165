"""Parse cost of hostile diffs (issue 13, class 4): a diff whose structure departs from the
model is refused in about the time the model's real diff of the same size takes to read,
whatever the structure (many tensors, placeholders, tags, unknown fields at any level,
groups, split segments, shape dims, unpacked values, huge dims), and a live node stays
fast and gives its memory back when four such 60 MiB reports arrive at once.

Times are measured side by side in one run (interleaved, min of several repetitions),
and compared as ratios; the property test counts profiler events instead of time, so it
is exact on a noisy machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import time
from math import inf

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from benchmarks.hostile_state import HOSTILE, foreign_bytes, model_of_size, normal_diff
from gridfl import StateError
from gridfl import _protobuf as pw
from gridfl.state import FIELDS_BASE, FIELDS_PER_TENSOR, MAX_TENSORS, dumps, loads
from tests.harness import in_threads

#: hostile / normal parse time, goal; measured, on this 2-core box, at most ~1.2
RATIO_BOUND = 3.0
REPS = 15


def _refuse(data: bytes, expect) -> str:
    with pytest.raises(StateError) as e:
        loads(data, expect=expect)
    return str(e.value)


def _best(fns: dict, reps: int = REPS) -> dict[str, float]:
    """Min wall time of each function over ``reps`` interleaved rounds (order alternating)."""
    best = dict.fromkeys(fns, inf)
    items = list(fns.items())
    for r in range(reps):
        for name, fn in items if r % 2 == 0 else items[::-1]:
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _try_loads(data, expect) -> None:
    with contextlib.suppress(StateError):
        loads(data, expect=expect)


# --------------------------------------------------------------------------- refusals
def _expected_message(name: str, model, normal: bytes) -> str:
    """The refusal each hostile diff must get (worked out from how it is built)."""
    n = len(model)
    rows = model[4][0][0]  # model_of_size: tensor 6 is (10, rows), the last 2-d one
    budget = FIELDS_BASE + FIELDS_PER_TENSOR * n
    fields = f"more than {budget:,} fields (the limit for a State of {n} tensors)"
    return {
        "empty tensors": "State tensor 0 is float32[0] (TensorData at byte 10); "
        "expected float32[32, 1, 5, 5]",
        "one tensor too many": f"State has more than {n} tensors (State tensor {n} at byte "
        f"{len(normal)}); expected {n}",
        "placeholders": f"State has more than {n} placeholders",
        # 2 bytes each: the (n+1)th starts at byte 2n
        "empty placeholders": f"State has more than {n} placeholders (byte {2 * n}); expected {n}",
        "tags": fields,
        "unknown fields, top level": fields + f" at byte {2 * budget}",
        "unknown fields, every wire type": fields,
        "unknown fields in StateTensor": fields,
        "unknown fields in Parameter": fields,
        "unknown fields in TorchTensor": fields,
        "unknown fields in TensorData": fields,
        "unknown fields in Size": fields,
        "one wide group": fields,
        "nested groups": fields,
        "groups too deep": "groups nested deeper than 64 levels at byte 64",
        "packed dims": "State tensor 0: shape has more than 32 dimensions",
        "unpacked dims": "State tensor 0: shape has more than 32 dimensions",
        "repeated shapes": fields,
        "huge dims": "State tensor 0 is float32[2147483647, 2147483647, 2147483647]",
        "zero and huge dims": "State tensor 0 is float32[0, 2147483647, 2147483647, 2147483647, "
        "2147483647]",
        "unpacked contents": fields,
        "split torch_tensor": fields,
        "split contents_data": fields,
        "repeated dtype": fields,
        "huge dtype": "State tensor 0: unsupported dtype 'float32float32",
        "real diff, one wrong shape": f"State tensor 6 is float32[{rows}, 10]",
        "real diff, wrong dtype": f"State tensor 6 is float16[10, {rows}]",
        "contents one value short": "State tensor 0: shape (32, 1, 5, 5) needs 800 elements but "
        "the contents hold 799",
    }[name]


@pytest.fixture(scope="module", params=[256 * 1024, 4 * 1024 * 1024], ids=["256KiB", "4MiB"])
def sized(request):
    """A model whose real diff is about the given size, that diff as gridfl writes it, and
    as another client does (read by walking its fields, the parse hostile input takes)."""
    model = model_of_size(request.param)
    arrays = normal_diff(model)
    return model, dumps(arrays), foreign_bytes(arrays)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_diff_is_refused_as_fast_as_the_real_one_is_read(sized, name):
    model, normal, foreign = sized
    hostile = HOSTILE[name](model, len(normal))
    assert len(hostile) >= len(normal) or name.startswith(("real", "contents"))
    assert _expected_message(name, model, normal) in _refuse(hostile, model)
    # the real diff decodes to the model's tensors
    got = loads(foreign, expect=model)
    assert [(a.shape, a.dtype) for a in got] == model
    best = _best({"normal": lambda: loads(foreign, expect=model),
                  "hostile": lambda: _try_loads(hostile, model)})  # fmt: skip
    ratio = best["hostile"] / best["normal"]
    assert ratio <= RATIO_BOUND, (
        f"{name}: {best['hostile'] * 1e3:.3f} ms to refuse {len(hostile):,} bytes, "
        f"{best['normal'] * 1e3:.3f} ms to read the real {len(normal):,} (x{ratio:.2f})"
    )


def test_the_reported_examples_against_a_two_tensor_model():
    """The outside check's inputs: 228k empty tensors (5 MB), 6M placeholders (12 MB)."""
    model = [((4, 3), np.dtype(np.float32)), ((3,), np.dtype(np.float32))]
    tensors = HOSTILE["empty tensors"](model, 5_000_000)  # 25 bytes each: 200,000
    placeholders = pw.len_field(1, b"") * 6_000_000
    assert len(placeholders) == 12_000_000
    normal = foreign_bytes(normal_diff(model))
    msg = _refuse(tensors, model)
    assert msg == "State tensor 0 is float32[0] (TensorData at byte 10); expected float32[4, 3]"
    msg = _refuse(placeholders, model)
    assert msg == "State has more than 2 placeholders (byte 4); expected 2"
    best = _best({"normal": lambda: loads(normal, expect=model),
                  "tensors": lambda: _try_loads(tensors, model),
                  "placeholders": lambda: _try_loads(placeholders, model)})  # fmt: skip
    # a 150-byte real diff reads in tens of microseconds: the hostile ones, 30,000-80,000x
    # bigger, are refused in about that time
    assert best["tensors"] <= RATIO_BOUND * best["normal"], best
    assert best["placeholders"] <= RATIO_BOUND * best["normal"], best


# --------------------------------------------------------------------------- without expect
def test_without_expect_global_caps_bound_the_work():
    # State.tensors { torch_tensor { contents_data { shape { dims: [0] }, dtype: "float32" } } }
    td = pw.len_field(1, pw.len_field(1, b"\x00")) + pw.len_field(2, b"float32")
    unit = pw.len_field(2, pw.len_field(1, pw.len_field(2, td)))
    msg = _refuse(unit * 228_000, None)
    assert msg == (
        f"State has more than {MAX_TENSORS:,} tensors (State tensor {MAX_TENSORS} at byte "
        f"{MAX_TENSORS * len(unit)}); loads() reads at most {MAX_TENSORS:,} without expect"
    )
    assert _refuse(pw.len_field(1, b"") * 6_000_000, None).startswith(
        f"State has more than {MAX_TENSORS:,} placeholders (byte {2 * MAX_TENSORS})"
    )
    # unknown varint fields, 2 bytes each: the cap is reached at the same byte, and the work
    # is the same, for 4 MB and for 16 MB
    cap = FIELDS_BASE + FIELDS_PER_TENSOR * MAX_TENSORS
    small, big = (pw.varint_field(15, 0) * (n // 2) for n in (4 << 20, 16 << 20))
    for data in (small, big):
        assert _refuse(data, None) == f"more than {cap:,} fields (loads() cap) at byte {2 * cap}"
    best = _best({"4MB": lambda: _try_loads(small, None),
                  "16MB": lambda: _try_loads(big, None)}, reps=5)  # fmt: skip
    assert best["16MB"] <= 2 * best["4MB"], best


def test_expect_refuses_what_a_state_cannot_carry():
    with pytest.raises(ValueError, match="complex128 cannot be in a State"):
        loads(dumps([]), expect=[((1,), np.complex128)])


def test_expect_accepts_what_dumps_writes_for_every_dtype():
    arrays = [
        np.arange(6, dtype=dt).reshape(2, 3)
        for dt in ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8")
    ]
    arrays.append(np.array([True, False]))
    model = [(a.shape, a.dtype) for a in arrays]
    for a, b in zip(loads(dumps(arrays), expect=model), arrays, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


# --------------------------------------------------------------------------- any mutation
def _work(data: bytes, expect) -> tuple[int, list | None]:
    """Profiler events (Python and C calls and returns, generator resumes) of one parse:
    an exact, noise-free measure of the Python-level work."""
    events = 0

    def count(frame, event, arg):
        nonlocal events
        events += 1

    sys.setprofile(count)
    try:
        out = loads(data, expect=expect)
    except StateError:
        out = None
    finally:
        sys.setprofile(None)
    return events, out


_UNKNOWN = [
    pw.varint_field(15, 300),
    pw.key(15, pw.I32) + b"\1\2\3\4",
    pw.key(15, pw.I64) + b"\0" * 8,
    pw.len_field(15, b"xy"),
    pw.key(15, pw.SGROUP) + pw.varint_field(1, 1) + pw.key(15, pw.EGROUP),
    pw.key(15, pw.SGROUP) * 3 + pw.key(15, pw.EGROUP) * 3,
]
_LEVELS = ("State", "Placeholder", "StateTensor", "TorchTensor", "TensorData", "Size")
_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "uint8", "bool")


def _encode(arrays, noise: dict[str, bytes]) -> bytes:
    """syft-proto State bytes as syft.js lays them out (written here independently of
    ``dumps``), with ``noise`` appended inside every message of the named levels."""
    out = []
    for i, a in enumerate(arrays):
        dims = b"".join(pw.varint(d) for d in a.shape)
        size = pw.len_field(1, dims) + noise.get("Size", b"") if dims else noise.get("Size", b"")
        ph = (pw.len_field(3, pw.varint_field(1, i)) + pw.len_field(4, b"#%d" % i)
              + pw.len_field(6, size) + noise.get("Placeholder", b""))  # fmt: skip
        out.append(pw.len_field(1, ph))
    for i, a in enumerate(arrays):
        name = a.dtype.name
        if name in ("float32", "float16"):
            contents = pw.len_field(22 if name == "float32" else 21, a.astype("<f4").tobytes())
        elif name == "float64":
            contents = pw.len_field(23, a.astype("<f8").tobytes())
        else:  # one varint per value, each written by pw.varint
            field = {"int64": 20, "int32": 19, "int16": 18, "uint8": 16, "bool": 24}[name]
            packed = b"".join(pw.varint(int(v) & (2**64 - 1)) for v in a.reshape(-1))
            contents = pw.len_field(field, packed)
        dims = b"".join(pw.varint(d) for d in a.shape)
        size = (pw.len_field(1, dims) if dims else b"") + noise.get("Size", b"")
        td = pw.len_field(1, size) + pw.len_field(2, name.encode()) + contents
        td += noise.get("TensorData", b"")
        tt = pw.len_field(1, pw.varint_field(1, i)) + pw.len_field(2, td) + pw.varint_field(8, 4)
        tt += noise.get("TorchTensor", b"")
        out.append(pw.len_field(2, pw.len_field(1, tt) + noise.get("StateTensor", b"")))
    return noise.get("State", b"") + b"".join(out)


@st.composite
def _mutations(draw):
    shapes = draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
                           min_size=1, max_size=4))  # fmt: skip
    dtypes = [np.dtype(draw(st.sampled_from(_DTYPES))) for _ in shapes]
    arrays = [(np.arange(int(np.prod(s))) % 7).astype(dt).reshape(s)
              for s, dt in zip(shapes, dtypes, strict=True)]  # fmt: skip
    levels = draw(st.lists(st.sampled_from(_LEVELS), min_size=1, max_size=3, unique=True))
    noise = {lv: draw(st.sampled_from(_UNKNOWN)) * draw(st.integers(0, 20_000)) for lv in levels}
    data = bytearray(_encode(arrays, noise))
    edits = draw(st.integers(0, 3))  # then maybe overwrite a few bytes
    for _ in range(edits):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return arrays, edits == 0, bytes(data)


@given(_mutations())
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_any_mutation_is_decoded_right_or_refused_at_bounded_work(case):
    arrays, _, data = case
    model = [(a.shape, a.dtype) for a in arrays]
    valid_work, valid = _work(_encode(arrays, {}), model)
    assert valid is not None
    for a, b in zip(valid, arrays, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    work, out = _work(data, model)
    event("decoded" if out is not None else "refused")
    event(f"input of {'over' if len(data) > 10_000 else 'at most'} 10 kB")
    if out is not None:  # decoded: exactly the model's tensors
        assert [(a.shape, a.dtype) for a in out] == model
    # The budget allows FIELDS_PER_TENSOR = 24 fields a tensor where a real diff uses 12-14,
    # plus FIELDS_BASE; measured worst is ~2.5x the real diff's events (1 tensor).
    assert work <= 4 * valid_work, (work, valid_work, len(data))


@given(_mutations())
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_unknown_fields_anywhere_do_not_change_the_values(case):
    arrays, untouched, data = case
    if not untouched:
        return
    # only unknown fields were added (no byte overwritten): decoded as the original when the
    # noise fits the budget, refused by the budget otherwise
    model = [(a.shape, a.dtype) for a in arrays]
    try:
        out = loads(data, expect=model)
    except StateError as e:
        assert "fields (the limit for a State of" in str(e) or "nested deeper" in str(e), e
        return
    for a, b in zip(out, arrays, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


# --------------------------------------------------------------------------- a live node
MiB = 1 << 20
WRONG_KEY = "0" * 64
LIVE_CASES = {  # hostile diff -> the node's message (the model: two float32 tensors)
    "empty tensors": "State tensor 0 is float32[0] (TensorData at byte 10); expected float32[4, 3]",
    "empty placeholders": "State has more than 2 placeholders (byte 4); expected 2",
    # 2-byte fields: the 65th of a 64-field budget (16 + 24 x 2) starts at byte 128
    "unknown fields, top level": "more than 64 fields (the limit for a State of 2 tensors) "
    "at byte 128",
    # State.tensors and StateTensor.torch_tensor (5 bytes each: key + 4-byte length),
    # then 2-byte contents_data fields: the 65th field starts at 10 + 2 x 62
    "split contents_data": "more than 64 fields (the limit for a State of 2 tensors) at byte 134",
}


def _ws_report(ws_url: str, worker_id: str, key: str, diff: bytes) -> dict:
    """One report as a gridfl.binary.2 frame (4-byte header length, JSON header, raw diff)."""
    from websockets.sync.client import connect

    head = json.dumps({"type": "model-centric/report", "request_id": "r",
                       "data": {"worker_id": worker_id, "request_key": key}}).encode()  # fmt: skip
    with connect(ws_url, max_size=None, open_timeout=30,
                 subprotocols=["gridfl.binary.2"]) as ws:  # fmt: skip
        ws.send(len(head).to_bytes(4, "big") + head + diff)
        return json.loads(ws.recv(timeout=120))["data"]


def _http_report(url: str, worker_id: str, key: str, diff: bytes) -> dict:
    import httpx

    body = json.dumps({"worker_id": worker_id, "request_key": key,
                       "diff": base64.b64encode(diff).decode()})  # fmt: skip
    r = httpx.post(url + "/model-centric/report", content=body, timeout=120,
                   headers={"content-type": "application/json"})  # fmt: skip
    return {**r.json(), "status_code": r.status_code}


def _at_once(send, url: str, seats, diffs) -> list[dict]:
    """``send(url, worker_id, key, diff)`` for every seat and diff, all at the same time."""
    return in_threads(send, [(url, *seat, diff) for seat, diff in zip(seats, diffs, strict=True)],
                      timeout=300)


#: what the allocator may keep after 4 x 60 MiB of refused reports (the node used to keep
#: ~1 GB). Freeing a 60 MiB mmapped buffer raises glibc's trim threshold to 64 MiB, so each
#: malloc arena may hold up to 64 MiB of free pages; 2-73 MB has been seen on 2 cores.
KEPT_MB = 160


@pytest.mark.slow
def test_live_node_refuses_four_60mib_hostile_reports_and_gives_memory_back(tmp_path):
    """A real ``gridfl serve`` process: four concurrent 60 MiB hostile reports (WebSocket
    binary frames, then HTTP bodies) are 400s saying what is wrong and where; the node's
    CPU for them is about what receiving the bytes costs (the same frames with a wrong
    request key, refused before any decoding); its RSS comes back to where it was; and a
    real report is accepted afterwards."""
    import httpx

    from tests.builders import ADMIN, SHAPES, diff_of, host_payload
    from tests.harness import HttpWorker, Serve, join

    node = Serve(f"sqlite:///{tmp_path / 'grid.db'}", tmp_path)
    try:
        admin = httpx.Client(base_url=node.url, timeout=60,
                             headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
        assert admin.post("/gridfl/v1/processes", json=host_payload()).status_code == 201
        http = HttpWorker(node.url)
        seats = []
        for _ in range(4):
            wid, cyc = join(http)
            seats.append((wid, cyc["request_key"]))
        wrong = [(wid, WRONG_KEY) for wid, _ in seats]
        model = [(s, np.dtype(np.float32)) for s in SHAPES]
        expected = ["diff is not valid State bytes: " + m for m in LIVE_CASES.values()]
        frames = [HOSTILE[name](model, 60 * MiB) for name in LIVE_CASES]
        assert all(60 * MiB <= len(f) < 64 * MiB for f in frames)  # the default max body
        time.sleep(0.5)
        rss_before = node.rss_mb()

        cpu = {"wrong key": 0.0, "hostile": 0.0}
        for _ in range(2):
            for kind, keys in (("wrong key", wrong), ("hostile", seats)):
                c0 = node.cpu_s()
                replies = _at_once(_ws_report, node.ws_url, keys, frames)
                cpu[kind] += node.cpu_s() - c0
                if kind == "hostile":
                    assert [r["status_code"] for r in replies] == [400] * 4, replies
                    assert [r["error"] for r in replies] == expected
                else:
                    assert [r["status_code"] for r in replies] == [401] * 4, replies
        # over HTTP: base64 in JSON, so 45 MiB diffs make 60 MiB bodies
        bodies = [HOSTILE[name](model, 45 * MiB) for name in LIVE_CASES]
        replies = _at_once(_http_report, node.url, seats, bodies)
        assert [r["status_code"] for r in replies] == [400] * 4, replies
        assert [r["error"] for r in replies] == expected
        del frames, bodies
        # memory comes back once the connections' tasks have ended (later on a busy box)
        deadline = time.monotonic() + 15
        while (rss_after := node.rss_mb()) > rss_before + KEPT_MB and time.monotonic() < deadline:
            time.sleep(0.25)
        print(f"\nnode CPU for 2 x 4 x 60 MiB frames: hostile {cpu['hostile']:.2f} s, "
              f"wrong key {cpu['wrong key']:.2f} s; RSS {rss_before:.0f} MB before, "
              f"{rss_after:.0f} MB after")  # fmt: skip
        # decoding adds little to receiving the bytes (the outside check saw 76 s a report)
        assert cpu["hostile"] <= 2 * cpu["wrong key"] + 0.5, cpu
        assert rss_after <= rss_before + KEPT_MB, (rss_before, rss_after)

        # a real report still works
        data = _ws_report(node.ws_url, *seats[0], dumps(diff_of(1)))
        assert data == {"status": "success"}, data
    finally:
        node.stop()
