"""From JSONL conversations to token ids and assistant loss masks, without Ray (run inside prepare-data's Ray tasks).

Each line is one conversation in TRL's conversational format, `{"messages": [{"role", "content"}, ...]}`, rendered
through the chat template (`rugpt_ray.chat`): the mask is 1 on what its `{% generation %}` blocks cover, the
assistant's content and end-of-turn `</s>`. A conversation longer than a block keeps its leading turns up to the
last assistant turn that fits ("cut"); when not even the first assistant turn fits it is truncated to the block
("truncated"). Both are counted, and a bad line stops the run with its file and line number: nothing is dropped
silently. Blank lines are not conversations and are skipped.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from rugpt_ray.data.text import read_piece
from rugpt_ray.storage import filesystem

if TYPE_CHECKING:
    from rugpt_ray.tokenizer import RuGPTTokenizer

WHOLE, CUT, TRUNCATED = "whole", "cut", "truncated"


class ChatPiece(NamedTuple):
    """What one piece of a JSONL file gave: its conversations (ids and masks concatenated, with their lengths) and
    how many were cut or truncated; or, at a bad line, the error naming the file and the line."""

    tokens: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    cut: int
    truncated: int
    tokens_dropped: int
    problem: str = ""


def fit_conversation(tokenizer: RuGPTTokenizer, template: str, messages: list[dict[str, str]],
                     block_len: int) -> tuple[list[int], list[int], str, int]:
    """Ids and loss mask of a conversation that fit in `block_len` tokens, how it was made to fit (WHOLE, CUT at an
    assistant turn, TRUNCATED) and how many of its tokens that lost."""
    from rugpt_ray.chat import chat_tokens

    ids, mask = chat_tokens(tokenizer, template, messages)
    if len(ids) <= block_len:
        return ids, mask, WHOLE, 0
    ends = [i + 1 for i, m in enumerate(messages[:-1]) if m["role"] == "assistant"]
    for end in reversed(ends):  # the longest run of leading turns that ends with an answer and fits
        kept, kept_mask = chat_tokens(tokenizer, template, messages[:end])
        if len(kept) <= block_len:
            return kept, kept_mask, CUT, len(ids) - len(kept)
    return ids[:block_len], mask[:block_len], TRUNCATED, len(ids) - block_len


def parse_line(line: str) -> list[dict[str, str]]:
    """The messages of one JSONL line; ValueError with the reason when it is not a conversation."""
    from rugpt_ray.chat import check_conversation

    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    return check_conversation(record)


def tokenize_chat_piece(tokenizer: RuGPTTokenizer, template: str, path: str, start: int, end: int, size: int,
                        block_len: int) -> ChatPiece:
    """Conversations on lines [start, end) of a JSONL file (both moved to the next line break), each fit into a
    block. Never raises for bad data: it stops at the first bad line with `problem` naming the file and the line
    (for the driver to raise)."""
    try:
        fs, fs_path = filesystem(path)
        with fs.open_input_file(fs_path) as f:
            data, offset = read_piece(f, start, end, size, paragraphs=False)
    except OSError as e:
        return _stopped(f"{path}: cannot read ({type(e).__name__}: {e})")
    ids: list[int] = []
    mask: list[int] = []
    lengths: list[int] = []
    counts = {WHOLE: 0, CUT: 0, TRUNCATED: 0}
    dropped = 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            conv_ids, conv_mask, how, lost = fit_conversation(tokenizer, template, parse_line(line), block_len)
        except UnicodeDecodeError as e:
            return _stopped(f"{path}:{_lines_before(fs, fs_path, offset) + number}: not valid UTF-8 (byte {e.start})")
        except ValueError as e:  # not a conversation, or (ChatTemplateError) one the template cannot render
            return _stopped(f"{path}:{_lines_before(fs, fs_path, offset) + number}: {e}")
        ids += conv_ids
        mask += conv_mask
        lengths.append(len(conv_ids))
        counts[how] += 1
        dropped += lost
    return ChatPiece(np.array(ids, np.int32), np.array(mask, np.int8), np.array(lengths, np.int32),
                     counts[CUT], counts[TRUNCATED], dropped)


def _lines_before(fs, fs_path: str, offset: int) -> int:
    """Line breaks in a file's first `offset` bytes: counted only to name a bad line, so pieces need not."""
    count = 0
    with fs.open_input_file(fs_path) as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 20))
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


def _stopped(problem: str) -> ChatPiece:
    empty = np.empty(0, np.int32)
    return ChatPiece(empty, empty.astype(np.int8), empty, 0, 0, 0, problem)
