"""Checkpoints that survive a kill: the manifest (every file's size and SHA-256) is written last, and a checkpoint
without it, or with a file that differs from it, is never loaded: resume and load_model take the previous complete
one with a warning naming the bad file; a named incomplete step_* folder is an error."""

import json
import threading
from pathlib import Path

import pytest
import torch
from test_train import base, metrics, traced

from rugpt_ray.checkpoints import (
    MANIFEST_FILE,
    checkpoint_problem,
    load_model,
    new_save_token,
    save_native,
    upload_checkpoint,
)
from rugpt_ray.config import ModelConfig
from rugpt_ray.errors import UserError
from rugpt_ray.train import KILL_ENV, TRACE_ENV, train

TINY = ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)


@pytest.fixture(scope="module")
def prepared(prepare_once, data_dir) -> str:
    corpus = data_dir / "corpus"
    return prepare_once("corpus-seq64", inputs=[str(corpus / "train")], valid=[str(corpus / "valid")],
                        tokenizer=str(data_dir / "tokenizer"), seq_len=64)["out"]


def two_worker_save(local: Path, step_dir: Path, model, seed: int) -> None:
    """What training's save leaves: rank 0's weights and shard, rank 1's shard, each copied by its own thread
    (`upload_checkpoint`), rank 0's manifest last."""
    save_native(model, local / "r0" / "model")
    for rank in (0, 1):
        shard = local / f"r{rank}" / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"seed": seed, "rank": rank, "state": torch.randn(300)}, shard)
    token = new_save_token()
    threads = [threading.Thread(target=upload_checkpoint, args=(local / f"r{rank}", str(step_dir), rank, 2, token))
               for rank in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_a_truncated_shard_or_a_flipped_byte_is_never_loaded(tmp_path, make_model):
    run = tmp_path / "run"
    models = {step: make_model(TINY, seed=step) for step in (2, 4)}
    for step, model in models.items():
        two_worker_save(tmp_path / f"local{step}", run / f"step_{step:07d}", model, seed=step)
    manifest = json.loads((run / "step_0000004" / MANIFEST_FILE).read_text())["files"]
    assert sorted(manifest) == ["deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", "model/config.json",
                                "model/model.safetensors"]
    assert not list((run / "step_0000004").glob("manifest.*.rank*.json"))  # the workers' lists merged, then gone
    assert checkpoint_problem(str(run / "step_0000004")) is None
    ids = torch.randint(5, 50257, (1, 12))
    logits = {step: model(ids)[0] for step, model in models.items()}
    assert torch.equal(load_model(run)(ids)[0], logits[4])

    shard = run / "step_0000004" / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])  # truncated: a save cut short by a full disk
    with pytest.warns(UserWarning, match=rf"step_0000004: skipped, incomplete or corrupt: "
                                         rf"deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt has {size // 2} bytes, "
                                         rf"the manifest says {size}") as seen:
        assert torch.equal(load_model(run)(ids)[0], logits[2])  # the previous complete checkpoint
    assert len(seen) == 1

    weights = run / "step_0000002" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in a tensor: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"step_0000002: incomplete or corrupt checkpoint: model/model.safetensors "
                                        r"does not match its SHA-256 in the manifest"):
        load_model(run / "step_0000002")
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"no complete checkpoint among step_0000002, "
                                                                   r"step_0000004"):
        load_model(run)

    (run / "step_0000006" / "model").mkdir(parents=True)  # a save killed before its manifest
    save_native(models[4], run / "step_0000006" / "model")
    with pytest.raises(UserError, match=rf"step_0000006: incomplete or corrupt checkpoint: {MANIFEST_FILE} is "
                                        "missing: the save did not finish"):
        load_model(run / "step_0000006")


@pytest.mark.slow
@pytest.mark.long
def test_a_save_killed_at_any_point_resumes_from_the_last_complete_checkpoint(tmp_path, prepared, ray_local,
                                                                             monkeypatch):
    """Two workers, a checkpoint every 2 steps of 6; the save of step 4 SIGKILLs a worker (train.KILL_ENV) at two
    points: rank 1 after its first file (no manifest yet), rank 0 after the manifest (before Ray recorded the
    checkpoint). Each rerun resumes from the newest complete checkpoint, never from a half-written one, and the last
    one finishes the run. (test_a_truncated_shard_or_a_flipped_byte_is_never_loaded covers the other cuts.)"""
    trace = tmp_path / "trace"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    cfg = base(tmp_path, prepared, max_steps=6, save_interval=2, log_interval=2, eval_interval=100)
    run, step4 = tmp_path / "run", tmp_path / "run" / "step_0000004"
    ran = []  # rank 0's steps in each run
    for kill in ("4:1:1", "4:0:commit", None):
        if kill is None:
            monkeypatch.delenv(KILL_ENV)
        else:
            monkeypatch.setenv(KILL_ENV, kill)
        seen = len(traced(trace, 0))
        if kill is None:
            train(cfg)
        else:
            with pytest.raises(Exception):  # noqa: B017 (Ray's error for a worker group that lost a worker)
                train(cfg)
        ran.append([line["step"] for line in traced(trace, 0)[seen:]])
        if kill == "4:1:1":
            assert checkpoint_problem(str(step4)) == f"{MANIFEST_FILE} is missing: the save did not finish"
            with pytest.warns(UserWarning, match="step_0000004: skipped, incomplete or corrupt: manifest.json is "
                                                 "missing"):
                newest = load_model(run)
            assert torch.equal(newest.transformer.wte.weight, load_model(run / "step_0000002").transformer.wte.weight)
        elif kill == "4:0:commit":
            assert checkpoint_problem(str(step4)) is None  # complete, though Ray never recorded it
    # the first run from scratch; the next from step 2 (step 4 incomplete); the last from step 4 (complete)
    assert [steps[0] for steps in ran] == [1, 3, 5]
    assert ran[-1] == [5, 6]
    logged = [row["step"] for row in metrics(run)]
    assert logged == sorted(set(logged)) and logged[-1] == 6  # no step logged twice
    assert all(checkpoint_problem(str(run / f"step_{s:07d}")) is None for s in (2, 4, 6))
    assert torch.equal(load_model(run).transformer.wte.weight, load_model(run / "step_0000006").transformer.wte.weight)
