"""Keep PyTorch's fused transformer inference path from bypassing quantized layers.

In eval mode under ``no_grad`` -- how Lightning validates, tests and predicts, and how an export traces --
``nn.TransformerEncoderLayer.forward`` runs one fused kernel (``torch._transformer_encoder_layer_fwd``) that reads
``self_attn.in_proj_weight``, ``self_attn.out_proj.weight``, ``linear1.weight`` and ``linear2.weight`` directly and
never calls the submodules' ``forward``: a quantized attention (``QuantMultiheadAttention``, whose own forward never
takes a fused path) or a quantized ``linear1`` would be skipped, and the reported metrics would come from a partly
float model. ``nn.TransformerEncoder`` may further turn padded batches into nested tensors for that path.

This module is the one switch at the level of the encoder layer (attention's own fast path is the quantized
attention's business). PyTorch documents the conditions of the fast path; one of them is that no forward
(pre-)hook is attached to the layer or its submodules. :func:`disable_fast_paths` therefore attaches a hook that
does nothing to every ``nn.TransformerEncoderLayer`` that holds a quantized layer (our choice: the least invasive
switch that is local to the quantized layers, survives ``deepcopy`` and pickling, and leaves the global
``torch.backends.mha`` setting alone), and turns off ``use_nested_tensor`` on the encoders around them.
:func:`restore_fast_paths` undoes both. ``quantize_model`` and ``dequantize_model`` call them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_quant.surgery.layers import OutputQuantized, QuantizedLayer

__all__ = ["disable_fast_paths", "restore_fast_paths", "takes_fast_path"]

#: encoder attribute that remembers ``use_nested_tensor`` while it is switched off
_SAVED_NESTED = "_lightning_quant_use_nested_tensor"


def _no_fast_path(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing: its presence keeps the layer off the fused path."""
    return None


def _holds_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLayer, OutputQuantized)) for m in module.modules())


def takes_fast_path(layer: nn.Module) -> bool:
    """Whether ``layer`` (an ``nn.TransformerEncoderLayer``) may take the fused path, i.e. carries no hook of ours."""
    return isinstance(layer, nn.TransformerEncoderLayer) and _no_fast_path not in layer._forward_pre_hooks.values()


def disable_fast_paths(model: nn.Module) -> list[str]:
    """Keep every ``nn.TransformerEncoderLayer`` of ``model`` that holds a quantized layer off the fused path.

    Idempotent. Returns the names of the layers newly switched.
    """
    switched = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and takes_fast_path(module) and _holds_quantized(module):
            module.register_forward_pre_hook(_no_fast_path)
            switched.append(name)
        elif (
            isinstance(module, nn.TransformerEncoder)
            and getattr(module, "use_nested_tensor", False)
            and _holds_quantized(module)
        ):
            setattr(module, _SAVED_NESTED, True)
            module.use_nested_tensor = False
    return switched


def restore_fast_paths(model: nn.Module) -> None:
    """Undo :func:`disable_fast_paths` where no quantized layer is left."""
    for module in model.modules():
        if _holds_quantized(module):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _no_fast_path]:
                del module._forward_pre_hooks[key]
        if isinstance(module, nn.TransformerEncoder) and module.__dict__.pop(_SAVED_NESTED, False):
            module.use_nested_tensor = True
