"""Quantizer modules: the stateful parts that fake-quantize a weight or an activation.

A :class:`UniformQuantizer` is composed of small orthogonal choices -- bit width (mutable, 1 = binary),
grid (symmetric signed/unsigned or asymmetric), granularity (per tensor or per channel) and step size
(learned with LSQ, or set by an :mod:`observer <lightning_quant.core.observers>`) -- and keeps all of its state
in buffers and parameters, so a checkpoint restores it exactly (bit widths changed during training included).

Life cycle: while ``observing`` is on (calibration, in training mode) each forward updates the observer and
resets the step size from it; afterwards the step size is either fixed (observer mode) or learned (LSQ). A
quantizer that has never observed anything initialises itself from its first input, so it is never used with
an arbitrary step size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

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
from lightning_quant.core.fused import lsq_fake_quantize_fast
from lightning_quant.core.observers import make_observer
from lightning_quant.core.thresholds import ThresholdFactors


class UniformQuantizer(nn.Module):
    """Uniform affine fake quantizer (2-8 bits) or binary quantizer (1 bit), per tensor or per channel.

    Args:
        bits: bit width; 1 means binary (``scale * sign(x)``, weights only).
        symmetric: zero point fixed at 0 (weights); otherwise asymmetric with an integer zero point.
        signed: signed grid for symmetric quantizers (weights); unsigned suits post-ReLU activations.
        ch_axis: channel axis for per-channel step sizes (0 for Conv/Linear weights), ``None`` for per tensor.
        num_channels: size of ``ch_axis``.
        learnable: learn the step size with LSQ (Esser et al., 2020) after its observer-based initialisation.
        observer: name of the observer that sets (or initialises) the step size.

    Example:
        >>> q = UniformQuantizer(bits=4, ch_axis=0, num_channels=3)
        >>> w = torch.randn(3, 8)
        >>> q(w).unique(dim=None).numel() <= 3 * 16
        True
        >>> q.bits = 3  # a later callback changes the width; the represented range is kept
        >>> q.qmin, q.qmax
        (-4, 3)
    """

    def __init__(
        self,
        bits: int = 8,
        *,
        symmetric: bool = True,
        signed: bool = True,
        ch_axis: int | None = None,
        num_channels: int = 1,
        learnable: bool = True,
        observer: str = "minmax",
    ) -> None:
        super().__init__()
        bits = validate_bits("bits", bits, allow_binary=True)
        if bits == 1 and not (symmetric and signed):
            raise QuantizationConfigError("Binary quantization (`bits=1`) needs `symmetric=True, signed=True`.")
        self.symmetric = symmetric
        self.signed = signed if symmetric else False
        self.ch_axis = ch_axis
        self.learnable = learnable
        self.observer_name = observer
        # observer-driven quantizers follow their observer; LSQ ones initialise once and then learn (a callback
        # turns observing on for its calibration batches)
        self.observing = not learnable
        self.enabled = True
        self.observer = make_observer(observer, num_channels, ch_axis)
        scale = torch.ones(num_channels)
        if learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(num_channels))
        self.register_buffer("bit_width", torch.tensor(bits, dtype=torch.long))
        # integer, not bool: DDP broadcasts buffers and gloo has no bool
        self.register_buffer("initialized", torch.zeros((), dtype=torch.long))
        self._bits = bits
        self._initialized = False
        # FAT's trainable threshold factors (attach_threshold_factors); None keeps the default path
        self.threshold_factors: ThresholdFactors | None = None

    # -- bit width -------------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """The bit width (1 = binary). Setting it rescales the step size so the represented range is kept."""
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        value = validate_bits("bits", value, allow_binary=self.symmetric and self.signed)
        if value == self._bits:
            return
        old_width = self.qmax - self.qmin
        old_min = self.qmin
        self._bits = value
        self.bit_width.fill_(value)
        ratio = old_width / (self.qmax - self.qmin)
        with torch.no_grad():
            self.scale.mul_(ratio)
            if not self.symmetric:
                # keep the real value of the grid's lowest point: qmin - z stays proportional to the width
                self.zero_point.copy_(
                    torch.clamp(self.qmin + torch.round((self.zero_point - old_min) / ratio), self.qmin, self.qmax)
                )

    @property
    def qmin(self) -> int:
        return quant_range(self._bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self._bits, self.signed)[1]

    @property
    def is_binary(self) -> bool:
        return self._bits == 1

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.threshold_factors is None and f"{prefix}threshold_factors.alpha" in state_dict:
            # a state saved after threshold tuning (FAT): the factors are part of the quantizer; torch loads
            # child modules after this hook, so attaching them here lets a fresh model load it strictly
            self.attach_threshold_factors()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # the Python-side copies of the buffers are what forward reads (no device sync per step)
        self._bits = int(self.bit_width)
        self._initialized = bool(self.initialized)

    # -- step size -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the observer with ``x`` and set the step size (and zero point) from its bounds."""
        if self.is_binary:
            # XNOR-Net's optimal binary scale: the mean absolute value (per channel)
            dims = [d for d in range(x.dim()) if d != self.ch_axis] if self.ch_axis is not None else None
            mean_abs = x.detach().abs().float().mean(dim=dims) if dims else x.detach().abs().float().mean()
            self.scale.copy_(mean_abs.reshape(self.scale.shape).clamp_min(1e-8))
            self.zero_point.zero_()
        else:
            self.observer.update(x, self.qmin, self.qmax, self.symmetric)
            scale, zero_point = scale_zero_point_from_bounds(
                *self.observer.bounds(), self.qmin, self.qmax, self.symmetric
            )
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        self.initialized.fill_(True)
        self._initialized = True

    def grad_factor(self, x: Tensor) -> float:
        """LSQ's gradient scale ``1 / sqrt(N * qmax)``, N = elements per step size."""
        n = x.numel() // self.scale.numel()
        return 1.0 / math.sqrt(max(n, 1) * max(self.qmax, 1))

    def effective_scale(self) -> Tensor:
        """The step size used in forward (LSQ's learned step kept positive)."""
        return self.scale.abs().clamp_min(1e-8) if self.learnable else self.scale

    # -- threshold factors (FAT) -----------------------------------------------------------------------------
    def attach_threshold_factors(self) -> ThresholdFactors:
        """Attach (idempotently) trainable :class:`~lightning_quant.core.thresholds.ThresholdFactors`.

        Until :meth:`calibrate_threshold_factors` the quantizer works as before (observing included); afterwards
        its range is the calibrated one adjusted by the factors, differentiably.
        """
        if self.learnable or self.is_binary:
            kind = "binary" if self.is_binary else "an LSQ (learned step size)"
            raise QuantizationConfigError(
                f"Threshold factors need an observer-mode multi-bit quantizer, got {kind} quantizer. HINT: quantize "
                'with `scale_mode="observer"` (and `weight_bits >= 2`), or let ThresholdTuningCallback quantize.'
            )
        if self.threshold_factors is None:
            self.threshold_factors = ThresholdFactors(self.scale.numel()).to(self.scale.device)
        return self.threshold_factors

    @torch.no_grad()
    def calibrate_threshold_factors(self) -> None:
        """Freeze the observed range into the attached factors and stop observing."""
        if self.threshold_factors is None:
            raise QuantizationConfigError("No threshold factors attached: call `attach_threshold_factors()` first.")
        self.threshold_factors.calibrate(*self.observer.bounds(), symmetric=self.symmetric)
        self.observing = False

    def _tuned_forward(self, x: Tensor, factors: ThresholdFactors) -> Tensor:
        scale, zero_point = factors.scale_zero_point(self.qmin, self.qmax, self.symmetric)
        with torch.no_grad():
            # the buffers follow the tuned grid, so int_repr and export see what forward uses
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        if torch.is_grad_enabled() and (factors.alpha.requires_grad or factors.beta.requires_grad):
            # LSQ's kernel gives d/d(scale) and d/d(zero point) with the STE; both are functions of alpha/beta
            return lsq_fake_quantize(x, scale, zero_point, self.qmin, self.qmax, self.ch_axis, 1.0)
        return fake_quantize(x, scale.detach(), zero_point.detach(), self.qmin, self.qmax, self.ch_axis)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        factors = self.threshold_factors
        if factors is not None and factors.is_calibrated:
            return self._tuned_forward(x, factors)
        observed = (self.observing and self.training) or not self._initialized
        if observed:
            self.observe(x)
        scale = self.effective_scale()
        if observed:
            # the step was just set from data: no gradient for it, and a copy, so that observing again in the
            # same step (a layer called twice) cannot modify a tensor autograd saved
            scale = scale.detach().clone()
        if self.is_binary:
            out = binarize(x, scale, self.ch_axis, self.grad_factor(x) if self.learnable else 0.0)
        elif self.learnable and not observed and torch.is_grad_enabled():
            return lsq_fake_quantize_fast(
                x, scale, self.zero_point, self.qmin, self.qmax, self.ch_axis, self.grad_factor(x)
            )
        else:
            out = fake_quantize(x, scale.detach(), self.zero_point, self.qmin, self.qmax, self.ch_axis)
        if observed and self.learnable and torch.is_grad_enabled():
            # keep the learned step in the graph with a zero gradient: DDP's reducer requires every parameter
            # to take part in every step (multiplying by a constant saves nothing that observing could modify)
            out = out + self.scale.sum() * 0.0
        if factors is not None and torch.is_grad_enabled():
            out = out + factors.zero_term()  # not calibrated yet: the factors take part with a zero gradient
        return out

    @torch.no_grad()
    def int_repr(self, x: Tensor) -> Tensor:
        """The integers this quantizer represents ``x`` with (binary: -1/+1)."""
        scale = self.effective_scale()
        if self.is_binary:
            return torch.where(x >= 0, 1, -1).to(torch.int32)
        return quantize_to_int(x, scale, self.zero_point, self.qmin, self.qmax, self.ch_axis)

    def extra_repr(self) -> str:
        grid = "binary" if self.is_binary else ("symmetric" if self.symmetric else "asymmetric")
        sign = "signed" if self.signed else "unsigned"
        gran = "per_tensor" if self.ch_axis is None else f"per_channel(axis={self.ch_axis})"
        step = "lsq" if self.learnable else "observer"
        return f"bits={self._bits}, {grid}, {sign}, {gran}, scale={step}"
