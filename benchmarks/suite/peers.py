"""Peer toolkits' QAT on the same model, data, bits, epochs and Lightning recipe as lightning-quant's LSQ QAT.

:func:`run_peer` builds one peer-quantized copy of a float backbone, wraps it in the same
:class:`~lightning_quant.models.ImageClassifier` (``lr``, cosine schedule, its default Adam), trains it with the same
quiet Lightning Trainer for the same epochs after ``L.seed_everything(seed)``, and reports the test accuracy of the
datamodule's test split, beside lightning-quant's own ``QuantizationAwareTraining`` (per-channel LSQ weights,
LSQ inputs of every Conv/Linear, first and last layer at 8 bits, activation ranges calibrated on the first 16
training batches). The peers run in the bench environment only (``benchmarks/requirements.txt``), never as package
dependencies; one that is missing or fails gives a row with ``accuracy=None`` and the reason.

The peers, and the choices made to put them on our recipe:

* **Brevitas** (LSQ-style): every ``nn.Conv2d`` / ``nn.Linear`` becomes ``brevitas.nn.QuantConv2d`` /
  ``QuantLinear`` carrying the float weights, with

  - weights: ``Int8WeightPerChannelFloatMSE`` -- per-output-channel scale of scaling type
    ``ScalingImplType.PARAMETER_FROM_STATS``, i.e. a ``torch.nn.Parameter`` initialised on the first forward from a
    statistic of the weights (here Brevitas' MSE search, the counterpart of our MSE weight observer) and then
    learned by the STE gradient, in the linear domain (``RestrictValueType.FP``) as LSQ does. Brevitas' weight
    grid is narrow by default (``[-(2^(b-1)-1), 2^(b-1)-1]``, ternary at 2 bits); it is set to the full signed
    grid ``[-2^(b-1), 2^(b-1)-1]`` (``narrow_range=False``) that LSQ and our weights use.
  - inputs: ``ShiftedUint8ActPerTensorFloat`` as ``input_quant`` -- an asymmetric per-tensor grid (unsigned codes
    with a zero point, like our asymmetric inputs, so the first layer's signed images and later post-ReLU inputs
    both fit), scale and zero point both ``PARAMETER_FROM_STATS`` parameters initialised from percentile
    statistics of the runtime inputs. Brevitas collects those statistics over its first ``collect_stats_steps``
    training forwards (default 300) and learns the parameters afterwards; it is set to
    :data:`CALIBRATION_BATCHES` (16), the same number of batches our QAT calibrates on -- with the default an
    epoch of a few hundred steps would never learn them.
  - ``bits`` for both, the first and last layer (registration order) at ``first_last_bits``; biases float, no
    output quantizer (as ours). Differences that remain: Brevitas does not apply LSQ's gradient scale
    ``1/sqrt(N * qmax)`` to the scale's gradient, and its input zero point is learned (ours is fixed).
* **NNCF** W8A8, the PyTorch QAT flow of NNCF 3.x: ``nncf.quantize(model, nncf.Dataset(loader, transform))`` (its
  post-training quantization inserts fake-quantizers with trainable ranges and initialises them; defaults: preset
  ``PERFORMANCE``, symmetric per-channel weights and symmetric activations, quantizers where an int8 runtime needs
  them, residual additions included), then the returned model is fine-tuned. Its calibration reads the first
  :data:`CALIBRATION_BATCHES` batches of the training loader (``subset_size`` counts loader items).
* **torch.ao** eager-mode QAT W8A8: conv+bn(+relu) (LeNet-5: conv+relu, linear+relu) fused with
  ``fuse_modules_qat``, the model wrapped as ``QuantStub -> model -> DeQuantStub`` so the network input is
  fake-quantized like ours, ``prepare_qat`` with ``get_default_qat_qconfig("x86")`` (per-channel weights,
  activations fake-quantized at module outputs, observers on during training as torch.ao leaves them);
  observers are disabled before testing, so test data does not move the ranges. The residual addition of our
  ResNets stays float (eager mode needs ``FloatFunctional`` in the model's code): the row's ``note`` says so.

``seconds`` is the wall time of ``trainer.fit`` (quantizing the model, NNCF's first-call compile included, is
not in it).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from benchmarks.common import quiet_trainer, torch_ao_prepare_qat
from lightning_quant.models import CifarResNet, ImageClassifier

__all__ = ["CALIBRATION_BATCHES", "NOT_INSTALLED", "PEERS", "PEER_BITS", "PeerRow", "run_peer"]

log = logging.getLogger(__name__)

PEERS = ("Brevitas", "NNCF", "torch.ao")
PEER_BITS = {"Brevitas": (8, 4, 2), "NNCF": (8,), "torch.ao": (8,)}  # W=A bits each peer is run at

#: the reason of a row whose peer cannot be imported
NOT_INSTALLED = "not installed (pip install -r benchmarks/requirements.txt)"
#: training batches that initialise the peers' activation ranges (QuantizationAwareTraining's default)
CALIBRATION_BATCHES = 16
#: seconds NNCF may take to compile its extension on first use (its own default, 60 s, is too short on 2 busy cores)
NNCF_EXTENSION_TIMEOUT_S = 900

_MODULES = {"Brevitas": "brevitas", "NNCF": "nncf", "torch.ao": "torch.ao.quantization"}
_DISTRIBUTIONS = {"Brevitas": "brevitas", "NNCF": "nncf", "torch.ao": "torch"}


@dataclass
class PeerRow:
    """One peer's result at one bit width and seed."""

    peer: str  # one of PEERS
    version: str | None  # the installed package version (torch's for torch.ao), None if not installed
    bits: int  # weight = activation bits
    seed: int
    accuracy: float | None  # test accuracy in [0, 1] (the datamodule's test split), None when it could not run
    reason: str | None  # why it could not run (not installed, an exception's type and message), else None
    seconds: float  # wall time of the fine-tune
    note: str | None = None  # a caveat of a row that did run (what the peer leaves unquantized)


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _float_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``nn.Conv2d`` / ``nn.Linear`` layers of ``model`` in registration order."""
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def _brevitas(backbone: nn.Module, bits: int, datamodule: L.LightningDataModule, first_last_bits: int) -> nn.Module:
    """Swap every Conv2d/Linear of ``backbone`` (in place) for Brevitas layers with learned scales (see above)."""
    from brevitas.nn import QuantConv2d, QuantLinear
    from brevitas.quant import Int8WeightPerChannelFloatMSE, ShiftedUint8ActPerTensorFloat

    weight_quant = Int8WeightPerChannelFloatMSE.let(narrow_range=False)
    input_quant = ShiftedUint8ActPerTensorFloat.let(collect_stats_steps=CALIBRATION_BATCHES)
    layers = _float_layers(backbone)
    for index, (name, layer) in enumerate(layers):
        width = first_last_bits if index in (0, len(layers) - 1) else bits
        common = {
            "bias": layer.bias is not None,
            "weight_quant": weight_quant,
            "weight_bit_width": width,
            "input_quant": input_quant,
            "input_bit_width": width,
        }
        if isinstance(layer, nn.Conv2d):
            quant: nn.Module = QuantConv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=layer.groups,
                padding_mode=layer.padding_mode,
                **common,
            )
        else:
            quant = QuantLinear(layer.in_features, layer.out_features, **common)
        with torch.no_grad():  # in place: Brevitas' weight statistics track these Parameter objects
            quant.weight.copy_(layer.weight)
            if layer.bias is not None:
                quant.bias.copy_(layer.bias)
        backbone.set_submodule(name, quant)
    return backbone


def _nncf(backbone: nn.Module, bits: int, datamodule: L.LightningDataModule, first_last_bits: int) -> nn.Module:
    """``nncf.quantize`` on the first :data:`CALIBRATION_BATCHES` training batches (NNCF 3.x's QAT start)."""
    # NNCF compiles its C++ fake-quant extension on first use and gives up after 60 s by default; a busy 2-core
    # machine takes longer (a user's own setting wins)
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", str(NNCF_EXTENSION_TIMEOUT_S))
    import nncf

    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = nncf.Dataset(datamodule.train_dataloader(), lambda batch: batch[0])
    # keep NNCF's progress bars (stdout) and info lines out of the suite's output
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return nncf.quantize(backbone.eval(), dataset, subset_size=CALIBRATION_BATCHES)
    finally:
        nncf_log.setLevel(level)


def _torch_ao(backbone: nn.Module, bits: int, datamodule: L.LightningDataModule, first_last_bits: int) -> nn.Module:
    """torch.ao eager QAT: fused, input stub, x86 default QAT qconfig."""
    return torch_ao_prepare_qat(backbone, fused=True, quantize_input=True)


def _stop_torch_ao_observers(model: nn.Module) -> None:
    from torch.ao.quantization import disable_observer

    model.apply(disable_observer)


_BUILDERS: dict[str, Callable[[nn.Module, int, L.LightningDataModule, int], nn.Module]] = {
    "Brevitas": _brevitas,
    "NNCF": _nncf,
    "torch.ao": _torch_ao,
}
_BEFORE_TEST: dict[str, Callable[[nn.Module], None]] = {"torch.ao": _stop_torch_ao_observers}


def _note(peer: str, backbone: nn.Module) -> str | None:
    if peer == "torch.ao" and isinstance(backbone, CifarResNet):
        return "residual additions stay float (torch.ao eager mode needs FloatFunctional in the model's code)"
    return None


def run_peer(
    peer: str,
    bits: int,
    *,
    make_backbone: Callable[[], nn.Module],
    float_state: dict[str, Tensor],
    make_datamodule: Callable[[int], L.LightningDataModule],
    epochs: int,
    lr: float,
    seed: int,
    accelerator: str = "cpu",
    workdir: Path,
    first_last_bits: int = 8,
) -> PeerRow:
    """QAT of one peer toolkit from trained float weights, on our recipe; test accuracy in a :class:`PeerRow`.

    Args:
        peer: one of :data:`PEERS`.
        bits: weight = activation bits, one of ``PEER_BITS[peer]``.
        make_backbone: returns a fresh float backbone.
        float_state: the trained float backbone's state dict, loaded (strictly) into the fresh backbone.
        make_datamodule: ``seed -> datamodule``; its test split is what the accuracy is measured on.
        epochs: training epochs of the fine-tune.
        lr: learning rate of :class:`~lightning_quant.models.ImageClassifier` (cosine schedule).
        seed: passed to ``L.seed_everything`` before the model is built, and to ``make_datamodule``.
        accelerator: the Trainer's accelerator.
        workdir: the Trainer's ``default_root_dir``.
        first_last_bits: bits of the first and last Conv/Linear (Brevitas; the others run at 8 bits only).

    Returns:
        The row; a peer that is not installed or fails gives ``accuracy=None`` and the reason (never raises for it).

    Raises:
        ValueError: if ``peer`` or ``bits`` is not one this suite runs (before any work).
    """
    if peer not in PEERS:
        raise ValueError(f"`peer` must be one of {PEERS}, got {peer!r}.")
    if bits not in PEER_BITS[peer]:
        raise ValueError(f"`bits` for {peer} must be one of {PEER_BITS[peer]}, got {bits!r}.")
    try:
        importlib.import_module(_MODULES[peer])
        version = metadata.version(_DISTRIBUTIONS[peer]) if peer != "torch.ao" else torch.__version__
    except ImportError:
        return PeerRow(peer, None, bits, seed, None, NOT_INSTALLED, 0.0)

    seconds, note = 0.0, None
    try:
        L.seed_everything(seed, verbose=False)
        backbone = make_backbone()
        backbone.load_state_dict(float_state, strict=True)
        note = _note(peer, backbone)
        num_classes = getattr(backbone, "num_classes", 10)
        datamodule = make_datamodule(seed)
        # training mode as a fresh model has it (Lightning keeps the modes it finds; NNCF returns an eval model)
        quantized = _BUILDERS[peer](backbone, bits, datamodule, first_last_bits).train()
        model = ImageClassifier(quantized, num_classes=num_classes, lr=lr, scheduler="cosine")
        trainer = quiet_trainer(epochs, [], workdir, accelerator=accelerator)
        start = time.perf_counter()
        try:
            trainer.fit(model, datamodule=datamodule)
        finally:
            seconds = time.perf_counter() - start
        _BEFORE_TEST.get(peer, lambda _: None)(quantized)
        accuracy = float(trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"])
    except Exception as exc:  # a peer's failure is a result to report, not a crash of the suite
        log.warning("%s W%dA%d (seed %d) failed: %s", peer, bits, bits, seed, _reason(exc))
        return PeerRow(peer, version, bits, seed, None, _reason(exc), seconds, note)
    return PeerRow(peer, version, bits, seed, accuracy, None, seconds, note)
