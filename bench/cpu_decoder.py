#!/usr/bin/env python
"""The reference recipe on a real pretrained decoder, on the CPU: SmolLM2-135M or Gemma-3-270M + LoRA on CoLA.

Prints, for CoLA's validation set (1,043 sentences), with the machine it ran on:

  (a) frozen features + logistic regression: the model's last-token hidden state (the token
      the classification head reads) as features, scikit-learn's LogisticRegression with C
      chosen by 5-fold cross-validation on the training set; what the pretrained model knows
      without fine-tuning;
  (b) the majority class (every sentence "acceptable"): MCC 0 by definition;
  (c) the LoRA recipe (--config, SmolLM2's by default), median over seeds, from a `gluetune
      sweep` (run here, or finished from an existing --sweep_dir);
  (d) with --compare CONFIG: that config's LoRA recipe on the same seeds (its own --compare_sweep_dir).

(Full fine-tuning of the same model is left out: on these 2 cores one epoch of it takes longer
than the whole LoRA budget.)

    python bench/cpu_decoder.py --glue_dir ../shared/data/glue [--seeds 1,2,3] [--sweep_dir sweeps/smollm2]
    python bench/cpu_decoder.py --probe_only     # (a) and (b) only (about 4 minutes)
    python bench/cpu_decoder.py --config configs/glue_cola_gemma3_cpu.yaml --sweep_dir sweeps/cola_gemma3_cpu \
        --compare configs/glue_cola_smollm2_cpu.yaml --compare_sweep_dir sweeps/cola_smollm2_cpu --reuse_only

A sweep folder's finished seeds are reused and its missing ones trained (one `gluetune sweep` per
config); --reuse_only trains nothing and stops, naming the command, where a seed is not finished
(so the seeds can be trained apart, e.g. one `gluetune sweep --seeds 2` at a time, and read here).
--smoke runs every step on a few sentences (a 128-sentence probe, 32-sentence runs, in a temporary
folder unless the sweep folders are given) to check the script, not the models.

The last line is `RESULT probe_mcc=.. lora_median_mcc=.. margin=..` (+ ` compare_median_mcc=..`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/machine.py, importable because the scripts run as python bench/<name>.py
from machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "glue_cola_smollm2_cpu.yaml"
SMOKE_SENTENCES = 128
SMOKE_RUN = ["dataset.max_train_samples=32", "dataset.max_eval_samples=32", "training.num_train_epochs=1",
             "training.report_to=none"]


def last_token_features(config, sentences: list[str], batch_size: int = 64):
    """The decoder's final hidden state at each sentence's last real token, as the head reads it."""
    import numpy as np
    import torch
    from transformers import AutoModel

    from gluetune.model import classifier as models
    from gluetune.model import sources

    tokenizer = models.load_tokenizer(config.model)
    model = AutoModel.from_pretrained(sources.resolve(config.model), dtype=torch.float32).eval()
    order = np.argsort([len(s) for s in sentences])
    features = np.zeros((len(sentences), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer([sentences[i] for i in rows], padding=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            # the rightmost attended position, whichever side the tokenizer pads (Gemma's: the left)
            mask = batch["attention_mask"]
            last = (mask * torch.arange(mask.shape[1])).argmax(dim=1)
            features[rows] = hidden[torch.arange(len(rows)), last].numpy()
    return features


def frozen_probe(config, glue_dir: Path, limit: int | None = None) -> dict:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, matthews_corrcoef
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from gluetune.data.loading import read_glue_split

    started = time.time()
    train = read_glue_split(glue_dir, config.task, "train")
    dev = read_glue_split(glue_dir, config.task, "validation")
    if limit:
        train, dev = train.select(range(limit)), dev.select(range(limit))
    x_train = last_token_features(config, list(train["sentence"]))
    x_dev = last_token_features(config, list(dev["sentence"]))
    y_train, y_dev = np.asarray(train["label"]), np.asarray(dev["label"])
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                          {"logisticregression__C": [0.001, 0.01, 0.1, 1.0]}, cv=5, scoring="matthews_corrcoef")
    search.fit(x_train, y_train)
    predicted = search.predict(x_dev)
    return {"mcc": float(matthews_corrcoef(y_dev, predicted)), "accuracy": float(accuracy_score(y_dev, predicted)),
            "C": search.best_params_["logisticregression__C"], "seconds": time.time() - started,
            "majority_accuracy": float(np.mean(y_dev == 1))}


def sweep_command(config: Path, glue_dir: Path, seeds: str, sweep_dir: Path, jobs: int, extra: list[str]) -> list[str]:
    return ["-m", "gluetune", "sweep", "--config", str(config), "--set", f"dataset.data_dir={glue_dir}", "--seeds",
            seeds, "--sweep_dir", str(sweep_dir), "--jobs", str(jobs), *[arg for item in extra for arg in ("--set", item)]]


def lora_sweep(config: Path, glue_dir: Path, seeds: str, sweep_dir: Path, jobs: int, extra: list[str]) -> None:
    """Run (or finish) the sweep of `config`: its finished seeds are skipped."""
    subprocess.run([sys.executable, *sweep_command(config, glue_dir, seeds, sweep_dir, jobs, extra)], check=True)


def finished_runs(config: Path, glue_dir: Path, seeds: str, sweep_dir: Path, extra: list[str]) -> list[dict]:
    runs = []
    for seed in seeds.split(","):
        path = sweep_dir / "default" / f"seed-{seed}" / "metrics.json"
        if not path.is_file():
            sys.exit(f"cpu_decoder.py: {path} not found (seed {seed} of {config.name} not finished); train it with: "
                     f"OMP_NUM_THREADS=1 python {shlex.join(sweep_command(config, glue_dir, seed, sweep_dir, 1, extra))}")
        metrics = json.loads(path.read_text())
        runs.append({"seed": int(seed), "mcc": metrics["validation"]["matthews_correlation"],
                     "accuracy": metrics["validation"]["accuracy"], "best_epoch": metrics.get("best_epoch"),
                     "train_s": metrics["train"]["runtime_s"]})
    return runs


def describe(label: str, config: Path, runs: list[dict], extra: list[str]) -> float:
    mccs = [r["mcc"] for r in runs]
    per_seed = ", ".join(f"seed {r['seed']}: {r['mcc']:.4f} (epoch {r['best_epoch']}, {r['train_s']:.0f} s)" for r in runs)
    median = statistics.median(mccs)
    print(f"{label} LoRA recipe ({config.name}{' ' + ' '.join(extra) if extra else ''}): median mcc={median:.4f} "
          f"mean={statistics.fmean(mccs):.4f} min={min(mccs):.4f} max={max(mccs):.4f} "
          f"accuracy median={statistics.median(r['accuracy'] for r in runs):.4f}; {per_seed}", flush=True)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", default=str(ROOT / ".." / "shared" / "data" / "glue"))
    parser.add_argument("--config", type=Path, default=CONFIG, help="the decoder's LoRA recipe (probe and (c))")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--sweep_dir", type=Path, default=None, help="default: sweeps/<the config's name without glue_>")
    parser.add_argument("--compare", type=Path, default=None, help="another config's LoRA recipe on the same seeds (d)")
    parser.add_argument("--compare_sweep_dir", type=Path, default=None, help="default: as --sweep_dir, for --compare")
    parser.add_argument("--jobs", type=int, default=1, help="LoRA runs at once (the cores are shared out)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra overrides for (c)'s runs")
    parser.add_argument("--reuse_only", action="store_true", help="read finished sweep folders; train nothing")
    parser.add_argument("--probe_only", action="store_true")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_SENTENCES}-sentence probe, 32-sentence runs")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    smoke_dir = Path(tempfile.mkdtemp(prefix="cpu_decoder_smoke-")) if args.smoke else None
    try:
        run(args, Path(args.glue_dir).resolve(), smoke_dir)
    finally:
        if smoke_dir:
            shutil.rmtree(smoke_dir, ignore_errors=True)


def run(args, glue_dir: Path, smoke_dir: Path | None) -> None:
    from gluetune.config.run import load_config

    extra = [*args.extra, *(SMOKE_RUN if args.smoke else [])]
    # (config, its sweep folder, its overrides): (c), and (d) with --compare
    recipes = [(args.config, args.sweep_dir, extra)]
    if args.compare:
        recipes.append((args.compare, args.compare_sweep_dir, SMOKE_RUN if args.smoke else []))
    recipes = [(config, given or (smoke_dir or ROOT / "sweeps") / config.stem.removeprefix("glue_"), overrides)
               for config, given, overrides in recipes]
    if args.reuse_only and not args.probe_only:  # before the probe's minutes: every seed must be there
        for config_path, sweep_dir, overrides in recipes:
            finished_runs(config_path, glue_dir, args.seeds, sweep_dir, overrides)
    config = load_config(args.config, [f"dataset.data_dir={glue_dir}"])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{machine_line()}; load average at start {load}", flush=True)
    print(f"model: {config.model.name_or_path} {config.model.gguf_file}; data: {glue_dir / 'CoLA'}"
          f"{f'; SMOKE: {SMOKE_SENTENCES} sentences, 32-sentence runs' if args.smoke else ''}", flush=True)
    probe = frozen_probe(config, glue_dir, SMOKE_SENTENCES if args.smoke else None)
    print(f"(a) frozen last-token features + logistic regression (C={probe['C']:g}, 5-fold CV): "
          f"mcc={probe['mcc']:.4f} accuracy={probe['accuracy']:.4f} ({probe['seconds']:.0f} s)", flush=True)
    print(f"(b) majority class (acceptable): mcc=0.0000 accuracy={probe['majority_accuracy']:.4f}", flush=True)
    if args.probe_only:
        return
    medians = []
    for label, (config_path, sweep_dir, overrides) in zip(["(c)", "(d) same seeds,"], recipes):
        if not args.reuse_only:
            lora_sweep(config_path, glue_dir, args.seeds, sweep_dir, args.jobs, overrides)
        runs = finished_runs(config_path, glue_dir, args.seeds, sweep_dir, overrides)
        medians.append(describe(label, config_path, runs, overrides))
    compare = f" compare_median_mcc={medians[1]:.4f}" if len(medians) > 1 else ""
    print(f"RESULT probe_mcc={probe['mcc']:.4f} lora_median_mcc={medians[0]:.4f} margin={medians[0] - probe['mcc']:.4f}"
          f"{compare}")


if __name__ == "__main__":
    main()
