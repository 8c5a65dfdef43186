"""LoRA adapters on a frozen ruGPT3 base: HF peft injected into the model's `nn.Linear` layers (dense and sparse
blocks alike, since attention itself is untouched), an adapter-only checkpoint format, and merging.

An adapter checkpoint is a folder `adapter/` inside a training checkpoint (or on its own):
- `adapter.safetensors`: the A and B matrices, keyed like `transformer.h.0.attn.c_attn.lora_A.weight`;
- `adapter.json`: `"format": "rugpt-ray-lora"`, the LoRA config, and the base: where it was loaded from, the
  `load_model` arguments that rebuild it, and its fingerprint (a SHA-256 of its weights), so that an adapter is
  never applied to a base other than the one it was trained on.

The API a server needs: `load_adapter` (config + weights + base reference), `base_fingerprint` once per base,
`check_base`, then `apply_adapter` and `remove_adapter` (several names on one base), with `adapter_per_row` to
run each row of a batch through its own adapter; or `merge_adapters`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rugpt_ray.checkpoints import (
    LORA_ADAPTER_FILE,
    atomic_folder,
    load_model,
    safe_load_file,
    saved_chat_template,
    write_chat_template,
)
from rugpt_ray.config import LoraConfig
from rugpt_ray.errors import UserError
from rugpt_ray.model import GPT

ADAPTER_FORMAT = "rugpt-ray-lora"
ADAPTER_DIR, CONFIG_FILE = LORA_ADAPTER_FILE.split("/")
WEIGHTS_FILE = "adapter.safetensors"
DEFAULT_NAME = "default"
NO_ADAPTER = "__base__"  # peft's name for "the base alone" in a mixed batch


@dataclass(frozen=True)
class BaseRef:
    """The frozen model an adapter belongs to."""

    source: str
    """init_from as the run gave it (a local path made absolute, or a hub id)."""
    load_args: dict[str, Any]
    """`load_model` keywords besides the source (preset, heads, sparse settings) that rebuild the same model."""
    fingerprint: str
    """`base_fingerprint` of the weights as loaded."""


@dataclass(frozen=True)
class Adapter:
    """One trained adapter, read from its checkpoint."""

    lora: LoraConfig
    base: BaseRef
    weights: dict[str, torch.Tensor]
    """A/B matrices without peft's adapter name: `transformer.h.0.attn.c_attn.lora_A.weight`."""
    path: Path
    chat_template: str | None = None
    """The chat template it was trained with (its `chat_template.jinja`); None for an adapter trained on text."""


# --------------------------------------------------------------------------------------------- the base

def base_fingerprint(model: GPT) -> str:
    """SHA-256 over the base's parameter names, dtypes, shapes and bytes (the sparse layout too; LoRA matrices
    and the tied output layer left out), so it is the same before and after adapters are added."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_base_tensors(model).items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def _base_tensors(model: GPT) -> dict[str, torch.Tensor]:
    return {name.replace(".base_layer.", "."): t for name, t in model.state_dict().items()
            if "lora_" not in name and name != "lm_head.weight"}


def base_reference(model: GPT, source: str, load_args: dict[str, Any]) -> BaseRef:
    """The reference an adapter trained on `model` (loaded from `source` with `load_args`) records."""
    local = Path(source).expanduser()
    return BaseRef(str(local.resolve()) if local.exists() else source, load_args, base_fingerprint(model))


def check_base(adapter: Adapter, fingerprint: str, base_name: str) -> None:
    """Refuse a base whose fingerprint is not the one the adapter was trained on."""
    if fingerprint != adapter.base.fingerprint:
        raise UserError(f"{adapter.path}: adapter was trained on {adapter.base.source} ({adapter.base.fingerprint[:19]}"
                        f"...), but {base_name} has other weights ({fingerprint[:19]}...); refusing to apply it")


def load_base(adapter: Adapter, source: str | None = None) -> GPT:
    """The adapter's base model, from where it was trained or from `source`; checked against the fingerprint."""
    source = source or adapter.base.source
    model = load_model(source, **adapter.base.load_args)
    check_base(adapter, base_fingerprint(model), source)
    return model


# --------------------------------------------------------------------------------------------- adapters in a model

def add_lora(model: GPT, lora: LoraConfig, name: str = DEFAULT_NAME) -> GPT:
    """Wrap the target Linears with LoRA (B = 0: the output is the base's until trained); only LoRA trains."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.targets), bias="none")
    training = model.training  # the new layers are built in training mode
    with warnings.catch_warnings():  # a second named adapter on one model is what serving does on purpose
        warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
        return inject_adapter_in_model(peft_cfg, model, adapter_name=name).train(training)


def adapter_state(model: GPT, name: str = DEFAULT_NAME) -> dict[str, torch.Tensor]:
    """The A/B matrices of adapter `name`, keyed without the name."""
    marker = f".{name}."
    return {key.replace(marker, "."): value for key, value in model.state_dict().items()
            if "lora_" in key and marker in key}


def apply_adapter(model: GPT, adapter: Adapter, name: str = DEFAULT_NAME) -> GPT:
    """Add `adapter` to `model` under `name` (several names can live on one base); check the base first with
    `check_base`."""
    add_lora(model, adapter.lora, name)
    expected = {key.replace(f".{name}.", "."): key for key in model.state_dict() if "lora_" in key
                and f".{name}." in key}
    if set(expected) != set(adapter.weights):
        missing, extra = sorted(set(expected) - set(adapter.weights)), sorted(set(adapter.weights) - set(expected))
        raise UserError(f"{adapter.path}: adapter weights do not fit the model: missing {missing[:3]}, "
                        f"unexpected {extra[:3]}")
    dtype = next(model.parameters()).dtype
    model.load_state_dict({expected[k]: v.to(dtype) for k, v in adapter.weights.items()}, strict=False)
    return model


def remove_adapter(model: GPT, name: str) -> GPT:
    """Take adapter `name` out of every layer that has it (the wrappers stay, for the other adapters)."""
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():  # peft's "active adapter" is not used: rows name their adapters
        warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted", UserWarning)
        for module in model.modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                module.delete_adapter(name)
    return model


@contextmanager
def adapter_per_row(model: GPT, names: list[str]) -> Iterator[None]:
    """Within the block, row i of every batch goes through adapter `names[i]` (`NO_ADAPTER`: the base alone):
    peft's mixed-batch forward, which groups the rows by adapter in each LoRA layer."""
    from peft.tuners.lora import LoraLayer

    def with_names(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    hooks = [module.register_forward_pre_hook(with_names, with_kwargs=True)
             for module in model.modules() if isinstance(module, LoraLayer)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def merge_adapters(model: GPT) -> GPT:
    """Fold every LoRA layer's active adapter into its Linear (W + alpha/r B A) and drop the wrappers: a plain GPT
    that any export writes."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model


# --------------------------------------------------------------------------------------------- checkpoints

def save_adapter(model: GPT, lora: LoraConfig, base: BaseRef, out: str | os.PathLike,
                 name: str = DEFAULT_NAME, chat_template: str | None = None) -> Path:
    """An adapter folder (written whole or not at all): its weights, config, base reference and chat template."""
    weights = {k: v.detach().float().contiguous().cpu() for k, v in adapter_state(model, name).items()}
    meta = {"format": ADAPTER_FORMAT, "version": 1, "lora": lora.to_dict(),
            "base": {"source": base.source, "load_args": base.load_args, "fingerprint": base.fingerprint},
            "model": model.config.to_dict()}
    with atomic_folder(out) as tmp:
        save_file(weights, tmp / WEIGHTS_FILE, metadata={"format": ADAPTER_FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        write_chat_template(tmp, chat_template)
    return Path(out)


def adapter_folder(path: str | os.PathLike) -> Path:
    """An adapter folder as it is, a step_* checkpoint's, or the newest checkpoint's of a LoRA run folder."""
    path = Path(path)
    for folder in (path, path / ADAPTER_DIR):
        if (folder / CONFIG_FILE).is_file():
            return folder
    steps = sorted(path.glob(f"step_*/{ADAPTER_DIR}/{CONFIG_FILE}"))
    if not steps:
        raise UserError(f"{path}: no LoRA adapter ({ADAPTER_DIR}/{CONFIG_FILE}) here or in step_* checkpoints")
    return steps[-1].parent


def load_adapter(path: str | os.PathLike) -> Adapter:
    """An adapter with its config and base reference (see `adapter_folder` for what `path` may be)."""
    folder = adapter_folder(path)
    meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{folder / CONFIG_FILE}: not a {ADAPTER_FORMAT} adapter (format {meta.get('format')!r})")
    lora = LoraConfig.from_dict(meta["lora"], where=f"{folder / CONFIG_FILE}: lora")
    return Adapter(lora, BaseRef(**meta["base"]), safe_load_file(folder / WEIGHTS_FILE), folder,
                   saved_chat_template(folder))


def merged_model(path: str | os.PathLike, base: str | None = None) -> GPT:
    """Base + adapter folded into one model: what `rugpt-ray export --merge` writes."""
    adapter = load_adapter(path)
    model = load_base(adapter, base)
    return merge_adapters(apply_adapter(model, adapter)).eval()
