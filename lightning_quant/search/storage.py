"""Study storage for searches: SQLite by default, any Optuna storage URL for several workers, stale-trial retries.

* ``sqlite:///path.db`` (the default, a file in the search's work directory): one process at a time; a killed
  search resumes from it.
* ``journal:///abs/path.log`` or ``journal:relative/path.log`` (or a path ending in ``.log``/``.journal``): Optuna's
  journal file, for several processes on one machine (file locks, no database server).
* ``postgresql://user@host:port/db`` (or MySQL): several machines.

Stale trials, those of a worker that was killed, are retried: RDB storages (SQLite, PostgreSQL, MySQL) use
Optuna's own heartbeat (``RDBStorage(heartbeat_interval=..., grace_period=...,
heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry))``, the Optuna 5 replacement of the
deprecated ``RetryFailedTrialCallback`` / ``failed_trial_callback``), which marks a running trial whose heartbeat
stopped as failed and enqueues a copy of it. Optuna's journal storage has no heartbeat, so for it (and any other
storage without one) :class:`TrialHeartbeat` writes the same kind of heartbeat into a trial system attribute and
:func:`fail_stale` fails and retries with the same callback.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from lightning_quant.core.errors import QuantizationConfigError

__all__ = ["HEARTBEAT_ATTR", "TrialHeartbeat", "fail_stale", "make_storage", "uses_optuna_heartbeat"]

log = logging.getLogger(__name__)

#: trial system attribute that :class:`TrialHeartbeat` refreshes (storages without Optuna's heartbeat)
HEARTBEAT_ATTR = "lightning_quant:heartbeat"
_RDB_SCHEMES = ("sqlite:", "postgresql", "postgres:", "mysql")
_JOURNAL_SUFFIXES = (".log", ".journal")
_CREATE_ATTEMPTS = 5


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        rest = url[len("journal:") :]
        return Path(rest[2:] if rest.startswith("//") else rest)
    if "://" not in url and url.endswith(_JOURNAL_SUFFIXES):
        return Path(url)
    return None


@contextmanager
def _quiet_experimental() -> Iterator[None]:
    # Optuna marks the heartbeat arguments "experimental" on every construction; they are what Optuna documents
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        yield


def make_storage(url: str, *, heartbeat_interval: int, grace_period: int, max_retry: int | None) -> BaseStorage:
    """An Optuna storage for ``url`` with stale-trial retries (see the module docstring).

    Args:
        url: ``sqlite:///...``, ``postgresql://...``, ``mysql://...``, ``journal:///...`` or a ``.log`` path.
        heartbeat_interval: seconds between heartbeats of a running trial.
        grace_period: seconds without a heartbeat after which a running trial is stale.
        max_retry: how often one trial is retried after going stale (``None``: always).

    Raises:
        QuantizationConfigError: the URL names no storage Optuna knows, or its driver is not installed.
    """
    if not isinstance(url, str) or not url:
        raise QuantizationConfigError(
            f"`storage` must be a storage URL, got {url!r}. HINT: 'sqlite:///search.db', "
            "'journal:///shared/search.log' (processes on one machine) or 'postgresql://user@host/db'."
        )
    journal = _journal_path(url)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(journal)))
    if not url.startswith(_RDB_SCHEMES):
        raise QuantizationConfigError(
            f"`storage` = {url!r} is not a storage URL this search knows. HINT: 'sqlite:///search.db', "
            "'journal:///shared/search.log' or 'postgresql://user@host:5432/db'."
        )
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                with _quiet_experimental():
                    return RDBStorage(
                        url,
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
                    )
            except sqlalchemy.exc.SQLAlchemyError:
                # workers that start together race to create the schema (its version row is unique): the loser
                # finds the tables there on the next attempt
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 + random.random())
        raise AssertionError("unreachable")
    except ImportError as err:
        raise QuantizationConfigError(
            f"`storage` = {url!r} needs a database driver that is not installed ({err.__cause__ or err}). HINT: "
            "`pip install 'lightning-quant[search]'` installs psycopg2 for PostgreSQL."
        ) from err


def uses_optuna_heartbeat(storage: BaseStorage) -> bool:
    """Whether Optuna itself records heartbeats and retries stale trials for ``storage``."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None


class TrialHeartbeat:
    """A thread that refreshes :data:`HEARTBEAT_ATTR` of a running trial every ``interval`` seconds.

    For storages without Optuna's heartbeat (the journal file); a no-op context where Optuna's own runs.
    """

    def __init__(self, storage: BaseStorage, trial_id: int, interval: float) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        self._storage.set_trial_system_attr(self._trial_id, HEARTBEAT_ATTR, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            except Exception:  # a storage hiccup must not kill the trial: the next beat tries again
                log.warning("heartbeat of trial id %d failed", self._trial_id, exc_info=True)

    def __enter__(self) -> TrialHeartbeat:
        if not uses_optuna_heartbeat(self._storage):
            self._beat()
            self._thread = threading.Thread(target=self._run, name="lightning-quant-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _last_beat(trial: FrozenTrial) -> float | None:
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    if beat is not None:
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start is not None else None


def fail_stale(study: optuna.Study, *, grace_period: float, max_retry: int | None) -> list[int]:
    """Fail the running trials whose heartbeat stopped more than ``grace_period`` seconds ago and enqueue retries.

    RDB storages go through Optuna's own ``fail_stale_trials`` (its heartbeat and retry callback); other storages
    through :data:`HEARTBEAT_ATTR`. Returns the numbers of the trials this call failed (other storages only).
    """
    storage = study._storage
    if uses_optuna_heartbeat(storage):
        with _quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        return []
    failed = []
    now = time.time()
    with _quiet_experimental():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = _last_beat(trial)
        if beat is None or now - beat <= grace_period:
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it, or it just finished
        log.warning("trial %d has had no heartbeat for %.0f s: failed, and retried", trial.number, now - beat)
        failed.append(trial.number)
        with _quiet_experimental():
            retry(study, storage.get_trial(trial._trial_id))
    return failed
