"""One owner of quantization: every callback states what it needs, and one merged recipe quantizes the model once.

A :class:`QuantizationRequest` is what one callback needs of the quantized model: the recipe it would use alone
(``spec``), which of its fields must hold (``required``: the arguments the user set, and what the technique cannot
work without, such as fixed observer ranges for threshold tuning), per-layer field requirements (``layers``:
e.g. a codebook quantizer on the convolutions kernel quantization selects) and a ``priority`` that decides whose
*preferences* (fields not required) win.

:func:`merge_requests` turns any set of requests into one concrete :class:`~lightning_quant.surgery.spec.QuantSpec`:

1. requests are ordered by ``(priority, owner)`` -- never by their position in the callback list, so the result
   does not depend on the order of the callbacks;
2. the first request's recipe is the base; every required field is set to its requested value, and two requests
   that require different values for the same field raise a :class:`QuantizationConfigError` that names both
   callbacks, the field, both values and the fix;
3. the recipe is resolved against the model's layers (selection, first/last rule, per-layer overrides), and then
   each request's per-layer requirements are applied (conflicts raise the same way).

The result lists every quantized layer with its exact :class:`~lightning_quant.surgery.spec.LayerSpec`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.surgery.spec import LayerSpec, QuantSpec

#: the QuantSpec fields a request may require (``default.<field>`` names a field of the default LayerSpec)
SPEC_FIELDS: tuple[str, ...] = (
    "include",
    "exclude",
    "exclude_types",
    "first_last_bits",
    "quantize_residuals",
    "fold_batchnorm",
)
LAYER_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LayerSpec))


@dataclass(frozen=True)
class QuantizationRequest:
    """What one callback needs of the quantized model (see the module docs).

    Args:
        owner: who asks (the callback's class name), for messages.
        spec: the recipe this callback would quantize with alone.
        required: fields of ``spec`` that must hold: QuantSpec fields by name (``"fold_batchnorm"``) and fields of
            its default LayerSpec as ``"default.<field>"`` (``"default.scale_mode"``).
        priority: lower wins among preferences (fields nobody requires); ties break by ``owner``.
        layers: per-layer requirements, ``{layer name or pattern: {LayerSpec field: value}}``; a named layer is
            quantized even when the merged selection would leave it out.
    """

    owner: str
    spec: QuantSpec
    required: frozenset[str] = frozenset()
    priority: int = 100
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "required", frozenset(self.required))
        unknown = sorted(k for k in self.required if not _known(k))
        if unknown:
            raise QuantizationConfigError(
                f"{self.owner}: unknown required fields {unknown}. Known: {list(SPEC_FIELDS)} and "
                f"'default.<field>' for {list(LAYER_FIELDS)}."
            )
        for pattern, fields in self.layers.items():
            bad = sorted(set(fields) - set(LAYER_FIELDS))
            if bad:
                raise QuantizationConfigError(f"{self.owner}: unknown LayerSpec fields {bad} for layer {pattern!r}.")


#: priority of a technique's own fallback recipe: the recipe of `QuantizationAwareTraining` (priority 0) wins
FALLBACK_PRIORITY = 50


def fallback_request(owner: str, spec: QuantSpec, spec_given: bool) -> QuantizationRequest:
    """The request of a technique that quantizes with ``spec`` only when nothing else does: another callback's
    recipe (QAT's) wins, except for the fields the user set explicitly in ``spec`` (``spec_given``)."""
    required = explicit_fields(spec) if spec_given else frozenset()
    return QuantizationRequest(owner, spec, required, priority=FALLBACK_PRIORITY)


def _known(key: str) -> bool:
    if key.startswith("default."):
        return key.removeprefix("default.") in LAYER_FIELDS
    return key in SPEC_FIELDS


def _get(spec: QuantSpec, key: str) -> Any:
    if key.startswith("default."):
        return getattr(spec.default, key.removeprefix("default."))
    return getattr(spec, key)


def explicit_fields(spec: QuantSpec, reference: QuantSpec | None = None) -> frozenset[str]:
    """The fields of ``spec`` that differ from ``reference`` (default: ``QuantSpec()``), as request keys."""
    reference = QuantSpec() if reference is None else reference
    keys = [k for k in SPEC_FIELDS if getattr(spec, k) != getattr(reference, k)]
    keys += [f"default.{f}" for f in LAYER_FIELDS if getattr(spec.default, f) != getattr(reference.default, f)]
    return frozenset(keys)


def _conflict(key: str, first: tuple[str, Any], second: tuple[str, Any], where: str = "") -> QuantizationConfigError:
    name = key.removeprefix("default.")
    return QuantizationConfigError(
        f"`{name}`{where}: {first[0]} needs {first[1]!r} and {second[0]} needs {second[1]!r}; both cannot hold. "
        f"HINT: give both callbacks the same `{name}` (e.g. {second[0]}'s {second[1]!r}), or remove one of them."
    )


def merge_requests(requests: Sequence[QuantizationRequest], candidates: Mapping[str, str]) -> QuantSpec:
    """One concrete recipe that meets every request (see the module docs), for a model's quantizable layers.

    Args:
        requests: at least one request.
        candidates: the model's quantizable layers, name -> layer type name, in registration order.

    Raises:
        QuantizationConfigError: two requests require different values of one field (the message names both
            callbacks), or a request names a layer the model does not have.
    """
    if not requests:
        raise QuantizationConfigError("merge_requests needs at least one request.")
    ordered = sorted(requests, key=lambda r: (r.priority, r.owner))
    base = ordered[0].spec
    values: dict[str, Any] = {k: getattr(base, k) for k in SPEC_FIELDS}
    default = base.default.to_dict()
    chosen: dict[str, tuple[str, Any]] = {}
    for request in ordered:
        for key in sorted(request.required):
            value = _get(request.spec, key)
            if key in chosen and chosen[key][1] != value:
                raise _conflict(key, chosen[key], (request.owner, value))
            chosen[key] = (request.owner, value)
            if key.startswith("default."):
                default[key.removeprefix("default.")] = value
            else:
                values[key] = value
    merged = QuantSpec(default=LayerSpec.from_dict(default), layers=base.layers, **values)
    resolved = merged.resolve(candidates)
    # whole-layer overrides of every request (a saved allocation, say) must hold; within one request later
    # patterns win, as in QuantSpec.resolve
    explicit: dict[str, tuple[str, LayerSpec]] = {}
    for request in ordered:
        own: dict[str, LayerSpec] = {}
        for pattern, layer_spec in request.spec.layers.items():
            own.update({name: layer_spec for name in _matching(request.owner, pattern, candidates)})
        for name, layer_spec in own.items():
            if name in explicit and explicit[name][1] != layer_spec:
                raise _conflict("layers", explicit[name], (request.owner, layer_spec), f" of layer {name!r}")
            explicit[name] = (request.owner, layer_spec)
            resolved[name] = layer_spec
    owners: dict[tuple[str, str], tuple[str, Any]] = {}
    for request in ordered:
        for pattern, fields in request.layers.items():
            for name in _matching(request.owner, pattern, candidates):
                layer = resolved.get(name, merged.default)
                for key, value in fields.items():
                    if (name, key) in owners and owners[(name, key)][1] != value:
                        raise _conflict(key, owners[(name, key)], (request.owner, value), f" of layer {name!r}")
                    owners[(name, key)] = (request.owner, value)
                resolved[name] = dataclasses.replace(layer, **fields)
    layers = {name: resolved[name] for name in candidates if name in resolved}
    return QuantSpec(
        default=merged.default,
        include=tuple(layers),
        first_last_bits=None,
        layers=layers,
        quantize_residuals=merged.quantize_residuals,
        fold_batchnorm=merged.fold_batchnorm,
    )


def _matching(owner: str, pattern: str, candidates: Mapping[str, str]) -> list[str]:
    names = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        raise QuantizationConfigError(
            f"{owner} asks for layer {pattern!r}, which matches no quantizable layer of the model. Quantizable layers: "
            f"{', '.join(list(candidates)[:12])}{', ...' if len(candidates) > 12 else ''}."
        )
    return names


__all__ = [
    "FALLBACK_PRIORITY",
    "LAYER_FIELDS",
    "SPEC_FIELDS",
    "QuantizationRequest",
    "explicit_fields",
    "fallback_request",
    "merge_requests",
]
