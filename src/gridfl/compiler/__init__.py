"""Compile PyTorch training steps into ONNX plans (needs the ``torch`` extra).

A whole step, forward, loss, ``torch.autograd.grad`` and the optimizer update, is
traced into ONE ONNX graph that workers run with onnxruntime::

    >>> from gridfl.compiler import compile_training_plan, SGD
    >>> plan = compile_training_plan(net, loss="cross_entropy", optimizer=SGD(lr=0.1),
    ...                              example_data=X[:32], example_target=y[:32])
    >>> loss, acc, *params = plan.execute(X, y, len(X), 0.1, *params)

Or compile any function of the PyGrid training signature
``(X, y, batch_size, lr, *params) -> (loss, acc, *updated_params)``::

    >>> plan = compile_plan(train_step, (X, y, 64, 0.005, W, b))

Anything a plan cannot run (random ops, ops without an ONNX form) raises
:class:`gridfl.CompileError` here, naming the op, never on a worker.
Every plan is checked against eager PyTorch on the example inputs, at the example batch
size and at a different one (the batch dimension is dynamic).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gridfl._exceptions import CompileError, GridflError
from gridfl.plan import INDEXED_ROLES, INPUT_ROLES, KEYED_ROLES, KINDS, OUTPUT_ROLES, Plan
from gridfl.plan_cache import PlanCache, resolve_cache

from .losses import LOSSES, accuracy, get_loss
from .optim import SGD, Adam, AdamW, Optimizer, as_optimizer

__all__ = [
    "LOSSES",
    "SGD",
    "Adam",
    "AdamW",
    "compile_averaging_plan",
    "compile_evaluation_plan",
    "compile_plan",
    "compile_training_plan",
    "model_tensors",
]

_RoleSpec = str | dict


# ---------------------------------------------------------------- roles
def _parse_roles(specs: Sequence[_RoleSpec], allowed, what: str) -> list[dict]:
    """``["data", "client_config:lr", {"role": "model_param", "index": 0}]`` -> dicts."""
    out: list[dict] = []
    counters: dict[str, int] = {}
    for i, spec in enumerate(specs):
        d: dict[str, Any]
        if isinstance(spec, str):
            role, _, key = spec.partition(":")
            d = {"role": role}
            if key:
                d["key"] = key
        elif isinstance(spec, dict):
            d = dict(spec)
        else:
            raise CompileError(f"{what} role #{i}: expected a str or dict, got {spec!r}")
        if d.get("role") not in allowed:
            raise CompileError(
                f"{what} role #{i}: unknown role {d.get('role')!r}; "
                f"expected one of {', '.join(allowed)}"
            )
        role = d["role"]
        if role in KEYED_ROLES:
            if not d.get("key"):
                raise CompileError(f"{what} role #{i} ({role}) needs a key, e.g. '{role}:lr'")
        else:
            d.pop("key", None)
        if role in INDEXED_ROLES:
            d.setdefault("index", counters.get(role, 0))
            counters[role] = d["index"] + 1
        else:
            d.pop("index", None)
        out.append(d)
    return out


def _slot_name(d: dict, output: bool) -> str:
    role = d["role"]
    base: str = {
        "data": "X",
        "target": "y",
        "batch_size": "batch_size",
        "count": "num",
        "loss": "loss",
        "model_param": "param",
        "model_buffer": "buffer",
        "optimizer_state": "opt_state",
        "global_param": "global",
        "average": "avg",
        "item": "item",
    }.get(role, role)
    if role in KEYED_ROLES:
        base = re.sub(r"\W", "_", d["key"])
    if role in INDEXED_ROLES:
        base = f"{base}_{d['index']}"
    if output and role in ("model_param", "model_buffer", "optimizer_state", "average"):
        base = f"new_{base}"
    return base


def _name_slots(inputs: list[dict], outputs: list[dict]) -> None:
    used: set[str] = set()
    for group, output in ((inputs, False), (outputs, True)):
        for d in group:
            name = _slot_name(d, output)
            while name in used:
                name += "_"
            used.add(name)
            d["name"] = name


def _default_input_roles(kind: str, n: int) -> list[str]:
    if kind == "training":
        if n < 5:
            raise CompileError(
                "a training function takes (X, y, batch_size, lr, *params): at least 5 "
                f"example args, got {n}"
            )
        return ["data", "target", "batch_size", "client_config:lr"] + ["model_param"] * (n - 4)
    if kind == "evaluation":
        if n < 3:
            raise CompileError(
                f"an evaluation function takes (X, y, *params): at least 3 example args, got {n}"
            )
        return ["data", "target"] + ["model_param"] * (n - 2)
    if n < 3 or n % 2 == 0:
        raise CompileError(
            f"an averaging function takes (avg..., item..., num): an odd number >= 3 of "
            f"example args, got {n}"
        )
    k = (n - 1) // 2
    return ["average"] * k + ["item"] * k + ["count"]


def _default_output_roles(kind: str, n: int, input_roles: list[dict]) -> list[str]:
    if kind == "training":
        n_params = sum(d["role"] == "model_param" for d in input_roles)
        n_buffers = sum(d["role"] == "model_buffer" for d in input_roles)
        n_state = sum(d["role"] == "optimizer_state" for d in input_roles)
        head = n - n_params - n_buffers - n_state
        if head not in (1, 2):
            raise CompileError(
                f"a training function returns (loss, acc, *updated_params): {n} outputs "
                f"for {n_params} params"
            )
        return (["loss", "metric:accuracy"][:head] + ["model_param"] * n_params
                + ["model_buffer"] * n_buffers + ["optimizer_state"] * n_state)
    if kind == "evaluation":
        return ["loss", "metric:accuracy"][:n] + [f"metric:metric_{i}" for i in range(2, n)]
    return ["average"] * n


# ---------------------------------------------------------------- args
def _to_tensor(v: Any, role: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        t = v.detach()
    elif isinstance(v, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(v))
    elif isinstance(v, bool):
        raise CompileError(f"example arg for role {role} is a bool")
    elif isinstance(v, (int, float, np.number)):
        t = torch.tensor(float(v), dtype=torch.float32)
    else:
        raise CompileError(
            f"example arg for role {role}: expected a tensor, array or number, got "
            f"{type(v).__name__}"
        )
    if t.dtype == torch.float64:
        t = t.to(torch.float32)
    return t.contiguous()


def _resize_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    idx = torch.arange(n) % t.shape[0]
    return t[idx].contiguous()


# ---------------------------------------------------------------- core
def _compile(  # noqa: C901 - the compile pipeline, step by step
    fn: Callable,
    args: list[torch.Tensor],
    kind: str,
    input_roles: list[dict],
    output_roles: list[dict] | None,
    *,
    verify: bool,
    dynamic_batch: bool,
    conv_weight_grad: str,
    tfjs: bool = False,
) -> Plan:
    from .export import attach_metadata, export_onnx
    from .trace import _requires_grad_wrapper, trace_step

    roles = [d["role"] for d in input_roles]
    grad_positions = []
    if kind == "training":
        grad_positions = [i for i, r in enumerate(roles) if r == "model_param"]
    batch_inputs = [i for i, r in enumerate(roles) if r in ("data", "target")]
    batch_inputs = [i for i in batch_inputs if args[i].dim() >= 1]
    if not dynamic_batch:
        batch_inputs = []
    if batch_inputs:
        sizes = {args[i].shape[0] for i in batch_inputs}
        if len(sizes) != 1:
            raise CompileError(f"data and target have different batch sizes {sorted(sizes)}")

    # Eager reference (also tells the number of outputs).
    eager = _requires_grad_wrapper(fn, grad_positions)
    try:
        ref = eager(*args)
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(
            f"the function fails on the example args: {type(e).__name__}: {e}"
        ) from e

    if output_roles is None:
        output_roles = _parse_roles(
            _default_output_roles(kind, len(ref), input_roles), OUTPUT_ROLES, "output"
        )
    if len(output_roles) != len(ref):
        raise CompileError(
            f"the function returns {len(ref)} outputs but {len(output_roles)} output roles "
            "were given"
        )
    _name_slots(input_roles, output_roles)

    # Is the function batch-polymorphic? Run it eagerly at another batch size.
    other = None
    if batch_inputs:
        args2 = _other_batch(args, input_roles, batch_inputs)
        try:
            other = (args2, eager(*args2))
        except Exception as e:  # noqa: BLE001 - the user's function failed: warned, not fatal
            import warnings

            warnings.warn(
                f"the function fails at another batch size ({type(e).__name__}: {e}); the "
                f"plan only accepts batches of {args[batch_inputs[0]].shape[0]}",
                stacklevel=3,
            )
            batch_inputs = []

    # Trace with a batch size >= 2 (a batch of 1 would be specialized as a constant).
    trace_args = list(args)
    if batch_inputs:
        n = args[batch_inputs[0]].shape[0]
        if n < 2:
            for i in batch_inputs:
                trace_args[i] = _resize_batch(args[i], 2)
    gm = trace_step(fn, trace_args, grad_positions=grad_positions,
                    batch_inputs=batch_inputs, conv_weight_grad=conv_weight_grad)
    tfjs_plan = _to_tfjs(gm, batch_inputs) if tfjs else None  # before export: fail fast
    in_names = [d["name"] for d in input_roles]
    out_names = [d["name"] for d in output_roles]
    try:
        model = export_onnx(gm, trace_args, input_names=in_names, output_names=out_names,
                            batch_inputs=batch_inputs)
    except CompileError as e:
        cause = str(e.__cause__ or "")
        if not batch_inputs or not any(
            w in cause for w in ("onstraint", "pecializ", "guard", "Dim(")
        ):
            raise
        # The function fixed the batch size (e.g. x.view(64, -1)): export it static.
        import warnings

        warnings.warn(
            f"the batch dimension could not be made dynamic ({e}); the plan only accepts "
            f"batches of {args[batch_inputs[0]].shape[0]}",
            stacklevel=3,
        )
        batch_inputs = []
        trace_args = list(args)
        gm = trace_step(fn, trace_args, grad_positions=grad_positions,
                        conv_weight_grad=conv_weight_grad)
        tfjs_plan = _to_tfjs(gm, batch_inputs) if tfjs else None
        model = export_onnx(gm, trace_args, input_names=in_names, output_names=out_names)

    data = attach_metadata(
        model,
        kind,
        [_meta_entry(d) for d in input_roles],
        [_meta_entry(d) for d in output_roles],
    )
    plan = Plan.from_bytes(data)
    if verify:
        _verify(plan, args, ref, other, batch_inputs)
    if tfjs_plan is not None:
        if verify:
            from .tfjs import check_against

            checks = [(args, ref)] + ([other] if batch_inputs and other is not None else [])
            check_against(tfjs_plan, checks, out_names)
        plan.tfjs = tfjs_plan.to_bytes(f"{kind}_plan")
    return plan


def _to_tfjs(gm, batch_inputs):
    from .tfjs import translate

    return translate(gm, batch_inputs)


def _meta_entry(d: dict) -> dict:
    e = {"name": d["name"], "role": d["role"]}
    if "key" in d:
        e["key"] = d["key"]
    if "index" in d:
        e["index"] = d["index"]
    return e


def _other_batch(args, input_roles, batch_inputs):
    n = args[batch_inputs[0]].shape[0]
    other = n - 1 if n > 2 else n + 1
    args2 = list(args)
    for i in batch_inputs:
        args2[i] = _resize_batch(args[i], other)
    for i, d in enumerate(input_roles):
        if d["role"] == "batch_size":  # keep its shape: PySyft passes tensor([64.0])
            args2[i] = torch.full_like(args[i], float(other))
    return args2


def _verify(plan: Plan, args, ref, other, batch_inputs) -> None:
    checks = [(list(args), ref)]
    if batch_inputs and other is not None:
        checks.append(other)
    for run_args, expected in checks:
        got = plan.execute(*run_args)
        for slot, g, r in zip(plan.outputs, got, expected, strict=True):
            err = _disagreement(g, r.numpy())
            if err is not None:
                raise CompileError(
                    f"the compiled plan disagrees with eager PyTorch on output "
                    f"{slot.describe()} (max abs error {err}, batch "
                    f"{run_args[batch_inputs[0]].shape[0] if batch_inputs else '-'})"
                )


def _disagreement(got: np.ndarray, ref: np.ndarray) -> float | str | None:
    """None when a plan's output matches eager PyTorch's (non-finite references are not
    compared), else the max abs error or "shape"."""
    if not np.all(np.isfinite(ref)):
        return None
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    if got.shape == ref.shape and np.allclose(got, ref, rtol=1e-3, atol=1e-5 * scale):
        return None
    return float(np.max(np.abs(got - ref))) if got.shape == ref.shape else "shape"


# ---------------------------------------------------------------- public API
def compile_plan(
    fn: Callable,
    example_args: Sequence[Any],
    *,
    kind: str = "training",
    input_roles: Sequence[_RoleSpec] | None = None,
    output_roles: Sequence[_RoleSpec] | None = None,
    verify: bool = True,
    dynamic_batch: bool = True,
    conv_weight_grad: str = "auto",
    tfjs: bool = False,
) -> Plan:
    """Compile a torch function into a plan.

    ``fn`` has the PyGrid signature for its ``kind``:

    * training: ``(X, y, batch_size, lr, *params) -> (loss, acc, *updated_params)``;
      the params arrive with ``requires_grad`` so ``fn`` calls ``torch.autograd.grad``;
    * evaluation: ``(X, y, *params) -> (loss, acc)``;
    * averaging: ``(avg..., item..., num) -> new_avg...``.

    Roles default to that signature; override them with strings such as ``"data"``,
    ``"client_config:lr"``, ``"model_param"``, ``"metric:accuracy"`` (indices of indexed
    roles count up in order) or dicts ``{"role", "key", "index"}``. Example::

        >>> def step(X, y, batch_size, lr, W, b):
        ...     logits = X @ W.T + b
        ...     loss = torch.nn.functional.cross_entropy(logits, y)
        ...     gW, gb = torch.autograd.grad(loss, [W, b])
        ...     acc = (logits.argmax(1) == y).float().mean()
        ...     return loss, acc, W - lr * gW, b - lr * gb
        >>> plan = compile_plan(step, (X, y, 32, 0.1, W, b))
        >>> [s.role for s in plan.inputs][2:]
        ['batch_size', 'client_config', 'model_param', 'model_param']

    The batch dimension (dim 0 of data and target) is dynamic unless the function fixes
    it. With ``verify`` (default) the plan is run on the example args and on a batch of
    another size and compared with eager PyTorch; a mismatch raises CompileError.

    With ``tfjs=True`` the plan also gets a ``tfjs`` variant (``plan.tfjs``, syft-proto
    bytes) that syft.js 0.1.4 runs; hosting a plan sends both variants. An op the tfjs
    form has no translation for raises CompileError naming it (see docs/compiler.md).
    """
    if kind not in KINDS:
        raise CompileError(f"unknown plan kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not callable(fn):
        raise CompileError(f"fn must be callable, got {type(fn).__name__}")
    example_args = list(example_args)
    if input_roles is None:
        input_roles = _default_input_roles(kind, len(example_args))
    in_roles = _parse_roles(input_roles, INPUT_ROLES, "input")
    if len(in_roles) != len(example_args):
        raise CompileError(
            f"{len(example_args)} example args but {len(in_roles)} input roles"
        )
    out_roles = None if output_roles is None else _parse_roles(output_roles, OUTPUT_ROLES, "output")
    args = [_to_tensor(a, d["role"]) for a, d in zip(example_args, in_roles, strict=True)]
    return _compile(fn, args, kind, in_roles, out_roles, verify=verify,
                    dynamic_batch=dynamic_batch, conv_weight_grad=conv_weight_grad, tfjs=tfjs)


def _module_params(module: torch.nn.Module):
    if not isinstance(module, torch.nn.Module):
        raise CompileError(f"expected a torch.nn.Module, got {type(module).__name__}")
    named = list(module.named_parameters())
    if not named:
        raise CompileError("the module has no parameters to train")
    names = [n for n, _ in named]
    params = [p.detach().clone().to(torch.float32) for _, p in named]
    return names, params


def _module_buffers(module: torch.nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """The buffers a plan carries: all of them in training mode (BatchNorm updates its
    running statistics there), none in eval mode (they are constants of the plan)."""
    if not module.training:
        return [], []
    for prefix, sub in module.named_modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and sub.momentum is None:
            raise CompileError(
                f"buffer '{prefix}.num_batches_tracked': BatchNorm with momentum=None "
                "(a cumulative average over all batches) cannot be carried by a plan; "
                "give it a momentum (e.g. the default 0.1)"
            )
    named = list(module.named_buffers())
    for name, b in named:
        if b.dtype not in (torch.float32, torch.float64, torch.int64):
            raise CompileError(
                f"buffer {name!r} is {b.dtype}; a plan carries float32 and int64 buffers"
            )
    return [n for n, _ in named], [_float32(b.detach().clone()) for _, b in named]


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32) if t.is_floating_point() else t


def model_tensors(module: torch.nn.Module) -> list[np.ndarray]:
    """The model state to host with the plans of ``module``: its params, then (in
    training mode) its buffers, as the plans' ``model_param`` and ``model_buffer``
    inputs number them.

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> [t.shape for t in model_tensors(net)]
        [(4, 3), (4,), (4,), (4,), (4,), (4,), ()]
    """
    _, params = _module_params(module)
    _, buffers = _module_buffers(module)
    return [t.numpy() for t in (*params, *buffers)]


def _check_buffers_unchanged(module: torch.nn.Module, run: Callable[[], Any]) -> None:
    """In eval mode buffers are constants of the plan: a module that still changes one
    (a custom layer's counter) cannot be compiled that way."""
    before = {n: b.detach().clone() for n, b in module.named_buffers()}
    run()
    for name, b in module.named_buffers():
        if name in before and not torch.equal(before[name], b):
            module.load_state_dict(before, strict=False)
            raise CompileError(
                f"buffer {name!r} changes during the step, which a plan compiled in eval "
                "mode cannot carry; compile in training mode (module.train()) so the plan "
                "carries it as a model_buffer"
            )


def _example_target(example_target, loss: str) -> torch.Tensor:
    t = _to_tensor(example_target, "target")
    if loss == "cross_entropy":
        if t.is_floating_point():
            raise CompileError(
                "loss='cross_entropy' takes class-index targets (int64, shape (N,)); for "
                "one-hot float targets use loss='cross_entropy_onehot'"
            )
        return t.to(torch.int64)
    return t.to(torch.float32)


def compile_training_plan(
    module: torch.nn.Module,
    *,
    loss: str = "cross_entropy",
    optimizer: Optimizer | torch.optim.Optimizer | None = None,
    example_data: Any,
    example_target: Any,
    verify: bool = True,
    conv_weight_grad: str = "auto",
    proximal_mu: float | None = None,
    tfjs: bool = False,
    cache: PlanCache | str | os.PathLike | bool | None = None,
) -> Plan:
    """Compile one training step of ``module`` with a standard loss and optimizer.

    Plan inputs: ``X`` (data), ``y`` (target), ``batch_size``, ``lr`` (client_config
    ``"lr"``), one ``model_param`` per ``module.named_parameters()`` (in that order),
    in training mode one ``model_buffer`` per ``module.named_buffers()`` (BatchNorm's
    running mean, variance and count), then the optimizer's ``optimizer_state`` (SGD
    momentum buffers; Adam's moments and step count), all zeros at the first step.
    Outputs: ``loss``, ``accuracy`` (metric; absent for single-output MSE), the updated
    params, buffers and optimizer state. The loss is divided by ``batch_size``.

    ``proximal_mu`` (FedProx, Li et al. 2020) adds ``mu / 2 * ||w - w_global||^2``, summed
    over every param, to the loss the step differentiates (and reports). The plan then
    also takes one ``global_param`` per param (the params as downloaded, which workers
    bind themselves) and ``mu`` as the ``client_config`` input ``"proximal_mu"``, which a
    node running ``{"name": "fedprox", "proximal_mu": ...}`` sends; the value given here
    is only the example the plan is verified with (a nonzero one is used when it is 0, so
    the check covers the term). Without it the plan is exactly what it was before.

    ``cache``: compiled plans are kept in a cache keyed by everything they depend on
    (the module's layers, their classes' source files, shapes, loss, optimizer, options,
    the gridfl, torch and onnx versions), so compiling the same model again takes
    milliseconds. ``None``: the default directory (``$GRIDFL_PLAN_CACHE``, ``off`` to
    disable); ``False``: no cache; a directory or :class:`gridfl.plan_cache.PlanCache`.

    ``loss``: ``"cross_entropy"`` (int64 class indices), ``"cross_entropy_onehot"``
    (float one-hot targets) or ``"mse"``. ``optimizer``: :class:`SGD`, :class:`Adam`,
    :class:`AdamW` or the matching ``torch.optim`` instance. The module is traced in its
    current mode: in training mode BatchNorm normalizes with batch statistics and
    updates the running statistics the plan carries (host :func:`model_tensors` as the
    model); Dropout must be in eval mode (it draws random numbers).

        >>> plan = compile_training_plan(net, loss="cross_entropy",
        ...     optimizer=SGD(lr=0.1, momentum=0.9), example_data=X[:16],
        ...     example_target=y[:16])
        >>> plan.client_config_keys, plan.num_optimizer_state
        (['lr'], 4)

    ``tfjs=True`` adds the tfjs variant syft.js runs (see :func:`compile_plan`)::

        >>> plan = compile_training_plan(net, loss="cross_entropy_onehot", tfjs=True,
        ...     example_data=X[:16], example_target=Y[:16])
        >>> plan.tfjs is not None  # syft-proto bytes of the same step
        True
        >>> host.host(model=model_tensors(net), plans={"training_plan": plan},
        ...           client_config=cc)                             # doctest: +SKIP
    """
    opt = as_optimizer(optimizer)
    loss_fn = get_loss(loss)
    mu = _check_proximal_mu(proximal_mu)
    names, params = _module_params(module)
    buffer_names, buffers = _module_buffers(module)
    X = _to_tensor(example_data, "data")
    y = _example_target(example_target, loss)
    key = _cache_key("training", module, X, y, loss=loss, optimizer=repr(opt),
                     proximal_mu=mu, verify=verify, conv_weight_grad=conv_weight_grad,
                     tfjs=tfjs)

    def build() -> Plan:
        n_params, n_buffers = len(params), len(buffers)
        state = opt.example_state(params)  # a worker starts from zeros of these shapes
        n_state = len(state)

        def step(X, y, batch_size, lr, *rest):
            ps = rest[:n_params]
            # the step updates copies of its buffer inputs, and returns them
            bufs = [b.clone() for b in rest[n_params:n_params + n_buffers]]
            st = rest[n_params + n_buffers:n_params + n_buffers + n_state]
            tensors = {**dict(zip(names, ps, strict=True)),
                       **dict(zip(buffer_names, bufs, strict=True))}
            out = torch.func.functional_call(module, tensors, (X,))
            value = loss_fn(out, y, batch_size)
            grads = torch.autograd.grad(value, ps, allow_unused=True, materialize_grads=True)
            if mu is not None:
                *globals_, mu_in = rest[n_params + n_buffers + n_state:]
                value, grads = _add_proximal_term(value, grads, ps, globals_, mu_in)
            new_p, new_s = opt.step(ps, grads, lr, st)
            acc = accuracy(out.detach(), y, batch_size, loss)
            head = (value,) if acc is None else (value, acc)
            return (*head, *new_p, *bufs, *new_s)

        args = [X, y, torch.tensor(float(X.shape[0])), torch.tensor(float(opt.lr)), *params,
                *buffers, *state]
        in_roles = ["data", "target", "batch_size", "client_config:lr"]
        in_roles += ["model_param"] * n_params + ["model_buffer"] * n_buffers
        in_roles += ["optimizer_state"] * len(state)
        if mu is not None:
            # distinct from the params, so the verification sees the term's gradient
            args += [p * 0.5 + 0.01 for p in params] + [torch.tensor(mu or _EXAMPLE_MU)]
            in_roles += ["global_param"] * n_params + ["client_config:proximal_mu"]
        if not module.training:
            _check_buffers_unchanged(module, lambda: step(*_with_grad(args, n_params)))
        return compile_plan(step, args, kind="training", input_roles=in_roles, verify=verify,
                            conv_weight_grad=conv_weight_grad, tfjs=tfjs)

    return _through_cache(cache, key, build)


def _cache_key(kind: str, module, X, y, **options) -> Callable[[], dict]:
    """The key of a module's plan, described only when a cache is used (describing hashes
    the buffers' values)."""
    from gridfl.plan_cache import plan_key

    from .cache_key import module_description, tensor_spec

    return lambda: plan_key(kind, {"module": module_description(module),
                                   "data": tensor_spec(X), "target": tensor_spec(y)},
                            **options)


def _through_cache(cache: PlanCache | str | os.PathLike | bool | None,
                   key: Callable[[], dict], build: Callable[[], Plan]) -> Plan:
    """The plan stored under ``key()`` in the cache, else ``build()`` (which compiles and
    verifies it), stored there with its tfjs variant."""
    store = resolve_cache(cache)
    if store is None:
        return build()
    entry = key()
    cached = _cached_plan(store, entry)
    if cached is not None:
        return cached
    plan = build()
    store.put(entry, {"plan": plan.to_bytes(), **({"tfjs": plan.tfjs} if plan.tfjs else {})})
    return plan


def _cached_plan(store: PlanCache, key: dict) -> Plan | None:
    blobs = store.get(key)
    if blobs is None or set(blobs) - {"tfjs"} != {"plan"}:
        return None
    try:
        plan = Plan.from_bytes(blobs["plan"])
    except GridflError:  # a valid entry of bytes that are no plan: compile again
        return None
    plan.tfjs = blobs.get("tfjs")
    return plan


_EXAMPLE_MU = 0.1


def _check_proximal_mu(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        np.isfinite(value) and value >= 0
    ):
        raise CompileError(f"proximal_mu must be a finite number >= 0, got {value!r}")
    return float(value)


def _add_proximal_term(value, grads, params, global_params, mu: torch.Tensor):
    """FedProx's ``mu / 2 * ||w - w_global||^2`` over all params (Li et al. 2020, eq. 2)
    added to the loss, and its gradient ``mu (w - w_global)`` to the loss's gradients.
    Written out rather than left to autograd: autograd's form (Pow, Expand, and a
    backward that defeats the Gemm fusion) made a 2NN step about 10x slower."""
    diffs = [(p - g).detach() for p, g in zip(params, global_params, strict=True)]
    total = sum((d * d).sum() for d in diffs)
    new_grads = [gr + mu * d for gr, d in zip(grads, diffs, strict=True)]
    return value + mu / 2 * total, new_grads


def _with_grad(args: list[torch.Tensor], n_params: int) -> list[torch.Tensor]:
    return [a.detach().requires_grad_(True) if 4 <= i < 4 + n_params else a
            for i, a in enumerate(args)]


def compile_evaluation_plan(
    module: torch.nn.Module,
    *,
    loss: str = "cross_entropy",
    example_data: Any,
    example_target: Any,
    verify: bool = True,
    tfjs: bool = False,
    cache: PlanCache | str | os.PathLike | bool | None = None,
) -> Plan:
    """Compile ``(X, y, *params) -> (loss, accuracy)`` for ``module`` (traced in eval mode).

        >>> plan = compile_evaluation_plan(net, example_data=X[:16],
        ...                                example_target=y[:16])
        >>> loss, acc = plan.execute(X_test, y_test, *params)

    The loss is the mean over the batch; ``cache`` as for :func:`compile_training_plan`.
    A module in training mode (one whose training
    plan carries its buffers) gets its buffers as ``model_buffer`` inputs after the
    params, so BatchNorm normalizes with the running statistics of the checkpoint.

    ``tfjs=True`` adds a tfjs variant, checked against eager PyTorch like the training
    plan's. syft.js 0.1.4 runs no evaluation plans, so it is there for clients that do;
    an op without a tfjs translation raises :class:`gridfl.CompileError` naming it.
    """
    loss_fn = get_loss(loss)
    names, params = _module_params(module)
    buffer_names, buffers = _module_buffers(module)
    n_params = len(params)
    X = _to_tensor(example_data, "data")
    y = _example_target(example_target, loss)

    def evaluate(X, y, *rest):
        tensors = {**dict(zip(names, rest[:n_params], strict=True)),
                   **dict(zip(buffer_names, rest[n_params:], strict=True))}
        out = torch.func.functional_call(module, tensors, (X,))
        n = X.shape[0]
        value = loss_fn(out, y, n)
        acc = accuracy(out, y, n, loss)
        return (value,) if acc is None else (value, acc)

    def build() -> Plan:
        was_training = module.training
        module.eval()
        try:
            roles = (["data", "target"] + ["model_param"] * n_params
                     + ["model_buffer"] * len(buffers))
            return compile_plan(evaluate, [X, y, *params, *buffers], kind="evaluation",
                                input_roles=roles, verify=verify, tfjs=tfjs)
        finally:
            module.train(was_training)

    key = _cache_key("evaluation", module, X, y, loss=loss, verify=verify, tfjs=tfjs)
    return _through_cache(cache, key, build)


def compile_averaging_plan(example_params: Sequence[Any], *, verify: bool = True) -> Plan:
    """Compile the iterative averaging plan ``(avg..., item..., num) -> new_avg...``.

    ``new_avg = (avg * num + item) / (num + 1)`` per param: folding items in one at a
    time with ``num = 0, 1, 2, ...`` gives their mean.

        >>> plan = compile_averaging_plan(model.params)
        >>> avg = [np.zeros_like(p) for p in model.params]
        >>> for n, diff in enumerate([model.params, model.params]):
        ...     avg = plan.execute(*avg, *diff, n)
        >>> np.allclose(avg[0], model.params[0])
        True
    """
    params = [_to_tensor(p, "average").to(torch.float32) for p in example_params]
    if not params:
        raise CompileError("compile_averaging_plan needs at least one example param")
    k = len(params)

    def average(*args):
        avg, item, num = args[:k], args[k : 2 * k], args[2 * k]
        return tuple((a * num + i) / (num + 1) for a, i in zip(avg, item, strict=True))

    args = [*params, *[p * 0.5 + 1 for p in params], torch.tensor(3.0)]
    return compile_plan(average, args, kind="averaging", verify=verify)
