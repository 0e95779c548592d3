"""``quantize_model(model, spec)``: swap Conv/Linear layers for quantized ones, atomically and idempotently."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_quant.core.codebook import check_shareable, share_codebook
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.quantizers import Quantizer, UniformQuantizer, build_weight_quantizer
from lightning_quant.surgery.coverage import directly_read_layers, unquantized_layers
from lightning_quant.surgery.fastpath import disable_fast_paths, restore_fast_paths
from lightning_quant.surgery.fold import fold_batchnorm
from lightning_quant.surgery.graph import (
    BN_TYPES,
    CONV_TYPES,
    activation_output_placements,
    conv_output_placements,
    op_output_sites,
    residual_activations,
    residual_producers,
    retrace_owners,
    unshared_copy,
    with_op_outputs,
)
from lightning_quant.surgery.layers import (
    OUTPUT_QUANTIZED_TYPES,
    QUANTIZED_TYPES,
    GatedActivation,
    OutputQuantized,
    QuantizedLayer,
    activation_quantizer,
    quantized_layers,
    quantizers,
    unsupported_reason,
)
from lightning_quant.surgery.spec import LayerSpec, QuantSpec

log = logging.getLogger(__name__)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Float layers of ``model`` that :func:`quantize_model` can swap, by name, in registration order.

    Layers whose parent reads their weight directly instead of calling them are not among them: swapped, they
    would never run quantized (:func:`~lightning_quant.surgery.coverage.directly_read_layers`).
    """
    bypassed = directly_read_layers(model)
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) in QUANTIZED_TYPES and unsupported_reason(m) is None and name not in bypassed
    }


def layer_candidates(model: nn.Module) -> dict[str, str]:
    """Every layer a spec may select, float or already quantized: name -> layer type name, in registration order.

    Already-quantized layers take part in pattern checks and the first/last rule, so a second
    :func:`quantize_model` with the same spec resolves the same way and swaps nothing.
    """
    float_layers = quantizable_layers(model)
    done = quantized_layers(model)
    return {
        name: (m.float_type if isinstance(m, QuantizedLayer) else type(m)).__name__
        for name, m in model.named_modules()
        if name in float_layers or name in done
    }


def _references(model: nn.Module, target: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """Every ``(parent, attribute)`` that holds ``target`` (a layer shared by two parents has two)."""
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is target:
                yield parent, attr


def quantize_model(model: nn.Module, spec: QuantSpec | None = None) -> nn.Module:
    """Swap the Conv/Linear layers that ``spec`` selects for quantized layers, in place; returns ``model``.

    * The quantized layers keep the same ``Parameter`` objects, so existing optimizers and checkpoints of the
      float model stay valid.
    * Idempotent: layers that are already quantized are left as they are.
    * Atomic: the spec is resolved and every new layer is built before the first swap, so any error leaves
      ``model`` exactly as it was.
    * A layer used in several places (a shared layer) becomes one quantized layer used in the same places.
    * With ``spec.fold_batchnorm``, BatchNorms are folded into their convolutions first (after every check).
    * With ``spec.quantize_residuals``, the tensors that enter residual additions from a quantized conv (or
      the BatchNorm right after it) get an output quantizer too (see :class:`QuantSpec`).
    * New quantizer parameters follow the ``requires_grad`` of the layer they quantize (frozen layers get frozen
      step sizes; see ``BaseFinetuning`` in the README).
    * ``nn.TransformerEncoderLayer`` blocks that hold a quantized layer no longer take PyTorch's fused inference
      path, which would bypass it (see :mod:`~lightning_quant.surgery.fastpath`).

    Args:
        model: any ``nn.Module`` (a ``LightningModule`` included).
        spec: the recipe; ``QuantSpec()`` (W8A8, first/last layers 8-bit) when ``None``.

    Raises:
        QuantizationConfigError: the spec selects nothing, names unknown layers, or is malformed.

    Example:
        >>> from torch import nn
        >>> net = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
        >>> type(net[0]).__name__
        'QuantLinear'
    """
    spec = QuantSpec() if spec is None else spec
    if not isinstance(spec, QuantSpec):
        raise QuantizationConfigError(
            f"`spec` must be a QuantSpec, got {type(spec).__name__}. HINT: `QuantSpec.from_dict(...)` reads a dict."
        )
    float_layers = quantizable_layers(model)
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if low:
        raise QuantizationConfigError(
            f"`model` has parameters in {', '.join(low)}: quantization-aware training needs float32 (or float64) "
            "weights to accumulate small updates and learn step sizes. HINT: keep the weights in float32 "
            "(`model.float()`) and train in low precision with `Trainer(precision='bf16-mixed')`."
        )
    candidates = layer_candidates(model)
    if not candidates:
        raise QuantizationConfigError(
            f"`model` ({type(model).__name__}) has no layer that can be quantized; supported types are "
            f"{sorted(t.__name__ for t in QUANTIZED_TYPES)}."
        )
    resolved = spec.resolve(candidates)
    if not resolved:
        raise QuantizationConfigError(
            "The spec selects no layer of `model`: check `include`, `exclude` and `exclude_types` "
            f"against the quantizable layers {list(candidates)[:12]}."
        )
    for name, layer_spec in resolved.items():
        if name in float_layers:  # a spec that does not fit its layer fails here, before anything changes
            layer = float_layers[name]
            build_weight_quantizer(QUANTIZED_TYPES[type(layer)].float_weight(layer), layer_spec, f"Layer {name!r}")
    if spec.quantize_residuals:
        # an untraceable model fails here, before anything changes; then give each use of a ReLU module that is
        # called twice (torchvision's BasicBlock), and each functional ReLU at an addition, a module of its own,
        # so each can carry its quantizer
        owners = retrace_owners(model)
        modules = dict(model.named_modules())
        for name in owners:
            for parent, attr in list(_references(model, modules[name])):
                parent._modules[attr] = unshared_copy(modules[name])
        if owners:
            log.info("quantize_model: %d modules re-traced so that each ReLU use is its own module", len(owners))
        _insert_op_outputs(model, resolved)
    if spec.fold_batchnorm:
        fold_batchnorm(model)
    requested = dict(resolved)
    residual_bns = _add_residual_outputs(model, resolved) if spec.quantize_residuals else {}
    activations = residual_activations(model) if spec.quantize_residuals else {}
    output_shares = _add_conv_outputs(model, resolved, residual_bns, activations) if spec.quantize_residuals else {}
    op_outputs = _op_output_placements(model, resolved, activations) if spec.quantize_residuals else {}
    found_residuals = bool(residual_bns or activations or op_outputs or resolved != requested)
    # build everything first: nothing below this point raises on user input
    swaps: dict[nn.Module, nn.Module] = {
        float_layers[name]: QUANTIZED_TYPES[type(float_layers[name])].from_float(float_layers[name], layer_spec, name)
        for name, layer_spec in resolved.items()
        if name in float_layers
    }
    for bn, (layer_spec, bits) in residual_bns.items():
        swaps[bn] = OUTPUT_QUANTIZED_TYPES[type(bn)].from_float(bn, activation_quantizer(layer_spec, bits))
    groups = _codebook_groups(model, resolved, float_layers, swaps)
    for members in groups.values():
        check_shareable([q for _, q in members], [f"Layer {n!r}" for n, _ in members])
    for members in groups.values():
        share_codebook([q for _, q in members])
    _share_activation_quantizers(model, spec, {**{a: (True, c) for a, c in activations.items()}, **op_outputs}, swaps)
    _share_output_quantizers(model, output_shares, swaps)
    _follow_requires_grad(swaps)
    for old, new in swaps.items():
        for parent, attr in list(_references(model, old)):
            parent._modules[attr] = new
    disable_fast_paths(model)  # fused transformer kernels would bypass the quantized layers in eval mode
    if swaps:
        log.debug("Quantized %d layers of %s", len(swaps), type(model).__name__)
        _warn_what_does_not_apply(model, spec, requested, found_residuals)
    return model


def _codebook_groups(
    model: nn.Module,
    resolved: dict[str, LayerSpec],
    float_layers: dict[str, nn.Module],
    swaps: dict[nn.Module, nn.Module],
) -> dict[str, list[tuple[str, Quantizer]]]:
    """The weight quantizers of each shared codebook (``LayerSpec.codebook_share``), in registration order."""
    done = quantized_layers(model)
    groups: dict[str, list[tuple[str, Quantizer]]] = {}
    for name, layer_spec in resolved.items():
        if layer_spec.codebook_share is None:
            continue
        layer = swaps[float_layers[name]] if name in float_layers else done[name]
        assert isinstance(layer, QuantizedLayer)
        groups.setdefault(layer_spec.codebook_share, []).append((name, layer.weight_quantizer))
    return groups


def _warn_what_does_not_apply(
    model: nn.Module, spec: QuantSpec, resolved: dict[str, LayerSpec], found_residuals: bool
) -> None:
    """Say (once, when the model is first quantized) what the spec asked for that this model does not get."""
    name = type(model).__name__
    default, first_last = spec.default, spec.first_last_bits
    asked = {default.weight_bits, *(() if default.act_bits is None else (default.act_bits,))}
    if first_last is not None and len(resolved) <= 2 and asked != {first_last}:
        if all(layer.weight_bits == first_last for layer in resolved.values()):
            bits = f"W{default.weight_bits}A{default.act_bits or 'fp'}"
            warnings.warn(
                f"quantize_model: {bits} applies to no layer of {name}: its quantized layers {list(resolved)} are all "
                f"its first or last layer, which stay at `first_last_bits={first_last}`, so it trains at "
                f"{first_last} bits. HINT: pass `first_last_bits=None` (to QuantizationAwareTraining or QuantSpec) "
                "to quantize them at the requested bits too.",
                stacklevel=3,
            )
    if spec.quantize_residuals and not found_residuals:
        warnings.warn(
            f"quantize_model: `quantize_residuals=True` found no residual addition fed by a quantized layer in {name}, "
            "so it adds no quantizer. HINT: drop `quantize_residuals` for a model without skip connections (or "
            "set `LayerSpec.output_bits` where tracing cannot see the addition).",
            stacklevel=3,
        )
    floating = unquantized_layers(model)
    if floating:
        listed = "; ".join(f"{layer} ({reason})" for layer, reason in floating.items())
        warnings.warn(
            f"quantize_model: {len(floating)} weight layer(s) of {name} stay in float: {listed}. "
            "`quantization_summary(model)` lists them too.",
            stacklevel=3,
        )


def _add_residual_outputs(model: nn.Module, resolved: dict[str, LayerSpec]) -> dict[nn.Module, tuple[LayerSpec, int]]:
    """Give the selected layers that feed a residual addition an output quantizer (``resolved`` is updated)
    and return the float BatchNorms after a selected conv that feed one, with the spec and bits to use."""
    modules = dict(model.named_modules())
    bns: dict[nn.Module, tuple[LayerSpec, int]] = {}
    for producer, source in residual_producers(model).items():
        layer_spec = resolved.get(source)
        if layer_spec is None or layer_spec.act_bits is None:
            continue  # a float layer, or one with float inputs: its output stays float as well
        if producer == source:
            if layer_spec.output_bits is None:
                resolved[source] = dataclasses.replace(layer_spec, output_bits=layer_spec.act_bits)
        elif type(modules[producer]) in OUTPUT_QUANTIZED_TYPES:  # not yet output-quantized
            bns[modules[producer]] = (layer_spec, layer_spec.act_bits)
    return bns


def _add_conv_outputs(
    model: nn.Module,
    resolved: dict[str, LayerSpec],
    residual_bns: dict[nn.Module, tuple[LayerSpec, int]],
    activations: dict[str, list[str]],
) -> dict[str, list[str]]:
    """Give every quantized conv whose output an int8 runtime cannot otherwise quantize an output quantizer.

    What the residual rules above (additions) leave, :func:`~lightning_quant.surgery.graph.conv_output_placements`
    finds for any graph: the conv itself (``output_bits`` in ``resolved``), the BatchNorm after it (added to
    ``residual_bns``) or the ReLU after those (added to ``activations``, which share with the layers they feed).
    Returns the convs and BatchNorms given a quantizer here, with the quantized layers that should share it.
    """
    modules = dict(model.named_modules())
    quantized_inputs = {name for name, layer_spec in resolved.items() if layer_spec.act_bits is not None}
    handled = {name for name, m in modules.items() if m in residual_bns} | set(activations)
    shares: dict[str, list[str]] = {}
    for end, (conv, consumers) in conv_output_placements(model, quantized_inputs).items():
        module = modules[end]
        if end in handled or isinstance(module, OutputQuantized):
            continue
        if isinstance(module, CONV_TYPES):
            layer_spec = resolved[conv]
            if layer_spec.output_bits is None:
                resolved[end] = dataclasses.replace(layer_spec, output_bits=layer_spec.act_bits)
                shares[end] = consumers
        elif type(module) in OUTPUT_QUANTIZED_TYPES and isinstance(module, BN_TYPES):
            layer_spec = resolved[conv]
            residual_bns[module] = (layer_spec, layer_spec.act_bits)
            shares[end] = consumers
        elif type(module) in OUTPUT_QUANTIZED_TYPES:
            activations[end] = consumers
    return shares


def _share_output_quantizers(model: nn.Module, shares: dict[str, list[str]], swaps: dict[nn.Module, nn.Module]) -> None:
    """The quantized layers fed by a new output quantizer use it as their input quantizer (one grid, one Q/DQ)."""
    modules = dict(model.named_modules())
    for producer, consumers in shares.items():
        new = swaps.get(modules[producer])
        quantizer = getattr(new, "output_quantizer", None)
        if not isinstance(quantizer, Quantizer):
            continue
        for name in consumers:
            layer = swaps.get(modules[name], modules[name])
            if isinstance(layer, QuantizedLayer) and isinstance(layer.input_quantizer, Quantizer):
                layer.input_quantizer = quantizer


def _insert_op_outputs(model: nn.Module, resolved: dict[str, LayerSpec]) -> None:
    """Re-trace the modules whose additions, products or concatenations need an output quantizer, with an
    :class:`~lightning_quant.surgery.graph.OpOutput` marker after each (see
    :func:`~lightning_quant.surgery.graph.op_output_sites`); what cannot be re-traced stays in float, said once."""
    quantized_inputs = {name for name, layer_spec in resolved.items() if layer_spec.act_bits is not None}
    sites, at_root = op_output_sites(model, quantized_inputs)
    modules = dict(model.named_modules())
    skipped = list(at_root)
    for owner, indices in sites.items():
        retraced = with_op_outputs(modules[owner], indices)
        if retraced is None:
            skipped.append(f"{len(indices)} in {owner!r} ({type(modules[owner]).__name__})")
            continue
        for parent, attr in list(_references(model, modules[owner])):
            parent._modules[attr] = retraced
    if skipped:
        log.info(
            "quantize_model: these additions/products/concatenations keep a float output (an int8 runtime runs them "
            "between DequantizeLinear and QuantizeLinear): %s -- the model's own forward, or a forward fx cannot "
            "re-trace on its own",
            "; ".join(skipped),
        )


def _op_output_placements(
    model: nn.Module, resolved: dict[str, LayerSpec], activations: dict[str, list[str]]
) -> dict[str, tuple[bool, list[str]]]:
    """The op markers, sigmoid gates and SiLU/hardswish that get quantizers (the ReLUs of ``activations`` aside)."""
    quantized_inputs = {name for name, layer_spec in resolved.items() if layer_spec.act_bits is not None}
    placements = activation_output_placements(model, quantized_inputs)
    return {name: placement for name, placement in placements.items() if name not in activations}


def _share_activation_quantizers(
    model: nn.Module,
    spec: QuantSpec,
    activations: dict[str, tuple[bool, list[str]]],
    swaps: dict[nn.Module, nn.Module],
) -> None:
    """Add the output-quantized activations and op markers to ``swaps``: ``{name: (needs an output quantizer,
    consumers)}``. Each output quantizer is shared with the quantized layers it feeds (their input quantizers
    become that one module), so the tensor has one grid; SiLU and hardswish also get a quantizer on their gate."""
    modules = dict(model.named_modules())
    for name, (needs_output, consumers) in activations.items():
        module = modules[name]
        if type(module) not in OUTPUT_QUANTIZED_TYPES:
            continue  # already quantized
        quantized = OUTPUT_QUANTIZED_TYPES[type(module)]
        layers = [swaps.get(modules[c], modules[c]) for c in consumers]
        layers = [m for m in layers if isinstance(m, QuantizedLayer) and isinstance(m.input_quantizer, Quantizer)]
        bits, device = spec.default.act_bits, _device(module, model)
        if (needs_output and not layers) or issubclass(quantized, GatedActivation):
            if bits is None:
                continue  # a new quantizer takes the default activation width, and there is none
        shared: nn.Module = nn.Identity()
        if needs_output and layers:
            shared = layers[0].input_quantizer
            for layer in layers[1:]:
                layer.input_quantizer = shared
        elif needs_output:
            shared = activation_quantizer(spec.default, bits, device)
        if issubclass(quantized, GatedActivation):
            gate = activation_quantizer(spec.default, bits, device)
            swaps[module] = quantized.from_gated(module, gate, shared)
        elif needs_output:
            swaps[module] = quantized.from_float(module, shared)


def _follow_requires_grad(swaps: dict[nn.Module, nn.Module]) -> None:
    """New quantizer parameters train only where a layer they quantize trains (``requires_grad``).

    A frozen backbone (frozen by the user, or by Lightning's ``BaseFinetuning``, which freezes and unfreezes by
    ``requires_grad`` and later adds the unfrozen parameters to the optimizer) then gets frozen step sizes too, and
    unfreezing the backbone's modules unfreezes them with it. Every parameter the swap adds counts (weight and
    activation quantizers of any kind, the extra weight quantizers of recurrent layers, those of attention's output
    projection); a quantizer shared by several layers trains if any of them does; modules without parameters of
    their own (ReLUs) have no say. Parameters are only ever frozen here, never unfrozen.
    """
    trains: dict[nn.Parameter, bool] = {}
    for old, new in swaps.items():
        own = list(old.parameters())
        if not own:
            continue
        layer_trains = any(p.requires_grad for p in own)
        old_ids = {id(p) for p in own}
        for p in new.parameters():
            if id(p) not in old_ids:
                trains[p] = trains.get(p, False) or layer_trains
    for p, flag in trains.items():
        if not flag:
            p.requires_grad_(False)


def _device(module: nn.Module, model: nn.Module):
    tensors = [*module.parameters(), *module.buffers()] or [*model.parameters(), *model.buffers()]
    return tensors[0].device if tensors else None


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every quantized layer back to its float layer (same parameters), in place; returns ``model``."""
    output_quantized = [m for m in model.modules() if isinstance(m, OutputQuantized)]
    for layer in [*quantized_layers(model).values(), *output_quantized]:
        float_layer = layer.to_float()
        for parent, attr in list(_references(model, layer)):
            parent._modules[attr] = float_layer
    restore_fast_paths(model)
    return model


def set_observing(model: nn.Module, observing: bool) -> None:
    """Turn range observation (calibration) on or off for every quantizer of ``model``."""
    for quantizer in quantizers(model).values():
        quantizer.observing = observing


def calibrate(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Post-training calibration without a Trainer: every quantizer observes the ranges of ``batches``.

    The model runs in eval mode (BatchNorm uses its running statistics, dropout is off) while its quantizers run in
    training mode with observation on, so they set their ranges from what they see; afterwards observation is off
    and the whole model is in eval mode, ready for :func:`~lightning_quant.export_onnx`::

        quantize_model(model, QuantSpec())  # W8A8
        calibrate(model, itertools.islice(loader, 8))

    Args:
        model: a quantized model.
        batches: model inputs: tensors, or ``(inputs, ...)`` tuples/lists (the first element is fed).

    Returns:
        ``model``, in eval mode.
    """
    modules = list(quantizers(model).values())
    if not modules:
        raise QuantizationConfigError(
            "`model` has no quantizer to calibrate. HINT: call `quantize_model(model, spec)` first."
        )
    model.eval()
    for quantizer in modules:
        quantizer.train()
        quantizer.observing = True
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for quantizer in modules:
            quantizer.observing = False
        model.eval()
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` contains at least one quantized layer."""
    return any(isinstance(m, QuantizedLayer) for m in model.modules())


__all__ = [
    "UniformQuantizer",
    "calibrate",
    "dequantize_model",
    "is_quantized",
    "layer_candidates",
    "quantizable_layers",
    "quantize_model",
    "set_observing",
]
