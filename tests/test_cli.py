"""The command line as a new user meets it: fast errors, honest options, help that names the script,
the peft section passed through, the tokenization cache."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import GLUE_DIR, REFERENCE_CONFIG, ROOT, as_set_args, run_cli, tiny_overrides

from gluetune.config.run import load_config
from gluetune.errors import UserError
from gluetune.model import classifier as models


def test_a_missing_config_is_reported_before_torch_loads():
    code = ("import sys; from gluetune.cli import main; code = main(['train', '--config', 'nope.yaml']); "
            "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr[-2000:]
    assert "config file not found: nope.yaml" in result.stderr


def test_entry_scripts_name_themselves_in_their_help():
    for script, words in (("inference.py", ["--model_path", "--batch_size", "texts per forward pass"]),
                          ("train.py", ["--config", "--resume"])):
        result = run_cli(script, "--help")
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}"), result.stdout[:300]
        assert all(word in result.stdout for word in words)


def test_predict_honours_set_and_refuses_what_does_not_apply(finished_tiny_run, capsys):
    from gluetune.cli import main

    assert main(["predict", "--model_path", str(finished_tiny_run), "--input_text", "A fine sentence.",
                 "--set", "dataset.max_length=2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("label=") and "truncated" in captured.err  # the override reached prediction
    assert main(["predict", "--model_path", str(finished_tiny_run), "--input_text", "x", "--set", "bogus.key=1"]) == 2
    assert "unknown section 'bogus'" in capsys.readouterr().err
    sst2 = ["--config", str(ROOT / "configs" / "glue_sst2_qwen.yaml")]
    assert main(["predict", "--model_path", str(finished_tiny_run), "--input_text", "x", *sst2]) == 2
    assert "is for task 'sst2'" in capsys.readouterr().err
    # the usage document's command: the run's own config beside its folder
    assert main(["predict", "--model_path", str(finished_tiny_run), "--input_text", "x", "--config", str(REFERENCE_CONFIG)]) == 0


def test_search_options_say_what_they_accept(capsys):
    """--startup_trials takes 0 (no random start) and says so when refused; --jobs' default is told
    for both engines (Ray's is as many trials as the cluster holds, not 1)."""
    from gluetune.cli import main

    search = ["search", "--config", str(REFERENCE_CONFIG), "--space", "no-space.yaml", "--search_dir", "unused"]
    assert main([*search, "--startup_trials", "-1"]) == 2
    assert "--startup_trials -1: expected a non-negative integer" in capsys.readouterr().err
    assert main([*search, "--jobs", "0"]) == 2
    assert "--jobs 0: expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "optuna: one per GPU, else 1" in shown and "ray: as many as the cluster holds" in shown


def test_the_peft_section_passes_lora_config_through(tiny_qwen):
    config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tiny_qwen}", "peft.rank_pattern={q_proj: 16}",
                                            "peft.layers_to_transform=[0]", "peft.init_lora_weights=gaussian"])
    assert config.to_dict()["peft"]["rank_pattern"] == {"q_proj": 16} and config.peft.lora_r == 8
    model = models.make_trainable(models.load_classifier(config.model, config.task, 0), config)
    ranks = {name: module.r["default"] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert ranks and all(".layers.0." in name for name in ranks)  # layer 1 untouched
    assert {name.rsplit(".", 1)[-1]: r for name, r in ranks.items()} == {"q_proj": 16, "k_proj": 8, "v_proj": 8, "o_proj": 8}
    with pytest.raises(UserError, match=r"peft.rank_patern.*did you mean 'rank_pattern'"):
        load_config(REFERENCE_CONFIG, ["peft.rank_patern={q_proj: 16}"])
    with pytest.raises(UserError, match=r"peft.layers_to_transform: 'first'"):
        load_config(REFERENCE_CONFIG, ["peft.layers_to_transform=first"])
    with pytest.raises(UserError, match=r"peft.r and peft.lora_r name the same setting"):
        load_config(REFERENCE_CONFIG, ["peft.r=4"])


def test_relative_data_paths_are_saved_absolute(tiny_qwen, tmp_path, monkeypatch):
    monkeypatch.chdir(GLUE_DIR.parent)
    config = load_config(REFERENCE_CONFIG, ["dataset.data_dir=glue", f"model.name_or_path={tiny_qwen}"])
    assert config.dataset.data_dir == str(GLUE_DIR)


def test_cache_command_shows_and_clears_the_tokenization_cache(tmp_path, capsys, monkeypatch):
    from gluetune.cli import main

    monkeypatch.setenv("GLUETUNE_CACHE_DIR", str(tmp_path))
    (tmp_path / "tokenized" / "abc").mkdir(parents=True)
    (tmp_path / "tokenized" / "abc" / "data.arrow").write_bytes(b"x" * 2048)
    assert main(["cache"]) == 0
    assert "1 cached split(s)" in capsys.readouterr().out
    assert main(["cache", "--clear"]) == 0
    assert "cleared 1 cached split(s)" in capsys.readouterr().out
    assert not any((tmp_path / "tokenized").iterdir())


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_a_terminal_gets_progress_bars_and_a_log_file_gets_lines(tiny_qwen, tmp_path):
    """stderr on a terminal (a pty here): a tqdm bar for training instead of a line per step (the
    lines a log file gets instead: test_train's test_cli_run_prints_plain_lines_when_not_a_terminal)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    overrides = as_set_args(tiny_overrides(tiny_qwen, tmp_path / "tty", train=64, evals=16)
                            + ["training.logging_steps=1"])
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    process = subprocess.Popen([sys.executable, "train.py", "--config", str(REFERENCE_CONFIG), *overrides], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 0
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert "train:" in terminal and "step/s" in terminal and "epoch 1.00/1" in terminal, terminal[-2000:]
    assert "[gluetune] step 1/2" not in terminal  # the bar replaces the per-step lines

