"""Tokenized splits: single texts and pairs as model inputs, cached on disk by content."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config.tasks import Task
from ..files import cache_dir

logger = logging.getLogger("gluetune")

# Decoder tokenizers (Qwen, Llama, ...) have no pair template: the two texts of a pair task are
# joined with this separator into one sequence. Encoders get a real pair ([CLS] a [SEP] b [SEP]).
PAIR_SEPARATOR = "\n"


def is_pair_template_tokenizer(tokenizer) -> bool:
    """Encoders (BERT family) build pair inputs with [SEP]; decoder tokenizers have no sep token."""
    return tokenizer.sep_token is not None


def encode_texts(tokenizer, texts: list[tuple[str, ...]], max_length: int) -> tuple[dict[str, list], int]:
    """Token ids for single texts or pairs, truncated to max_length; also how many were truncated.

    A decoder's pair is one text (first + PAIR_SEPARATOR + second), encoded whole; one too long is cut
    as the encoders' pairs are (longest first), its separator kept: cut from the right, it would lose
    the second text, and the head reads the last token (`join_and_cut`)."""
    columns = list(zip(*texts)) if texts else [[]]
    joined = len(columns) == 2 and not is_pair_template_tokenizer(tokenizer)
    args = [[a + PAIR_SEPARATOR + b for a, b in zip(*columns)]] if joined else [list(c) for c in columns]
    full = tokenizer(*args, truncation=False)
    long_rows = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    if long_rows and joined:
        for i in long_rows:
            kept = join_and_cut(tokenizer, columns[0][i], columns[1][i], max_length)
            for key in full:
                full[key][i] = [full[key][i][k] for k in kept]
    elif long_rows:
        # Only the few over-long rows are encoded again, with truncation.
        cut = tokenizer(*[[c[i] for i in long_rows] for c in args], truncation=True, max_length=max_length)
        for key in full:
            for j, i in enumerate(long_rows):
                full[key][i] = cut[key][j]
    return dict(full), len(long_rows)


def join_and_cut(tokenizer, first: str, second: str, max_length: int) -> list[int]:
    """Which tokens of the joined pair `first + PAIR_SEPARATOR + second` (encoded whole) to keep so that
    at most `max_length` remain (`pair_tokens_to_keep`); the export's tokenizer cuts alike."""
    enc = tokenizer(first + PAIR_SEPARATOR + second, return_offsets_mapping=True, return_special_tokens_mask=True)
    return pair_tokens_to_keep(enc["offset_mapping"], enc["special_tokens_mask"], len(first), len(PAIR_SEPARATOR),
                               max_length)


def pair_tokens_to_keep(offsets, special, first_chars: int, separator_chars: int, max_length: int) -> list[int]:
    """The positions to keep of a pair encoded as one text (its tokens' character `offsets` and
    `special` mask; the first text's length and the separator's, in characters), at most `max_length`.

    Each token belongs to the first text (it ends before the separator), to the second (it starts
    after it), or to the separator (it overlaps it, e.g. Qwen's ".\n"). Special tokens and the
    separator stay; the texts lose tokens from their ends as transformers' `longest_first` pair
    truncation removes them (the longer text first, then both alike), so a short second text is kept
    whole. Without room even for the special tokens and the separator: the first `max_length` tokens.
    (Shipped as is in exports that join pairs: results.export.)
    """
    sides = []
    for (start, end), is_special in zip(offsets, special):
        if is_special:
            sides.append("keep")
        elif end <= first_chars:
            sides.append("first")
        elif start >= first_chars + separator_chars:
            sides.append("second")
        else:
            sides.append("keep")
    first, second = sides.count("first"), sides.count("second")
    room = max_length - sides.count("keep")
    if room < 0:
        return list(range(min(max_length, len(sides))))
    excess = max(0, first + second - room)
    uneven = min(excess, abs(first - second))  # the longer one's lead goes first
    even = excess - uneven  # then both, the first losing the smaller half
    if first > second:
        first_cut, second_cut = uneven + even // 2, even - even // 2
    else:
        first_cut, second_cut = even // 2, uneven + even - even // 2
    keep = {"first": first - first_cut, "second": second - second_cut}
    kept, seen = [], {"first": 0, "second": 0}
    for position, side in enumerate(sides):
        if side != "keep":
            seen[side] += 1
            if seen[side] > keep[side]:
                continue
        kept.append(position)
    return kept


def tokenize(ds, tokenizer, task: Task, max_length: int, split: str, cache: bool = True):
    """Model inputs plus a `length` column (for length grouping and sorting); texts dropped.

    The result is cached on disk, keyed by the data's content fingerprint, the tokenizer's full
    definition and max_length: a sweep or a resumed run does not tokenize the same split again
    (MNLI's 393k pairs take a minute), and the cached copy is memory-mapped.
    """
    folder = _token_cache_folder(ds, tokenizer, task, max_length) if cache else None
    if folder is not None and (folder / _CACHE_META).is_file():
        import datasets

        out, truncated = datasets.load_from_disk(str(folder)), json.loads((folder / _CACHE_META).read_text())["truncated"]
    else:
        truncated = 0

        def encode(batch):
            nonlocal truncated
            enc, n = encode_texts(tokenizer, list(zip(*(batch[c] for c in task.text_columns))), max_length)
            truncated += n
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            return enc

        # new_fingerprint: our cache key already names the tokenizer; without it datasets hashes
        # the whole tokenizer object (seconds for Qwen's) to fingerprint the result.
        out = ds.map(encode, batched=True, batch_size=2048, remove_columns=list(task.text_columns),
                     desc=f"Tokenizing {split}", load_from_cache_file=False,
                     new_fingerprint=folder.name if folder is not None else None)
        if folder is not None:
            out = _store_in_cache(out, folder, truncated)
    if truncated:
        logger.warning("%s: %d of %d examples are longer than max_length=%d tokens and were truncated",
                       split, truncated, len(ds), max_length)
    return out


_CACHE_META = "gluetune_tokenized.json"


def _token_cache_folder(ds, tokenizer, task: Task, max_length: int) -> Path | None:
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    fingerprint = getattr(ds, "_fingerprint", None)
    if backend is None or fingerprint is None:  # no content identity to key on: do not cache
        return None
    key = hashlib.sha256()
    for part in (_ENCODING_VERSION, fingerprint, _definition_digest(tokenizer), str(tokenizer.all_special_tokens),
                 str(task.text_columns), str(max_length), PAIR_SEPARATOR, str(is_pair_template_tokenizer(tokenizer))):
        key.update(part.encode("utf-8", "surrogatepass"))
        key.update(b"\0")
    return cache_root() / key.hexdigest()[:32]


def _definition_digest(tokenizer) -> str:
    """A digest of the backend tokenizer's definition without its call-time state (truncation, padding,
    which every call sets), computed once per tokenizer object: serializing Qwen's (4.6 MB of JSON)
    took longer than tokenizing CoLA."""
    import hashlib

    digest = getattr(tokenizer, "_gluetune_definition_digest", None)
    if digest is None:
        backend = tokenizer.backend_tokenizer
        if backend.truncation is not None or backend.padding is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        digest = hashlib.sha256(backend.to_str().encode("utf-8", "surrogatepass")).hexdigest()
        tokenizer._gluetune_definition_digest = digest
    return digest


def cache_root() -> Path:
    """Where tokenized splits are cached: $GLUETUNE_CACHE_DIR/tokenized (default ~/.cache/gluetune)."""
    return cache_dir("tokenized")


def tokenization_cache(clear: bool = False) -> tuple[Path, int, int]:
    """(the cache folder, how many cached splits, their size in bytes), emptied first if `clear`
    (the size reported is then what was freed). Entries are never evicted on their own: a
    split is a few MB (MNLI's train split: ~150 MB)."""
    import shutil

    root = cache_root()
    entries = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    size = sum(f.stat().st_size for entry in entries for f in entry.rglob("*") if f.is_file())
    if clear:
        for entry in entries:
            shutil.rmtree(entry, ignore_errors=True)
    return root, len(entries), size


_ENCODING_VERSION = "2"  # bump when encode_texts changes what it produces (2: decoder pairs cut longest first)


def _store_in_cache(out, folder: Path, truncated: int):
    """Write to a temporary folder and rename it into place: a killed run leaves no torn entry."""
    import shutil
    import tempfile

    import datasets

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        out.save_to_disk(str(tmp))
        (tmp / _CACHE_META).write_text(json.dumps({"truncated": truncated}))
        try:
            tmp.rename(folder)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        return datasets.load_from_disk(str(folder))
    except OSError as err:  # a read-only or full disk costs the cache, not the run
        logger.warning("tokenized data not cached (%s)", err)
        return out
