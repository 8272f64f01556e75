"""`gluetune search`: the space file, Optuna workers sharing a study, pruning, a SIGKILL and re-run,
a real Ray node, the results (table, best config, report) and the missing-engine errors.

The trials train the tiny Qwen2 on a keyword task it learns in one epoch (MCC 1.0 at lr 5e-3),
while at lr 0 it stays where its random head puts it (MCC 0.63): a hopeless trial, deterministically.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REFERENCE_CONFIG, ROOT, as_set_args, assert_one_line_error, run_cli, run_main

pytest.importorskip("optuna")

WORDS = ["cat", "dog", "house", "tree", "river", "car", "book", "sun"]


def keyword_rows(rng: random.Random, count: int) -> str:
    """Sentences whose last word (the decoder's pooled token) gives the label."""
    rows = ["text,label"]
    for i in range(count):
        rows.append(" ".join(rng.choice(WORDS) for _ in range(5)) + (" good,pos" if i % 2 else " bad,neg"))
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyword")
    rng = random.Random(0)
    (folder / "train.csv").write_text(keyword_rows(rng, 64))
    (folder / "dev.csv").write_text(keyword_rows(rng, 32))
    return folder


def base_overrides(tiny_qwen, task, epochs: int) -> list[str]:
    return [f"model.name_or_path={tiny_qwen}", "dataset.subset=null", "dataset.text_column=[text]",
            "dataset.label_names=[neg, pos]", f"dataset.train_file={task / 'train.csv'}",
            f"dataset.validation_file={task / 'dev.csv'}", f"training.num_train_epochs={epochs}",
            "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=1",
            "training.logging_steps=1", "training.report_to=none", "training.bf16=false"]


def write_space(path, rates: list[float]):
    points = "".join(f"  - {{training.learning_rate: {r}}}\n" for r in rates)
    path.write_text(f"training.learning_rate: {{choice: {rates}}}\nenqueue:\n{points}")
    return path


def search_args(tiny_qwen, task, space, search_dir, trials: int, epochs: int = 1, *more: str) -> list[str]:
    return ["-m", "gluetune", "search", "--config", str(REFERENCE_CONFIG),
            *as_set_args(base_overrides(tiny_qwen, task, epochs)), "--space", str(space), "--trials", str(trials),
            "--search_dir", str(search_dir), *more]


def study_states(search_dir) -> list[str]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(search_dir / "study.journal")))
    study = optuna.load_study(study_name="gluetune-search", storage=storage)
    return [t.state.name for t in study.get_trials()]


def record(search_dir, number: int) -> dict:
    return json.loads((search_dir / "trials" / f"trial-{number}" / "trial.json").read_text())


def starts(search_dir, number: int) -> int:
    """How many times the trial's run was started (resumes included)."""
    run_record = json.loads((search_dir / "trials" / f"trial-{number}" / "run_record.json").read_text())
    return 1 + len(run_record["resumed_with"])


# ---------------------------------------------------------------- the space file


@pytest.mark.parametrize("text, fragments", [
    ("training.learning_rate: {logunifrom: [1.0e-5, 1.0e-3]}", ["unknown kind 'logunifrom'", "did you mean 'loguniform'"]),
    ("training.learning_rate: {loguniform: [0, 1.0e-3]}", ["loguniform: the low end must be above 0"]),
    ("peft.lora_r: {int: [16, 8]}", ["peft.lora_r: int: expected [low, high] with low < high"]),
    ("training.learnig_rate: {uniform: [1.0e-5, 1.0e-3]}", ["training.learnig_rate=1.0e-05", "learning_rate"]),
    ("peft.lora_r: {choice: [8, -1]}", ["peft.lora_r=-1"]),
    ("peft.lora_r: {choice: [8, 16]}\nenqueue: [{peft.lora_r: 32}]", ["enqueue[0]: peft.lora_r=32 is outside the space"]),
    ("lora_r: {choice: [8, 16]}", ["lora_r: expected a section.key name"]),
])
def test_bad_space_files_get_one_line(tmp_path, text, fragments):
    space = tmp_path / "space.yaml"
    space.write_text(text + "\n")
    result = run_main("-m", "gluetune", "search", "--config", str(ROOT / "configs" / "glue_cola_minilm_cpu.yaml"),
                     "--space", str(space), "--search_dir", str(tmp_path / "search"))
    assert_one_line_error(result, str(space), *fragments)
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize("blocked, engine, install", [
    ("optuna", "optuna", "pip install 'gluetune[search]'"),
    ("ray", "ray", "pip install 'gluetune[ray]'"),
])
def test_missing_engine_is_one_line_naming_the_install(tmp_path, blocked, engine, install):
    space = write_space(tmp_path / "space.yaml", [1e-3])
    code = (f"import sys; sys.modules[{blocked!r}] = None\nfrom gluetune.cli import main\n"
            f"sys.exit(main(['search', '--config', {str(REFERENCE_CONFIG)!r}, '--space', {str(space)!r}, "
            f"'--search_dir', {str(tmp_path / 'search')!r}, '--engine', {engine!r}]))")
    assert_one_line_error(run_cli("-c", code), install)


# ---------------------------------------------------------------- Optuna


def test_two_workers_run_every_enqueued_trial_exactly_once(tiny_qwen, keyword_task, tmp_path):
    rates = [0.005, 0.004, 0.003, 0.002]
    search_dir = tmp_path / "search"
    result = run_main(*search_args(tiny_qwen, keyword_task, write_space(tmp_path / "space.yaml", rates), search_dir,
                                   len(rates), 1, "--jobs", "2", "--pruner", "none"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert study_states(search_dir) == ["COMPLETE"] * 4
    assert sorted(record(search_dir, n)["params"]["training.learning_rate"] for n in range(4)) == sorted(rates)
    assert [starts(search_dir, n) for n in range(4)] == [1, 1, 1, 1]
    assert sorted(p.name for p in (search_dir / "trials").iterdir()) == [f"trial-{n}" for n in range(4)]
    # the results: the table as printed, the best setting as a config that trains as is
    assert "| trial | state | matthews_correlation |" in result.stdout
    best = search_dir / "best_config.yaml"
    from gluetune.config.run import load_config

    config = load_config(best)
    assert config.output_dir == (search_dir / "best").resolve()
    assert (search_dir / "search_history.png").is_file() and (search_dir / "search_curves.png").is_file()


@pytest.mark.slow  # about 36 s on 2 cores: three searches' worth of trials
def test_a_hopeless_trial_is_pruned_and_its_folder_says_so(tiny_qwen, keyword_task, tmp_path):
    search_dir = tmp_path / "search"
    space = write_space(tmp_path / "space.yaml", [0.005, 0.004, 0.0])
    # 6 epochs of 8 steps: a tiny run's epoch takes a fraction of a second, and the pruner's stop (a poll,
    # then a signal) must land before the run has finished by itself
    result = run_main(*search_args(tiny_qwen, keyword_task, space, search_dir, 3, 6, "--pruner", "median",
                                   "--startup_trials", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert study_states(search_dir) == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = record(search_dir, 2)
    assert pruned["state"] == "pruned" and len(pruned["curve"]) == 1
    assert "pruned by the median pruner after evaluation 1" in pruned["reason"]
    folder = search_dir / "trials" / "trial-2"
    log = (folder / "train.log").read_text()
    assert "stopped by signal 15" in log and "search: trial 2 pruned by the median pruner" in log
    assert not (folder / "metrics.json").exists()  # stopped before its 6 epochs, with a checkpoint to resume
    steps = sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))
    assert steps and steps[-1] < 48
    assert "| 2 | pruned | 0.6255 | 1 |" in (search_dir / "trials.md").read_text()

    # The finished study again, with a confirmation of the best trial over another seed
    confirmed = run_main(*search_args(tiny_qwen, keyword_task, space, search_dir, 3, 6, "--pruner", "median",
                                      "--startup_trials", "2", "--confirm_seeds", "7"))
    assert confirmed.returncode == 0, confirmed.stderr[-3000:]
    assert study_states(search_dir) == ["COMPLETE", "COMPLETE", "PRUNED"]  # no trial added
    entry = json.loads((search_dir / "confirmation.json").read_text())[0]
    (run,) = (search_dir / "confirm").glob("*/seed-7/metrics.json")  # a sweep of the best setting
    again = json.loads(run.read_text())["validation"]["matthews_correlation"]
    assert entry["median"] == again and entry["difference"] == pytest.approx(again - entry["searched"])
    assert f"confirmed: trial {entry['trial']}" in confirmed.stdout and "difference" in confirmed.stdout
    assert "## Confirmed over seeds" in (search_dir / "report.md").read_text()

    # The best setting as a config file that `gluetune train` runs as is: the best trial again, to the digit
    best = run_main("-m", "gluetune", "train", "--config", str(search_dir / "best_config.yaml"))
    assert best.returncode == 0, best.stderr[-3000:]
    trained = json.loads((search_dir / "best" / "metrics.json").read_text())["validation"]["matthews_correlation"]
    assert trained == record(search_dir, entry["trial"])["value"]


@pytest.mark.slow  # about 100 s on 2 cores
def test_a_search_killed_by_sigkill_continues_with_no_trial_lost_or_repeated(tiny_qwen, keyword_task, tmp_path):
    search_dir = tmp_path / "search"
    args = search_args(tiny_qwen, keyword_task, write_space(tmp_path / "space.yaml", [0.005, 0.004, 0.003]),
                       search_dir, 3, 3, "--pruner", "none")
    search = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    epoch_one = search_dir / "trials" / "trial-1" / "checkpoint-8" / "trainer_state.json"
    while not epoch_one.exists():
        assert search.poll() is None, search.stderr.read()[-3000:]
        time.sleep(0.1)
    search.kill()  # SIGKILL: no handler runs in the search command
    search.wait()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 trial(s) of a stopped search will run again" in again.stderr
    # trial 1 was failed with its worker and retried once; every point finished once
    assert sorted(study_states(search_dir)) == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    assert sorted(p.name for p in (search_dir / "trials").iterdir()) == ["trial-0", "trial-1", "trial-2"]
    assert [record(search_dir, n)["state"] for n in range(3)] == ["complete"] * 3
    # trial 0 finished before the kill and was kept; trial 1 resumed its checkpoint; trial 2 ran once
    assert [starts(search_dir, n) for n in range(3)] == [1, 2, 1]
    assert "resuming from" in (search_dir / "trials" / "trial-1" / "train.log").read_text()


# ---------------------------------------------------------------- Ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray_head(env: dict, *options: str) -> tuple[subprocess.Popen, str, str]:
    """`ray start --head --block` on free ports, in its own process group: (the process, its address, its
    temp folder), once it says it started; a head that exits first fails the test with what it printed.

    Its temp folder is a short one of its own: Ray's Unix sockets live there, and a socket's path must
    stay under 108 characters (under pytest's temp folder an xdist worker's made the plasma store's 115:
    the head exited at once, and the search it was for then waited on an address where nothing listened).
    Every port is chosen, none left to Ray's fixed defaults, so two heads of one session never meet."""
    import tempfile
    import threading

    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    node = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
         "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard", "false", "--disable-usage-stats",
         "--temp-dir", temp, *options],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    printed = []
    for line in node.stdout:
        printed.append(line)
        if "Ray runtime started" in line:
            # the rest of what it prints, read so that it never blocks on a full pipe
            threading.Thread(target=lambda: [printed.append(rest) for rest in node.stdout], daemon=True).start()
            return node, f"127.0.0.1:{port}", temp
    node.wait()
    stop_ray_head(node, temp)
    raise AssertionError(f"ray start --head exited ({node.returncode}) before it started:\n{''.join(printed)[-3000:]}")


def stop_ray_head(node: subprocess.Popen, temp: str) -> None:
    """By its process group (never `ray stop`, which would end every Ray process of this user): SIGTERM,
    waited for until the whole group has ended (Ray's processes end after the head), SIGKILL after 20 s."""
    import shutil

    def group_runs() -> bool:
        node.poll()  # (reaps the head: a zombie still counts as a member)
        try:
            os.killpg(node.pid, 0)
            return True
        except ProcessLookupError:
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_runs():
            break
        os.killpg(node.pid, sig)
        deadline = time.monotonic() + 20
        while group_runs() and time.monotonic() < deadline:
            time.sleep(0.1)
    node.wait()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_node():
    """A one-node Ray cluster of 2 CPUs on free ports. Token authentication off: on a local cluster
    Ray 2.59+ turns it on, and the test's search would need the token."""
    pytest.importorskip("ray.tune")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT / "src")}
    node, address, temp = start_ray_head(env, "--num-cpus", "2", "--num-gpus", "0")
    try:
        yield address, env
    finally:
        stop_ray_head(node, temp)


@pytest.mark.slow
def test_ray_search_stops_a_hopeless_trial_early_and_finishes(tiny_qwen, keyword_task, tmp_path, ray_node):
    address, env = ray_node
    search_dir = tmp_path / "search"
    space = write_space(tmp_path / "space.yaml", [0.005, 0.0])
    # 9 epochs of 8 steps (ASHA's rungs at evaluations 1, 3 and 9): the scheduler's stop (a poll, Ray's
    # round trip, then a signal) must land before the run has finished by itself; with 3 epochs a busy
    # CI machine let the hopeless trial finish first (CI, 2026-12-07)
    args = search_args(tiny_qwen, keyword_task, space, search_dir, 2, 9, "--engine", "ray", "--address", address,
                       "--pruner", "halving", "--jobs", "1")
    # An impossible GPU request is refused against the cluster's resources, not waited for.
    refused = run_cli(*args, "--gpus_per_trial", "1", env=env, timeout=300)
    assert_one_line_error(refused, "--gpus_per_trial 1", "has 0 GPU(s)")
    result = run_cli(*args, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [record(search_dir, n)["state"] for n in range(2)] == ["complete", "pruned"]
    assert len(record(search_dir, 1)["curve"]) == 1
    assert "stopped early by Ray Tune's halving scheduler after evaluation 1" in (
        search_dir / "trials" / "trial-1" / "train.log").read_text()
    assert (search_dir / "best_config.yaml").is_file() and "| 0 **(best)** | complete | 1.0000 | 9 |" in result.stdout


def test_bad_confirm_seeds_are_named_as_such(tmp_path, capsys):
    from gluetune.cli import main

    space = write_space(tmp_path / "space.yaml", [1e-3])
    code = main(["search", "--config", str(REFERENCE_CONFIG), "--space", str(space), "--search_dir",
                 str(tmp_path / "search"), "--confirm_seeds", "1,x"])
    assert code == 2
    assert "gluetune: error: --confirm_seeds '1,x': expected integers separated by commas" in capsys.readouterr().err
    assert not (tmp_path / "search").exists()
