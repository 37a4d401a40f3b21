"""Several workers on one study, crash recovery, and faults inside trials."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from torch import nn

from precsearch.cli import main
from precsearch.search.config import SearchConfig
from precsearch.runtime.errors import InputError
from precsearch.search.trials import StudySetup, TrialRecord, is_surplus, worker_of
from precsearch.search.loop import optimize

optuna.logging.set_verbosity(optuna.logging.WARNING)
MODEL = ["--model", "precsearch.examples.demo:small_model", "--data", "precsearch.examples.demo:data"]


def _worker(storage, study, trials, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "precsearch", "optimize", *MODEL, "--storage", storage,
                             "--study", study, "--trials", str(trials), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_shared_study(storage, study_name, trials, workers):
    results = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err for _, err in results]
    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    states = [(t.number, t.state.name, worker_of(t), is_surplus(t)) for t in study.trials]
    assert len(complete) == trials, states
    # Surplus trials (claimed after the budget was taken) are failed, never evaluated.
    assert all(is_surplus(t) for t in study.trials if t.state.name == "FAIL"), states
    seeded = [tuple(sorted(t.params.items())) for t in complete if t.system_attrs.get("fixed_params")]
    assert len(seeded) == len(set(seeded))  # no enqueued seed evaluated twice
    assert sum("this worker set up study" in err for _, err in results) == 1  # one sensitivity analysis
    assert not any("Traceback" in err for _, err in results)  # surplus trials end quietly
    assert StudySetup.load(study).sensitivity
    return study


@pytest.mark.slow
def test_two_workers_share_a_journal_study(tmp_path):
    storage = f"journal:///{tmp_path / 'journal.log'}"
    workers = [_worker(storage, "shared", 10, tmp_path / f"out{i}") for i in range(2)]
    from precsearch.search.storage import open_storage

    _check_shared_study(open_storage(storage), "shared", 10, workers)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PRECSEARCH_TEST_POSTGRES"),
                    reason="set PRECSEARCH_TEST_POSTGRES=postgresql://... (CI starts a server)")
def test_two_workers_share_a_postgres_study(tmp_path):
    storage = os.environ["PRECSEARCH_TEST_POSTGRES"]
    name = f"shared-{os.getpid()}-{time.time_ns()}"
    workers = [_worker(storage, name, 10, tmp_path / f"out{i}") for i in range(2)]
    _check_shared_study(storage, name, 10, workers)
    assert main(["report", str(tmp_path / "out0"), "--storage", storage, "--study", name]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_worker_killed_mid_trial_loses_only_that_trial(tmp_path, kind):
    storage = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"journal:///{tmp_path / 'j.log'}"
    from precsearch.search.storage import open_storage

    backend = open_storage(storage)
    worker = _worker(storage, "s", 12, tmp_path / "out", "--heartbeat", "1")
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            trials = optuna.load_study(study_name="s", storage=backend).trials
        except KeyError:
            trials = []
        if sum(t.state.name == "COMPLETE" for t in trials) >= 3 and any(t.state.name == "RUNNING" for t in trials):
            break
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    units = StudySetup.load(optuna.load_study(study_name="s", storage=backend)).unit_names
    before = {t.number: (t.value, TrialRecord.of(t, units).code) for t in
              optuna.load_study(study_name="s", storage=backend).trials if t.state.name == "COMPLETE"}
    killed = [t.number for t in optuna.load_study(study_name="s", storage=backend).trials if t.state.name == "RUNNING"]
    assert before and killed

    rerun = _worker(storage, "s", 12, tmp_path / "out", "--heartbeat", "1")
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    study = optuna.load_study(study_name="s", storage=backend)
    after = {t.number: (t.value, TrialRecord.of(t, units).code) for t in study.trials
             if t.state.name == "COMPLETE"}
    assert len(after) == 12
    assert all(after[number] == value for number, value in before.items())  # earlier trials intact
    assert all(study.trials[number].state.name == "FAIL" for number in killed)


class Probe(nn.Linear):
    """A linear layer that remembers the precision it last ran in."""

    def forward(self, x):
        self.ran_in = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        return super().forward(x)


class Faulty(nn.Module):
    """Breaks in chosen precisions: an exception when `first` runs in fp16, a (simulated) CUDA
    OOM when both run in bf16, NaN outputs when only `second` runs in bf16."""

    def __init__(self):
        super().__init__()
        self.first = Probe(32, 32)
        self.second = Probe(32, 32)

    def forward(self, x):
        out = self.second(self.first(x))
        first, second = self.first.ran_in, self.second.ran_in
        if first == torch.float16:
            raise RuntimeError("boom: unsupported in fp16")
        if first == second == torch.bfloat16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        if second == torch.bfloat16:
            return out * float("nan")
        return out


def test_faults_inside_trials_are_recorded_and_the_search_goes_on(tmp_path):
    torch.manual_seed(0)
    model = Faulty().eval()
    batches = [torch.randn(8, 32) for _ in range(2)]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="faults", storage=storage)  # the faulty plans go first
    for first, second in (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16")):
        study.enqueue_trial({"first": first, "second": second})
    result = optimize(model, batches, SearchConfig(trials=12, progress=False, repeats=3, drop_slow_dtypes=False,
                      storage=storage, study_name="faults"))
    units = result.graph.units
    trials = {TrialRecord.of(t, units).code: t for t in result.study.trials if t.state.name == "COMPLETE"}
    assert "OutOfMemoryError" in TrialRecord.of(trials["bb"], units).failure
    assert "boom" in TrialRecord.of(trials["hh"], units).failure
    nan = TrialRecord.of(trials["fb"], units)  # NaN outputs: infeasible, and the reason is said
    assert nan.error is None and trials["fb"].constraints["error"] > 0 and "non-finite" in nan.failure
    assert result.plan is not None and result.plan.precision("second") != "bf16"
    from precsearch.report.summary import write_report

    result.plan.save(tmp_path / "plan.yaml")
    markdown = write_report(tmp_path, result.study)["md"].read_text()
    assert "## Trials that failed" in markdown and "OutOfMemoryError" in markdown and "boom" in markdown


def test_a_worker_with_another_model_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    torch.manual_seed(0)
    batches = [torch.randn(8, 32)]
    optimize(nn.Sequential(nn.Linear(32, 32)), batches, SearchConfig(trials=2, storage=storage, study_name="s", progress=False,
             repeats=3))
    with pytest.raises(InputError, match="was made for another model, space, constraint or mode"):
        optimize(nn.Sequential(nn.Linear(32, 16)), batches, SearchConfig(trials=2, storage=storage, study_name="s",
                 progress=False, repeats=3))
    with pytest.raises(InputError, match="was made for another"):
        optimize(nn.Sequential(nn.Linear(32, 32)), batches, SearchConfig(trials=2, storage=storage, study_name="s",
                 progress=False, repeats=3, max_error=0.5))


@pytest.mark.parametrize("change,message", [
    ({"weights": "fp32"}, "was measured with --weights low, not --weights fp32"),
    ({"batches": 1.0}, "was made on other --data"),
])
def test_resuming_with_other_weights_or_data_is_refused(tmp_path, change, message):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    torch.manual_seed(0)
    model, batches = nn.Sequential(nn.Linear(32, 32)), [torch.randn(8, 32)]

    def search(weights="low", shift=0.0):
        return optimize(model, [b + shift for b in batches], SearchConfig(
            trials=2, storage=storage, study_name="s", progress=False, repeats=2, weights=weights))

    search()
    search()                                          # the same search resumes
    with pytest.raises(InputError, match=message) as error:
        search(change.get("weights", "low"), change.get("batches", 0.0))
    assert "\n" not in str(error.value)


def test_a_slot_held_by_a_trial_no_worker_marked_is_freed():
    """A worker killed between creating its trial and marking it leaves a RUNNING trial to nobody:
    it must not hold a slot of the budget for ever (the next worker's last trial waits, then frees it)."""
    from precsearch.search.trials import mark_worker
    from precsearch.search.storage import WORKER, Surplus, check_budget

    study = optuna.create_study()
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    orphan = study.ask()                      # created, never marked: its worker died
    mine = study.ask()
    mark_worker(mine, WORKER)
    check_budget(study, mine, budget=3, grace=0.2)   # waits, fails the orphan, takes its slot
    assert study.trials[orphan.number].state.name == "FAIL"
    late = study.ask()
    mark_worker(late, WORKER)
    study.stop = lambda: None                 # outside study.optimize there is nothing to stop
    with pytest.raises(Surplus):
        check_budget(study, late, budget=3, grace=0.2)


def test_a_dead_workers_trial_is_failed_and_its_params_requeued_through_optunas_public_api(monkeypatch):
    import inspect

    from precsearch.search import storage
    from precsearch.search.trials import mark_worker

    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_categorical("x", ["bf16", "fp32"])
    mark_worker(trial, "host:1")
    monkeypatch.setattr(storage, "_dead_local_worker", lambda worker: worker == "host:1")
    assert storage.recover_dead_trials(study) == 1
    failed, copy = study.trials
    assert failed.state.name == "FAIL" and copy.state.name == "WAITING" and copy.user_attrs == {}
    rerun = study.ask()
    assert rerun.number == copy.number and rerun.suggest_categorical("x", ["bf16", "fp32"]) == failed.params["x"]
    assert "._storage" not in inspect.getsource(storage)   # no reach into Optuna's private storage
