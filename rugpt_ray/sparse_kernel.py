"""Block-sparse causal attention in Triton (forward and backward), driven by a DeepSpeed-style layout.

The rule is the one in `rugpt_ray.attention`: query i sees key j iff ``layout[h, i // block, j // block]`` and
``j <= i``. A query row that sees nothing gets output 0 and zero gradients (SDPA gives NaN or 0 there, by backend).

Design (FlashAttention-2 style, one program per (query tile, batch*head)):
- once per (layout, seq_len, block_m) the host builds, per head and query tile of ``block_m`` tokens, the sorted
  list of layout key blocks any of its rows may see (``kv_idx`` int32, ``kv_cnt``) with, per entry, a bitmask of
  which of the tile's query blocks have it (``kv_bits``), and the transposed list per key block of the query
  tiles that see it (``q_idx``, ``q_cnt``); all cached per layout tensor;
- forward: a query tile walks only its listed key blocks, ``block_n // block`` of them gathered per step (so the
  16-token global stripes of the XL layout cost 16 keys, not a 64/128-key tile), online softmax in fp32; the
  element mask (layout bit of the row's query block, causal, sequence tail) is applied inside each step;
- backward: ``delta = rowsum(dO * O)`` in torch, a dQ kernel over the same lists and a dK/dV kernel per key block
  over the transposed list; no atomics, so results are deterministic.

CPU tensors run the same kernels in Triton's interpreter (slow: correctness checks at toy sizes only).
"""

from __future__ import annotations

import math
import types
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

__all__ = [
    "HAS_TRITON",
    "BlockIndex",
    "block_sparse_attention",
    "build_block_index",
    "compile_for_cuda",
    "supports_block",
]

HAS_TRITON = triton is not None

_LOG2E = 1.4426950408889634


# Kernels are plain functions here and compiled lazily (`_kernels`): with triton.jit on CUDA tensors and with the
# interpreter on CPU tensors, so no TRITON_INTERPRET has to be set before this module is imported. They call only
# Triton builtins (tl.full, tl.reduce with the standard combine functions, not tl.zeros/tl.max/tl.sum): those
# library helpers are @jit functions that the interpreter can only run when TRITON_INTERPRET=1 was set at import.
# Our one device function, `_gather_scores`, is @jit too; `_kernels` hands the interpreter an interpreted copy.
def _device_function(fn):
    """`triton.jit` where Triton is installed (the module stays importable without it)."""
    return triton.jit(fn) if HAS_TRITON else fn


# fmt: off
@_device_function
def _gather_scores(
    q, K, V, idx_base, bits_base, it, cnt, offs_m, offs_d, d_valid, qb_local, sks, skd, svs, svd, S, qk_scale,
    BLOCK: tl.constexpr, KB: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
):
    # Step `it` of a query tile's key-block list (shared by the forward and dQ kernels): gather the next KB listed
    # layout blocks of K and V (K, V: this (batch, head)'s base pointers) and the tile's scaled scores, -inf where
    # the row's query block lacks the layout bit, where causality forbids, and past the list or the sequence.
    offs_j = tl.arange(0, KB * BLOCK)
    slot = it * KB + offs_j // BLOCK
    s_valid = slot < cnt
    kb = tl.load(idx_base + slot, mask=s_valid, other=0)
    bits = tl.load(bits_base + slot, mask=s_valid, other=0)
    offs_k = kb * BLOCK + offs_j % BLOCK
    k_valid = s_valid & (offs_k < S)
    kv_mask = k_valid[:, None] & d_valid[None, :]
    k = tl.load(K + offs_k[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0).to(DOT)
    v = tl.load(V + offs_k[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0).to(DOT)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    allowed = ((bits[None, :] >> qb_local[:, None]) & 1) != 0
    mask = allowed & (offs_k[None, :] <= offs_m[:, None]) & k_valid[None, :]
    return k, v, tl.where(mask, qk, float("-inf"))


def _fwd_kernel(
    Q, K, V, Out, LSE, KV_IDX, KV_BITS, KV_CNT,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    H, S, D, NT, MAXCNT, qk_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
    KB: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < S
    d_valid = offs_d < D
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
        mask=m_valid[:, None] & d_valid[None, :],
        other=0.0,
    ).to(DOT)
    qb_local = offs_m // BLOCK - (t * BLOCK_M) // BLOCK  # bit of the row's query block in KV_BITS
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    cnt = tl.load(KV_CNT + h * NT + t)
    idx_base = KV_IDX + (h * NT + t) * MAXCNT
    bits_base = KV_BITS + (h * NT + t) * MAXCNT
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for it in range(0, (cnt + KB - 1) // KB):
        k, v, qk = _gather_scores(q, k_base, v_base, idx_base, bits_base, it, cnt, offs_m, offs_d, d_valid, qb_local,
                                  sks, skd, svs, svd, S, qk_scale, BLOCK, KB, PREC, DOT)
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
    Q, K, V, DO, DQ, LSE, DELTA, KV_IDX, KV_BITS, KV_CNT,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdb, sdh, sds, sdd,
    H, S, D, NT, MAXCNT, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
    KB: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
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
    qb_local = offs_m // BLOCK - (t * BLOCK_M) // BLOCK  # bit of the row's query block in KV_BITS
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    cnt = tl.load(KV_CNT + h * NT + t)
    idx_base = KV_IDX + (h * NT + t) * MAXCNT
    bits_base = KV_BITS + (h * NT + t) * MAXCNT
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for it in range(0, (cnt + KB - 1) // KB):
        k, v, qk = _gather_scores(q, k_base, v_base, idx_base, bits_base, it, cnt, offs_m, offs_d, d_valid, qb_local,
                                  sks, skd, svs, svd, S, qk_scale, BLOCK, KB, PREC, DOT)
        p = tl.exp2(qk - lse[:, None])
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
    if not HAS_TRITON:
        raise RuntimeError("block_sparse_attention needs Triton (pip install triton)")
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            # The interpreter resolves a kernel's device functions by name in the kernel's globals: give the
            # interpreted kernels a copy of this module's globals where `_gather_scores` is interpreted too.
            scope = dict(globals(), _gather_scores=InterpretedFunction(_gather_scores.fn))

            def wrap(fn):
                return InterpretedFunction(types.FunctionType(fn.__code__, scope, fn.__name__))
        else:
            wrap = triton.jit
        _KERNELS[interpret] = tuple(wrap(fn) for fn in (_fwd_kernel, _bwd_dq_kernel, _bwd_dkdv_kernel))
    return _KERNELS[interpret]


@dataclass(frozen=True)
class BlockIndex:
    """Which key blocks each query tile visits, and the transpose, for one (layout, seq_len, block_m)."""

    layout: Tensor  # (H, NBK, NBK) int8, the layout cut to the sequence, on the kernels' device
    kv_idx: Tensor  # (H, NT, max_kv) int32, ascending key blocks per query tile (first kv_cnt entries valid)
    kv_bits: Tensor  # (H, NT, max_kv) int32, bit r: the tile's r-th query block has the layout bit for that key block
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
    rows_per_tile = max(block_m // block, 1)  # query blocks per tile (tiles and blocks are powers of two)
    if rows_per_tile > 31:
        raise ValueError(f"block_m ({block_m}) may span at most 31 layout blocks of {block}")
    lay = layout[:, :nbk, :nbk].bool()
    nt = math.ceil(seq_len / block_m)
    device = lay.device
    first = torch.arange(nt, device=device) * block_m
    last = torch.clamp(first + block_m, max=seq_len) - 1
    # bits[h, t, kb]: bit r set when query block (first_t // block + r) of the tile has layout bit kb
    qb = (first // block)[:, None] + torch.arange(rows_per_tile, device=device)[None, :]  # (NT, R)
    rows = lay[:, qb.clamp(max=nbk - 1)] & (qb < nbk)[None, :, :, None]  # (H, NT, R, NBK)
    weights = (1 << torch.arange(rows_per_tile, device=device, dtype=torch.int64))[None, None, :, None]
    bits = (rows.to(torch.int64) * weights).sum(2)  # (H, NT, NBK)
    kb = torch.arange(nbk, device=device)
    tile = (bits != 0) & (kb[None, :] * block <= last[:, None])[None]  # causal at block granularity
    kv_idx, kv_cnt = _compact(tile)
    kv_bits = torch.gather(bits, 2, kv_idx.long()).to(torch.int32).contiguous()
    q_idx, q_cnt = _compact(tile.transpose(1, 2))
    layout8 = lay.to(torch.int8).contiguous()
    return BlockIndex(layout8, kv_idx, kv_bits, kv_cnt, q_idx, q_cnt, seq_len, block, block_m)


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


def _meta(q: Tensor, index: BlockIndex, kb: int | None = None) -> dict:
    """The kernels' compile-time arguments (`kb`: key blocks per step, for the forward and dQ kernels)."""
    return ({} if kb is None else {"KB": kb}) | {
        "BLOCK": index.block,
        "BLOCK_M": index.block_m,
        "BLOCK_D": triton.next_power_of_2(q.shape[-1]),
        "PREC": _precision(q),
        "DOT": _dot_dtype(q),
    }


def _launch_opts_gpu() -> dict:
    return {"num_warps": 4, "num_stages": 2}


def _launch_opts(q: Tensor) -> dict:
    return {} if q.device.type == "cpu" else _launch_opts_gpu()


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
    def forward(ctx, q, k, v, index: BlockIndex, sm_scale: float, kb: int):
        b, h, s, d = q.shape
        fwd, _, _ = _kernels(q.device.type == "cpu")
        o = torch.empty((b, h, s, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
        nt, max_kv = index.kv_idx.shape[1], index.kv_idx.shape[2]
        fwd[(nt, b * h)](
            q, k, v, o, lse, index.kv_idx, index.kv_bits, index.kv_cnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            h, s, d, nt, max_kv, sm_scale * _LOG2E,
            **_meta(q, index, kb), **_launch_opts(q),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.index, ctx.sm_scale, ctx.kb = index, sm_scale, kb
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
        dq_kernel[(nt, b * h)](
            q, k, v, do, dq, lse, delta, index.kv_idx, index.kv_bits, index.kv_cnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            h, s, d, nt, max_kv, sm_scale * _LOG2E, sm_scale, **_meta(q, index, ctx.kb), **_launch_opts(q),
        )  # fmt: skip
        dkdv_kernel[(nbk, b * h)](
            q, k, v, do, dk, dv, lse, delta, index.layout, index.q_idx, index.q_cnt,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            h, s, d, nbk, nbk, max_q, sm_scale * _LOG2E, sm_scale, **_meta(q, index), **_launch_opts(q),
        )  # fmt: skip
        return dq, dk, dv, None, None, None


# pointer arguments that are not q/k/v-typed, and the kernels' integer arguments
_PTR_ARGS = {
    "LSE": "fp32",
    "DELTA": "fp32",
    "LAYOUT": "i8",
    "KV_IDX": "i32",
    "KV_BITS": "i32",
    "KV_CNT": "i32",
    "Q_IDX": "i32",
    "Q_CNT": "i32",
}
_INT_ARGS = {"H", "S", "D", "NBQ", "NBK", "NT", "MAXCNT"}


def compile_for_cuda(
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    block: int = 16,
    block_m: int = 64,
    block_n: int = 64,
    arch: int = 90,
) -> dict[str, object]:
    """Compile the three kernels ahead of time for an NVIDIA GPU of compute capability `arch` (no GPU needed).

    Catches what the interpreter does not check (types, layouts, shared memory) on a machine without a GPU.
    Returns {kernel name: compiled kernel} (``.asm["ptx"]``, ``.metadata.shared``, ...).
    """
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    elem = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    consts = {
        "KB": max(block_n // block, 1),
        "BLOCK": block,
        "BLOCK_M": block_m,
        "BLOCK_D": triton.next_power_of_2(head_dim),
        "PREC": "ieee" if dtype == torch.float32 else "tf32",
        "DOT": {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[elem],
    }
    out = {}
    for fn in (_fwd_kernel, _bwd_dq_kernel, _bwd_dkdv_kernel):
        params = inspect.signature(fn).parameters
        const = {name: value for name, value in consts.items() if name in params}
        sig = {}
        for name in params:
            if name in const:
                sig[name] = "constexpr"
            elif name in ("qk_scale", "sm_scale"):
                sig[name] = "fp32"
            elif name[0].isupper() and name not in _INT_ARGS:
                sig[name] = "*" + _PTR_ARGS.get(name, elem)
            else:
                sig[name] = "i32"
        src = ASTSource(triton.jit(fn), sig, const)
        out[fn.__name__] = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=_launch_opts_gpu())
    return out


def supports_block(block: int) -> bool:
    """Whether the kernels take layout blocks of `block` tokens (a power of two >= 16: the smallest tl.dot tile)."""
    return block >= 16 and not block & (block - 1)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Tensor,
    block: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal block-sparse attention of (B, H, S, D) q, k, v under `layout` (H, NB, NB), NB * block >= S.

    Same result as SDPA with ``layout_token_mask(layout, pos, pos, block)`` for positions 0..S-1, except that a
    query row with no visible key gives 0 instead of NaN. `block_m` is the query tile (a power of two >= 16;
    default 64 on GPU, 32 on CPU); the forward and dQ kernels take `block_n` keys per step, gathered from
    `block_n // block` listed layout blocks (a power of two; default 64 on GPU, 32 on CPU, at least `block`).
    `scale` defaults to 1/sqrt(D). Differentiable in q, k and v.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (B, H, S, D) shape, got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share a float16/bfloat16/float32 dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if not supports_block(block):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if layout.shape[0] != q.shape[1]:
        raise ValueError(f"layout has {layout.shape[0]} heads, q has {q.shape[1]}")
    if block_m is None:
        block_m = 32 if q.device.type == "cpu" else 64
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if block_n is None:
        block_n = max(32 if q.device.type == "cpu" else 64, block)
    if block_n < block or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= block ({block}), got {block_n}")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    index = _cached_index(layout, q.shape[2], block, block_m, q.device)
    return _BlockSparseAttention.apply(q, k, v, index, sm_scale, block_n // block)
