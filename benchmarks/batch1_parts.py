"""Where a batch-1 decode step's time goes, against llama.cpp on the same weights.

A ruGPT3Small-shaped random model (benchmarks/peers_cpu.py's), in fp32 and bf16, laid out as `rugpt-ray serve` lays it
out (`prepack`). For each dtype, alternated `--rounds` times on `--threads` threads, tokens/s of one sequence:
- floor: the bytes of weights a step reads over this machine's read bandwidth (peers_cpu.read_bandwidth);
- products alone: the step's 49 products (4 per block and the output layer), the packed layers called back to back
  on one token's activations and nothing else: what the step would make if the rest of it (attention, LayerNorms,
  the KV cache, sampling, Python) cost nothing;
- whole step: `generate` of `--tokens` greedy tokens (peers_cpu.ours_engine);
- llama.cpp: llama-bench on the model's GGUF (when benchmarks/peers_setup.sh set it up in PEERS_DIR).
With the products alone near llama.cpp's whole step, the rest of our step is the gap; below it, the products are.

    .venv/bin/python benchmarks/batch1_parts.py PEERS_DIR [--rounds 3] [--tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_cpu import (  # noqa: E402
    CORES,
    llama_engine,
    ours_engine,
    read_bandwidth,
    save_models,
    served_models,
)
from to_gguf import peers_env  # noqa: E402

from rugpt_ray.config import data_root  # noqa: E402
from rugpt_ray.model import GPT  # noqa: E402
from rugpt_ray.tokenizer import load_tokenizer  # noqa: E402


@torch.no_grad()
def products_alone(model: GPT, tokens: int) -> float:
    """Steps per second of the step's products alone: each block's four layers, then the output layer, on one
    token's activations (their values do not change the time)."""
    layers = [layer for block in model.transformer.h
              for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    layers.append(model.lm_head)
    dtype = model.transformer.wte.weight.dtype
    inputs = {width: torch.randn(1, width, dtype=dtype) for width in {layer.in_features for layer in layers}}
    calls = [(layer, inputs[layer.in_features]) for layer in layers]
    for layer, x in calls:  # warm-up
        layer(x)
    start = time.perf_counter()
    for _ in range(tokens):
        for layer, x in calls:
            layer(x)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peers", type=Path, help="the folder benchmarks/peers_setup.sh set up")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=CORES, choices=range(1, CORES + 1), metavar=f"1..{CORES}")
    args = parser.parse_args()
    env = peers_env(args.peers)
    llama = Path(env["LLAMA_BIN"]) if "LLAMA_BIN" in env else None
    if not llama:
        print(f"not measured: llama.cpp: {args.peers / 'peers.env'} names no LLAMA_BIN")
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(data_root() / "tokenizer")
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="batch1-parts-") as tmp:
        model, _, _, ggufs = save_models(Path(tmp), data_root() / "tokenizer", llama, args.peers)
        weights, served = served_models(model)
        ours_engine(served["fp32"], tokenizer, 1, 8)  # warm-up
        for _ in range(args.rounds):
            bandwidth = read_bandwidth()
            for dtype, gguf in (("fp32", "f32"), ("bf16", "bf16")):
                results.setdefault(f"{dtype} floor", []).append(bandwidth / weights[dtype])
                results.setdefault(f"{dtype} products alone", []).append(products_alone(served[dtype], args.tokens))
                results.setdefault(f"{dtype} whole step", []).append(
                    ours_engine(served[dtype], tokenizer, 1, args.tokens))
                if llama:
                    results.setdefault(f"{dtype} llama.cpp", []).append(
                        llama_engine(llama, ggufs[gguf], 1, args.tokens, args.threads))
    print(f"\n{CORES} cores, {args.threads} threads; one sequence, tokens/s per round ({args.rounds} alternated):")
    for key, values in results.items():
        print(f"  {key}: {', '.join(f'{v:.1f}' for v in values)}")
    for dtype in ("fp32", "bf16"):
        floor = results[f"{dtype} floor"]
        for part in ("products alone", "whole step", "llama.cpp"):
            if got := results.get(f"{dtype} {part}"):
                print(f"  {dtype} {part} / floor: {', '.join(f'{g / f:.2f}' for g, f in zip(got, floor, strict=True))}")


if __name__ == "__main__":
    main()
