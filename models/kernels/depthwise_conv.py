"""LiT's depth-wise k×k convolution (stride 1, 'same' padding) on the CPU, as a torch.library custom op.

On the CPU, oneDNN's depth-wise weight gradient is several times slower than its forward (it
dominated LiT's backward at 4k-16k tokens). The same gradient is a grouped correlation of the
padded input with the output gradient as the kernel, which oneDNN runs fast in NCHW; the input
gradient is the forward conv with the flipped kernel. The forward runs in channels-last, oneDNN's
fast depth-wise layout.

A custom op (not an autograd.Function) so that torch.compile compiles the model around it: the
forward is opaque (its output layout fixed as channels-last, which its fake twin declares), the
backward below is plain torch and is traced into the compiled backward graph. Autocast is resolved
before the call (the compute dtype is an argument), so eager and compiled code cast alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("ditill::depthwise_conv2d_cpu", mutates_args=(), device_types="cpu")
def _conv_op(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    with torch.autocast(device_type="cpu", enabled=False):
        x = x.contiguous(memory_format=torch.channels_last).to(dtype)
        bias = None if bias is None else bias.to(dtype)
        out = F.conv2d(x, weight.to(dtype), bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    return out.contiguous(memory_format=torch.channels_last)


@_conv_op.register_fake
def _(x, weight, bias, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, _ = ctx.needs_input_grad
    b, c, hh, ww = x.shape
    k = weight.shape[-1]
    p = k // 2
    dx = dw = db = None
    # In the inputs' own dtype with autocast off: under bf16 autocast the forward ran in bf16,
    # but the gradients must match x and weight (and are better in their precision anyway).
    with torch.autocast(device_type="cpu", enabled=False):
        grad = grad.to(x.dtype)
        if need_x:
            g = grad.contiguous(memory_format=torch.channels_last)
            dx = F.conv2d(g, weight.to(x.dtype).flip(-1, -2), None, padding=k - 1 - p, groups=c)
        if need_w:
            xp = x.new_zeros(1, b * c, hh + 2 * p, ww + 2 * p)  # padded NCHW x in one copy
            xp[..., p : p + hh, p : p + ww].view(b, c, hh, ww).copy_(x)
            kern = grad.contiguous().reshape(b * c, 1, hh, ww)
            dw = F.conv2d(xp, kern, groups=b * c).reshape(b, c, k, k).sum(0).unsqueeze(1)
        if ctx.has_bias and need_b:
            db = grad.sum(dim=(0, 2, 3))
    return dx, dw, db, None


_conv_op.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.ditill.depthwise_conv2d_cpu)
def _conv_flops(x_shape, w_shape, bias_shape, dtype, *, out_shape) -> int:
    """FlopCounterMode's count of the F.conv2d inside (it does not see into a custom op)."""
    return conv_flop_count(x_shape, w_shape, out_shape)


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.conv2d(x, weight, bias, padding=k//2, groups=C)`; on the CPU, in channels-last (oneDNN's fast
    depthwise layout) and, with grad, with the fast weight gradient above."""
    if x.device.type != "cpu":
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    dtype = x.dtype
    if torch.is_autocast_enabled("cpu") and dtype in _AUTOCAST_ELIGIBLE:
        dtype = torch.get_autocast_dtype("cpu")  # what F.conv2d itself would compute in
    return _conv_op(x, weight, bias, dtype)
