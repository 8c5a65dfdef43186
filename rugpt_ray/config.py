"""Model configuration and the seed's presets (ru-gpts-facts.md §2)."""

from __future__ import annotations

import dataclasses
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class TrainConfig:
    """One training run. YAML recipes and `key=value` overrides on the command line use these names."""

    name: str = "rugpt"
    """Run name; the run folder is storage_path/name, and re-running the same name resumes it."""
    storage_path: str = "runs"
    """Where runs live: a local folder, NFS, or s3://... on a cluster (shared by all nodes)."""
    preset: str | None = "tiny"
    """Model preset to start from (random init), unless init_from is given."""
    init_from: str | None = None
    """Checkpoint to start from: HF folder/hub id, seed Megatron/DeepSpeed files, or the native format."""
    model: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields to override (e.g. {sparse_mode: alternating}); heads etc. for seed checkpoints."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (default: $RUGPT_DATA/tokenizer)."""
    train_data: Any = None
    """Training text: file, folder, glob, file.list, a list of these, or a prepared-data folder."""
    valid_data: Any = None
    """Validation text, same forms; evaluation is skipped without it."""
    seq_len: int = 256
    """Tokens per training sequence (≤ the model's n_positions)."""
    micro_batch: int = 4
    """Sequences per worker per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-5
    """The schedule never goes below this (the seed's --min-lr)."""
    warmup: float = 0.01
    """Linear warmup: a fraction of max_steps when < 1, else a number of steps."""
    decay: str = "cosine"
    """After warmup: cosine, linear or constant (the seed's AnnealingLR styles)."""
    decay_steps: int | None = None
    """Steps the warmup fraction and the decay span (the seed's --lr-decay-iters); default: all steps."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases and LayerNorm parameters."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW eps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (fp16: dynamic loss scaling, GPU only)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU (DeepSpeedCPUAdam)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save memory."""
    log_interval: int = 10
    """Steps between metric lines (and reports to Ray)."""
    eval_interval: int = 50
    """Steps between validation passes."""
    eval_iters: int = 10
    """Validation micro-batches per worker per pass."""
    save_interval: int = 100
    """Steps between checkpoints (a checkpoint is also written at the last step)."""
    max_steps: int | None = 200
    """Optimizer steps to run; or give max_tokens."""
    max_tokens: int | None = None
    """Token budget; converted to steps with the global batch."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    num_workers: int = 1
    """Ray Train workers (one DeepSpeed rank each)."""
    use_gpu: bool = False
    """One GPU per worker (nccl); CPU workers use gloo."""
    cpus_per_worker: float = 0.5
    """CPUs reserved per worker; below 1 so Ray Data keeps CPUs to read with (2 workers on 2 cores)."""
    threads_per_worker: int | None = None
    """CPU workers' torch threads (default: the node's cores shared among this run's workers there)."""
    num_to_keep: int = 2
    """Checkpoints kept (oldest deleted first)."""
    max_failures: int = 0
    """Worker-group restarts from the last checkpoint before the run fails."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON (the seed's work as they are); its values win over the fields above."""

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "train config") -> TrainConfig:
        return checked_dataclass(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def checked_dataclass(cls: type, values: dict[str, Any], where: str, list_known: bool = False) -> Any:
    """`cls(**values)` after one clear error for an unknown key or a value of the wrong type."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}" + (f"; known: {sorted(known)}" if list_known else ""))
    for key, value in values.items():
        check_type(where, key, value, known[key].type)
    return cls(**values)


_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict[str, Any]": dict}


def check_type(where: str, key: str, value: Any, annotation: str) -> None:
    if annotation == "Any":
        return
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return
    for option in options:
        expected = _TYPES.get(option)
        if expected and isinstance(value, expected) and not (option in ("int", "float") and isinstance(value, bool)):
            return
    raise UserError(f"{where}: {key} must be {annotation}, got {type(value).__name__} {value!r}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are YAML (numbers, booleans, lists); `model.x=1` sets one model field."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: value is not valid YAML ({e})") from e
        if "." in key:
            outer, inner = key.split(".", 1)
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


def read_config_values(path: str | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML mapping (recipe or sweep spec) with `key=value` overrides applied; `a.b=x` sets one entry of `a`."""
    import yaml

    values: dict[str, Any] = {}
    if path:
        try:
            values = yaml.safe_load(open(path, encoding="utf-8")) or {}
        except OSError as e:
            raise UserError(f"--config {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise UserError(f"--config {path}: not valid YAML ({e})") from e
        if not isinstance(values, dict):
            raise UserError(f"--config {path}: expected a mapping of keys to values")
    for key, value in parse_overrides(overrides or []).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML recipe plus command-line overrides, checked before anything starts."""
    values = read_config_values(path, overrides)
    for key in ("train_data", "valid_data", "tokenizer", "init_from", "deepspeed_config"):
        values[key] = expand_data_vars(values.get(key))
    return TrainConfig.from_dict({k: v for k, v in values.items() if v is not None or k in _NULLABLE},
                                 where=path or "train config")


_NULLABLE = {"preset", "max_steps", "max_tokens"}


def data_root() -> Path:
    """The shared data folder (tokenizer, corpus): `$RUGPT_DATA`, default ../shared/data."""
    return Path(os.environ.get("RUGPT_DATA", "../shared/data"))


def expand_data_vars(value: Any) -> Any:
    """`$RUGPT_DATA` (default ../shared/data) and other environment variables in paths, lists of paths too."""
    if isinstance(value, list):
        return [expand_data_vars(v) for v in value]
    if not isinstance(value, str):
        return value
    env = {**os.environ, "RUGPT_DATA": str(data_root())}
    return string.Template(value).safe_substitute(env)
