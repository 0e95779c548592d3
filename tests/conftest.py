"""Shared test helpers: the MNIST copy beside the project and small Trainer settings."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import pytest

import lightning_quant.core.fused  # noqa: F401  (reads LIGHTNING_QUANT_FUSED now: this process keeps the fused path)

# Child processes (kill-and-resume runs, DDP ranks, notebooks, CLI and search workers) take aten's kernels: each would
# otherwise compile the fused kernels again (about 10 s per variant on 2 cores), and they test resuming, ranks and
# entry points, not the kernels. The results are bit-identical either way (tests/core/test_core_fused.py).
os.environ["LIGHTNING_QUANT_FUSED"] = "0"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# keep Lightning's per-Trainer banners out of test logs
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


@pytest.fixture
def mnist_root() -> Path:
    """The MNIST copy in ``../shared/data`` (skips when a fresh clone has no ``../shared``)."""
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not found under {SHARED_DATA} (the ../shared folder beside the project)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models: as fast, and no crawl when the CPU is shared)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_trainer_kwargs(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Trainer settings for seconds-long CPU runs."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def trainer_kwargs(tmp_path: Path):
    """``trainer_kwargs(**overrides)`` -> small CPU Trainer settings rooted in ``tmp_path``."""

    def make(**overrides: Any) -> dict[str, Any]:
        return tiny_trainer_kwargs(tmp_path, **overrides)

    return make


def crash_and_resume(
    tmp_path: Path,
    trainer_kwargs,
    build,
    data,
    crash_step: int,
    *,
    max_epochs: int = 3,
    before_resume=None,
):
    """Train straight through; train again, killed at ``crash_step``; resume that run from its ``last.ckpt``.

    ``build()`` returns ``(model, callbacks)`` (a fresh model and fresh callbacks each call, seeded inside).
    Epoch checkpoints are written to ``<run>/ckpt``. ``before_resume(model)`` may disturb the freshly built
    model of the resumed run (it must come back from the checkpoint). Returns ``((model, callbacks)`` of the
    straight run, ``(model, callbacks)`` of the resumed run``)``.
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class CrashAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == crash_step:
                raise RuntimeError("simulated crash")

    def fit(run: str, extra: list, ckpt_path: Path | None = None):
        model, callbacks = build()
        ckpt = ModelCheckpoint(dirpath=tmp_path / run / "ckpt", save_last=True, every_n_epochs=1, save_top_k=-1)
        kwargs = trainer_kwargs(
            max_epochs=max_epochs,
            enable_checkpointing=True,
            callbacks=[*callbacks, ckpt, *extra],
            default_root_dir=tmp_path / run,
        )
        if before_resume is not None and ckpt_path is not None:
            before_resume(model)
        L.Trainer(**kwargs).fit(model, data, ckpt_path=ckpt_path)
        return model, callbacks

    straight = fit("straight", [])
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit("crashed", [CrashAt()])
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    assert last.exists(), "no checkpoint was written before the crash"
    resumed = fit("resumed", [], ckpt_path=last)
    return straight, resumed


def shipped_config(name: str, capsys) -> dict[str, Any]:
    """The configuration ``lightning-quant fit --config configs/trainer.yaml --config configs/<name> --print_config``
    prints (parsed and validated by the CLI), as a dict."""
    import yaml

    from lightning_quant.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    args = ["--config", str(configs / "trainer.yaml"), "--config", str(configs / name)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)
