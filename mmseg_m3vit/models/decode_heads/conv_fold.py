"""Inference fast path of a conv + BatchNorm + ReLU module: BN folded into the conv.

In eval mode a BatchNorm is the affine map ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``, so ``BN(conv(x, w, b)) = conv(x, w * s, (b - mean) * s +
beta)``: the folded convolution plus ReLU runs as one cuDNN call
(``torch.cudnn_convolution_relu``: bias and ReLU in the convolution's epilogue), which
removes the BN pass and the ReLU pass over the activation maps.

:func:`fold_conv_bn_relu` applies where it can (mmcv ``ConvModule`` of a 2-D conv, a
torch BatchNorm in eval mode with running statistics and a ReLU, in that order; CUDA
inputs under fp16/bf16 autocast; no autograd) and otherwise returns None, so that the
caller runs the module as usual. Float32 inference and training never take it.
Numerics: the folded weights and bias are computed in fp32 and rounded once to the
autocast dtype (the unfused path rounds the conv output and the BN output instead);
the fused epilogue adds the bias and applies ReLU in fp32 before the output's rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

#: 'auto': fold wherever :func:`fold_conv_bn_relu` applies; 'off': never (benchmarks
#: set it to measure the unfused path in the same process).
FOLD_MODE = "auto"
FOLD_MODES = ("auto", "off")


def _parts(module: nn.Module) -> tuple[nn.Conv2d, _BatchNorm] | None:
    """(conv, bn) of a foldable mmcv ConvModule (conv -> norm -> ReLU), else None."""
    conv = getattr(module, "conv", None)
    norm_name = getattr(module, "norm_name", None)
    norm = getattr(module, norm_name, None) if norm_name else None
    act = getattr(module, "activate", None)
    ok = (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and isinstance(norm, _BatchNorm)
        and not norm.training
        and norm.running_mean is not None
        and norm.running_var is not None
        and type(act) is nn.ReLU
        and tuple(getattr(module, "order", ("conv", "norm", "act"))) == ("conv", "norm", "act")
    )
    return (conv, norm) if ok else None


def folded_weights(conv: nn.Conv2d, bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """(weight (C_out, C_in/g, kh, kw), bias (C_out,)) of ``bn(conv(x))``, fp32."""
    with torch.no_grad():
        scale = bn.running_var.float().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        shift = -bn.running_mean.float() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        if conv.bias is not None:
            shift = shift + conv.bias.float() * scale
        weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
    return weight, shift


def _key(dtype: torch.dtype, tensors: tuple[Tensor | None, ...]) -> tuple:
    return (dtype,) + tuple(
        None if t is None else (t.data_ptr(), t._version, t.shape, t.device) for t in tensors
    )


def fold_conv_bn_relu(module: nn.Module, x: Tensor) -> Tensor | None:
    """``module(x)`` through the folded conv + bias + ReLU, or None where it does not
    apply (see the module docstring).

    x (B, C_in, H, W) -> (B, C_out, H', W') in the autocast dtype. The folded weights
    are cached on ``module`` in that dtype and rebuilt when a conv or BN tensor changes
    (in place or replaced).
    """
    if FOLD_MODE == "off" or not x.is_cuda or not hasattr(torch, "cudnn_convolution_relu"):
        return None
    if not torch.is_autocast_enabled("cuda") or not torch.backends.cudnn.enabled:
        return None
    dtype = torch.get_autocast_dtype("cuda")
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    parts = _parts(module)
    if parts is None:
        return None
    conv, bn = parts
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in tensors)
    ):
        return None
    key = _key(dtype, tensors)
    cache = getattr(module, "_folded_conv_bn", None)
    if cache is None or cache[0] != key:
        weight, bias = folded_weights(conv, bn)
        cache = (key, weight.to(dtype), bias.to(dtype))
        module._folded_conv_bn = cache
    return torch.cudnn_convolution_relu(
        x.to(dtype), cache[1], cache[2], conv.stride, conv.padding, conv.dilation, conv.groups
    )
