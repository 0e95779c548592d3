"""Capture what layers take in and give out, by forward hooks, with the model's state restored afterwards.

One mechanism for every technique that looks inside a forward pass: MAC tracing (allocation costs), the teacher's
and the student's logits (distillation, threshold tuning), BatchNorm statistics (data-free generators), features
for orthogonality (OMPQ), per-layer ONNX comparison.

* :class:`Capture` -- hooks on named modules; each call is recorded as a :class:`Call` (positional inputs, keyword
  inputs, output), or handed to a function of yours (``on_call``); ``armed`` switches recording on and off without
  removing the hooks (callbacks arm it for one training step). Used as a context manager, the hooks are removed on
  exit, also on error.
* :func:`quantizers_disabled` and :func:`modes_kept` -- context managers that switch every quantizer off (so a
  forward sees the float model and no observer or uninitialised step size is touched), and that restore every
  module's train/eval mode on exit.
* :func:`capture` -- one forward of ``inputs`` with the hooks, optional eval mode and quantizers off, returning the
  calls per module.

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> calls = capture(net, torch.randn(5, 4), ["0", "2"])
>>> [tuple(calls[name][0].output.shape) for name in ("0", "2")]
[(5, 3), (5, 2)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.quantizers import Quantizer


@dataclass
class Call:
    """One recorded call of a module: its positional and keyword inputs and its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None

    @property
    def input(self) -> Any:
        """The first positional input (the usual layer input)."""
        return self.args[0] if self.args else None


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _resolve(model: nn.Module, modules: Iterable[str] | Mapping[str, nn.Module] | None) -> dict[str, nn.Module]:
    if modules is None:
        return {"": model}
    if isinstance(modules, Mapping):
        return dict(modules)
    found: dict[str, nn.Module] = {}
    for name in modules:
        try:
            found[name] = model.get_submodule(name) if name else model
        except AttributeError as err:
            raise QuantizationConfigError(
                f"`{name}` is not a submodule of {type(model).__name__}. HINT: names are those of "
                "`dict(model.named_modules())`."
            ) from err
    return found


class Capture:
    """Forward hooks that record the calls of named modules (see the module docs).

    Args:
        model: the model the names refer to.
        modules: module names (``""``: the model itself), a ``{name: module}`` mapping, or ``None`` for the model.
        outputs: record outputs.
        inputs: record positional and keyword inputs.
        detach: detach recorded tensors (no graph kept); ``False`` keeps the graph, e.g. to back-propagate through
            a captured output.
        first_call_only: record only the first call of each module until :meth:`clear`.
        on_call: called as ``on_call(name, module, call)`` for each call instead of recording it.
        armed: record from the start (otherwise after :meth:`arm`).

    Attributes:
        calls: ``{name: [Call, ...]}`` recorded so far.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Iterable[str] | Mapping[str, nn.Module] | None = None,
        *,
        outputs: bool = True,
        inputs: bool = False,
        detach: bool = True,
        first_call_only: bool = False,
        on_call: Callable[[str, nn.Module, Call], None] | None = None,
        armed: bool = True,
    ) -> None:
        self.modules = _resolve(model, modules)
        self.outputs = outputs
        self.inputs = inputs
        self.detach = detach
        self.first_call_only = first_call_only
        self.on_call = on_call
        self.armed = armed
        self.calls: dict[str, list[Call]] = {name: [] for name in self.modules}
        self._handles: list[Any] = []
        seen: set[int] = set()
        for name, module in self.modules.items():
            if id(module) in seen:  # a module under two names is recorded once, under its first name
                continue
            seen.add(id(module))
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self.armed or (self.first_call_only and self.calls[name]):
                return
            keep = _detached if self.detach else (lambda v: v)
            call = Call(
                keep(args) if self.inputs else (),
                keep(dict(kwargs)) if self.inputs else {},
                keep(output) if self.outputs else None,
            )
            if self.on_call is not None:
                self.on_call(name, module, call)
            else:
                self.calls[name].append(call)

        return hook

    def arm(self) -> None:
        """Start recording."""
        self.armed = True

    def disarm(self) -> None:
        """Stop recording (the hooks stay)."""
        self.armed = False

    def clear(self) -> None:
        """Forget every recorded call."""
        for calls in self.calls.values():
            calls.clear()

    def first(self, name: str = "") -> Call | None:
        """The first recorded call of ``name``, or ``None``."""
        calls = self.calls.get(name)
        return calls[0] if calls else None

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module, disabled: bool = True) -> Iterator[None]:
    """Switch every quantizer of ``model`` off (``disabled=False``: leave them as they are); restored on exit."""
    saved = {q: q.enabled for q in model.modules() if isinstance(q, Quantizer)}
    try:
        if disabled:
            for q in saved:
                q.enabled = False
        yield
    finally:
        for q, value in saved.items():
            q.enabled = value


@contextlib.contextmanager
def modes_kept(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Restore every module's train/eval mode on exit; ``training`` sets the model's mode for the duration."""
    saved = {m: m.training for m in model.modules()}
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for module, mode in saved.items():
            module.training = mode


def batch_inputs(batch: Any, owner: str, hint: str = "") -> Tensor:
    """The model inputs of a batch: the batch itself, the first element of a tuple/list, or the ``x``/``image(s)``/
    ``input(s)`` entry of a dict; otherwise a clear error from ``owner`` (``hint`` is added to its HINT).

    >>> batch_inputs((torch.zeros(2, 3), torch.ones(2)), "me").shape
    torch.Size([2, 3])
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("x", "image", "images", "input", "inputs"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise QuantizationConfigError(
        f"{owner} cannot find the model inputs in a batch of type {type(batch).__name__}. HINT: "
        f"yield images, `(images, ...)` tuples or dicts with an `x`/`image` key{hint}."
    )


def capture(
    model: nn.Module,
    inputs: Any,
    modules: Iterable[str] | Mapping[str, nn.Module] | None = None,
    *,
    outputs: bool = True,
    layer_inputs: bool = False,
    float_model: bool = False,
    training: bool | None = False,
    grad: bool = False,
) -> dict[str, list[Call]]:
    """Run ``model`` once on ``inputs`` (a tensor, or a tuple of positional inputs) and return the calls per module.

    Args:
        model: the model.
        inputs: what to call it with.
        modules: the modules to record (see :class:`Capture`).
        outputs: record outputs.
        layer_inputs: record inputs.
        float_model: switch every quantizer off for the forward.
        training: the mode during the forward (``None``: as it is); every module's mode is restored afterwards.
        grad: run with autograd (recorded tensors are still detached).
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with (
        Capture(model, modules, outputs=outputs, inputs=layer_inputs) as hooks,
        quantizers_disabled(model, float_model),
        modes_kept(model, training),
        torch.set_grad_enabled(grad),
    ):
        model(*args)
    return hooks.calls


__all__ = ["Call", "Capture", "batch_inputs", "capture", "modes_kept", "quantizers_disabled"]
