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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gridfl._exceptions import CompileError
from gridfl.plan import INPUT_ROLES, KINDS, OUTPUT_ROLES, Plan
from gridfl.plan_cache import PlanCache

from .cache_key import cache_key, through_cache
from .losses import LOSSES, accuracy, get_loss
from .optim import SGD, Adam, AdamW, Optimizer, as_optimizer
from .roles import (
    RoleSpec,
    default_input_roles,
    default_output_roles,
    meta_entry,
    name_slots,
    parse_roles,
)
from .verify import other_batch, resize_batch, verify_plan

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
        output_roles = parse_roles(
            default_output_roles(kind, len(ref), input_roles), OUTPUT_ROLES, "output"
        )
    if len(output_roles) != len(ref):
        raise CompileError(
            f"the function returns {len(ref)} outputs but {len(output_roles)} output roles "
            "were given"
        )
    name_slots(input_roles, output_roles)

    # Is the function batch-polymorphic? Run it eagerly at another batch size.
    other = None
    if batch_inputs:
        args2 = other_batch(args, input_roles, batch_inputs)
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
                trace_args[i] = resize_batch(args[i], 2)
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
        [meta_entry(d) for d in input_roles],
        [meta_entry(d) for d in output_roles],
    )
    plan = Plan.from_bytes(data)
    if verify:
        verify_plan(plan, args, ref, other, batch_inputs)
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


# ---------------------------------------------------------------- public API
def compile_plan(
    fn: Callable,
    example_args: Sequence[Any],
    *,
    kind: str = "training",
    input_roles: Sequence[RoleSpec] | None = None,
    output_roles: Sequence[RoleSpec] | None = None,
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

    ``conv_weight_grad`` chooses how a convolution's weight gradient is written:
    ``"auto"`` (the fastest measured for the layer's shape), ``"per_offset"``, ``"shift"``
    (stride 1 only) or ``"conv"``; all give the same values.

    With ``tfjs=True`` the plan also gets a ``tfjs`` variant (``plan.tfjs``, syft-proto
    bytes) that syft.js 0.1.4 runs; hosting a plan sends both variants. An op the tfjs
    form has no translation for raises CompileError naming it (see docs/plans.md).
    """
    if kind not in KINDS:
        raise CompileError(f"unknown plan kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not callable(fn):
        raise CompileError(f"fn must be callable, got {type(fn).__name__}")
    example_args = list(example_args)
    if input_roles is None:
        input_roles = default_input_roles(kind, len(example_args))
    in_roles = parse_roles(input_roles, INPUT_ROLES, "input")
    if len(in_roles) != len(example_args):
        raise CompileError(
            f"{len(example_args)} example args but {len(in_roles)} input roles"
        )
    out_roles = None if output_roles is None else parse_roles(output_roles, OUTPUT_ROLES, "output")
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
    key = cache_key("training", module, X, y, loss=loss, optimizer=repr(opt),
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

    return through_cache(cache, key, build)


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

    key = cache_key("evaluation", module, X, y, loss=loss, verify=verify, tfjs=tfjs)
    return through_cache(cache, key, build)


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
