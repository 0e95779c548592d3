"""Kernel quantization (KQ): every k x k convolution kernel becomes a low-bit index into a learned codebook of
kernels, and the codebook itself lies on a 6-bit grid -- below 2 bits per convolution parameter."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.callbacks.base import QuantizationCallback, plot_file
from lightning_quant.core.codebook import CodebookQuantizer, fit_shared_codebook, index_bits_for
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import validate_bits
from lightning_quant.core.quantizers import Quantizer
from lightning_quant.surgery.layers import QuantizedLayer, quantized_layers
from lightning_quant.surgery.quantize import quantizable_layers
from lightning_quant.surgery.requests import QuantizationRequest
from lightning_quant.surgery.spec import LayerSpec, QuantSpec

log = logging.getLogger(__name__)

#: file name of the codebook plot in the logger's directory
PLOT_NAME = "kernel_quantization.png"
CodebookMode = Literal["per_layer", "shared"]
Pointwise = Literal["exclude", "scalar"]
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class KernelQuantizationCallback(QuantizationCallback):
    """Kernel quantization: each k x k kernel of a convolution is stored as an index into a codebook of kernels.

    Paper: Z. Yu, Y. Shi, T. Huang, Y. Yu, "Kernel Quantization for Efficient Network Compression", arXiv:2003.05148
    (IEEE Access 10, 2022). Known from the paper (its abstract; the method section and code are not public): a
    pre-trained float CNN is converted; the convolution kernel, not the single weight, is the unit of quantization;
    a kernel codebook is learned and every kernel of a convolution is replaced by a low-bit index into it; the
    codebook entries are then quantized to 6 bits; 1.05 (VGG) and 1.62 (ResNet-18) bits per convolution parameter on
    ImageNet with little accuracy loss. How the codebook is learned, whether it is per layer or shared, and how 1x1
    convolutions are treated is not stated there.

    Our choices:

    * **Kernels** -- one kernel is the k x k (any kernel volume > 1: Conv1d/3d too) slice of one ``(out, in)`` pair
      of the weight, so a grouped convolution has ``out x in / groups`` kernels and a depthwise one ``out``.
    * **Structure in ``setup``, fit at the start of training** -- ``setup`` only builds codebook quantizers
      (through a :class:`~lightning_quant.surgery.requests.QuantizationRequest` with per-layer requirements, so
      beside :class:`~lightning_quant.callbacks.QuantizationAwareTraining`, in any order, the weights are KQ's and
      the inputs QAT's), so a checkpoint loads strictly. In ``on_fit_start`` (after any checkpoint restore) every
      codebook that was never fitted is fitted once: seeded k-means++ and ``kmeans_iterations`` Lloyd iterations
      on the layer's kernels (on rank 0, broadcast under DDP). A resumed run finds its codebooks fitted in the
      checkpoint and never refits. ``validate``/``test``/``predict`` of a model that was never fitted fit it first.
    * **Codebook fine-tuning** -- the codebook is a Parameter in the user's optimizer; its entries receive the
      summed gradients of the kernels that use them, fake-quantized to ``codebook_bits`` (symmetric, one step size
      per codebook) with a straight-through gradient. The step size follows the entries: set at the fit, and reset
      to ``max |entry| / (2**(codebook_bits-1) - 1)`` after every training batch, so that entries trained past the
      range of the fit are not clipped (with a fixed step they stall at the edge of the grid). The indices stay
      fixed, unless
      ``refit_every`` re-assigns every kernel to its nearest entry every that many optimizer steps (the float
      weights behind the kernels keep training through the straight-through gradient, so a re-assignment can move
      them).
    * ``codebook="shared"`` -- one codebook per kernel size for all selected layers with that kernel size
      (k-means over all their kernels together; one Parameter, one step size, stored once:
      ``LayerSpec.codebook_share``). ``"per_layer"``: one codebook per layer.
    * **Small layers** -- a layer (or shared group) with fewer kernels than ``2**index_bits`` gets a *capped*
      codebook of as many entries as it has kernels, and ``ceil(log2(kernels))`` index bits (its kernels are then
      kept exactly, on the codebook grid). The capped layers are logged.
    * **1x1 convolutions and Linear layers** have no kernel to share: ``pointwise="exclude"`` leaves them to the
      rest of the recipe (float alone, QAT's weights beside QAT); ``pointwise="scalar"`` quantizes them at the
      weight level with the same codebook quantizer (one index of ``pointwise_bits`` bits per weight into a
      per-layer codebook of scalars on the same ``codebook_bits`` grid).
    * **Export** -- with ``codebook_bits`` the entries lie on one symmetric uniform grid per codebook
      (``CodebookQuantizer.uniform_grid()``), so :func:`~lightning_quant.export.export_onnx` writes each KQ weight
      as int8 initializers (the codes of the entries its indices name) behind a ``DequantizeLinear`` with the
      codebook's step; the graph holds the expanded kernels, not a ``Gather`` of the codebook (the compact form is
      the packed file). Float entries (``codebook_bits=None``) lie on no grid: those layers export as their exact
      float kernels, and the exporter logs a warning naming them.

    The exact accounting (:func:`kernel_quantization_report`), printed when the codebooks are fitted and logged:
    bits per conv parameter = (index bits x kernels + entries x k^2 x codebook bits + 32 bits of step size per
    codebook + the other convolutions at their own precision (float: 32 bits)) / convolution weights -- what
    :func:`~lightning_quant.export.save_packed_model` writes for the convolution weights (each packed tensor rounded
    up to whole bytes there: ``packed_bytes``). Biases are not counted.

    Logged: ``quant/kq/bits_per_conv_param``, ``quant/kq/bits_per_kq_param`` (the codebook layers alone) at every
    epoch end; ``quant/kq/reassigned`` (kernels that changed entry) at each re-assignment. When training ends, a
    plot of every codebook (its entries as a grid of kernels, and how many kernels use each entry) is written to
    ``<log_dir>/kernel_quantization.png``.

    Args:
        index_bits: bits of one kernel index (1-8): ``2**index_bits`` codebook entries per layer (or group).
        codebook_bits: bits of the codebook entries' uniform grid (2-8), or ``None`` for float entries (which then
            export as float weights).
        codebook: ``"per_layer"`` or ``"shared"`` (one codebook per kernel size; see above).
        layers: name patterns (``fnmatch``) of the layers to consider; default: every layer.
        exclude: name patterns of layers to leave alone.
        pointwise: ``"exclude"`` or ``"scalar"`` for 1x1 convolutions and Linear layers (see above).
        pointwise_bits: index bits of the scalar codebooks of ``pointwise="scalar"`` (default: ``index_bits``).
        refit_every: re-assign every kernel to its nearest entry every this many optimizer steps; ``None`` keeps the
            indices of the first fit.
        kmeans_iterations: Lloyd iterations of the k-means fit.
        seed: seed of the k-means++ initialisation.
        plot: write the codebook plot when training ends.

    Example:
        >>> trainer = L.Trainer(callbacks=[  # doctest: +SKIP
        ...     QuantizationAwareTraining(weight_bits=8, act_bits=8),
        ...     KernelQuantizationCallback(index_bits=4),
        ... ])
        >>> trainer.fit(pretrained_model, datamodule)  # doctest: +SKIP
        >>> print(kernel_quantization_report(pretrained_model))  # doctest: +SKIP
    """

    TECHNIQUE = "kq"
    CODEBOOKS: ClassVar[tuple[str, ...]] = ("per_layer", "shared")
    POINTWISE: ClassVar[tuple[str, ...]] = ("exclude", "scalar")

    def __init__(
        self,
        index_bits: int,
        codebook_bits: int | None = 6,
        *,
        codebook: CodebookMode = "per_layer",
        layers: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        pointwise: Pointwise = "exclude",
        pointwise_bits: int | None = None,
        refit_every: int | None = None,
        kmeans_iterations: int = 30,
        seed: int = 0,
        plot: bool = True,
    ) -> None:
        super().__init__()
        validate_bits("index_bits", index_bits, low=1)
        if codebook_bits is not None:
            validate_bits("codebook_bits", codebook_bits)
        if codebook not in self.CODEBOOKS:
            raise QuantizationConfigError(
                f"`codebook` must be one of {list(self.CODEBOOKS)}, got {codebook!r}. HINT: 'per_layer' gives every "
                "layer its own codebook, 'shared' one codebook per kernel size."
            )
        if pointwise not in self.POINTWISE:
            raise QuantizationConfigError(
                f"`pointwise` must be one of {list(self.POINTWISE)}, got {pointwise!r}. HINT: 'exclude' leaves 1x1 "
                "convolutions and Linear layers to the rest of the recipe, 'scalar' gives them a codebook of scalars."
            )
        if pointwise_bits is not None:
            validate_bits("pointwise_bits", pointwise_bits, low=1)
            if pointwise != "scalar":  # contradictory: the bits would be ignored silently
                raise QuantizationConfigError(
                    f'`pointwise_bits`={pointwise_bits!r} sets the index bits of pointwise="scalar" codebooks, but '
                    f"`pointwise` is {pointwise!r}: 1x1 convolutions and Linear layers get no codebook. HINT: pass "
                    '`pointwise="scalar"`, or leave `pointwise_bits` out.'
                )
        for argument, value, low in (("refit_every", refit_every, 1), ("kmeans_iterations", kmeans_iterations, 1)):
            if value is None and argument == "refit_every":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise QuantizationConfigError(
                    f"`{argument}` must be an integer >= {low}{' or None' if argument == 'refit_every' else ''}, "
                    f"got {value!r}."
                )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise QuantizationConfigError(f"`seed` must be an integer, got {seed!r}.")
        self.index_bits = index_bits
        self.codebook_bits = codebook_bits
        self.codebook: CodebookMode = codebook
        self.layers = _patterns("layers", layers)
        self.exclude = _patterns("exclude", exclude)
        self.pointwise: Pointwise = pointwise
        self.pointwise_bits = index_bits if pointwise_bits is None else pointwise_bits
        self.refit_every = refit_every
        self.kmeans_iterations = kmeans_iterations
        self.seed = seed
        self.plot = plot
        self._plan: dict[str, dict[str, Any]] = {}
        self._plan_owner: int | None = None
        self._names: list[str] = []
        self._capped: dict[str, int] = {}
        self._fit_seconds: dict[str, float] = {}
        self._fitted_layers: list[str] = []
        self._last_refit_step = -1
        self._reassigned: list[tuple[int, int]] = []
        self._plot_path: Path | None = None

    # -- identity, state, results ----------------------------------------------------------------------------
    @override
    def identity(self) -> dict[str, Any]:
        return {"index_bits": self.index_bits, "codebook_bits": self.codebook_bits, "codebook": self.codebook}

    @override
    def state(self) -> dict[str, Any]:
        return {
            "fit_seconds": dict(self._fit_seconds),
            "last_refit_step": self._last_refit_step,
            "reassigned": [list(r) for r in self._reassigned],
        }

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._fit_seconds = {str(k): float(v) for k, v in state["fit_seconds"].items()}
        self._last_refit_step = int(state["last_refit_step"])
        self._reassigned = [(int(a), int(b)) for a, b in state["reassigned"]]

    @property
    def layer_names(self) -> list[str]:
        """The layers this callback quantizes (after ``setup``)."""
        return list(self._names)

    @property
    def capped(self) -> dict[str, int]:
        """Layers (or shared groups) whose codebook was capped at their kernel count, with the entries they got."""
        return dict(self._capped)

    @property
    def fit_seconds(self) -> dict[str, float]:
        """Wall time of each codebook's k-means fit (by layer, or by the first layer of a shared codebook)."""
        return dict(self._fit_seconds)

    @property
    def fitted_layers(self) -> list[str]:
        """The layers whose codebooks this instance fitted (empty in a run resumed from a checkpoint)."""
        return list(self._fitted_layers)

    @property
    def reassignments(self) -> list[tuple[int, int]]:
        """``(optimizer step, kernels that changed entry)`` of every re-assignment so far."""
        return list(self._reassigned)

    @property
    def plot_path(self) -> Path | None:
        """Where the codebook plot was written (``None`` before the end of training or with ``plot=False``)."""
        return self._plot_path

    # -- the recipe ------------------------------------------------------------------------------------------
    def plan(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """The per-layer requirements (``LayerSpec`` fields) this callback puts on the float ``model``'s layers.

        Raises:
            QuantizationConfigError: a pattern that matches no layer, or no convolution with a kernel larger than
                one element among the selected layers.
        """
        candidates = quantizable_layers(model)
        names = list(candidates)
        selection = QuantSpec(include=self.layers or ("*",), exclude=self.exclude, first_last_bits=None)
        try:
            selected = selection.select({n: type(m).__name__ for n, m in candidates.items()})
        except QuantizationConfigError as err:  # `layers` is the selection's `include`
            raise QuantizationConfigError(
                f"KernelQuantizationCallback(layers={list(self.layers) or None}, exclude={list(self.exclude) or None}) "
                f"on {type(model).__name__}: {err}"
            ) from None
        kernel_layers = [n for n in selected if _kernel_shape(candidates[n]) is not None]
        if not kernel_layers:
            kinds = sorted({f"{type(candidates[n]).__name__}{_shape_text(candidates[n])}" for n in selected})
            raise QuantizationConfigError(
                f"KernelQuantizationCallback found no convolution with a kernel larger than 1x1 among the "
                f"{len(selected)} selected layers of {type(model).__name__} ({', '.join(kinds) or 'none'}; "
                f"layers={list(self.layers) or None}, exclude={list(self.exclude) or None}). Kernel quantization "
                "replaces k x k kernels by indices into a codebook of kernels. HINT: select k x k convolutions with "
                "`layers=[...]`, or use QuantizationAwareTraining for models without them."
            )
        plan: dict[str, dict[str, Any]] = {}
        self._capped = {}
        base = {"weight_kind": "codebook", "codebook_bits": self.codebook_bits, "frozen": True}
        if self.codebook == "per_layer":
            for name in kernel_layers:
                entries, bits = self._entries(name, _kernel_count(candidates[name]), self.index_bits)
                plan[name] = {**base, "codebook_vector": "kernel", **_size_fields(entries, bits)}
        else:
            groups: dict[tuple[int, ...], list[str]] = {}
            for name in kernel_layers:
                groups.setdefault(_kernel_shape(candidates[name]), []).append(name)  # type: ignore[arg-type]
            for shape, members in groups.items():
                group = "kq_" + "x".join(str(k) for k in shape)
                total = sum(_kernel_count(candidates[n]) for n in members)
                entries, bits = self._entries(group, total, self.index_bits)
                for name in members:
                    plan[name] = {**base, "codebook_vector": "kernel", "codebook_share": group}
                    plan[name].update(_size_fields(entries, bits))
        if self.pointwise == "scalar":
            for name in selected:
                if name not in plan:
                    entries, bits = self._entries(name, candidates[name].weight.numel(), self.pointwise_bits)
                    plan[name] = {**base, "codebook_vector": "scalar", **_size_fields(entries, bits)}
        return {name: plan[name] for name in names if name in plan}

    def _entries(self, name: str, vectors: int, index_bits: int) -> tuple[int, int]:
        """Entries and index bits of a codebook for ``vectors`` kernels (or weights): capped at ``vectors``."""
        if vectors >= 2**index_bits:
            return 2**index_bits, index_bits
        self._capped[name] = vectors
        return vectors, index_bits_for(vectors)

    @override
    def quantization_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizationRequest:
        plan = self.plan(pl_module)
        self._plan, self._plan_owner = plan, id(pl_module)
        if self._capped:
            log.info(
                "KernelQuantizationCallback: fewer kernels than 2**index_bits = %d, codebook capped at the kernel "
                "count: %s",
                2**self.index_bits,
                ", ".join(f"{n} ({k} entries)" for n, k in self._capped.items()),
            )
        # alone: weight-only KQ on the selected layers; beside QAT, QAT's recipe with these layers' weights KQ's
        spec = QuantSpec(default=LayerSpec(act_bits=None), include=tuple(plan), first_last_bits=None)
        return QuantizationRequest(type(self).__name__, spec, priority=20, layers=plan)

    @override
    def prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = quantized_layers(pl_module)
        if self._plan_owner == id(pl_module):
            names = list(self._plan)
        else:  # quantized before this callback saw it (e.g. `load_quantized`): take its codebook layers
            names = [
                n
                for n, layer in layers.items()
                if isinstance(layer.weight_quantizer, CodebookQuantizer)
                and (layer.weight_quantizer.vector == "kernel" or self.pointwise == "scalar")
            ]
        missing = [
            n for n in names if not isinstance(getattr(layers.get(n), "weight_quantizer", None), CodebookQuantizer)
        ]
        if missing or not names:
            raise QuantizationConfigError(
                f"KernelQuantizationCallback found no codebook quantizer on {missing or 'any layer'} of the already "
                "quantized model. HINT: attach the callback to the float model (it quantizes in `setup`), or load "
                "a checkpoint of a KQ model with `load_quantized`."
            )
        self._names = names

    # -- the fit ---------------------------------------------------------------------------------------------
    def _groups(self, pl_module: nn.Module) -> dict[int, list[str]]:
        """The layers of each codebook (one per layer, or several for a shared one), keyed by the owner's id."""
        layers = quantized_layers(pl_module)
        groups: dict[int, list[str]] = {}
        for name in self._names:
            quantizer = layers[name].weight_quantizer
            assert isinstance(quantizer, CodebookQuantizer)
            groups.setdefault(id(quantizer.codebook_owner), []).append(name)
        return groups

    def fit_codebooks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """Fit every codebook that was never fitted (k-means on rank 0, broadcast); returns the layers fitted."""
        layers = quantized_layers(pl_module)
        todo = [
            members
            for members in self._groups(pl_module).values()
            if not all(layers[n].weight_quantizer.is_initialized for n in members)
        ]
        if not todo:
            return []
        fitted = [n for members in todo for n in members]
        if trainer.is_global_zero:
            for members in todo:
                quantizers = [layers[n].weight_quantizer for n in members]
                start = time.perf_counter()
                for q in quantizers:
                    q.seed = self.seed  # type: ignore[assignment]
                if len(members) > 1 or quantizers[0].is_shared:  # type: ignore[union-attr]
                    fit_shared_codebook(
                        quantizers,  # type: ignore[arg-type]
                        [layers[n].weight for n in members],
                        iterations=self.kmeans_iterations,
                    )
                else:
                    quantizers[0].fit(layers[members[0]].weight, iterations=self.kmeans_iterations)  # type: ignore[operator]
                self._fit_seconds[members[0]] = time.perf_counter() - start
        if trainer.world_size > 1:
            states = {n: {k: v.cpu() for k, v in layers[n].weight_quantizer.state_dict().items()} for n in fitted}
            states, self._fit_seconds = trainer.strategy.broadcast((states, self._fit_seconds), src=0)
            for name in fitted:
                layers[name].weight_quantizer.load_state_dict(states[name])
        self._fitted_layers += fitted
        rank_zero_info(
            f"Kernel quantization: fitted {len(todo)} codebooks (k-means, {self.kmeans_iterations} iterations) in "
            f"{sum(self._fit_seconds.get(m[0], 0.0) for m in todo):.2f} s\n{kernel_quantization_report(pl_module)}"
        )
        return fitted

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_codebooks(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_codebooks(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_codebooks(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_codebooks(trainer, pl_module)

    # -- training --------------------------------------------------------------------------------------------
    def rescale(self, pl_module: nn.Module) -> None:
        """Reset every codebook's step size from its current entries (see the class docs)."""
        layers = quantized_layers(pl_module)
        for members in self._groups(pl_module).values():
            quantizer = layers[members[0]].weight_quantizer
            assert isinstance(quantizer, CodebookQuantizer)
            quantizer.codebook_owner.rescale()

    def reassign(self, pl_module: nn.Module) -> int:
        """Move every kernel to its nearest (effective) entry; returns how many changed."""
        layers = quantized_layers(pl_module)
        changed = 0
        for name in self._names:
            quantizer = layers[name].weight_quantizer
            assert isinstance(quantizer, CodebookQuantizer)
            changed += quantizer.reassign(layers[name].weight)
        return changed

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.rescale(pl_module)
        step = trainer.global_step
        if self.refit_every is None or step == 0 or step % self.refit_every or step == self._last_refit_step:
            return
        changed = self.reassign(pl_module)
        self._last_refit_step = step
        self._reassigned.append((step, changed))
        self.log_metric(pl_module, "reassigned", float(changed))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = kernel_quantization_report(pl_module)
        self.log_metric(pl_module, "bits_per_conv_param", report.bits_per_param)
        self.log_metric(pl_module, "bits_per_kq_param", report.codebook_bits_per_param)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.plot or not self._names:
            return
        path = plot_file(trainer, PLOT_NAME)
        if path is not None:
            self._plot_path = save_codebook_plot(codebook_usage(pl_module, self._names), path)


# -- accounting ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvLayerBits:
    """The stored size of one convolution's weight (a row of :class:`KernelQuantizationReport`).

    Attributes:
        name: the layer.
        kind: ``"kernel codebook"``, ``"scalar codebook"``, the weight quantizer's kind (``"uniform"``) or
            ``"float"``.
        params: weight elements.
        vectors: kernels (kernel codebooks), weights (scalar codebooks) or codes.
        index_bits: bits of one index (codebooks), else ``None``.
        entries: codebook entries, else ``None``.
        entry_size: elements of one entry (``k*k`` for kernels), else ``None``.
        codebook_bits: bits of one codebook element (``None``: float entries or no codebook).
        shares: the layer that stores this layer's shared codebook (``None``: its own or none).
        code_bits: ``index bits x kernels``; the codes of other quantizers at their widths; float: 32 per weight.
        side_bits: ``entries x entry size x codebook bits + 32`` (the step size) for a codebook stored here, the
            step sizes and zero points of other quantizers.
        packed_bytes: the bytes :func:`~lightning_quant.export.save_packed_model` writes for this weight (codes and
            every side tensor, each rounded up to whole bytes).
    """

    name: str
    kind: str
    params: int
    vectors: int
    index_bits: int | None
    entries: int | None
    entry_size: int | None
    codebook_bits: int | None
    shares: str | None
    code_bits: int
    side_bits: int
    packed_bytes: int

    @property
    def bits(self) -> int:
        """``code_bits + side_bits``."""
        return self.code_bits + self.side_bits


@dataclass(frozen=True)
class KernelQuantizationReport:
    """Bits per convolution parameter of a model, layer by layer (see :func:`kernel_quantization_report`)."""

    rows: tuple[ConvLayerBits, ...]

    @property
    def params(self) -> int:
        """Convolution weight elements."""
        return sum(r.params for r in self.rows)

    @property
    def bits(self) -> int:
        """Stored bits of every convolution weight (codes, codebooks and step sizes, float weights at 32 bits)."""
        return sum(r.bits for r in self.rows)

    @property
    def bits_per_param(self) -> float:
        """Bits per convolution parameter."""
        return self.bits / max(self.params, 1)

    @property
    def packed_bytes(self) -> int:
        """What the packed file holds for the convolution weights (each tensor rounded up to whole bytes)."""
        return sum(r.packed_bytes for r in self.rows)

    @property
    def codebook_bits_per_param(self) -> float:
        """Bits per parameter of the codebook layers alone (indices and codebooks)."""
        rows = [r for r in self.rows if r.entries is not None]
        return sum(r.bits for r in rows) / max(sum(r.params for r in rows), 1)

    def __str__(self) -> str:
        header = ("layer", "kind", "params", "kernels", "index", "entries", "k^2", "cb bits", "bits", "bits/param")
        lines = []
        for r in self.rows:
            lines.append(
                (
                    r.name,
                    r.kind + (f" (shares {r.shares})" if r.shares else ""),
                    f"{r.params:,}",
                    f"{r.vectors:,}",
                    "" if r.index_bits is None else str(r.index_bits),
                    "" if r.entries is None else str(r.entries),
                    "" if r.entry_size is None else str(r.entry_size),
                    "" if r.codebook_bits is None else str(r.codebook_bits),
                    f"{r.bits:,}",
                    f"{r.bits / max(r.params, 1):.3f}",
                )
            )
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*line) for line in lines)]
        out.append(
            f"bits per conv parameter: {self.bits:,} / {self.params:,} = {self.bits_per_param:.4f} "
            f"(codebook layers alone {self.codebook_bits_per_param:.4f}); packed: {self.packed_bytes:,} bytes"
        )
        return "\n".join(out)


def kernel_quantization_report(model: nn.Module) -> KernelQuantizationReport:
    """The exact storage of every convolution weight of ``model`` (quantized or not), layer by layer.

    For a kernel codebook layer: ``index bits x kernels`` plus, where the codebook is stored (once for a shared
    one), ``entries x k^2 x codebook bits + 32`` (its step size; a float codebook: 32 bits per element). Other
    convolutions count at their own storage (a uniform quantizer's codes and step sizes, a float weight at 32 bits
    per element). A convolution used several times counts once.
    """
    quantized = quantized_layers(model)
    owners = {
        id(layer.weight_quantizer): name
        for name, layer in quantized.items()
        if isinstance(layer.weight_quantizer, CodebookQuantizer)
    }
    rows = []
    for name, module in model.named_modules():  # a module used (or registered) twice is listed once
        if not isinstance(module, _CONV_TYPES):
            continue
        weight = module.weight
        quantizer = module.weight_quantizer if isinstance(module, QuantizedLayer) else None
        if not isinstance(quantizer, Quantizer):
            bits = 8 * weight.element_size() * weight.numel()
            rows.append(ConvLayerBits(name, "float", weight.numel(), weight.numel(), None, None, None, None, None,
                                      bits, 0, bits // 8))  # fmt: skip
            continue
        code_bits = quantizer.payload_bits(weight)
        side = quantizer.side_tensors()
        side_bits = sum(t.numel() * b for t, b in side.values())
        packed = -(-code_bits // 8) + sum(
            4 * t.numel() if t.is_floating_point() else -(-t.numel() * b // 8) for t, b in side.values()
        )
        if isinstance(quantizer, CodebookQuantizer):
            owner = quantizer.codebook_owner
            rows.append(
                ConvLayerBits(
                    name,
                    f"{quantizer.vector} codebook",
                    weight.numel(),
                    quantizer.num_vectors,
                    quantizer.index_bits,
                    quantizer.num_entries,
                    quantizer.dim,
                    quantizer.codebook_bits,
                    owners.get(id(owner)) if owner is not quantizer else None,
                    code_bits,
                    side_bits,
                    packed,
                )
            )
        else:
            codes = quantizer.int_repr(weight)
            rows.append(
                ConvLayerBits(
                    name,
                    quantizer.KIND,
                    weight.numel(),
                    codes.numel(),
                    None,
                    None,
                    None,
                    None,
                    None,
                    code_bits,
                    side_bits,
                    packed,
                )
            )
    return KernelQuantizationReport(tuple(rows))


# -- the plot --------------------------------------------------------------------------------------------------
def codebook_usage(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Every codebook of the codebook layers ``names`` (default: all): ``{first layer: (entries [K, *kernel],
    kernels per entry [K])}``; a shared codebook once (``"<first layer> + <n> layers (shared)"``), with the kernels
    of all its layers counted."""
    layers = quantized_layers(model)
    names = list(layers) if names is None else list(names)
    books: dict[int, tuple[list[str], Tensor, Tensor]] = {}
    for name in names:
        quantizer = layers[name].weight_quantizer
        if not isinstance(quantizer, CodebookQuantizer):
            continue
        owner = id(quantizer.codebook_owner)
        counts = torch.bincount(quantizer.indices.detach().cpu(), minlength=quantizer.num_entries)
        if owner in books:
            members, entries, total = books[owner]
            books[owner] = ([*members, name], entries, total + counts)
            continue
        shape = quantizer.weight_shape[2:] if quantizer.vector == "kernel" else (1,)
        entries = quantizer.effective_codebook().detach().float().cpu().reshape(quantizer.num_entries, *shape)
        books[owner] = ([name], entries, counts)
    return {
        members[0] if len(members) == 1 else f"{members[0]} + {len(members) - 1} layers (shared)": (entries, counts)
        for members, entries, counts in books.values()
    }


def save_codebook_plot(codebooks: Mapping[str, tuple[Tensor, Tensor]], path: str | Path) -> Path:
    """One row per codebook: its entries as a grid of kernels (shared colour scale, red positive, blue negative) and
    a histogram of how many kernels use each entry; written to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = list(codebooks.items())
    fig = Figure(figsize=(10.0, 2.4 * max(len(items), 1)), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(items), 1), 2, squeeze=False, gridspec_kw={"width_ratios": [1, 1.6]})
    for (name, (entries, counts)), (left, right) in zip(items, axes, strict=False):
        mosaic = _mosaic(entries)
        limit = float(np.nanmax(np.abs(mosaic))) or 1.0
        image = left.imshow(mosaic, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        left.set_title(f"{name}: {entries.shape[0]} entries", fontsize=9)
        left.set_xticks([])
        left.set_yticks([])
        fig.colorbar(image, ax=left, shrink=0.8)
        right.bar(np.arange(len(counts)), counts.numpy(), width=1.0, color="tab:blue", edgecolor="white", linewidth=0.3)
        used = int((counts > 0).sum())
        right.set_title(f"index usage ({used}/{len(counts)} entries used, {int(counts.sum()):,} vectors)", fontsize=9)
        right.set_xlabel("entry")
        right.set_ylabel("vectors")
    fig.savefig(path, dpi=90)
    return path


def _mosaic(entries: Tensor) -> np.ndarray:
    """The entries tiled into a near-square grid, one NaN pixel between kernels."""
    k = entries.shape[0]
    kernels = entries.reshape(k, -1, entries.shape[-1]).numpy() if entries.dim() > 1 else entries.reshape(k, 1, 1)
    kh, kw = kernels.shape[1:]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    out = np.full((rows * (kh + 1) - 1, cols * (kw + 1) - 1), np.nan)
    for i in range(k):
        r, c = divmod(i, cols)
        out[r * (kh + 1) : r * (kh + 1) + kh, c * (kw + 1) : c * (kw + 1) + kw] = kernels[i]
    return out


# -- helpers ---------------------------------------------------------------------------------------------------
def _patterns(argument: str, value: Sequence[str] | str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) for v in value):
        raise QuantizationConfigError(f"`{argument}` must be a list of layer-name patterns, got {value!r}.")
    return tuple(value)


def _kernel_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The kernel size of a convolution with more than one element per kernel, else ``None``."""
    if not isinstance(module, _CONV_TYPES):
        return None
    shape = tuple(int(k) for k in module.weight.shape[2:])
    return shape if math.prod(shape) > 1 else None


def _kernel_count(module: nn.Module) -> int:
    return int(module.weight.shape[0] * module.weight.shape[1])


def _shape_text(module: nn.Module) -> str:
    return "(" + "x".join(str(k) for k in module.weight.shape[2:]) + ")" if isinstance(module, _CONV_TYPES) else ""


def _size_fields(entries: int, bits: int) -> dict[str, Any]:
    return {"weight_bits": bits, **({"codebook_size": entries} if entries != 2**bits else {})}


__all__ = [
    "PLOT_NAME",
    "ConvLayerBits",
    "KernelQuantizationCallback",
    "KernelQuantizationReport",
    "codebook_usage",
    "kernel_quantization_report",
    "save_codebook_plot",
]
