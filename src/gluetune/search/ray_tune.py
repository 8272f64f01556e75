"""`gluetune search --engine ray`: the same trials on a Ray cluster, with Ray Tune.

Optuna's sampler proposes the points (ray.tune.search.optuna.OptunaSearch, seeded, the space's
enqueued points first); ASHA (`--pruner halving`), the median stopping rule (`median`) or nothing
(`none`) stops trials that fall behind. Each trial is a Ray actor holding `--cpus_per_trial` and
`--gpus_per_trial` (Ray gives it its own GPUs through CUDA_VISIBLE_DEVICES) that runs a normal
gluetune run (runner.RunProcess) in `<search_dir>/trials/trial-<n>` and reports each evaluation.

Ray runs each trial in a working directory of its own: every path is made absolute before the
search starts (config, search folder) and the run starts in the command's own working directory,
so relative paths in the config and `--set` mean what they mean to the user. The search folder
must be on a file system every node sees (the trials write there).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

from ..config.run import load_config
from ..errors import UserError
from ..files import atomic_write_json
from . import trials
from .runner import RunProcess, evaluations, final_score, is_last_evaluation
from .study import SearchSpec

logger = logging.getLogger("gluetune")

INSTALL_RAY = "pip install 'gluetune[ray]' (or pip install 'ray[tune]' optuna)"
RAY_FOLDER = "ray"  # Ray Tune's own experiment records, in the search folder
NUMBERS_FILENAME = "ray_trials.json"  # Ray trial id -> trial number
EVALUATION = "evaluation"  # the time axis the schedulers cut on: the n-th evaluation (epoch)
# The command's environment that the trials need wherever they run (the cluster's nodes start
# workers with their own): where gluetune and the data are, the hub settings.
PASSED_ENV = re.compile(r"^(PYTHONPATH|GLUE_DIR|HF_.*|TRANSFORMERS_.*|GLUETUNE_.*)$")


def require_ray():
    try:
        import ray
        from ray import tune  # noqa: F401 (ray without its [tune] extra has no tune dependencies)
    except ImportError:
        raise UserError(f"gluetune search --engine ray needs Ray Tune, which is not installed: {INSTALL_RAY}") from None
    return ray


def passed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if PASSED_ENV.match(k)}


def connect(address: str | None):
    """ray.init against `--address`, else RAY_ADDRESS, else a new local Ray; the cluster's resources."""
    import ray
    from ray.exceptions import AuthenticationError

    address = address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, runtime_env={"env_vars": passed_env()}, log_to_driver=False,
                 logging_level=logging.WARNING)
    except ConnectionError as err:
        raise UserError(f"cannot reach the Ray cluster at {address} ({str(err).splitlines()[0]}); start one with "
                        "`ray start --head`, or give its address with --address / RAY_ADDRESS") from None
    except (AuthenticationError, RuntimeError) as err:
        if "authentication" not in str(err).lower():
            raise
        # Ray 2.59+: a cluster started where ~/.ray/auth_token exists uses token authentication, and a
        # driver given an explicit address does not turn it on by itself.
        raise UserError(f"the Ray cluster at {address} asks for its token ({str(err).splitlines()[0]}); set "
                        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, "
                        "which `ray get-auth-token` prints on the head node") from None
    return ray.cluster_resources()


def check_resources(resources: dict, cpus: float, gpus: float, address: str | None) -> None:
    """Refuse a trial the cluster can never hold: Ray would wait for it forever."""
    where = f"the Ray cluster at {address}" if address else "this Ray cluster"
    for name, wanted in (("CPU", cpus), ("GPU", gpus)):
        have = resources.get(name, 0)
        if wanted > have:
            raise UserError(f"--{name.lower()}s_per_trial {wanted:g}: {where} has {have:g} {name}(s) in all, so no trial "
                            f"could ever start; ask for at most {have:g}, or add nodes with {name}s")


def max_evaluations(spec: SearchSpec) -> int:
    """The most evaluations (epochs) a trial can have: ASHA's last rung."""
    epochs = [max(p.values) for p in spec.parsed_space().parameters if p.key == "training.num_train_epochs"]
    if not epochs:
        epochs = [load_config(spec.config, spec.overrides).training.get("num_train_epochs", 3)]
    return max(1, int(-(-float(epochs[0]) // 1)))


def _scheduler(spec: SearchSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    if spec.pruner == "halving":
        # ASHA stops a trial when it reaches max_t: one past the last evaluation, so that a trial
        # that survives every rung ends by itself, with its final metrics written.
        return ASHAScheduler(time_attr=EVALUATION, max_t=max_evaluations(spec) + 1, grace_period=spec.prune_after,
                             reduction_factor=3)
    if spec.pruner == "median":
        return MedianStoppingRule(time_attr=EVALUATION, grace_period=spec.prune_after,
                                  min_samples_required=spec.startup_trials)
    return FIFOScheduler()


def trial_number(search_dir: Path, trial_id: str) -> int:
    """A Ray trial's folder number: 0, 1, 2, ... in the order trials start, kept across restores
    (Ray's own ids are random under a search algorithm)."""
    import json

    from filelock import FileLock

    path = Path(search_dir) / NUMBERS_FILENAME
    with FileLock(str(path) + ".lock"):
        numbers = json.loads(path.read_text()) if path.is_file() else {}
        if trial_id not in numbers:
            numbers[trial_id] = len(numbers)
            atomic_write_json(path, numbers)
    return numbers[trial_id]


def run_search(spec: SearchSpec, jobs: int | None, address: str | None, cpus: float, gpus: float) -> None:
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    if spec.storage:
        raise UserError("--storage is for the optuna engine; with --engine ray the study lives in the Ray driver")
    spec.folder.mkdir(parents=True, exist_ok=True)
    spec.check_same_search()
    spec.save()
    check_resources(connect(address), cpus, gpus, address)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = spec.parsed_space()
    trainable = tune.with_resources(tune.with_parameters(GluetuneTrial(), spec_dir=spec.search_dir),
                                    {"cpu": cpus, "gpu": gpus})
    path = str(spec.folder / RAY_FOLDER)
    if tune.Tuner.can_restore(path):  # a search stopped before: finished trials kept, the others resumed
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        searcher = OptunaSearch(
            space={p.key: p.distribution() for p in space.parameters}, metric=spec.metric, mode=spec.direction[:3],
            points_to_evaluate=[space.sampled(point) for point in space.enqueue] or None,
            sampler=optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.direction[:3], search_alg=searcher,
                                        scheduler=_scheduler(spec), num_samples=spec.trials, max_concurrent_trials=jobs),
            run_config=tune.RunConfig(name=RAY_FOLDER, storage_path=str(spec.folder), verbose=0),
        )
    tuner.fit()


def GluetuneTrial():
    from ray import tune

    class GluetuneTrial(tune.Trainable):
        """One trial: a gluetune run in its own process; each `step` returns its next evaluation."""

        def setup(self, config: dict, spec_dir: str):
            self.spec = SearchSpec.read(Path(spec_dir))
            parameters = {p.key: p for p in self.spec.parsed_space().parameters}
            values = {k: parameters[k].value_of(v) for k, v in config.items() if k in parameters}
            number = trial_number(self.spec.folder, self.trial_id)
            folder = self.spec.trial_folder(number)
            self.record = trials.TrialRecord(number=number, params=values, folder=str(folder), engine="ray",
                                                     study_trial=None)
            self.record.save()
            # The run starts in the command's working directory, whatever Ray's trial directory is.
            self.run = RunProcess.start(self.spec.config, self.spec.trial_overrides(values, folder), folder,
                                        env={**os.environ, **passed_env()}, cwd=self.spec.cwd)
            self.reported = 0

        def step(self) -> dict:
            metric = self.spec.metric
            while True:
                code = self.run.poll()  # before the records: once it has ended, they are complete
                rows = evaluations(self.run.folder)
                # The last evaluation is reported with the final score, once the run has ended: a
                # scheduler's stop then would save nothing but the final metrics.
                if len(rows) > self.reported and not is_last_evaluation(self.run.folder, rows[self.reported]):
                    self.reported += 1
                    value = rows[self.reported - 1].get(metric)
                    self.record.curve.append(value)
                    return {metric: value, EVALUATION: self.reported}
                if code is not None:
                    if code != 0:
                        self.record.finish("failed", None, self.run.seconds, f"exit {code}: {self.run.last_log_line()}")
                        raise RuntimeError(f"trial {self.record.number} failed: {self.record.reason}")
                    score = final_score(self.run.folder)
                    self.record.curve = [row.get(metric) for row in rows]
                    self.record.finish("complete", score, self.run.seconds, "")
                    return {metric: score, EVALUATION: len(rows), "done": True}
                time.sleep(0.5)

        def save_checkpoint(self, checkpoint_dir: str) -> dict:
            # The run keeps its own checkpoints in its folder; a restored trial resumes from them.
            return {"evaluations": self.reported}

        def load_checkpoint(self, checkpoint: dict) -> None:
            pass

        def cleanup(self):
            # Called when the trial ends, also when the scheduler stops it early: stop the run
            # gracefully (a checkpoint), and say so in its folder.
            if self.run.poll() is None:
                self.run.stop()
                last = self.record.curve[-1] if self.record.curve else None
                self.record.finish("pruned", last, self.run.seconds,
                                   f"stopped early by Ray Tune's {self.spec.pruner} scheduler after evaluation "
                                   f"{self.reported}" + (f" ({self.spec.metric} {last:.4f})" if last is not None else ""))

    return GluetuneTrial
