"""The platform's training overhead: tokens/s of the tiny preset through Ray Train + DeepSpeed (1 worker)
against the same model, batch and optimizer in a plain torch loop in one process. Both runs are measured in
this one invocation, on the same prepared data; the plain loop runs first and last and its mean is used.

    python benchmarks/train_overhead.py [--steps 60] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from rugpt_ray.config import TrainConfig, data_root, preset
from rugpt_ray.data import DataConfig, prepare_data
from rugpt_ray.model import GPT
from rugpt_ray.train import lr_at, param_groups, train

SEQ_LEN, MICRO_BATCH = 128, 8


def plain_loop(blocks: np.ndarray, cfg: TrainConfig, steps: int) -> float:
    """tokens/s of forward+backward+AdamW in this process, excluding a 5-step warm-up."""
    torch.manual_seed(cfg.seed)
    model = GPT(preset("tiny")).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, steps) / cfg.lr)
    started = None
    for step in range(steps + 5):
        if step == 5:
            started = time.perf_counter()
        rows = np.arange(step * MICRO_BATCH, (step + 1) * MICRO_BATCH) % len(blocks)
        tokens = torch.from_numpy(blocks[rows]).long()
        _, loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * MICRO_BATCH * SEQ_LEN / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out")
    args = parser.parse_args()
    data = data_root()
    with tempfile.TemporaryDirectory() as tmp:
        meta = prepare_data(DataConfig(inputs=[str(data / "corpus" / "train")], tokenizer=str(data / "tokenizer"),
                                       seq_len=SEQ_LEN, out=f"{tmp}/prepared"), progress=False)
        shards = [pq.read_table(f"{meta['out']}/{s}") for s in meta["splits"]["train"]["shards"]]
        blocks = np.concatenate([np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)) for t in shards])
        cfg = TrainConfig(name="overhead", storage_path=tmp, preset="tiny", train_data=meta["out"], seq_len=SEQ_LEN,
                          micro_batch=MICRO_BATCH, max_steps=args.steps, log_interval=max(5, args.steps // 6),
                          eval_interval=10**6, save_interval=10**6, num_workers=1, zero_stage=0, lr=1e-3)
        plain_before = plain_loop(blocks, cfg, args.steps)
        train(cfg)
        rows = [json.loads(line) for line in open(f"{tmp}/overhead/metrics.jsonl")]
        platform_tok_s = statistics.median(r["tokens_per_s"] for r in rows[1:])  # the first window has warm-up
        plain_after = plain_loop(blocks, cfg, args.steps)
    plain = (plain_before + plain_after) / 2
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH, "steps": args.steps,
              "plain_tokens_per_s": plain, "platform_tokens_per_s": platform_tok_s, "ratio": platform_tok_s / plain}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'tiny preset, batch 8 x 128, 1 worker':40} {'tokens/s':>10}")
    print(f"{'plain torch loop (one process)':40} {plain:10.0f}")
    print(f"{'Ray Train + DeepSpeed (ZeRO-0)':40} {platform_tok_s:10.0f}")
    print(f"{'ratio (target >= 0.8)':40} {result['ratio']:10.2f}")


if __name__ == "__main__":
    main()
