"""ONNX plans: load, inspect and execute a gridfl plan with onnxruntime.

A plan is an ONNX model whose ``metadata_props`` declare what every graph input and
output means (its *role*), so a worker can bind its data, the model params and the
client config to the graph without any model code::

    >>> plan = Plan.from_bytes(plan_bytes)
    >>> plan.kind, plan.num_params
    ('training', 4)
    >>> loss, acc, *params = plan.execute(X, y, 64, 0.005, *model.params)

Metadata keys (see docs/plans.md):

* ``gridfl.format`` = ``"1"``
* ``gridfl.kind`` = ``"training"`` | ``"evaluation"`` | ``"averaging"``
* ``gridfl.inputs`` / ``gridfl.outputs``: JSON lists with one object per graph input /
  output, in graph order: ``{"name", "role", "key"?, "index"?}``.

This module imports only numpy and onnxruntime: workers have neither torch nor onnx.
Torch tensors passed to :meth:`Plan.execute` are recognised by duck typing.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gridfl._exceptions import PlanInputError, PlanLoadError

__all__ = [
    "FORMAT_VERSION",
    "INDEXED_ROLES",
    "INPUT_ROLES",
    "KEYED_ROLES",
    "KINDS",
    "OUTPUT_ROLES",
    "Plan",
    "PlanSlot",
    "default_threads",
]

FORMAT_VERSION = "1"
KINDS = ("training", "evaluation", "averaging")
INPUT_ROLES = (
    "data",
    "target",
    "batch_size",
    "client_config",
    "model_param",
    "model_buffer",
    "optimizer_state",
    "global_param",
    "average",
    "item",
    "count",
)
OUTPUT_ROLES = ("loss", "metric", "model_param", "model_buffer", "optimizer_state", "average")
#: Roles whose slots carry a ``key`` (a client_config key or a metric name).
KEYED_ROLES = frozenset({"client_config", "metric"})
#: Roles whose slots carry an ``index`` (position among the slots of that role).
#: ``model_buffer`` j is the model's tensor ``num_params + j`` (BatchNorm running stats).
#: ``global_param`` i is the downloaded (global) value of model param i (FedProx).
INDEXED_ROLES = frozenset(
    {"model_param", "model_buffer", "optimizer_state", "global_param", "average", "item"}
)

_META_FORMAT = "gridfl.format"
_META_KIND = "gridfl.kind"
_META_INPUTS = "gridfl.inputs"
_META_OUTPUTS = "gridfl.outputs"

# onnxruntime type strings -> numpy dtypes.
_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


def default_threads() -> int:
    """Default intra-op thread count for a plan session.

    A worker usually shares its machine with other work, so a plan uses the cores this
    process may run on, capped at 4 (training steps of small FL models stop scaling well
    beyond that). Override per plan with ``Plan.from_bytes(b, threads=n)`` or for the whole
    process with the ``GRIDFL_PLAN_THREADS`` environment variable.
    """
    env = os.environ.get("GRIDFL_PLAN_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n >= 1:
            return n
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


@dataclass(frozen=True)
class PlanSlot:
    """One graph input or output of a plan and its role.

    ``shape`` holds ints for fixed dimensions and ``None`` for dynamic ones (e.g. the
    batch dimension). ``key`` is set for ``client_config`` inputs (e.g. ``"lr"``) and
    ``metric`` outputs (e.g. ``"accuracy"``); ``index`` for indexed roles such as
    ``model_param``.
    """

    name: str
    role: str
    key: str | None
    index: int | None
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def required_index(self) -> int:
        """``index``, for a slot of an indexed role (``model_param``, ``optimizer_state``...)."""
        if self.index is None:
            raise PlanLoadError(f"plan slot {self.name!r} (role {self.role}) has no index")
        return self.index

    @property
    def required_key(self) -> str:
        """``key``, for a slot of a keyed role (``client_config``, ``metric``)."""
        if self.key is None:
            raise PlanLoadError(f"plan slot {self.name!r} (role {self.role}) has no key")
        return self.key

    def describe(self) -> str:
        """Human-readable name for error messages, e.g. ``input 'p0' (model_param 0)``."""
        what = self.role
        if self.key is not None:
            what += f" {self.key!r}"
        if self.index is not None:
            what += f" {self.index}"
        return f"{self.name!r} ({what})"

    def shape_str(self) -> str:
        dims = ", ".join("N" if d is None else str(d) for d in self.shape)
        return f"({dims}{',' if len(self.shape) == 1 else ''})"

    def matches(self, value: Any) -> bool:
        """True if ``value`` can be fed to onnxruntime for this slot as it is: a
        C-contiguous numpy array of exactly the declared dtype and shape (any size on
        dynamic dimensions). :meth:`Plan.convert` returns such arrays.

            >>> slot = plan.inputs[0]  # the data: (N, 784) float32
            >>> slot.matches(np.zeros((200, 784), np.float32))
            True
        """
        return (
            isinstance(value, np.ndarray)
            and value.dtype == self.dtype
            and value.flags.c_contiguous
            and value.ndim == len(self.shape)
            and all(d is None or d == n for d, n in zip(self.shape, value.shape, strict=True))
        )


def _parse_slots(  # noqa: C901 - one check per metadata rule, in the order reported
    raw: str | None, meta_key: str, ort_args: list, allowed_roles
) -> list[PlanSlot]:
    if raw is None:
        raise PlanLoadError(f"plan metadata lacks {meta_key!r}")
    try:
        entries = json.loads(raw)
    except ValueError as e:
        raise PlanLoadError(f"plan metadata {meta_key!r} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise PlanLoadError(f"plan metadata {meta_key!r} must be a JSON list")
    if len(entries) != len(ort_args):
        raise PlanLoadError(
            f"plan metadata {meta_key!r} describes {len(entries)} slots "
            f"but the graph has {len(ort_args)}"
        )
    slots = []
    seen: set[tuple] = set()
    for i, (entry, arg) in enumerate(zip(entries, ort_args, strict=True)):
        if not isinstance(entry, dict):
            raise PlanLoadError(f"plan metadata {meta_key!r}[{i}] must be a JSON object")
        name, role = entry.get("name"), entry.get("role")
        if name != arg.name:
            raise PlanLoadError(
                f"plan metadata {meta_key!r}[{i}] names {name!r} but graph slot {i} is "
                f"{arg.name!r}"
            )
        if role not in allowed_roles:
            raise PlanLoadError(
                f"plan metadata {meta_key!r}[{i}] ({name!r}) has unknown role {role!r}; "
                f"expected one of {', '.join(allowed_roles)}"
            )
        key = entry.get("key")
        index = entry.get("index")
        if role in KEYED_ROLES:
            if not isinstance(key, str) or not key:
                raise PlanLoadError(
                    f"plan metadata {meta_key!r}[{i}] ({name!r}, role {role}) needs a string 'key'"
                )
        else:
            key = None
        if role in INDEXED_ROLES:
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise PlanLoadError(
                    f"plan metadata {meta_key!r}[{i}] ({name!r}, role {role}) needs a "
                    "non-negative int 'index'"
                )
        else:
            index = None
        ident = (role, key, index)
        if ident in seen:
            raise PlanLoadError(f"plan metadata {meta_key!r} declares {ident} twice")
        seen.add(ident)
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise PlanLoadError(f"graph slot {arg.name!r} has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
        slots.append(PlanSlot(arg.name, str(role), key, index, dtype, shape))
    # Indexed roles must be numbered 0..n-1.
    for role in INDEXED_ROLES:
        idx = sorted(s.index for s in slots if s.role == role and s.index is not None)
        if idx != list(range(len(idx))):
            raise PlanLoadError(
                f"plan metadata {meta_key!r}: {role} indices must be 0..{len(idx) - 1}, got {idx}"
            )
    return slots


def _to_numpy(value: Any) -> np.ndarray:
    """numpy array, scalar, sequence or torch tensor (duck-typed) -> numpy array."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor, no import
        t = value.detach()
        if hasattr(t, "cpu"):
            t = t.cpu()
        if hasattr(t, "resolve_conj"):
            t = t.resolve_conj().resolve_neg()
        return t.numpy()
    return np.asarray(value)


class Plan:
    """A gridfl plan: an ONNX graph plus the roles of its inputs and outputs.

    Build one with :meth:`from_bytes` (workers) or ``gridfl.compiler`` (hosts)::

        >>> plan = Plan.from_bytes(open("training_plan.onnx", "rb").read())
        >>> [s.role for s in plan.inputs]  # doctest: +NORMALIZE_WHITESPACE
        ['data', 'target', 'batch_size', 'client_config',
         'model_param', 'model_param', 'model_param', 'model_param']
        >>> loss, acc, *params = plan.execute(X, y, 32, 0.1, *params)

    One onnxruntime ``InferenceSession`` is created per plan, on the first
    :meth:`execute` (thread safe), with ``threads`` intra-op threads (default
    :func:`default_threads`) that do not spin while idle, so a worker's plan does not
    steal CPU from whatever else runs on the machine. Training plans run without
    onnxruntime's memory pattern: less resident memory per worker at the same step time.
    """

    def __init__(self, data: bytes, *, threads: int | None = None, _session=None):
        # Use Plan.from_bytes(); the constructor is the same but positional.
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self._bytes = bytes(data)
        self._threads = threads
        self._lock = threading.Lock()
        self._session = None
        # Read metadata and signature with a metadata-only session (no optimization, one
        # thread): cheap, validates the bytes, and imports nothing but onnxruntime.
        sess = _session if _session is not None else self._make_session(light=True)
        meta = sess.get_modelmeta().custom_metadata_map or {}
        fmt = meta.get(_META_FORMAT)
        if fmt is None:
            raise PlanLoadError(
                "not a gridfl plan: the ONNX model has no 'gridfl.format' metadata "
                "(compile it with gridfl.compiler)"
            )
        if fmt != FORMAT_VERSION:
            raise PlanLoadError(
                f"unsupported gridfl plan format {fmt!r} (this gridfl reads {FORMAT_VERSION!r})"
            )
        kind = meta.get(_META_KIND)
        if kind not in KINDS:
            raise PlanLoadError(
                f"plan metadata 'gridfl.kind' is {kind!r}; expected one of {', '.join(KINDS)}"
            )
        self.kind: str = kind
        self.inputs: list[PlanSlot] = _parse_slots(
            meta.get(_META_INPUTS), _META_INPUTS, sess.get_inputs(), INPUT_ROLES
        )
        self.outputs: list[PlanSlot] = _parse_slots(
            meta.get(_META_OUTPUTS), _META_OUTPUTS, sess.get_outputs(), OUTPUT_ROLES
        )
        self.metadata: dict[str, str] = dict(meta)
        #: syft-proto bytes of the same step for syft.js (``compile_plan(..., tfjs=True)``);
        #: hosting the plan sends them as its ``tfjs`` variant
        self.tfjs: bytes | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bytes(cls, data: bytes, *, threads: int | None = None) -> Plan:
        """Load a plan from ONNX bytes; :class:`~gridfl.PlanLoadError` if they are not one.

        ``threads``: intra-op threads of the session (default :func:`default_threads`).

            >>> plan = Plan.from_bytes(plan_bytes, threads=1)
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PlanLoadError(f"plan bytes must be bytes, got {type(data).__name__}")
        if len(data) == 0:
            raise PlanLoadError("plan bytes are empty")
        return cls(data, threads=threads)

    def to_bytes(self) -> bytes:
        """The plan's ONNX bytes (what :meth:`from_bytes` reads and the node stores)."""
        return self._bytes

    @property
    def threads(self) -> int:
        """Intra-op threads the session uses."""
        return self._threads if self._threads is not None else default_threads()

    def _session_options(self, *, light: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if light:
            so.intra_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return so
        so.intra_op_num_threads = self.threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if getattr(self, "kind", None) == "training":
            # A memory pattern pre-plans one block for all of a step's tensors and keeps
            # it next to the arena's own: ~8 MB more per McMahan CNN worker, for no
            # measurable speed (the arena reuses its chunks either way; see
            # benchmarks/bench_step.py).
            so.enable_mem_pattern = False
        return so

    def _make_session(self, *, light: bool = False):
        import onnxruntime as ort

        if not light:
            faster = self._runtime_bytes()
            for data in (faster,) if faster is self._bytes else (faster, self._bytes):
                try:
                    return self._optimized_session(data)
                except Exception:  # noqa: BLE001 - an optimization never stops a plan: run it as written
                    continue
        try:
            return ort.InferenceSession(
                self._bytes, sess_options=self._session_options(light=light),
                providers=["CPUExecutionProvider"],
            )
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PlanLoadError(f"onnxruntime cannot load the plan: {msg}") from None

    def _optimized_session(self, data: bytes, configure=None):
        """A session of ``data`` with its nodes run in ``gridfl._schedule``'s order (each
        copy next to its reader), or in onnxruntime's own if that cannot be had.
        ``configure(options)`` is called on the session's options (a benchmark's
        profiling)."""
        import onnxruntime as ort

        def session(graph: bytes, ordered: bool):
            so = self._session_options()
            if ordered:  # already optimized: loading it again must not change it
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            if configure is not None:
                configure(so)
            return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])

        try:
            ordered = self._ordered_graph(data)
            if ordered is not None:
                return session(ordered, True)
        except Exception:  # noqa: BLE001 - an optimization never stops a plan: onnxruntime's order
            pass
        return session(data, False)

    def _ordered_graph(self, data: bytes) -> bytes | None:
        """onnxruntime's optimized graph of ``data``, reordered; None if the order stays."""
        import onnxruntime as ort

        from gridfl import _schedule

        so = self._session_options()
        with tempfile.TemporaryDirectory(prefix="gridfl-plan-") as tmp:
            so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            with open(so.optimized_model_filepath, "rb") as f:
                optimized = f.read()
        return _schedule.schedule(optimized, data)

    def _runtime_bytes(self) -> bytes:
        """The graph onnxruntime runs: the plan with its convolutions in onnxruntime's
        blocked layout where they can be (see ``gridfl._nchwc``), else the plan's own
        bytes (the same object)."""
        from gridfl import _nchwc

        try:
            faster = _nchwc.rewrite(self._bytes, {s.name: s.shape for s in self.inputs})
        except Exception:  # noqa: BLE001 - an optimization never stops a plan: run it as written
            return self._bytes
        return faster or self._bytes

    @property
    def session(self):
        """The onnxruntime ``InferenceSession`` (created on first use, then reused)."""
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._make_session()
        return self._session

    # ------------------------------------------------------------------ inspection
    def _slots(self, role: str, outputs: bool = False) -> list[PlanSlot]:
        slots = self.outputs if outputs else self.inputs
        found = [s for s in slots if s.role == role]
        return sorted(found, key=lambda s: (s.index if s.index is not None else -1))

    @property
    def num_params(self) -> int:
        """Number of model params the plan takes (``model_param`` or ``average`` inputs)."""
        return len(self._slots("model_param")) or len(self._slots("average"))

    @property
    def param_shapes(self) -> list[tuple[int | None, ...]]:
        """Declared shapes of the model params, in index order."""
        slots = self._slots("model_param") or self._slots("average")
        return [s.shape for s in slots]

    @property
    def num_buffers(self) -> int:
        """Number of ``model_buffer`` inputs (e.g. BatchNorm running statistics)."""
        return len(self._slots("model_buffer"))

    @property
    def num_optimizer_state(self) -> int:
        """Number of optimizer state inputs (e.g. SGD momentum buffers); 0 for plain SGD."""
        return len(self._slots("optimizer_state"))

    @property
    def client_config_keys(self) -> list[str]:
        """The ``client_config`` keys the plan reads, e.g. ``["lr"]``."""
        return [s.key for s in self.inputs if s.role == "client_config" and s.key is not None]

    @property
    def metric_names(self) -> list[str]:
        """The metrics the plan outputs, e.g. ``["accuracy"]``."""
        return [s.key for s in self.outputs if s.role == "metric" and s.key is not None]

    def __repr__(self) -> str:
        ins = ", ".join(s.role + (f"[{s.key}]" if s.key else "") for s in self.inputs)
        n_out, size = len(self.outputs), len(self._bytes)
        return f"<Plan {self.kind} ({ins}) -> {n_out} outputs, {size} bytes>"

    # ------------------------------------------------------------------ execution
    def bind(
        self,
        *,
        data: Any = None,
        target: Any = None,
        params: Sequence[Any] = (),
        client_config: Mapping[str, Any] | None = None,
        batch_size: Any = None,
        optimizer_state: Sequence[Any] = (),
        global_params: Sequence[Any] = (),
        average: Sequence[Any] = (),
        item: Sequence[Any] = (),
        count: Any = None,
    ) -> list[Any]:
        """Arrange values by role into the positional order :meth:`execute` wants.

        ``batch_size`` defaults to the length of ``data``; ``optimizer_state`` defaults to
        zeros (fresh momentum buffers). ``model_buffer`` inputs take the model's tensors
        after its params (``params`` may be the whole model state). A FedProx plan's
        ``global_param`` inputs take ``global_params``, the params as downloaded: they stay
        fixed while ``params`` move step by step, so they have no default::

            >>> args = plan.bind(data=X, target=y, params=model.params,
            ...                  client_config={"lr": 0.1})
            >>> loss, acc, *new_params = plan.execute(*args)
        """
        client_config = client_config or {}
        out: list[Any] = []
        for s in self.inputs:
            r = s.role
            if r == "data":
                v = data
            elif r == "target":
                v = target
            elif r == "batch_size":
                v = batch_size if batch_size is not None else (
                    None if data is None else len(_to_numpy(data))
                )
            elif r == "client_config":
                if s.key is None or s.key not in client_config:
                    raise PlanInputError(
                        f"client_config lacks {s.key!r}, which plan input {s.describe()} needs"
                    )
                v = client_config[s.key]
            elif r == "count":
                v = count
            else:
                seq = {"model_param": params, "optimizer_state": optimizer_state,
                       "average": average, "item": item, "model_buffer": params,
                       "global_param": global_params}[r]
                index = s.index if s.index is not None else 0  # indexed roles have one
                if r == "model_buffer":
                    index += self.num_params
                if r == "optimizer_state" and len(seq) == 0:
                    v = np.zeros([d or 0 for d in s.shape], dtype=s.dtype)
                elif r == "global_param" and len(seq) == 0:
                    raise PlanInputError(
                        f"plan input {s.describe()} is a FedProx global param: pass "
                        "global_params=, the params as downloaded"
                    )
                elif index >= len(seq):
                    raise PlanInputError(
                        f"plan input {s.describe()} needs {r} #{index} but only "
                        f"{len(seq)} were given"
                    )
                else:
                    v = seq[index]
            if v is None:
                raise PlanInputError(f"no value given for plan input {s.describe()}")
            out.append(v)
        return out

    def convert(self, pos: int, value: Any) -> np.ndarray:
        """``value`` as the array input ``pos`` (its index in :attr:`inputs`) takes: cast to
        the declared dtype within its kind (floats to floats, integers to integers or
        floats, integral floats to integers), scalars reshaped to the declared rank.
        :class:`~gridfl.PlanInputError` names the input when that is not possible.

            >>> x = plan.convert(0, X)  # the data input, as onnxruntime takes it
            >>> x.dtype, x.shape
            (dtype('float32'), (64, 784))
        """
        slot = self.inputs[pos]
        try:
            arr = _to_numpy(value)
        except Exception as e:  # noqa: BLE001 - any value a caller passes: named in the error
            raise PlanInputError(
                f"input #{pos} {slot.describe()}: cannot convert {type(value).__name__} "
                f"to an array: {e}"
            ) from None
        want = slot.dtype
        if arr.dtype != want:
            src = arr.dtype
            ok = np.can_cast(src, want, casting="same_kind") or (
                src.kind in "biu" and want.kind in "fiu"
            )
            if not ok and src.kind == "f" and want.kind in "iu":
                # a float batch_size (64.0) or float class labels: fine if integral
                ok = bool(np.all(np.isfinite(arr)) and np.all(np.mod(arr, 1) == 0))
            if not ok:
                raise PlanInputError(
                    f"input #{pos} {slot.describe()}: expected dtype {want}, got {src}"
                )
            arr = arr.astype(want)
        shape = slot.shape
        if arr.ndim != len(shape):
            if arr.size == 1 and all(d in (1, None) for d in shape):
                arr = arr.reshape((1,) * len(shape))
            else:
                raise PlanInputError(
                    f"input #{pos} {slot.describe()}: expected shape {slot.shape_str()}, "
                    f"got {tuple(arr.shape)}"
                )
        for d, n in zip(shape, arr.shape, strict=True):
            if d is not None and d != n:
                raise PlanInputError(
                    f"input #{pos} {slot.describe()}: expected shape {slot.shape_str()}, "
                    f"got {tuple(arr.shape)}"
                )
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        return arr

    def execute(self, *inputs: Any) -> list[np.ndarray]:
        """Run the plan on positional inputs (in :attr:`inputs` order); return its outputs.

        Inputs may be numpy arrays, Python scalars or torch tensors; they are cast to the
        declared dtype (see :meth:`convert`) and scalars are reshaped to the declared rank::

            >>> loss, acc, *params = plan.execute(X, y, 64, 0.005, *params)

        Raises :class:`~gridfl.PlanInputError` naming the input on a wrong count, shape
        or dtype.
        """
        if len(inputs) != len(self.inputs):
            names = ", ".join(s.describe() for s in self.inputs)
            raise PlanInputError(
                f"{self.kind} plan takes {len(self.inputs)} inputs, got {len(inputs)}; "
                f"expected: {names}"
            )
        feed = {slot.name: self.convert(pos, value)
                for pos, (slot, value) in enumerate(zip(self.inputs, inputs, strict=True))}
        # Dynamic dims that share a symbol should agree: data/target batch dims.
        batch = {s.name: feed[s.name].shape[0] for s in self.inputs
                 if s.role in ("data", "target") and s.shape and s.shape[0] is None}
        if len(set(batch.values())) > 1:
            raise PlanInputError(f"data and target batch sizes differ: {batch}")
        return self.run(feed)

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the plan on a feed that needs no checking: input name -> an array that
        :meth:`PlanSlot.matches` its slot (from :meth:`convert`, or the plan's own outputs
        of a step before). The fast path of a loop that calls the plan many times;
        :meth:`execute` checks and converts every input, then calls this.

            >>> values = {"data": X, "target": y, "params": params, "client_config": {"lr": 0.1}}
            >>> feed = {s.name: plan.convert(i, v) for i, (s, v) in
            ...         enumerate(zip(plan.inputs, plan.bind(**values)))}
            >>> loss, acc, *params = plan.run(feed)
        """
        session = self.session
        try:
            return session.run(None, feed)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise PlanInputError(f"onnxruntime failed to run the plan: {e}") from None
