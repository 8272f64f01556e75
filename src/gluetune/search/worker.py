"""A worker process of `gluetune search` (started by search.study.run_search): `python -m
gluetune.search.worker <search_dir> <index> [<seed>]` runs trials of the study in <search_dir> until
its budget is spent, sampling with `seed` (default: the search's seed + index). It asks the study
for a trial, runs it (trialrun.TrialRun), reports each evaluation and tells the result; with a
database study it records the trial's heartbeat and fails the study's stale trials."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from ..console import setup_logging
from ..errors import one_line
from . import storage as databases
from . import trials
from .study import (
    BUDGET_LOCK_FILENAME,
    EXIT_FAILING,
    FAILURES_IN_A_ROW,
    RECORD_ATTR,
    WORKER_LOCK_PATTERN,
    SearchSpec,
    make_pruner,
    make_sampler,
    make_storage,
)
from .trialrun import TrialRun

logger = logging.getLogger("gluetune")


class _Heartbeat:
    """Records a database trial's heartbeat while it runs (study.optimize does this, ask/tell not),
    and with each beat fails the trials of the study whose heartbeat went stale (a dead machine's):
    they are enqueued again within a heartbeat of the grace period, whatever this trial's length."""

    def __init__(self, store, trial_id: int, study):
        self._stop = threading.Event()
        if hasattr(store, "record_heartbeat") and store.get_heartbeat_interval():
            import optuna

            interval = store.get_heartbeat_interval()

            def beat():
                while not self._stop.wait(interval):
                    try:
                        store.record_heartbeat(trial_id)
                        optuna.storages.fail_stale_trials(study)
                    except Exception as err:  # noqa: BLE001 (the server away a moment: beat again next time)
                        logger.warning("heartbeat of trial id %d not recorded (%s)", trial_id,
                                       one_line(err) or type(err).__name__)

            threading.Thread(target=beat, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def _budget_lock(spec: SearchSpec):
    """Counting the budget and asking for a trial: one worker of this machine at a time, and on
    PostgreSQL one worker of all machines (elsewhere machines may together overshoot by workers - 1)."""
    from filelock import FileLock

    with FileLock(str(spec.folder / BUDGET_LOCK_FILENAME)):
        if spec.storage:
            with databases.server_lock(spec.storage, f"budget {spec.study_name}"):
                yield
        else:
            yield


def next_trial(spec: SearchSpec, study, store, stopping: list):
    """The next trial for this worker (a retried or enqueued one first), or None once the budget
    is spent and no trial runs anywhere (a running one may still fail and be retried). Before each
    ask, trials whose heartbeat went stale (their machine died) are failed and enqueued again."""
    import optuna
    from optuna.trial import TrialState

    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    pause = min(5.0, databases.heartbeat_seconds()) if spec.storage else 1.0
    while not stopping:
        with _budget_lock(spec):
            optuna.storages.fail_stale_trials(study)  # (a journal has no heartbeats: nothing to do)
            states = [t.state for t in study.get_trials(deepcopy=False)]
            if sum(state in counted for state in states) < spec.trials:
                with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": _Heartbeat beats
                    warnings.simplefilter("ignore", UserWarning)
                    trial = study.ask()
                if hasattr(store, "record_heartbeat") and store.get_heartbeat_interval():
                    store.record_heartbeat(trial._trial_id)  # from now on a silent trial goes stale
                return trial
        if TrialState.RUNNING not in states:
            return None
        time.sleep(pause)
    return None


def worker_main(search_dir: str, index: int, seed: int | None = None) -> int:
    """One worker: ask the study for a trial, run it, tell the result, until the budget is spent."""
    import optuna
    from filelock import FileLock
    from optuna.trial import TrialState

    spec = SearchSpec.read(Path(search_dir))
    alive = FileLock(str(spec.folder / WORKER_LOCK_PATTERN.replace("*", str(index))), timeout=600)
    alive.acquire()  # held for the worker's life (released by the kernel however it ends)
    space = spec.parsed_space()
    store = make_storage(spec)
    # Each worker its own stream of random numbers: with one seed they would propose the same points.
    study = optuna.load_study(study_name=spec.study_name, storage=store,
                              sampler=make_sampler(spec, spec.seed + index if seed is None else seed),
                              pruner=make_pruner(spec))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    failures = 0
    while (trial := next_trial(spec, study, store, stopping)) is not None:
        values = {p.key: p.value_of(p.suggest(trial)) for p in space.parameters}
        first = databases.retry_callback_class().retried_trial_number(store.get_trial(trial._trial_id))
        number = trial.number if first is None else first  # a retried trial resumes its first trial's run
        heartbeat = _Heartbeat(store, trial._trial_id, study)
        try:
            state, value = run_trial(spec, trial, number, values, stopping)
        finally:
            heartbeat.stop()
        if state is None:  # stopped by a signal: left RUNNING, failed and retried by the next search command
            return 130
        if store.get_trial(trial._trial_id).state.is_finished():
            logger.warning("trial %d: another worker failed it meanwhile (no heartbeat within %g s) and retries it",
                           number, databases.grace_seconds())
        else:
            study.tell(trial, value, state=state)
        failures = failures + 1 if state == TrialState.FAIL else 0
        if failures >= FAILURES_IN_A_ROW:
            return EXIT_FAILING
    return 130 if stopping else 0


def run_trial(spec: SearchSpec, trial, number: int, values: dict, stopping: list):
    """Run one trial's training, reporting each evaluation; (state, value) for `study.tell`,
    or (None, None) when this worker is being stopped."""
    from optuna.trial import TrialState

    folder = spec.trial_folder(number)
    record = trials.TrialRecord(number=number, params=values, folder=str(folder), engine="optuna",
                                study_trial=trial.number)

    def publish(r: trials.TrialRecord) -> None:
        try:
            trial.set_user_attr(RECORD_ATTR, asdict(r))
        except RuntimeError:  # failed meanwhile by another worker (its heartbeat went stale): its retry records itself
            pass

    watch = TrialRun.start(record, spec.config, spec.trial_overrides(values, folder), spec.metric, spec.cwd,
                           publish=publish)
    logger.info("trial %d: started %s (log: %s)", number, record.setting, folder / "train.log")
    for step, value in watch.evaluations(lambda: bool(stopping)):
        if value is None:
            continue
        trial.report(value, step=step)
        if trial.should_prune():
            watch.prune(f"pruned by the {spec.pruner} pruner after evaluation {step}")
            return TrialState.PRUNED, None
    if stopping:
        watch.stop("stopped with its search: it resumes from its checkpoint when the command runs again")
        return None, None
    if watch.finish() != "complete":
        return TrialState.FAIL, None
    # The evaluations the run wrote after the last poll (its last one at least): the pruner compares later trials with them.
    for step, value in enumerate(record.curve[watch.offered:], start=watch.offered + 1):
        if value is not None:
            trial.report(value, step=step)
    return TrialState.COMPLETE, record.value


if __name__ == "__main__":
    setup_logging()
    sys.exit(worker_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None))
