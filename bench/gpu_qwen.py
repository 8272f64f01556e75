#!/usr/bin/env python
"""GPU benchmark: the reference run's shapes (Qwen2.5-1.5B + LoRA on CoLA, 10 epochs, bf16).

The model is built from ../shared/assets/qwen2.5-configs/Qwen2.5-1.5B with random weights (no
download): right shapes, right speed and memory, meaningless accuracy. Real Qwen tokenizer, real
CoLA, the reference hyperparameters, per-epoch evaluation. Two contenders, each in its own
process: gluetune from configs/glue_cola_qwen.yaml, and the plain Trainer + PEFT baseline
(dynamic padding, fp32 weights under bf16 autocast, as run_glue.py loads them).

    python bench/gpu_qwen.py                 # on a CUDA machine (10 epochs: ~14 min per contender on an H200)
    python bench/gpu_qwen.py --fast --skip_gluetune --skip_baseline   # the fast path alone, cold then warm
    python bench/gpu_qwen.py --smoke         # the same pipeline on a tiny model, on any machine

`--fast` adds gluetune with `training.fast_path=true`, timed twice: cold (an empty compile cache,
compilation included) and warm (the cache the cold run filled). `--set section.key=value` passes
overrides to every gluetune contender, to compare the fast path's leads one at a time.

Without CUDA (and without --smoke) it says so and exits 0. The device machine has no ../shared and
no internet: bench/gpu_device.sh stages the data, assets and pinned wheels, and runs this there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
CONFIG = ROOT / "configs" / "glue_cola_qwen.yaml"
SMOKE_EXAMPLES = 256


def build_random_model(model_config: Path, tokenizer: Path, folder: Path, smoke: bool) -> None:
    """A hub-style folder: random bf16 weights with the config's shapes, and the real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    values = json.loads((model_config / "config.json").read_text())
    if smoke:
        values.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    config = AutoConfig.for_model(**values)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    del model


def gpu_report(wall: float, steps: int, real_tokens: int, extra: dict) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "wall_s": wall,
        "steps_per_s": steps / wall,
        "real_tokens_per_s": real_tokens / wall,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else 0.0,
        "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved() / 1024**3 if cuda else 0.0,
        **extra,
    }


def cola_real_tokens(glue_dir: Path, tokenizer_path: Path, epochs: float, smoke: bool) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoTokenizer

    from gluetune.data import read_glue_split
    from gluetune.tasks import get_task

    sentences = list(read_glue_split(glue_dir, get_task("cola"), "train")["sentence"])[: SMOKE_EXAMPLES if smoke else None]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return int(sum(len(ids) for ids in tokenizer(sentences)["input_ids"]) * epochs)


def run_gluetune(model: Path, glue_dir: Path, out: Path, epochs: float, extra_overrides: list[str], smoke: bool) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from gluetune.config import load_config
    from gluetune.training import train

    overrides = [f"model.name_or_path={model}", f"dataset.data_dir={glue_dir}", f"training.output_dir={out}",
                 f"training.num_train_epochs={epochs}", *extra_overrides]
    if smoke:
        overrides.append(f"dataset.max_train_samples={SMOKE_EXAMPLES}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    metrics = train(load_config(CONFIG, overrides)).metrics
    wall = metrics["train"]["runtime_s"]
    tokens = cola_real_tokens(glue_dir, model, epochs, smoke)
    return gpu_report(wall, metrics["train"]["steps"], tokens,
                      {"mcc": metrics["validation"]["matthews_correlation"], "trainable": metrics["trainable_parameters"]})


def run_baseline(model: Path, glue_dir: Path, out: Path, epochs: float, smoke: bool) -> dict:
    """Plain Trainer + PEFT as a user writes it: dynamic padding, default sampler, fp32 load, bf16 autocast."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from sklearn.metrics import matthews_corrcoef
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    sys.path.insert(0, str(ROOT / "src"))
    from gluetune.data import read_glue_split
    from gluetune.tasks import get_task

    set_seed(42)
    cola = get_task("cola")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token

    def encode(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=128)

    train = read_glue_split(glue_dir, cola, "train")
    if smoke:
        train = train.select(range(SMOKE_EXAMPLES))
    train = train.map(encode, batched=True)
    dev = read_glue_split(glue_dir, cola, "validation").map(encode, batched=True)
    # fp32 master weights under bf16 autocast: the standard mixed-precision recipe (transformers v4's
    # default load, as run_glue.py + PEFT tutorials use it).
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2, pad_token_id=tokenizer.pad_token_id,
                                                              dtype=torch.float32)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(base, lora)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=16, gradient_accumulation_steps=2,
        learning_rate=3e-4, optim="adamw_torch", bf16=bf16, eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="matthews_correlation", save_total_limit=2,
        report_to="none", logging_steps=50, seed=42,
    )

    def mcc(p):
        return {"matthews_correlation": matthews_corrcoef(p.label_ids, p.predictions.argmax(-1))}

    trainer = Trainer(model=peft_model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=mcc)
    started = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - started
    tokens = cola_real_tokens(glue_dir, model, epochs, smoke)
    return gpu_report(wall, trainer.state.global_step, tokens,
                      {"mcc": trainer.evaluate()["eval_matthews_correlation"], "train_runtime_s": result.metrics["train_runtime"]})


def child(args) -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    out = Path(tempfile.mkdtemp(prefix=f"bench-{args.contender}-"))
    model, glue_dir = Path(args.model), Path(args.glue_dir)
    if args.contender == "baseline":
        report = run_baseline(model, glue_dir, out, args.epochs, args.smoke)
    elif args.contender.startswith("gluetune-fast"):
        report = run_gluetune(model, glue_dir, out, args.epochs, ["training.fast_path=true", *args.overrides], args.smoke)
    elif args.contender == "gluetune-compile":
        report = run_gluetune(model, glue_dir, out, args.epochs, ["training.torch_compile=true", *args.overrides], args.smoke)
    else:
        report = run_gluetune(model, glue_dir, out, args.epochs, list(args.overrides), args.smoke)
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", default=str(SHARED / "data" / "glue"))
    parser.add_argument("--tokenizer", default=str(SHARED / "assets" / "qwen2.5-tokenizer"))
    parser.add_argument("--model_config", default=str(SHARED / "assets" / "qwen2.5-configs" / "Qwen2.5-1.5B"))
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--skip_baseline", action="store_true")
    parser.add_argument("--skip_gluetune", action="store_true", help="time the plain Trainer + PEFT baseline alone")
    parser.add_argument("--compile", action="store_true", help="also time gluetune with training.torch_compile=true")
    parser.add_argument("--fast", action="store_true", help="also time the fast path (training.fast_path=true), cold and warm")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override for every gluetune contender, repeatable")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 256 examples: checks the script, any device")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        return child(args)

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device here: bench/gpu_qwen.py measures the reference run on a GPU; nothing to do "
              "(--smoke runs the pipeline on a tiny model anywhere)")
        return
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)"
    print(f"device: {device}; torch {torch.__version__}; model shapes: {Path(args.model_config).name}"
          f"{' shrunk (smoke)' if args.smoke else ''}; epochs: {args.epochs:g}", flush=True)
    contenders = (([] if args.skip_gluetune else ["gluetune"]) + (["gluetune-compile"] if args.compile else [])
                  + (["gluetune-fast (cold)", "gluetune-fast (warm)"] if args.fast else [])
                  + ([] if args.skip_baseline else ["baseline"]))
    with tempfile.TemporaryDirectory() as tmp:
        compile_cache = Path(tmp) / "inductor-cache"  # empty for the cold run, filled for the warm one
        model = Path(tmp) / "model"
        started = time.perf_counter()
        build_random_model(Path(args.model_config), Path(args.tokenizer), model, args.smoke)
        print(f"random-weight model written in {time.perf_counter() - started:.0f} s", flush=True)
        for name in contenders:
            cmd = [sys.executable, __file__, "--contender", name, "--model", str(model), "--glue_dir", args.glue_dir,
                   "--epochs", str(args.epochs)] + (["--smoke"] if args.smoke else [])
            cmd += [arg for item in args.overrides for arg in ("--set", item)]
            # keep the caller's PYTHONPATH (packages carried onto a device machine live there)
            pythonpath = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false",
                   "TORCHINDUCTOR_CACHE_DIR": str(compile_cache), "TRITON_CACHE_DIR": str(compile_cache / "triton")}
            result = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                print(f"{name}: failed\n{result.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{name:21s} wall_s={r['wall_s']:.1f} steps/s={r['steps_per_s']:.2f} "
                  f"real_tokens/s={r['real_tokens_per_s']:.0f} peak_gpu_gb={r['peak_gpu_gb']:.2f} "
                  f"(reserved {r['peak_gpu_reserved_gb']:.2f}) mcc={r['mcc']:.4f}", flush=True)


if __name__ == "__main__":
    main()
