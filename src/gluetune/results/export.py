"""`gluetune export`: a finished run as a standalone Hugging Face model folder.

The LoRA adapter is merged into the base weights (`merge_and_unload`), the trained head and any
fully trained modules (`modules_to_save`) take their place, and the folder gets the label names,
the pad token, the tokenizer, safetensors weights in the chosen dtype and a model card. It loads
with `AutoModelForSequenceClassification.from_pretrained(folder)` and `pipeline("text-
classification", model=folder)`, and predicts what `Classifier.from_folder(run)` predicts.

Weights are merged in fp32 (the base read in full precision, whatever the run stored it in), then
cast to the chosen dtype: bf16 rounds the merged weights once, not the adapter's small delta into
an already rounded base.

Three things gluetune does are not expressible in a plain transformers folder; the export ships
them as custom code (`modeling_gluetune.py`, loaded with `trust_remote_code=True`), the way the
hub ships custom heads:
- `model.pooling: mean` (see `model.classifier.use_mean_pooling`): the head reads the mean of the tokens.
- pairs for a tokenizer without a pair template (decoders): gluetune encodes `a + "\\n" + b` as
  one text, which no post-processor can reproduce token for token (Qwen's pre-tokenizer merges
  ".\\n" into one token), so the exported tokenizer joins the pair before encoding, and cuts an
  over-long one as gluetune does (`data.tokenizing.pair_tokens_to_keep`).
- a full fine-tuning that trained in bf16 (or fp16) evaluated its fp32 weights under that autocast,
  and so does everything that reads its folder (model.precision): the exported model's forward runs
  under it too (config.json's `gluetune_autocast`), so it predicts what `gluetune predict` does. (A
  merged adapter computes in the export's dtype: see _run_autocast.)
Such a folder gets a model_type of its own, so that loading it without `trust_remote_code`
fails loudly instead of silently falling back to stock classes that predict differently.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..config import quantization
from ..config.run import CONFIG_FILENAME, RunConfig, load_saved_config
from ..data.tokenizing import PAIR_SEPARATOR, is_pair_template_tokenizer, pair_tokens_to_keep
from ..errors import UserError
from ..files import atomic_write_json, atomic_write_text
from ..model.classifier import load_tokenizer, load_trained, max_model_length, pool_the_mean
from ..model.precision import of_run, run_autocast
from . import card, rundir

DTYPES = ("fp32", "bf16", "fp16")
REMOTE_CODE_FILENAME = "modeling_gluetune.py"
REMOTE_CODE_MODULE = REMOTE_CODE_FILENAME.removesuffix(".py")
logger = logging.getLogger("gluetune")


def export_folder(model_path: str | Path, output_dir: str | Path, dtype: str = "fp32") -> Path:
    """Write the run in `model_path` as a standalone model folder `output_dir`; returns it."""
    run, output_dir = Path(model_path), Path(output_dir)
    torch_dtype = _torch_dtype(dtype)
    config = _finished_run_config(run)
    _check_output_dir(output_dir, run)
    model, tokenizer = _load_trained(run, config)
    model = _merged(model).to(torch_dtype)
    model.config.use_cache = False  # a classifier never generates (set at load; merge_and_unload keeps the config)
    remote_code = RemoteCode.needed_by(model, tokenizer, config, autocast=_run_autocast(run, config))
    # gluetune truncates inputs at this length; `truncation=True` then does the same
    tokenizer.model_max_length = min(config.dataset.max_length, max_model_length(model) or config.dataset.max_length)

    # Written beside the target and renamed at the end: a failed export leaves no half folder.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        model.save_pretrained(staging)  # safetensors, config.json with id2label and pad_token_id
        tokenizer.save_pretrained(staging)
        if remote_code is not None:
            remote_code.write(staging)
        card.write_card(staging, run)
        if output_dir.exists():
            output_dir.rmdir()  # checked empty above
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not valid; expected one of {', '.join(DTYPES)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _finished_run_config(run: Path) -> RunConfig:
    if not (run / CONFIG_FILENAME).is_file():
        raise UserError(f"--model_path {run}: not a gluetune run folder (no {CONFIG_FILENAME}); "
                        "expected the training.output_dir of a finished run")
    if not rundir.is_finished(run):
        raise UserError(f"--model_path {run}: its run has not finished (no {rundir.METRICS_FILENAME}); "
                        "finish it with `gluetune train ... --resume` first")
    config = load_saved_config(run)
    rundir.pin_recorded_revision(config, run)  # the hub commit the run trained on
    return config


def _check_output_dir(output_dir: Path, run: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"--output_dir {output_dir} exists and is not empty; choose a new folder")
    if output_dir.resolve().is_relative_to(run.resolve()):
        raise UserError(f"--output_dir {output_dir} is inside the run folder {run}; choose a folder outside it")


def _run_autocast(run: Path, config: RunConfig) -> str | None:
    """The autocast the run evaluated under (bf16, fp16), which its export runs under too where its
    weights are the run's own (full fine-tuning); None for fp32 and for a merged adapter.

    Why not for a merged adapter: the run computed base and adapter apart (the base's product rounded
    in bf16, the adapter's small one beside it); merged, the adapter is part of one weight that
    autocast would round to bf16 as a whole, losing most of it. The merged fp32 weight computed in the
    export's dtype is as close to the run as bf16 could be (measured closer: docs/robustness.md), and it
    stays a plain transformers model."""
    trained_in = rundir.evaluated_in(run, config)
    return trained_in if trained_in in ("bf16", "fp16") and config.peft.method == "full" else None


def _load_trained(run: Path, config: RunConfig):
    """The run's final model in fp32 on the CPU (whatever device trained it, a bf16 base read in
    full), and its tokenizer. Adapters trained over a quantized base (QLoRA) go onto the
    full-precision base: the export is a plain model, and merging into 4-bit weights would round
    the adapters away."""
    import dataclasses

    if config.model.quantization:
        logger.warning("%s trained its adapter over a %s; the export merges it into the full-precision base, whose "
                       "predictions differ slightly from the quantized model's",
                       run, quantization.describe(config.model.quantization))
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, quantization=None))
    tokenizer = load_tokenizer(config.model, path=str(run))
    fp32 = of_run("fp32", config.peft.method == "full")  # merged in fp32; its autocast is the export's own
    return load_trained(config, run, tokenizer.pad_token_id, fp32), tokenizer


def _merged(model):
    """A PEFT model's adapters folded into the base weights, the trained head in place."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


# ---------------------------------------------------------------- custom code for what transformers lacks

_MODULE_HEADER = '''"""Custom code of a model exported by gluetune: {reasons}.

Load this folder with trust_remote_code=True, e.g.
    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)
Its config has a model_type of its own, so without trust_remote_code transformers refuses the
folder rather than loading stock classes that would predict differently.
"""

import transformers
'''

_MODEL_CLASSES = '''

class {config_class}(transformers.{base_config}):
    model_type = "{model_type}"


class {encoder_class}(transformers.{base_encoder}):
    config_class = {config_class}


# Some classifiers build their encoder with AutoModel.from_config: tell it this config's encoder.
transformers.AutoModel.register({config_class}, {encoder_class}, exist_ok=True)


class {model_class}(transformers.{base_model}):
    config_class = {config_class}
'''

_MEAN_POOLING = '''
    def __init__(self, config):
        super().__init__(config)
        # The head reads pooler(mean of the real tokens' last hidden states) instead of
        # pooler([CLS]), as the model was fine-tuned (gluetune's model.pooling: mean).
        self.base_model.register_forward_hook(pool_the_mean, with_kwargs=True)
'''  # continues the model class above; gluetune's own hook function follows the classes, as is

_AUTOCAST = '''
    def forward(self, *args, **kwargs):
        # As the run evaluated itself, and gluetune predict reads it: under the autocast of the
        # precision it trained in (config.gluetune_autocast), the logits in fp32.
        with run_autocast(getattr(self.config, "gluetune_autocast", None), self.device.type):
            output = super().forward(*args, **kwargs)
        output.logits = output.logits.float()
        return output
'''  # continues the model class above; gluetune's own autocast function follows the classes, as is


_PAIR_TOKENIZER = '''
PAIR_SEPARATOR = {separator!r}  # how gluetune joins a pair for a tokenizer without a pair template


class {tokenizer_class}(transformers.{base_tokenizer}):
    """Encodes a pair as the model was trained on it: one text, first + PAIR_SEPARATOR + second, and
    one too long (truncation=True) cut as gluetune cut it: longest first, the separator kept."""

    def __call__(self, text=None, text_pair=None, **kwargs):
        if text_pair is None:
            return super().__call__(text, **kwargs)
        joined = join_pairs(text, text_pair)
        if kwargs.get("truncation") in (None, False, "do_not_truncate"):
            return super().__call__(joined, **kwargs)
        single = isinstance(joined, str)
        firsts, joined = ([text], [joined]) if single else (list(text), joined)
        max_length = kwargs.pop("max_length", None) or self.model_max_length
        padding, return_tensors = kwargs.pop("padding", False), kwargs.pop("return_tensors", None)
        pad_to_multiple_of = kwargs.pop("pad_to_multiple_of", None)
        offsets_asked = kwargs.pop("return_offsets_mapping", False)
        special_asked = kwargs.pop("return_special_tokens_mask", False)
        kwargs.pop("truncation")
        encoded = super().__call__(joined, truncation=False, return_offsets_mapping=True,
                                   return_special_tokens_mask=True, **kwargs)
        for row, first in enumerate(firsts):
            if len(encoded["input_ids"][row]) > max_length:
                kept = pair_tokens_to_keep(encoded["offset_mapping"][row], encoded["special_tokens_mask"][row],
                                           len(first), len(PAIR_SEPARATOR), max_length)
                for key in encoded:
                    encoded[key][row] = [encoded[key][row][k] for k in kept]
        if not offsets_asked:
            del encoded["offset_mapping"]
        if not special_asked:
            del encoded["special_tokens_mask"]
        encoded = self.pad(encoded, padding=padding, max_length=max_length if padding == "max_length" else None,
                           pad_to_multiple_of=pad_to_multiple_of,
                           return_tensors=return_tensors)
        if single and return_tensors is None:
            encoded = transformers.BatchEncoding({{key: value[0] for key, value in encoded.items()}})
        return encoded


def join_pairs(first, second):
    if isinstance(first, str):
        return first + PAIR_SEPARATOR + second
    return [a + PAIR_SEPARATOR + b for a, b in zip(first, second, strict=True)]

'''  # then gluetune's own function, as is:


def _pair_tokenizer_source(values: dict) -> str:
    return _PAIR_TOKENIZER.format(**values, separator=PAIR_SEPARATOR) + "\n" + inspect.getsource(pair_tokens_to_keep)


@dataclass
class RemoteCode:
    """The classes an export needs beyond stock transformers, and how its config files name them."""

    base_config: str  # the stock classes subclassed, e.g. BertConfig, BertForSequenceClassification
    base_model: str
    base_encoder: str  # the model under the head, e.g. BertModel
    model_type: str  # the stock model_type, e.g. bert
    mean_pooling: bool
    base_tokenizer: str | None  # set when the tokenizer must join pairs itself
    autocast: str | None = None  # the run's autocast (bf16, fp16), which the model's forward runs under

    @classmethod
    def needed_by(cls, model, tokenizer, config: RunConfig, autocast: str | None = None) -> RemoteCode | None:
        """What the merged `model` and its tokenizer need; None when stock transformers suffices."""
        mean_pooling = config.model.pooling == "mean"
        joins_pairs = len(config.task.text_columns) == 2 and not is_pair_template_tokenizer(tokenizer)
        if not (mean_pooling or joins_pairs or autocast):
            return None
        return cls(
            base_config=_stock_class_name(type(model.config), "its model config"),
            base_model=_stock_class_name(type(model), "its model class"),
            base_encoder=_stock_class_name(type(model.base_model), "its encoder class"),
            model_type=model.config.model_type,
            mean_pooling=mean_pooling,
            base_tokenizer=_stock_class_name(type(tokenizer), "its tokenizer") if joins_pairs else None,
            autocast=autocast,
        )

    @property
    def names(self) -> dict[str, str]:
        return {
            "config_class": f"Gluetune{self.base_config}",
            "model_class": f"Gluetune{self.base_model}",
            "encoder_class": f"Gluetune{self.base_encoder}",
            "tokenizer_class": f"Gluetune{self.base_tokenizer}",
            "model_type": f"gluetune_{self.model_type}",
        }

    def source(self) -> str:
        reasons = []
        if self.mean_pooling:
            reasons.append("the classifier reads the mean of the tokens, not the first token")
        if self.base_tokenizer:
            reasons.append("a sentence pair is encoded as one text, joined by a newline")
        if self.autocast:
            reasons.append(f"the model computes under {self.autocast} autocast, as its run evaluated")
        values = {**self.names, "base_config": self.base_config, "base_model": self.base_model,
                  "base_encoder": self.base_encoder, "base_tokenizer": self.base_tokenizer}
        text = _MODULE_HEADER.format(reasons="; ".join(reasons))
        text += _MODEL_CLASSES.format(**values)
        text += (_MEAN_POOLING if self.mean_pooling else "") + (_AUTOCAST if self.autocast else "")
        for function, used in ((pool_the_mean, self.mean_pooling), (run_autocast, self.autocast)):
            if used:
                text += "\n\n" + inspect.getsource(function)
        if self.base_tokenizer:
            text += _pair_tokenizer_source(values)
        return text

    def write(self, folder: Path) -> None:
        """The module beside the weights, and config files that point the Auto classes at it."""
        names = self.names
        atomic_write_text(folder / REMOTE_CODE_FILENAME, self.source())
        model_config = json.loads((folder / "config.json").read_text())
        model_config["model_type"] = names["model_type"]
        model_config["architectures"] = [names["model_class"]]
        model_config["auto_map"] = {
            "AutoConfig": f"{REMOTE_CODE_MODULE}.{names['config_class']}",
            "AutoModelForSequenceClassification": f"{REMOTE_CODE_MODULE}.{names['model_class']}",
        }
        if self.autocast:
            model_config["gluetune_autocast"] = self.autocast
        atomic_write_json(folder / "config.json", model_config)
        if self.base_tokenizer:
            tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
            # a class name transformers does not know: the stock tokenizer is never picked silently
            tokenizer_config["tokenizer_class"] = names["tokenizer_class"]
            tokenizer_config["auto_map"] = {"AutoTokenizer": [None, f"{REMOTE_CODE_MODULE}.{names['tokenizer_class']}"]}
            atomic_write_json(folder / "tokenizer_config.json", tokenizer_config)


def _stock_class_name(cls: type, what: str) -> str:
    """The name `transformers.<name>` gives `cls`; refused when the class is not transformers' own."""
    import transformers

    if getattr(transformers, cls.__name__, None) is not cls:
        raise UserError(f"cannot export: {what} ({cls.__module__}.{cls.__name__}) is not a transformers class, so the "
                        "custom code this export needs cannot subclass it")
    return cls.__name__
