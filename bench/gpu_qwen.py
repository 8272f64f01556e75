#!/usr/bin/env python
"""GPU benchmark: the reference run's shapes (Qwen2.5-1.5B + LoRA on CoLA, 10 epochs, bf16).

The model is built from ../shared/assets/qwen2.5-configs/Qwen2.5-1.5B with random weights (no
download): right shapes, right speed and memory, meaningless accuracy. Real Qwen tokenizer, real
CoLA, the reference hyperparameters, per-epoch evaluation. Two contenders, each in its own
process: gluetune from configs/glue_cola_qwen.yaml, and the plain Trainer + PEFT baseline
(dynamic padding, fp32 weights under bf16 autocast, as run_glue.py loads them).

    python bench/gpu_qwen.py                 # on a CUDA machine (10 epochs: ~14 min per contender on an H200)
    python bench/gpu_qwen.py --fast --skip_gluetune --skip_baseline   # the fast path alone, cold then warm
    python bench/gpu_qwen.py --epochs 1 --fast --graphs --fast_epochs 10   # bench/gpu_device.sh's plan
    python bench/gpu_qwen.py --smoke         # the same pipeline on a tiny model, on any machine

`--fast` adds gluetune with `training.fast_path=true`, `--graphs` the fast path with whole-step CUDA
graphs (`training.cuda_graphs=true`), each timed twice: cold (an empty compile cache, compilation
included) and warm (the cache the cold run filled); `--fast_epochs` sets their epochs (default:
`--epochs`). `--set section.key=value` passes overrides to every gluetune contender, to compare the
fast path's leads one at a time.

It fails fast: every kind of contender first runs `--probe_steps` optimizer steps (20; each in its own
process and compile cache, so the cold runs stay cold), and the first probe that fails stops the
benchmark with its error, before any long run. Each run prints wall seconds, optimizer steps/s,
real tokens/s and peak memory, then its per-epoch training and evaluation seconds; `prepare_s` is
the time before the first step (model, data, and for the fast path the compile rehearsal).

Without CUDA (and without --smoke) it says so and exits 0. The device machine has no ../shared and
no internet: bench/gpu_device.sh stages the data, assets and pinned wheels, and runs this there.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from children import child_env  # (the bench folder is not a package)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
CONFIG = ROOT / "configs" / "glue_cola_qwen.yaml"
# --smoke checks the pipeline, not the numbers: this many training and validation sentences.
SMOKE_EXAMPLES = 128


def build_random_model(model_config: Path, tokenizer: Path, folder: Path, smoke: bool, layers: int | None = None) -> None:
    """A hub-style folder: random bf16 weights with the config's shapes (`layers` of its decoder layers,
    if given), and the real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    values = json.loads((model_config / "config.json").read_text())
    if smoke:
        values.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    if layers:
        values.update(num_hidden_layers=layers)
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
        "steps": steps,
        "steps_per_s": steps / wall,
        "real_tokens_per_s": real_tokens / wall,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else 0.0,
        "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved() / 1024**3 if cuda else 0.0,
        **extra,
    }


def cola_real_tokens(glue_dir: Path, tokenizer_path: Path, epochs: float, smoke: bool) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoTokenizer

    from gluetune.config.tasks import get_task
    from gluetune.data.loading import read_glue_split

    sentences = list(read_glue_split(glue_dir, get_task("cola"), "train")["sentence"])[: SMOKE_EXAMPLES if smoke else None]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return int(sum(len(ids) for ids in tokenizer(sentences)["input_ids"]) * epochs)


def epoch_timer(started: float):
    """A TrainerCallback timing each epoch's training and evaluation (and the time before the first step)."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the GPU's work so far, not just its launches
        return time.perf_counter()

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.prepare_s, self.train_s, self.eval_s, self.began = None, [], [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.prepare_s = now() - started

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.began = now()

        def on_epoch_end(self, args, state, control, **kwargs):
            self.train_s.append(now() - self.began)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.eval_s.append(sum(v for k, v in (metrics or {}).items() if k.endswith("_runtime")))

        def report(self) -> dict:
            return {"prepare_s": self.prepare_s, "epoch_train_s": list(self.train_s), "epoch_eval_s": list(self.eval_s)}

    return EpochTimer()


def run_gluetune(model: Path, glue_dir: Path, out: Path, epochs: float, extra_overrides: list[str], smoke: bool,
                 max_steps: int = 0) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from gluetune.config.run import load_config
    from gluetune.training.run import train

    overrides = [f"model.name_or_path={model}", f"dataset.data_dir={glue_dir}", f"training.output_dir={out}",
                 f"training.num_train_epochs={epochs}", *extra_overrides]
    if smoke:
        overrides += [f"dataset.max_train_samples={SMOKE_EXAMPLES}", f"dataset.max_eval_samples={SMOKE_EXAMPLES}"]
    if max_steps:
        overrides.append(f"training.max_steps={max_steps}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timer = epoch_timer(time.perf_counter())
    metrics = train(load_config(CONFIG, overrides), callbacks=[timer]).metrics
    wall = metrics["train"]["runtime_s"]
    tokens = cola_real_tokens(glue_dir, model, metrics["train"]["epochs"], smoke)
    return gpu_report(wall, metrics["train"]["steps"], tokens,
                      {"mcc": metrics["validation"]["matthews_correlation"], "trainable": metrics["trainable_parameters"],
                       **timer.report()})


def run_baseline(model: Path, glue_dir: Path, out: Path, epochs: float, smoke: bool, max_steps: int = 0) -> dict:
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
    from gluetune.config.tasks import get_task
    from gluetune.data.loading import read_glue_split

    started = time.perf_counter()
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
    dev = read_glue_split(glue_dir, cola, "validation")
    if smoke:
        dev = dev.select(range(SMOKE_EXAMPLES))
    dev = dev.map(encode, batched=True)
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
        report_to="none", logging_steps=50, seed=42, max_steps=max_steps or -1,
    )

    def mcc(p):
        return {"matthews_correlation": matthews_corrcoef(p.label_ids, p.predictions.argmax(-1))}

    timer = epoch_timer(started)
    trainer = Trainer(model=peft_model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=mcc, callbacks=[timer])
    started = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - started
    timings = timer.report()
    tokens = cola_real_tokens(glue_dir, model, trainer.state.epoch, smoke)
    return gpu_report(wall, trainer.state.global_step, tokens,
                      {"mcc": trainer.evaluate()["eval_matthews_correlation"], "train_runtime_s": result.metrics["train_runtime"],
                       **timings})


def child(args) -> None:
    import warnings

    import transformers

    from gluetune.console import setup_logging

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    setup_logging()  # gluetune's lines on stderr: the parent watches them (progress, a fast path's fallback)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{args.contender}-"))
    model, glue_dir = Path(args.model), Path(args.glue_dir)
    kind = args.contender.split()[0]
    if kind == "baseline":
        report = run_baseline(model, glue_dir, out, args.epochs, args.smoke, args.probe_steps)
    else:
        report = run_gluetune(model, glue_dir, out, args.epochs, [*CONTENDER_SETTINGS[kind], *args.overrides], args.smoke,
                              args.probe_steps)
    print(json.dumps(report), flush=True)


# What each gluetune contender sets on top of configs/glue_cola_qwen.yaml.
CONTENDER_SETTINGS = {
    "gluetune": [],
    "gluetune-compile": ["training.torch_compile=true"],
    "gluetune-fast": ["training.fast_path=true"],
    "gluetune-graphs": ["training.fast_path=true", "training.cuda_graphs=true"],
    "gluetune-qlora": ["model.quantization=4bit", "training.optim=paged_adamw_8bit"],
}
# A fast-path run whose compiled layers or graphs fell back would time something else: stopped at once.
FALLBACKS = ("rehearsal before training failed", "capturing the training step failed")


def run_child(args, name: str, model: Path, epochs: float, cache: Path, probe_steps: int = 0,
              timeout: float | None = None) -> tuple[dict | None, str]:
    """One contender in its own process: (its JSON report, or None, and why not: its last lines, or the
    line it fell back with, or the progress it had made when `timeout` seconds stopped it)."""
    cmd = [sys.executable, __file__, "--contender", name, "--model", str(model), "--glue_dir", args.glue_dir,
           "--epochs", str(epochs), "--probe_steps", str(probe_steps)] + (["--smoke"] if args.smoke else [])
    cmd += [arg for item in args.overrides for arg in ("--set", item)]
    env = child_env(PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(cache / "triton"))
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    timer = threading.Timer(timeout, process.kill) if timeout else None
    if timer:
        timer.start()
    lines, progress, fell_back = collections.deque(maxlen=60), "", ""
    for line in process.stdout:
        lines.append(line)
        if "] step " in line and "steps/s" in line:
            progress = line.strip()
        if not fell_back and any(marker in line for marker in FALLBACKS):
            fell_back = line.strip()
            process.kill()
    process.wait()
    timed_out = timer is not None and not timer.is_alive() and not fell_back and process.returncode != 0
    if timer:
        timer.cancel()
    if fell_back:
        return None, f"fell back, stopped: {fell_back}"
    if timed_out:
        return None, f"stopped at its time limit ({timeout:.0f} s); its last progress: {progress or 'none'}"
    reports = [line for line in lines if line.startswith("{")]
    if process.returncode != 0 or not reports:
        return None, "".join(lines)[-3000:]
    return json.loads(reports[-1]), ""


def seconds(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values) or "-"


def contenders_of(args, cuda: bool) -> list[tuple[str, float]]:
    """(name, epochs) in the order the GPU measurement needs them most, so that a time budget cuts the
    least needed: the fast path with CUDA graphs (the 10-epoch target), QLoRA's memory, the plain path
    and the baseline it is compared with, then the fast path without graphs and the warm runs."""
    fast_epochs = args.fast_epochs or args.epochs
    graphs = args.graphs and cuda
    plan = [("gluetune-graphs (cold)", args.graphs_epochs or fast_epochs)] if graphs else []
    plan += [("gluetune-qlora", args.qlora_epochs)] if args.qlora else []
    plan += [] if args.skip_gluetune else [("gluetune", args.epochs)]
    plan += [] if args.skip_baseline else [("baseline", args.epochs)]
    plan += [("gluetune-compile", args.epochs)] if args.compile else []
    plan += [("gluetune-fast (cold)", fast_epochs)] if args.fast else []
    plan += [("gluetune-graphs (warm)", args.graphs_epochs or fast_epochs)] if graphs else []
    plan += [("gluetune-fast (warm)", fast_epochs)] if args.fast else []
    return plan


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
    parser.add_argument("--graphs", action="store_true",
                        help="also time the fast path with whole-step CUDA graphs (training.cuda_graphs=true), cold and warm")
    parser.add_argument("--fast_epochs", type=float, help="epochs of the fast-path contenders (default: --epochs)")
    parser.add_argument("--graphs_epochs", type=float, help="epochs of the CUDA-graph contenders (default: --fast_epochs)")
    parser.add_argument("--qlora", action="store_true",
                        help="also time QLoRA: a 4-bit base and paged_adamw_8bit (bitsandbytes), for its peak memory")
    parser.add_argument("--qlora_epochs", type=float, default=0.25, help="epochs of the QLoRA contender (default 0.25)")
    parser.add_argument("--probe_steps", type=int, default=20,
                        help="optimizer steps each kind of contender runs first; a failure stops the benchmark (0: no probes)")
    parser.add_argument("--budget_s", type=float,
                        help="seconds for the whole script, model building included: a run still going then is "
                             "stopped (its last progress line printed) and the runs after it are skipped")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override for every gluetune contender, repeatable")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a tiny model, {SMOKE_EXAMPLES} sentences to train on and to evaluate: checks the script anywhere")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:
        return child(args)
    deadline = time.perf_counter() + args.budget_s if args.budget_s else None

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device here: bench/gpu_qwen.py measures the reference run on a GPU; nothing to do "
              "(--smoke runs the pipeline on a tiny model anywhere)")
        return
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu (smoke)"
    print(f"device: {device}; torch {torch.__version__}; model shapes: {Path(args.model_config).name}"
          f"{' shrunk (smoke)' if args.smoke else ''}; epochs: {args.epochs:g}", flush=True)
    if args.graphs and not cuda:
        print("gluetune-graphs: skipped (no CUDA here; training.cuda_graphs is refused without it)", flush=True)
    contenders = contenders_of(args, cuda)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        started = time.perf_counter()
        build_random_model(Path(args.model_config), Path(args.tokenizer), model, args.smoke)
        print(f"random-weight model written in {time.perf_counter() - started:.0f} s", flush=True)

        def time_left(name: str) -> float | None:
            """Seconds `name` may run (None: no budget); 0 after saying that it is skipped."""
            if deadline is None:
                return None
            left = deadline - time.perf_counter()
            if left < 30:
                print(f"{name}: skipped (the {args.budget_s:.0f} s budget is spent)", flush=True)
                return 0
            return left

        kinds = list(dict.fromkeys(name.split()[0] for name, _ in contenders))
        for kind in kinds if args.probe_steps > 0 else ():
            started = time.perf_counter()
            if (timeout := time_left(f"probe {kind}")) == 0:
                continue
            report, why = run_child(args, kind, model, args.epochs, Path(tmp) / f"probe-cache-{kind}", args.probe_steps,
                                    timeout)
            if report is None:
                print(f"{kind}: the {args.probe_steps}-step probe failed; stopping before the long runs\n{why}", flush=True)
                sys.exit(1)
            print(f"probe {kind:17s} {report['steps']} steps ok in "
                  f"{time.perf_counter() - started:.0f} s (prepare_s={report['prepare_s']:.1f})", flush=True)
        for name, epochs in contenders:
            kind = name.split()[0]
            if (timeout := time_left(name)) == 0:
                continue
            # one compile cache per kind: empty for its cold run, filled for its warm one
            report, why = run_child(args, name, model, epochs, Path(tmp) / f"cache-{kind}", timeout=timeout)
            if report is None:
                print(f"{name}: failed: {why}", flush=True)
                continue
            r = report
            print(f"{name:23s} epochs={epochs:g} wall_s={r['wall_s']:.1f} steps/s={r['steps_per_s']:.2f} "
                  f"real_tokens/s={r['real_tokens_per_s']:.0f} peak_gpu_gb={r['peak_gpu_gb']:.2f} "
                  f"(reserved {r['peak_gpu_reserved_gb']:.2f}) mcc={r['mcc']:.4f} prepare_s={r['prepare_s']:.1f}", flush=True)
            print(f"{'':23s} per epoch: train_s {seconds(r['epoch_train_s'])} | eval_s {seconds(r['epoch_eval_s'])}",
                  flush=True)


if __name__ == "__main__":
    main()
