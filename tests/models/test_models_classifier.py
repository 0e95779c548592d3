"""Tests of the ImageClassifier LightningModule."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant.datamodules import DigitsDataModule
from lightning_quant.models import ImageClassifier, LeNet5, resnet8

# Most tests fit on a training loader only.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def _fixed_batch(n: int = 32, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or len(x))


def test_loss_falls_on_fixed_batch() -> None:
    L.seed_everything(0)
    x, y = _fixed_batch()
    model = ImageClassifier(LeNet5(input_size=8), lr=1e-2)
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    _trainer(max_steps=5).fit(model, _loader(x, y))
    model.eval()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    assert after < 0.9 * before


def test_logged_metric_keys() -> None:
    L.seed_everything(0)
    x, y = _fixed_batch(16)
    model = ImageClassifier(resnet8(in_channels=1), lr=1e-3)
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, _loader(x, y, 8), _loader(x, y, 8))
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    trainer.test(model, _loader(x, y, 8), verbose=False)
    metrics = trainer.callback_metrics
    assert {"test/loss", "test/acc"} <= set(metrics)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    expected_acc = (logits.argmax(1) == y).float().mean().item()
    assert metrics["test/acc"].item() == pytest.approx(expected_acc)
    assert metrics["test/loss"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_predict_step_accepts_tensor_tuple_and_pair() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(LeNet5(input_size=8)).eval()
    x, y = _fixed_batch(5)
    expected = model(x).argmax(1)
    for batch in (x, (x,), [x], (x, y)):
        assert torch.equal(model.predict_step(batch, 0), expected)
    preds = _trainer().predict(model, DataLoader(TensorDataset(x), batch_size=5))
    assert torch.equal(preds[0], expected)


class _AddParameter(L.Callback):
    """Adds a parameter to the model in ``setup``, like a quantization callback does."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module.backbone, "extra_scale"):
            pl_module.backbone.extra_scale = nn.Parameter(torch.ones(1))


def test_optimizer_includes_parameters_added_in_setup() -> None:
    x, y = _fixed_batch(8)
    model = ImageClassifier(LeNet5(input_size=8), optimizer="sgd", lr=0.1, momentum=0.5, weight_decay=1e-4)
    trainer = _trainer(max_steps=1, callbacks=[_AddParameter()])
    trainer.fit(model, _loader(x, y))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.5 and optimizer.defaults["weight_decay"] == 1e-4
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.backbone.extra_scale) in params
    assert params == {id(p) for p in model.parameters()}


@pytest.mark.parametrize(
    ("trainer_kwargs", "t_max", "interval"),
    [({"max_epochs": 3}, 3, "epoch"), ({"max_steps": 4}, 4, "step")],
)
def test_cosine_schedule(trainer_kwargs: dict, t_max: int, interval: str) -> None:
    x, y = _fixed_batch(8)
    model = ImageClassifier(LeNet5(input_size=8), scheduler="cosine", lr=0.01)
    trainer = _trainer(**trainer_kwargs)
    trainer.fit(model, _loader(x, y))
    config = trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert config.scheduler.T_max == t_max and config.interval == interval
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.01


def test_cosine_without_bound_falls_back_to_constant(caplog: pytest.LogCaptureFixture) -> None:
    model = ImageClassifier(LeNet5(input_size=8), scheduler="cosine")
    model._trainer = type("T", (), {"max_epochs": -1, "max_steps": -1})()
    with caplog.at_level("WARNING"):
        result = model.configure_optimizers()
    assert isinstance(result, torch.optim.Adam)
    assert "constant learning rate" in caplog.text


def test_hyperparameters_exclude_backbone() -> None:
    model = ImageClassifier(LeNet5(), num_classes=10, lr=0.5, optimizer="sgd")
    assert "backbone" not in model.hparams
    assert model.hparams.lr == 0.5 and model.hparams.optimizer == "sgd"
    assert model.hparams.scheduler == "none"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, r"`lr` must be a positive number, got 0.0. Use e.g. lr=1e-3"),
        ({"lr": -1}, r"`lr` must be a positive number, got -1"),
        ({"num_classes": 1}, r"`num_classes` must be an integer >= 2, got 1"),
        ({"optimizer": "adamw"}, r"`optimizer` must be one of \('adam', 'sgd'\), got 'adamw'"),
        ({"weight_decay": -0.1}, r"`weight_decay` must be >= 0, got -0.1. Use 0.0 to disable it"),
        ({"momentum": 1.0}, r"`momentum` must be within \[0, 1\), got 1.0"),
        ({"scheduler": "step"}, r"`scheduler` must be one of \('none', 'cosine'\), got 'step'"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageClassifier(LeNet5(), **kwargs)


def test_weights_load_from_state_dicts_and_lightning_checkpoints(tmp_path) -> None:
    torch.manual_seed(0)
    trained = ImageClassifier(LeNet5(input_size=8))
    x = torch.randn(2, 1, 8, 8)
    expected = trained(x)
    torch.save(trained.state_dict(), tmp_path / "module.pt")
    torch.save(trained.backbone.state_dict(), tmp_path / "backbone.pt")
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "lightning.ckpt")
    for name in ("module.pt", "backbone.pt", "lightning.ckpt"):
        torch.manual_seed(1)  # a different initialisation, replaced by the file's weights
        model = ImageClassifier(LeNet5(input_size=8), weights=str(tmp_path / name))
        assert torch.equal(model(x), expected), name
        assert "weights" not in model.hparams
    with pytest.raises(FileNotFoundError, match=r"`weights` file '.*missing.pt' does not exist"):
        ImageClassifier(LeNet5(input_size=8), weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match=r"does not fit this model .*load_quantized"):
        ImageClassifier(resnet8(in_channels=1), weights=str(tmp_path / "module.pt"))


def test_backbone_must_be_module() -> None:
    with pytest.raises(TypeError, match=r"`backbone` must be a torch.nn.Module, got str"):
        ImageClassifier("resnet20")  # type: ignore[arg-type]


def test_learns_digits() -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    model = ImageClassifier(LeNet5(input_size=8), lr=1e-2)
    trainer = _trainer(max_epochs=3)
    trainer.fit(model, datamodule=dm)
    assert trainer.callback_metrics["val/acc"].item() > 0.8


def test_lightning_cli_yaml_backbone(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["lightning-quant"])  # the CLI reads only `args`, not pytest's argv
    monkeypatch.chdir(tmp_path)  # fit() saves the resolved config.yaml into the working directory
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n"
        "  backbone:\n"
        "    class_path: lightning_quant.models.CifarResNet\n"
        "    init_args: {depth: 8, in_channels: 1, width: 8}\n"
        "  lr: 0.05\n"
        "  optimizer: sgd\n"
        "  scheduler: cosine\n"
        "data:\n"
        "  batch_size: 32\n"
        "trainer:\n"
        "  accelerator: cpu\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        "  max_steps: 2\n"
    )
    cli = LightningCLI(
        ImageClassifier,
        DigitsDataModule,
        run=False,
        args=["--config", str(config)],
        save_config_kwargs={"overwrite": True},
    )
    assert isinstance(cli.model.backbone, nn.Module)
    assert cli.model.backbone.depth == 8 and cli.model.backbone.width == 8
    assert cli.model.hparams.lr == 0.05 and cli.model.hparams.optimizer == "sgd"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert "CifarResNet" in (tmp_path / "config.yaml").read_text()


def test_unlabeled_training_batches_give_a_zero_loss_and_warn_once(caplog) -> None:
    model = ImageClassifier(LeNet5(input_size=8))
    x = torch.randn(4, 1, 8, 8)
    with caplog.at_level("WARNING"):
        for batch in (x, (x,)):
            loss = model.training_step(batch, 0)
            assert loss.item() == 0.0 and loss.requires_grad  # the graph stays, for a callback's loss
    assert caplog.text.count("images only (no labels)") == 1
