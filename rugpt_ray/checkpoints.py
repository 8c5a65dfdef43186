"""Read every checkpoint the ruGPT3 family ships in, and write the project's own format and HF GPT-2.

Formats (ru-gpts-facts.md §3):
- `native`: `model.safetensors` + `config.json` with `"format": "rugpt-ray"` (model config incl. sparse
  settings; the sparse layout is a tensor in the safetensors file, so random layouts reload identically);
- `hf`: an HF GPT-2 folder (safetensors or bin, sharded or not) or a hub id;
- `megatron`: the seed's DeepSpeed/Megatron files (`mp_rank_00_model_states.pt` with key `module`,
  `iter_*/mp_rank_00/model_optim_rng.pt` with key `model`, `latest_checkpointed_iteration.txt`).
Heads and sparse settings cannot be read off seed weights: they come from a preset or the arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rugpt_ray.chat import CHAT_TEMPLATE_FILE
from rugpt_ray.config import CHECKPOINT_FORMATS, ModelConfig, check_preset
from rugpt_ray.errors import UserError, cause_line
from rugpt_ray.model import GPT
from rugpt_ray.storage import filesystem, is_uri, read_text, subfolders, write_file

NATIVE_FORMAT = "rugpt-ray"
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SHAPE_FIELDS = ("n_layer", "n_embd", "n_positions")
LORA_ADAPTER_FILE = "adapter/adapter.json"
"""What marks a LoRA training checkpoint (rugpt_ray.lora writes and reads the rest)."""
MEGATRON_NAMES = [
    (r"^word_embeddings\.", "transformer.wte."),
    (r"^position_embeddings\.", "transformer.wpe."),
    (r"^transformer\.final_layernorm\.", "transformer.ln_f."),
    (r"^transformer\.layers\.(\d+)\.input_layernorm\.", r"transformer.h.\1.ln_1."),
    (r"^transformer\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.h.\1.ln_2."),
    (r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.", r"transformer.h.\1.attn.c_attn."),
    (r"^transformer\.layers\.(\d+)\.attention\.dense\.", r"transformer.h.\1.attn.c_proj."),
    (r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"transformer.h.\1.mlp.c_fc."),
    (r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"transformer.h.\1.mlp.c_proj."),
]
MEGATRON_LAYOUT_KEY = re.compile(r"^transformer\.layers\.(\d+)\.attention\.sparse_self_attention\.master_layout$")
# numpy globals that the seed's client_state (np.random.get_state()) needs; data only, no code.
_NUMPY_SAFE = [
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType", "numpy.dtypes.Float64DType", "numpy.dtypes.Int64DType",
]


# --------------------------------------------------------------------------------------------- detection

def detect_format(path: Path) -> str:
    """Which reader a local path needs; a path that does not exist is treated as a hub id.

    `training` is a training run folder or one of its step_* checkpoints (native weights inside); `lora` is one
    of a LoRA run (an adapter and its base's reference inside: `rugpt_ray.lora` reads it).
    """
    if path.is_file():
        if path.suffix in (".pt", ".bin", ".pth"):
            return "megatron"
        raise UserError(f"{path}: unknown checkpoint file type (expected a folder, or a seed .pt file)")
    if not path.is_dir():
        return "hub"
    if (path / LORA_ADAPTER_FILE).is_file() or any(path.glob(f"step_*/{LORA_ADAPTER_FILE}")):
        return "lora"
    if (path / "model" / "config.json").is_file() or any(path.glob("step_*/model/config.json")):
        return "training"
    config = path / "config.json"
    if config.is_file():
        meta = _read_json(config)
        if meta.get("format") == NATIVE_FORMAT:
            return "native"
        if meta.get("model_type") == "gpt2" or "n_embd" in meta:
            return "hf"
        raise UserError(f"{config}: neither a rugpt-ray nor an HF GPT-2 config (model_type {meta.get('model_type')})")
    if (path / "latest_checkpointed_iteration.txt").is_file() or any(path.glob("mp_rank_*_model_states.pt")) \
            or any(path.glob("iter_*/mp_rank_*/model_optim_rng.pt")) or any(path.glob("*/mp_rank_*_model_states.pt")):
        return "megatron"
    raise UserError(f"{path}: no config.json, seed mp_rank_* files or latest_checkpointed_iteration.txt found")


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """A training checkpoint folder (step_*), which must be complete, or the newest complete one of a training run
    folder (`complete_checkpoint`); the weights are what is hashed, the other files only measured."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return Path(complete_checkpoint(str(path), hashed=_weights_only))
    if not any(path.glob("step_*/model/config.json")):
        raise UserError(f"{path}: neither a training checkpoint (model/config.json) nor a run folder with step_* ones")
    return Path(complete_checkpoint(str(path), hashed=_weights_only))


def _weights_only(name: str) -> bool:
    return name.startswith("model/")


def read_chat_template(path_or_hub_id: str | os.PathLike) -> str | None:
    """The chat template saved with a checkpoint `load_model` reads (a native or HF folder, a training run's newest
    checkpoint, a step_* one, a hub id), or None when it has none (the seed's files never do). An HF folder written
    before transformers kept it in its own file has it in tokenizer_config.json."""
    source = str(path_or_hub_id)
    if is_uri(source):
        with local_copy(source) as local:
            return read_chat_template(local)
    path = Path(source).expanduser()
    detected = detect_format(path)
    if detected == "lora":
        raise UserError(f"{source}: a LoRA adapter checkpoint; its chat template is rugpt_ray.lora.load_adapter's")
    if detected == "megatron":
        return None
    if detected == "hub":
        path = _download_hub(source)
    elif detected == "training":
        path = latest_checkpoint(path) / "model"
    if (saved := saved_chat_template(path)) is not None:
        return saved
    if (path / "tokenizer_config.json").is_file():
        template = _read_json(path / "tokenizer_config.json").get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from e


def safe_torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`, with numpy arrays allowed for the seed's saved RNG states."""
    import numpy  # noqa: F401  (the allowlisted globals must be importable)

    allowed = []
    for name in _NUMPY_SAFE:
        module, _, attr = name.rpartition(".")
        try:
            mod = __import__(module, fromlist=[attr])
            allowed.append(getattr(mod, attr))
        except (ImportError, AttributeError):
            continue
    with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
        warnings.simplefilter("ignore")  # numpy.core deprecation noise
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            unsafe = _unsafe_globals(path, e)
            if not unsafe:  # a truncated or corrupt file, not a refusal: what torch said
                raise UserError(f"{path}: cannot be read as a torch checkpoint ({_torch_said(e)})") from e
            raise UserError(f"{path}: refused: it needs arbitrary Python objects to load ({', '.join(unsafe)}), "
                            "and only weights_only=True loading is allowed; re-save its state dict alone") from e


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The globals outside the allowlist that `error` (torch's weights_only refusal) is about, or [] when it is not
    a refusal. A zip checkpoint is disassembled to list them; in the legacy format a truncated file can stop the
    unpickler inside a global's name ("Unsupported global: GLOBAL colle."), so a name counts only if it can name
    an object: dotted identifiers, the attribute present where its module imports here."""
    named = re.findall(r"Unsupported global: GLOBAL (\S+) was not an allowed global", str(error))
    if not named:
        return []
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the legacy (non-zip) format
        return [name for name in named if _names_a_global(name)]


def _names_a_global(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    if not module or not all(part.isidentifier() for part in name.split(".")):
        return False
    try:
        found = __import__(module, fromlist=[attr])
    except ImportError:
        return True  # a class of a package not installed here (the seed's megatron): still code, still refused
    return hasattr(found, attr)


def _torch_said(error: Exception) -> str:
    """torch's own words in one line: the unpickler's error alone where torch wraps it in weights_only advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    inner = re.search(r"WeightsUnpickler error: (.*?)(?:\n\n|$)", text, re.S)
    text = " ".join((inner.group(1) if inner else text).split())
    if isinstance(error, EOFError) and not text:
        text = "the file ends too early"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def safe_load_file(path: Path) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`, a damaged file (truncated, not safetensors) reported with what safetensors said
    and the file."""
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError (truncated, bad header) or OSError
        raise UserError(f"{path}: cannot be read as safetensors ({cause_line(e)})") from e


# --------------------------------------------------------------------------------------------- reading

def _hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    for index_name, reader in (("model.safetensors.index.json", safe_load_file),
                               ("pytorch_model.bin.index.json", safe_torch_load)):
        if (folder / index_name).is_file():
            shards = sorted(set(_read_json(folder / index_name)["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(reader(folder / shard))
            return sd
    if (folder / "model.safetensors").is_file():
        return safe_load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return safe_torch_load(folder / "pytorch_model.bin")
    raise UserError(f"{folder}: HF folder without model.safetensors or pytorch_model.bin")


def _from_hf(folder: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta = _read_json(folder / "config.json")
    act = meta.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: activation_function {act!r} is not the ruGPT3 gelu_new")
    if meta.get("n_inner") not in (None, 4 * meta["n_embd"]):
        raise UserError(f"{where}: n_inner {meta['n_inner']} is not 4 × n_embd")
    shape = {k: meta[k] for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")}
    shape.update({k: meta[k] for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "layer_norm_epsilon") if k in meta})
    sd = {}
    for key, value in _hf_state_dict(folder).items():
        key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied / HF's constant causal buffers
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        sd[key] = value
    return shape, sd


def _megatron_file(path: Path) -> Path:
    if path.is_file():
        return path
    if any(path.glob("mp_rank_0[1-9]*")) or any(path.glob("*/mp_rank_0[1-9]*")):
        raise UserError(f"{path}: model-parallel checkpoints (mp > 1) are not supported; merge them to mp=1 first")
    candidates = [path / "mp_rank_00_model_states.pt"]
    latest = path / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        it = latest.read_text().strip()
        candidates += [path / it / "mp_rank_00_model_states.pt", path / "release" / "mp_rank_00" / "model_optim_rng.pt"]
        if it.isdigit():
            candidates.append(path / f"iter_{int(it):07d}" / "mp_rank_00" / "model_optim_rng.pt")
    iters = sorted(path.glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    candidates += iters[-1:]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"{path}: none of the seed checkpoint files exist: {', '.join(str(c) for c in candidates)}")


def _from_megatron(path: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    file = _megatron_file(path)
    raw = safe_torch_load(file)
    if not isinstance(raw, dict):
        raise UserError(f"{file}: expected a dict, got {type(raw).__name__}")
    state = raw.get("model", raw.get("module"))
    if state is None:
        state = raw if "word_embeddings.weight" in raw else None
    if not isinstance(state, dict):
        raise UserError(f"{file}: no 'model' or 'module' state dict inside (keys: {sorted(raw)[:8]})")
    sd, layouts = {}, {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if m := MEGATRON_LAYOUT_KEY.match(key):
            layouts[int(m.group(1))] = value
            continue
        for pattern, repl in MEGATRON_NAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                sd[new] = value
                break
        else:
            raise UserError(f"{file}: unexpected key {key!r} (not a ruGPT3 Megatron parameter)")
    if "transformer.wte.weight" not in sd:
        raise UserError(f"{file}: no word_embeddings.weight")
    vocab, n_embd = sd["transformer.wte.weight"].shape
    n_layer = len({k.split(".")[2] for k in sd if k.startswith("transformer.h.")})
    shape = dict(n_layer=n_layer, n_embd=n_embd, n_positions=sd["transformer.wpe.weight"].shape[0], vocab_size=vocab)
    layout = None
    if layouts:
        first = next(iter(layouts.values()))
        if any(not torch.equal(first, t) for t in layouts.values()):
            raise UserError(f"{file}: sparse layers carry different layouts; one shared layout is supported")
        layout = first
    return shape, sd, layout


def _from_native(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta = _read_json(folder / "config.json")
    return meta["model"], safe_load_file(folder / "model.safetensors")


# --------------------------------------------------------------------------------------------- assembling

def _resize_vocab(sd: dict[str, torch.Tensor], rows: int) -> None:
    """50257 ↔ 50264 (the seed's issue #69): pad with zero rows or trim the padding rows."""
    wte = sd.get("transformer.wte.weight")
    if wte is None:
        return  # reported as a missing parameter by _load_state
    if wte.shape[0] < rows:
        sd["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(rows - wte.shape[0], wte.shape[1])])
    elif wte.shape[0] > rows:
        sd["transformer.wte.weight"] = wte[:rows]


def load_model(
    path_or_hub_id: str | os.PathLike,
    *,
    preset: str | None = None,
    sparse_config: dict[str, Any] | None = None,
    sparse_mode: str | None = None,
    n_head: int | None = None,
    vocab_size: int | None = None,
    fmt: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> GPT:
    """Load any supported checkpoint as a `GPT` (a local path, a hub id, or a URI such as s3://...); settings not
    stored in it come from `preset` or arguments."""
    source = str(path_or_hub_id)
    if is_uri(source):
        with local_copy(source) as local:
            return load_model(local, preset=preset, sparse_config=sparse_config, sparse_mode=sparse_mode,
                              n_head=n_head, vocab_size=vocab_size, fmt=fmt, device=device, dtype=dtype)
    path = Path(source).expanduser()
    if fmt not in CHECKPOINT_FORMATS:
        raise UserError(f"unknown checkpoint format {fmt!r}; known: {', '.join(CHECKPOINT_FORMATS)}")
    base: dict[str, Any] = check_preset(preset) if preset else {}
    detected = detect_format(path)
    if detected == "hub":  # an HF GPT-2 repo, or the seed's files as HF sberbank-ai/rugpt3xl holds them
        if fmt not in ("auto", "hf", "megatron"):
            raise UserError(f"{source}: no such file or folder")
        path = _download_hub(source)
        detected = detect_format(path)
    if detected == "lora":
        raise UserError(f"{source}: a LoRA adapter checkpoint, not full weights; write merged weights with "
                        "`rugpt-ray export --merge` (or load it with rugpt_ray.lora.merged_model)")
    if detected == "training":  # a run folder or step_* checkpoint: its consolidated native weights
        path, detected = latest_checkpoint(path) / "model", "native"
    if fmt != "auto" and fmt != detected:
        raise UserError(f"{source}: looks like a {detected} checkpoint, not {fmt}")

    layout = None
    if detected == "native":
        stored, sd = _from_native(path)
        layout = sd.pop("sparse_layout", None)
        values = {**stored}
    elif detected == "hf":
        shape, sd = _from_hf(path, source)
        values = {**base, **shape}
    else:
        shape, sd, layout = _from_megatron(path, source)
        values = {**base, **shape}
        if "n_head" not in values and n_head is None:
            raise UserError(f"{source}: the head count cannot be read off seed weights; give a preset or n_head")
    if preset and detected != "native":  # the weights decide shapes; a preset that disagrees is a mistake
        for name in SHAPE_FIELDS + (("n_head",) if detected == "hf" else ()):
            if base[name] != values[name]:
                raise UserError(f"{source}: checkpoint has {name}={values[name]}, preset {preset} has {base[name]}")
        values["vocab_size"] = base["vocab_size"]  # pad or trim the rows to the preset's (issue #69)
    overrides = dict(n_head=n_head, vocab_size=vocab_size, sparse_mode=sparse_mode, sparse_attention=sparse_config)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if sparse_config is not None and values.get("sparse_mode", "none") == "none":
        values["sparse_mode"] = "all"  # the seed's --sparse-mode default
    if values.get("sparse_mode") == "none":
        values["sparse_attention"] = None
    cfg = ModelConfig.from_dict(values, where=source)
    _resize_vocab(sd, cfg.vocab_size)

    model = GPT(cfg)
    if layout is not None and cfg.is_sparse and sparse_config is None:
        if layout.shape != model.sparse_layout.shape:
            raise UserError(f"{source}: stored layout {tuple(layout.shape)} does not fit "
                            f"{tuple(model.sparse_layout.shape)}")
        sd["sparse_layout"] = layout.bool()
    elif cfg.is_sparse:
        sd["sparse_layout"] = model.sparse_layout
    _load_state(model, sd, source)
    return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


def _load_state(model: GPT, sd: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source}: missing {missing[:4]} / unexpected {unexpected[:4]} parameters")
    for key, value in sd.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, the model needs "
                            f"{tuple(expected[key].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=False)


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local copy of what `load_model` reads behind a URI (s3://..., gs://...), deleted after: a run folder's
    newest complete checkpoint's weights, a step_* checkpoint's (which must be complete), or a whole model folder."""
    import pyarrow.fs as pafs

    uri = uri.rstrip("/")
    tmp = tempfile.mkdtemp(prefix="rugpt-fetch-")
    try:
        if subfolders(uri, "step_*") or subfolders(uri, "model"):
            uri = f"{complete_checkpoint(uri, hashed=_weights_only)}/model"
        fs, inner = filesystem(uri)
        if fs.get_file_info(inner).type != pafs.FileType.Directory:
            raise UserError(f"{uri}: no such folder")
        pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    except OSError as e:  # a missing bucket, refused credentials, an unreachable endpoint
        raise UserError(f"{uri}: cannot be read: {cause_line(e)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_hub(hub_id: str) -> Path:
    if hub_id.count("/") != 1 or hub_id.startswith(("/", ".", "~")):
        raise UserError(f"{hub_id}: no such file or folder (and not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt",
                                                                    "*.jinja", "mp_rank_*_model_states.pt"]))
    except Exception as e:  # offline, unknown or gated repo, full disk: one line that keeps the cause
        raise UserError(f"{hub_id}: no such local path, and the HF hub download failed: {cause_line(e)}") from e


# --------------------------------------------------------------------------------------------- integrity

MANIFEST_FILE = "manifest.json"
"""A training checkpoint's commit marker, written last: every file's size and SHA-256. A step_* folder without it
(a save cut short) or with a file that differs from it (truncated, flipped) is never loaded."""
_PART_FILE = "manifest.{token}.rank{rank}.json"  # one worker's files, written last by it; rank 0 merges them
_CHUNK = 8 << 20


def upload_checkpoint(local: Path, dest: str, rank: int, world: int, token: str, *,
                      after_file: Callable[[int | str], None] | None = None, wait_s: float = 3600.0) -> None:
    """Copy one worker's part of a training checkpoint to `dest` (a local folder or a URI) file by file, hashing
    as it copies, then that worker's list of files; rank 0 waits for every other worker's list (named by this
    save's `token`, the same on every worker: a list left by an earlier attempt at the same step is not taken)
    and writes the manifest last. `after_file` (the tests' kill seam) is called with the number of files copied,
    from 0, and with "commit" once the list or the manifest is written."""
    import pyarrow.fs as pafs

    fs, root = filesystem(dest)
    if rank == 0 and fs.get_file_info(f"{root}/{MANIFEST_FILE}").type == pafs.FileType.File:
        fs.delete_file(f"{root}/{MANIFEST_FILE}")  # an earlier attempt's: this one is not complete yet
    after_file = after_file or (lambda copied: None)
    after_file(0)
    digests = {}
    for k, path in enumerate(sorted(p for p in local.rglob("*") if p.is_file()), 1):
        name = path.relative_to(local).as_posix()
        digests[name] = _copy_hashed(path, fs, f"{root}/{name}")
        after_file(k)
    if rank != 0:
        write_file(f"{dest}/{_PART_FILE.format(token=token, rank=rank)}", json.dumps(digests))
        after_file("commit")
        return
    parts = [f"{dest}/{_PART_FILE.format(token=token, rank=other)}" for other in range(1, world)]
    for part in parts:
        for name, digest in _wait_for(part, wait_s).items():
            if digests.setdefault(name, digest) != digest:
                raise RuntimeError(f"checkpoint {dest}: two workers wrote {name} with different contents")
    write_file(f"{dest}/{MANIFEST_FILE}", json.dumps({"files": dict(sorted(digests.items()))}, indent=1) + "\n")
    after_file("commit")
    for part in parts:
        fs.delete_file(filesystem(part)[1])


def new_save_token() -> str:
    """A fresh name for one save's worker lists (`upload_checkpoint`); rank 0 draws it and broadcasts it."""
    return uuid.uuid4().hex[:12]


def write_manifest(folder: str | os.PathLike) -> None:
    """The manifest of a checkpoint folder written in one place (all workers' files already there): what
    `upload_checkpoint` leaves, for folders put together by hand."""
    import pyarrow.fs as pafs

    fs, root = filesystem(str(folder))
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    digests = {posixpath.relpath(e.path, root): _digest(fs, e.path) for e in entries
               if e.type == pafs.FileType.File and posixpath.basename(e.path) != MANIFEST_FILE}
    write_file(f"{str(folder).rstrip('/')}/{MANIFEST_FILE}",
               json.dumps({"files": dict(sorted(digests.items()))}, indent=1) + "\n")


def _read_hashed(stream, sink=None) -> dict[str, Any]:
    """A manifest entry (size and SHA-256) of what `stream` holds, read once; each chunk also goes to `sink`."""
    sha, size = hashlib.sha256(), 0
    while chunk := stream.read(_CHUNK):
        sha.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def _copy_hashed(src: Path, fs, dest: str) -> dict[str, Any]:
    fs.create_dir(posixpath.dirname(dest), recursive=True)
    with src.open("rb") as f, fs.open_output_stream(dest) as out:
        return _read_hashed(f, out)


def _digest(fs, path: str) -> dict[str, Any]:
    with fs.open_input_stream(path) as f:
        return _read_hashed(f)


def _wait_for(path: str, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    while (text := read_text(path)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: a worker's part of the checkpoint did not arrive within {wait_s:.0f} s")
        time.sleep(0.1)
    return json.loads(text)


def checkpoint_problem(folder: str, hashed: Callable[[str], bool] = lambda name: True) -> str | None:
    """What makes a training checkpoint (local or a URI) incomplete or corrupt, naming the file; None when its
    manifest is there and every file in it has its size and, where `hashed` says so, its SHA-256."""
    import pyarrow.fs as pafs

    text = read_text(f"{folder.rstrip('/')}/{MANIFEST_FILE}")
    if text is None:
        return f"{MANIFEST_FILE} is missing: the save did not finish"
    try:
        files = json.loads(text)["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is not a manifest"
    fs, root = filesystem(folder)
    infos = fs.get_file_info([f"{root}/{name}" for name in files])
    for (name, want), info in zip(files.items(), infos, strict=True):
        if info.type != pafs.FileType.File:
            return f"{name} is missing"
        if info.size != want["size"]:
            return f"{name} has {info.size} bytes, the manifest says {want['size']}"
        if hashed(name) and _digest(fs, info.path)["sha256"] != want["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def complete_checkpoint(path: str, hashed: Callable[[str], bool] = lambda name: True,
                        newest: str | None = None) -> str:
    """A complete checkpoint: `path` itself when it is a step_* folder (an error saying what is wrong when it is
    not complete), or the newest complete step_* of the run folder `path` (no newer than `newest`, a step_* name),
    with one warning per newer one skipped, naming it and its bad file."""
    path = path.rstrip("/")
    steps = [name for name in subfolders(path, "step_*") if newest is None or name <= newest]
    if not steps:
        problem = checkpoint_problem(path, hashed)
        if problem is not None:
            raise UserError(f"{path}: incomplete or corrupt checkpoint: {problem}")
        return path
    for name in reversed(steps):
        problem = checkpoint_problem(f"{path}/{name}", hashed)
        if problem is None:
            return f"{path}/{name}"
        warnings.warn(f"{path}/{name}: skipped, incomplete or corrupt: {problem}", stacklevel=2)
    raise UserError(f"{path}: no complete checkpoint among {', '.join(steps)}")


# --------------------------------------------------------------------------------------------- writing

@contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A sibling temp folder to write into, renamed to `out` at the end: a reader never sees half a checkpoint."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not empty; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def saved_chat_template(folder: Path) -> str | None:
    """The template `write_chat_template` left in a model or adapter folder, or None."""
    path = folder / CHAT_TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def write_chat_template(folder: Path, chat_template: str | None) -> None:
    """The template a model was trained with, beside its weights (nothing without one)."""
    if chat_template is not None:
        (folder / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")


def save_native(model: GPT, out: str | os.PathLike, chat_template: str | None = None) -> Path:
    """The project's format: safetensors weights (+ the sparse layout), a JSON config and the chat template."""
    with atomic_folder(out) as tmp:
        write_chat_template(tmp, chat_template)
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, tmp / "model.safetensors", metadata={"format": NATIVE_FORMAT})
        meta = {"format": NATIVE_FORMAT, "version": 1, "model": model.config.to_dict(),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return Path(out)


def export_hf(model: GPT, out: str | os.PathLike, *, allow_dense: bool = False,
              tokenizer_folder: str | os.PathLike | None = None, chat_template: str | None = None) -> Path:
    """HF GPT-2 folder that stock `GPT2LMHeadModel.from_pretrained` loads with the same logits (dense models); the
    chat template as `chat_template.jinja`, where transformers' tokenizer (and vLLM) read it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    if cfg.is_sparse and not allow_dense:
        raise UserError("refusing to export a sparse model to HF GPT-2: HF has no block-sparse layers, so "
                        "the result would attend densely and differ beyond the first local window; "
                        "pass --allow-dense to export it anyway")
    hf_cfg = GPT2Config(  # n_ctx as the hub's GPT-2 configs have it: llama.cpp's GGUF converter reads it
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_ctx=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", layer_norm_epsilon=cfg.layer_norm_epsilon,
        embd_pdrop=cfg.embd_pdrop, attn_pdrop=cfg.attn_pdrop, resid_pdrop=cfg.resid_pdrop,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    with atomic_folder(out) as tmp:
        sd = {}
        for key, value in model.state_dict().items():
            if key == "sparse_layout":
                continue
            value = value.detach().float().cpu()
            sd[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
        hf = GPT2LMHeadModel(hf_cfg)
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        if unexpected or [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]:
            raise RuntimeError(f"HF export mapping is incomplete: missing {missing}, unexpected {unexpected}")
        hf.save_pretrained(tmp)
        write_chat_template(tmp, chat_template)
        if tokenizer_folder is not None:
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(Path(tokenizer_folder) / name, tmp / name)
            special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
            (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, **special}, indent=2) + "\n")
    return Path(out)
