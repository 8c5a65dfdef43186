"""Training: a Ray Train `TorchTrainer` whose workers each run a DeepSpeed engine on the ruGPT3 model.

Driver: check the config (one clear error before Ray starts), prepare the data cache, build the trainer, fit.
Worker: build the model, AdamW without decay on biases/LayerNorm, the seed's AnnealingLR, DeepSpeed
(gloo on CPU, nccl on GPU); every `save_interval` each rank saves its DeepSpeed shards, rank 0 adds the
consolidated weights in the native format (so export needs no DeepSpeed), and the step is reported with
`ray.train.report(..., checkpoint=...)`. Re-running the same name resumes from the last checkpoint with
optimizer, schedule, RNG and data position restored.

Chat data carries a loss mask: training and validation losses are then the token mean over the assistant tokens of
every micro-batch on every worker, and the chat template is saved with each checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rugpt_ray.config import ModelConfig, TrainConfig, TrainPlan, check_train_config, default_tokenizer
from rugpt_ray.errors import UserError
from rugpt_ray.progress import follow_progress, quiet_ray
from rugpt_ray.ray_start import start_ray
from rugpt_ray.storage import check_writable, filesystem, is_uri, query_last, read_text, write_file

if TYPE_CHECKING:
    from rugpt_ray.lora import BaseRef

CHECKPOINT_TAG = "deepspeed"
STATE_FILE = "train_state.json"
METRICS_FILE = "metrics.jsonl"
TRACE_ENV = "RUGPT_TRAIN_TRACE"
"""Test-only: a folder where every rank appends one JSON line per step it runs (fingerprints of its batches and of
the torch RNG state before and after, lr, losses, data position), so that tests can compare a resumed run with an
uninterrupted one. Unset (always, for users): nothing is written."""
NAN_ENV = "RUGPT_TRAIN_NAN_STEPS"
"""Test-only: comma-separated steps at which rank 0 multiplies its loss by NaN (a real non-finite loss and
gradients, for the skip-and-stop handling). Unset (always, for users): nothing changes."""
KILL_ENV = "RUGPT_CHECKPOINT_KILL"
"""Test-only: `STEP:RANK:K` makes that worker SIGKILL itself inside the save of that step once it has copied K
files to storage (0: before the first), or with K `commit` once its list of files
(rank 0: the manifest) is written. Unset (always, for users): nothing happens."""
# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; the first name found in the device name wins.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


# --------------------------------------------------------------------------------------------- schedule

def lr_at(step: int, cfg: TrainConfig, steps: int) -> float:
    """The seed's AnnealingLR: linear warmup, then decay over `decay_steps` (not minus warmup), floor at min_lr."""
    span = cfg.decay_steps or steps
    warmup = cfg.warmup * span if cfg.warmup < 1 else cfg.warmup
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (min(step, span - warmup) - warmup) / span
    if cfg.decay == "cosine":
        lr = cfg.lr / 2 * (math.cos(math.pi * progress) + 1)
    elif cfg.decay == "linear":
        lr = cfg.lr * (1 - progress)
    else:
        lr = cfg.lr
    return max(lr, cfg.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm parameters (the seed's rule); frozen parameters left out, and a
    group left empty (LoRA's are all matrices) dropped, as ZeRO drops it and the schedule must see the same groups."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or ".ln_" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


# --------------------------------------------------------------------------------------------- worker

@dataclass
class TrainState:
    """What a checkpoint restores besides weights, optimizer and schedule."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    """Steps not applied because their loss or gradient norm was not finite (fp16 overflows are the loss
    scaler's and not counted)."""


def base_load_args(cfg: TrainConfig, model_values: dict[str, Any] | None) -> dict[str, Any]:
    """`load_model` keywords for init_from besides the path: what the run's preset and overrides say."""
    return dict(preset=cfg.preset, n_head=cfg.model.get("n_head"), vocab_size=cfg.model.get("vocab_size"),
                sparse_mode=(model_values or {}).get("sparse_mode"),
                sparse_config=(model_values or {}).get("sparse_attention"))


def _build_model(cfg: TrainConfig, model_values: dict[str, Any] | None):
    from rugpt_ray.checkpoints import load_model
    from rugpt_ray.model import GPT

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if cfg.init_from:
        model = load_model(cfg.init_from, **base_load_args(cfg, model_values))
        if cfg.seq_len > model.config.n_positions:
            raise UserError(f"seq_len {cfg.seq_len} exceeds {cfg.init_from}'s n_positions {model.config.n_positions}")
        return model.train()
    return GPT(ModelConfig.from_dict(model_values)).train()


def _add_lora(model, cfg: TrainConfig, model_values: dict[str, Any] | None) -> BaseRef:
    """Freeze the init_from model and add the recipe's adapters; the base's reference for the checkpoints."""
    from rugpt_ray.lora import add_lora, base_reference

    base = base_reference(model, cfg.init_from, base_load_args(cfg, model_values))
    add_lora(model, cfg.lora_config())
    model.register_state_dict_post_hook(_adapter_only)
    return base


def _adapter_only(module, state_dict: dict[str, torch.Tensor], prefix: str, local_metadata) -> None:
    """A LoRA run's state dict (what DeepSpeed's checkpoint holds) is the adapter alone: DeepSpeed's
    exclude_frozen_parameters keeps the tied output layer (a second name of the frozen embedding) and buffers."""
    for key in [k for k in state_dict if k.startswith(prefix) and "lora_" not in k]:
        del state_dict[key]


def flops_per_token(model_cfg: ModelConfig, params: int, seq_len: int) -> float:
    return 6 * params + 12 * model_cfg.n_layer * model_cfg.n_embd * seq_len


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _all_reduce_mean(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def masked_targets(tokens: torch.Tensor, pad_id: int, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for tokens[:, :-1]; padding (all-pad rows, the pad after packed conversations) predicts nothing, and
    with a loss mask (chat data) neither does any token it leaves out."""
    targets = tokens[:, 1:].clone()
    targets[targets == pad_id] = -100
    if loss_mask is not None:
        targets[loss_mask[:, 1:] == 0] = -100
    return targets


def micro_step(engine, tokens: torch.Tensor, pad_id: int, loss_mask: torch.Tensor | None = None,
               weight: float = 1.0) -> torch.Tensor:
    """One micro-batch's forward, backward and (at the accumulation boundary) optimizer step: what every worker
    runs, and what benchmarks/gpu_suite.py times. The loss is a mean over the micro-batch's targets, times `weight`
    (`token_mean_weights`); that is what is returned."""
    _, loss = engine(tokens[:, :-1], targets=masked_targets(tokens, pad_id, loss_mask))
    loss = loss * weight
    engine.backward(loss)
    engine.step()
    return loss


def token_mean_weights(micro_batches: list[tuple[torch.Tensor, torch.Tensor | None]], pad_id: int, world: int,
                       device) -> list[float]:
    """Loss weights that make one step's gradient the token mean over the targets of all its micro-batches on all
    workers. Each micro-batch's loss is a mean over its own targets and DeepSpeed averages micro-batches and
    workers, which weighs every micro-batch alike; chat micro-batches hold very different numbers of assistant
    tokens, so each is weighted by its share: its targets x micro-batches x workers / the step's targets."""
    counts = [int((masked_targets(tokens, pad_id, mask) != -100).sum()) for tokens, mask in micro_batches]
    total = _all_reduce_mean([float(sum(counts))], device)[0] * world
    return [count * len(counts) * world / max(total, 1.0) for count in counts]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker."""
    import ray.train

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's API use
    cfg = TrainConfig.from_dict(config["train"])
    if cfg.log_level != "debug":  # Ray Train logs every report at INFO through the root logger, a repr per line
        logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if not cfg.use_gpu:  # Ray pins fractional-CPU workers to 1 thread; share the node's cores among its workers
        torch.set_num_threads(cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    steps, pad_id, run_dir = config["steps"], config["pad_id"], config["run_dir"]
    chat_template = config["chat_template"]  # None: text, no loss mask
    model = _build_model(cfg, config["model"])
    base = _add_lora(model, cfg, config["model"]) if cfg.lora is not None else None  # None: all weights train
    model.activation_checkpointing = cfg.activation_checkpointing
    engine = build_engine(model, cfg, config["deepspeed"], steps)
    device = engine.device
    state = TrainState()
    checkpoint = _complete_checkpoint(ray.train.get_checkpoint(), run_dir, rank)
    if checkpoint is None and config["start_from"]:  # a new run from a copied checkpoint (a PBT exploit)
        fs, inner = filesystem(config["start_from"])
        checkpoint = ray.train.Checkpoint(path=inner, filesystem=fs)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if base is not None:
                from rugpt_ray.lora import check_base, load_adapter

                check_base(load_adapter(folder), base.fingerprint, cfg.init_from)
            _, client = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG, load_module_strict=base is None)
        state = TrainState(**client["state"])
        torch.set_rng_state(client["torch_rng"])
        take_hyperparameters(engine, cfg, steps)
        if rank == 0:
            print(f"resumed from step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})", flush=True)
    log = _MetricsLog(run_dir if rank == 0 else None, resume_step=state.step)

    train_shard = ray.train.get_dataset_shard("train")
    valid_batches = _valid_batches(config["valid_blocks"], config["valid_mask"], cfg.micro_batch, rank,
                                   ctx.get_world_size(), pad_id)
    batches = _train_batches(train_shard, cfg, state)
    model_cfg = engine.module.config
    flops = flops_per_token(model_cfg, engine.module.num_params(), cfg.seq_len)
    peak = _peak_flops()
    window_loss, window_tokens, started = [], 0, time.perf_counter()
    checkpoint_s = None  # how long the last checkpoint held training up, logged with the window it fell in
    trace = _StepTrace.open(rank)  # None unless a test asks for it
    poisoned = _nan_steps() if rank == 0 else set()
    nonfinite_run = 0  # non-finite steps in a row
    while state.step < steps:
        engine.train()
        rng_before = torch.get_rng_state() if trace is not None else None
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        weights = (token_mean_weights(micro, pad_id, ctx.get_world_size(), device) if chat_template is not None
                   else [1.0] * len(micro))
        if state.step + 1 in poisoned:
            weights = [w * float("nan") for w in weights]
        skipped_before, losses = engine.skipped_steps, []
        for (tokens, mask), weight in zip(micro, weights, strict=True):
            loss = micro_step(engine, tokens.to(device), pad_id, None if mask is None else mask.to(device), weight)
            losses.append(loss.item())
            window_tokens += tokens[:, :-1].numel()
        state.step += 1
        # a non-finite loss on any worker makes every worker's (averaged) gradients non-finite, and every optimizer
        # the engine runs then skips the step alike: the workers agree without another collective
        if engine.skipped_steps > skipped_before and cfg.precision != "fp16":
            state.skipped_steps += 1
            nonfinite_run += 1
        else:
            window_loss.extend(losses)
            nonfinite_run = 0
        if trace is not None:
            trace.write(state, micro, rng_before, engine.lr_scheduler.get_last_lr()[0], losses)
        last = state.step == steps
        metrics: dict[str, Any] = {}
        if state.step % cfg.log_interval == 0 or last:
            elapsed = time.perf_counter() - started
            loss_mean, tok_s = _all_reduce_mean([sum(window_loss) / len(window_loss) if window_loss else math.nan,
                                                 window_tokens / elapsed], device)
            tok_s *= ctx.get_world_size()
            state.tokens += int(window_tokens * ctx.get_world_size())
            metrics.update(step=state.step, loss=loss_mean, ppl=math.exp(min(loss_mean, 30)),
                           lr=engine.lr_scheduler.get_last_lr()[0], **_grad_norm(engine), tokens=state.tokens,
                           tokens_per_s=tok_s, skipped_steps=state.skipped_steps)
            if engine.fp16_enabled():
                metrics["loss_scale"] = float(engine.optimizer.cur_scale)
            if peak:
                metrics["mfu"] = tok_s * flops / (peak * ctx.get_world_size())
            if checkpoint_s is not None:
                metrics["checkpoint_s"], checkpoint_s = checkpoint_s, None
            window_loss, window_tokens, started = [], 0, time.perf_counter()
        if nonfinite_run >= cfg.max_nonfinite_steps:  # stop before any checkpoint: the last good one stays newest
            stop = {"step": state.step, "skipped_steps": state.skipped_steps, "stopped_nonfinite": nonfinite_run}
            ray.train.report(stop)
            log.write(stop)
            return
        if valid_batches is not None and (state.step % cfg.eval_interval == 0 or last):
            metrics.update(_evaluate(engine, valid_batches, pad_id), step=state.step)
        if state.step % cfg.save_interval == 0 or last:
            saving = time.perf_counter()
            _save(engine, state, metrics, cfg, base, chat_template, run_dir)
            checkpoint_s = time.perf_counter() - saving
        elif metrics:
            ray.train.report(metrics)
        if metrics:
            log.write(metrics)


def _nan_steps() -> set[int]:
    return {int(step) for step in os.environ.get(NAN_ENV, "").split(",") if step.strip()}


def build_engine(model: torch.nn.Module, cfg: TrainConfig, deepspeed_config: dict[str, Any], steps: int):
    """The DeepSpeed engine of one worker: `build_optimizer`'s optimizer with the seed's schedule over `steps`.
    The process group must exist (Ray Train's, or a test's)."""
    import deepspeed
    import deepspeed.ops

    # On the CPU accelerator, DeepSpeed's torch backend loads its shared-memory all-reduce op at every engine start:
    # a JIT compile of 30-95 s wherever the extensions cache is empty, and again whenever a process with other build
    # flags invalidated it. Only inference_all_reduce uses the op; training all-reduces go through torch.distributed.
    # An op marked incompatible is not built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    optimizer = build_optimizer(model, cfg)
    if isinstance(optimizer, CheckedAdamW):  # it clips itself: DeepSpeed's clip would discard the norm
        deepspeed_config = {**deepspeed_config, "gradient_clipping": 0.0}
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, steps) / cfg.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config, dist_init_required=False)
    return engine


def take_hyperparameters(engine, cfg: TrainConfig, steps: int) -> None:
    """A resumed run trains with its config's lr peak and weight decay, not the checkpoint's (which loading the
    optimizer and schedule restored): a PBT exploit resumes a copy of another trial's checkpoint with perturbed
    values. The schedule goes on at the checkpoint's step with the new peak: lr = lr_at(step, cfg)."""
    schedule = engine.lr_scheduler
    lr = lr_at(schedule.last_epoch, cfg, steps)
    schedule.base_lrs = [cfg.lr] * len(schedule.base_lrs)
    schedule._last_lr = [lr] * len(schedule.base_lrs)
    wanted = param_groups(engine.module, cfg.weight_decay)
    for group, want in zip(engine.optimizer.param_groups, wanted, strict=True):
        group.update(lr=lr, initial_lr=cfg.lr, weight_decay=want["weight_decay"])


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, adamw_mode=True)
    if cfg.zero_stage == 0 and cfg.precision == "fp32":  # DeepSpeed steps this optimizer as it is
        return CheckedAdamW(groups, max_norm=cfg.grad_clip, lr=cfg.lr, betas=betas, eps=cfg.adam_eps,
                            fused=cfg.use_gpu or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, fused=cfg.use_gpu or None)


class CheckedAdamW(torch.optim.AdamW):
    """AdamW that clips the gradients itself and skips a step whose gradient norm is not finite, telling DeepSpeed
    through the attributes its own optimizers have (`_global_grad_norm`, `overflow`: the engine then counts the step
    in `skipped_steps` and does not advance the LR schedule). With ZeRO stage 0 in fp32 DeepSpeed steps a torch
    optimizer directly: it computes no gradient norm (the metrics said `grad_norm nan`) and would apply NaN
    gradients. The gradients are whole and already averaged over the workers there, so the norm is global."""

    def __init__(self, params, *, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self._global_grad_norm = float("nan")
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, self.max_norm or float("inf"), foreach=None)
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        return super().step(closure)


def _grad_norm(engine) -> dict[str, float]:
    """DeepSpeed's global gradient norm of the last step, as a metric; none where the engine has none (ZeRO 1/2 with
    its norm computation turned off): a made-up nan would read as exploding gradients."""
    norm = engine.get_global_grad_norm()
    return {} if norm is None else {"grad_norm": float(norm)}


def _train_batches(shard, cfg: TrainConfig, state: TrainState):
    """Micro-batches (ids, and the loss mask of chat data) forever, epoch after epoch; skips what a resumed run
    already consumed in its epoch."""
    from rugpt_ray.data.cache import MASK_COLUMN

    while True:
        skip = state.batches_in_epoch
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=cfg.micro_batch, dtypes=torch.long)):
            if i < skip:
                continue
            state.batches_in_epoch = i + 1
            yield batch["input_ids"], batch.get(MASK_COLUMN)
        state.epoch += 1
        state.batches_in_epoch = 0


def _valid_batches(blocks, masks, micro_batch: int, rank: int, world: int,
                   pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
    """This rank's share of the validation blocks the driver read (and of their loss masks), in micro-batches."""
    from rugpt_ray.data import rank_rows

    if blocks is None:
        return None
    rows = torch.from_numpy(rank_rows(blocks, rank, world, pad_id).astype("int64")).split(micro_batch)
    if masks is None:
        return [(tokens, None) for tokens in rows]
    mask_rows = torch.from_numpy(rank_rows(masks, rank, world, 0).astype("int64")).split(micro_batch)
    return list(zip(rows, mask_rows, strict=True))


@torch.no_grad()
def _evaluate(engine, batches: list[tuple[torch.Tensor, torch.Tensor | None]], pad_id: int) -> dict[str, float]:
    """Token-mean validation loss over every worker's batches (over the tokens their loss masks keep)."""
    import torch.nn.functional as F

    engine.eval()
    total, count = 0.0, 0
    for tokens, mask in batches:
        tokens = tokens.to(engine.device)
        logits, _ = engine(tokens[:, :-1])
        targets = masked_targets(tokens, pad_id, None if mask is None else mask.to(engine.device))
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((targets != -100).sum())
    total, count = _all_reduce_mean([total, count], engine.device)
    loss = total / max(count, 1)
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 30))}


def _complete_checkpoint(checkpoint, run_dir: str, rank: int):
    """What to resume from when Ray has a checkpoint: the run folder's newest complete one (`complete_checkpoint`:
    Ray's own, or a newer one whose save finished after Ray last recorded one; an incomplete or corrupt newer one is
    skipped with a warning from rank 0)."""
    from ray.train import Checkpoint

    from rugpt_ray.checkpoints import complete_checkpoint

    if checkpoint is None:
        return None
    with warnings.catch_warnings():
        if rank != 0:
            warnings.simplefilter("ignore")
        fs, inner = filesystem(complete_checkpoint(run_dir))
    return Checkpoint(path=inner, filesystem=fs)


def _save(engine, state: TrainState, metrics: dict[str, Any], cfg: TrainConfig, base: BaseRef | None,
          chat_template: str | None, run_dir: str) -> None:
    """Every rank writes its DeepSpeed shards; rank 0 adds the native weights, or for LoRA the adapter with its
    base's reference (the frozen base is left out everywhere), and the chat template. Each rank copies its files
    into the step's folder in storage (`upload_checkpoint`: rank 0 writes the manifest, the commit marker, last),
    in the background with checkpoint_upload async, and deletes the local copy."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint, CheckpointUploadMode

    from rugpt_ray.checkpoints import new_save_token, upload_checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    token = [new_save_token()]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    seam = _kill_seam(state.step, rank)

    def upload(local: Checkpoint, dir_name: str) -> Checkpoint:
        dest = f"{run_dir}/{dir_name}"
        upload_checkpoint(Path(local.path), dest, rank, world, token[0], after_file=seam)
        fs, inner = filesystem(dest)
        return Checkpoint(path=inner, filesystem=fs)

    folder = Path(tempfile.mkdtemp(prefix="rugpt-checkpoint-"))
    client = {"state": state.__dict__.copy(), "torch_rng": torch.get_rng_state()}
    engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state=client, exclude_frozen_parameters=bool(base))
    with _gathered([p for p in engine.module.parameters() if p.requires_grad or base is None], engine):
        if rank == 0:
            _save_weights(engine.module, folder, cfg, base, chat_template)
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps({**state.__dict__, "metrics": metrics}, indent=2))
    mode = CheckpointUploadMode.ASYNC if cfg.checkpoint_upload == "async" else CheckpointUploadMode.SYNC
    ray.train.report({**metrics, "step": state.step}, checkpoint=Checkpoint.from_directory(str(folder)),
                     checkpoint_dir_name=f"step_{state.step:07d}", checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload)


def _kill_seam(step: int, rank: int):
    """KILL_ENV's self-kill for this save on this worker, or None."""
    spec = os.environ.get(KILL_ENV, "").split(":")
    if len(spec) != 3 or (int(spec[0]), int(spec[1])) != (step, rank):
        return None

    def after_file(copied: int | str) -> None:
        if str(copied) == spec[2]:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_file


def _gathered(params: list[torch.nn.Parameter], engine):
    """ZeRO-3 partitions parameters: gather them whole for rank 0 to write; other stages hold them whole."""
    import contextlib

    import deepspeed

    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _save_weights(model, folder: Path, cfg: TrainConfig, base: BaseRef | None, chat_template: str | None) -> None:
    """The consolidated weights (so export needs no DeepSpeed), or the adapter for a LoRA run; with either, the
    chat template the data was rendered with."""
    from rugpt_ray.checkpoints import save_native

    if base is None:
        save_native(model, folder / "model", chat_template=chat_template)
        return
    from rugpt_ray.lora import ADAPTER_DIR, save_adapter

    save_adapter(model, cfg.lora_config(), base, folder / ADAPTER_DIR, chat_template=chat_template)


def fingerprint(tensor: torch.Tensor) -> str:
    """A short hash of a tensor's bytes (the trace's batches and RNG states)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class _StepTrace:
    """The test-only per-step trace of TRACE_ENV: one file per rank, appended across resumes and restarts."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def open(cls, rank: int) -> _StepTrace | None:
        folder = os.environ.get(TRACE_ENV)
        if not folder:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"rank{rank}.jsonl")

    def write(self, state: TrainState, micro: list[tuple[torch.Tensor, torch.Tensor | None]],
              rng_before: torch.Tensor, lr: float, losses: list[float]) -> None:
        line = {"step": state.step, "epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch,
                "batches": [fingerprint(tokens) for tokens, _ in micro], "rng_before": fingerprint(rng_before),
                "rng_after": fingerprint(torch.get_rng_state()), "lr": lr, "losses": losses}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


class _MetricsLog:
    """metrics.jsonl in the run folder (local or a URI such as s3://) and TensorBoard events (local folders), on
    rank 0; the driver prints progress from the file (`rugpt_ray.progress`)."""

    def __init__(self, run_dir: str | None, resume_step: int):
        self.path = f"{run_dir.rstrip('/')}/{METRICS_FILE}" if run_dir else None  # None: ranks other than 0
        self.lines: list[str] = []
        self.writer = None
        if self.path is None:
            return
        # lines past the checkpoint we resumed from are dropped: no step is logged twice
        old = (read_text(self.path) or "").splitlines()
        self.lines = [line for line in old if line.strip() and json.loads(line)["step"] <= resume_step]
        write_file(self.path, "".join(line + "\n" for line in self.lines))
        if not is_uri(run_dir):
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, metrics: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.lines.append(json.dumps(metrics))
        write_file(self.path, "".join(line + "\n" for line in self.lines))  # the whole file: it stays small
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "step":
                    self.writer.add_scalar(key, value, metrics["step"])
            self.writer.flush()


# --------------------------------------------------------------------------------------------- driver

@dataclass
class TrainResult:
    run_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]


def training_data_config(cfg: TrainConfig, run_dir: str, tokenizer_path: str):
    """How the run's text or chat inputs are prepared into the run folder (reused on resume); None when
    train_data is a prepared folder."""
    from rugpt_ray.data import DataConfig

    train = cfg.train_data
    if isinstance(train, str) and (Path(train) / "meta.json").is_file():
        return None
    as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    return DataConfig(inputs=as_list(train), valid=as_list(cfg.valid_data) if cfg.valid_data else [],
                      tokenizer=tokenizer_path, seq_len=cfg.seq_len, out=f"{run_dir}/data",
                      seed=cfg.seed, chat_template=cfg.chat_template)


def prepare_training_data(cfg: TrainConfig, run_dir: str, tokenizer_path: str):
    """A prepared folder as it is (its chat template must be the recipe's, if the recipe names one), or the inputs
    prepared once into the run folder."""
    from rugpt_ray.data import open_prepared, prepare_data

    data_cfg = training_data_config(cfg, run_dir, tokenizer_path)
    if data_cfg is not None:
        return open_prepared(prepare_data(data_cfg, progress=False)["out"], seq_len=cfg.seq_len)
    if cfg.valid_data is not None:
        raise UserError("train config: with a prepared train_data folder, the validation split comes from it "
                        "(prepare-data --valid); remove valid_data")
    prepared = open_prepared(cfg.train_data, seq_len=cfg.seq_len)
    if cfg.chat_template is not None:
        from rugpt_ray.chat import chat_template_source

        if prepared.chat_template != chat_template_source(cfg.chat_template):
            kind = "another chat template" if prepared.chat_template is not None else "text, not conversations"
            raise UserError(f"train config: chat_template {cfg.chat_template}: train_data {cfg.train_data} was "
                            f"prepared from {kind}; prepare it again or remove chat_template")
    return prepared


def run_folder(cfg: TrainConfig) -> str:
    """storage_path/name: an absolute local path or a URI."""
    storage = cfg.storage_path if is_uri(cfg.storage_path) else os.path.abspath(cfg.storage_path)
    return f"{storage.rstrip('/')}/{cfg.name}"


def train(cfg: TrainConfig | TrainPlan, callbacks: list | None = None, start_from: str | None = None) -> TrainResult:
    """Check, prepare data, fit; the run folder is storage_path/name. `callbacks`: Ray Train run callbacks
    (a Tune sweep forwards the reports to Tune with one). `start_from`: a checkpoint folder (or URI) a run with no
    checkpoint of its own starts from, with its config's lr and weight decay (`take_hyperparameters`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rugpt_ray.data import check_inputs, train_ingest
    from rugpt_ray.data.cache import MASK_COLUMN

    plan = cfg if isinstance(cfg, TrainPlan) else check_train_config(cfg)
    cfg = plan.config
    run_dir = run_folder(cfg)
    tokenizer_path = cfg.tokenizer or default_tokenizer()
    data_cfg = training_data_config(cfg, run_dir, tokenizer_path)
    if data_cfg is not None:
        check_inputs(data_cfg)  # every missing path, mixed chat and text, a bad template: one error before Ray

    check_writable(run_dir, "storage_path")  # a missing bucket, refused credentials: one line before Ray
    start_ray()
    quiet_ray(cfg.log_level)
    prepared = prepare_training_data(cfg, run_dir, tokenizer_path)
    ingest = train_ingest(prepared, cfg.num_workers, seed=cfg.seed, splits=["train"])
    valid_rows = cfg.eval_iters * cfg.micro_batch * cfg.num_workers
    valid_blocks = prepared.head("valid", valid_rows) if "valid" in prepared.splits else None
    valid_mask = (prepared.head("valid", valid_rows, MASK_COLUMN)
                  if valid_blocks is not None and prepared.chat_template is not None else None)
    resources = {"CPU": min(cfg.cpus_per_worker, ingest.resources_per_worker["CPU"])}
    if cfg.use_gpu:
        resources = {"CPU": cfg.cpus_per_worker}
    steps = cfg.total_steps()
    loop_config = {"train": cfg.to_dict(), "model": plan.model, "deepspeed": plan.deepspeed,
                   "steps": steps, "pad_id": ingest.pad_id, "run_dir": run_dir, "valid_blocks": valid_blocks,
                   "valid_mask": valid_mask, "chat_template": prepared.chat_template, "start_from": start_from}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        datasets=ingest.datasets,
        dataset_config=ingest.dataset_config,
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=query_last(run_dir.rpartition("/")[0]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": _worker_env(cfg.use_gpu)},
            logging_config=ray.train.LoggingConfig(log_level="DEBUG" if cfg.log_level == "debug" else "WARNING"),
            callbacks=callbacks,
        ),
    )
    without_placement_group_cleaner(trainer)
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)  # read by fit, passed on to the controller
    with (follow_progress(f"{run_dir}/{METRICS_FILE}", steps, cfg.tokens_per_step(), quiet=cfg.log_level == "warning"),
          _sigint_handler_restored()):
        result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint else None
    last = json.loads(((read_text(f"{run_dir}/{METRICS_FILE}") or "").strip().splitlines() or ["{}"])[-1])
    if "stopped_nonfinite" in last:  # rank 0's last line: Ray's result keeps the metrics of the last checkpoint
        raise UserError(f"training stopped at step {last['step']}: {last['stopped_nonfinite']} steps in a row had a "
                        f"non-finite loss or gradient norm (skipped, not applied); the newest checkpoint is "
                        f"{checkpoint or 'none'}")
    return TrainResult(run_dir=run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}))


CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
"""How often Ray Train's controller polls its workers, unless the user set it. At Ray's 2 s a finished run took 8 s
from its last step to `fit` returning (a tiny 20-step run here: 34 s in all); at 0.5 s, 1.7 s. Every run and every
sweep trial paid it; a poll is one small call per worker."""


def without_placement_group_cleaner(trainer) -> None:
    """Leaves Ray Train's PlacementGroupCleaner out of `trainer`'s run.

    Works around Ray 2.60's cleaner, a detached actor that asks the dashboard's State API every second whether the
    run's controller is alive. Without RAY_ADDRESS it finds the API through the Ray processes on the machine: with
    no dashboard on its own cluster it fails (a warning a second), and where another cluster on the machine has one
    it asks that cluster, does not find the controller there and removes the live run's placement group: the run
    loses its workers and restarts (seen in tests/test_cluster.py's node-loss run beside a `ray start` head).
    Nothing is lost without it: a run's placement group goes with its job, and a Tune sweep frees the groups of the
    trials it stopped itself (tuning.trials). It can go when the cleaner asks its own cluster (test: test_train
    counts the cleaner actors).
    """
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    defaults = trainer._create_default_callbacks
    trainer._create_default_callbacks = lambda: [
        callback for callback in defaults() if not isinstance(callback, PlacementGroupCleanerCallback)]


@contextlib.contextmanager
def _sigint_handler_restored() -> Iterator[None]:
    """The caller's SIGINT handler back after the run.

    Works around Ray 2.60: in the main thread, `TorchTrainer.fit` installs a SIGINT handler that holds the run's
    controller actor and is never removed, so the controller, its dataset manager and its split coordinator (a
    live Ray Data execution) outlive the run until the process ends or the next `train()` replaces the handler;
    runs and sweeps that follow in the same process share the cluster with them. Test: tests/test_tuning.py's
    ASHA test checks the handler is back. It can go when `fit` removes its handler itself.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # fit installs no handler outside the main thread (in a Tune trial, say)
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


WORKER_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
"""glibc's malloc in CPU training workers, unless the driver's environment sets it: every step allocates and frees
its logits and their gradients (100 MB each for 8 x 64 tokens of ruGPT3's vocabulary), and by default glibc maps
such blocks afresh and unmaps them when freed, so each step page-faults them in again: a quarter of a CPU worker's
time, most of it the kernel zeroing pages. One arena, no mmap and no trimming keep the freed memory for the next
step (a 40-step two-worker run here: 23 % less CPU, its kernel time a third)."""


def _worker_env(use_gpu: bool) -> dict[str, str]:
    """The driver's settings that workers need, a CPU worker's malloc settings, and Train's print patch off: in Ray
    workers it logs every print twice (once teed to the redirected stdout, once through the root logger), so each
    progress line came twice."""
    keys = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "RUGPT_DATA", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE",
            TRACE_ENV, NAN_ENV, KILL_ENV, *WORKER_MALLOC)
    malloc = {} if use_gpu else WORKER_MALLOC
    return {**malloc, **{k: os.environ[k] for k in keys if k in os.environ}, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
