"""OMPQ: per-layer weight bits from the orthogonality of the layers' features on one batch, once, before training."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.allocation.cost import BudgetConstraint, LayerCosts, layer_costs
from lightning_quant.allocation.orthogonality import (
    MIB_BITS,
    MODES,
    OmpqMode,
    allocate_by_orthogonality,
    orthogonality_budget,
    validate_orthogonality_arguments,
)
from lightning_quant.allocation.solvers import ALLOCATION_SOLVERS, AllocationSolver
from lightning_quant.callbacks.base import QuantizationCallback, plot_file
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.surgery.capture import batch_inputs
from lightning_quant.surgery.layers import quantized_layers
from lightning_quant.surgery.quantize import is_quantized
from lightning_quant.surgery.requests import QuantizationRequest, fallback_request
from lightning_quant.surgery.spec import QuantSpec
from lightning_quant.surgery.summary import quantization_summary

log = logging.getLogger(__name__)

#: file name of the allocation plot in the logger's directory
PLOT_NAME = "ompq_allocation.png"


class OrthogonalMixedPrecision(QuantizationCallback):
    """OMPQ: allocate per-layer weight bits once, from the orthogonality of the layers' features on one batch.

    Paper: Y. Ma et al., "OMPQ: Orthogonal Mixed Precision Quantization", AAAI 2023 (arXiv:2109.07865).

    *From the paper*: the features of every layer on one small batch (32 images) give the network orthogonality
    matrix ``ORM_ij`` = linear CKA of layers ``i`` and ``j``; a layer's importance is ``theta_i = exp(-beta
    gamma_i)`` with ``gamma_i = sum_{j != i} ORM_ij`` (nearly orthogonal layers matter more); the widths maximise
    ``sum_i b_i (1 / (L - i)) sum_{j >= i} theta_j`` under a model-size budget with the first and last layer at 8
    bits -- a linear program, no search iterations, seconds of work.

    *What the official code (MAC-AutoML/OMPQ) does*: features are ResNet block outputs (after BatchNorm, ReLU and the
    residual addition), from a forward in training mode; ``beta`` is set by hand per run (10 for ResNet-18 QAT at
    6.7 MiB, 100 for ResNet-18 PTQ, ``1e-9`` for MobileNetV2 PTQ); SciPy's SLSQP solves the relaxed program over
    4-8 bits (QAT) or 2-4 bits (PTQ), then a floor/ceil search (ResNet-18) or plain rounding (others) gives integer
    widths, the latter not always within the budget; sizes count BatchNorm and bias parameters.

    *Our choices* (see :mod:`lightning_quant.allocation.orthogonality`):

    * **Features**: the *output* of each allocated Conv/Linear layer (before BatchNorm), flattened per sample,
      captured by a forward hook; only the ``n x n`` Gram matrix of the centred features is kept (never ``d x d``).
      A layer called several times contributes all its calls; a layer that never runs is a clear error (freeze or
      exclude it).
    * **Forward**: the float model (every quantizer off) in eval mode, under ``no_grad``, on the first
      ``num_samples`` inputs of a fresh pass over the training loader (more batches are read if the first is
      smaller; with shuffling these are random training samples, not necessarily the first training batch). The
      global and the loader's random generators are restored afterwards, so the training sees the same batches as
      without OMPQ. Modes, BatchNorm statistics and quantizers are left as they were.
    * **beta**: an argument, default 10 (the paper's ResNet-18 QAT value); the MNIST sweep in BENCHMARKS.md measures
      0, 1, 10 and 100. Importances are computed relative to the largest one (same allocation, no underflow).
    * **Widths** (``mode``): ``"qat"`` allocates 4-8 bits and ``"ptq"`` 2-4 bits (the official ranges) unless
      ``bit_choices`` says otherwise; the first and last layers stay at 8 bits (``first_last_bits``, frozen) and count
      in the budget in both modes.
    * **Budget**: ``size_budget_mb`` (the quantized weights in MiB, ``2**20`` bytes; biases and step sizes not
      counted) or ``avg_weight_bits`` (parameter-weighted average over every quantized layer). A budget outside the
      achievable range is an error in ``setup``, before any training.
    * **Solver**: ``"monotone"`` (default): the longest prefix of the objective's best-first chain of one-bit steps
      that fits (:func:`~lightning_quant.allocation.solvers.solve_monotone`): always within budget, and a larger
      budget never gives a layer fewer bits; it leaves unused less than one layer's one-bit step of the budget.
      ``"relaxed"`` (LP + budget-keeping rounding) and ``"milp"`` (exact) use the budget more fully but are not
      monotone in it.

    **When**: in ``on_train_start``, once -- after Lightning has restored a checkpoint (model, callback states, loops)
    and built the training loader (``trainer.train_dataloader``), before the first training batch: so before
    ``QuantizationAwareTraining`` calibrates the activations and before any optimizer step. ``on_fit_start`` would be
    earlier but has no training loader yet. The one forward that can run before is Lightning's sanity validation,
    which initialises the weights' step sizes at the base widths; the layers whose width changes get their step
    re-initialised from their weights at the new width (``recalibrate``), exactly what their first forward would have
    done. Under DDP rank 0 allocates and broadcasts the widths.

    **Resume**: the allocation (widths, ORM, importances, costs) is the callback's state in the checkpoint, and the
    widths are in the model's state. A resumed run finds the restored state in ``on_train_start`` and neither
    recomputes nor changes anything -- into a freshly constructed module too.

    Alone, the callback quantizes the model first with ``base_spec`` (default: W8A8 LSQ, first and last layer frozen
    at 8 bits); beside ``QuantizationAwareTraining`` (in either order) the model is quantized once with QAT's recipe
    (and whatever ``base_spec`` sets explicitly).

    Logged once per epoch: ``quant/ompq/avg_bits``, ``quant/ompq/weight_size_mib`` (the budgets' quantities),
    ``quant/ompq/budget_used`` (cost / budget, ``<= 1``) and ``quant/ompq/bits/<layer>``. A plot of the bits per
    layer beside the ORM heat map is written to ``<log_dir>/ompq_allocation.png``. :attr:`spec` is the model's
    recipe after the allocation.

    Args:
        size_budget_mb: budget on the quantized weights' size in MiB (frozen layers included).
        avg_weight_bits: budget on the parameter-weighted average weight bits (frozen layers included). Pass exactly
            one of the two.
        beta: importance temperature, ``>= 0`` (0: every layer equally important).
        num_samples: samples the features are computed from (at least 2; the paper: 32).
        bit_choices: allowed widths, 2-8; default ``mode``'s range.
        mode: ``"qat"`` (4-8 bits) or ``"ptq"`` (2-4 bits).
        solver: ``"monotone"``, ``"relaxed"`` or ``"milp"``.
        plot: write the plot.
        base_spec: recipe used to quantize a model that is not quantized yet.

    Example:
        >>> trainer = L.Trainer(callbacks=[  # doctest: +SKIP
        ...     QuantizationAwareTraining(weight_bits=8, act_bits=8),
        ...     OrthogonalMixedPrecision(avg_weight_bits=5.0, beta=10.0),
        ... ])
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> callback.spec.save("ompq.yaml")  # doctest: +SKIP
    """

    TECHNIQUE = "ompq"
    MODES: ClassVar[tuple[str, ...]] = MODES
    SOLVERS: ClassVar[tuple[str, ...]] = ALLOCATION_SOLVERS

    def __init__(
        self,
        size_budget_mb: float | None = None,
        avg_weight_bits: float | None = None,
        *,
        beta: float = 10.0,
        num_samples: int = 32,
        bit_choices: Sequence[int] | None = None,
        mode: OmpqMode = "qat",
        solver: AllocationSolver = "monotone",
        plot: bool = True,
        base_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.bit_choices = validate_orthogonality_arguments(
            size_budget_mb=size_budget_mb,
            avg_weight_bits=avg_weight_bits,
            beta=beta,
            num_samples=num_samples,
            bit_choices=bit_choices,
            mode=mode,
            solver=solver,
        )
        if not isinstance(plot, bool):
            raise QuantizationConfigError(f"`plot` must be True or False, got {plot!r}.")
        if base_spec is not None and not isinstance(base_spec, QuantSpec):
            raise QuantizationConfigError(f"`base_spec` must be a QuantSpec, got {type(base_spec).__name__}.")
        self.size_budget_mb = None if size_budget_mb is None else float(size_budget_mb)
        self.avg_weight_bits = None if avg_weight_bits is None else float(avg_weight_bits)
        self.beta = float(beta)
        self.num_samples = num_samples
        self.mode: OmpqMode = mode
        self.solver: AllocationSolver = solver
        self.plot = plot
        self.base_spec = base_spec if base_spec is not None else QuantSpec()
        self._base_spec_given = base_spec is not None
        self._record: dict[str, Any] | None = None
        self._costs: LayerCosts | None = None
        self._constraint: BudgetConstraint | None = None
        self._spec: QuantSpec | None = None
        self._plot_path: Path | None = None

    # -- identity, state, results ----------------------------------------------------------------------------
    @override
    def identity(self) -> dict[str, Any]:
        return {
            "size_budget_mb": self.size_budget_mb,
            "avg_weight_bits": self.avg_weight_bits,
            "beta": self.beta,
            "mode": self.mode,
            "solver": self.solver,
        }

    @override
    def state(self) -> dict[str, Any]:
        return {"record": None if self._record is None else dict(self._record)}

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        record = state.get("record")
        self._record = None if record is None else dict(record)

    @property
    def result(self) -> dict[str, Any]:
        """The allocation: ``names`` (allocated layers, forward order), ``orm``, ``gamma``, ``theta``, ``weights``,
        ``bits`` per layer, ``costs``/``budgets`` (user units), ``budget_used``, ``beta``, ``num_samples``,
        ``seconds`` (of which ``feature_seconds``)."""
        if self._record is None:
            raise QuantizationConfigError("No allocation yet: call `trainer.fit(...)` with this callback first.")
        return dict(self._record)

    @property
    def allocation(self) -> dict[str, int]:
        """The allocated weight bit width of each allocated layer."""
        return dict(self.result["bits"])

    @property
    def spec(self) -> QuantSpec:
        """The model's exact recipe after the allocation (what export and ``load_quantized`` use)."""
        if self._spec is None:
            raise QuantizationConfigError("No allocation yet: call `trainer.fit(...)` with this callback first.")
        return self._spec

    @property
    def plot_path(self) -> Path | None:
        """Where the plot was written (``None`` before the allocation, on a resumed run, or with ``plot=False``)."""
        return self._plot_path

    # -- surgery and budget ----------------------------------------------------------------------------------
    @override
    def quantization_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizationRequest:
        # a fallback recipe: another callback's (QAT's) wins, except for what the user set in `base_spec`
        return fallback_request(type(self).__name__, self.base_spec, self._base_spec_given)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not is_quantized(pl_module):
            raise QuantizationConfigError(
                "OrthogonalMixedPrecision found no quantized layer (its `base_spec` selects none). HINT: check "
                "`base_spec`'s include/exclude, or add `QuantizationAwareTraining` to the callbacks."
            )
        # the budget is checked against the model now, before any training (and before a checkpoint is restored)
        self._costs = layer_costs(pl_module)
        self._constraint = orthogonality_budget(
            self._costs, self.bit_choices, size_budget_mb=self.size_budget_mb, avg_weight_bits=self.avg_weight_bits
        )

    # -- the allocation --------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._record is not None:  # restored from the checkpoint: the widths came back with the model's state
            self._apply(pl_module, self._record["bits"], recalibrate=False)
            self._spec = QuantSpec.from_model(pl_module)
            return
        if self._costs is None or self._constraint is None:
            raise QuantizationConfigError("OrthogonalMixedPrecision.setup('fit') did not run before training.")
        record: dict[str, Any] | None = None
        if trainer.is_global_zero:
            try:
                inputs = self._first_samples(trainer, pl_module)
                result = allocate_by_orthogonality(
                    pl_module,
                    inputs,
                    self._costs,
                    self._constraint,
                    beta=self.beta,
                    bit_choices=self.bit_choices,
                    solver=self.solver,
                )
                record = result.to_record()
            except QuantizationConfigError as err:  # every rank must raise, not wait for the broadcast
                record = {"error": str(err)}
        record = trainer.strategy.broadcast(record, src=0)
        assert record is not None
        if "error" in record:
            raise QuantizationConfigError(record["error"])
        self._apply(pl_module, record["bits"], recalibrate=True)
        self._record = record
        self._spec = QuantSpec.from_model(pl_module)
        if trainer.is_global_zero:
            log.info(
                "OMPQ allocation (beta %g, %d samples, %.2f s): %s; %s",
                self.beta,
                record["num_samples"],
                record["seconds"],
                " ".join(f"{name}={b}" for name, b in record["bits"].items()),
                ", ".join(f"{k} {v:.4g} of {record['budgets'][k]:.4g}" for k, v in record["costs"].items()),
            )
        path = plot_file(trainer, PLOT_NAME)
        if self.plot and path is not None:
            self._plot_path = save_orthogonality_plot(record, path)

    def _first_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """The first ``num_samples`` inputs of a fresh pass over the training loader, whose random draws
        (global generator, the loader's and its sampler's generators) are undone afterwards."""
        loader = _first_loader(trainer.train_dataloader)
        if loader is None:
            raise QuantizationConfigError(
                "OrthogonalMixedPrecision needs training batches to compute features from, but the trainer has no "
                "training dataloader. HINT: pass one to `trainer.fit`, or use `orthogonal_allocation(model, batch)`."
            )
        parts: list[Tensor] = []
        count = 0
        with _random_state_kept(loader):
            for batch in loader:
                inputs = batch_inputs(batch, "OrthogonalMixedPrecision")
                if inputs.dim() == 0:
                    break
                parts.append(inputs[: self.num_samples - count].detach())
                count += int(parts[-1].shape[0])
                if count >= self.num_samples:
                    break
        if count < 2:
            raise QuantizationConfigError(
                f"OrthogonalMixedPrecision needs at least 2 training samples (CKA compares samples with each other), "
                f"the training loader gave {count}. HINT: use a larger training set or batch."
            )
        if count < self.num_samples:
            log.warning("OMPQ: the training loader gave %d samples, not num_samples=%d.", count, self.num_samples)
        inputs = torch.cat(parts)
        dtype = getattr(pl_module, "dtype", None)
        if inputs.is_floating_point() and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            inputs = inputs.to(dtype=dtype)
        return inputs.to(device=pl_module.device)

    def _apply(self, pl_module: nn.Module, bits: Mapping[str, int], recalibrate: bool) -> None:
        layers = quantized_layers(pl_module)
        for name, width in bits.items():
            layer = layers[name]
            quantizer = layer.weight_quantizer
            if quantizer.bits == width:
                continue
            quantizer.bits = int(width)
            if recalibrate and quantizer.is_initialized:
                # initialised at the old width (Lightning's sanity validation): set the step as the first forward
                # would have, from the weights at the new width
                quantizer.recalibrate(layer.weight.detach())

    # -- metrics ---------------------------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._record is None or batch_idx != 0:
            return  # the allocation does not change during training: once per epoch is enough
        summary = quantization_summary(pl_module)
        self.log_metric(pl_module, "avg_bits", summary.avg_weight_bits, on_step=False, on_epoch=True)
        weights = sum(r.payload_bits for r in summary.rows)
        self.log_metric(pl_module, "weight_size_mib", weights / MIB_BITS, on_step=False, on_epoch=True)
        self.log_metric(pl_module, "budget_used", float(self._record["budget_used"]), on_step=False, on_epoch=True)
        for name, width in self._record["bits"].items():
            self.log_metric(pl_module, f"bits/{name}", float(width), on_step=False, on_epoch=True)


def _first_loader(loaders: Any) -> Any:
    """The first loader of what ``trainer.train_dataloader`` holds (a loader, or a sequence/mapping of them)."""
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


@contextlib.contextmanager
def _random_state_kept(loader: Any) -> Iterator[None]:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (
        getattr(loader, "generator", None),
        getattr(sampler, "generator", None),
        getattr(getattr(batch_sampler, "sampler", None), "generator", None),
    )
    generators = {id(g): g for g in candidates if isinstance(g, torch.Generator)}.values()
    saved = [(g, g.get_state()) for g in generators]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for generator, state in saved:
            generator.set_state(state)


def save_orthogonality_plot(record: Mapping[str, Any], path: str | Path) -> Path:
    """Bits per allocated layer (forward order) beside the ORM heat map, into ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(record["names"])
    bits = [record["bits"][n] for n in names]
    orm = np.asarray(record["orm"], dtype=np.float64)
    size = max(4.0, 0.28 * len(names) + 2.5)
    fig = Figure(figsize=(2 * size + 1.0, size), constrained_layout=True)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    y = np.arange(len(names))
    left.barh(y, bits, color="tab:blue")
    left.set_yticks(y, names, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("weight bits")
    left.set_xticks(range(0, max(bits, default=8) + 1))
    left.set_title(f"OMPQ allocation (beta {record['beta']:g}; first/last layer frozen)")
    image = right.imshow(orm, vmin=0.0, vmax=1.0, cmap="viridis")
    right.set_xticks(y, [str(i) for i in y], fontsize=7)
    right.set_yticks(y, [str(i) for i in y], fontsize=7)
    right.set_title("ORM (linear CKA between layers)")
    fig.colorbar(image, ax=right, shrink=0.8)
    fig.savefig(path, dpi=100)
    return path


__all__ = ["PLOT_NAME", "OrthogonalMixedPrecision", "save_orthogonality_plot"]
