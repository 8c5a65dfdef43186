"""Issue 8 item 4: sparse-attention paths on the XL layout, timed and checked against an fp32 reference.

On CUDA: B=1, H=16, D=128, bf16, seq 2048 and 8192; times the forward and forward+backward (median, ms) of
dense causal SDPA, SDPA with the layout as a boolean mask, FlexAttention with a block mask, and the Triton kernel
`block_sparse_attention`, and reports each sparse path's relative error vs an fp32 SDPA reference (dense: none).
With --cpu-toy (the default without CUDA) the same code runs at toy sizes in fp32, the kernel in Triton's
interpreter (FlexAttention forward only: no CPU backward); times there mean nothing, the errors do.

    python benchmarks/gpu_suite.py [--out gpu_suite.json] [--cpu-toy] [--seq 2048 8192]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rugpt_ray.attention import flex_attention, flex_block_mask, layout_token_mask
from rugpt_ray.sparse_config import XL_SPARSE_ATTENTION
from rugpt_ray.sparse_kernel import block_sparse_attention
from rugpt_ray.sparsity import layout_density, make_layout

TARGETS_MS = {2048: 0.06, 8192: 0.15}  # issue 8, kernel at B=1, H=16, D=128
REL_TOL = 2e-2


def bench_ms(fn, cuda: bool, reps: int) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def paths(layout: torch.Tensor, seq: int, block: int, cuda: bool) -> dict:
    """name -> (attention fn of q, k, v, whether it has a backward here)."""
    pos = torch.arange(seq, device=layout.device)[None]
    mask = layout_token_mask(layout, pos, pos, block)
    block_mask = flex_block_mask(layout, seq, block)
    return {
        "sdpa_dense_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), True),
        "sdpa_layout_mask": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), True),
        "flex_block_mask": (lambda q, k, v: flex_attention(q, k, v, block_mask), cuda),
        "block_sparse_kernel": (lambda q, k, v: block_sparse_attention(q, k, v, layout, block), True),
    }


def run_case(seq: int, heads: int, dim: int, dtype: torch.dtype, device: str, reps: int) -> list[dict]:
    cuda = device == "cuda"
    block = XL_SPARSE_ATTENTION["block"]
    layout = make_layout(XL_SPARSE_ATTENTION, heads, -(-seq // block) * block).bool().to(device)
    gen = torch.Generator(device=device).manual_seed(seq)
    q32, k32, v32, g32 = (torch.randn(1, heads, seq, dim, device=device, generator=gen) for _ in range(4))
    ref_inputs = [x.clone().requires_grad_() for x in (q32, k32, v32)]
    pos = torch.arange(seq, device=device)[None]
    ref = F.scaled_dot_product_attention(*ref_inputs, attn_mask=layout_token_mask(layout, pos, pos, block))
    ref_grads = torch.autograd.grad(ref, ref_inputs, g32)
    q, k, v = (x.to(dtype).requires_grad_() for x in (q32, k32, v32))
    g = g32.to(dtype)
    rows = []
    for name, (fn, has_bwd) in paths(layout, seq, block, cuda).items():
        row = {"path": name, "seq": seq, "heads": heads, "dim": dim, "dtype": str(dtype).removeprefix("torch.")}
        inputs = (q, k, v) if has_bwd else (q.detach(), k.detach(), v.detach())  # CPU flex refuses requires_grad
        with torch.no_grad():
            row["fwd_ms"] = bench_ms(lambda fn=fn, x=inputs: fn(*x), cuda, reps)
        out = fn(*inputs)
        if has_bwd:
            row["fwd_bwd_ms"] = bench_ms(lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), g), cuda, reps)
            grads = torch.autograd.grad(out, (q, k, v), g)
        if name != "sdpa_dense_causal":
            errs = {"out": rel_err(out, ref)}
            if has_bwd:
                errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", grads, ref_grads, strict=True)})
            row["rel_err"] = errs
            row["ok"] = all(e <= REL_TOL for e in errs.values())
        if name == "block_sparse_kernel" and cuda and seq in TARGETS_MS:
            row["target_fwd_ms"] = TARGETS_MS[seq]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'path':<22}{'seq':>6}{'fwd ms':>10}{'fwd+bwd ms':>12}{'max rel err':>13}  ok"
    lines = [head, "-" * len(head)]
    for r in rows:
        bwd = f"{r['fwd_bwd_ms']:.4f}" if "fwd_bwd_ms" in r else "n/a"
        err = f"{max(r['rel_err'].values()):.2e}" if "rel_err" in r else "-"
        ok = {True: "yes", False: "NO"}.get(r.get("ok"), "-")
        lines.append(f"{r['path']:<22}{r['seq']:>6}{r['fwd_ms']:>10.4f}{bwd:>12}{err:>13}  {ok}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--cpu-toy", action="store_true", help="toy sizes on CPU (the default without CUDA)")
    parser.add_argument("--seq", type=int, nargs="+", default=None, help="sequence lengths (default 2048 8192)")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3, help="CPU repetitions per timing (CUDA: do_bench)")
    args = parser.parse_args()

    toy = args.cpu_toy or not torch.cuda.is_available()
    if toy:
        device, dtype = "cpu", torch.float32
        seqs, heads, dim = args.seq or [130, 300], args.heads or 2, args.dim or 32
    else:
        device, dtype = "cuda", torch.bfloat16
        seqs, heads, dim = args.seq or [2048, 8192], args.heads or 16, args.dim or 128
    rows = []
    for seq in seqs:
        rows += run_case(seq, heads, dim, dtype, device, args.reps)
    print(table(rows))
    block = XL_SPARSE_ATTENTION["block"]
    density = {s: layout_density(make_layout(XL_SPARSE_ATTENTION, heads, -(-s // block) * block)) for s in seqs}
    print("XL layout density (fraction of causal blocks kept):", {s: round(d, 4) for s, d in density.items()})
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "mode": "cpu-toy" if toy else "cuda",
        "torch": torch.__version__,
        "density": density,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    failed = [r["path"] for r in rows if r.get("ok") is False]
    if failed:
        print("FAILED (rel. error above", REL_TOL, "):", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
