"""The AutoQB search driver: ``lightning-quant search --method autoqb``.

:func:`run_autoqb` trains (or loads) a float model, runs :class:`~lightning_quant.callbacks.AutoQBCallback`'s
search (hierarchical DDPG over per-channel weight widths, or HAQ's layer-level agent) under a size or BOPs budget,
fine-tunes the best policy with quantization-aware training, and writes what a deployment needs into ``output``:

* ``autoqb_spec.yaml`` -- the per-layer recipe with its per-channel widths (``QuantSpec.load`` rebuilds the model);
* ``autoqb_search.json`` -- the best episode, the float reference, and one record per episode;
* ``autoqb_widths.png`` -- the heat map of the per-channel widths and the reward curve;
* ``autoqb_search.pt`` -- the search state (a killed search resumes from it when run again with the same options);
* ``model.lqpk`` -- the weights packed at their widths (:func:`~lightning_quant.export.save_packed_model`).

From the shell (offline, sklearn's digits; ``--data mnist --data-root ../shared/data`` for MNIST)::

    lightning-quant search --method autoqb --model resnet8 --avg-weight-bits 3 --episodes 100
    python -m lightning_quant.search.autoqb --level layer --bops-budget 2e6
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_quant.allocation.cost import layer_costs
from lightning_quant.allocation.rl import DDPGConfig
from lightning_quant.callbacks.autoqb import AutoQBCallback
from lightning_quant.callbacks.qat import QuantizationAwareTraining
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.io import load_weights_only
from lightning_quant.datamodules import DigitsDataModule, MNISTDataModule
from lightning_quant.export.packing import save_packed_model
from lightning_quant.models import CifarResNet, ImageClassifier, LeNet5
from lightning_quant.surgery import LayerSpec, QuantSpec, quantize_model
from lightning_quant.surgery.summary import quantization_summary

log = logging.getLogger(__name__)

__all__ = ["AutoQBResult", "build_parser", "main", "run_autoqb"]

MODELS = ("resnet8", "lenet5")
DATA = ("digits", "mnist")


@dataclass
class AutoQBResult:
    """What :func:`run_autoqb` found and measured.

    Attributes:
        spec: the final per-layer recipe (per-channel widths included).
        best: the best episode of the search.
        reference: the float model's metric on the search's evaluation batches.
        fp_accuracy: the float model's test accuracy.
        accuracy: the quantized model's test accuracy after the fine-tune.
        avg_weight_bits: parameter-weighted average weight width of the final model.
        episodes: search episodes run in all.
        search_seconds: wall time of the search (its part of ``fit``).
        files: what was written, by kind.
    """

    spec: QuantSpec
    best: dict[str, Any]
    reference: float
    fp_accuracy: float
    accuracy: float
    avg_weight_bits: float
    episodes: int
    search_seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def _datamodule(data: str, root: str, batch_size: int, seed: int, train_subset: int | None) -> pl.LightningDataModule:
    if data == "digits":
        return DigitsDataModule(batch_size=batch_size, seed=seed)
    return MNISTDataModule(root=root, batch_size=batch_size, seed=seed, train_subset=train_subset)


def _backbone(model: str, image_size: int) -> torch.nn.Module:
    if model == "resnet8":
        return CifarResNet(depth=8, in_channels=1, num_classes=10)
    return LeNet5(in_channels=1, num_classes=10, input_size=image_size)


def _trainer(epochs: int, root: Path, callbacks: list, logger: bool, progress_bar: bool) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=CSVLogger(root, name="autoqb") if logger else False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )


def budget_from_avg_bits(model: torch.nn.Module, avg_weight_bits: float) -> float:
    """The size budget (bits) of an average weight width over every quantized layer (frozen ones included)."""
    costs = layer_costs(model)
    return float(avg_weight_bits * costs.params.sum())


def run_autoqb(
    *,
    model: Literal["resnet8", "lenet5"] = "resnet8",
    data: Literal["digits", "mnist"] = "digits",
    data_root: str = "data",
    size_budget: float | None = None,
    bops_budget: float | None = None,
    avg_weight_bits: float | None = None,
    level: Literal["channel", "layer"] = "channel",
    episodes: int = 100,
    channels_per_unit: int = 1,
    act_bits: int | None = 8,
    fp_epochs: int = 3,
    finetune_epochs: int = 1,
    batch_size: int = 128,
    train_subset: int | None = None,
    seed: int = 0,
    ddpg: DDPGConfig | None = None,
    output: str | Path = "autoqb_run",
    progress_bar: bool = True,
) -> AutoQBResult:
    """Train a float model, search its widths with AutoQB, fine-tune with QAT and write the results (module docs).

    Exactly one of ``size_budget`` (bits), ``bops_budget`` (bit operations per sample) and ``avg_weight_bits``
    (a size budget as the average width over every quantized layer, first and last included) must be given.
    """
    given = [v for v in (size_budget, bops_budget, avg_weight_bits) if v is not None]
    if len(given) != 1:
        raise QuantizationConfigError(
            "Pass exactly one budget: `size_budget` (bits), `bops_budget` (bit operations per sample) or "
            f"`avg_weight_bits`; got {len(given)}. HINT: `--avg-weight-bits 3`."
        )
    if model not in MODELS or data not in DATA:
        raise QuantizationConfigError(f"`model` must be one of {list(MODELS)} and `data` one of {list(DATA)}.")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    dm = _datamodule(data, data_root, batch_size, seed, train_subset)
    dm.prepare_data()
    dm.setup("fit")
    image_size = next(iter(dm.train_dataloader()))[0].shape[-1]
    fp_path = out / "fp.pt"
    classifier = ImageClassifier(_backbone(model, image_size), lr=3e-3, scheduler="cosine")
    if fp_path.is_file():
        classifier.load_state_dict(load_weights_only(fp_path, "the float checkpoint"))
    else:
        _trainer(fp_epochs, out, [], False, progress_bar).fit(classifier, dm)
        torch.save(classifier.state_dict(), fp_path)
    fp_accuracy = float(_trainer(0, out, [], False, False).test(classifier, dm, verbose=False)[0]["test/acc"])
    spec = QuantSpec(default=LayerSpec(act_bits=act_bits))
    if avg_weight_bits is not None:
        size_budget = budget_from_avg_bits(quantize_model(_copy_float(classifier), spec), avg_weight_bits)
    qat = QuantizationAwareTraining(weight_bits=8, act_bits=act_bits, num_calibration_batches=4)
    search = AutoQBCallback(
        size_budget=size_budget,
        bops_budget=bops_budget,
        episodes=episodes,
        level=level,
        channels_per_unit=channels_per_unit,
        ddpg=ddpg,
        seed=seed,
        search_file=str(out / "autoqb_search.pt"),
        progress_bar=progress_bar,
    )
    classifier.lr = 1e-3
    trainer = _trainer(finetune_epochs, out, [qat, search], True, progress_bar)
    start = time.perf_counter()
    timer = _SearchTimer()
    trainer.callbacks.append(timer)
    trainer.fit(classifier, dm)
    accuracy = float(trainer.test(classifier, dm, verbose=False)[0]["test/acc"])
    files = {
        "spec": out / "autoqb_spec.yaml",
        "search": out / "autoqb_search.json",
        "state": out / "autoqb_search.pt",
        "packed": out / "model.lqpk",
    }
    search.spec.save(files["spec"])
    history = search.history
    reference = search.reference
    files["search"].write_text(
        json.dumps({"best": search.best, "reference": reference, "history": history}, indent=1, default=float)
    )
    save_packed_model(classifier, files["packed"])
    if search.plot_path is not None:
        files["plot"] = search.plot_path
    return AutoQBResult(
        spec=search.spec,
        best=search.best,
        reference=reference,
        fp_accuracy=fp_accuracy,
        accuracy=accuracy,
        avg_weight_bits=quantization_summary(classifier).avg_weight_bits,
        episodes=len(history),
        search_seconds=timer.seconds if timer.seconds is not None else time.perf_counter() - start,
        files=files,
    )


class _SearchTimer(pl.Callback):
    """The wall time of ``on_fit_start`` hooks that run before it (the search), for the report."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self._start = time.perf_counter()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._start = time.perf_counter()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._start


def _copy_float(classifier: ImageClassifier) -> torch.nn.Module:
    return copy.deepcopy(classifier.backbone)


def format_report(result: AutoQBResult) -> str:
    """A short text report of a run."""
    best = result.best
    costs = ", ".join(f"{k} {v:,.0f} of {best['budgets'][k]:,.0f}" for k, v in best["costs"].items())
    widths: dict[str, Any] = {}
    for name, layer in result.spec.layers.items():
        bits = layer.weight_bits
        widths[name] = bits if isinstance(bits, int) else f"mixed {min(bits)}-{max(bits)} ({bits.count(1)} binary)"
    lines = [
        f"float test accuracy: {100 * result.fp_accuracy:.2f}%",
        f"AutoQB best policy: episode {best['episode']} of {result.episodes}, search accuracy "
        f"{100 * best['metric']:.2f}% (float {100 * result.reference:.2f}%), {costs}",
        f"after fine-tuning: test accuracy {100 * result.accuracy:.2f}%, average weight bits "
        f"{result.avg_weight_bits:.3f}",
        f"search time: {result.search_seconds:.1f} s",
        "widths: " + ", ".join(f"{k}: {v}" for k, v in widths.items()),
        "files: " + ", ".join(f"{k}={v}" for k, v in result.files.items()),
    ]
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", choices=MODELS, default="resnet8")
    p.add_argument("--data", choices=DATA, default="digits")
    p.add_argument("--data-root", default="data", help="folder holding MNIST/raw (for --data mnist)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--size-budget", type=float, help="bits of the quantized weights")
    budget.add_argument("--bops-budget", type=float, help="bit operations per sample")
    budget.add_argument("--avg-weight-bits", type=float, help="size budget as an average width over all layers")
    p.add_argument("--level", choices=AutoQBCallback.LEVELS, default="channel")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--channels-per-unit", type=int, default=1)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--fp-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--warmup-episodes", type=int, default=DDPGConfig.warmup_episodes)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="autoqb_run")
    p.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the driver from the command line; returns the exit status (2 for bad arguments)."""
    parser = build_parser(prog)
    options = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers")
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        try:
            result = run_autoqb(
                model=options.model,
                data=options.data,
                data_root=options.data_root,
                size_budget=options.size_budget,
                bops_budget=options.bops_budget,
                avg_weight_bits=options.avg_weight_bits,
                level=options.level,
                episodes=options.episodes,
                channels_per_unit=options.channels_per_unit,
                act_bits=options.act_bits,
                fp_epochs=options.fp_epochs,
                finetune_epochs=options.finetune_epochs,
                batch_size=options.batch_size,
                train_subset=options.train_subset,
                seed=options.seed,
                ddpg=DDPGConfig(warmup_episodes=options.warmup_episodes),
                output=options.output,
                progress_bar=options.progress_bar,
            )
        except QuantizationConfigError as err:
            parser.error(str(err))
    print(format_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
