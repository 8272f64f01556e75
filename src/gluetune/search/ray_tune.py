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

import json
import logging
import os
import re
import signal
from pathlib import Path

from ..config.run import load_config
from ..errors import UserError, one_line
from ..files import atomic_write_json
from . import trials
from .study import RAY_FOLDER, SPEC_FILENAME, SearchSpec
from .trialrun import TrialRun

logger = logging.getLogger("gluetune")

INSTALL_RAY = "pip install 'gluetune[ray]' (or pip install 'ray[tune]' optuna)"
NUMBERS_FILENAME = "ray_trials.json"  # Ray trial id -> trial number
EVALUATION = "evaluation"  # the time axis the schedulers cut on: the n-th evaluation (epoch)
# The command's environment that the trials need wherever they run (the cluster's nodes start
# workers with their own): where gluetune and the data are, the hub settings.
PASSED_ENV = re.compile(r"^(PYTHONPATH|GLUE_DIR|HF_.*|TRANSFORMERS_.*|GLUETUNE_.*)$")
INTERRUPTED_FILENAME = ".interrupted"  # written by the command on Ctrl-C/SIGTERM: its trials stop unpruned
# Ray Tune restores an experiment as it was started (Tuner.restore takes no new TuneConfig).
_RESTORED_AS_STARTED = ("trials", "jobs", "pruner", "startup_trials", "prune_after")
# Connecting to an existing cluster, bounded. Ray 2.60 tries its GCS 20 times, each try up to 40 s where
# nothing answers (about 14 minutes of silence for a cluster that is not there), 1 s apart where the
# cluster refuses the token (20 s). gluetune first opens the address itself (CONNECT_TIMEOUT_S), then
# gives Ray RAY_CONNECT_TRIES tries (its own TRIES_ENV, read by ray._private.node; a value the user set wins).
CONNECT_TIMEOUT_S = 10
RAY_CONNECT_TRIES = 5
TRIES_ENV = "RAY_gcs_server_port_wait_time_s"


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
    ours = False
    if address not in (None, "", "auto", "local"):  # an existing cluster (a local one starts its own, slower)
        _check_reachable(address)
        ours = TRIES_ENV not in os.environ
        os.environ.setdefault(TRIES_ENV, str(RAY_CONNECT_TRIES))
    try:
        ray.init(address=address, runtime_env={"env_vars": passed_env()}, log_to_driver=False,
                 logging_level=logging.WARNING)
    except ConnectionError as err:
        if _refused_token(err):
            # Ray 2.59+: a cluster started where ~/.ray/auth_token exists checks a token, and Ray reports a
            # client without the right one as a cluster it cannot connect to (InvalidAuthToken in the cause).
            raise UserError(f"the Ray cluster at {address} refused this machine's authentication token "
                            f"({one_line(err)}); set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the "
                            "cluster's token, which `ray get-auth-token` prints on the head node (or RAY_AUTH_TOKEN_PATH "
                            "to a file holding it)") from None
        raise UserError(f"cannot reach the Ray cluster at {address} ({one_line(err)}); start one with "
                        "`ray start --head`, or give its address with --address / RAY_ADDRESS") from None
    except (AuthenticationError, RuntimeError) as err:
        if "authentication" not in str(err).lower():
            raise
        # Ray 2.59+: a cluster started where ~/.ray/auth_token exists uses token authentication, and a
        # driver given an explicit address does not turn it on by itself.
        raise UserError(f"the Ray cluster at {address} asks for its token ({one_line(err)}); set "
                        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, "
                        "which `ray get-auth-token` prints on the head node") from None
    finally:
        if ours:
            os.environ.pop(TRIES_ENV, None)
    return ray.cluster_resources()


def _check_reachable(address: str) -> None:
    """Refuse at once, naming the address, a cluster address where nothing accepts a connection."""
    import socket

    host, _, port = address.rpartition("://")[2].rpartition(":")
    if not host or not port.isdigit():
        return  # a form Ray reads itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or f"no answer in {CONNECT_TIMEOUT_S} s"
        raise UserError(f"cannot reach the Ray cluster at {address} (connecting: {reason}); start one with "
                        "`ray start --head`, or give its address with --address / RAY_ADDRESS") from None


def _refused_token(err: BaseException) -> bool:
    """Whether a failed connection was the cluster refusing the token (its cause, Ray's own log line)."""
    seen, texts = err, []
    while seen is not None and len(texts) < 8:
        texts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = " ".join(texts).lower()
    return any(mark in text for mark in ("invalidauthtoken", "authentication token", "unauthenticated"))


def check_restorable(spec: SearchSpec) -> None:
    """Refuse a new --trials, --jobs, --pruner, --startup_trials or --prune_after for a Ray search that has started:
    Ray Tune restores its experiment as it was started, and would ignore them."""
    if not (spec.folder / RAY_FOLDER).is_dir() or not (spec.folder / SPEC_FILENAME).is_file():
        return
    saved = json.loads((spec.folder / SPEC_FILENAME).read_text())
    changed = [key for key in _RESTORED_AS_STARTED if key in saved and saved[key] != getattr(spec, key)]
    if changed:
        def given(key: str, value) -> str:
            return f"no --{key}" if value is None else f"--{key} {value}"

        was = " ".join(given(key, saved[key]) for key in changed)
        now = " ".join(given(key, getattr(spec, key)) for key in changed)
        raise UserError(f"{spec.folder} holds a Ray search started with {was}: Ray Tune restores an experiment as it was "
                        f"started, so {now} would be ignored; continue it with {was}, or start a new search in another "
                        "--search_dir")


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
    """Run the search on the Ray cluster. Ctrl-C or SIGTERM stops it as Ray Tune does (the running
    trials save a checkpoint, the experiment's state is written) and raises KeyboardInterrupt."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    if spec.storage:
        raise UserError("--storage is for the optuna engine; with --engine ray the study lives in the Ray driver")
    spec.folder.mkdir(parents=True, exist_ok=True)
    spec.check_same_search()
    check_restorable(spec)
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
    _fit(tuner, spec.folder / INTERRUPTED_FILENAME)


def _fit(tuner, marker: Path) -> None:
    """tuner.fit(), with Ctrl-C and SIGTERM as an interruption: the marker file tells the trials that
    Ray Tune stops that they were interrupted, not pruned; then KeyboardInterrupt, as the Optuna engine."""
    marker.unlink(missing_ok=True)
    interrupted = []

    def handle(signum, frame):
        ray_listens = signal.getsignal(signal.SIGUSR1) not in (ignore, signal.SIG_DFL, None)
        if interrupted or not ray_listens:  # a second signal, or Ray Tune's loop not started: stop now
            raise KeyboardInterrupt
        interrupted.append(signum)
        marker.touch()
        logger.warning("%s received: stopping the search; each running trial saves a checkpoint (again to stop now)",
                       signal.Signals(signum).name)
        os.kill(os.getpid(), signal.SIGUSR1)  # Ray Tune's own graceful stop (its handler of SIGINT is off, below)

    def ignore(signum, frame):
        pass

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, ignore)  # replaced by Ray Tune's inside fit()
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        tuner.fit()
    finally:
        os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if interrupted:
        logger.warning("search stopped; its running trials saved a checkpoint: run the same command to continue")
        raise KeyboardInterrupt


def GluetuneTrial():
    from ray import tune

    class GluetuneTrial(tune.Trainable):
        """One trial: a gluetune run in its own process (trialrun.TrialRun, as the Optuna engine's);
        each `step` returns its next evaluation, the last one with the final score."""

        def setup(self, config: dict, spec_dir: str):
            self.spec = SearchSpec.read(Path(spec_dir))
            parameters = {p.key: p for p in self.spec.parsed_space().parameters}
            values = {k: parameters[k].value_of(v) for k, v in config.items() if k in parameters}
            number = trial_number(self.spec.folder, self.trial_id)
            folder = self.spec.trial_folder(number)
            record = trials.TrialRecord(number=number, params=values, folder=str(folder), engine="ray", study_trial=None)
            # The run starts in the command's working directory, whatever Ray's trial directory is.
            self.watch = TrialRun.start(record, self.spec.config, self.spec.trial_overrides(values, folder),
                                        self.spec.metric, self.spec.cwd, env={**os.environ, **passed_env()})
            self.pending = self.watch.evaluations()

        def step(self) -> dict:
            found = next(self.pending, None)
            if found is not None:
                return {self.spec.metric: found[1], EVALUATION: found[0]}
            record = self.watch.record
            if self.watch.finish() != "complete":
                raise RuntimeError(f"trial {record.number} failed: {record.reason}")
            return {self.spec.metric: record.value, EVALUATION: len(record.curve), "done": True}

        def save_checkpoint(self, checkpoint_dir: str) -> dict:
            # The run keeps its own checkpoints in its folder; a restored trial resumes from them.
            return {"evaluations": self.watch.offered}

        def load_checkpoint(self, checkpoint: dict) -> None:
            self.watch.resume_count(checkpoint.get("evaluations", 0))  # reported before: not again

        def cleanup(self):
            # Called when the trial ends, also when the scheduler stops it early or the search is
            # interrupted: stop the run gracefully (a checkpoint), and say why in its folder.
            if self.watch.run.poll() is None:
                if (self.spec.folder / INTERRUPTED_FILENAME).exists():
                    self.watch.stop("stopped with its search (interrupted): it resumes from its checkpoint when the "
                                    "command runs again")
                else:
                    self.watch.prune(f"stopped early by Ray Tune's {self.spec.pruner} scheduler after evaluation "
                                     f"{self.watch.offered}")

    return GluetuneTrial
