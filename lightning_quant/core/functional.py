"""Fake-quantization functions with straight-through gradients.

Every function here is stateless: quantizer modules (:mod:`lightning_quant.core.quantizers`) hold the state
and call these. Uniform fake quantization uses the fused ``torch.fake_quantize_*`` kernels, which are 2-3x
faster than a Python round/clamp and export to ONNX as QuantizeLinear/DequantizeLinear.

Straight-through estimator (STE) of :func:`fake_quantize` -- the gradient passes where the input lies inside
the representable range and is zero where it was clipped:

>>> import torch
>>> x = torch.tensor([-1.0, 0.26, 0.9], requires_grad=True)
>>> y = fake_quantize(x, torch.tensor([0.25]), torch.tensor([0]), -2, 1)  # 2-bit signed: {-0.5 .. 0.25}
>>> y
tensor([-0.5000,  0.2500,  0.2500], grad_fn=<...>)
>>> y.sum().backward(); x.grad
tensor([0., 1., 0.])

Learned step size (LSQ, Esser et al., 2020) additionally gives the step ``s`` the gradient
``dy/ds = round(x/s) - x/s`` inside the range and ``qmin`` / ``qmax`` outside, scaled by ``grad_factor``
(``1/sqrt(N * qmax)`` in the paper):

>>> s = torch.tensor([0.25], requires_grad=True)
>>> lsq_fake_quantize(torch.tensor([0.3, 2.0]), s, torch.tensor([0.0]), -2, 1, grad_factor=1.0).sum().backward()
>>> s.grad  # (round(1.2) - 1.2) + qmax
tensor([0.8000])
"""

from __future__ import annotations

import torch
from torch import Tensor

# the bit-width bounds and check live with the other argument checks; imported here under the names the package uses
from lightning_quant.core.validation import MAX_BITS, MIN_BITS  # noqa: F401
from lightning_quant.core.validation import check_bits as validate_bits  # noqa: F401

_EPS = 1e-8


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide grid; binary (1 bit) is ``(-1, 1)``.

    >>> quant_range(4, signed=True), quant_range(4, signed=False), quant_range(1, signed=True)
    ((-8, 7), (0, 15), (-1, 1))
    """
    if bits == 1:
        return -1, 1
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_zero_point_from_bounds(
    min_val: Tensor, max_val: Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Step size and zero point that map ``[min_val, max_val]`` onto ``[qmin, qmax]``.

    Symmetric grids have zero point 0 (signed grids span ``max(|min|, |max|)`` around zero, unsigned ones
    ``[0, max]``); asymmetric grids always include 0 exactly (as every runtime requires).

    >>> s, z = scale_zero_point_from_bounds(torch.tensor([-1.0]), torch.tensor([3.0]), 0, 255, symmetric=False)
    >>> round(s.item() * 255, 4), z.item()
    (4.0, 64.0)
    """
    min_val = torch.clamp(min_val, max=0.0)
    max_val = torch.clamp(max_val, min=0.0)
    if symmetric:
        if qmin < 0:
            scale = torch.maximum(-min_val, max_val) / ((qmax - qmin) / 2)
        else:
            scale = max_val / qmax
        scale = torch.clamp(scale, min=_EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=_EPS)
    zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax)
    return scale, zero_point


def _as_float32(fn):
    """Run a fake-quant kernel in float32 (the fused kernels do not take bfloat16) and cast back."""

    def wrapper(x: Tensor, *args, **kwargs) -> Tensor:
        if x.dtype == torch.float32:
            return fn(x, *args, **kwargs)
        return fn(x.float(), *args, **kwargs).to(x.dtype)

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


@_as_float32
def fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, ch_axis: int | None = None
) -> Tensor:
    """Uniform affine fake quantization ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with the STE.

    Args:
        x: input.
        scale: step size, shape ``[1]`` (per tensor) or ``[C]`` (per channel along ``ch_axis``).
        zero_point: integer-valued zero point of the same shape (any dtype).
        qmin: smallest integer of the grid.
        qmax: largest integer of the grid.
        ch_axis: the channel axis for per-channel scales, ``None`` for per tensor.
    """
    if ch_axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point.to(torch.int32), ch_axis, qmin, qmax)


@_as_float32
def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
    grad_factor: float = 1.0,
) -> Tensor:
    """Fake quantization with a learned step size (LSQ); same forward as :func:`fake_quantize`.

    The gradient of ``scale`` follows Esser et al. (2020), multiplied by ``grad_factor``; the input's gradient
    is the STE with the clipping mask.
    """
    zero_point = zero_point.to(scale.dtype)
    if ch_axis is None:
        # aten's per-tensor backward truncates `z + 0.5` toward zero, so a negative zero point gets a wrong step
        # gradient; the per-channel kernel on a one-channel view has the same forward and the right gradient
        out = torch._fake_quantize_learnable_per_channel_affine(
            x.reshape(1, -1), scale.reshape(1), zero_point.reshape(1), 0, qmin, qmax, grad_factor
        )
        return out.reshape(x.shape)
    return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, ch_axis, qmin, qmax, grad_factor)


class _BinarizeSTE(torch.autograd.Function):
    """``s * sign(x)`` (sign(0) = +1) with a clipped straight-through gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, grad_factor: float) -> Tensor:  # type: ignore[override]
        sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        ctx.save_for_backward(x, scale, sign)
        ctx.grad_factor = grad_factor
        # computed in the scale's precision, returned in the input's (like the fused fake-quant kernels)
        return (sign * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, scale, sign = ctx.saved_tensors
        grad_x = grad * (x.abs() <= scale).to(grad.dtype)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            per_element = grad.to(scale.dtype) * sign * ctx.grad_factor
            # sum over the broadcast dimensions only (a 1-D per-channel input has none to sum over)
            grad_scale = per_element.sum_to_size(scale.shape)
        return grad_x, grad_scale, None


def binarize(x: Tensor, scale: Tensor, ch_axis: int | None = None, grad_factor: float = 1.0) -> Tensor:
    """Binary quantization ``scale * sign(x)``: one bit per element plus a (per-channel) scale.

    The input's gradient passes where ``|x| <= scale`` (the binary grid's range, like the clipping mask of
    :func:`fake_quantize`); the scale's gradient is ``sum(sign(x))`` times ``grad_factor``.

    >>> x = torch.tensor([-0.3, 0.0, 0.05, 2.0], requires_grad=True)
    >>> y = binarize(x, torch.tensor([0.1]))
    >>> y
    tensor([-0.1000,  0.1000,  0.1000,  0.1000], grad_fn=<...>)
    >>> y.sum().backward(); x.grad
    tensor([0., 1., 1., 0.])
    """
    if ch_axis is not None:
        shape = [1] * x.dim()
        shape[ch_axis] = -1
        scale = scale.reshape(shape)
    return _BinarizeSTE.apply(x, scale, grad_factor)


def quantize_to_int(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, ch_axis: int | None = None
) -> Tensor:
    """The integers that :func:`fake_quantize` represents: ``clamp(round(x * (1/s)) + z, qmin, qmax)``.

    Computed as aten does (multiplication by the reciprocal), so ``(q - z) * s`` equals the fake-quant output
    bit for bit.
    """
    if ch_axis is not None:
        shape = [1] * x.dim()
        shape[ch_axis] = -1
        scale = scale.reshape(shape)
        zero_point = zero_point.reshape(shape)
    inv_scale = 1.0 / scale
    q = torch.round(x * inv_scale) + zero_point.to(x.dtype)
    return torch.clamp(q, qmin, qmax).to(torch.int32)
