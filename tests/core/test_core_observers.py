"""Observers: running statistics against NumPy references, the MSE search, the registry, and DDP reduction."""

from __future__ import annotations

import datetime
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_quant.core import observers as observers_module
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import fake_quantize, quant_range, scale_zero_point_from_bounds
from lightning_quant.core.observers import (
    OBSERVERS,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)

SHAPE = (4, 6, 5)


def _batches(n: int, seed: int, shape: tuple[int, ...] = SHAPE) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # batches with different spreads and offsets, so the running statistics move both ways
    return [torch.randn(shape, generator=gen) * (0.5 + i) + (i - 1) * 0.3 for i in range(n)]


def _per_channel(x: np.ndarray, ch_axis: int | None) -> np.ndarray:
    """Rows = channels (one row for per tensor), columns = the channel's elements."""
    if ch_axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, ch_axis, 0).reshape(x.shape[ch_axis], -1)


def _channels(ch_axis: int | None) -> int:
    return 1 if ch_axis is None else SHAPE[ch_axis]


def _mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool, symmetric: bool, ch_axis):
    """Per-channel quantization MSE of ``x`` on the grid that ``[lo, hi]`` gives."""
    qmin, qmax = quant_range(bits, signed)
    scale, zero_point = scale_zero_point_from_bounds(lo, hi, qmin, qmax, symmetric)
    err = (fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis) - x).double().pow(2)
    if ch_axis is None:
        return err.mean().reshape(1)
    return err.mean(dim=[d for d in range(x.dim()) if d != ch_axis])


# ---------------------------------------------------------------------------------------------------------------
# running statistics
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ch_axis", [None, 0, 1, 2])
def test_minmax_running_bounds(ch_axis):
    obs = MinMaxObserver(_channels(ch_axis), ch_axis)
    batches = _batches(3, seed=0)
    for i, x in enumerate(batches, start=1):
        obs.update(x, -128, 127, True)
        seen = np.concatenate([_per_channel(b.numpy(), ch_axis) for b in batches[:i]], axis=1)
        lo, hi = obs.bounds()
        assert lo.shape == hi.shape == (_channels(ch_axis),)
        assert torch.equal(lo, torch.from_numpy(seen.min(axis=1)))
        assert torch.equal(hi, torch.from_numpy(seen.max(axis=1)))
        assert int(obs.num_batches) == i
    # a batch inside the range changes nothing (the range never shrinks)
    before = [t.clone() for t in obs.bounds()]
    obs.update(batches[0] * 0.01, -128, 127, True)
    assert all(torch.equal(a, b) for a, b in zip(before, obs.bounds(), strict=True))


@pytest.mark.parametrize("ch_axis", [None, 1])
@pytest.mark.parametrize("momentum", [0.1, 0.7, 1.0])
def test_moving_average_ema(ch_axis, momentum):
    obs = MovingAverageObserver(_channels(ch_axis), ch_axis, momentum=momentum)
    ref_lo = ref_hi = None
    for x in _batches(4, seed=1):
        rows = _per_channel(x.numpy(), ch_axis).astype(np.float64)
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        if ref_lo is None:  # the first batch is copied
            ref_lo, ref_hi = lo, hi
        else:
            ref_lo = (1 - momentum) * ref_lo + momentum * lo
            ref_hi = (1 - momentum) * ref_hi + momentum * hi
        obs.update(x, -128, 127, True)
        torch.testing.assert_close(obs.min_val.double(), torch.from_numpy(ref_lo), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(obs.max_val.double(), torch.from_numpy(ref_hi), atol=1e-6, rtol=1e-6)
    # unlike min-max, the EMA moved off the union's extremes (unless the newest batch takes all the weight)
    union_max = max(float(b.max()) for b in _batches(4, seed=1))
    if momentum < 1.0:
        assert float(obs.max_val.max()) < union_max


@pytest.mark.parametrize("ch_axis", [None, 0, 2])
@pytest.mark.parametrize("percentile", [99.99, 99.0, 90.0])
def test_percentile_matches_numpy(ch_axis, percentile):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 16, 12, generator=gen)
    channels = 1 if ch_axis is None else x.shape[ch_axis]
    obs = PercentileObserver(channels, ch_axis, percentile=percentile)
    obs.update(x, 0, 255, False)
    rows = _per_channel(x.numpy(), ch_axis).astype(np.float64)
    ref = np.percentile(rows, [100.0 - percentile, percentile], axis=1)
    assert obs.min_val.shape == (channels,)
    torch.testing.assert_close(obs.min_val.double(), torch.from_numpy(ref[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(obs.max_val.double(), torch.from_numpy(ref[1]), atol=1e-5, rtol=1e-5)
    if percentile < 100:
        assert torch.all(obs.max_val < torch.from_numpy(rows.max(axis=1)).float())


def test_percentile_moving_average_and_subsampling():
    batches = _batches(3, seed=3, shape=(10, 30))
    obs = PercentileObserver(percentile=95.0, momentum=0.25, max_samples=100)
    ref_lo = ref_hi = None
    for x in batches:
        flat = x.numpy().reshape(-1)
        sample = flat[:: flat.size // 100 + 1]  # evenly strided, at most max_samples elements
        assert sample.size <= 100
        lo, hi = np.percentile(sample.astype(np.float64), [5.0, 95.0])
        ref_lo = lo if ref_lo is None else 0.75 * ref_lo + 0.25 * lo
        ref_hi = hi if ref_hi is None else 0.75 * ref_hi + 0.25 * hi
        obs.update(x, -8, 7, True)
    assert obs.min_val.item() == pytest.approx(ref_lo, abs=1e-5)
    assert obs.max_val.item() == pytest.approx(ref_hi, abs=1e-5)


def test_reset_and_state_dict():
    obs = MinMaxObserver(3, ch_axis=0)
    obs.update(torch.randn(3, 4, generator=torch.Generator().manual_seed(4)), -8, 7, True)
    state = obs.state_dict()
    assert set(state) == {"min_val", "max_val", "num_batches"}
    fresh = MinMaxObserver(3, ch_axis=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.min_val, obs.min_val) and int(fresh.num_batches) == 1
    obs.reset()
    assert int(obs.num_batches) == 0 and torch.all(obs.min_val == 0) and torch.all(obs.max_val == 0)
    # after a reset the next batch is taken as is, not merged with the zeros
    obs.update(torch.full((3, 4), 2.0), -8, 7, True)
    assert torch.all(obs.min_val == 2.0)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("ch_axis", [None, 0, 1])
def test_shapes_and_dtypes(name, ch_axis):
    channels = _channels(ch_axis)
    obs = make_observer(name, channels, ch_axis)
    assert isinstance(obs, OBSERVERS[name]) and obs.name == name
    obs.update(_batches(1, seed=5)[0].bfloat16(), -8, 7, True)  # any float dtype is observed in float32
    lo, hi = obs.bounds()
    assert lo.shape == hi.shape == (channels,)
    assert lo.dtype == hi.dtype == torch.float32
    assert torch.all(lo <= hi)


def test_make_observer_unknown_name():
    with pytest.raises(
        QuantizationConfigError,
        match=r"Unknown observer 'histogram'\. Choose one of \['minmax', 'moving_average', 'mse', 'percentile'\]\.",
    ):
        make_observer("histogram")


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (MovingAverageObserver, {"momentum": 0.0}, r"`momentum` must be in \(0, 1\], got 0\.0\."),
        (MovingAverageObserver, {"momentum": 1.5}, r"`momentum` must be in \(0, 1\], got 1\.5\."),
        (PercentileObserver, {"percentile": 50.0}, r"`percentile` must be in \(50, 100\], got 50\.0\."),
        (PercentileObserver, {"percentile": 100.5}, r"`percentile` must be in \(50, 100\], got 100\.5\."),
    ],
)
def test_argument_errors(cls, kwargs, match):
    with pytest.raises(QuantizationConfigError, match=match):
        cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# MSE search
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ch_axis", [None, 0])
@pytest.mark.parametrize(("bits", "signed", "symmetric"), [(2, True, True), (4, False, False), (8, True, True)])
def test_mse_never_worse_than_minmax(ch_axis, bits, signed, symmetric):
    qmin, qmax = quant_range(bits, signed)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(SHAPE, generator=gen)
    if not signed and symmetric is False:
        x = x + 0.5
    mse_obs = MSEObserver(_channels(ch_axis), ch_axis)
    mse_obs.update(x, qmin, qmax, symmetric)
    mm = MinMaxObserver(_channels(ch_axis), ch_axis)
    mm.update(x, qmin, qmax, symmetric)
    chosen = _mse(x, *mse_obs.bounds(), bits, signed, symmetric, ch_axis)
    plain = _mse(x, *mm.bounds(), bits, signed, symmetric, ch_axis)
    assert torch.all(chosen <= plain)
    # the chosen bounds shrink the min-max ones by one ratio in [min_ratio, 1]
    ratio = mse_obs.max_val / mm.max_val
    assert torch.all((ratio >= mse_obs.min_ratio - 1e-6) & (ratio <= 1 + 1e-6))
    torch.testing.assert_close(mse_obs.min_val, mm.min_val * ratio)


@pytest.mark.parametrize("distribution", ["laplace", "student_t"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("ch_axis", [None, 0])
def test_mse_beats_minmax_on_heavy_tails(distribution, bits, ch_axis):
    rng = np.random.default_rng(7)
    if distribution == "laplace":
        data = rng.laplace(size=(4, 512))
    else:
        data = rng.standard_t(df=2.5, size=(4, 512))
    x = torch.from_numpy(data.astype(np.float32))
    qmin, qmax = quant_range(bits, True)
    channels = 1 if ch_axis is None else 4
    mse_obs = MSEObserver(channels, ch_axis)
    mse_obs.update(x, qmin, qmax, True)
    mm = MinMaxObserver(channels, ch_axis)
    mm.update(x, qmin, qmax, True)
    chosen = _mse(x, *mse_obs.bounds(), bits, True, True, ch_axis)
    plain = _mse(x, *mm.bounds(), bits, True, True, ch_axis)
    assert torch.all(chosen < 0.9 * plain), (chosen, plain)
    assert torch.all(mse_obs.max_val < mm.max_val)


@pytest.mark.parametrize("ch_axis", [None, 0])
def test_mse_subsampled_search_keeps_full_extremes(ch_axis):
    """Large tensors: the error is measured on a strided sample, the extremes still come from every element."""
    x = torch.from_numpy(np.random.default_rng(9).laplace(size=(2, 40000)).astype(np.float32))
    channels = 1 if ch_axis is None else 2
    obs = MSEObserver(channels, ch_axis, max_samples=256)
    obs.update(x, -8, 7, True)
    mm = MinMaxObserver(channels, ch_axis)
    mm.update(x, -8, 7, True)
    ratio = obs.max_val / mm.max_val
    assert torch.all((ratio >= obs.min_ratio - 1e-6) & (ratio < 1.0))
    torch.testing.assert_close(obs.min_val, mm.min_val * ratio)
    assert torch.all(_mse(x, *obs.bounds(), 4, True, True, ch_axis) < _mse(x, *mm.bounds(), 4, True, True, ch_axis))


def test_mse_moving_average_over_batches():
    batches = _batches(3, seed=8)
    obs = MSEObserver(momentum=0.5)
    probe = MSEObserver()
    ref = None
    for x in batches:
        lo, hi = probe.batch_bounds(x, -8, 7, True)
        ref = (lo, hi) if ref is None else (0.5 * ref[0] + 0.5 * lo, 0.5 * ref[1] + 0.5 * hi)
        obs.update(x, -8, 7, True)
    torch.testing.assert_close(obs.min_val, ref[0])
    torch.testing.assert_close(obs.max_val, ref[1])


# ---------------------------------------------------------------------------------------------------------------
# DDP: every rank ends with the statistics of all ranks' data
# ---------------------------------------------------------------------------------------------------------------
WORLD_SIZE = 2


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches per rank; rank 1's data is wider, so the global extremes come from different ranks."""
    gen = torch.Generator().manual_seed(100 + rank)
    first = torch.randn(4, 64, generator=gen) * (1.0 + rank) + (0.5 if rank == 0 else -0.5)
    second = torch.randn(4, 64, generator=gen) * (1.5 - rank * 0.5)
    return first, second


def _observers() -> dict[str, Observer]:
    return {
        "minmax": MinMaxObserver(),
        "minmax_pc": MinMaxObserver(4, ch_axis=0),
        "percentile": PercentileObserver(percentile=99.0),
        "percentile_pc": PercentileObserver(4, ch_axis=0, percentile=99.0),
        "mse": MSEObserver(grid=20),
    }


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        observers = _observers()
        first, second = _rank_data(rank)
        for name, obs in observers.items():
            obs.update(first, -128, 127, True)
            if name.startswith("minmax"):
                obs.update(second, -128, 127, True)
        torch.save(
            {name: [t.clone() for t in obs.bounds()] for name, obs in observers.items()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


# The spawned children import only `lightning_quant.core`: the package's `__init__` imports the callbacks and
# with them Lightning, about 8 s per process on this 2-core machine. This launcher (written to tmp_path, so the
# child unpickles it without importing anything) registers a bare `lightning_quant` package first.
_LAUNCHER = """
import importlib, sys, types

def run(rank, package_dir, test_module, *args):
    package = types.ModuleType("lightning_quant")
    package.__path__ = [package_dir]
    sys.modules.setdefault("lightning_quant", package)
    importlib.import_module(test_module)._ddp_worker(rank, *args)
"""


def test_ddp_reduction(tmp_path, monkeypatch):
    (tmp_path / "lq_core_ddp_launcher.py").write_text(_LAUNCHER)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned children inherit sys.path
    launcher = importlib.import_module("lq_core_ddp_launcher")
    package_dir = str(Path(observers_module.__file__).resolve().parents[1])
    args = (package_dir, __name__, str(tmp_path / "init"), str(tmp_path))
    mp.spawn(launcher.run, args=args, nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    data = [_rank_data(r) for r in range(WORLD_SIZE)]
    everything = torch.cat([torch.cat(d, dim=1) for d in data], dim=1)  # [4, all elements of all ranks]
    # every rank holds the same bounds
    for name in results[0]:
        for a, b in zip(results[0][name], results[1][name], strict=True):
            assert torch.equal(a, b), name
    res = results[0]
    # min-max: the global extremes over both ranks and both batches
    assert res["minmax"][0].item() == everything.min().item()
    assert res["minmax"][1].item() == everything.max().item()
    assert torch.equal(res["minmax_pc"][0], everything.min(dim=1).values)
    assert torch.equal(res["minmax_pc"][1], everything.max(dim=1).values)
    assert res["minmax"][1].item() > max(d[0].max().item() for d in data[:1])  # rank 1 raised rank 0's max
    # percentile: the mean over ranks of each rank's batch percentiles
    per_rank = [np.percentile(d[0].numpy().astype(np.float64).reshape(-1), [1.0, 99.0]) for d in data]
    per_rank_pc = [np.percentile(d[0].numpy().astype(np.float64), [1.0, 99.0], axis=1) for d in data]
    ref = np.mean(per_rank, axis=0)
    ref_pc = np.mean(per_rank_pc, axis=0)
    assert res["percentile"][0].item() == pytest.approx(ref[0], abs=1e-5)
    assert res["percentile"][1].item() == pytest.approx(ref[1], abs=1e-5)
    torch.testing.assert_close(res["percentile_pc"][0].double(), torch.from_numpy(ref_pc[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res["percentile_pc"][1].double(), torch.from_numpy(ref_pc[1]), atol=1e-5, rtol=1e-5)
    # mse: the mean of each rank's own search result
    local = [MSEObserver(grid=20).batch_bounds(d[0], -128, 127, True) for d in data]
    torch.testing.assert_close(res["mse"][0], (local[0][0] + local[1][0]) / 2)
    torch.testing.assert_close(res["mse"][1], (local[0][1] + local[1][1]) / 2)
