"""Data: real CoLA from ../shared, custom files, label checks, tokenization and dynamic padding."""

from __future__ import annotations

import json

import pytest
from conftest import GLUE_DIR, QWEN_TOKENIZER, REFERENCE_CONFIG

from gluetune.config.run import load_config
from gluetune.config.tasks import custom_task, get_task
from gluetune.data.loading import load_splits, read_data_file, read_glue_split, read_input_file
from gluetune.data.tokenizing import encode_texts, tokenize
from gluetune.errors import UserError

COLA = get_task("cola")
BINARY = custom_task("reviews", ("text",), ("neg", "pos"))


@pytest.fixture(scope="module")
def cola():
    return {split: read_glue_split(GLUE_DIR, COLA, split) for split in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))


def test_cola_row_counts_and_labels(cola):
    assert [len(cola[s]) for s in ("train", "validation", "test")] == [8551, 1043, 1063]
    train_labels, dev_labels = cola["train"]["label"], cola["validation"]["label"]
    assert (train_labels.count(1), train_labels.count(0)) == (6023, 2528)
    assert (dev_labels.count(1), dev_labels.count(0)) == (721, 322)
    assert set(cola["test"]["label"]) == {-1}
    assert cola["test"]["idx"][:3] == [0, 1, 2]


def test_cola_quotes_and_unterminated_last_line_intact(cola):
    assert cola["train"]["sentence"][3056] == 'Susan whispered "Shut up".'
    assert cola["train"]["sentence"][3057] == 'Susan whispered "Shut up" at them.'
    last_line = (GLUE_DIR / "CoLA" / "dev.tsv").read_text().split("\n")[-1]
    assert cola["validation"]["sentence"][-1] == last_line.split("\t")[3]
    assert cola["test"]["sentence"][0] == "Bill whistled past the house."


def test_config_loads_splits_from_data_dir():
    config = load_config(REFERENCE_CONFIG, [f"dataset.data_dir={GLUE_DIR}", "dataset.max_train_samples=10"])
    splits = load_splits(config, ["train", "validation"])
    assert len(splits["train"]) == 10 and len(splits["validation"]) == 1043
    assert splits["train"].column_names == ["sentence", "label", "idx"]


def test_hub_unreachable_error_names_both_ways_out():
    config = load_config(REFERENCE_CONFIG)
    with pytest.raises(UserError) as err:
        load_splits(config, ["train"])
    message = str(err.value)
    assert "nyu-mll/glue" in message and "HF_ENDPOINT" in message and "data_dir" in message
    assert "\n" not in message


def test_custom_csv_tsv_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("good, \"really\" good", "pos"), ("bad", "neg"), ("fine", "1")]
    (tmp_path / "d.csv").write_text('text,label\n"good, ""really"" good",pos\nbad,neg\nfine,1\n')
    (tmp_path / "d.tsv").write_text('text\tlabel\ngood, "really" good\tpos\nbad\tneg\nfine\t1\n')
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    pq.write_table(pa.table({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}), tmp_path / "d.parquet")
    for name in ("d.csv", "d.tsv", "d.jsonl", "d.parquet"):
        ds = read_data_file(tmp_path / name, BINARY)
        assert ds["text"] == [r[0] for r in rows], name
        assert ds["label"] == [1, 0, 1], name


@pytest.mark.parametrize(
    "content, fragments",
    [
        ("", ["d.tsv", "empty"]),
        ("text\tlabel\n", ["d.tsv", "no data rows"]),
        ("sentence\tlabel\nhi\t1\n", ["text column 'text' not found", "sentence, label"]),
        ("text\ty\nhi\t1\n", ["label column 'label' not found"]),
        ("text\tlabel\nhi\t2\n", ["d.tsv:2", "label '2'", "0=neg, 1=pos"]),
        ("text\tlabel\nhi\tmaybe\n", ["d.tsv:2", "'maybe'"]),
        ("text\tlabel\nhi\t1\nhow\tare\tyou\n", ["d.tsv:3", "3 fields", "expected the header's 2"]),
    ],
)
def test_bad_files_are_reported_with_file_and_line(tmp_path, content, fragments):
    path = tmp_path / "d.tsv"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        read_data_file(path, BINARY)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_non_utf8_and_missing_files(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_bytes(b"text\tlabel\nok\t1\ncaf\xe9\t0\n")
    with pytest.raises(UserError, match=r"d.tsv:3: not UTF-8"):
        read_data_file(path, BINARY)
    with pytest.raises(UserError, match="data file not found"):
        read_data_file(tmp_path / "missing.csv", BINARY)
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON"):
        (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
        read_data_file(tmp_path / "d.jsonl", BINARY)


def test_glue_label_out_of_range(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("gj04\t1\t\tFine.\ngj04\t7\t*\tBad label.\n")
    with pytest.raises(UserError, match=r"train.tsv:2: label '7' is not valid"):
        read_glue_split(tmp_path, COLA, "train")


def test_input_file_plain_lines_and_columns(tmp_path):
    (tmp_path / "in.txt").write_text("First one.\n\nSecond one.\n")
    assert read_input_file(tmp_path / "in.txt", COLA) == [("First one.",), ("Second one.",)]
    (tmp_path / "in.csv").write_text("sentence\nA.\nB.\n")
    assert read_input_file(tmp_path / "in.csv", COLA) == [("A.",), ("B.",)]


def test_tokenize_keeps_lengths_and_truncates_with_notice(qwen_tokenizer, cola, caplog):
    ds = cola["validation"].select(range(50))
    out = tokenize(ds, qwen_tokenizer, COLA, max_length=6, split="validation")
    assert "sentence" not in out.column_names and {"input_ids", "attention_mask", "length", "label"} <= set(out.column_names)
    assert max(out["length"]) == 6
    assert "truncated" in caplog.text
    enc, n = encode_texts(qwen_tokenizer, [("The book was written by John.",)], 256)
    assert n == 0 and enc["input_ids"][0] == qwen_tokenizer("The book was written by John.")["input_ids"]


def test_decoder_pairs_get_the_separator(qwen_tokenizer):
    enc, _ = encode_texts(qwen_tokenizer, [("A cat sat.", "A cat was sitting.")], 256)
    assert qwen_tokenizer.decode(enc["input_ids"][0]) == "A cat sat.\nA cat was sitting."


RTE = get_task("rte")


@pytest.fixture(scope="module")
def long_rte_pairs():
    """Real RTE training pairs (premise, hypothesis) of 141, 259 and 295 tokens joined (Qwen2.5's tokenizer)."""
    train = read_glue_split(GLUE_DIR, RTE, "train")
    return [(train["sentence1"][i], train["sentence2"][i]) for i in (20, 1134, 1675)]


def test_an_overlong_decoder_pair_keeps_its_hypothesis(qwen_tokenizer, long_rte_pairs, tiny_qwen):
    """A decoder's head reads the last token: an over-long pair is cut in its premise, the separator and
    the hypothesis kept whole, in training (tokenize) as in predict (what the model is given)."""
    import datasets
    import torch

    from gluetune.model.classifier import load_classifier
    from gluetune.results.prediction import Classifier

    premise, hypothesis = long_rte_pairs[0]
    assert len(qwen_tokenizer(premise + "\n" + hypothesis)["input_ids"]) == 141
    enc, truncated = encode_texts(qwen_tokenizer, [(premise, hypothesis)], 128)
    ids = enc["input_ids"][0]
    assert truncated == 1 and len(ids) == 128
    assert qwen_tokenizer.decode(ids).endswith("\n" + hypothesis)  # the separator and all of the hypothesis
    assert qwen_tokenizer.decode(ids).startswith(premise[:200])  # the premise cut at its end

    rows = datasets.Dataset.from_dict({"sentence1": [premise], "sentence2": [hypothesis], "label": [0], "idx": [0]})
    assert tokenize(rows, qwen_tokenizer, RTE, 128, "train", cache=False)["input_ids"][0] == ids

    config = load_config(REFERENCE_CONFIG, [f"model.name_or_path={tiny_qwen}", "dataset.subset=rte", "dataset.text_column=null",
                                            "dataset.max_length=128"])
    model = load_classifier(config.model, config.task, qwen_tokenizer.pad_token_id)
    seen = []
    model.register_forward_hook(lambda module, args, kwargs, output: seen.append(kwargs["input_ids"]), with_kwargs=True)
    Classifier(model, qwen_tokenizer, config).logits([(premise, hypothesis)])
    assert torch.equal(seen[0][0], torch.tensor(ids))


def test_pairs_too_long_on_both_sides_are_cut_longest_first(qwen_tokenizer, long_rte_pairs):
    """Both halves long: the longer loses tokens until they are even, as the encoders' pair truncation
    (longest_first) cuts; the separator stays between them."""
    premise = hypothesis = " ".join(["word"] * 100)  # 100 tokens each
    enc, _ = encode_texts(qwen_tokenizer, [(premise + " more" * 40, hypothesis)], 101)
    first, second = qwen_tokenizer.decode(enc["input_ids"][0]).split("\n")
    assert len(enc["input_ids"][0]) == 101 and first == second == " ".join(["word"] * 50)
    for premise, hypothesis in long_rte_pairs[1:]:  # 259 and 295 tokens: over the default max_length
        enc, truncated = encode_texts(qwen_tokenizer, [(premise, hypothesis)], 256)
        assert truncated == 1 and len(enc["input_ids"][0]) == 256
        assert qwen_tokenizer.decode(enc["input_ids"][0]).endswith("\n" + hypothesis)


def test_dynamic_padding_pads_to_the_longest_in_batch(qwen_tokenizer, cola):
    from transformers import DataCollatorWithPadding

    out = tokenize(cola["validation"].select(range(16)), qwen_tokenizer, COLA, 256, "validation")
    batch = DataCollatorWithPadding(qwen_tokenizer)([{k: out[i][k] for k in ("input_ids", "attention_mask")} for i in range(16)])
    assert batch["input_ids"].shape[1] == max(out["length"]) < 128


def test_tokenized_splits_are_cached_by_content(qwen_tokenizer, cola, caplog, tmp_path, monkeypatch):
    monkeypatch.setenv("GLUETUNE_CACHE_DIR", str(tmp_path))
    ds = cola["validation"].select(range(40))
    first = tokenize(ds, qwen_tokenizer, COLA, max_length=6, split="validation")
    entries = list((tmp_path / "tokenized").iterdir())
    assert len(entries) == 1 and caplog.text.count("truncated") == 1
    again = tokenize(ds, qwen_tokenizer, COLA, max_length=6, split="validation")
    assert list((tmp_path / "tokenized").iterdir()) == entries  # a hit, not a second entry
    assert again["input_ids"] == first["input_ids"] and again["length"] == first["length"]
    assert caplog.text.count("truncated") == 2  # the notice survives the cache
    tokenize(ds, qwen_tokenizer, COLA, max_length=7, split="validation")
    tokenize(cola["validation"].select(range(41)), qwen_tokenizer, COLA, max_length=6, split="validation")
    assert len(list((tmp_path / "tokenized").iterdir())) == 3  # other length, other data: other entries
