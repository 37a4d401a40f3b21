"""Where studies live and how several workers share one: Optuna's storages, a single setup per
study, a global trial budget, and recovery of trials whose worker died.

- ``sqlite:///PATH`` (default) and ``postgresql://...``: RDB storages with Optuna's heartbeat; a
  trial whose worker stops beating is failed and re-queued by the next worker or rerun.
- ``journal:///PATH``: a journal file for several processes on one host; a trial whose process
  is gone (same host, dead PID) is failed and re-queued.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import warnings
from typing import overload

import optuna
from optuna.trial import TrialState

from precsearch.runtime.credentials import credentials_in, mask_credentials
from precsearch.runtime.errors import InputError, described
from precsearch.search.trials import StudySetup, mark_surplus, setup_owner, worker_of
from precsearch.search.trials import claim_setup as _claim

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what the budget counts
HEARTBEAT_S = 60
WORKER = f"{socket.gethostname()}:{os.getpid()}"
UNCLAIMED_GRACE_S = 10.0   # how long a study may stay unclaimed before another worker sets it up


@overload
def open_storage(url: str, heartbeat: float = ...) -> optuna.storages.BaseStorage: ...
@overload
def open_storage(url: None, heartbeat: float = ...) -> None: ...
@overload
def open_storage(url: str | None, heartbeat: float = ...) -> optuna.storages.BaseStorage | None: ...


def open_storage(url: str | None, heartbeat: float = HEARTBEAT_S) -> optuna.storages.BaseStorage | None:
    """The Optuna storage behind ``url`` (None: in memory)."""
    if url is None:
        return None
    if url.startswith("journal:") and not url.startswith("journal:///"):
        raise InputError(f"--storage {mask_credentials(url)}: a journal file is journal:///relative/path "
                         f"or journal:////absolute/path (three slashes, then the path)")
    try:
        if url.startswith("journal:///"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:///")))
        return _rdb_storage(url, heartbeat)
    except Exception as error:
        # Mask the whole message: the driver's text may quote the URL, or parts of it, again.
        message = f"--storage {url}: cannot open ({described(error)})"
        raise InputError(mask_credentials(message, known=credentials_in(url))) from None


def _rdb_storage(url: str, heartbeat: float, attempts: int = 5) -> optuna.storages.RDBStorage:
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=max(1, round(heartbeat)), grace_period=max(2, round(2 * heartbeat)),
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
        except Exception as error:
            # Workers starting together on a fresh database race to create its tables: the
            # losers see a duplicate-key error, and the tables exist on the next attempt.
            if "duplicate key" not in str(error).lower() and "already exists" not in str(error).lower():
                raise
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(name: str, storage: optuna.storages.BaseStorage | None,
               sampler: optuna.samplers.BaseSampler) -> tuple[optuna.Study, bool]:
    """The study, and whether this worker created it (and so does the one-time setup)."""
    try:
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="minimize"), True
    except optuna.exceptions.DuplicatedStudyError:
        assert storage is not None   # a fresh in-memory storage holds no study to duplicate
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


def claim_setup(study: optuna.Study) -> None:
    _claim(study, WORKER)


def wait_for_setup(study: optuna.Study, timeout: float = 1800.0) -> bool:
    """Wait until the creating worker has finished the setup. Returns True when this worker must
    do it instead: the creator was a process on this host that has died."""
    started = time.monotonic()
    while True:
        if StudySetup.load(study) is not None:
            return False
        owner = setup_owner(study)
        # The creator claims the setup right after creating the study; an unclaimed study is
        # only abandoned once that moment has clearly passed.
        unclaimed_too_long = owner is None and time.monotonic() - started > UNCLAIMED_GRACE_S
        if unclaimed_too_long or (owner is not None and _dead_local_worker(owner)):
            claim_setup(study)
            return True
        if time.monotonic() - started > timeout:
            raise InputError(f"--study {study.study_name!r}: its setup did not finish within {timeout:.0f} s "
                             f"(worker {owner} may have died); start a new --study")
        time.sleep(0.5)


def _dead_local_worker(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return int(pid) == os.getpid()


def recover_dead_trials(study: optuna.Study, grace: float = UNCLAIMED_GRACE_S) -> int:
    """Fail and re-queue RUNNING trials whose worker process on this host is gone (the journal
    storage has no heartbeat; for RDB storages this finds them before the grace period ends),
    and those no worker marked within ``grace`` seconds of their start: a worker marks its trial
    first thing, so one killed before it could left the trial to nobody."""
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
        worker = worker_of(trial)
        if (worker and worker != WORKER and _dead_local_worker(worker)) or (not worker and _older_than(trial, grace)):
            study.tell(trial.number, state=TrialState.FAIL)
            if trial.params:
                study.enqueue_trial(trial.params)
            recovered += 1
    return recovered


def _older_than(trial: optuna.trial.FrozenTrial, seconds: float) -> bool:
    started = trial.datetime_start
    return started is not None and (datetime.datetime.now() - started).total_seconds() > seconds


class Surplus(Exception):
    """A trial claimed after the global budget was already taken by other workers."""


def check_budget(study: optuna.Study, trial: optuna.Trial, budget: int, grace: float = UNCLAIMED_GRACE_S) -> None:
    """Raise Surplus when the trials numbered before this one already fill the budget.

    Trial numbers are handed out atomically by the storage, so of several workers racing for the
    last slots exactly ``budget`` trials go ahead; the others fail as surplus and their workers stop.
    A slot held by a dead worker's trial is freed first; one held by a trial no worker has marked
    yet is waited for (marked within moments, or freed after ``grace`` seconds).
    """
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
                   if t.number < trial.number]
        if len(earlier) < budget:
            return
        if recover_dead_trials(study, grace):
            continue  # a slot was freed: count again
        if not any(t.state == TrialState.RUNNING and not worker_of(t) for t in earlier):
            break
        time.sleep(0.5)
    mark_surplus(trial)
    study.stop()
    raise Surplus(f"trial {trial.number}: the budget of {budget} trials is already taken")


def budget_left(study: optuna.Study, budget: int) -> int:
    return budget - len(study.get_trials(deepcopy=False, states=COUNTED))

