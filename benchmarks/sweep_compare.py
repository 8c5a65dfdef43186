"""Three ways to sweep lr x weight decay at the same budget (trials x steps) on the tiny CPU recipe: random draws with
ASHA (tune/lr_wd.yaml), Optuna's TPE with ASHA (tune/lr_wd_optuna.yaml) and population-based training
(tune/lr_wd_pbt.yaml). Each method runs with every seed (the search's seed: which values are drawn), interleaved
(seed 0: random, optuna, pbt; seed 1: ...) in this one invocation, on one Ray; the best validation loss, the steps
actually trained (ASHA stops trials early) and the wall time of each sweep are printed. It reports whatever comes
out: which method wins depends on the budget.

    python benchmarks/sweep_compare.py [--trials 6] [--steps 45] [--seeds 0 1] [--out result.json]
    python benchmarks/sweep_compare.py --trials 2 --steps 6 --seeds 0          (a smoke run, a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from rugpt_ray.ray_start import ray_connection
from rugpt_ray.tuning.plan import load_sweep_config
from rugpt_ray.tuning.trials import run_sweep

REPO = Path(__file__).resolve().parents[1]
METHODS = {"random + ASHA": "tune/lr_wd.yaml", "Optuna + ASHA": "tune/lr_wd_optuna.yaml", "PBT": "tune/lr_wd_pbt.yaml"}


def overrides(spec: str, trials: int, steps: int, seed: int, folder: str) -> list[str]:
    """The shipped spec at the benchmark's budget: every interval (evaluation, checkpoint, ASHA's first rung,
    PBT's exploits) a third of the steps."""
    every = max(1, steps // 3)
    keys = [f"num_samples={trials}", f"seed={seed}", f"train.max_steps={steps}", f"train.eval_interval={every}",
            f"train.save_interval={every}", f"train.log_interval={every}", f"train.warmup={min(5, every)}"]
    keys.append(f"perturbation_interval={every}" if "pbt" in spec else f"grace_period={every}")
    return [*keys, f"name={Path(spec).stem}-seed{seed}", f"storage_path={folder}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, ray_connection():
        for seed in args.seeds:
            for method, spec in METHODS.items():
                config = load_sweep_config(str(REPO / spec), overrides(spec, args.trials, args.steps, seed, tmp))
                started = time.perf_counter()
                sweep = run_sweep(config)
                wall = time.perf_counter() - started
                best = sweep.best or {}
                results.append({"method": method, "seed": seed, "best_valid_loss": best.get("best_valid_loss"),
                                "steps_trained": sum(r["steps"] for r in sweep.rows), "wall_s": wall,
                                "exploits": sum(r.get("exploits", 0) for r in sweep.rows)})
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "trials": args.trials,
               "steps": args.steps, "seeds": args.seeds, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{args.trials} trials x {args.steps} steps, tiny CPU recipe")
    print(f"{'method':16} {'seed':>4} {'best valid_loss':>16} {'steps trained':>14} {'wall s':>8} {'exploits':>9}")
    for row in results:
        loss = f"{row['best_valid_loss']:.4f}" if row["best_valid_loss"] is not None else "-"
        print(f"{row['method']:16} {row['seed']:>4} {loss:>16} {row['steps_trained']:>14} {row['wall_s']:>8.0f} "
              f"{row['exploits']:>9}")


if __name__ == "__main__":
    main()
