"""Observers: range statistics that set the step size of observer-driven (and LSQ-initialised) quantizers.

An observer turns batches into bounds ``(min_val, max_val)`` per tensor or per channel. Statistics are buffers,
so they are saved in checkpoints. Under DDP, Lightning broadcasts rank 0's buffers before every forward, so an
observer reduces each *batch* statistic across ranks before merging it (min for minima, max for maxima, mean
for averaged statistics): every rank then holds the same bounds, computed from all ranks' data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import fake_quantize, scale_zero_point_from_bounds

_rank_local_depth = 0


@contextlib.contextmanager
def rank_local_statistics() -> Iterator[None]:
    """Inside the block, observers on this process reduce nothing across DDP ranks.

    For work that one rank does alone while the others wait for its result (e.g. a search on rank 0 whose outcome
    is broadcast): a collective there would wait for ranks that never join it, until the process group's timeout.
    """
    global _rank_local_depth
    _rank_local_depth += 1
    try:
        yield
    finally:
        _rank_local_depth -= 1


def _distributed() -> bool:
    if _rank_local_depth:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(tensor: Tensor, op: str) -> Tensor:
    """Reduce a statistic over DDP ranks (a no-op in a single process); ``op`` is min, max or mean."""
    if not _distributed():
        return tensor
    tensor = tensor.clone()
    if op == "mean":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor / dist.get_world_size()
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return tensor


class Observer(nn.Module):
    """Running min/max of everything observed (per tensor, or per channel along ``ch_axis``).

    Args:
        num_channels: 1 for per-tensor statistics, else the size of ``ch_axis``.
        ch_axis: the channel axis, ``None`` for per tensor.
    """

    name: ClassVar[str] = "minmax"
    _reduce: ClassVar[str] = "minmax"  # how batch statistics combine across ranks: "minmax" or "mean"

    def __init__(self, num_channels: int = 1, ch_axis: int | None = None) -> None:
        super().__init__()
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.zeros(num_channels))
        self.register_buffer("max_val", torch.zeros(num_channels))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def batch_min_max(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The minimum and maximum of one batch (per tensor, or per channel)."""
        x = x.detach().float()
        if self.ch_axis is None:
            return x.min().reshape(1), x.max().reshape(1)
        flat = x.transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values

    def batch_bounds(self, x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        """The bounds this observer takes from one batch (before merging with earlier ones)."""
        return self.batch_min_max(x)

    def _merge(self, lo: Tensor, hi: Tensor) -> None:
        if self.num_batches == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)

    @torch.no_grad()
    def update(self, x: Tensor, qmin: int, qmax: int, symmetric: bool) -> None:
        """Observe a batch; ``qmin``/``qmax``/``symmetric`` describe the grid (used by range-searching observers)."""
        self.update_bounds(*self.batch_bounds(x, qmin, qmax, symmetric))

    @torch.no_grad()
    def update_bounds(self, lo: Tensor, hi: Tensor) -> None:
        """Merge one batch's bounds (from :meth:`batch_bounds`, e.g. computed per group of channels)."""
        if self._reduce == "mean":
            lo, hi = _all_reduce(lo, "mean"), _all_reduce(hi, "mean")
        else:
            lo, hi = _all_reduce(lo, "min"), _all_reduce(hi, "max")
        self._merge(lo, hi)
        self.num_batches += 1

    def reset(self) -> None:
        """Forget everything observed."""
        self.min_val.zero_()
        self.max_val.zero_()
        self.num_batches.zero_()

    def bounds(self) -> tuple[Tensor, Tensor]:
        """The current ``(min_val, max_val)``."""
        return self.min_val, self.max_val

    def extra_repr(self) -> str:
        return f"channels={self.min_val.numel()}, ch_axis={self.ch_axis}"


class MinMaxObserver(Observer):
    """Running minimum and maximum over all batches (the range never shrinks)."""


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (robust to a single outlier batch).

    Args:
        momentum: weight of the newest batch.
    """

    name: ClassVar[str] = "moving_average"

    def __init__(self, num_channels: int = 1, ch_axis: int | None = None, momentum: float = 0.1) -> None:
        super().__init__(num_channels, ch_axis)
        if not 0.0 < momentum <= 1.0:
            raise QuantizationConfigError(f"`momentum` must be in (0, 1], got {momentum}.")
        self.momentum = momentum

    def _merge(self, lo: Tensor, hi: Tensor) -> None:
        if self.num_batches == 0:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)


class PercentileObserver(MovingAverageObserver):
    """Moving average of each batch's lower and upper percentiles (clips rare outliers).

    Args:
        percentile: the upper percentile (the lower one is ``100 - percentile``).
        max_samples: elements per channel sampled (evenly strided) to bound the cost on large tensors.
    """

    name: ClassVar[str] = "percentile"
    _reduce: ClassVar[str] = "mean"

    def __init__(
        self,
        num_channels: int = 1,
        ch_axis: int | None = None,
        momentum: float = 0.1,
        percentile: float = 99.99,
        max_samples: int = 1 << 20,
    ) -> None:
        super().__init__(num_channels, ch_axis, momentum)
        if not 50.0 < percentile <= 100.0:
            raise QuantizationConfigError(f"`percentile` must be in (50, 100], got {percentile}.")
        self.percentile = percentile
        self.max_samples = max_samples

    def batch_bounds(self, x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        x = x.detach().float()
        flat = x.reshape(1, -1) if self.ch_axis is None else x.transpose(0, self.ch_axis).flatten(1)
        if flat.shape[1] > self.max_samples:
            flat = flat[:, :: flat.shape[1] // self.max_samples + 1]
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], device=flat.device)
        lo, hi = torch.quantile(flat, q, dim=1)
        return lo, hi


class MSEObserver(Observer):
    """Range that minimises the fake-quantization MSE of each batch (grid search over clipping ratios).

    Each batch's min/max is shrunk by the ratio in ``linspace(min_ratio, 1, grid)`` whose quantized copy of the
    batch has the smallest mean squared error (per channel when per channel); batches are then averaged
    (moving average). Best for weights at low bit widths, where min-max wastes most of the grid on outliers.
    The error is measured on at most ``max_samples`` evenly strided elements per channel (the extremes always
    come from all of them), which keeps a ResNet-18's initialisation well under a second.

    Args:
        grid: number of candidate ratios.
        min_ratio: the smallest ratio tried.
        momentum: moving-average weight of the newest batch.
        max_samples: elements per channel (per tensor: in all) on which the error is measured.
    """

    name: ClassVar[str] = "mse"
    _reduce: ClassVar[str] = "mean"

    def __init__(
        self,
        num_channels: int = 1,
        ch_axis: int | None = None,
        grid: int = 24,
        min_ratio: float = 0.2,
        momentum: float = 0.1,
        max_samples: int = 512,
    ) -> None:
        super().__init__(num_channels, ch_axis)
        self.grid = grid
        self.min_ratio = min_ratio
        self.momentum = momentum
        self.max_samples = max_samples

    def batch_bounds(self, x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
        x = x.detach().float()
        lo, hi = self.batch_min_max(x)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        # channels first, flattened, strided down to max_samples per channel
        x = x.reshape(1, -1) if self.ch_axis is None else x.transpose(0, self.ch_axis).flatten(1)
        limit = self.max_samples if self.ch_axis is not None else self.max_samples * 64
        if x.shape[1] > limit:
            x = x[:, :: x.shape[1] // limit + 1]
        x = x.contiguous()
        ch_axis = None if self.ch_axis is None else 0
        dims = None if ch_axis is None else 1
        for ratio in torch.linspace(self.min_ratio, 1.0, self.grid).tolist():
            cand_lo, cand_hi = lo * ratio, hi * ratio
            scale, zero_point = scale_zero_point_from_bounds(cand_lo, cand_hi, qmin, qmax, symmetric)
            xq = fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
            err = (xq - x).pow(2)
            err = err.mean(dim=dims) if dims is not None else err.mean().reshape(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, cand_lo, best_lo)
            best_hi = torch.where(better, cand_hi, best_hi)
        return best_lo, best_hi

    _merge = MovingAverageObserver._merge


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, MovingAverageObserver, PercentileObserver, MSEObserver)
}


def make_observer(name: str, num_channels: int = 1, ch_axis: int | None = None) -> Observer:
    """Build an observer by its registry name (``minmax``, ``moving_average``, ``percentile``, ``mse``)."""
    if name not in OBSERVERS:
        raise QuantizationConfigError(f"Unknown observer {name!r}. Choose one of {sorted(OBSERVERS)}.")
    return OBSERVERS[name](num_channels=num_channels, ch_axis=ch_axis)
