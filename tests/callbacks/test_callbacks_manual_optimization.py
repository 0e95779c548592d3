"""Manual optimization (a GAN with two optimizers) and the mixin's check that its loss terms are requested."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import (
    BitReallocationCallback,
    BlockReplacementCallback,
    DistillationCallback,
    QuantizationAwareTraining,
    QuantizationConfigError,
    QuantizationLossMixin,
)
from lightning_quant.callbacks.export import QuantizedExport
from lightning_quant.export import verify_onnx
from lightning_quant.surgery import quantized_layers

LATENT = 8
PIXELS = 64  # 8 x 8 images, flattened


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(LATENT, 32), nn.LeakyReLU(0.2), nn.Linear(32, 32), nn.LeakyReLU(0.2), nn.Linear(32, PIXELS)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(z))


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(PIXELS, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GAN(L.LightningModule):
    """The shape of Lightning's basic GAN example: two optimizers, manual optimization, forward(z) -> images."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = Generator()
        self.discriminator = Discriminator()
        self.example_input_array = torch.randn(2, LATENT)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], LATENT)
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)

        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(z)), ones)
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        fake = self(z).detach()
        d_loss = (
            F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
            + F.binary_cross_entropy_with_logits(self.discriminator(fake), zeros)
        ) / 2
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-3),
        )


def _images(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(n, PIXELS, generator=g) * 2 - 1), batch_size=8)


def test_gan_with_two_optimizers_trains_reallocates_and_exports(tmp_path: Path, trainer_kwargs) -> None:
    """QAT, QBitOpt and QuantizedExport add no loss term: manual optimization is no obstacle."""
    L.seed_everything(0)
    gan = GAN()
    before = {n: p.detach().clone() for n, p in gan.named_parameters()}
    # input: the module's example_input_array (a latent); the output is flat images, values rather than logits
    export = QuantizedExport(tmp_path / "generator.onnx", task="regression")
    qbitopt = BitReallocationCallback(avg_weight_bits=6.0, every_n_steps=2)
    callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=1), qbitopt, export]
    L.Trainer(**trainer_kwargs(max_epochs=2, callbacks=callbacks)).fit(gan, _images())
    layers = quantized_layers(gan)
    assert len(layers) == 5
    step_sizes = {n: layer.weight_quantizer.scale for n, layer in layers.items()}
    # every quantized layer's weights and learned step sizes moved under both optimizers
    for name, param in gan.named_parameters():
        if name in before:
            assert not torch.equal(param.detach(), before[name]), name
    assert all(s.requires_grad for s in step_sizes.values())
    assert [h["reason"] for h in qbitopt.history][:2] == ["initial", "solve"]
    # the generator was exported from its latent input; no validation data, so the check ran on that input
    assert (tmp_path / "generator.onnx").is_file()
    assert export.result is not None and export.result.task == "regression" and export.result.agreement is None
    assert export.result.relative_error is not None and export.result.relative_error < 1e-4
    again = verify_onnx(gan, tmp_path / "generator.onnx", [torch.randn(3, LATENT)], task="regression")  # batch 3
    assert again.num_samples == 3 and again.relative_error < 1e-4


def test_a_callback_that_adds_a_loss_names_itself_before_training(trainer_kwargs) -> None:
    steps: list[int] = []

    class Counting(GAN):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    callbacks = [DistillationCallback(), QuantizationAwareTraining()]
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=callbacks))
    with pytest.raises(
        QuantizationConfigError,
        match=r"DistillationCallback adds a loss term.*Counting sets `automatic_optimization = False`.*"
        r"inherit `lightning_quant\.callbacks\.QuantizationLossMixin`",
    ):
        trainer.fit(Counting(), _images())
    assert not steps  # refused in setup


class Classifier(QuantizationLossMixin, L.LightningModule):
    """The mixin, with a training_step that forgets to add `self.quantization_loss(batch)`."""

    def __init__(self, request_loss: bool) -> None:
        super().__init__()
        self.request_loss = request_loss
        self.backbone = nn.Sequential(nn.Linear(PIXELS, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss + self.quantization_loss(batch) if self.request_loss else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _labelled(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, PIXELS, generator=g), torch.randint(0, 4, (n,), generator=g)), 8)


def test_mixin_loss_never_requested_raises_after_the_first_step(trainer_kwargs) -> None:
    blocks = ["backbone.0", "backbone.2", "backbone.4"]
    # requested: block replacement runs (its loss is part of the step)
    L.seed_everything(0)
    br = BlockReplacementCallback(blocks=blocks)
    L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[br])).fit(Classifier(request_loss=True), _labelled())
    assert br.block_names == blocks
    # not requested: a clear error at the end of the first step instead of block replacement doing nothing
    steps: list[int] = []

    class Forgetful(Classifier):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    trainer = L.Trainer(**trainer_kwargs(max_steps=2, callbacks=[BlockReplacementCallback(blocks=blocks)]))
    with pytest.raises(
        QuantizationConfigError,
        match=r"BlockReplacementCallback adds a loss term, but Forgetful\.training_step did not request it.*"
        r"`loss \+ self\.quantization_loss\(batch\)`",
    ):
        trainer.fit(Forgetful(request_loss=False), _labelled())
    assert steps == [0]
