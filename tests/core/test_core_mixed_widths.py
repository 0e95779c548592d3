"""Per-output-channel bit widths (binary included): each channel group is exactly a quantizer of its width."""

from __future__ import annotations

import pytest
import torch

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.quantizers import UniformQuantizer

WIDTHS = (4, 1, 2, 8, 4, 1, 3, 2)


def _weight(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 2.0, len(WIDTHS)).reshape(-1, 1, 1, 1)
    return torch.randn(len(WIDTHS), 3, 2, 2, generator=gen) * scales


def _reference(q: UniformQuantizer, bits: int, idx: list[int]) -> UniformQuantizer:
    """A quantizer of one width over ``idx``'s channels with ``q``'s step sizes of those channels."""
    ref = UniformQuantizer(bits, ch_axis=0, num_channels=len(idx), learnable=q.learnable, observer=q.observer_name)
    with torch.no_grad():
        ref.scale.copy_(q.scale.detach()[idx])
        ref.zero_point.copy_(q.zero_point[idx])
    ref.initialized.fill_(1)
    ref._initialized = True
    ref.observing = False
    return ref


@pytest.mark.parametrize("learnable", [True, False])
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_each_channel_group_is_bit_exact_against_a_quantizer_of_its_width(learnable, observer):
    w = _weight()
    q = UniformQuantizer(WIDTHS, ch_axis=0, num_channels=len(WIDTHS), learnable=learnable, observer=observer)
    with torch.no_grad():
        q(w)  # initialise: the observer sets each group's steps at its own width
    q.observing = False
    x = w.clone().requires_grad_(True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (q(x) * upstream).sum().backward()
    for bits in sorted(set(WIDTHS)):
        idx = [c for c, b in enumerate(WIDTHS) if b == bits]
        # the observer of a one-width quantizer gives these channels the same initial steps
        fresh = UniformQuantizer(bits, ch_axis=0, num_channels=len(idx), learnable=learnable, observer=observer)
        with torch.no_grad():
            fresh(w[idx])
        torch.testing.assert_close(fresh.scale.detach(), q.scale.detach()[idx], rtol=0, atol=0)
        ref = _reference(q, bits, idx)
        xr = w[idx].clone().requires_grad_(True)
        out = ref(xr)
        (out * upstream[idx]).sum().backward()
        assert torch.equal(q(w).detach()[idx], out.detach()), bits
        assert torch.equal(x.grad[idx], xr.grad), bits
        if learnable:
            assert torch.equal(q.scale.grad[idx], ref.scale.grad), bits
        assert torch.equal(q.int_repr(w)[idx], ref.int_repr(w[idx])), bits


def test_binary_and_four_bit_channels_in_one_layer():
    w = _weight(2)[:4]
    q = UniformQuantizer((1, 4, 1, 4), ch_axis=0, num_channels=4)
    out = q(w)
    for c, bits in enumerate((1, 4, 1, 4)):
        assert out[c].unique().numel() <= (2 if bits == 1 else 16)
    codes = q.int_repr(w)
    assert set(codes[[0, 2]].unique().tolist()) <= {-1, 1}
    assert torch.equal(q.dequantize(codes), out.detach())
    assert q.payload_bits(w) == 12 * (1 + 4 + 1 + 4)
    assert q.storage_bits(w) == q.payload_bits(w) + 32 * 8


def test_widths_change_per_channel_and_keep_each_channel_range():
    w = _weight(3)
    q = UniformQuantizer(4, ch_axis=0, num_channels=len(WIDTHS), learnable=False)
    q(w)
    range_before = 15 * q.scale.clone()  # (qmax - qmin) * step at 4 bits
    q.bits = WIDTHS
    assert q.bits == WIDTHS and q.mixed and q.bit_width.tolist() == list(WIDTHS)
    for c, bits in enumerate(WIDTHS):
        levels = 2 if bits == 1 else 2**bits - 1  # binary: [-s, s] spans 2 steps
        torch.testing.assert_close(levels * q.scale[c], range_before[c])
    q.bits = 4  # back to one width
    assert q.bits == 4 and not q.mixed and q.bit_width.dim() == 0


def test_state_dict_round_trip_into_a_fresh_one_width_quantizer():
    w = _weight(4)
    q = UniformQuantizer(WIDTHS, ch_axis=0, num_channels=len(WIDTHS))
    q(w)
    fresh = UniformQuantizer(8, ch_axis=0, num_channels=len(WIDTHS))
    fresh.load_state_dict(q.state_dict())
    assert fresh.bits == WIDTHS
    assert torch.equal(fresh(w), q(w))
    back = UniformQuantizer(WIDTHS, ch_axis=0, num_channels=len(WIDTHS))
    back.load_state_dict(fresh.state_dict())
    assert torch.equal(back(w), q(w))


def test_mixed_width_errors():
    with pytest.raises(QuantizationConfigError, match=r"one width per channel: 4 widths, got 3"):
        UniformQuantizer((4, 4, 2), ch_axis=0, num_channels=4)
    with pytest.raises(QuantizationConfigError, match=r"must be within \[2, 8\], got 9"):
        UniformQuantizer((4, 9), ch_axis=0, num_channels=2)
    with pytest.raises(QuantizationConfigError, match=r"got 1\. HINT: for binary weights"):
        UniformQuantizer((4, 1), symmetric=False, ch_axis=0, num_channels=2)
    with pytest.raises(QuantizationConfigError, match=r"but the quantizer is per tensor"):
        UniformQuantizer((4, 4))
    q = UniformQuantizer((4, 2), ch_axis=0, num_channels=2)
    with pytest.raises(QuantizationConfigError, match=r"`qmax` is undefined for per-channel bit widths"):
        _ = q.qmax
    with pytest.raises(QuantizationConfigError, match=r"mixed-width quantizer"):
        UniformQuantizer((4, 2), ch_axis=0, num_channels=2, learnable=False).attach_threshold_factors()
