"""Chat data: JSONL conversations through the chat template into packed blocks with an assistant loss mask (issue 23).
The real tokenizer and template throughout; Ray only where marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from rugpt_ray.chat import chat_template_source
from rugpt_ray.cli import build_parser
from rugpt_ray.data import DataConfig, format_summary, open_prepared, prepare_data
from rugpt_ray.data.cache import mismatches
from rugpt_ray.data.chat import CUT, TRUNCATED, WHOLE, fit_conversation, tokenize_chat_piece
from rugpt_ray.data.prepare import _ConversationPacker, _ShardWriter, chat_template_for
from rugpt_ray.data.text import piece_ranges
from rugpt_ray.errors import UserError
from rugpt_ray.train import masked_targets, token_mean_weights

TEMPLATE = chat_template_source("rugpt3-chat")


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def exchange(question: str, answer: str) -> list[dict]:
    return [turn("user", question), turn("assistant", answer)]


def write_jsonl(path: Path, lines: list) -> Path:
    """Records as JSON lines; a str is written as it is (a bad line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def masked_runs(ids: list[int], mask: list[int], tokenizer) -> list[str]:
    """The text of each run of consecutive masked tokens."""
    runs, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


# --------------------------------------------------------------------------------------------- lines -> tokens

def test_the_mask_covers_exactly_each_answer_and_its_end_of_turn(tokenizer):
    messages = [turn("system", "Отвечай кратко."), *exchange("Повтори: мороз и солнце", "мороз и солнце"),
                *exchange("А теперь: день чудесный", "день чудесный")]
    ids, mask, how, lost = fit_conversation(tokenizer, TEMPLATE, messages, block_len=200)
    assert (how, lost) == (WHOLE, 0)
    assert tokenizer.decode(ids) == ("<s>system\nОтвечай кратко.</s>\n<s>user\nПовтори: мороз и солнце</s>\n"
                                     "<s>assistant\nмороз и солнце</s>\n<s>user\nА теперь: день чудесный</s>\n"
                                     "<s>assistant\nдень чудесный</s>\n")
    assert masked_runs(ids, mask, tokenizer) == ["мороз и солнце</s>", "день чудесный</s>"]
    answer = tokenizer.encode("мороз и солнце") + [tokenizer.eos_id]
    assert sum(mask) == len(answer) + len(tokenizer.encode("день чудесный")) + 1  # nothing else: not "assistant\n"


def test_a_long_conversation_is_cut_after_the_last_answer_that_fits_else_truncated(tokenizer):
    first, second = exchange("Повтори: раз два три", "раз два три"), exchange("Повтори: " + "слово " * 40, "слово")
    whole, _, _, _ = fit_conversation(tokenizer, TEMPLATE, first + second, block_len=1000)
    head, head_mask, _, _ = fit_conversation(tokenizer, TEMPLATE, first, block_len=1000)
    ids, mask, how, lost = fit_conversation(tokenizer, TEMPLATE, first + second, block_len=len(head) + 5)
    assert (how, ids, mask, lost) == (CUT, head, head_mask, len(whole) - len(head))  # the leading turns, whole
    ids, mask, how, lost = fit_conversation(tokenizer, TEMPLATE, first + second, block_len=len(head) - 2)
    assert how == TRUNCATED and ids == whole[:len(head) - 2] and lost == len(whole) - len(head) + 2
    assert masked_runs(ids, mask, tokenizer) == ["раз два три"]  # the answer lost its "</s>\n", and only that
    system = [turn("system", "Правило: " + "очень " * 30)]  # the first answer does not fit: truncated
    ids, _, how, _ = fit_conversation(tokenizer, TEMPLATE, system + first, block_len=20)
    assert how == TRUNCATED and len(ids) == 20


@pytest.mark.parametrize("line, reason", [
    ('{"messages": [{"role": "user", "content": "x"}', "invalid JSON (Expecting ',' delimiter at column 47)"),
    ('{"conversation": []}', "missing the 'messages' key"),
    ('{"messages": [{"role": "bot", "content": "x"}]}',
     "message 0: unknown role 'bot' (one of system, user, assistant)"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}',
     "message 1: empty content"),
    ('{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}', "no assistant turn"),
])
def test_a_bad_line_is_named_by_file_and_line_in_any_piece(tmp_path, tokenizer, line, reason):
    good = {"messages": exchange("Повтори: да", "да")}
    path = write_jsonl(tmp_path / "chat.jsonl", [good] * 6 + [""] + [line] + [good] * 3)  # line 8, after a blank
    size = path.stat().st_size
    for piece_bytes in (size, 100, 37):
        pieces = [tokenize_chat_piece(tokenizer, TEMPLATE, str(path), s, e, size, 64)
                  for s, e in piece_ranges(size, piece_bytes)]
        problems = [p.problem for p in pieces if p.problem]
        assert problems == [f"{path}:8: {reason}"], piece_bytes
    (tmp_path / "bad.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + b'{"messages": "\xff"}\n')
    size = (tmp_path / "bad.jsonl").stat().st_size
    piece = tokenize_chat_piece(tokenizer, TEMPLATE, str(tmp_path / "bad.jsonl"), 0, size, size, 64)
    assert piece.problem == f"{tmp_path / 'bad.jsonl'}:2: not valid UTF-8 (byte 14)"


def test_pieces_give_every_conversation_once_with_its_counts(tmp_path, tokenizer):
    records = [{"messages": exchange(f"Повтори: фраза номер {i}", f"фраза номер {i}") * (1 + i % 3)}
               for i in range(30)]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    size = path.stat().st_size
    want = [fit_conversation(tokenizer, TEMPLATE, r["messages"], 40) for r in records]
    for piece_bytes in (size, 300, 1):
        pieces = [tokenize_chat_piece(tokenizer, TEMPLATE, str(path), s, e, size, 40)
                  for s, e in piece_ranges(size, piece_bytes)]
        assert np.concatenate([p.lengths for p in pieces]).tolist() == [len(w[0]) for w in want]
        assert np.concatenate([p.tokens for p in pieces]).tolist() == [t for w in want for t in w[0]]
        assert np.concatenate([p.mask for p in pieces]).tolist() == [m for w in want for m in w[1]]
        assert sum(p.cut for p in pieces) == sum(w[2] == CUT for w in want) == 20  # all but the one-exchange ones
        assert sum(p.truncated for p in pieces) == 0
        assert sum(p.tokens_dropped for p in pieces) == sum(w[3] for w in want) > 0


# --------------------------------------------------------------------------------------------- packing

def test_conversations_are_packed_whole_in_order_and_padded_with_mask_zero(tmp_path):
    writer = _ShardWriter(pafs.LocalFileSystem(), str(tmp_path / "train"), block_len=10, blocks_per_shard=2,
                          masked=True)
    packer = _ConversationPacker(writer, pad_id=0)
    lengths = [4, 5, 3, 10, 2, 2, 2, 7]  # blocks: [4 5] [3] [10] [2 2 2] [7]
    tokens = np.concatenate([np.full(n, 100 + i, np.int32) for i, n in enumerate(lengths)])
    mask = np.concatenate([np.arange(n, dtype=np.int8) % 2 for n in lengths])
    packer.add(tokens[:9], mask[:9], np.array(lengths[:2]))  # the open block carries over to the next piece
    packer.add(tokens[9:], mask[9:], np.array(lengths[2:]))
    packer.close()
    writer.close()
    assert writer.shards == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(tmp_path / "train")
    ids = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False))
    got_mask = np.stack(table.column("loss_mask").to_numpy(zero_copy_only=False))
    assert table.column("idx").to_pylist() == [0, 1, 2, 3, 4]
    assert [[int(t) for t in row if t] for row in ids] == [
        [100] * 4 + [101] * 5, [102] * 3, [103] * 10, [104] * 2 + [105] * 2 + [106] * 2, [107] * 7]
    assert (got_mask[ids == 0] == 0).all() and got_mask[0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 0]
    assert packer.pad_tokens == (ids == 0).sum() == 1 + 7 + 0 + 4 + 3


# --------------------------------------------------------------------------------------------- the cache's settings

def test_the_cache_fingerprint_covers_the_template(tmp_path):
    other = tmp_path / "other.jinja"
    other.write_text(TEMPLATE.replace("<s>{{ message['role'] }}", "<s>[{{ message['role'] }}]"), encoding="utf-8")
    inputs = {"train": {"/d/train.jsonl": 10}, "valid": {"/d/valid.jsonl": 5}}
    assert chat_template_for(None, inputs) == chat_template_for("rugpt3-chat", inputs) == TEMPLATE  # the default
    assert chat_template_for(str(other), inputs) == other.read_text(encoding="utf-8")
    cfg = DataConfig(inputs=["x.jsonl"], tokenizer="t", seq_len=8, out="o")
    built = {"tokenizer": {}, "splits": {}, **cfg.settings(TEMPLATE)}
    assert mismatches(built, settings=cfg.settings(TEMPLATE)) == []
    diffs = mismatches(built, settings=cfg.settings(chat_template_for(str(other), inputs)))
    assert len(diffs) == 1 and diffs[0].startswith("it was built with chat_template_sha256=")
    text = {"tokenizer": {}, "splits": {}, **{k: v for k, v in cfg.settings(None).items() if v is not None}}
    assert mismatches(text, settings=cfg.settings(None)) == []  # a text cache from before chat data still fits
    with pytest.raises(UserError, match=r"the inputs mix chat \(.jsonl, e.g. /d/v.jsonl\) and text \(e.g. /d/t.txt\)"):
        chat_template_for(None, {"train": {"/d/t.txt": 1}, "valid": {"/d/v.jsonl": 1}})
    with pytest.raises(UserError, match="chat_template rugpt3-chat: the inputs are text, not .jsonl conversations"):
        chat_template_for("rugpt3-chat", {"train": {"/d/t.txt": 1}})
    with pytest.raises(UserError, match="chat template 'nope': neither a built-in name"):
        chat_template_for("nope", inputs)
    args = build_parser().parse_args(["prepare-data", "--inputs", "c.jsonl", "--tokenizer", "t", "--seq-len", "8",
                                      "--out", "o", "--chat-template", str(other)])
    assert args.chat_template == str(other)  # prepare-data's flag is DataConfig's field


# --------------------------------------------------------------------------------------------- the loss

def test_token_mean_weights_make_a_step_the_mean_over_all_its_assistant_tokens():
    torch.manual_seed(0)
    micro = []
    for kept in (3, 40, 0, 11):  # micro-batches with very different numbers of assistant tokens
        tokens = torch.randint(5, 100, (2, 33))
        mask = torch.zeros_like(tokens)
        mask.view(-1)[torch.randperm(tokens.numel())[:kept]] = 1
        micro.append((tokens, mask))
    losses = torch.rand(len(micro), 2, 32)  # per-token losses
    weights = token_mean_weights(micro, pad_id=0, world=1, device="cpu")
    kept = [masked_targets(t, 0, m) != -100 for t, m in micro]
    means = [(loss[k].sum() / k.sum().clamp(min=1)).item() for loss, k in zip(losses, kept, strict=True)]
    # DeepSpeed averages the micro-batches' losses; weighted, that average is the token mean over the step
    step = sum(w * m for w, m in zip(weights, means, strict=True)) / len(micro)
    want = sum(loss[k].sum() for loss, k in zip(losses, kept, strict=True)) / sum(k.sum() for k in kept)
    assert step == pytest.approx(want.item(), rel=1e-6)
    assert weights[2] == 0.0 and sum(weights) == pytest.approx(len(micro))


# --------------------------------------------------------------------------------------------- through Ray Data

@pytest.mark.slow
def test_prepare_packs_conversations_with_masks_and_refuses_bad_lines(ray_local, tmp_path, data_dir, tokenizer):
    records = [{"messages": [turn("system", "Повторяй.")] * (i % 2) + exchange(f"Повтори: строка {i}", f"строка {i}")
                * (1 + i % 4)} for i in range(200)]
    train = write_jsonl(tmp_path / "in" / "train.jsonl", records[:160])
    valid = write_jsonl(tmp_path / "in" / "valid.jsonl", records[160:])
    cfg = DataConfig(inputs=[str(train)], valid=[str(valid)], tokenizer=str(data_dir / "tokenizer"), seq_len=63,
                     out=str(tmp_path / "cache"), shuffle=False, piece_bytes=2000, blocks_per_shard=16)
    meta = prepare_data(cfg, progress=False)
    assert meta["chat_template"] == TEMPLATE
    want = [fit_conversation(tokenizer, TEMPLATE, r["messages"], 64) for r in records[:160]]
    s = meta["splits"]["train"]
    assert (s["documents"], s["conversations_cut"], s["conversations_truncated"]) == (
        160, sum(w[2] == CUT for w in want), sum(w[2] == TRUNCATED for w in want))
    assert s["conversations_cut"] > 0 and s["tokens_kept"] == sum(len(w[0]) for w in want)
    assert s["tokens"] - s["tokens_kept"] == s["tokens_dropped"] == sum(w[3] for w in want)
    assert s["assistant_tokens"] == sum(sum(w[1]) for w in want)
    prepared = open_prepared(meta["out"])
    ids, mask = prepared.head("train", 1000), prepared.head("train", 1000, "loss_mask")
    assert len(ids) == s["blocks"] and s["pad_tokens"] == (ids == tokenizer.pad_id).sum()
    stream = [t for row in ids for t in row.tolist() if t != tokenizer.pad_id]
    assert stream == [t for w in want for t in w[0]]  # every conversation, whole and in order
    assert [m for row_ids, row_mask in zip(ids, mask, strict=True) for t, m in zip(row_ids, row_mask, strict=True)
            if t != tokenizer.pad_id] == [m for w in want for m in w[1]]
    assert "conversations cut after an assistant turn" in format_summary(meta)
    assert prepare_data(cfg, progress=False)["reused"] is True
    cfg.chat_template = str(tmp_path / "other.jinja")
    Path(cfg.chat_template).write_text(TEMPLATE.replace("\n{% if", " \n{% if"), encoding="utf-8")
    with pytest.raises(UserError, match="built with chat_template_sha256=.*pass --overwrite"):
        prepare_data(cfg, progress=False)

    write_jsonl(tmp_path / "bad" / "train.jsonl", records[:50] + ['{"messages": []}'] + records[:5])
    cfg = DataConfig(inputs=[str(tmp_path / "bad")], tokenizer=str(data_dir / "tokenizer"), seq_len=63,
                     out=str(tmp_path / "never"), piece_bytes=1000)
    with pytest.raises(UserError, match=rf"^{tmp_path}/bad/train.jsonl:51: 'messages' must be a non-empty list$"):
        prepare_data(DataConfig(**{**cfg.__dict__, "inputs": [str(tmp_path / "bad" / "train.jsonl")]}),
                     progress=False)
    assert not (tmp_path / "never").exists()
