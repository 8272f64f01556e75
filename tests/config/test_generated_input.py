"""Bad input, generated (hypothesis): YAML configs, `--set` values and small data files fed to the code
`gluetune train` runs before it loads a model (config.load_config; data.loading.load_splits, the
reading of every split; read_input_file, `gluetune predict --input_file`). Every case ends in a
valid config or dataset, or in one `UserError` line: never another exception (a traceback).

A default run tries a fixed set of cases (the `gluetune` profile, tests/conftest.py: derandomized,
the same on every machine, a few seconds); `--hypothesis-profile explore` tries many fresh ones.
The hand-written bad inputs stay in test_config.py and tests/data.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import REFERENCE_CONFIG, assert_one_line_error, run_main

pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import example, given
from hypothesis import strategies as st
from peft import LoraConfig

from gluetune.config.arguments import training_argument_types
from gluetune.config.reading import SECTIONS, read_yaml_file
from gluetune.config.run import DatasetConfig, ModelConfig, build_config, load_config
from gluetune.data.loading import load_splits, read_input_file
from gluetune.errors import UserError
from gluetune.files import installed_version
from gluetune.methods.lora.config import Config as LoraSection


def settled(call):
    """What `call` returns, or its UserError: one non-empty line. Anything else propagates and fails."""
    try:
        return call()
    except UserError as err:
        message = str(err)
        assert message.strip() and len(message.splitlines()) == 1, repr(message)
        return err


# ---------------------------------------------------------------- values as YAML gives them

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "no", "yes", "epoch", "steps", "cola", "lora", "full", "mean", "4bit", "all-linear",
                     "adamw_torch", "3e-4", "q_proj", "tensorboard", "none", "matthews_correlation", "loss"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)

KEYS = {
    "model": [f.name for f in dataclasses.fields(ModelConfig)],
    "dataset": [f.name for f in dataclasses.fields(DatasetConfig)],
    "peft": sorted({f.name for f in dataclasses.fields(LoraSection) if f.name != "options"}
                   | {f.name for f in dataclasses.fields(LoraConfig)}),
    "training": sorted(training_argument_types()) + ["warmup_ratio", "fast_path", "cuda_graphs", "length_group_batches",
                                                     "resume_from_checkpoint", "overwrite_output_dir"],
}
sections = st.sampled_from([*SECTIONS, "modle", "train", ""])
keys = st.one_of(st.sampled_from(sorted({k for names in KEYS.values() for k in names})), st.text(max_size=10))


@st.composite
def edited_configs(draw) -> dict:
    """The reference config with a few keys set, removed or replaced by generated values."""
    raw = read_yaml_file(REFERENCE_CONFIG)
    for _ in range(draw(st.integers(1, 4))):
        section = draw(sections)
        kind = draw(st.sampled_from(["set", "set", "set", "drop", "section"]))
        if kind == "section":
            raw[section] = draw(values)
            continue
        body = raw.setdefault(section, {})
        if not isinstance(body, dict):
            continue
        key = draw(st.sampled_from(KEYS[section]) if section in KEYS else keys)
        if kind == "drop":
            body.pop(key, None)
        else:
            body[key] = draw(values)
    return raw


def config_file(folder: Path, content: str | bytes) -> Path:
    path = folder / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@given(raw=edited_configs())
def test_a_generated_config_loads_or_is_refused_in_one_line(raw):
    with tempfile.TemporaryDirectory() as folder:
        settled(lambda: load_config(config_file(Path(folder), yaml.safe_dump(raw, allow_unicode=True))))


odd_texts = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    st.text(max_size=60).map(lambda t: ("model:\n  name_or_path: x\n" + t).encode("utf-16")),
    st.text(max_size=60).map(lambda t: ("model: {name_or_path: " + t + "}\n").encode("latin-1", "replace")),
    st.sampled_from([b"", b"\n\n", b"\xef\xbb\xbf", b"---\n...\n", b"- a\n- b\n",
                     b"model: !!python/object:os.system x\n", b"a: &x [*x]\n", b"model:\n\tname_or_path: x\n", b"\x00\x00", b"x" * 300_000]),
)


@given(content=odd_texts)
@example(content=b"model: {name_or_path: x}\n" + b"training: {learning_rate: 1}\n" * 2)  # a key twice
def test_any_file_given_as_config_loads_or_is_refused_in_one_line(content):
    with tempfile.TemporaryDirectory() as folder:
        settled(lambda: load_config(config_file(Path(folder), content)))


# ---------------------------------------------------------------- --set values

override_paths = st.one_of(
    st.sampled_from([f"{section}.{key}" for section, names in KEYS.items() for key in names]),
    st.builds(lambda s, k: f"{s}.{k}", sections, keys),
    st.text(max_size=16),
)
override_values = st.one_of(
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip()),
    st.text(max_size=20),
    st.sampled_from(["[", "{a: 1", "'", "!!python/name:os.system", "&a 1", "*a", "- x", ": :", "1e400", ".nan"]),
)
overrides = st.lists(st.one_of(st.builds(lambda p, v: f"{p}={v}", override_paths, override_values),
                               st.text(max_size=16)), min_size=1, max_size=3)


@given(overrides=overrides)
@example(overrides=["training.deepspeed=;"])  # (found: see test_deepspeed_without_its_package_is_one_line)
def test_generated_set_values_load_or_are_refused_in_one_line(overrides):
    settled(lambda: load_config(REFERENCE_CONFIG, overrides))


# ---------------------------------------------------------------- data files

cells = st.one_of(st.text(max_size=15), st.integers(-3, 4), st.floats(allow_nan=True), st.none(), st.booleans(),
                  st.sampled_from(["neg", "pos", "NEG", " pos ", "1.0", "0", "2", "-1", ""]))
columns = st.lists(st.sampled_from(["text", "label", "sentence", "Label", "", "idx"]), min_size=1, max_size=4)


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """(suffix, bytes): a table of generated cells written as CSV, TSV or JSON Lines in some encoding,
    ragged rows and all; or bytes that are not such a file."""
    suffix = draw(st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt"]))
    kind = draw(st.sampled_from(["table", "table", "table", "bytes", "huge"]))
    if kind == "bytes":
        return suffix, draw(st.one_of(st.binary(max_size=100),
                                      st.sampled_from([b"", b"\n", b" \n\t", b"\xef\xbb\xbf"])))
    header = draw(columns)
    rows = draw(st.lists(st.lists(cells, min_size=len(header) - 1, max_size=len(header) + 1), max_size=6))
    if kind == "huge":  # one long text, many rows
        rows = [["x" * 100_000, "pos"]] + [["a b", "neg"]] * 5_000
        header = ["text", "label"]
    if suffix in (".jsonl", ".json"):
        lines = [json.dumps(dict(zip(header, row))) for row in rows]
        lines += draw(st.lists(st.sampled_from(["", "[1, 2]", "{", "null", '"text"'] + lines[:1]), max_size=2))
        text = "\n".join(lines)
    elif suffix == ".parquet" and kind != "huge" and draw(st.booleans()):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({name or f"c{i}": [None if r[i:i + 1] in ([], [None]) else str(r[i]) for r in rows]
                          for i, name in enumerate(dict.fromkeys(header))})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return suffix, buffer.getvalue()
    else:
        delimiter = "\t" if suffix == ".tsv" else ","
        text = "\n".join(delimiter.join("" if c is None else str(c) for c in row) for row in [header, *rows])
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    return suffix, text.encode(encoding, "replace")


def custom_task(folder: Path, train: Path, validation: Path, label_names: list[str] | None = None):
    raw = read_yaml_file(REFERENCE_CONFIG)
    raw["model"] = {"name_or_path": str(folder)}
    raw["dataset"] = {"train_file": str(train), "validation_file": str(validation), "text_column": ["text"],
                      "label_names": ["neg", "pos"] if label_names is None else label_names}
    raw["training"] = {"output_dir": str(folder / "run")}
    return build_config(raw, "generated.yaml")


@given(train=data_files(), validation=data_files(), regression=st.booleans())
def test_generated_data_files_load_or_are_refused_in_one_line(train, validation, regression):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = []
        for name, (suffix, content) in (("train", train), ("dev", validation)):
            paths.append(folder / f"{name}{suffix}")
            paths[-1].write_bytes(content)
        config = custom_task(folder, *paths, label_names=[] if regression else None)
        loaded = settled(lambda: load_splits(config, ["train", "validation"]))
        if not isinstance(loaded, UserError):  # what loaded is what training gets: texts and labels in range
            for split in loaded.values():
                assert all(isinstance(t, str) for t in split["text"])
                if not regression:
                    assert set(split["label"]) <= {0, 1}
        settled(lambda: read_input_file(paths[0], config.task))  # gluetune predict --input_file


@given(rows=st.lists(st.lists(cells, min_size=3, max_size=5), max_size=5),
       encoding=st.sampled_from(["utf-8", "latin-1"]))
@example(rows=[["", "0", None]], encoding="utf-8").via("found: an IndexError")
@example(rows=[["", "inf", "", ""]], encoding="utf-8").via("found: an OverflowError")
def test_generated_glue_files_load_or_are_refused_in_one_line(rows, encoding):
    """CoLA's own layout (no header; source, label, original label, sentence), generated."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "CoLA").mkdir()
        for name, header in (("train.tsv", []), ("dev.tsv", []), ("test.tsv", [["index", "sentence"]])):
            text = "\n".join("\t".join("" if c is None else str(c) for c in row) for row in header + rows)
            (Path(tmp) / "CoLA" / name).write_bytes(text.encode(encoding, "replace"))
        config = load_config(REFERENCE_CONFIG, [f"dataset.data_dir={tmp}"])
        for split in ("train", "validation", "test"):
            loaded = settled(lambda split=split: load_splits(config, [split]))
            if split != "test" and not isinstance(loaded, UserError):
                assert set(loaded[split]["label"]) <= {0, 1}


# ---------------------------------------------------------------- through the command


@pytest.mark.parametrize("content", [b"model: {name_or_path: x}\ntraining: {learning_rate: [1, {a: .nan}]}\n",
                                     b"\xff\xfe\x00", b"peft: {lora_r: 99999999999999999999999}\n"])
def test_the_command_says_a_refused_config_in_one_line(tmp_path, content):
    """The same refusals through `gluetune train` itself: exit 2, one line, no traceback."""
    result = run_main("-m", "gluetune", "train", "--config", str(config_file(tmp_path, content)))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line.startswith("gluetune: error: ") for line in result.stderr.splitlines()] == [True], result.stderr


# ---------------------------------------------------------------- what the generated cases found


def test_deepspeed_without_its_package_is_one_line(tmp_path):
    """Found by the --set cases: any training.deepspeed value without the package was a traceback
    (TrainingArguments raises PackageNotFoundError when the config loads), not the one line it promised."""
    if installed_version("deepspeed") is not None:  # the line is for a machine without it, as CI is
        pytest.fail("this test checks the refusal where deepspeed is not installed; run it without deepspeed")
    result = run_main("-m", "gluetune", "train", "--config", str(REFERENCE_CONFIG), "--set",
                      "training.deepspeed=configs/deepspeed/zero2.json", "--set", f"training.output_dir={tmp_path}")
    assert_one_line_error(result, "training.deepspeed: the deepspeed package is not installed")


@pytest.mark.parametrize("name, text, fragment", [
    ("train.tsv", "gj04\t1\t\n", "train.tsv:1: 3 fields; task 'cola' reads 4 from its train file"),
    ("test.tsv", "index\tsentence\nseven\tA sentence.\n", "test.tsv:2: index 'seven' is not an integer"),
    ("train.tsv", "gj04\tinf\t\tA sentence.\n", "train.tsv:1: label 'inf' is not valid for task 'cola'"),
])
def test_a_glue_file_of_another_layout_is_one_line(tmp_path, name, text, fragment):
    """Found by the GLUE-layout cases: a CoLA file with fewer columns than GLUE's was an IndexError, a
    test file whose index is not a number a ValueError, a label 'inf' an OverflowError."""
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / name).write_text(text)
    config = load_config(REFERENCE_CONFIG, [f"dataset.data_dir={tmp_path}"])
    with pytest.raises(UserError, match=fragment):
        load_splits(config, ["test" if name == "test.tsv" else "train"])


@pytest.mark.parametrize("score", ["nan", "inf", "-inf"])
def test_a_regression_label_that_is_not_finite_is_one_line(tmp_path, score):
    """Found with the OverflowError above: float() reads 'nan' and 'inf', and a NaN or infinite target
    would make every loss after it NaN; a regression label must be a finite number."""
    (tmp_path / "train.csv").write_text(f"text,label\na sentence,1.5\nanother,{score}\n")
    config = custom_task(tmp_path, tmp_path / "train.csv", tmp_path / "train.csv", label_names=[])
    with pytest.raises(UserError, match=f"train.csv:3: label '{score}' is not a finite number"):
        load_splits(config, ["train"])


@pytest.mark.parametrize("section, key", [("training", "learning\rrate"), ("model", "\u2028")])
@pytest.mark.parametrize("given_by", ["file", "--set"])
def test_a_line_break_in_a_key_stays_on_the_error_line(tmp_path, section, key, given_by):
    """Found by the config and --set cases: a key holding a carriage return or a line separator was
    quoted as is, and the one error line came out as two on the terminal."""
    raw = read_yaml_file(REFERENCE_CONFIG)
    if given_by == "file":
        raw[section][key] = 1
    path = config_file(tmp_path, yaml.safe_dump(raw, allow_unicode=True))
    result = run_main("-m", "gluetune", "train", "--config", str(path),
                      *(["--set", f"{section}.{key}=1"] if given_by == "--set" else []))
    line = assert_one_line_error(result)
    assert result.stderr.splitlines() == [line]


def test_a_training_file_that_cannot_be_read_is_one_line(tmp_path):
    """Found by the config cases: TrainingArguments reads training.accelerator_config's JSON file when
    the config loads, and a path that is not there was a FileNotFoundError traceback."""
    missing = tmp_path / "missing.json"
    result = run_main("-m", "gluetune", "train", "--config", str(REFERENCE_CONFIG), "--set",
                      f"training.accelerator_config={missing}", "--set", f"training.output_dir={tmp_path / 'run'}")
    assert_one_line_error(result, f"training.accelerator_config: cannot read '{missing}' (No such file or directory)")
