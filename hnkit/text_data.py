"""Reading training text as a stream: documents from .txt files, folders of them, .jsonl/.json
records or a saved dataset, cut into pieces of bounded size (what :mod:`hnkit.text` tokenizes).

Files are read incrementally; a document is cut into pieces of at most ``PIECE_CHARS`` (64 Ki)
characters. For JSON lines, one line of at most ``MAX_LINE_BYTES`` (16 MiB) is read at a time. A
longer JSON line is refused, before it is parsed, with one line naming the file, the line and the
limit: a record that big is almost always a mistake (a whole corpus in one record) and would need
several times its size to parse; a .txt file has no such limit.

Where a piece ends, searching the second half of its window from the end: before a space between
two letters; else before whitespace after a letter or digit; else after a single newline that
follows a non-space and precedes a letter (text without spaces, such as Chinese or Japanese with a
line break after "。"); else, in text with none of these, at ``PIECE_CHARS`` (a word may be cut in
two). The pre-tokenizers of byte-level BPE tokenizers (GPT-2, GPT-NeoX, Llama 3, Qwen2 and the
like) split text at these places too, so, but for a cut at ``PIECE_CHARS``, the tokens are exactly
those of the whole document (``tests/test_data_bounds.py`` checks GPT-2's and Llama 3's rules).
Tokenizers that mark the start of every text (Llama 2's and Mistral's SentencePiece "▁" in their
legacy form) would add that mark at every piece: a probe of the tokenizer in :mod:`hnkit.text`, once per call (``tok("a
b") == tok("a") + tok("b")`` but not ``tok("a") + tok(" b")``), finds them, and a piece that starts
with a space after a non-space is then tokenized without that space, which gives the whole
document's tokens (byte-level BPE with ``add_prefix_space`` needs no such help: it adds no mark
before a space). With these tokenizers, a piece that starts other than at a space (a cut before a
line break or tab, after a line break, or inside a word) starts with the mark, and the tokens next
to that cut may differ; cuts are at least 32 Ki characters apart, and only documents longer than
64 Ki characters have any.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import HnkitError, first_line

PIECE_CHARS = 64 * 1024  # text is tokenized in pieces of at most this many characters
MAX_LINE_BYTES = 16 * 1024 * 1024  # the longest JSON line (one record) read: see the module docstring


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists())


def _data_files(path: Path) -> list[Path]:
    """The files whose content makes up the data (what the cache key is computed from)."""
    if path.is_file():
        return [path]
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(path.rglob("*.txt"))


def read_pieces(data: str | os.PathLike, text_field: str = "text", piece_chars: int = PIECE_CHARS,
                max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, bool]]:
    """The text of the data in order, in pieces of at most ``piece_chars`` characters, each with
    whether it ends a document; read as it is consumed. Documents: a .txt file, each .txt file of
    a folder, the ``text_field`` of each record of a .jsonl/.json file, or of each row of a folder
    written by ``datasets.Dataset.save_to_disk``; blank ones are skipped. A JSON line longer than
    ``max_line_bytes`` is refused before it is parsed."""
    path = Path(data)
    if not path.exists():
        raise HnkitError(f"{data}: no such file or folder")
    found = False
    for chunks in _documents(path, text_field, piece_chars, max_line_bytes):
        last = None
        for piece in _pieces(chunks, piece_chars):
            if last is not None:
                yield last, False
            last = piece
        yield last, True
        found = True
    if not found:
        raise HnkitError(f"{data}: no text found (empty data)")


def _documents(path: Path, text_field: str, size: int, max_line_bytes: int) -> Iterator[Iterator[str]]:
    """Each non-blank document, as its text in chunks of ``size`` characters."""
    if _is_saved_dataset(path) or path.is_file() and path.suffix in (".jsonl", ".json"):
        texts = _read_json_lines(path, text_field, max_line_bytes) if path.is_file() else \
            _saved_dataset_texts(path, text_field)
        for text in texts:
            if isinstance(text, str) and text and not text.isspace():
                yield (text[i:i + size] for i in range(0, len(text), size))
        return
    files = _data_files(path)
    if not files:
        raise HnkitError(f"{path}: no .txt files in this folder")
    for f in files:
        if any(not chunk.isspace() for chunk in _text_chunks(f, size)):  # reads up to the first text
            yield _text_chunks(f, size)


def _pieces(chunks: Iterable[str], size: int) -> Iterator[str]:
    """The text of ``chunks`` (each at most ``size`` characters) cut into pieces of at most
    ``size`` characters, at the places :func:`_cut` chooses."""
    text = ""
    for chunk in chunks:
        text += chunk
        while len(text) > size:
            cut = _cut(text, size)
            yield text[:cut]
            text = text[cut:]
    if text:
        yield text


_AFTER_WORD = re.compile(r"(?<=[^\W_])\s")  # whitespace after a letter or a digit
_AFTER_LINE = re.compile(r"(?<=\S\n)[^\W\d_]")  # a letter after a single newline that follows a non-space


def _cut(text: str, size: int) -> int:
    """Where to end a piece of ``text`` (longer than ``size``), searching the second half of its
    first ``size`` characters from the end: before a space between two letters, else before
    whitespace after a letter or digit, else after a single newline before a letter (word ends,
    where byte-level BPE tokenizers such as GPT-2's, Llama 3's and Qwen2's split too, so the tokens
    are those of the uncut text), else at ``size`` (text without such places: a word may be cut in
    two)."""
    low = size // 2
    i = text.rfind(" ", low, size)
    while i > low:
        if text[i - 1].isalpha() and text[i + 1].isalpha():
            return i
        i = text.rfind(" ", low, i)
    for rule in (_AFTER_WORD, _AFTER_LINE):
        ends = [m.start() for m in rule.finditer(text, low, size)]
        if ends:
            return ends[-1]
    return size


def _text_chunks(path: Path, size: int) -> Iterator[str]:
    """A text file in chunks of ``size`` characters (newlines read as ``\\n``)."""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(size):
                yield chunk
    except UnicodeDecodeError:
        raise HnkitError(f"{path}: not UTF-8 text") from None


def _saved_dataset_texts(path: Path, text_field: str) -> Iterator:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys") and "train" in ds:  # a DatasetDict: take its train split
        ds = ds["train"]
    if text_field not in ds.column_names:
        raise HnkitError(f"{path}: no {text_field!r} column (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns([text_field]).iter(batch_size=64):
        yield from batch[text_field]


def _read_json_lines(path: Path, text_field: str, max_line_bytes: int) -> Iterator:
    """The ``text_field`` of each JSON object in a JSON-lines file (or a JSON array of objects),
    read line by line; a line longer than ``max_line_bytes`` is refused before it is parsed."""
    if path.suffix == ".json" and _starts_with(path, "["):
        rows = ((f"item {n}", row) for n, row in enumerate(_json_array(path, max_line_bytes), 1))
    else:
        rows = _json_lines(path, max_line_bytes)
    fields, n_rows, found = set(), 0, False
    for where, row in rows:
        if not isinstance(row, dict):
            raise HnkitError(f"{path}: expected one JSON object per line ({where} is not an object)")
        fields.update(row)
        n_rows += 1
        if text_field in row:
            found = True
            yield row[text_field]
    if n_rows and not found:
        raise HnkitError(f"{path}: no {text_field!r} field (fields: {', '.join(sorted(fields)) or 'none'})")


def _json_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[str, object]]:
    """("line N", parsed object) for each non-blank line of a JSON-lines file."""
    with open(path, "rb") as f:
        for n, line in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), 1):
            if len(line) > max_line_bytes:
                raise HnkitError(f"{path}: line {n} is longer than {max_line_bytes} bytes, the limit for one "
                                 f"JSON line; split it into smaller records (or use a .txt file)")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise HnkitError(f"{path}: line {n}: not UTF-8 text") from None
            if text.strip():
                yield f"line {n}", _parse_json(path, text, f"line {n}: ")


def _json_array(path: Path, max_line_bytes: int) -> list:
    """A .json file holding one array, parsed whole (so only up to ``max_line_bytes``)."""
    if path.stat().st_size > max_line_bytes:
        raise HnkitError(f"{path}: a JSON array file longer than {max_line_bytes} bytes is not read whole; "
                         "write it as JSON lines (.jsonl), one object per line")
    return _parse_json(path, "".join(_text_chunks(path, PIECE_CHARS)), "")


def _parse_json(path: Path, text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise HnkitError(f"{path}: {where}not valid JSON ({first_line(exc)})") from None


def _starts_with(path: Path, char: str) -> bool:
    """Whether the first non-blank character of a text file is ``char``."""
    for chunk in _text_chunks(path, 4096):
        if chunk.strip():
            return chunk.lstrip().startswith(char)
    return False
