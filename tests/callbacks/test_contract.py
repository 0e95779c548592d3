"""The contract every public callback of :mod:`lightning_quant.callbacks` keeps, checked for each of them.

The callbacks are *discovered* (every ``lightning.pytorch.Callback`` subclass in ``lightning_quant.callbacks.__all__``):
a new one is checked as soon as it is exported, and fails until it has an entry in :data:`CONTRACTS` below -- its
construction arguments (one line), and where needed the model, data or companion callbacks it works with.

Items, each a test parametrized over the callbacks:

* attaches to an unmodified module; ``fit`` then ``validate``/``test``/``predict`` swap nothing and change nothing;
* pickles and deep-copies (fresh and after fit); ``state_dict`` round-trips, through ``torch.load(weights_only=True)``;
* two instances: with the same identifying arguments the Trainer refuses clearly; with other ones their
  ``state_key``s differ and both states land in the checkpoint (or the pair is refused clearly);
* a run killed by SIGKILL mid-epoch in a child process, resumed from ``last.ckpt`` into a freshly built module whose
  weights differ, ends with the same weights, quantizer parameters and callback state as a run straight through;
  the final checkpoint reloads strictly with ``load_quantized``;
* DDP with 2 CPU processes (gloo): identical model and callback state on both ranks, under a timeout;
* ``precision="bf16-mixed"``, ``accumulate_grad_batches=2`` and manual optimization: trains, or refuses at
  ``setup`` with a ``QuantizationConfigError`` that names the fix, before the model is touched;
* the combinations users will try (QAT + block replacement + QBitOpt, QAT + FAT, data-free + QAT);
* and a deliberately broken callback (it forgets part of its state) fails the resume check.

Everything runs on one thread; the child processes are forked (no second import of torch/Lightning).
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_quant.callbacks as callbacks_module
from lightning_quant import load_quantized
from lightning_quant.allocation.rl import DDPGConfig
from lightning_quant.callbacks import (
    AutoQBCallback,
    BitReallocationCallback,
    BlockReplacementCallback,
    DistillationCallback,
    IncrementalQuantizationCallback,
    KernelQuantizationCallback,
    OrthogonalMixedPrecision,
    QuantizationAwareTraining,
    QuantizedExport,
    ThresholdTuningCallback,
)
from lightning_quant.core.errors import QuantizationConfigError
from lightning_quant.datamodules import GeneratorDataModule
from lightning_quant.models import ImageClassifier
from lightning_quant.surgery import SPEC_KEY, is_quantized
from tests.conftest import crash_and_resume, run_ranks


# ---------------------------------------------------------------------------------------------------------------
# the tiny model and data every contract runs on
# ---------------------------------------------------------------------------------------------------------------
def tiny_backbone() -> nn.Sequential:
    """Four quantizable layers (two in the middle to re-allocate), a BatchNorm (to fold), 6x6 inputs, 3 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def tiny_model(seed: int = 0) -> L.LightningModule:
    torch.manual_seed(seed)
    return ImageClassifier(tiny_backbone(), num_classes=3, lr=1e-2)


class ManualTinyModel(ImageClassifier):
    """The tiny classifier with manual optimization."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()


def manual_tiny_model(seed: int = 0) -> L.LightningModule:
    torch.manual_seed(seed)
    return ManualTinyModel(tiny_backbone(), num_classes=3, lr=1e-2)


def tiny_data(n: int = 32, batch: int = 8, seed: int = 0) -> DataLoader:
    """``n`` seeded samples (4 steps per epoch at the defaults)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=batch)


# ---------------------------------------------------------------------------------------------------------------
# the table: one entry per public callback
# ---------------------------------------------------------------------------------------------------------------
def _no_companions(tmp: Path) -> list[Callback]:
    return []


def _qat(tmp: Path) -> list[Callback]:
    return [QuantizationAwareTraining(4, 4, num_calibration_batches=2)]


#: a tiny DDPG agent and no files, bars or plots for AutoQB's search
_AGENT = DDPGConfig(hidden=8, warmup_episodes=1, batch_size=4)
_QUIET_SEARCH: dict[str, Any] = dict(calibration_batches=1, save_search=False, progress_bar=False, plot=False)


@dataclass(frozen=True)
class Contract:
    """How to check one callback class.

    Attributes:
        make: a fresh instance of the callback under test (``tmp`` is a folder it may write to).
        other: a second instance with other identifying arguments (for the two-instances item).
        companions: callbacks it is checked beside (e.g. QAT for the export), fresh each call.
        model: a fresh, seeded LightningModule (the seed changes the weights).
        data: the training (and validation) loader.
        skip: why the class is not checked (only for templates that are not callbacks on their own).
        volatile: keys of the callback's state that hold wall-clock measurements (seconds a search took): left out
            wherever two runs' states are compared, at any depth.
        trainer_kwargs: Trainer settings every item adds (e.g. ``max_epochs`` for a schedule over epochs; the
            items bound their runs with ``max_steps``); the kill-and-resume item sets its own epochs.
    """

    make: Callable[[Path], Callback]
    other: Callable[[Path], Callback] | None = None
    companions: Callable[[Path], list[Callback]] = _no_companions
    model: Callable[[int], L.LightningModule] = tiny_model
    data: Callable[[], DataLoader] = tiny_data
    skip: str | None = None
    volatile: tuple[str, ...] = ()
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    def callbacks(self, tmp: Path) -> list[Callback]:
        return [*self.companions(tmp), self.make(tmp)]


CONTRACTS: dict[str, Contract] = {
    "QuantizationCallback": Contract(lambda tmp: None, skip="the template base class; checked through every subclass"),
    # calibration (7 batches) spans the crash at step 6
    "QuantizationAwareTraining": Contract(
        lambda tmp: QuantizationAwareTraining(4, 4, num_calibration_batches=7),
        other=lambda tmp: QuantizationAwareTraining(8, 8, num_calibration_batches=7),
    ),
    "BitReallocationCallback": Contract(
        lambda tmp: BitReallocationCallback(avg_weight_bits=5.0, every_n_steps=3, plot=False),
        other=lambda tmp: BitReallocationCallback(avg_weight_bits=6.0, every_n_steps=3, plot=False),
    ),
    "BlockReplacementCallback": Contract(
        lambda tmp: BlockReplacementCallback(num_sampled=1, mixed_ce_weight=0.5),
        other=lambda tmp: BlockReplacementCallback(num_sampled=1, temperature=2.0),
    ),
    "DistillationCallback": Contract(
        lambda tmp: DistillationCallback("copy", temperature=2.0),
        other=lambda tmp: DistillationCallback("copy", temperature=4.0),
    ),
    "ThresholdTuningCallback": Contract(
        lambda tmp: ThresholdTuningCallback(bits=4, num_calibration_batches=2, lr=5e-2, check_trained=False),
        other=lambda tmp: ThresholdTuningCallback(bits=6, num_calibration_batches=2, lr=5e-2, check_trained=False),
    ),
    "QuantizedExport": Contract(
        lambda tmp: QuantizedExport(tmp / "model.onnx", verify=False, overwrite=True, dynamo=False),
        other=lambda tmp: QuantizedExport(tmp / "other.onnx", verify=False, overwrite=True, dynamo=False),
        companions=_qat,
    ),
    # two stages over two epochs: the second stage starts in the epoch the kill-and-resume item crashes in
    "IncrementalQuantizationCallback": Contract(
        lambda tmp: IncrementalQuantizationCallback(bits=3, schedule=(0.5, 1.0), monitor=None, plot=False),
        other=lambda tmp: IncrementalQuantizationCallback(bits=4, schedule=(0.5, 1.0), monitor=None, plot=False),
        trainer_kwargs={"max_epochs": 2},
    ),
    "OrthogonalMixedPrecision": Contract(
        lambda tmp: OrthogonalMixedPrecision(avg_weight_bits=5.0, num_samples=8, plot=False),
        other=lambda tmp: OrthogonalMixedPrecision(avg_weight_bits=6.0, num_samples=8, plot=False),
        companions=_qat,
        volatile=("seconds", "feature_seconds"),
    ),
    "KernelQuantizationCallback": Contract(
        lambda tmp: KernelQuantizationCallback(2, refit_every=3, plot=False),
        other=lambda tmp: KernelQuantizationCallback(3, plot=False),
        volatile=("fit_seconds",),
    ),
    # budgets in bits: first and last layer at 8 bits (48 weights), the two middle convolutions (288) at 4 or 5
    "AutoQBCallback": Contract(
        lambda tmp: AutoQBCallback(size_budget=1536.0, episodes=2, ddpg=_AGENT, eval_batches=1, **_QUIET_SEARCH),
        other=lambda tmp: AutoQBCallback(size_budget=1824.0, episodes=2, ddpg=_AGENT, eval_batches=1, **_QUIET_SEARCH),
        companions=_qat,
        volatile=("seconds",),
    ),
}


def discovered() -> list[str]:
    """Names of the public Callback classes of ``lightning_quant.callbacks``."""
    names = []
    for name in callbacks_module.__all__:
        obj = getattr(callbacks_module, name)
        if inspect.isclass(obj) and issubclass(obj, Callback):
            names.append(name)
    return sorted(names)


CHECKED = [n for n in discovered() if n not in CONTRACTS or CONTRACTS[n].skip is None]


def contract_for(name: str) -> Contract:
    if name not in CONTRACTS:
        pytest.fail(
            f"{name} is exported by lightning_quant.callbacks but has no entry in CONTRACTS "
            f"(tests/callbacks/test_contract.py). Declare its construction arguments there, e.g. "
            f"`{name!r}: Contract(lambda tmp: {name}(...), other=lambda tmp: {name}(<other identifying args>))`."
        )
    return CONTRACTS[name]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast and does not contend


# ---------------------------------------------------------------------------------------------------------------
# checks shared by the items
# ---------------------------------------------------------------------------------------------------------------
def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Exact equality of nested states (tensors bit for bit, floats with NaN == NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{b.shape}"
        same_nans = a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a, b) or (same_nans and torch.equal(a.nan_to_num(), b.nan_to_num())), f"{where}: differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), f"{where}: nan vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def without(state: Any, keys: tuple[str, ...]) -> Any:
    """``state`` with the dict entries named ``keys`` left out, at any depth."""
    if not keys:
        return state
    if isinstance(state, dict):
        return {k: without(v, keys) for k, v in state.items() if k not in keys}
    if isinstance(state, (list, tuple)):
        return type(state)(without(v, keys) for v in state)
    return state


def snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, torch.Tensor]]:
    """Module types by name and a copy of the state dict."""
    return (
        {n: type(m) for n, m in model.named_modules()},
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def assert_unchanged(model: nn.Module, before: tuple[dict[str, type], dict[str, torch.Tensor]]) -> None:
    types, state = snapshot(model)
    assert types == before[0], "module types changed"
    assert_same(state, before[1], "model state")


def trainer(tmp: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp, deterministic=True, max_epochs=1, callbacks=callbacks,
    )  # fmt: skip
    settings.update(kwargs)
    return L.Trainer(**settings)


def state_round_trip(callback: Callback) -> Any:
    """The callback's state after ``torch.save`` and ``torch.load(weights_only=True)`` (checkpoints load so)."""
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class Trains(Callback):
    """Records the module's state when training starts (after set-up and restore) and when it ends."""

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        self.end = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def assert_trained(self) -> None:
        floats = {k: v for k, v in self.end.items() if v.is_floating_point()}
        assert all(torch.isfinite(v).all() for v in floats.values()), "non-finite values after training"
        assert any(k in self.start and not torch.equal(v, self.start[k]) for k, v in floats.items()), "nothing trained"


def check_resume(contract: Contract, tmp_path: Path) -> None:
    """Straight run vs. a run killed by SIGKILL at step 6 (mid epoch 2) and resumed into a disturbed fresh module."""

    def build():
        L.seed_everything(0, workers=True)
        return contract.model(0), contract.callbacks(tmp_path)

    @torch.no_grad()
    def disturb(model: nn.Module) -> None:  # whatever the fresh module holds must come from the checkpoint
        for p in model.parameters():
            p.add_(0.25)

    def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
        settings: dict[str, Any] = dict(
            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            deterministic=True,
        )  # fmt: skip
        settings.update(overrides)
        return settings

    (model_a, callbacks_a), (model_c, callbacks_c) = crash_and_resume(
        tmp_path,
        trainer_kwargs,
        build,
        contract.data(),
        crash_step=6,
        max_epochs=2,
        before_resume=disturb,
        val_data=contract.data(),
    )
    assert_same(model_c.state_dict(), model_a.state_dict(), "model state")
    for a, c in zip(callbacks_a, callbacks_c, strict=True):
        volatile = contract.volatile if type(a) is type(callbacks_a[-1]) else ()
        assert_same(without(c.state_dict(), volatile), without(a.state_dict(), volatile), f"{type(a).__name__} state")

    # the final checkpoint reloads strictly into a freshly built module
    last = tmp_path / "resumed" / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    fresh = contract.model(1)
    if SPEC_KEY in checkpoint:
        load_quantized(fresh, checkpoint, strict=True)
    else:
        fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert_same(fresh.state_dict(), model_c.state_dict(), "reloaded model")
    x = contract.data().dataset[:4][0]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model_c.eval()(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the items
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", discovered())
def test_every_public_callback_has_a_contract_entry(name: str) -> None:
    contract = contract_for(name)
    if contract.skip is None:
        assert isinstance(contract.make(Path("unused")), getattr(callbacks_module, name))


@pytest.mark.parametrize("name", CHECKED)
def test_attaches_and_later_stages_change_nothing(name: str, tmp_path: Path) -> None:
    contract = contract_for(name)
    model, data = contract.model(0), contract.data()
    callbacks = contract.callbacks(tmp_path)
    fresh = callbacks[-1]
    pickle.loads(pickle.dumps(fresh)), copy.deepcopy(fresh)
    spy = Trains()
    t = trainer(tmp_path, [*callbacks, spy], max_steps=3, **contract.trainer_kwargs)
    t.fit(model, data, data)
    assert t.global_step == 3
    spy.assert_trained()
    before = snapshot(model)
    t.validate(model, data, verbose=False)
    t.test(model, data, verbose=False)
    predictions = t.predict(model, data)
    assert sum(p.numel() for p in predictions) == len(data.dataset)
    assert_unchanged(model, before)

    callback = callbacks[-1]
    for clone in (pickle.loads(pickle.dumps(callback)), copy.deepcopy(callback)):
        assert clone.state_key == callback.state_key
        assert_same(clone.state_dict(), callback.state_dict(), "copied state")
    restored = contract.make(tmp_path)
    restored.load_state_dict(state_round_trip(callback))
    assert_same(restored.state_dict(), callback.state_dict(), "state after load_state_dict")


@pytest.mark.parametrize("name", CHECKED)
def test_two_instances(name: str, tmp_path: Path) -> None:
    contract = contract_for(name)
    # the same identifying arguments: their states would clash in checkpoints, and the Trainer refuses them
    same = [*contract.callbacks(tmp_path), contract.make(tmp_path)]
    with pytest.raises(RuntimeError, match=r"state_key` must be unique"):
        trainer(tmp_path, same, max_steps=1, **contract.trainer_kwargs)
    if contract.other is None:
        return
    # other identifying arguments: distinct keys, and both states in the checkpoint (or a clear refusal)
    first, second = contract.make(tmp_path), contract.other(tmp_path)
    assert first.state_key != second.state_key
    model = contract.model(0)
    t = trainer(tmp_path, [*contract.companions(tmp_path), first, second], max_steps=1, **contract.trainer_kwargs)
    try:
        t.fit(model, contract.data(), contract.data())
    except QuantizationConfigError as err:
        assert "HINT" in str(err), f"the refusal names no fix: {err}"
        assert t.global_step == 0
        return
    t.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    assert first.state_key in saved and second.state_key in saved


@pytest.mark.parametrize("name", CHECKED)
def test_kill_and_resume_into_a_fresh_module(name: str, tmp_path: Path) -> None:
    check_resume(contract_for(name), tmp_path)


class _ForgetfulQAT(QuantizationAwareTraining):
    """Broken on purpose: does not keep how many calibration batches it has seen."""

    def state(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self._observing = None


def test_a_callback_that_forgets_state_fails_the_resume_contract(tmp_path: Path) -> None:
    broken = Contract(lambda tmp: _ForgetfulQAT(4, 4, num_calibration_batches=7))
    with pytest.raises(AssertionError, match="differ"):
        check_resume(broken, tmp_path)


class SaveRankState(Callback):
    def __init__(self, folder: Path, watched: list[Callback]) -> None:
        self.folder, self.watched = folder, watched

    def on_train_end(self, trainer, pl_module):
        states = {"model": pl_module.state_dict(), "callbacks": [cb.state_dict() for cb in self.watched]}
        torch.save(states, self.folder / f"rank{trainer.global_rank}.pt")


def _not_batchnorm_statistics(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state without BatchNorm running statistics: under DDP each rank keeps its own (rank 0's are broadcast
    before every forward, the last update stays local) -- Lightning's and PyTorch's behaviour, not a callback's."""
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    local = {f"{n}.{b}" for n in norms for b in ("running_mean", "running_var", "num_batches_tracked")}
    return {k: v for k, v in state.items() if k not in local}


@pytest.mark.parametrize("name", CHECKED)
def test_ddp_two_processes_agree(name: str, tmp_path: Path) -> None:
    contract = contract_for(name)

    def rank() -> None:
        callbacks = contract.callbacks(tmp_path)
        strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
        t = trainer(tmp_path, [*callbacks, SaveRankState(tmp_path, callbacks)], devices=2, strategy=strategy,
                    max_steps=3, **contract.trainer_kwargs)  # fmt: skip
        t.fit(contract.model(0), contract.data(), contract.data())

    run_ranks(rank, world_size=2, timeout=180)
    model = contract.model(0)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    volatile = contract.volatile
    assert_same(without(rank1["callbacks"], volatile), without(rank0["callbacks"], volatile), "rank 1 vs rank 0 state")
    weights0 = _not_batchnorm_statistics(rank0["model"], model)
    assert_same(_not_batchnorm_statistics(rank1["model"], model), weights0, "rank 1 vs rank 0 model")


MODES = {
    "bf16-mixed": dict(precision="bf16-mixed"),
    "accumulate_grad_batches=2": dict(accumulate_grad_batches=2),
    "manual_optimization": dict(),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", CHECKED)
def test_precision_accumulation_manual_optimization(name: str, mode: str, tmp_path: Path) -> None:
    contract = contract_for(name)
    model = manual_tiny_model(0) if mode == "manual_optimization" else contract.model(0)
    before = snapshot(model)
    spy = Trains()
    t = trainer(
        tmp_path, [*contract.callbacks(tmp_path), spy], max_steps=2, **{**contract.trainer_kwargs, **MODES[mode]}
    )
    try:
        t.fit(model, contract.data(), contract.data())
    except QuantizationConfigError as err:
        assert "HINT" in str(err), f"the refusal names no fix: {err}"
        assert t.global_step == 0, "refused after training started"
        assert_unchanged(model, before)
        return
    spy.assert_trained()


# ---------------------------------------------------------------------------------------------------------------
# combinations
# ---------------------------------------------------------------------------------------------------------------
def _fit_trains(tmp: Path, model: L.LightningModule, callbacks: list[Callback], data: Any, **kwargs: Any) -> L.Trainer:
    spy = Trains()
    t = trainer(tmp, [*callbacks, spy], **kwargs)
    if isinstance(data, L.LightningDataModule):
        t.fit(model, datamodule=data)
    else:
        t.fit(model, data)
    spy.assert_trained()
    assert is_quantized(model)
    return t


def test_qat_block_replacement_and_qbitopt_together(tmp_path: Path) -> None:
    qbitopt = BitReallocationCallback(avg_weight_bits=5.0, every_n_steps=2, plot=False)
    callbacks = [QuantizationAwareTraining(4, 4, num_calibration_batches=1), BlockReplacementCallback(), qbitopt]
    t = _fit_trains(tmp_path, tiny_model(), callbacks, tiny_data(), max_steps=4)
    assert len(qbitopt.history) >= 2 and "quant/br/loss" in t.callback_metrics


def test_qat_and_threshold_tuning_together(tmp_path: Path) -> None:
    fat = ThresholdTuningCallback(bits=4, num_calibration_batches=1, lr=5e-2, check_trained=False)
    _fit_trains(tmp_path, tiny_model(), [QuantizationAwareTraining(), fat], tiny_data(), max_steps=3)
    assert fat.tuning_steps == 2


def test_data_free_distillation_with_qat(tmp_path: Path) -> None:
    teacher = tiny_model(0).eval()
    dm = GeneratorDataModule(
        teacher, 3, (1, 6, 6), samples_per_epoch=16, batch_size=8, generator_steps=2, generator_batch_size=8,
        latent_dim=4, generator_width=4, val_samples=8, generator_trainer_kwargs={"enable_progress_bar": False},
    )  # fmt: skip
    kd = DistillationCallback("datamodule", student_init="teacher", temperature=4.0)
    _fit_trains(tmp_path, tiny_model(1), [kd, QuantizationAwareTraining(4, 4)], dm, max_steps=2)
    assert kd.teacher_model is not None and not is_quantized(kd.teacher_model)
