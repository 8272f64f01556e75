"""Prediction: load a trained output folder and classify texts, in length-sorted batches."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import methods
from ..config.run import CONFIG_FILENAME, RunConfig, load_saved_config
from ..console import bar
from ..data.tokenizing import encode_texts
from ..errors import UserError
from ..files import atomic_write_text
from ..model.classifier import load_tokenizer, load_trained, max_model_length
from ..model.precision import Precision, for_reading, of_run
from . import rundir

logger = logging.getLogger("gluetune")


@dataclass
class Prediction:
    label: str | float  # the label name, or the score for regression
    label_id: int | None
    probability: float | None  # of the predicted label


def saved_config(folder: str | Path, overrides: list[str] | None = None) -> RunConfig | None:
    """The config a gluetune output folder was trained with (for a checkpoint-N inside one, the
    folder's), with `overrides` applied; None for a folder gluetune did not write."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder not found: {folder}")
    for candidate in (folder, folder.parent):
        if (candidate / CONFIG_FILENAME).is_file():
            config = load_saved_config(candidate, overrides)
            rundir.pin_recorded_revision(config, candidate)  # the hub commit the run trained on
            return config
    return None


class Classifier:
    """A trained model with its tokenizer and task, ready to classify raw texts."""

    def __init__(self, model, tokenizer, config: RunConfig, batch_size: int = 64, precision: Precision | None = None):
        """`precision`: how the model computes (model.precision; from_folder gives the run's); by default
        bf16 autocast for a model whose weights are bf16, none otherwise."""
        import torch

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.task = config.task
        self.batch_size = batch_size
        self.max_length = min(config.dataset.max_length, max_model_length(model) or config.dataset.max_length)
        full = config.peft.method == "full"
        self.precision = precision or of_run("bf16" if model.dtype == torch.bfloat16 else "fp32", full)

    @classmethod
    def from_folder(
        cls, folder: str | Path, config: RunConfig | None = None, overrides: list[str] | None = None, batch_size: int = 64
    ) -> Classifier:
        """`folder` is a gluetune output folder (or a checkpoint in one), whose saved config is
        used with `overrides` applied; `config` is only needed for a folder gluetune did not
        write, such as a plain fine-tuned Hugging Face model."""
        import torch

        folder = Path(folder)
        saved = saved_config(folder, overrides)
        if saved is not None:
            config = saved
            if (folder / CONFIG_FILENAME).is_file() and not rundir.is_finished(folder):
                raise UserError(
                    f"{folder}: its run has not finished (no {rundir.METRICS_FILENAME}); finish it with "
                    "`gluetune train ... --resume`, or pass one of its checkpoint-N folders"
                )
        elif config is None:
            raise UserError(f"{folder} holds no {CONFIG_FILENAME}: is it a gluetune output folder? (or pass --config)")
        elif not (folder / "adapter_config.json").is_file():
            config.peft = methods.METHODS["full"].Config()

        has_tokenizer = (folder / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(config.model, path=str(folder) if has_tokenizer else None)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # As the run evaluated itself: its precision and autocast (model.precision), where this machine has them.
        precision = for_reading(rundir.evaluated_in(folder, config), config.peft.method == "full")
        model = load_trained(config, folder, tokenizer.pad_token_id, precision)  # a quantized base loads as trained
        if not config.model.quantization:  # a quantized one is placed as it loads
            model.to(device)
        return cls(model, tokenizer, config, batch_size=batch_size, precision=precision)

    def logits(self, texts: list[tuple[str, ...]]) -> np.ndarray:
        import torch
        from transformers import DataCollatorWithPadding

        if not texts:
            return np.zeros((0, self.task.num_labels), dtype=np.float32)
        enc, truncated = encode_texts(self.tokenizer, texts, self.max_length)
        if truncated:
            logger.warning("%d input(s) longer than %d tokens were truncated", truncated, self.max_length)
        keys = [k for k in enc if k in ("input_ids", "attention_mask", "token_type_ids")]
        collate = DataCollatorWithPadding(self.tokenizer)
        order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
        device = next(self.model.parameters()).device
        out = np.zeros((len(texts), self.task.num_labels), dtype=np.float32)
        starts = range(0, len(order), self.batch_size)
        with torch.inference_mode():
            for start in bar(starts, total=len(starts), desc="predict", unit="batch"):
                rows = order[start : start + self.batch_size]
                batch = collate([{k: enc[k][i] for k in keys} for i in rows])
                batch = {k: v.to(device) for k, v in batch.items()}
                with self.precision.autocast(device.type):
                    out[rows] = self.model(**batch).logits.float().cpu().numpy()
        return out

    def predict(self, texts: list[str | tuple[str, ...]]) -> list[Prediction]:
        """Label and probability for each text (a string, or a tuple of two for pair tasks)."""
        texts = [(t,) if isinstance(t, str) else tuple(t) for t in texts]
        for i, text in enumerate(texts):
            if len(text) != len(self.task.text_columns):
                raise UserError(f"input {i + 1}: expected {len(self.task.text_columns)} text(s) ({', '.join(self.task.text_columns)})")
            if not any(part.strip() for part in text):
                raise UserError(f"input {i + 1} is empty; give a sentence to classify")
        logits = self.logits(texts)
        if self.task.is_regression:
            return [Prediction(label=float(v), label_id=None, probability=None) for v in logits[:, 0]]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        ids = probs.argmax(axis=1)
        return [Prediction(self.task.label_names[i], int(i), float(p[i])) for i, p in zip(ids, probs)]


def write_predictions(path: str | Path, texts: list[tuple[str, ...]], predictions: list[Prediction], columns) -> None:
    """Predictions beside their inputs: JSON Lines for .jsonl, CSV for .csv, TSV otherwise."""
    import io

    rows = []
    for i, (text, p) in enumerate(zip(texts, predictions)):
        row = {"index": i, **dict(zip(columns, text)), "label": p.label}
        if p.probability is not None:
            row["probability"] = round(p.probability, 6)
        rows.append(row)
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        buffer = io.StringIO()
        delimiter = "," if path.suffix.lower() == ".csv" else "\t"
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), delimiter=delimiter, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    atomic_write_text(path, text)
