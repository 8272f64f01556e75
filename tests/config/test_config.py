"""Config: the reference values, validation before any model loads, overrides, the resolved file."""

from __future__ import annotations

import pytest
import yaml
from conftest import REFERENCE_CONFIG, assert_one_line_error, run_cli

from gluetune.cli import main
from gluetune.config.run import (
    CONFIG_FILENAME,
    apply_overrides,
    build_config,
    load_config,
    load_saved_config,
    save_config,
)
from gluetune.errors import UserError


def write_config(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def reference_with(tmp_path, edit) -> str:
    raw = yaml.safe_load(REFERENCE_CONFIG.read_text())
    edit(raw)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def error_of(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must fail with exit 2 and exactly one error line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("gluetune: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_reference_config_is_the_spec_run():
    config = load_config(REFERENCE_CONFIG)
    assert config.model.name_or_path == "Qwen/Qwen2.5-1.5B"
    assert config.model.num_labels == 2
    assert (config.dataset.name, config.dataset.subset) == ("nyu-mll/glue", "cola")
    assert config.dataset.text_column == ["sentence"]
    assert config.task.label_names == ("unacceptable", "acceptable")
    peft = config.peft
    assert (peft.method, peft.lora_r, peft.lora_alpha, peft.lora_dropout) == ("lora", 8, 16, 0.1)
    assert peft.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    t = config.training
    assert t["num_train_epochs"] == 10
    assert t["per_device_train_batch_size"] == 16
    assert t["gradient_accumulation_steps"] == 2
    assert t["learning_rate"] == pytest.approx(3e-4) and isinstance(t["learning_rate"], float)
    assert t["optim"] == "adamw_torch" and t["bf16"] is True
    assert t["metric_for_best_model"] == "matthews_correlation" and t["greater_is_better"] is True
    assert t["output_dir"] == "./outputs/glue_cola_qwen"
    assert t["logging_dir"] == "./outputs/glue_cola_qwen/logs"


def test_unknown_training_key_names_the_closest(capsys, tmp_path):
    path = reference_with(tmp_path, lambda r: r["training"].update(learning_rat=1e-4))
    line = error_of(capsys, "train", "--config", path)
    assert "training.learning_rat" in line and "did you mean 'learning_rate'" in line


def test_unknown_key_error_through_a_real_process(tmp_path):
    path = reference_with(tmp_path, lambda r: r["peft"].update(lora_rr=4))
    result = run_cli("train.py", "--config", path)
    assert_one_line_error(result, "peft.lora_rr", "did you mean 'lora_r'")


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda r: r.update(trainig={}), ["unknown section 'trainig'", "did you mean 'training'"]),
        (lambda r: r["model"].update(name_or_pth="x"), ["model.name_or_pth", "did you mean 'name_or_path'"]),
        (lambda r: r["training"].update(num_train_epochs="ten"), ["training.num_train_epochs", "'ten'", "a number"]),
        (lambda r: r["training"].update(optim="adamw_torchh"), ["training.optim", "did you mean 'adamw_torch'"]),
        (lambda r: r["training"].update(bf16="yes please"), ["training.bf16", "true/false"]),
        (lambda r: r["peft"].update(lora_r=2.5), ["peft.lora_r", "an integer"]),
        (lambda r: r["peft"].update(method="lorra"), ["peft.method", "did you mean 'lora'"]),
        (lambda r: r["dataset"].update(subset="colaa"), ["dataset.subset", "did you mean 'cola'"]),
        (lambda r: r["dataset"].update(num_labels=3), ["dataset.num_labels", "3", "2 label"]),
        (lambda r: r["training"].update(metric_for_best_model="mcc"), ["metric_for_best_model", "'mcc'"]),
        (lambda r: r["training"].update(eval_strategy="epoch", save_strategy="steps"), ["training:"]),
        (lambda r: r["model"].pop("name_or_path"), ["model.name_or_path is missing"]),
    ],
)
def test_bad_values_get_one_line_errors(capsys, tmp_path, edit, fragments):
    path = reference_with(tmp_path, edit)
    line = error_of(capsys, "train", "--config", path)
    for fragment in fragments:
        assert fragment in line, line


def test_malformed_yaml_names_line_and_column(capsys, tmp_path):
    path = write_config(tmp_path, "model:\n  name_or_path: x\ntraining:\n  learning_rate: [1e-4\n")
    line = error_of(capsys, "train", "--config", str(path))
    assert str(path) in line and "line 5" in line and "column" in line


def test_duplicate_key_is_an_error(capsys, tmp_path):
    path = write_config(tmp_path, "model:\n  name_or_path: x\n  name_or_path: y\n")
    assert "appears twice" in error_of(capsys, "train", "--config", str(path))


def test_empty_and_missing_config_files(capsys, tmp_path):
    assert "config file not found" in error_of(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    empty = write_config(tmp_path, "")
    assert "empty" in error_of(capsys, "train", "--config", str(empty))


def test_yaml_reads_as_users_mean_it():
    config = load_config(REFERENCE_CONFIG, ["training.save_strategy=no", "training.eval_strategy=no",
                                            "training.load_best_model_at_end=false"])
    assert config.training["save_strategy"] == "no"


def test_scientific_floats_are_floats():
    config = load_config(REFERENCE_CONFIG, ["training.learning_rate=2e-4", "training.weight_decay=1E-2"])
    assert config.training["learning_rate"] == 2e-4 and config.training["weight_decay"] == 0.01


def test_overrides_are_yaml_parsed_and_repeatable():
    config = load_config(
        REFERENCE_CONFIG,
        [
            "peft.lora_r=16",
            "training.learning_rate=2e-4",
            "peft.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
            "training.gradient_checkpointing=true",
            "training.per_device_train_batch_size=8",
            "training.gradient_accumulation_steps=4",
            "training.warmup_ratio=0.2",
            "training.optim=paged_adamw_8bit",
            "training.num_train_epochs=15",
        ],
    )
    assert config.peft.lora_r == 16
    assert config.peft.target_modules[-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert config.training["gradient_checkpointing"] is True
    assert config.training["per_device_train_batch_size"] == 8
    assert config.training["warmup_steps"] == 0.2 and "warmup_ratio" not in config.training
    assert config.training["optim"] == "paged_adamw_8bit"
    assert config.training["num_train_epochs"] == 15


def test_bad_override_syntax(capsys):
    line = error_of(capsys, "train", "--config", str(REFERENCE_CONFIG), "--set", "training.learning_rate")
    assert "section.key=value" in line
    line = error_of(capsys, "train", "--config", str(REFERENCE_CONFIG), "--set", "training.learning_rat=1")
    assert "did you mean 'learning_rate'" in line


def test_a_renamed_key_is_read_under_its_new_name():
    config = load_config(REFERENCE_CONFIG, ["training.cpu_heap_limit=false"])  # the earlier name of cpu_mmap_threshold
    assert config.training["cpu_mmap_threshold"] is False and "cpu_heap_limit" not in config.training
    with pytest.raises(UserError, match="earlier name of training.cpu_mmap_threshold"):
        load_config(REFERENCE_CONFIG, ["training.cpu_heap_limit=false", "training.cpu_mmap_threshold=true"])


def test_output_dir_override_moves_the_logs_too():
    config = load_config(REFERENCE_CONFIG, ["training.output_dir=/tmp/elsewhere"])
    assert config.training["logging_dir"] == "/tmp/elsewhere/logs"


def test_resolved_config_round_trips(tmp_path):
    config = load_config(REFERENCE_CONFIG, ["peft.lora_r=4", "training.warmup_ratio=0.1"])
    save_config(config, tmp_path)
    assert (tmp_path / CONFIG_FILENAME).is_file()
    again = load_saved_config(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert again.training["warmup_steps"] == 0.1


def test_glue_dir_environment_is_recorded(monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "/data/glue")
    assert load_config(REFERENCE_CONFIG).dataset.data_dir == "/data/glue"


def test_custom_dataset_needs_columns_and_labels():
    raw = {"model": {"name_or_path": "x"}, "dataset": {"train_file": "t.csv"}}
    with pytest.raises(UserError, match="text_column"):
        build_config(raw)
    raw["dataset"]["text_column"] = ["text"]
    with pytest.raises(UserError, match="label_names"):
        build_config(raw)
    raw["dataset"]["label_names"] = ["neg", "pos"]
    config = build_config(raw)
    assert config.task.label_names == ("neg", "pos") and config.task.primary_metric == "matthews_correlation"


def test_apply_overrides_creates_nested_sections():
    raw = apply_overrides({}, ["training.lr_scheduler_kwargs.power=2"])
    assert raw == {"training": {"lr_scheduler_kwargs": {"power": 2}}}


def test_length_group_batches_must_be_positive(capsys):
    line = error_of(capsys, "train", "--config", str(REFERENCE_CONFIG), "--set", "training.length_group_batches=0")
    assert "training.length_group_batches: 0" in line and "positive integer" in line


@pytest.mark.parametrize("path", sorted((REFERENCE_CONFIG.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_validation(path):
    config = load_config(path)
    assert config.output_dir.name == path.stem
