"""Block-sparse causal attention in Triton (forward and backward), driven by a DeepSpeed-style layout.

The rule is the one in `rugpt_ray.attention`: query i sees key j iff ``layout[h, i // block, j // block]`` and
``j <= i``. A query row that sees nothing gets output 0 and zero gradients (the SDPA reference gives NaN there).

Design (FlashAttention-2 style, one program per (query tile, batch*head)):
- once per (layout, seq_len, tile size) the host builds, per head and query tile of ``block_m`` tokens, the sorted
  list of layout key blocks any of its rows may see (``kv_idx`` int32, ``kv_cnt``), and the transposed list per
  key block of the query tiles that see it (``q_idx``, ``q_cnt``); both are cached;
- forward: a query tile walks only its listed key blocks (``block`` tokens each) with an online softmax in fp32;
  the element mask (layout bit of the row's query block, causal, sequence tail) is applied inside each block;
- backward: ``delta = rowsum(dO * O)`` in torch, a dQ kernel over the same lists and a dK/dV kernel per key block
  over the transposed list; no atomics, so results are deterministic.

CPU tensors run the same kernels in Triton's interpreter (slow: correctness checks at toy sizes only).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

try:  # keep the module importable without Triton (string annotations: `tl` is only needed when compiling)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None
__all__ = ["block_sparse_attention", "build_block_index", "BlockIndex"]

_LOG2E = 1.4426950408889634


# Kernels are plain functions here and compiled lazily (`_kernels`): with triton.jit on CUDA tensors and with the
# interpreter on CPU tensors, so no TRITON_INTERPRET has to be set before this module is imported. They call only
# Triton builtins (tl.full, tl.reduce with the standard combine functions, not tl.zeros/tl.max/tl.sum): those
# library helpers are @jit functions that the interpreter can only run when TRITON_INTERPRET=1 was set at import.
# fmt: off
def _fwd_kernel(
    Q, K, V, Out, LSE, LAYOUT, KV_IDX, KV_CNT,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    H, S, D, NBQ, NBK, NT, MAXCNT, qk_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < S
    d_valid = offs_d < D
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
        mask=m_valid[:, None] & d_valid[None, :],
        other=0.0,
    ).to(DOT)
    lay_row = LAYOUT + h * NBQ * NBK + (offs_m // BLOCK) * NBK
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    cnt = tl.load(KV_CNT + h * NT + t)
    idx_base = KV_IDX + (h * NT + t) * MAXCNT
    for i in range(0, cnt):
        kb = tl.load(idx_base + i)
        offs_k = kb * BLOCK + offs_n
        k_valid = offs_k < S
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k_ptrs = K + b * skb + h * skh + offs_k[:, None] * sks + offs_d[None, :] * skd
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(DOT)
        v_ptrs = V + b * svb + h * svh + offs_k[:, None] * svs + offs_d[None, :] * svd
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(DOT)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        allowed = tl.load(lay_row + kb, mask=m_valid, other=0) != 0
        mask = allowed[:, None] & (offs_k[None, :] <= offs_m[:, None]) & k_valid[None, :]
        qk = tl.where(mask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )
    # log2-sum-exp2 of the scaled scores; 0 for an empty row (all its scores are -inf, so p stays 0 in backward)
    lse = tl.where(empty, 0.0, m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh * S + offs_m, lse, mask=m_valid)


def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, LAYOUT, KV_IDX, KV_CNT,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    H, S, D, NBQ, NBK, NT, MAXCNT, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < S
    d_valid = offs_d < D
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=md_mask, other=0.0).to(DOT)
    # dO and dQ are contiguous (B, H, S, D): the same strides
    do_ptrs = DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd
    do = tl.load(do_ptrs, mask=md_mask, other=0.0).to(DOT)
    lse = tl.load(LSE + bh * S + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + bh * S + offs_m, mask=m_valid, other=0.0)
    lay_row = LAYOUT + h * NBQ * NBK + (offs_m // BLOCK) * NBK
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    cnt = tl.load(KV_CNT + h * NT + t)
    idx_base = KV_IDX + (h * NT + t) * MAXCNT
    for i in range(0, cnt):
        kb = tl.load(idx_base + i)
        offs_k = kb * BLOCK + offs_n
        k_valid = offs_k < S
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k_ptrs = K + b * skb + h * skh + offs_k[:, None] * sks + offs_d[None, :] * skd
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(DOT)
        v_ptrs = V + b * svb + h * svh + offs_k[:, None] * svs + offs_d[None, :] * svd
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(DOT)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        allowed = tl.load(lay_row + kb, mask=m_valid, other=0) != 0
        mask = allowed[:, None] & (offs_k[None, :] <= offs_m[:, None]) & k_valid[None, :]
        p = tl.exp2(tl.where(mask, qk, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT), k, input_precision=PREC)
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd,
        dq.to(DQ.dtype.element_ty),
        mask=md_mask,
    )


def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, LAYOUT, Q_IDX, Q_CNT,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    H, S, D, NBQ, NBK, MAXCNT, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_k = kb * BLOCK + tl.arange(0, BLOCK)
    offs_mt = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_valid = offs_k < S
    d_valid = offs_d < D
    kv_mask = k_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * skb + h * skh + offs_k[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0).to(DOT)
    v = tl.load(V + b * svb + h * svh + offs_k[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0).to(DOT)
    dk = tl.full([BLOCK, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK, BLOCK_D], 0.0, tl.float32)
    cnt = tl.load(Q_CNT + h * NBK + kb)
    idx_base = Q_IDX + (h * NBK + kb) * MAXCNT
    for i in range(0, cnt):
        t = tl.load(idx_base + i)
        offs_m = t * BLOCK_M + offs_mt
        m_valid = offs_m < S
        md_mask = m_valid[:, None] & d_valid[None, :]
        q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd
        q = tl.load(q_ptrs, mask=md_mask, other=0.0).to(DOT)
        do_ptrs = DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd
        do = tl.load(do_ptrs, mask=md_mask, other=0.0).to(DOT)
        lse = tl.load(LSE + bh * S + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + bh * S + offs_m, mask=m_valid, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        allowed = tl.load(LAYOUT + h * NBQ * NBK + (offs_m // BLOCK) * NBK + kb, mask=m_valid, other=0) != 0
        mask = allowed[:, None] & (offs_k[None, :] <= offs_m[:, None]) & k_valid[None, :]
        p = tl.exp2(tl.where(mask, qk, float("-inf")) - lse[:, None])
        dv += tl.dot(tl.trans(p).to(DOT), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(DOT), q, input_precision=PREC)
    dk = dk * sm_scale
    tl.store(
        DK + b * sdb + h * sdh + offs_k[:, None] * sds + offs_d[None, :] * sdd, dk.to(DK.dtype.element_ty), mask=kv_mask
    )
    tl.store(
        DV + b * sdb + h * sdh + offs_k[:, None] * sds + offs_d[None, :] * sdd, dv.to(DV.dtype.element_ty), mask=kv_mask
    )

# fmt: on

_KERNELS: dict[bool, tuple] = {}


def _kernels(interpret: bool) -> tuple:
    """(fwd, dq, dkdv) compiled for the GPU, or wrapped for Triton's interpreter (CPU tensors)."""
    if triton is None:
        raise RuntimeError("block_sparse_attention needs Triton (pip install triton)")
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            wrap = InterpretedFunction
        else:
            wrap = triton.jit
        _KERNELS[interpret] = tuple(wrap(fn) for fn in (_fwd_kernel, _bwd_dq_kernel, _bwd_dkdv_kernel))
    return _KERNELS[interpret]


@dataclass(frozen=True)
class BlockIndex:
    """Which key blocks each query tile visits, and the transpose, for one (layout, seq_len, block_m)."""

    layout: Tensor  # (H, NBK, NBK) int8, the layout cut to the sequence, on the kernels' device
    kv_idx: Tensor  # (H, NT, max_kv) int32, ascending key blocks per query tile (first kv_cnt entries valid)
    kv_cnt: Tensor  # (H, NT) int32
    q_idx: Tensor  # (H, NBK, max_q) int32, ascending query tiles per key block
    q_cnt: Tensor  # (H, NBK) int32
    seq_len: int
    block: int
    block_m: int


def _compact(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of a bool (..., C) mask as ascending column lists padded to the longest row, and their lengths."""
    cnt = mask.sum(-1)
    width = max(int(cnt.max().item()) if cnt.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    return order.to(torch.int32).contiguous(), cnt.to(torch.int32).contiguous()


def build_block_index(layout: Tensor, seq_len: int, block: int, block_m: int) -> BlockIndex:
    """The per-tile key-block lists (and transposed lists) of `layout` for a sequence of `seq_len` tokens.

    Query tile t (tokens [t*block_m, (t+1)*block_m)) lists key block kb when any of its query blocks has the layout
    bit for kb and kb starts at or before the tile's last real token (causality at block granularity).
    """
    nbk = math.ceil(seq_len / block)
    if layout.dim() != 3 or layout.shape[1] != layout.shape[2]:
        raise ValueError(f"layout must be (heads, blocks, blocks), got {tuple(layout.shape)}")
    if layout.shape[-1] < nbk:
        raise ValueError(f"layout has {layout.shape[-1]} blocks of {block}, too few for {seq_len} tokens")
    lay = layout[:, :nbk, :nbk].bool()
    nt = math.ceil(seq_len / block_m)
    device = lay.device
    first = torch.arange(nt, device=device) * block_m
    last = torch.clamp(first + block_m, max=seq_len) - 1
    qb = torch.arange(nbk, device=device)
    member = (qb[None, :] * block <= last[:, None]) & ((qb[None, :] + 1) * block > first[:, None])  # (NT, NBK)
    tile = torch.einsum("tq,hqk->htk", member.float(), lay.float()) > 0  # (H, NT, NBK)
    tile &= (qb[None, :] * block <= last[:, None])[None]
    kv_idx, kv_cnt = _compact(tile)
    q_idx, q_cnt = _compact(tile.transpose(1, 2))
    return BlockIndex(lay.to(torch.int8).contiguous(), kv_idx, kv_cnt, q_idx, q_cnt, seq_len, block, block_m)


_INDEX_CACHE: dict[tuple, tuple[weakref.ref, int, BlockIndex]] = {}
_CACHE_SIZE = 32


def _cached_index(layout: Tensor, seq_len: int, block: int, block_m: int, device: torch.device) -> BlockIndex:
    """`build_block_index`, cached per layout tensor (by identity and in-place version) and shape parameters."""
    key = (id(layout), seq_len, block, block_m, str(device))
    hit = _INDEX_CACHE.get(key)
    if hit is not None and hit[0]() is layout and hit[1] == layout._version:
        return hit[2]
    index = build_block_index(layout.to(device), seq_len, block, block_m)
    if len(_INDEX_CACHE) >= _CACHE_SIZE:
        _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
    _INDEX_CACHE[key] = (weakref.ref(layout), layout._version, index)
    return index


def _meta(q: Tensor, index: BlockIndex) -> dict:
    """The kernels' compile-time arguments."""
    return {
        "BLOCK": index.block,
        "BLOCK_M": index.block_m,
        "BLOCK_D": triton.next_power_of_2(q.shape[-1]),
        "PREC": _precision(q),
        "DOT": _dot_dtype(q),
    }


def _launch_opts(q: Tensor) -> dict:
    return {} if q.device.type == "cpu" else {"num_warps": 4, "num_stages": 2}


def _precision(q: Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: exact products, not TF32


def _dot_dtype(q: Tensor):
    """Operand dtype of the kernels' dots: the input's, except bf16 in the interpreter (its bf16 dot is wrong)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[q.dtype]


def _strides(x: Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index: BlockIndex, sm_scale: float):
        b, h, s, d = q.shape
        fwd, _, _ = _kernels(q.device.type == "cpu")
        o = torch.empty((b, h, s, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
        nt, max_kv = index.kv_idx.shape[1], index.kv_idx.shape[2]
        nbk = index.layout.shape[-1]
        fwd[(nt, b * h)](
            q, k, v, o, lse, index.layout, index.kv_idx, index.kv_cnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            h, s, d, nbk, nbk, nt, max_kv, sm_scale * _LOG2E,
            **_meta(q, index), **_launch_opts(q),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.index, ctx.sm_scale = index, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        index, sm_scale = ctx.index, ctx.sm_scale
        b, h, s, d = q.shape
        _, dq_kernel, dkdv_kernel = _kernels(q.device.type == "cpu")
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()  # (B, H, S)
        dq, dk, dv = (torch.empty((b, h, s, d), dtype=x.dtype, device=x.device) for x in (q, k, v))
        nt, max_kv = index.kv_idx.shape[1], index.kv_idx.shape[2]
        nbk, max_q = index.q_idx.shape[1], index.q_idx.shape[2]
        meta = _meta(q, index)
        dq_kernel[(nt, b * h)](
            q, k, v, do, dq, lse, delta, index.layout, index.kv_idx, index.kv_cnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            h, s, d, nbk, nbk, nt, max_kv, sm_scale * _LOG2E, sm_scale, **meta, **_launch_opts(q),
        )  # fmt: skip
        dkdv_kernel[(nbk, b * h)](
            q, k, v, do, dk, dv, lse, delta, index.layout, index.q_idx, index.q_cnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            h, s, d, nbk, nbk, max_q, sm_scale * _LOG2E, sm_scale, **meta, **_launch_opts(q),
        )  # fmt: skip
        return dq, dk, dv, None, None


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Tensor,
    block: int,
    *,
    block_m: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal block-sparse attention of (B, H, S, D) q, k, v under `layout` (H, NB, NB), NB * block >= S.

    Same result as SDPA with ``layout_token_mask(layout, pos, pos, block)`` for positions 0..S-1, except that a
    query row with no visible key gives 0 instead of NaN. `block_m` is the query tile (a power of two >= 16;
    default 64 on GPU, 32 on CPU); `scale` defaults to 1/sqrt(D). Differentiable in q, k and v.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (B, H, S, D) shape, got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share a float16/bfloat16/float32 dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if layout.shape[0] != q.shape[1]:
        raise ValueError(f"layout has {layout.shape[0]} heads, q has {q.shape[1]}")
    if block_m is None:
        block_m = 32 if q.device.type == "cpu" else 64
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    index = _cached_index(layout, q.shape[2], block, block_m, q.device)
    return _BlockSparseAttention.apply(q, k, v, index, sm_scale)
