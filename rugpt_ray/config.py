"""Configuration: one checking mechanism for every config users write, the model and training configs, and the
seed's DeepSpeed JSON.

The bottom layer of the package: it imports no torch, so `rugpt-ray --help` and a bad-config error are instant.
Every config is a dataclass deriving from `Config`; its fields' types and `option(...)` rules (ranges, choices) are
checked whenever one is built, and `from_dict` adds unknown keys with a close-match hint. Every error is one line:
`WHERE: KEY must be ..., got VALUE`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import string
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from rugpt_ray.errors import UserError
from rugpt_ray.sparse_config import XL_SPARSE_ATTENTION, normalize_sparse_config

SPARSE_MODES = ("none", "all", "alternating", "top_bottom")
"""Which layers are block-sparse (the seed's --sparse-mode)."""
CHECKPOINT_FORMATS = ("auto", "hf", "megatron", "native")
"""What `load_model` reads: detected, an HF GPT-2 folder/file, the seed's Megatron/DeepSpeed files, or ours."""
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
"""Weight dtypes a model can be written in (torch dtype names)."""
DTYPES = (*FLOAT_DTYPES, "int8")
"""Weight dtypes for inference: a float dtype, or int8 weight-only on the CPU (see `rugpt_ray.quantization`)."""
DECAY_STYLES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
LOG_LEVELS = ("debug", "info", "warning")
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
"""Linear layers LoRA can adapt: attention qkv, the attention and MLP output projections (both c_proj), MLP in."""
CHECKPOINT_UPLOADS = ("sync", "async")

C = TypeVar("C", bound="Config")


# --------------------------------------------------------------------------------------------- the mechanism

def option(default: Any = MISSING, *, factory: Any = MISSING, ge: float | None = None, gt: float | None = None,
           le: float | None = None, choices: tuple | None = None) -> Any:
    """A dataclass field whose value `Config` keeps within a range or among choices (None always passes where the
    type allows it)."""
    rules = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "choices": choices}.items() if v is not None}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


class Config:
    """Base of every config dataclass: types and rules checked on construction, so a config that exists is valid,
    and changing one (`dataclasses.replace`) makes a new, checked config instead of mutating it."""

    where: ClassVar[str] = "config"
    """How errors name this config when no file is given."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(self.where, f, getattr(self, f.name))
        self.check()

    def check(self) -> None:
        """Rules that involve several fields (a subclass adds them)."""

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any], where: str | None = None) -> C:
        """`cls(**values)` after one clear error for an unknown key (with a close match) or a bad value."""
        where = where or cls.where
        if not isinstance(values, dict):
            raise UserError(f"{where}: expected a mapping of keys to values, got {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UserError(f"{where}: unknown keys {unknown}{close_matches(unknown, known)}")
        for key, value in values.items():
            check_value(where, known[key], value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def close_matches(unknown: list[str], known: dict[str, Any]) -> str:
    """The hint after "unknown keys [...]": the close matches, else the known keys when they are few."""
    matches = {key: match[0] for key in unknown if (match := difflib.get_close_matches(key, known, 1))}
    if len(unknown) == 1 and matches:
        return f" (did you mean {matches[unknown[0]]!r}?)"
    if matches:
        return f" (did you mean {', '.join(f'{k!r} -> {m!r}' for k, m in matches.items())}?)"
    return f"; known: {sorted(known)}" if len(known) <= 16 else ""


_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float), "bool": bool,
                                              "dict": dict, "list": list}


def check_value(where: str, f: dataclasses.Field, value: Any) -> None:
    """One field's value against its annotation (`int`, `float | None`, `list[str]`, ...) and its rules."""
    options = [a.strip() for a in str(f.type).split("|")]
    if value is None and "None" in options:
        return
    if "Any" not in options and not any(_is_a(value, option) for option in options):
        raise UserError(f"{where}: {f.name} must be {f.type}, got {type(value).__name__} {value!r}")
    rule = f.metadata
    if "choices" in rule and value not in rule["choices"]:
        raise UserError(f"{where}: {f.name} {value!r} is not one of {', '.join(map(str, rule['choices']))}")
    ge, gt, le = rule.get("ge"), rule.get("gt"), rule.get("le")
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
        raise UserError(f"{where}: {f.name} must be {_describe_range(ge, gt, le, f.type == 'int')}, got {value!r}")


def _is_a(value: Any, annotation: str) -> bool:
    expected = _TYPES.get(annotation.partition("[")[0])
    if expected is None or (isinstance(value, bool) and annotation in ("int", "float")):
        return False
    return isinstance(value, expected)


def _describe_range(ge: float | None, gt: float | None, le: float | None, integer: bool) -> str:
    if le is None:
        return f">= {ge}" if ge is not None else f"> {gt}"
    if ge is not None and integer:
        return f"{ge}-{le}"
    return f"in [{ge}, {le}]" if ge is not None else f"in ({gt}, {le}]"


# --------------------------------------------------------------------------------------------- the model

@dataclass
class ModelConfig(Config):
    """A ruGPT3 model: GPT-2 math (pre-LN, gelu_new, learned positions, tied output) plus sparse layers."""

    where: ClassVar[str] = "model config"

    n_layer: int = option(12, ge=1)
    """Number of transformer blocks."""
    n_embd: int = option(768, ge=1)
    """Hidden size; the MLP is always 4 × n_embd, as in the seed."""
    n_head: int = option(12, ge=1)
    """Attention heads; cannot be read off the weights, so seed checkpoints need it from a preset."""
    n_positions: int = option(2048, ge=1)
    """Learned absolute positions: the longest sequence the model can see."""
    vocab_size: int = option(50264, ge=1)
    """Embedding rows: 50257 (the tokenizer) or 50264 (padded to a multiple of 8 by the seed)."""
    embd_pdrop: float = option(0.1, ge=0, le=1)
    """Dropout after token + position embeddings (the seed's hidden dropout)."""
    attn_pdrop: float = option(0.1, ge=0, le=1)
    """Dropout on attention probabilities in dense layers (the seed's sparse layers have none)."""
    resid_pdrop: float = option(0.1, ge=0, le=1)
    """Dropout on each block's attention and MLP outputs."""
    layer_norm_epsilon: float = option(1e-5, gt=0)
    """LayerNorm eps of every LayerNorm."""
    sparse_mode: str = option("none", choices=SPARSE_MODES)
    """Which layers are block-sparse: none, all, alternating (even layer index), top_bottom (first half)."""
    sparse_attention: dict[str, Any] | None = None
    """DeepSpeed's `sparse_attention` JSON block (mode, block, ...; `seed` for random modes)."""

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"{self.where}: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.sparse_mode != "none" and not self.sparse_attention:
            raise UserError(f"{self.where}: sparse_mode {self.sparse_mode!r} needs a sparse_attention config")
        if self.sparse_attention is not None:  # a new dict with every default filled in: the caller's stays as it was
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


def check_preset(name: str) -> dict[str, Any]:
    """A preset's values; an unknown name is one error listing the known ones."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset's config, with any field overridden."""
    return ModelConfig.from_dict({**check_preset(name), **overrides}, where=f"preset {name}")


# --------------------------------------------------------------------------------------------- training

@dataclass
class LoraConfig(Config):
    """Low-rank adapters on a frozen base (HF peft): W x + (alpha / r) B A x on each target Linear."""

    where: ClassVar[str] = "lora"

    r: int = option(16, ge=1)
    """Rank of A (r x in) and B (out x r)."""
    alpha: float = option(32.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = option(0.05, ge=0, le=1)
    """Dropout on the adapter's input."""
    targets: list[str] = option(factory=lambda: list(LORA_TARGETS))
    """Layer names to adapt, among c_attn, c_proj (attention and MLP output), c_fc."""

    def check(self) -> None:
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise UserError(f"{self.where}: targets must be a non-empty list of {', '.join(LORA_TARGETS)}, "
                            f"got {self.targets!r}")


@dataclass
class TrainConfig(Config):
    """One training run. YAML recipes and `key=value` overrides on the command line use these names."""

    where: ClassVar[str] = "train config"

    name: str = "rugpt"
    """Run name; the run folder is storage_path/name, and re-running the same name resumes it."""
    storage_path: str = "runs"
    """Where runs live: a local folder, NFS, or s3://... on a cluster (shared by all nodes)."""
    preset: str | None = option("tiny", choices=tuple(PRESETS))
    """Model preset to start from (random init), unless init_from is given."""
    init_from: str | None = None
    """Checkpoint to start from: HF folder/hub id, seed Megatron/DeepSpeed files, or the native format."""
    model: dict[str, Any] = option(factory=dict)
    """ModelConfig fields to override (e.g. {sparse_mode: alternating}); heads etc. for seed checkpoints."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (default: $RUGPT_DATA/tokenizer)."""
    train_data: Any = None
    """Training text: file, folder, glob, file.list, a list of these, or a prepared-data folder; `.jsonl` files
    are conversations (TRL's `{"messages": [...]}`, one per line), trained on with the loss on assistant tokens."""
    valid_data: Any = None
    """Validation text or conversations, same forms; evaluation is skipped without it."""
    chat_template: str | None = None
    """For `.jsonl` conversations: a built-in template name or a .jinja file (default rugpt3-chat); saved with
    every checkpoint."""
    seq_len: int = option(256, ge=1)
    """Tokens per training sequence (≤ the model's n_positions)."""
    micro_batch: int = option(4, ge=1)
    """Sequences per worker per forward/backward."""
    grad_accum: int = option(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-5
    """The schedule never goes below this (the seed's --min-lr)."""
    warmup: float = option(0.01, ge=0)
    """Linear warmup: a fraction of max_steps when < 1, else a number of steps."""
    decay: str = option("cosine", choices=DECAY_STYLES)
    """After warmup: cosine, linear or constant (the seed's AnnealingLR styles)."""
    decay_steps: int | None = option(None, ge=1)
    """Steps the warmup fraction and the decay span (the seed's --lr-decay-iters); default: all steps."""
    weight_decay: float = option(0.01, ge=0)
    """AdamW weight decay; never applied to biases and LayerNorm parameters."""
    adam_beta1: float = option(0.9, ge=0, le=1)
    """AdamW beta1."""
    adam_beta2: float = option(0.95, ge=0, le=1)
    """AdamW beta2."""
    adam_eps: float = option(1e-8, gt=0)
    """AdamW eps."""
    grad_clip: float = option(1.0, ge=0)
    """Global gradient-norm clip; 0 disables it."""
    precision: str = option("fp32", choices=PRECISIONS)
    """fp32, bf16 or fp16 (fp16: dynamic loss scaling, GPU only)."""
    zero_stage: int = option(0, ge=0, le=3)
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """ZeRO optimizer state offload to CPU (DeepSpeedCPUAdam)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save memory."""
    log_interval: int = option(10, ge=1)
    """Steps between metric lines (and reports to Ray)."""
    log_level: str = option("info", choices=LOG_LEVELS)
    """info: one progress line per log interval (a bar on a terminal); debug: Ray Train's own lines too."""
    eval_interval: int = option(50, ge=1)
    """Steps between validation passes."""
    eval_iters: int = option(10, ge=1)
    """Validation micro-batches per worker per pass."""
    save_interval: int = option(100, ge=1)
    """Steps between checkpoints (a checkpoint is also written at the last step)."""
    max_steps: int | None = option(200, ge=1)
    """Optimizer steps to run; or give max_tokens."""
    max_tokens: int | None = option(None, ge=1)
    """Token budget; converted to steps with the global batch."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    num_workers: int = option(1, ge=1)
    """Ray Train workers (one DeepSpeed rank each)."""
    use_gpu: bool = False
    """One GPU per worker (nccl); CPU workers use gloo."""
    cpus_per_worker: float = option(0.5, gt=0)
    """CPUs reserved per worker; below 1 so Ray Data keeps CPUs to read with (2 workers on 2 cores)."""
    threads_per_worker: int | None = option(None, ge=1)
    """CPU workers' torch threads (default: the node's cores shared among this run's workers there)."""
    num_to_keep: int = option(2, ge=1)
    """Checkpoints kept (oldest deleted first)."""
    max_failures: int = option(0, ge=-1)
    """Worker-group restarts from the last checkpoint before the run fails (-1: no limit)."""
    max_nonfinite_steps: int = option(3, ge=1)
    """A step whose loss or gradient norm is not finite (bf16, fp32) is skipped and counted (`skipped_steps`);
    after this many in a row the run stops, its last checkpoint still the newest."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON (the seed's work as they are); its values win over the fields above."""
    lora: dict[str, Any] | None = None
    """LoraConfig fields (e.g. {r: 16, alpha: 32}): train adapters on the frozen init_from model; checkpoints
    then hold the adapter and the base's fingerprint only."""
    checkpoint_upload: str = option("async", choices=CHECKPOINT_UPLOADS)
    """async: a checkpoint is written locally and copied to storage_path while training goes on; sync: training
    waits for the copy."""

    def check(self) -> None:
        if self.lora_config() is not None and not self.init_from:
            raise UserError(f"{self.where}: lora needs init_from (the base model the adapters are trained on)")
        if self.max_steps is None and self.max_tokens is None:
            raise UserError(f"{self.where}: give max_steps or max_tokens")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise UserError(f"{self.where}: need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if self.precision == "fp16" and not self.use_gpu:
            raise UserError(f"{self.where}: precision fp16 (dynamic loss scaling) needs use_gpu=true; use bf16 or fp32")

    def lora_config(self) -> LoraConfig | None:
        """The `lora` mapping as a checked LoraConfig; None for full training."""
        return LoraConfig.from_dict(self.lora, where=f"{self.where}: lora") if self.lora is not None else None

    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all workers (the global batch)."""
        return self.micro_batch * self.grad_accum * self.num_workers * self.seq_len

    def total_steps(self) -> int:
        """max_steps, or max_tokens over the global batch."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.max_tokens / self.tokens_per_step()))


@dataclass(frozen=True)
class TrainPlan:
    """A training run checked before Ray starts: the config as it will run, the engine's DeepSpeed config and the
    model's settings."""

    config: TrainConfig
    """The user's config with the DeepSpeed JSON's values applied (they win), so logs show what runs."""
    deepspeed: dict[str, Any]
    """The DeepSpeed engine's config: the user's JSON (if any) with batch, precision, ZeRO and clipping filled in."""
    model: dict[str, Any] | None
    """The model's settings known before loading weights (None when only the checkpoint can tell)."""


def check_train_config(cfg: TrainConfig) -> TrainPlan:
    """Every check of a run that needs no Ray and no torch; `cfg` is left as it is."""
    user_ds, sparse = read_deepspeed_json(cfg.deepspeed_config, "deepspeed_config")
    cfg = dataclasses.replace(cfg, **deepspeed_json_values(user_ds))
    if cfg.train_data is None:
        raise UserError(f"{cfg.where}: train_data is missing (text files, a file.list, or a prepared folder)")
    if cfg.init_from and not Path(cfg.init_from).exists() and cfg.init_from.count("/") != 1:
        raise UserError(f"{cfg.where}: init_from {cfg.init_from}: no such file or folder")
    if cfg.init_from and Path(cfg.init_from).exists():  # Ray Train workers run in another folder
        cfg = dataclasses.replace(cfg, init_from=str(Path(cfg.init_from).resolve()))
    model = _model_values(cfg, sparse)
    if model and model.get("n_positions") and cfg.seq_len > model["n_positions"]:
        raise UserError(f"{cfg.where}: seq_len {cfg.seq_len} exceeds the model's n_positions {model['n_positions']}")
    return TrainPlan(cfg, deepspeed_engine_config(cfg, user_ds), model)


def _model_values(cfg: TrainConfig, sparse_from_json: dict[str, Any] | None) -> dict[str, Any] | None:
    overrides = dict(cfg.model)
    if sparse_from_json is not None:
        overrides.setdefault("sparse_attention", sparse_from_json)
        overrides.setdefault("sparse_mode", "all")  # the seed's --sparse-mode default
    if cfg.init_from:
        meta_file = Path(cfg.init_from) / "config.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            return {"n_positions": meta.get("model", meta).get("n_positions"), **overrides}
        return {**check_preset(cfg.preset), **overrides} if cfg.preset else None
    if cfg.preset is None:
        raise UserError(f"{cfg.where}: give a preset or init_from")
    values = {**check_preset(cfg.preset), **overrides}
    return ModelConfig.from_dict(values, where=f"model (preset {cfg.preset} + overrides)").to_dict()


# --------------------------------------------------------------------------------------------- DeepSpeed JSON

def read_deepspeed_json(path: str | None, what: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The seed's DeepSpeed JSON split into the rest and its `sparse_attention` block (DeepSpeed 0.19.8 rejects
    that key); a bare `sparse_attention` block is taken as one too. ({}, None) without a path."""
    if not path:
        return {}, None
    data = read_mapping(path, what, json.loads, json.JSONDecodeError, "JSON")
    if "sparse_attention" in data:
        rest = {k: v for k, v in data.items() if k != "sparse_attention"}
        return rest, data["sparse_attention"]
    if "mode" in data:  # a bare sparse_attention block
        return {}, data
    return data, None


def read_mapping(path: str, what: str, parse: Any, parse_error: type[Exception], kind: str) -> dict[str, Any]:
    """A JSON or YAML file that must hold a mapping; one line naming `what` and the file when it does not."""
    try:
        data = parse(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror}") from e
    except parse_error as e:
        raise UserError(f"{what} {path}: not valid {kind} ({' '.join(str(e).split())})") from e
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a mapping of keys to values")
    return data


def deepspeed_json_values(ds: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields a DeepSpeed JSON sets (its values win over the recipe's)."""
    values: dict[str, Any] = {}
    if "train_micro_batch_size_per_gpu" in ds:
        values["micro_batch"] = int(ds["train_micro_batch_size_per_gpu"])
    if "gradient_accumulation_steps" in ds:
        values["grad_accum"] = int(ds["gradient_accumulation_steps"])
    if "gradient_clipping" in ds:
        values["grad_clip"] = float(ds["gradient_clipping"])
    if ds.get("fp16", {}).get("enabled"):
        values["precision"] = "fp16"
    elif ds.get("bf16", {}).get("enabled"):
        values["precision"] = "bf16"
    elif "fp16" in ds or "bf16" in ds:
        values["precision"] = "fp32"
    zero = ds.get("zero_optimization", {})
    if "stage" in zero:
        values["zero_stage"] = int(zero["stage"])
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        values["offload_optimizer"] = True
    return values


def deepspeed_engine_config(cfg: TrainConfig, user: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine's config: the user's JSON (if any) with batch, precision, ZeRO and clipping filled in."""
    ds = json.loads(json.dumps(user or {}))
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    ds["gradient_clipping"] = cfg.grad_clip
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.precision == "fp16"}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.precision == "bf16"}
    zero = {**ds.get("zero_optimization", {}), "stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    ds["zero_optimization"] = zero
    for key in ("optimizer", "scheduler"):  # the platform owns these (AdamW groups, AnnealingLR)
        ds.pop(key, None)
    return ds


# --------------------------------------------------------------------------------------------- YAML and overrides

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
        values = read_mapping(path, "--config", lambda text: yaml.safe_load(text) or {}, yaml.YAMLError, "YAML")
    for key, value in parse_overrides(overrides or []).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML recipe plus command-line overrides, checked before anything starts."""
    values = read_config_values(path, overrides)
    for key in ("train_data", "valid_data", "tokenizer", "init_from", "deepspeed_config", "chat_template"):
        values[key] = expand_data_vars(values.get(key))
    return TrainConfig.from_dict({k: v for k, v in values.items() if v is not None or k in _NULLABLE},
                                 where=path or TrainConfig.where)


_NULLABLE = {"preset", "max_steps", "max_tokens"}


# --------------------------------------------------------------------------------------------- the shared data

def data_root() -> Path:
    """The shared data folder (tokenizer, corpus): `$RUGPT_DATA`, default ../shared/data."""
    return Path(os.environ.get("RUGPT_DATA", "../shared/data"))


def default_tokenizer() -> str:
    """The ruGPT3 tokenizer in the shared data folder: what every command uses when given none."""
    return str(data_root() / "tokenizer")


def expand_data_vars(value: Any) -> Any:
    """`$RUGPT_DATA` (default ../shared/data) and other environment variables in paths, lists of paths too."""
    if isinstance(value, list):
        return [expand_data_vars(v) for v in value]
    if not isinstance(value, str):
        return value
    env = {**os.environ, "RUGPT_DATA": str(data_root())}
    return string.Template(value).safe_substitute(env)
