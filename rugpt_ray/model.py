"""The ruGPT3 model: GPT-2 math with optional block-sparse layers, parameter names 1:1 with HF GPT2LMHeadModel.

Weights are `nn.Linear` ([out, in]); HF's Conv1D stores [in, out], so conversion transposes four matrices
per block and renames nothing (checkpoints.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from rugpt_ray.attention import (
    ATTN_IMPLS,
    flex_attention,
    flex_block_mask,
    layout_token_mask,
    padded_causal_mask,
    resolve_attn_impl,
    sdpa,
)
from rugpt_ray.config import ModelConfig
from rugpt_ray.errors import UserError
from rugpt_ray.sparse_kernel import HAS_TRITON, block_sparse_attention
from rugpt_ray.sparsity import make_layout


@dataclass
class KVCache:
    """Preallocated keys/values per layer plus each slot's true position and whether it holds a real token."""

    k: list[Tensor]
    v: list[Tensor]
    positions: Tensor
    valid: Tensor
    length: int = 0

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, cfg.n_head, max_len, cfg.head_dim)
        return cls(
            k=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
            v=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
            positions=torch.zeros(batch, max_len, dtype=torch.long, device=device),
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    def reorder(self, index: Tensor) -> None:
        """Keep only the batch rows in `index` (finished sequences leave the batch)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.positions = self.positions.index_select(0, index)
        self.valid = self.valid.index_select(0, index)


@dataclass
class AttentionMasks:
    """How each kind of layer attends in one forward pass: built once and shared by all layers of a kind."""

    dense: Tensor | None  # boolean mask for SDPA; None: SDPA's causal kernel
    sparse: Tensor | None = None  # boolean mask for SDPA
    flex: object | None = None  # a FlexAttention BlockMask
    layout: Tensor | None = None  # the master layout, for the Triton kernel (it slices and indexes it itself)
    block: int = 0  # the layout's block size, with `layout`


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool):
        super().__init__()
        self.n_head, self.head_dim, self.sparse = cfg.n_head, cfg.head_dim, sparse
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        # The seed's sparse layers (DeepSpeed SparseSelfAttention) had no attention dropout.
        self.attn_pdrop = 0.0 if sparse else cfg.attn_pdrop

    def forward(self, x: Tensor, masks: AttentionMasks, cache: KVCache | None, layer: int) -> Tensor:
        b, s, h = x.shape
        q, k, v = self.c_attn(x).view(b, s, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            end = cache.length + s
            cache.k[layer][:, :, cache.length:end] = k
            cache.v[layer][:, :, cache.length:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        dropout_p = self.attn_pdrop if self.training else 0.0
        if not self.sparse:
            y = sdpa(q, k, v, masks.dense, dropout_p)
        elif masks.layout is not None:
            y = block_sparse_attention(q, k, v, masks.layout, masks.block)
        elif masks.flex is not None:
            y = flex_attention(q, k, v, masks.flex)
        else:
            y = sdpa(q, k, v, masks.sparse, dropout_p)
        y = y.transpose(1, 2).reshape(b, s, h)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # tanh gelu = gelu_new


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = SelfAttention(cfg, sparse)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, masks: AttentionMasks, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.attn(self.ln_1(x), masks, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """ruGPT3 Small/Medium/Large/XL and ruGPT2Large; `sparse_layout` is the master layout at n_positions.

    `attn_impl` (constructor keyword, and a runtime attribute like `activation_checkpointing`) picks the attention
    of unpadded passes without a KV cache, one of `rugpt_ray.attention.ATTN_IMPLS`: "auto" (default) runs sparse
    layers through the Triton kernel on CUDA and SDPA + layout mask elsewhere, dense layers through SDPA's causal
    kernel; "reference", "sdpa", "triton" and "flex" force one. Padded or cached passes always use boolean masks.
    """

    def __init__(self, cfg: ModelConfig, attn_impl: str = "auto"):
        super().__init__()
        self.config = cfg
        self.attn_impl = attn_impl
        self.activation_checkpointing = False  # recompute each block in backward (training only)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
                drop=nn.Dropout(cfg.embd_pdrop),
                h=nn.ModuleList(Block(cfg, cfg.is_sparse_layer(i)) for i in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as the seed's F.linear(hidden, wte)
        if cfg.is_sparse:
            block = cfg.sparse_attention["block"]
            length = math.ceil(cfg.n_positions / block) * block
            # Like DeepSpeed's master_layout: built once at full length, sliced for shorter inputs, saved with
            # the weights so random layouts reload identically.
            self.register_buffer("sparse_layout", make_layout(cfg.sparse_attention, cfg.n_head, length).bool())
        else:
            self.sparse_layout = None
        self._mask_cache: dict[tuple, AttentionMasks] = {}
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, value: str) -> None:
        if value not in ATTN_IMPLS:
            raise UserError(f"attention implementation {value!r} is not one of {ATTN_IMPLS}")
        if value == "triton" and not HAS_TRITON:
            raise UserError("attn_impl 'triton' needs Triton (pip install triton)")
        self._attn_impl = value

    def _apply(self, fn, recurse=True):
        self._mask_cache.clear()  # masks live on the old device
        return super()._apply(fn, recurse)

    def attention_impl(self, device: torch.device) -> str:
        """What `attn_impl` resolves to for an unpadded pass on `device` (never "auto")."""
        block = self.config.sparse_attention["block"] if self.sparse_layout is not None else None
        return resolve_attn_impl(self.attn_impl, device, block)

    def _unpadded_masks(self, seq_len: int, device: torch.device) -> AttentionMasks:
        impl = self.attention_impl(device)
        key = (seq_len, device, impl)
        if key not in self._mask_cache:
            pos = torch.arange(seq_len, device=device).unsqueeze(0)
            masks = AttentionMasks(dense=None)
            if impl == "reference":
                every = torch.ones_like(pos, dtype=torch.bool)
                masks.dense = padded_causal_mask(pos, pos, every, every)
            if self.sparse_layout is not None:
                block = self.config.sparse_attention["block"]
                if impl == "triton":
                    masks.layout, masks.block = self.sparse_layout, block
                elif impl == "flex":
                    masks.flex = flex_block_mask(self.sparse_layout, seq_len, block)
                else:
                    masks.sparse = layout_token_mask(self.sparse_layout, pos, pos, block)
            self._mask_cache = {key: masks}  # one length at a time: XL masks are 64 MB at 2048
        return self._mask_cache[key]

    def _general_masks(self, q_pos: Tensor, k_pos: Tensor, q_valid: Tensor, k_valid: Tensor) -> AttentionMasks:
        dense = padded_causal_mask(q_pos, k_pos, q_valid, k_valid)
        sparse = None
        if self.sparse_layout is not None:
            block = self.config.sparse_attention["block"]
            sparse = dense & layout_token_mask(self.sparse_layout, q_pos, k_pos, block)
        return AttentionMasks(dense=dense, sparse=sparse)

    def forward(
        self,
        input_ids: Tensor,
        *,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, S or 1, V) and, with `targets` (already shifted; -100 = ignore), the mean token loss.

        `attention_mask` (B, S) marks real tokens (left padding); `positions` default to their running count.
        With a `cache`, the new keys/values are appended at `cache.length` and attention covers the cache.
        """
        b, s = input_ids.shape
        device = input_ids.device
        valid = torch.ones(b, s, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        start = cache.length if cache is not None else 0
        if positions is None:
            if attention_mask is None and cache is None:
                positions = torch.arange(s, device=device).expand(b, s)
            else:
                before = cache.valid[:, :start].sum(1, keepdim=True) if cache is not None else 0
                positions = (valid.long().cumsum(1) - 1 + before).clamp(min=0)
        if int(positions.max()) >= self.config.n_positions:
            raise UserError(f"sequence reaches position {int(positions.max())}; the model has "
                            f"{self.config.n_positions} positions")
        if cache is None and attention_mask is None:
            masks = self._unpadded_masks(s, device)
        else:
            if cache is not None:
                if start + s > cache.capacity:
                    raise UserError(f"KV cache holds {cache.capacity} tokens; {start + s} needed")
                cache.positions[:, start:start + s] = positions
                cache.valid[:, start:start + s] = valid
                k_pos, k_valid = cache.positions[:, :start + s], cache.valid[:, :start + s]
            else:
                k_pos, k_valid = positions, valid
            masks = self._general_masks(positions, k_pos, valid, k_valid)

        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, masks, cache, i, use_reentrant=False)
            else:
                x = block(x, masks, cache, i)
        if cache is not None:
            cache.length = start + s
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # a token mean; a batch with nothing to predict (a padding row) gives 0, not NaN
            total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                                    reduction="sum")
            loss = total / (targets != -100).sum().clamp(min=1)
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
