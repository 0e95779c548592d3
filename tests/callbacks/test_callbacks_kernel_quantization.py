"""KernelQuantizationCallback (KQ): kernels on the codebook grid, exact accounting against the packed file, codebook
training with fixed indices, resume, grouped/depthwise/shared convs, errors, QAT in either order, ONNX export."""

from __future__ import annotations

import functools
import logging

import lightning as L
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from onnx import numpy_helper
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import KernelQuantizationCallback, QuantizationAwareTraining, QuantizationConfigError, QuantSpec
from lightning_quant.callbacks.kernel_quantization import PLOT_NAME, codebook_usage, kernel_quantization_report
from lightning_quant.core.codebook import CodebookQuantizer
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.models import ImageClassifier
from lightning_quant.surgery import quantized_layers
from tests.conftest import crash_and_resume


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    """A plain, a grouped and a depthwise 3x3 conv, a 1x1 conv and a Linear head (kernel counts: 8, 128, 64, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.pointwise = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.conv0(x)))
        h = F.relu(self.depthwise(self.grouped(F.relu(self.conv1(h)))))
        return self.fc(F.relu(self.pointwise(h)).mean(dim=(2, 3)))


KERNELS = {"backbone.conv0": 8, "backbone.conv1": 128, "backbone.grouped": 64, "backbone.depthwise": 16}


def _model(seed: int = 0, net: type[nn.Module] = Net) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(net(), lr=1e-2)


def _loader(n: int = 32, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)), batch
    )


def _fit(trainer_kwargs, model, callbacks, steps: int = 4, loader=None) -> L.Trainer:
    trainer = L.Trainer(**trainer_kwargs(max_steps=steps, callbacks=callbacks))
    trainer.fit(model, loader if loader is not None else _loader())
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# kernels, grid, accounting
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codebook", ["per_layer", "shared"])
def test_every_kernel_is_one_codebook_entry_on_the_6_bit_grid(trainer_kwargs, codebook):
    model = _model()
    cb = KernelQuantizationCallback(3, codebook=codebook, refit_every=2)
    trainer = _fit(trainer_kwargs, model, [cb])
    layers = quantized_layers(model)
    assert cb.layer_names == list(KERNELS)  # k x k convs only; the 1x1 conv and the Linear head stay float
    assert set(layers) == set(KERNELS) and cb.reassignments and cb.fitted_layers == list(KERNELS)
    owners = set()
    for name, kernels in KERNELS.items():
        layer, q = layers[name], layers[name].weight_quantizer
        assert isinstance(q, CodebookQuantizer) and q.vector == "kernel" and q.num_vectors == kernels
        owners.add(id(q.codebook_owner))
        book = q.effective_codebook().detach()
        out = layer.quantized_weight().detach().reshape(kernels, 9)
        # every kernel equals exactly one entry: the one its index names
        assert torch.equal(out, book[q.indices])
        # the entries lie on the codebook's symmetric 6-bit grid
        codes = q.codebook_codes()
        assert torch.equal(codes.float() * q.codebook_scale, book) and codes.min() >= -32 and codes.max() <= 31
    assert len(owners) == (1 if codebook == "shared" else 4)
    # the plot lands in the trainer's directory (no logger here: the default root)
    assert cb.plot_path is not None and cb.plot_path.name == PLOT_NAME
    assert str(cb.plot_path).startswith(str(trainer.default_root_dir)) and cb.plot_path.stat().st_size > 1000
    usage = codebook_usage(model, cb.layer_names)
    assert sum(int(c.sum()) for _, c in usage.values()) == sum(KERNELS.values())


@pytest.mark.parametrize("codebook", ["per_layer", "shared"])
def test_bits_per_conv_parameter_equal_the_packed_file(trainer_kwargs, tmp_path, codebook):
    from lightning_quant.export import save_packed_model
    from lightning_quant.export.packing import load_packed

    model = _model()

    class Logged(Callback):
        def on_train_end(self, trainer, pl_module):
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    logged = Logged()
    _fit(trainer_kwargs, model, [KernelQuantizationCallback(3, codebook=codebook), logged])
    report = kernel_quantization_report(model)
    # the formula, from the layer shapes alone: index bits x kernels + entries x k^2 x 6 + 32 per codebook,
    # + the float 1x1 conv at 32 bits
    codebooks = 1 if codebook == "shared" else 4
    expected = 3 * sum(KERNELS.values()) + codebooks * (8 * 9 * 6 + 32) + 32 * 16 * 8
    assert report.bits == expected
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert report.params == params and report.bits_per_param == pytest.approx(expected / params)
    assert logged.metrics["quant/kq/bits_per_conv_param"] == pytest.approx(expected / params)
    # the packed file writes exactly that for the conv weights (every count here is a whole number of bytes)
    save_packed_model(model, tmp_path / "kq.lqp")
    entries = load_packed(tmp_path / "kq.lqp")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    written = {
        n: sum(v.numel() * v.element_size() for k, v in entries[f"{n}.weight"].items() if isinstance(v, torch.Tensor))
        for n in convs
    }
    assert report.packed_bytes == sum(written.values()) == expected // 8
    rows = {r.name: r for r in report.rows}
    for name, kernels in KERNELS.items():
        entry = entries[f"{name}.weight"]
        assert entry["bits"] == 3 and entry["packed"].numel() == kernels * 3 // 8  # indices at 3 bits
        if rows[name].shares is None:  # the codebook packed at 6 bits, stored where it is owned
            assert entry["codebook__bits"] == 6 and entry["codebook"].numel() == 8 * 9 * 6 // 8
        else:
            assert "codebook" not in entry
    assert sum(r.shares is not None for r in report.rows) == (3 if codebook == "shared" else 0)


def test_small_layers_get_a_capped_codebook_and_keep_their_kernels(trainer_kwargs):
    model = _model()
    cb = KernelQuantizationCallback(5, layers=["backbone.conv0", "backbone.depthwise", "backbone.grouped"])
    _fit(trainer_kwargs, model, [cb], steps=1)
    # conv0 has 8 kernels and the depthwise conv 16: fewer than 2**5, so their codebooks hold them all
    assert cb.capped == {"backbone.conv0": 8, "backbone.depthwise": 16}
    layers = quantized_layers(model)
    for name, (entries, bits) in {
        "backbone.conv0": (8, 3),
        "backbone.depthwise": (16, 4),
        "backbone.grouped": (32, 5),
    }.items():
        q = layers[name].weight_quantizer
        assert (q.num_entries, q.index_bits) == (entries, bits)
    # a capped codebook keeps every kernel: each is its own entry, on the 6-bit grid of the fit
    q = layers["backbone.conv0"].weight_quantizer
    assert sorted(q.indices.tolist()) == list(range(8))


def test_grouped_and_depthwise_convs_compute_with_their_codebook_kernels(trainer_kwargs):
    model = _model()
    _fit(trainer_kwargs, model, [KernelQuantizationCallback(3)], steps=2)
    model.eval()
    layers = quantized_layers(model)
    x = torch.randn(2, 16, 8, 8)
    for name, groups in (("backbone.grouped", 4), ("backbone.depthwise", 16)):
        layer, q = layers[name], layers[name].weight_quantizer
        weight = q.dequantize(q.int_repr(layer.weight))  # independent path: codes -> entries
        assert weight.shape == layer.weight.shape
        reference = F.conv2d(x, weight, None, padding=1, groups=groups)
        assert torch.equal(layer(x), reference)


class TwiceNet(nn.Module):
    """One conv called twice in forward (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.shared(F.relu(self.shared(h))))
        return self.fc(h.mean(dim=(2, 3)))


def test_a_conv_used_twice_is_one_codebook_layer_counted_once(trainer_kwargs):
    model = _model(net=TwiceNet)
    _fit(trainer_kwargs, model, [KernelQuantizationCallback(4)], steps=2)
    layers = quantized_layers(model)
    assert list(layers) == ["backbone.stem", "backbone.shared"]
    q = layers["backbone.shared"].weight_quantizer
    assert isinstance(q, CodebookQuantizer) and (q.num_entries, q.num_vectors) == (16, 64)
    report = kernel_quantization_report(model)
    assert [r.name for r in report.rows] == ["backbone.stem", "backbone.shared"]
    assert report.params == 8 * 9 + 64 * 9
    assert report.bits == 8 * 3 + (8 * 9 * 6 + 32) + 64 * 4 + (16 * 9 * 6 + 32)  # stem capped at 8 entries, 3 bits


# ---------------------------------------------------------------------------------------------------------------
# training and resume
# ---------------------------------------------------------------------------------------------------------------
class CodebookOnly(ImageClassifier):
    """Trains nothing but the codebooks."""

    def configure_optimizers(self):
        return torch.optim.Adam([p for n, p in self.named_parameters() if n.endswith(".codebook")], lr=2e-2)


def test_the_codebook_trains_while_the_indices_stay_fixed(trainer_kwargs):
    torch.manual_seed(0)
    model = CodebookOnly(Net())
    losses: list[float] = []
    snapshot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    class Record(Callback):
        def on_train_start(self, trainer, pl_module):  # after the fit in on_fit_start
            for name, layer in quantized_layers(pl_module).items():
                q = layer.weight_quantizer
                snapshot[name] = (q.indices.clone(), q.effective_codebook().detach().clone())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    loader = _loader(n=16, batch=16)  # one batch, seen again and again
    _fit(trainer_kwargs, model, [KernelQuantizationCallback(4), Record()], steps=60, loader=loader)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    for name, layer in quantized_layers(model).items():
        q = layer.weight_quantizer
        indices, book = snapshot[name]
        assert torch.equal(q.indices, indices)  # fixed
        assert not torch.equal(q.effective_codebook().detach(), book)  # the entries moved
        assert (q.effective_codebook().detach() != book).any(dim=1).sum() >= 2


@pytest.mark.parametrize("codebook", ["per_layer", "shared"])
def test_resume_is_bit_identical_also_into_a_fresh_disturbed_module(tmp_path, trainer_kwargs, codebook):
    def build():
        L.seed_everything(0)
        return _model(), [QuantizationAwareTraining(8, 4, num_calibration_batches=2),
                          KernelQuantizationCallback(3, codebook=codebook, refit_every=3)]  # fmt: skip

    def disturb(model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))

    (straight, straight_cbs), (resumed, resumed_cbs) = crash_and_resume(
        tmp_path, trainer_kwargs, build, _loader(), crash_step=6, max_epochs=3, before_resume=disturb
    )
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    kq, kq_resumed = straight_cbs[1], resumed_cbs[1]
    assert kq_resumed.fitted_layers == []  # k-means never ran again: the codebooks came from the checkpoint
    assert kq.reassignments == kq_resumed.reassignments and [s for s, _ in kq.reassignments] == [3, 6, 9, 12]


def test_validate_without_fit_fits_the_codebooks_once(trainer_kwargs):
    model = _model()
    cb = KernelQuantizationCallback(3)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[cb]))
    trainer.validate(model, _loader())
    assert cb.fitted_layers == list(KERNELS)
    trainer.validate(model, _loader())
    assert cb.fitted_layers == list(KERNELS)  # already fitted: not again


# ---------------------------------------------------------------------------------------------------------------
# composition with QAT, pointwise layers
# ---------------------------------------------------------------------------------------------------------------
def test_composes_with_qat_in_either_order(trainer_kwargs):
    def run(order):
        L.seed_everything(0)
        model = _model()
        callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=1), KernelQuantizationCallback(3)]
        _fit(trainer_kwargs, model, [callbacks[i] for i in order], steps=3)
        return model

    first, second = run((0, 1)), run((1, 0))
    assert QuantSpec.from_model(first) == QuantSpec.from_model(second)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    layers = quantized_layers(first)
    for name in KERNELS:  # weights by KQ, inputs by QAT (the first layer at QAT's first/last 8 bits)
        spec = layers[name].current_spec()
        assert spec.weight_kind == "codebook" and spec.act_bits == (8 if name == "backbone.conv0" else 4)
        assert spec.frozen
    assert isinstance(layers["backbone.pointwise"].weight_quantizer, UniformQuantizer)
    assert layers["backbone.pointwise"].current_spec().weight_bits == 4
    assert layers["backbone.fc"].current_spec().weight_bits == 8  # QAT's last layer


def test_pointwise_layers_at_the_weight_level(trainer_kwargs):
    model = _model()
    cb = KernelQuantizationCallback(3, pointwise="scalar", pointwise_bits=4)
    _fit(trainer_kwargs, model, [cb], steps=2)
    layers = quantized_layers(model)
    for name in ("backbone.pointwise", "backbone.fc"):
        q = layers[name].weight_quantizer
        assert isinstance(q, CodebookQuantizer) and q.vector == "scalar" and q.num_entries == 16
        values = layers[name].quantized_weight().detach().flatten()
        assert set(values.tolist()) <= set(q.effective_codebook().detach().flatten().tolist())
    rows = {r.name: r for r in kernel_quantization_report(model).rows}
    assert rows["backbone.pointwise"].kind == "scalar codebook" and rows["backbone.pointwise"].index_bits == 4


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"index_bits": 9}, r"`index_bits` must be within \[1, 8\], got 9"),
        ({"index_bits": 0}, r"`index_bits` must be within \[1, 8\], got 0"),
        ({"index_bits": 3, "pointwise_bits": 9}, r"`pointwise_bits` must be within \[1, 8\], got 9"),
        ({"index_bits": 3, "codebook_bits": 9}, r"`codebook_bits` must be within \[2, 8\], got 9"),
        ({"index_bits": 3, "codebook_bits": 1}, r"`codebook_bits` must be within \[2, 8\], got 1"),
        ({"index_bits": 3, "codebook_bits": 6.0}, r"`codebook_bits` must be an integer number of bits"),
        ({"index_bits": 3, "codebook": "global"}, r"`codebook` must be one of \['per_layer', 'shared'\], got 'global'"),
        ({"index_bits": 3, "pointwise": "drop"}, r"`pointwise` must be one of \['exclude', 'scalar'\]"),
        ({"index_bits": 3, "refit_every": 0}, r"`refit_every` must be an integer >= 1 or None, got 0"),
        ({"index_bits": 3, "kmeans_iterations": 0}, r"`kmeans_iterations` must be an integer >= 1, got 0"),
        ({"index_bits": 3, "pointwise_bits": 4}, r"`pointwise_bits`=4 sets .* but `pointwise` is 'exclude'.*HINT"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, match):
    with pytest.raises(QuantizationConfigError, match=match):
        KernelQuantizationCallback(**kwargs)


class PointwiseOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("net", "kwargs", "match"),
    [
        (
            PointwiseOnly,
            {},
            r"found no convolution with a kernel larger than 1x1 among the 2 selected layers of "
            r"ImageClassifier \(Conv2d\(1x1\), Linear",
        ),
        (Net, {"layers": ["backbone.pointwise"]}, r"found no convolution with a kernel larger than 1x1"),
        (Net, {"layers": ["backbone.nope*"]}, r"`include` pattern 'backbone.nope\*' matches no quantizable layer"),
        (Net, {"exclude": ["head"]}, r"KernelQuantizationCallback\(layers=None, exclude=\['head'\]\)"),
    ],
)
def test_model_errors_leave_the_model_untouched(trainer_kwargs, net, kwargs, match):
    model = _model(net=net)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(QuantizationConfigError, match=match):
        _fit(trainer_kwargs, model, [KernelQuantizationCallback(3, **kwargs)], steps=1)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------
@functools.cache
def _digits_resnet8() -> dict[str, torch.Tensor]:
    """ResNet-8's float weights after two epochs on sklearn digits (KQ fine-tunes a trained model)."""
    from lightning_quant.datamodules import DigitsDataModule
    from lightning_quant.models import resnet8

    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")
    torch.manual_seed(0)
    model = resnet8(in_channels=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _all_digits(data) -> list:
    """Every sklearn digits sample (1,797: train, val and test splits) in batches of 256, so that 99.9 % top-1
    agreement allows at most one disagreement."""
    data.setup("fit")
    data.setup("test")
    datasets = (data.train_dataset, data.val_dataset, data.test_dataset)
    return [batch for ds in datasets for batch in DataLoader(ds, batch_size=256)]


def _weight_initializers(path) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """The 4-D weight initializers of an ONNX file: (int8 codes, scale of their DequantizeLinear) pairs, and the
    float ones."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dq = {n.input[0]: inits.get(n.input[1]) for n in graph.node if n.op_type == "DequantizeLinear"}
    int8 = [(a, dq[n]) for n, a in inits.items() if a.dtype == np.int8 and a.ndim == 4 and n in dq]
    return int8, [a for a in inits.values() if a.dtype == np.float32 and a.ndim == 4]


def _kq_layers(model) -> dict:
    return {
        n: layer
        for n, layer in quantized_layers(model).items()
        if isinstance(layer.weight_quantizer, CodebookQuantizer) and layer.weight_quantizer.vector == "kernel"
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("codebook", "qat_act_bits"),
    [("per_layer", None), ("per_layer", 4), ("shared", 4)],
    ids=["weights-only", "qat-inputs", "shared-qat-inputs"],
)
def test_kq_model_runs_in_onnxruntime_and_agrees(trainer_kwargs, tmp_path, codebook, qat_act_bits):
    from lightning_quant.datamodules import DigitsDataModule
    from lightning_quant.export import export_onnx, verify_onnx
    from lightning_quant.models import resnet8

    data = DigitsDataModule(batch_size=64, seed=0)
    torch.manual_seed(0)
    model = ImageClassifier(resnet8(in_channels=1), lr=3e-3)
    model.backbone.load_state_dict(_digits_resnet8())
    callbacks: list = [KernelQuantizationCallback(4, codebook=codebook)]
    if qat_act_bits is not None:
        callbacks.append(QuantizationAwareTraining(8, qat_act_bits, num_calibration_batches=4))
    L.Trainer(**trainer_kwargs(max_epochs=1, callbacks=callbacks)).fit(model, datamodule=data)
    # the TorchScript exporter takes a second here; the default dynamo path with kernel codebooks is exercised in
    # tests/export/test_export_quantizer_kinds.py
    path = export_onnx(model, tmp_path / "kq.onnx", torch.zeros(2, 1, 8, 8), fold_batchnorm=False, dynamo=False)
    result = verify_onnx(model, path, _all_digits(data))
    assert result.num_samples == 1797 and result.agreement >= 0.999, result
    # a model that tells the digits apart, not a constant output (chance: 10 %; here about 85 % with per-layer
    # codebooks and 59 % with 16 kernels shared by all seven layers, after one epoch from the float model)
    assert result.torch_accuracy > 0.4, result
    # every KQ layer's weight is an int8 initializer behind DequantizeLinear (the codebook's 6-bit grid is a uniform
    # grid, `uniform_grid()`): its integers are the codebook codes its indices name, its scale the codebook's step
    int8, _ = _weight_initializers(path)
    kq = _kq_layers(model)
    assert len(kq) == 7  # the 7 3x3 convolutions of ResNet-8
    scales = set()
    for name, layer in kq.items():
        q = layer.weight_quantizer
        codes = q.codebook_owner.codebook_codes()[q.indices].reshape(layer.weight.shape).numpy()
        found = [s for a, s in int8 if a.shape == codes.shape and np.array_equal(a, codes)]
        assert found, f"{name}: no int8 weight initializer holds its codebook codes"
        assert np.all(found[0] == q.codebook_owner.codebook_scale.numpy()), name
        assert np.abs(codes).max() <= 32  # within the 6-bit grid
        scales.add(float(q.codebook_owner.codebook_scale))
    assert len(scales) == (1 if codebook == "shared" else 7)


@pytest.mark.slow
def test_a_float_codebook_exports_float_weights_with_a_warning(trainer_kwargs, tmp_path, caplog):
    from lightning_quant.datamodules import DigitsDataModule
    from lightning_quant.export import export_onnx, verify_onnx

    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")
    model = _model()
    # codebook_bits=None: float entries, no uniform grid, so no int8 form
    _fit(trainer_kwargs, model, [KernelQuantizationCallback(3, codebook_bits=None)], steps=6,
         loader=data.train_dataloader())  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="lightning_quant.export.onnx"):
        path = export_onnx(
            model, tmp_path / "float_book.onnx", torch.zeros(2, 1, 8, 8), fold_batchnorm=False, dynamo=False
        )
    assert f"the weights of {list(KERNELS)} lie on no uniform grid" in caplog.text
    assert "exported as their exact float values" in caplog.text
    int8, floats = _weight_initializers(path)
    assert int8 == []  # no layer here has a grid: every weight is float
    for name, layer in _kq_layers(model).items():
        q = layer.weight_quantizer
        assert q.uniform_grid() is None
        kernels = q.effective_codebook().detach()[q.indices].reshape(layer.weight.shape)
        if name == "backbone.conv0":  # torch's TorchScript exporter folds the BatchNorm after it (eval mode)
            bn = model.backbone.bn0
            kernels = kernels * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().reshape(-1, 1, 1, 1)
            assert any(a.shape == kernels.shape and np.allclose(a, kernels.numpy(), rtol=1e-5, atol=0) for a in floats)
        else:  # the codebook's kernels, exactly
            assert any(a.shape == kernels.shape and np.array_equal(a, kernels.numpy()) for a in floats), name
    result = verify_onnx(model, path, _all_digits(data))
    assert result.num_samples == 1797 and result.agreement >= 0.999, result
