"""Model cards: a README.md with hub metadata (huggingface_hub's ModelCard tools) and what a reader
needs to trust or reuse the model: results, how it was trained and selected, labels, limits, and
the command that reproduces it.

`write_card(run)` describes a run folder (a LoRA adapter, or a fully fine-tuned model);
`write_card(export, run)` describes a standalone folder exported from that run.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from ..config import quantization
from ..config.run import CONFIG_FILENAME, RunConfig, load_saved_config
from ..errors import UserError
from . import rundir
from .report import final_metrics_table, history_table, kept_row
from .rundir import read_metrics

CARD_FILENAME = "README.md"
HEAD_NAMES = ("classifier", "score")  # what peft calls sequence-classification heads (trained in full anyway)
GLUE_DATASET = "nyu-mll/glue"  # the hub dataset GLUE tasks come from (or its original TSV files)


def write_card(folder: str | Path, run_folder: str | Path | None = None) -> Path:
    """Write `folder`/README.md: the card of the run in `folder`, or of an export of `run_folder`."""
    folder = Path(folder)
    run = Path(run_folder) if run_folder is not None else folder
    if not (run / CONFIG_FILENAME).is_file() or not rundir.is_finished(run):
        raise UserError(f"{run}: not a finished gluetune run (needs {CONFIG_FILENAME} and {rundir.METRICS_FILENAME}); "
                        "a model card describes a finished run, or an export of one")
    facts = RunFacts.read(run)
    is_export = run_folder is not None and folder.resolve() != run.resolve()
    from huggingface_hub import ModelCard

    card = ModelCard(f"---\n{card_data(facts, is_export).to_yaml()}\n---\n\n{card_body(facts, folder, is_export)}")
    path = folder / CARD_FILENAME
    card.save(path)
    return path


@dataclasses.dataclass
class RunFacts:
    """What a finished run folder says about itself."""

    folder: Path
    config: RunConfig
    metrics: dict
    record: dict  # run_record.json; empty when missing

    @classmethod
    def read(cls, folder: Path) -> RunFacts:
        record_path = folder / rundir.RECORD_FILENAME
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        return cls(folder, load_saved_config(folder), read_metrics(folder), record)

    @property
    def is_lora(self) -> bool:
        return self.config.peft.method == "lora"

    @property
    def is_glue(self) -> bool:
        return bool(self.config.dataset.subset)

    @property
    def dataset_id(self) -> str:
        return GLUE_DATASET if self.is_glue else self.config.task.name

    @property
    def dataset_title(self) -> str:
        task = self.config.task
        if not self.is_glue:
            return f"{task.name} (custom data)"
        return f"GLUE {task.local.dir_name if task.local else task.name}"  # GLUE's own spelling: CoLA, STS-B


# ---------------------------------------------------------------- metadata


def card_data(facts: RunFacts, is_export: bool):
    """The card's YAML header: what the hub indexes (base model, task, data, results)."""
    from huggingface_hub import EvalResult, ModelCardData

    task = facts.config.task
    results = [
        EvalResult(
            task_type="text-classification", task_name="Text Classification",
            dataset_type=facts.dataset_id, dataset_name=facts.dataset_title,
            dataset_config=facts.config.dataset.subset, dataset_split=split,
            metric_type=name, metric_name=name, metric_value=facts.metrics[split][name],
        )
        for split in task.validation_splits if split in facts.metrics
        for name in task.metrics if name in facts.metrics[split]
    ]
    tags = ["gluetune", "text-classification", "lora" if facts.is_lora else "full-fine-tuning"]
    if facts.is_glue:
        tags += ["glue", task.name]
    return ModelCardData(
        model_name=facts.folder.name,
        base_model=facts.config.model.name_or_path,
        library_name="peft" if facts.is_lora and not is_export else "transformers",
        pipeline_tag="text-classification",
        datasets=[GLUE_DATASET] if facts.is_glue else None,
        metrics=list(task.metrics),
        tags=tags,
        eval_results=results,
    )


# ---------------------------------------------------------------- the text


def card_body(facts: RunFacts, folder: Path, is_export: bool) -> str:
    sections = [
        _overview(facts, folder, is_export),
        _results(facts),
        _labels(facts),
        _training(facts),
        _selection(facts),
        _intended_use(facts),
        _reproduce(facts),
    ]
    return "\n\n".join(sections) + "\n"


def _overview(facts: RunFacts, folder: Path, is_export: bool) -> str:
    config = facts.config
    method = "LoRA" if facts.is_lora else "full fine-tuning"
    lines = [f"# {facts.folder.name}", "",
             (f"`{config.model.name_or_path}` fine-tuned with {method} by gluetune for {facts.dataset_title} "
             f"sentence{' pair' if len(config.task.text_columns) == 2 else ''} classification.")]
    if is_export:
        saved = _saved_model_config(folder)
        code_file = _remote_code_file(saved)
        trust = ", trust_remote_code=True" if code_file else ""
        # truncation=True: the pipeline does not truncate by default; the export's tokenizer cuts at
        # the run's max_length, as gluetune did in training and does in `gluetune predict`.
        lines += ["", f"A standalone export of the run `{facts.folder.name}`: "
                  + ("the LoRA adapter merged into the base weights, " if facts.is_lora else "")
                  + ("the full-precision ones (it trained over a quantized base), "
                     if config.model.quantization else "")
                  + f"weights in {_saved_dtype(saved)}"
                  + (f", computing under {saved['gluetune_autocast']} autocast as its run did (model.precision)"
                     if saved.get("gluetune_autocast") else "") + ".",
                  "", "```python", "from transformers import pipeline", "",
                  f'classify = pipeline("text-classification", model="path/to/this/folder"{trust}, truncation=True)',
                  f"classify({_example_input(config)})", "```"]
        if code_file:
            lines += ["", (f"`{code_file}` holds what stock transformers cannot express of how this "
                      "model was trained (its first lines say what); read it before trusting it.")]
    elif facts.is_lora:
        lines += ["", ("This folder holds the LoRA adapter and the trained head; load it with gluetune "
                  f"(`gluetune predict --model_path {facts.folder.name} ...`) or peft, or make a standalone "
                  "model of it with `gluetune export`.")]
    return "\n".join(lines)


def _saved_model_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    return json.loads(config_path.read_text()) if config_path.is_file() else {}


def _saved_dtype(saved: dict) -> str:
    return str(saved.get("dtype") or saved.get("torch_dtype") or "float32")


def _remote_code_file(saved: dict) -> str | None:
    """The custom code file a saved config.json points the Auto classes at (`auto_map`), if any."""
    auto_map = saved.get("auto_map") or {}
    return next((target.split(".")[0] + ".py" for target in auto_map.values() if isinstance(target, str)), None)


def _example_input(config: RunConfig) -> str:
    if len(config.task.text_columns) == 2:
        return '{"text": "A first sentence.", "text_pair": "A second sentence."}'
    return '"The book was written by John."'


def _results(facts: RunFacts) -> str:
    kept = kept_row(facts.metrics)
    where = f" (the model of epoch {kept['epoch']:g}, see below)" if kept else ""
    lines = ["## Results", "", f"On the validation split{where}:", "",
             final_metrics_table(facts.metrics, facts.config.task)]
    for split in facts.config.task.validation_splits:
        if facts.metrics.get(split, {}).get("predicted_classes") == 1:
            lines += ["", f"**Degenerate model:** it predicts one class for every {split} example."]
    return "\n".join(lines)


def _labels(facts: RunFacts) -> str:
    task = facts.config.task
    if task.is_regression:
        return "## Labels\n\nOne output: a score (regression), read as is."
    rows = [f"| {i} | {name} |" for i, name in enumerate(task.label_names)]
    return "\n".join(["## Labels", "", "| id | label |", "|---|---|", *rows])


def _training(facts: RunFacts) -> str:
    config, train = facts.config, facts.metrics.get("train", {})
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    for name, value in _hyperparameters(facts):
        lines.append(f"| {name} | {_cell(value)} |")
    if train.get("runtime_s") is not None:
        lines.append(f"| training time | {train['runtime_s']:.0f} s on {facts.metrics.get('device', '?')} |")
    data = config.dataset
    limits = [f"{what} limited to {n} examples" for what, n in
              (("training", data.max_train_samples), ("validation", data.max_eval_samples)) if n]
    if limits:
        lines += ["", f"Data: {'; '.join(limits)} (dataset.max_*_samples)."]
    lines += ["", "### Per epoch (validation)", "", history_table(facts.metrics, config.task)]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text for a markdown table cell: a bare | (as in a target_modules regex) would split the cell."""
    return text.replace("|", r"\|")


def _hyperparameters(facts: RunFacts) -> list[tuple[str, str]]:
    config, metrics, training = facts.config, facts.metrics, facts.config.training
    train = metrics.get("train", {})
    rows = [("base model", f"`{config.model.name_or_path}`" + _exactly(facts.record.get("model_source") or {}))]
    if config.model.pooling:
        rows.append(("pooling", config.model.pooling))
    if config.model.quantization:
        rows.append(("base quantization (training)", quantization.describe(config.model.quantization)))
    if facts.is_lora:
        peft = config.peft
        rows += [("method", "LoRA" + (" (rsLoRA)" if peft.use_rslora else "") + (" (DoRA)" if peft.use_dora else "")),
                 ("LoRA r / alpha / dropout", f"{peft.lora_r} / {peft.lora_alpha:g} / {peft.lora_dropout:g}"),
                 ("LoRA targets", f"`{peft.target_modules}`" if peft.target_modules else "peft's default"),
                 ("trained in full", ", ".join(["the head", *(m for m in peft.modules_to_save or [] if m not in HEAD_NAMES)]))]
    else:
        rows.append(("method", "full fine-tuning"))
    if metrics.get("trainable_parameters"):
        share = 100 * metrics["trainable_parameters"] / metrics["total_parameters"]
        rows.append(("trainable parameters", (f"{metrics['trainable_parameters']:,} of {metrics['total_parameters']:,} "
                                             f"({share:.3f} %)")))
    batch, accumulation = training.get("per_device_train_batch_size", 8), training.get("gradient_accumulation_steps", 1)
    processes = train.get("processes", 1)
    effective = train.get("effective_batch_size", batch * accumulation * processes)
    rows += [("epochs", f"{training.get('num_train_epochs', 3):g}"),
             ("learning rate", f"{training.get('learning_rate', _default('learning_rate')):g}"),
             ("batch", f"{batch} per device x {accumulation} accumulation x {processes} process(es)"
                       + (f" x {train['gpus_per_process']} GPUs" if train.get("gpus_per_process", 1) > 1 else "")
                       + f" = {effective}"),
             ("optimizer", _optimizer(facts)),
             ("schedule", f"{training.get('lr_scheduler_type', _default('lr_scheduler_type'))}, {_warmup(training)}"),
             ("weight decay", f"{training.get('weight_decay', _default('weight_decay')):g}"),
             ("precision", _precision(metrics)),
             ("max length", f"{config.dataset.max_length} tokens"),
             ("seed", str(facts.record.get("seed", training.get("seed", "?"))))]
    return rows


def _exactly(source: dict) -> str:
    """Which base exactly (run_record.json's model_source): a hub commit, or a digest of local content."""
    if source.get("commit"):
        return f" at commit `{source['commit']}`"
    if source.get("sha256"):
        what = "the GGUF file" if source.get("gguf_file") else "its files"
        version = f", package version {source['package_version']}" if source.get("package_version") else ""
        return f" (sha256 of {what} `{source['sha256'][:16]}...`{version})"
    return ""


def _precision(metrics: dict) -> str:
    """bf16 on a CPU names the CPU's bf16 instructions: its kernels, and so the run's figures, differ by them."""
    precision = str(metrics.get("precision", "?"))
    if precision == "bf16" and metrics.get("device") == "cpu" and metrics.get("cpu_bf16"):
        return f"bf16 (CPU autocast, {metrics['cpu_bf16']})"
    return precision


def _optimizer(facts: RunFacts) -> str:
    """The optimizer that ran (run_record.json), and the configured one where this machine ran another
    in its place (an 8-bit AdamW without bitsandbytes, the fast path's fused AdamW)."""
    configured = str(facts.config.training.get("optim", _default("optim")))
    ran = facts.record.get("optimizer") or configured  # runs of old recorded none
    return ran if ran == configured else f"{ran} (configured: {configured})"


def _warmup(training: dict) -> str:
    # transformers v5 takes a ratio as warmup_steps below 1 (and still accepts warmup_ratio)
    value = training.get("warmup_ratio") or training.get("warmup_steps") or 0
    if not value:
        return "no warmup"
    return f"warmup over {value:.0%} of the steps" if value < 1 else f"warmup over {value:g} steps"


def _default(name: str):
    """transformers' TrainingArguments default, for settings the config left out."""
    from transformers import TrainingArguments

    value = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}.get(name)
    return getattr(value, "value", value)  # enums (optim, scheduler) as their names


def _selection(facts: RunFacts) -> str:
    metrics, training = facts.metrics, facts.config.training
    primary, split = metrics.get("primary_metric"), metrics.get("primary_split", "validation")
    best = metrics.get("best_checkpoint")
    if not best:
        return "## Model selection\n\nNo best checkpoint was recorded: the final model is the one described."
    order = "higher" if training.get("greater_is_better", True) else "lower"
    epoch = metrics.get("best_epoch")
    at_epoch = f" of epoch {epoch:g}" if epoch is not None else ""
    value = metrics.get("best_metric")
    shown = f" ({primary} {value:.4f})" if isinstance(value, (int, float)) else ""
    return ("## Model selection\n\n"
            f"The model was evaluated on the {split} split after each epoch; the checkpoint with the best "
            f"{primary} ({order} is better) was kept: `{best}`{at_epoch}{shown}. The results above are that model's.")


def _intended_use(facts: RunFacts) -> str:
    task = facts.config.task
    lines = ["## Intended use and limits", "",
             (f"- A research model for the {facts.dataset_title} benchmark task, for studying fine-tuning methods; "
             "not for production decisions, and not for judging people or their writing."),
             (f"- The figures are on the {facts.dataset_title} validation split, which also chose the checkpoint, "
             "so they are optimistic; GLUE's test labels are private (see `gluetune submit`).")]
    if task.name == "cola":
        lines.append("- CoLA figures are Matthews correlation over the validation sentences: 0 means no better than "
                     "chance, and a model predicting one class scores 0 whatever its accuracy.")
    if facts.config.dataset.max_train_samples or facts.config.dataset.max_eval_samples:
        lines.append("- Trained or evaluated on a subset of the data (see Training): a test run, not a benchmark result.")
    lines.append("- Inherits the limits and biases of its base model and of GLUE's English-only data.")
    return "\n".join(lines)


def _reproduce(facts: RunFacts) -> str:
    command = facts.record.get("command")
    lines = ["## Reproduce", ""]
    if command:
        lines += ["```bash", shlex.join(command), "```", ""]
    else:
        lines += ["The run record (run_record.json) with the command was not found.", ""]
    packages = facts.record.get("packages") or {}
    versions = ", ".join(f"{name} {version}" for name, version in packages.items() if version)
    lines.append(f"Seed {facts.record.get('seed', '?')}; the full settings are in the run's `{CONFIG_FILENAME}`"
                 + (f"; packages: {versions}" if versions else "") + ".")
    return "\n".join(lines)
