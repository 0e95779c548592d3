"""Trainable threshold factors (FAT): a calibrated range, scaled and shifted by two clipped scalars.

Paper: A. Goncharenko, A. Denisov, S. Alyamkin, E. Terentev, "Fast Adjustable Threshold For Uniform Neural
Network Quantization", arXiv:1812.07872, 2018.

A :class:`ThresholdFactors` module is attached to an observer-mode
:class:`~lightning_quant.core.quantizers.UniformQuantizer`. It keeps the calibrated bounds ``[lo, hi]`` (per
tensor or per channel) as buffers and two trainable scalars, ``alpha`` (scales the threshold width) and ``beta``
(shifts the lower threshold by a fraction of the width). The adjusted range is

* asymmetric grid, signed data (``lo < 0``): ``lo' = lo + beta * (hi - lo)``, ``hi' = lo' + alpha * (hi - lo)``;
* asymmetric grid, unsigned data (``lo >= 0``, e.g. after a ReLU) and symmetric grids: ``alpha`` only,
  ``[lo', hi'] = [alpha * lo, alpha * hi]`` (zero stays where it was; ``beta`` takes no part);

with ``alpha`` and ``beta`` clipped to :attr:`ThresholdFactors.ALPHA_RANGE` and :attr:`ThresholdFactors.BETA_RANGE`
(the ranges of the paper's official code). The range always keeps 0 inside (``lo' <= 0 <= hi'``), as every
integer runtime requires. Step size and zero point are then computed *differentiably* from ``[lo', hi']``; the
zero point is rounded with a straight-through estimate, so gradients reach ``alpha`` and ``beta``:

>>> import torch
>>> f = ThresholdFactors()
>>> f.calibrate(torch.tensor([-1.0]), torch.tensor([3.0]), symmetric=False)
>>> s, z = f.scale_zero_point(0, 255, symmetric=False)
>>> round(s.item() * 255, 4), z.item()
(4.0, 64.0)
>>> with torch.no_grad():
...     _ = f.alpha.fill_(0.5), f.beta.fill_(0.1)  # width 2, lower threshold -1 + 0.4 = -0.6
>>> lo, hi = f.adjusted_bounds(symmetric=False)
>>> round(lo.item(), 4), round(hi.item(), 4)
(-0.6, 1.4)
>>> s, z = f.scale_zero_point(0, 255, symmetric=False)
>>> (s * 100).sum().backward()
>>> round(f.alpha.grad.item(), 4)  # d(100 * 4 * alpha / 255) / d alpha
1.5686
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

_EPS = 1e-8


def _round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in forward, identity in backward."""
    return x + (torch.round(x) - x).detach()


def _clip_ste(x: Tensor, low: float, high: float) -> Tensor:
    """``clamp(x, low, high)`` in forward, identity in backward.

    ``torch.clamp`` passes no gradient at the bounds, so a factor projected onto a bound
    (:meth:`ThresholdFactors.clip_`) could never move back; with the projection after every step the forward clip
    only guards against hand-set values.
    """
    return x + (x.clamp(low, high) - x).detach()


class ThresholdFactors(nn.Module):
    """FAT's trainable factors ``alpha`` (width) and ``beta`` (shift) over a calibrated range (see module docs).

    Args:
        num_channels: 1 for a per-tensor range, else the number of channels of a per-channel range. The factors
            are scalars either way (one ``alpha``/``beta`` per quantized tensor, as in the paper).
    """

    #: the clip ranges of the paper's official code (``alpha`` scales the width, ``beta`` shifts the minimum)
    ALPHA_RANGE: ClassVar[tuple[float, float]] = (0.5, 1.3)
    BETA_RANGE: ClassVar[tuple[float, float]] = (-0.2, 0.4)

    def __init__(self, num_channels: int = 1) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.zeros(()))
        self.register_buffer("min_val", torch.zeros(num_channels))
        self.register_buffer("max_val", torch.zeros(num_channels))
        # 1 where beta takes part (asymmetric grid over signed data); a float so it can gate beta's term
        self.register_buffer("beta_mask", torch.zeros(()))
        # integer, not bool: DDP broadcasts buffers and gloo has no bool
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.long))
        self._calibrated = False

    @property
    def is_calibrated(self) -> bool:
        """Whether :meth:`calibrate` has set the range (until then the quantizer's own path runs)."""
        return self._calibrated

    @property
    def uses_beta(self) -> bool:
        """Whether ``beta`` takes part (asymmetric grid over signed data); otherwise ``alpha`` only."""
        return bool(self.beta_mask)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._calibrated = bool(self.calibrated)

    @torch.no_grad()
    def calibrate(self, min_val: Tensor, max_val: Tensor, *, symmetric: bool) -> None:
        """Take ``[min_val, max_val]`` as the calibrated range and reset the factors to ``alpha=1, beta=0``."""
        self.min_val.copy_(min_val.detach().reshape(self.min_val.shape))
        self.max_val.copy_(max_val.detach().reshape(self.max_val.shape))
        signed_data = bool((self.min_val < 0).any())
        self.beta_mask.fill_(float(signed_data and not symmetric))
        self.alpha.fill_(1.0)
        self.beta.fill_(0.0)
        self.calibrated.fill_(1)
        self._calibrated = True

    @torch.no_grad()
    def clip_(self) -> None:
        """Project ``alpha`` and ``beta`` onto their ranges (after each optimizer step)."""
        self.alpha.clamp_(*self.ALPHA_RANGE)
        self.beta.clamp_(*self.BETA_RANGE)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(alpha, beta)`` as used in forward: clipped, ``beta`` zero where it takes no part."""
        alpha = _clip_ste(self.alpha, *self.ALPHA_RANGE)
        beta = _clip_ste(self.beta, *self.BETA_RANGE) * self.beta_mask
        return alpha, beta

    def adjusted_bounds(self, *, symmetric: bool) -> tuple[Tensor, Tensor]:
        """The adjusted range ``(lo', hi')`` (differentiable in ``alpha`` and ``beta``), 0 always inside."""
        lo = self.min_val.clamp(max=0.0)
        hi = self.max_val.clamp(min=0.0)
        alpha, beta = self.factors()
        if symmetric:
            # beta is masked to 0 here; adding it keeps it in the graph (zero gradient) for DDP's reducer
            return alpha * lo + beta, alpha * hi + beta
        width = hi - lo
        # for unsigned data (lo = 0) beta is masked to 0, which leaves [0, alpha * hi]
        lo_adj = lo + beta * width
        hi_adj = lo_adj + alpha * width
        return lo_adj.clamp(max=0.0), hi_adj.clamp(min=0.0)

    def scale_zero_point(self, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        """Step size and zero point of the adjusted range (same grid rules as the observers use)."""
        lo, hi = self.adjusted_bounds(symmetric=symmetric)
        if symmetric:
            if qmin < 0:
                scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
            else:
                scale = hi / qmax
            scale = scale.clamp_min(_EPS)
            return scale, torch.zeros_like(scale)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
        zero_point = torch.clamp(qmin - _round_ste(lo / scale), qmin, qmax)
        return scale, zero_point

    def zero_term(self) -> Tensor:
        """``0 * (alpha + beta)``: keeps the factors in the graph (DDP's reducer) while they do not act yet."""
        return (self.alpha + self.beta) * 0.0

    def extra_repr(self) -> str:
        if not self._calibrated:
            return "uncalibrated"
        alpha, beta = self.factors()
        return f"alpha={alpha.item():.4f}, beta={beta.item():.4f}, uses_beta={self.uses_beta}"
