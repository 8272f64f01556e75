"""`gluetune search`'s rules, each once a defect: a search whose every trial fails ends, one engine per
search folder, a Ray search continues as it was started, a trial is never pruned at its last
evaluation (one rule for both engines), Ctrl-C on a Ray search is an interruption, a Ray cluster
that refuses the token is named as such."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REFERENCE_CONFIG, ROOT, assert_one_line_error, run_cli
from test_search import keyword_task, ray_node, record, search_args, study_states, write_space  # noqa: F401 (fixtures)

pytest.importorskip("optuna")


@pytest.mark.slow  # about 27 s on 2 cores: three trial processes that each fail after their imports
def test_a_search_whose_every_trial_fails_stops_with_the_last_error(tiny_qwen, keyword_task, tmp_path):  # noqa: F811
    search_dir = tmp_path / "search"
    args = search_args(tiny_qwen, keyword_task, write_space(tmp_path / "space.yaml", [0.005, 0.004]), search_dir, 20, 1,
                       "--set", f"model.name_or_path={tmp_path / 'no-such-model'}")
    result = run_cli(*args, timeout=240)  # (it never ended: failed trials do not count toward --trials)
    line = assert_one_line_error(result, "the search stopped: 3 trials in a row failed; the last, trial 2: exit ",
                                 "fix the cause, then run the same command")
    assert "no-such-model" in line and str(search_dir / "trials" / "trial-2" / "train.log") in line
    assert study_states(search_dir) == ["FAIL"] * 3
    assert [record(search_dir, n)["state"] for n in range(3)] == ["failed"] * 3


def _saved_search(search_dir, engine: str | None, **values) -> None:
    """search.json as a search of `engine` left it (None: as gluetune wrote it before it kept the engine)."""
    from gluetune.search.space import read_space

    space = search_dir.parent / "space.yaml"
    saved = {"config": str(REFERENCE_CONFIG), "overrides": [], "space": read_space(space).to_dict(),
             "space_source": str(space), "metric": "matthews_correlation", "direction": "maximize",
             "search_dir": str(search_dir), "trials": 2, "pruner": "median", "startup_trials": 3, "seed": 0,
             "storage": None, "study_name": "gluetune-search", "cwd": str(ROOT), **values}
    if engine is not None:
        saved["engine"] = engine
    search_dir.mkdir(parents=True)
    (search_dir / "search.json").write_text(json.dumps(saved))
    (search_dir / "trials" / "trial-0").mkdir(parents=True)
    (search_dir / "trials" / "trial-0" / "trial.json").write_text("{}")  # a trial Ray's trial 0 would overwrite


def _search(search_dir, *more: str) -> list[str]:
    return ["search", "--config", str(REFERENCE_CONFIG), "--space", str(search_dir.parent / "space.yaml"),
            "--search_dir", str(search_dir), "--trials", "2", *more]


@pytest.mark.parametrize("saved, engine, fragments", [
    (None, "ray", ["holds a search run with --engine optuna; --engine ray would write over its trials",
                   "continue it with --engine optuna"]),
    ("ray", "optuna", ["holds a search run with --engine ray; --engine optuna would write over its trials"]),
])
def test_switching_engines_on_a_search_folder_is_refused(tmp_path, capsys, saved, engine, fragments):
    pytest.importorskip("ray.tune")
    from gluetune.cli import main

    write_space(tmp_path / "space.yaml", [0.005, 0.004])
    search_dir = tmp_path / "search"
    _saved_search(search_dir, saved)
    if saved == "ray":
        (search_dir / "ray").mkdir()
    # (an address where no cluster listens: before the check, the command went on to connect)
    code = main(_search(search_dir, "--engine", engine, *(["--address", "127.0.0.1:1"] if engine == "ray" else [])))
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("gluetune: error:")]
    for fragment in fragments:
        assert fragment in line
    assert (search_dir / "trials" / "trial-0" / "trial.json").read_text() == "{}"


def test_a_resumed_ray_search_refuses_a_new_budget_jobs_or_pruner(tmp_path, capsys):
    pytest.importorskip("ray.tune")
    from gluetune.cli import main

    write_space(tmp_path / "space.yaml", [0.005, 0.004])
    search_dir = tmp_path / "search"
    _saved_search(search_dir, "ray", pruner="halving", jobs=1)
    (search_dir / "ray").mkdir()  # Ray Tune's experiment: the search has started
    code = main(_search(search_dir, "--engine", "ray", "--address", "127.0.0.1:1", "--trials", "3", "--jobs", "2",
                        "--pruner", "halving"))
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("gluetune: error:")]
    assert "holds a Ray search started with --trials 2 --jobs 1: Ray Tune restores an experiment as it was started, " \
           "so --trials 3 --jobs 2 would be ignored; continue it with --trials 2 --jobs 1" in line
    assert json.loads((search_dir / "search.json").read_text())["trials"] == 2  # not recorded as if applied


def test_a_ray_cluster_that_refuses_the_token_is_named_so(monkeypatch):
    ray = pytest.importorskip("ray")
    from gluetune.errors import UserError
    from gluetune.search import ray_tune

    monkeypatch.setattr(ray_tune, "_check_reachable", lambda address: None)  # (no cluster at 10.1.2.3)

    def refuse(*args, **kwargs):  # as Ray 2.60's driver fails against a cluster with token authentication
        try:
            raise RuntimeError("Failed to get the GCS client: Unauthenticated: InvalidAuthToken: Authentication "
                               "token is missing or incorrect")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 10.1.2.3:6379") from cause

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(UserError) as refused:
        ray_tune.connect("10.1.2.3:6379")
    message = str(refused.value)
    assert "the Ray cluster at 10.1.2.3:6379 refused this machine's authentication token" in message
    assert "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in message and "ray get-auth-token" in message
    assert "cannot reach" not in message


@pytest.mark.timeout(120)  # (before the bound: Ray's 20 tries of up to 40 s each, about 14 minutes)
def test_a_ray_address_where_nothing_listens_is_refused_within_seconds():
    """Where no cluster is (a head that died, a wrong port), the search is refused at once, naming the
    address, instead of waiting on Ray's retries."""
    pytest.importorskip("ray")
    from test_search import free_port

    from gluetune.errors import UserError
    from gluetune.search import ray_tune

    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(UserError) as refused:
        ray_tune.connect(address)
    assert time.monotonic() - started < ray_tune.CONNECT_TIMEOUT_S
    assert str(refused.value).startswith(f"cannot reach the Ray cluster at {address} (connecting: Connection refused)")
    assert "ray start --head" in str(refused.value) and "\n" not in str(refused.value)


# ---------------------------------------------------------------- the last evaluation


class _Run:
    """A run that lives until told: what trialrun.TrialRun watches of runner.RunProcess."""

    def __init__(self, folder):
        self.folder, self.code, self.stopped = folder, None, False

    def poll(self):
        return self.code

    def stop(self):
        self.stopped = True
        return 0


def _checkpoint(folder, step: int, scores: list[float], max_steps: int) -> None:
    history = []
    for n, score in enumerate(scores, start=1):
        history += [{"loss": 0.5, "step": 8 * n}, {"eval_matthews_correlation": score, "step": 8 * n, "epoch": float(n)}]
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps,
                                                         "log_history": history}))


def test_the_last_evaluation_is_never_offered_to_a_pruner(tmp_path, monkeypatch):
    """The run's last evaluation is the one at the Trainer's last step (max_steps in its checkpoint),
    whatever the config says of the length (num_train_epochs omitted: 3; training.max_steps)."""
    from gluetune.search import trialrun
    from gluetune.search.trials import TrialRecord

    monkeypatch.setattr(trialrun, "POLL_S", 0.01)
    folder = tmp_path / "trial-0"
    folder.mkdir()
    watch = trialrun.TrialRun(TrialRecord(0, {}, str(folder), "optuna"), _Run(folder), "matthews_correlation")
    polls, limit = [], [10**9]
    pending = watch.evaluations(stopping=lambda: polls.append(1) or len(polls) > limit[0])
    _checkpoint(folder, 8, [0.25], max_steps=16)
    assert next(pending) == (1, 0.25)
    _checkpoint(folder, 16, [0.25, 0.5], max_steps=16)  # the run's last evaluation
    limit[0] = len(polls) + 5
    assert list(pending) == []
    assert watch.offered == 1 and watch.record.curve == [0.25]


def test_a_run_that_wrote_its_last_evaluation_is_offered_none_of_it(tmp_path, monkeypatch):
    """A fast run may write several evaluations between two polls: once its last is written it ends by
    itself, and a pruner's stop would cut its final save short (seen: a tiny trial pruned after its 3rd
    epoch by its 1st, with no metrics.json)."""
    from gluetune.search import trialrun
    from gluetune.search.trials import TrialRecord

    monkeypatch.setattr(trialrun, "POLL_S", 0.01)
    folder = tmp_path / "trial-0"
    folder.mkdir()
    watch = trialrun.TrialRun(TrialRecord(0, {}, str(folder), "optuna"), _Run(folder), "matthews_correlation")
    _checkpoint(folder, 24, [0.25, 0.5, 0.75], max_steps=24)  # all three at once, the last among them
    polls = []
    assert list(watch.evaluations(stopping=lambda: polls.append(1) or len(polls) > 50)) == []
    assert watch.offered == 0 and len(polls) < 50  # it returned at once, for `finish`


@pytest.mark.slow
def test_a_trial_of_max_steps_is_not_pruned_at_its_last_evaluation(tiny_qwen, keyword_task, tmp_path):  # noqa: F811
    """training.max_steps=8: one evaluation, the last; trial 1 (lr 0, MCC 0.63 against 1.0) is worse
    than the median there, and must finish, not be pruned with no metrics.json."""
    search_dir = tmp_path / "search"
    result = run_cli(*search_args(tiny_qwen, keyword_task, write_space(tmp_path / "space.yaml", [0.005, 0.0]), search_dir,
                                  2, 1, "--set", "training.max_steps=8", "--pruner", "median", "--startup_trials", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert study_states(search_dir) == ["COMPLETE", "COMPLETE"]
    assert [record(search_dir, n)["state"] for n in range(2)] == ["complete", "complete"]
    assert (search_dir / "trials" / "trial-1" / "metrics.json").is_file()


@pytest.mark.slow
def test_ctrl_c_on_a_ray_search_says_interrupted_and_exits_non_zero(tiny_qwen, keyword_task, tmp_path,  # noqa: F811
                                                                   ray_node):  # noqa: F811
    address, env = ray_node
    search_dir = tmp_path / "search"
    # 20 epochs of 8 steps: the Ctrl-C after the first must land before the trial ends by itself (alone here
    # Ray's stop reached the run 17 steps after the signal; with 3 epochs a busy machine let it finish first)
    args = search_args(tiny_qwen, keyword_task, write_space(tmp_path / "space.yaml", [0.005, 0.004]), search_dir, 2, 20,
                       "--engine", "ray", "--address", address, "--pruner", "halving", "--jobs", "1")
    search = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    epoch_one = search_dir / "trials" / "trial-0" / "checkpoint-8" / "trainer_state.json"
    deadline = time.time() + 400
    while not epoch_one.exists():
        assert search.poll() is None and time.time() < deadline, search.stderr.read()[-3000:]
        time.sleep(0.2)
    search.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = search.communicate(timeout=300)
    assert search.returncode == 130, (search.returncode, err[-3000:])
    assert "gluetune: interrupted" in err and "best setting" not in out
    stopped = record(search_dir, 0)
    assert stopped["state"] == "running" and "pruned" not in (search_dir / "trials" / "trial-0" / "train.log").read_text()
    assert "stopped with its search (interrupted)" in (search_dir / "trials" / "trial-0" / "train.log").read_text()
    # the same command continues: trial 0 resumes its checkpoint and the search completes
    again = run_cli(*args, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert record(search_dir, 0)["state"] == "complete"
    assert "resuming from" in (search_dir / "trials" / "trial-0" / "train.log").read_text()


@pytest.mark.slow
def test_a_ray_cluster_with_a_token_names_the_token_when_it_refuses_the_search(tmp_path):
    """A head started where ~/.ray/auth_token exists turns token authentication on (Ray 2.60); a search
    from a machine without the token is refused, naming the token and both variables, within a bound:
    ray_tune's own connection check, then Ray's RAY_CONNECT_TRIES tries 1 s apart (Ray alone: 20 s)."""
    pytest.importorskip("ray.tune")
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
    from test_search import start_ray_head, stop_ray_head

    from gluetune.search.ray_tune import CONNECT_TIMEOUT_S, RAY_CONNECT_TRIES

    head_home, home = tmp_path / "head", tmp_path / "client"
    (head_home / ".ray").mkdir(parents=True)
    home.mkdir()
    (head_home / ".ray" / "auth_token").write_text(generate_new_authentication_token())
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    node, address, temp = start_ray_head({**base, "HOME": str(head_home)}, "--num-cpus", "1")
    try:
        write_space(tmp_path / "space.yaml", [0.005])
        started = time.monotonic()
        refused = run_cli("-m", "gluetune", "search", "--config", str(REFERENCE_CONFIG), "--space",
                          str(tmp_path / "space.yaml"), "--search_dir", str(tmp_path / "search"), "--engine", "ray",
                          "--address", address, env={**base, "HOME": str(home)}, timeout=300)
        took = time.monotonic() - started
        assert_one_line_error(refused, f"the Ray cluster at {address} refused this machine's authentication token",
                              "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN")
        # the command's start (torch, ray: up to 30 s on 2 busy cores), the check, Ray's tries
        assert took < 30 + CONNECT_TIMEOUT_S + 2 * RAY_CONNECT_TRIES, took
    finally:
        stop_ray_head(node, temp)
