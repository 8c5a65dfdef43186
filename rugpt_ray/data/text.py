"""From a file's bytes to documents and token ids, without Ray (run inside prepare-data's Ray tasks and by `evaluate`).

Big files are cut into pieces for parallel tokenization; the cuts fall on line (paragraph) boundaries where the
GPT-2 pre-tokenizer splits anyway, so the ids are exactly those of tokenizing the whole file at once.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from rugpt_ray.errors import UserError
from rugpt_ray.storage import filesystem

if TYPE_CHECKING:
    from rugpt_ray.tokenizer import RuGPTTokenizer

log = logging.getLogger("rugpt_ray.data")

SNIFF_BYTES = 8192
CHUNK_CHARS = 4096  # encode_batch is fastest on a few-KB strings; whole 400 KB files are ~25 % slower
_BOUNDARY_WINDOW = 1 << 16
_SURROGATE = re.compile("[\udc80-\udcff]")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# A cut between "x\n" and "y" (x, y not whitespace) gives the same pre-tokens as no cut: "\n" is its own pre-token.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
# The same cut on raw bytes, conservatively: x, y are printable ASCII or a 2-byte UTF-8 char (U+00C0..U+07FF,
# Cyrillic included, no whitespace in that range). Matches end exactly at the cut.
_NOT_SPACE = rb"(?:[\x21-\x7e]|[\xc3-\xdf][\x80-\xbf])"
_LINE_CUT = re.compile(_NOT_SPACE + rb"\n(?=" + _NOT_SPACE + rb")")
_PARAGRAPH_CUT = re.compile(rb"\n[ \t\r\f\v]*\n")


class Document(NamedTuple):
    """One training document: a whole file, or one blank-line-separated paragraph of it."""

    path: str
    index: int
    text: str


class PieceResult(NamedTuple):
    """What one piece of one file gave: its tokens (EOS after each document that ends in it) and its health."""

    tokens: np.ndarray
    documents: int
    bad_bytes: int
    first_bad: int  # byte offset in the file of the first invalid UTF-8 byte, -1 if none
    status: str  # "ok", "empty", "binary", "bad_utf8" (only with strict_utf8), "error"
    message: str = ""


def looks_binary(head: bytes) -> bool:
    """NUL bytes, or over 30 % of the first bytes not UTF-8: an image, an archive, or text in another encoding."""
    if b"\x00" in head:
        return True
    return len(_SURROGATE.findall(head.decode("utf-8", "surrogateescape"))) > 0.3 * len(head)


def decode_utf8(data: bytes) -> tuple[str, int, int]:
    """Text with one U+FFFD per invalid byte, the count of invalid bytes, and the offset of the first (-1 if none)."""
    try:
        return data.decode("utf-8"), 0, -1
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", "surrogateescape")
        return _SURROGATE.sub("\ufffd", text), len(_SURROGATE.findall(text)), e.start


def split_paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs, stripped, empty ones dropped."""
    return [p for p in (part.strip() for part in _PARAGRAPH_BREAK.split(text)) if p]


def _safe_chunks(text: str) -> Iterator[str]:
    pos = 0
    while len(text) - pos > CHUNK_CHARS:
        m = _SAFE_CUT.search(text, pos + CHUNK_CHARS)
        if m is None:
            break
        yield text[pos : m.start()]
        pos = m.start()
    yield text[pos:]


def encode_documents(tokenizer: RuGPTTokenizer, texts: list[str], eos_after: bool) -> np.ndarray:
    """All texts' ids concatenated (int32), each followed by EOS when `eos_after`; long texts are encoded in chunks."""
    chunks: list[str] = []
    ends: list[int] = []  # index into chunks after which a document ends
    for text in texts:
        chunks.extend(_safe_chunks(text))
        ends.append(len(chunks))
    encoded = tokenizer.encode_batch(chunks)
    if eos_after:
        eos = [tokenizer.eos_id]
        pieces = []
        start = 0
        for end in ends:
            pieces.extend(encoded[start:end])
            pieces.append(eos)
            start = end
        encoded = pieces
    total = sum(map(len, encoded))
    return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=total)


def _cut_at_or_after(f, x: int, size: int, paragraphs: bool) -> int:
    """First cut position >= x. Pieces of a file end and start at the same cut, so they tile it exactly."""
    if x <= 0 or x >= size:
        return min(max(x, 0), size)
    pattern = _PARAGRAPH_CUT if paragraphs else _LINE_CUT
    pos = max(0, x - 4)
    f.seek(pos)
    tail = b""
    while True:
        chunk = f.read(_BOUNDARY_WINDOW)
        if not chunk:
            return size
        buf, base = tail + chunk, pos - len(tail)
        for m in pattern.finditer(buf):
            if base + m.end() >= x:
                return base + m.end()
        pos += len(chunk)
        tail = buf[-8:]


def read_piece(f, start: int, end: int, size: int, *, paragraphs: bool) -> tuple[bytes, int]:
    """The bytes of nominal range [start, end) of an open file, both ends moved to the next cut, and where they
    start."""
    a = _cut_at_or_after(f, start, size, paragraphs)
    b = _cut_at_or_after(f, end, size, paragraphs)
    f.seek(a)
    return f.read(max(0, b - a)), a


def piece_ranges(size: int, piece_bytes: int) -> list[tuple[int, int]]:
    """Nominal [start, end) byte ranges; the task moves both ends to the next cut."""
    return [(start, min(start + piece_bytes, size)) for start in range(0, size, piece_bytes)] or [(0, 0)]


def tokenize_piece(
    tokenizer: RuGPTTokenizer, path: str, start: int, end: int, size: int, *, paragraphs: bool, strict_utf8: bool
) -> PieceResult:
    """Tokenize bytes [start, end) of a file (both moved to the next cut). Never raises for bad data: the
    driver turns the status into a warning or one error line naming the file."""
    empty = np.empty(0, dtype=np.int32)
    try:
        fs, fs_path = filesystem(path)
        with fs.open_input_file(fs_path) as f:
            if looks_binary(f.read(SNIFF_BYTES)):
                return PieceResult(empty, 0, 0, -1, "binary")
            data, a = read_piece(f, start, end, size, paragraphs=paragraphs)
    except OSError as e:
        return PieceResult(empty, 0, 0, -1, "error", f"{type(e).__name__}: {e}")
    text, bad, first_bad = decode_utf8(data)
    first_bad = a + first_bad if bad else -1
    if bad and strict_utf8:
        return PieceResult(empty, 0, bad, first_bad, "bad_utf8")
    whole_file = start == 0 and end >= size
    if paragraphs:
        docs = split_paragraphs(text)
        status = "empty" if whole_file and not docs else "ok"
        return PieceResult(encode_documents(tokenizer, docs, eos_after=True), len(docs), bad, first_bad, status)
    if whole_file and not text.strip():
        return PieceResult(empty, 0, bad, first_bad, "empty")
    last = end >= size
    return PieceResult(encode_documents(tokenizer, [text], eos_after=last), int(last), bad, first_bad, "ok")


def file_text(path: str, data: bytes, *, strict_utf8: bool) -> str | None:
    """Decoded text of a whole file, or None (with a warning naming the file) when it is empty or binary."""
    if looks_binary(data[:SNIFF_BYTES]):
        log.warning("%s: skipped, not text (NUL bytes or mostly invalid UTF-8 in the first 8 KiB)", path)
        return None
    text, bad, first_bad = decode_utf8(data)
    if bad:
        if strict_utf8:
            raise UserError(f"{path}: not valid UTF-8 ({bad} invalid bytes, first at byte {first_bad}; --strict-utf8)")
        log.warning("%s: %d bytes are not valid UTF-8 (first at byte %d), decoded as U+FFFD", path, bad, first_bad)
    if not text.strip():
        log.warning("%s: skipped, empty", path)
        return None
    return text


def iter_documents(paths: Iterable[str], paragraphs: bool = False, strict_utf8: bool = False) -> Iterator[Document]:
    """Documents of the given files in order, with the same skip/warn rules as prepare-data (for `evaluate`)."""
    for path in paths:
        fs, fs_path = filesystem(path)
        with fs.open_input_stream(fs_path) as f:
            data = f.read()
        text = file_text(path, data, strict_utf8=strict_utf8)
        if text is None:
            continue
        for index, doc in enumerate(split_paragraphs(text) if paragraphs else [text]):
            yield Document(path, index, doc)
