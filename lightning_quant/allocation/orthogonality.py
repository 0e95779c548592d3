"""Network orthogonality (OMPQ): linear CKA between the layers' features of one batch, importance, objective table.

Seed paper: Y. Ma, T. Jin, X. Zheng, Y. Wang, H. Li, Y. Wu, G. Jiang, W. Zhang, R. Ji, "OMPQ: Orthogonal Mixed
Precision Quantization", AAAI 2023 (arXiv:2109.07865). A layer whose features are nearly orthogonal to every other
layer's carries information the rest of the network does not, so it gets more bits; one small batch and one forward
pass give the whole allocation, with no search iterations.

**ORM** (orthogonality matrix). For ``n`` samples, layer ``i``'s features flattened per sample are ``X_i``
(``n x d_i``) and ``K_i = X_i X_i^T`` (``n x n``); with the centring matrix ``H = I - 11^T / n``,
``K~_i = H K_i H`` and

.. math::

    \\mathrm{ORM}_{ij}
    = \\frac{\\langle \\tilde K_i, \\tilde K_j \\rangle_F}{\\|\\tilde K_i\\|_F\\,\\|\\tilde K_j\\|_F}
    = \\frac{\\|\\tilde X_i^\\top \\tilde X_j\\|_F^2}
           {\\|\\tilde X_i^\\top \\tilde X_i\\|_F\\,\\|\\tilde X_j^\\top \\tilde X_j\\|_F},

the linear CKA of Kornblith et al. (2019), with ``X~ = H X`` the features centred over the samples. Only the
``n x n`` Gram matrices are formed, never a ``d x d`` one: each is computed by a forward hook the moment the layer
runs (:class:`GramRecorder`) and the features are dropped, so memory is ``L n^2`` numbers. The Gram matrix of the
centred features is ``K~`` exactly (and loses less precision than centring ``K`` afterwards). A layer called several
times in one forward has its calls' features concatenated per sample (their Gram matrices add up). ``ORM`` is
symmetric with a unit diagonal and entries in ``[0, 1]`` (``<K~_i, K~_j> = ||X~_i^T X~_j||^2 >= 0`` and
Cauchy-Schwarz), and invariant to orthogonal transforms and isotropic scaling of any layer's features.

**Importance** (the paper): ``gamma_i = sum_{j != i} ORM_ij`` (how much layer ``i`` overlaps the others) and
``theta_i = exp(-beta gamma_i)``; ``beta >= 0`` sets how far importances spread (``beta = 0``: all equal).
Here ``theta_i`` is computed as ``exp(-beta (gamma_i - min_j gamma_j))``, i.e. divided by the positive constant
``exp(-beta min gamma)``: the allocation does not change, and large ``beta`` no longer underflows every ``theta``
to 0 (a layer whose relative ``theta`` underflows still gets weight 0 and stays at the lowest width).

**Objective** (the paper's linear program, layers in forward order ``i = 0..L-1``): maximise
``sum_i w_i b_i`` with ``w_i = (1 / (L - i)) sum_{j >= i} theta_j`` -- the mean importance of layer ``i`` and every
layer after it, so a layer whose outputs feed important layers matters too -- under a model-size budget, the first
and last layer fixed at 8 bits. :func:`orthogonality_objective_table` writes it as the suite's table
``T[i, b] = -w_i b`` (:func:`~lightning_quant.allocation.solvers.linear_objective_table`), solved by
:func:`~lightning_quant.allocation.solvers.allocate`: integer widths that always meet the budget.

What the official code (MAC-AutoML/OMPQ) does, and where this module differs:

* It takes the outputs of ResNet *blocks* (``conv-bn-relu`` of a block's first convolution and the block's output
  after the residual addition), with the downsampling convolution counted in the block's second layer. Here every
  allocated Conv/Linear layer has its own feature: its own output (before BatchNorm), captured by a hook on the
  layer -- the same rule for any architecture.
* It runs the forward in training mode (BatchNorm on batch statistics). Here the forward runs in eval mode (the
  running statistics of the model being quantized; no BatchNorm buffer or dropout mask changes) with every
  quantizer off, so the features are the float model's.
* It solves the program with SciPy's SLSQP over ``x = b / 8`` in ``[0.5, 1]`` (QAT, 4-8 bits) or
  ``[0.25, 0.5]`` (PTQ, 2-4 bits) and rounds by a search over floor/ceil (ResNet-18) or to the nearest integer
  (others), which may exceed the budget. Here the integer program is solved directly over the allowed widths
  (``mode`` chooses the paper's ranges unless ``bit_choices`` is given), and the result always meets the budget.
  The default solver is the budget-monotone chain (:func:`~lightning_quant.allocation.solvers.solve_monotone`):
  a larger budget never gives a layer fewer bits, which neither the LP rounding nor the exact MILP guarantee.
* Its size counts BatchNorm and bias parameters; here the size is that of the quantized weights
  (:func:`~lightning_quant.allocation.cost.size_constraint`), in MiB (``2**20`` bytes), frozen layers included.
* ``beta`` is a per-run hand-set value there (10 for ResNet-18 QAT at 6.7 MiB, 100 for its PTQ run, ``1e-9`` for
  MobileNetV2 PTQ); nothing chooses it. Here too it is an argument.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_quant.allocation.cost import (
    BudgetConstraint,
    LayerCosts,
    avg_bits_constraint,
    check_budget,
    layer_costs,
    size_constraint,
)
from lightning_quant.allocation.solvers import (
    ALLOCATION_SOLVERS,
    Allocation,
    AllocationSolver,
    achievable_range,
    allocate,
    linear_objective_table,
    validate_bit_choices,
)
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.validation import check_choice, check_real
from lightning_quant.surgery.capture import Call, Capture, batch_inputs, modes_kept, quantizers_disabled
from lightning_quant.surgery.layers import quantized_layers
from lightning_quant.surgery.quantize import is_quantized, quantize_model
from lightning_quant.surgery.spec import QuantSpec

log = logging.getLogger(__name__)

OmpqMode = Literal["qat", "ptq"]
#: the official code's bit ranges: x = b / 8 in [0.5, 1] for QAT, [0.25, 0.5] for PTQ
MODE_BIT_CHOICES: dict[str, tuple[int, ...]] = {"qat": (4, 5, 6, 7, 8), "ptq": (2, 3, 4)}
MODES: tuple[str, ...] = tuple(MODE_BIT_CHOICES)
#: bits in one MiB (2**20 bytes), the unit of `size_budget_mb`
MIB_BITS = 8 * 2**20
#: centred features with less than this fraction of the raw features' energy count as constant (no information)
_CONSTANT = 1e-10


# -- Gram matrices and CKA ----------------------------------------------------------------------------------------
def centered_gram(features: Tensor) -> Tensor:
    """``K~ = X~ X~^T`` (``n x n``, float64) of features ``[n, ...]`` flattened per sample and centred over samples.

    Computed in float64 for float64 features and in float32 otherwise (then returned as float64). Features that do
    not vary over the samples (centred energy below ``1e-10`` of the raw energy: round-off only) give a zero matrix.

    >>> centered_gram(torch.tensor([[1.0, 0.0], [3.0, 0.0]])).tolist()
    [[1.0, -1.0], [-1.0, 1.0]]
    """
    x = features.detach().reshape(features.shape[0], -1)
    x = x.double() if x.dtype == torch.float64 else x.float()
    mean = x.mean(dim=0, keepdim=True)
    centred = x - mean
    gram = centred @ centred.T
    energy = float(torch.trace(gram))  # ||X~||^2; the raw energy ||X||^2 adds n ||mean||^2
    if not energy > _CONSTANT * (energy + x.shape[0] * float(mean.pow(2).sum())):
        return torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    return gram.double()


def cka_matrix(grams: Sequence[Tensor]) -> np.ndarray:
    """The ORM: linear CKA between every pair of centred Gram matrices (``[L, L]``, symmetric, unit diagonal,
    entries in ``[0, 1]``). A zero Gram matrix (constant features) has CKA 0 with every other layer."""
    if not grams:
        return np.zeros((0, 0))
    flat = torch.stack([g.detach().to(device="cpu", dtype=torch.float64).reshape(-1) for g in grams])
    norms = flat.norm(dim=1)
    unit = flat / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    orm = (unit @ unit.T).numpy()
    orm = np.clip((orm + orm.T) / 2, 0.0, 1.0)
    np.fill_diagonal(orm, 1.0)
    return orm


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two feature tensors ``[n, ...]`` (same ``n``), through their ``n x n`` Gram matrices.

    >>> x = torch.randn(16, 5, dtype=torch.float64)
    >>> round(linear_cka(x, 3.0 * x), 12)
    1.0
    """
    if x.shape[0] != y.shape[0]:
        raise QuantizationConfigError(
            f"`x` and `y` need the same number of samples, got {x.shape[0]} and {y.shape[0]}."
        )
    return float(cka_matrix([centered_gram(x), centered_gram(y)])[0, 1])


# -- importance and objective -------------------------------------------------------------------------------------
def orthogonality_importance(orm: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """``(gamma, theta)``: ``gamma_i = sum_{j != i} ORM_ij`` and ``theta_i = exp(-beta (gamma_i - min gamma))``
    (the paper's ``exp(-beta gamma_i)`` divided by a positive constant, see the module docs).

    >>> gamma, theta = orthogonality_importance(np.array([[1.0, 0.5], [0.5, 1.0]]), 2.0)
    >>> gamma.tolist(), theta.tolist()
    ([0.5, 0.5], [1.0, 1.0])
    """
    orm = np.asarray(orm, dtype=np.float64)
    check_real("beta", beta, minimum=0, fix=_BETA_FIX)
    gamma = orm.sum(axis=1) - np.diag(orm)
    theta = np.exp(-float(beta) * (gamma - gamma.min())) if gamma.size else gamma.copy()
    return gamma, theta


def orthogonality_weights(theta: np.ndarray) -> np.ndarray:
    """The objective weight of each layer (forward order): ``w_i = mean(theta_i, ..., theta_{L-1})``.

    >>> orthogonality_weights(np.array([1.0, 0.0, 0.5])).tolist()
    [0.5, 0.25, 0.5]
    """
    theta = np.asarray(theta, dtype=np.float64)
    suffix = np.cumsum(theta[::-1])[::-1]
    return suffix / (theta.size - np.arange(theta.size))


def orthogonality_objective_table(orm: np.ndarray, beta: float, bit_choices: Sequence[int]) -> np.ndarray:
    """The suite's objective table of OMPQ, ``T[i, j] = -w_i * bit_choices[j]`` (rows in the ORM's forward order)."""
    _, theta = orthogonality_importance(orm, beta)
    return linear_objective_table(orthogonality_weights(theta), bit_choices)


# -- features by hooks --------------------------------------------------------------------------------------------
class GramRecorder:
    """Forward hooks that turn each named layer's output into its centred Gram matrix the moment it runs.

    Attributes:
        grams: ``{name: [n, n] float64}`` summed over the layer's calls (its calls' features concatenated).
        order: the layers in the order of their first call.
        calls: how many times each layer ran.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], num_samples: int) -> None:
        self.num_samples = num_samples
        self.grams: dict[str, Tensor] = {}
        self.order: list[str] = []
        self.calls: dict[str, int] = dict.fromkeys(layers, 0)
        self._capture = Capture(model, layers, on_call=self._record)

    def _record(self, name: str, module: nn.Module, call: Call) -> None:
        output = call.output
        if not isinstance(output, Tensor):
            raise QuantizationConfigError(
                f"Layer {name!r} returned {type(output).__name__}, not a tensor: OMPQ's features are layer outputs."
            )
        if output.dim() == 0 or output.shape[0] != self.num_samples:
            raise QuantizationConfigError(
                f"Layer {name!r} gave an output of shape {tuple(output.shape)}, whose first dimension is not the "
                f"batch's {self.num_samples} samples: OMPQ needs one feature row per sample. HINT: freeze the layer "
                f"(`QuantSpec(layers={{{name!r}: LayerSpec(frozen=True)}})`) or exclude it from quantization."
            )
        gram = centered_gram(output)
        if name in self.grams:
            self.grams[name] = self.grams[name] + gram
        else:
            self.grams[name] = gram
            self.order.append(name)
        self.calls[name] += 1

    def remove(self) -> None:
        self._capture.remove()

    def __enter__(self) -> GramRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def layer_grams(model: nn.Module, inputs: Tensor, layers: Mapping[str, nn.Module]) -> GramRecorder:
    """One forward of ``inputs`` through the float model (quantizers off, eval mode; both restored afterwards)
    with a :class:`GramRecorder` on ``layers``; raises a clear error for a layer that never ran."""
    recorder = GramRecorder(model, layers, int(inputs.shape[0]))
    with recorder, quantizers_disabled(model), modes_kept(model, training=False):
        model(inputs)
    silent = [name for name, count in recorder.calls.items() if count == 0]
    if silent:
        shown = ", ".join(repr(n) for n in silent[:8]) + (", ..." if len(silent) > 8 else "")
        raise QuantizationConfigError(
            f"OMPQ allocates bits to {shown}, but the forward pass of the batch never called "
            f"{'it' if len(silent) == 1 else 'them'}, so there are no features to compare. HINT: freeze "
            f"{'it' if len(silent) == 1 else 'them'} (`QuantSpec(layers={{{silent[0]!r}: LayerSpec(frozen=True)}})`, "
            "kept at its bits and counted in the budget) or exclude it from quantization (`exclude=[...]`)."
        )
    return recorder


# -- arguments and budgets ----------------------------------------------------------------------------------------
_BETA_FIX = "`beta=0` weighs every layer equally; the paper uses 10 (ResNet-18 QAT) to 100 (PTQ)."


def validate_orthogonality_arguments(
    *,
    size_budget_mb: float | None,
    avg_weight_bits: float | None,
    beta: float,
    num_samples: int,
    bit_choices: Sequence[int] | None,
    mode: str,
    solver: str,
) -> tuple[int, ...]:
    """Check OMPQ's arguments (before any work); returns the allowed widths (``mode``'s range by default)."""
    check_choice("mode", mode, MODES)
    choices = MODE_BIT_CHOICES[mode] if bit_choices is None else validate_bit_choices(bit_choices)
    check_choice("solver", solver, ALLOCATION_SOLVERS)
    check_real("beta", beta, minimum=0, fix=_BETA_FIX)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise QuantizationConfigError(
            f"`num_samples` must be an integer >= 2 (CKA compares samples with each other), got {num_samples!r}. "
            "HINT: the paper uses one batch of 32."
        )
    if (size_budget_mb is None) == (avg_weight_bits is None):
        raise QuantizationConfigError(
            "Pass exactly one budget: `size_budget_mb` (size of the quantized weights in MiB) or `avg_weight_bits` "
            f"(parameter-weighted average weight bits); got size_budget_mb={size_budget_mb!r}, "
            f"avg_weight_bits={avg_weight_bits!r}."
        )
    check_budget("size_budget_mb", size_budget_mb)
    check_budget("avg_weight_bits", avg_weight_bits)
    if avg_weight_bits is not None and not choices[0] <= avg_weight_bits <= choices[-1]:
        raise QuantizationConfigError(
            f"`avg_weight_bits` must be within [min_bits, max_bits] = [{choices[0]}, {choices[-1]}], got "
            f"{avg_weight_bits}. HINT: pass a value in that range or change `bit_choices` (or `mode`)."
        )
    return choices


def orthogonality_budget(
    costs: LayerCosts,
    bit_choices: Sequence[int],
    *,
    size_budget_mb: float | None = None,
    avg_weight_bits: float | None = None,
) -> BudgetConstraint:
    """The budget of an OMPQ allocation, checked against what the model can achieve.

    ``size_budget_mb``: size of the quantized weights in MiB (frozen layers at their bits; biases and step sizes
    not counted); ``avg_weight_bits``: the parameter-weighted average weight bit width over every quantized layer.

    Raises:
        QuantizationConfigError: no layer to allocate, or a budget below the all-minimum allocation's cost or above
            the all-maximum's (naming both ends of the achievable range).
    """
    if size_budget_mb is not None:
        constraint = dataclasses.replace(
            size_constraint(costs, float(size_budget_mb) * MIB_BITS),
            display_scale=1.0 / MIB_BITS,
            argument="size_budget_mb",
        )
        unit, what = " MiB", "weight size"
    elif avg_weight_bits is not None:
        constraint = avg_bits_constraint(costs, float(avg_weight_bits))
        unit, what = " bits", "average weight bits"
    else:
        raise QuantizationConfigError("Pass `size_budget_mb` or `avg_weight_bits`.")
    n = int(costs.free.sum())
    if n == 0:
        raise QuantizationConfigError(
            "There is no layer to allocate bits to: every quantized layer is frozen (`LayerSpec.frozen`, e.g. the "
            "first and last layer under `first_last_bits`). HINT: quantize more layers."
        )
    low, high = achievable_range(constraint, bit_choices)
    value = constraint.display(constraint.budget)
    where = f"with bit_choices {list(bit_choices)} (frozen layers, the first and last among them, at their bits)"
    hint = f"HINT: pass `{constraint.argument}` in [{low:.6g}, {high:.6g}]{unit.rstrip()}."
    if not constraint.feasible(np.full(n, min(bit_choices), dtype=np.float64)):
        raise QuantizationConfigError(
            f"`{constraint.argument}` = {value:.6g}{unit} is below the smallest achievable {what}, {low:.6g}{unit} "
            f"(every allocated layer at {min(bit_choices)} bits) {where}. {hint}"
        )
    if constraint.cost(np.full(n, max(bit_choices), dtype=np.float64)) < constraint.budget:
        raise QuantizationConfigError(
            f"`{constraint.argument}` = {value:.6g}{unit} is above the largest achievable {what}, {high:.6g}{unit} "
            f"(every allocated layer at {max(bit_choices)} bits) {where}: it would not constrain anything. {hint}"
        )
    return constraint


# -- the allocation -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrthogonalityResult:
    """One OMPQ allocation.

    Args:
        names: the allocated layers in the order of their first call (the ORM's order).
        orm: the orthogonality matrix ``[L, L]`` (linear CKA).
        gamma: ``sum_{j != i} ORM_ij`` per layer.
        theta: ``exp(-beta (gamma_i - min gamma))`` per layer.
        weights: the objective weight ``w_i`` per layer.
        bits: the allocated width of each layer (by name, in ``names`` order).
        allocation: the solver's result (costs and budget in the user's unit; rows in the cost model's order).
        beta: the ``beta`` used.
        num_samples: samples in the batch the features came from.
        feature_seconds: wall time of the forward pass and the Gram matrices.
        seconds: wall time of the whole allocation (features, ORM, solve).
    """

    names: tuple[str, ...]
    orm: np.ndarray
    gamma: np.ndarray
    theta: np.ndarray
    weights: np.ndarray
    bits: dict[str, int]
    allocation: Allocation
    beta: float
    num_samples: int
    feature_seconds: float
    seconds: float

    def to_record(self) -> dict[str, Any]:
        """Plain Python values (for checkpoints and logs)."""
        return {
            "names": list(self.names),
            "orm": self.orm.tolist(),
            "gamma": self.gamma.tolist(),
            "theta": self.theta.tolist(),
            "weights": self.weights.tolist(),
            "bits": dict(self.bits),
            "costs": dict(self.allocation.costs),
            "budgets": dict(self.allocation.budgets),
            "budget_used": float(self.allocation.budget_used),
            "objective": float(self.allocation.objective),
            "solver": self.allocation.solver,
            "beta": float(self.beta),
            "num_samples": int(self.num_samples),
            "feature_seconds": float(self.feature_seconds),
            "seconds": float(self.seconds),
        }


def sample_inputs(batch: Any, num_samples: int, owner: str = "OMPQ") -> Tensor:
    """The first ``num_samples`` model inputs of ``batch`` (see :func:`~lightning_quant.surgery.capture.batch_inputs`);
    at least 2 are needed."""
    inputs = batch_inputs(batch, owner)
    available = int(inputs.shape[0]) if inputs.dim() > 0 else 0
    if available < 2:
        raise QuantizationConfigError(
            f"{owner} needs a batch of at least 2 samples (CKA compares samples with each other), got {available}. "
            f"HINT: pass a batch of `num_samples` = {num_samples} inputs (the paper uses 32)."
        )
    return inputs[:num_samples]


def allocate_by_orthogonality(
    model: nn.Module,
    inputs: Tensor,
    costs: LayerCosts,
    constraint: BudgetConstraint,
    *,
    beta: float,
    bit_choices: Sequence[int],
    solver: AllocationSolver = "monotone",
) -> OrthogonalityResult:
    """OMPQ on a quantized ``model``: features of ``inputs`` (float model, eval mode), ORM, objective, solve.

    The model is left as it was (modes, quantizers, buffers); nothing is applied to it.

    Args:
        model: a quantized model.
        inputs: one batch of model inputs (``[n, ...]``, ``n >= 2``), on the model's device.
        costs: :func:`~lightning_quant.allocation.cost.layer_costs` of ``model``; its free layers are allocated.
        constraint: the budget (:func:`orthogonality_budget`).
        beta: the importance temperature (``>= 0``).
        bit_choices: the allowed widths.
        solver: ``"monotone"`` (default), ``"relaxed"`` or ``"milp"``.
    """
    start = time.perf_counter()
    layers = quantized_layers(model)
    free = [name for name, frozen in zip(costs.names, costs.frozen, strict=True) if not frozen]
    recorder = layer_grams(model, inputs, {name: layers[name] for name in free})
    feature_seconds = time.perf_counter() - start
    names = tuple(recorder.order)
    orm = cka_matrix([recorder.grams[name] for name in names])
    constant = [name for name in names if not bool(recorder.grams[name].abs().sum() > 0)]
    if constant:
        log.warning("OMPQ: the outputs of %s do not vary over the batch; their CKA with other layers is 0.", constant)
    gamma, theta = orthogonality_importance(orm, beta)
    weights = orthogonality_weights(theta)
    position = {name: k for k, name in enumerate(names)}
    table = linear_objective_table(np.array([weights[position[name]] for name in free]), bit_choices)
    result = allocate(table, [constraint], bit_choices, solver=solver)
    by_name = {name: int(b) for name, b in zip(free, result.bits, strict=True)}
    return OrthogonalityResult(
        names=names,
        orm=orm,
        gamma=gamma,
        theta=theta,
        weights=weights,
        bits={name: by_name[name] for name in names},
        allocation=result,
        beta=float(beta),
        num_samples=int(inputs.shape[0]),
        feature_seconds=feature_seconds,
        seconds=time.perf_counter() - start,
    )


def _structural_copy(model: nn.Module, share: bool) -> nn.Module:
    """A copy of ``model``'s modules; with ``share`` its parameters and buffers are the original's (quantization
    wraps them without writing to them; BatchNorm folding does write, hence ``share=False`` there)."""
    memo: dict[int, Any] = {}
    if share:
        memo.update({id(t): t for t in (*model.parameters(), *model.buffers())})
    return copy.deepcopy(model, memo)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def orthogonal_allocation(
    model: nn.Module,
    batch: Any,
    *,
    size_budget_mb: float | None = None,
    avg_weight_bits: float | None = None,
    beta: float = 10.0,
    num_samples: int = 32,
    bit_choices: Sequence[int] | None = None,
    mode: OmpqMode = "qat",
    solver: AllocationSolver = "monotone",
    spec: QuantSpec | None = None,
) -> QuantSpec:
    """OMPQ without a Trainer: the per-layer recipe of ``model`` with widths allocated from one batch.

    ``model`` is not changed. A float model is quantized (a copy) with ``spec`` (default :class:`QuantSpec`: W8A8,
    first and last layer frozen at 8 bits) to find its layers and their costs; an already quantized model is used
    as it is (``spec`` must then be ``None``). Quantize with the result and calibrate (PTQ) or train (QAT)::

        spec = orthogonal_allocation(model, images, size_budget_mb=0.05, beta=10.0)
        quantize_model(model, spec)

    Args:
        model: a float or quantized model.
        batch: model inputs: a tensor ``[n, ...]``, an ``(inputs, ...)`` tuple or a dict with an ``x``/``image`` key;
            the first ``num_samples`` are used (at least 2).
        size_budget_mb: budget on the quantized weights' size, MiB (frozen layers included).
        avg_weight_bits: budget on the parameter-weighted average weight bits (frozen layers included).
        beta: importance temperature, ``>= 0`` (see the module docs).
        num_samples: samples taken from ``batch`` (the paper: 32).
        bit_choices: allowed widths; default ``mode``'s range (QAT 4-8, PTQ 2-4, as in the official code).
        mode: ``"qat"`` or ``"ptq"`` (only the default ``bit_choices`` differ).
        solver: ``"monotone"`` (a larger budget never lowers a layer's bits), ``"relaxed"`` or ``"milp"``.
        spec: recipe for a float model.

    Returns:
        The exact recipe of every quantized layer, allocated layers at their new widths.
    """
    choices = validate_orthogonality_arguments(
        size_budget_mb=size_budget_mb,
        avg_weight_bits=avg_weight_bits,
        beta=beta,
        num_samples=num_samples,
        bit_choices=bit_choices,
        mode=mode,
        solver=solver,
    )
    if spec is not None and not isinstance(spec, QuantSpec):
        raise QuantizationConfigError(f"`spec` must be a QuantSpec or None, got {type(spec).__name__}.")
    inputs = sample_inputs(batch, num_samples, "orthogonal_allocation")
    if is_quantized(model):
        if spec is not None:
            raise QuantizationConfigError(
                "`model` is already quantized, so `spec` has nothing to do. HINT: pass `spec=None`, or a float model."
            )
        work = model
    else:
        spec = spec if spec is not None else QuantSpec()
        work = quantize_model(_structural_copy(model, share=not spec.fold_batchnorm), spec)
    costs = layer_costs(work)
    constraint = orthogonality_budget(costs, choices, size_budget_mb=size_budget_mb, avg_weight_bits=avg_weight_bits)
    result = allocate_by_orthogonality(
        work, inputs.to(_model_device(work)), costs, constraint, beta=beta, bit_choices=choices, solver=solver
    )
    recipe = QuantSpec.from_model(work)
    layers = {
        name: dataclasses.replace(layer, weight_bits=result.bits[name]) if name in result.bits else layer
        for name, layer in recipe.layers.items()
    }
    log.info(
        "OMPQ: %s (%s, %.2f s)",
        " ".join(str(b) for b in result.bits.values()),
        ", ".join(f"{k} {v:.4g}" for k, v in result.allocation.costs.items()),
        result.seconds,
    )
    return dataclasses.replace(recipe, layers=layers)


__all__ = [
    "MIB_BITS",
    "MODES",
    "MODE_BIT_CHOICES",
    "GramRecorder",
    "OmpqMode",
    "OrthogonalityResult",
    "allocate_by_orthogonality",
    "centered_gram",
    "cka_matrix",
    "layer_grams",
    "linear_cka",
    "orthogonal_allocation",
    "orthogonality_budget",
    "orthogonality_importance",
    "orthogonality_objective_table",
    "orthogonality_weights",
    "sample_inputs",
    "validate_orthogonality_arguments",
]
