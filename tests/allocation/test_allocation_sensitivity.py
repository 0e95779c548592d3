"""Sensitivities: the Fisher/noise model, the EMA, and Hutchinson's Hessian diagonal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant import LayerSpec, QuantSpec, quantize_model
from lightning_quant.allocation import (
    FisherEMA,
    channel_sq_sum,
    channel_sum,
    hutchinson_diagonal,
    hutchinson_sensitivities,
    noise_sensitivity,
)
from lightning_quant.core.quantizers import UniformQuantizer


def test_channel_sums() -> None:
    g = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(channel_sq_sum(g, 1), (g**2).sum(dim=(0, 2)))
    torch.testing.assert_close(channel_sum(g, 0), g.sum(dim=(1, 2)))
    torch.testing.assert_close(channel_sq_sum(g, None), (g**2).sum().reshape(1))


def test_noise_sensitivity_is_exact_at_the_current_width_and_follows_4_to_the_minus_b() -> None:
    torch.manual_seed(0)
    q = UniformQuantizer(bits=4, ch_axis=0, num_channels=3, learnable=False)
    q.observe(torch.randn(3, 10))
    curvature = torch.tensor([1.0, 2.0, 3.0])
    step = q.scale.clone()
    s = noise_sensitivity(curvature, q)
    expected_now = 0.5 * float((curvature * step**2 / 12).sum())
    assert s * 4.0**-4 == pytest.approx(expected_now, rel=1e-6)
    # one bit more halves the step (up to (2**b - 1) vs 2**b): the noise term drops about 4x
    q.bits = 5
    assert noise_sensitivity(curvature, q) == pytest.approx(s, rel=0.15)
    # per-tensor quantizers take the summed curvature
    qt = UniformQuantizer(bits=4, learnable=False)
    qt.scale.fill_(0.5)
    assert noise_sensitivity(torch.tensor([1.0, 2.0, 3.0]), qt) == pytest.approx(0.5 * 6 * 0.25 / 12 * 4**4)


def test_loss_increase_prediction_on_a_quadratic() -> None:
    """On a quadratic loss the second-order prediction of the quantization noise's effect is exact in expectation."""
    torch.manual_seed(0)
    h = torch.tensor([4.0, 1.0, 0.25, 9.0])
    w = torch.randn(4)
    q = UniformQuantizer(bits=3, learnable=False)
    q.observe(w)
    predicted = noise_sensitivity(h.sum().reshape(1), q) * 4.0**-3
    # E over random offsets of the grid: the rounding error is uniform within one step
    step = q.scale.item()
    offsets = torch.rand(20000, 1) * step
    errors = torch.remainder(w[None, :] + offsets, step) - step / 2
    measured = 0.5 * (errors**2 * h).sum(dim=1).mean().item()
    # per-tensor noise with the summed curvature: the same as the per-element sum, since the step is shared
    assert measured == pytest.approx(predicted, rel=0.05)


def test_fisher_ema() -> None:
    ema = FisherEMA(decay=0.75)
    ema.update("a", torch.tensor([4.0, 8.0]))
    ema.update("a", torch.tensor([0.0, 0.0]))
    ema.step()
    torch.testing.assert_close(ema["a"], torch.tensor([3.0, 6.0]))
    restored = FisherEMA()
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored["a"], ema["a"])
    assert restored.decay == 0.75 and restored.steps == 1 and "a" in restored and "b" not in restored


def test_hutchinson_diagonal_exact_for_diagonal_and_unbiased_otherwise() -> None:
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    loss = 0.5 * (torch.tensor([2.0, 3.0, 5.0]) * w**2).sum()
    torch.testing.assert_close(hutchinson_diagonal(loss, [w], num_samples=3)[0], torch.tensor([2.0, 3.0, 5.0]))
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    v = torch.tensor([0.3, -0.7], requires_grad=True)
    g = torch.Generator().manual_seed(0)
    est = hutchinson_diagonal(0.5 * v @ a @ v, [v], num_samples=4000, generator=g)[0]
    torch.testing.assert_close(est, torch.tensor([2.0, 3.0]), atol=0.1, rtol=0)
    with pytest.raises(Exception, match="`num_samples` must be a positive integer"):
        hutchinson_diagonal(0.5 * v @ a @ v, [v], num_samples=0)


def test_hutchinson_sensitivities_rank_the_louder_layer_first() -> None:
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loud = nn.Linear(8, 8, bias=False)
            self.quiet = nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return 10 * self.loud(x) + 0.1 * self.quiet(x)

    model = quantize_model(Two(), QuantSpec(default=LayerSpec(act_bits=None), first_last_bits=None))
    x = torch.randn(32, 8)
    model(x)  # initialise the step sizes
    y = torch.randn(32, 8)
    sens = hutchinson_sensitivities(
        model, lambda m: ((m(x) - y) ** 2).mean(), num_samples=4, generator=torch.Generator().manual_seed(0)
    )
    assert set(sens) == {"loud", "quiet"}
    assert sens["loud"] > 100 * sens["quiet"] > 0
