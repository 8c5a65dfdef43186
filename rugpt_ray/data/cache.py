"""The prepared cache on disk: Parquet shards of packed blocks per split plus `meta.json`.

Layout: `DIR/meta.json`, `DIR/train/part-00000.parquet`, ..., `DIR/valid/part-00000.parquet`. Each row is one
block: `input_ids` (fixed-size list of seq_len + 1 int32 ids), for chat data `loss_mask` (as many int8: 1 on the
tokens the loss is taken on, the assistant's), and `idx` (its position in the split, -1 for the padding rows the
trainer helper adds). Plain Parquet types, so pandas/pyarrow/other tools read it too.
"""

from __future__ import annotations

import json

import numpy as np

from rugpt_ray.errors import UserError
from rugpt_ray.storage import filesystem

META_NAME = "meta.json"
FORMAT = 1
MASK_COLUMN = "loss_mask"


def block_schema(block_len: int, masked: bool = False):
    """Arrow schema of one block row; the same for the shards and for the padding rows (so `union` works)."""
    import pyarrow as pa

    mask = [pa.field(MASK_COLUMN, pa.list_(pa.int8(), block_len), nullable=False)] if masked else []
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.int32(), block_len), nullable=False),
            *mask,
            pa.field("idx", pa.int64(), nullable=False),
        ]
    )


def blocks_table(blocks: np.ndarray, idx: np.ndarray, mask: np.ndarray | None = None):
    """A [n, block_len] int32 array, its loss mask (chat data) and indices as an Arrow table of `block_schema`."""
    import pyarrow as pa

    n, block_len = blocks.shape
    columns = [pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1), type=pa.int32()), block_len)]
    if mask is not None:
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1), type=pa.int8()), block_len))
    columns.append(pa.array(idx, type=pa.int64()))
    return pa.Table.from_arrays(columns, schema=block_schema(block_len, masked=mask is not None))


def read_meta(path: str) -> dict | None:
    """meta.json of a cache folder, or None if there is none."""
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    meta_path = f"{root.rstrip('/')}/{META_NAME}"
    if fs.get_file_info(meta_path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(meta_path) as f:
        try:
            meta = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}/{META_NAME}: not valid JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: cache format {meta.get('format')!r}, this version reads format {FORMAT}")
    return meta


def write_json(fs, path: str, obj: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


def mismatches(meta: dict, *, tokenizer=None, seq_len: int | None = None, settings: dict | None = None,
               inputs: dict[str, dict[str, int]] | None = None) -> list[str]:
    """Why a cache does not fit: each differing tokenizer/seq_len/setting/input set as one short phrase."""
    out = []
    built = meta["tokenizer"]
    if tokenizer is not None and built["fingerprint"] != tokenizer.fingerprint:
        out.append(
            f"it was built with tokenizer {built['folder']} (fingerprint {built['fingerprint']}), "
            f"not {tokenizer.folder} (fingerprint {tokenizer.fingerprint})"
        )
    if seq_len is not None and meta["seq_len"] != seq_len:
        out.append(f"it was built with seq_len {meta['seq_len']}, not {seq_len}")
    for key, want in (settings or {}).items():
        if meta.get(key) != want:
            out.append(f"it was built with {key}={meta.get(key)}, not {want}")
    for split, files in (inputs or {}).items():
        had = {f["path"]: f["bytes"] for f in meta["splits"].get(split, {}).get("files", [])}
        added = [p for p in files if p not in had]
        removed = [p for p in had if p not in files]
        resized = [p for p in files if p in had and had[p] != files[p]]
        if added or removed or resized:
            example = (added + removed + resized)[0]
            out.append(
                f"its {split} inputs differ ({len(added)} added, {len(removed)} removed, "
                f"{len(resized)} changed size; e.g. {example})"
            )
    return out
