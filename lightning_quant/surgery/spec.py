"""``QuantSpec``: the one serializable per-layer quantization recipe that every allocator writes and export reads.

A :class:`QuantSpec` holds a default :class:`LayerSpec`, which layers it selects (name patterns and types), the
first/last-layer rule, and per-layer overrides. :meth:`QuantSpec.resolve` turns it into the exact recipe of
each layer of a given model; :meth:`QuantSpec.from_model` reads the recipe back from a quantized model (bit
widths changed during training included), so it round-trips through JSON/YAML and rebuilds the same model.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from torch import nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import validate_bits
from lightning_quant.core.observers import OBSERVERS
from lightning_quant.core.quantizers import QUANTIZER_KINDS
from lightning_quant.core.validation import check_bool, check_choice, config_error

Granularity = Literal["per_channel", "per_tensor"]
CodebookVector = Literal["scalar", "kernel"]
ScaleMode = Literal["lsq", "observer"]
ObserverName = Literal["minmax", "moving_average", "percentile", "mse"]

#: layer types that :func:`~lightning_quant.surgery.quantize.quantize_model` can wrap, by class name
QUANTIZABLE_TYPES: tuple[str, ...] = (
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Linear",
    "Embedding",
    "MultiheadAttention",
    "LSTM",
    "GRU",
    "RNN",
)


@dataclass(frozen=True)
class LayerSpec:
    """How one Conv/Linear layer is quantized.

    Args:
        weight_bits: weight bit width, 2-8, or 1 for binary weights (``scale * sign(w)``); or one width per output
            channel (a list as long as the layer has output channels, binary channels included; needs
            ``weight_granularity="per_channel"``). For ``weight_kind="codebook"``: the bits of one index.
        act_bits: bit width of the layer's input activation (2-8), or ``None`` to leave the input in float.
        weight_granularity: ``per_channel`` (one step per output channel) or ``per_tensor``.
        weight_symmetric: symmetric signed weight grid (zero point 0); ``False`` for asymmetric.
        act_symmetric: symmetric activation grid; the default asymmetric grid (uint8 with a zero point) suits
            both post-ReLU and signed inputs and exports as unsigned activations (fast U8S8 kernels).
        act_signed: signed grid for symmetric activations.
        scale_mode: ``lsq`` (learned step size, initialised by the observer) or ``observer`` (fixed by it).
        weight_observer: observer for weights: ``minmax``, ``moving_average``, ``percentile`` or ``mse``.
        act_observer: observer for activations.
        frozen: allocators (mixed precision) must leave this layer's bit widths alone.
        output_bits: bit width of a fake-quantizer on the layer's *output* (same grid as the input), or
            ``None`` (the default). :attr:`QuantSpec.quantize_residuals` sets it on the layers that feed a
            residual addition; set it yourself where tracing cannot find them.
        weight_kind: the weight quantizer's kind in the registry
            (:data:`~lightning_quant.core.quantizers.QUANTIZER_KINDS`): ``"uniform"`` (a uniform grid, the
            default) or ``"codebook"`` (:class:`~lightning_quant.core.codebook.CodebookQuantizer`).
        codebook_size: codebook entries (``"codebook"`` only); default ``2**weight_bits``.
        codebook_bits: bits of the codebook entries' own uniform grid, or ``None`` for float entries.
        codebook_vector: ``"scalar"`` (an index per weight) or ``"kernel"`` (an index per k x k kernel).
        codebook_zero: keep one entry at exactly 0 (SLQ/MLQ).
        codebook_share: a group name, or ``None``: layers with the same name share one codebook (its entries, their
            grid and step size; each layer keeps its own indices). The first of them in registration order stores
            it (see :func:`~lightning_quant.core.codebook.share_codebook`); they need equal ``codebook_size``,
            ``codebook_bits`` and entry sizes (kernels of one size).
    """

    weight_bits: int | tuple[int, ...] = 8
    act_bits: int | None = 8
    weight_granularity: Granularity = "per_channel"
    weight_symmetric: bool = True
    act_symmetric: bool = False
    act_signed: bool = False
    scale_mode: ScaleMode = "lsq"
    weight_observer: ObserverName = "mse"
    act_observer: ObserverName = "moving_average"
    frozen: bool = False
    output_bits: int | None = None
    weight_kind: str = "uniform"
    codebook_size: int | None = None
    codebook_bits: int | None = None
    codebook_vector: CodebookVector = "scalar"
    codebook_zero: bool = False
    codebook_share: str | None = None

    GRANULARITIES: ClassVar[tuple[str, ...]] = ("per_channel", "per_tensor")
    SCALE_MODES: ClassVar[tuple[str, ...]] = ("lsq", "observer")
    CODEBOOK_VECTORS: ClassVar[tuple[str, ...]] = ("scalar", "kernel")
    _CODEBOOK_FIELDS: ClassVar[tuple[str, ...]] = (
        "codebook_size",
        "codebook_bits",
        "codebook_vector",
        "codebook_zero",
        "codebook_share",
    )

    def __post_init__(self) -> None:
        if isinstance(self.weight_bits, list):  # from YAML/JSON
            object.__setattr__(self, "weight_bits", tuple(self.weight_bits))
        if isinstance(self.weight_bits, tuple):
            if not self.weight_bits:
                raise QuantizationConfigError("`weight_bits` is an empty list. HINT: pass one int, or one per channel.")
            for bits in self.weight_bits:
                validate_bits("weight_bits", bits, allow_binary=True)
            if self.weight_granularity != "per_channel":
                raise QuantizationConfigError(
                    f"`weight_bits` gives one width per channel, but `weight_granularity={self.weight_granularity!r}`. "
                    "HINT: per-channel widths need `weight_granularity='per_channel'`."
                )
            if len(set(self.weight_bits)) == 1:  # one width after all
                object.__setattr__(self, "weight_bits", self.weight_bits[0])
        else:
            validate_bits("weight_bits", self.weight_bits, allow_binary=True)
        if self.act_bits is not None:
            validate_bits("act_bits", self.act_bits)
        if self.output_bits is not None:
            validate_bits("output_bits", self.output_bits)
        for f in dataclasses.fields(self):
            if f.type in ("bool", bool):
                check_bool(f.name, getattr(self, f.name))
        check_choice("weight_granularity", self.weight_granularity, self.GRANULARITIES)
        check_choice("scale_mode", self.scale_mode, self.SCALE_MODES)
        check_choice("weight_observer", self.weight_observer, sorted(OBSERVERS))
        check_choice("act_observer", self.act_observer, sorted(OBSERVERS))
        binary = 1 in self.weight_bits if isinstance(self.weight_bits, tuple) else self.weight_bits == 1
        if binary and not self.weight_symmetric and self.weight_kind == "uniform":
            raise QuantizationConfigError(
                "Binary weights (`weight_bits=1`) are symmetric: set `weight_symmetric=True`."
            )
        check_choice("weight_kind", self.weight_kind, sorted(QUANTIZER_KINDS))
        check_choice("codebook_vector", self.codebook_vector, self.CODEBOOK_VECTORS)
        if self.weight_kind == "codebook":
            self._check_codebook()
        else:
            changed = [f for f in self._CODEBOOK_FIELDS if getattr(self, f) != _FIELD_DEFAULTS[f]]
            if changed:
                raise QuantizationConfigError(
                    f"{changed} apply to codebook quantizers only, but `weight_kind={self.weight_kind!r}`. HINT: pass "
                    "`weight_kind='codebook'`, or leave them at their defaults."
                )

    def _check_codebook(self) -> None:
        if isinstance(self.weight_bits, tuple):
            raise QuantizationConfigError(
                f"`weight_bits` of a codebook quantizer is one index width, got per-channel widths "
                f"{list(self.weight_bits)[:8]}. HINT: pass one int."
            )
        size = self.codebook_size
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 2**self.weight_bits:
                raise QuantizationConfigError(
                    f"`codebook_size` must be an integer in [1, 2**weight_bits] = [1, {2**self.weight_bits}], got "
                    f"{size!r}. HINT: raise `weight_bits` (the index bits) or use fewer entries."
                )
        if self.codebook_bits is not None:
            validate_bits("codebook_bits", self.codebook_bits)
        if self.codebook_zero and self.codebook_vector != "scalar":
            raise QuantizationConfigError("`codebook_zero=True` needs `codebook_vector='scalar'`.")
        if self.codebook_share is not None and (not isinstance(self.codebook_share, str) or not self.codebook_share):
            raise QuantizationConfigError(
                f"`codebook_share` must be a non-empty group name or None, got {self.codebook_share!r}."
            )

    @property
    def per_channel_bits(self) -> bool:
        """Whether ``weight_bits`` gives one width per output channel."""
        return isinstance(self.weight_bits, tuple)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.weight_bits, tuple):
            data["weight_bits"] = list(self.weight_bits)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "LayerSpec") -> LayerSpec:
        if not isinstance(data, Mapping):
            raise config_error(where, "a mapping of LayerSpec fields", data, "e.g. `{weight_bits: 4, act_bits: 8}`.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise QuantizationConfigError(f"Unknown keys {unknown} in {where}. Allowed keys: {sorted(names)}.")
        return cls(**dict(data))


_FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(LayerSpec)}


@dataclass(frozen=True)
class QuantSpec:
    """A model's quantization recipe: defaults, layer selection, first/last rule and per-layer overrides.

    Args:
        default: the recipe of every selected layer unless overridden.
        include: name patterns (``fnmatch``, e.g. ``"backbone.layer1.*"``) of the layers to quantize.
        exclude: name patterns of layers to leave in float.
        exclude_types: layer class names to leave in float (e.g. ``["Linear"]``).
        first_last_bits: weight and activation bits of the first and last selected layer (in registration
            order), the usual convention for accuracy; ``None`` treats them like the others.
        layers: per-layer overrides, keyed by exact name or pattern; later keys win, and they win over
            ``first_last_bits``.
        quantize_residuals: also fake-quantize every tensor that a quantized convolution (or the BatchNorm
            after it) feeds into a residual addition, at that layer's activation bits, and the output of a
            ReLU module at an addition (the block output, the stem's output) with the *same* quantizer as the
            layers it feeds. Needed for int8 deployment: a runtime fuses a convolution into an integer kernel
            (``QLinearConv``) only when a quantizer follows it, and an addition (``QLinearAdd``) only when
            both inputs and the output are quantized. Beyond additions, every quantized convolution whose
            output reaches anything but one quantized layer (a concatenation, a squeeze-excitation product, an
            activation other than ReLU, an average pooling, several layers) gets an output quantizer on the
            conv, the BatchNorm after it or the ReLU after those, shared with the layers that tensor feeds
            (:func:`~lightning_quant.surgery.graph.conv_output_placements`), so every conv of torchvision's
            classification zoo runs in int8. The ops between convolutions run in integers too: sigmoid and
            hard-sigmoid gates get an output quantizer, SiLU and hardswish (``x * gate(x)``) a quantizer on
            their gate, and an addition, product or concatenation whose output goes to such ops or to several
            places (a MobileNet/EfficientNet residual sum that feeds the next block's conv and its shortcut) an
            output quantizer shared with the layers it feeds, and a part of ``chunk``/``split`` that goes into
            a concatenation (ShuffleNet) the grid it was split from -- in the module whose ``forward`` performs
            it, re-traced with an ``OpOutput`` marker after the op
            (:func:`~lightning_quant.surgery.graph.op_output_sites`); such an op in the model's own forward
            stays in float, and ``quantize_model`` logs it. Ops followed by a float op (a LayerNorm, as in
            transformers) get nothing. Found with a :mod:`torch.fx` trace (a model fx cannot
            trace gets a clear error). A block whose forward calls one ReLU twice (torchvision's
            ``BasicBlock``) or applies a functional ReLU at its addition (``F.relu(out + shortcut)``) is
            re-traced into a ``torch.fx.GraphModule`` (same name, computation and state-dict keys) that gives
            each use a ReLU module of its own (see :func:`~lightning_quant.surgery.graph.retrace_owners`). Off by
            default: the extra quantizers cost a little accuracy at low activation bits.
        fold_batchnorm: fold every BatchNorm that follows a convolution into it (eval-mode statistics) before
            quantizing, as threshold tuning (FAT) does; recorded by :meth:`from_model` for folded models, so
            their checkpoints load into a freshly built (unfolded) model.

    Example:
        >>> spec = QuantSpec(default=LayerSpec(weight_bits=4, act_bits=4), exclude=["fc"])
        >>> QuantSpec.from_json(spec.to_json()) == spec
        True
    """

    default: LayerSpec = field(default_factory=LayerSpec)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    exclude_types: tuple[str, ...] = ()
    first_last_bits: int | None = 8
    layers: Mapping[str, LayerSpec] = field(default_factory=dict)
    quantize_residuals: bool = False
    fold_batchnorm: bool = False

    def __post_init__(self) -> None:
        # accept lists from YAML/JSON but store tuples, so specs compare equal after a round trip
        for name in ("include", "exclude", "exclude_types"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
                raise config_error(name, "a list of layer-name patterns (strings)", value, f"e.g. `{name}=['conv*']`.")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.default, LayerSpec):
            raise QuantizationConfigError(f"`default` must be a LayerSpec, got {type(self.default).__name__}.")
        for type_name in self.exclude_types:
            check_choice("exclude_types", type_name, QUANTIZABLE_TYPES)
        if self.first_last_bits is not None:
            validate_bits("first_last_bits", self.first_last_bits)
        for flag in ("quantize_residuals", "fold_batchnorm"):
            if not isinstance(getattr(self, flag), bool):
                raise QuantizationConfigError(f"`{flag}` must be True or False, got {getattr(self, flag)!r}.")
        if not isinstance(self.layers, Mapping):
            raise config_error("layers", "a mapping of layer name -> LayerSpec", self.layers)
        for key, layer in self.layers.items():
            if not isinstance(layer, LayerSpec):
                raise QuantizationConfigError(f"`layers[{key!r}]` must be a LayerSpec, got {type(layer).__name__}.")
        object.__setattr__(self, "layers", dict(self.layers))

    # -- resolution ------------------------------------------------------------------------------------------
    def select(self, candidates: Mapping[str, str]) -> list[str]:
        """Names of the candidate layers this spec quantizes; unknown patterns raise with the known names.

        Args:
            candidates: layer name -> layer type name (``"Conv2d"``), in registration order.
        """
        names = list(candidates)
        for argument, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                    raise QuantizationConfigError(
                        f"`{argument}` pattern {pattern!r} matches no quantizable layer. "
                        f"Quantizable layers are: {shown}."
                    )
        for pattern in self.layers:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise QuantizationConfigError(
                    f"`layers` key {pattern!r} matches no quantizable layer; check the name against "
                    "`quantization_summary(model)` or `dict(model.named_modules())`."
                )
        return [
            n
            for n in names
            if any(fnmatch.fnmatchcase(n, p) for p in self.include)
            and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)
            and candidates[n] not in self.exclude_types
        ]

    def resolve(self, candidates: Mapping[str, str]) -> dict[str, LayerSpec]:
        """The recipe of each selected layer, in registration order (``candidates`` as in :meth:`select`)."""
        selected = self.select(candidates)
        resolved: dict[str, LayerSpec] = {}
        for index, name in enumerate(selected):
            layer = self.default
            if self.first_last_bits is not None and index in (0, len(selected) - 1):
                layer = dataclasses.replace(
                    layer,
                    weight_bits=self.first_last_bits,
                    act_bits=None if layer.act_bits is None else self.first_last_bits,
                    output_bits=None if layer.output_bits is None else self.first_last_bits,
                    frozen=True,
                    # the first and last layers keep a uniform grid whatever the default kind
                    weight_kind="uniform",
                    **{f: _FIELD_DEFAULTS[f] for f in LayerSpec._CODEBOOK_FIELDS},
                )
            for pattern, override in self.layers.items():
                if fnmatch.fnmatchcase(name, pattern):
                    layer = override
            resolved[name] = layer
        return resolved

    # -- serialization ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "default": self.default.to_dict(),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "exclude_types": list(self.exclude_types),
            "first_last_bits": self.first_last_bits,
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
            "quantize_residuals": self.quantize_residuals,
            "fold_batchnorm": self.fold_batchnorm,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        if not isinstance(data, Mapping):
            raise config_error("QuantSpec", "a mapping of its fields", data, "e.g. `{default: {weight_bits: 4}}`.")
        if not isinstance(data.get("layers", {}), Mapping):
            raise config_error("layers", "a mapping of layer name -> LayerSpec fields", data["layers"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise QuantizationConfigError(f"Unknown keys {unknown} in QuantSpec. Allowed keys: {sorted(names)}.")
        data = dict(data)
        if "default" in data:
            data["default"] = LayerSpec.from_dict(data["default"], "QuantSpec.default")
        if "layers" in data:
            data["layers"] = {k: LayerSpec.from_dict(v, f"QuantSpec.layers[{k!r}]") for k, v in data["layers"].items()}
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> QuantSpec:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> QuantSpec:
        return cls.from_dict(yaml.safe_load(text))

    def save(self, path: str | Path) -> None:
        """Write the spec to ``.json`` or ``.yaml``/``.yml`` by the file's suffix."""
        path = Path(path)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> QuantSpec:
        path = Path(path)
        text = path.read_text()
        return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)

    @classmethod
    def from_model(cls, model: nn.Module) -> QuantSpec:
        """The exact recipe of a quantized model: one entry per quantized layer, with its current bit widths.

        A model with output-quantized BatchNorms or ReLUs gets ``quantize_residuals=True``, which finds them again; a
        model with folded BatchNorms gets ``fold_batchnorm=True``.
        """
        from lightning_quant.surgery.fold import FoldedBatchNorm  # these modules import this one
        from lightning_quant.surgery.layers import OutputQuantized, quantized_layers

        quantized = quantized_layers(model)
        # a layer quantized by its parent (attention's output projection) is rebuilt by the parent
        layers = {
            name: module.current_spec()
            for name, module in quantized.items()
            if not ("." in name and name.rsplit(".", 1)[0] in quantized)
        }
        if not layers:
            raise QuantizationConfigError(
                "`model` has no quantized layer: call `quantize_model(model, spec)` (or train with a "
                "quantization callback) first."
            )
        return cls(
            include=tuple(layers),
            first_last_bits=None,
            layers=layers,
            quantize_residuals=any(isinstance(m, OutputQuantized) for m in model.modules()),
            fold_batchnorm=any(isinstance(m, FoldedBatchNorm) for m in model.modules()),
        )
