"""tfjs translations of 2-D convolution, max-pool and their backward passes.

tfjs-core convolves NHWC tensors with ``[kh, kw, in, out]`` filters, so each op is
wrapped in transposes from and back to PyTorch's NCHW:

* the forward convolution is one ``tf.conv2d``;
* its input gradient (``convolution(..., transposed=True)``) is a ``tf.conv2d`` of the
  output gradient with the spatially flipped, in/out-swapped weight (stride 1);
* its weight gradient correlates the input, batch and channels swapped, with the output
  gradient as the filter: ``dW[co, ci, i, j] = sum_{n,h,w} g[n, co, h, w] x[n, ci, h+i, w+j]``;
* max-pool (non-overlapping windows) reshapes each window into a last axis of ``k*k``:
  ``tf.max`` pools it and ``tf.argMax`` keeps the first maximum, as PyTorch does, so the
  backward puts the gradient through ``tf.oneHot`` of that index (a window of equal
  values, common on MNIST's blank background, passes it to one element, not all).

Other forms (groups, dilation, strided input gradients, overlapping or padded pools)
raise CompileError naming the op.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from gridfl._exceptions import CompileError

from .ops import why_windows_do_not_tile
from .tfjs import _NUMPY, _rule

__all__: list[str] = []

aten = torch.ops.aten
gridfl_ops = torch.ops.gridfl
_TO_NHWC, _TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _refuse(op: str, why: str):
    return CompileError(f"op {op} {why} has no tfjs translation")


def _same_padding(op: str, padding) -> int:
    if padding[0] != padding[1]:
        raise _refuse(op, "with different padding per dimension")
    return int(padding[0])


@_rule(aten.convolution.default)
def _convolution(t, node, x, w, bias, stride, padding, dilation, transposed, output_padding,
                 groups):
    op = "aten::convolution"
    if len(node.meta["val"].shape) != 4:
        raise _refuse(op, "other than 2-D")
    if groups != 1 or list(dilation) != [1, 1]:
        raise _refuse(op, "with groups or dilation")
    pad = _same_padding(op, padding)
    xn = t.emit("transpose", x, _TO_NHWC)
    if not transposed:
        f = t.emit("transpose", w, [2, 3, 1, 0])
        y = t.emit("conv2d", xn, f, list(stride), pad)
    else:  # the input gradient of a stride-1 convolution
        kh, kw = (int(s) for s in node.args[1].meta["val"].shape[2:])
        if list(stride) != [1, 1] or any(output_padding) or kh != kw:
            raise _refuse(op, "(transposed) with stride, output padding or a non-square kernel")
        f = t.emit("transpose", t.emit("reverse", w, [2, 3]), [2, 3, 0, 1])
        y = t.emit("conv2d", xn, f, [1, 1], kh - 1 - pad)
    if bias is not None:
        y = t.emit("add", y, bias)
    return t.emit("transpose", y, _TO_NCHW)


@_rule(gridfl_ops.conv2d_weight_grad.default)
def _conv2d_weight_grad(t, node, g, x, weight_size, stride, padding, dilation, out_hw, method):
    op = "gridfl::conv2d_weight_grad"
    if list(stride) != [1, 1] or list(dilation) != [1, 1]:
        raise _refuse(op, "with stride or dilation")
    pad = _same_padding(op, padding)
    xt = t.emit("transpose", x, [1, 2, 3, 0])  # (Ci, H, W, N): N as the channels
    gt = t.emit("transpose", g, [2, 3, 0, 1])  # (Ho, Wo, N, Co): the filter
    y = t.emit("conv2d", xt, gt, [1, 1], pad)  # (Ci, kh, kw, Co)
    return t.emit("transpose", y, [3, 0, 1, 2])


def _pool_geometry(node_x, kernel, stride, padding, dilation):
    c, h, w = (int(d) for d in node_x.meta["val"].shape[1:])  # not the symbolic batch
    why = why_windows_do_not_tile(kernel, stride, padding, dilation, h, w)
    if why is not None:
        raise _refuse("gridfl::max_pool2d", why)
    return c, h, w, *kernel


@_rule(gridfl_ops.max_pool2d.default)
def _max_pool2d(t, node, x, kernel, stride, padding, dilation, ceil_mode, _chw):
    c, h, w, k0, k1 = _pool_geometry(node.args[0], kernel, stride, padding, dilation)
    win = t.emit("reshape", x, [-1, c, h // k0, k0, w // k1, k1])
    win = t.emit("transpose", win, [0, 1, 2, 4, 3, 5])
    win = t.emit("reshape", win, [-1, c, h // k0, w // k1, k0 * k1])
    return t.emit("max", win, [4], False), t.emit("argMax", win, 4)


@_rule(gridfl_ops.max_pool2d_backward.default)
def _max_pool2d_backward(t, node, grad, x, index, kernel, stride, padding, accumulate):
    c, h, w, k0, k1 = _pool_geometry(node.args[1], kernel, stride, padding, [1, 1])
    mask = t.emit("cast", t.emit("oneHot", index, k0 * k1), "float32")
    g = t.emit("mul", t.emit("expandDims", grad, 4), mask)
    g = t.emit("reshape", g, [-1, c, h // k0, w // k1, k0, k1])
    g = t.emit("transpose", g, [0, 1, 2, 4, 3, 5])
    return t.emit("reshape", g, [-1, c, h, w])


def _np_conv2d(x, f, strides, pad):
    """tf.conv2d for NHWC input, [kh, kw, in, out] filter, symmetric numeric padding."""
    kh, kw = f.shape[:2]
    xp = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, :: strides[0], :: strides[1]]
    return np.einsum("nhwcij,ijco->nhwo", win, f, optimize=True).astype(np.float32)


_NUMPY.update(
    conv2d=_np_conv2d,
    reverse=lambda x, axes: np.flip(x, tuple(axes)),
    oneHot=lambda i, depth: np.eye(depth, dtype=np.int32)[i],
)
