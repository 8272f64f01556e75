"""How closely a run's exports predict what `gluetune predict` does, on the run's validation split.

    python bench/export_agreement.py --model_path <run>

Exports the run twice (the default fp32 weights, and --dtype bf16) into a temporary folder, loads each
as a user would (AutoModelForSequenceClassification + AutoTokenizer, trust_remote_code), and prints,
for each, the largest difference in probability from `Classifier.from_folder(run)` (gluetune predict)
and the share of validation examples given the same label.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

# bench/machine.py, importable because the scripts run as python bench/<name>.py
from machine import cpu_name


def export_probabilities(folder: Path, texts: list[tuple[str, ...]], batch_size: int = 64) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            columns = [list(c) for c in zip(*texts[start : start + batch_size])]
            batch = tokenizer(*columns, padding=True, truncation=True, return_tensors="pt")
            out.append(torch.softmax(model(**batch).logits.float(), dim=-1).numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True, help="a finished gluetune run folder")
    args = parser.parse_args(argv)

    import torch

    import gluetune
    from gluetune.data.loading import load_splits
    from gluetune.model.precision import cpu_bf16
    from gluetune.results import rundir
    from gluetune.results.export import export_folder
    from gluetune.results.prediction import Classifier

    run = Path(args.model_path)
    classifier = Classifier.from_folder(run)
    task = classifier.task
    if task.is_regression:
        parser.error(f"{run}: a regression task ({task.name}); this compares labels and probabilities")
    split = task.validation_splits[0]
    data = load_splits(classifier.config, [split])[split]
    texts = list(zip(*(data[c] for c in task.text_columns)))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores (bf16: {cpu_bf16()}), torch {torch.__version__}; "
          f"gluetune from {Path(gluetune.__file__).parent}", flush=True)
    print(f"run: {run} ({classifier.config.peft.method}, trained in {rundir.trained_precision(run)}); "
          f"{len(texts)} {split} examples", flush=True)
    logits = classifier.logits(texts)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    ours = shifted / shifted.sum(axis=1, keepdims=True)
    with tempfile.TemporaryDirectory(prefix="export-agreement-") as tmp:
        for dtype in ("fp32", "bf16"):
            export = export_folder(run, Path(tmp) / f"export-{dtype}", dtype=dtype)
            theirs = export_probabilities(export, texts)
            same = (theirs.argmax(axis=1) == ours.argmax(axis=1)).mean()
            print(f"export --dtype {dtype}: same label on {100 * same:.2f} % of {len(texts)} examples, "
                  f"largest probability difference {np.abs(theirs - ours).max():.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
