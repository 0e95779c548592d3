"""SLQ / MLQ: weights clustered, quantized and frozen group by group while the rest retrain."""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.callbacks.base import QuantizationCallback, plot_file
from lightning_quant.core.codebook import CodebookQuantizer, power_of_two_entries
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.validation import check_choice, check_int, check_names, check_real
from lightning_quant.export.packing import ModelSizeReport, model_size_report
from lightning_quant.surgery.layers import QuantizedLayer, quantized_layers
from lightning_quant.surgery.quantize import layer_candidates
from lightning_quant.surgery.requests import QuantizationRequest
from lightning_quant.surgery.spec import LayerSpec, QuantSpec
from lightning_quant.surgery.summary import quantization_summary

log = logging.getLogger(__name__)

Mode = Literal["slq", "mlq"]
Partition = Literal["magnitude", "loss"]
CodebookInit = Literal["kmeans", "power_of_two"]

#: file name of the schedule plot in the logger's directory
PLOT_NAME = "incremental_quantization_schedule.png"


def codebook_entries(bits: int) -> int:
    """Entries of a ``bits``-bit SLQ/MLQ/INQ codebook: ``2**(bits - 1) + 1`` (0 and ``2**(bits - 2)`` pairs +-c).

    >>> codebook_entries(5), codebook_entries(2)
    (17, 3)
    """
    return 2 ** (bits - 1) + 1


def frozen_target(fraction: float, total: int) -> int:
    """How many of ``total`` weights are frozen once ``fraction`` of them are: ``fraction * total`` rounded (halves
    up), never more than ``total``.

    >>> frozen_target(0.3, 10), frozen_target(0.55, 10), frozen_target(1.0, 7)
    (3, 6, 7)
    """
    return min(total, math.floor(fraction * total + 0.5))


def magnitude_ranks(entries: Tensor) -> Tensor:
    """Rank of each scalar entry in the magnitude order: the entry at 0 first, then by decreasing ``|value|``
    (ties: lower entry index first). With SLQ's initial centroids this is the order of the entries' indices in the
    released code (0, +-n_max, +-n_max/2, ...), whose stages freeze the clusters of the first indices.

    >>> magnitude_ranks(torch.tensor([0.0, 0.5, -0.5, 0.25, -0.25, 1.0])).tolist()
    [0, 2, 3, 4, 5, 1]
    """
    values = entries.detach().reshape(-1).float()
    keys = torch.where(values == 0, torch.full_like(values, math.inf), values.abs())
    order = torch.argsort(keys, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def freeze_order(weight: Tensor, quantizer: CodebookQuantizer, partition: Partition) -> Tensor:
    """Indices of the weights of ``weight`` not yet frozen, in the order ``partition`` freezes them.

    * ``"loss"``: by the quantization loss ``(w - c)**2`` to the weight's own entry, smallest first;
    * ``"magnitude"``: cluster by cluster in :func:`magnitude_ranks` order (the zero cluster, then the clusters of
      largest ``|c|``), and within a cluster by quantization loss, smallest first.

    Ties keep index order, so the order is deterministic.
    """
    values = weight.detach().reshape(-1).float()
    free = torch.nonzero(~quantizer.frozen_vector_mask).flatten()
    book = quantizer.effective_codebook().detach().reshape(-1).float()
    entry = quantizer.indices[free]
    loss = (values[free] - book[entry]) ** 2
    order = torch.argsort(loss, stable=True)
    if partition == "magnitude":
        ranks = magnitude_ranks(book)
        order = order[torch.argsort(ranks[entry[order]], stable=True)]
    return free[order]


class IncrementalQuantizationCallback(QuantizationCallback):
    """SLQ / MLQ: cluster each layer's weights (k-means, one centroid at exactly 0), then quantize and freeze them group
    by group over stages while the weights not yet frozen retrain and compensate.

    Paper: Y. Xu, Y. Wang, A. Zhou, W. Lin, H. Xiong, "Deep Neural Network Compression with Single and Multiple Level
    Quantization", AAAI 2018 (arXiv:1803.03289); official single-level code: github.com/yuhuixu1993/WLQ (Caffe).

    From the paper and its released code:

    * per layer, a 1-D k-means of the weights into ``2**(bits-1) + 1`` clusters (17 at 5 bits), one centroid fixed
      at exactly 0, initial centroids ``0, +-n_max, +-n_max/2, ...`` (``n_max = 2**floor(log2 max|w|)``), 10 Lloyd
      iterations;
    * over the stages of ``schedule`` a growing part of the weights is snapped to its centroid and frozen; frozen
      centroids are never re-estimated, frozen weights get neither gradient nor weight decay; the other weights
      retrain in float in between;
    * ``mode="slq"``: every layer freezes the scheduled fraction of its own weights at each stage (width level);
      ``mode="mlq"``: the scheduled fraction of *all* selected weights, layer after layer in forward order, so the
      first layers are quantized first and the later ones retrain to compensate (depth level; the paper's
      incremental layer compensation), down to ternary at ``bits=2`` (3 clusters from k-means, not a fixed
      ``+-alpha``);
    * ``codebook="power_of_two"``: INQ's codebook (Zhou et al., ICLR 2017), the baseline the paper compares with:
      ``0, +-2**n1, ..., +-2**n2`` (``n1 = floor(log2(4 max|w| / 3))``, ``2**(bits-2)`` powers), no k-means.

    Our choices:

    * **Exact fractions.** The released code freezes whole clusters (5-bit AlexNet: the clusters of index < 5, 9,
      13, 15, 17, about 29/53/76/88/100 % of the clusters). Here each stage freezes exactly
      ``round(fraction * n)`` weights (per layer for SLQ, of the whole selection for MLQ): whole clusters in the
      ``partition`` order and part of the boundary cluster, whose other weights stay free (its centroid is frozen
      with its first frozen weight).
    * **Partition.** ``"magnitude"`` (the default) follows the released code: the zero cluster and the clusters of
      largest ``|c|`` first (their index order), within a cluster the weights nearest to the centroid first. It is
      the default because it is what produced the published results and it needs nothing but the clusters.
      ``"loss"`` follows the paper's text (quantization loss decides; a distance-based choice is also in dormant
      code of the release): all free weights by ``(w - c)**2``, smallest first.
    * **Re-clustering.** At each stage the free weights of a layer are clustered again (10 Lloyd iterations from
      the current centroids, frozen centroids fixed, a free weight may join a frozen cluster); a layer's first
      clustering starts from the initial centroids above (MLQ: when the schedule reaches it). Empty clusters are
      relocated as scikit-learn does (the released code leaves them in place). With INQ's codebook the entries never
      move: each stage only assigns the free weights to their nearest power of two (or 0).
    * **Stages** start at epochs ``warmup_epochs + t * epochs_per_stage`` (at the start of the epoch); epochs left
      after the last stage fine-tune what is not quantized (biases, BatchNorm, activation step sizes).
      ``epochs_per_stage=None`` splits ``max_epochs - warmup_epochs`` evenly.
    * Centroids are not trained by gradient (the codebook Parameter has ``requires_grad=False``); the float weight of
      a frozen weight is rewritten to its value after every training batch, so the optimizer's weight decay and
      momentum cannot move it and the final float weights *are* the codebook values (``dequantize_model`` and
      packing agree).

    The model is quantized through a request (codebook quantizers, ``frozen=True`` for allocators, on the selected
    layers), so ``QuantizationAwareTraining``'s activation quantization applies beside it, in either order of the
    callback list. The stage position and history are in the callback's state; the clusters, the masks and the
    frozen values are buffers of the quantizers, in the checkpoint.

    Logged: ``quant/incremental/frozen_fraction`` and ``quant/incremental/stage`` every epoch,
    ``quant/incremental/stage_accuracy`` (the ``monitor`` metric at the end of each stage) and
    ``quant/incremental/size_kib`` once everything is quantized. At the end of training: a plot of the schedule
    (``<log_dir>/incremental_quantization_schedule.png``) and the packed size (indices + codebooks,
    :attr:`size_report`).

    Args:
        bits: index bits; the codebook has ``2**(bits-1) + 1`` entries (2 = ternary), 2-8.
        schedule: cumulative fractions of the weights frozen after each stage; increasing, in (0, 1], ending at 1.0.
        epochs_per_stage: epochs of each stage (``None``: ``(max_epochs - warmup_epochs) // len(schedule)``).
        mode: ``"slq"`` (each layer by itself) or ``"mlq"`` (layer after layer across the network).
        partition: ``"magnitude"`` or ``"loss"`` (see above).
        codebook: ``"kmeans"`` (SLQ/MLQ) or ``"power_of_two"`` (INQ).
        layers: name patterns of the layers to quantize (default: every Conv/Linear).
        exclude: name patterns of layers to leave alone.
        warmup_epochs: epochs of float training before the first stage (0 for a trained model, the paper's case).
        monitor: the metric recorded as each stage's accuracy (``None``: none).
        plot: write the schedule plot at the end of training.

    Example:
        >>> trainer = L.Trainer(max_epochs=10, callbacks=[  # doctest: +SKIP
        ...     IncrementalQuantizationCallback(bits=5, schedule=(0.3, 0.55, 0.75, 0.9, 1.0)),
        ... ])
        >>> trainer.fit(trained_model, datamodule)  # doctest: +SKIP
    """

    TECHNIQUE = "incremental"
    MODES: ClassVar[tuple[str, ...]] = ("slq", "mlq")
    PARTITIONS: ClassVar[tuple[str, ...]] = ("magnitude", "loss")
    CODEBOOKS: ClassVar[tuple[str, ...]] = ("kmeans", "power_of_two")
    #: Lloyd iterations of each clustering (the released code's)
    LLOYD_ITERATIONS: ClassVar[int] = 10
    MIN_BITS: ClassVar[int] = 2
    MAX_BITS: ClassVar[int] = 8

    def __init__(
        self,
        bits: int = 5,
        schedule: Sequence[float] = (0.3, 0.55, 0.75, 0.9, 1.0),
        epochs_per_stage: int | None = None,
        *,
        mode: Mode = "slq",
        partition: Partition = "magnitude",
        codebook: CodebookInit = "kmeans",
        layers: list[str] | None = None,
        exclude: list[str] | None = None,
        warmup_epochs: int = 0,
        monitor: str | None = "val/acc",
        plot: bool = True,
    ) -> None:
        super().__init__()
        for argument, value, choices in (
            ("mode", mode, self.MODES),
            ("partition", partition, self.PARTITIONS),
            ("codebook", codebook, self.CODEBOOKS),
        ):
            check_choice(argument, value, choices)
        if isinstance(bits, bool) or not isinstance(bits, int) or not self.MIN_BITS <= bits <= self.MAX_BITS:
            raise QuantizationConfigError(
                f"`bits` must be an integer in [{self.MIN_BITS}, {self.MAX_BITS}] for mode={mode!r}, got {bits!r}: "
                f"the codebook holds 0 and pairs +-c, 2**(bits-1) + 1 entries. HINT: bits=2 is ternary (3 clusters); "
                "for binary weights use QuantizationAwareTraining(weight_bits=1, binary_weights=True)."
            )
        self.schedule = _check_schedule(schedule)
        if epochs_per_stage is not None:
            check_int("epochs_per_stage", epochs_per_stage, minimum=1)
        check_int("warmup_epochs", warmup_epochs, minimum=0)
        self.layers = check_names("layers", layers, allow_string=True) or ()
        self.exclude = check_names("exclude", exclude, allow_string=True) or ()
        if monitor is not None and not isinstance(monitor, str):
            raise QuantizationConfigError(f"`monitor` must be a metric name or None, got {monitor!r}.")
        self.bits = bits
        self.num_entries = codebook_entries(bits)
        self.epochs_per_stage = epochs_per_stage
        self.mode: Mode = mode
        self.partition: Partition = partition
        self.codebook: CodebookInit = codebook
        self.warmup_epochs = warmup_epochs
        self.monitor = monitor
        self.plot = plot
        self._eps: int | None = epochs_per_stage
        self._stage = 0  # stages applied so far
        self._history: list[dict[str, Any]] = []
        self._names: list[str] = []
        self._size_report: ModelSizeReport | None = None
        self._plot_path: Path | None = None

    # -- identity, state, results ----------------------------------------------------------------------------
    @override
    def identity(self) -> dict[str, Any]:
        return {"bits": self.bits, "mode": self.mode, "codebook": self.codebook}

    @override
    def state(self) -> dict[str, Any]:
        return {"stage": self._stage, "epochs_per_stage": self._eps, "history": [dict(h) for h in self._history]}

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._stage = int(state["stage"])
        self._eps = None if state["epochs_per_stage"] is None else int(state["epochs_per_stage"])
        self._history = [dict(h) for h in state["history"]]

    @property
    def stage(self) -> int:
        """How many stages have been applied (``len(schedule)`` once every weight is quantized)."""
        return self._stage

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per applied stage: ``stage``, ``fraction`` (scheduled), ``epoch`` (first epoch of the stage),
        ``frozen`` / ``total`` (weights), ``inertia`` (sum of the layers' k-means inertia) and ``accuracy`` (the
        ``monitor`` metric at the end of the stage, ``None`` when it was not logged)."""
        return [dict(h) for h in self._history]

    @property
    def size_report(self) -> ModelSizeReport | None:
        """The packed size (indices + codebooks + float rest) once every weight is quantized, after training."""
        return self._size_report

    @property
    def plot_path(self) -> Path | None:
        """Where the schedule plot was written (``None`` before the end of training or with ``plot=False``)."""
        return self._plot_path

    def stage_start(self, stage: int) -> int:
        """The epoch at whose start stage ``stage`` (0-based) freezes its weights."""
        if self._eps is None:
            raise QuantizationConfigError("The stages are not laid out yet: call `trainer.fit(...)` first.")
        return self.warmup_epochs + stage * self._eps

    def frozen_fraction(self, pl_module: nn.Module) -> float:
        """Fraction of the selected layers' weights that are frozen (quantized)."""
        layers = self._layers(pl_module)
        total = sum(layer.weight.numel() for layer in layers.values())
        frozen = sum(int(_codebook(n, layer).vector_frozen.sum()) for n, layer in layers.items())
        return frozen / max(total, 1)

    # -- checks and surgery ----------------------------------------------------------------------------------
    def _check_fit(self, trainer: pl.Trainer) -> None:
        """Lay the stages over the Trainer's epochs; more stages than epochs is an error (before any work)."""
        if getattr(trainer.state, "fn", None) != TrainerFn.FITTING:
            return
        stages = len(self.schedule)
        max_epochs = trainer.max_epochs
        bounded = max_epochs is not None and max_epochs >= 0
        if self.epochs_per_stage is None:
            if not bounded:
                raise QuantizationConfigError(
                    f"`epochs_per_stage=None` splits `max_epochs` over the {stages} stages, but the Trainer has no "
                    f"epoch limit (max_epochs={max_epochs}). HINT: pass `epochs_per_stage=...` or set `max_epochs`."
                )
            assert max_epochs is not None
            eps = (max_epochs - self.warmup_epochs) // stages
            if eps < 1:
                raise QuantizationConfigError(
                    f"The schedule has {stages} stages but the Trainer trains {max_epochs} epochs "
                    f"({self.warmup_epochs} of them warm-up): more stages than epochs. HINT: set max_epochs >= "
                    f"{self.warmup_epochs + stages}, or use a shorter `schedule`."
                )
        else:
            eps = self.epochs_per_stage
            needed = self.warmup_epochs + stages * eps
            if bounded and max_epochs is not None and needed > max_epochs:
                raise QuantizationConfigError(
                    f"{stages} stages x `epochs_per_stage`={eps} + {self.warmup_epochs} warm-up epochs = {needed} "
                    f"epochs, but the Trainer trains {max_epochs}: the last stages would never run and the model would "
                    f"stay partly float. HINT: set max_epochs >= {needed}, or pass "
                    f"`epochs_per_stage={max(1, (max_epochs - self.warmup_epochs) // stages)}`."
                )
        if self._eps is None or not self._history:
            self._eps = eps

    def _select(self, pl_module: nn.Module) -> list[str]:
        candidates = layer_candidates(pl_module)
        names = list(candidates)
        include = self.layers or ("*",)
        for argument, patterns in (("layers", include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                    raise QuantizationConfigError(
                        f"`{argument}` pattern {pattern!r} matches no Conv/Linear layer. Layers: {shown}."
                    )
        selected = [
            n
            for n in names
            if any(fnmatch.fnmatchcase(n, p) for p in include)
            and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)
        ]
        if not selected:
            raise QuantizationConfigError(
                f"`layers`={list(include)} and `exclude`={list(self.exclude)} leave no layer to quantize."
            )
        modules = dict(pl_module.named_modules())
        for name in selected:
            count = modules[name].weight.numel()
            if count < self.num_entries:
                raise QuantizationConfigError(
                    f"Layer {name!r} has {count} weights, fewer than the {self.num_entries} codebook entries of "
                    f"bits={self.bits}. HINT: leave it out (`exclude=[{name!r}]`) or use fewer bits."
                )
        return selected

    def _layer_fields(self) -> dict[str, Any]:
        return {
            "weight_kind": "codebook",
            "weight_bits": self.bits,
            "codebook_size": self.num_entries,
            "codebook_vector": "scalar",
            "codebook_bits": None,
            "codebook_zero": True,
            "frozen": True,
        }

    @override
    def quantization_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizationRequest:
        self._check_fit(trainer)
        names = self._select(pl_module)
        # alone: exactly these layers, weights only; beside QAT its recipe is the base and these layers take codebooks
        spec = QuantSpec(default=LayerSpec(act_bits=None), include=tuple(names), first_last_bits=None)
        fields = self._layer_fields()
        return QuantizationRequest(type(self).__name__, spec, priority=50, layers={n: dict(fields) for n in names})

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_fit(trainer)  # also when another callback (or the user) quantized the model already
        super().setup(trainer, pl_module, stage)

    @override
    def prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = self._select(pl_module)
        quantizers = {name: _codebook(name, layer) for name, layer in self._layers(pl_module).items()}
        for name, quantizer in quantizers.items():  # every check before the first change
            if quantizer.num_entries != self.num_entries or not quantizer.fixed_values:
                raise QuantizationConfigError(
                    f"Layer {name!r} has a codebook of {quantizer.num_entries} entries"
                    f"{'' if quantizer.fixed_values else ' without a fixed 0'}; IncrementalQuantizationCallback(bits="
                    f"{self.bits}) needs {self.num_entries} entries with one at 0 (LayerSpec codebook_size="
                    f"{self.num_entries}, codebook_zero=True). HINT: start from the float model."
                )
        modules = dict(pl_module.named_modules())
        for name, quantizer in quantizers.items():
            # centroids come from k-means (or are INQ's powers), never from gradients
            quantizer.codebook.requires_grad_(False)
            if not quantizer.is_initialized:  # cluster now, so that forward never fits by itself
                self._cluster(modules[name].weight, quantizer, first=True)
            if not quantizer.is_partial and not bool(quantizer.frozen_vector_mask.any()):
                quantizer.set_partial(True)

    def _layers(self, pl_module: nn.Module) -> dict[str, QuantizedLayer]:
        layers = quantized_layers(pl_module)
        missing = [n for n in self._names if n not in layers]
        if missing:
            raise QuantizationConfigError(
                f"Layers {missing[:6]} are not quantized: IncrementalQuantizationCallback's setup did not run on this "
                "model. HINT: pass the callback to the Trainer that fits the model."
            )
        return {n: layers[n] for n in self._names}

    def _cluster(self, weight: Tensor, quantizer: CodebookQuantizer, first: bool) -> float:
        iterations = 0 if self.codebook == "power_of_two" else self.LLOYD_ITERATIONS
        init = None
        if first:
            top = "inq" if self.codebook == "power_of_two" else "floor"
            init = power_of_two_entries(weight, self.num_entries, top=top)
        return quantizer.fit(weight, iterations=iterations, init=init, assign_to_frozen=True)

    # -- the stages ------------------------------------------------------------------------------------------
    def targets(self, fraction: float, sizes: dict[str, int]) -> dict[str, int]:
        """Weights of each layer frozen once ``fraction`` is (``sizes``: weights per layer, in forward order)."""
        if self.mode == "slq":
            return {n: frozen_target(fraction, size) for n, size in sizes.items()}
        remaining = frozen_target(fraction, sum(sizes.values()))
        out = {}
        for name, size in sizes.items():  # MLQ: layer after layer, the boundary layer partly
            out[name] = min(size, remaining)
            remaining -= out[name]
        return out

    def _apply_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage
        fraction = self.schedule[stage]
        layers = self._layers(pl_module)
        targets = self.targets(fraction, {n: layer.weight.numel() for n, layer in layers.items()})
        inertia = 0.0
        for name, layer in layers.items():
            quantizer = _codebook(name, layer)
            done = int(quantizer.vector_frozen.sum())
            more = targets[name] - done
            if more > 0:
                inertia += self._cluster(layer.weight, quantizer, first=done == 0)
                chosen = freeze_order(layer.weight, quantizer, self.partition)[:more]
                mask = torch.zeros(quantizer.num_vectors, dtype=torch.bool, device=chosen.device)
                mask[chosen] = True
                quantizer.freeze_vectors(mask)
            if stage == len(self.schedule) - 1:
                quantizer.freeze(torch.ones(quantizer.num_entries, dtype=torch.bool))  # the codebook is final
            quantizer.snap(layer.weight)
        frozen = sum(int(_codebook(n, layer).vector_frozen.sum()) for n, layer in layers.items())
        total = sum(layer.weight.numel() for layer in layers.values())
        record = {
            "stage": stage,
            "fraction": fraction,
            "epoch": int(trainer.current_epoch),
            "frozen": frozen,
            "total": total,
            "inertia": inertia,
            "accuracy": None,
        }
        self._history.append(record)
        self._stage += 1
        log.info(
            "%s stage %d/%d at epoch %d: %d of %d weights (%.1f %%) quantized and frozen",
            self.mode.upper(),
            stage + 1,
            len(self.schedule),
            record["epoch"],
            frozen,
            total,
            100.0 * frozen / max(total, 1),
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        starts = ", ".join(str(self.stage_start(t)) for t in range(len(self.schedule)))
        rank_zero_info(
            f"Incremental quantization ({self.mode.upper()}, {self.bits} bits, {self.num_entries} entries, "
            f"{self.codebook}, {self.partition} partition): {len(self._names)} layers; stages "
            f"{[round(f, 4) for f in self.schedule]} at epochs {starts}."
        )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        while self._stage < len(self.schedule) and trainer.current_epoch >= self.stage_start(self._stage):
            self._apply_stage(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the optimizer's weight decay and momentum move the float copy of frozen weights: put them back
        if self._stage:
            for name, layer in self._layers(pl_module).items():
                _codebook(name, layer).snap(layer.weight)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_metric(pl_module, "frozen_fraction", self.frozen_fraction(pl_module))
        self.log_metric(pl_module, "stage", float(self._stage))
        if not self._history:
            return
        last_epoch_of_stage = (
            self._stage == len(self.schedule)  # the last stage runs to the end of training
            or trainer.current_epoch + 1 >= self.stage_start(self._stage)
        )
        if last_epoch_of_stage and self.monitor is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                self._history[-1]["accuracy"] = float(value)
                self.log_metric(pl_module, "stage_accuracy", float(value))
        if self._stage == len(self.schedule):
            self.log_metric(pl_module, "size_kib", quantization_summary(pl_module).quantized_bits / 8192)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = self._layers(pl_module)
        if self._stage == len(self.schedule) and all(_codebook(n, m).complete for n, m in layers.items()):
            self._size_report = model_size_report(pl_module)
            rank_zero_info(f"Incremental quantization done: packed size {self._size_report}")
        elif self._stage < len(self.schedule):
            log.warning(
                "Training ended after %d of %d incremental quantization stages: %.1f %% of the selected weights are "
                "quantized, the rest are float (the model cannot be packed yet).",
                self._stage,
                len(self.schedule),
                100.0 * self.frozen_fraction(pl_module),
            )
        if not (self.plot and self._history):
            return
        path = plot_file(trainer, PLOT_NAME)
        if path is not None:
            self._plot_path = save_schedule_plot(self._history, self.schedule, path, epochs=trainer.current_epoch + 1)


def save_schedule_plot(
    history: Sequence[dict[str, Any]], schedule: Sequence[float], path: str | Path, epochs: int | None = None
) -> Path:
    """Frozen fraction per epoch (scheduled and reached) and the accuracy at the end of each stage, into ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.5, 3.8), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    starts = [h["epoch"] for h in history]
    end = max(epochs or 0, (starts[-1] + 1) if starts else 1)
    xs = [*starts, end]
    reached = [h["frozen"] / max(h["total"], 1) for h in history]
    ax.step(
        xs, [*reached, reached[-1]] if reached else [0, 0], where="post", color="tab:blue", label="frozen (reached)"
    )
    planned = list(schedule[: len(history)])
    ax.plot(starts, planned, "o", color="tab:blue", mfc="none", label="schedule")
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of weights quantized")
    ax.set_ylim(0, 1.05)
    accuracy = [(h["epoch"], h["accuracy"]) for h in history if h.get("accuracy") is not None]
    if accuracy:
        acc_ax = ax.twinx()
        stage_ends = [(xs[i + 1], h["accuracy"]) for i, h in enumerate(history) if h.get("accuracy") is not None]
        acc_ax.plot([e for e, _ in stage_ends], [a for _, a in stage_ends], "s-", color="tab:orange", label="accuracy")
        acc_ax.set_ylabel("accuracy at the end of the stage", color="tab:orange")
    ax.legend(loc="lower right")
    ax.set_title("Incremental quantization schedule")
    fig.savefig(path, dpi=100)
    return path


def _codebook(name: str, layer: QuantizedLayer) -> CodebookQuantizer:
    quantizer = layer.weight_quantizer
    if not isinstance(quantizer, CodebookQuantizer) or quantizer.vector != "scalar":
        raise QuantizationConfigError(
            f"Layer {name!r} has a {quantizer.KIND!r} weight quantizer; IncrementalQuantizationCallback needs a scalar "
            "codebook quantizer there. HINT: start from the float model (the callback quantizes it), or leave this "
            "layer out with `exclude`."
        )
    return quantizer


def _check_schedule(schedule: object) -> tuple[float, ...]:
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or len(schedule) == 0:
        raise QuantizationConfigError(
            f"`schedule` must be a non-empty list of fractions, got {schedule!r}. HINT: e.g. "
            "schedule=(0.3, 0.55, 0.75, 0.9, 1.0)."
        )
    values = [
        check_real(
            f"schedule[{i}]",
            value,
            minimum=0,
            minimum_inclusive=False,
            maximum=1,
            fix="each entry is a cumulative fraction of the weights frozen, e.g. schedule=(0.3, 0.55, 0.75, 0.9, 1.0).",
        )
        for i, value in enumerate(schedule)
    ]
    for before, after in itertools.pairwise(values):
        if after <= before:
            raise QuantizationConfigError(
                f"`schedule` must be strictly increasing (cumulative fractions), got {after} after {before} in "
                f"{values}. HINT: e.g. schedule=(0.3, 0.55, 0.75, 0.9, 1.0)."
            )
    if values[-1] != 1.0:
        raise QuantizationConfigError(
            f"`schedule` must end at 1.0 (every weight quantized), got {values[-1]} last in {values}. HINT: append 1.0."
        )
    return tuple(values)


__all__ = [
    "PLOT_NAME",
    "IncrementalQuantizationCallback",
    "codebook_entries",
    "freeze_order",
    "frozen_target",
    "magnitude_ranks",
    "save_schedule_plot",
]
