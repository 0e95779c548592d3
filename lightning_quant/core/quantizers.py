"""Quantizer modules: the stateful parts that fake-quantize a weight or an activation.

Every quantizer implements the small protocol of :class:`Quantizer` -- on/off and observing switches, the integer
codes of a tensor, the values those codes stand for, the storage bits of a tensor, and a uniform-grid view for QDQ
export (or none) -- and the rest of the package (surgery, allocation, packing, export) talks to that protocol
only. A registry maps the quantizer kind named in ``LayerSpec.weight_kind`` to its class
(:data:`QUANTIZER_KINDS`, :func:`register_quantizer`, :func:`build_weight_quantizer`): a new kind is one class and
one registration. Two kinds ship: :class:`UniformQuantizer` (here) and
:class:`~lightning_quant.core.codebook.CodebookQuantizer`.

A :class:`UniformQuantizer` is composed of small orthogonal choices -- bit width (mutable, 1 = binary, one width
per tensor or one per output channel), grid (symmetric signed/unsigned or asymmetric), granularity (per tensor or
per channel) and step size (learned with LSQ, or set by an :mod:`observer <lightning_quant.core.observers>`) -- and
keeps all of its state in buffers and parameters, so a checkpoint restores it exactly (bit widths changed during
training included).

Life cycle: while ``observing`` is on (calibration, in training mode) each forward updates the observer and
resets the step size from it; afterwards the step size is either fixed (observer mode) or learned (LSQ). A
quantizer that has never observed anything initialises itself from its first input, so it is never used with
an arbitrary step size.

Per-channel bit widths (``bits=(4, 4, 1, 2, ...)``, one per channel along ``ch_axis``) run one fused kernel per
group of equal-width channels; each group computes exactly what a quantizer of that width would compute on those
channels alone (forward and gradients). A quantizer of one width takes the single-kernel path of before.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import (
    MAX_BITS,
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

#: bits of a float32 side tensor (step sizes, zero points, float codebooks) in every size account
FLOAT_BITS = 32


class UniformGrid(NamedTuple):
    """The uniform grid a quantizer's values lie on: ``value = (code - zero_point) * scale``.

    ``qmin``/``qmax`` are ints, or one per channel (tensors) for per-channel bit widths; ``ch_axis`` is the axis
    ``scale`` and ``zero_point`` run along (``None``: one per tensor). QDQ export reads this view.
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int | Tensor
    qmax: int | Tensor
    ch_axis: int | None


class Quantizer(nn.Module, abc.ABC):
    """The protocol every quantizer kind implements (the rest of the package uses nothing else).

    Attributes:
        enabled: ``False`` makes ``forward`` the identity.
        observing: calibration switch (its meaning is the kind's: observers for uniform grids, refits for
            codebooks); a callback turns it on for its calibration batches.
        learnable: whether its parameters are trained (LSQ step sizes, codebook entries) rather than set by
            observation alone.
    """

    #: the name of this kind in ``LayerSpec.weight_kind`` and the registry
    KIND: ClassVar[str] = ""
    #: whether allocators may set ``bits`` (mixed-precision allocation changes the width of such quantizers)
    WIDTH_SETTABLE: ClassVar[bool] = False

    enabled: bool
    observing: bool
    learnable: bool

    # -- what every kind answers -----------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def bits(self) -> int | tuple[int, ...]:
        """Bits per code: one int, or one per output channel."""

    @property
    @abc.abstractmethod
    def is_initialized(self) -> bool:
        """Whether the quantizer has seen data (an uninitialised one initialises itself from its next input)."""

    @abc.abstractmethod
    def int_repr(self, x: Tensor) -> Tensor:
        """The integer codes that represent ``x`` in forward."""

    @property
    @abc.abstractmethod
    def signed_codes(self) -> bool:
        """Whether the codes are signed integers (two's complement; ``{-1, +1}`` at one bit) when stored."""

    @abc.abstractmethod
    def dequantize(self, codes: Tensor) -> Tensor:
        """The values the codes of :meth:`int_repr` stand for (what ``forward`` returns, as a float tensor)."""

    @abc.abstractmethod
    def code_widths(self, codes: Tensor) -> Tensor:
        """The storage width in bits of each code (a tensor broadcastable to ``codes``)."""

    @abc.abstractmethod
    def side_tensors(self) -> dict[str, tuple[Tensor, int]]:
        """What besides the codes is stored to rebuild the values: ``name -> (tensor, bits per element)``."""

    @abc.abstractmethod
    def load_codes(self, codes: Tensor, side: dict[str, Tensor]) -> None:
        """Restore the state that makes :meth:`dequantize` ``(codes)`` reproduce stored values (packed files);
        ``side`` holds what :meth:`side_tensors` gave, by name (integer side tensors as their integers)."""

    @abc.abstractmethod
    def uniform_grid(self) -> UniformGrid | None:
        """The uniform grid the values lie on (for QDQ export), or ``None`` when they lie on none."""

    @abc.abstractmethod
    def recalibrate(self, x: Tensor) -> None:
        """Re-derive the quantizer's state from ``x`` after its values changed (e.g. an inexact BatchNorm fold)."""

    def absorbs_channel_factor(self, factor: Tensor) -> bool:
        """Whether multiplying the weight by ``factor`` (one per output channel, as BatchNorm folding does) keeps
        every code, so that :meth:`absorb_channel_factor` can rescale the side tensors to match exactly."""
        return False

    def absorb_channel_factor(self, factor: Tensor) -> None:
        """Rescale the side tensors for a weight multiplied by ``factor`` (see :meth:`absorbs_channel_factor`)."""
        raise QuantizationConfigError(
            f"A {type(self).__name__} cannot absorb a per-channel factor without changing its codes. HINT: check "
            "`absorbs_channel_factor` first and recalibrate otherwise."
        )

    # -- derived accounts: one place for bits and bytes ------------------------------------------------------
    def payload_bits(self, x: Tensor) -> int:
        """Bits of the codes of ``x`` at their storage widths (what packing writes before byte rounding)."""
        codes = self.int_repr(x)
        return int(torch.broadcast_to(self.code_widths(codes), codes.shape).sum())

    def side_bits(self) -> int:
        """Bits of the side tensors (step sizes and zero points, codebooks), at their storage widths."""
        return sum(t.numel() * bits for t, bits in self.side_tensors().values())

    def storage_bits(self, x: Tensor) -> int:
        """``payload_bits(x) + side_bits()``: the stored size of ``x`` quantized by this quantizer."""
        return self.payload_bits(x) + self.side_bits()


#: quantizer kind name -> class (``LayerSpec.weight_kind`` names one)
QUANTIZER_KINDS: dict[str, type[Quantizer]] = {}


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: register a :class:`Quantizer` subclass under its ``KIND``."""
    if not cls.KIND:
        raise TypeError(f"{cls.__name__} must set KIND to register")
    QUANTIZER_KINDS[cls.KIND] = cls
    return cls


def build_weight_quantizer(weight: Tensor, spec: Any, where: str = "layer") -> Quantizer:
    """The weight quantizer of kind ``spec.weight_kind`` for ``weight``, built from a ``LayerSpec``.

    Raises:
        QuantizationConfigError: an unknown kind, or a spec that does not fit ``weight`` (the message names
            ``where``, the layer).
    """
    kind = getattr(spec, "weight_kind", UniformQuantizer.KIND)
    if kind not in QUANTIZER_KINDS:
        raise QuantizationConfigError(
            f"{where}: unknown quantizer kind `weight_kind={kind!r}`. Registered kinds: {sorted(QUANTIZER_KINDS)}. "
            "HINT: register a new kind with `lightning_quant.core.register_quantizer`."
        )
    return QUANTIZER_KINDS[kind].for_weight(weight, spec, where)  # type: ignore[attr-defined]


def _normalize_widths(
    bits: int | Sequence[int], *, ch_axis: int | None, num_channels: int, allow_binary: bool, argument: str = "bits"
) -> int | tuple[int, ...]:
    """One int width, or a tuple of one width per channel (collapsed to an int when all are equal)."""
    if isinstance(bits, (list, tuple)):
        if ch_axis is None:
            raise QuantizationConfigError(
                f"`{argument}` gives one width per channel ({len(bits)} widths), but the quantizer is per tensor. "
                "HINT: per-channel widths need per-channel step sizes (`weight_granularity='per_channel'`)."
            )
        if len(bits) != num_channels:
            raise QuantizationConfigError(
                f"`{argument}` must give one width per channel: {num_channels} widths, got {len(bits)}. HINT: pass "
                f"a list of {num_channels} ints, or one int for all channels."
            )
        widths = tuple(validate_bits(argument, b, allow_binary=allow_binary) for b in bits)
        return widths[0] if len(set(widths)) == 1 else widths
    return validate_bits(argument, bits, allow_binary=allow_binary)


def _view(t: Tensor, dim: int, ndim: int) -> Tensor:
    """``t`` (one value per channel) shaped to broadcast along ``dim`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape)


@register_quantizer
class UniformQuantizer(Quantizer):
    """Uniform affine fake quantizer (2-8 bits) or binary quantizer (1 bit), per tensor or per channel.

    Args:
        bits: bit width; 1 means binary (``scale * sign(x)``, symmetric signed grids only); a sequence gives one
            width per channel along ``ch_axis`` (binary channels included).
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
        >>> q.bits = (4, 1, 2)  # one width per channel: 4 bits, binary, 2 bits
        >>> q.bits, q.payload_bits(w)
        ((4, 1, 2), 56)
    """

    KIND = "uniform"
    WIDTH_SETTABLE = True

    def __init__(
        self,
        bits: int | Sequence[int] = 8,
        *,
        symmetric: bool = True,
        signed: bool = True,
        ch_axis: int | None = None,
        num_channels: int = 1,
        learnable: bool = True,
        observer: str = "minmax",
    ) -> None:
        super().__init__()
        if isinstance(bits, int) and bits == 1 and not (symmetric and signed):
            raise QuantizationConfigError("Binary quantization (`bits=1`) needs `symmetric=True, signed=True`.")
        self.symmetric = symmetric
        self.signed = signed if symmetric else False
        self.ch_axis = ch_axis
        self.learnable = learnable
        self.observer_name = observer
        widths = _normalize_widths(
            bits, ch_axis=ch_axis, num_channels=num_channels, allow_binary=self.symmetric and self.signed
        )
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
        # a scalar for one width, one entry per channel for per-channel widths
        self.register_buffer("bit_width", torch.zeros((), dtype=torch.long))
        # integer, not bool: DDP broadcasts buffers and gloo has no bool
        self.register_buffer("initialized", torch.zeros((), dtype=torch.long))
        self._bits: int | tuple[int, ...] = 8
        self._groups: list[tuple[int, Tensor]] | None = None
        self._inverse: Tensor | None = None
        self._set_widths(widths)
        self._initialized = False
        # FAT's trainable threshold factors (attach_threshold_factors); None keeps the default path
        self.threshold_factors: ThresholdFactors | None = None

    @classmethod
    def for_weight(cls, weight: Tensor, spec: Any, where: str = "layer") -> UniformQuantizer:
        """The weight quantizer a ``LayerSpec`` asks for (per-channel widths checked against ``weight``)."""
        per_channel = spec.weight_granularity == "per_channel"
        num_channels = weight.shape[0] if per_channel else 1
        bits = spec.weight_bits
        try:
            return cls(
                bits,
                symmetric=spec.weight_symmetric,
                signed=True,
                ch_axis=0 if per_channel else None,
                num_channels=num_channels,
                learnable=spec.scale_mode == "lsq",
                observer=spec.weight_observer,
            ).to(weight.device)
        except QuantizationConfigError as err:
            raise QuantizationConfigError(f"{where}: {err}") from None

    # -- bit width -------------------------------------------------------------------------------------------
    @property
    def bits(self) -> int | tuple[int, ...]:
        """The bit width (1 = binary), or one per channel. Setting it rescales the step size so the represented
        range of each channel is kept."""
        return self._bits

    @bits.setter
    def bits(self, value: int | Sequence[int]) -> None:
        value = _normalize_widths(
            value,
            ch_axis=self.ch_axis,
            num_channels=self.scale.numel(),
            allow_binary=self.symmetric and self.signed,
        )
        if value == self._bits:
            return
        old_min, old_max = self._ranges()
        self._set_widths(value)
        new_min, new_max = self._ranges()
        ratio = (old_max - old_min).to(self.scale.dtype) / (new_max - new_min).to(self.scale.dtype)
        with torch.no_grad():
            self.scale.mul_(ratio)
            if not self.symmetric:
                # keep the real value of the grid's lowest point: qmin - z stays proportional to the width
                self.zero_point.copy_(
                    torch.clamp(new_min + torch.round((self.zero_point - old_min) / ratio), new_min, new_max)
                )

    def _set_widths(self, widths: int | tuple[int, ...]) -> None:
        self._bits = widths
        shape = (len(widths),) if isinstance(widths, tuple) else ()
        if tuple(self.bit_width.shape) != shape:
            # every rank applies the same widths (allocators broadcast them), so replacing the buffer is safe
            self.bit_width = torch.zeros(shape, dtype=torch.long, device=self.bit_width.device)
        with torch.no_grad():
            if isinstance(widths, tuple):
                self.bit_width.copy_(torch.tensor(widths, dtype=torch.long))
            else:
                self.bit_width.fill_(widths)
        if isinstance(widths, int):
            self._groups, self._inverse = None, None
            return
        device = self.scale.device
        table = torch.tensor(widths)
        self._groups = [(int(w), torch.nonzero(table == w).flatten().to(device)) for w in sorted(set(widths))]
        order = torch.cat([idx for _, idx in self._groups])
        self._inverse = torch.argsort(order).to(device)

    def channel_widths(self) -> Tensor:
        """The bit width of each channel (one entry for a per-tensor quantizer), as a long tensor."""
        return self.bit_width.detach().reshape(-1).expand(self.scale.numel()).clone()

    def _ranges(self) -> tuple[Tensor, Tensor]:
        """``(qmin, qmax)`` per channel (one entry when all channels share a width) as tensors."""
        widths = self.bit_width.reshape(-1).tolist()
        pairs = [quant_range(int(w), self.signed) for w in widths]
        return (
            torch.tensor([p[0] for p in pairs], device=self.scale.device),
            torch.tensor([p[1] for p in pairs], device=self.scale.device),
        )

    @property
    def mixed(self) -> bool:
        """Whether channels have different widths."""
        return self._groups is not None

    def _single(self, what: str) -> int:
        if isinstance(self._bits, tuple):
            raise QuantizationConfigError(
                f"`{what}` is undefined for per-channel bit widths {self._bits[:8]}...; use `channel_widths()` or "
                "`uniform_grid()` (per-channel ranges)."
            )
        return self._bits

    @property
    def qmin(self) -> int:
        return quant_range(self._single("qmin"), self.signed)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self._single("qmax"), self.signed)[1]

    @property
    def is_binary(self) -> bool:
        """Whether every channel is binary."""
        return self._bits == 1

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.threshold_factors is None and f"{prefix}threshold_factors.alpha" in state_dict:
            # a state saved after threshold tuning (FAT): the factors are part of the quantizer; torch loads
            # child modules after this hook, so attaching them here lets a fresh model load it strictly
            self.attach_threshold_factors()
        saved = state_dict.get(f"{prefix}bit_width")
        if isinstance(saved, Tensor) and saved.shape != self.bit_width.shape:
            # per-channel widths saved into a one-width quantizer (or back): take the saved layout
            self.bit_width = torch.zeros(saved.shape, dtype=torch.long, device=self.bit_width.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # the Python-side copies of the buffers are what forward reads (no device sync per step)
        widths = [int(w) for w in self.bit_width.reshape(-1).tolist()]
        self._set_widths(widths[0] if len(set(widths)) == 1 else tuple(widths))
        self._initialized = bool(self.initialized)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> UniformQuantizer:
        out = super()._apply(fn, *args, **kwargs)
        if self._groups is not None:  # the group indices follow the module's device
            self._set_widths(self._bits)
        return out

    # -- step size -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the observer with ``x`` and set the step size (and zero point) from its bounds."""
        if self._groups is None:
            scale, zero_point = self._observe_one_width(x, self._bits)  # type: ignore[arg-type]
        else:
            scale = torch.empty_like(self.scale)
            zero_point = torch.empty_like(self.zero_point)
            lo = torch.zeros_like(self.observer.min_val)
            hi = torch.zeros_like(self.observer.max_val)
            axis = self.ch_axis
            assert axis is not None
            for bits, idx in self._groups:
                part = x.index_select(axis, idx)
                if bits == 1:  # binary scales come from the mean magnitude; the bounds only keep the record whole
                    lo[idx], hi[idx] = self.observer.batch_min_max(part)
                else:
                    qmin, qmax = quant_range(bits, self.signed)
                    lo[idx], hi[idx] = self.observer.batch_bounds(part, qmin, qmax, self.symmetric)
            self.observer.update_bounds(lo, hi)
            min_val, max_val = self.observer.bounds()
            for bits, idx in self._groups:
                if bits == 1:
                    scale[idx] = self._binary_scale(x.index_select(axis, idx))
                    zero_point[idx] = 0.0
                else:
                    qmin, qmax = quant_range(bits, self.signed)
                    scale[idx], zero_point[idx] = scale_zero_point_from_bounds(
                        min_val[idx], max_val[idx], qmin, qmax, self.symmetric
                    )
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.initialized.fill_(True)
        self._initialized = True

    def _binary_scale(self, x: Tensor) -> Tensor:
        # XNOR-Net's optimal binary scale: the mean absolute value (per channel)
        dims = [d for d in range(x.dim()) if d != self.ch_axis] if self.ch_axis is not None else None
        mean_abs = x.detach().abs().float().mean(dim=dims) if dims else x.detach().abs().float().mean()
        return mean_abs.reshape(-1).clamp_min(1e-8)

    def _observe_one_width(self, x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        if bits == 1:
            return self._binary_scale(x).reshape(self.scale.shape), torch.zeros_like(self.zero_point)
        qmin, qmax = quant_range(bits, self.signed)
        self.observer.update(x, qmin, qmax, self.symmetric)
        return scale_zero_point_from_bounds(*self.observer.bounds(), qmin, qmax, self.symmetric)

    @torch.no_grad()
    def recalibrate(self, x: Tensor) -> None:
        self.observer.reset()
        self.observe(x)

    def absorbs_channel_factor(self, factor: Tensor) -> bool:
        per_channel = self.ch_axis == 0 and self.scale.numel() == factor.numel()
        return per_channel and (self.symmetric or not bool((factor < 0).any()))

    @torch.no_grad()
    def absorb_channel_factor(self, factor: Tensor) -> None:
        if not self.absorbs_channel_factor(factor):
            super().absorb_channel_factor(factor)
        self.scale.copy_((self.scale.abs() * factor.abs().to(self.scale)).clamp_min(1e-8))

    def grad_factor(self, x: Tensor, qmax: int | None = None) -> float:
        """LSQ's gradient scale ``1 / sqrt(N * qmax)``, N = elements per step size (``x`` may be a group of
        channels)."""
        steps = x.shape[self.ch_axis] if self.ch_axis is not None and x.dim() > 0 else 1
        n = x.numel() // max(steps, 1)
        qmax = self.qmax if qmax is None else qmax
        return 1.0 / math.sqrt(max(n, 1) * max(qmax, 1))

    def effective_scale(self) -> Tensor:
        """The step size used in forward (LSQ's learned step kept positive)."""
        return self.scale.abs().clamp_min(1e-8) if self.learnable else self.scale

    def uniform_grid(self) -> UniformGrid:
        scale = self.effective_scale().detach()
        if self._groups is None:
            qmin, qmax = quant_range(self._bits, self.signed)  # type: ignore[arg-type]
            return UniformGrid(scale, self.zero_point.detach(), qmin, qmax, self.ch_axis)
        qmin_t, qmax_t = self._ranges()
        return UniformGrid(scale, self.zero_point.detach(), qmin_t, qmax_t, self.ch_axis)

    # -- threshold factors (FAT) -----------------------------------------------------------------------------
    def attach_threshold_factors(self) -> ThresholdFactors:
        """Attach (idempotently) trainable :class:`~lightning_quant.core.thresholds.ThresholdFactors`.

        Until :meth:`calibrate_threshold_factors` the quantizer works as before (observing included); afterwards
        its range is the calibrated one adjusted by the factors, differentiably.
        """
        if self.learnable or self.is_binary or self.mixed:
            kind = (
                "binary"
                if self.is_binary
                else ("a per-channel mixed-width" if self.mixed else "an LSQ (learned step size)")
            )
            raise QuantizationConfigError(
                f"Threshold factors need an observer-mode multi-bit quantizer, got {kind} quantizer. "
                'HINT: quantize with `scale_mode="observer"` (and `weight_bits >= 2`), or let '
                "ThresholdTuningCallback quantize."
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

    @torch.no_grad()
    def refresh_tuned_grid(self) -> None:
        """Set the ``scale``/``zero_point`` buffers from calibrated threshold factors (after the factors moved), so
        the saved state matches what the next forward computes."""
        factors = self.threshold_factors
        if factors is not None and factors.is_calibrated:
            scale, zero_point = factors.scale_zero_point(self.qmin, self.qmax, self.symmetric)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)

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
    def _fake_quantize(self, x: Tensor, scale: Tensor, zero_point: Tensor, bits: int, observed: bool) -> Tensor:
        """Fake-quantize ``x`` on one ``bits``-wide grid (binary, LSQ or fixed step)."""
        qmin, qmax = quant_range(bits, self.signed)
        if bits == 1:
            return binarize(x, scale, self.ch_axis, self.grad_factor(x, qmax) if self.learnable else 0.0)
        if self.learnable and not observed and torch.is_grad_enabled():
            return lsq_fake_quantize_fast(x, scale, zero_point, qmin, qmax, self.ch_axis, self.grad_factor(x, qmax))
        return fake_quantize(x, scale.detach(), zero_point, qmin, qmax, self.ch_axis)

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
        if self._groups is None:
            out = self._fake_quantize(x, scale, self.zero_point, self._bits, observed)  # type: ignore[arg-type]
        else:
            axis = self.ch_axis
            assert axis is not None and self._inverse is not None
            parts = [
                self._fake_quantize(x.index_select(axis, idx), scale[idx], self.zero_point[idx], bits, observed)
                for bits, idx in self._groups
            ]
            out = torch.cat(parts, dim=axis).index_select(axis, self._inverse)
        if observed and self.learnable and torch.is_grad_enabled():
            # keep the learned step in the graph with a zero gradient: DDP's reducer requires every parameter
            # to take part in every step (multiplying by a constant saves nothing that observing could modify)
            out = out + self.scale.sum() * 0.0
        if factors is not None and torch.is_grad_enabled():
            out = out + factors.zero_term()  # not calibrated yet: the factors take part with a zero gradient
        return out

    # -- codes -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def int_repr(self, x: Tensor) -> Tensor:
        """The integers this quantizer represents ``x`` with (binary: -1/+1)."""
        scale = self.effective_scale()
        if self._groups is None:
            if self.is_binary:
                return torch.where(x >= 0, 1, -1).to(torch.int32)
            return quantize_to_int(x, scale, self.zero_point, self.qmin, self.qmax, self.ch_axis)
        axis = self.ch_axis
        assert axis is not None and self._inverse is not None
        parts = []
        for bits, idx in self._groups:
            part = x.index_select(axis, idx)
            if bits == 1:
                parts.append(torch.where(part >= 0, 1, -1).to(torch.int32))
            else:
                qmin, qmax = quant_range(bits, self.signed)
                parts.append(quantize_to_int(part, scale[idx], self.zero_point[idx], qmin, qmax, axis))
        return torch.cat(parts, dim=axis).index_select(axis, self._inverse)

    @property
    def signed_codes(self) -> bool:
        return self.signed

    def dequantize(self, codes: Tensor) -> Tensor:
        scale, zero_point = self.effective_scale().detach(), self.zero_point.detach()
        if self.ch_axis is not None and codes.dim() > 0:
            scale, zero_point = _view(scale, self.ch_axis, codes.dim()), _view(zero_point, self.ch_axis, codes.dim())
        return (codes.to(scale.dtype) - zero_point) * scale

    def code_widths(self, codes: Tensor) -> Tensor:
        widths = self.bit_width.detach().to(codes.device)
        if widths.dim() == 0 or codes.dim() == 0:
            return widths.reshape(())
        assert self.ch_axis is not None
        return _view(widths, self.ch_axis, codes.dim())

    def payload_bits(self, x: Tensor) -> int:
        if isinstance(self._bits, int):
            return x.numel() * self._bits
        assert self.ch_axis is not None
        return (x.numel() // max(x.shape[self.ch_axis], 1)) * sum(self._bits)

    def side_tensors(self) -> dict[str, tuple[Tensor, int]]:
        return {
            "scale": (self.effective_scale().detach().float(), FLOAT_BITS),
            "zero_point": (self.zero_point.detach().float(), FLOAT_BITS),
        }

    @torch.no_grad()
    def load_codes(self, codes: Tensor, side: dict[str, Tensor]) -> None:
        self.scale.data.copy_(side["scale"].reshape(self.scale.shape).to(self.scale))
        self.zero_point.copy_(side["zero_point"].reshape(self.zero_point.shape).to(self.zero_point))
        self.initialized.fill_(1)
        self._initialized = True
        self.observing = False

    def extra_repr(self) -> str:
        grid = "binary" if self.is_binary else ("symmetric" if self.symmetric else "asymmetric")
        sign = "signed" if self.signed else "unsigned"
        gran = "per_tensor" if self.ch_axis is None else f"per_channel(axis={self.ch_axis})"
        step = "lsq" if self.learnable else "observer"
        bits = self._bits if isinstance(self._bits, int) else f"mixed{sorted(set(self._bits))}"
        return f"bits={bits}, {grid}, {sign}, {gran}, scale={step}"


__all__ = [
    "FLOAT_BITS",
    "MAX_BITS",
    "QUANTIZER_KINDS",
    "Quantizer",
    "UniformGrid",
    "UniformQuantizer",
    "build_weight_quantizer",
    "register_quantizer",
]
