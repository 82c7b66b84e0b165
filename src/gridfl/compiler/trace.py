"""Trace a whole training step (forward, loss, autograd, update) into one ATen FX graph.

``make_fx`` with symbolic shapes runs the function on proxy tensors; autograd runs
too, so ``torch.autograd.grad`` inside the function records the backward ops, which the
decomposition table (``decompositions.py``) lowers to ops with a fast ONNX form. Then a
few graph passes tidy the result (see :func:`_drop_views` and
:func:`_swap_relu_mask_and_pool_scatter`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from gridfl._exceptions import CompileError

from .decompositions import decomposition_table
from .recurrent import rnns_as_scans

__all__ = ["trace_step"]

aten = torch.ops.aten
gridfl_ops = torch.ops.gridfl


def _requires_grad_wrapper(fn: Callable, grad_positions: Sequence[int]) -> Callable:
    positions = frozenset(grad_positions)

    def step(*args):
        args = [
            a.detach().requires_grad_(True) if i in positions else a
            for i, a in enumerate(args)
        ]
        with torch.enable_grad():
            out = fn(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        if not isinstance(out, (tuple, list)) or not all(
            isinstance(o, torch.Tensor) for o in out
        ):
            raise CompileError(
                "the function must return a tensor or a tuple/list of tensors, got "
                f"{type(out).__name__}"
            )
        # Outputs must not be views of inputs or carry autograd history into the plan.
        return tuple(o.detach() for o in out)

    return step


def trace_step(
    fn: Callable,
    args: Sequence[torch.Tensor],
    *,
    grad_positions: Sequence[int] = (),
    batch_inputs: Sequence[int] = (),
    conv_weight_grad: str = "auto",
) -> torch.fx.GraphModule:
    """Trace ``fn(*args)`` into an ATen FX graph whose only symbolic size is the batch
    (dim 0 of the args at ``batch_inputs``).

    ``grad_positions``: indices of args that get ``requires_grad`` inside the trace
    (the model params and optimizer inputs of a training step).
    """
    step = _requires_grad_wrapper(fn, grad_positions)
    table = decomposition_table(conv_weight_grad=conv_weight_grad)
    try:
        fake_args = _fake_args(args, batch_inputs)
        with rnns_as_scans():
            gm = make_fx(step, decomposition_table=table, tracing_mode="symbolic")(*fake_args)
    except CompileError:
        raise
    except Exception as e:  # torch wraps errors raised inside decompositions
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, CompileError):
                raise CompileError(str(cause)) from None
            cause = cause.__cause__ or cause.__context__
        raise CompileError(f"tracing the function failed: {type(e).__name__}: {e}") from e
    _check_pool_indices(gm)
    _drop_views(gm)
    _swap_relu_mask_and_pool_scatter(gm)
    _sum_before_pool_scatter(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _fake_args(args: Sequence[torch.Tensor], batch_inputs: Sequence[int]) -> list:
    """Fake copies of ``args`` in one shape environment, every size static but the
    batch's: with all sizes symbolic (make_fx's default) each view and reshape of a
    conv feature map made sympy prove facts about products of unknowns, over half of
    the CNN's compile time."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    mode = FakeTensorMode(
        shape_env=ShapeEnv(),
        allow_non_fake_inputs=True,  # module buffers (BatchNorm stats) as constants
    )
    batch = frozenset(batch_inputs)
    fakes = []
    for i, t in enumerate(args):
        dims = [DimDynamic.STATIC] * t.dim()
        if i in batch and dims:
            dims[0] = DimDynamic.DYNAMIC
        context: StatelessSymbolicContext = StatelessSymbolicContext(
            dynamic_sizes=dims, constraint_sizes=[None] * t.dim()
        )
        fakes.append(mode.from_tensor(t, symbolic_context=context))
    return fakes


def _is(node: torch.fx.Node, target) -> bool:
    return node.op == "call_function" and node.target is target


_VIEWS = (aten.alias.default, aten.detach.default)


def _drop_views(gm: torch.fx.GraphModule) -> int:
    """Read through the ``alias``/``detach`` views autograd wraps saved tensors (and the
    step's outputs) in, so each pass sees the node that computes a value; after tracing
    they change nothing. Returns the number of views dropped."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _VIEWS:
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        count += 1
    return count


def _check_pool_indices(gm: torch.fx.GraphModule) -> None:
    """Flat max-pool indices may only feed gridfl's max-pool backward."""
    for node in gm.graph.nodes:
        if not _is(node, gridfl_ops.max_pool2d.default):
            continue
        for user in node.users:
            if _is(user, operator.getitem) and user.args[1] == 1:
                for use in user.users:
                    if not _is(use, gridfl_ops.max_pool2d_backward.default):
                        raise CompileError(
                            "max_pool2d(return_indices=True): using max-pool indices in the "
                            "model is not supported"
                        )


def _swap_relu_mask_and_pool_scatter(gm: torch.fx.GraphModule) -> int:
    """``relu_mask(scatter(g, idx), r)`` -> ``scatter(relu_mask(g, pooled), idx)``.

    For ``pooled, idx = max_pool(r)`` with ``r = relu(x)``, the backward of
    ``max_pool(relu(x))`` masks the full-size scattered gradient with ``r > 0``. The
    scatter only writes where ``r`` equals ``pooled``, so masking the pooled gradient
    with ``pooled > 0`` before the scatter is exactly the same, on a tensor k*k times
    smaller. Returns the number of rewrites.
    """
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if not _is(node, gridfl_ops.threshold_backward.default):
            continue
        scat, y, thr = node.args
        if not _is(scat, gridfl_ops.max_pool2d_backward.default) or len(scat.users) != 1:
            continue
        g, relu_out, idx = scat.args[:3]
        if y is not relu_out or thr != 0.0:
            continue
        if not (_is(idx, operator.getitem) and idx.args[1] == 1):
            continue
        pool = idx.args[0]
        if not _is(pool, gridfl_ops.max_pool2d.default):
            continue
        if pool.args[0] is not relu_out:
            continue
        pooled = next(
            (u for u in pool.users if _is(u, operator.getitem) and u.args[1] == 0), None
        )
        if pooled is None:
            with graph.inserting_after(pool):
                pooled = graph.call_function(operator.getitem, (pool, 0))
        with graph.inserting_before(scat):
            masked = graph.call_function(gridfl_ops.threshold_backward.default, (g, pooled, 0.0))
            new_scat = graph.call_function(
                gridfl_ops.max_pool2d_backward.default, (masked, *scat.args[1:])
            )
        for key in ("val", "tensor_meta"):
            if key in node.meta:
                new_scat.meta[key] = node.meta[key]
            if key in g.meta:
                masked.meta[key] = g.meta[key]
        node.replace_all_uses_with(new_scat)
        graph.erase_node(node)
        graph.erase_node(scat)
        count += 1
    return count


def _sum_before_pool_scatter(gm: torch.fx.GraphModule) -> int:
    """``sum(scatter(g, idx), dims)`` -> ``sum(g, dims)`` when ``dims`` hold both
    spatial axes.

    A max-pool backward without overlapping windows moves each pooled gradient to one
    place in the same image and channel, so its sum over height and width is the pooled
    gradient's (a conv bias's gradient), read from a tensor k*k times smaller. Returns
    the number of rewrites.
    """
    count = 0
    for node in gm.graph.nodes:
        if not _is(node, aten.sum.dim_IntList):
            continue
        scat, dims = node.args[:2]
        if not _is(scat, gridfl_ops.max_pool2d_backward.default):
            continue
        *_, overlapping = scat.args  # windows that overlap add up: not a move
        if overlapping:
            continue
        if dims is None or not {2, 3} <= {d % 4 for d in dims}:
            continue
        node.args = (scat.args[0], *node.args[1:])
        count += 1
    return count
