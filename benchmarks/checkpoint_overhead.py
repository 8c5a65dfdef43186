"""What checkpoints cost a training run: the mean step time through Ray Train + DeepSpeed (1 CPU worker) without
checkpoints, with one every N steps uploaded synchronously (training waits for the copy to storage_path), and with
one every N steps uploaded asynchronously (Ray Train's ASYNC upload mode: training goes on during the copy).
All runs are in this one invocation, on the same prepared data; the ratio to the run without checkpoints is the
figure to read. The model is the tiny preset widened to 4 x 256 (16M parameters: 250 MB per checkpoint with the
AdamW state and the native weights), so a save is not lost in the noise.

    python benchmarks/checkpoint_overhead.py [--steps 40] [--every 10] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from rugpt_ray.config import TrainConfig, data_root
from rugpt_ray.data import DataConfig, prepare_data
from rugpt_ray.train import train

SEQ_LEN, MICRO_BATCH, LOG_INTERVAL = 128, 8, 5
MODEL = {"n_layer": 4, "n_embd": 256, "n_head": 4, "sparse_mode": "none", "sparse_attention": None}
VARIANTS = {"no checkpoints": None, "sync upload": "sync", "async upload": "async"}


def step_times(run_dir: str) -> dict[str, float]:
    """Seconds per step over every logged window but the first (warm-up): a save's time falls in the window after
    it, and the save at the last step in none (every run has it); and the mean seconds a checkpoint held the
    training loop up (`checkpoint_s`, what the trainer logs after each save)."""
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    windows = rows[1:]
    seconds = sum(LOG_INTERVAL * MICRO_BATCH * SEQ_LEN / r["tokens_per_s"] for r in windows)
    held = [r["checkpoint_s"] for r in rows if "checkpoint_s" in r]
    return {"step_s": seconds / (LOG_INTERVAL * len(windows)),
            "checkpoint_held_s": sum(held) / len(held) if held else 0.0}


def checkpoint_size(checkpoint: str) -> int:
    return sum(f.stat().st_size for f in Path(checkpoint).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--out")
    args = parser.parse_args()
    data = data_root()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        meta = prepare_data(DataConfig(inputs=[str(data / "corpus" / "train")], tokenizer=str(data / "tokenizer"),
                                       seq_len=SEQ_LEN, out=f"{tmp}/prepared"), progress=False)
        for label, upload in VARIANTS.items():
            cfg = TrainConfig(name=label.replace(" ", "-"), storage_path=f"{tmp}/runs", preset="tiny", model=MODEL,
                              train_data=meta["out"], seq_len=SEQ_LEN, micro_batch=MICRO_BATCH, max_steps=args.steps,
                              log_interval=LOG_INTERVAL, eval_interval=10**6, num_workers=1, zero_stage=0,
                              save_interval=args.every if upload else 10**6, checkpoint_upload=upload or "sync",
                              log_level="warning")
            result = train(cfg)
            results[label] = {**step_times(result.run_dir),
                              "checkpoint_mb": checkpoint_size(result.checkpoint) / 2**20}
    plain = results["no checkpoints"]["step_s"]
    for row in results.values():
        row["ratio"] = row["step_s"] / plain
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "model": MODEL, "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH, "steps": args.steps,
               "every": args.every, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'4 x 256 model, batch 8 x 128, 1 worker':34} {'step s':>8} {'vs none':>8} {'held s':>8} "
          f"{'ckpt MB':>8}")
    for label, row in results.items():
        every = f", every {args.every}" if label != "no checkpoints" else ""
        print(f"{label + every:34} {row['step_s']:8.3f} {row['ratio']:8.2f} {row['checkpoint_held_s']:8.2f} "
              f"{row['checkpoint_mb']:8.0f}")


if __name__ == "__main__":
    main()
