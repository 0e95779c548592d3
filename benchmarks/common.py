"""Helpers shared by the benchmark scripts (run them from the repository root: ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import logging
import re
import shlex
import warnings
from pathlib import Path

import lightning as L


def quiet_trainer(epochs: int, callbacks: list, root: Path, max_steps: int = -1, val_batches: int = 0) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or validation (``val_batches`` validation batches per
    epoch where a callback needs a validation loader): only the work being measured."""
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
        limit_val_batches=val_batches,
    )


def quiet_logs() -> None:
    """Keep Lightning's and the suite's per-run banners and warnings out of a benchmark's output."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_quant"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the ``heading`` section of a markdown file with ``text`` (or append it); other sections stay."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^" + re.escape(heading) + r"\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text.rstrip() + "\n\n", current).rstrip() + "\n"
    else:
        updated = current.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(updated)


def rerun_command(script: str, argv: list[str]) -> str:
    """The command a reader re-runs to reproduce a section: ``argv`` without output and work-directory paths."""
    shown, skip = [], False
    for a in argv:
        if skip or a.startswith(("--output", "--no-write", "--workdir")):
            skip = a in ("--output", "--workdir")
            continue
        shown.append(a)
    return f"python benchmarks/{script}" + ("" if not shown else " " + shlex.join(shown))
