"""Fast Adjustable Threshold (FAT): calibrate, then train only the thresholds' scale factors by label-free KD."""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.callbacks.base import FrozenCopy, QuantizationCallback, QuantizationLossMixin
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.core.functional import validate_bits
from lightning_quant.core.quantizers import UniformQuantizer
from lightning_quant.core.thresholds import ThresholdFactors
from lightning_quant.core.validation import check_real
from lightning_quant.surgery.capture import Capture, batch_inputs
from lightning_quant.surgery.fold import fold_batchnorm
from lightning_quant.surgery.layers import QuantizedLayer, quantized_layers
from lightning_quant.surgery.quantize import is_quantized, quantizable_layers
from lightning_quant.surgery.requests import QuantizationRequest
from lightning_quant.surgery.spec import LayerSpec, QuantSpec

log = logging.getLogger(__name__)

Calibration = Literal["minmax", "percentile"]


def fat_loss(student: Tensor, teacher: Tensor, eps: float = 1e-5) -> Tensor:
    """FAT's label-free distillation loss: ``mean_batch sum_features sqrt((student - teacher)**2 + eps)``.

    The "root of squared difference" of the paper's official code (an L1 distance smoothed at 0), on the
    flattened outputs (logits), in float32; the teacher is detached.

    >>> round(fat_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), eps=0.0).item(), 4)
    3.0
    """
    diff = student.float().flatten(1) - teacher.detach().float().flatten(1)
    return torch.sqrt(diff * diff + eps).sum(dim=1).mean()


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            found = _first_tensor(v)
            if found is not None:
                return found
    if isinstance(value, Mapping):
        for v in value.values():
            found = _first_tensor(v)
            if found is not None:
                return found
    return None


def _images(batch: Any) -> Tensor:
    """The inputs of a batch: the batch itself, the first element of a tuple/list, or ``x``/``image(s)`` of a dict."""
    return batch_inputs(
        batch,
        "ThresholdTuningCallback",
        ", or call the model as `self(x)` in `training_step` (its inputs are then taken from that call)",
    )


class ThresholdTuningCallback(QuantizationCallback):
    """Fast Adjustable Threshold: trains only the quantization thresholds' scale factors, by label-free distillation.

    Paper: A. Goncharenko, A. Denisov, S. Alyamkin, E. Terentev, "Fast Adjustable Threshold For Uniform Neural
    Network Quantization", arXiv:1812.07872, 2018 (official code: agoncharenko1992/FAT-fast-adjustable-threshold).

    Start from a *trained* full-precision model. In ``setup`` the callback

    1. folds every BatchNorm that follows a convolution into it (:func:`~lightning_quant.surgery.fold_batchnorm`,
       exact in eval mode);
    2. keeps a frozen FP copy of the folded model beside it (the teacher; not a submodule, not in the optimizer);
    3. quantizes every Conv/Linear with observer-mode quantizers: weights ``bits`` wide, symmetric, per output
       channel (min/max); inputs ``act_bits`` wide, per tensor, asymmetric (``calibration``: running min/max, or
       the percentile observer), first/last layer at ``first_last_bits``;
    4. attaches :class:`~lightning_quant.core.ThresholdFactors` (``alpha`` in ``[0.5, 1.3]`` scales the threshold
       width, ``beta`` in ``[-0.2, 0.4]`` shifts it; ``alpha`` only for symmetric grids and for unsigned data) to
       every quantizer of the tuned layers (``tune_layers``), and
    5. freezes every other parameter of the LightningModule (``requires_grad=False``).

    Training then has two phases. The first ``num_calibration_batches`` training batches calibrate: the observers
    set the ranges and the factors do not act. Afterwards the observed ranges are frozen into the factors and each
    step adds FAT's distillation loss (:func:`fat_loss` between the quantized model's and the teacher's outputs,
    no labels used) to the training loss, through the suite's one-backward mechanism. The factors are trained by
    the callback's *own* Adam optimizer, stepped in ``on_before_optimizer_step`` (so gradient accumulation applies)
    and projected onto their ranges after each step; the factors' gradients are then cleared, so a user optimizer
    that also lists them (``self.parameters()``) does not move them a second time, and one that lists only some
    other parameters does not matter. The learning rate follows the official code::

        lr_t = lr * exp(-lr_decay * t) * |cos(pi * t' / (4 * restart_every))| + 1e-7

    with ``t`` the tuning step and ``t'`` the steps since Adam's state was last reset (every ``restart_every``).

    How it combines with the user's loss: with ``distillation_only=True`` (default, the paper's setting) the
    training loss Lightning back-propagates is replaced by the distillation loss (the user's loss is multiplied by 0
    in place; the value the user logged is unchanged), so any ``training_step`` works, including one on unlabeled
    batches that returns e.g. ``self(x).sum() * 0`` or a constant. With ``distillation_only=False`` the term is
    added to the user's loss (which then also trains the factors). With :class:`QuantizationLossMixin` the user adds
    :meth:`extra_loss` themselves and ``distillation_only`` has no effect.

    The student's output is taken from the LightningModule's own forward call in ``training_step`` (``self(x)``),
    and the teacher runs on the same inputs; if ``training_step`` never calls ``self(...)``, the callback runs
    ``pl_module(x)`` itself with ``x`` the batch's images. While it trains, BatchNorm and Dropout layers are kept in
    eval mode (the thresholds are tuned for inference).

    Composes with other callbacks, in any order: the model is quantized once with the merged recipe of every
    quantization callback (see :mod:`lightning_quant.callbacks.base`). FAT requires observer-mode quantizers with its
    observers (and the BatchNorm fold): beside ``QuantizationAwareTraining()`` the model gets QAT's bits with FAT's
    fixed ranges, and a QAT that explicitly asks for ``scale_mode="lsq"`` is a conflict with a clear error. The
    teacher's weights are in this callback's state, so a run resumed into a freshly constructed module distils
    from the original model. Export (``QuantizedExport``) sees the tuned step sizes and zero points.

    Logged: ``quant/fat/loss`` (the distillation term), ``quant/fat/lr``, ``quant/fat/alpha_mean``,
    ``quant/fat/calibrating``.

    Args:
        bits: weight bit width, 2-8.
        act_bits: input-activation bit width, 2-8 (``None``: ``bits``).
        num_calibration_batches: training batches that calibrate the ranges before tuning starts (>= 1).
        calibration: activation range observer, ``minmax`` (the paper) or ``percentile``.
        lr: Adam's initial learning rate for the factors.
        lr_decay: exponential decay rate per step (the official code's ``1e-4``).
        restart_every: steps between Adam state resets (the official code's 400); ``None`` never resets.
        distillation_only: train on the distillation loss alone (see above).
        first_last_bits: bits of the first and last quantized layer; ``None`` treats them like the others.
        exclude: name patterns of layers to keep in float.
        tune_layers: name patterns of quantized layers whose thresholds are trained (``None``: all); a layer that
            is excluded from quantization has no thresholds and raises.
        fold_bn: fold BatchNorm into the preceding convolutions before quantizing.
        check_trained: warn if the FP model's outputs look untrained (near-uniform softmax on the first batch).

    Example:
        >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=100, callbacks=[  # doctest: +SKIP
        ...     ThresholdTuningCallback(bits=8, num_calibration_batches=8)])
        >>> trainer.fit(trained_model, datamodule)  # doctest: +SKIP
    """

    TECHNIQUE = "fat"
    CALIBRATIONS: ClassVar[tuple[str, ...]] = ("minmax", "percentile")

    def __init__(
        self,
        bits: int = 8,
        act_bits: int | None = None,
        *,
        num_calibration_batches: int = 8,
        calibration: Calibration = "minmax",
        lr: float = 1e-3,
        lr_decay: float = 1e-4,
        restart_every: int | None = 400,
        distillation_only: bool = True,
        first_last_bits: int | None = 8,
        exclude: list[str] | None = None,
        tune_layers: list[str] | None = None,
        fold_bn: bool = True,
        check_trained: bool = True,
    ) -> None:
        super().__init__()
        validate_bits("bits", bits)
        act_bits = bits if act_bits is None else act_bits
        validate_bits("act_bits", act_bits)
        if first_last_bits is not None:
            validate_bits("first_last_bits", first_last_bits)
        if isinstance(num_calibration_batches, bool) or not isinstance(num_calibration_batches, int):
            raise QuantizationConfigError(
                f"`num_calibration_batches` must be a positive integer, got {num_calibration_batches!r}."
            )
        if num_calibration_batches < 1:
            raise QuantizationConfigError(
                f"`num_calibration_batches` must be at least 1, got {num_calibration_batches}. HINT: FAT starts from "
                "calibrated ranges; a few batches suffice (e.g. 8)."
            )
        if calibration not in self.CALIBRATIONS:
            raise QuantizationConfigError(
                f"`calibration` must be one of {list(self.CALIBRATIONS)}, got {calibration!r}."
            )
        check_real("lr", lr, minimum=0, minimum_inclusive=False, fix="pass e.g. `lr=1e-3` (the paper's).")
        check_real("lr_decay", lr_decay, minimum=0, fix="0 keeps the learning rate; the official code uses `1e-4`.")
        if restart_every is not None and (
            isinstance(restart_every, bool) or not isinstance(restart_every, int) or restart_every < 1
        ):
            raise QuantizationConfigError(f"`restart_every` must be a positive integer or None, got {restart_every!r}.")
        for name, value in (("exclude", exclude), ("tune_layers", tune_layers)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise QuantizationConfigError(
                    f"`{name}` must be a list of layer-name patterns, got {value!r}. HINT: {name}=[{value!r}]."
                )
        self.bits = bits
        self.act_bits = act_bits
        self.num_calibration_batches = num_calibration_batches
        self.calibration = calibration
        self.lr = float(lr)
        self.lr_decay = float(lr_decay)
        self.restart_every = restart_every
        self.distillation_only = bool(distillation_only)
        self.fold_bn = bool(fold_bn)
        self.check_trained = bool(check_trained)
        self.tune_layers = None if tune_layers is None else tuple(tune_layers)
        self.spec = QuantSpec(
            default=LayerSpec(
                weight_bits=bits,
                act_bits=act_bits,
                weight_granularity="per_channel",
                scale_mode="observer",
                weight_observer="minmax",
                act_observer=calibration,
            ),
            exclude=tuple(exclude or ()),
            first_last_bits=first_last_bits,
            fold_batchnorm=self.fold_bn,
        )
        # what FAT cannot work without (fixed observer ranges to adjust) and what the user set
        required = {"default.scale_mode", "default.weight_observer", "default.act_observer"}
        required |= {"fold_batchnorm"} if self.fold_bn else set()
        required |= {"default.weight_bits"} if bits != 8 else set()
        required |= {"default.act_bits"} if act_bits != bits else set()
        required |= {"first_last_bits"} if first_last_bits != 8 else set()
        required |= {"exclude"} if exclude else set()
        self._required = frozenset(required)
        # resolved in setup
        self._teacher = FrozenCopy()
        self._quantizers: dict[str, UniformQuantizer] = {}
        self._folded: list[tuple[str, str]] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer_state: dict[str, Any] | None = None
        # progress (saved in the state)
        self._calibration_batches_seen = 0
        self._tuning_steps = 0
        self._steps_since_restart = 0
        # per step
        self._capture: Capture | None = None
        self._stepped_at: int | None = None
        self._checked_trained = False
        self._last_loss: Tensor | None = None
        self._stage = "fit"

    # -- identity and state ----------------------------------------------------------------------------------
    @override
    def identity(self) -> dict[str, Any]:
        return {"bits": self.bits, "act_bits": self.act_bits}

    @override
    def state(self) -> dict[str, Any]:
        return {
            "calibration_batches_seen": self._calibration_batches_seen,
            "tuning_steps": self._tuning_steps,
            "steps_since_restart": self._steps_since_restart,
            "optimizer": self._pending_optimizer_state if self._optimizer is None else self._optimizer.state_dict(),
            "teacher": self._teacher.state_dict(),
        }

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._calibration_batches_seen = int(state["calibration_batches_seen"])
        self._tuning_steps = int(state["tuning_steps"])
        self._steps_since_restart = int(state["steps_since_restart"])
        self._pending_optimizer_state = state["optimizer"]
        self._teacher.load_state_dict(state.get("teacher"))
        if self._optimizer is not None and self._pending_optimizer_state is not None:
            self._optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None

    # -- read-only views -------------------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module | None:
        """The frozen full-precision copy (BatchNorm folded), or ``None`` before ``setup("fit")``."""
        return self._teacher.module

    @property
    def calibrating(self) -> bool:
        """Whether the next training batch still calibrates the ranges."""
        return self._calibration_batches_seen < self.num_calibration_batches

    @property
    def tuning_steps(self) -> int:
        """Optimizer steps of the threshold factors so far (after calibration; kept in the checkpoint)."""
        return self._tuning_steps

    def threshold_factors(self) -> dict[str, ThresholdFactors]:
        """The trained factors by quantizer name (e.g. ``backbone.conv1.weight_quantizer``)."""
        return {name: q.threshold_factors for name, q in self._quantizers.items() if q.threshold_factors is not None}

    def factor_parameters(self) -> list[nn.Parameter]:
        """Every ``alpha`` and ``beta`` this callback trains."""
        params: dict[int, nn.Parameter] = {}
        for factors in self.threshold_factors().values():  # a quantizer shared by two layers counts once
            params.update({id(p): p for p in (factors.alpha, factors.beta)})
        return list(params.values())

    def learning_rate(self, step: int | None = None, since_restart: int | None = None) -> float:
        """The official code's schedule at tuning step ``step`` (default: the next one)."""
        t = self._tuning_steps if step is None else step
        t_restart = self._steps_since_restart if since_restart is None else since_restart
        cycle = 4 * (self.restart_every or 0)
        cosine = abs(math.cos(math.pi * t_restart / cycle)) if cycle else 1.0
        return self.lr * math.exp(-self.lr_decay * t) * cosine + 1e-7

    # -- set-up ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_optimization(pl_module)  # before any work on the model
        if not quantizable_layers(pl_module) and not is_quantized(pl_module):
            raise QuantizationConfigError(
                f"`model` ({type(pl_module).__name__}) has no layer that can be quantized (Conv/Linear), so "
                "ThresholdTuningCallback has no thresholds to tune."
            )
        self._stage = stage
        super().setup(trainer, pl_module, stage)

    @override
    def quantization_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizationRequest:
        return QuantizationRequest(type(self).__name__, self.spec, self._required, priority=10)

    @override
    def prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fold_bn:
            # a model quantized before fit (by the user) is folded here; exact in eval mode, integers kept; idempotent
            self._folded += fold_batchnorm(pl_module)
        if self._stage == "fit" and not self._teacher.built_for(pl_module):
            # the teacher: the folded FP model (the quantized model dequantized: the float weights are the same);
            # on resume its weights come from this callback's state (FrozenCopy)
            self._teacher.build(pl_module)
            self._checked_trained = False
        layers = quantized_layers(pl_module)
        tuned = self._tuned_layers(pl_module, layers)
        self._quantizers = {}
        for name in tuned:
            layer = layers[name]
            for attr in ("weight_quantizer", "input_quantizer"):
                quantizer = getattr(layer, attr)
                if not isinstance(quantizer, UniformQuantizer):
                    continue
                try:
                    quantizer.attach_threshold_factors()
                except QuantizationConfigError as err:
                    raise QuantizationConfigError(f"Layer {name!r}: {err}") from None
                self._quantizers[f"{name}.{attr}"] = quantizer
        factor_ids = {id(p) for p in self.factor_parameters()}
        for param in pl_module.parameters():
            param.requires_grad_(id(param) in factor_ids)

    def _tuned_layers(self, pl_module: nn.Module, layers: dict[str, QuantizedLayer]) -> list[str]:
        if self.tune_layers is None:
            return list(layers)
        float_names = set(quantizable_layers(pl_module))
        selected: list[str] = []
        for pattern in self.tune_layers:
            matches = [n for n in layers if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                excluded = sorted(n for n in float_names if fnmatch.fnmatchcase(n, pattern))
                if excluded:
                    raise QuantizationConfigError(
                        f"`tune_layers` pattern {pattern!r} names {excluded}, which are excluded from quantization "
                        f"(`exclude={list(self.spec.exclude)}`) and so have no thresholds to tune. HINT: remove them "
                        "from `tune_layers` or from `exclude`."
                    )
                raise QuantizationConfigError(
                    f"`tune_layers` pattern {pattern!r} matches no quantized layer. Quantized layers are: "
                    f"{', '.join(list(layers)[:12])}{', ...' if len(layers) > 12 else ''}."
                )
            selected += [m for m in matches if m not in selected]
        return [n for n in layers if n in selected]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teacher.place(trainer, pl_module)  # restored weights on resume; the module's device and dtype
        params = self.factor_parameters()
        if not params:
            raise QuantizationConfigError("ThresholdTuningCallback found no quantizer to tune (see `tune_layers`).")
        self._optimizer = torch.optim.Adam(params, lr=self.learning_rate())
        if self._pending_optimizer_state is not None:
            self._optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None
        if not self.calibrating:
            # resumed after calibration: the factors' calibrated ranges came back with the model's state
            for quantizer in self._quantizers.values():
                quantizer.observing = False
        self._remove_hook()
        # the first call of the LightningModule in each training step: its inputs, and the student's output
        self._capture = Capture(pl_module, inputs=True, detach=False, first_call_only=True, armed=False)
        rank_zero_info(
            f"Threshold tuning (FAT): {len(params) // 2} quantizers, W{self.bits}A{self.act_bits}, "
            f"{len(self._folded)} BatchNorm folded, {self.num_calibration_batches} calibration batches."
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._remove_hook()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    # -- the training step -----------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        for module in pl_module.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)) and module.training:
                module.eval()
        observing = self.calibrating
        for quantizer in self._quantizers.values():
            # observers update only in training mode, which Lightning does not set at fit start: a model quantized
            # earlier and then put in eval mode would otherwise not calibrate at all
            quantizer.train()
            factors = quantizer.threshold_factors
            quantizer.observing = observing and not (factors is not None and factors.is_calibrated)
        if self._capture is not None:
            self._capture.clear()
            self._capture.arm()

    @override
    def extra_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor | None:
        capture = None
        if self._capture is not None:
            self._capture.disarm()
            capture = self._capture.first("")
            self._capture.clear()
        if self.calibrating and not self._check_due():
            # nothing to learn yet; keeps the factors in the graph (DDP) and the loss differentiable
            return sum((p.sum() * 0.0 for p in self.factor_parameters()), torch.zeros((), device=pl_module.device))
        teacher_model = self._teacher.module
        assert teacher_model is not None
        if capture is not None:
            args, kwargs, student = capture.args, capture.kwargs, capture.output
        else:
            args, kwargs = (_images(batch),), {}
            student = pl_module(*args)
        with torch.no_grad():
            teacher = teacher_model(*args, **kwargs)
        student_t, teacher_t = _first_tensor(student), _first_tensor(teacher)
        if student_t is None or teacher_t is None:
            raise QuantizationConfigError(
                f"ThresholdTuningCallback needs a tensor output (logits); the model returned {type(student).__name__}."
            )
        if not self._checked_trained:
            self._checked_trained = True
            self._warn_if_untrained(teacher_t)
        if self.calibrating:
            return student_t.sum() * 0.0
        loss = fat_loss(student_t, teacher_t)
        self._last_loss = loss.detach()
        return loss

    def _check_due(self) -> bool:
        return self.check_trained and not self._checked_trained

    def _warn_if_untrained(self, logits: Tensor) -> None:
        if not self.check_trained or logits.dim() != 2 or logits.shape[1] < 2:
            return
        k = logits.shape[1]
        confidence = float(torch.softmax(logits.float(), dim=1).max(dim=1).values.mean())
        if confidence < 1.5 / k:
            rank_zero_warn(
                f"ThresholdTuningCallback: the full-precision model looks untrained (mean top-class probability "
                f"{confidence:.3f} over {k} classes, near uniform). FAT tunes the thresholds of a trained model; "
                "train it first (e.g. a plain `trainer.fit` without this callback), or pass `check_trained=False`."
            )

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        mixin = isinstance(pl_module, QuantizationLossMixin)
        if self.distillation_only and pl_module.automatic_optimization and not mixin:
            loss.mul_(0.0)  # the user's term is dropped (its gradient is 0); the logged value is unchanged
        super().on_before_backward(trainer, pl_module, loss)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._step_factors(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._capture is not None:
            self._capture.disarm()
        if not trainer.optimizers:
            self._step_factors(trainer, pl_module)  # no user optimizer: no on_before_optimizer_step
        calibrated_this_batch = self.calibrating
        if calibrated_this_batch:
            self._calibration_batches_seen += 1
            if not self.calibrating:
                self._finish_calibration()
        self.log_metric(pl_module, "calibrating", float(calibrated_this_batch))
        if self._last_loss is not None:
            self.log_metric(pl_module, "loss", self._last_loss, prog_bar=True)
            self._last_loss = None
        factors = list(self.threshold_factors().values())
        if factors and not calibrated_this_batch:
            alpha = sum(float(f.factors()[0].detach()) for f in factors) / len(factors)
            self.log_metric(pl_module, "alpha_mean", alpha)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _finish_calibration(self) -> None:
        for quantizer in self._quantizers.values():
            quantizer.calibrate_threshold_factors()
        self._tuning_steps = 0
        self._steps_since_restart = 0
        if self._optimizer is not None:
            self._optimizer.state.clear()
        log.debug("ThresholdTuningCallback: calibrated %d quantizers", len(self._quantizers))

    def _step_factors(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stepped_at == trainer.global_step:
            return  # several user optimizers: step once per global step
        self._stepped_at = trainer.global_step
        params = self.factor_parameters()
        if self.calibrating or self._optimizer is None:
            for p in params:
                p.grad = None
            return
        if self.restart_every is not None and self._steps_since_restart >= self.restart_every:
            self._optimizer.state.clear()  # the official code re-initialises Adam periodically
            self._steps_since_restart = 0
        lr = self.learning_rate()
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        self._optimizer.step()
        for p in params:
            p.grad = None  # a user optimizer that also lists the factors must not move them again
        for factors in self.threshold_factors().values():
            factors.clip_()
        for quantizer in self._quantizers.values():
            quantizer.refresh_tuned_grid()  # the buffers follow the moved factors (a checkpoint saved now is exact)
        self._tuning_steps += 1
        self._steps_since_restart += 1
        self.log_metric(pl_module, "lr", lr)
