"""Helpers shared by the benchmark scripts (run them from the repository root: ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn


def quiet_trainer(
    epochs: int,
    callbacks: list,
    root: Path,
    max_steps: int = -1,
    val_batches: int = 0,
    accelerator: str = "cpu",
    **kwargs,
) -> L.Trainer:
    """A Trainer (CPU unless ``accelerator`` says otherwise) with no logger, checkpoints or progress bar: only the
    work being measured (validation only on ``val_batches`` batches at the end of each epoch, none by default;
    ``kwargs``: further Trainer arguments, e.g. ``limit_test_batches``)."""
    return L.Trainer(
        accelerator=accelerator,
        max_epochs=epochs,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        limit_val_batches=val_batches,
        **kwargs,
    )


QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_quant")


def quiet_logs() -> None:
    """Keep Lightning's and the suite's per-run banners and warnings out of a benchmark's output (for the rest of
    the process: scripts; in-process callers use :func:`quieted`)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


@contextlib.contextmanager
def quieted() -> Iterator[None]:
    """:func:`quiet_logs` inside the ``with`` block only: logger levels and warning filters are restored after."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings():
        quiet_logs()
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the ``heading`` section of a markdown file with ``text`` (or append it); other sections stay."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^" + re.escape(heading) + r"\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text.rstrip() + "\n\n", current).rstrip() + "\n"
    else:
        updated = current.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(updated)


def rerun_command(script: str, argv: list[str]) -> str:
    """The command a reader re-runs to reproduce a section: ``argv`` without output and work-directory paths."""
    shown, skip = [], False
    for a in argv:
        if skip or a.startswith(("--output", "--no-write", "--workdir")):
            skip = a in ("--output", "--workdir")
            continue
        shown.append(a)
    return f"python benchmarks/{script}" + ("" if not shown else " " + shlex.join(shown))


def paired_differences(rows: list[dict], name: str, baseline: str) -> tuple[float, float, int, int] | None:
    """``name`` minus ``baseline`` in test accuracy points, seed by seed (same split and data order): mean, std over
    seeds, how many seeds ``name`` is ahead on, and the number of pairs; ``None`` without a pair."""
    base = {r["seed"]: 100 * r["acc"] for r in rows if r["variant"] == baseline}
    diffs = [100 * r["acc"] - base[r["seed"]] for r in rows if r["variant"] == name and r["seed"] in base]
    if not diffs:
        return None
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return statistics.mean(diffs), std, sum(d > 0 for d in diffs), len(diffs)


class OneShotHawq(L.Callback):
    """HAWQ-style peer of the allocators: Hessian-diagonal (Hutchinson) sensitivities of the FP weights on the first
    training batch + the exact MILP under an average-weight-bit budget; the bits are fixed before QAT starts.

    Runs in ``on_fit_start`` (after one forward with quantizers on, which initialises the step sizes the noise model
    needs); ``seconds`` is its wall time. With ``recalibrate`` the weight step sizes of the layers whose width changed
    are re-initialised from the weights at the new width (as a first forward at that width would set them);
    otherwise they keep their range.
    """

    def __init__(
        self,
        datamodule,
        samples: int,
        avg: float,
        bit_choices: Sequence[int] = tuple(range(2, 9)),
        recalibrate: bool = False,
    ) -> None:
        self.datamodule, self.samples, self.avg, self.bit_choices = datamodule, samples, avg, tuple(bit_choices)
        self.recalibrate = recalibrate
        self.seconds = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightning_quant.allocation import (
            avg_bits_constraint,
            hutchinson_sensitivities,
            layer_costs,
            noise_objective_table,
            solve_milp,
        )
        from lightning_quant.surgery import quantized_layers

        start = time.perf_counter()
        x, y = next(iter(self.datamodule.train_dataloader()))
        with torch.no_grad():
            pl_module(x)  # initialise the step sizes

        def loss_fn(m):
            return torch.nn.functional.cross_entropy(m(x), y)

        sens = hutchinson_sensitivities(pl_module, loss_fn, self.samples, torch.Generator().manual_seed(0))
        costs = layer_costs(pl_module)
        names = [n for n, f in zip(costs.names, costs.frozen, strict=True) if not f]
        table = noise_objective_table(np.array([sens[n] for n in names]), self.bit_choices)
        result = solve_milp(table, [avg_bits_constraint(costs, self.avg)], self.bit_choices)
        layers = quantized_layers(pl_module)
        for n, b in zip(names, result.bits, strict=True):
            quantizer = layers[n].weight_quantizer
            if quantizer.bits != int(b):
                quantizer.bits = int(b)
                if self.recalibrate:
                    quantizer.recalibrate(layers[n].weight.detach())
        self.seconds = time.perf_counter() - start


def torch_ao_fuse_groups(model: nn.Module) -> list[list[str]]:
    """The module groups torch.ao's ``fuse_modules_qat`` merges in this repository's reference models.

    CIFAR ResNets (:class:`lightning_quant.models.CifarResNet`): conv+bn+relu of the stem and of each block's first
    convolution, conv+bn of each block's second convolution and of projection shortcuts (the residual addition and
    the ReLU after it stay separate). LeNet-5 (:class:`lightning_quant.models.LeNet5`, no BatchNorm): conv+relu and
    linear+relu.

    Raises:
        ValueError: for another model, whose groups are not known here.
    """
    from lightning_quant.models import CifarResNet, LeNet5

    if isinstance(model, LeNet5):
        return [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"], ["fc2", "relu4"]]
    if not isinstance(model, CifarResNet):
        raise ValueError(
            f"`model` must be a CifarResNet or LeNet5 to fuse for torch.ao, got {type(model).__name__}. "
            "Add its conv+bn(+relu) groups to benchmarks/common.py:torch_ao_fuse_groups."
        )
    groups = [["conv1", "bn1", "relu"]]
    for stage in ("layer1", "layer2", "layer3"):
        for i, block in enumerate(getattr(model, stage)):
            prefix = f"{stage}.{i}"
            groups += [[f"{prefix}.conv1", f"{prefix}.bn1", f"{prefix}.relu1"], [f"{prefix}.conv2", f"{prefix}.bn2"]]
            if not isinstance(block.shortcut, nn.Identity):
                groups.append([f"{prefix}.shortcut.0", f"{prefix}.shortcut.1"])
    return groups


def torch_ao_prepare_qat(model: nn.Module, fused: bool, quantize_input: bool = False) -> nn.Module:
    """torch.ao eager-mode QAT of ``model`` (changed in place; pass a copy to keep it) with the x86 default qconfig.

    ``fused``: ``fuse_modules_qat`` of :func:`torch_ao_fuse_groups` first (what torch.ao's QAT tutorials do: BN folded
    into the fake-quantized weight). ``quantize_input``: wrap the model as ``QuantStub -> model -> DeQuantStub`` so that
    the network input is fake-quantized too (torch.ao quantizes activations only at module outputs); the result is
    then an ``nn.Sequential`` around ``model``. Residual additions stay float either way (eager mode needs
    ``FloatFunctional`` in the model's code for them).
    """
    from torch.ao import quantization as aoq

    model.train()
    if fused:
        model = aoq.fuse_modules_qat(model, torch_ao_fuse_groups(model))
    if quantize_input:
        model = nn.Sequential(aoq.QuantStub(), model, aoq.DeQuantStub())
    model.qconfig = aoq.get_default_qat_qconfig("x86")
    return aoq.prepare_qat(model)
