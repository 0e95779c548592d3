"""Float teachers trained once to convergence and cached: every technique and peer starts from the same one.

A teacher is a model's backbone trained in full precision with Adam and a cosine schedule over a fixed number of
epochs (our choice: a fixed schedule, not early stopping, so that the same configuration always gives the same
weights), always on the whole training set (``--train-subset`` only shortens the fine-tunes); "converged" means
its test accuracy reaches the preset's target (MNIST: ResNet-8 >= 99.3 %, LeNet-5 >= 99.0 %). A teacher below its
target is still used, and the report says so beside every figure built on it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from benchmarks.suite.config import RunCache, Settings, backbone_factory, datamodule_factory, trainer

TEACHER_LR = 3e-3


@dataclass
class Teacher:
    """A converged (or not) float backbone and how it was obtained."""

    model: str
    state: dict[str, torch.Tensor]
    accuracy: float
    target: float
    epochs: int
    seconds: float
    cached: bool
    key: str

    @property
    def converged(self) -> bool:
        return self.accuracy >= self.target


def teacher_config(settings: Settings, model: str) -> dict:
    return {
        "kind": "teacher",
        "model": model,
        "dataset": settings.dataset,
        "epochs": settings.teacher_plan(model)[0],
        "lr": TEACHER_LR,
        "limit_batches": settings.limit_batches,
        "seed": 0,
    }


def get_teacher(
    settings: Settings, model: str, cache: RunCache, data_root: Path, workdir: Path, accelerator: str
) -> Teacher:
    """The cached teacher of ``model``, or train it now (seed 0) and cache its weights and test accuracy."""
    from lightning_quant.models import ImageClassifier

    config = teacher_config(settings, model)
    weights = cache.path(config, ".pt")
    info = cache.get(config)
    if info is not None and weights.exists():
        state = torch.load(weights, map_location="cpu", weights_only=True)
        return Teacher(model, state, info["accuracy"], settings.teacher_plan(model)[1], config["epochs"],
                       info["seconds"], True, cache.key(config))  # fmt: skip
    L.seed_everything(0, verbose=False)
    classifier = ImageClassifier(backbone_factory(model, settings.dataset)(), lr=TEACHER_LR, scheduler="cosine")
    data = datamodule_factory(dataclasses.replace(settings, train_subset=None), data_root)(0)  # all training data
    fit = trainer(settings, config["epochs"], [], workdir, accelerator)
    start = time.perf_counter()
    fit.fit(classifier, datamodule=data)
    seconds = time.perf_counter() - start
    accuracy = float(fit.test(classifier, datamodule=data, verbose=False)[0]["test/acc"])
    state = {k: v.detach().cpu() for k, v in classifier.backbone.state_dict().items()}
    cache.save_tensors(config, state)
    cache.put(config, {"accuracy": accuracy, "seconds": seconds})
    return Teacher(model, state, accuracy, settings.teacher_plan(model)[1], config["epochs"], seconds, False,
                   cache.key(config))  # fmt: skip
