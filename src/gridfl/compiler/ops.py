"""gridfl's own torch ops for the backward pass, with eager kernels and ONNX translations.

The compiler traces a training step with these ops where the core ATen decomposition
either has no ONNX translation or a slow one:

* ``gridfl::max_pool2d``: max-pool with *flat* indices (over N*C*H*W, the ONNX
  convention). Windows that tile the map are laid out on one axis for a ``ReduceMax``
  and an ``ArgMax``; others run ONE ``MaxPool`` node with both outputs (the stock
  exporter computes a second ``MaxPool`` over the whole input to convert indices).
* ``gridfl::max_pool2d_backward``: the pooled gradient stored at those flat indices:
  one ``MaxUnpool`` when windows do not overlap, else ``ScatterElements(add)``.
* ``gridfl::conv2d_weight_grad``: the weight gradient of a 2-D convolution, per kernel
  offset a ``Slice`` of the input and a ``MatMul`` (see decompositions.py).
* ``gridfl::threshold_backward``: ``grad * (y > threshold)``, ReLU's backward as an
  elementwise multiply by a cast mask instead of a ``Where``.
* ``gridfl::channel_affine``: ``x * scale[c] + shift[c]`` over dim 1 (BatchNorm's
  normalization and its input gradient) in one pass, as onnxruntime's
  ``BatchNormalization`` with mean 0 and variance 1, not a ``Mul`` and an ``Add``.

Every op has an eager kernel (for verification), a fake kernel (for symbolic tracing)
and a translation used by ``torch.onnx.export(custom_translation_table=...)``. The
translations emit standard ONNX ops only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx import TensorProto
from onnx.helper import make_tensor
from onnxscript import opset18 as op

__all__ = ["translation_table"]


# ---------------------------------------------------------------- max pool, flat indices
@torch.library.custom_op("gridfl::max_pool2d", mutates_args=())
def max_pool2d(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    chw: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    out, idx = F.max_pool2d(
        x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True
    )
    n, c, h, w = x.shape
    base = torch.arange(n * c, device=x.device, dtype=torch.int64).view(n, c, 1, 1) * (h * w)
    return out, idx + base


@max_pool2d.register_fake
def _max_pool2d_fake(x, kernel_size, stride, padding, dilation, ceil_mode, chw):
    out, idx = torch.ops.aten.max_pool2d_with_indices.default(
        x, kernel_size, stride, padding, dilation, ceil_mode
    )
    return out, idx


def why_windows_do_not_tile(kernel_size, stride, padding, dilation, h: int, w: int):
    """``None`` when max-pool windows tile an ``h`` x ``w`` map (stride = kernel, no
    padding or dilation, the kernel dividing the map), else what stops them, as a phrase
    for an error message."""
    kh, kw = kernel_size
    if list(stride) != [kh, kw] or any(padding) or list(dilation) != [1, 1]:
        return "with overlapping, padded or dilated windows"
    if h % kh or w % kw:
        return f"over {h}x{w} maps that {kh}x{kw} windows do not tile"
    return None


def _max_pool2d_onnx(x, kernel_size, stride, padding, dilation, ceil_mode, chw):
    c, h, w = chw
    if why_windows_do_not_tile(kernel_size, stride, padding, dilation, h, w) is None:
        return _max_pool2d_tiled(x, *kernel_size, c, h, w)
    out, idx = op.MaxPool(
        x,
        kernel_shape=list(kernel_size),
        strides=list(stride),
        pads=[padding[0], padding[1], padding[0], padding[1]],
        dilations=list(dilation),
        ceil_mode=int(bool(ceil_mode)),
    )
    return out, idx


def _max_pool2d_tiled(x, kh, kw, c, h, w):
    """Windows that tile the map, laid out on one axis: their maximum by ``ReduceMax``
    and its first position by ``ArgMax`` (row-major in the window, as torch breaks
    ties). onnxruntime's ``MaxPool`` computes its indices in a scalar loop: the CNN's
    first pool and its backward took 7.3 ms at batch 64, against 4.5 ms this way."""
    ho, wo = h // kh, w // kw
    grid = op.Reshape(x, op.Constant(value_ints=[-1, c, ho, kh, wo, kw]))
    windows = op.Reshape(op.Transpose(grid, perm=[0, 1, 2, 4, 3, 5]),
                         op.Constant(value_ints=[-1, c, ho, wo, kh * kw]))
    first = op.Cast(op.ArgMax(windows, axis=4, keepdims=0), to=TensorProto.FLOAT)
    # flat index ((n*C + c)*H + i*kh + r)*W + j*kw + s, (r, s) = divmod(k, kw): k + r*(W-kw)
    rows = op.Floor(op.Div(first, op.Constant(value_float=float(kw))))
    offset = op.Cast(op.Add(first, op.Mul(rows, op.Constant(value_float=float(w - kw)))),
                     to=TensorProto.INT64)
    corners = op.Constant(value_ints=[i * kh * w + j * kw for i in range(ho) for j in range(wo)])
    offset = op.Add(offset, op.Reshape(corners, op.Constant(value_ints=[1, 1, ho, wo])))
    planes = op.Mul(op.Shape(x, start=0, end=1), op.Constant(value_ints=[c]))
    planes = op.Range(op.Constant(value_int=0), op.Squeeze(planes),
                      op.Constant(value_int=1))
    planes = op.Reshape(op.Mul(planes, op.Constant(value_int=h * w)),
                        op.Constant(value_ints=[-1, c, 1, 1]))
    out = op.ReduceMax(windows, op.Constant(value_ints=[4]), keepdims=0)
    return out, op.Add(offset, planes)


@torch.library.custom_op("gridfl::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    flat_indices: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    accumulate: bool,
) -> torch.Tensor:
    flat = torch.zeros(x.numel(), dtype=grad.dtype, device=grad.device)
    flat.scatter_add_(0, flat_indices.reshape(-1), grad.reshape(-1))
    return flat.view(x.shape)


@max_pool2d_backward.register_fake
def _max_pool2d_backward_fake(grad, x, flat_indices, kernel_size, stride, padding, accumulate):
    return torch.empty_like(x, dtype=grad.dtype)


def _max_pool2d_backward_onnx(grad, x, flat_indices, kernel_size, stride, padding, accumulate):
    if not accumulate:
        # Windows do not overlap: every input element receives at most one gradient, so
        # MaxUnpool (a plain indexed store, ~10x faster than ScatterElements in ORT).
        return op.MaxUnpool(
            grad,
            flat_indices,
            op.Shape(x),
            kernel_shape=list(kernel_size),
            strides=list(stride),
            pads=[padding[0], padding[1], padding[0], padding[1]],
        )
    size = op.Reshape(op.Size(x), op.Constant(value_ints=[1]))
    zeros = op.CastLike(op.ConstantOfShape(size), grad)
    minus1 = op.Constant(value_ints=[-1])
    scattered = op.ScatterElements(
        zeros,
        op.Reshape(flat_indices, minus1),
        op.Reshape(grad, minus1),
        axis=0,
        reduction="add",
    )
    return op.Reshape(scattered, op.Shape(x))


# ---------------------------------------------------------------- conv2d weight gradient
@torch.library.custom_op("gridfl::conv2d_weight_grad", mutates_args=())
def conv2d_weight_grad(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weight_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    out_hw: list[int],
    method: str,
) -> torch.Tensor:
    w = torch.empty(weight_size, dtype=x.dtype)
    return torch.ops.aten.convolution_backward.default(
        grad_output, x, w, None, stride, padding, dilation, False, [0, 0], 1,
        [False, True, False],
    )[1]


@conv2d_weight_grad.register_fake
def _conv2d_weight_grad_fake(grad_output, x, weight_size, stride, padding, dilation, out_hw,
                             method):
    return x.new_empty(weight_size)


def _conv2d_weight_grad_onnx(grad_output, x, weight_size, stride, padding, dilation, out_hw,
                             method):
    co, ci, kh, kw = weight_size
    (s0, s1), (p0, p1), (d0, d1) = stride, padding, dilation
    ho, wo = out_hw
    ints = lambda v: op.Constant(value_ints=list(v))  # noqa: E731
    g2 = op.Reshape(op.Transpose(grad_output, perm=[1, 0, 2, 3]), ints([co, -1]))  # (Co, M)
    if method == "per_offset":
        # NHWC input; per kernel offset one strided Slice (N, Ho, Wo, Ci) and one GEMM
        # (Co, M) @ (M, Ci): no im2col buffer, fat inner dimension M = N*Ho*Wo.
        xn = op.Transpose(x, perm=[0, 2, 3, 1])
        if p0 or p1:
            xn = op.Pad(xn, ints([0, p0, p1, 0, 0, p0, p1, 0]))
        parts = []
        axes, steps, rows = ints([1, 2]), ints([s0, s1]), ints([-1, ci])
        for i in range(kh):
            for j in range(kw):
                sl = op.Slice(
                    xn,
                    ints([i * d0, j * d1]),
                    ints([i * d0 + s0 * (ho - 1) + 1, j * d1 + s1 * (wo - 1) + 1]),
                    axes,
                    steps,
                )
                parts.append(op.Unsqueeze(op.MatMul(g2, op.Reshape(sl, rows)), ints([2])))
        gw = parts[0] if len(parts) == 1 else op.Concat(*parts, axis=2)  # (Co, Ci, KK)
        return op.Reshape(gw, ints([co, ci, kh, kw]))
    if method == "shift":
        # Stride 1, no dilation. Each image's padded rows flattened: the gradient at offset
        # (i, j) sums g[q] * x[q + i*Wp + j], g widened to the padded width by zeros so no
        # shift crosses a row. Per offset one contiguous Slice and a MatMul per image
        # (Ci, L) @ (L, Co), the grad output transposed once.
        wp = wo + kw - 1
        length = ho * wp
        gt = op.Pad(grad_output, ints([0, 0, 0, 0, 0, 0, 0, kw - 1]))
        gt = op.Transpose(op.Reshape(gt, ints([0, co, length])), perm=[0, 2, 1])  # (N, L, Co)
        xf = op.Pad(x, ints([0, 0, p0, p1, 0, 0, p0 + 1, p1]))  # a spare row: the last shift
        xf = op.Reshape(xf, ints([0, ci, -1]))  # (N, Ci, (Hp + 1) * Wp)
        parts = []
        for i in range(kh):
            for j in range(kw):
                sl = op.Slice(xf, ints([i * wp + j]), ints([i * wp + j + length]), ints([2]))
                parts.append(op.Unsqueeze(op.MatMul(sl, gt), ints([3])))  # (N, Ci, Co, 1)
        gw = op.ReduceSum(op.Concat(*parts, axis=3), ints([0]), keepdims=0)  # (Ci, Co, KK)
        return op.Reshape(op.Transpose(gw, perm=[1, 0, 2]), ints([co, ci, kh, kw]))
    # "conv": correlate the (C<->N transposed) input with the transposed grad output.
    xt = op.Transpose(x, perm=[1, 0, 2, 3])  # (Ci, N, H, W)
    gt = op.Transpose(grad_output, perm=[1, 0, 2, 3])  # (Co, N, Ho, Wo)
    gw = op.Conv(xt, gt, pads=[p0, p1, p0, p1], strides=[d0, d1], dilations=[s0, s1])
    gw = op.Slice(gw, ints([0, 0]), ints([kh, kw]), ints([2, 3]))  # (Ci, Co, kh, kw)
    return op.Transpose(gw, perm=[1, 0, 2, 3])


# ---------------------------------------------------------------- relu / threshold backward
@torch.library.custom_op("gridfl::threshold_backward", mutates_args=())
def threshold_backward(grad: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
    return grad * (y > threshold).to(grad.dtype)


@threshold_backward.register_fake
def _threshold_backward_fake(grad, y, threshold):
    return torch.empty(torch.broadcast_shapes(grad.shape, y.shape), dtype=grad.dtype)


def _threshold_backward_onnx(grad, y, threshold):
    thr = op.CastLike(op.Constant(value_float=float(threshold)), y)
    return op.Mul(grad, op.CastLike(op.Greater(y, thr), grad))


# ---------------------------------------------------------------- per-channel affine
def per_channel(x: torch.Tensor) -> tuple[list[int], list[int], int]:
    """For per-channel statistics of an ``(N, C, ...)`` tensor: the dims they reduce, the
    shape that broadcasts a ``(C,)`` vector against ``x``, and the values per channel."""
    return [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2), x.numel() // x.shape[1]


@torch.library.custom_op("gridfl::channel_affine", mutates_args=())
def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    _, shape, _ = per_channel(x)
    return x * scale.reshape(shape) + shift.reshape(shape)


@channel_affine.register_fake
def _channel_affine_fake(x, scale, shift):
    return torch.empty_like(x)


_ONE = make_tensor("one", TensorProto.FLOAT, [1], [1.0])


def _channel_affine_onnx(x, scale, shift):
    # With mean 0, variance 1 and epsilon 0 the normalization is x * scale + shift exactly
    # (1 / sqrt(1) is 1): one pass over x, where Mul and Add take two.
    zeros = op.CastLike(op.ConstantOfShape(op.Shape(scale)), scale)
    ones = op.CastLike(op.ConstantOfShape(op.Shape(scale), value=_ONE), scale)
    return op.BatchNormalization(x, scale, shift, zeros, ones, epsilon=0.0)


def translation_table() -> dict:
    """Custom translations for ``torch.onnx.export(custom_translation_table=...)``."""
    from . import recurrent

    return {
        **recurrent.translation_table(),
        torch.ops.gridfl.max_pool2d.default: _max_pool2d_onnx,
        torch.ops.gridfl.max_pool2d_backward.default: _max_pool2d_backward_onnx,
        torch.ops.gridfl.threshold_backward.default: _threshold_backward_onnx,
        torch.ops.gridfl.conv2d_weight_grad.default: _conv2d_weight_grad_onnx,
        torch.ops.gridfl.channel_affine.default: _channel_affine_onnx,
    }
