"""`gluetune search`: a search over a space of `--set` values, on Optuna (embedded) or Ray Tune.

Each trial is a normal `gluetune train` run in `<search_dir>/trials/trial-<n>` (runner.RunProcess),
reporting its primary validation metric after every evaluation, read from the run's own records.
A trial that falls behind is stopped by the run's own graceful stop (a checkpoint, then exit) and
its folder's `trial.json` says it was pruned.

Optuna: the study lives in `<search_dir>/study.journal` (a journal file: Optuna advises against
SQLite for parallel workers) or in `--storage` (a database URL, for workers on several machines).
`--jobs` worker processes run here, one per GPU where there are GPUs (each sees only its own).
Re-running the command continues the study: trials of dead workers are failed and retried (their
runs resume from their last checkpoint), finished ones are kept.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_json
from . import trials
from .runner import RunProcess, final_score, is_last_evaluation, raise_interrupt, shared_cores_env, start_tied
from .space import Space, as_overrides

logger = logging.getLogger("gluetune")

SPEC_FILENAME = "search.json"
JOURNAL_FILENAME = "study.journal"
LOCK_FILENAME = ".search.lock"
WORKER_LOCK_PATTERN = ".worker-*.lock"  # held by each worker while it lives
BUDGET_LOCK_FILENAME = ".budget.lock"
TRIALS_DIR = "trials"
HEARTBEAT_S = 30  # database storages: a worker silent for 4 heartbeats is dead, its trial failed and retried
INSTALL_OPTUNA = "pip install 'gluetune[search]' (or pip install optuna)"
# What decides a trial's result; the rest (budget, jobs, pruner) may change between re-runs.
_SAME_SEARCH_KEYS = ("config", "overrides", "space", "metric", "direction", "seed")


@dataclass
class SearchSpec:
    """Everything a worker needs, saved as `<search_dir>/search.json` (paths absolute)."""

    config: str
    overrides: list[str]
    space: dict
    space_source: str
    metric: str
    direction: str  # maximize / minimize
    search_dir: str
    trials: int
    pruner: str = "median"
    startup_trials: int = 3
    prune_after: int = 1  # evaluations every trial completes before the pruner may stop it
    seed: int = 0
    storage: str | None = None
    study_name: str = "gluetune-search"
    cwd: str = field(default_factory=os.getcwd)

    @property
    def folder(self) -> Path:
        return Path(self.search_dir)

    def parsed_space(self) -> Space:
        return Space.from_dict(self.space_source, self.space)

    @classmethod
    def read(cls, search_dir: Path) -> SearchSpec:
        return cls(**json.loads((Path(search_dir) / SPEC_FILENAME).read_text()))

    def save(self) -> None:
        atomic_write_json(self.folder / SPEC_FILENAME, asdict(self))

    def check_same_search(self) -> None:
        path = self.folder / SPEC_FILENAME
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        for key in _SAME_SEARCH_KEYS:
            if saved.get(key) != getattr(self, key):
                raise UserError(f"{self.folder} holds a search with another {key} ({saved.get(key)!r}, now "
                                f"{getattr(self, key)!r}); use another --search_dir, or the same settings to continue it")

    def trial_folder(self, number: int) -> Path:
        return self.folder / TRIALS_DIR / f"trial-{number}"

    def trial_overrides(self, values: dict, folder: Path) -> list[str]:
        return [*self.overrides, *as_overrides(values), f"training.output_dir={folder}"]


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(f"gluetune search needs optuna, which is not installed: {INSTALL_OPTUNA}") from None
    # RetryHeartbeatStaleTrialCallback and friends are marked experimental; the marks are not the user's to act on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ---------------------------------------------------------------- the study


def open_study(spec: SearchSpec, storage, worker: int | None = None):
    """The study (created on first use); a worker's copy carries its seeded sampler and the pruner."""
    import optuna

    # Each worker its own stream of random numbers: with one seed they would propose the same points.
    sampler = optuna.samplers.TPESampler(seed=spec.seed + (worker or 0), n_startup_trials=spec.startup_trials)
    return optuna.create_study(study_name=spec.study_name, storage=storage, direction=spec.direction,
                               sampler=sampler, pruner=make_pruner(spec), load_if_exists=True)


def make_storage(spec: SearchSpec):
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.storage:
        from optuna.storages import RDBStorage

        # Optuna 4.9 renamed the retry callback and RDBStorage's argument for it.
        callback = "heartbeat_stale_trial_callback" if retry_callback_class().__name__.startswith("RetryHeart") else (
            "failed_trial_callback")
        try:
            storage = RDBStorage(spec.storage, heartbeat_interval=HEARTBEAT_S, grace_period=4 * HEARTBEAT_S,
                                 **{callback: retry_callback_class()(max_retry=None)})
        except Exception as err:  # noqa: BLE001 (a bad URL, a missing driver, an unreachable server)
            raise UserError(f"--storage {spec.storage}: cannot open the study's database ({err})".splitlines()[0]) from None
    else:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(str(spec.folder / JOURNAL_FILENAME)))
    return storage


def retry_callback_class():
    """Optuna's callback that enqueues a failed trial again (params, user attributes, retry history)."""
    from optuna import storages

    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def make_pruner(spec: SearchSpec):
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.prune_after)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.prune_after, reduction_factor=3)
    return optuna.pruners.NopPruner()


def retry_dead_trials(study, storage_is_local: bool) -> int:
    """Fail and enqueue again the trials left RUNNING by dead workers; how many.

    With the journal in the search folder the search's lock says no other worker is alive, so every
    RUNNING trial is dead; a database's workers on other machines are judged by their heartbeats.
    """
    import optuna
    from optuna.trial import TrialState

    if not storage_is_local:
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        optuna.storages.fail_stale_trials(study)
        return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
    retry, dead = retry_callback_class()(max_retry=None), study.get_trials(states=(TrialState.RUNNING,))
    for trial in dead:
        study.tell(trial.number, state=TrialState.FAIL)
        retry(study, study.get_trials(deepcopy=False)[trial.number])  # the same params and folder, WAITING
    return len(dead)


def enqueue_points(study, space: Space) -> None:
    """The space's enqueued points, each once: done here, by one process, before any worker starts
    (Optuna's GridSampler can hand one point to two concurrent workers; a queue pops each once)."""
    for point in space.enqueue:
        study.enqueue_trial(space.sampled(point), skip_if_exists=True)


# ---------------------------------------------------------------- the command


def visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def run_search(spec: SearchSpec, jobs: int | None) -> None:
    """Run the study's workers on this machine until the budget is spent."""
    from filelock import FileLock, Timeout

    require_optuna()
    spec.folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(spec.folder / LOCK_FILENAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{spec.folder} is in use by another gluetune search; wait for it or use another --search_dir") from None
    try:
        spec.check_same_search()
        spec.save()
        if spec.storage is None:  # (a database's other workers may be alive on other machines: heartbeats judge)
            _wait_for_old_workers(spec.folder)
        study = open_study(spec, make_storage(spec))
        retried = retry_dead_trials(study, storage_is_local=spec.storage is None)
        if retried:
            logger.info("%d trial(s) of a stopped search will run again, from their last checkpoint", retried)
        enqueue_points(study, spec.parsed_space())
        gpus = visible_gpus()
        jobs = jobs or max(1, len(gpus))
        if gpus and jobs > len(gpus):
            raise UserError(f"--jobs {jobs}: this machine shows {len(gpus)} GPU(s); one worker per GPU at most")
        _run_workers(spec, jobs, gpus)
    finally:
        lock.release()


def _wait_for_old_workers(folder: Path) -> None:
    """The workers of a search killed a moment ago may still be stopping their runs (each saves a
    checkpoint); their trials are retried only once they are gone, so no run is started twice."""
    from filelock import FileLock, Timeout

    for path in sorted(folder.glob(WORKER_LOCK_PATTERN)):
        try:
            with FileLock(str(path), timeout=600):
                pass
        except Timeout:
            raise UserError(f"a worker of an earlier search in {folder} is still running after 10 minutes "
                            f"({path.name} is held); stop it, then run the command again") from None


def _run_workers(spec: SearchSpec, jobs: int, gpus: list[str]) -> None:
    workers = []
    for index in range(jobs):
        env = shared_cores_env(jobs)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index]  # each worker, and so each of its trials, sees one GPU
        workers.append(start_tied([sys.executable, "-m", "gluetune.search.worker", spec.search_dir, str(index)], env=env))
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        codes = [w.wait() for w in workers]
    except KeyboardInterrupt:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait()
        logger.warning("search stopped; its running trials saved a checkpoint: run the same command to continue")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if any(codes):
        raise UserError(f"a search worker failed (exit codes {codes}); run the same command to continue the study")


# ---------------------------------------------------------------- results


def summarize(spec: SearchSpec) -> list[dict]:
    """The trial table, importances, best config and report of the search folder."""
    from .report import write_report

    rows = trials.write_results(spec.folder, spec.metric, spec.direction == "maximize", spec.parsed_space())
    if rows:
        write_report(spec.folder)
    return rows


def confirm(spec: SearchSpec, seeds: list[int], top: int, jobs: int) -> list[dict]:
    """The `top` best trials again over `seeds` (a sweep in `<search_dir>/confirm`), each against
    its own score: the best trial of a search on one seed is partly luck."""
    from .sweep import Setting, run_sweep

    best = trials.best_trials(spec.folder, spec.direction == "maximize", top)
    if not best:
        raise UserError("--confirm_seeds: the search has no complete trial to confirm")
    settings = [Setting(as_overrides(t.params)) for t in best]
    rows = {r["setting"]: r for r in run_sweep(spec.config, spec.overrides, settings, seeds,
                                                spec.folder / trials.CONFIRM_DIR, jobs)}
    entries = [trials.confirmation(t, rows[s.name]) for t, s in zip(best, settings) if s.name in rows]
    atomic_write_json(spec.folder / trials.CONFIRMATION_FILENAME, entries)
    summarize(spec)  # the report shows the confirmation
    return entries


# ---------------------------------------------------------------- a worker


class _Heartbeat:
    """Records a database trial's heartbeat while it runs (study.optimize does this, ask/tell not)."""

    def __init__(self, storage, trial_id: int):
        self._stop = threading.Event()
        self._thread = None
        if hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval():
            def beat():
                while not self._stop.wait(HEARTBEAT_S):
                    storage.record_heartbeat(trial_id)

            self._thread = threading.Thread(target=beat, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def worker_main(search_dir: str, index: int) -> int:
    """One worker: ask the study for a trial, run it, tell the result, until the budget is spent."""
    from filelock import FileLock
    from optuna.trial import TrialState

    spec = SearchSpec.read(Path(search_dir))
    alive = FileLock(str(spec.folder / WORKER_LOCK_PATTERN.replace("*", str(index))), timeout=600)
    alive.acquire()  # held for the worker's life (released by the kernel however it ends)
    space = spec.parsed_space()
    storage = make_storage(spec)
    study = open_study(spec, storage, worker=index)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    while not stopping:
        # Count and ask under one lock: two workers of this machine never both take the last trial.
        with FileLock(str(spec.folder / BUDGET_LOCK_FILENAME)):
            if len(study.get_trials(deepcopy=False, states=counted)) >= spec.trials:
                return 0
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": _Heartbeat beats
                warnings.simplefilter("ignore", UserWarning)
                trial = study.ask()
        values = {p.key: p.value_of(p.suggest(trial)) for p in space.parameters}
        first = retry_callback_class().retried_trial_number(study.get_trials(deepcopy=False)[trial.number])
        number = trial.number if first is None else first  # a retried trial resumes its first trial's run
        heartbeat = _Heartbeat(storage, trial._trial_id)
        try:
            state, value = run_trial(spec, trial, number, values, stopping)
        finally:
            heartbeat.stop()
        if state is None:  # stopped by a signal: left RUNNING, failed and retried by the next search command
            return 130
        study.tell(trial, value, state=state)
    return 130


def run_trial(spec: SearchSpec, trial, number: int, values: dict, stopping: list):
    """Run one trial's training, reporting each evaluation; (state, value) for `study.tell`,
    or (None, None) when this worker is being stopped."""
    from optuna.trial import TrialState

    folder = spec.trial_folder(number)
    record = trials.TrialRecord(number=number, params=values, folder=str(folder), engine="optuna",
                                        study_trial=trial.number)
    record.save()
    run = RunProcess.start(spec.config, spec.trial_overrides(values, folder), folder, cwd=spec.cwd)
    logger.info("trial %d: started %s (log: %s)", number, record.setting, folder / "train.log")
    reported = 0
    while run.poll() is None:
        if stopping:
            run.stop()
            return None, None
        rows = run.evaluations()
        for row in rows[reported:]:
            reported += 1
            value = row.get(spec.metric)
            if value is not None:
                trial.report(value, step=reported)
                record.curve.append(value)
            if value is not None and not is_last_evaluation(folder, row) and trial.should_prune():
                run.stop()
                record.finish("pruned", value, run.seconds,
                              f"pruned by the {spec.pruner} pruner after evaluation {reported} "
                              f"({spec.metric} {value:.4f})")
                logger.info("trial %d: %s", number, record.reason)
                return TrialState.PRUNED, None
        time.sleep(0.5)
    code = run.wait()
    record.curve = [row.get(spec.metric) for row in run.evaluations()]
    if code != 0:
        record.finish("failed", None, run.seconds, f"exit {code}: {run.last_log_line()}")
        logger.warning("trial %d: failed (%s)", number, record.reason)
        return TrialState.FAIL, None
    score = final_score(folder)
    record.finish("complete", score, run.seconds, "")
    logger.info("trial %d: %s %.4f (%.0f s)", number, spec.metric, score, run.seconds)
    return TrialState.COMPLETE, score
