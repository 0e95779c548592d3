"""QAT on real MNIST (skips without ../shared/data): W4A4 >= 97% test accuracy, W8A8 within 0.5 points of FP.

The FP run and the QAT runs train equally long: one FP epoch, then one more epoch either in FP (the baseline)
or with QAT from the same FP weights.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest

from lightning_quant import QuantizationAwareTraining
from lightning_quant.datamodules import MNISTDataModule
from lightning_quant.models import ImageClassifier, LeNet5


@pytest.mark.slow
def test_qat_on_mnist_reaches_target_accuracy(mnist_root, trainer_kwargs) -> None:
    L.seed_everything(0, workers=True)
    data = MNISTDataModule(root=mnist_root, batch_size=64, val_size=5000, train_subset=30000)
    pretrained = ImageClassifier(LeNet5(), lr=2e-3)
    L.Trainer(**trainer_kwargs(max_epochs=1)).fit(pretrained, data)

    results = {}
    for bits in (None, 4, 8):
        L.seed_everything(0, workers=True)
        model = copy.deepcopy(pretrained)
        model.lr = 1e-3
        callbacks = [] if bits is None else [QuantizationAwareTraining(bits, bits, num_calibration_batches=16)]
        trainer = L.Trainer(**trainer_kwargs(max_epochs=1, callbacks=callbacks))
        trainer.fit(model, data)
        results[bits] = trainer.test(model, data, verbose=False)[0]["test/acc"]
    print(f"MNIST LeNet-5, 2 epochs: FP {results[None]:.4f}, W8A8 {results[8]:.4f}, W4A4 {results[4]:.4f}")
    assert results[4] >= 0.97
    assert results[8] >= results[None] - 0.005
