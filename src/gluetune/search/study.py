"""`gluetune search`: a search over a space of `--set` values, on Optuna (embedded) or Ray Tune.

Each trial is a normal `gluetune train` run in `<search_dir>/trials/trial-<n>` (trialrun.TrialRun),
reporting its primary validation metric after every evaluation, read from the run's own records.
A trial that falls behind is stopped by the run's own graceful stop (a checkpoint, then exit) and
its folder's `trial.json` says it was pruned.

Optuna: the study lives in `<search_dir>/study.journal` (a journal file: Optuna advises against
SQLite for parallel workers) or in `--storage` (a database URL, for workers on several machines:
storage.py). `--jobs` worker processes run here, one per GPU where there are GPUs (each sees only
its own). Re-running the command continues the study: trials of dead workers are failed and
retried (their runs resume from their last checkpoint), finished ones are kept. Each trial's record
is kept in the study too (a user attribute), so that every machine's table and report show every
machine's trials.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..config.run import load_config, setting_differences
from ..errors import UserError
from ..files import atomic_write_json
from . import storage as databases
from . import trials
from .dashboard import command_line
from .runner import raise_interrupt, shared_cores_env, start_tied
from .space import Space, as_overrides

logger = logging.getLogger("gluetune")

SPEC_FILENAME = "search.json"
JOURNAL_FILENAME = "study.journal"
LOCK_FILENAME = ".search.lock"
WORKER_LOCK_PATTERN = ".worker-*.lock"  # held by each worker while it lives
BUDGET_LOCK_FILENAME = ".budget.lock"
TRIALS_DIR = "trials"
RAY_FOLDER = "ray"  # Ray Tune's own experiment records, in the search folder of a Ray search
DEFAULT_STUDY_NAME = "gluetune-search"
INSTALL_OPTUNA = "pip install 'gluetune[search]' (or pip install optuna)"
# What decides a trial's result, and where its trials are numbered; the rest (budget, jobs, pruner)
# may change between re-runs of an Optuna search.
_SAME_SEARCH_KEYS = ("config", "overrides", "space", "metric", "direction", "seed", "storage", "study_name")
RECORD_ATTR = "gluetune_trial"  # a trial's record (trials.TrialRecord), for every machine and the dashboard
SEARCH_ATTR = "gluetune_search"  # what decides the study's results: the config's settings, space, metric
WORKERS_ATTR = "gluetune_workers"  # workers started on a database study so far: each samples with its own seed
FAILURES_IN_A_ROW = 3  # a worker whose trials failed this many times in a row stops the search
EXIT_FAILING = 3  # a worker's exit status when it stopped for that


@dataclass
class SearchSpec:
    """Everything a worker needs, saved as `<search_dir>/search.json` (paths absolute; the storage
    URL without its password, which reaches the workers through their environment)."""

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
    study_name: str = DEFAULT_STUDY_NAME
    cwd: str = field(default_factory=os.getcwd)
    engine: str = "optuna"
    jobs: int | None = None

    @property
    def folder(self) -> Path:
        return Path(self.search_dir)

    def parsed_space(self) -> Space:
        return Space.from_dict(self.space_source, self.space)

    @classmethod
    def read(cls, search_dir: Path, storage: str | None = None) -> SearchSpec:
        """The saved spec; its storage URL with the password of `storage` or of the workers'
        environment (storage.URL_ENV) when that names the same database."""
        data = _saved(Path(search_dir))
        spec = cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        given = storage or os.environ.get(databases.URL_ENV)
        if spec.storage and given and databases.without_password(databases.with_driver(given)) == spec.storage:
            spec.storage = databases.with_driver(given)
        return spec

    def saved(self) -> dict:
        data = asdict(self)
        if self.storage:
            data["storage"] = databases.without_password(self.storage)
        return data

    def save(self) -> None:
        atomic_write_json(self.folder / SPEC_FILENAME, self.saved())

    def check_same_search(self) -> None:
        if not (self.folder / SPEC_FILENAME).is_file():
            return
        saved, mine = _saved(self.folder), self.saved()
        if saved["engine"] != self.engine:
            raise UserError(f"{self.folder} holds a search run with --engine {saved['engine']}; --engine {self.engine} "
                            f"would write over its trials: continue it with --engine {saved['engine']}, or use "
                            "another --search_dir")
        for key in _SAME_SEARCH_KEYS:
            if saved.get(key) != mine[key]:
                shown = [databases.masked(v) if key == "storage" and v else v for v in (saved.get(key), mine[key])]
                raise UserError(f"{self.folder} holds a search with another {key} ({shown[0]!r}, now {shown[1]!r}); use "
                                "another --search_dir, or the same settings to continue it")

    def trial_folder(self, number: int) -> Path:
        return self.folder / TRIALS_DIR / f"trial-{number}"

    def trial_overrides(self, values: dict, folder: Path) -> list[str]:
        return [*self.overrides, *as_overrides(values), f"training.output_dir={folder}"]

    def trial_config(self, record: trials.TrialRecord) -> dict:
        """A trial's full config, as its run saved it (for a trial another machine ran)."""
        return load_config(self.config, self.trial_overrides(record.params, Path(record.folder))).to_dict()

    def target(self) -> str:
        """The study's database URL (its password masked) or journal file."""
        return databases.masked(self.storage) if self.storage else str(self.folder / JOURNAL_FILENAME)

    def where(self) -> str:
        """The study, as messages name it (never with a password)."""
        return f"--storage {self.target()}" if self.storage else self.target()


def _saved(folder: Path) -> dict:
    data = json.loads((folder / SPEC_FILENAME).read_text())
    # Searches saved before the engine was recorded: a Ray search has Ray Tune's experiment folder.
    data.setdefault("engine", "ray" if (folder / RAY_FOLDER).is_dir() else "optuna")
    return data


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(f"gluetune search needs optuna, which is not installed: {INSTALL_OPTUNA}") from None
    # RetryHeartbeatStaleTrialCallback and friends are marked experimental; the marks are not the user's to act on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ---------------------------------------------------------------- the study


def make_storage(spec: SearchSpec):
    """The study's storage: the database of --storage (with heartbeats), else the search folder's journal."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec.storage:
        return databases.open_rdb(spec.storage)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(spec.folder / JOURNAL_FILENAME)))


def make_sampler(spec: SearchSpec, seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)


def make_pruner(spec: SearchSpec):
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.prune_after)
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.prune_after, reduction_factor=3)
    return optuna.pruners.NopPruner()


def prepare_study(spec: SearchSpec, store, settings: dict, jobs: int):
    """Once per command, before its workers start (on PostgreSQL under a lock every machine's
    command takes, so commands started at the same moment do it one after the other): the study
    created or checked to be this search's, dead workers' trials failed and enqueued again, the
    space's points enqueued once. Returns the study, how many trials were retried, and the seed of
    this command's first worker (seed + the workers started on a database study before)."""
    import optuna

    def prepare():
        study = optuna.create_study(study_name=spec.study_name, storage=store, direction=spec.direction,
                                    load_if_exists=True)
        check_study(spec, study, settings)
        retried = retry_dead_trials(study, storage_is_local=spec.storage is None)
        enqueue_points(study, spec.parsed_space())
        first = 0
        if spec.storage:  # other machines' workers: other seeds, else they would propose the same points
            first = study.user_attrs.get(WORKERS_ATTR, 0)
            study.set_user_attr(WORKERS_ATTR, first + jobs)
        return study, retried, spec.seed + first

    if spec.storage:
        return databases.once(spec.storage, f"study {spec.study_name}", prepare)
    return prepare()


def check_study(spec: SearchSpec, study, settings: dict) -> None:
    """Refuse a study that is another search's (a name two searches share on one server): another
    direction, metric, config or space; a new study is marked as this search's."""
    name, where = spec.study_name, spec.where()
    direction = study.direction.name.lower()
    if direction != spec.direction:
        raise UserError(f"{where}: the study '{name}' there is to {direction} its objective, but this search would "
                        f"{spec.direction} {spec.metric}; give this search its own --study_name")
    metrics = study.metric_names
    if metrics and list(metrics) != [spec.metric]:
        raise UserError(f"{where}: the study '{name}' there scores trials by {', '.join(metrics)}, this search by "
                        f"{spec.metric}; give this search its own --study_name")
    mine = json.loads(json.dumps({"config": spec.config, "overrides": spec.overrides, "space_source": spec.space_source,
                                  "space": spec.space, "metric": spec.metric, "settings": settings}))
    saved = study.user_attrs.get(SEARCH_ATTR)
    if saved is None:
        if not metrics:
            study.set_metric_names([spec.metric])
        study.set_user_attr(SEARCH_ATTR, mine)
        return
    differences = setting_differences(saved.get("settings", {}), mine["settings"])
    if saved.get("space") != mine["space"]:
        differences.insert(0, "the space")
    if differences:
        def search(s: dict) -> str:
            sets = "".join(f" --set {o}" for o in s.get("overrides", []))
            return f"--config {s.get('config')}{sets} --space {s.get('space_source')}"

        shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
        raise UserError(f"{where}: the study '{name}' there belongs to another search ({search(saved)}), not to this "
                        f"one ({search(mine)}): they differ in {shown}; give this search its own --study_name, or "
                        "run that search's config and space to join it")


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
    retry, dead = databases.retry_callback_class()(max_retry=None), study.get_trials(states=(TrialState.RUNNING,))
    for trial in dead:
        study.tell(trial.number, state=TrialState.FAIL)
        retry(study, study.get_trials(deepcopy=False)[trial.number])  # the same params and folder, WAITING
    return len(dead)


def enqueue_points(study, space: Space) -> None:
    """The space's enqueued points, each once: done here, by one process, before any worker starts
    (Optuna's GridSampler can hand one point to two concurrent workers; a queue pops each once)."""
    for point in space.enqueue:
        study.enqueue_trial(space.sampled(point), skip_if_exists=True)


def study_records(study) -> list[trials.TrialRecord]:
    """Every trial's record kept in the study (the latest attempt of each trial number); a trial
    whose worker died (failed by a heartbeat check, not yet retried) shows as failed."""
    from optuna.trial import TrialState

    latest: dict[int, tuple[int, trials.TrialRecord]] = {}
    for trial in study.get_trials(deepcopy=False):
        data = trial.user_attrs.get(RECORD_ATTR)
        if not data:
            continue
        record = trials.TrialRecord(**data)
        if record.state == "running" and trial.state != TrialState.RUNNING:
            record.state, record.reason = "failed", "its worker stopped during the trial (no heartbeat)"
        if record.number not in latest or trial.number > latest[record.number][0]:
            latest[record.number] = (trial.number, record)
    return [record for _, (_, record) in sorted(latest.items())]


def search_records(spec: SearchSpec) -> list[trials.TrialRecord]:
    """The search's trials: a database study's from the study (every machine's), else the folder's."""
    if not spec.storage:
        return trials.read_trials(spec.folder)
    import optuna

    try:
        study = optuna.load_study(study_name=spec.study_name, storage=make_storage(spec))
    except KeyError:
        raise UserError(f"{spec.where()}: no study '{spec.study_name}' there") from None
    return study_records(study)


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


def run_search(spec: SearchSpec, jobs: int | None, settings: dict, on_study=None) -> None:
    """Run the study's workers on this machine until the budget is spent and no trial runs anywhere.
    `settings`: the config's resolved settings (what makes the study this search's); `on_study(store)`
    is called once the study exists, before the workers start (the dashboard)."""
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
        gpus = visible_gpus()
        jobs = jobs or max(1, len(gpus))
        if gpus and jobs > len(gpus):
            raise UserError(f"--jobs {jobs}: this machine shows {len(gpus)} GPU(s); one worker per GPU at most")
        spec.jobs = jobs
        spec.save()
        if spec.storage is None:  # (a database's other workers may be alive on other machines: heartbeats judge)
            _wait_for_old_workers(spec.folder)
        store = make_storage(spec)
        study, retried, first_seed = prepare_study(spec, store, settings, jobs)
        target = spec.target()
        logger.info("study '%s' in %s (watch it live: %s)", spec.study_name, target, command_line(target))
        if retried:
            logger.info("%d trial(s) of a stopped search will run again, from their last checkpoint", retried)
        if on_study is not None:
            on_study(store)
        _run_workers(spec, jobs, gpus, first_seed, study)
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


def _run_workers(spec: SearchSpec, jobs: int, gpus: list[str], first_seed: int, study) -> None:
    workers = []
    for index in range(jobs):
        env = shared_cores_env(jobs)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index]  # each worker, and so each of its trials, sees one GPU
        if spec.storage:
            env[databases.URL_ENV] = spec.storage  # the password, if any, never on a command line
        workers.append(start_tied([sys.executable, "-m", "gluetune.search.worker", spec.search_dir, str(index),
                                   str(first_seed + index)], env=env))
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        while None in (codes := [w.poll() for w in workers]) and EXIT_FAILING not in codes:
            time.sleep(0.5)
        if EXIT_FAILING in codes:  # the others stop too (a checkpoint each): the next command retries their trials
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
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
    if EXIT_FAILING in codes:
        raise UserError(_failing(study))
    if any(codes):
        raise UserError(f"a search worker failed (exit codes {codes}); run the same command to continue the study")


def _failing(study) -> str:
    """Why a worker stopped the search: its trials kept failing; the last failure of the study."""
    from optuna.trial import TrialState

    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if t.user_attrs.get(RECORD_ATTR, {}).get("state") == "failed"]
    last = max(failed, key=lambda t: t.datetime_complete).user_attrs[RECORD_ATTR] if failed else None
    which = (f"the last, trial {last['number']}: {last['reason']} (log: {Path(last['folder']) / 'train.log'})"
             if last else "")
    return (f"the search stopped: {FAILURES_IN_A_ROW} trials in a row failed; {which}; fix the cause, then run the "
            "same command to continue the study")


# ---------------------------------------------------------------- results


def summarize(spec: SearchSpec) -> list[dict]:
    """The trial table, importances, best config and report of the search folder (a database
    study's table holds every machine's trials)."""
    from .report import write_report

    rows = trials.write_results(spec.folder, spec.metric, spec.direction == "maximize", spec.parsed_space(),
                                search_records(spec), spec.trial_config)
    if rows:
        write_report(spec.folder)
    return rows


def confirm(spec: SearchSpec, seeds: list[int], top: int, jobs: int) -> list[dict]:
    """The `top` best trials again over `seeds` (a sweep in `<search_dir>/confirm`), each against
    its own score: the best trial of a search on one seed is partly luck."""
    from .sweep import Setting, run_sweep

    best = trials.best_trials(search_records(spec), spec.direction == "maximize", top)
    if not best:
        raise UserError("--confirm_seeds: the search has no complete trial to confirm")
    settings = [Setting(as_overrides(t.params)) for t in best]
    rows = {r["setting"]: r for r in run_sweep(spec.config, spec.overrides, settings, seeds,
                                                spec.folder / trials.CONFIRM_DIR, jobs)}
    entries = [trials.confirmation(t, rows[s.name]) for t, s in zip(best, settings) if s.name in rows]
    atomic_write_json(spec.folder / trials.CONFIRMATION_FILENAME, entries)
    summarize(spec)  # the report shows the confirmation
    return entries
