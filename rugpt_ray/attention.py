"""Attention masks and kernels for dense and block-sparse layers, and which one each layer uses.

A sparse layer lets query position i see key position j when `layout[h, i // block, j // block]` is set and
j <= i (the seed passed its causal mask to DeepSpeed's sparse softmax). Every path here computes exactly that:
- reference: SDPA with a boolean mask (the layout expanded for sparse layers, the causal mask for dense ones):
  the oracle, and what sparse layers use on CPU;
- kernel: the Triton block-sparse kernel (`rugpt_ray.sparse_kernel`, forward and backward; CUDA's default);
- flex: FlexAttention with a block mask built from the same rule (forward-only on CPU);
- decode: the same rule evaluated at the cached keys' true positions, so a KV cache equals a full recompute (on the
  CPU, half-precision queries attend over float32 copies of the keys: torch's CPU kernel is slow over bf16/fp16).
Dense layers of an unpadded pass use SDPA's causal kernel (no mask tensor; flash or memory-efficient on CUDA).
Positions are true token positions (left padding does not shift them), so the layout stays aligned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from rugpt_ray.sparse_kernel import HAS_TRITON, supports_block

ATTN_IMPLS = ("auto", "reference", "sdpa", "triton", "flex")
"""`attn_impl` values, for unpadded passes without a KV cache (padded or cached ones always take boolean masks):
reference = SDPA + boolean mask in every layer; sdpa = causal SDPA in dense layers, SDPA + layout mask in sparse
ones; triton / flex = causal SDPA in dense layers, the Triton kernel / FlexAttention in sparse ones;
auto = triton on CUDA (when Triton is there and takes the layout's block), sdpa elsewhere."""

_CAUSAL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def resolve_attn_impl(impl: str, device: torch.device, block: int | None) -> str:
    """The concrete implementation `impl` (one of ATTN_IMPLS) means on `device`, sparse blocks of `block` tokens."""
    if impl != "auto":
        return impl
    kernel_ok = HAS_TRITON and (block is None or supports_block(block))
    return "triton" if device.type == "cuda" and kernel_ok else "sdpa"


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


def _attends_in_float32(q: Tensor) -> bool:
    """A decode step's queries (one per row) in bfloat16 or float16 on the CPU: torch's CPU kernel attends over
    half-precision keys 1.5-5x slower than over the same keys in float32, their conversion included (16 rows of
    128 keys: 1.0 against 0.5 ms a layer in bfloat16), and no more precisely."""
    return q.shape[-2] == 1 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """SDPA with a boolean mask, or the causal kernel when no mask is needed.

    On CUDA the causal call may only use flash or memory-efficient attention: a silent fall-back to the math
    backend would materialise the (S, S) scores that the mask-free call exists to avoid.
    """
    if mask is not None:
        if dropout_p == 0.0 and _attends_in_float32(q):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    with sdpa_kernel(_CAUSAL_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
