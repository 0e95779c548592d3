"""BlockReplacementCallback: mixed LP-prefix / FP-suffix models, frozen FP copy, gradients, DDP, AMP, resume, errors."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    BlockReplacementCallback,
    QuantizationAwareTraining,
    QuantizationConfigError,
    QuantizationLossMixin,
)
from lightning_quant.models import ImageClassifier, resnet8
from lightning_quant.surgery import is_quantized, quantized_layers
from tests.conftest import shipped_config


def _loader(n: int = 32, channels: int = 3, size: int = 16, batch: int = 8, seed: int = 0, labels: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    tensors = (x, torch.randint(0, 10, (n,), generator=g)) if labels else (x,)
    return DataLoader(TensorDataset(*tensors), batch_size=batch)


def _plain() -> nn.Sequential:
    """A plain sequence: blocks "auto" = its children 0, 2, 6 (the ones with a layer)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


BLOCKS = ["backbone.0", "backbone.2", "backbone.6"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one thread is as fast, and does not crawl when the 2 CPUs are shared with other runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GradsAt(Callback):
    """Keeps a copy of every gradient of the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor | None] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grads:
            self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()}


def test_mixed_models_are_lp_prefix_then_fp_suffix(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(_plain())
    br = BlockReplacementCallback()
    seen: dict[str, object] = {}

    class Probe(Callback):
        """Records, in step 1, what ran in F and with which inputs, and recomputes the mixed models by hand."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx != 1:
                return
            fp = br.fp_model
            self.batch = batch
            self.calls: list[tuple[str, torch.Tensor]] = []
            self.outputs: list[torch.Tensor] = []
            self.handles = [
                fp.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: self.calls.append((n, a[0])))
                for n in ("backbone.0", "backbone.1", "backbone.2", "backbone.3", "backbone.6")
            ]
            self.handles.append(fp.register_forward_hook(lambda m, a, out: self.outputs.append(out.detach())))
            self.q_out = {}
            for name in BLOCKS:
                module = pl_module.get_submodule(name)
                self.handles.append(
                    module.register_forward_hook(lambda m, a, out, name=name: self.q_out.update({name: out}))
                )

        def on_before_backward(self, trainer, pl_module, loss):  # after BR's (callback order)
            if not hasattr(self, "handles") or seen:
                return
            for h in self.handles:
                h.remove()
            x = self.batch[0]
            fp, q = br.fp_model.backbone, pl_module.backbone
            with torch.no_grad():
                seen["expected"] = [fp(x), fp[2:](q[:2](x)), fp[6:](q[:6](x))]  # F, M_1, M_2
            seen["outputs"] = self.outputs
            seen["calls"] = [(n, t.detach()) for n, t in self.calls]
            seen["q_out"] = {k: v.detach() for k, v in self.q_out.items()}

    qat = QuantizationAwareTraining(4, 4, num_calibration_batches=1)
    L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[qat, br, Probe()])).fit(model, _loader())
    assert br.block_names == BLOCKS and br.root_name == ""
    # F ran once (logits), then M_1 and M_2: the same numbers as LP prefix -> FP suffix by hand
    assert len(seen["outputs"]) == 3
    for got, want in zip(seen["outputs"], seen["expected"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen["outputs"][1], seen["outputs"][0])  # the LP prefix changes the logits
    # which FP modules ran: F's first block only for F itself; F's block 2 for F and M_1; the head for all three
    names = [n for n, _ in seen["calls"]]
    assert names.count("backbone.0") == 1 and names.count("backbone.2") == 2 and names.count("backbone.6") == 3
    # ... and with which inputs: in M_1 F's suffix starts from Q_1's output, in M_2 from Q_2's
    relu_inputs = [t for n, t in seen["calls"] if n == "backbone.1"]
    assert torch.equal(relu_inputs[1], seen["q_out"]["backbone.0"])
    relu2_inputs = [t for n, t in seen["calls"] if n == "backbone.3"]
    assert torch.equal(relu2_inputs[2], seen["q_out"]["backbone.2"])


@pytest.mark.parametrize("order", ["qat_then_br", "br_then_qat", "br_alone"])
def test_fp_copy_is_the_float_model_and_never_changes(order, trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(resnet8())
    original = copy.deepcopy(model.backbone.state_dict())
    br = BlockReplacementCallback()
    qat = QuantizationAwareTraining(4, 4, num_calibration_batches=1)
    callbacks = {"qat_then_br": [qat, br], "br_then_qat": [br, qat], "br_alone": [br]}[order]
    snapshot = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot.update({k: v.clone() for k, v in br.fp_model.state_dict().items()})

    L.Trainer(**trainer_kwargs(max_steps=3, callbacks=[*callbacks, Snapshot()])).fit(model, _loader())
    fp = br.fp_model
    assert is_quantized(model) and not is_quantized(fp)
    if order == "br_alone":  # quantized with the defaults: W8A8
        assert {layer.weight_quantizer.bits for layer in quantized_layers(model).values()} == {8}
    for key, value in original.items():  # F is the float model the user passed, whatever the order
        torch.testing.assert_close(fp.backbone.state_dict()[key], value, atol=0, rtol=0, msg=key)
    for key, value in fp.state_dict().items():  # ... and training did not change it
        torch.testing.assert_close(value, snapshot[key], atol=0, rtol=0, msg=key)
    assert not fp.training and not any(p.requires_grad for p in fp.parameters())
    fp_ids = {id(p) for p in fp.parameters()}
    assert not fp_ids & {id(p) for p in model.parameters()}  # not in the optimizer, not in the model
    assert not any(torch.equal(model.backbone.conv1.weight, p) for p in fp.parameters())  # the model trained
    assert torch.isfinite(model.trainer.callback_metrics["quant/br/loss"])


class ZeroTaskLoss(ImageClassifier):
    """The user's loss is switched off: every gradient comes from the callback's terms."""

    def training_step(self, batch, batch_idx):
        return 0.0 * super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("weights", "reached"), [([1.0, 0.0], 1), ([0.0, 1.0], 2)])
def test_gradients_reach_the_lp_blocks_through_the_fp_suffix(weights, reached, trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ZeroTaskLoss(_plain())
    grads = GradsAt()
    br = BlockReplacementCallback(weights=weights, lp_kd_weight=0.0)  # only M_1 (or only M_2) is in the loss
    qat = QuantizationAwareTraining(4, 4, num_calibration_batches=0)
    L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[qat, br, grads])).fit(model, _loader())
    for k, name in enumerate(BLOCKS, start=1):
        grad = grads.grads[f"{name}.weight"]
        if k <= reached:  # Q_1..Q_i: from M_i's loss, through F_{i+1}..F_n
            assert grad is not None and grad.abs().sum() > 0, name
        else:  # the later LP blocks are not in M_i
            assert grad is None or grad.abs().sum() == 0, name
    assert all(p.grad is None for p in br.fp_model.parameters())


def test_one_backward_per_step_with_accumulation(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(_plain())
    backwards = []
    model.backbone[0].weight.register_hook(lambda g: backwards.append(1))
    callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=1), BlockReplacementCallback()]
    L.Trainer(**trainer_kwargs(max_steps=2, accumulate_grad_batches=2, callbacks=callbacks)).fit(model, _loader())
    assert len(backwards) == 4  # one per micro-batch, the mixed models included


def test_mixin_module_adds_the_term_itself(trainer_kwargs) -> None:
    class Mixin(QuantizationLossMixin, ImageClassifier):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.quantization_loss(batch)

    torch.manual_seed(0)
    model = Mixin(_plain())
    callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=1), BlockReplacementCallback()]
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=callbacks))
    trainer.fit(model, _loader())
    assert torch.isfinite(trainer.callback_metrics["quant/br/kd_mixed"])


def test_torchvision_resnet18_auto_blocks(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(torchvision.models.resnet18(num_classes=10))
    br = BlockReplacementCallback(mixed_ce_weight=0.5, num_sampled=2)
    trainer = L.Trainer(
        **trainer_kwargs(max_steps=2, callbacks=[QuantizationAwareTraining(4, 4, num_calibration_batches=1), br])
    )
    trainer.fit(model, _loader(n=8, size=32, batch=4))
    assert br.block_names == [f"backbone.layer{k}" for k in range(1, 5)]
    assert br.mixed_weights() == [0.125, 0.25, 0.5]
    metrics = trainer.callback_metrics
    assert metrics["quant/br/num_mixed"] == 2
    for key in ("kd_lp", "kd_mixed", "ce_mixed", "loss", "overhead"):
        assert torch.isfinite(metrics[f"quant/br/{key}"]), key
    assert 0 < metrics["quant/br/overhead"] < 1


def test_bf16_mixed_precision(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(resnet8())
    callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=1), BlockReplacementCallback()]
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, precision="bf16-mixed", callbacks=callbacks))
    trainer.fit(model, _loader())
    assert all(torch.isfinite(trainer.callback_metrics[f"quant/br/{k}"]) for k in ("kd_lp", "kd_mixed", "loss"))


class SaveRankState(Callback):
    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), self.folder / f"rank{trainer.global_rank}.pt")
        torch.save(trainer.callback_metrics["quant/br/loss"], self.folder / f"loss{trainer.global_rank}.pt")


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _plain()
        self.unused = nn.Linear(10, 10)

    def forward(self, x):
        return self.body(x)


class NoLayers(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]


@pytest.mark.parametrize(
    ("make", "kwargs", "match"),
    [
        (
            _plain,
            {"blocks": ["backbone.0", "backbone.9"]},
            r"`blocks` names modules that do not exist: \['backbone.9'\]",
        ),
        (_plain, {"blocks": ["backbone.6", "backbone.2", "backbone.0"]}, r"`blocks` are out of order: the forward"),
        (WithUnused, {"blocks": ["backbone.body.0", "backbone.unused"]}, r"'backbone.unused' was never called"),
        (
            resnet8,
            {"blocks": ["backbone.layer1.0.conv1", "backbone.layer1.0.conv2", "backbone.layer2"]},
            r"cannot be cut after block 'backbone.layer1.0.conv1'.*bypasses",
        ),
        (
            resnet8,
            {"blocks": ["backbone.layer1", "backbone.layer1.0"]},
            r"'backbone.layer1' contains 'backbone.layer1.0'",
        ),
        (resnet8, {"weights": [1.0]}, r"`weights` must give one weight per mixed model, n - 1 = 2"),
        (resnet8, {"num_sampled": 3}, r"`num_sampled` must be at most n - 1 = 2"),
        (NoLayers, {}, r"has no layer that can be quantized"),
    ],
)
def test_model_errors_before_the_first_update(make, kwargs, match, trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(make())
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=1), BlockReplacementCallback(**kwargs)]
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=callbacks))
    with pytest.raises(QuantizationConfigError, match=match):
        trainer.fit(model, _loader())
    params = dict(model.named_parameters())
    for key, value in before.items():  # no optimizer step was taken
        torch.testing.assert_close(params[key].detach(), value, atol=0, rtol=0, msg=key)


class CallsForward(L.LightningModule):
    """Its layers are its own children (the blocks), and training_step calls `self.forward(x)`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.forward(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_step_calling_self_forward_is_told_why_and_what_to_do(trainer_kwargs) -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[BlockReplacementCallback()]))
    with pytest.raises(
        QuantizationConfigError,
        match=r"although the blocks were\. The LightningModule itself was not called, so training_step probably calls "
        r"`self\.forward\(x\)`: .* PyTorch runs a module's hooks only when the module is called .*never on "
        r"`self\.forward\(x\)`\. HINT: write `logits = self\(x\)`",
    ):
        trainer.fit(CallsForward(), _loader())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": "layer1"}, r'`blocks` must be "auto" or a list of module names, got \'layer1\''),
        ({"blocks": ["layer1"]}, r"`blocks` must be \"auto\" or a list of at least two module names"),
        ({"temperature": 0.0}, r"`temperature` must be a finite number > 0, got 0.0"),
        ({"weights": [1.0, -1.0]}, r"`weights` must be a finite number >= 0, got -1.0"),
        ({"lp_kd_weight": float("nan")}, r"`lp_kd_weight` must be a finite number >= 0"),
        ({"num_sampled": 0}, r"`num_sampled` must be a positive integer or None, got 0"),
        ({"quantize_spec": {"default": {}}}, r"`quantize_spec` must be a QuantSpec, got dict"),
    ],
)
def test_bad_arguments_fail_fast(kwargs, match) -> None:
    with pytest.raises(QuantizationConfigError, match=match):
        BlockReplacementCallback(**kwargs)


def test_missing_labels_skip_the_mixed_cross_entropy_with_one_warning(trainer_kwargs) -> None:
    class Unlabelled(ImageClassifier):
        def training_step(self, batch, batch_idx):
            return self(batch[0]).pow(2).mean()

    torch.manual_seed(0)
    callbacks = [
        QuantizationAwareTraining(4, 4, num_calibration_batches=1),
        BlockReplacementCallback(mixed_ce_weight=1.0),
    ]
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=callbacks))
    with pytest.warns(UserWarning, match="cross-entropy is skipped") as record:
        trainer.fit(Unlabelled(_plain()), _loader(labels=False))
    assert sum("cross-entropy is skipped" in str(w.message) for w in record) == 1
    assert "quant/br/ce_mixed" not in trainer.callback_metrics


def test_two_instances_have_distinct_state_keys() -> None:
    assert BlockReplacementCallback().state_key != BlockReplacementCallback(num_sampled=1).state_key


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")
def test_shipped_config_parses(capsys) -> None:
    callbacks = shipped_config("block_replacement.yaml", capsys)["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in callbacks] == [
        "QuantizationAwareTraining",
        "BlockReplacementCallback",
    ]
    assert callbacks[1]["init_args"]["blocks"] == "auto"
