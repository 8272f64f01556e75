"""Numbers and folders you can trust: the loss of a step, run control kept out of saved configs,
settings checked on resume, the best checkpoint by the chosen metric's direction, the Trainer's own
optimizer, precision fallbacks, reporters, and no process-wide side effects from the library."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    REFERENCE_CONFIG,
    ROOT,
    as_set_args,
    assert_one_line_error,
    copy_run,
    run_main,
    tiny_overrides,
    tiny_training_pieces,
)

from gluetune.config.run import load_config
from gluetune.errors import UserError
from gluetune.training import training_args
from gluetune.training.run import train
from gluetune.training.speed import fastpath

# ---------------------------------------------------------------- a task a tiny random model can learn

WORDS = ["the", "a", "cat", "dog", "sees", "runs", "big", "small", "red", "blue", "house", "tree"]


def write_learnable_task(folder, seed: int = 0) -> list[str]:
    """Sentences ending in "good" (1) or "bad" (0), 15 % of labels flipped: a tiny random Qwen2
    learns it in a few steps, and its validation MCC and loss peak at different epochs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 128), ("dev", 64)):
        lines = ["text,label"]
        for _ in range(n):
            y = rng.randint(0, 1)
            label = y if rng.random() > 0.15 else 1 - y
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + (" good" if y else " bad")
                         + f",{label}")
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return ["model.name_or_path=PLACEHOLDER", "dataset.subset=null", "dataset.num_labels=null",
            "dataset.text_column=[text]", "dataset.label_names=[bad, good]", f"dataset.train_file={folder / 'train.csv'}",
            f"dataset.validation_file={folder / 'dev.csv'}", "training.num_train_epochs=4", "training.learning_rate=3e-3",
            "training.save_total_limit=null", "training.bf16=false"]


def learnable(tiny_qwen, folder, out, *extra: str) -> list[str]:
    overrides = [o.replace("PLACEHOLDER", str(tiny_qwen)) for o in write_learnable_task(folder)]
    return [*overrides, f"training.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def by_metric(tiny_qwen, tmp_path_factory):
    """The same learnable run selected by MCC (higher is better) and by loss (lower is better)."""
    root = tmp_path_factory.mktemp("best")
    runs = {}
    for name, extra in (("mcc", ()), ("loss", ("training.metric_for_best_model=loss", "training.greater_is_better=null"))):
        out = root / name
        runs[name] = (out, train(load_config(REFERENCE_CONFIG, learnable(tiny_qwen, root / "data", out, *extra))).metrics)
    return runs


def test_the_best_checkpoint_follows_the_chosen_metrics_direction(by_metric):
    (_, mcc), (_, loss) = by_metric["mcc"], by_metric["loss"]
    mccs = [row["matthews_correlation"] for row in mcc["history"]]
    losses = [row["loss"] for row in loss["history"]]
    assert len(set(mccs)) > 1 and len(set(losses)) > 1, "a run whose epochs all score alike tests nothing"
    assert mcc["best_epoch"] == mcc["history"][int(np.argmax(mccs))]["epoch"]
    assert loss["best_epoch"] == loss["history"][int(np.argmin(losses))]["epoch"]
    assert mcc["best_epoch"] != loss["best_epoch"]  # here the two metrics disagree, so direction matters
    assert loss["validation"]["loss"] == pytest.approx(min(losses), rel=1e-6)
    assert mcc["validation"]["matthews_correlation"] == pytest.approx(max(mccs), abs=1e-9)


def test_a_greater_is_better_that_contradicts_the_metric_is_refused(capsys):
    from gluetune.cli import main

    code = main(["train", "--config", str(REFERENCE_CONFIG), "--set", "training.metric_for_best_model=loss"])
    err = capsys.readouterr().err
    assert code == 2 and "greater_is_better: true contradicts metric_for_best_model 'loss'" in err


def test_metric_names_with_a_split_prefix_are_accepted():
    mnli = ["dataset.subset=mnli", "model.num_labels=3", "dataset.num_labels=3", "dataset.text_column=null"]
    config = load_config(REFERENCE_CONFIG, [*mnli, "training.metric_for_best_model=validation_mismatched_accuracy"])
    assert config.training["metric_for_best_model"] == "validation_mismatched_accuracy"
    # without a prefix MNLI picks its best model on the matched split
    from gluetune.config.arguments import trainer_kwargs

    plain = load_config(REFERENCE_CONFIG, [*mnli, "training.metric_for_best_model=accuracy"])
    assert trainer_kwargs(plain.training, plain.task)["metric_for_best_model"] == "validation_matched_accuracy"
    with pytest.raises(UserError, match="validation_mismatched_acuracy"):
        load_config(REFERENCE_CONFIG, [*mnli, "training.metric_for_best_model=validation_mismatched_acuracy"])
    # one validation set: its metrics carry no split name
    with pytest.raises(UserError, match="'validation_matthews_correlation' is not a metric of task 'cola'"):
        load_config(REFERENCE_CONFIG, ["training.metric_for_best_model=validation_matthews_correlation"])


# ---------------------------------------------------------------- the loss of a step


def step_gradients(tiny_qwen, tmp_path, micro: int, accumulation: int) -> tuple[dict, float, list]:
    """The last optimizer step's gradients and logged loss through the Trainer's own accumulation loop.
    35 examples: a full step of 32, then a short one of 3 (2 + 1 as 16 x 2): with uneven micro-batches,
    normalising each by its own size would give other gradients than one batch of 3."""
    from gluetune import methods
    from gluetune.results import metrics
    from gluetune.training.trainer import GluetuneTrainer

    config = load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, tmp_path / f"{micro}x{accumulation}", train=35) + [
        "peft.lora_dropout=0", f"training.per_device_train_batch_size={micro}",
        f"training.gradient_accumulation_steps={accumulation}", "training.report_to=none"])
    args, tokenizer, model, train_set = tiny_training_pieces(config)
    trainer = GluetuneTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=train_set,
                              data_collator=fastpath.collator(config, tokenizer, args, False),
                              compute_metrics=metrics.trainer_metrics_fn(config.task),
                              parameter_groups=lambda m: methods.parameter_groups(m, config.peft, args))
    loader = trainer.get_train_dataloader()
    micro_batches = iter(loader)
    for _ in range(len(loader) // accumulation):  # to the last step
        batches, items = trainer.get_batch_samples(micro_batches, accumulation, args.device)
    assert sorted(len(b["input_ids"]) for b in batches) == ([1, 2] if accumulation == 2 else [3])
    model.train()
    logged = sum(float(trainer.training_step(model, batch, items)) for batch in batches)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = sorted(i for batch in batches for i in batch["input_ids"][:, 0].tolist())
    with torch.no_grad():  # the mean per-example loss, by hand
        logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        by_hand = torch.nn.functional.cross_entropy(logits, labels).item()
    assert logged == pytest.approx(by_hand, rel=1e-5)
    return grads, logged, examples


def test_label_smoothing_is_applied_to_the_step_loss(tiny_qwen, tmp_path):
    from gluetune.model import classifier as models
    from gluetune.training.trainer import GluetuneTrainer

    config = load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, tmp_path / "ls") + [
        "training.label_smoothing_factor=0.2", "training.report_to=none", "training.eval_strategy=no",
        "training.save_strategy=no", "training.load_best_model_at_end=false"])
    tokenizer = models.load_tokenizer(config.model)
    model = models.make_trainable(models.load_classifier(config.model, config.task, tokenizer.pad_token_id), config)
    trainer = GluetuneTrainer(model=model, args=training_args.training_arguments(config, quiet=True))
    inputs = dict(tokenizer(["One.", "Two words here."], padding=True, return_tensors="pt"), labels=torch.tensor([0, 1]))
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=torch.tensor(2))
    expected = torch.nn.functional.cross_entropy(logits, inputs["labels"], label_smoothing=0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, inputs["labels"]).item(), rel=1e-3)


def test_accumulation_gives_the_gradients_of_one_big_batch(tiny_qwen, tmp_path):
    """16 x 2 and 32 x 1: the same 3 examples in the short last step, the same gradients (fp32 tolerance),
    and the logged loss is the mean per-example loss, not the mean of the two micro-batches' means."""
    big, big_loss, big_examples = step_gradients(tiny_qwen, tmp_path, 32, 1)
    small, small_loss, small_examples = step_gradients(tiny_qwen, tmp_path, 16, 2)
    assert small_examples == big_examples
    assert small_loss == pytest.approx(big_loss, rel=1e-5)
    for name, grad in big.items():
        torch.testing.assert_close(small[name], grad, rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------- run control and settings


def test_run_control_is_never_saved_and_a_saved_config_does_not_delete_its_run(tiny_qwen, tmp_path, finished_tiny_run):
    out = copy_run(finished_tiny_run, tmp_path / "run")
    overrides = as_set_args(tiny_overrides(tiny_qwen, out, train=32, evals=16))
    assert run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides, "--overwrite").returncode == 0
    saved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert "overwrite_output_dir" not in saved["training"] and "resume_from_checkpoint" not in saved["training"]
    before = (out / "metrics.json").read_text()
    again = run_main("train.py", "--config", str(out / "resolved_config.yaml"))  # what run_record.json suggests
    assert_one_line_error(again, "not empty", "--resume")
    assert (out / "metrics.json").read_text() == before


def test_resume_with_other_settings_is_refused_by_name(tiny_qwen, tmp_path, finished_tiny_run):
    out = copy_run(finished_tiny_run, tmp_path / "run")
    overrides = as_set_args(tiny_overrides(tiny_qwen, out, train=32, evals=16))
    record = (out / "run_record.json").read_text()
    changed = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides, "--resume",
                      "--set", "training.learning_rate=1e-4", "--set", "peft.lora_r=4")
    assert_one_line_error(changed, "other settings", "training.learning_rate", "peft.lora_r", "--overwrite")
    assert (out / "run_record.json").read_text() == record
    moved = run_main("train.py", "--config", str(REFERENCE_CONFIG), *overrides, "--resume",
                    "--set", f"training.logging_dir={tmp_path / 'elsewhere'}")
    assert moved.returncode == 0 and "nothing to do" in moved.stderr  # output paths are not settings


# ---------------------------------------------------------------- machine and library


def test_bf16_falls_back_to_fp16_where_the_gpu_only_emulates_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    settings, notices = training_args.precision_settings({"bf16": True})
    assert settings == {"bf16": False, "fp16": True}
    assert len(notices) == 1 and "Tesla T4" in notices[0] and "fp16" in notices[0]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert training_args.precision_settings({"bf16": True}) == ({}, [])


def test_report_to_is_obeyed():
    assert training_args.reporting(["none"]) == ("none", False)
    assert training_args.reporting(["tensorboard"]) == ("none", True)
    assert training_args.reporting(["tensorboard", "wandb"]) == (["wandb"], True)
    others, tensorboard = training_args.reporting(["all"])
    assert tensorboard and "tensorboard" not in (others if isinstance(others, list) else [])


def test_report_to_none_writes_no_event_files(tiny_qwen, tmp_path):
    out = tmp_path / "quiet"
    train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, train=32, evals=16) + ["training.report_to=none"]))
    assert not (out / "logs").exists() and (out / "metrics.json").is_file()


def test_the_library_changes_no_process_wide_settings(tiny_qwen, tmp_path, monkeypatch):
    from gluetune.training.speed import cpu as speedups

    def forbidden(*args, **kwargs):
        raise AssertionError("train() changed the process's malloc settings")

    monkeypatch.setattr(speedups, "lower_cpu_mmap_threshold", forbidden)
    train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, tmp_path / "lib", train=32, evals=16)))


def test_prediction_imports_without_posix_only_modules():
    code = "import sys; sys.modules['fcntl'] = None; import gluetune.results.prediction, gluetune.training.outputdir; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_loading_a_config_imports_no_training_code():
    code = ("import sys; from gluetune.config import load_config; load_config('configs/glue_cola_qwen.yaml'); "
            "print('gluetune.training' in sys.modules, 'gluetune.training.trainer' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["False", "False"], result.stderr[-2000:]


def test_the_python_api_trains_and_predicts(tiny_qwen, tmp_path):
    import gluetune

    config = gluetune.load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, tmp_path / "api", train=32, evals=16))
    outcome = gluetune.train(config)
    assert outcome.metrics["train"]["steps"] == 1
    predictions = gluetune.Classifier.from_folder(config.output_dir).predict(["The book was written by John."])
    assert predictions[0].label in ("acceptable", "unacceptable") and 0.5 <= predictions[0].probability <= 1


# ---------------------------------------------------------------- sharing on the hub


def test_push_to_hub_uploads_the_finished_folder_once(tiny_qwen, tmp_path, monkeypatch):
    """The hub is replaced by a recorder (no network here): reachability is checked before training,
    and one upload happens after the card, report and metrics are written, checkpoints left out."""
    from pathlib import Path

    from gluetune.results import hub

    calls = []

    class Recorder:
        def whoami(self):
            calls.append(("whoami",))
            return {"name": "me"}

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, repo_id, folder_path, ignore_patterns, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), ignore_patterns))

    monkeypatch.setattr(hub, "_api", Recorder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "shared"
    train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, train=32, evals=16)
                      + ["training.push_to_hub=true", "training.hub_model_id=me/cola-tiny"]))
    assert [c[0] for c in calls] == ["whoami", "create_repo", "upload_folder"]
    _, repo, files, ignored = calls[2]
    assert repo == "me/cola-tiny" and calls[1][1] == "me/cola-tiny"
    assert {"README.md", "report.md", "metrics.json", "adapter_model.safetensors", "resolved_config.yaml"} <= set(files)
    assert "checkpoint-*" in ignored


def test_push_to_hub_offline_fails_before_training(tiny_qwen, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "offline"
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, train=32, evals=16)
                          + ["training.push_to_hub=true"]))
    assert not out.exists()


def test_a_hub_token_in_the_config_is_refused():
    with pytest.raises(UserError, match="hf auth login"):
        load_config(REFERENCE_CONFIG, ["training.push_to_hub=true", "training.hub_token=hf_secret"])
