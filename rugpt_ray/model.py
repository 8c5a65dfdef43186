"""The ruGPT3 model: GPT-2 math with optional block-sparse layers, parameter names 1:1 with HF GPT2LMHeadModel.

Weights are `nn.Linear` ([out, in]); HF's Conv1D stores [in, out], so conversion transposes four matrices
per block and renames nothing (checkpoints.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

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
    """Keys/values in fixed slots: slot r holds one sequence at columns 0..its length, so column = position.

    Preallocated once (zeros: unused slots stay finite); a sequence takes a free slot and gives it back, and
    nothing moves when others join or leave. Prompts are written whole from column 0 (`write_prompts`), decoded
    tokens one column each (`write_tokens`).
    """

    k: list[Tensor]  # per layer (slots, heads, capacity, head_dim)
    v: list[Tensor]

    @classmethod
    def allocate(cls, cfg: ModelConfig, slots: int, capacity: int, device, dtype) -> KVCache:
        shape = (slots, cfg.n_head, capacity, cfg.head_dim)
        return cls(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
                   v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)])

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def write_prompts(self, slots: Tensor, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Prompts (P, heads, S, head_dim) into `slots` from column 0; they attend to themselves only."""
        self.k[layer][slots, :, :k.shape[2]] = k
        self.v[layer][slots, :, :v.shape[2]] = v
        return k, v

    def write_tokens(self, lengths: Tensor, kv_len: int, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """One token (n, heads, 1, head_dim) for each of slots 0..n-1 at column `lengths[r]`; they attend to columns
        0..kv_len-1 of their slots."""
        kc, vc = self.k[layer], self.v[layer]
        n = lengths.shape[0]
        rows = torch.arange(n, device=k.device)
        kc[rows, :, lengths] = k[:, :, 0]
        vc[rows, :, lengths] = v[:, :, 0]
        return kc[:n, :, :kv_len], vc[:n, :, :kv_len]


@dataclass
class AttentionMasks:
    """How each kind of layer attends in one forward pass: built once and shared by all layers of a kind."""

    dense: Tensor | None  # boolean mask for SDPA; None: SDPA's causal kernel
    sparse: Tensor | None = None  # boolean mask for SDPA
    flex: object | None = None  # a FlexAttention BlockMask
    layout: Tensor | None = None  # the master layout, for the Triton kernel (it slices and indexes it itself)
    block: int = 0  # the layout's block size, with `layout`


@dataclass
class Part:
    """`rows` x `width` tokens of a forward pass that attend alike. A pass is a list of parts, its tokens laid out
    part after part, row by row: every layer but attention sees all of them at once (so a decode step and new
    prompts read the weights once), and attention runs per part with its masks. `write` (layer, k, v) puts the
    part's keys/values into a KV cache and returns those it attends to (None: no cache)."""

    rows: int
    width: int
    masks: AttentionMasks
    write: Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]] | None = None

    @property
    def tokens(self) -> int:
        return self.rows * self.width


@dataclass
class Decoding:
    """One decode step of slots 0..n-1 (n = len(tokens)): token r is fed at column `lengths[r]` of slot r and
    attends to columns 0..its length, of the first `kv_len`. Logits come for `rows` (all n by default)."""

    tokens: Tensor
    lengths: Tensor
    kv_len: int
    rows: Tensor | None = None


@dataclass
class Prefilling:
    """Prompts (P, S), right-padded to one width, into `slots` from column 0: logits after each prompt's last token
    (`lengths[p] - 1`), or after every token with `every_position` (to score the prompt).

    True positions are the columns, and the plain causal mask keeps every real token away from the padding after
    it (whose keys later steps never attend to)."""

    input_ids: Tensor
    lengths: Tensor
    slots: Tensor
    every_position: bool = False


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool):
        super().__init__()
        self.n_head, self.head_dim, self.sparse = cfg.n_head, cfg.head_dim, sparse
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        # The seed's sparse layers (DeepSpeed SparseSelfAttention) had no attention dropout.
        self.attn_pdrop = 0.0 if sparse else cfg.attn_pdrop

    def forward(self, x: Tensor, parts: list[Part], layer: int) -> Tensor:
        qkv = self.c_attn(x).view(-1, 3, self.n_head, self.head_dim)  # the parts' tokens, in order
        ys, start = [], 0
        for part in parts:
            q, k, v = qkv[start:start + part.tokens].view(part.rows, part.width, 3, self.n_head,
                                                          self.head_dim).permute(2, 0, 3, 1, 4)
            start += part.tokens
            if part.write is not None:
                k, v = part.write(layer, k, v)
            ys.append(self._attend(q, k, v, part.masks).transpose(1, 2).reshape(part.tokens, -1))
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return self.resid_dropout(self.c_proj(y.view(x.shape)))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, masks: AttentionMasks) -> Tensor:
        dropout_p = self.attn_pdrop if self.training else 0.0
        if not self.sparse:
            return sdpa(q, k, v, masks.dense, dropout_p)
        if masks.layout is not None:
            return block_sparse_attention(q, k, v, masks.layout, masks.block)
        if masks.flex is not None:
            return flex_attention(q, k, v, masks.flex)
        return sdpa(q, k, v, masks.sparse, dropout_p)


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

    def forward(self, x: Tensor, parts: list[Part], layer: int) -> Tensor:
        x = x + self.attn(self.ln_1(x), parts, layer)
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

    def _decode_masks(self, lengths: Tensor, kv_len: int) -> AttentionMasks:
        """Masks for one decode step from each row's length alone: its query sits at column `length`."""
        q_pos = lengths.unsqueeze(1)
        k_pos = torch.arange(kv_len, device=lengths.device).expand(len(lengths), kv_len)
        masks = AttentionMasks(dense=(k_pos <= q_pos)[:, None, None, :])
        if self.sparse_layout is not None:
            masks.sparse = layout_token_mask(self.sparse_layout, q_pos, k_pos, self.config.sparse_attention["block"])
        return masks

    def _hidden(self, input_ids: Tensor, positions: Tensor, parts: list[Part]) -> Tensor:
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, parts, i, use_reentrant=False)
            else:
                x = block(x, parts, i)
        return self.transformer.ln_f(x)

    def forward(
        self,
        input_ids: Tensor,
        *,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, S, V) and, with `targets` (already shifted; -100 = ignore), the mean token loss.

        `attention_mask` (B, S) marks real tokens (left padding); `positions` default to their running count.
        """
        b, s = input_ids.shape
        device = input_ids.device
        valid = torch.ones(b, s, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        if positions is None:
            if attention_mask is None:
                positions = torch.arange(s, device=device).expand(b, s)
            else:
                positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        if int(positions.max()) >= self.config.n_positions:
            raise UserError(f"sequence reaches position {int(positions.max())}; the model has "
                            f"{self.config.n_positions} positions")
        if attention_mask is None:
            masks = self._unpadded_masks(s, device)
        else:
            masks = self._general_masks(positions, positions, valid, valid)
        logits = self.lm_head(self._hidden(input_ids, positions, [Part(b, s, masks)]))
        loss = None
        if targets is not None:
            # a token mean; a batch with nothing to predict (a padding row) gives 0, not NaN
            total = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                                    reduction="sum")
            loss = total / (targets != -100).sum().clamp(min=1)
        return logits, loss

    def infer(self, cache: KVCache, decoding: Decoding | None = None,
              prefilling: Prefilling | None = None) -> tuple[Tensor | None, Tensor | None]:
        """One forward pass over a decode step and new prompts (either may be absent), through the KV cache: the
        decoded rows' logits (len(rows), V) and the prompts' (P, V), or (P, S, V) with `every_position`.

        The decode step's tensor shapes depend only on n and `kv_len` (at kv_len = capacity they are fixed, as a
        CUDA graph needs, when it runs alone). A slot with nothing to decode takes part with length 0: it writes
        and sees only its column 0. The caller keeps every length below the cache's capacity.
        """
        ids, positions, parts = [], [], []
        if decoding is not None:
            ids.append(decoding.tokens)
            positions.append(decoding.lengths)
            parts.append(Part(len(decoding.tokens), 1, self._decode_masks(decoding.lengths, decoding.kv_len),
                              partial(cache.write_tokens, decoding.lengths, decoding.kv_len)))
        if prefilling is not None:
            p, s = prefilling.input_ids.shape
            if s > min(cache.capacity, self.config.n_positions):
                raise UserError(f"a {s}-token prompt does not fit the KV cache ({cache.capacity}) or the model's "
                                f"{self.config.n_positions} positions")
            device = prefilling.input_ids.device
            ids.append(prefilling.input_ids.flatten())
            positions.append(torch.arange(s, device=device).repeat(p))
            parts.append(Part(p, s, self._unpadded_masks(s, device), partial(cache.write_prompts, prefilling.slots)))
        hidden = self._hidden(torch.cat(ids).unsqueeze(1), torch.cat(positions).unsqueeze(1), parts)[:, 0]
        per_part = iter(hidden.split([part.tokens for part in parts]))
        read = []  # the hidden states the output layer reads, part by part
        if decoding is not None:
            decoded = next(per_part)
            read.append(decoded if decoding.rows is None else decoded[decoding.rows])
        if prefilling is not None:
            prompts = next(per_part).view(p, s, -1)
            read.append(prompts.flatten(0, 1) if prefilling.every_position
                        else prompts[torch.arange(p, device=device), prefilling.lengths - 1])
        logits = iter(self.lm_head(torch.cat(read)).split([len(h) for h in read]))
        decoded = next(logits) if decoding is not None else None
        prompts = next(logits) if prefilling is not None else None
        if prompts is not None and prefilling.every_position:
            prompts = prompts.view(p, s, -1)
        return decoded, prompts

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
