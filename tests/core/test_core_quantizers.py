"""UniformQuantizer: lazy initialisation, observing, mutable bit widths, checkpoints, binary, dtypes, LSQ."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import fake_quantize
from lightning_quant.core.quantizers import UniformQuantizer


def _weight(seed: int = 0, shape: tuple[int, ...] = (3, 8)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # channels with clearly different ranges
    scales = torch.linspace(0.5, 2.0, shape[0]).reshape([-1] + [1] * (len(shape) - 1))
    return torch.randn(shape, generator=gen) * scales


def _broadcast(t: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if ch_axis is None:
        return t
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return t.reshape(shape)


def _levels_per_channel(out: torch.Tensor) -> list[int]:
    return [row.unique().numel() for row in out.reshape(out.shape[0], -1)]


# ---------------------------------------------------------------------------------------------------------------
# lazy initialisation and observing
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("learnable", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_lazy_init_from_first_input(learnable, training):
    w = _weight()
    q = UniformQuantizer(bits=4, ch_axis=0, num_channels=3, learnable=learnable)
    q.train(training)
    assert not bool(q.initialized) and torch.all(q.scale == 1)
    with torch.no_grad():
        out = q(w)
    assert bool(q.initialized)
    # symmetric signed 4-bit: the wider side of each channel spans 7.5 steps
    rows = w.numpy().astype(np.float64)
    expected = np.maximum(-rows.min(axis=1), rows.max(axis=1)) / 7.5
    torch.testing.assert_close(q.scale.detach().double(), torch.from_numpy(expected), rtol=1e-6, atol=0)
    assert torch.all(q.zero_point == 0)
    torch.testing.assert_close(out, fake_quantize(w, q.scale.detach(), q.zero_point, -8, 7, ch_axis=0), atol=0, rtol=0)
    assert max(_levels_per_channel(out)) <= 16


def test_asymmetric_lazy_init():
    x = torch.tensor([[-1.0, 0.2, 3.0, 1.5]])
    q = UniformQuantizer(bits=8, symmetric=False, signed=True, learnable=False)
    assert not q.signed and (q.qmin, q.qmax) == (0, 255)  # an asymmetric grid is unsigned
    q(x)
    assert q.scale.item() == pytest.approx(4.0 / 255)
    assert q.zero_point.item() == 64.0
    assert q(torch.zeros(1, 1)).item() == 0.0  # 0 is represented exactly


def test_observer_mode_follows_its_observer():
    q = UniformQuantizer(bits=8, learnable=False)  # minmax observer, per tensor
    assert q.observing and isinstance(q.scale, torch.Tensor) and not isinstance(q.scale, torch.nn.Parameter)
    q.train()
    q(torch.tensor([-1.0, 1.0]))
    first = q.scale.clone()
    q(torch.tensor([-4.0, 2.0]))  # training + observing: the range grows
    assert q.scale.item() == pytest.approx(4.0 / 127.5) and q.scale.item() > first.item()
    q.eval()
    q(torch.tensor([-10.0, 10.0]))  # eval: no update
    assert q.scale.item() == pytest.approx(4.0 / 127.5)
    q.train()
    q.observing = False
    q(torch.tensor([-10.0, 10.0]))  # observing off: fixed
    assert q.scale.item() == pytest.approx(4.0 / 127.5)
    assert int(q.observer.num_batches) == 2


def test_observer_mode_with_moving_average():
    q = UniformQuantizer(bits=8, learnable=False, observer="moving_average")
    q.train()
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-1.0, 3.0]))
    # EMA of the maxima with momentum 0.1: 1 + 0.1 * (3 - 1) = 1.2
    assert q.observer.max_val.item() == pytest.approx(1.2)
    assert q.scale.item() == pytest.approx(1.2 / 127.5)


def test_lsq_does_not_reobserve_unless_observing():
    q = UniformQuantizer(bits=8, learnable=True)
    assert not q.observing and isinstance(q.scale, torch.nn.Parameter)
    q.train()
    q(torch.tensor([-1.0, 1.0]))
    assert q.scale.item() == pytest.approx(1.0 / 127.5)
    q(torch.tensor([-5.0, 5.0]))
    assert q.scale.item() == pytest.approx(1.0 / 127.5)
    assert int(q.observer.num_batches) == 1
    q.observing = True  # a calibration phase
    q(torch.tensor([-5.0, 5.0]))
    assert q.scale.item() == pytest.approx(5.0 / 127.5)
    q.observing = False
    with torch.no_grad():
        q.scale.mul_(0.5)  # "learned"
    q(torch.tensor([-9.0, 9.0]))
    assert q.scale.item() == pytest.approx(2.5 / 127.5)


def test_observing_forward_gives_the_step_no_gradient():
    """A forward that sets the step from data gives it a zero gradient (it stays in the graph, for DDP)."""
    q = UniformQuantizer(bits=4, ch_axis=0, num_channels=3)
    q.train()
    w = _weight(13).requires_grad_(True)
    q(w).sum().backward()  # lazy initialisation: the step comes from data
    assert torch.equal(q.scale.grad, torch.zeros(3)) and w.grad is not None
    q.observing = True
    x = _weight(14).requires_grad_(True)
    (q(x) + q(x * 2)).sum().backward()  # observing twice in one step (a layer called twice) is fine
    assert torch.equal(q.scale.grad, torch.zeros(3))
    q.scale.grad = None
    q.observing = False
    q(x).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_disabled_is_identity():
    q = UniformQuantizer(bits=2)
    q.enabled = False
    x = _weight()
    assert q(x) is x
    assert not bool(q.initialized)


# ---------------------------------------------------------------------------------------------------------------
# bit widths
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("old", "new"), [(8, 4), (4, 8), (6, 2), (3, 5)])
@pytest.mark.parametrize("learnable", [True, False])
def test_changing_bits_keeps_symmetric_range(old, new, learnable):
    w = _weight(1, (4, 32))
    q = UniformQuantizer(bits=old, ch_axis=0, num_channels=4, learnable=learnable)
    q.eval()
    q(w)
    step_before = q.scale.detach().clone()
    top_before, bottom_before = q.qmax * step_before, q.qmin * step_before
    q.bits = new
    assert q.bits == new and int(q.bit_width) == new and not q.bit_width.is_floating_point()
    assert (q.qmin, q.qmax) == (-(2 ** (new - 1)), 2 ** (new - 1) - 1)
    step = q.scale.detach()
    # the grid's total width is kept; each end moves by less than one step of the coarser grid
    torch.testing.assert_close((q.qmax - q.qmin) * step, (2**old - 1) * step_before)
    coarse = torch.maximum(step, step_before)
    assert torch.all((q.qmax * step - top_before).abs() <= coarse * (1 + 1e-6))
    assert torch.all((q.qmin * step - bottom_before).abs() <= coarse * (1 + 1e-6))
    assert isinstance(q.scale, torch.nn.Parameter) == learnable
    out = q(w)  # eval: the rescaled step is used as is
    assert max(_levels_per_channel(out)) <= 2**new
    torch.testing.assert_close(out, fake_quantize(w, step, q.zero_point, q.qmin, q.qmax, 0), atol=0, rtol=0)


@pytest.mark.parametrize(("old", "new"), [(8, 4), (4, 8), (8, 2), (3, 7)])
def test_changing_bits_keeps_asymmetric_range(old, new):
    x = torch.linspace(-1.3, 3.1, 200).reshape(2, 100)
    q = UniformQuantizer(bits=old, symmetric=False, learnable=False, ch_axis=0, num_channels=2)
    q.eval()
    q(x)
    low_before = ((q.qmin - q.zero_point) * q.scale).clone()
    high_before = ((q.qmax - q.zero_point) * q.scale).clone()
    q.bits = new
    assert int(q.bit_width) == new and (q.qmin, q.qmax) == (0, 2**new - 1)
    zp = q.zero_point
    assert torch.all(zp == zp.round()) and torch.all((zp >= 0) & (zp <= q.qmax))
    step = q.scale
    low_after = (q.qmin - zp) * step
    high_after = (q.qmax - zp) * step
    assert torch.all((low_after - low_before).abs() <= step * (0.5 + 1e-5))
    assert torch.all((high_after - high_before).abs() <= step * (0.5 + 1e-5))
    assert torch.all(q(torch.zeros(2, 1)) == 0)  # still exact zero


def test_setting_same_bits_is_a_no_op():
    q = UniformQuantizer(bits=4)
    q(_weight())
    scale = q.scale.detach().clone()
    q.bits = 4
    assert torch.equal(q.scale.detach(), scale)


def test_binary_via_setter_and_back():
    q = UniformQuantizer(bits=4, ch_axis=0, num_channels=3)
    q(_weight())
    q.bits = 1
    assert q.is_binary and (q.qmin, q.qmax) == (-1, 1) and int(q.bit_width) == 1
    out = q(_weight())
    assert torch.all(out.abs() == _broadcast(q.scale.detach(), out, 0))
    q.bits = 4
    assert not q.is_binary and (q.qmin, q.qmax) == (-8, 7)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"learnable": True, "ch_axis": 0, "num_channels": 3},
        {"learnable": False, "symmetric": False},
        {"learnable": True, "ch_axis": 0, "num_channels": 3, "bits": 1},
    ],
)
def test_state_dict_round_trip_restores_bits(kwargs):
    kwargs = dict(kwargs)
    start_bits = kwargs.pop("bits", 4)
    w = _weight(2)
    q = UniformQuantizer(bits=start_bits, **kwargs)
    q(w)
    with torch.no_grad():
        q.scale.mul_(1.1)  # as if trained
    if start_bits != 1:
        q.bits = 3
    state = q.state_dict()
    assert {"scale", "zero_point", "bit_width", "initialized", "observer.min_val"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = UniformQuantizer(bits=6, **kwargs)
    assert fresh.bits == 6
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.bits == q.bits and (fresh.qmin, fresh.qmax) == (q.qmin, q.qmax)
    assert int(fresh.bit_width) == q.bits
    assert fresh._initialized  # restored: the first forward does not re-initialise the step
    for mode in ("train", "eval"):
        getattr(q, mode)()
        getattr(fresh, mode)()
        x = _weight(3)
        torch.testing.assert_close(fresh(x), q(x), atol=0, rtol=0)
        assert torch.equal(fresh.scale, q.scale)


def test_load_state_of_uninitialised_quantizer_stays_lazy():
    source = UniformQuantizer(bits=5)
    fresh = UniformQuantizer(bits=8)
    fresh.load_state_dict(source.state_dict())
    assert fresh.bits == 5 and not fresh._initialized
    fresh(torch.tensor([-2.0, 2.0]))
    assert fresh.scale.item() == pytest.approx(2.0 / 15.5)


# ---------------------------------------------------------------------------------------------------------------
# binary
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ch_axis", [None, 0, 1])
def test_binary_outputs_plus_minus_mean_abs(ch_axis):
    w = _weight(4, (3, 5, 4))
    channels = 1 if ch_axis is None else w.shape[ch_axis]
    q = UniformQuantizer(bits=1, ch_axis=ch_axis, num_channels=channels)
    out = q(w)
    w64 = w.numpy().astype(np.float64)
    if ch_axis is None:
        mean_abs = np.abs(w64).mean().reshape(1)
    else:
        mean_abs = np.abs(np.moveaxis(w64, ch_axis, 0)).reshape(channels, -1).mean(axis=1)
    expected = np.where(w64 >= 0, 1.0, -1.0) * _broadcast(torch.from_numpy(mean_abs), w, ch_axis).numpy()
    torch.testing.assert_close(out.detach().double(), torch.from_numpy(expected), rtol=1e-6, atol=0)
    assert torch.equal(q.int_repr(w), torch.where(w >= 0, 1, -1).to(torch.int32))
    assert torch.all(q.zero_point == 0)


def test_binary_gradients():
    w = _weight(5).requires_grad_(True)
    q = UniformQuantizer(bits=1, ch_axis=0, num_channels=3)
    q(w * 0.5)  # initialise: the step set from data gets no gradient in that forward
    q(w).sum().backward()
    # scale: sum(sign(w)) * 1/sqrt(N * max(qmax, 1)) with qmax = 1; input: |w| <= scale
    factor = 1.0 / math.sqrt(w.shape[1])
    sign = torch.where(w.detach() >= 0, 1.0, -1.0)
    torch.testing.assert_close(q.scale.grad, sign.sum(dim=1) * factor)
    mask = (w.detach().abs() <= q.scale.detach().reshape(-1, 1)).float()
    assert torch.equal(w.grad, mask)
    assert 0 < mask.mean() < 1


def test_binary_needs_symmetric_signed():
    with pytest.raises(QuantizationConfigError, match=r"Binary quantization \(`bits=1`\) needs `symmetric=True, "):
        UniformQuantizer(bits=1, symmetric=False)
    with pytest.raises(QuantizationConfigError, match=r"needs `symmetric=True, signed=True`"):
        UniformQuantizer(bits=1, signed=False)
    q = UniformQuantizer(bits=4, symmetric=False)
    with pytest.raises(
        QuantizationConfigError, match=r"`bits` must be within \[2, 8\], got 1\. HINT: for binary weights"
    ):
        q.bits = 1


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------
INVALID_BITS = [
    (0, r"^`bits` must be within \[2, 8\], got 0\. HINT: pass e\.g\. `bits=4`\.$"),
    (9, r"^`bits` must be within \[2, 8\], got 9\. HINT: pass e\.g\. `bits=4`\.$"),
    (3.5, r"^`bits` must be an integer number of bits in \[2, 8\], got 3\.5\. HINT: pass e\.g\. `bits=4`\.$"),
    ("four", r"^`bits` must be an integer number of bits in \[2, 8\], got 'four'\. HINT: pass e\.g\. `bits=4`\.$"),
    (True, r"^`bits` must be an integer number of bits in \[2, 8\], got True\. HINT: pass e\.g\. `bits=4`\.$"),
]


@pytest.mark.parametrize(("value", "match"), INVALID_BITS)
def test_invalid_bits_in_constructor(value, match):
    with pytest.raises(QuantizationConfigError, match=match):
        UniformQuantizer(bits=value)


@pytest.mark.parametrize(("value", "match"), INVALID_BITS)
def test_invalid_bits_in_setter(value, match):
    q = UniformQuantizer(bits=4)
    with pytest.raises(QuantizationConfigError, match=match):
        q.bits = value
    assert q.bits == 4 and int(q.bit_width) == 4  # unchanged


# ---------------------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"learnable": True, "ch_axis": 0, "num_channels": 3},
        {"learnable": True},
        {"learnable": False, "symmetric": False},
        {"learnable": False, "ch_axis": 1, "num_channels": 8},
        {"learnable": True, "bits": 1, "ch_axis": 0, "num_channels": 3},
    ],
)
@pytest.mark.parametrize("grad", [True, False])
def test_bfloat16_in_bfloat16_out(kwargs, grad):
    kwargs = {"bits": 4, **kwargs}
    q = UniformQuantizer(**kwargs)
    q(_weight(6))  # initialise in float32
    q.eval()
    x = _weight(7).bfloat16()
    with torch.set_grad_enabled(grad):
        out = q(x)
        reference = q(x.float())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.bfloat16())


def test_bfloat16_gradients_flow():
    q = UniformQuantizer(bits=4, ch_axis=0, num_channels=3)
    q(_weight(8))
    x = _weight(9).bfloat16().requires_grad_(True)
    q(x).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and q.scale.grad.dtype == torch.float32
    assert q.scale.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# LSQ
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ch_axis", "shape"), [(None, (4, 10)), (0, (4, 10)), (1, (3, 5, 2))])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_grad_factor(ch_axis, shape, bits):
    channels = 1 if ch_axis is None else shape[ch_axis]
    q = UniformQuantizer(bits=bits, ch_axis=ch_axis, num_channels=channels)
    x = torch.zeros(shape)
    n = x.numel() // channels
    assert q.grad_factor(x) == pytest.approx(1.0 / math.sqrt(n * (2 ** (bits - 1) - 1)), rel=1e-12)


def test_grad_factor_unsigned():
    q = UniformQuantizer(bits=4, signed=False)
    assert q.grad_factor(torch.zeros(6, 5)) == pytest.approx(1.0 / math.sqrt(30 * 15))


@pytest.mark.parametrize("ch_axis", [None, 0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_quantizer_scale_gradient(ch_axis, symmetric):
    """The quantizer's step gradient is LSQ's formula times 1/sqrt(N * qmax) (through |s|, s > 0)."""
    w = _weight(10, (3, 40))
    channels = 1 if ch_axis is None else 3
    q = UniformQuantizer(bits=3, symmetric=symmetric, ch_axis=ch_axis, num_channels=channels)
    q.eval()
    q(w * 0.6)  # initialise on a narrower range, so that part of w is clipped
    q.train()
    q(w).sum().backward()
    qmin, qmax = q.qmin, q.qmax
    s = q.scale.detach().double()
    z = q.zero_point.double()
    x = w.double()
    s_b, z_b = _broadcast(s, x, ch_axis), _broadcast(z, x, ch_axis)
    inv = (1.0 / q.scale.detach()).double()  # aten's float32 reciprocal decides the rounding
    rounded = torch.round(w * _broadcast(inv.float(), w, ch_axis)).double()
    level = rounded + z_b
    per_element = torch.where(
        level < qmin, qmin - z_b, torch.where(level > qmax, qmax - z_b, rounded - x / s_b)
    ).expand_as(x)
    assert (level < qmin).any() or (level > qmax).any()
    total = per_element.sum(dim=1) if ch_axis == 0 else per_element.sum().reshape(1)
    expected = total / math.sqrt(x.numel() / channels * qmax)
    torch.testing.assert_close(q.scale.grad.double(), expected, atol=1e-5, rtol=1e-5)


def test_lsq_no_grad_uses_plain_fake_quant():
    q = UniformQuantizer(bits=4)
    w = _weight(11)
    q(w)
    with torch.no_grad():
        out = q(w)
    assert out.grad_fn is None
    assert torch.equal(out, q(w).detach())


def test_int_repr_dequantizes_to_forward():
    for kwargs in ({"ch_axis": 0, "num_channels": 3}, {"symmetric": False}):
        q = UniformQuantizer(bits=5, **kwargs)
        w = _weight(12)
        out = q(w)
        ints = q.int_repr(w)
        assert ints.dtype == torch.int32
        assert int(ints.min()) >= q.qmin and int(ints.max()) <= q.qmax
        ch_axis = kwargs.get("ch_axis")
        s = _broadcast(q.effective_scale().detach(), w, ch_axis)
        z = _broadcast(q.zero_point, w, ch_axis)
        torch.testing.assert_close((ints.float() - z) * s, out.detach(), atol=0, rtol=0)


def test_effective_scale_positive():
    q = UniformQuantizer(bits=4)
    q(_weight())
    with torch.no_grad():
        q.scale.neg_()
    assert torch.all(q.effective_scale() > 0)
    with torch.no_grad():
        q.scale.zero_()
    assert torch.all(q.effective_scale() == 1e-8)


def test_extra_repr():
    assert (
        UniformQuantizer(bits=4, ch_axis=0, num_channels=2).extra_repr()
        == "bits=4, symmetric, signed, per_channel(axis=0), scale=lsq"
    )
    assert UniformQuantizer(bits=8, symmetric=False, learnable=False).extra_repr() == (
        "bits=8, asymmetric, unsigned, per_tensor, scale=observer"
    )
    assert UniformQuantizer(bits=1).extra_repr().startswith("bits=1, binary")
