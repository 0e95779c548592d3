"""The techniques the suite compares, each fine-tuned from the same converged teacher with the same recipe.

Every run: ``ImageClassifier`` around a fresh backbone holding the teacher's weights, Adam with a cosine schedule
over ``qat_epochs`` at ``qat_lr``, the same data split and order for a seed; weights and inputs of every Conv/Linear
at ``bits`` (first and last layer at 8); then the test accuracy. What differs is only the technique:

* ``LSQ QAT`` -- ``QuantizationAwareTraining(bits, bits)`` (the baseline of most rows);
* ``QAT + BR`` -- plus ``BlockReplacementCallback()`` (paper defaults);
* ``QAT + QBitOpt`` -- plus ``BitReallocationCallback`` with the *same* average weight bits as the uniform model
  (so the same size), widths 2-8 reallocated every 50 steps in the first half; at 2 bits there is no room below the
  average, so the row is not run;
* ``PTQ (min/max)`` -- ``ThresholdTuningCallback`` stopped after its calibration batches (no tuning): FAT's own
  baseline;
* ``FAT`` -- ``ThresholdTuningCallback(bits)``: only the threshold factors train, by distillation, for the epochs;
* ``QAT + KD (real data)`` -- LSQ QAT + ``DistillationCallback(teacher="copy", T=4)``, BatchNorm frozen at the
  teacher's statistics: the data-free row's ceiling;
* ``QAT + KD (ZS-CGAN data)`` -- the same, on ``GeneratorDataModule`` samples (a generator trained against the
  teacher, once per seed, as many samples per epoch as the real training set): no real image is seen.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.suite.config import Settings, in_channels, input_size, trainer

METHODS = (
    "LSQ QAT",
    "QAT + BR",
    "QAT + QBitOpt",
    "PTQ (min/max)",
    "FAT",
    "QAT + KD (real data)",
    "QAT + KD (ZS-CGAN data)",
)
# the comparison each method is judged by: (method, its baseline)
COMPARISONS = (
    ("QAT + BR", "LSQ QAT"),
    ("QAT + QBitOpt", "LSQ QAT"),
    ("FAT", "PTQ (min/max)"),
    ("FAT", "LSQ QAT"),
    ("QAT + KD (ZS-CGAN data)", "QAT + KD (real data)"),
)
CALIBRATION_BATCHES = 16  # as QuantizationAwareTraining's default, and the peers' (benchmarks/suite/peers.py)
QBITOPT_EVERY = 50


class StepTimer(L.Callback):
    """Wall time of each training step (``on_train_batch_start`` to ``on_train_batch_end``, optimizer included)."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self._start)

    @property
    def median(self) -> float:
        steps = self.steps[3:] or self.steps  # the first steps compile kernels
        return statistics.median(steps) if steps else float("nan")


@dataclass
class Context:
    """What every run of one model shares."""

    settings: Settings
    model: str
    make_backbone: Any
    teacher_state: dict[str, torch.Tensor]
    make_datamodule: Any
    workdir: Path
    accelerator: str
    generators: dict[int, Any] = field(default_factory=dict)  # seed -> GeneratorDataModule, trained once


def _student(ctx: Context) -> L.LightningModule:
    from lightning_quant.models import ImageClassifier

    classifier = ImageClassifier(ctx.make_backbone(), lr=ctx.settings.qat_lr, scheduler="cosine")
    classifier.backbone.load_state_dict(ctx.teacher_state)
    return classifier


def _generator_data(ctx: Context, seed: int, real: L.LightningDataModule) -> L.LightningDataModule:
    from lightning_quant.datamodules import GeneratorDataModule

    if seed not in ctx.generators:
        teacher = _student(ctx).eval()
        real.setup("fit")
        size, channels = input_size(ctx.settings.dataset), in_channels(ctx.settings.dataset)
        data = GeneratorDataModule(
            teacher,
            num_classes=10,
            input_shape=(channels, size, size),
            samples_per_epoch=len(real.train_dataloader().dataset),
            batch_size=real.batch_size,
            generator_steps=ctx.settings.generator_steps,
            val_samples=0,
            seed=seed,
            generator_trainer_kwargs={"enable_progress_bar": False, "accelerator": ctx.accelerator},
        )
        data.setup("fit")
        ctx.generators[seed] = data
    return ctx.generators[seed]


def uniform_avg_bits(ctx: Context, bits: int) -> float:
    """Parameter-weighted average weight bits of the uniform ``bits`` model (first and last layer at 8)."""
    from lightning_quant import LayerSpec, QuantSpec, quantization_summary, quantize_model

    model = ctx.make_backbone()
    quantize_model(model, QuantSpec(default=LayerSpec(weight_bits=bits, act_bits=bits)))
    return float(quantization_summary(model).avg_weight_bits)


def run_method(ctx: Context, method: str, bits: int, seed: int) -> dict[str, Any] | None:
    """Fine-tune ``method`` at ``bits`` for ``seed``: test accuracy, size, step time; ``None`` if not applicable."""
    from lightning_quant import (
        BitReallocationCallback,
        BlockReplacementCallback,
        DistillationCallback,
        QuantizationAwareTraining,
        ThresholdTuningCallback,
        quantization_summary,
    )
    from lightning_quant.surgery import quantized_layers

    settings = ctx.settings
    data = ctx.make_datamodule(seed)
    train_data: L.LightningDataModule = data
    max_steps = -1
    if method == "QAT + QBitOpt" and bits <= 2:
        return None  # the average cannot move below the lowest width
    if method in ("LSQ QAT", "QAT + BR", "QAT + QBitOpt"):
        callbacks: list = [QuantizationAwareTraining(bits, bits, num_calibration_batches=CALIBRATION_BATCHES)]
        if method == "QAT + BR":
            callbacks.append(BlockReplacementCallback())
        if method == "QAT + QBitOpt":
            data.setup("fit")
            steps = len(data.train_dataloader()) * settings.qat_epochs
            if settings.limit_batches:
                steps = min(steps, settings.limit_batches * settings.qat_epochs)
            callbacks.append(
                BitReallocationCallback(
                    avg_weight_bits=uniform_avg_bits(ctx, bits),
                    every_n_steps=min(QBITOPT_EVERY, max(1, steps // 4)),
                    freeze_after=max(1, steps // 2),
                    plot=False,
                )
            )
    elif method in ("PTQ (min/max)", "FAT"):
        callbacks = [ThresholdTuningCallback(bits=bits, num_calibration_batches=CALIBRATION_BATCHES)]
        if method == "PTQ (min/max)":
            max_steps = CALIBRATION_BATCHES
    elif method in ("QAT + KD (real data)", "QAT + KD (ZS-CGAN data)"):
        callbacks = [
            QuantizationAwareTraining(
                bits, bits, num_calibration_batches=CALIBRATION_BATCHES, freeze_bn_after_epochs=0
            ),
            DistillationCallback(teacher="copy", temperature=4.0),
        ]
        if method == "QAT + KD (ZS-CGAN data)":
            train_data = _generator_data(ctx, seed, ctx.make_datamodule(seed))
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    L.seed_everything(seed, verbose=False)
    model = _student(ctx)
    timer = StepTimer()
    epochs = 1 if max_steps > 0 else settings.qat_epochs
    fit = trainer(settings, epochs, [*callbacks, timer], ctx.workdir, ctx.accelerator, max_steps=max_steps)
    start = time.perf_counter()
    fit.fit(model, datamodule=train_data)
    seconds = time.perf_counter() - start
    accuracy = float(fit.test(model, datamodule=data, verbose=False)[0]["test/acc"])
    layers = quantized_layers(model)
    return {
        "accuracy": accuracy,
        "avg_weight_bits": float(quantization_summary(model).avg_weight_bits),
        "layer_bits": {name: int(layer.weight_quantizer.bits) for name, layer in layers.items()},
        "step_s": timer.median,
        "seconds": seconds,
    }
