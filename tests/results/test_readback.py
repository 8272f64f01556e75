"""A folder is read back as its run evaluated itself: in the precision and under the autocast the run's
own evaluations ran in (model.precision), by predict, evaluate and the export alike. On the CPU with
bf16 autocast forced on (a CPU without AVX512-BF16 or AMX would train in fp32), for LoRA (the CPU
default: MiniLM, mean pooling, a bf16 base), for full fine-tuning (fp32 weights under autocast) and for
QLoRA (a 4-bit base, its other weights in fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CPU_CONFIG, GLUE_DIR, ROOT, run_main, tiny_overrides

from gluetune.config.run import load_config
from gluetune.model.precision import cpu_bf16
from gluetune.results.evaluation import evaluate_folder
from gluetune.results.export import export_folder
from gluetune.results.prediction import Classifier

FULL_CONFIG = ROOT / "configs" / "glue_cola_minilm_cpu_full.yaml"


@pytest.fixture(scope="module")
def bf16_forced():
    """bf16 autocast on for training and reading, whatever this CPU has (as the fast path's bf16 test)."""
    from gluetune.model import precision
    from gluetune.training import training_args

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training_args, "native_bf16", lambda: True)
        patch.setattr(precision, "native_bf16", lambda: True)
        yield


def trained(config, tmp_path_factory, name: str) -> tuple[Path, Path, Path]:
    """The run, its default (fp32) export and its --dtype bf16 export."""
    from gluetune.training.run import train

    train(config)
    exports = tmp_path_factory.mktemp("exports")  # distinct names: transformers caches custom code by folder name
    return (config.output_dir, export_folder(config.output_dir, exports / f"{name}-fp32"),
            export_folder(config.output_dir, exports / f"{name}-bf16", dtype="bf16"))


@pytest.fixture(scope="module")
def lora_run(bf16_forced, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return trained(load_config(CPU_CONFIG, [f"dataset.data_dir={GLUE_DIR}", "dataset.max_train_samples=64",
                                            "dataset.max_eval_samples=64", "training.num_train_epochs=2",
                                            "training.learning_rate=2e-3", f"training.output_dir={out}",
                                            "training.report_to=none"]), tmp_path_factory, "lora")


@pytest.fixture(scope="module")
def full_run(bf16_forced, tiny_qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    overrides = tiny_overrides(tiny_qwen, out, train=64, evals=64, epochs=2, fp32=False)
    return trained(load_config(FULL_CONFIG, [*overrides, "training.bf16=true", "training.learning_rate=1e-3",
                                             "training.report_to=none"]), tmp_path_factory, "full")


RUNS = ["lora_run", "full_run"]


def validation_of(run: Path) -> tuple[list[tuple[str]], np.ndarray, dict]:
    """The run's validation sentences and the logits its own final evaluation gave them (in order)."""
    from gluetune.config.tasks import get_task
    from gluetune.data.loading import read_glue_split

    rows = [json.loads(line) for line in (run / "validation_predictions.jsonl").read_text().splitlines()]
    sentences = read_glue_split(GLUE_DIR, get_task("cola"), "validation")["sentence"]
    metrics = json.loads((run / "metrics.json").read_text())
    return [(sentences[r["idx"]],) for r in rows], np.array([r["logits"] for r in rows]), metrics


@pytest.mark.parametrize("name", RUNS)
def test_evaluate_gives_the_runs_own_evaluation(name, request):
    run, _, _ = request.getfixturevalue(name)
    texts, logits, metrics = validation_of(run)
    assert metrics["precision"] == "bf16"
    _, results = evaluate_folder(run)
    for key, value in metrics["validation"].items():
        if key in results["validation"] and key != "loss":
            assert results["validation"][key] == pytest.approx(value, abs=1e-6), key
    again = Classifier.from_folder(run).logits(texts)
    assert (again.argmax(axis=1) == logits.argmax(axis=1)).all()  # every example, the same label
    np.testing.assert_allclose(again, logits, atol=1e-5)  # the same arithmetic (the run's logits: 6 decimals)
    shown = run_main("-m", "gluetune", "evaluate", "--model_path", str(run))
    assert shown.returncode == 0 and f"{metrics['validation']['matthews_correlation']:.4f}" in shown.stdout


@pytest.mark.parametrize("name", RUNS)
def test_the_export_predicts_what_predict_does(name, request):
    """Full fine-tuning: the default export (its fp32 weights) runs under the run's autocast (its
    modeling_gluetune.py, config.json's gluetune_autocast): the same arithmetic as predict, probabilities
    to 1e-4. LoRA: merged in fp32, the export computes in fp32 without autocast (autocast would round the
    merged weight, the adapter with it, to bf16), where predict computes the bf16 base and the adapter
    apart: they agree to bf16's rounding (docs/robustness.md has a real run's figures). --dtype bf16
    merges in fp32, then casts: the same label on at least 99.5 % of the examples."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, export, export_bf16 = request.getfixturevalue(name)
    texts, _, _ = validation_of(run)
    expected = Classifier.from_folder(run).predict(texts)
    probabilities = {}
    for folder in (export, export_bf16):
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        batch = tokenizer([t[0] for t in texts], padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            probabilities[folder] = torch.softmax(model(**batch).logits.float(), dim=-1).numpy()
    ours = np.array([p.probability if p.label_id == 1 else 1 - p.probability for p in expected])
    np.testing.assert_allclose(probabilities[export][:, 1], ours, atol=1e-4 if name == "full_run" else 5e-3)
    labels = np.array([p.label_id for p in expected])
    assert (probabilities[export][:, 1].round() == labels).mean() >= 0.995
    assert (probabilities[export_bf16].argmax(axis=1) == labels).mean() >= 0.995
    for folder in (export, export_bf16):
        config = json.loads((folder / "config.json").read_text())
        assert config["use_cache"] is False
        autocast_noted = "computing under bf16 autocast as its run did" in (folder / "README.md").read_text()
        if name == "full_run":
            assert config["gluetune_autocast"] == "bf16" and autocast_noted
        else:  # a merged adapter: no autocast of its own
            assert "gluetune_autocast" not in config and not autocast_noted
    if cpu_bf16():  # (where bf16 is forced on a CPU without it, the card says bf16 alone)
        assert f"| precision | bf16 (CPU autocast, {cpu_bf16()}) |" in (run / "README.md").read_text()


def test_full_fine_tuning_predicts_with_the_fp32_weights_it_trained(full_run):
    import torch

    run, _, _ = full_run
    model = Classifier.from_folder(run).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_lora_reads_its_base_in_bf16_and_what_it_trained_in_fp32(lora_run):
    """As training holds them: the frozen base in bf16, the adapters, the pooler and the head in fp32."""
    import torch

    run, _, _ = lora_run
    model = Classifier.from_folder(run).model
    trained = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n or ".modules_to_save." in n}
    assert trained and set(trained.values()) == {torch.float32}
    frozen = {p.dtype for n, p in model.named_parameters() if n not in trained and ".original_module." not in n}
    assert frozen == {torch.bfloat16}


@pytest.fixture(scope="module")
def qlora_run(bf16_forced, tiny_qwen, tmp_path_factory):
    """A 4-bit base (bitsandbytes) under LoRA: its unquantized weights (norms, embeddings) in fp32, the
    4-bit layers computing in bf16, as training prepared them."""
    pytest.importorskip("bitsandbytes", reason="the qlora extra (pip install -e '.[qlora]')")
    from gluetune.training.run import train

    out = tmp_path_factory.mktemp("qlora") / "run"
    overrides = tiny_overrides(tiny_qwen, out, train=64, evals=64, epochs=2, fp32=False)
    config = load_config(ROOT / "configs" / "glue_cola_qwen_qlora.yaml", [*overrides, "training.learning_rate=1e-2",
                                                                          "training.report_to=none"])
    train(config)
    return out


def test_a_4bit_run_reads_back_as_it_evaluated(qlora_run):
    texts, logits, metrics = validation_of(qlora_run)
    assert metrics["precision"] == "bf16"
    again = Classifier.from_folder(qlora_run).logits(texts)
    np.testing.assert_allclose(again, logits, atol=1e-5)
