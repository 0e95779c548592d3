"""``fold_batchnorm(model)``: fold eval-mode BatchNorm layers into the convolutions that feed them.

A BatchNorm in eval mode is a per-channel affine map ``y = (x - mean) * f + beta`` with
``f = gamma / sqrt(var + eps)``. When its only input is a convolution's output, the map moves into the
convolution: ``w' = w * f`` (per output channel) and ``b' = (b - mean) * f + beta``, and the BatchNorm becomes
an ``nn.Identity`` (or, for an output-quantized :class:`~lightning_quant.surgery.layers.QuantBatchNorm2d`, its
output quantizer). This is what deployment runtimes need (an unfolded BatchNorm keeps a conv out of
``QLinearConv``), and what threshold-tuning techniques need before they calibrate.

Quantized convolutions (:class:`~lightning_quant.surgery.layers.QuantizedLayer`): scaling output channel
``c`` of the weight by ``f_c`` is matched by scaling that channel's step size by ``|f_c|``. With per-channel
symmetric weights this keeps every weight on the *same* integer (its sign flips where ``f_c < 0``), so the
folded quantized conv computes the quantized conv followed by the BatchNorm, up to float rounding -- the fold
is exact and nothing needs recalibrating. One exception: the signed grid ``[-2^(b-1), 2^(b-1) - 1]`` is not
symmetric, so in a channel with a *negative* factor (``gamma < 0``, rare after training) a weight at either end
of the grid moves by one step (``-8`` becomes ``+7`` at 4 bits, and a weight clipped at ``+7`` may become
``-8``). And float rounding can break an exact rounding tie the other way: symmetric observers put a
channel's largest weight exactly on ``w / s = qmin + 0.5`` (e.g. ``-7.5``), which may then round to ``-7``.

Where keeping the integers is impossible (per-tensor weight step sizes, or an asymmetric weight grid with some
``f_c < 0``), the weight quantizer must be recalibrated on the folded weight:
``inexact="recalibrate"`` (the default) resets its observer and sets the step size from the new weight (the
integers then differ from the unfolded model's: the result is close but not exact), ``inexact="skip"``
leaves that pair unfolded, and ``inexact="error"`` raises.

Pairs are found by tracing the model with :mod:`torch.fx` (convolutions, quantized layers and BatchNorms are
leaves), which also checks that the convolution's output feeds nothing but the BatchNorm. A model that fx
cannot trace (data-dependent control flow) falls back to consecutive ``(conv, bn)`` children of
``nn.Sequential`` containers, with a logged warning.
"""

from __future__ import annotations

import itertools
import logging
from typing import Literal

import torch
from torch import fx, nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.surgery.graph import BN_TYPES, CONV_TYPES, trace
from lightning_quant.surgery.layers import QuantizedBatchNorm, QuantizedLayer

log = logging.getLogger(__name__)

__all__ = ["INEXACT_CHOICES", "FoldedBatchNorm", "find_conv_bn_pairs", "fold_batchnorm"]

#: what :func:`fold_batchnorm` does where a quantized conv cannot keep its integers exactly
INEXACT_CHOICES: tuple[str, ...] = ("recalibrate", "skip", "error")


class FoldedBatchNorm(nn.Identity):
    """What a folded BatchNorm leaves behind: an identity that records the fold.

    :meth:`QuantSpec.from_model <lightning_quant.surgery.QuantSpec.from_model>` reads it, so a recipe saved from a
    folded model folds the freshly built model too before loading the state (whose convs have the folded biases
    and no BatchNorm statistics).
    """


def _pairs_by_tracing(model: nn.Module) -> list[tuple[str, str]]:
    graph = trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), BN_TYPES):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), CONV_TYPES)
            and len(source.users) == 1
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _pairs_in_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(conv, CONV_TYPES) and isinstance(bn, BN_TYPES):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` pairs where the BatchNorm's only input is the conv's output.

    The same conv may be called at several places (a shared layer); then it has several users and is not
    paired.
    """
    try:
        pairs = _pairs_by_tracing(model)
    except Exception as err:  # fx raises many kinds of errors on untraceable models
        log.warning(
            "fold_batchnorm: torch.fx could not trace %s (%s: %s); folding only consecutive Conv/BatchNorm "
            "children of nn.Sequential containers.",
            type(model).__name__,
            type(err).__name__,
            err,
        )
        pairs = _pairs_in_sequentials(model)
    # the same BatchNorm module called twice (or fed by two convs) cannot be folded into either
    bn_names = [bn for _, bn in pairs]
    conv_names = [conv for conv, _ in pairs]
    return [(c, b) for c, b in pairs if bn_names.count(b) == 1 and conv_names.count(c) == 1]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    target = dict(model.named_modules())[name]
    for parent in model.modules():
        for attr, child in list(parent._modules.items()):
            if child is target:
                parent._modules[attr] = new


def _channel_shape(weight: torch.Tensor) -> list[int]:
    return [-1] + [1] * (weight.dim() - 1)


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module, *, inexact: Literal["recalibrate", "skip", "error"] = "recalibrate"
) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a convolution into it, in place (see the module docs).

    The BatchNorm's running statistics are used (eval-mode semantics), whatever mode the model is in; it is
    replaced by ``nn.Identity``. A conv without bias gets one. Parameter objects are kept (their values
    change), so optimizers stay valid. Works on float and quantized models.

    Args:
        model: the model.
        inexact: for a quantized conv whose integers cannot be kept exactly: ``recalibrate`` its weight
            quantizer on the folded weight, ``skip`` the pair, or raise (``error``).

    Returns:
        The folded ``(conv name, batchnorm name)`` pairs.

    Raises:
        QuantizationConfigError: an unknown ``inexact``, or ``inexact="error"`` and an inexact pair.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> x = torch.randn(1, 3, 8, 8)
        >>> before = net(x)
        >>> fold_batchnorm(net)
        [('0', '1')]
        >>> torch.allclose(net(x), before, atol=1e-6), type(net[1]).__name__
        (True, 'FoldedBatchNorm')
    """
    if inexact not in INEXACT_CHOICES:
        raise QuantizationConfigError(f"`inexact` must be one of {list(INEXACT_CHOICES)}, got {inexact!r}.")
    modules = dict(model.named_modules())
    folded = []
    for conv_name, bn_name in find_conv_bn_pairs(model):
        conv, bn = modules[conv_name], modules[bn_name]
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            log.info("fold_batchnorm: %s uses batch statistics (no running stats); not folded.", bn_name)
            continue
        factor = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            factor = factor * bn.weight
        shift = -bn.running_mean * factor
        if bn.bias is not None:
            shift = shift + bn.bias
        recalibrate = False
        if isinstance(conv, QuantizedLayer):
            quantizer = conv.weight_quantizer
            exact = quantizer.absorbs_channel_factor(factor)
            if not exact and inexact == "error":
                why = (
                    f"a {quantizer.KIND} weight quantizer"
                    if not isinstance(quantizer, UniformQuantizer)
                    else ("per-tensor" if quantizer.ch_axis is None else "asymmetric") + " weight step size"
                )
                raise QuantizationConfigError(
                    f"Folding {bn_name} into the quantized {conv_name} changes its weight integers ({why}). "
                    'HINT: pass `inexact="recalibrate"` (close, not exact) or `inexact="skip"`.'
                )
            if not exact and inexact == "skip":
                log.info("fold_batchnorm: %s -> %s skipped (it would change the weight integers).", bn_name, conv_name)
                continue
            if exact:
                quantizer.absorb_channel_factor(factor)
            recalibrate = not exact
        conv.weight.mul_(factor.reshape(_channel_shape(conv.weight)).to(conv.weight))
        if recalibrate:
            conv.weight_quantizer.recalibrate(conv.weight)
            log.info("fold_batchnorm: recalibrated the weight quantizer of %s after folding %s.", conv_name, bn_name)
        _fold_bias(conv, factor, shift)
        # an output-quantized BatchNorm leaves its quantizer behind, now right after the (folded) conv
        _set_module(model, bn_name, bn.output_quantizer if isinstance(bn, QuantizedBatchNorm) else FoldedBatchNorm())
        folded.append((conv_name, bn_name))
    if folded:
        log.debug("fold_batchnorm: folded %d BatchNorm layers of %s", len(folded), type(model).__name__)
    return folded


def _fold_bias(conv: nn.Module, factor: torch.Tensor, shift: torch.Tensor) -> None:
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.to(conv.weight))
    else:
        conv.bias.copy_(conv.bias * factor.to(conv.bias) + shift.to(conv.bias))
