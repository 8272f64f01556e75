#!/usr/bin/env python
"""CPU benchmark: gluetune against the plain Trainer + PEFT recipes it replaces, on real CoLA.

Three contenders, each in its own process (so peak RSS is its own), all with the model, the
hyperparameters and the precision of configs/glue_cola_minilm_cpu.yaml (bf16 where the CPU computes it
natively, as gluetune decides it: the plain Trainer then needs `use_cpu`, as its own error says):

  (a) run_glue.py's default: Trainer + peft, every example padded to 128 tokens. Throughput only,
      over a fixed 40 optimizer steps.
  (b) the competent plain baseline: Trainer + peft with dynamic padding (DataCollatorWithPadding,
      the default random sampler), full training with per-epoch evaluation and best-checkpoint
      selection, exactly as gluetune does it.
  (c) gluetune, full training from the config.

(a) and (b) are plain library code below, not gluetune; they get the config's model settings that
change what is learned (dropout) but not gluetune's speed choices (length-grouped batches, eager
attention under CPU bf16, sorted evaluation). (c) also prints its achieved GFLOP/s (training steps
and evaluations, counted from the model's shapes and the real tokens: bench/flops.py) beside an
estimate of the machine's peak for the precision it trained in. Usage:

    python bench/cpu_cola.py [--quick] [--glue_dir ../shared/data/glue]

The last line is `RESULT speedup_vs_runglue=.. speedup_vs_dynamic=.. mcc_gluetune=.. mcc_baseline=.. peak_rss_gb=.. gflops=..`.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/machine.py, importable because the scripts run as python bench/<name>.py
from children import child_env
from flops import linear_flops, peak_gflops, run_flops
from machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "glue_cola_minilm_cpu.yaml"
RUNGLUE_STEPS = 40
RUNGLUE_MAX_SEQ_LENGTH = 128  # run_glue.py's default --max_seq_length, with pad_to_max_length


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def read_cola(path: Path):
    """CoLA's header-less TSV (source, label, mark, sentence), read with quoting off."""
    import datasets

    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return datasets.Dataset.from_dict({"sentence": [r[3] for r in rows], "label": [int(r[1]) for r in rows]})


def cpu_default(epochs: float | None):
    """The CPU default's settings, read through gluetune's own config loader."""
    sys.path.insert(0, str(ROOT / "src"))
    from gluetune.config.run import load_config
    from gluetune.model.sources import resolve

    config = load_config(CONFIG)
    if epochs is not None:
        config.training["num_train_epochs"] = epochs
    return config, resolve(config.model)


# ---------------------------------------------------------------- contenders (a) and (b)


def plain_trainer_run(glue_dir: Path, epochs: float | None, pad_to_128: bool, out: Path) -> dict:
    """A plain Hugging Face Trainer + peft run, as a user writes it without gluetune."""
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

    from gluetune.model.precision import native_bf16

    config, model_path = cpu_default(epochs)
    t, p = config.training, config.peft
    bf16 = bool(t.get("bf16")) and native_bf16()
    set_seed(t["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    padding = "max_length" if pad_to_128 else False
    max_length = RUNGLUE_MAX_SEQ_LENGTH if pad_to_128 else config.dataset.max_length

    def encode(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=max_length, padding=padding)

    train = read_cola(glue_dir / "CoLA" / "train.tsv").map(encode, batched=True)
    dev = read_cola(glue_dir / "CoLA" / "dev.tsv").map(encode, batched=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2,
                                                               **(config.model.config_overrides or {}))
    model = get_peft_model(model, LoraConfig(
        task_type=TaskType.SEQ_CLS, r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
        target_modules=p.target_modules, modules_to_save=p.modules_to_save, use_rslora=p.use_rslora,
    ))

    def mcc(eval_prediction):
        return {"matthews_correlation": matthews_corrcoef(eval_prediction.label_ids, eval_prediction.predictions.argmax(-1))}

    common = {
        "output_dir": str(out), "per_device_train_batch_size": t["per_device_train_batch_size"],
        "gradient_accumulation_steps": t.get("gradient_accumulation_steps", 1), "learning_rate": t["learning_rate"],
        "weight_decay": t.get("weight_decay", 0.0), "warmup_steps": t.get("warmup_steps", 0), "seed": t["seed"],
        "lr_scheduler_type": t.get("lr_scheduler_type", "linear"), "report_to": "none", "dataloader_pin_memory": False,
        "logging_steps": 50, "bf16": bf16, "use_cpu": bf16,
    }
    if pad_to_128:
        args = TrainingArguments(**common, max_steps=RUNGLUE_STEPS, eval_strategy="no", save_strategy="no")
    else:
        args = TrainingArguments(
            **common, num_train_epochs=t["num_train_epochs"], eval_strategy="epoch", save_strategy="epoch",
            load_best_model_at_end=True, metric_for_best_model="matthews_correlation", save_total_limit=2,
        )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=mcc)
    started = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - started
    samples = result.metrics["train_samples_per_second"] * result.metrics["train_runtime"]
    mean_real_tokens = sum(sum(m) for m in train["attention_mask"]) / len(train)
    report = {"train_wall_s": wall, "train_samples": samples, "real_tokens": samples * mean_real_tokens,
              "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32"}
    if not pad_to_128:
        report["mcc"] = trainer.evaluate()["eval_matthews_correlation"]
    return report


# ---------------------------------------------------------------- contender (c)


def gluetune_run(glue_dir: Path, epochs: float | None, out: Path, extra: list[str] = ()) -> dict:
    from gluetune.config.run import load_config
    from gluetune.config.tasks import get_task
    from gluetune.data.loading import read_glue_split
    from gluetune.model.classifier import load_tokenizer
    from gluetune.training.run import train

    overrides = [f"dataset.data_dir={glue_dir}", f"training.output_dir={out}"]
    if epochs is not None:
        overrides.append(f"training.num_train_epochs={epochs}")
    config = load_config(CONFIG, [*overrides, *extra])
    from gluetune.training.speed.cpu import prepare_cpu_process

    prepare_cpu_process(config.training)  # what `gluetune train` does on a CPU (cli.run_train)
    epoch_peaks = peak_rss_at_each_epoch_end()
    outcome = train(config)
    metrics = outcome.metrics
    epochs_run = metrics["train"]["epochs"]
    tokenizer = load_tokenizer(config.model)
    lengths = {}
    for split in ("train", "validation"):
        sentences = list(read_glue_split(glue_dir, get_task("cola"), split)["sentence"])
        lengths[split] = [len(ids) for ids in tokenizer(sentences, truncation=True,
                                                         max_length=config.dataset.max_length)["input_ids"]]
    real_tokens = sum(lengths["train"])
    flops = run_flops(linear_flops(outcome.model), train_tokens=real_tokens * epochs_run,
                      train_sequences=len(lengths["train"]) * epochs_run, mean_length=real_tokens / len(lengths["train"]),
                      eval_tokens=sum(lengths["validation"]) * len(metrics["history"]))
    return {"train_wall_s": metrics["train"]["runtime_s"], "train_samples": len(lengths["train"]) * epochs_run,
            "real_tokens": real_tokens * epochs_run, "mcc": metrics["validation"]["matthews_correlation"],
            "gflop": flops / 1e9, "precision": metrics["precision"], "epoch_peak_rss_gb": epoch_peaks}


def peak_rss_at_each_epoch_end() -> list[float]:
    """The process's peak RSS so far at the end of each training epoch (before its evaluation), in GB:
    where memory grows epoch after epoch. Counted from the Trainer's callback handler, so the run's
    own code is untouched."""
    from transformers.trainer_callback import CallbackHandler

    peaks: list[float] = []
    on_epoch_end = CallbackHandler.on_epoch_end

    def record(self, args, state, control):
        peaks.append(round(peak_rss_gb(), 3))
        return on_epoch_end(self, args, state, control)

    CallbackHandler.on_epoch_end = record
    return peaks


# ---------------------------------------------------------------- driver


def run_contender(name: str, glue_dir: Path, epochs: float | None, extra: list[str] = ()) -> dict:
    """Run one contender in a fresh process; returns its report with peak RSS."""
    cmd = [sys.executable, __file__, "--contender", name, "--glue_dir", str(glue_dir)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if name == "gluetune":
        cmd += [arg for o in extra for arg in ("--set", o)]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env())
    if result.returncode != 0:
        sys.exit(f"contender {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one epoch for (b) and (c) instead of the config's")
    parser.add_argument("--glue_dir", default=str(ROOT / ".." / "shared" / "data" / "glue"))
    parser.add_argument("--contender", choices=["runglue", "dynamic", "gluetune"], help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for (c) only, to try a setting against the shipped one")
    args = parser.parse_args()
    glue_dir = Path(args.glue_dir).resolve()

    if args.contender:  # child process: run one contender, print its report as JSON
        import warnings

        import transformers

        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
        with tempfile.TemporaryDirectory() as tmp:
            if args.contender == "gluetune":
                report = gluetune_run(glue_dir, args.epochs, Path(tmp) / "run", args.set)
            else:
                report = plain_trainer_run(glue_dir, args.epochs, args.contender == "runglue", Path(tmp) / "run")
        report["peak_rss_gb"] = peak_rss_gb()
        print(json.dumps(report))
        return

    epochs = 1.0 if args.quick else None
    print(machine_line())
    changed = f"; (c) with --set {' '.join(args.set)}, not the shipped config" if args.set else ""
    print(f"config: {CONFIG.relative_to(ROOT)}{' (--quick: 1 epoch)' if args.quick else ''}{changed}; data: {glue_dir / 'CoLA'}")
    reports = {}
    for name, label in (("runglue", "(a) run_glue default, pad to 128"), ("dynamic", "(b) Trainer+PEFT, dynamic padding"),
                        ("gluetune", "(c) gluetune")):
        r = run_contender(name, glue_dir, epochs, args.set)
        r["samples_per_s"] = r["train_samples"] / r["train_wall_s"]
        r["real_tokens_per_s"] = r["real_tokens"] / r["train_wall_s"]
        reports[name] = r
        mcc = f" mcc={r['mcc']:.4f}" if "mcc" in r else ""
        print(f"{label:38s} train_wall_s={r['train_wall_s']:.1f} samples/s={r['samples_per_s']:.1f} "
              f"real_tokens/s={r['real_tokens_per_s']:.0f} peak_rss_gb={r['peak_rss_gb']:.2f}{mcc}", flush=True)
        if r.get("epoch_peak_rss_gb"):
            print(f"{'':38s} peak RSS at each epoch's end (GB): {' '.join(f'{g:.2f}' for g in r['epoch_peak_rss_gb'])}")
    a, b, c = reports["runglue"], reports["dynamic"], reports["gluetune"]
    peak, how = peak_gflops(c["precision"])
    achieved = c["gflop"] / c["train_wall_s"]
    print(f"(c) arithmetic: {c['gflop']:.0f} GFLOP in {c['train_wall_s']:.1f} s = {achieved:.1f} GFLOP/s achieved "
          f"({c['precision']}); machine peak for {c['precision']} about {peak:.0f} GFLOP/s ({how}, an estimate): "
          f"{achieved / peak:.0%} of it" if peak else f"(c) arithmetic: {achieved:.1f} GFLOP/s achieved; peak: {how}")
    print(f"RESULT speedup_vs_runglue={c['samples_per_s'] / a['samples_per_s']:.2f} "
          f"speedup_vs_dynamic={c['samples_per_s'] / b['samples_per_s']:.2f} mcc_gluetune={c['mcc']:.4f} "
          f"mcc_baseline={b['mcc']:.4f} peak_rss_gb={c['peak_rss_gb']:.2f} gflops={achieved:.1f}")


if __name__ == "__main__":
    main()
