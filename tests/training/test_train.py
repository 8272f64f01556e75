"""The reference run end to end on a tiny random Qwen2: CLI, outputs, TensorBoard, reload, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import GLUE_DIR, REFERENCE_CONFIG, as_set_args, run_cli, run_main, tiny_overrides

from gluetune.cli import main
from gluetune.config.run import load_config
from gluetune.config.tasks import get_task
from gluetune.data.loading import read_glue_split
from gluetune.results.prediction import Classifier
from gluetune.training.run import train
from gluetune.training.training_args import cpu_bf16


def scalar_tags(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in log_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


@pytest.fixture(scope="module")
def cli_run(tiny_qwen, tmp_path_factory):
    """The reference config through the real `train.py`, shrunk by --set only."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("train.py", "--config", str(REFERENCE_CONFIG),
                     *as_set_args(tiny_overrides(tiny_qwen, out, train=96, evals=48, epochs=2, fp32=False)))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_cli_run_writes_the_promised_outputs(cli_run):
    out, result = cli_run
    assert "trainable params: 3,648 ||" in result.stderr  # 2 layers x LoRA q,k,v,o + score, computed
    bf16 = cpu_bf16()  # the reference config asks for bf16: the CPU trains in it where it computes it natively
    line = (f"bf16 on this CPU ({bf16}): training under CPU autocast to bf16" if bf16 else
            "bf16 is not native on this CPU (no AVX512-BF16 or AMX); training in fp32")
    assert line in result.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json",
                 "resolved_config.yaml", "metrics.json"):
        assert (out / name).is_file(), name
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert "score" in adapter["modules_to_save"] and adapter["r"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("matthews_correlation", "accuracy", "f1", "precision", "recall"):
        assert -1 <= metrics["validation"][key] <= 1
    assert metrics["train"]["runtime_s"] > 0 and metrics["train"]["steps"] == 6  # 96 / 32 x 2 epochs
    assert metrics["best_checkpoint"].startswith("checkpoint-")
    assert metrics["precision"] == ("bf16" if bf16 else "fp32") and metrics["trainable_parameters"] == 3648
    assert json.loads((out / "run_record.json").read_text())["precision"] == metrics["precision"]
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["training"]["bf16"] is True and resolved["dataset"]["max_train_samples"] == 96


def test_the_run_records_how_this_cpu_computes_bf16(finished_tiny_run):
    """bf16 kernels differ by CPU (AVX512-BF16 alone, or AMX): the same run's figures differ a little
    between them, so the folder says which this one had, beside the precision."""
    metrics = json.loads((finished_tiny_run / "metrics.json").read_text())
    record = json.loads((finished_tiny_run / "run_record.json").read_text())
    assert "cpu_bf16" in metrics and metrics["cpu_bf16"] == record["cpu_bf16"] == cpu_bf16()
    if metrics["precision"] == "bf16" and metrics["device"] == "cpu":
        assert f"| precision | bf16 (CPU autocast, {cpu_bf16()}) |" in (finished_tiny_run / "README.md").read_text()


def test_cli_run_logs_to_tensorboard(cli_run):
    out, _ = cli_run
    tags = scalar_tags(out / "logs")
    assert {"train/loss", "eval/matthews_correlation", "eval/accuracy", "train/learning_rate"} <= tags
    # the final metrics in the run's own event file, under their own tag
    assert {"final/matthews_correlation", "final/accuracy"} <= tags and not any("final_" in t for t in tags)
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1
    assert not (out / "runs").exists()


def test_cli_run_prints_plain_lines_when_not_a_terminal(cli_run):
    _, result = cli_run
    assert "[gluetune] step 1/6 | epoch 0.33 | loss" in result.stderr and "\r" not in result.stderr


def test_cli_run_prints_aligned_epochs_and_names_the_best_epoch(cli_run):
    out, result = cli_run
    epochs = [line for line in result.stderr.splitlines() if "validation | loss" in line]
    assert len(epochs) == 2 and all(" | matthews_correlation " in line for line in epochs)
    assert epochs[0].index("| matthews_correlation") == epochs[1].index("| matthews_correlation")
    metrics = json.loads((out / "metrics.json").read_text())
    closing = f"best epoch {metrics['best_epoch']:g} ({metrics['best_checkpoint']}): validation matthews_correlation"
    assert closing in result.stderr
    assert "{'loss'" not in result.stderr and "'eval_loss'" not in result.stderr  # no raw dicts


def test_best_checkpoint_is_the_one_saved(cli_run):
    """Against every evaluation of the whole run (the last checkpoint's history), not only those the
    kept checkpoint saw: an earlier, worse pick would not pass."""
    out, _ = cli_run
    metrics = json.loads((out / "metrics.json").read_text())
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    evals = {e["step"]: e["eval_matthews_correlation"] for e in history if "eval_matthews_correlation" in e}
    assert len(evals) == 2  # one per epoch
    best_step = max(evals, key=evals.get)
    assert metrics["best_checkpoint"] == f"checkpoint-{best_step}"
    assert metrics["best_metric"] == max(evals.values())
    assert metrics["validation"]["matthews_correlation"] == pytest.approx(max(evals.values()), abs=1e-9)


def test_evaluate_reproduces_the_saved_metrics(cli_run, capsys):
    out, _ = cli_run
    assert main(["evaluate", "--model_path", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["validation"]
    mcc = f"{metrics['matthews_correlation']:.4f}"
    assert printed.splitlines()[1].split() == ["cola", "matthews_correlation", mcc, mcc, str(out)]
    # the logits themselves, not only a score a degenerate model would also reproduce
    from gluetune.results.evaluation import evaluate_folder
    from gluetune.results.prediction import Classifier

    _config, results = evaluate_folder(out)
    assert results["validation"]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    saved = [json.loads(line) for line in (out / "validation_predictions.jsonl").read_text().splitlines()]
    dev = read_glue_split(GLUE_DIR, get_task("cola"), "validation").select(range(48))
    recomputed = Classifier.from_folder(out).logits([(s,) for s in dev["sentence"]])
    np.testing.assert_allclose(recomputed, [r["logits"] for r in sorted(saved, key=lambda r: r["idx"])], atol=1e-5)


def test_inference_script_prints_label_and_probability(cli_run):
    out, _ = cli_run
    result = run_main("inference.py", "--config", str(REFERENCE_CONFIG), "--model_path", str(out),
                     "--input_text", "The book was written by John.")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(("label=acceptable probability=", "label=unacceptable probability=")), line
    assert 0.5 <= float(line.split("probability=")[1]) <= 1


def test_predict_files_in_batches(cli_run, tmp_path, capsys):
    out, _ = cli_run
    (tmp_path / "in.txt").write_text("The book was written by John.\nThe book was written John.\nShe gave he a present.\n")
    assert main(["predict", "--model_path", str(out), "--input_file", str(tmp_path / "in.txt"),
                 "--output_file", str(tmp_path / "out.tsv"), "--batch_size", "2"]) == 0
    lines = (tmp_path / "out.tsv").read_text().splitlines()
    assert lines[0] == "index\tsentence\tlabel\tprobability" and len(lines) == 4
    assert lines[2].split("\t")[1] == "The book was written John."
    (tmp_path / "in.jsonl").write_text('{"sentence": "One."}\n{"sentence": "Two two."}\n')
    assert main(["predict", "--model_path", str(out), "--input_file", str(tmp_path / "in.jsonl"),
                 "--output_file", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["sentence"] for r in rows] == ["One.", "Two two."]
    assert all(r["label"] in ("acceptable", "unacceptable") and 0.5 <= r["probability"] <= 1 for r in rows)


def test_reloaded_folder_predicts_what_training_ended_with(tiny_qwen, tmp_path):
    config = load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, tmp_path / "run", train=64, evals=32, epochs=2))
    outcome = train(config)
    texts = [(s,) for s in read_glue_split(GLUE_DIR, get_task("cola"), "validation")["sentence"][:40]]
    in_memory = Classifier(outcome.model.eval(), outcome.tokenizer, config).logits(texts)
    reloaded = Classifier.from_folder(tmp_path / "run").logits(texts)
    np.testing.assert_allclose(reloaded, in_memory, rtol=1e-5, atol=1e-6)
    assert not np.allclose(reloaded[:, 0], reloaded[:, 1])


def test_a_folder_read_back_builds_no_kv_cache(finished_tiny_run, tmp_path):
    """A classifier never generates: the Trainer turns the decoder's KV cache off for training and its
    evaluations (config.use_cache = args.use_cache), and so must everything that reads a folder back
    (predict, evaluate, the export), without changing a prediction."""
    from gluetune.results.export import export_folder

    classifier = Classifier.from_folder(finished_tiny_run)
    decoder = classifier.model.get_base_model().base_model  # Qwen2Model, under the head
    caches = []
    decoder.register_forward_hook(lambda module, args, output: caches.append(output.cache))
    texts = [(s,) for s in read_glue_split(GLUE_DIR, get_task("cola"), "validation")["sentence"][:8]]
    without = classifier.logits(texts)
    assert caches and all(cache is None for cache in caches)
    decoder.config.use_cache = True
    np.testing.assert_array_equal(classifier.logits(texts), without)  # the cache changed nothing but the work
    assert caches[-1] is not None

    export = export_folder(finished_tiny_run, tmp_path / "export")
    assert json.loads((export / "config.json").read_text())["use_cache"] is False


def test_gradient_checkpointing_recomputes_each_block_and_trains_with_lora(tiny_qwen, tmp_path):
    """training.gradient_checkpointing: every decoder block that runs forward in a training step runs
    its insides again in the backward pass (its MLP is called twice per block call; once without
    checkpointing), and the LoRA weights still get gradients (lora_B starts at zero and moves only
    if they do) and train as without checkpointing."""
    import torch
    from safetensors.torch import load_file

    weights, calls = {}, {}
    for name, extra in (("gc", ["training.gradient_checkpointing=true"]), ("plain", [])):
        seen = calls[name] = {"Qwen2DecoderLayer": 0, "Qwen2MLP": 0}

        def count(module, args, seen=seen):  # (before the call: a recomputation stops once it has what backward needs)
            kind = type(module).__name__
            if kind in seen and module.training and torch.is_grad_enabled():  # training steps, not evaluations
                seen[kind] += 1

        hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
        try:
            overrides = tiny_overrides(tiny_qwen, tmp_path / name, train=32, evals=16) + ["peft.lora_dropout=0", *extra]
            train(load_config(REFERENCE_CONFIG, overrides))
        finally:
            hook.remove()
        weights[name] = load_file(tmp_path / name / "adapter_model.safetensors")
    # 32 examples, 16 x 2: one optimizer step of two micro-batches through 2 blocks
    assert calls["plain"] == {"Qwen2DecoderLayer": 4, "Qwen2MLP": 4}
    assert calls["gc"] == {"Qwen2DecoderLayer": 4, "Qwen2MLP": 8}
    lora_b = [k for k in weights["gc"] if "lora_B" in k]
    assert lora_b and all(weights["gc"][k].abs().max() > 0 for k in lora_b)
    for key, value in weights["plain"].items():
        np.testing.assert_allclose(weights["gc"][key].numpy(), value.numpy(), rtol=1e-4, atol=1e-6)


def test_training_is_deterministic_on_cpu(tiny_qwen, tmp_path):
    runs = [
        train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, tmp_path / f"r{i}", train=48, evals=32))).metrics
        for i in range(2)
    ]
    assert runs[0]["validation"] == runs[1]["validation"]
    assert runs[0]["train"]["loss"] == runs[1]["train"]["loss"]


def test_one_process_seeing_several_gpus_reports_the_batch_it_trains_with(tiny_qwen, tmp_path, monkeypatch, caplog):
    """Without a launcher, the Trainer runs two visible GPUs as DataParallel (n_gpu decides it, patched
    here): each micro-batch holds 16 x 2 examples, so the 64 examples are one step of 64, and the
    figure printed and saved says so. (DataParallel without CUDA passes the batch through.)"""
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    out = tmp_path / "dp"
    with caplog.at_level("INFO", logger="gluetune"):
        summary = train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, train=64, evals=16))).metrics
    assert summary["train"]["steps"] == 1 and summary["train"]["effective_batch_size"] == 64
    assert "effective batch 64 = 16 per device x 2 accumulation x 1 process(es) x 2 GPUs (DataParallel)" in caplog.text
    assert "| batch | 16 per device x 2 accumulation x 1 process(es) x 2 GPUs = 64 |" in (out / "README.md").read_text()


def test_a_resumed_run_keeps_the_precision_it_started_in(tiny_qwen, tmp_path, monkeypatch, caplog):
    """The reference config asks for bf16. Started where bf16 is not native (fp32), stopped by SIGTERM after
    its first checkpoint (step 2; the stop saves step 3), resumed where it is (a CPU with AVX512-BF16, patched here): it ends in fp32, as
    it started, and says so; the record keeps the precision it started in."""
    import os
    import signal

    from transformers import TrainerCallback

    from gluetune.errors import RunInterrupted
    from gluetune.training import training_args

    class StopAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:  # the stop saves once more: one signal only
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_qwen, out, train=64, evals=16, epochs=2, fp32=False)
    monkeypatch.setattr(training_args, "native_bf16", lambda: False)
    with pytest.raises(RunInterrupted):
        train(load_config(REFERENCE_CONFIG, overrides), callbacks=[StopAfterFirstSave()])
    assert json.loads((out / "run_record.json").read_text())["precision"] == "fp32"
    monkeypatch.setattr(training_args, "native_bf16", lambda: True)
    config = load_config(REFERENCE_CONFIG, overrides)
    config.control.resume = "auto"
    with caplog.at_level("INFO", logger="gluetune"):
        metrics = train(config).metrics
    assert "resuming in fp32, the precision this run started in" in caplog.text
    assert metrics["precision"] == "fp32" and metrics["train"]["resumed_from"] == "checkpoint-3"
    assert json.loads((out / "run_record.json").read_text())["precision"] == "fp32"
