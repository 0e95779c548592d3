"""Knowledge distillation from a frozen full-precision teacher: the KD half of data-free QAT (with ZS-CGAN data)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_quant.callbacks.base import FrozenCopy, QuantizationCallback, distillation_loss
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.surgery.capture import Capture, modes_kept

log = logging.getLogger(__name__)


class DistillationCallback(QuantizationCallback):
    """Distil a frozen FP teacher's logits into the model being trained (quantized by another callback).

    Data-free QAT recipe (ZS-CGAN: Y. Choi, M. El-Khamy, J. Lee, "Zero-Shot Learning of a Conditional Generative
    Adversarial Network for Data-Free Network Quantization", arXiv:2210.14392): the model starts from the
    teacher's weights, ``QuantizationAwareTraining`` quantizes it, a
    :class:`~lightning_quant.datamodules.GeneratorDataModule` serves labelled synthetic batches, and this callback
    adds, through the suite's one-backward mechanism (:class:`QuantizationCallback`)::

        weight * T**2 * KL(softmax(teacher(x) / T) || softmax(student(x) / T))     (batch mean)

    to the user's loss (on generated data: cross-entropy on the generator's conditioning labels). On generated
    data give ``QuantizationAwareTraining`` ``freeze_bn_after_epochs=0``: the student's BatchNorm layers then keep
    the teacher's running statistics, which come from the real data; generated batches would overwrite them (on
    MNIST W4A4 that cost 1.8 points of real test accuracy).

    The student's logits are not recomputed: a forward hook on ``logits_module`` (``""``: the LightningModule
    itself, i.e. ``self(x)`` in ``training_step``) keeps the first call's inputs and output of each training step;
    the teacher runs once on the same inputs under ``no_grad``.

    Teacher (built in ``setup("fit")`` as a frozen copy: eval mode, no gradient, not in the optimizer or the
    model's ``state_dict``; its weights are kept in this callback's state so a resumed run distils from the same
    teacher):

    * ``"copy"``: the model as it is when ``fit`` starts (dequantized if a callback before this one already
      quantized it; quantization keeps the float weights, so both orders give the FP model).
    * ``"datamodule"``: the datamodule's ``teacher`` attribute (e.g. ``GeneratorDataModule``'s, after its
      ``teacher_checkpoint`` is loaded).
    * ``None``: ``"datamodule"`` when the datamodule has a ``teacher`` module, else ``"copy"``.
    * an ``nn.Module``: that model.

    ``student_init="teacher"`` loads the teacher's weights into the model before it is quantized (in whichever
    quantization callback's ``setup`` comes first, so the order of the callbacks does not matter) -- how a YAML
    config starts the student from the trained FP model.

    Logged: ``quant/kd/loss`` (the added term, before weighting by ``weight``: the raw KD), and every epoch
    ``quant/kd/teacher_agreement``: the share of a fixed pool of training inputs on which the student's arg-max
    class is the teacher's (both in eval mode; on generated data the pool is generated samples). The pool is the
    first training batch's inputs to ``logits_module`` (up to ``pool_size`` samples); the start value is measured
    on it before the first update. Without real validation data, monitor it as the validation
    metric: ``ModelCheckpoint(monitor="quant/kd/teacher_agreement", mode="max")``. If it falls more than
    ``collapse_drop`` below its start, a warning names the likely cause: a learning rate meant for training from
    scratch. Fine-tuning from the teacher's weights needs a small one -- the data-free benchmarks use Adam at
    2e-4 (``configs/data_free.yaml``). The monitor, the pool and the threshold (default 0.3) are our choice, not the
    paper's; the pool is the student's own training distribution, so it sees a drift there, not one on real data
    that the generated samples do not cover.

    Args:
        teacher: ``"copy"``, ``"datamodule"``, ``None`` or a module (see above).
        temperature: softening temperature ``T > 0``.
        weight: weight of the KD term (``>= 0``).
        student_init: ``"keep"`` the model's weights or load the ``"teacher"``'s.
        logits_module: qualified name of the submodule whose output is the logits (``""``: the LightningModule).
        pool_size: most samples of the agreement pool (``0``: no agreement monitoring).
        collapse_drop: warn when the agreement falls this far (absolute, in [0, 1]) below its start; ``None``
            logs it without warning.

    Example:
        >>> trainer = L.Trainer(callbacks=[  # doctest: +SKIP
        ...     DistillationCallback(temperature=4.0, student_init="teacher"),
        ...     QuantizationAwareTraining(weight_bits=4, act_bits=4, freeze_bn_after_epochs=0),
        ... ])
        >>> trainer.fit(model, datamodule=GeneratorDataModule(teacher, 10, (1, 28, 28)))  # doctest: +SKIP
    """

    TECHNIQUE = "kd"
    TEACHERS: ClassVar[tuple[str, ...]] = ("copy", "datamodule")
    STUDENT_INITS: ClassVar[tuple[str, ...]] = ("keep", "teacher")

    def __init__(
        self,
        teacher: Literal["copy", "datamodule"] | nn.Module | None = None,
        temperature: float = 1.0,
        weight: float = 1.0,
        student_init: Literal["keep", "teacher"] = "keep",
        logits_module: str = "",
        pool_size: int = 256,
        collapse_drop: float | None = 0.3,
    ) -> None:
        super().__init__()
        if not (teacher is None or isinstance(teacher, nn.Module) or teacher in self.TEACHERS):
            raise QuantizationConfigError(
                f"`teacher` must be one of {self.TEACHERS}, None or an nn.Module, got {teacher!r}. "
                'HINT: teacher="copy" distils from the model as it is when fit starts.'
            )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise QuantizationConfigError(f"`temperature` must be a number > 0, got {temperature!r}.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise QuantizationConfigError(f"`weight` must be a number >= 0, got {weight!r}.")
        if student_init not in self.STUDENT_INITS:
            raise QuantizationConfigError(f"`student_init` must be one of {self.STUDENT_INITS}, got {student_init!r}.")
        if not isinstance(logits_module, str):
            raise QuantizationConfigError(f"`logits_module` must be a module name (str), got {logits_module!r}.")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 0:
            raise QuantizationConfigError(f"`pool_size` must be an integer >= 0, got {pool_size!r}.")
        if collapse_drop is not None and (
            isinstance(collapse_drop, bool)
            or not isinstance(collapse_drop, (int, float))
            or not 0 <= collapse_drop <= 1
        ):
            raise QuantizationConfigError(f"`collapse_drop` must be within [0, 1] or None, got {collapse_drop!r}.")
        self.teacher = teacher
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.student_init = student_init
        self.logits_module = logits_module
        self._teacher = FrozenCopy()
        self._capture: Capture | None = None
        self.pool_size = pool_size
        self.collapse_drop = None if collapse_drop is None else float(collapse_drop)
        self._pool: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._pool_labels: Tensor | None = None
        self._start_agreement: float | None = None
        self._warned_collapse = False

    # -- identity and state ----------------------------------------------------------------------------------
    @override
    def identity(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "weight": self.weight, "logits_module": self.logits_module}

    @override
    def state(self) -> dict[str, Any]:
        return {"teacher_state_dict": self._teacher.state_dict(), "start_agreement": self._start_agreement}

    @override
    def load_state(self, state: dict[str, Any]) -> None:
        self._start_agreement = state.get("start_agreement")
        self._teacher.load_state_dict(state.get("teacher_state_dict"))

    @property
    def teacher_model(self) -> nn.Module | None:
        """The frozen teacher, or ``None`` before ``setup("fit")``."""
        return self._teacher.module

    # -- set-up ----------------------------------------------------------------------------------------------
    def _resolve_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        datamodule = getattr(trainer, "datamodule", None)
        dm_teacher = getattr(datamodule, "teacher", None)
        if isinstance(self.teacher, nn.Module):
            return self.teacher
        if self.teacher == "datamodule" or (self.teacher is None and isinstance(dm_teacher, nn.Module)):
            if not isinstance(dm_teacher, nn.Module):
                raise QuantizationConfigError(
                    f'`teacher="datamodule"` needs a datamodule with a `teacher` module, got '
                    f'{type(datamodule).__name__}. HINT: use GeneratorDataModule, or teacher="copy".'
                )
            return dm_teacher
        return pl_module

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._build_teacher(trainer, pl_module)
        super().setup(trainer, pl_module, stage)

    def _build_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        if not self._teacher.built_for(pl_module):
            self._teacher.build(self._resolve_source(trainer, pl_module), owner=pl_module)
        assert self._teacher.module is not None
        return self._teacher.module

    @override
    def before_quantization(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs before the model is quantized, in whichever callback's setup comes first: the order of the callback
        # list does not matter
        if self.student_init == "teacher" and trainer.state.fn == "fit":
            source = self._resolve_source(trainer, pl_module)
            if source is not pl_module:
                self._init_student(pl_module, self._build_teacher(trainer, pl_module))

    def _init_student(self, pl_module: pl.LightningModule, teacher: nn.Module) -> None:
        try:
            pl_module.load_state_dict(teacher.state_dict())
        except RuntimeError as err:
            raise QuantizationConfigError(
                f'`student_init="teacher"`: the teacher\'s weights do not fit the model ({type(pl_module).__name__}). '
                'HINT: give a teacher of the model\'s own class (same state_dict keys), or student_init="keep".'
            ) from err
        rank_zero_info("DistillationCallback: the model starts from the teacher's weights.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teacher.place(trainer, pl_module)  # restored weights, rank 0's under DDP, the module's device and dtype
        try:
            target = pl_module.get_submodule(self.logits_module) if self.logits_module else pl_module
        except AttributeError as err:
            raise QuantizationConfigError(
                f"`logits_module` {self.logits_module!r} is not a submodule of {type(pl_module).__name__}."
            ) from err
        self._remove_hook()
        # the first call of the logits module in each training step: its inputs, and its output with the graph
        self._capture = Capture(pl_module, {"": target}, inputs=True, detach=False, first_call_only=True, armed=False)

    def _remove_hook(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    # -- the loss --------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._capture is not None:
            self._capture.clear()
            self._capture.arm()

    def _teacher_root(self) -> nn.Module:
        teacher = self._teacher.module
        assert teacher is not None
        if self.logits_module:
            try:
                return teacher.get_submodule(self.logits_module)
            except AttributeError:
                return teacher  # a teacher given as the bare network
        return teacher

    @override
    def extra_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Tensor | None:
        captured = None
        if self._capture is not None:
            self._capture.disarm()
            captured = self._capture.first("")
            self._capture.clear()
        if captured is None:
            raise QuantizationConfigError(
                f"DistillationCallback saw no call of {self.logits_module or type(pl_module).__name__!r} in this "
                "training step. HINT: set `logits_module` to the submodule that returns the logits (e.g. "
                '"backbone" when training_step calls self.backbone(x)).'
            )
        args, kwargs, student = captured.args, captured.kwargs, captured.output
        if not isinstance(student, Tensor):
            raise QuantizationConfigError(
                f"DistillationCallback needs logits (a Tensor) from {self.logits_module or 'the model'!r}, got "
                f"{type(student).__name__}. HINT: set `logits_module` to the submodule that returns the logits."
            )
        if self._pool is None and self.pool_size and student.dim() == 2 and student.shape[1] >= 2:
            self._keep_pool(args, kwargs, student.shape[0])
        with torch.no_grad():
            teacher = self._teacher_root()(*args, **kwargs)
        kd = distillation_loss(student, teacher, self.temperature)
        self.log_metric(pl_module, "loss", kd.detach(), on_step=True, on_epoch=False)
        return self.weight * kd

    # -- agreement with the teacher on a fixed pool -----------------------------------------------------------
    def _keep_pool(self, args: tuple[Any, ...], kwargs: dict[str, Any], n: int) -> None:
        """Keep the first ``pool_size`` samples of this step's inputs (and the teacher's classes on them)."""
        k = min(n, self.pool_size)

        def take(value: Any) -> Any:
            batched = isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n
            return value[:k].detach().clone() if batched else value

        self._pool = (tuple(take(a) for a in args), {key: take(v) for key, v in kwargs.items()})
        with torch.no_grad():
            self._pool_labels = self._teacher_root()(*self._pool[0], **self._pool[1]).argmax(dim=1)

    def teacher_agreement(self, pl_module: pl.LightningModule) -> float | None:
        """The share of the pool on which the student (in eval mode) predicts the teacher's class (``None``: no
        pool yet)."""
        if self._pool is None or self._pool_labels is None:
            return None
        student = pl_module.get_submodule(self.logits_module) if self.logits_module else pl_module
        capture = self._capture
        armed = capture is not None and capture.armed
        if capture is not None:
            capture.disarm()  # the capture must not take this call for the step's
        try:
            with modes_kept(student, training=False), torch.no_grad():
                logits = student(*self._pool[0], **self._pool[1])
        finally:
            if capture is not None and armed:
                capture.arm()
        return float((logits.argmax(dim=1) == self._pool_labels).float().mean())

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # the start: after the first backward, before the first update (a resumed run keeps the first run's)
        if self._start_agreement is None and self._pool is not None:
            self._start_agreement = self.teacher_agreement(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        agreement = self.teacher_agreement(pl_module)
        if agreement is None:
            return
        self.log_metric(pl_module, "teacher_agreement", agreement)
        start = self._start_agreement
        if (
            self.collapse_drop is not None
            and start is not None
            and agreement < start - self.collapse_drop
            and not self._warned_collapse
        ):
            self._warned_collapse = True
            rank_zero_warn(
                f"DistillationCallback: the student agrees with its teacher on {agreement:.1%} of a fixed pool of "
                f"training inputs, down from {start:.1%} at the start: it is drifting away from the teacher. The "
                "likely cause is a learning rate meant for training from scratch; fine-tuning from the teacher's "
                "weights (data-free QAT above all) needs a small one. HINT: lower the optimizer's learning rate, "
                "e.g. 10x (the data-free benchmarks use Adam at 2e-4, see configs/data_free.yaml)."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._remove_hook()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()
        self._pool = self._pool_labels = None
        super().teardown(trainer, pl_module, stage)
