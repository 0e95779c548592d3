"""Shared test helpers: the MNIST copy beside the project and small Trainer settings."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest

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
