"""Translate a traced training step into the tfjs plan syft.js 0.1.4 runs.

The same ATen FX graph the ONNX export starts from (``trace.py``) is walked node by
node; every op becomes one or a few tfjs-core calls (``tf.matMul``, ``tf.logSoftmax``,
...), written as a syft-proto ``Plan`` by ``syft_plan.py``. An op without a translation
raises :class:`gridfl.CompileError` naming it, at compile time.

Shapes: sizes that do not depend on the batch are written as numbers; a reshape to a
batch-dependent size uses ``-1``; a batch-dependent ``expand`` is left to the
broadcasting of the elementwise op that consumes it (the only use the tracer makes of
it), anything else batch-dependent is refused. Integer tensors are int32 in tfjs.

The plan is checked like the ONNX one: :func:`run_numpy` executes its actions with numpy
versions of the same tfjs ops on the example inputs, against eager PyTorch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from gridfl._exceptions import CompileError

from . import ops as _ops  # noqa: F401 - registers the gridfl:: ops the rules name
from .syft_plan import Action, ArgValue, Ref, encode_plan

__all__ = ["TfjsPlan", "check_against", "run_numpy", "translate"]

aten = torch.ops.aten
_DYN = object()  # a batch-dependent size
_MAX_CONSTANT = 4096  # elements: constants travel as protobuf arg lists


class TfjsPlan:
    """The translated plan: its actions, input and output ids, and its bytes."""

    def __init__(self, actions: list[Action], inputs: list[int], outputs: list[int]):
        self.actions, self.inputs, self.outputs = actions, inputs, outputs

    def to_bytes(self, name: str = "training_plan") -> bytes:
        return encode_plan(name, self.actions, inputs=self.inputs, outputs=self.outputs)


class _Translator:
    def __init__(self, gm: torch.fx.GraphModule, batch_inputs: Sequence[int]):
        self.gm = gm
        self.actions: list[Action] = []
        self.env: dict[torch.fx.Node, Any] = {}
        self.next_id = 1
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.placeholders = placeholders
        self.batch_syms: set = set()
        self.batch_placeholders = [placeholders[i] for i in batch_inputs]
        self.batch_count: Ref | None = None
        for i in batch_inputs:
            dim0 = placeholders[i].meta["val"].shape[0]
            if isinstance(dim0, torch.SymInt):
                self.batch_syms |= dim0.node.expr.free_symbols

    # ------------------------------------------------------------ values
    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def emit(self, command: str, *args: ArgValue) -> Ref:
        ref = Ref(self.new_id())
        self.actions.append(Action(f"tf.{command}", tuple(args), ref.id))
        return ref

    def size(self, s: Any) -> Any:
        """A size as an int, or _DYN when it depends on the batch."""
        if isinstance(s, int):
            return s
        if isinstance(s, torch.SymInt):
            if s.node.expr.free_symbols & self.batch_syms:
                return _DYN
            return int(s.node.hint if s.node.hint is not None else s)
        return s

    def runtime_size(self, node: torch.fx.Node) -> Any:
        """The batch size used as a number (an evaluation loss's mean divides by it):
        counted in the plan from a batch input, since syft.js passes no sizes. Any
        other batch-dependent size stays _DYN."""
        if node.meta["val"].node.expr not in self.batch_syms:
            return _DYN
        if self.batch_count is None:
            source = min(self.batch_placeholders, key=lambda p: p.meta["val"].dim())
            ones = self.emit("cast", self.emit("onesLike", self.env[source]), "float32")
            self.batch_count = self.emit("sum", ones)
            per_example = int(np.prod([self.size(d) for d in source.meta["val"].shape[1:]]))
            if per_example != 1:
                self.batch_count = self.emit("div", self.batch_count, float(per_example))
        return self.batch_count

    def shape(self, node: torch.fx.Node) -> list[Any]:
        return [self.size(d) for d in node.meta["val"].shape]

    def arg(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return [self.arg(x) for x in a]
        return a

    # ------------------------------------------------------------ walk
    def run(self) -> TfjsPlan:
        inputs: list[int] = []
        outputs: list[int] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                ref = Ref(self.new_id())
                inputs.append(ref.id)
                self.env[node] = ref
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "get_attr":
                self.env[node] = self.constant(node.target, getattr(self.gm, node.target))
            elif node.op == "output":
                for o in node.args[0]:
                    value = self.env[o]
                    if not isinstance(value, Ref):  # a constant output: make it a tensor
                        value = self.emit("scalar", float(value))
                    outputs.append(value.id)
            else:
                raise CompileError(f"tfjs plans cannot hold graph node {node.op} {node.target}")
        return TfjsPlan(self.actions, inputs, outputs)

    def constant(self, name: str, value: torch.Tensor) -> Ref:
        """A tensor the trace captured (an optimizer's constants): written into the plan."""
        if value.numel() > _MAX_CONSTANT:
            raise CompileError(f"constant {name} of {value.numel()} elements is too large for "
                               f"a tfjs plan (at most {_MAX_CONSTANT})")
        dtype = _tf_dtype(value.dtype)
        cast = float if dtype == "float32" else (bool if dtype == "bool" else int)
        values: list[ArgValue] = [cast(v) for v in value.detach().reshape(-1).tolist()]
        if value.dim() == 0:
            return self.emit("scalar", values[0], dtype)
        return self.emit("tensor", values, list(value.shape), dtype)

    def call(self, node: torch.fx.Node) -> Any:
        target = node.target
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            return self.size(val)  # sym_size and arithmetic on sizes: known at compile time
        if target is operator.getitem:
            return self.arg(node.args[0])[node.args[1]]
        rule = _RULES.get(target)
        if rule is None:
            raise CompileError(
                f"op {_op_name(target)} has no tfjs translation: the tfjs variant cannot "
                "run this model (compile without tfjs=True for onnx workers only)"
            )
        args = [self.runtime_size(a) if target in _ELEMENTWISE and isinstance(
                    a, torch.fx.Node) and _is_dynamic_size(self, a)
                else self.arg(a) for a in node.args]
        kwargs = {k: self.arg(v) for k, v in node.kwargs.items()}
        return rule(self, node, *args, **kwargs)


def _op_name(target: Any) -> str:
    name = getattr(target, "name", None)
    if callable(name):
        return str(name())
    return str(getattr(target, "__name__", target))


def _is_dynamic_size(t: _Translator, a: torch.fx.Node) -> bool:
    return t.env.get(a) is _DYN and isinstance(a.meta.get("val"), torch.SymInt)


# ---------------------------------------------------------------- rules
_RULES: dict[Any, Callable[..., Any]] = {}
# ops that take a batch-dependent size as a number (computed in the plan)
_ELEMENTWISE = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
                aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


def _rule(*targets: Any) -> Callable:
    def register(fn: Callable) -> Callable:
        for t in targets:
            _RULES[t] = fn
        return fn

    return register


def _simple(command: str, *targets: Any) -> None:
    _rule(*targets)(lambda t, node, *args, **kw: t.emit(command, *args))


def _identity(t, node, x, *rest, **kw):
    return x


_rule(aten.alias.default, aten.clone.default, aten.detach.default,
      aten.lift_fresh_copy.default)(_identity)
_simple("relu", aten.relu.default)
_simple("neg", aten.neg.default)
_simple("exp", aten.exp.default)
_simple("log", aten.log.default)
_simple("sqrt", aten.sqrt.default)
_simple("rsqrt", aten.rsqrt.default)
_simple("tanh", aten.tanh.default)
_simple("sigmoid", aten.sigmoid.default)
_simple("abs", aten.abs.default)
_simple("matMul", aten.mm.default, aten.bmm.default)
_simple("mul", aten.mul.Tensor, aten.mul.Scalar)
_simple("div", aten.div.Tensor, aten.div.Scalar)
_simple("maximum", aten.maximum.default)
_simple("minimum", aten.minimum.default)
_simple("pow", aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor)
_simple("equal", aten.eq.Tensor, aten.eq.Scalar)
_simple("notEqual", aten.ne.Tensor, aten.ne.Scalar)
_simple("greater", aten.gt.Tensor, aten.gt.Scalar)
_simple("greaterEqual", aten.ge.Tensor, aten.ge.Scalar)
_simple("less", aten.lt.Tensor, aten.lt.Scalar)
_simple("lessEqual", aten.le.Tensor, aten.le.Scalar)


@_rule(aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
def _add_sub(t, node, a, b, alpha=1):
    if alpha != 1:
        b = t.emit("mul", b, alpha)
    return t.emit("add" if "add" in _op_name(node.target) else "sub", a, b)


@_rule(aten.addmm.default)
def _addmm(t, node, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise CompileError("op aten::addmm with beta/alpha != 1 has no tfjs translation")
    return t.emit("add", t.emit("matMul", a, b), bias)


@_rule(aten.permute.default)
def _permute(t, node, x, dims):
    rank = len(dims)
    return t.emit("transpose", x, [d % rank for d in dims])


@_rule(aten.t.default)
def _t(t, node, x):
    return t.emit("transpose", x) if len(node.meta["val"].shape) == 2 else x


@_rule(aten._log_softmax.default, aten._softmax.default)
def _softmax(t, node, x, dim, half_to_float=False):
    return t.emit("logSoftmax" if "log" in _op_name(node.target) else "softmax", x, dim)


def _axes(t, node, dims) -> list[int]:
    rank = len(node.args[0].meta["val"].shape)
    return [d % rank for d in dims] if dims else list(range(rank))


@_rule(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default)
def _reduce(t, node, x, dims=None, keepdim=False, dtype=None):
    command = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "min"}[
        _op_name(node.target).split("::")[1].split(".")[0]]
    return t.emit(command, x, _axes(t, node, dims), bool(keepdim))


@_rule(aten.sum.default, aten.mean.default)
def _reduce_all(t, node, x, dtype=None):
    return t.emit("sum" if "sum" in _op_name(node.target) else "mean", x)


@_rule(aten.argmax.default)
def _argmax(t, node, x, dim=None, keepdim=False):
    if dim is None:
        x, dim = t.emit("reshape", x, [-1]), 0
    out = t.emit("argMax", x, dim % len(node.args[0].meta["val"].shape))
    return t.emit("expandDims", out, dim) if keepdim else out


_TF_DTYPES = {torch.float32: "float32", torch.float64: "float32", torch.int64: "int32",
              torch.int32: "int32", torch.bool: "bool"}


def _tf_dtype(dtype) -> str:
    if dtype not in _TF_DTYPES:
        raise CompileError(f"dtype {dtype} has no tfjs form")
    return _TF_DTYPES[dtype]


@_rule(aten._to_copy.default)
def _to_copy(t, node, x, dtype=None, **kw):
    src = node.args[0].meta["val"].dtype
    if dtype is None or _tf_dtype(dtype) == _tf_dtype(src):
        return x
    return t.emit("cast", x, _tf_dtype(dtype))


@_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(t, node, x, shape):
    sizes = [t.size(s) if not isinstance(s, int) else s for s in shape]
    if sum(s is _DYN for s in sizes) > 1:
        raise CompileError("op aten::view to a shape with two batch-dependent sizes has no "
                           "tfjs translation")
    return t.emit("reshape", x, [-1 if s is _DYN else s for s in sizes])


@_rule(aten.unsqueeze.default)
def _unsqueeze(t, node, x, dim):
    return t.emit("expandDims", x, dim % len(node.meta["val"].shape))


@_rule(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(t, node, x, dims):
    rank = len(node.args[0].meta["val"].shape)
    dims = [dims] if isinstance(dims, int) else dims
    return t.emit("squeeze", x, [d % rank for d in dims])


@_rule(aten.select.int)
def _select(t, node, x, dim, index):
    size = t.shape(node.args[0])[dim]
    if index < 0 and size is _DYN:
        raise CompileError("op aten::select from the end of the batch has no tfjs translation")
    rank = len(node.args[0].meta["val"].shape)
    return t.emit("gather", x, index % size if index < 0 else index, dim % rank)


@_rule(aten.full_like.default)
def _full_like(t, node, x, value, **kw):
    ones = t.emit("onesLike", x)
    return ones if value == 1 else t.emit("mul", ones, value)


@_rule(aten.full.default)
def _full(t, node, size, value, **kw):
    shape = [t.size(s) for s in size]
    if _DYN in shape:
        raise CompileError("op aten::full of a batch-dependent shape has no tfjs translation")
    return t.emit("fill", shape, value, _tf_dtype(node.meta["val"].dtype))


@_rule(aten.zeros_like.default)
def _zeros_like(t, node, x, **kw):
    return t.emit("zerosLike", x)


@_rule(aten.arange.start_step, aten.arange.start, aten.arange.default)
def _arange(t, node, *args, dtype=None, **kw):
    bounds = [t.size(a) for a in args]
    if any(b is _DYN for b in bounds):
        raise CompileError("op aten::arange over the batch has no tfjs translation")
    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds, 1)[:3]
    return t.emit("range", start, end, step, _tf_dtype(node.meta["val"].dtype))


@_rule(aten.expand.default)
def _expand(t, node, x, shape):
    target = t.shape(node)
    if _DYN not in target:
        return t.emit("broadcastTo", x, target)
    # Batch-dependent: fine when every user is an elementwise op whose other operand
    # already has the full shape, so that its own broadcasting does the expand.
    elementwise = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor}
    for user in node.users:
        others = [a for a in user.args if isinstance(a, torch.fx.Node) and a is not node]
        if user.target not in elementwise or not any(
            list(o.meta["val"].shape) == list(node.meta["val"].shape) for o in others
        ):
            raise CompileError("op aten::expand to a batch-dependent shape has no tfjs "
                               f"translation here (used by {_op_name(user.target)})")
    return x


@_rule(torch.ops.gridfl.threshold_backward.default)
def _threshold_backward(t, node, grad, y, threshold):
    mask = t.emit("cast", t.emit("greater", y, float(threshold)), "float32")
    return t.emit("mul", grad, mask)


@_rule(aten.scalar_tensor.default)
def _scalar_tensor(t, node, value, **kw):
    return t.emit("scalar", value, _tf_dtype(node.meta["val"].dtype))


def translate(gm: torch.fx.GraphModule, batch_inputs: Sequence[int]) -> TfjsPlan:
    """The tfjs plan of a traced step; :class:`CompileError` names an untranslatable op."""
    return _Translator(gm, batch_inputs).run()


# ---------------------------------------------------------------- numpy check
def _np_sum(fn):
    def reduce(x, axes=None, keep=False):
        return fn(x, axis=None if axes is None else tuple(axes), keepdims=keep)

    return reduce


def _log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


_NUMPY: dict[str, Callable[..., Any]] = {
    "relu": lambda x: np.maximum(x, 0), "neg": np.negative, "exp": np.exp, "log": np.log,
    "sqrt": np.sqrt, "rsqrt": lambda x: 1 / np.sqrt(x), "tanh": np.tanh, "abs": np.abs,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "matMul": np.matmul, "add": np.add,
    "sub": np.subtract, "mul": np.multiply, "div": np.divide, "maximum": np.maximum,
    "minimum": np.minimum, "pow": np.power, "equal": np.equal, "notEqual": np.not_equal,
    "greater": np.greater, "greaterEqual": np.greater_equal, "less": np.less,
    "lessEqual": np.less_equal, "transpose": lambda x, p=None: np.transpose(x, p),
    "logSoftmax": _log_softmax, "softmax": lambda x, a: np.exp(_log_softmax(x, a)),
    "sum": _np_sum(np.sum), "mean": _np_sum(np.mean), "max": _np_sum(np.max),
    "min": _np_sum(np.min), "argMax": lambda x, a: np.argmax(x, axis=a).astype(np.int32),
    "expandDims": np.expand_dims, "squeeze": lambda x, a: np.squeeze(x, tuple(a)),
    "reshape": np.reshape, "broadcastTo": np.broadcast_to, "onesLike": np.ones_like,
    "zerosLike": np.zeros_like, "cast": lambda x, d: np.asarray(x).astype(d),
    "range": lambda a, b, s, d: np.arange(a, b, s).astype(d),
    "fill": lambda shape, v, d: np.full(shape, v, d),
    "gather": lambda x, i, axis: np.take(x, i, axis=axis),
    "scalar": lambda v, d="float32": np.asarray(v, d),
    "tensor": lambda v, shape, d: np.asarray(v, d).reshape(shape),
}


def run_numpy(plan: TfjsPlan, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Execute the plan's actions with numpy versions of the tfjs ops (float32, int32)."""
    scope: dict[int, Any] = {}
    for i, x in zip(plan.inputs, inputs, strict=True):
        x = np.asarray(x)
        scope[i] = x.astype(np.int32 if x.dtype.kind in "iu" else np.float32)
    for a in plan.actions:
        args = [scope[v.id] if isinstance(v, Ref) else v for v in a.args]
        out = np.asarray(_NUMPY[a.command.split(".")[-1]](*args))
        scope[a.result] = out.astype(np.float32) if out.dtype == np.float64 else out
    return [scope[i] for i in plan.outputs]


def check_against(plan: TfjsPlan, checks: Sequence[tuple[Sequence[Any], Sequence[Any]]],
                  names: Sequence[str]) -> None:
    """Raise CompileError unless the plan reproduces eager PyTorch on each (args, outputs)."""
    from .verify import disagreement

    for args, expected in checks:
        got = run_numpy(plan, [a.numpy() if isinstance(a, torch.Tensor) else a for a in args])
        for name, g, r in zip(names, got, expected, strict=True):
            err = disagreement(g, r.numpy())
            if err is not None:
                raise CompileError(
                    f"the tfjs plan disagrees with eager PyTorch on output {name!r} "
                    f"(max abs error {err})"
                )


from . import tfjs_conv as _tfjs_conv  # noqa: E402,F401 - registers conv and pool rules
