"""The quick start: train a small CNN, quantize it with QAT, and measure what was gained and lost.

Runs offline on scikit-learn's handwritten digits (shipped inside scikit-learn), in 15-30 seconds on two CPU
cores with the defaults:

1. train a float32 model (ResNet-8 by default) with Lightning and measure its test accuracy;
2. copy it and fine-tune the copy with :class:`~lightning_quant.callbacks.QuantizationAwareTraining`
   (W4A4 by default: 4-bit weights and activations, first and last layer at 8 bits);
3. measure the quantized test accuracy and the model size: float32 against the real packed file
   (integer weights packed at their bit width by :mod:`lightning_quant.export.packing`, with float32 scales,
   zero points, biases and BatchNorm tensors), and check that the packed file and the checkpoint each reload
   into a freshly built float model with the same accuracy.

From the shell::

    lightning-quant quickstart                       # or: python -m lightning_quant.quickstart
    lightning-quant quickstart --weight-bits 2 --act-bits 4 --epochs-qat 12

From Python::

    from lightning_quant.quickstart import run
    result = run(weight_bits=4, act_bits=4)
    result["fp_accuracy"], result["quantized_accuracy"], result["compression"]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_quant.callbacks import QuantizationAwareTraining
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import validate_bits
from lightning_quant.core.validation import check_choice, check_int, check_real
from lightning_quant.datamodules import DigitsDataModule
from lightning_quant.export.packing import load_packed_model, model_size_report, save_packed_model
from lightning_quant.models import CifarResNet, ImageClassifier, LeNet5
from lightning_quant.surgery import load_quantized, quantization_summary, save_quantized

__all__ = ["MODELS", "format_report", "main", "run"]

#: the backbones the quick start can train
MODELS = ("resnet8", "lenet5")
_MODEL_NAMES = {"resnet8": "ResNet-8", "lenet5": "LeNet-5"}

# messages that say nothing about the quick start itself (a tiny in-memory data set needs no workers, and so on)
_SILENCED_WARNINGS = (
    r".*does not have many workers",
    r".*The number of training batches .* is smaller than the logging interval",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def _backbone(model: str, image_size: int) -> nn.Module:
    if model == "resnet8":
        return CifarResNet(depth=8, in_channels=1, num_classes=10)
    return LeNet5(in_channels=1, num_classes=10, input_size=image_size)


def _precision_label(weight_bits: int, act_bits: int | None) -> str:
    return f"W{weight_bits}A{act_bits}" if act_bits is not None else f"W{weight_bits}"


@contextlib.contextmanager
def _quiet(num_threads: int | None) -> Iterator[None]:
    """Lightning's banners and tips off, known harmless warnings off, torch's thread count set; all restored.

    The global torch flags that ``Trainer(deterministic=True)`` sets come back too.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        with warnings.catch_warnings():
            for message in _SILENCED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = cudnn_benchmark


def run(
    epochs_fp: int = 15,
    epochs_qat: int = 8,
    weight_bits: int = 4,
    act_bits: int | None = 4,
    seed: int = 0,
    output_dir: str | Path | None = None,
    *,
    model: Literal["resnet8", "lenet5"] = "resnet8",
    image_size: int = 16,
    batch_size: int = 64,
    lr: float = 3e-3,
    qat_lr: float = 1e-3,
    num_threads: int | None = 1,
    progress_bar: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train on scikit-learn's digits in float32, fine-tune with QAT, and report accuracy and size.

    Args:
        epochs_fp: epochs of float32 training.
        epochs_qat: epochs of quantization-aware fine-tuning, starting from the float32 weights.
        weight_bits: weight bit width, 2-8 (the first and last layer stay at 8 bits).
        act_bits: activation bit width, 2-8, or ``None`` for weight-only quantization.
        seed: seed of the data split, the initialisation and the data order; runs with the same seed give the
            same figures.
        output_dir: where the logs (CSV), the packed model and the checkpoint go; a new temporary folder
            when ``None`` (kept, so the files can be inspected).
        model: ``"resnet8"`` (CIFAR-style ResNet-8, the default) or ``"lenet5"``.
        image_size: the 8x8 digits are upsampled (bilinear) to this size.
        batch_size: samples per batch.
        lr: Adam learning rate of the float32 training (cosine schedule).
        qat_lr: Adam learning rate of the QAT fine-tuning (cosine schedule).
        num_threads: torch intra-op threads during the run (restored afterwards). One thread is as fast as
            several for these small models and does not slow down when other processes share the CPU;
            ``None`` leaves torch's setting.
        progress_bar: show Lightning's progress bars.
        verbose: print progress and the final report.

    Returns:
        The figures: test accuracies in [0, 1] -- ``fp_accuracy``, ``quantized_accuracy``, and the quantized
        model reloaded into a fresh float model from the packed file (``packed_reload_accuracy``,
        ``load_packed_model``) and from the checkpoint (``reloaded_accuracy``, ``load_quantized``); sizes in
        bytes -- ``fp32_bytes`` (float32 tensors), ``quantized_bytes`` (``quantization_summary``'s count),
        ``packed_bytes`` (the packed file on disk, header included), ``packed_payload_bytes`` (its tensors
        alone); ``compression`` (``fp32_bytes / packed_payload_bytes``), ``file_compression``
        (``fp32_bytes / packed_bytes``), ``avg_weight_bits``, ``seconds``, the paths
        ``output_dir``, ``packed_path`` and ``checkpoint_path``, and the arguments of the run.

    Raises:
        QuantizationConfigError: an argument is out of range.

    Example:
        >>> result = run(epochs_fp=2, epochs_qat=1, verbose=False)  # doctest: +SKIP
        >>> result["quantized_accuracy"] > 0.8  # doctest: +SKIP
        True
    """
    check_int("epochs_fp", epochs_fp, minimum=1, fix="pass e.g. `epochs_fp=15`.")
    check_int("epochs_qat", epochs_qat, minimum=1, fix="pass e.g. `epochs_qat=8`.")
    validate_bits("weight_bits", weight_bits)
    if act_bits is not None:
        validate_bits("act_bits", act_bits)
    check_int("seed", seed, fix="pass e.g. `seed=0`.")
    check_choice("model", model, MODELS)
    check_int("image_size", image_size, minimum=1, fix="pass e.g. `image_size=16`.")
    check_int("batch_size", batch_size, minimum=1, fix="pass e.g. `batch_size=64`.")
    check_real("lr", lr, minimum=0, minimum_inclusive=False, fix="pass e.g. `lr=3e-3`.")
    check_real("qat_lr", qat_lr, minimum=0, minimum_inclusive=False, fix="pass e.g. `qat_lr=1e-3`.")
    check_int("num_threads", num_threads, minimum=1, allow_none=True, fix="pass 1, or None to keep torch's setting.")

    start = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="lightning-quant-quickstart-") if output_dir is None else output_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = _precision_label(weight_bits, act_bits)

    def say(message: str) -> None:
        if verbose:
            print(message, flush=True)

    def trainer(name: str, max_epochs: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
        return pl.Trainer(
            accelerator="cpu",  # the model is tiny: the CPU is as fast, and the figures are reproducible
            devices=1,
            max_epochs=max_epochs,
            deterministic=True,
            callbacks=callbacks,
            logger=CSVLogger(out, name=name),
            default_root_dir=out,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
            log_every_n_steps=5,
        )

    def test_accuracy(trainer_: pl.Trainer, module: pl.LightningModule, data: pl.LightningDataModule) -> float:
        return float(trainer_.test(module, datamodule=data, verbose=False)[0]["test/acc"])

    with _quiet(num_threads):
        pl.seed_everything(seed, workers=True, verbose=False)
        data = DigitsDataModule(batch_size=batch_size, image_size=image_size, seed=seed)
        data.setup("fit")
        n_train = len(data.train_dataset)  # type: ignore[arg-type]
        n_test = len(data.test_dataset)  # type: ignore[arg-type]
        say(
            f"lightning-quant quick start: {_MODEL_NAMES[model]} on scikit-learn digits "
            f"({n_train} training / {n_test} test images, {image_size}x{image_size}), {label}, seed {seed}"
        )

        # 1. float32 training
        phase = time.perf_counter()
        say(f"[1/3] training the float32 model for {epochs_fp} epochs ...")
        fp_model = ImageClassifier(_backbone(model, image_size), lr=lr, scheduler="cosine")
        fp_trainer = trainer("fp32", epochs_fp)
        fp_trainer.fit(fp_model, datamodule=data)
        fp_accuracy = test_accuracy(fp_trainer, fp_model, data)
        say(f"      test accuracy {fp_accuracy:.2%} ({time.perf_counter() - phase:.0f} s)")

        # 2. quantization-aware fine-tuning of a copy, from the float32 weights
        phase = time.perf_counter()
        say(f"[2/3] quantization-aware training ({label}) for {epochs_qat} epochs from the float32 weights ...")
        pl.seed_everything(seed, workers=True, verbose=False)
        q_model = ImageClassifier(copy.deepcopy(fp_model.backbone), lr=qat_lr, scheduler="cosine")
        qat = QuantizationAwareTraining(weight_bits=weight_bits, act_bits=act_bits)
        q_trainer = trainer(label.lower(), epochs_qat, [qat])
        q_trainer.fit(q_model, datamodule=data)
        quantized_accuracy = test_accuracy(q_trainer, q_model, data)
        say(f"      test accuracy {quantized_accuracy:.2%} ({time.perf_counter() - phase:.0f} s)")

        # 3. size: the packed file; and both saved forms reload into a fresh float model
        say("[3/3] packing the integer weights, reloading the packed file and the checkpoint ...")
        q_model.eval()
        summary = quantization_summary(q_model)
        size = model_size_report(q_model)
        packed_path = out / f"model_{label.lower()}.lqpack"
        packed_bytes = save_packed_model(q_model, packed_path)
        from_packed = load_packed_model(ImageClassifier(_backbone(model, image_size)), packed_path)
        packed_reload_accuracy = test_accuracy(trainer("reload_packed", 1), from_packed, data)
        checkpoint_path = out / f"model_{label.lower()}.pt"
        save_quantized(q_model, checkpoint_path)
        reloaded = load_quantized(ImageClassifier(_backbone(model, image_size)), checkpoint_path)
        reloaded_accuracy = test_accuracy(trainer("reload_checkpoint", 1), reloaded, data)

    result: dict[str, Any] = {
        "model": model,
        "image_size": image_size,
        "weight_bits": weight_bits,
        "act_bits": act_bits,
        "epochs_fp": epochs_fp,
        "epochs_qat": epochs_qat,
        "seed": seed,
        "fp_accuracy": fp_accuracy,
        "quantized_accuracy": quantized_accuracy,
        "packed_reload_accuracy": packed_reload_accuracy,
        "reloaded_accuracy": reloaded_accuracy,
        "fp32_bytes": size.fp32_bytes,
        "quantized_bytes": -(-summary.quantized_bits // 8),
        "packed_bytes": packed_bytes,
        "packed_payload_bytes": size.total_bytes,
        "compression": size.fp32_bytes / size.total_bytes,
        "file_compression": size.fp32_bytes / packed_bytes,
        "avg_weight_bits": summary.avg_weight_bits,
        "output_dir": str(out),
        "packed_path": str(packed_path),
        "checkpoint_path": str(checkpoint_path),
        "seconds": time.perf_counter() - start,
    }
    if verbose:
        print(f"\n{summary}\n")
        print(format_report(result), flush=True)
    return result


def format_report(result: dict[str, Any]) -> str:
    """The quick start's closing report, from the dict :func:`run` returns."""
    label = _precision_label(result["weight_bits"], result["act_bits"])
    change = 100 * (result["quantized_accuracy"] - result["fp_accuracy"])
    header_kib = (result["packed_bytes"] - result["packed_payload_bytes"]) / 1024
    same = result["packed_reload_accuracy"] == result["reloaded_accuracy"] == result["quantized_accuracy"]
    rows = [
        ("FP32 test accuracy", f"{100 * result['fp_accuracy']:.2f} %", ""),
        (f"{label} test accuracy", f"{100 * result['quantized_accuracy']:.2f} %", f"{change:+.2f} points"),
        ("FP32 size", f"{result['fp32_bytes'] / 1024:.1f} KiB", "float32 tensors"),
        (
            f"{label} size",
            f"{result['packed_payload_bytes'] / 1024:.1f} KiB",
            f"{result['compression']:.1f}x smaller: packed integer weights + float32 scales, biases, BatchNorm",
        ),
        (
            f"{label} packed file",
            f"{result['packed_bytes'] / 1024:.1f} KiB",
            f"{result['file_compression']:.1f}x smaller on disk: the tensors + {header_kib:.1f} KiB JSON header",
        ),
        ("reload check", "passed" if same else "FAILED", "same accuracy from the packed file and the checkpoint"),
        ("time", f"{result['seconds']:.0f} s", ""),
    ]
    lines = [f"{name:<22}{value:>11}   {note}".rstrip() for name, value, note in rows]
    lines.append(f"{'files':<22}{result['output_dir']}")
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line options of the quick start (``lightning-quant quickstart``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a small CNN on scikit-learn's digits (offline), fine-tune it with quantization-aware "
            "training, and report float32 vs quantized test accuracy and model size."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs-fp", type=int, default=15, help="epochs of float32 training")
    parser.add_argument("--epochs-qat", type=int, default=8, help="epochs of quantization-aware fine-tuning")
    parser.add_argument("--weight-bits", type=int, default=4, help="weight bits, 2-8 (first/last layer: 8)")
    parser.add_argument("--act-bits", type=_act_bits, default=4, help="activation bits, 2-8, or 'none' for weight-only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and data order")
    parser.add_argument("--output", type=Path, default=None, help="output folder (default: a new temporary one)")
    parser.add_argument("--model", choices=MODELS, default="resnet8", help="backbone")
    parser.add_argument("--image-size", type=int, default=16, help="the 8x8 digits are upsampled to this size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--progress-bar", action="store_true", help="show Lightning's progress bars")
    return parser


def _act_bits(text: str) -> int | None:
    if text.lower() in ("none", "fp", "float"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the quick start from the command line; returns the exit status (2 for bad arguments)."""
    parser = build_parser(prog)
    options = parser.parse_args(argv)
    try:
        run(
            epochs_fp=options.epochs_fp,
            epochs_qat=options.epochs_qat,
            weight_bits=options.weight_bits,
            act_bits=options.act_bits,
            seed=options.seed,
            output_dir=options.output,
            model=options.model,
            image_size=options.image_size,
            num_threads=options.threads or None,
            progress_bar=options.progress_bar,
        )
    except QuantizationConfigError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
