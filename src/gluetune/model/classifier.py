"""Model building: find the model, load tokenizer and classifier, make it trainable, count it."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import methods
from ..config.quantization import bnb_config
from ..config.run import ModelConfig, RunConfig
from ..config.tasks import Task
from ..errors import UserError, did_you_mean, one_line
from ..files import is_local_path
from . import quantization, sources
from .precision import Precision, hold_trained_weights_in_fp32

logger = logging.getLogger("gluetune")

def _check_local(path: str, marker: str) -> None:
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"model folder not found: {path}")
    if not (folder / marker).is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no {marker})")


def _from_pretrained(loader, path: str, marker: str = "config.json", **kwargs):
    local = is_local_path(path)
    if local:
        _check_local(path, marker)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        if local:
            raise UserError(f"{path}: not a loadable model folder: {one_line(err)}") from None
        raise sources.hub_error(path, err) from None


def load_tokenizer(model: ModelConfig, path: str | None = None):
    """The model's tokenizer, with a pad token (decoders such as Llama ship none)."""
    from transformers import AutoTokenizer

    path = path or sources.resolve(model)
    tokenizer = _from_pretrained(
        AutoTokenizer, path, marker="tokenizer_config.json", revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer of '{model.name_or_path}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _label_kwargs(task: Task) -> dict:
    if task.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    return {
        "num_labels": task.num_labels,
        "id2label": dict(enumerate(task.label_names)),
        "label2id": {n: i for i, n in enumerate(task.label_names)},
        "problem_type": "single_label_classification",
    }


def load_classifier(model: ModelConfig, task: Task, pad_token_id: int, path: str | None = None, dtype=None):
    """`AutoModelForSequenceClassification` with the task's labels and a pad token id set.

    Decoder classifiers pool the last non-pad token; without `pad_token_id` on the config they
    refuse batches larger than one. Weights load in `dtype`, fp32 by default: transformers v5
    would otherwise keep a checkpoint's own dtype (bf16 for Qwen2.5), which a CPU cannot mix
    with fp32 adapters.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    path = path or sources.resolve(model)
    kwargs = dict(
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        pad_token_id=pad_token_id,
        **_label_kwargs(task),
    )
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    kwargs["dtype"] = dtype or torch.float32
    if model.quantization:
        quantization.check_installed("model.quantization")
        kwargs["quantization_config"] = bnb_config(model.quantization, compute_dtype=kwargs["dtype"])
        if torch.cuda.is_available():  # bitsandbytes quantizes as the weights reach this process's GPU
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    kwargs.update(_checked_overrides(model, path))
    try:
        classifier = _from_pretrained(AutoModelForSequenceClassification, path, **kwargs)
    except ValueError as err:  # e.g. an architecture without a sequence-classification head
        raise UserError(f"model '{model.name_or_path}': {one_line(err)}") from None
    if model.quantization:
        quantization.keep_weights_unpacked(classifier)
    if getattr(classifier.config, "use_cache", False):
        # A classifier never generates: with the cache on (Qwen2.5's and SmolLM2's config.json), every
        # decoder forward would build a DynamicCache and copy each layer's keys and values into it. The
        # Trainer turns it off for training (config.use_cache = args.use_cache); predict, evaluate and the
        # export's config.json get it off from here.
        classifier.config.use_cache = False
    if model.pooling == "mean":
        use_mean_pooling(classifier, model.name_or_path)
    return classifier


def use_mean_pooling(classifier, name: str) -> None:
    """Feed a BERT-style head the mean of the real tokens' last hidden states instead of [CLS]'s.

    Why by hand: transformers' encoder classifiers always pool the first token, but sentence-
    embedding checkpoints (all-MiniLM-L6-v2 and the like) were trained with mean pooling, so their
    [CLS] state carries little and must be re-learnt. A forward hook on the encoder recomputes
    `pooler_output` as pooler(masked mean); the pooler's weights and state-dict keys stay as they
    are, so `modules_to_save: [pooler]`, checkpoints and reloading work unchanged. The hook looks
    the pooler up at call time, so a PEFT copy of it (modules_to_save) is the one used. (The
    encoder still runs its own pooler on [CLS] first: one small matmul, discarded.)
    """
    encoder = classifier.base_model
    if getattr(encoder, "pooler", None) is None or not hasattr(encoder.pooler, "dense"):
        raise UserError(
            f"model.pooling: mean needs a BERT-style encoder with a pooler layer; "
            f"{name} ({type(classifier).__name__}) has none; leave model.pooling unset"
        )

    encoder.register_forward_hook(pool_the_mean, with_kwargs=True)


def pool_the_mean(module, args, kwargs, output):
    """The encoder's forward hook of `use_mean_pooling` (also written, as is, into exports)."""
    hidden = output.last_hidden_state
    # BERT-style forward(input_ids, attention_mask, ...): the mask comes by keyword or second
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is None:
        mean = hidden.mean(dim=1)
    else:
        weights = mask[..., None].to(hidden.dtype)
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    output.pooler_output = module.pooler(mean[:, None, :])  # the pooler reads position 0
    return output


def _checked_overrides(model: ModelConfig, path: str) -> dict:
    """`model.config_overrides`, refused by name when the model's config has no such field:
    `from_pretrained` would otherwise store an unknown key silently and change nothing."""
    from transformers import AutoConfig

    overrides = model.config_overrides or {}
    if not overrides:
        return {}
    known = _from_pretrained(AutoConfig, path, revision=model.revision, trust_remote_code=model.trust_remote_code).to_dict()
    for key in overrides:
        if key not in known:
            raise UserError(
                f"model.config_overrides: '{key}' is not a field of {model.name_or_path}'s config"
                f"{did_you_mean(key, known)}; expected a key of its config.json"
            )
    return dict(overrides)


def classifier_from_config(config: RunConfig, pad_token_id: int | None = None):
    """The classifier built from the model's config.json alone, on the meta device: no weights are
    read or downloaded, so parameter counts of a 1.5B model are instant."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = sources.resolve(config.model)
    model_config = _from_pretrained(AutoConfig, path, revision=config.model.revision,
                                    trust_remote_code=config.model.trust_remote_code, **_label_kwargs(config.task),
                                    **_checked_overrides(config.model, path))
    if pad_token_id is not None or model_config.pad_token_id is None:
        model_config.pad_token_id = pad_token_id if pad_token_id is not None else model_config.eos_token_id
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(model_config)


def make_trainable(model, config: RunConfig):
    """Apply the fine-tuning method; trainable weights are kept in fp32 even on a bf16 base."""
    import torch

    if getattr(model, "is_quantized", False):  # a base loaded with model.quantization (not a meta-device count)
        model = quantization.prepare_for_training(model)
    model = methods.apply(model, config.peft)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32 and param.device.type != "meta":
            param.data = param.data.float()
    return model


def load_trained(config: RunConfig, folder, pad_token_id: int, precision: Precision):
    """The trained model of a run folder in eval mode, its weights held as its training held them
    (model.precision): the base in `precision.load_dtype`, on a quantized base every weight
    bitsandbytes does not quantize in fp32 (the same preparation as training's), what trained in fp32."""

    def load_base(path):
        base = load_classifier(config.model, config.task, pad_token_id, path=path, dtype=precision.load_dtype)
        return quantization.prepare_for_training(base) if getattr(base, "is_quantized", False) else base

    model = methods.load(config.peft, load_base, folder)
    hold_trained_weights_in_fp32(model)
    return model.eval()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameters, counted as peft counts them: a 4-bit weight (bitsandbytes'
    Params4bit, two values a byte) counts its values, not its bytes. peft's method reads only
    `named_parameters()`, so it counts a plain model (full fine-tuning) as well as a PeftModel."""
    from peft import PeftModel

    return PeftModel.get_nb_trainable_parameters(model)


def describe_parameters(model) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def max_model_length(model) -> int | None:
    """The longest input the model's position embeddings allow, if it says."""
    return getattr(model.config, "max_position_embeddings", None)
