"""Bad input, table-driven: every callback, ``quantize_model``, ``QuantSpec`` and the CLI refuse it clearly.

Each error is a ``QuantizationConfigError`` (or ``NonFiniteError`` for NaN/Inf in training) whose message names the
argument and the value; a refusal at ``setup`` leaves the user's model unchanged (state dict and module types).
The callbacks' rows live in :data:`BAD_ARGUMENTS`; a callback exported without rows fails
:func:`test_every_callback_has_bad_argument_rows`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import NonFiniteError, QuantizationConfigError, QuantSpec, quantize_model
from lightning_quant.callbacks import (
    AutoQBCallback,
    BitReallocationCallback,
    BlockReplacementCallback,
    DistillationCallback,
    IncrementalQuantizationCallback,
    KernelQuantizationCallback,
    OrthogonalMixedPrecision,
    QuantizationAwareTraining,
    QuantizedExport,
    ThresholdTuningCallback,
)
from lightning_quant.cli import main
from lightning_quant.surgery import is_quantized
from tests.callbacks.test_contract import (
    CHECKED,
    assert_unchanged,
    contract_for,
    snapshot,
    tiny_data,
    tiny_model,
    trainer,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast and does not contend


# (class, required arguments) and rows of (bad arguments, the value the message must show)
BAD_ARGUMENTS: dict[str, tuple[type, dict[str, Any], list[tuple[dict[str, Any], str]]]] = {
    "QuantizationAwareTraining": (QuantizationAwareTraining, {}, [
        ({"weight_bits": "four"}, "'four'"),
        ({"weight_bits": 9}, "9"),
        ({"act_bits": 1}, "1"),
        ({"num_calibration_batches": -1}, "-1"),
        ({"weight_granularity": "per_row"}, "'per_row'"),
        ({"binary_weights": True, "weight_bits": 4}, "4"),  # contradictory
        ({"include": ["x"], "spec": "not a spec"}, "str"),
        ({"on_nonfinite": "ignore"}, "'ignore'"),
    ]),
    "BitReallocationCallback": (BitReallocationCallback, {"avg_weight_bits": 4.0}, [
        ({"avg_weight_bits": "4"}, "'4'"),
        ({"avg_weight_bits": 12.0}, "12.0"),
        ({"every_n_steps": 0}, "0"),
        ({"solver": "magic"}, "'magic'"),
        ({"size_budget": 1000.0}, "1000.0"),  # contradictory: two budgets on the same quantity
        ({"bit_choices": [1, 4]}, "1"),
    ]),
    "BlockReplacementCallback": (BlockReplacementCallback, {}, [
        ({"blocks": ["only_one"]}, "['only_one']"),
        ({"temperature": 0}, "0"),
        ({"temperature": "hot"}, "'hot'"),
        ({"num_sampled": 0}, "0"),
        ({"seed": 1.5}, "1.5"),
    ]),
    "DistillationCallback": (DistillationCallback, {}, [
        ({"teacher": "fp"}, "'fp'"),
        ({"temperature": 0}, "0"),
        ({"weight": -1}, "-1"),
        ({"student_init": "random"}, "'random'"),
    ]),
    "ThresholdTuningCallback": (ThresholdTuningCallback, {}, [
        ({"bits": 1}, "1"),
        ({"num_calibration_batches": 0}, "0"),
        ({"calibration": "kl"}, "'kl'"),
        ({"lr": float("nan")}, "nan"),
        ({"restart_every": 0}, "0"),
    ]),
    "QuantizedExport": (QuantizedExport, {"path": "m.onnx"}, [
        ({"path": ""}, "''"),
        ({"num_batches": 0}, "0"),
        ({"min_agreement": 1.5}, "1.5"),
        ({"on_failure": "ignore"}, "'ignore'"),
        ({"dynamo": "yes"}, "'yes'"),
    ]),
    "IncrementalQuantizationCallback": (IncrementalQuantizationCallback, {}, [
        ({"bits": 9}, "9"),
        ({"bits": "4"}, "'4'"),
        ({"schedule": (0.5, 0.3, 1.0)}, "0.3"),  # contradictory: a fraction of frozen weights that shrinks
        ({"mode": "inq"}, "'inq'"),
        ({"epochs_per_stage": 0}, "0"),
    ]),
    "OrthogonalMixedPrecision": (OrthogonalMixedPrecision, {"avg_weight_bits": 5.0}, [
        ({"size_budget_mb": 0.05}, "0.05"),  # contradictory: two budgets
        ({"avg_weight_bits": 3.0}, "3.0"),
        ({"mode": "ptq"}, "5.0"),  # contradictory: PTQ's widths are 2..4 bits
        ({"beta": "high"}, "'high'"),
        ({"solver": "slsqp"}, "'slsqp'"),
    ]),
    "KernelQuantizationCallback": (KernelQuantizationCallback, {"index_bits": 3}, [
        ({"index_bits": 9}, "9"),
        ({"codebook_bits": 6.0}, "6.0"),
        ({"codebook": "global"}, "'global'"),
        ({"refit_every": 0}, "0"),
        ({"pointwise_bits": 4}, "4"),  # contradictory: no pointwise codebooks with pointwise="exclude"
    ]),
    "AutoQBCallback": (AutoQBCallback, {"size_budget": 1e4}, [
        ({"size_budget": -1.0}, "-1.0"),
        ({"bops_budget": "lots"}, "'lots'"),
        ({"episodes": 0}, "0"),
        ({"level": "kernel"}, "'kernel'"),
        ({"bit_choices": [0, 4]}, "0"),
        ({"level": "layer", "channels_per_unit": 4}, "4"),  # contradictory: layer level has no channel groups
    ]),
}  # fmt: skip

ROWS = [
    pytest.param(name, cls, {**base, **bad}, shown, id=f"{name}-{'-'.join(bad)}")
    for name, (cls, base, rows) in BAD_ARGUMENTS.items()
    for bad, shown in rows
]


@pytest.mark.parametrize("name", CHECKED)
def test_every_callback_has_bad_argument_rows(name: str) -> None:
    assert len(BAD_ARGUMENTS.get(name, (None, None, []))[2]) >= 3, (
        f"{name} needs rows in BAD_ARGUMENTS (tests/test_bad_input.py): wrong types, out-of-range values, "
        "contradictory options"
    )


@pytest.mark.parametrize(("name", "cls", "kwargs", "shown"), ROWS)
def test_bad_arguments_name_the_argument_and_the_value(name: str, cls: type, kwargs: dict, shown: str) -> None:
    with pytest.raises(QuantizationConfigError) as info:
        cls(**kwargs)
    message = str(info.value)
    named = [a for a in kwargs if f"`{a}" in message]
    assert named, f"{name}: the message names none of {list(kwargs)}: {message}"
    assert shown in message, f"{name}: the message does not show the value {shown}: {message}"


# -- quantize_model and QuantSpec -------------------------------------------------------------------------------
SPEC_ROWS = [
    ({"default": {"weight_bits": 9}}, r"`weight_bits` must be within \[2, 8\], got 9"),
    ({"default": {"weight_bits": "4"}}, r"`weight_bits` must be an integer .* got '4'"),
    ({"default": {"act_bits": 1.5}}, r"`act_bits` .* got 1\.5"),
    ({"default": {"frozen": "yes"}}, r"`frozen` must be True or False, got 'yes'"),
    ({"default": {"weight_granularity": "per_row"}}, r"`weight_granularity` must be one of .* got 'per_row'"),
    ({"default": {"weight_bits": [4, 2], "weight_granularity": "per_tensor"}}, r"per-channel widths need"),
    ({"defualt": {}}, r"Unknown keys \['defualt'\] in QuantSpec"),
    ({"include": [3]}, r"`include` must be a list of layer-name patterns .* got \[3\]"),
    ({"layers": ["conv"]}, r"`layers` must be a mapping .* got \['conv'\]"),
    ({"first_last_bits": 0}, r"`first_last_bits` must be within \[2, 8\], got 0"),
    ([1, 2], r"`QuantSpec` must be a mapping .* got \[1, 2\]"),
]


@pytest.mark.parametrize(("data", "match"), SPEC_ROWS)
def test_quant_spec_from_dict_and_yaml_refuse_bad_recipes(data: Any, match: str) -> None:
    with pytest.raises(QuantizationConfigError, match=match):
        QuantSpec.from_dict(data)
    with pytest.raises(QuantizationConfigError, match=match):
        QuantSpec.from_yaml(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("W4A4", r"`spec` must be a QuantSpec, got str"),
        ({"default": {}}, r"`spec` must be a QuantSpec, got dict"),
        (QuantSpec(include=("conv9*",)), r"`include` pattern 'conv9\*' matches no quantizable layer"),
        (QuantSpec.from_dict({"layers": {"nope": {"weight_bits": 4}}}), r"`layers` key 'nope' matches no"),
        (QuantSpec(exclude=("missing",)), r"`exclude` pattern 'missing' matches no"),
    ],
)
def test_quantize_model_refuses_and_leaves_the_model_alone(spec: Any, match: str) -> None:
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(QuantizationConfigError, match=match):
        quantize_model(model, spec)
    assert_unchanged(model, before)


# -- the CLI ----------------------------------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("weight_bits",), "four", "weight_bits"),  # a type error: the parser refuses it
        (("act_bits",), 99, "`act_bits` must be within [2, 8], got 99"),
        (("num_calibration_batches",), -3, "`num_calibration_batches` must be"),
        (("include",), ["backbone.nope"], "matches no quantizable layer"),
    ],
)
def test_cli_reports_bad_values_without_a_traceback(path, value, message, tmp_path, capsys) -> None:
    config = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    callback = config["trainer"]["callbacks"][0]
    assert callback["class_path"].endswith("QuantizationAwareTraining")
    callback["init_args"][path[0]] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(CONFIGS / "trainer.yaml"), "--config", str(bad)]
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", "--trainer.logger=false"]
    try:
        status = main(args)
    except SystemExit as exit_:  # jsonargparse's own type check
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2
    assert message in err, err[-2000:]
    assert "Traceback" not in err


# -- in a run: empty data, NaN/Inf, dtypes ----------------------------------------------------------------------
def _loader(x: torch.Tensor, batch: int = 8) -> DataLoader:
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, y), batch)


@pytest.mark.parametrize("name", CHECKED)
def test_empty_training_data_is_refused(name: str, tmp_path: Path) -> None:
    contract = contract_for(name)
    empty = _loader(torch.randn(0, 1, 6, 6))
    with pytest.raises(QuantizationConfigError, match=r"dataloader is empty.*HINT"):
        trainer(tmp_path, contract.callbacks(tmp_path), max_steps=2, **contract.trainer_kwargs).fit(
            tiny_model(), empty, tiny_data(n=8)
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", CHECKED)
def test_a_non_finite_batch_stops_the_run_naming_the_first_layer(name: str, bad: float, tmp_path: Path) -> None:
    contract = contract_for(name)
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    x[9, 0, 2, 2] = bad  # in the second batch
    model = tiny_model()
    t = trainer(tmp_path, contract.callbacks(tmp_path), max_steps=2, **contract.trainer_kwargs)
    with pytest.raises(NonFiniteError, match=r"Step 1: .*whose input or output is not finite is 'backbone\.0"):
        t.fit(model, _loader(x), tiny_data(n=8))
    weights = {k: v for k, v in model.state_dict().items() if k.endswith("weight")}
    assert all(torch.isfinite(v).all() for v in weights.values()), "trained on the non-finite batch"


def test_on_nonfinite_skip_drops_the_step_and_keeps_training(tmp_path: Path) -> None:
    x = torch.randn(24, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    x[9, 0, 2, 2] = float("nan")  # in the second of three batches
    model = tiny_model()
    qat = QuantizationAwareTraining(4, 4, num_calibration_batches=1, on_nonfinite="skip")
    seen: dict[str, torch.Tensor] = {}

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[str(batch_idx)] = pl_module.backbone[0].weight.detach().clone()

    with pytest.warns(UserWarning, match="the step is skipped"):
        trainer(tmp_path, [qat, Watch()], max_steps=3).fit(model, _loader(x))
    assert torch.equal(seen["1"], seen["0"]), "the skipped step changed the weights"
    assert not torch.equal(seen["2"], seen["1"]), "training did not go on after the skipped step"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_model_in_another_dtype_trains_or_is_refused_untouched(dtype: torch.dtype, tmp_path: Path) -> None:
    model = tiny_model().to(dtype)
    before = snapshot(model)
    x = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    t = trainer(tmp_path, [QuantizationAwareTraining(4, 4, num_calibration_batches=1)], max_steps=2)
    try:
        t.fit(model, _loader(x))
    except QuantizationConfigError as err:
        assert re.search(r"dtype|float", str(err)) and "HINT" in str(err), str(err)
        assert_unchanged(model, before)
        return
    assert is_quantized(model) and t.global_step == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
