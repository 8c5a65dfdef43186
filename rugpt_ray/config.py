"""Model configuration and the seed's presets (ru-gpts-facts.md §2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rugpt_ray.errors import UserError
from rugpt_ray.sparsity import XL_SPARSE_ATTENTION, normalize_sparse_config

SPARSE_MODES = ("none", "all", "alternating", "top_bottom")



@dataclass
class ModelConfig:
    """A ruGPT3 model: GPT-2 math (pre-LN, gelu_new, learned positions, tied output) plus sparse layers."""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_embd: int = 768
    """Hidden size; the MLP is always 4 × n_embd, as in the seed."""
    n_head: int = 12
    """Attention heads; cannot be read off the weights, so seed checkpoints need it from a preset."""
    n_positions: int = 2048
    """Learned absolute positions: the longest sequence the model can see."""
    vocab_size: int = 50264
    """Embedding rows: 50257 (the tokenizer) or 50264 (padded to a multiple of 8 by the seed)."""
    embd_pdrop: float = 0.1
    """Dropout after token + position embeddings (the seed's hidden dropout)."""
    attn_pdrop: float = 0.1
    """Dropout on attention probabilities in dense layers (the seed's sparse layers have none)."""
    resid_pdrop: float = 0.1
    """Dropout on each block's attention and MLP outputs."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm eps of every LayerNorm."""
    sparse_mode: str = "none"
    """Which layers are block-sparse: none, all, alternating (even layer index), top_bottom (first half)."""
    sparse_attention: dict[str, Any] | None = None
    """DeepSpeed's `sparse_attention` JSON block (mode, block, ...; `seed` for random modes)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"model config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.sparse_mode not in SPARSE_MODES:
            raise UserError(f"model config: sparse_mode {self.sparse_mode!r} is not one of {', '.join(SPARSE_MODES)}")
        if self.sparse_mode != "none" and not self.sparse_attention:
            raise UserError(f"model config: sparse_mode {self.sparse_mode!r} needs a sparse_attention config")
        if self.sparse_attention is not None:
            self.sparse_attention = normalize_sparse_config(self.sparse_attention)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def is_sparse_layer(self, layer: int) -> bool:
        """The seed's `get_layer` rule (ru-gpts-facts.md §1): alternating makes layers 0, 2, 4, ... sparse."""
        if self.sparse_mode == "all":
            return True
        if self.sparse_mode == "alternating":
            return layer % 2 == 0
        if self.sparse_mode == "top_bottom":
            return layer < self.n_layer // 2
        return False

    @property
    def is_sparse(self) -> bool:
        return any(self.is_sparse_layer(i) for i in range(self.n_layer))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "model config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def num_params(self) -> int:
        """Parameters with the output layer tied to the token embedding (as the seed counts them)."""
        h, layers = self.n_embd, self.n_layer
        per_layer = 12 * h * h + 13 * h
        return self.vocab_size * h + self.n_positions * h + layers * per_layer + 2 * h


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=50264, sparse_mode="alternating",
                 sparse_attention={**XL_SPARSE_ATTENTION, "num_local_blocks": 4, "num_different_global_patterns": 4}),
    "small": dict(n_layer=12, n_embd=768, n_head=12, n_positions=2048, vocab_size=50264),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=2048, vocab_size=50257),
    "large": dict(n_layer=24, n_embd=1536, n_head=16, n_positions=2048, vocab_size=50257),
    "xl": dict(n_layer=24, n_embd=2048, n_head=16, n_positions=2048, vocab_size=50264,
               sparse_mode="alternating", sparse_attention=dict(XL_SPARSE_ATTENTION)),
    "gpt2large": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=50257),
}
"""The seed's five models plus `tiny` (alternating sparse, 4-block windows) for tests and the demo."""


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset's config, with any field overridden."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides}, where=f"preset {name}")
