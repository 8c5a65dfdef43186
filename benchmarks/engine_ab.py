"""The in-process decoder from two checkouts, A against B, on the same weights, alternated: aggregate tokens/s.

Each measurement runs in a fresh process whose `rugpt_ray` is the checkout's (first on `PYTHONPATH`): a
ruGPT3Small-shaped model with random weights (benchmarks/peers_cpu.py's, seed 0) in `--dtype`, laid out as the
server lays it out (`with_dtype`, then `prepack`), decodes `--tokens` greedy tokens for each row count of `--rows`
(peers_cpu.ours_engine). Pairs alternate which checkout goes first. Printed: each side's tokens/s per pair and B over
A per pair.

    .venv/bin/python benchmarks/engine_ab.py A_CHECKOUT B_CHECKOUT [--dtype bfloat16] [--rows 1,16] [--pairs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(dtype: str, rows: list[int], tokens: int, threads: int) -> dict[int, float]:
    """Tokens/s per row count, in this process (its `rugpt_ray` is whichever the path gives)."""
    import torch

    sys.path.insert(0, str(HERE))
    from peers_cpu import SMALL, ours_engine

    from rugpt_ray.config import data_root
    from rugpt_ray.model import GPT
    from rugpt_ray.quantization import prepack, with_dtype
    from rugpt_ray.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(data_root() / "tokenizer")
    model = prepack(with_dtype(GPT(SMALL).eval(), dtype))
    ours_engine(model, tokenizer, 1, 8)  # warm-up
    return {n: ours_engine(model, tokenizer, n, tokens) for n in rows}


def measure_in(checkout: Path, args) -> dict[int, float]:
    """`measure` in a fresh process that imports the checkout's package."""
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", str(checkout), str(checkout),
               "--dtype", args.dtype, "--rows", args.rows, "--tokens", str(args.tokens), "--threads", str(args.threads)]
    out = subprocess.run(command, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, capture_output=True,
                         text=True, check=True)
    return {int(n): v for n, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="checkout A")
    parser.add_argument("b", type=Path, help="checkout B")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default="bfloat16")
    parser.add_argument("--rows", default="1,16", help="comma-separated sequence counts")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--pairs", type=int, default=4, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = [int(n) for n in args.rows.split(",")]
    if args.measure:
        print(json.dumps(measure(args.dtype, rows, args.tokens, args.threads)))
        return
    checkouts = {"A": args.a.resolve(), "B": args.b.resolve()}
    got: dict[str, list[dict[int, float]]] = {"A": [], "B": []}
    for pair in range(args.pairs):
        for side in ("A", "B") if pair % 2 == 0 else ("B", "A"):
            got[side].append(measure_in(checkouts[side], args))
        sides = [f"{side} " + ", ".join(f"{n} rows {v:.1f}" for n, v in got[side][-1].items()) for side in got]
        print(f"pair {pair + 1}: " + "; ".join(sides), flush=True)
    print(f"{args.dtype}, {args.tokens} tokens a sequence, {args.threads} threads (A = {checkouts['A']}, "
          f"B = {checkouts['B']}):")
    for n in rows:
        a, b = [g[n] for g in got["A"]], [g[n] for g in got["B"]]
        print(f"  {n} rows: A {', '.join(f'{v:.1f}' for v in a)}; B {', '.join(f'{v:.1f}' for v in b)} tokens/s; "
              f"B/A per pair {', '.join(f'{y / x:.3f}' for x, y in zip(a, b, strict=True))}")


if __name__ == "__main__":
    main()
