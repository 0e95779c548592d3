"""QuantizedExport: export + verify at the end of fit, logged figures, failure modes, argument checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant.callbacks.export import ExportVerificationError, QuantizedExport
from lightning_quant.callbacks.qat import QuantizationAwareTraining
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.datamodules import DigitsDataModule
from lightning_quant.models import ImageClassifier, LeNet5, resnet8


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)


def _fit(tmp_path: Path, trainer_kwargs, export: QuantizedExport, net=None, **qat: Any) -> RecordingLogger:
    L.seed_everything(0)
    logger = RecordingLogger()
    model = ImageClassifier(net or LeNet5(input_size=8), lr=3e-3)
    trainer = L.Trainer(
        **trainer_kwargs(max_epochs=2, limit_val_batches=2, logger=logger),
        callbacks=[QuantizationAwareTraining(num_calibration_batches=2, scale_mode="observer", **qat), export],
    )
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return logger


def test_exports_verifies_and_logs(tmp_path: Path, trainer_kwargs) -> None:
    export = QuantizedExport(tmp_path / "out" / "model.onnx", num_batches=2)
    logger = _fit(tmp_path, trainer_kwargs, export)
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert export.result is not None and export.result.agreement >= 0.99
    for key in ("agreement", "max_abs_diff", "int8_convs", "onnx_accuracy", "torch_accuracy", "file_kib"):
        assert f"quant/export/{key}" in logger.metrics
    assert logger.metrics["quant/export/int8_convs"] == 2


def test_warns_when_convolutions_fall_back_to_float(tmp_path: Path, trainer_kwargs) -> None:
    # a 2-epoch width-4 model has near-tied logits, so agreement is checked loosely here (tight in tests/export)
    export = QuantizedExport(tmp_path / "plain.onnx", num_batches=1, min_agreement=0.9)
    with pytest.warns(
        UserWarning,
        match=r"6 of 9 convolutions run in float.*: no quantizer follows its output.*quantize_residuals=True",
    ):
        _fit(tmp_path, trainer_kwargs, export, resnet8(in_channels=1, width=4))
    # the deployment recipe: every convolution in int8, no warning
    export = QuantizedExport(tmp_path / "residual.onnx", num_batches=1, min_agreement=0.9)
    logger = _fit(tmp_path, trainer_kwargs, export, resnet8(in_channels=1, width=4), quantize_residuals=True)
    assert logger.metrics["quant/export/int8_convs"] == 9 and logger.metrics["quant/export/float_convs"] == 0
    assert export.result.agreement >= 0.9


def test_int4_weight_storage_is_passed_through(tmp_path: Path, trainer_kwargs) -> None:
    import onnx

    export = QuantizedExport(tmp_path / "w4.onnx", num_batches=2, weight_storage="auto")
    logger = _fit(tmp_path, trainer_kwargs, export, weight_bits=4, act_bits=8)
    model = onnx.load(tmp_path / "w4.onnx")
    assert model.opset_import[0].version == 21
    inits = {i.name: i.data_type for i in model.graph.initializer}
    weights = {
        n.input[0]: inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }
    # the first and last layers keep 8-bit weights (QAT's default `first_last_bits`), the rest are INT4
    assert (
        weights.pop("backbone.conv1.weight_quantized")
        == weights.pop("backbone.fc3.weight_quantized")
        == onnx.TensorProto.INT8
    )
    assert set(weights.values()) == {onnx.TensorProto.INT4} and len(weights) == 3
    assert export.result.agreement >= 0.99
    assert 0 < logger.metrics["quant/export/packed_kib"] < 4 * logger.metrics["quant/export/file_kib"]


def test_failure_modes(tmp_path: Path, trainer_kwargs, caplog) -> None:
    with pytest.raises(ExportVerificationError, match=r"agrees with the PyTorch model on .* below `min_agreement=1.01"):
        export = QuantizedExport(tmp_path / "a.onnx", num_batches=1)
        export.min_agreement = 1.01  # impossible on purpose
        _fit(tmp_path, trainer_kwargs, export)
    export = QuantizedExport(tmp_path / "b.onnx", num_batches=1, on_failure="warn")
    export.min_agreement = 1.01
    _fit(tmp_path, trainer_kwargs, export)
    assert "below `min_agreement=1.01`" in caplog.text


def test_existing_file_fails_before_training(tmp_path: Path, trainer_kwargs) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(QuantizationConfigError, match=r"already exists\. HINT: pass `overwrite=True`"):
        _fit(tmp_path, trainer_kwargs, QuantizedExport(tmp_path / "m.onnx"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_batches": 0}, r"`num_batches` must be a positive integer or None, got 0"),
        ({"min_agreement": 1.5}, r"`min_agreement` must be within \[0, 1\], got 1.5"),
        ({"on_failure": "ignore"}, r"`on_failure` must be one of \['error', 'warn'\], got 'ignore'"),
        ({"weight_storage": "int2"}, r"`weight_storage` must be one of \['int8', 'int4', 'auto'\], got 'int2'"),
        ({"prefer": "small"}, r"`prefer` must be one of \['size', 'speed'\], got 'small'"),
        ({"opset": 11}, r"`opset` must be an integer >= 13 or None, got 11"),
    ],
)
def test_argument_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(QuantizationConfigError, match=message):
        QuantizedExport("m.onnx", **kwargs)


def test_state_key_and_state() -> None:
    a, b = QuantizedExport("a.onnx"), QuantizedExport("b.onnx")
    assert a.state_key != b.state_key
    a.load_state({"exported": True})
    assert a.state() == {"exported": True}


# -- the models users bring: their own inputs, attention, one logit -------------------------------------------------
class AutoEncoder(L.LightningModule):
    """The shape of Lightning's autoencoder example: forward takes flattened images; the data yields images."""

    def __init__(self, example: bool = True) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 64))
        if example:
            self.example_input_array = torch.rand(1, 64)
        self.steps = 0

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x = batch[0].view(batch[0].size(0), -1)
        return F.mse_loss(self(x), x)

    def validation_step(self, batch, batch_idx):
        x = batch[0].view(batch[0].size(0), -1)
        self.log("val_loss", F.mse_loss(self(x), x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _fit_module(trainer_kwargs, module, export, data=None, max_epochs=1, **qat):
    L.seed_everything(0)
    callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=2, **qat), export]
    trainer = L.Trainer(**trainer_kwargs(max_epochs=max_epochs, limit_train_batches=4, callbacks=callbacks))
    trainer.fit(module, datamodule=data or DigitsDataModule(batch_size=32))
    return module


def test_autoencoder_exports_from_its_example_input_array(tmp_path: Path, trainer_kwargs) -> None:
    export = QuantizedExport(tmp_path / "ae.onnx")
    _fit_module(trainer_kwargs, AutoEncoder(), export)
    result = export.result
    assert result is not None and result.task == "regression" and result.agreement is None
    assert result.relative_error < 1e-4


def test_an_input_the_module_cannot_take_fails_at_setup(tmp_path: Path, trainer_kwargs) -> None:
    module = AutoEncoder(example=False)
    with pytest.raises(
        QuantizationConfigError,
        match=r"AutoEncoder cannot be called on the export input, the first element of the first validation batch "
        r"\(\(32, 1, 8, 8\) torch\.float32\): RuntimeError.*set `self\.example_input_array`",
    ):
        _fit_module(trainer_kwargs, module, QuantizedExport(tmp_path / "ae.onnx"))
    assert module.steps == 0
    # an explicit example is used (and tried) instead
    export = QuantizedExport(tmp_path / "ae.onnx", example_input=torch.rand(4, 64))
    _fit_module(trainer_kwargs, AutoEncoder(example=False), export)
    assert export.result is not None and export.result.relative_error < 1e-4


class NoForward(L.LightningModule):
    """A module that calls its network in training_step and has no forward (like Lightning's language model demo)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = LeNet5(input_size=8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_a_module_without_forward_exports_its_network(tmp_path: Path, trainer_kwargs) -> None:
    module = NoForward()
    with pytest.raises(QuantizationConfigError, match=r"NoForward has no `forward` of its own.*module=<name>.*'model'"):
        _fit_module(trainer_kwargs, module, QuantizedExport(tmp_path / "lm.onnx"))
    export = QuantizedExport(tmp_path / "lm.onnx", module="model", min_agreement=0.9)
    _fit_module(trainer_kwargs, NoForward(), export)
    assert export.result is not None and export.result.task == "multiclass"


class ViTClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from tests.export.test_export_models import TinyViT

        self.net = TinyViT(classes=10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_attention_model_is_verified_on_validation_batches_of_any_size(tmp_path: Path, trainer_kwargs) -> None:
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    val = DataLoader(torch.utils.data.Subset(data.val_dataset, range(35)), batch_size=16)  # 16, 16 and 3
    export = QuantizedExport(tmp_path / "vit.onnx", num_batches=None, min_agreement=0.9)
    L.seed_everything(0)
    callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=2), export]
    trainer = L.Trainer(**trainer_kwargs(max_epochs=1, limit_train_batches=4, callbacks=callbacks))
    trainer.fit(ViTClassifier(), data.train_dataloader(), val)
    assert export.result is not None and export.result.num_samples == 35
    assert export.result.relative_error < 0.05


class OneLogit(L.LightningModule):
    """A binary classifier with one logit, whose exported file returns the negated logit."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x):
        out = self.fc2(F.relu(self.fc1(x.flatten(1)))).squeeze(1)
        return -out if torch.onnx.is_in_onnx_export() else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), (y % 2).float())

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_min_agreement_fires_for_a_one_logit_classifier_whose_file_disagrees(tmp_path: Path, trainer_kwargs) -> None:
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    images, labels = zip(*data.val_dataloader(), strict=True)
    odd_even = DataLoader(TensorDataset(torch.cat(images), torch.cat(labels) % 2), batch_size=32)  # 0/1: binary
    L.seed_everything(0)
    export = QuantizedExport(tmp_path / "one.onnx", num_batches=2)
    callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=2), export]
    trainer = L.Trainer(**trainer_kwargs(max_epochs=1, limit_train_batches=4, callbacks=callbacks))
    with pytest.raises(ExportVerificationError, match=r"sign agreement \(one logit\)\), below `min_agreement=0.999`"):
        trainer.fit(OneLogit(), data.train_dataloader(), odd_even)
    assert export.result is not None and export.result.agreement < 0.1
