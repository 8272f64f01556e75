#!/usr/bin/env python
"""Host overhead per optimizer step, on any machine: the framework's own work, not the model's.

A 2-layer, 32-wide random Qwen2 (the real Qwen2.5 tokenizer) on real CoLA sentences, the reference
run's settings (LoRA r 8 on q/k/v/o, batch 32 an optimizer step as 16 x 2), a few hundred optimizer
steps with no evaluation or checkpoint in the timed window. The model's arithmetic is negligible, so
what is timed is what a step costs the host: data loading and collation, the Trainer's loop, the
callbacks, the optimizer. On a GPU that host work is the whole step (docs/performance.md). Three
contenders, each in its own process, one process at a time:

- gluetune, plain path (configs/glue_cola_qwen.yaml as shipped);
- gluetune, fast path (`training.fast_path=true`: 32 x 1 in padded buckets, compiled layers);
- plain Trainer + PEFT, as gluetune's GPU benchmark runs it (dynamic padding, default sampler).

A shared machine's speed drifts by tens of percent from minute to minute, so the contenders run in
rounds (`--rounds`, 3 by default), each round every contender once, the order rotated from round to
round; a contender's figure is the median of its rounds with their spread (min-max), and its ratio to
the baseline is the median of the per-round ratios (each against the baseline of the same round). A
round's figure is optimizer steps/s in the steady state: the first 10 and the last 11 steps left out.
Then the top entries of a cProfile of gluetune's plain path and of the baseline (last round, the 10
steps before the last, outside the timed window). `--src DIR` times the gluetune contenders from
another source tree (older layouts included), to find when a slowdown came in:

    python bench/host_overhead.py
    git archive eaa228a src configs | tar -x -C /tmp/old && python bench/host_overhead.py --src /tmp/old/src --only plain
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from children import child_env, every_trainer_adds

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
CONFIG = ROOT / "configs" / "glue_cola_qwen.yaml"
WARMUP_STEPS = 10  # left out of the timed window (first batches, lazy set-up)
PROFILED_STEPS = 10
CONTENDERS = {"plain": "gluetune (plain path)", "fast": "gluetune (fast path)", "baseline": "Trainer + PEFT baseline"}


def build_tiny_qwen(folder: Path, tokenizer: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(folder)
    return folder


class StepClock:
    """Times every optimizer step's end; profiles the steps after the warm-up if asked."""

    def __init__(self, profile: bool):
        self.ends: list[float] = []
        self.profiler = cProfile.Profile() if profile else None

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.ends.append(time.perf_counter())
                # the last steps are profiled, after the timed window (a profiler slows what it watches)
                if clock.profiler is not None and state.global_step == state.max_steps - PROFILED_STEPS - 1:
                    clock.profiler.enable()
                elif clock.profiler is not None and state.global_step == state.max_steps - 1:
                    clock.profiler.disable()

        return Clock()

    def steps_per_s(self) -> float:
        timed = self.ends[WARMUP_STEPS:-PROFILED_STEPS - 1]
        return (len(timed) - 1) / (timed[-1] - timed[0])

    def top(self, entries: int) -> list[str]:
        out = io.StringIO()
        stats = pstats.Stats(self.profiler, stream=out)
        stats.sort_stats("tottime").print_stats(entries)
        total = sum(v[2] for v in stats.stats.values())
        lines = [f"{total / PROFILED_STEPS * 1000:.1f} ms of profiled host time per step; top {entries} by own time:"]
        keep = False
        for line in out.getvalue().splitlines():
            keep = keep or line.strip().startswith("ncalls")
            if keep and line.strip():
                lines.append(line.replace(str(Path(sys.prefix)), "<venv>").replace(str(ROOT), "<repo>"))
        return lines


def gluetune_entry_points():
    """(load_config, train, the tree's own reference config) of the gluetune on the path, in this layout
    (config/, training/ packages) or the older flat one (gluetune.config, gluetune.training modules)."""
    import gluetune

    try:
        from gluetune.config.run import load_config
        from gluetune.training.run import train
    except ImportError:
        from gluetune.config import load_config
        from gluetune.training import train
    own = Path(gluetune.__file__).resolve().parents[2] / "configs" / CONFIG.name
    return load_config, train, own if own.is_file() else CONFIG


def run_gluetune(model: Path, glue_dir: Path, out: Path, examples: int, epochs: int, fast: bool) -> None:
    load_config, train, config = gluetune_entry_points()
    overrides = [f"model.name_or_path={model}", f"dataset.data_dir={glue_dir}", f"training.output_dir={out}",
                 f"dataset.max_train_samples={examples}", "dataset.max_eval_samples=64",
                 f"training.num_train_epochs={epochs}", "training.eval_strategy=no", "training.save_strategy=no",
                 "training.load_best_model_at_end=false", "training.report_to=none", "training.bf16=false"]
    if fast:
        overrides.append("training.fast_path=true")
    train(load_config(config, overrides))


def run_baseline(model: Path, glue_dir: Path, out: Path, examples: int, epochs: int) -> None:
    import torch
    import transformers as hf
    from peft import LoraConfig, TaskType, get_peft_model

    sys.path.insert(0, str(ROOT / "src"))
    from gluetune.config.tasks import get_task
    from gluetune.data.loading import read_glue_split

    hf.set_seed(42)
    tokenizer = hf.AutoTokenizer.from_pretrained(model)
    train = read_glue_split(glue_dir, get_task("cola"), "train").select(range(examples))
    train = train.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=128), batched=True)
    base = hf.AutoModelForSequenceClassification.from_pretrained(model, num_labels=2, pad_token_id=tokenizer.pad_token_id,
                                                                 dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    args = hf.TrainingArguments(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=16,
                                gradient_accumulation_steps=2, learning_rate=3e-4, optim="adamw_torch",
                                eval_strategy="no", save_strategy="no", report_to="none", logging_steps=10, seed=42,
                                use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False)
    hf.Trainer(model=peft_model, args=args, train_dataset=train, data_collator=hf.DataCollatorWithPadding(tokenizer)).train()


def child(args) -> None:
    import warnings

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    # One thread: the tiny model needs no parallel arithmetic, and a thread pool's hand-offs would add
    # the machine's scheduling noise to the host work this measures.
    torch.set_num_threads(1)
    clock = StepClock(profile=args.profile and args.contender != "fast")  # compiled code hides from cProfile
    every_trainer_adds(clock.callback)
    with tempfile.TemporaryDirectory(prefix=f"host-overhead-{args.contender}-") as out:
        if args.contender == "baseline":
            run_baseline(Path(args.model), Path(args.glue_dir), Path(out), args.examples, args.epochs)
        else:
            run_gluetune(Path(args.model), Path(args.glue_dir), Path(out) / "run", args.examples, args.epochs,
                         args.contender == "fast")
    print(json.dumps({"steps": len(clock.ends), "steps_per_s": clock.steps_per_s(),
                      "profile": clock.top(args.top) if clock.profiler else []}))


def run_once(name: str, args, model: Path, src: Path, tmp: str, profile: bool) -> dict | None:
    cmd = [sys.executable, __file__, "--contender", name, "--model", str(model), "--glue_dir", args.glue_dir,
           "--examples", str(args.examples), "--epochs", str(args.epochs), "--top", str(args.top)]
    if profile:
        cmd.append("--profile")
    gluetune_src = src if name != "baseline" else ROOT / "src"
    env = child_env(gluetune_src, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"))
    started = time.perf_counter()
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"{CONTENDERS[name]}: failed\n{result.stderr[-3000:]}", flush=True)
        return None
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["process_s"] = time.perf_counter() - started
    return report


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "-"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", default=str(SHARED / "data" / "glue"))
    parser.add_argument("--tokenizer", default=str(SHARED / "assets" / "qwen2.5-tokenizer"))
    parser.add_argument("--examples", type=int, default=4800, help="CoLA training sentences (4800 x 2 epochs: 300 steps)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every contender once, alternating")
    parser.add_argument("--only", action="append", choices=list(CONTENDERS), help="time these contenders only")
    parser.add_argument("--src", help="the gluetune source tree the gluetune contenders import (default: this one's)")
    parser.add_argument("--top", type=int, default=15, help="profile entries to print")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        return child(args)

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from machine import cpu_name

    src = Path(args.src).resolve() if args.src else ROOT / "src"
    names = [name for name in CONTENDERS if name in (args.only or CONTENDERS)]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} (1 thread per contender), "
          f"python {platform.python_version()}; gluetune from {src}; load average at start {load()}", flush=True)
    print(f"tiny Qwen2 (2 layers, 32 wide), real CoLA: {args.examples} sentences x {args.epochs} epochs, batch 32 a step; "
          f"steps/s after the first {WARMUP_STEPS}; {args.rounds} rounds, one process at a time, order rotated", flush=True)
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_qwen(Path(tmp) / "model", Path(args.tokenizer))
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            results = {}
            for name in order:
                report = run_once(name, args, model, src, tmp, profile=r == args.rounds - 1)
                if report is not None:
                    results[name] = report
            rounds.append(results)
            print(f"round {r + 1}: " + ", ".join(f"{name} {results[name]['steps_per_s']:.2f}" for name in order
                                                 if name in results) + f" steps/s; load average {load()}", flush=True)
    print(f"{'contender':26s} {'steps':>5s} {'steps/s':>8s} {'min-max':>13s} {'ms/step':>8s} {'x baseline':>10s} "
          f"{'min-max':>11s} {'process_s':>9s}")
    for name in names:
        mine = [r[name] for r in rounds if name in r]
        if not mine:
            continue
        rates = [m["steps_per_s"] for m in mine]
        ratios = [r[name]["steps_per_s"] / r["baseline"]["steps_per_s"] for r in rounds if name in r and "baseline" in r]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        print(f"{CONTENDERS[name]:26s} {mine[0]['steps']:5d} {statistics.median(rates):8.2f} {spread(rates):>13s} "
              f"{1000 / statistics.median(rates):8.1f} {ratio:>10s} {spread(ratios) if ratios else '-':>11s} "
              f"{statistics.median(m['process_s'] for m in mine):9.0f}")
    for name, r in rounds[-1].items():
        if r["profile"]:
            print(f"\ncProfile of {CONTENDERS[name]}, last round, the {PROFILED_STEPS} steps before the last (not in the "
                  "timed window):")
            print("\n".join(r["profile"]))


if __name__ == "__main__":
    main()
