"""The fused LSQ fake-quant path (:mod:`lightning_quant.core.fused`) against today's aten path.

Every comparison is bit for bit (float bit patterns; NaN equals NaN) on the output and on the gradients of the
input, the step size and the zero point. The inputs put many elements within a few ulps of rounding ties, where
a different rounding order or a missing fused multiply-add shows. Tensors are small: the module's size threshold
is lowered to 0 for these tests, and the kernels compile once per process (shapes and bit widths are dynamic).
CUDA cases run where a GPU is present.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from torch import nn

from lightning_quant.core import fused
from lightning_quant.core.functional import lsq_fake_quantize, quant_range
from lightning_quant.core.fused import fused_disabled, lsq_fake_quantize_fast
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.surgery import LayerSpec, QuantSpec, quantize_model, set_observing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BITS = list(range(2, 9))
FUSED_NODE = "_FusedLSQBackward"


def _node(out: torch.Tensor) -> str | None:
    """The autograd node that made ``out``, looking past the reshape back to the input's shape."""
    fn = out.grad_fn
    if fn is not None and fn.name() == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return None if fn is None else fn.name()


@pytest.fixture(autouse=True)
def small_tensors_fused(monkeypatch):
    """Fused path on for any size; a fresh log/readiness state (compiled kernels are kept across tests)."""
    monkeypatch.setattr(fused, "min_numel", 0)
    fresh = fused._State(enabled=True)
    fresh.compiled = fused._state.compiled
    fresh.ready = {k: v for k, v in fused._state.ready.items() if v is None}  # verified variants stay verified
    fresh.compile_seconds = fused._state.compile_seconds
    monkeypatch.setattr(fused, "_state", fresh)


def _case(bits: int, signed: bool, ch_axis: int | None, dtype: torch.dtype, device: str, seed: int = 0):
    """Input with a third of its elements one to three ulps from rounding ties, a third clipped, a third random."""
    g = torch.Generator().manual_seed(seed * 100 + bits * 10 + signed)
    qmin, qmax = quant_range(bits, signed)
    shape = (3, 6, 7, 11)
    channels = 1 if ch_axis is None else shape[ch_axis]
    scale = 0.01 + 0.3 * torch.rand(channels, generator=g)
    zero_point = torch.zeros(channels)
    if not signed:  # asymmetric grid: an integer zero point anywhere on it
        zero_point = torch.randint(qmin, qmax + 1, (channels,), generator=g).float()
    bshape = [1] * len(shape)
    if ch_axis is not None:
        bshape[ch_axis] = channels
    s_b, z_b = scale.reshape(bshape), zero_point.reshape(bshape)
    k = torch.randint(qmin - 2, qmax + 2, shape, generator=g).float()
    ties = (k + 0.5 - z_b) * s_b
    step = torch.randint(-3, 4, shape, generator=g)
    near = torch.nextafter(ties, torch.where(step < 0, -torch.inf, torch.inf))
    near = torch.where(step == 0, ties, near)
    wide = ((qmin + qmax) / 2 - z_b) * s_b + (qmax - qmin) * s_b * (2 * torch.rand(shape, generator=g) - 1)
    pick = torch.randint(0, 3, shape, generator=g)
    x = torch.where(pick == 0, near, torch.where(pick == 1, wide, torch.randn(shape, generator=g) * s_b * 4))
    grad = torch.randn(shape, generator=g)
    to = dict(device=device)
    return (
        x.to(dtype=dtype, **to),
        scale.to(**to),
        zero_point.to(**to),
        qmin,
        qmax,
        grad.to(dtype=dtype, **to),
    )


def _run(fn, x, scale, zero_point, qmin, qmax, ch_axis, grad_factor, grad, zp_grad=True):
    x = x.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    zero_point = zero_point.clone().requires_grad_(zp_grad)
    out = fn(x, scale, zero_point, qmin, qmax, ch_axis, grad_factor)
    out.backward(grad)
    return out, [out.detach(), x.grad, scale.grad] + ([zero_point.grad] if zp_grad else [])


def _assert_bits_equal(expected: torch.Tensor, got: torch.Tensor, what: str) -> None:
    assert expected.dtype == got.dtype and expected.shape == got.shape, what
    view = {4: torch.int32, 2: torch.int16}[got.element_size()]
    same = (expected.view(view) == got.view(view)) | (expected.isnan() & got.isnan())
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} elements differ"


# ---------------------------------------------------------------------------------------------------------------
# bit-exact numerics
# ---------------------------------------------------------------------------------------------------------------
# bfloat16 inputs are activations under bf16-mixed precision: per tensor (weights stay float32 parameters)
LAYOUTS = [
    pytest.param(None, torch.float32, id="per_tensor-fp32"),
    pytest.param(None, torch.bfloat16, id="per_tensor-bf16"),
    pytest.param(0, torch.float32, id="per_channel_0-fp32"),
    pytest.param(1, torch.float32, id="per_channel_1-fp32"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("ch_axis", "dtype"), LAYOUTS)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned_asym", "signed_sym"])
def test_bit_exact_forward_and_gradients(device, dtype, ch_axis, signed):
    for bits in BITS:
        x, scale, zero_point, qmin, qmax, grad = _case(bits, signed, ch_axis, dtype, device)
        grad_factor = 1.0 / (x.numel() * qmax) ** 0.5
        _, expected = _run(lsq_fake_quantize, x, scale, zero_point, qmin, qmax, ch_axis, grad_factor, grad)
        out, got = _run(lsq_fake_quantize_fast, x, scale, zero_point, qmin, qmax, ch_axis, grad_factor, grad)
        assert _node(out) == FUSED_NODE  # the fused path ran
        for name, a, b in zip(["output", "input grad", "step grad", "zero-point grad"], expected, got, strict=True):
            _assert_bits_equal(a, b, f"{bits} bits, {name}")
        # the cases exercise clipping on both sides (or the grid's only side) and rounding
        clipped = got[1] == 0
        assert 0.05 < clipped.float().mean() < 0.8


@pytest.mark.parametrize("device", DEVICES)
def test_bit_exact_without_zero_point_gradient_and_special_values(device):
    """The training configuration (zero point a buffer), with NaN, infinities and huge values in the input."""
    x, scale, zero_point, qmin, qmax, grad = _case(8, False, None, torch.float32, device, seed=3)
    flat = x.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0])
    _, expected = _run(lsq_fake_quantize, x, scale, zero_point, qmin, qmax, None, 0.05, grad, zp_grad=False)
    out, got = _run(lsq_fake_quantize_fast, x, scale, zero_point, qmin, qmax, None, 0.05, grad, zp_grad=False)
    assert _node(out) == FUSED_NODE
    for a, b in zip(expected, got, strict=True):
        _assert_bits_equal(a, b, "special values")


def test_self_check_detects_a_kernel_without_fused_multiply_add(monkeypatch):
    """The self-check that guards every machine tells a separately rounded multiply-add from aten's FMA."""
    numerics = fused._detect_numerics(torch.device("cpu"))
    assert numerics is not None  # exactly one candidate form reproduces aten's per-element gradients
    if numerics.error != "fma":
        pytest.skip("aten's CPU kernel on this machine rounds q*s - x twice (no FMA): nothing to tell apart")
    eager = fused._make_backward(numerics, with_zero_point=False)  # run eagerly, prims.fma rounds twice
    monkeypatch.setitem(fused._state.compiled, ("cpu", "tensor", torch.float32, "backward"), eager)
    reason = fused._self_check(torch.device("cpu"), "tensor", torch.float32, with_zp=False)
    assert reason is not None and "step-size gradient differs" in reason


def test_non_contiguous_per_tensor_input_and_expanded_gradient():
    x, scale, zero_point, qmin, qmax, _ = _case(4, False, None, torch.float32, "cpu")
    x = x.permute(0, 2, 3, 1)  # channels-last view
    for fn in (lsq_fake_quantize, lsq_fake_quantize_fast):
        xx, ss = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        out = fn(xx, ss, zero_point, qmin, qmax, None, 0.01)
        out.sum().backward()  # the incoming gradient is an expanded (stride-0) tensor
        if fn is lsq_fake_quantize:
            expected = [out.detach(), xx.grad, ss.grad]
        else:
            assert _node(out) == FUSED_NODE
            for a, b in zip(expected, [out.detach(), xx.grad, ss.grad], strict=True):
                _assert_bits_equal(a, b, "non-contiguous")


# ---------------------------------------------------------------------------------------------------------------
# no recompiles across bit widths, step sizes and shapes
# ---------------------------------------------------------------------------------------------------------------
def test_changing_bits_shapes_and_steps_does_not_recompile():
    from torch._dynamo.utils import counters

    def step(bits: int, shape: tuple[int, ...], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g, requires_grad=True)
        qmin, qmax = quant_range(bits, False)
        s = torch.tensor([0.05 + 0.01 * bits], requires_grad=True)
        out = lsq_fake_quantize_fast(x, s, torch.tensor([float(bits)]), qmin, qmax, None, 0.1 / bits)
        assert _node(out) == FUSED_NODE
        out.backward(torch.ones_like(out))

    step(8, (2, 4, 5, 5), 0)  # compiles (or loads) forward and backward once
    before = counters["stats"]["unique_graphs"]
    for bits in range(2, 9):
        step(bits, (2 + bits, 4, 5, 5), bits)
        step(bits, (3, 7, 2 * bits + 1), bits + 10)
    # an expanded (stride-0) incoming gradient and the forward under autocast (bf16-mixed) reuse the same graphs
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    s = torch.tensor([0.05], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lsq_fake_quantize_fast(x, s, torch.tensor([3.0]), 0, 15, None, 0.1)
    assert _node(out) == FUSED_NODE
    out.sum().backward()
    assert counters["stats"]["unique_graphs"] == before


def test_quantizer_bit_width_changes_use_the_fused_path_without_recompiling():
    """QBitOpt changes ``bits`` during training: the LSQ quantizer's training path stays fused and compiled."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    q = UniformQuantizer(8, symmetric=False, signed=False, learnable=True)
    q.observe(torch.randn(4, 8, 6, 6))
    q(torch.randn(4, 8, 6, 6)).sum().backward()
    before = counters["stats"]["unique_graphs"]
    for bits in (2, 3, 4, 5, 6, 7, 8, 4):
        q.bits = bits
        out = q(torch.randn(4, 8, 6, 6, requires_grad=True))
        assert _node(out) == FUSED_NODE
        out.sum().backward()
    assert counters["stats"]["unique_graphs"] == before


# ---------------------------------------------------------------------------------------------------------------
# memory: what the fused path saves for backward
# ---------------------------------------------------------------------------------------------------------------
def _saved_storages(fn, x: torch.Tensor) -> list[tuple[int, int]]:
    saved: list[tuple[int, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    s = torch.tensor([0.05], requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, s, torch.tensor([3.0]), 0, 255, None, 0.01)
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saves_its_input_by_reference_and_nothing_else_full_size(dtype):
    x = torch.randn(4, 8, 16, 16, dtype=dtype, requires_grad=True)
    _saved_storages(lsq_fake_quantize_fast, x.detach().clone())  # the first call compiles and self-checks
    saved = _saved_storages(lsq_fake_quantize_fast, x)
    big = [(ptr, n) for ptr, n in saved if n >= x.numel()]
    assert big == [(x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())]  # x itself, no copy
    aten_big = sum(n for _, n in _saved_storages(lsq_fake_quantize, x) if n >= x.numel())
    if dtype == torch.bfloat16:
        assert aten_big == 2 * x.untyped_storage().nbytes()  # aten's path keeps a float32 copy of a bf16 input


# ---------------------------------------------------------------------------------------------------------------
# fallbacks: one log line per reason, results unchanged
# ---------------------------------------------------------------------------------------------------------------
def _fallback_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == fused.__name__]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0.05]), torch.tensor([3.0])


def test_disabled_falls_back_with_one_log_line(caplog):
    caplog.set_level(logging.INFO, logger=fused.__name__)
    x, s, z = _inputs()
    x.requires_grad_(True)
    with fused_disabled():
        outs = [lsq_fake_quantize_fast(x, s, z, 0, 255) for _ in range(3)]
    assert fused.fused_enabled()
    assert all(_node(o) != FUSED_NODE for o in outs)
    assert all(torch.equal(o, lsq_fake_quantize(x, s, z, 0, 255)) for o in outs)
    messages = _fallback_records(caplog)
    assert len(messages) == 1 and "disabled" in messages[0]


def test_jit_trace_falls_back(caplog):
    caplog.set_level(logging.INFO, logger=fused.__name__)
    x, s, z = _inputs()
    traced = torch.jit.trace(lambda t: lsq_fake_quantize_fast(t, s, z, 0, 255), (x,))
    traced(x)
    torch.jit.trace(lambda t: lsq_fake_quantize_fast(t, s, z, 0, 255), (x,))
    assert torch.equal(traced(x), lsq_fake_quantize(x, s, z, 0, 255))
    messages = _fallback_records(caplog)
    assert len(messages) == 1 and "torch.jit" in messages[0]


def test_onnx_export_falls_back(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=fused.__name__)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    x, s, z = _inputs()
    x.requires_grad_(True)
    for _ in range(2):
        out = lsq_fake_quantize_fast(x, s, z, 0, 255)
    assert _node(out) != FUSED_NODE
    messages = _fallback_records(caplog)
    assert len(messages) == 1 and "ONNX export" in messages[0]


def test_fx_symbolic_trace_falls_back(caplog):
    """fx tracing through the function reaches today's path, which fx cannot trace either (the suite's tracer keeps
    quantizers as leaves); the fused path must not change that error and logs once."""
    caplog.set_level(logging.INFO, logger=fused.__name__)

    def traced_with(fn):
        class Uses(nn.Module):
            def forward(self, x):
                return fn(x, torch.tensor([0.05]), torch.tensor([3.0]), 0, 255)

        return Uses()

    for _ in range(2):
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(traced_with(lsq_fake_quantize_fast))
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(traced_with(lsq_fake_quantize))
    messages = _fallback_records(caplog)
    assert len(messages) == 1 and "torch.fx" in messages[0]


def test_outer_torch_compile_falls_back(caplog):
    caplog.set_level(logging.INFO, logger=fused.__name__)
    x, s, z = _inputs()
    compiled = torch.compile(lambda t: lsq_fake_quantize_fast(t, s, z, 0, 255) * 2, backend="eager")
    assert torch.equal(compiled(x), lsq_fake_quantize(x, s, z, 0, 255) * 2)
    messages = _fallback_records(caplog)
    assert len(messages) == 1 and "torch.compile" in messages[0]


def test_unsupported_device_falls_back(caplog):
    """Meta tensors: aten's path takes them (and fails as it did before, having no meta kernel), one log line."""
    caplog.set_level(logging.INFO, logger=fused.__name__)
    x = torch.empty(2, 3, 8, 8, device="meta", requires_grad=True)
    s, z = torch.ones(1, device="meta"), torch.zeros(1, device="meta")
    with pytest.raises(NotImplementedError) as before:
        lsq_fake_quantize(x, s, z, 0, 255)
    for _ in range(2):
        with pytest.raises(NotImplementedError) as after:
            lsq_fake_quantize_fast(x, s, z, 0, 255)
    assert str(after.value) == str(before.value)
    messages = _fallback_records(caplog)
    assert len(messages) == 1 and "unsupported device 'meta'" in messages[0]


def test_failing_compiler_falls_back(caplog, monkeypatch):
    """No working compiler (e.g. no C++ toolchain for inductor): aten's kernels, one log line, same results."""
    caplog.set_level(logging.INFO, logger=fused.__name__)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fused, "_compiled", broken)
    x, s, z = _inputs()
    x = torch.randn(2, 3, 8, 9, dtype=torch.float16, requires_grad=True)  # a variant not verified earlier
    for _ in range(2):
        out = lsq_fake_quantize_fast(x, s, z, 0, 255)
    assert _node(out) != FUSED_NODE
    assert torch.equal(out, lsq_fake_quantize(x, s, z, 0, 255))
    messages = _fallback_records(caplog)
    assert len(messages) == 1 and "compiling the kernels failed" in messages[0] and "no C++ compiler" in messages[0]


@pytest.mark.parametrize("failing", ["forward", "backward"])
def test_kernel_failing_at_run_time_falls_back_with_the_same_results(caplog, monkeypatch, failing):
    """E.g. dynamo's recompile limit reached mid-training: that call (forward) or its backward uses aten's kernels,
    the variant is switched off with one log line, and no result changes."""
    caplog.set_level(logging.INFO, logger=fused.__name__)
    x, scale, zero_point, qmin, qmax, grad = _case(6, False, None, torch.float32, "cpu", seed=5)
    _, expected = _run(lsq_fake_quantize, x, scale, zero_point, qmin, qmax, None, 0.02, grad)
    _run(lsq_fake_quantize_fast, x, scale, zero_point, qmin, qmax, None, 0.02, grad)  # compiled and verified
    real_call = fused._call

    def call(kernel, device_type, *args):
        if (len(args) == 5) == (failing == "forward"):  # forward kernels take 5 tensors, backward ones 6
            raise RuntimeError("recompile limit reached")
        return real_call(kernel, device_type, *args)

    monkeypatch.setattr(fused, "_call", call)
    out, got = _run(lsq_fake_quantize_fast, x, scale, zero_point, qmin, qmax, None, 0.02, grad)
    assert (_node(out) == FUSED_NODE) == (failing == "backward")
    for name, a, b in zip(["output", "input grad", "step grad", "zero-point grad"], expected, got, strict=True):
        _assert_bits_equal(a, b, name)
    out = lsq_fake_quantize_fast(x.requires_grad_(True), scale, zero_point, qmin, qmax, None, 0.02)
    assert _node(out) != FUSED_NODE  # the variant stays off
    messages = _fallback_records(caplog)
    assert len(messages) == 1 and "failed at run time" in messages[0] and "recompile limit" in messages[0]


def test_small_tensors_take_aten_silently(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=fused.__name__)
    monkeypatch.setattr(fused, "min_numel", 1000)
    x = torch.randn(10, 10, requires_grad=True)
    out = lsq_fake_quantize_fast(x, torch.tensor([0.05]), torch.tensor([3.0]), 0, 255)
    assert _node(out) != FUSED_NODE
    assert _fallback_records(caplog) == []


# ---------------------------------------------------------------------------------------------------------------
# training does not depend on the path
# ---------------------------------------------------------------------------------------------------------------
class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _train(fused_on: bool, bits: int, autocast: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """State dicts after calibration and after four SGD steps of QAT."""
    torch.manual_seed(0)
    model = quantize_model(_TinyNet(), QuantSpec(default=LayerSpec(weight_bits=bits, act_bits=bits)))
    x = torch.randn(8, 3, 12, 12)
    y = torch.randint(0, 4, (8,))
    set_observing(model, True)
    with torch.no_grad():
        model(x)
    set_observing(model, False)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with contextlib.nullcontext() if fused_on else fused_disabled():
        for i in range(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(x + 0.1 * i)
            nn.functional.cross_entropy(out.float(), y).backward()
            opt.step()
    return initial, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("bits", "autocast"), [(8, False), (4, False), (4, True)], ids=["w8a8", "w4a4", "w4a4-bf16"])
def test_training_is_identical_with_and_without_the_fused_path(bits, autocast):
    initial, fused_state = _train(True, bits, autocast)
    assert fused.fused_stats()["fallbacks"] == {}
    _, aten_state = _train(False, bits, autocast)
    assert fused_state.keys() == aten_state.keys()
    for name in fused_state:
        assert torch.equal(fused_state[name], aten_state[name]), name
    # the step sizes did train (two frozen models would prove nothing)
    steps = [k for k in fused_state if k.endswith("input_quantizer.scale")]
    assert steps and all(not torch.equal(fused_state[k], initial[k]) for k in steps)


def test_training_path_really_is_fused():
    """With the threshold at 0 every LSQ call of a training step goes through the fused function."""
    torch.manual_seed(0)
    model = quantize_model(_TinyNet(), QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4)))
    model(torch.randn(2, 3, 12, 12))  # initialises every quantizer from its first input
    names: list[str] = []
    for m in model.modules():
        if isinstance(m, UniformQuantizer):
            m.register_forward_hook(lambda mod, args, out: names.append(_node(out)))
    model(torch.randn(2, 3, 12, 12)).sum().backward()
    assert names and set(names) == {FUSED_NODE}


def test_in_place_ops_after_the_fused_output_keep_its_gradients() -> None:
    # EfficientNet's MBConv adds its shortcut in place to a quantized output (`result += input`)
    grads = []
    for quantize in (lsq_fake_quantize_fast, lsq_fake_quantize):
        torch.manual_seed(0)
        x = torch.randn(4, 8, 5, 5, requires_grad=True)
        scale = torch.tensor([0.05], requires_grad=True)
        out = quantize(x, scale, torch.tensor([3.0]), 0, 255, None, 0.1)
        if quantize is lsq_fake_quantize_fast:
            assert _node(out) == FUSED_NODE
        out += 1.0
        (out * out).sum().backward()
        grads.append((x.grad, scale.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
