"""Block-sparse attention layouts, block for block the same as DeepSpeed's ``*SparsityConfig`` classes.

DeepSpeed dropped ``deepspeed.ops.sparse_attention`` after 0.19.6, but ruGPT3XL was trained with its ``fixed``
layout, so a checkpoint only means what it meant in training if we rebuild exactly the same layouts. This module is
an independent re-implementation: configs use DeepSpeed's JSON keys (``sparse_attention`` section), defaults are
the class constructors' defaults, and ``make_layout`` returns what ``<Mode>SparsityConfig(num_heads, **rest)
.make_layout(seq_len)`` returned, quirks included (they are part of what the trained weights saw).

A layout has shape (heads, blocks, blocks), int64 0/1: entry [h, i, j] says whether query block i of head h attends
to key block j. Token-level causality inside a diagonal block is the kernel's job, not the layout's.
"""

from __future__ import annotations

import math
import random

import torch

from rugpt_ray.errors import UserError
from rugpt_ray.sparse_config import is_int, normalize_sparse_config

__all__ = ["layout_density", "make_layout"]


def _too_few_blocks(key: str, value: int, num_blocks: int, seq_len: int, block: int) -> UserError:
    return UserError(
        f"sparse_attention.{key} ({value}) cannot exceed the blocks per row: {num_blocks} = seq_len {seq_len} "
        f"/ block {block}"
    )


def _grid(num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.arange(num_blocks)
    return idx[:, None], idx[None, :]


def _windows(window_of_block: torch.Tensor, causal: bool) -> torch.Tensor:
    """Block-diagonal local attention: a block sees the blocks of its own window (only earlier ones if causal)."""
    row, col = _grid(len(window_of_block))
    local = window_of_block[:, None] == window_of_block[None, :]
    return local & (col <= row) if causal else local


def _random_blocks(layout: torch.Tensor, count: int, rng: random.Random, causal: bool) -> None:
    """Mark `count` random key blocks per query row, one ``sample`` call per row in row order, like DeepSpeed."""
    num_blocks = layout.shape[0]
    picks = [rng.sample(range(row + 1 if causal else num_blocks), count) for row in range(num_blocks)]
    if count:
        layout[torch.arange(num_blocks).repeat_interleave(count), torch.tensor(picks).flatten()] = True


def _global_spans(cfg: dict, num_blocks: int) -> list[tuple[int, int]]:
    """Global blocks as [start, end) spans, dropping spans that start past the sequence and clipping the rest."""
    starts, ends = cfg["global_block_indices"], cfg["global_block_end_indices"]
    if ends is None:
        ends = [start + 1 for start in starts]
    return [(start, min(end, num_blocks)) for start, end in zip(starts, ends, strict=True) if start < num_blocks]


def _fixed(cfg: dict, head: int, num_blocks: int, rng: random.Random) -> torch.Tensor:
    """Sparse Transformer "fixed" pattern: local windows plus, per window, `num_global_blocks` global columns.

    The global blocks sit at the end of each window for head 0 and move one group earlier per head (cycling
    through `num_different_global_patterns`), so different heads summarise windows through different blocks.
    """
    local, glob = cfg["num_local_blocks"], cfg["num_global_blocks"]
    bidirectional = cfg["attention"] == "bidirectional"
    row, col = _grid(num_blocks)
    layout = _windows(torch.arange(num_blocks) // local, causal=not bidirectional)

    first = local - (1 + head % cfg["num_different_global_patterns"]) * glob  # offset of the group in a window
    full_end = num_blocks - num_blocks % local  # complete windows end here
    offset = col % local
    is_global = (offset >= first) & (offset < first + glob) & (col < full_end)
    if bidirectional:
        layout |= is_global
        if cfg["horizontal_global_attention"]:
            layout |= is_global.T
    else:
        # DeepSpeed starts each global column at the group's first row, not at the next window: with more than
        # one global block that even puts a few blocks above the diagonal. Kept as is.
        group_start = col - offset + first
        layout |= is_global & (row >= group_start)

    if full_end < num_blocks:
        # Short last window: its group is shifted left to fit. If num_global_blocks exceeds the whole sequence,
        # `start` goes negative and Python slicing wraps around, exactly as DeepSpeed's slicing did.
        start = min(full_end + first, num_blocks - glob)
        layout[0 if bidirectional else start :, start : start + glob] = True
        if cfg["horizontal_global_attention"]:
            layout[start : start + glob, :] = True
    return layout


def _variable(cfg: dict, head: int, num_blocks: int, rng: random.Random) -> torch.Tensor:
    """The "fixed" pattern generalised: random blocks, listed local window sizes, and explicit global blocks.

    Random blocks come from the whole row even for unidirectional attention (DeepSpeed's behaviour, kept).
    """
    bidirectional = cfg["attention"] == "bidirectional"
    layout = torch.zeros((num_blocks, num_blocks), dtype=torch.bool)
    _random_blocks(layout, cfg["num_random_blocks"], rng, causal=False)

    # Listed windows first; the last listed size then repeats until the sequence is covered.
    sizes = list(cfg["local_window_blocks"])
    missing = num_blocks - sum(sizes)
    if missing > 0:
        sizes += [sizes[-1]] * math.ceil(missing / sizes[-1])
    window_of_block = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[:num_blocks]
    layout |= _windows(window_of_block, causal=not bidirectional)

    for start, end in _global_spans(cfg, num_blocks):
        if cfg["horizontal_global_attention"]:
            layout[start:end, :] = True
        layout[0 if bidirectional else start :, start:end] = True
    return layout


def _bigbird(cfg: dict, head: int, num_blocks: int, rng: random.Random) -> torch.Tensor:
    """BigBird: random blocks, a sliding window, and the first blocks global both ways (causal cut in make_layout)."""
    row, col = _grid(num_blocks)
    layout = torch.zeros((num_blocks, num_blocks), dtype=torch.bool)
    _random_blocks(layout, cfg["num_random_blocks"], rng, causal=cfg["attention"] == "unidirectional")
    layout |= (row - col).abs() <= cfg["num_sliding_window_blocks"] // 2
    glob = cfg["num_global_blocks"]
    layout[:glob, :] = True
    layout[:, :glob] = True
    return layout


def _bslongformer(cfg: dict, head: int, num_blocks: int, rng: random.Random) -> torch.Tensor:
    """Block-sparse Longformer: a sliding window plus global spans that attend and are attended both ways."""
    row, col = _grid(num_blocks)
    layout = (row - col).abs() <= cfg["num_sliding_window_blocks"] // 2
    for start, end in _global_spans(cfg, num_blocks):
        layout[start:end, :] = True
        layout[:, start:end] = True
    return layout


_BUILDERS = {"fixed": _fixed, "variable": _variable, "bigbird": _bigbird, "bslongformer": _bslongformer}
# Checks DeepSpeed made against the number of blocks when building a layout: "must be smaller than overall number
# of blocks in a row" (equal was accepted).
_RUNTIME_CHECKS = {
    "fixed": (),
    "variable": ("num_random_blocks",),
    "bigbird": ("num_random_blocks", "num_sliding_window_blocks", "num_global_blocks"),
    "bslongformer": ("num_sliding_window_blocks",),
}


def make_layout(cfg: dict, num_heads: int, seq_len: int) -> torch.Tensor:
    """The (num_heads, seq_len // block, seq_len // block) int64 0/1 layout of ``cfg`` at this sequence length.

    Random modes draw from ``random.Random(cfg["seed"])`` with the same ``sample`` calls, in the same order, as
    DeepSpeed made on the global ``random`` module, so ``random.seed(s)`` before DeepSpeed equals ``seed: s`` here.
    """
    cfg = normalize_sparse_config(cfg)
    if not is_int(num_heads) or num_heads < 1:
        raise UserError(f"num_heads must be an integer >= 1, got {num_heads!r}")
    block = cfg["block"]
    if not is_int(seq_len) or seq_len < 1 or seq_len % block:
        raise UserError(f"seq_len must be a positive multiple of sparse_attention.block ({block}), got {seq_len!r}")
    num_blocks = seq_len // block
    mode = cfg["mode"]
    if mode == "dense":
        return torch.ones((num_heads, num_blocks, num_blocks), dtype=torch.int64)

    for key in _RUNTIME_CHECKS[mode]:  # DeepSpeed checked these while building head 0, in this order
        if num_blocks < cfg[key]:
            raise _too_few_blocks(key, cfg[key], num_blocks, seq_len, block)

    rng = random.Random(cfg.get("seed", 0))
    distinct = num_heads if cfg["different_layout_per_head"] else 1  # otherwise head 0 is shared by all heads
    layout = torch.stack([_BUILDERS[mode](cfg, head, num_blocks, rng) for head in range(distinct)])
    layout = layout.to(torch.int64)
    if distinct < num_heads:
        layout = layout.repeat(num_heads, 1, 1)
    if mode in ("bigbird", "bslongformer") and cfg["attention"] == "unidirectional":
        layout = torch.tril(layout)  # DeepSpeed cut everything above the diagonal, random and global blocks too
    return layout


def layout_density(layout: torch.Tensor) -> float:
    """Fraction of the causal blocks (on or below the diagonal) that a layout keeps, averaged over heads.

    The number to compare sparse configs by for a decoder: 1.0 is dense causal attention. Blocks above the diagonal
    (bidirectional layouts) are not counted.
    """
    num_blocks = layout.shape[-1]
    causal = torch.ones((num_blocks, num_blocks), dtype=torch.bool).tril()
    kept = (layout.bool() & causal).sum().item()
    return kept / (causal.sum().item() * layout.shape[0])
