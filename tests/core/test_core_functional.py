"""Numerics of :mod:`lightning_quant.core.functional` against an independent NumPy reference.

The reference follows aten's arithmetic in float32: ``q = clip(rint(x * (1/s)) + z, qmin, qmax)`` and
``out = (q - z) * s`` with the reciprocal itself rounded to float32 (a reference using ``x / s`` differs by one
step on some elements). Forward results are compared bit for bit; LSQ's step-size gradient against its formula.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import (
    binarize,
    fake_quantize,
    lsq_fake_quantize,
    quant_range,
    quantize_to_int,
    scale_zero_point_from_bounds,
    validate_bits,
)

PROPERTY_SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)
BITS = list(range(2, 9))
GRANULARITIES = [None, 0, 1]  # per tensor, per channel along axis 0, per channel along axis 1
SHAPE = (6, 5, 7)


# ---------------------------------------------------------------------------------------------------------------
# independent NumPy reference
# ---------------------------------------------------------------------------------------------------------------
def _broadcast(param: np.ndarray, ndim: int, ch_axis: int | None) -> np.ndarray:
    if ch_axis is None:
        return param.reshape(())
    shape = [1] * ndim
    shape[ch_axis] = -1
    return param.reshape(shape)


def ref_quantize(
    x: np.ndarray, s: np.ndarray, z: np.ndarray, qmin: int, qmax: int, ch_axis: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integers, fake-quantized values and STE mask (unclamped integer inside ``[qmin, qmax]``), in float32."""
    x = np.asarray(x, dtype=np.float32)
    s = _broadcast(np.asarray(s, dtype=np.float32), x.ndim, ch_axis)
    z = _broadcast(np.asarray(z, dtype=np.float32), x.ndim, ch_axis)
    inv = np.float32(1.0) / s
    assert inv.dtype == np.float32
    unclamped = np.rint(x * inv) + z
    q = np.clip(unclamped, np.float32(qmin), np.float32(qmax))
    out = (q - z) * s
    assert out.dtype == np.float32
    mask = (unclamped >= qmin) & (unclamped <= qmax)
    return q, out, mask


def ref_lsq_scale_grad(
    x: np.ndarray, s: np.ndarray, z: np.ndarray, qmin: int, qmax: int, ch_axis: int | None, grad_factor: float
) -> np.ndarray:
    """LSQ (Esser et al., 2020) d(sum y)/ds in float64.

    ``y = (clamp(round(x/s) + z, qmin, qmax) - z) * s``: inside the range ``y = round(x/s) * s`` and, with the STE
    on ``round``, ``dy/ds = round(x/s) - x/s`` (z cancels); below the range ``y = (qmin - z) * s`` so
    ``dy/ds = qmin - z``; above it ``qmax - z``. The rounding decision is aten's (float32 ``x * (1/s)``).
    """
    x32 = np.asarray(x, dtype=np.float32)
    s32 = _broadcast(np.asarray(s, dtype=np.float32), x32.ndim, ch_axis)
    z32 = _broadcast(np.asarray(z, dtype=np.float32), x32.ndim, ch_axis)
    rounded = np.rint(x32 * (np.float32(1.0) / s32)).astype(np.float64)
    unclamped = rounded + z32
    ratio = x32.astype(np.float64) / s32.astype(np.float64)
    z64 = z32.astype(np.float64)
    per_element = np.where(
        unclamped < qmin, qmin - z64, np.where(unclamped > qmax, qmax - z64, rounded - ratio)
    ) * np.ones_like(ratio)
    if ch_axis is None:
        return np.array([per_element.sum() * grad_factor])
    axes = tuple(d for d in range(x32.ndim) if d != ch_axis)
    return per_element.sum(axis=axes) * grad_factor


# ---------------------------------------------------------------------------------------------------------------
# test data
# ---------------------------------------------------------------------------------------------------------------
def _case(bits: int, signed: bool, symmetric: bool, ch_axis: int | None, seed: int = 0):
    """A seeded input (about 10% of it outside the grid), step sizes and zero points."""
    gen = torch.Generator().manual_seed(seed * 1000 + bits * 100 + signed * 10 + symmetric * 5 + (ch_axis or 0))
    qmin, qmax = quant_range(bits, signed)
    channels = 1 if ch_axis is None else SHAPE[ch_axis]
    scale = (0.01 + 0.5 * torch.rand(channels, generator=gen)).float()
    if symmetric:
        zero_point = torch.zeros(channels)
    else:
        zero_point = torch.randint(qmin, qmax + 1, (channels,), generator=gen).float()
    # centre of the grid in real units, then spread 1.3x the grid's half width
    s_b = scale if ch_axis is None else scale.reshape([-1 if d == ch_axis else 1 for d in range(len(SHAPE))])
    z_b = zero_point if ch_axis is None else zero_point.reshape(s_b.shape)
    centre = ((qmin + qmax) / 2 - z_b) * s_b
    half = (qmax - qmin) / 2 * s_b
    x = centre + (1.3 * half + 2 * s_b) * (2 * torch.rand(SHAPE, generator=gen) - 1)
    return x.float(), scale, zero_point, qmin, qmax


ALL_CASES = [
    pytest.param(
        bits,
        signed,
        symmetric,
        ch_axis,
        id=f"b{bits}-{'s' if signed else 'u'}-{'sym' if symmetric else 'asym'}-{ch_axis}",
    )
    for bits in BITS
    for signed in (True, False)
    for symmetric in (True, False)
    for ch_axis in GRANULARITIES
]


# ---------------------------------------------------------------------------------------------------------------
# bit-exact forward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "signed", "symmetric", "ch_axis"), ALL_CASES)
def test_fake_quantize_bit_exact(bits, signed, symmetric, ch_axis):
    x, scale, zero_point, qmin, qmax = _case(bits, signed, symmetric, ch_axis)
    _, expected, _ = ref_quantize(x.numpy(), scale.numpy(), zero_point.numpy(), qmin, qmax, ch_axis)
    out = fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.from_numpy(expected), atol=0, rtol=0)
    # the data really exercises both clipping and rounding
    assert (out != x).float().mean() > 0.5


@pytest.mark.parametrize(("bits", "signed", "symmetric", "ch_axis"), ALL_CASES)
def test_lsq_forward_bit_exact(bits, signed, symmetric, ch_axis):
    x, scale, zero_point, qmin, qmax = _case(bits, signed, symmetric, ch_axis, seed=1)
    _, expected, _ = ref_quantize(x.numpy(), scale.numpy(), zero_point.numpy(), qmin, qmax, ch_axis)
    out = lsq_fake_quantize(x, scale.clone().requires_grad_(True), zero_point, qmin, qmax, ch_axis, 0.5)
    torch.testing.assert_close(out.detach(), torch.from_numpy(expected), atol=0, rtol=0)


@pytest.mark.parametrize(("bits", "signed", "symmetric", "ch_axis"), ALL_CASES)
def test_quantize_to_int_bit_exact(bits, signed, symmetric, ch_axis):
    x, scale, zero_point, qmin, qmax = _case(bits, signed, symmetric, ch_axis, seed=2)
    q_ref, _, _ = ref_quantize(x.numpy(), scale.numpy(), zero_point.numpy(), qmin, qmax, ch_axis)
    q = quantize_to_int(x, scale, zero_point, qmin, qmax, ch_axis)
    assert q.dtype == torch.int32
    assert torch.equal(q, torch.from_numpy(q_ref.astype(np.int32)))
    assert int(q.min()) == qmin and int(q.max()) == qmax  # both ends reached (the data clips on both sides)
    # (q - z) * s is the fake-quant output bit for bit
    s_b = scale if ch_axis is None else scale.reshape([-1 if d == ch_axis else 1 for d in range(x.dim())])
    z_b = zero_point if ch_axis is None else zero_point.reshape(s_b.shape)
    dequant = (q.float() - z_b) * s_b
    torch.testing.assert_close(dequant, fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis), atol=0, rtol=0)


def test_ties_round_half_to_even():
    """Exact halves (a power-of-two step makes ``x * (1/s)`` exact) round to even, like ``np.rint``."""
    scale, zero_point = torch.tensor([0.25]), torch.tensor([0.0])
    x = torch.tensor([-1.125, -0.875, -0.625, -0.375, -0.125, 0.125, 0.375, 0.625, 0.875, 1.125])
    expected = torch.tensor([-1.0, -1.0, -0.5, -0.5, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0])
    out = fake_quantize(x, scale, zero_point, -128, 127)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(
        out, torch.from_numpy(ref_quantize(x.numpy(), scale.numpy(), zero_point.numpy(), -128, 127, None)[1])
    )
    # an odd zero point shifts the integers, not the rounding of x / s (z is added after rounding)
    q = quantize_to_int(x, scale, torch.tensor([1.0]), -128, 127)
    assert q.tolist() == [-4 + 1, -4 + 1, -2 + 1, -2 + 1, 0 + 1, 0 + 1, 2 + 1, 2 + 1, 4 + 1, 4 + 1]


def test_reciprocal_not_division():
    """The reference must multiply by the float32 reciprocal: on this data ``x / s`` rounds differently."""
    gen = torch.Generator().manual_seed(7)
    scale = torch.tensor([0.1 + 0.3 * torch.rand(1, generator=gen).item()])
    # inputs within a few ulp of the half-way points, where x / s and x * (1/s) can disagree
    k = torch.randint(-100, 100, (20000,), generator=gen).float()
    x = ((k + 0.5) * scale).float()
    x = torch.nextafter(x, x + torch.randn(x.shape, generator=gen).sign())
    out = fake_quantize(x, scale, torch.zeros(1), -128, 127)
    _, ref, _ = ref_quantize(x.numpy(), scale.numpy(), np.zeros(1, np.float32), -128, 127, None)
    torch.testing.assert_close(out, torch.from_numpy(ref), atol=0, rtol=0)
    by_division = (np.clip(np.rint(x.numpy() / scale.numpy()), -128, 127) * scale.numpy()).astype(np.float32)
    assert (by_division != ref).any()


@pytest.mark.parametrize("ch_axis", GRANULARITIES)
def test_binarize_bit_exact(ch_axis):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=gen)
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    channels = 1 if ch_axis is None else SHAPE[ch_axis]
    scale = 0.1 + torch.rand(channels, generator=gen)
    s_np = _broadcast(scale.numpy(), x.dim(), ch_axis)
    expected = np.where(x.numpy() >= 0, np.float32(1.0), np.float32(-1.0)) * s_np
    out = binarize(x, scale, ch_axis)
    torch.testing.assert_close(out, torch.from_numpy(expected.astype(np.float32)), atol=0, rtol=0)
    assert out.view(-1)[0] > 0 and out.view(-1)[1] > 0  # sign(0) = sign(-0) = +1


# ---------------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "signed", "symmetric", "ch_axis"), ALL_CASES)
def test_fake_quantize_ste_mask(bits, signed, symmetric, ch_axis):
    x, scale, zero_point, qmin, qmax = _case(bits, signed, symmetric, ch_axis, seed=4)
    _, _, mask = ref_quantize(x.numpy(), scale.numpy(), zero_point.numpy(), qmin, qmax, ch_axis)
    x = x.requires_grad_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis).backward(upstream)
    torch.testing.assert_close(x.grad, upstream * torch.from_numpy(mask).float(), atol=0, rtol=0)
    assert 0 < mask.mean() < 1


@pytest.mark.parametrize(
    ("bits", "signed", "symmetric", "ch_axis"),
    [c for c in ALL_CASES if c.values[0] in (2, 4, 8)],
)
def test_lsq_scale_gradient_matches_formula(bits, signed, symmetric, ch_axis):
    x, scale, zero_point, qmin, qmax = _case(bits, signed, symmetric, ch_axis, seed=6)
    n_per_scale = x.numel() // scale.numel()
    grad_factor = 1.0 / math.sqrt(n_per_scale * qmax)
    s = scale.clone().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    lsq_fake_quantize(xg, s, zero_point, qmin, qmax, ch_axis, grad_factor).sum().backward()
    expected = ref_lsq_scale_grad(x.numpy(), scale.numpy(), zero_point.numpy(), qmin, qmax, ch_axis, grad_factor)
    assert s.grad.shape == scale.shape
    torch.testing.assert_close(s.grad.double(), torch.from_numpy(expected), atol=1e-5, rtol=1e-5)
    # the input's gradient is the same STE mask as fake_quantize's
    _, _, mask = ref_quantize(x.numpy(), scale.numpy(), zero_point.numpy(), qmin, qmax, ch_axis)
    torch.testing.assert_close(xg.grad, torch.from_numpy(mask).float(), atol=0, rtol=0)


def test_lsq_scale_gradient_asymmetric_by_hand():
    """Hand-derived: z = 3, s = 0.5, grid [0, 7] covers [-1.5, 2.0]."""
    x = torch.tensor([0.3, -0.8, -4.0, 9.0, 1.9])
    s = torch.tensor([0.5], requires_grad=True)
    lsq_fake_quantize(x, s, torch.tensor([3.0]), 0, 7, grad_factor=2.0).sum().backward()
    # inside: round(0.6) - 0.6 = 0.4; round(-1.6) - (-1.6) = -0.4; round(3.8) - 3.8 = 0.2
    # below: qmin - z = -3; above: qmax - z = 4
    expected = 2.0 * (0.4 - 0.4 - 3.0 + 4.0 + 0.2)
    assert s.grad.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("ch_axis", [None, 0])
def test_lsq_scale_gradient_negative_zero_point(ch_axis):
    """Regression: aten's per-tensor kernel used trunc(z + 0.5) = -2 for z = -3 in the backward."""
    x = torch.tensor([[0.3, 5.0, -5.0]])
    s = torch.tensor([0.5], requires_grad=True)
    y = lsq_fake_quantize(x, s, torch.tensor([-3.0]), -8, 7, ch_axis, grad_factor=1.0)
    assert y.tolist() == [[0.5, 5.0, -2.5]]
    y.sum().backward()
    # 0.3: round(0.6) - 0.6 = 0.4; 5.0: 10 - 3 = 7 inside, 0; -5.0: -13 < qmin, qmin - z = -5
    assert s.grad.item() == pytest.approx(0.4 + 0.0 - 5.0, abs=1e-5)


def test_lsq_gradient_is_linear_in_grad_factor():
    x, scale, zero_point, qmin, qmax = _case(4, True, True, 0, seed=8)
    grads = []
    for factor in (1.0, 0.25):
        s = scale.clone().requires_grad_(True)
        lsq_fake_quantize(x, s, zero_point, qmin, qmax, 0, factor).sum().backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[1], grads[0] * 0.25)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("ch_axis", GRANULARITIES)
def test_binarize_gradients(ch_axis):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(SHAPE, generator=gen).requires_grad_(True)
    channels = 1 if ch_axis is None else SHAPE[ch_axis]
    scale = (0.3 + 0.7 * torch.rand(channels, generator=gen)).requires_grad_(True)
    upstream = torch.randn(SHAPE, generator=gen)
    binarize(x, scale, ch_axis, grad_factor=0.5).backward(upstream)
    s_np = _broadcast(scale.detach().numpy(), x.dim(), ch_axis)
    x_np = x.detach().numpy()
    mask = np.abs(x_np) <= s_np
    assert 0 < mask.mean() < 1
    torch.testing.assert_close(x.grad, upstream * torch.from_numpy(mask).float(), atol=0, rtol=0)
    per_element = upstream.numpy().astype(np.float64) * np.where(x_np >= 0, 1.0, -1.0) * 0.5
    axes = tuple(range(x.dim())) if ch_axis is None else tuple(d for d in range(x.dim()) if d != ch_axis)
    expected = per_element.sum(axis=axes).reshape(scale.shape)
    torch.testing.assert_close(scale.grad.double(), torch.from_numpy(expected), atol=1e-5, rtol=1e-5)


def test_binarize_per_channel_1d_gradient():
    """A 1-D per-channel input (one element per channel): the scale gradient is per element, not summed."""
    x = torch.tensor([0.5, -2.0, 0.0, -0.1])
    scale = torch.tensor([1.0, 1.0, 0.5, 0.2], requires_grad=True)
    binarize(x, scale, ch_axis=0, grad_factor=3.0).sum().backward()
    assert scale.grad.tolist() == [3.0, -3.0, 3.0, -3.0]


def test_binarize_bfloat16_keeps_dtype():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10)).bfloat16()
    scale = torch.tensor([0.3, 0.7, 1.1, 0.05])
    out = binarize(x, scale, ch_axis=0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, binarize(x.float(), scale, ch_axis=0).bfloat16())


# ---------------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def grids(draw, with_channels: bool = True):
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    symmetric = draw(st.booleans())
    qmin, qmax = quant_range(bits, signed)
    ch_axis = draw(st.sampled_from([None, 0, 1])) if with_channels else None
    shape = (draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 4)))
    channels = 1 if ch_axis is None else shape[ch_axis]
    scale = torch.tensor(
        draw(st.lists(st.floats(0.001, 4.0), min_size=channels, max_size=channels)), dtype=torch.float32
    )
    if symmetric:
        zero_point = torch.zeros(channels)
    else:
        zero_point = torch.tensor(
            draw(st.lists(st.integers(qmin, qmax), min_size=channels, max_size=channels)), dtype=torch.float32
        )
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    span = draw(st.floats(0.1, 3.0))  # the input's spread relative to the grid
    s_b = scale if ch_axis is None else scale.reshape([-1 if d == ch_axis else 1 for d in range(3)])
    z_b = zero_point if ch_axis is None else zero_point.reshape(s_b.shape)
    centre = ((qmin + qmax) / 2 - z_b) * s_b
    x = centre + span * (qmax - qmin) / 2 * s_b * torch.randn(shape, generator=gen)
    return x.float(), scale, zero_point, qmin, qmax, ch_axis, s_b, z_b


@PROPERTY_SETTINGS
@given(grids())
def test_output_lies_on_grid(case):
    x, scale, zero_point, qmin, qmax, ch_axis, s_b, z_b = case
    out = fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
    level = out / s_b + z_b
    # (q - z) * s / s is q up to float rounding: the nearest integer is within a hair and inside the grid
    nearest = level.round()
    assert torch.all((level - nearest).abs() <= 1e-4 * (1 + nearest.abs()))
    assert torch.all((nearest >= qmin) & (nearest <= qmax))
    # and exactly the integer quantize_to_int reports
    assert torch.equal(nearest.to(torch.int32), quantize_to_int(x, scale, zero_point, qmin, qmax, ch_axis))


@PROPERTY_SETTINGS
@given(grids())
def test_idempotent(case):
    x, scale, zero_point, qmin, qmax, ch_axis, *_ = case
    once = fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
    twice = fake_quantize(once, scale, zero_point, qmin, qmax, ch_axis)
    torch.testing.assert_close(twice, once, atol=0, rtol=0)
    lsq_twice = lsq_fake_quantize(once, scale, zero_point, qmin, qmax, ch_axis)
    torch.testing.assert_close(lsq_twice, once, atol=0, rtol=0)


@PROPERTY_SETTINGS
@given(grids())
def test_error_at_most_half_step_inside_range(case):
    x, scale, zero_point, qmin, qmax, ch_axis, s_b, z_b = case
    out = fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
    lo, hi = (qmin - z_b) * s_b, (qmax - z_b) * s_b
    inside = (x >= lo) & (x <= hi)
    err = (out - x).abs()
    bound = (s_b / 2) * (1 + 1e-5) + 1e-6 * x.abs()
    assert torch.all(torch.where(inside, err <= bound, True))
    # outside, the output is the nearest end of the grid
    assert torch.all(torch.where(x < lo - s_b, out == lo.expand_as(x), True))
    assert torch.all(torch.where(x > hi + s_b, out == hi.expand_as(x), True))


@PROPERTY_SETTINGS
@given(grids())
def test_ste_gradient_inside_one_outside_zero(case):
    x, scale, zero_point, qmin, qmax, ch_axis, s_b, z_b = case
    lo, hi = (qmin - z_b) * s_b, (qmax - z_b) * s_b
    for fn in (fake_quantize, lsq_fake_quantize):
        xg = x.clone().requires_grad_(True)
        fn(xg, scale, zero_point, qmin, qmax, ch_axis).sum().backward()
        inside = (x >= lo) & (x <= hi)
        far_outside = (x < lo - s_b) | (x > hi + s_b)
        assert torch.all(xg.grad[inside] == 1)
        assert torch.all(xg.grad[far_outside] == 0)
        assert torch.all((xg.grad == 0) | (xg.grad == 1))


@PROPERTY_SETTINGS
@given(
    st.lists(st.floats(-5, 5), min_size=1, max_size=40),
    st.floats(0.01, 3.0),
)
def test_binarize_ste_rule(values, scale_value):
    x = torch.tensor(values, requires_grad=True)
    scale = torch.tensor([scale_value])
    out = binarize(x, scale)
    assert torch.all(out.abs() == scale)
    assert torch.all((out > 0) == (x >= 0))
    out.sum().backward()
    expected = (x.detach().abs() <= scale).float()
    assert torch.equal(x.grad, expected)


@PROPERTY_SETTINGS
@given(
    st.integers(2, 8),
    st.booleans(),
    st.booleans(),
    st.floats(-100.0, 0.0),
    st.floats(0.0, 100.0),
)
def test_scale_zero_point_from_bounds(bits, signed, symmetric, lo, hi):
    qmin, qmax = quant_range(bits, signed)
    min_val, max_val = torch.tensor([lo]), torch.tensor([hi])
    if symmetric and not signed:
        min_val = torch.zeros(1)  # an unsigned symmetric grid starts at 0
    scale, zero_point = scale_zero_point_from_bounds(min_val, max_val, qmin, qmax, symmetric)
    assert scale.shape == (1,) and zero_point.shape == (1,)
    assert scale.item() > 0
    assert zero_point.item() == round(zero_point.item()) and qmin <= zero_point.item() <= qmax
    if symmetric:
        assert zero_point.item() == 0
    # 0 is represented exactly
    zero = torch.zeros(1)
    assert fake_quantize(zero, scale, zero_point, qmin, qmax).item() == 0.0
    if scale.item() <= 1e-8:  # degenerate range [0, 0]
        return
    # the bounds land within one step of the grid's ends (the wider side for a symmetric signed grid)
    q_lo = (min_val / scale + zero_point).item()
    q_hi = (max_val / scale + zero_point).item()
    if symmetric and signed:
        if -min_val.item() >= max_val.item():
            assert abs(q_lo - qmin) <= 1 + 1e-4
        else:
            assert abs(q_hi - qmax) <= 1 + 1e-4
        assert qmin - 1e-4 <= q_lo and q_hi <= qmax + 1 + 1e-4
    else:
        assert abs(q_lo - qmin) <= 1 + 1e-4
        assert abs(q_hi - qmax) <= 1 + 1e-4


def test_scale_zero_point_from_bounds_examples():
    scale, zero_point = scale_zero_point_from_bounds(torch.tensor([-1.0]), torch.tensor([3.0]), 0, 255, False)
    assert scale.item() == pytest.approx(4.0 / 255) and zero_point.item() == 64.0
    # symmetric signed: the wider side sets the step
    scale, zero_point = scale_zero_point_from_bounds(torch.tensor([-3.0]), torch.tensor([1.0]), -8, 7, True)
    assert scale.item() == pytest.approx(3.0 / 7.5) and zero_point.item() == 0.0
    # bounds that exclude zero are widened to include it
    scale, zero_point = scale_zero_point_from_bounds(torch.tensor([2.0]), torch.tensor([4.0]), 0, 15, False)
    assert scale.item() == pytest.approx(4.0 / 15) and zero_point.item() == 0.0
    scale, zero_point = scale_zero_point_from_bounds(torch.tensor([-4.0]), torch.tensor([-2.0]), 0, 15, False)
    assert scale.item() == pytest.approx(4.0 / 15) and zero_point.item() == 15.0
    # an all-zero range gives a tiny positive step, never 0
    scale, _ = scale_zero_point_from_bounds(torch.zeros(3), torch.zeros(3), -8, 7, True)
    assert torch.all(scale > 0)


# ---------------------------------------------------------------------------------------------------------------
# ranges and validation
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_quant_range(bits):
    assert quant_range(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert quant_range(bits, False) == (0, 2**bits - 1)
    assert quant_range(1, True) == (-1, 1)


@pytest.mark.parametrize(
    ("value", "kwargs", "match"),
    [
        (0, {}, r"`w_bits` must be within \[2, 8\], got 0\. HINT: pass e\.g\. `w_bits=4`\.$"),
        (9, {"allow_binary": True}, r"`w_bits` must be within \[2, 8\], got 9\. HINT: pass e\.g\. `w_bits=4`\.$"),
        (1, {}, r"got 1\. HINT: for binary weights pass `binary_weights=True`"),
        (3, {"low": 4}, r"`w_bits` must be within \[4, 8\], got 3\. HINT: pass e\.g\. `w_bits=4`"),
        (3.5, {}, r"`w_bits` must be an integer number of bits in \[2, 8\], got 3\.5\. HINT: pass e\.g\. `w_bits=4`"),
        ("four", {}, r"`w_bits` must be an integer number of bits in \[2, 8\], got 'four'\. HINT"),
        (True, {}, r"`w_bits` must be an integer number of bits in \[2, 8\], got True\. HINT"),
    ],
)
def test_validate_bits_errors(value, kwargs, match):
    with pytest.raises(QuantizationConfigError, match=match):
        validate_bits("w_bits", value, **kwargs)


def test_validate_bits_accepts():
    assert validate_bits("bits", 1, allow_binary=True) == 1
    assert [validate_bits("bits", b) for b in BITS] == BITS
