"""QBitOpt: per-layer bit widths reallocated during quantization-aware training under a guaranteed budget."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.allocation.cost import (
    BudgetConstraint,
    LayerCosts,
    MacTracer,
    avg_bits_constraint,
    bops_constraint,
    check_budget,
    layer_costs,
    size_constraint,
    trace_macs,
)
from lightning_quant.allocation.sensitivity import FisherEMA, channel_sq_sum, noise_sensitivity
from lightning_quant.allocation.solvers import (
    SOLVERS,
    SolverName,
    allocate,
    check_feasible,
    noise_objective_table,
    validate_bit_choices,
)
from lightning_quant.callbacks.base import QuantizationCallback, plot_file
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.quantizers import Quantizer
from lightning_quant.core.validation import check_choice, check_int
from lightning_quant.surgery.capture import Call, Capture
from lightning_quant.surgery.layers import QuantizedLayer, quantized_layers
from lightning_quant.surgery.quantize import is_quantized
from lightning_quant.surgery.requests import QuantizationRequest, fallback_request
from lightning_quant.surgery.spec import QuantSpec

log = logging.getLogger(__name__)

#: file name of the allocation plot in the logger's directory
PLOT_NAME = "qbitopt_allocation.png"
_INPUT = "@input"


class BitReallocationCallback(QuantizationCallback):
    """QBitOpt: reallocate per-layer weight bit widths during QAT so that a resource budget always holds.

    Paper: J. Peters, M. Fournarakis, M. Nagel, M. van Baalen, T. Blankevoort, "QBitOpt: Fast and Accurate
    Bitwidth Reallocation during Training", ICCV 2023 Workshops (arXiv:2307.04535). From the paper (abstract):
    bit allocation is a constrained optimisation problem; fast-to-compute sensitivities and efficient solvers
    update the bit widths *during* QAT; the result is guaranteed to meet a strict resource constraint (unlike
    bit widths learned by gradients); evaluated under average-bit-width constraints.

    What this callback does, and where it chooses (the stored copies of the paper we could read stop after its
    abstract and introduction, so the formulas below are this suite's, not quoted from the paper):

    * **Sensitivity** -- EMA (``ema_decay``) of the squared gradients that the training computes anyway (read in
      ``on_before_optimizer_step``, after DDP's all-reduce and AMP's unscaling, so every rank sees the same),
      summed per step-size group and multiplied by the noise variance ``Delta**2 / 12`` of the *current* step:
      the Fisher approximation of the loss increase, extrapolated to other widths as ``s * 4**-b``
      (:mod:`lightning_quant.allocation.sensitivity`). No extra forward or backward pass.
    * **Problem** -- minimise ``sum s_l 4**-b_l`` under the budgets (average weight bits weighted by parameters,
      weight size in bits, and/or BOPs ``MACs x w_bits x a_bits``), ``b_l`` in ``bit_choices``; layers with
      ``LayerSpec.frozen`` (the first and last layer under ``first_last_bits``) keep their bits and count at
      them. ``solver="relaxed"``: cvxpy convex relaxation + floor + greedy fill (always within budget, at most
      ``4**gap`` above the optimum, a few percent in practice); ``solver="milp"``: the exact integer optimum
      with HiGHS (:mod:`lightning_quant.allocation.solvers`).
    * **Schedule** -- an initial allocation when training starts (sensitivities proportional to parameter
      counts: for an average-bit budget this is the most uniform allocation that fits), then a re-solve every
      ``every_n_steps`` optimizer steps on rank 0, broadcast to all ranks, and no more changes after
      ``freeze_after`` steps (the fine-tuning phase with fixed widths). Changing a width rescales the step size so
      the represented range is kept (``UniformQuantizer.bits``).
    * ``activations=True`` ties each layer's input bit width to its weight bit width (one variable per layer,
      sensitivities added; BOPs then grow with the square of the width).

    Logged: ``quant/qbitopt/avg_bits`` (parameter-weighted average weight bits), ``quant/qbitopt/budget_used``
    (largest fraction of a budget used, always ``<= 1`` after an allocation), ``quant/qbitopt/objective``
    (estimated loss increase from quantization noise), ``quant/qbitopt/frozen``. A bar plot of bits and
    sensitivities per layer is written to ``<log_dir>/qbitopt_allocation.png`` when training ends. The history of
    allocations is in the checkpoint; the final recipe is :attr:`spec`.

    Alone, the callback quantizes the model first with ``base_spec`` (default: W8A8, first and last layer frozen
    at 8 bits); beside ``QuantizationAwareTraining`` (in either order) the model is quantized once with QAT's
    recipe (and whatever ``base_spec`` sets explicitly).

    Args:
        avg_weight_bits: budget on the parameter-weighted average weight bit width (frozen layers included).
        size_budget: budget on the quantized weights' size in bits (frozen layers included; biases and step
            sizes not counted). Same quantity as ``avg_weight_bits`` up to scale: pass only one of the two.
        bops_budget: budget on bit operations per sample, ``sum MACs x weight bits x input bits`` (float inputs
            count 32 bits). MACs are traced by hooks during the first training forward (or from
            ``example_input_array`` when the module has one).
        every_n_steps: optimizer steps between re-solves.
        freeze_after: optimizer step after which the allocation no longer changes (``None``: never frozen).
        bit_choices: the allowed weight bit widths, in [2, 8].
        activations: tie input bit widths to weight bit widths (see above).
        solver: ``"relaxed"`` or ``"milp"``.
        ema_decay: decay of the squared-gradient moving average, in [0, 1).
        plot: write the allocation plot at the end of training.
        base_spec: recipe used to quantize a model that is not quantized yet.

    Example:
        >>> trainer = L.Trainer(callbacks=[  # doctest: +SKIP
        ...     QuantizationAwareTraining(weight_bits=4, act_bits=8),
        ...     BitReallocationCallback(avg_weight_bits=3.0, every_n_steps=200, freeze_after=2000),
        ... ])
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> callback.spec.save("allocation.yaml")  # doctest: +SKIP
    """

    TECHNIQUE = "qbitopt"
    SOLVERS: ClassVar[tuple[str, ...]] = SOLVERS
    DEFAULT_BIT_CHOICES: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)

    def __init__(
        self,
        avg_weight_bits: float | None = None,
        size_budget: float | None = None,
        bops_budget: float | None = None,
        *,
        every_n_steps: int = 100,
        freeze_after: int | None = None,
        bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES,
        activations: bool = False,
        solver: SolverName = "relaxed",
        ema_decay: float = 0.99,
        plot: bool = True,
        base_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.bit_choices = validate_bit_choices(bit_choices)
        for argument, value in (
            ("avg_weight_bits", avg_weight_bits),
            ("size_budget", size_budget),
            ("bops_budget", bops_budget),
        ):
            check_budget(argument, value)
        if avg_weight_bits is None and size_budget is None and bops_budget is None:
            raise QuantizationConfigError(
                "No budget given. HINT: pass `avg_weight_bits=3.0` (average weight bits), `size_budget=...` (bits "
                "of the quantized weights) or `bops_budget=...` (bit operations per sample)."
            )
        if avg_weight_bits is not None and size_budget is not None:
            raise QuantizationConfigError(
                f"`avg_weight_bits={avg_weight_bits}` and `size_budget={size_budget}` are two budgets on the same "
                "quantity (the weights' storage), so one of them is redundant or they contradict. HINT: pass only "
                "one of them (size = average bits x parameter count)."
            )
        low, high = self.bit_choices[0], self.bit_choices[-1]
        if avg_weight_bits is not None and not low <= avg_weight_bits <= high:
            raise QuantizationConfigError(
                f"`avg_weight_bits` must be within [min_bits, max_bits] = [{low}, {high}], got {avg_weight_bits}. "
                f"HINT: pass a value in [{low}, {high}] or change `bit_choices`."
            )
        check_int("every_n_steps", every_n_steps, minimum=1)
        if freeze_after is not None:
            check_int("freeze_after", freeze_after, minimum=0)
        check_choice("solver", solver, SOLVERS)
        if not isinstance(activations, bool):
            raise QuantizationConfigError(f"`activations` must be True or False, got {activations!r}.")
        if base_spec is not None and not isinstance(base_spec, QuantSpec):
            raise QuantizationConfigError(f"`base_spec` must be a QuantSpec, got {type(base_spec).__name__}.")
        self.avg_weight_bits = None if avg_weight_bits is None else float(avg_weight_bits)
        self.size_budget = None if size_budget is None else float(size_budget)
        self.bops_budget = None if bops_budget is None else float(bops_budget)
        self.every_n_steps = every_n_steps
        self.freeze_after = freeze_after
        self.activations = activations
        self.solver: SolverName = solver
        self.plot = plot
        self.base_spec = base_spec if base_spec is not None else QuantSpec()
        self._base_spec_given = base_spec is not None
        self._ema = FisherEMA(ema_decay)
        self._history: list[dict[str, Any]] = []
        self._last_solved_step = -1
        self._last_ema_step = -1
        self._macs: dict[str, int] | None = None
        self._costs: LayerCosts | None = None
        self._constraints: list[BudgetConstraint] | None = None
        self._tracer: MacTracer | None = None
        self._act_capture: Capture | None = None
        self._act_sq: dict[str, Tensor] = {}
        self._spec: QuantSpec | None = None
        self._plot_path: Path | None = None

    # -- identity, state, results ----------------------------------------------------------------------------
    @override
    def identity(self) -> dict[str, Any]:
        return {
            "avg_weight_bits": self.avg_weight_bits,
            "size_budget": self.size_budget,
            "bops_budget": self.bops_budget,
            "solver": self.solver,
        }

    @override
    def state(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self._history],
            "ema": self._ema.state_dict(),
            "last_solved_step": self._last_solved_step,
            "last_ema_step": self._last_ema_step,
            "macs": None if self._macs is None else dict(self._macs),
        }

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._history = [dict(h) for h in state["history"]]
        self._ema.load_state_dict(state["ema"])
        self._last_solved_step = int(state["last_solved_step"])
        self._last_ema_step = int(state["last_ema_step"])
        self._macs = None if state["macs"] is None else dict(state["macs"])

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every allocation so far: ``step``, ``reason``, ``bits`` and ``sensitivities`` per layer, ``objective``,
        ``costs``/``budgets`` (user units) and ``budget_used``."""
        return [dict(h) for h in self._history]

    @property
    def allocation(self) -> dict[str, int]:
        """The current weight bit width of each allocated layer."""
        if not self._history:
            raise QuantizationConfigError("No allocation yet: call `trainer.fit(...)` with this callback first.")
        return dict(self._history[-1]["bits"])

    @property
    def spec(self) -> QuantSpec:
        """The model's exact recipe after the latest allocation (what export and ``load_quantized`` use)."""
        if self._spec is None:
            raise QuantizationConfigError("No allocation yet: call `trainer.fit(...)` with this callback first.")
        return self._spec

    @property
    def plot_path(self) -> Path | None:
        """Where the allocation plot was written (``None`` before the end of training or with ``plot=False``)."""
        return self._plot_path

    def frozen(self, step: int) -> bool:
        """Whether the allocation no longer changes at optimizer step ``step``."""
        return self.freeze_after is not None and step > self.freeze_after

    # -- surgery and set-up ----------------------------------------------------------------------------------
    @override
    def quantization_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizationRequest:
        # a fallback recipe: another callback's (QAT's) wins, except for what the user set in `base_spec`
        return fallback_request(type(self).__name__, self.base_spec, self._base_spec_given)

    def _units(self, pl_module: nn.Module) -> dict[str, QuantizedLayer]:
        """The layers this callback allocates (quantized, not frozen), by name."""
        assert self._costs is not None
        layers = quantized_layers(pl_module)
        return {n: layers[n] for n, f in zip(self._costs.names, self._costs.frozen, strict=True) if not f}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_quantized(pl_module):
            raise QuantizationConfigError(
                "BitReallocationCallback found no quantized layer (its `base_spec` selects none). HINT: check "
                "`base_spec`'s include/exclude, or add `QuantizationAwareTraining` to the callbacks."
            )
        if self.bops_budget is not None and self._macs is None:
            example = getattr(pl_module, "example_input_array", None)
            if example is not None:
                self._macs = trace_macs(pl_module, example)
            else:
                self._tracer = MacTracer(pl_module)
        self._costs = layer_costs(pl_module, self._macs)
        if self.activations:
            self._check_unshared_inputs(pl_module)
        if self._macs is not None or self.bops_budget is None:
            self._build_constraints()
        if self.activations:
            self._attach_activation_hooks(pl_module)

    def _check_unshared_inputs(self, pl_module: nn.Module) -> None:
        owners: dict[int, str] = {}
        for name, layer in self._units(pl_module).items():
            quantizer = layer.input_quantizer
            if isinstance(quantizer, Quantizer) and owners.setdefault(id(quantizer), name) != name:
                raise QuantizationConfigError(
                    f"`activations=True` gives every layer its own input bits, but {owners[id(quantizer)]!r} and "
                    f"{name!r} share one input quantizer (`quantize_residuals=True` quantizes a residual tensor once "
                    "for all the layers it feeds). HINT: pass `activations=False`, or quantize without "
                    "`quantize_residuals`."
                )

    def _build_constraints(self) -> None:
        assert self._costs is not None
        constraints = []
        if self.avg_weight_bits is not None:
            constraints.append(avg_bits_constraint(self._costs, self.avg_weight_bits))
        if self.size_budget is not None:
            constraints.append(size_constraint(self._costs, self.size_budget))
        if self.bops_budget is not None:
            constraints.append(bops_constraint(self._costs, self.bops_budget, tie_activations=self.activations))
        check_feasible(constraints, self.bit_choices)
        self._constraints = constraints

    def _attach_activation_hooks(self, pl_module: nn.Module) -> None:
        quantizers = {
            name: layer.input_quantizer
            for name, layer in self._units(pl_module).items()
            if isinstance(layer.input_quantizer, Quantizer)
        }
        # the gradient of each quantized input, squared and summed, from the backward that runs anyway
        self._act_capture = Capture(pl_module, quantizers, detach=False, on_call=self._on_activation)

    def _on_activation(self, name: str, module: nn.Module, call: Call) -> None:
        output = call.output
        if not (module.training and isinstance(output, Tensor) and output.requires_grad):
            return

        def on_grad(grad: Tensor) -> None:
            value = channel_sq_sum(grad, None)
            self._act_sq[name] = value if name not in self._act_sq else self._act_sq[name] + value

        output.register_hook(on_grad)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after every restore: a resumed run already has its allocation (history and bit widths come back)
        if not self._history and self._constraints is not None:
            self._reallocate(trainer, pl_module, reason="initial")

    # -- sensitivities ---------------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step == self._last_ema_step or self.frozen(step + 1):
            return
        self._last_ema_step = step
        for name, layer in self._units(pl_module).items():
            if layer.weight.grad is not None:
                self._ema.update(name, channel_sq_sum(layer.weight.grad, layer.weight_quantizer.ch_axis))
            if name in self._act_sq:
                self._ema.update(name + _INPUT, self._act_sq.pop(name))
        self._act_sq.clear()
        self._ema.step()

    def sensitivities(self, pl_module: nn.Module) -> dict[str, float]:
        """The current sensitivity ``s`` of each allocated layer (objective ``sum s * 4**-bits``)."""
        out = {}
        for name, layer in self._units(pl_module).items():
            s = noise_sensitivity(self._ema[name], layer.weight_quantizer) if name in self._ema else 0.0
            quantizer = layer.input_quantizer
            if self.activations and isinstance(quantizer, Quantizer) and name + _INPUT in self._ema:
                s += noise_sensitivity(self._ema[name + _INPUT], quantizer)
            out[name] = s
        return out

    # -- allocation ------------------------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._tracer is not None and self._tracer.traced:
            self._macs = dict(self._tracer.macs)
            self._tracer.remove()
            self._tracer = None
            self._costs = layer_costs(pl_module, self._macs)
            self._build_constraints()
            if not self._history:
                self._reallocate(trainer, pl_module, reason="initial")
        step = trainer.global_step
        if (
            self._constraints is not None
            and step > 0
            and step % self.every_n_steps == 0
            and step != self._last_solved_step
            and not self.frozen(step)
        ):
            self._reallocate(trainer, pl_module, reason="solve")
        if self._history:
            last = self._history[-1]
            self.log_metric(pl_module, "avg_bits", _avg_weight_bits(pl_module))
            self.log_metric(pl_module, "budget_used", float(last["budget_used"]))
            self.log_metric(pl_module, "objective", float(last["objective"]))
            self.log_metric(pl_module, "frozen", float(self.frozen(step)))

    def _reallocate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        assert self._constraints is not None and self._costs is not None
        units = self._units(pl_module)
        record: dict[str, Any] | None = None
        if trainer.is_global_zero:
            if reason == "initial":
                # sensitivities proportional to the parameter count: the most uniform allocation that fits
                sens = {n: float(layer.weight.numel()) for n, layer in units.items()}
            else:
                sens = self.sensitivities(pl_module)
            names = list(units)
            table = noise_objective_table(np.array([sens[n] for n in names]), self.bit_choices)
            result = allocate(table, self._constraints, self.bit_choices, self.solver)
            record = {
                "step": int(trainer.global_step),
                "reason": reason,
                "bits": {n: int(b) for n, b in zip(names, result.bits, strict=True)},
                "sensitivities": {n: float(sens[n]) for n in names},
                "objective": float(result.objective),
                "costs": dict(result.costs),
                "budgets": dict(result.budgets),
                "budget_used": float(result.budget_used),
            }
            log.info(
                "QBitOpt %s at step %d: %s (objective %.4g, budget used %.4f, %.1f ms)",
                reason,
                record["step"],
                " ".join(f"{b}" for b in record["bits"].values()),
                record["objective"],
                record["budget_used"],
                1000 * result.seconds,
            )
        record = trainer.strategy.broadcast(record, src=0)
        self._apply(units, record["bits"])
        self._history.append(record)
        self._last_solved_step = int(trainer.global_step)
        self._spec = QuantSpec.from_model(pl_module)

    def _apply(self, units: dict[str, QuantizedLayer], bits: dict[str, int]) -> None:
        for name, b in bits.items():
            layer = units[name]
            layer.weight_quantizer.bits = b
            if self.activations and isinstance(layer.input_quantizer, Quantizer):
                layer.input_quantizer.bits = b

    # -- end of training -------------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._history:
            self._spec = QuantSpec.from_model(pl_module)
        if not (self.plot and self._history):
            return
        path = plot_file(trainer, PLOT_NAME)
        if path is not None:
            layers = quantized_layers(pl_module)
            assert self._costs is not None
            bits = {n: layers[n].weight_quantizer.bits for n in self._costs.names}
            sens = self._history[-1]["sensitivities"]
            frozen = {n for n, f in zip(self._costs.names, self._costs.frozen, strict=True) if f}
            self._plot_path = save_allocation_plot(bits, sens, frozen, path)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._act_capture is not None:
            self._act_capture.remove()
            self._act_capture = None
        self._act_sq = {}
        if self._tracer is not None:
            self._tracer.remove()
            self._tracer = None


def save_allocation_plot(
    bits: dict[str, int], sensitivities: dict[str, float], frozen: set[str], path: str | Path
) -> Path:
    """Bar plots of weight bits per layer (frozen layers in grey) and of sensitivities (log scale) into ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(bits)
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 6.0), constrained_layout=True)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    colors = ["0.6" if n in frozen else "tab:blue" for n in names]
    top.bar(x, [bits[n] for n in names], color=colors)
    top.set_ylabel("weight bits")
    top.set_title("QBitOpt allocation (grey: frozen layers)")
    top.set_yticks(range(0, max(bits.values()) + 1))
    values = [max(sensitivities.get(n, 0.0), 1e-30) if n not in frozen else 0.0 for n in names]
    bottom.bar(x, values, color="tab:orange")
    if any(v > 0 for v in values):
        bottom.set_yscale("log")
    bottom.set_ylabel("sensitivity s (loss x 4^b)")
    bottom.set_xticks(x, names, rotation=90, fontsize=7)
    fig.savefig(path, dpi=100)
    return path


def _avg_weight_bits(model: nn.Module) -> float:
    layers = {id(m): m for m in quantized_layers(model).values()}.values()
    params = sum(m.weight.numel() for m in layers)
    return sum(m.weight_quantizer.payload_bits(m.weight) for m in layers) / max(params, 1)


__all__ = ["PLOT_NAME", "BitReallocationCallback", "save_allocation_plot"]
