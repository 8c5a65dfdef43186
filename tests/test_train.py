"""Training through real Ray Train and real DeepSpeed on CPU: learning, resume, a killed worker, export."""

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from transformers import GPT2LMHeadModel

from rugpt_ray.checkpoints import MANIFEST_FILE, export_hf, load_model, safe_torch_load
from rugpt_ray.cli import main
from rugpt_ray.config import TrainConfig, check_train_config, deepspeed_engine_config, load_train_config
from rugpt_ray.errors import UserError
from rugpt_ray.plotting import read_metrics
from rugpt_ray.train import (
    CONTROLLER_POLL_ENV,
    CONTROLLER_POLL_S,
    TRACE_ENV,
    WORKER_MALLOC,
    _MetricsLog,
    _worker_env,
    fingerprint,
    lr_at,
    train,
)

REPO = Path(__file__).resolve().parents[1]
SEED_XL_JSON = {  # the content of the seed's gpt3_xl_sparse_2048.json (= HF sberbank-ai/rugpt3xl)
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 100,
    "gradient_clipping": 1.0,
    "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 2000, "hysteresis": 2, "min_loss_scale": 0.0},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 50000000, "overlap_comm": True},
    "sparse_attention": {"mode": "fixed", "block": 16, "different_layout_per_head": True, "num_local_blocks": 8,
                         "num_global_blocks": 1, "attention": "unidirectional", "horizontal_global_attention": False,
                         "num_different_global_patterns": 8},
}


@pytest.fixture(scope="module")
def prepared(prepare_once, data_dir) -> str:
    corpus = data_dir / "corpus"
    return prepare_once("corpus-seq64", inputs=[str(corpus / "train")], valid=[str(corpus / "valid")],
                        tokenizer=str(data_dir / "tokenizer"), seq_len=64)["out"]


def base(tmp_path, prepared, **overrides) -> TrainConfig:
    values = dict(name="run", storage_path=str(tmp_path), preset="tiny", model={"sparse_mode": "none"},
                  train_data=prepared, seq_len=64, micro_batch=8, lr=3e-3, min_lr=3e-4, warmup=2, log_interval=5,
                  eval_interval=10, eval_iters=4, save_interval=10, max_steps=20, num_workers=2, zero_stage=2)
    values.update(overrides)
    return TrainConfig.from_dict(values)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.long
def test_two_workers_zero2_learn_resume_survive_a_killed_worker_and_export(tmp_path, tmp_path_factory, prepared,
                                                                           ray_local, monkeypatch):
    trace = tmp_path / "trace"  # every rank's steps: batches and RNG fingerprints, lr, losses (train.TRACE_ENV)
    monkeypatch.setenv(TRACE_ENV, str(trace))
    result = train(base(tmp_path, prepared))
    first = {rank: traced(trace, rank) for rank in (0, 1)}
    assert saved_client_state(result.checkpoint)["torch_rng"] == first[0][-1]["rng_after"]
    rows = metrics(result.run_dir)
    valid = [r["valid_ppl"] for r in rows if "valid_ppl" in r]
    assert len(valid) == 2 and valid[1] < 0.7 * valid[0]  # 10 more steps cut validation perplexity clearly
    assert Path(result.checkpoint).name == "step_0000020"
    shards = sorted(p.name for p in (Path(result.checkpoint) / "deepspeed").iterdir())
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(shards)

    # the same name again with a longer budget continues from step 20; a worker killed once the step-30 checkpoint
    # is complete (its manifest written) and step 31 has run costs a restart from it (max_failures=1): no gap, no
    # restart from 0, no step twice
    killer, killed = kill_a_train_worker_after(
        tmp_path / "run" / "step_0000030" / "model", str(tmp_path_factory.getbasetemp()),
        also=lambda: (tmp_path / "run" / "step_0000030" / MANIFEST_FILE).is_file() and all(
            any(line["step"] == 31 for line in traced(trace, rank)[20:]) for rank in (0, 1)))
    resumed = train(base(tmp_path, prepared, max_steps=50, max_failures=1))
    killer.join()
    assert killed, "no Ray Train worker process was found to kill"
    steps = [r["step"] for r in metrics(resumed.run_dir)]
    assert steps == list(range(5, 55, 5))
    check_resumes_continue_the_run(tmp_path, trace, first, resumed.run_dir)
    assert Path(resumed.checkpoint).name == "step_0000050"
    kept = sorted(p.name for p in (tmp_path / "run").glob("step_*"))
    assert kept == ["step_0000040", "step_0000050"]  # num_to_keep=2; step 30 was restored from, then rotated
    state = json.loads((Path(resumed.checkpoint) / "train_state.json").read_text())
    assert state["step"] == 50 and state["tokens"] == 50 * 2 * 8 * 64
    actors = ray_local._private.state.actors().values()  # train.without_placement_group_cleaner still works
    assert not [a for a in actors if a["ActorClassName"] == "PlacementGroupCleaner"]

    # export: stock transformers loads it and gives the trained model's logits
    trained = load_model(resumed.run_dir)
    out = export_hf(trained, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(5, 50257, (1, 40))
    with torch.no_grad():
        assert (hf(ids).logits - trained(ids)[0]).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.long
def test_chat_lora_run_learns_on_assistant_tokens_and_keeps_the_template(tmp_path, make_model, data_dir, ray_local):
    """prepare (.jsonl) -> LoRA training with the loss mask -> the validation loss it reports equals plain torch
    cross-entropy over the masked tokens of the validation blocks on the saved checkpoint -> the template is in the
    adapter and in the merged HF export."""
    import subprocess
    import sys

    import numpy as np
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from rugpt_ray.chat import chat_template_source
    from rugpt_ray.checkpoints import read_chat_template, save_native
    from rugpt_ray.cli import main
    from rugpt_ray.config import preset
    from rugpt_ray.data import open_prepared
    from rugpt_ray.lora import load_adapter, merged_model

    made = subprocess.run([sys.executable, str(REPO / "jobs" / "make_chat_set.py"), "--out", str(tmp_path / "chat"),
                           "--train", "300", "--valid", "40"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    save_native(make_model(preset("tiny", sparse_mode="none", sparse_attention=None), seed=2), tmp_path / "base")
    cfg = TrainConfig.from_dict(dict(
        name="chat", storage_path=str(tmp_path / "runs"), init_from=str(tmp_path / "base"),
        lora={"r": 8, "alpha": 16, "dropout": 0.0}, train_data=str(tmp_path / "chat" / "train.jsonl"),
        valid_data=str(tmp_path / "chat" / "valid.jsonl"), seq_len=64, micro_batch=4, grad_accum=2, lr=1e-2,
        warmup=1, weight_decay=0.0, log_interval=4, eval_interval=4, eval_iters=3, save_interval=8, max_steps=8,
        num_workers=2, zero_stage=2))
    result = train(cfg)
    rows = metrics(result.run_dir)
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    assert len(valid) == 2 and valid[1] < valid[0]

    prepared = open_prepared(f"{result.run_dir}/data")
    assert prepared.chat_template == chat_template_source("rugpt3-chat")
    blocks = 3 * 4 * 2  # eval_iters x micro_batch x workers: what validation read
    ids = torch.from_numpy(prepared.head("valid", blocks).astype(np.int64))
    mask = torch.from_numpy(prepared.head("valid", blocks, "loss_mask").astype(np.int64))
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    assert 0 < (targets != -100).sum() < 0.5 * targets.numel()  # the answers only
    with torch.no_grad():
        logits = merged_model(result.checkpoint)(ids[:, :-1])[0]
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).item()
    assert valid[1] == pytest.approx(want, abs=1e-4)

    assert load_adapter(result.checkpoint).chat_template == prepared.chat_template
    assert main(["export", result.run_dir, str(tmp_path / "hf"), "--merge", "--to", "hf", "--tokenizer",
                 str(data_dir / "tokenizer")]) == 0
    assert read_chat_template(tmp_path / "hf") == prepared.chat_template
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == prepared.chat_template


def traced(folder: Path, rank: int) -> list[dict]:
    """Rank `rank`'s step lines so far (train.TRACE_ENV), in the order it ran them, over every run and restart."""
    path = folder / f"rank{rank}.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]  # a line still being written is left out


def saved_client_state(checkpoint: str | Path) -> dict:
    """What a checkpoint saved besides weights and optimizer (train._save's client state), the RNG fingerprinted."""
    saved = safe_torch_load(Path(checkpoint) / "deepspeed" / "mp_rank_00_model_states.pt")
    return {"state": saved["state"], "torch_rng": fingerprint(saved["torch_rng"])}


def check_resumes_continue_the_run(tmp_path: Path, trace: Path, first: dict[int, list[dict]], resumed_dir: str):
    """What resuming restores besides weights and step: the LR schedule, the RNG and the data position.

    The first run (20 of 20 steps) stopped; the second (budget 50) resumed from its step 20 and, killed after step 31,
    restarted from its own step 30: its first attempt at steps 31.. is the uninterrupted run that the restart must
    repeat (the same batches, RNG states, lr and losses, bit for bit), and every step's lr is the seed's schedule at
    that step of the run's budget."""
    cfg20, cfg50 = base(tmp_path, "unused"), base(tmp_path, "unused", max_steps=50)
    second = {rank: traced(trace, rank)[20:] for rank in (0, 1)}
    for rank in (0, 1):
        assert [line["step"] for line in first[rank]] == list(range(1, 21))
        assert [line["lr"] for line in first[rank]] == pytest.approx([lr_at(s, cfg20, 20) for s in range(1, 21)])
        steps = [line["step"] for line in second[rank]]
        restart = max(i for i, step in enumerate(steps) if step == 31)  # the restart's first step
        assert steps[:restart] == list(range(21, 21 + restart)) and restart >= 11  # 21..31 at least, once each
        assert steps[restart:] == list(range(31, 51))  # restarted from step 30, not 20 or 0
        assert [line["lr"] for line in second[rank]] == pytest.approx([lr_at(s, cfg50, 50) for s in steps])
        # resumed from step 20: the RNG where the first run left it, and the data: the batches after its last ones
        end, start = first[rank][-1], second[rank][0]
        assert start["rng_before"] == end["rng_after"]
        assert (start["epoch"], start["batches_in_epoch"]) in ((end["epoch"], end["batches_in_epoch"] + 1),
                                                              (end["epoch"] + 1, 1))
        assert not set(start["batches"]) & {b for line in first[rank] if line["epoch"] == start["epoch"]
                                            for b in line["batches"]}  # none of this epoch's batches again
        # restarted from step 30: step for step what the attempt before the kill did
        before = {line["step"]: line for line in second[rank][:restart]}
        repeated = [line for line in second[rank][restart:] if line["step"] in before]
        assert len(repeated) >= 1 and all(line == before[line["step"]] for line in repeated), (repeated, before)
    assert [r["lr"] for r in metrics(resumed_dir)] == pytest.approx(  # the metrics say the same
        [lr_at(s, cfg20, 20) for s in (5, 10, 15, 20)] + [lr_at(s, cfg50, 50) for s in range(25, 55, 5)])
    # the RNG state each checkpoint saved is the one its step left (rank 0's, which every rank restores)
    last = {line["step"]: line for line in second[0]}
    for step in (40, 50):
        assert saved_client_state(tmp_path / "run" / f"step_{step:07d}") == {
            "state": {"step": step, "epoch": last[step]["epoch"], "batches_in_epoch": last[step]["batches_in_epoch"],
                      "tokens": step * 2 * 8 * 64, "skipped_steps": 0},
            "torch_rng": last[step]["rng_after"]}


def kill_a_train_worker_after(ready: Path, ray_dir: str,
                              also: Callable[[], bool] = lambda: True) -> tuple[threading.Thread, list[int]]:
    """A started thread that SIGKILLs one Ray Train worker of the Ray whose temp dir is `ray_dir` (never another
    Ray's) a second after `ready` exists and `also()` holds, and the list it appends that worker's pid to."""
    killed: list[int] = []

    def kill() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not (ready.is_dir() and also()):
            time.sleep(0.5)
        time.sleep(1.0)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and any(
                    ray_dir in " ".join(parent.cmdline()) for parent in proc.parents()):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread, killed


@pytest.mark.slow
def test_seed_deepspeed_json_trains_the_sparse_model(tmp_path, prepared, ray_local, monkeypatch):
    monkeypatch.delenv(CONTROLLER_POLL_ENV, raising=False)
    (tmp_path / "ds.json").write_text(json.dumps(SEED_XL_JSON))
    cfg = base(tmp_path, prepared, model={"sparse_mode": "alternating"}, num_workers=1, max_steps=4, save_interval=4,
               deepspeed_config=str(tmp_path / "ds.json"), precision="fp32")
    with pytest.raises(UserError, match="fp16.*needs use_gpu"):
        check_train_config(cfg)  # the seed's JSON asks for fp16, which needs a GPU
    SEED_XL_JSON["fp16"]["enabled"] = False
    (tmp_path / "ds.json").write_text(json.dumps(SEED_XL_JSON))
    cfg = base(tmp_path, prepared, model={"sparse_mode": "alternating"}, num_workers=1, max_steps=4, save_interval=4,
               deepspeed_config=str(tmp_path / "ds.json"))
    plan = check_train_config(cfg)
    ds = plan.deepspeed
    assert "sparse_attention" not in ds and ds["zero_optimization"]["reduce_bucket_size"] == 50000000
    assert plan.config.micro_batch == 2 and plan.config.zero_stage == 2
    assert cfg.micro_batch == 8  # the config it was given is left as it was
    result = train(cfg)
    trained = load_model(result.checkpoint)
    assert trained.config.sparse_attention["num_local_blocks"] == 8 and trained.config.is_sparse_layer(0)
    assert [r["step"] for r in metrics(result.run_dir)][-1] == 4
    assert os.environ[CONTROLLER_POLL_ENV] == CONTROLLER_POLL_S  # what fit passed on to Train's controller


def test_recipes_load_and_check():
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        cfg = load_train_config(str(path))
        ds = check_train_config(cfg).deepspeed
        assert ds["train_micro_batch_size_per_gpu"] == cfg.micro_batch, path
    xl = load_train_config(str(REPO / "jobs" / "configs" / "xl.yaml"))
    assert (xl.preset, xl.seq_len, xl.lr, xl.zero_stage, xl.precision) == ("xl", 2048, 2e-4, 2, "bf16")


def test_metrics_log_through_a_uri_keeps_only_steps_up_to_a_resume(tmp_path, capsys):
    uri = f"file://{tmp_path}/run"  # what storage_path=s3://... runs take: pyarrow filesystems, no local path
    log = _MetricsLog(uri, resume_step=0)
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0 / step})
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [10, 20, 30]
    assert not (tmp_path / "run" / "tensorboard").exists()  # TensorBoard events only in local run folders
    _MetricsLog(uri, resume_step=20).write({"step": 30, "loss": 0.5})
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "run")] == [(10, 0.1), (20, 0.05), (30, 0.5)]
    _MetricsLog(None, resume_step=0).write({"step": 40, "loss": 0.1})  # ranks other than 0: nothing
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [10, 20, 30]
    assert capsys.readouterr().out == ""  # workers print no progress: the driver does (tests/test_progress.py)


def test_cpu_workers_keep_freed_memory_unless_the_driver_says_otherwise(monkeypatch):
    """The workers' malloc settings (train.WORKER_MALLOC; what they save is a figure in the README, not a test's):
    set for CPU workers, left out for GPU ones, and a driver's own value wins."""
    for key in WORKER_MALLOC:
        monkeypatch.delenv(key, raising=False)
    assert WORKER_MALLOC.items() <= _worker_env(use_gpu=False).items()
    assert not set(WORKER_MALLOC) & set(_worker_env(use_gpu=True))
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert _worker_env(use_gpu=False)["MALLOC_ARENA_MAX"] == "4"
    assert _worker_env(use_gpu=True)["MALLOC_ARENA_MAX"] == "4"


def test_annealing_lr_follows_the_seed():
    cfg = TrainConfig(lr=1.0, min_lr=0.01, warmup=0.1, decay="cosine", max_steps=100)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(10, cfg, 100) == pytest.approx(1.0)  # cos(0)
    assert lr_at(60, cfg, 100) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.5 * torch.pi)).item()))
    assert lr_at(99, cfg, 100) == lr_at(95, cfg, 100)  # the seed clamps progress at decay span - warmup
    linear = TrainConfig(lr=1.0, min_lr=0.3, warmup=0, decay="linear", max_steps=10)
    assert [round(lr_at(s, linear, 10), 3) for s in (0, 5, 9)] == [1.0, 0.5, 0.3]


def test_deepspeed_config_drops_sparse_and_owns_optimizer(tmp_path):
    ds = deepspeed_engine_config(TrainConfig(micro_batch=3, grad_accum=2, precision="bf16", zero_stage=3,
                                      offload_optimizer=True), {"optimizer": {"type": "Adam"}, "train_batch_size": 9})
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert "optimizer" not in ds and "train_batch_size" not in ds


@pytest.mark.parametrize("overrides,message", [
    (["lr=fast"], "lr must be float"),
    (["nonsense=1"], "unknown keys ['nonsense']"),
    (["seq_len=512"], "seq_len 512 exceeds the model's n_positions 256"),
    (["train_data=/no/such/dir"], "/no/such/dir"),
    (["decay=exponential"], "decay 'exponential' is not one of"),
    (["precision=fp16"], "needs use_gpu"),
    (["zero_stage=4"], "zero_stage must be 0-3"),
    (["preset=huge"], "preset 'huge'"),
    (["model.n_head=5"], "not divisible by n_head"),
    (["max_steps=null"], "give max_steps or max_tokens"),
])
def test_bad_config_is_one_clear_error_before_ray(overrides, message, data_dir, capsys):
    """The command's `main` in this process (test_cli checks what the real process adds to its line)."""
    assert main(["train", "--config", str(REPO / "jobs" / "configs" / "tiny-cpu.yaml"), "storage_path=/tmp/never",
                 *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 dynamic loss scaling and nccl need a CUDA GPU")
def test_fp16_loss_scaling_on_gpu(tmp_path, prepared, ray_local, monkeypatch):
    """The logged loss_scale is DeepSpeed's dynamic scale: 2**initial_scale_power from the recipe's DeepSpeed JSON
    (1024 here; the tiny model's gradients, at most 1 unscaled, stay far from fp16's 65504 at that scale, so no step
    overflows and the scale holds: DeepSpeed only raises it after loss_scale_window = 1000 clean steps)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # the workers' DeepSpeed (the suite's default is cpu)
    (tmp_path / "ds.json").write_text(json.dumps({"fp16": {"enabled": True, "initial_scale_power": 10}}))
    result = train(base(tmp_path, prepared, use_gpu=True, num_workers=1, precision="fp16", max_steps=10,
                        deepspeed_config=str(tmp_path / "ds.json")))
    rows = metrics(result.run_dir)
    assert "loss_scale" in rows[-1]
    assert [r["loss_scale"] for r in rows] == [1024.0, 1024.0]  # steps 5 and 10


def fp16_overflow_probe() -> dict:
    """One rank's fp16 ZeRO-2 engine on the GPU, DeepSpeed's default dynamic loss scaling, fed three losses made
    infinite through micro_step's weight (a real overflow: every gradient inf or nan). Runs in a fresh process with
    DS_ACCELERATOR=cuda (test_fp16_overflow_skips_the_step_and_lowers_the_scale_on_gpu); returns what it saw."""
    import torch.distributed as dist
    from ports import free_port

    from rugpt_ray.config import ModelConfig, deepspeed_engine_config
    from rugpt_ray.model import GPT
    from rugpt_ray.train import build_engine, micro_step

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    cfg = TrainConfig(micro_batch=2, seq_len=64, lr=3e-3, warmup=2, max_steps=10, precision="fp16", use_gpu=True,
                      zero_stage=2)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)).train()
    engine = build_engine(model, cfg, deepspeed_engine_config(cfg), steps=10)
    tokens = torch.randint(5, 50257, (2, 65), generator=torch.Generator().manual_seed(0)).cuda()
    before = [p.detach().clone() for p in engine.module.parameters()]
    seen = {"initial": float(engine.optimizer.cur_scale), "lr_before": engine.lr_scheduler.get_last_lr()[0],
            "scales": []}
    for _ in range(3):
        micro_step(engine, tokens, pad_id=0, weight=float("inf"))
        seen["scales"].append(float(engine.optimizer.cur_scale))  # what train_loop_per_worker logs as loss_scale
    seen.update(skipped=engine.skipped_steps, lr_after=engine.lr_scheduler.get_last_lr()[0],
                unchanged=all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters(), strict=True)))
    dist.destroy_process_group()
    return seen


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 dynamic loss scaling and nccl need a CUDA GPU")
def test_fp16_overflow_skips_the_step_and_lowers_the_scale_on_gpu():
    """DeepSpeed 0.19.8's DynamicLossScaler (runtime/fp16/loss_scaler.py) as ZeRO-2 builds it from the fp16 defaults
    (runtime/precision_config.py): it starts at 2**16 (initial_scale_power 16); an overflowing step is skipped (no
    update, the LR schedule does not advance: engine._take_model_step) and, with hysteresis 2, the first overflow
    only uses the hysteresis up, each later one halves the scale."""
    import subprocess
    import sys

    code = "import json, test_train; print(json.dumps(test_train.fp16_overflow_probe()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "DS_ACCELERATOR": "cuda"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["initial"] == 2.0**16
    assert seen["scales"] == [2.0**16, 2.0**15, 2.0**14]
    assert seen["skipped"] == 3 and seen["unchanged"]
    assert seen["lr_after"] == seen["lr_before"] == pytest.approx(lr_at(0, TrainConfig(lr=3e-3, warmup=2,
                                                                                        max_steps=10), 10))
