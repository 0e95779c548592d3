"""The shared callback template: one-backward extra losses, the mixin fallback, state keys, DDP."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import QuantizationCallback, QuantizationConfigError, QuantizationLossMixin


class L2Penalty(QuantizationCallback):
    """A test technique: adds ``coef * sum(w**2)`` of the first layer to the loss."""

    TECHNIQUE = "l2"

    def __init__(self, coef: float) -> None:
        super().__init__()
        self.coef = coef
        self.calls = 0

    def identity(self):
        return {"coef": self.coef}

    def extra_loss(self, trainer, pl_module, batch):
        self.calls += 1
        assert batch is not None  # the batch of this step reached the hook
        return self.coef * pl_module.net[0].weight.pow(2).sum()


class Net(L.LightningModule):
    def __init__(self, clone_loss: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.clone_loss = clone_loss
        self.logged: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.logged.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MixinNet(QuantizationLossMixin, Net):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y) + self.quantization_loss(batch)


def _data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)), batch_size=4
    )


def _expected_after_one_step(model: Net, coef: float, batches) -> torch.Tensor:
    """Plain PyTorch: one SGD step on the mean over ``batches`` of (CE + coef * |w|^2)."""
    reference = Net()
    reference.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in batches:
        loss = nn.functional.cross_entropy(reference.net(x), y) + coef * reference.net[0].weight.pow(2).sum()
        (loss / len(batches)).backward()
    opt.step()
    return reference.net[0].weight.detach()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_extra_loss_is_added_once_with_gradient_accumulation(accumulate, trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = Net()
    batches = list(_data())[:accumulate]
    expected = _expected_after_one_step(model, 0.5, batches)
    callback = L2Penalty(0.5)
    trainer = L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[callback], accumulate_grad_batches=accumulate))
    trainer.fit(model, _data())
    assert callback.calls == accumulate
    torch.testing.assert_close(model.net[0].weight.detach(), expected, atol=1e-6, rtol=1e-5)
    assert len(model.logged) == accumulate


def test_mixin_adds_the_terms_inside_training_step(trainer_kwargs) -> None:
    torch.manual_seed(0)
    model = MixinNet()
    expected = _expected_after_one_step(model, 0.25, list(_data())[:1])
    callback = L2Penalty(0.25)
    L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[callback])).fit(model, _data())
    assert callback.calls == 1  # from quantization_loss, not again from on_before_backward
    torch.testing.assert_close(model.net[0].weight.detach(), expected, atol=1e-6, rtol=1e-5)


def test_saved_loss_tensor_is_safe_in_automatic_optimization(trainer_kwargs) -> None:
    class SavedLoss(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y).sigmoid()  # sigmoid saves its output

    L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[L2Penalty(0.1)])).fit(SavedLoss(), _data())


def test_manual_optimization_asks_for_the_mixin(trainer_kwargs) -> None:
    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.manual_backward(nn.functional.cross_entropy(self.net(x), y))

    trainer = L.Trainer(**trainer_kwargs(max_steps=1, callbacks=[L2Penalty(0.1)]))
    with pytest.raises(QuantizationConfigError, match=r"inherit `lightning_quant\.callbacks\.QuantizationLossMixin`"):
        trainer.fit(Manual(), _data())


def test_state_keys_follow_identifying_arguments() -> None:
    assert L2Penalty(0.1).state_key != L2Penalty(0.2).state_key
    assert L2Penalty(0.1).state_key == L2Penalty(0.1).state_key
