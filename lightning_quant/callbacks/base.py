"""The shared template of every quantization callback.

Facts from Lightning that decide its shape (see DESIGN.md):

* Surgery happens in ``setup``: it runs before checkpoint restore, DDP wrapping and ``configure_optimizers``,
  so new quantizer parameters reach the user's optimizer and a checkpoint restores strictly. ``setup`` runs
  for fit, validate, test and predict, so the surgery must be (and is) idempotent.
* ``pl_module.log`` is refused in ``setup``/``on_fit_start``/``on_save_checkpoint``: metrics are logged from
  batch and epoch hooks, summaries go through :mod:`logging` on rank zero.
* A technique that adds a loss term does it so that there is still exactly one backward per step (DDP's
  reducer rejects a second one) and AMP scaling and gradient accumulation still apply: the batch is kept in
  ``on_train_batch_start``, the extra term is computed in ``on_before_backward`` and added *in place* to the
  loss Lightning is about to back-propagate (divided by ``accumulate_grad_batches``, as Lightning divides the
  user's loss). The value the user logged in ``training_step`` is unchanged. Manual optimization
  back-propagates the user's own tensor, which may not be changed in place: there, and wherever a user
  prefers it, :class:`QuantizationLossMixin` is the alternative. Callbacks that add no loss term (QAT,
  QBitOpt, export, ...) do not care how the module optimizes: Lightning calls ``on_before_backward`` for
  ``manual_backward`` too, and they ignore it.
* Every callback keeps its state in ``state_dict``/``load_state_dict`` under a ``state_key`` made from its
  identifying arguments, so two instances never clash and a killed run resumes exactly.

One owner of quantization: no callback quantizes the model by itself. Each states what it needs
(:meth:`QuantizationCallback.quantization_request`, a :class:`~lightning_quant.surgery.requests.QuantizationRequest`);
the first ``setup`` of any of them runs every callback's :meth:`~QuantizationCallback.before_quantization`, merges all
requests (:func:`~lightning_quant.surgery.requests.merge_requests`: independent of the order of the callback list;
contradictory requests raise an error naming both callbacks) and quantizes once; then each callback's
:meth:`~QuantizationCallback.prepare_model` does its own preparation on the quantized model.

Techniques that learn from the full-precision model (block replacement, threshold tuning, distillation) keep a
:class:`FrozenCopy`: built in ``setup``, its weights kept in the callback's state, placed (restored weights, device,
dtype) in ``on_fit_start`` -- after Lightning has restored a checkpoint, so a run resumed into a freshly constructed
module (``trainer.fit(new_model, ckpt_path=...)``) learns from the original model, not from the new module.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.core.errors import NonFiniteError, QuantizationConfigError
from lightning_quant.core.validation import check_choice
from lightning_quant.surgery.quantize import dequantize_model, is_quantized, layer_candidates, quantize_model
from lightning_quant.surgery.requests import QuantizationRequest, merge_requests
from lightning_quant.surgery.serialization import SPEC_KEY
from lightning_quant.surgery.spec import QuantSpec

log = logging.getLogger(__name__)


class QuantizationCallback(Callback):
    """Base class of the suite's callbacks: surgery in ``setup``, one-backward extra losses, state, metrics.

    Subclasses set :attr:`TECHNIQUE` (the metric key segment), implement :meth:`prepare_model` (idempotent
    surgery), and may override :meth:`extra_loss`, :meth:`identity` and :meth:`state`/:meth:`load_state`.
    """

    #: metric keys are ``quant/<TECHNIQUE>/<quantity>``
    TECHNIQUE: ClassVar[str] = "base"

    #: what a training step whose loss is NaN/Inf does: ``raise`` (stop with :class:`NonFiniteError` naming the first
    #: layer whose output is not finite) or ``skip`` (drop the step's gradients and restore the buffers)
    ON_NONFINITE: ClassVar[tuple[str, ...]] = ("raise", "skip")

    def __init__(self, on_nonfinite: Literal["raise", "skip"] = "raise") -> None:
        self._batch: Any = None
        self._loss_requested = False
        self.on_nonfinite = on_nonfinite
        self._skipping = False
        self._buffers: dict[str, Tensor] | None = None

    @property
    def on_nonfinite(self) -> str:
        """``"raise"`` or ``"skip"``: see :attr:`ON_NONFINITE`; settable on any suite callback."""
        return self._on_nonfinite

    @on_nonfinite.setter
    def on_nonfinite(self, value: str) -> None:
        self._on_nonfinite = check_choice(
            "on_nonfinite", value, self.ON_NONFINITE, 'pass "raise" (stop at the first NaN) or "skip" (drop the step).'
        )

    # -- identity and state ----------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The arguments that tell two instances of this callback apart (they make the ``state_key``)."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.identity())

    def state(self) -> dict[str, Any]:
        """What this callback must remember across a resume."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.state()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_state(state_dict)

    # -- surgery ---------------------------------------------------------------------------------------------
    def quantization_request(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantizationRequest | None:
        """What this callback needs of the quantized model (``None``: it quantizes nothing itself)."""
        return None

    def before_quantization(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Change the float model before it is quantized (e.g. load a teacher's weights); runs once, in the first
        ``setup`` of any quantization callback, before the merged quantization."""

    def prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """This technique's own preparation of the (quantized) ``pl_module``; must be idempotent."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # every suite callback's check, before the first setup changes the model
            for callback in {id(cb): cb for cb in [self, *_suite_callbacks(trainer)]}.values():
                callback._check_optimization(pl_module)
        quantize_once(trainer, pl_module)
        self.prepare_model(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # the exact per-layer recipe, so `load_quantized(fresh_model, ckpt)` can rebuild the model strictly
        if is_quantized(pl_module):
            checkpoint[SPEC_KEY] = QuantSpec.from_model(pl_module).to_dict()

    # -- metrics ---------------------------------------------------------------------------------------------
    def log_metric(self, pl_module: pl.LightningModule, name: str, value: float | Tensor, **kwargs: Any) -> None:
        """Log ``quant/<TECHNIQUE>/<name>`` through the LightningModule (from batch/epoch hooks only).

        (Lightning overwrites a callback's `log` attribute with the module's, hence the name.)
        """
        pl_module.log(f"quant/{self.TECHNIQUE}/{name}", value, **kwargs)

    # -- extra loss terms ------------------------------------------------------------------------------------
    @property
    def adds_loss(self) -> bool:
        """Whether this callback adds a loss term to the training loss (it overrides :meth:`extra_loss`)."""
        return type(self).extra_loss is not QuantizationCallback.extra_loss

    def _check_optimization(self, pl_module: pl.LightningModule) -> None:
        """Refuse, before training, a loss term that manual optimization without the mixin cannot receive."""
        if self.adds_loss and not pl_module.automatic_optimization and not isinstance(pl_module, QuantizationLossMixin):
            # manual optimization back-propagates the user's own tensor: changing it in place is not safe
            raise QuantizationConfigError(
                f"{type(self).__name__} adds a loss term to the training loss, which needs automatic optimization "
                f"or the mixin; {type(pl_module).__name__} sets `automatic_optimization = False`. HINT: make your "
                "LightningModule inherit `lightning_quant.callbacks.QuantizationLossMixin` and back-propagate "
                "`loss + self.quantization_loss(batch)` (callbacks that add no loss, such as "
                "QuantizationAwareTraining, need nothing)."
            )

    def extra_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor | None:
        """A loss term to add to the user's training loss for ``batch`` (``None``: nothing to add).

        Called once per training step, before the backward; call submodules of ``pl_module`` (the unwrapped
        module), never the DDP wrapper.
        """
        return None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        self._skipping = False
        self._loss_requested = False
        if _nonfinite_guard(trainer) is not self:
            return
        if _nonfinite_mode(trainer) == "skip":
            # a skipped step must not leave NaN in BatchNorm statistics or observers: keep the buffers to restore
            self._buffers = {k: v.detach().clone() for k, v in pl_module.named_buffers()}
        # a quantizer may round a NaN input to a finite code, so a finite loss does not prove a finite batch
        if not all(bool(torch.isfinite(t).all()) for t in _float_tensors(batch)):
            self._nonfinite(trainer, pl_module, "the batch holds NaN or Inf")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips training with an empty loader (a warning); a quantization run must not end "successfully"
        if _nonfinite_guard(trainer) is self and trainer.num_training_batches == 0 and trainer.global_step == 0:
            raise QuantizationConfigError(
                "The training dataloader is empty (0 batches), so quantization-aware training cannot calibrate or "
                "train anything. HINT: check the dataset and `limit_train_batches`, or use `trainer.validate` to only "
                "evaluate."
            )

    def _nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> None:
        """Skip the step (``on_nonfinite="skip"`` on any suite callback) or raise :class:`NonFiniteError`."""
        if _nonfinite_mode(trainer) == "skip":
            if not self._skipping:
                rank_zero_warn(f"Step {trainer.global_step}: {what}; the step is skipped (`on_nonfinite='skip'`).")
            self._skipping = True
            return
        layer = first_nonfinite_layer(pl_module, self._batch)
        where = f"the first layer whose input or output is not finite is {layer!r}" if layer else "all layers finite"
        raise NonFiniteError(
            f"Step {trainer.global_step}: {what} ({where}). Training on it would corrupt the weights and quantizer "
            'ranges. HINT: check the data for NaN/Inf and the learning rate; or pass `on_nonfinite="skip"` to a '
            "quantization callback to drop such steps."
        )

    def _check_finite(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """The guard (the first suite callback on the trainer): a NaN/Inf loss raises or marks the step skipped."""
        if _nonfinite_guard(trainer) is self and not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite(trainer, pl_module, f"the training loss is {loss.item()}")

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skipping:
            for param in pl_module.parameters():
                param.grad = None  # the optimizer leaves parameters without a gradient alone
            if self._buffers is not None:
                with torch.no_grad():
                    for name, buffer in pl_module.named_buffers():
                        if name in self._buffers:
                            buffer.copy_(self._buffers[name])

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._check_finite(trainer, pl_module, loss)
        if _nonfinite_guard(trainer) is not None and _nonfinite_guard(trainer)._skipping:  # type: ignore[union-attr]
            return
        if isinstance(pl_module, QuantizationLossMixin) or not self.adds_loss:
            return  # the module added the term itself, inside training_step; or there is no term to add
        self._check_optimization(pl_module)  # a module switched to manual optimization after setup
        extra = self.extra_loss(trainer, pl_module, self._batch)
        if extra is None:
            return
        # Lightning hands over `loss / accumulate_grad_batches`, a fresh tensor that autograd has not saved
        loss.add_(extra / trainer.accumulate_grad_batches)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check_loss_requested(pl_module, outputs)

    def _check_loss_requested(self, pl_module: pl.LightningModule, outputs: Any) -> None:
        """Under the mixin, a loss term that ``training_step`` did not request would silently do nothing.

        Subclasses that override ``on_train_batch_end`` call this (or ``super()``) from it. A step that
        automatic optimization skipped (``training_step`` returned ``None``) is not checked.
        """
        skipped = pl_module.automatic_optimization and outputs is None
        if self.adds_loss and isinstance(pl_module, QuantizationLossMixin) and not self._loss_requested and not skipped:
            raise QuantizationConfigError(
                f"{type(self).__name__} adds a loss term, but {type(pl_module).__name__}.training_step did not "
                "request it in this step: with `QuantizationLossMixin` the module adds the suite's terms itself, so "
                f"{type(self).__name__} would do nothing. HINT: return (or back-propagate) "
                "`loss + self.quantization_loss(batch)` in every training_step."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._batch = None
        self._buffers = None
        self._skipping = False


def plot_file(trainer: pl.Trainer, name: str) -> Path | None:
    """Where a callback writes its plot ``name``: ``<log_dir>/<name>`` (the Trainer's root without a logger) on rank
    0; ``None`` on the other ranks or without a folder. Call it on every rank: ``trainer.log_dir`` broadcasts."""
    folder = trainer.log_dir or trainer.default_root_dir
    if not trainer.is_global_zero or folder is None:
        return None
    return Path(folder) / name


def _float_tensors(value: Any) -> list[Tensor]:
    """The floating-point tensors in a (nested) batch."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _float_tensors(v)]
    return []


def _nonfinite_guard(trainer: pl.Trainer) -> QuantizationCallback | None:
    """The one suite callback on ``trainer`` that checks the loss (the first), so the check runs once per step."""
    return next((cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, QuantizationCallback)), None)


def _nonfinite_mode(trainer: pl.Trainer) -> str:
    """``skip`` if any suite callback on ``trainer`` asks for it, else ``raise``."""
    modes = {cb.on_nonfinite for cb in trainer.callbacks if isinstance(cb, QuantizationCallback)}
    return "skip" if "skip" in modes else "raise"


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, batch: Any) -> str | None:
    """Run ``model`` on the inputs of ``batch`` (its first tensor) and return the name of the first module, in call
    order, whose input or output holds NaN or Inf (``None``: all finite, or no tensor input). Runs in eval mode
    (modes are restored); used when the run is about to stop on a non-finite batch or loss."""
    inputs = batch
    while isinstance(inputs, (list, tuple)) and inputs:
        inputs = inputs[0]
    if isinstance(inputs, dict):
        inputs = next((v for v in inputs.values() if isinstance(v, Tensor)), None)
    if not isinstance(inputs, Tensor):
        return None
    found: list[str] = []

    def hook(name: str):
        def check(module: nn.Module, args: Any, output: Any) -> None:
            # a quantizer may round NaN to a finite code: the layer that *receives* the NaN is the one to name
            if not found and not all(bool(torch.isfinite(t).all()) for t in _float_tensors([args, output])):
                found.append(name)

        return check

    # every module but the root: forward hooks fire when a module finishes, so inner modules report first
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no statistics or observer updates from the diagnosis
    try:
        model(inputs)
    except Exception:  # the model may need more than its first input; the loss message stands on its own then
        log.debug("first_nonfinite_layer: the model did not run on the batch's first tensor", exc_info=True)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    if not found:
        return None
    name = found[0]
    # a quantizer inside a quantized layer: name the layer (with the quantizer in brackets)
    parent, _, leaf = name.rpartition(".")
    return f"{parent} ({leaf})" if parent and leaf.endswith("quantizer") else name


def _suite_callbacks(trainer: pl.Trainer) -> list[QuantizationCallback]:
    return [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, QuantizationCallback)]


def quantize_once(trainer: pl.Trainer, pl_module: pl.LightningModule) -> QuantSpec | None:
    """Quantize ``pl_module`` once with the merged requests of every quantization callback on ``trainer``.

    A model that is already quantized (by an earlier ``setup``, or by the user) is left alone. The requests are
    merged (and their conflicts raised) before anything changes; then every callback's ``before_quantization`` runs,
    then the model is quantized. Returns the merged recipe, or ``None`` when nothing was quantized.
    """
    if is_quantized(pl_module):
        return None
    callbacks = _suite_callbacks(trainer)
    requests = [r for r in (cb.quantization_request(trainer, pl_module) for cb in callbacks) if r is not None]
    if not requests:
        return None
    candidates = layer_candidates(pl_module)
    if not candidates:
        raise QuantizationConfigError(
            f"`model` ({type(pl_module).__name__}) has no layer that can be quantized (Conv/Linear), so "
            f"{', '.join(sorted({r.owner for r in requests}))} cannot quantize it."
        )
    spec = merge_requests(requests, candidates)
    for callback in callbacks:
        callback.before_quantization(trainer, pl_module)
    quantize_model(pl_module, spec)
    if len(requests) > 1:
        log.info("Quantized once for %s.", ", ".join(sorted(r.owner for r in requests)))
    return spec


class QuantizationLossMixin:
    """LightningModule mixin for losses that cannot be changed in place: add the suite's terms yourself.

    Example:
        >>> class MyModel(QuantizationLossMixin, L.LightningModule):  # doctest: +SKIP
        ...     def training_step(self, batch, batch_idx):
        ...         loss = ...
        ...         return loss + self.quantization_loss(batch)
    """

    trainer: pl.Trainer

    def quantization_loss(self, batch: Any) -> Tensor:
        """The sum of the extra loss terms of every quantization callback on the trainer for ``batch``."""
        total = torch.zeros(())
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, QuantizationCallback) and callback.adds_loss:
                callback._loss_requested = True
                extra = callback.extra_loss(self.trainer, self, batch)  # type: ignore[arg-type]
                if extra is not None:
                    total = total.to(extra.device) + extra
        return total


# -- shared helpers of the techniques that keep a frozen full-precision teacher (BR, FAT, data-free KD) ---------
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


def frozen_fp_copy(module: nn.Module) -> nn.Module:
    """A frozen full-precision deep copy of ``module`` (e.g. the LightningModule before or after quantization).

    The copy does not drag the attached Trainer along, is dequantized when ``module`` already is quantized
    (quantization keeps the float weights, so before training this is the FP model), has no hooks (other
    callbacks' hooks on the user's model must not fire on it), is in eval mode and has ``requires_grad=False``.
    """
    memo: dict[int, Any] = {}
    attached = getattr(module, "_trainer", None)
    if attached is not None:
        memo[id(attached)] = None  # the copy must not drag (or call into) the Trainer
    fp = copy.deepcopy(module, memo)
    if is_quantized(fp):
        dequantize_model(fp)
    for m in fp.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks is not None:
                hooks.clear()
    fp.eval()
    fp.requires_grad_(False)
    return fp


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean, in float32 (teacher detached)."""
    t = temperature
    log_p = F.log_softmax(teacher.detach().float().flatten(1) / t, dim=1)
    log_q = F.log_softmax(student.float().flatten(1) / t, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


class FrozenCopy:
    """A frozen full-precision copy of a model that lives in a callback's state (BR, FAT, distillation teachers).

    :meth:`build` in ``setup`` (once per module), :meth:`state_dict` / :meth:`load_state_dict` in the callback's
    state (the copy's weights), :meth:`place` in ``on_fit_start``: after Lightning restored a checkpoint, so a
    resumed run -- into a freshly constructed module included -- has the copy it had before, on the module's device
    and dtype, with rank 0's weights under DDP.
    """

    def __init__(self) -> None:
        self._module: nn.Module | None = None
        self._owner: int | None = None
        self._pending: dict[str, Tensor] | None = None

    @property
    def module(self) -> nn.Module | None:
        """The frozen copy, or ``None`` before :meth:`build`."""
        return self._module

    def built_for(self, pl_module: nn.Module) -> bool:
        """Whether the copy was built from ``pl_module`` (a new module needs a new copy)."""
        return self._module is not None and self._owner == id(pl_module)

    def build(self, source: nn.Module, owner: nn.Module | None = None) -> nn.Module:
        """Copy ``source`` (see :func:`frozen_fp_copy`), for ``owner`` (default: ``source``); weights restored
        from a checkpoint before the build are applied now."""
        self._module = frozen_fp_copy(source)
        self._owner = id(owner if owner is not None else source)
        if self._pending is not None:
            self._module.load_state_dict(self._pending)
            self._pending = None
        return self._module

    def state_dict(self) -> dict[str, Tensor] | None:
        """The copy's weights (restored ones not yet applied included; ``None`` before :meth:`build`)."""
        if self._module is None:
            return None if self._pending is None else {k: v.detach().cpu().clone() for k, v in self._pending.items()}
        return {k: v.detach().cpu().clone() for k, v in self._module.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor] | None) -> None:
        """Restore the copy's weights (kept until the copy is built or placed)."""
        if state is None:
            return
        self._pending = state
        if self._module is not None:
            self._module.load_state_dict(state)
            self._pending = None

    def place(self, trainer: pl.Trainer, pl_module: nn.Module) -> nn.Module:
        """Restored weights, rank 0's weights under DDP, ``pl_module``'s device and dtype, eval mode."""
        if self._module is None:
            raise QuantizationConfigError("The frozen full-precision copy was never built: `setup('fit')` did not run.")
        if self._pending is not None:
            self._module.load_state_dict(self._pending)
            self._pending = None
        place_fp_copy(trainer, pl_module, self._module)
        return self._module


def place_fp_copy(trainer: pl.Trainer, pl_module: nn.Module, fp: nn.Module) -> None:
    """Give ``fp`` rank 0's weights (under DDP) and ``pl_module``'s device and floating dtype; eval mode."""
    if trainer.world_size > 1:
        state = trainer.strategy.broadcast({k: v.cpu() for k, v in fp.state_dict().items()}, src=0)
        fp.load_state_dict(state)
    dtype = getattr(pl_module, "dtype", None)
    fp.to(device=getattr(pl_module, "device", None))
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        fp.to(dtype=dtype)
    fp.eval()
