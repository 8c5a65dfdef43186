"""`prepare-data`: txt files -> Ray Data (read + tokenize in `map_batches`) -> packed blocks -> Parquet cache.

Tokenizing is the expensive part and runs in parallel Ray tasks, one per file piece. The pieces come back in
order (`preserve_order`) to one packer on the driver, which joins the documents with EOS and cuts blocks of
seq_len + 1 tokens with carry-over across documents: only the last partial block of each split is dropped, and
the output is the same for the same inputs and seed however many workers ran.

Chat data (`.jsonl` conversations, `rugpt_ray.data.chat`) takes the same way with the chat template's loss mask
beside the ids; its packer keeps conversations whole: a block takes them in order while the next one fits, and
the rest of the block is `<pad>` with mask 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import logging
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from rugpt_ray.config import Config, option
from rugpt_ray.data.cache import FORMAT, META_NAME, block_schema, blocks_table, mismatches, read_meta, write_json
from rugpt_ray.data.chat import tokenize_chat_piece
from rugpt_ray.data.inputs import CHAT_SUFFIX, Inputs, resolve_splits
from rugpt_ray.data.text import piece_ranges, tokenize_piece
from rugpt_ray.errors import UserError
from rugpt_ray.ray_start import start_ray
from rugpt_ray.storage import check_writable, filesystem, is_uri

log = logging.getLogger("rugpt_ray.data")


@dataclass
class DataConfig(Config):
    """What to prepare and how; field names are the `prepare-data` flags (`seq_len` -> `--seq-len`)."""

    where: ClassVar[str] = "prepare-data"

    inputs: list[str]
    """Training text: file.list, folder, glob, .txt file or URI (s3://, gs://, file://), or a list of these."""
    tokenizer: str
    """Tokenizer folder (vocab.json + merges.txt) or hub id; its fingerprint is stored and checked."""
    seq_len: int = option(ge=1)
    """Model context length; blocks hold seq_len + 1 tokens (inputs and shifted labels)."""
    out: str
    """Cache folder (local or URI) for meta.json and the Parquet shards; written under a temp name, then renamed."""
    valid: list[str] = option(factory=list)
    """Validation text, same forms as `inputs`; must not share files with it."""
    paragraphs: bool = False
    """A document is each blank-line-separated paragraph instead of each whole file (the seed's way)."""
    strict_utf8: bool = False
    """Invalid UTF-8 is an error instead of a warning with U+FFFD replacement."""
    seed: int = 0
    """Seed of the training file order here and of the block order in each training epoch."""
    shuffle: bool = True
    """Shuffle the training files (seeded); off, files go in sorted order (for inspection)."""
    blocks_per_shard: int = option(8192, ge=1)
    """Blocks per Parquet file (8192 blocks at seq_len 2048 is 64 MiB before compression)."""
    piece_bytes: int = option(4 << 20, ge=1)
    """Files above this size are tokenized by several Ray tasks, cut at line boundaries (ids unchanged)."""
    overwrite: bool = False
    """Replace an existing cache built with other settings instead of refusing."""
    chat_template: str | None = None
    """Chat template for `.jsonl` conversations: a built-in name or a .jinja file (default rugpt3-chat)."""

    def settings(self, chat_template: str | None) -> dict:
        """The settings besides tokenizer, seq_len and inputs that change the cache's content; the chat template
        (its text, as `chat_template_for` gives it) by its SHA-256."""
        digest = hashlib.sha256(chat_template.encode("utf-8")).hexdigest()[:16] if chat_template is not None else None
        return {"paragraphs": self.paragraphs, "strict_utf8": self.strict_utf8, "shuffle": self.shuffle,
                "seed": self.seed, "chat_template_sha256": digest}


def chat_template_for(spec: str | None, inputs: dict[str, dict[str, int]]) -> str | None:
    """The template text for chat inputs (`spec`, default rugpt3-chat), None for text ones; a cache holds one kind,
    so chat and text files together are refused, and so is a template for text."""
    chat = sorted({path.endswith(CHAT_SUFFIX) for files in inputs.values() for path in files})
    if chat == [False, True]:
        kinds = {kind: next(p for files in inputs.values() for p in files if p.endswith(CHAT_SUFFIX) == kind)
                 for kind in chat}
        raise UserError(f"the inputs mix chat ({CHAT_SUFFIX}, e.g. {kinds[True]}) and text (e.g. {kinds[False]}) "
                        "files; prepare them separately")
    if chat == [True]:
        from rugpt_ray.chat import DEFAULT_CHAT_TEMPLATE, chat_template_source

        return chat_template_source(spec or DEFAULT_CHAT_TEMPLATE)
    if spec is not None:
        raise UserError(f"chat_template {spec}: the inputs are text, not {CHAT_SUFFIX} conversations")
    return None


def check_inputs(cfg: DataConfig) -> tuple[dict[str, dict[str, int]], str | None]:
    """Every split's files with their sizes, and the chat template: all input problems in one error, before Ray."""
    splits: dict[str, Inputs] = {"train": cfg.inputs, **({"valid": cfg.valid} if cfg.valid else {})}
    inputs = resolve_splits(splits)
    both = sorted(set(inputs["train"]) & set(inputs.get("valid", {})))
    if both:
        raise UserError(f"{len(both)} files are in both the training and the validation inputs: {', '.join(both)}")
    return inputs, chat_template_for(cfg.chat_template, inputs)


@functools.lru_cache(maxsize=4)
def _worker_tokenizer(folder: str):
    """Loaded once per Ray worker process (tasks reuse workers), not once per piece. Ray runs one task per CPU,
    so the tokenizer's own thread pool would only oversubscribe the cores."""
    from rugpt_ray.tokenizer import load_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    return load_tokenizer(folder)


def _tokenize_rows(batch: dict, tokenizer_folder: str, paragraphs: bool, strict_utf8: bool):
    """Ray Data UDF: one row per file piece in, one row with its token ids and health out."""
    import pyarrow as pa

    tok = _worker_tokenizer(tokenizer_folder)
    results = [
        tokenize_piece(tok, str(p), int(s), int(e), int(z), paragraphs=paragraphs, strict_utf8=strict_utf8)
        for p, s, e, z in zip(batch["path"], batch["start"], batch["end"], batch["size"], strict=True)
    ]
    offsets = np.concatenate([[0], np.cumsum([len(r.tokens) for r in results])]).astype(np.int64)
    tokens = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate([r.tokens for r in results])))
    return pa.table({
        "file": batch["file"], "last": batch["last"], "nominal": batch["end"] - batch["start"], "tokens": tokens,
        "documents": [r.documents for r in results], "bad_bytes": [r.bad_bytes for r in results],
        "first_bad": [r.first_bad for r in results], "status": [r.status for r in results],
        "message": [r.message for r in results],
    })


def _tokenize_chat_rows(batch: dict, tokenizer_folder: str, template: str, block_len: int):
    """Ray Data UDF: one row per JSONL file piece in, one row with its conversations' ids, masks and lengths out."""
    import pyarrow as pa

    tok = _worker_tokenizer(tokenizer_folder)
    results = [tokenize_chat_piece(tok, template, str(p), int(s), int(e), int(z), block_len)
               for p, s, e, z in zip(batch["path"], batch["start"], batch["end"], batch["size"], strict=True)]

    def lists(field: str):
        arrays = [getattr(r, field) for r in results]
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(arrays)))

    return pa.table({
        "file": batch["file"], "last": batch["last"], "nominal": batch["end"] - batch["start"],
        "tokens": lists("tokens"), "mask": lists("mask"), "lengths": lists("lengths"),
        **{field: [getattr(r, field) for r in results]
           for field in ("cut", "truncated", "tokens_dropped", "problem")},
    })


class _ShardWriter:
    """Writes [n, block_len] blocks (and their loss masks, for chat data) into numbered zstd Parquet files of
    `blocks_per_shard` rows."""

    def __init__(self, fs, folder: str, block_len: int, blocks_per_shard: int, masked: bool):
        self.fs, self.folder, self.block_len, self.per_shard = fs, folder, block_len, blocks_per_shard
        self.masked = masked
        fs.create_dir(folder)
        self.shards: list[str] = []
        self.blocks = 0
        self._writer = None
        self._in_shard = 0

    def write(self, blocks: np.ndarray, mask: np.ndarray | None = None) -> None:
        import pyarrow.parquet as pq

        while len(blocks):
            if self._writer is None:
                name = f"part-{len(self.shards):05d}.parquet"
                self.shards.append(name)
                self._writer = pq.ParquetWriter(f"{self.folder}/{name}", block_schema(self.block_len, self.masked),
                                                filesystem=self.fs, compression="zstd")
            n = self.per_shard - self._in_shard
            take = blocks[:n]
            self._writer.write_table(blocks_table(take, np.arange(self.blocks, self.blocks + len(take)),
                                                  None if mask is None else mask[:n]))
            self.blocks += len(take)
            self._in_shard += len(take)
            blocks = blocks[len(take):]
            mask = None if mask is None else mask[n:]
            if self._in_shard == self.per_shard:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._in_shard = None, 0


class _Packer:
    """Joins the token stream into blocks of `block_len` with carry-over across documents and pieces."""

    def __init__(self, writer: _ShardWriter):
        self.writer = writer
        self.carry = np.empty(0, dtype=np.int32)

    def add(self, tokens: np.ndarray) -> None:
        buf = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        n = len(buf) // self.writer.block_len
        self.writer.write(buf[: n * self.writer.block_len].reshape(n, self.writer.block_len))
        self.carry = buf[n * self.writer.block_len:].copy()


class _ConversationPacker:
    """Whole conversations (none longer than a block) into blocks of `block_len`, in order: a block takes them
    while the next one fits, and the rest of it is `<pad>` with loss mask 0."""

    def __init__(self, writer: _ShardWriter, pad_id: int):
        self.writer, self.pad_id = writer, pad_id
        self.open_ids: list[np.ndarray] = []  # the conversations of the block being filled
        self.open_mask: list[np.ndarray] = []
        self.used = 0
        self.pad_tokens = 0

    def add(self, tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        full: list[tuple[np.ndarray, np.ndarray]] = []
        start = 0
        for length in lengths.tolist():
            if self.used + length > self.writer.block_len:
                full.append(self._padded())
            self.open_ids.append(tokens[start:start + length])
            self.open_mask.append(mask[start:start + length])
            self.used += length
            start += length
        if full:
            self.writer.write(np.stack([ids for ids, _ in full]), np.stack([m for _, m in full]))

    def close(self) -> None:
        """The last, partly filled block."""
        if self.used:
            ids, mask = self._padded()
            self.writer.write(ids[None], mask[None])

    def _padded(self) -> tuple[np.ndarray, np.ndarray]:
        block_len = self.writer.block_len
        ids, mask = np.full(block_len, self.pad_id, np.int32), np.zeros(block_len, np.int8)
        ids[:self.used], mask[:self.used] = np.concatenate(self.open_ids), np.concatenate(self.open_mask)
        self.pad_tokens += block_len - self.used
        self.open_ids, self.open_mask, self.used = [], [], 0
        return ids, mask


class _Progress:
    """One status line on stderr with tokens/s: redrawn in place on a terminal, a new line every 10 s otherwise."""

    def __init__(self, label: str, total_bytes: int, enabled: bool):
        self.label, self.total, self.enabled = label, max(total_bytes, 1), enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = self._last = time.perf_counter()

    def update(self, done_bytes: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self._last < (0.2 if self.tty else 10.0)):
            return
        self._last = now
        rate = tokens / max(now - self.start, 1e-9)
        eta = (self.total - done_bytes) / max(done_bytes, 1) * (now - self.start)
        line = (f"{self.label}: {100 * done_bytes / self.total:5.1f}% of {self.total / 2**20:,.1f} MiB  "
                f"{tokens:,} tokens  {rate:,.0f} tokens/s  ETA {eta:,.0f} s")
        print(f"\r{line}\033[K" if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr,
              flush=True)


def _prepare_split(name: str, files: dict[str, int], cfg: DataConfig, tokenizer, fs, folder: str,
                   progress: bool, chat_template: str | None) -> dict:
    import ray

    order = list(files)
    if cfg.shuffle and name == "train":
        random.Random(cfg.seed).shuffle(order)
    stats = [{"path": p, "bytes": files[p], "status": "ok", "documents": 0, "tokens": 0, "bad_bytes": 0}
             for p in order]
    pieces = []
    for i, path in enumerate(order):
        if files[path] == 0:
            stats[i]["status"] = "empty"
            log.warning("%s: skipped, empty", path)
            continue
        ranges = piece_ranges(files[path], cfg.piece_bytes)
        pieces += [{"file": i, "last": k == len(ranges) - 1, "path": path, "start": s, "end": e, "size": files[path]}
                   for k, (s, e) in enumerate(ranges)]
    if not pieces:
        raise UserError(f"no usable text in the {name} inputs: all {len(order)} files are empty")

    ds = ray.data.from_items(pieces, override_num_blocks=len(pieces))
    block_len = cfg.seq_len + 1
    if chat_template is None:
        ds = ds.map_batches(_tokenize_rows, batch_size=1, num_cpus=1, fn_kwargs={
            "tokenizer_folder": str(tokenizer.folder), "paragraphs": cfg.paragraphs, "strict_utf8": cfg.strict_utf8})
    else:
        ds = ds.map_batches(_tokenize_chat_rows, batch_size=1, num_cpus=1, fn_kwargs={
            "tokenizer_folder": str(tokenizer.folder), "template": chat_template, "block_len": block_len})
    ds.context.execution_options.preserve_order = True  # the packer must see pieces in file order
    ds.context.enable_progress_bars = False  # our own bar below shows tokens/s
    ds.context.print_on_execution_start = False
    # With one map operator, the per-operator reservation only holds tasks back: with it on, the first tasks ran
    # one at a time on 2 CPUs (12 x 0.3 s tasks: 3.5 s on, 2.5 s off).
    ds.context.op_resource_reservation_enabled = False

    writer = _ShardWriter(fs, f"{folder}/{name}", block_len, cfg.blocks_per_shard, masked=chat_template is not None)
    bar = _Progress(f"prepare {name}", sum(files.values()), progress)
    started = time.perf_counter()
    if chat_template is None:
        counts = _pack_text(name, ds, stats, writer, bar)
    else:
        counts = _pack_chat(name, ds, stats, writer, bar, tokenizer.pad_id)
    return {"files": stats, "shards": [f"{name}/{s}" for s in writer.shards], "blocks": writer.blocks, **counts,
            "seconds": round(time.perf_counter() - started, 3)}


def _pack_text(name: str, ds, stats: list[dict], writer: _ShardWriter, bar: _Progress) -> dict:
    """Documents' tokens into blocks with carry-over; the split's counts for meta.json."""
    block_len = writer.block_len
    packer = _Packer(writer)
    first_bad: dict[int, int] = {}
    done_bytes = total_tokens = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        cols = {c: batch[c].to_pylist() for c in batch.column_names if c != "tokens"}
        for row in range(batch.num_rows):
            file = cols["file"][row]
            st = stats[file]
            status = cols["status"][row]
            done_bytes += cols["nominal"][row]
            if status == "error":
                raise UserError(f"{st['path']}: cannot read ({cols['message'][row]})")
            if status == "bad_utf8":
                raise UserError(f"{st['path']}: not valid UTF-8 (first invalid byte at {cols['first_bad'][row]}; "
                                "--strict-utf8 is set)")
            if status in ("binary", "empty"):
                if st["status"] == "ok":
                    st["status"] = status
                    log.warning("%s: skipped, %s", st["path"], "empty" if status == "empty" else
                                "not text (NUL bytes or mostly invalid UTF-8 in the first 8 KiB)")
                continue
            tokens = batch["tokens"][row].values.to_numpy()
            st["documents"] += cols["documents"][row]
            st["tokens"] += len(tokens)
            st["bad_bytes"] += cols["bad_bytes"][row]
            if cols["first_bad"][row] >= 0:
                first_bad.setdefault(file, cols["first_bad"][row])
            if cols["last"][row] and st["bad_bytes"]:
                log.warning("%s: %d bytes are not valid UTF-8 (first at byte %d), decoded as U+FFFD", st["path"],
                            st["bad_bytes"], first_bad[file])
            total_tokens += len(tokens)
            packer.add(tokens)
        bar.update(done_bytes, total_tokens)
    writer.close()
    bar.update(done_bytes, total_tokens, final=True)

    skipped = {s: sum(f["status"] == s for f in stats) for s in ("empty", "binary")}
    if total_tokens == 0:
        raise UserError(f"no usable text in the {name} inputs: {len(stats)} files, "
                        f"{skipped['empty']} empty and {skipped['binary']} binary")
    if writer.blocks == 0:
        raise UserError(f"the {name} inputs give {total_tokens:,} tokens, fewer than one block of seq_len + 1 = "
                        f"{block_len}; use a smaller --seq-len or more text")
    return {
        "documents": sum(f["documents"] for f in stats), "tokens": total_tokens,
        "tokens_kept": writer.blocks * block_len, "tokens_dropped": len(packer.carry), "files_skipped": skipped,
        "bad_utf8_files": sum(f["bad_bytes"] > 0 for f in stats),
    }


def _pack_chat(name: str, ds, stats: list[dict], writer: _ShardWriter, bar: _Progress, pad_id: int) -> dict:
    """Conversations into blocks, kept whole; the split's counts for meta.json. The first bad line (in file order)
    stops it here."""
    packer = _ConversationPacker(writer, pad_id)
    counts = dict.fromkeys(("tokens_dropped", "conversations_cut", "conversations_truncated", "assistant_tokens"), 0)
    done_bytes = total_tokens = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        cols = {c: batch[c].to_pylist() for c in batch.column_names if c not in ("tokens", "mask", "lengths")}
        for row in range(batch.num_rows):
            file = cols["file"][row]
            st = stats[file]
            done_bytes += cols["nominal"][row]
            if cols["problem"][row]:
                raise UserError(cols["problem"][row])
            tokens = batch["tokens"][row].values.to_numpy()
            mask = batch["mask"][row].values.to_numpy()
            lengths = batch["lengths"][row].values.to_numpy()
            st["documents"] += len(lengths)
            st["tokens"] += len(tokens)
            counts["tokens_dropped"] += cols["tokens_dropped"][row]
            counts["conversations_cut"] += cols["cut"][row]
            counts["conversations_truncated"] += cols["truncated"][row]
            counts["assistant_tokens"] += int(mask.sum())
            total_tokens += len(tokens)
            packer.add(tokens, mask, lengths)
            if cols["last"][row] and st["documents"] == 0:
                st["status"] = "empty"
                log.warning("%s: skipped, no conversations", st["path"])
        bar.update(done_bytes, total_tokens)
    packer.close()
    writer.close()
    bar.update(done_bytes, total_tokens, final=True)
    skipped = sum(f["status"] == "empty" for f in stats)
    if total_tokens == 0:
        raise UserError(f"no conversations in the {name} inputs: {len(stats)} files, {skipped} empty")
    return {
        "documents": sum(f["documents"] for f in stats), "tokens": total_tokens + counts["tokens_dropped"],
        "tokens_kept": total_tokens, "pad_tokens": packer.pad_tokens, **counts,
        "files_skipped": {"empty": skipped, "binary": 0}, "bad_utf8_files": 0,
    }




def _check_out(cfg: DataConfig, tokenizer, inputs: dict[str, dict[str, int]], chat_template: str | None) -> dict | None:
    """Before any work: a matching cache is reused (returned), a different one refused unless --overwrite."""
    import pyarrow.fs as pafs

    check_writable(cfg.out, "--out")
    fs, root = filesystem(cfg.out)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        raise UserError(f"--out {cfg.out}: exists and is not a folder")
    meta = read_meta(cfg.out)
    if meta is None:
        if fs.get_file_info(pafs.FileSelector(root)):
            raise UserError(f"--out {cfg.out}: a non-empty folder without {META_NAME}; refusing to replace it")
        return None
    diffs = mismatches(meta, tokenizer=tokenizer, seq_len=cfg.seq_len, settings=cfg.settings(chat_template),
                       inputs=inputs)
    if not diffs:
        return meta
    if cfg.overwrite:
        return None
    raise UserError(f"--out {cfg.out}: a prepared cache is there but {'; '.join(diffs)}; "
                    "pass --overwrite to replace it or choose another --out")


def _publish(fs, tmp: str, root: str, per_file: bool) -> None:
    """Make the finished cache appear at `root`: one folder rename locally; on object stores (no folder rename)
    file by file with meta.json last, so a reader never sees a meta.json whose shards are missing."""
    import pyarrow.fs as pafs

    exists = fs.get_file_info(root).type != pafs.FileType.NotFound  # an empty folder, or --overwrite
    if per_file:
        if exists:
            fs.delete_dir(root)
        files = [i.path for i in fs.get_file_info(pafs.FileSelector(tmp, recursive=True))
                 if i.type == pafs.FileType.File]
        for path in sorted(files, key=lambda p: p.endswith(META_NAME)):
            dest = root + path[len(tmp):]
            fs.create_dir(dest.rsplit("/", 1)[0])
            fs.move(path, dest)
        fs.delete_dir(tmp)
        return
    old = f"{root}.old-{uuid.uuid4().hex[:8]}" if exists else None
    if old is not None:
        fs.move(root, old)
    fs.move(tmp, root)
    if old is not None:
        fs.delete_dir(old)


def prepare_data(cfg: DataConfig, *, progress: bool = True) -> dict:
    """Tokenize and pack `cfg.inputs` (and `cfg.valid`) into a Parquet cache at `cfg.out`; return its meta.

    All input problems are reported before Ray starts. A cache already at `cfg.out` with the same tokenizer,
    seq_len, settings (the chat template included) and input files (by size) is reused as is (the returned meta has
    `"reused": True`). A chat cache's meta.json holds its template, which training saves with every checkpoint.
    """

    from rugpt_ray.tokenizer import load_tokenizer

    inputs, chat_template = check_inputs(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    existing = _check_out(cfg, tokenizer, inputs, chat_template)
    if existing is not None:
        return {**existing, "out": cfg.out, "reused": True}

    start_ray(log_to_driver=False, dashboard=False)
    fs, root = filesystem(cfg.out)
    root = root.rstrip("/")
    tmp = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    try:
        meta = {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tokenizer": {"folder": str(tokenizer.folder), "fingerprint": tokenizer.fingerprint,
                          "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
            "seq_len": cfg.seq_len,
            "block_len": cfg.seq_len + 1,
            **cfg.settings(chat_template),
            **({"chat_template": chat_template} if chat_template is not None else {}),
            "splits": {name: _prepare_split(name, files, cfg, tokenizer, fs, tmp, progress, chat_template)
                       for name, files in inputs.items()},
        }
        meta["seconds"] = round(time.perf_counter() - started, 3)
        write_json(fs, f"{tmp}/{META_NAME}", meta)
        _publish(fs, tmp, root, per_file=is_uri(cfg.out))
    except BaseException:
        try:
            fs.delete_dir(tmp)
        except OSError:
            pass  # nothing was written yet
        raise
    return {**meta, "out": cfg.out, "reused": False}


def format_summary(meta: dict) -> str:
    """The one-screen report printed at the end of prepare-data."""
    tok = meta["tokenizer"]
    head = "up to date, reused" if meta.get("reused") else f"done in {meta['seconds']:.1f} s"
    lines = [
        f"prepare-data -> {meta['out']}: {head}",
        f"  tokenizer {tok['folder']} (fingerprint {tok['fingerprint']}, vocab {tok['vocab_size']}), "
        f"seq_len {meta['seq_len']} -> blocks of {meta['block_len']} tokens; documents = {_documents(meta)}; "
        f"seed {meta['seed']}",
        f"  {'split':<6}{'files':>7}{'skipped':>9}{'bad-utf8':>10}{'documents':>11}{'tokens':>13}{'blocks':>9}"
        f"{'kept':>9}{'tokens/s':>11}{'shards':>8}",
    ]
    for name, s in meta["splits"].items():
        skipped = sum(s["files_skipped"].values())
        rate = s["tokens"] / max(s["seconds"], 1e-9)
        lines.append(
            f"  {name:<6}{len(s['files']):>7}{skipped:>9}{s['bad_utf8_files']:>10}{s['documents']:>11,}"
            f"{s['tokens']:>13,}{s['blocks']:>9,}{100 * s['tokens_kept'] / s['tokens']:>8.2f}%{rate:>11,.0f}"
            f"{len(s['shards']):>8}"
        )
        if skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in s["files_skipped"].items() if n)
            lines.append(f"  {name}: skipped {kinds} (named in the warnings above)")
        if "conversations_cut" in s:
            lines.append(f"  {name}: {s['conversations_cut']} conversations cut after an assistant turn and "
                         f"{s['conversations_truncated']} truncated to a block; {s['assistant_tokens']:,} assistant "
                         f"tokens (the loss), {s['pad_tokens']:,} padding")
    return "\n".join(lines)


def _documents(meta: dict) -> str:
    if meta.get("chat_template_sha256"):
        return f"conversations (chat template sha256 {meta['chat_template_sha256']})"
    return "paragraphs" if meta["paragraphs"] else "whole files"


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """`rugpt-ray prepare-data`: the flags are DataConfig's fields."""
    names = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig.from_dict({k: v for k, v in vars(args).items() if k in names})
    print(format_summary(prepare_data(cfg, progress=True)))
    return 0
