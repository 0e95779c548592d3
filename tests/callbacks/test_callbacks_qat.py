"""QuantizationAwareTraining: attaches to any model unchanged, calibrates, freezes BN, checkpoints, resumes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    QuantizationAwareTraining,
    QuantizationConfigError,
    QuantSpec,
    load_quantized,
)
from lightning_quant.models import ImageClassifier, LeNet5, resnet8, resnet20
from lightning_quant.surgery import SPEC_KEY, quantize_model, quantized_layers, quantizers


def _loader(n: int = 32, channels: int = 3, size: int = 32, classes: int = 10, batch: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


class BranchAndShared(nn.Module):
    """User-style backbone: a branch that is added back and a layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch_a = nn.Conv2d(8, 8, 3, padding=1)
        self.branch_b = nn.Conv2d(8, 8, 1)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.branch_a(h)) + torch.relu(self.branch_b(h))
        h = h.mean(dim=(2, 3))
        return self.head(torch.relu(self.shared(torch.relu(self.shared(h)))))


@pytest.mark.parametrize(
    "make_backbone",
    [
        pytest.param(lambda: torchvision.models.resnet18(num_classes=10), id="resnet18"),
        pytest.param(lambda: torchvision.models.mobilenet_v2(num_classes=10), id="mobilenet_v2"),
        pytest.param(lambda: LeNet5(in_channels=3, input_size=32), id="lenet5"),
        pytest.param(lambda: resnet8(), id="resnet8"),
        pytest.param(lambda: resnet20(), id="resnet20"),
        pytest.param(BranchAndShared, id="branch_and_shared"),
    ],
)
def test_attaches_unchanged_to_any_model(make_backbone, trainer_kwargs) -> None:
    torch.manual_seed(0)
    backbone = make_backbone()
    model = ImageClassifier(backbone, lr=1e-3)
    float_convs = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in backbone.modules())
    losses = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    qat = QuantizationAwareTraining(weight_bits=4, act_bits=4, num_calibration_batches=1)
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[qat, Record()]))
    trainer.fit(model, _loader(n=16), _loader(n=8))
    assert len(quantized_layers(model)) == float_convs
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.callback_metrics["quant/qat/avg_weight_bits"] < 8


def test_quantizer_parameters_are_trained(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(LeNet5(in_channels=3, input_size=32), lr=1e-2)
    qat = QuantizationAwareTraining(4, 4, num_calibration_batches=1)
    trainer = L.Trainer(**trainer_kwargs(max_steps=4, callbacks=[qat]))
    trainer.fit(model, _loader())
    layer = quantized_layers(model)["backbone.conv2"]
    calibrated = layer.input_quantizer.scale.detach().clone()
    trainer = L.Trainer(**trainer_kwargs(max_steps=8, callbacks=[qat]))
    trainer.fit(model, _loader(seed=1))
    # after calibration LSQ learns the step: it moves by gradient, not by the observer
    assert not torch.equal(layer.input_quantizer.scale.detach(), calibrated)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("quantizer.scale"))


def test_calibration_then_frozen_ranges_in_observer_mode(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(LeNet5(in_channels=3, input_size=32))
    qat = QuantizationAwareTraining(8, 8, scale_mode="observer", num_calibration_batches=2)
    seen = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            q = quantized_layers(pl_module)["backbone.conv2"]
            seen.append((q.input_quantizer.observer.num_batches.item(), q.input_quantizer.scale.item()))

    trainer = L.Trainer(**trainer_kwargs(max_steps=4, callbacks=[qat, Watch()]))
    trainer.fit(model, _loader())
    assert [n for n, _ in seen] == [1, 2, 2, 2]  # observes two batches, then stops
    assert seen[1][1] == seen[2][1] == seen[3][1]
    assert qat.state_dict()["calibration_batches_seen"] == 2
    weight_q = quantized_layers(model)["backbone.conv2"].weight_quantizer
    assert weight_q.observing  # observer-mode weight ranges keep following the weights


def test_a_quantized_model_in_eval_mode_trains_like_one_in_train_mode(trainer_kwargs) -> None:
    # Lightning keeps each module's own train/eval mode at fit start, and observers update only in training mode: a
    # model quantized earlier (e.g. by `load_quantized`) and then evaluated must still calibrate and track its weights
    def fit(eval_mode: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = ImageClassifier(LeNet5(in_channels=3, input_size=32))  # no BatchNorm/Dropout: no other mode effect
        qat = QuantizationAwareTraining(8, 8, scale_mode="observer", num_calibration_batches=2)
        quantize_model(model, qat.spec)
        model.train(not eval_mode)
        L.Trainer(**trainer_kwargs(max_steps=4, callbacks=[qat])).fit(model, _loader())
        assert quantized_layers(model)["backbone.conv2"].input_quantizer.observer.num_batches.item() == 2
        return model.state_dict()

    in_train, in_eval = fit(eval_mode=False), fit(eval_mode=True)
    assert in_eval.keys() == in_train.keys()
    for key in in_train:
        torch.testing.assert_close(in_eval[key], in_train[key], atol=0, rtol=0, msg=key)


def test_bn_frozen_after_n_epochs(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(resnet8())
    qat = QuantizationAwareTraining(8, 8, freeze_bn_after_epochs=1, num_calibration_batches=1)
    stats = {}

    class Snapshot(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            stats[trainer.current_epoch] = pl_module.backbone.bn1.running_mean.clone()

    trainer = L.Trainer(**trainer_kwargs(max_epochs=3, limit_train_batches=2, callbacks=[qat, Snapshot()]))
    trainer.fit(model, _loader(), _loader(n=8))
    assert not torch.equal(stats[0], torch.zeros_like(stats[0]))
    torch.testing.assert_close(stats[1], stats[0], atol=0, rtol=0)  # frozen from epoch 1 on
    torch.testing.assert_close(stats[2], stats[0], atol=0, rtol=0)
    assert trainer.callback_metrics["quant/qat/bn_frozen"] == 1.0


def test_checkpoint_reloads_strictly_into_a_fresh_model(tmp_path, trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(resnet8())
    qat = QuantizationAwareTraining(4, 4, num_calibration_batches=1)
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[qat]))
    trainer.fit(model, _loader())
    path = tmp_path / "q.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert SPEC_KEY in checkpoint and qat.state_key in checkpoint["callbacks"]

    fresh = load_quantized(ImageClassifier(resnet8()), path)
    x = torch.randn(4, 3, 32, 32)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    # and through Lightning itself: validate a fresh model from the checkpoint
    again = ImageClassifier(resnet8())
    L.Trainer(**trainer_kwargs(callbacks=[QuantizationAwareTraining(4, 4)])).validate(
        again, _loader(n=8), ckpt_path=path
    )
    torch.testing.assert_close(again.eval()(x), model(x), atol=0, rtol=0)


def test_validate_test_predict_after_fit_do_not_change_the_model(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(LeNet5(in_channels=3, input_size=32))
    qat = QuantizationAwareTraining(4, 4, num_calibration_batches=2)
    trainer = L.Trainer(**trainer_kwargs(max_steps=3, callbacks=[qat]))
    trainer.fit(model, _loader())
    modules = {n: id(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.validate(model, _loader(n=8))
    trainer.test(model, _loader(n=8))
    preds = trainer.predict(model, _loader(n=8))
    assert sum(p.numel() for p in preds) == 8
    assert {n: id(m) for n, m in model.named_modules()} == modules
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 0}, r"`weight_bits` must be within \[2, 8\], got 0"),
        ({"weight_bits": 1}, r"`weight_bits` must be within \[2, 8\], got 1\. HINT: for binary weights pass"),
        ({"weight_bits": 9}, r"`weight_bits` must be within \[2, 8\], got 9"),
        ({"weight_bits": 3.5}, r"`weight_bits` must be an integer number of bits in \[2, 8\], got 3.5"),
        ({"weight_bits": "four"}, r"`weight_bits` must be an integer number of bits in \[2, 8\], got 'four'"),
        ({"act_bits": 16}, r"`act_bits` must be within \[2, 8\], got 16"),
        ({"weight_granularity": "per_block"}, r"`weight_granularity` must be one of \['per_channel', 'per_tensor'\]"),
        ({"binary_weights": True, "weight_bits": 4}, r"`binary_weights=True` quantizes weights to 1 bit"),
        (
            {"num_calibration_batches": -1},
            r"`num_calibration_batches` must be an integer >= 0, got -1\. HINT: pass e\.g\. `num_calibration",
        ),
        ({"exclude_types": ["LayerNorm"]}, r"`exclude_types` must be one of"),
    ],
)
def test_bad_arguments_fail_fast(kwargs, match) -> None:
    with pytest.raises(QuantizationConfigError, match=match):
        QuantizationAwareTraining(**kwargs)


def test_model_errors_before_the_model_is_touched(trainer_kwargs) -> None:
    model = ImageClassifier(LeNet5())
    modules = {n: id(m) for n, m in model.named_modules()}
    trainer = L.Trainer(
        **trainer_kwargs(max_steps=1, callbacks=[QuantizationAwareTraining(include=["backbone.conv9"])])
    )
    with pytest.raises(QuantizationConfigError, match=r"`include` pattern 'backbone.conv9' matches no quantizable"):
        trainer.fit(model, _loader(channels=1, size=28))
    assert {n: id(m) for n, m in model.named_modules()} == modules

    class NoLayers(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    trainer = L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[QuantizationAwareTraining()]))
    with pytest.raises(QuantizationConfigError, match="has no layer that can be quantized"):
        trainer.fit(ImageClassifier(NoLayers()), _loader())


def test_binary_weights_train(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(LeNet5(in_channels=3, input_size=32), lr=1e-2)
    qat = QuantizationAwareTraining(1, 8, binary_weights=True, num_calibration_batches=1)
    L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[qat])).fit(model, _loader())
    layer = quantized_layers(model)["backbone.conv2"]
    w = layer.quantized_weight().detach()
    assert all(row.abs().unique().numel() == 1 for row in w.flatten(1))  # ±scale per output channel


def test_two_instances_have_distinct_state_keys() -> None:
    assert QuantizationAwareTraining(4, 4).state_key != QuantizationAwareTraining(8, 8).state_key


def test_spec_argument_and_quantizer_count(trainer_kwargs) -> None:
    spec = QuantSpec.from_yaml("default: {weight_bits: 3, act_bits: null}\nexclude: ['backbone.fc*']\n")
    model = ImageClassifier(LeNet5())
    L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[QuantizationAwareTraining(spec=spec)])).fit(
        model, _loader(channels=1, size=28)
    )
    assert set(quantized_layers(model)) == {"backbone.conv1", "backbone.conv2"}
    assert len(quantizers(model)) == 2  # weights only: act_bits null


class SaveRankState(Callback):
    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("scale_mode", ["lsq", "observer"])
def test_ddp_two_processes_share_ranges_from_all_ranks(scale_mode, tmp_path, trainer_kwargs) -> None:
    """Observers reduce across ranks: rank 1 alone sees an outlier, and both ranks' ranges include it.

    In LSQ mode every learned step takes part in every step (calibration included), as DDP's reducer requires.
    """
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    x[1, 0, 0, 0] = 100.0  # index 1 goes to rank 1 under the DistributedSampler
    data = DataLoader(TensorDataset(x, torch.randint(0, 10, (16,))), batch_size=4)
    model = ImageClassifier(LeNet5(in_channels=3, input_size=32))
    qat = QuantizationAwareTraining(8, 8, scale_mode=scale_mode, act_observer="minmax", num_calibration_batches=2)
    trainer = L.Trainer(
        **trainer_kwargs(devices=2, strategy="ddp_spawn", max_steps=3, callbacks=[qat, SaveRankState(tmp_path)])
    )
    trainer.fit(model, data)
    state0 = torch.load(tmp_path / "rank0.pt")
    state1 = torch.load(tmp_path / "rank1.pt")
    for key in state0:
        torch.testing.assert_close(state1[key], state0[key], atol=0, rtol=0, msg=key)
    assert state0["backbone.conv1.input_quantizer.observer.max_val"].item() == 100.0


# -- frozen layers and Lightning's BaseFinetuning -------------------------------------------------------------------
class TransferModel(L.LightningModule):
    """The shape of Lightning's transfer-learning example: a frozen backbone, a head, an optimizer on trainables."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-2)


class UnfreezeAt(BaseFinetuning):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.backbone, train_bn=False)  # all frozen, so none is in the optimizer twice

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == self.epoch:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer)


class StepSizes(Callback):
    """Per epoch: for every quantizer parameter of the backbone, (requires_grad, has a gradient, in the optimizer)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, tuple[bool, bool, bool]]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.epochs.append(
            {
                name: (p.requires_grad, p.grad is not None and bool(p.grad.abs().sum() > 0), id(p) in in_optimizer)
                for name, p in pl_module.backbone.named_parameters()
                if "quantizer" in name
            }
        )


@pytest.mark.parametrize("finetuning_first", [True, False])
def test_step_sizes_of_a_frozen_backbone_follow_base_finetuning(finetuning_first, trainer_kwargs, recwarn) -> None:
    torch.manual_seed(0)
    model = TransferModel()
    qat, finetuning, probe = QuantizationAwareTraining(num_calibration_batches=1), UnfreezeAt(1), StepSizes()
    callbacks = [finetuning, qat, probe] if finetuning_first else [qat, finetuning, probe]
    L.Trainer(**trainer_kwargs(max_epochs=2, callbacks=callbacks)).fit(model, _loader(n=16, size=8))
    frozen, unfrozen = probe.epochs
    assert len(frozen) == 4  # weight and input step sizes of the two convolutions
    assert all(state == (False, False, False) for state in frozen.values()), frozen
    assert all(state == (True, True, True) for state in unfrozen.values()), unfrozen
    # the head's step sizes trained all along
    assert all(p.requires_grad for n, p in model.head.named_parameters())
    assert not [w for w in recwarn if "already exist within another group" in str(w.message)]


def test_quantizers_of_layers_frozen_by_the_user_are_frozen() -> None:
    from lightning_quant import quantize_model

    model = TransferModel()
    model.backbone.requires_grad_(False)
    quantize_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "quantizer" in n}
    assert trainable == {"head.2.weight_quantizer.scale", "head.2.input_quantizer.scale"}


def test_every_quantizer_of_frozen_sequence_layers_is_frozen() -> None:
    """Recurrent layers carry one quantizer per weight matrix and attention a quantized output projection: all of
    them follow the frozen layer."""
    backbone = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 8),
            "attn": nn.MultiheadAttention(8, 2, batch_first=True),
            "lstm": nn.LSTM(8, 8, num_layers=2, batch_first=True),
        }
    )
    model = nn.ModuleDict({"backbone": backbone, "head": nn.Linear(8, 2)})
    backbone.requires_grad_(False)
    quantize_model(model, QuantSpec(first_last_bits=None))
    added = {n: p for n, p in model.named_parameters() if "quantizer" in n}
    assert any(".weight_quantizers." in n for n in added) and any("attn.out_proj." in n for n in added)
    trainable = {n for n, p in added.items() if p.requires_grad}
    assert trainable == {"head.weight_quantizer.scale", "head.input_quantizer.scale"}


# -- reloading a quantized checkpoint the Lightning way -------------------------------------------------------------
class LitClassifier(L.LightningModule):
    """Saves its hyper-parameters, as Lightning's examples do, so `load_from_checkpoint(path)` can rebuild it."""

    def __init__(self, hidden: int = 16, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_load_quantized_mirrors_load_from_checkpoint(tmp_path, trainer_kwargs, recwarn) -> None:
    torch.manual_seed(0)
    model = LitClassifier(hidden=12)
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[QuantizationAwareTraining(4, 4)]))
    trainer.fit(model, _loader(size=8))
    path = tmp_path / "q.ckpt"
    trainer.save_checkpoint(path)
    # what users see from Lightning alone (quoted in the README)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "net\.1\.weight_quantizer\.scale"'):
        LitClassifier.load_from_checkpoint(path)
    x = torch.randn(4, 3, 8, 8)
    reference = model.eval()(x)
    restored = load_quantized(LitClassifier, path)
    assert restored.hparams.hidden == 12  # built from the saved hyper-parameters
    torch.testing.assert_close(restored.eval()(x), reference, atol=0, rtol=0)
    assert not [w for w in recwarn if "Found keys" in str(w.message)]
    # keywords override saved hyper-parameters, as in load_from_checkpoint; other classes are built from them
    assert load_quantized(LitClassifier, path, lr=0.5).hparams.lr == 0.5
    classifier_path = tmp_path / "c.ckpt"
    torch.manual_seed(0)
    classifier = ImageClassifier(LeNet5(in_channels=3, input_size=8))
    trainer = L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[QuantizationAwareTraining(4, 4)]))
    trainer.fit(classifier, _loader(size=8))
    trainer.save_checkpoint(classifier_path)
    again = load_quantized(ImageClassifier, classifier_path, backbone=LeNet5(in_channels=3, input_size=8))
    torch.testing.assert_close(again.eval()(x), classifier.eval()(x), atol=0, rtol=0)
    with pytest.raises(QuantizationConfigError, match=r"keyword arguments \['hidden'\] with an already built"):
        load_quantized(LitClassifier(), path, hidden=3)
