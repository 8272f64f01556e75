"""`gluetune export`: standalone model folders that stock transformers loads and that predict
exactly what gluetune predicts, for a decoder (single sentences and pairs), an encoder read at
[CLS], and the mean-pooled CPU default; plus dtype, refusals and the export's model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CPU_CONFIG, GLUE_DIR, REFERENCE_CONFIG, ROOT, tiny_overrides

from gluetune.config.run import load_config, load_saved_config
from gluetune.config.tasks import get_task
from gluetune.data.loading import read_glue_split
from gluetune.data.tokenizing import encode_texts
from gluetune.errors import UserError
from gluetune.results.export import REMOTE_CODE_FILENAME, export_folder
from gluetune.results.prediction import Classifier
from gluetune.training.run import train

FULL_CPU_CONFIG = ROOT / "configs" / "glue_cola_minilm_cpu_full.yaml"
SMALL = ["dataset.max_train_samples=32", "dataset.max_eval_samples=16", "training.num_train_epochs=1"]


@pytest.fixture(autouse=True)
def compare_on_the_cpu(monkeypatch):
    """gluetune predicts in bf16 where CUDA is (Classifier.from_folder); the fp32 comparisons here
    are between CPU fp32 models wherever the suite runs."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def minilm_overrides(out: Path) -> list[str]:
    # fp32 where this CPU would train bf16: the export (fp32) must predict what gluetune predicts, which
    # is in the precision the run trained in
    return [f"dataset.data_dir={GLUE_DIR}", *SMALL, f"training.output_dir={out}", "training.bf16=false"]


def trained_and_exported(config, tmp_path_factory, name: str):
    train(config)
    export = tmp_path_factory.mktemp("exports") / name  # distinct names: transformers caches custom code by folder name
    return config.output_dir, export_folder(config.output_dir, export)


@pytest.fixture(scope="module")
def qwen_cola(tiny_qwen, tmp_path_factory):
    """A decoder, LoRA, single sentences (the reference recipe, tiny)."""
    out = tmp_path_factory.mktemp("qwen-cola") / "run"
    config = load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out))
    return trained_and_exported(config, tmp_path_factory, "qwen-cola")


@pytest.fixture(scope="module")
def qwen_mrpc_full(tiny_qwen, tmp_path_factory):
    """A decoder, sentence pairs, full fine-tuning (the saved model exported as is)."""
    out = tmp_path_factory.mktemp("qwen-mrpc") / "run"
    config = load_config(FULL_CPU_CONFIG, tiny_overrides(tiny_qwen, out, train=32, evals=16) + ["dataset.subset=mrpc"])
    return trained_and_exported(config, tmp_path_factory, "qwen-mrpc")


@pytest.fixture(scope="module")
def minilm_mean(tmp_path_factory):
    """The CPU default: MiniLM, LoRA, the head reading the mean of the tokens."""
    config = load_config(CPU_CONFIG, minilm_overrides(tmp_path_factory.mktemp("minilm-mean") / "run"))
    return trained_and_exported(config, tmp_path_factory, "minilm-mean")


@pytest.fixture(scope="module")
def minilm_cls_pairs(tmp_path_factory):
    """An encoder read at [CLS], on sentence pairs (its tokenizer's own [SEP] template)."""
    out = tmp_path_factory.mktemp("minilm-cls") / "run"
    config = load_config(CPU_CONFIG, minilm_overrides(out) + ["model.pooling=null", "dataset.subset=mrpc"])
    return trained_and_exported(config, tmp_path_factory, "minilm-cls")


def validation_texts(task_name: str, n: int = 12) -> list[tuple[str, ...]]:
    task = get_task(task_name)
    split = read_glue_split(GLUE_DIR, task, "validation")
    return list(zip(*(split[c][:n] for c in task.text_columns)))


def pipeline_inputs(texts):
    return [t[0] if len(t) == 1 else {"text": t[0], "text_pair": t[1]} for t in texts]


def long_input(columns: int) -> tuple[str, ...]:
    """About 400 tokens in all: past the runs' max_length (256), within the models' positions (512)."""
    return tuple(" ".join(["word"] * (400 // columns)) for _ in range(columns))


def card_pipeline(export: Path):
    """The pipeline exactly as the export's card tells a reader to build it."""
    from transformers import pipeline

    (line,) = [x for x in (export / "README.md").read_text().splitlines() if x.startswith("classify = pipeline(")]
    return eval(line.removeprefix("classify = ").replace("path/to/this/folder", str(export)), {"pipeline": pipeline})


def assert_predicts_like_gluetune(run: Path, export: Path, texts, trust_remote_code: bool) -> None:
    """Stock model + tokenizer (batched, padded, truncated) give gluetune's logits; the pipeline the card
    shows gives its probabilities, for a long input too."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [*texts, long_input(len(texts[0]))]
    classifier = Classifier.from_folder(run)
    model = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=trust_remote_code)
    batch = tokenizer(*map(list, zip(*texts)), padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits.numpy()
    np.testing.assert_allclose(logits, classifier.logits(texts), atol=1e-5)

    classify = card_pipeline(export)
    for predicted, expected in zip(classify(pipeline_inputs(texts)), classifier.predict(texts), strict=True):
        assert predicted["label"] == expected.label
        assert predicted["score"] == pytest.approx(expected.probability, abs=1e-5)


def assert_standalone_files(export: Path, task_name: str) -> dict:
    names = {p.name for p in export.iterdir()}
    assert "model.safetensors" in names and "tokenizer_config.json" in names and "README.md" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names), names
    assert not {"adapter_config.json", "adapter_model.safetensors", "resolved_config.yaml"} & names
    config = json.loads((export / "config.json").read_text())
    labels = list(get_task(task_name).label_names)
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
    assert config["label2id"] == {name: i for i, name in enumerate(labels)}
    assert config["pad_token_id"] is not None
    return config


def test_decoder_export_is_plain_transformers_and_predicts_like_gluetune(qwen_cola):
    run, export = qwen_cola
    config = assert_standalone_files(export, "cola")
    assert not (export / REMOTE_CODE_FILENAME).exists() and "auto_map" not in config
    assert config["model_type"] == "qwen2" and config["dtype"] == "float32"
    assert config["pad_token_id"] == 151643  # Qwen's <|endoftext|>, gluetune's pad token
    assert_predicts_like_gluetune(run, export, validation_texts("cola"), trust_remote_code=False)


def test_decoder_export_holds_the_trained_adapter(qwen_cola, tiny_qwen):
    """The merged weights matter: the base's own weights under the same trained head predict otherwise,
    by far more than the tolerance the exports are held to."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run, export = qwen_cola
    merged = AutoModelForSequenceClassification.from_pretrained(export).eval()
    unmerged = AutoModelForSequenceClassification.from_pretrained(export).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).model.state_dict()
    missing, _ = unmerged.model.load_state_dict(base, strict=False)
    assert not missing
    tokenizer = Classifier.from_folder(run).tokenizer
    batch = tokenizer([t[0] for t in validation_texts("cola")], padding=True, return_tensors="pt")
    with torch.inference_mode():
        difference = (merged(**batch).logits - unmerged(**batch).logits).abs().max().item()
    assert difference > 100 * 1e-5, difference


def test_decoder_pair_export_encodes_pairs_as_gluetune_does(qwen_mrpc_full):
    from transformers import AutoTokenizer

    run, export = qwen_mrpc_full
    assert_standalone_files(export, "mrpc")
    pairs = validation_texts("mrpc", n=40)
    exported = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    stock = AutoTokenizer.from_pretrained(run)
    gluetune_ids = encode_texts(stock, pairs, max_length=10_000)[0]["input_ids"]
    first, second = map(list, zip(*pairs))
    assert exported(first, second)["input_ids"] == gluetune_ids  # token for token
    assert [exported(a, b)["input_ids"] for a, b in pairs] == gluetune_ids
    # What the test guards against: the stock pair encoding (no newline, and no ".\n" merge) differs.
    assert stock(first, second)["input_ids"] != gluetune_ids
    # Real RTE pairs over the run's max_length: cut as gluetune cuts them, the hypothesis kept
    rte = read_glue_split(GLUE_DIR, get_task("rte"), "train")
    long_pairs = [(rte["sentence1"][i], rte["sentence2"][i]) for i in (1134, 1675)]  # 259 and 295 tokens
    max_length = load_saved_config(run).dataset.max_length
    assert exported.model_max_length == max_length < 259
    cut = encode_texts(stock, long_pairs, max_length=max_length)[0]
    first, second = map(list, zip(*long_pairs))
    assert exported(first, second, truncation=True)["input_ids"] == cut["input_ids"]
    padded = exported(first, second, truncation=True, padding=True, return_tensors="pt")
    assert padded["input_ids"].shape == (2, max_length) and padded["attention_mask"].tolist() == cut["attention_mask"]
    assert exported(*long_pairs[0], truncation=True)["input_ids"] == cut["input_ids"][0]
    assert_predicts_like_gluetune(run, export, pairs[:12] + long_pairs, trust_remote_code=True)


def test_full_run_exports_its_saved_weights_as_they_are(qwen_mrpc_full):
    from safetensors.torch import load_file

    run, export = qwen_mrpc_full
    assert not (run / "adapter_config.json").exists()
    saved, exported = load_file(run / "model.safetensors"), load_file(export / "model.safetensors")
    assert set(saved) == set(exported)
    for name, tensor in saved.items():
        assert exported[name].float().equal(tensor.float()), name


def test_mean_pooled_export_ships_its_pooling_as_custom_code(minilm_mean, monkeypatch):
    import torch
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, dynamic_module_utils

    run, export = minilm_mean
    config = assert_standalone_files(export, "cola")
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_gluetune.")
    card = (export / "README.md").read_text()
    assert f"`{REMOTE_CODE_FILENAME}` holds what stock transformers cannot express" in card
    texts = validation_texts("cola")
    assert_predicts_like_gluetune(run, export, texts, trust_remote_code=True)

    # Without trust_remote_code, transformers refuses rather than silently reading [CLS] instead.
    monkeypatch.setattr(dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)  # refuse at once instead of prompting
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(export)
    # ... which would predict differently: the same weights read at [CLS].
    cls_reader = BertForSequenceClassification.from_pretrained(export).eval()
    classifier = Classifier.from_folder(run)
    batch = classifier.tokenizer([t[0] for t in texts], padding=True, return_tensors="pt")
    with torch.inference_mode():
        at_cls = cls_reader(**batch).logits.numpy()
    assert not np.allclose(at_cls, classifier.logits(texts), atol=1e-3)


def test_encoder_export_reads_cls_and_pairs_with_its_own_template(minilm_cls_pairs):
    run, export = minilm_cls_pairs
    config = assert_standalone_files(export, "mrpc")
    assert config["model_type"] == "bert" and not (export / REMOTE_CODE_FILENAME).exists()
    assert_predicts_like_gluetune(run, export, validation_texts("mrpc"), trust_remote_code=False)


def test_bf16_export_has_bf16_weights(qwen_cola, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    run, _ = qwen_cola
    export = export_folder(run, tmp_path / "bf16", dtype="bf16")
    assert {tensor.dtype for tensor in load_file(export / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForSequenceClassification.from_pretrained(export).dtype == torch.bfloat16


def test_export_card_metadata_parses_back(qwen_cola):
    from huggingface_hub import ModelCard

    run, export = qwen_cola
    data = ModelCard.load(export / "README.md").data
    metrics = json.loads((run / "metrics.json").read_text())
    assert data.base_model == load_config(run / "resolved_config.yaml").model.name_or_path
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.datasets == ["nyu-mll/glue"]
    values = {r.metric_type: r.metric_value for r in data.eval_results}
    assert values == {k: metrics["validation"][k] for k in get_task("cola").metrics}
    assert {r.dataset_split for r in data.eval_results} == {"validation"}


def test_unfinished_runs_and_used_folders_are_refused(qwen_cola, tmp_path):
    run, _ = qwen_cola
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "resolved_config.yaml", unfinished)
    with pytest.raises(UserError, match="has not finished"):
        export_folder(unfinished, tmp_path / "a")
    with pytest.raises(UserError, match="not a gluetune run folder"):
        export_folder(tmp_path, tmp_path / "b")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_folder(run, used)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match="expected one of fp32, bf16, fp16"):
        export_folder(run, tmp_path / "c", dtype="int8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_cli_exports_and_refuses_in_one_line(qwen_cola, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from gluetune.cli import main

    run, export = qwen_cola
    assert main(["export", "--model_path", str(run), "--output_dir", str(export)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gluetune: error:")]
    assert len(errors) == 1 and str(export) in errors[0] and "not empty" in errors[0]

    assert main(["export", "--model_path", str(run), "--output_dir", str(tmp_path / "fp16"), "--dtype", "fp16"]) == 0
    assert f"exported to {tmp_path / 'fp16'}" in capsys.readouterr().out
    assert {t.dtype for t in load_file(tmp_path / "fp16" / "model.safetensors").values()} == {torch.float16}
