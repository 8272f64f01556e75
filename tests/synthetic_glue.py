"""Small files in the GLUE download layout for the tasks ../shared lacks (QQP, MNLI, QNLI, AX).

Headers and label encodings are those of `download_glue_data.py`'s output: QQP's 0/1
`is_duplicate` and `id` column, MNLI's parse columns and `gold_label` words (dev files with five
annotator labels before it), QNLI's text labels, and AX as `diagnostic/diagnostic.tsv`. Test-file
indices start at 1000, so a reader that numbered rows itself instead of reading them would show.
"""

from __future__ import annotations

import random
from pathlib import Path

MNLI_PARSES = ["sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse"]
MNLI_WORDS = ["entailment", "neutral", "contradiction"]
QNLI_WORDS = ["entailment", "not_entailment"]
TEST_INDEX_START = 1000

_SUBJECTS = ["The cat", "A man", "Two children", "The old dog", "She", "The committee"]
_VERBS = ["sleeps on", "walks past", "looks at", "talks about", "waits near", "paints"]
_OBJECTS = ["the sofa", "a \"red\" car", "the river", "an empty house", "the market", "a tall tree"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")


def write_synthetic_glue(root: Path, rows: int = 24, test_rows: int = 10, seed: int = 0) -> dict[str, list]:
    """Write QQP, MNLI, QNLI and diagnostic files under `root`; returns each labeled file's raw labels
    ({"QQP/train.tsv": ["0", "1", ...], ...}) for checking the label mapping."""
    rng = random.Random(seed)
    labels: dict[str, list] = {}

    def pair() -> list[str]:
        return [_sentence(rng), _sentence(rng)]

    for split in ("train", "dev"):
        raw = [str(i % 2) for i in range(rows)]
        labels[f"QQP/{split}.tsv"] = raw
        _write(root / "QQP" / f"{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
               [[i, 2 * i + 1, 2 * i + 2, *pair(), raw[i]] for i in range(rows)])
    _write(root / "QQP" / "test.tsv", ["id", "question1", "question2"],
           [[TEST_INDEX_START + i, *pair()] for i in range(test_rows)])

    meta = ["index", "promptID", "pairID", "genre", *MNLI_PARSES]
    raw = [MNLI_WORDS[(i + 1) % 3] for i in range(rows)]
    labels["MNLI/train.tsv"] = raw
    _write(root / "MNLI" / "train.tsv", [*meta, "sentence1", "sentence2", "label1", "gold_label"],
           [[i, i, f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", *pair(), raw[i], raw[i]]
            for i in range(rows)])
    for split in ("dev_matched", "dev_mismatched"):
        raw = [MNLI_WORDS[(i + 2) % 3] for i in range(rows)]
        labels[f"MNLI/{split}.tsv"] = raw
        annotators = [f"label{k}" for k in range(1, 6)]
        _write(root / "MNLI" / f"{split}.tsv", [*meta, "sentence1", "sentence2", *annotators, "gold_label"],
               [[i, i, f"{i}n", "travel", "( x )", "( y )", "(ROOT x)", "(ROOT y)", *pair(), *[raw[i]] * 5, raw[i]]
                for i in range(rows)])
    for split in ("test_matched", "test_mismatched"):
        _write(root / "MNLI" / f"{split}.tsv", [*meta, "sentence1", "sentence2"],
               [[TEST_INDEX_START + i, i, f"{i}c", "slate", "( x )", "( y )", "(ROOT x)", "(ROOT y)", *pair()]
                for i in range(test_rows)])

    for split in ("train", "dev"):
        raw = [QNLI_WORDS[(i // 2) % 2] for i in range(rows)]
        labels[f"QNLI/{split}.tsv"] = raw
        _write(root / "QNLI" / f"{split}.tsv", ["index", "question", "sentence", "label"],
               [[i, f"Who {_VERBS[i % 6]} {_OBJECTS[i % 6]}?", _sentence(rng), raw[i]] for i in range(rows)])
    _write(root / "QNLI" / "test.tsv", ["index", "question", "sentence"],
           [[TEST_INDEX_START + i, f"Where is {_OBJECTS[i % 6]}?", _sentence(rng)] for i in range(test_rows)])

    _write(root / "diagnostic" / "diagnostic.tsv", ["index", "sentence1", "sentence2"],
           [[TEST_INDEX_START + i, *pair()] for i in range(test_rows)])
    return labels
