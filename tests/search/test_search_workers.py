"""MixedPrecisionSearch across processes: SIGKILL and resume (SQLite), two workers on a journal file and on PostgreSQL.

The workers are real ``lightning-quant search`` processes started as a user would (``python -m lightning_quant.cli
search --config ... --storage URL --study-name NAME``); each test has a wall-clock limit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lightning_quant.cli import main

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300


def write_config(tmp_path: Path, **overrides) -> Path:
    config = {
        "factory": {
            "class_path": "lightning_quant.search.ImageClassifierFactory",
            "init_args": {
                "backbone": "lightning_quant.models.LeNet5",
                "backbone_args": {"in_channels": 1, "input_size": 8},
            },
        },
        "datamodule": {"class_path": "lightning_quant.datamodules.DigitsDataModule", "init_args": {"batch_size": 64}},
        "weight_bits": [2, 4, 8],
        "max_size_kib": 12.0,
        "n_trials": 5,
        "sampler": "random",
        "fp_epochs": 1,
        "qat_epochs": 1,
        "trainer_kwargs": {"accelerator": "cpu", "limit_train_batches": 4, "limit_val_batches": 2},
        "num_calibration_batches": 1,
        "workdir": str(tmp_path / "search"),
        "study_name": "tiny",
        "heartbeat_interval": 1,
        "grace_period": 6,  # seconds: a loaded shared CPU delays a heartbeat by a second or two
        "progress_bar": False,
    }
    config.update(overrides)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def worker(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "lightning_quant.cli", "search", "--config", str(config), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + TIMEOUT
    for proc, log in zip(procs, logs, strict=True):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a worker did not finish in {TIMEOUT} s:\n{log.read_text()[-3000:]}")
        assert proc.returncode == 0, log.read_text()[-3000:]


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.slow
def test_a_search_killed_by_sigkill_resumes_from_sqlite_without_repeating_finished_trials(tmp_path):
    config = write_config(tmp_path)
    url = f"sqlite:///{tmp_path}/search/search.db"
    proc = worker(config, tmp_path / "killed.log")
    deadline = time.monotonic() + TIMEOUT
    storage = None
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the search ended before it was killed:\n{(tmp_path / 'killed.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the search did not reach 3 finished trials in time")
            trials = []
            try:  # the database, its tables or the study may not exist yet
                if storage is None and (tmp_path / "search" / "fp").exists():  # the study exists: training began
                    storage = optuna.storages.RDBStorage(url)
                if storage is not None:
                    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
            except Exception:
                time.sleep(0.2)
            training = [t for t in trials if t.state == TrialState.RUNNING and "spec" in t.user_attrs]
            if len(counted(trials)) >= 3 and training:  # its parameters are drawn: it trains
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the fourth trial
    finally:
        proc.kill()
        proc.wait()
    study = optuna.load_study(study_name="tiny", storage=url)
    before = {t.number: t for t in counted(study.get_trials())}
    killed = [t.number for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len(before) >= 3 and killed and all(study.get_trials()[n].params for n in killed)

    # resumed as the same command, in this process: waits out the heartbeat's grace period and retries the killed trial
    assert main(["search", "--config", str(config)]) == 0

    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    assert len(counted(trials)) == 5
    for number, old in before.items():  # the finished trials are kept as they were, not run again
        now = trials[number]
        assert (now.state, now.values, now.datetime_complete) == (old.state, old.values, old.datetime_complete)
    retried = [t for t in trials if "failed_trial" in t.system_attrs]
    assert sorted(t.system_attrs["failed_trial"] for t in retried) == killed
    for number in killed:  # the killed trial: failed by the heartbeat (no error of its own), retried with its params
        assert trials[number].state == TrialState.FAIL and "error" not in trials[number].user_attrs
    assert all(t.params == trials[t.system_attrs["failed_trial"]].params for t in retried)
    assert all(t.state == TrialState.COMPLETE for t in retried)
    # warm starts were enqueued once, by the run that created the study
    origins = [t.user_attrs.get("origin") for t in trials]
    assert origins.count("uniform 2-bit") == origins.count("uniform 4-bit") == 1


def _two_workers(tmp_path: Path, storage: str) -> tuple[list[optuna.trial.FrozenTrial], set[int]]:
    config = write_config(tmp_path, n_trials=4, study_name="shared")
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [worker(config, log, "--storage", storage, "--study-name", "shared") for log in logs]
    finish(procs, logs)
    trials = optuna.load_study(study_name="shared", storage=_optuna_storage(storage)).get_trials()
    return trials, {p.pid for p in procs}


def _optuna_storage(url: str):
    if url.startswith("journal:///"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len("journal://") :]))
    return url


def _check_shared_study(trials: list[optuna.trial.FrozenTrial], pids: set[int]) -> None:
    complete = counted(trials)
    assert len(complete) == 4, [(t.number, t.state.name) for t in trials]  # exactly the requested trials
    # trained by our two processes (how the four split between them is up to the scheduler: on a loaded machine one
    # worker may finish them all while the other waits for the study's last running trial)
    workers = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in complete}
    assert workers and workers <= pids
    # no trial was run twice: each warm start once, and no worker started a trial once the study had its four
    origins = [t.user_attrs.get("origin") for t in trials]
    assert origins.count("uniform 2-bit") == origins.count("uniform 4-bit") == 1
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.PRUNED)
    # the float weights were trained once, by one worker, and shared with the other through the work directory
    sources = [t.user_attrs["float_weights"] for t in complete]
    assert sources.count("trained") == 1 and sources.count("cache") == 3


@pytest.mark.slow
def test_two_workers_on_one_journal_file_finish_the_requested_trials_together(tmp_path):
    _check_shared_study(*_two_workers(tmp_path, f"journal:///{tmp_path}/study.log"))


def _postgres_binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of the test's own, on a free port (run as `nobody` when the tests run as root)."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed: pip install 'lightning-quant[search]'")
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (pg_ctl) on this machine; Debian: apt-get install postgresql")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="lq-postgres-"))
    base.chmod(0o755)
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and no `runuser` to start PostgreSQL as another user")
        as_user = [runuser, "-u", "nobody", "--"]
        shutil.chown(base, "nobody")
    data, port = base / "data", _free_port()
    env = dict(os.environ, LC_ALL="C", LANG="C")

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *command], env=env, cwd=base, capture_output=True, text=True, timeout=120)

    init = run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed here: {init.stderr.strip()[-300:]}")
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -F"
    start = run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-o", options, "-w", "start")
    if start.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server did not start here: {start.stderr.strip()[-300:]}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_one_postgresql_database_finish_the_requested_trials_together(tmp_path, postgres_url):
    _check_shared_study(*_two_workers(tmp_path, postgres_url))
