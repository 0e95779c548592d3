"""QuantizedExport: export + verify at the end of fit, logged figures, failure modes, argument checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loggers import Logger

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
    with pytest.warns(UserWarning, match=r"6 of 9 convolutions run in float.*quantize_residuals=True"):
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
