"""Watching a search live: the optuna-dashboard command docs/search.md gives, on a free port, for a
journal study and a PostgreSQL one: its JSON API answers with the study and its trials; the server
is stopped by its pid and gone. (`gluetune search --dashboard` is tested with a PostgreSQL study in
test_search_db.py.)"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("optuna")
pytest.importorskip("optuna_dashboard", reason="needs optuna-dashboard (pip install -e '.[search]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextmanager
def dashboard(target: str):
    """`optuna-dashboard <target> --port <free>`, as the docs give it; its address once it answers."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("optuna-dashboard")), target, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                get(f"{address}/api/meta")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.2)
        yield address
    finally:
        server.send_signal(signal.SIGTERM)  # (SIGINT is ignored by a process started in the background)
        server.wait(timeout=30)
        server.stderr.close()
    assert not alive(server.pid)


def study_like_gluetunes(storage) -> None:
    """A study as `gluetune search` leaves it: two finished trials, each with its record."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="gluetune-search", storage=storage, direction="maximize")
    with warnings.catch_warnings():  # (marked experimental)
        warnings.simplefilter("ignore")
        study.set_metric_names(["matthews_correlation"])
    for number, (rate, score) in enumerate(((0.005, 1.0), (0.0, 0.6255))):
        trial = study.ask()
        trial.suggest_categorical("training.learning_rate", [0.005, 0.0])
        trial.set_user_attr("gluetune_trial", {"number": number, "state": "complete", "value": score})
        study.tell(trial, score)


def assert_serves_the_study(address: str) -> None:
    (summary,) = [s for s in get(f"{address}/api/studies")["study_summaries"] if s["study_name"] == "gluetune-search"]
    trials = get(f"{address}/api/studies/{summary['study_id']}")["trials"]
    assert [(t["number"], t["state"], t["values"]) for t in trials] == [(0, "Complete", [1.0]), (1, "Complete", [0.6255])]
    assert trials[0]["user_attrs"][0]["key"] == "gluetune_trial"


def test_the_dashboard_serves_a_journal_study(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "search" / "study.journal"
    journal.parent.mkdir()
    study_like_gluetunes(JournalStorage(JournalFileBackend(str(journal))))
    with dashboard(str(journal)) as address:
        assert_serves_the_study(address)


def test_the_dashboard_serves_a_postgresql_study(postgres):
    url = postgres.create_database("dashboard")
    study_like_gluetunes(url)
    with dashboard(url) as address:
        assert_serves_the_study(address)
