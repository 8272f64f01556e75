"""QLoRA on the CPU: a 4-bit base (bitsandbytes) under LoRA, 8-bit optimizers, and the run folder
(plain peft, predict, export, card, record, resume) of a 4-bit run, with the tiny Qwen2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    as_set_args,
    assert_one_line_error,
    assert_same_metrics,
    kill_at,
    run_cli,
    run_main,
    tiny_overrides,
    validation,
)

from gluetune.config import quantization
from gluetune.config.run import load_config
from gluetune.errors import UserError
from gluetune.model import classifier as models
from gluetune.model import quantization as model_quantization
from gluetune.training import optimizers

bnb = pytest.importorskip("bitsandbytes", reason="the qlora extra (pip install -e '.[qlora]')")

QLORA_CONFIG = ROOT / "configs" / "glue_cola_qwen_qlora.yaml"
SENTENCES = ["The book was written by John.", "The book was wrote by John.", "Him went to the store.",
             "She sells sea shells by the sea shore.", "Colorless green ideas sleep furiously."]


def qlora_config(tiny_qwen: Path, out: Path, *extra: str, train: int = 64, epochs: int = 2):
    """The shipped QLoRA config shrunk to seconds: 2 optimizer steps an epoch, 2 epochs."""
    return load_config(QLORA_CONFIG, [*tiny_overrides(tiny_qwen, out, train=train, evals=32, epochs=epochs),
                                      "training.report_to=none", *extra])


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_a_4bit_run_trains_through_an_evaluation_into_the_next_epoch(tiny_qwen, tmp_path, monkeypatch):
    """Epoch 1 ends with an evaluation (eval mode, no gradients: where bitsandbytes would repack its
    4-bit weights for inference on an AVX512-BF16 CPU), and epoch 2 must train on: every LoRA weight
    moves after that evaluation and every logged loss is finite. No save follows the evaluation, as
    a save would unpack the weights (bitsandbytes' state_dict does) and hide the problem. (That the
    gradients after an evaluation are exact, which moving weights cannot show, is
    test_an_evaluation_leaves_the_next_training_steps_gradients_as_they_were.)"""
    from gluetune.training.run import train
    from gluetune.training.trainer import GluetuneTrainer

    config = qlora_config(tiny_qwen, tmp_path / "run", "training.save_strategy=no",
                          "training.load_best_model_at_end=false")
    after_evaluations, trainers = [], []
    evaluate = GluetuneTrainer.evaluate

    def evaluate_and_keep_weights(self, *args, **kwargs):
        result = evaluate(self, *args, **kwargs)
        after_evaluations.append(trainable_weights(self.model))
        trainers.append(self)
        return result

    monkeypatch.setattr(GluetuneTrainer, "evaluate", evaluate_and_keep_weights)
    outcome = train(config)

    model = outcome.model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every linear layer of the 2 blocks is 4-bit
    head = model.base_model.model.score.modules_to_save["default"]
    assert head.weight.dtype == torch.float32 and head.weight.requires_grad  # full precision, trained
    assert len(after_evaluations) == 2  # after epoch 1 and after epoch 2
    final = trainable_weights(model)
    lora = [name for name in final if "lora_" in name]
    assert len(lora) == 2 * 4 * 2  # 2 blocks x q/k/v/o x A/B
    assert all(not torch.equal(after_evaluations[0][name], final[name]) for name in lora)
    losses = [entry["loss"] for entry in trainers[0].state.log_history if "loss" in entry]
    steps = [entry["step"] for entry in trainers[0].state.log_history if "loss" in entry]
    assert max(steps) == 4 and all(math.isfinite(loss) for loss in losses), losses


# ---------------------------------------------------------------- an evaluation changes no later gradient

# What Linear4bit.forward reads (set in __init__ from the CPU's flags): whether bitsandbytes would
# repack 4-bit weights for inference on this CPU (AVX512-BF16), which keep_weights_unpacked prevents.
REPACKS = bool(bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu)
needs_repacking_cpu = pytest.mark.skipif(not REPACKS, reason="bitsandbytes repacks 4-bit weights for inference only "
                                                             "on AVX512-BF16 CPUs: nothing to guard on this one")


@pytest.fixture(scope="module")
def llama_without_biases(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama: no biases, so bitsandbytes' packed path raises nothing, it
    drops gradient."""
    from conftest import QWEN_TOKENIZER
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama-64")
    config = LlamaConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_64(tmp_path_factory) -> Path:
    """64 wide: every layer's output count a multiple of 32, which packing needs; q/k/v have biases."""
    from conftest import build_tiny_qwen

    return build_tiny_qwen(tmp_path_factory.mktemp("qwen-64"), hidden_size=64)


TOKENIZERS = {}  # folder -> its tokenizer, loaded once (seconds each)


def lora_gradients(folder: Path, evaluate_first: bool) -> dict[str, torch.Tensor]:
    """One training step's LoRA gradients on a fresh 4-bit model (gluetune's load path), after an
    evaluation-style forward (eval mode, no gradients) or not. lora_B starts random, as after some
    steps (at 0 no gradient would reach lora_A)."""
    config = qlora_config(folder, folder.parent / "unused", "peft.lora_dropout=0", "training.bf16=false")
    tokenizer = TOKENIZERS.get(folder) or TOKENIZERS.setdefault(folder, models.load_tokenizer(config.model))
    torch.manual_seed(0)  # the new head's initial weights
    model = models.make_trainable(models.load_classifier(config.model, config.task, tokenizer.pad_token_id), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    if evaluate_first:
        model.eval()
        with torch.no_grad():
            model(**batch)
    model.train()
    logits = model(**batch).logits.float()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 0, 1, 1])).backward()
    return {name: p.grad for name, p in model.named_parameters() if "lora_" in name}


@needs_repacking_cpu
@pytest.mark.parametrize("model", ["llama_without_biases", "qwen_64"])
def test_an_evaluation_leaves_the_next_training_steps_gradients_as_they_were(request, model):
    """What quantization.keep_weights_unpacked guards: on an AVX512-BF16 CPU bitsandbytes would pack
    the 4-bit weights in the evaluation's forward, and the next step would run them outside autograd:
    with biases it fails, without them it silently drops the frozen layers' share of every earlier
    LoRA weight's gradient. The step's gradients must equal those of a model that never evaluated.
    ("Every LoRA weight moves", above, cannot see this: each still gets its own branch's gradient.)"""
    folder = request.getfixturevalue(model)
    reference, after = lora_gradients(folder, evaluate_first=False), lora_gradients(folder, evaluate_first=True)
    assert len(reference) == 2 * 4 * 2 and all(g.abs().sum() > 0 for g in reference.values())
    for name, grad in reference.items():
        torch.testing.assert_close(after[name], grad, rtol=1e-5, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")


@needs_repacking_cpu
def test_without_the_workaround_bitsandbytes_breaks_training_after_an_evaluation(qwen_64, llama_without_biases,
                                                                                  monkeypatch):
    """Why quantization.keep_weights_unpacked exists: without it, bitsandbytes 0.50 packs the 4-bit
    weights during the evaluation and the next training step fails (with biases) or loses gradient
    (without). When this test fails, a bitsandbytes release has changed this and the workaround can
    be revisited."""
    monkeypatch.setattr(model_quantization, "keep_weights_unpacked", lambda model: None)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        lora_gradients(qwen_64, evaluate_first=True)
    reference = lora_gradients(llama_without_biases, evaluate_first=False)
    after = lora_gradients(llama_without_biases, evaluate_first=True)
    assert not all(torch.allclose(after[name], grad, rtol=1e-5, atol=1e-8) for name, grad in reference.items())


def test_an_8bit_base_trains_and_its_folder_predicts(tiny_qwen, tmp_path):
    from gluetune.results.prediction import Classifier
    from gluetune.training.run import train

    outcome = train(qlora_config(tiny_qwen, tmp_path / "run", "model.quantization=8bit", epochs=1))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in outcome.model.modules())
    assert math.isfinite(outcome.metrics["train"]["loss"])
    classifier = Classifier.from_folder(tmp_path / "run")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in classifier.model.modules())
    assert len(classifier.predict(SENTENCES)) == len(SENTENCES)


# ---------------------------------------------------------------- the folder of a finished 4-bit run


@pytest.fixture(scope="module")
def qlora_run(tiny_qwen, tmp_path_factory) -> Path:
    from gluetune.training.run import train

    out = tmp_path_factory.mktemp("qlora") / "run"
    # LoRA r 128, so that q_proj's lora_A (128 x 32) reaches bitsandbytes' 4,096-element minimum for
    # 8-bit optimizer state; smaller tensors keep 32-bit state by design.
    train(qlora_config(tiny_qwen, out, "peft.lora_r=128", epochs=1))
    return out


def softmax(logits: torch.Tensor) -> list[float]:
    """The probability of label 1 (acceptable) for each sentence."""
    return torch.softmax(logits.float(), dim=-1)[:, 1].tolist()


def plain_peft_probabilities(tiny_qwen: Path, run: Path, quantized: bool) -> list[float]:
    """What a user gets with transformers + peft alone: the base (4-bit NF4 as the config says, or
    full precision), the run's adapter and head on top."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(run)
    extra = {}
    if quantized:
        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True,
                                                          bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_qwen, num_labels=2, dtype=torch.float32,
                                                              pad_token_id=tokenizer.pad_token_id, **extra)
    model = PeftModel.from_pretrained(base, run).eval()
    # As gluetune does (quantization.keep_weights_unpacked): on an AVX512-BF16 CPU bitsandbytes would
    # otherwise repack the 4-bit weights for inference and compute in bf16 whatever the compute dtype.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.inference_mode():
        return softmax(model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits)


def test_plain_peft_over_a_4bit_base_predicts_what_gluetune_predict_does(tiny_qwen, qlora_run):
    """The adapter and head saved as for any LoRA run; over the 4-bit base they give `Classifier`'s
    (gluetune predict's) probabilities to 1e-5 (both compute in fp32, bitsandbytes' CPU repack off)."""
    from gluetune.results.prediction import Classifier

    classifier = Classifier.from_folder(qlora_run)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in classifier.model.modules())  # loaded as trained
    ours = [p.probability if p.label_id == 1 else 1 - p.probability for p in classifier.predict(SENTENCES)]
    theirs = plain_peft_probabilities(tiny_qwen, qlora_run, quantized=True)
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_predict_and_inference_py_load_the_4bit_base(qlora_run):
    result = run_main("inference.py", "--model_path", str(qlora_run), "--input_text", SENTENCES[0])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "label=" in result.stdout and "probability=" in result.stdout


def test_a_4bit_base_counts_as_many_parameters_as_the_full_precision_one(tiny_qwen, qlora_run):
    """bitsandbytes packs two 4-bit weights a byte (a Params4bit's numel() is half the weight's): the
    counts in metrics.json, and so the card's trainable share, are the full-precision model's, as
    peft's get_nb_trainable_parameters counts them."""
    config = qlora_config(tiny_qwen, qlora_run.parent / "unused", "peft.lora_r=128")
    tokenizer = models.load_tokenizer(config.model)
    quantized = models.make_trainable(models.load_classifier(config.model, config.task, tokenizer.pad_token_id), config)
    config.model.quantization = None
    full = models.make_trainable(models.load_classifier(config.model, config.task, tokenizer.pad_token_id), config)
    assert models.count_parameters(quantized) == models.count_parameters(full) == quantized.get_nb_trainable_parameters()
    metrics = json.loads((qlora_run / "metrics.json").read_text())
    assert (metrics["trainable_parameters"], metrics["total_parameters"]) == models.count_parameters(full)


def test_card_and_record_name_the_quantization(qlora_run):
    record = json.loads((qlora_run / "run_record.json").read_text())
    assert record["quantization"] == "4-bit NF4 base (bitsandbytes), double quantization"
    assert record["packages"]["bitsandbytes"] == bnb.__version__
    assert "| base quantization (training) | 4-bit NF4 base (bitsandbytes), double quantization |" in (
        qlora_run / "README.md").read_text()


def test_export_merges_into_the_full_precision_base_and_says_so(tiny_qwen, qlora_run, tmp_path):
    """The export is a plain fp32 model: the full-precision base with the adapter merged, predicting
    what plain peft over the full-precision base does (1e-5)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path / "export"
    result = run_main("-m", "gluetune", "export", "--model_path", str(qlora_run), "--output_dir", str(folder))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "merges it into the full-precision base" in result.stderr
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert "the full-precision ones (it trained over a quantized base)" in (folder / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    exported = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        probabilities = softmax(exported(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits)
    assert probabilities == pytest.approx(plain_peft_probabilities(tiny_qwen, qlora_run, quantized=False), abs=1e-5)


def test_the_optimizer_state_is_8bit_where_bitsandbytes_allows(qlora_run):
    """paged_adamw_8bit's saved state (what --resume loads): both Adam moments in uint8 for every
    tensor of 4,096 elements or more, fp32 below that (bitsandbytes' min_8bit_size)."""
    # bitsandbytes saves each parameter's state under one key
    saved = torch.load(qlora_run / "checkpoint-2" / "optimizer.pt", weights_only=False)["state"].values()
    state = [entry["__bnb_optimizer_quant_state__"] for entry in saved]
    kinds = {(entry["state1"].dtype, entry["state1"].numel() >= 4096) for entry in state}
    assert kinds == {(torch.uint8, True), (torch.float32, False)}, kinds
    assert all(entry["state2"].dtype == entry["state1"].dtype for entry in state)
    assert len(state) == 2 * 4 * 2 + 1  # every LoRA matrix and the head


# ---------------------------------------------------------------- kill and resume

# 128 examples, 16 x 2: 4 optimizer steps an epoch, 2 epochs; an evaluation and a checkpoint every
# 3 steps, so a checkpoint falls inside an epoch and an evaluation precedes training on.
RESUME_SETTINGS = ["training.save_strategy=steps", "training.save_steps=3", "training.eval_strategy=steps",
                   "training.eval_steps=3", "training.save_total_limit=null"]


def resume_args(model: Path, out: Path) -> list[str]:
    return ["train.py", "--config", str(QLORA_CONFIG),
            *as_set_args(tiny_overrides(model, out, train=128, evals=32, epochs=2) + RESUME_SETTINGS)]


@pytest.mark.slow  # three training processes: about 80 s on 2 busy cores
def test_a_killed_4bit_run_resumes_where_it_would_have_ended(tiny_qwen, tmp_path):
    """SIGKILL at step 5 (after checkpoint-3): the resume, 4-bit base and 8-bit optimizer state
    restored, ends with the uninterrupted run's validation metrics."""
    reference = tmp_path / "uninterrupted"
    result = run_cli(*resume_args(tiny_qwen, reference))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "paged_adamw_8bit: bitsandbytes" in result.stderr and "not paged" in result.stderr

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, *resume_args(tiny_qwen, out)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    kill_at(process, "[gluetune] step 5/8")
    assert not (out / "metrics.json").exists() and (out / "checkpoint-3").is_dir()
    resumed = run_cli(*resume_args(tiny_qwen, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"] == "checkpoint-3"
    assert_same_metrics(validation(out), validation(reference))


# ---------------------------------------------------------------- errors and notices


@pytest.mark.parametrize("overrides, fragments", [
    (["model.quantization=4bits"], ["model.quantization: '4bits'", "did you mean '4bit'", "4bit or 8bit"]),
    (["model.quantization={load_in_4bit: true, bnb_4bit_quant_typ: nf4}"],
     ["model.quantization.bnb_4bit_quant_typ", "did you mean 'bnb_4bit_quant_type'"]),
    (["model.quantization={load_in_4bit: true, bnb_4bit_quant_type: nf3}"],
     ["bnb_4bit_quant_type: 'nf3'", "nf4 or fp4"]),
    (["model.quantization={load_in_4bit: true, bnb_4bit_compute_dtype: float8}"], ["'float8'", "bfloat16"]),
    (["model.quantization={load_in_4bit: true, load_in_8bit: true}"], ["exactly one of load_in_4bit"]),
    (["model.quantization={bnb_4bit_quant_type: nf4}"], ["exactly one of load_in_4bit"]),
    (["model.quantization={load_in_4bit: yes}"], ["load_in_4bit must be a boolean"]),
])
def test_bad_quantization_fields_are_refused_before_anything_loads(tiny_qwen, overrides, fragments):
    with pytest.raises(UserError) as caught:
        load_config(QLORA_CONFIG, [f"model.name_or_path={tiny_qwen}", *overrides])
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_full_fine_tuning_of_a_quantized_base_is_refused():
    with pytest.raises(UserError, match="peft.method 'full' would train the quantized weights themselves"):
        load_config(ROOT / "configs" / "glue_cola_minilm_cpu_full.yaml", ["model.quantization=4bit"])


def test_a_bad_quantization_is_one_line_on_the_command_line(tiny_qwen, tmp_path):
    result = run_main("train.py", "--config", str(QLORA_CONFIG), "--set", "model.quantization=4bits",
                     *as_set_args(tiny_overrides(tiny_qwen, tmp_path / "run")))
    assert_one_line_error(result, "model.quantization", "did you mean '4bit'")
    assert not (tmp_path / "run").exists()


def test_the_short_spellings_and_the_full_fields(tiny_qwen):
    config = load_config(QLORA_CONFIG, [f"model.name_or_path={tiny_qwen}"])
    fields = quantization.bnb_config(config.model.quantization, compute_dtype=torch.float32).to_dict()
    assert fields["load_in_4bit"] and fields["bnb_4bit_quant_type"] == "nf4" and fields["bnb_4bit_use_double_quant"]
    assert fields["bnb_4bit_compute_dtype"] == "float32"
    spelled = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": "bf16"}
    config = load_config(QLORA_CONFIG, [f"model.name_or_path={tiny_qwen}", f"model.quantization={json.dumps(spelled)}"])
    fields = quantization.bnb_config(config.model.quantization, compute_dtype=torch.float32).to_dict()
    assert fields["bnb_4bit_quant_type"] == "fp4" and fields["bnb_4bit_compute_dtype"] == "bfloat16"
    assert quantization.describe(spelled) == "4-bit FP4 base (bitsandbytes), compute in bfloat16"


def test_without_bitsandbytes_a_quantized_base_is_one_line_and_8bit_optimizers_fall_back(tiny_qwen, monkeypatch):
    for module in (model_quantization, optimizers):
        monkeypatch.setattr(module, "installed_version", lambda name: None)
    config = load_config(QLORA_CONFIG, [f"model.name_or_path={tiny_qwen}"])  # the config itself is fine
    with pytest.raises(UserError, match=r'needs bitsandbytes, which is not installed: pip install "gluetune\[qlora\]"'):
        models.load_classifier(config.model, config.task, 0)
    settings, notice = optimizers.optimizer_settings("paged_adamw_8bit", "cpu")
    assert settings == {"optim": "adamw_torch"} and 'pip install "gluetune[qlora]"' in notice


def test_without_bitsandbytes_only_its_adamw_falls_back_and_the_others_are_refused(monkeypatch):
    """torch's AdamW runs the algorithm of bitsandbytes' AdamW (8-bit state or paged); nothing runs Lion,
    RMSprop or AdEMAMix in its place. Every optimizer of transformers' own bitsandbytes table is one or
    the other."""
    from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS

    monkeypatch.setattr(optimizers, "installed_version", lambda name: None)
    table = {str(getattr(name, "value", name)) for name in _BITSANDBYTES_OPTIMIZERS}
    adamw = {"adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"}
    assert adamw < table and {"lion_8bit", "rmsprop_bnb", "ademamix_8bit", "paged_lion_32bit"} < table
    for optim in sorted(table):
        if optim in adamw:
            settings, notice = optimizers.optimizer_settings(optim, "cpu")
            assert settings == {"optim": "adamw_torch"} and "using adamw_torch" in notice
            continue
        with pytest.raises(UserError) as caught:
            optimizers.optimizer_settings(optim, "cpu")
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"training.optim: {optim} needs bitsandbytes"), message
        assert 'pip install "gluetune[qlora]"' in message and "no other optimizer runs its algorithm" in message


def test_the_card_and_record_show_the_optimizer_that_ran(tiny_qwen, tmp_path, monkeypatch):
    """adamw_8bit without bitsandbytes trains with adamw_torch: the run record and the card say so."""
    from conftest import REFERENCE_CONFIG

    from gluetune.training.run import train

    monkeypatch.setattr(optimizers, "installed_version", lambda name: None)
    out = tmp_path / "run"
    train(load_config(REFERENCE_CONFIG, tiny_overrides(tiny_qwen, out, train=32, evals=16) + [
        "training.optim=adamw_8bit", "training.report_to=none"]))
    assert json.loads((out / "run_record.json").read_text())["optimizer"] == "adamw_torch"
    assert "| optimizer | adamw_torch (configured: adamw_8bit) |" in (out / "README.md").read_text()


def test_8bit_optimizers_say_what_runs_where():
    version = bnb.__version__
    assert optimizers.optimizer_settings("adamw_8bit", "cpu") == ({}, (
        f"optim: adamw_8bit: bitsandbytes {version} 8-bit adamw on cpu (tensors under 4,096 elements keep 32-bit state)"))
    settings, notice = optimizers.optimizer_settings("paged_adamw_8bit", "cpu")
    assert settings == {} and "not paged (paging needs CUDA" in notice
    settings, notice = optimizers.optimizer_settings("paged_adamw_8bit", "cuda")
    assert settings == {} and f"bitsandbytes {version} paged 8-bit adamw" in notice
    assert all(optimizers.is_bitsandbytes_optimizer(name) for name in ("lion_8bit", "adamw_bnb_8bit", "adamw_8bit"))
    assert not optimizers.is_bitsandbytes_optimizer("galore_adamw_8bit")
    assert not optimizers.is_bitsandbytes_optimizer("adamw_torch")
