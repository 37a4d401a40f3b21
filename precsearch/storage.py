"""Where studies live and how several workers share one: Optuna's storages, a single setup per
study, a global trial budget, and recovery of trials whose worker died.

- ``sqlite:///PATH`` (default) and ``postgresql://...``: RDB storages with Optuna's heartbeat; a
  trial whose worker stops beating is failed and re-queued by the next worker or rerun.
- ``journal:///PATH``: a journal file for several processes on one host; a trial whose process
  is gone (same host, dead PID) is failed and re-queued.
"""

from __future__ import annotations

import os
import socket
import time
import warnings

import optuna
from optuna.trial import TrialState

from precsearch.errors import InputError
from precsearch.plan import mask_password

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what the budget counts
HEARTBEAT_S = 60
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def open_storage(url: str | None, heartbeat: float = HEARTBEAT_S) -> optuna.storages.BaseStorage | None:
    """The Optuna storage behind ``url`` (None: in memory)."""
    if url is None:
        return None
    try:
        if url.startswith("journal:///"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:///")))
        return _rdb_storage(url, heartbeat)
    except Exception as error:
        raise InputError(f"--storage {mask_password(url)}: cannot open ({type(error).__name__}: "
                         f"{mask_password(str(error).splitlines()[0]) if str(error) else ''})") from None


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
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


def claim_setup(study: optuna.Study) -> None:
    study.set_user_attr("setup_by", WORKER)


def wait_for_setup(study: optuna.Study, timeout: float = 1800.0) -> bool:
    """Wait until the creating worker has finished the setup. Returns True when this worker must
    do it instead: the creator was a process on this host that has died."""
    started = time.monotonic()
    while True:
        attrs = study.user_attrs
        if attrs.get("ready"):
            return False
        if _dead_local_worker(attrs.get("setup_by")):
            claim_setup(study)
            return True
        if time.monotonic() - started > timeout:
            raise InputError(f"--study {study.study_name!r}: its setup did not finish within {timeout:.0f} s "
                             f"(worker {attrs.get('setup_by')} may have died); start a new --study")
        time.sleep(0.5)


def _dead_local_worker(worker: str | None) -> bool:
    if not worker:
        return True  # created by a worker that died before claiming anything
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


def recover_dead_trials(study: optuna.Study) -> int:
    """Fail and re-queue RUNNING trials whose worker process on this host is gone (the journal
    storage has no heartbeat; for RDB storages this finds them before the grace period ends)."""
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
        worker = trial.user_attrs.get("worker")
        if worker and worker != WORKER and _dead_local_worker(worker):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            if trial.params:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            recovered += 1
    return recovered


class Surplus(Exception):
    """A trial claimed after the global budget was already taken by other workers."""


def check_budget(study: optuna.Study, trial: optuna.Trial, budget: int) -> None:
    """Raise Surplus when the trials numbered before this one already fill the budget.

    Trial numbers are handed out atomically by the storage, so of several workers racing for the
    last slots exactly ``budget`` trials go ahead; the others fail as surplus and their workers stop.
    """
    earlier = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
    taken = sum(1 for t in earlier if t.number < trial.number)
    if taken >= budget:
        trial.set_user_attr("surplus", True)
        study.stop()
        raise Surplus(f"trial {trial.number}: the budget of {budget} trials is already taken")


def budget_left(study: optuna.Study, budget: int) -> int:
    return budget - len(study.get_trials(deepcopy=False, states=COUNTED))


def mark_worker(trial: optuna.Trial) -> None:
    trial.set_user_attr("worker", WORKER)
