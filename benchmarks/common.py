"""Helpers shared by the benchmark scripts (run them from the repository root: ``python benchmarks/<name>.py``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def quiet_trainer(epochs: int, callbacks: list, root: Path, max_steps: int = -1) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or validation: only the work being measured."""
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
