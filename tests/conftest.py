"""Shared test helpers: the MNIST copy beside the project, small Trainer settings, kill-and-resume, forked runs."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_quant.core.fused  # noqa: F401  (reads LIGHTNING_QUANT_FUSED now: this process keeps the fused path)
from lightning_quant.core.fused import set_fused_enabled

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


def _fork(body: Callable[[], Any]) -> int:
    """Fork; the child runs ``body()`` and exits (0 on success, 1 with its traceback on stderr), never returning into
    pytest. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            body()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return pid


def run_in_fork(target: Callable[[], Any], *, timeout: float, expect_signal: int | None = None) -> int:
    """Run ``target()`` in a forked child process (imports inherited: no start-up cost) and wait for it.

    The child uses one thread (fork-safe, and the same arithmetic as the tests that set one thread) and its own
    process group; after ``timeout`` seconds the group is killed and the test fails (no hang). With
    ``expect_signal`` the child must die of that signal (e.g. ``SIGKILL`` it sends itself); otherwise it must exit
    with status 0. Returns the child's wait status.
    """

    def child() -> None:
        os.setpgid(0, 0)
        torch.set_num_threads(1)
        # like the spawned children (LIGHTNING_QUANT_FUSED=0 above): aten's kernels, bit-identical to the fused path,
        # and no inductor compile inside a forked process
        set_fused_enabled(False)
        target()

    pid = _fork(child)
    deadline = time.monotonic() + timeout
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child process ran past its {timeout:.0f} s timeout (hang?) and was killed")
        time.sleep(0.05)
    if expect_signal is not None:
        assert os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == expect_signal, (
            f"the child was expected to die of signal {expect_signal}; wait status {wait_status}"
        )
    else:
        assert os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0, (
            f"the child process failed (wait status {wait_status}); its traceback is in the captured stderr"
        )
    return wait_status


def run_ranks(target: Callable[[], Any], *, world_size: int = 2, timeout: float) -> None:
    """Run ``target()`` in ``world_size`` forked processes set up as DDP ranks (the environment ``torchrun`` gives:
    ``MASTER_ADDR/PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), so a Trainer with ``strategy="ddp"``,
    ``devices=world_size`` joins them instead of launching processes. All ranks run inside one child of
    :func:`run_in_fork`: a hang is killed after ``timeout`` seconds and fails the test; a failing rank fails it.
    """

    def launch() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pids = []
        for rank in range(world_size):

            def rank_process(rank: int = rank) -> None:
                env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size)}
                os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
                target()

            pids.append(_fork(rank_process))
        failed = [rank for rank, pid in enumerate(pids) if os.waitpid(pid, 0)[1] != 0]
        if failed:
            raise RuntimeError(f"DDP ranks {failed} failed")

    run_in_fork(launch, timeout=timeout)


class KillAt(Callback):
    """Kills its own process with SIGKILL when training reaches ``step`` (a crash nothing can clean up after)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def crash_and_resume(
    tmp_path: Path,
    trainer_kwargs,
    build,
    data,
    crash_step: int,
    *,
    max_epochs: int = 3,
    before_resume=None,
    val_data=None,
    timeout: float = 120.0,
):
    """Train straight through; train again in a child process killed by SIGKILL at ``crash_step``; resume that
    run from its ``last.ckpt``.

    ``build()`` returns ``(model, callbacks)`` (a fresh model and fresh callbacks each call, seeded inside).
    Epoch checkpoints are written to ``<run>/ckpt``; ``crash_step`` must lie after the first epoch's end (so
    there is a checkpoint) and inside an epoch. ``before_resume(model)`` may disturb the freshly built model of
    the resumed run (it must come back from the checkpoint); ``val_data`` is passed to ``fit``. All three runs
    use one thread (the same arithmetic).
    Returns ``((model, callbacks)`` of the straight run, ``(model, callbacks)`` of the resumed run``)``.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

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
        L.Trainer(**kwargs).fit(model, data, val_data, ckpt_path=ckpt_path)
        return model, callbacks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = fit("straight", [])
        run_in_fork(lambda: fit("crashed", [KillAt(crash_step)]), timeout=timeout, expect_signal=signal.SIGKILL)
        last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
        assert last.exists(), "no checkpoint was written before the crash"
        resumed = fit("resumed", [], ckpt_path=last)
    finally:
        torch.set_num_threads(threads)
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


#: the helpers that fork children which train (kill-and-resume, DDP ranks)
_FORKING_HELPERS = ("crash_and_resume", "run_in_fork", "run_ranks")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the test modules that fork training children first (otherwise in their usual order).

    After some work in the same process -- seen after a test that exports an attention block with the fused
    quantizer kernels on, not pinned down further -- autograd refuses to run in a forked child ("Unable to handle
    autograd's threading in combination with fork-based multiprocessing"). Forking before the rest of the suite
    runs keeps those children working whatever else the suite contains.
    """
    if config.getoption("randomly_seed", default=None) is not None:
        return  # a random order was asked for
    forking = [item for item in items if any(hasattr(getattr(item, "module", None), h) for h in _FORKING_HELPERS)]
    if forking:
        chosen = {id(item) for item in forking}
        items[:] = forking + [item for item in items if id(item) not in chosen]


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict[str, dict]:
    """Write the archive's layout: pickled dicts with `data` (N x 3072 uint8: R, G, B planes) and `labels`."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            "batch_label": f"{name} of 5",
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = batch
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return batches
