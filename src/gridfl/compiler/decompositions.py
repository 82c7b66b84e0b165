"""The decomposition table the compiler traces with.

The core ATen decompositions, plus gridfl's own for the backward ops that either have no
ONNX translation or a slow one, plus "refusals": ops a plan cannot run (random numbers)
raise :class:`gridfl.CompileError` at trace time, naming the op.

Convolution backward (``aten.convolution_backward``), 2-D, groups 1:

* grad input  = transposed convolution of the grad output (one ``ConvTranspose``);
* grad weight = ``gridfl::conv2d_weight_grad``: from 8 input channels, per kernel offset
  one strided ``Slice`` of the padded NHWC input and one ``MatMul`` (Co, N*Ho*Wo) @
  (N*Ho*Wo, Ci), concatenated. The textbook formulation, a convolution of the C<->N
  transposed input with the grad output as a Ho x Wo kernel, runs a thin GEMM per input
  channel and is about 2x slower than the forward convolution in onnxruntime; stacking
  all patches into one im2col matrix costs as much again in copies. With few input
  channels (a first layer) the textbook form is as fast as the per-offset one for a 5x5
  kernel and is used; for a kernel of at most 3x3 at stride 1, ``"shift"`` is: each
  image's padded rows flattened, so an offset is one contiguous ``Slice`` and a
  ``MatMul`` per image (1 to 3 channels, 32x32: 0.64-0.86x the textbook form's time);
* grad bias   = sum over N, H, W.

BatchNorm in training mode is written out in plain ops (batch mean and variance), so the
plan normalizes as torch does and updates the running statistics it carries; its
normalization and its input gradient are each one per-channel affine pass
(``gridfl::channel_affine``), as torch's CPU kernels compute them.

Max-pool gives flat indices (from its window's ``ArgMax`` when windows tile the map) and
stores the gradient back with ``MaxUnpool``; ReLU's backward is ``grad * (y > 0)``; see
``ops.py`` and ``trace.py``.
"""

from __future__ import annotations

import functools

import torch

from gridfl._exceptions import CompileError

from .ops import per_channel  # importing ops registers torch.ops.gridfl.*

aten = torch.ops.aten
gridfl_ops = torch.ops.gridfl

__all__ = ["REFUSED", "decomposition_table"]


def _pair(v, n=2):
    v = list(v)
    return v * n if len(v) == 1 else v


# ---------------------------------------------------------------- convolution backward
#: Input channels from which the per-offset weight gradient beats the conv formulation.
PER_OFFSET_MIN_CHANNELS = 8
#: Kernel offsets up to which "shift" beats the conv formulation below that (3x3).
SHIFT_MAX_OFFSETS = 9


def _convolution_backward(
    grad_output,
    inp,
    weight,
    bias_sizes,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    output_mask,
    *,
    weight_grad: str = "auto",
):
    if weight.dim() != 4:
        raise CompileError(
            f"aten.convolution_backward: only 2-D convolutions (nn.Conv2d) are supported, "
            f"got a {weight.dim() - 2}-D convolution"
        )
    if transposed:
        raise CompileError(
            "aten.convolution_backward: transposed convolutions (nn.ConvTranspose2d) cannot "
            "be trained in a plan yet"
        )
    if groups != 1:
        raise CompileError(
            f"aten.convolution_backward: grouped convolutions (groups={groups}) cannot be "
            "trained in a plan yet"
        )
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    co, ci, kh, kw = weight.shape
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        h, w = inp.shape[2], inp.shape[3]
        ho, wo = grad_output.shape[2], grad_output.shape[3]
        out_pad = [
            h + 2 * padding[0] - ((ho - 1) * stride[0] + dilation[0] * (kh - 1) + 1),
            w + 2 * padding[1] - ((wo - 1) * stride[1] + dilation[1] * (kw - 1) + 1),
        ]
        grad_input = aten.convolution.default(
            grad_output, weight, None, stride, padding, dilation, True, out_pad, 1
        )
    if output_mask[1]:
        method = weight_grad
        plain = list(stride) == [1, 1] and list(dilation) == [1, 1]
        if method == "auto":
            if ci >= PER_OFFSET_MIN_CHANNELS:
                method = "per_offset"
            else:
                method = "shift" if plain and kh * kw <= SHIFT_MAX_OFFSETS else "conv"
        elif method == "shift" and not plain:
            raise CompileError(
                "conv_weight_grad='shift' needs stride 1 and no dilation, got "
                f"stride={list(stride)}, dilation={list(dilation)}; use 'auto'"
            )
        out_hw = [int(grad_output.shape[2]), int(grad_output.shape[3])]
        grad_weight = gridfl_ops.conv2d_weight_grad(
            grad_output, inp, [int(co), int(ci), int(kh), int(kw)], [int(v) for v in stride],
            [int(v) for v in padding], [int(v) for v in dilation], out_hw, method,
        )
    if output_mask[2]:
        grad_bias = aten.sum.dim_IntList(grad_output, [0, 2, 3])
    return grad_input, grad_weight, grad_bias


# ---------------------------------------------------------------- pooling
def _max_pool2d_with_indices(
    x, kernel_size, stride=(), padding=(0,), dilation=(1,), ceil_mode=False
):
    if x.dim() != 4:
        raise CompileError(
            f"aten.max_pool2d_with_indices: only batched 4-D inputs (N, C, H, W) are "
            f"supported, got {x.dim()}-D"
        )
    kernel_size = _pair(kernel_size)
    stride = _pair(stride) if stride else list(kernel_size)
    return gridfl_ops.max_pool2d(
        x, kernel_size, stride, _pair(padding), _pair(dilation), bool(ceil_mode),
        [int(d) for d in x.shape[1:]],
    )


def _max_pool2d_with_indices_backward(
    grad_output, x, kernel_size, stride, padding, dilation, ceil_mode, indices
):
    kernel_size = _pair(kernel_size)
    stride = _pair(stride) if stride else list(kernel_size)
    dilation = _pair(dilation)
    overlap = any(
        s < (k - 1) * d + 1 for s, k, d in zip(stride, kernel_size, dilation, strict=True)
    )
    return gridfl_ops.max_pool2d_backward(
        grad_output, x, indices, kernel_size, stride, _pair(padding), overlap
    )


def _avg_pool2d_backward(
    grad_output, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    kernel_size = _pair(kernel_size)
    stride = _pair(stride) if stride else list(kernel_size)
    padding = _pair(padding)
    if x.dim() != 4:
        raise CompileError("aten.avg_pool2d_backward: only batched 4-D inputs are supported")
    kh, kw = kernel_size
    h, w = x.shape[2], x.shape[3]
    ho, wo = grad_output.shape[2], grad_output.shape[3]
    out_pad = [
        h + 2 * padding[0] - ((ho - 1) * stride[0] + kh),
        w + 2 * padding[1] - ((wo - 1) * stride[1] + kw),
    ]
    if ceil_mode and (out_pad[0] < 0 or out_pad[1] < 0):
        raise CompileError(
            "aten.avg_pool2d_backward: ceil_mode=True with a partial last window is not "
            "supported; use ceil_mode=False"
        )
    if any(padding) and not count_include_pad and divisor_override is None:
        raise CompileError(
            "aten.avg_pool2d_backward: padding with count_include_pad=False is not "
            "supported; use count_include_pad=True"
        )
    divisor = divisor_override or kh * kw
    c = x.shape[1]
    weight = torch.full((c, 1, kh, kw), 1.0 / divisor, dtype=grad_output.dtype)
    return aten.convolution.default(
        grad_output, weight, None, stride, padding, [1, 1], True, out_pad, c
    )


def _threshold_backward(grad_output, self, threshold):
    return gridfl_ops.threshold_backward(grad_output, self, float(threshold))


# ---------------------------------------------------------------- indexing backward
def _select_backward(grad_output, input_sizes, dim, index):
    """``x.select(dim, index)``'s gradient (an RNN's last step, ``h[:, -1]``) as one
    ``Pad`` of the selected gradient with zeros, not a mask broadcast over the whole
    input by ``Where``."""
    size = input_sizes[dim]
    if not (isinstance(size, int) and isinstance(index, int)):
        from torch._decomp.decompositions import select_backward

        return select_backward(grad_output, input_sizes, dim, index)
    dim %= len(input_sizes)
    index %= size
    pad = [0, 0] * (len(input_sizes) - 1 - dim) + [index, size - 1 - index]
    return aten.constant_pad_nd.default(aten.unsqueeze.default(grad_output, dim), pad, 0.0)


def _embedding_dense_backward(grad_output, indices, num_weights, padding_idx,
                              scale_grad_by_freq):
    """An embedding's gradient: the rows' gradients summed per index. An index out of
    range or equal to ``padding_idx`` sends its row to one extra row that is dropped,
    instead of a mask broadcast over every row's gradient."""
    if scale_grad_by_freq:
        from torch._decomp.decompositions import embedding_dense_backward

        return embedding_dense_backward(grad_output, indices, num_weights, padding_idx,
                                        scale_grad_by_freq)
    width = grad_output.shape[indices.dim():]
    rows = grad_output.reshape(-1, *width)
    flat = indices.reshape(-1).long()
    kept = (flat >= 0) & (flat < num_weights) & (flat != padding_idx)
    target = torch.where(kept, flat, num_weights)
    summed = grad_output.new_zeros((num_weights + 1, *width)).index_put(
        [target], rows, accumulate=True)
    return summed[:num_weights]


# ---------------------------------------------------------------- refusals
def _refuse(op_name: str, why: str):
    def refuse(*args, **kwargs):
        raise CompileError(f"{op_name}: {why}")

    return refuse


_RANDOM = (
    "draws random numbers, which a plan cannot do reproducibly. nn.Dropout in training "
    "mode does this: call module.eval() before compiling (dropout then compiles as the "
    "identity) or remove it"
)
REFUSED: dict[str, str] = {
    "native_dropout": _RANDOM,
    "bernoulli": _RANDOM,
    "bernoulli_": _RANDOM,
    "rand": _RANDOM,
    "rand_like": _RANDOM,
    "randn": _RANDOM,
    "randn_like": _RANDOM,
    "randint": _RANDOM,
    "randint_like": _RANDOM,
    "randperm": _RANDOM,
    "normal": _RANDOM,
    "uniform": _RANDOM,
    "uniform_": _RANDOM,
    "multinomial": _RANDOM,
    "exponential_": _RANDOM,
}


def _batch_norm_training(inp, weight, bias, running_mean, running_var, momentum, eps):
    """BatchNorm in training mode from plain ops: batch statistics normalize, and the
    running statistics are updated in place (on the plan's copies of its
    ``model_buffer`` inputs, which the step returns), as ``torch.nn.BatchNorm*`` does."""
    if inp.dim() < 2:
        raise CompileError("aten.native_batch_norm: the input needs a channel dimension")
    dims, shape, count = per_channel(inp)
    mean = inp.mean(dims)
    centered = inp - mean.reshape(shape)
    var = (centered * centered).mean(dims)  # biased, as torch normalizes with
    rstd = torch.rsqrt(var + eps)
    # x * scale + shift per channel, as torch's CPU kernel computes it: one pass
    scale = rstd if weight is None else rstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    out = gridfl_ops.channel_affine(inp, scale, shift)
    if running_mean is not None:
        running_mean.copy_((1 - momentum) * running_mean + momentum * mean)
    if running_var is not None:  # the running variance is the unbiased one
        running_var.copy_((1 - momentum) * running_var + momentum * var * (count / (count - 1)))
    return out, mean, rstd


def _batch_norm_backward(grad_out, inp, weight, running_mean, running_var, save_mean,
                         save_invstd, train, eps, output_mask):
    """BatchNorm's backward in training mode, in the form torch's CPU kernel uses:
    ``dx = scale * (g - mean(g) - (x - mean) * k)`` with ``k = mean(g * (x - mean)) *
    invstd**2``, written as ``g * scale`` plus one per-channel affine of ``x - mean`` (the
    forward's, shared): four passes over the input's size where torch's decomposition
    takes six."""
    if not train or save_mean is None or save_invstd is None or inp.dim() < 2:
        from torch._decomp.decompositions import native_batch_norm_backward

        return native_batch_norm_backward(grad_out, inp, weight, running_mean, running_var,
                                          save_mean, save_invstd, train, eps, output_mask)
    dims, shape, count = per_channel(inp)
    centered = inp - save_mean.reshape(shape)
    grad_sum = grad_out.sum(dims)
    dot = (grad_out * centered).sum(dims)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        scale = save_invstd if weight is None else save_invstd * weight
        k = dot * save_invstd * save_invstd / count
        grad_input = grad_out * scale.reshape(shape) + gridfl_ops.channel_affine(
            centered, -scale * k, -scale * grad_sum / count)
    if output_mask[1]:
        grad_weight = dot * save_invstd
    if output_mask[2]:
        grad_bias = grad_sum
    return grad_input, grad_weight, grad_bias


def _bn_legit(inp, weight, bias, running_mean, running_var, training, momentum, eps):
    if training:
        return _batch_norm_training(inp, weight, bias, running_mean, running_var, momentum, eps)
    return aten._native_batch_norm_legit_no_training.default(
        inp, weight, bias, running_mean, running_var, momentum, eps
    )


def _bn_legit_no_stats(inp, weight, bias, training, momentum, eps):
    return _batch_norm_training(inp, weight, bias, None, None, momentum, eps)


@functools.cache
def _table_items(weight_grad: str) -> tuple:
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    for name, why in REFUSED.items():
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            table[getattr(packet, overload)] = _refuse(f"aten.{name}", why)
    table[aten.native_batch_norm.default] = _bn_legit
    table[aten._native_batch_norm_legit.default] = _bn_legit
    table[aten._native_batch_norm_legit.no_stats] = _bn_legit_no_stats
    table[aten.native_batch_norm_backward.default] = _batch_norm_backward
    table[aten.convolution_backward.default] = functools.partial(
        _convolution_backward, weight_grad=weight_grad
    )
    table[aten.max_pool2d_with_indices.default] = _max_pool2d_with_indices
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool2d_with_indices_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[aten.threshold_backward.default] = _threshold_backward
    table[aten.select_backward.default] = _select_backward
    table[aten.embedding_dense_backward.default] = _embedding_dense_backward
    return tuple(table.items())


CONV_WEIGHT_GRAD_METHODS = ("auto", "per_offset", "shift", "conv")


def decomposition_table(*, conv_weight_grad: str = "auto") -> dict:
    """The table for ``make_fx``: core ATen + gridfl's backward formulations + refusals.

    ``conv_weight_grad``: ``"auto"`` (per-offset GEMMs from 8 input channels; below
    that ``"shift"`` for kernels up to 3x3 at stride 1, else the conv formulation),
    ``"per_offset"``, ``"shift"`` or ``"conv"`` (textbook).
    """
    if conv_weight_grad not in CONV_WEIGHT_GRAD_METHODS:
        raise CompileError(
            f"conv_weight_grad must be one of {CONV_WEIGHT_GRAD_METHODS}, not {conv_weight_grad!r}"
        )
    return dict(_table_items(conv_weight_grad))
