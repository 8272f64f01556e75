#!/usr/bin/env python
"""The reference recipe on a real pretrained decoder, on the CPU: SmolLM2-135M-Instruct + LoRA on CoLA.

Prints, for CoLA's validation set (1,043 sentences), with the machine it ran on:

  (a) frozen features + logistic regression: the same model's last-token hidden state (the
      token the classification head reads) as features, scikit-learn's LogisticRegression
      with C chosen by 5-fold cross-validation on the training set; what the pretrained model
      knows without fine-tuning;
  (b) the majority class (every sentence "acceptable"): MCC 0 by definition;
  (c) the LoRA recipe (configs/glue_cola_smollm2_cpu.yaml), median over seeds, from a
      `gluetune sweep` (run here, or finished from an existing --sweep_dir).

(Full fine-tuning of the same model is left out: on these 2 cores one epoch of it takes longer
than the whole LoRA budget.)

    python bench/cpu_decoder.py --glue_dir ../shared/data/glue [--seeds 1,2,3] [--sweep_dir sweeps/smollm2]
    python bench/cpu_decoder.py --probe_only     # (a) and (b) only (about 4 minutes)

The last line is `RESULT probe_mcc=.. lora_median_mcc=.. margin=..`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bench/machine.py, importable because the scripts run as python bench/<name>.py
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "glue_cola_smollm2_cpu.yaml"


def last_token_features(config, sentences: list[str], batch_size: int = 64):
    """The decoder's final hidden state at each sentence's last real token (right padding)."""
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
            last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last attended position
            features[rows] = hidden[torch.arange(len(rows)), last].numpy()
    return features


def frozen_probe(config, glue_dir: Path) -> dict:
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


def lora_sweep(glue_dir: Path, seeds: str, sweep_dir: Path, jobs: int, extra: list[str]) -> list[dict]:
    """Run (or finish) the sweep of the shipped config, then read its runs."""
    command = [sys.executable, "-m", "gluetune", "sweep", "--config", str(CONFIG), "--set",
               f"dataset.data_dir={glue_dir}", "--seeds", seeds, "--sweep_dir", str(sweep_dir), "--jobs", str(jobs),
               *[arg for item in extra for arg in ("--set", item)]]
    subprocess.run(command, check=True)
    runs = []
    for seed in seeds.split(","):
        metrics = json.loads((sweep_dir / "default" / f"seed-{seed}" / "metrics.json").read_text())
        runs.append({"seed": int(seed), "mcc": metrics["validation"]["matthews_correlation"],
                     "accuracy": metrics["validation"]["accuracy"], "best_epoch": metrics.get("best_epoch"),
                     "train_s": metrics["train"]["runtime_s"]})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", default=str(ROOT / ".." / "shared" / "data" / "glue"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--sweep_dir", default=str(ROOT / "sweeps" / "cola_smollm2_cpu"))
    parser.add_argument("--jobs", type=int, default=1, help="LoRA runs at once (the cores are shared out)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra overrides for the LoRA runs")
    parser.add_argument("--probe_only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from gluetune.config.run import load_config

    glue_dir = Path(args.glue_dir).resolve()
    config = load_config(CONFIG, [f"dataset.data_dir={glue_dir}"])
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {platform.python_version()}", flush=True)
    print(f"model: {config.model.name_or_path} {config.model.gguf_file}; data: {glue_dir / 'CoLA'}", flush=True)
    probe = frozen_probe(config, glue_dir)
    print(f"(a) frozen last-token features + logistic regression (C={probe['C']:g}, 5-fold CV): "
          f"mcc={probe['mcc']:.4f} accuracy={probe['accuracy']:.4f} ({probe['seconds']:.0f} s)", flush=True)
    print(f"(b) majority class (acceptable): mcc=0.0000 accuracy={probe['majority_accuracy']:.4f}", flush=True)
    if args.probe_only:
        return
    runs = lora_sweep(glue_dir, args.seeds, Path(args.sweep_dir), args.jobs, args.extra)
    mccs = [r["mcc"] for r in runs]
    per_seed = ", ".join(f"seed {r['seed']}: {r['mcc']:.4f} (epoch {r['best_epoch']}, {r['train_s']:.0f} s)" for r in runs)
    median = statistics.median(mccs)
    print(f"(c) LoRA recipe ({CONFIG.name}{' ' + ' '.join(args.extra) if args.extra else ''}): median mcc={median:.4f} "
          f"mean={statistics.fmean(mccs):.4f} min={min(mccs):.4f} max={max(mccs):.4f} "
          f"accuracy median={statistics.median(r['accuracy'] for r in runs):.4f}; {per_seed}", flush=True)
    print(f"RESULT probe_mcc={probe['mcc']:.4f} lora_median_mcc={median:.4f} margin={median - probe['mcc']:.4f}")


if __name__ == "__main__":
    main()
