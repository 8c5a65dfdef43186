"""Attention masks and kernels for dense and block-sparse layers.

A sparse layer lets query position i see key position j when `layout[h, i // block, j // block]` is set and
j <= i (the seed passed its causal mask to DeepSpeed's sparse softmax). Every path here computes exactly that:
- reference: SDPA with a boolean mask expanded from the layout (CPU training uses it: FlexAttention has no
  CPU backward);
- fast: FlexAttention with a block mask built from the same rule (GPU; forward-only on CPU);
- decode: the same rule evaluated at the cached keys' true positions, so a KV cache equals a full recompute.
Positions are true token positions (left padding does not shift them), so the layout stays aligned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def layout_token_mask(layout: Tensor, q_pos: Tensor, k_pos: Tensor, block: int) -> Tensor:
    """(B, H, Sq, Sk) bool: the layout gathered at each (query, key) position pair, AND causal."""
    num_blocks = layout.shape[-1]
    flat = layout.reshape(layout.shape[0], -1).bool()
    idx = (q_pos // block).unsqueeze(-1) * num_blocks + (k_pos // block).unsqueeze(-2)  # (B, Sq, Sk)
    allowed = flat[:, idx].permute(1, 0, 2, 3)
    return allowed & (q_pos.unsqueeze(-1) >= k_pos.unsqueeze(-2)).unsqueeze(1)


def padded_causal_mask(q_pos: Tensor, k_pos: Tensor, q_valid: Tensor, k_valid: Tensor) -> Tensor:
    """(B, 1, Sq, Sk) bool causal mask by true position, where real tokens see only real keys.

    Padding queries see only padding keys, so no row is empty (an empty row is NaN in SDPA, and a NaN value
    would leak through `0 * NaN` into real rows of later layers).
    """
    causal = q_pos.unsqueeze(-1) >= k_pos.unsqueeze(-2)
    same_kind = q_valid.unsqueeze(-1) == k_valid.unsqueeze(-2)
    return (causal & same_kind).unsqueeze(1)


def flex_block_mask(layout: Tensor, seq_len: int, block: int):
    """FlexAttention BlockMask for an unpadded sequence starting at position 0."""
    from torch.nn.attention.flex_attention import create_block_mask

    lay = layout.bool()

    def mask_mod(b, h, q, kv):
        return (q >= kv) & lay[h, q // block, kv // block]

    return create_block_mask(mask_mod, 1, lay.shape[0], seq_len, seq_len, device=layout.device)


_compiled_flex = None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """FlexAttention, compiled on GPU (eager elsewhere, where it is only a correctness check)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if not q.is_cuda:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """SDPA with a boolean mask, or the causal kernel when no mask is needed."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
