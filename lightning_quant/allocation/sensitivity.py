"""Sensitivities: how much the loss grows with a quantizer's noise, as the coefficient ``s`` of ``s * 4**-bits``.

Second-order model: quantizing a tensor adds noise ``e`` whose elements are uniform within one step ``Delta``
(variance ``Delta**2 / 12``), so the expected loss increase is ``1/2 sum_i h_i Delta_i**2 / 12`` with ``h_i`` the
curvature of the loss along element ``i``. The step of a ``b``-bit grid over a fixed range is proportional to
``1 / (2**b - 1)``, about ``2**-b``, so the increase at ``b`` bits is ``s * 4**-b`` with

.. math::  s = \\tfrac12 \\sum_c H_c\\, \\Delta_c^2 / 12 \\cdot 4^{b_\\text{now}}

where ``H_c`` sums the curvature over the elements that share the step ``Delta_c`` (one output channel, or the
whole tensor). ``s`` is exact at the current width and follows ``4**-b`` elsewhere.

Two curvature estimates:

* :class:`FisherEMA` -- the empirical Fisher: squared gradients of the training loss, summed per step-size
  group and smoothed with an exponential moving average over training steps. It costs one multiply-add per
  weight per step and uses the gradients the optimizer needs anyway (no extra forward or backward).
  With mini-batch gradients the squared *mean* gradient estimates the per-sample Fisher divided by the batch
  size where gradient noise dominates (the usual regime late in training); weights and activations
  (:func:`channel_sq_sum` of either) are estimated the same way, so their sensitivities are comparable.
* :func:`hutchinson_diagonal` -- Hutchinson's estimator of the Hessian's diagonal, ``E[v * (H v)]`` with
  Rademacher ``v``: one extra double backward per sample, for one-shot (HAWQ-style) allocation before training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.surgery.capture import quantizers_disabled


def channel_sum(x: Tensor, ch_axis: int | None) -> Tensor:
    """Sum of the entries per channel along ``ch_axis`` (shape ``[C]``), or over everything (shape ``[1]``)."""
    x = x.detach().float()
    if ch_axis is None:
        return x.sum().reshape(1)
    return x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1).sum(dim=1)


def channel_sq_sum(grad: Tensor, ch_axis: int | None) -> Tensor:
    """Sum of squared entries per channel along ``ch_axis`` (shape ``[C]``), or over everything (shape ``[1]``).

    >>> channel_sq_sum(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), 0)
    tensor([5., 9.])
    >>> channel_sq_sum(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), None)
    tensor([14.])
    """
    g = grad.detach().float()
    return channel_sum(g * g, ch_axis)


def noise_sensitivity(curvature: Tensor, quantizer: UniformQuantizer) -> float:
    """The coefficient ``s`` of ``s * 4**-bits`` for a quantizer, from per-channel curvature sums ``H_c``.

    ``curvature`` has the quantizer's step-size shape (``[C]`` per channel, ``[1]`` per tensor); a per-channel
    curvature for a per-tensor quantizer is summed first.

    >>> q = UniformQuantizer(bits=4, learnable=False)
    >>> _ = q.scale.fill_(0.5)
    >>> round(noise_sensitivity(torch.tensor([6.0]), q), 6)  # 1/2 * 6 * 0.25 / 12 * 4**4
    16.0
    """
    step = quantizer.effective_scale().detach().float().reshape(-1)
    h = curvature.detach().float().reshape(-1).to(step.device)
    if h.numel() != step.numel():
        h = h.sum().reshape(1)
        step = step if step.numel() == 1 else step.pow(2).mean().sqrt().reshape(1)
    bits = quantizer.bits
    return float(0.5 * (h * step.pow(2) / 12.0).sum().item() * 4.0**bits)


class FisherEMA:
    """Exponential moving averages of per-channel squared gradients, by unit name.

    Args:
        decay: EMA decay in [0, 1): ``F <- decay * F + (1 - decay) * g**2`` (the first value is taken as is).

    Example:
        >>> ema = FisherEMA(decay=0.5)
        >>> ema.update("fc", torch.tensor([4.0])); ema.update("fc", torch.tensor([0.0]))
        >>> ema["fc"]
        tensor([2.])
    """

    def __init__(self, decay: float = 0.9) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise QuantizationConfigError(f"`ema_decay` must be a number in [0, 1), got {decay!r}.")
        self.decay = float(decay)
        self._values: dict[str, Tensor] = {}
        self.steps = 0

    def update(self, name: str, value: Tensor) -> None:
        value = value.detach().float()
        old = self._values.get(name)
        if old is None or old.shape != value.shape:
            self._values[name] = value.clone()
        else:
            old.mul_(self.decay).add_(value, alpha=1.0 - self.decay)

    def step(self) -> None:
        """Count one training step (for information: the decay is applied in :meth:`update`)."""
        self.steps += 1

    def __getitem__(self, name: str) -> Tensor:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "steps": self.steps, "values": {k: v.cpu() for k, v in self._values.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.steps = int(state["steps"])
        self._values = {k: v.detach().float().clone() for k, v in state["values"].items()}


def hutchinson_diagonal(
    loss: Tensor, params: Sequence[Tensor], num_samples: int = 8, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Hutchinson estimate of the Hessian's diagonal for each of ``params``: mean of ``v * (H v)``.

    Args:
        loss: a scalar loss whose graph is still alive.
        params: tensors that require grad.
        num_samples: Rademacher probes; the graph is kept until the last one.
        generator: for reproducible probes (on the CPU).

    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> hutchinson_diagonal((3 * w[0] ** 2 + w[1] ** 2), [w], num_samples=2)[0]
    tensor([6., 2.])
    """
    if num_samples < 1:
        raise QuantizationConfigError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    estimates = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in range(num_samples):
        probes = [
            (torch.randint(0, 2, p.shape, generator=generator, dtype=torch.float32) * 2 - 1).to(p.device)
            for p in params
        ]
        hv = torch.autograd.grad(grads, params, grad_outputs=probes, retain_graph=i < num_samples - 1)
        for est, v, h in zip(estimates, probes, hv, strict=True):
            est.add_(v * h.float())
    return [est / num_samples for est in estimates]


def hutchinson_sensitivities(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
    num_samples: int = 8,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One-shot (HAWQ-style) sensitivities of every quantized layer's weight from the Hessian's diagonal.

    As in HAWQ, the curvature is the *float* model's at the current weights: ``loss_fn(model)`` runs with every
    quantizer disabled (LSQ's fake-quant kernel has no second derivative, and the STE's is zero anyway). The
    step sizes are the quantizers' current ones, so initialise them first (one forward with quantizers on).
    Negative diagonal estimates (non-convex regions, probe noise) are clipped at zero.

    Args:
        model: a quantized model.
        loss_fn: computes a scalar loss with ``model`` (e.g. cross-entropy on one batch).
        num_samples: Rademacher probes.
        generator: for reproducible probes.
    """
    from lightning_quant.surgery.layers import quantized_layers

    layers: dict[str, nn.Module] = {}
    for name, layer in quantized_layers(model).items():
        if all(layer is not other for other in layers.values()):
            layers[name] = layer
    with quantizers_disabled(model):
        loss = loss_fn(model)
        diag = hutchinson_diagonal(loss, [layer.weight for layer in layers.values()], num_samples, generator)
    out = {}
    for (name, layer), d in zip(layers.items(), diag, strict=True):
        h = channel_sum(d.clamp_min(0), layer.weight_quantizer.ch_axis)
        out[name] = noise_sensitivity(h, layer.weight_quantizer)
    return out


__all__ = [
    "FisherEMA",
    "channel_sq_sum",
    "channel_sum",
    "hutchinson_diagonal",
    "hutchinson_sensitivities",
    "noise_sensitivity",
]
