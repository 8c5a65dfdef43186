"""Issue 13's GPU measurement in one command: ceilings, sparse attention paths, GPU correctness, training speed.

On CUDA (bf16), in order, each section's results added to the JSON as soon as it is done:
1. ceilings: device copy GB/s (bytes read + written) and a bf16 8192^3 matmul's TFLOP/s (the MFU denominator);
2. attention, B=1 H=16 D=128, XL layout, seq 2048 and 8192: forward and forward+backward (median ms) of dense
   causal flash SDPA, SDPA with the layout as a boolean mask, FlexAttention with a block mask and the Triton kernel,
   and each sparse path's relative error (output, dq, dk, dv) vs an fp32 reference on fresh random inputs;
3. model: an XL-shaped alternating sparse model (2 layers), bf16 through the kernel, against the same weights in
   fp32 on the reference path: relative error of the logits and of all parameter gradients (bf16 on the reference
   path beside it, so a miss can be told from bf16's own rounding);
4. training tokens/s and MFU, seq 2048, bf16, with the Ray Train worker's step (a DeepSpeed engine over
   `rugpt_ray.train`'s AdamW groups and config, fused AdamW, engine(...) / backward / step): ours small (12x768)
   dense, ours XL (24x2048, 16 heads) alternating sparse, and HF GPT2LMHeadModel of both shapes as the baseline.
   Without DeepSpeed those rows say "deepspeed not installed" (Ray is not needed: nothing here imports it);
5. the issue's targets, as ratios of this run's numbers, each met or missed.
Tables are printed last. With --cpu-toy (the default without CUDA) everything runs at toy sizes on CPU, the kernel
in Triton's interpreter (FlexAttention forward only: no CPU backward); times there mean nothing, errors do.
The exit status is 1 when a correctness check fails or a path errors; missed speed targets are results, not errors.

    PYTHONPATH=. python benchmarks/gpu_suite.py [--out gpu_suite.json] [--cpu-toy] [--seq 2048 8192]
        [--sections ceilings attention model train] [--zero-stage 0]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rugpt_ray.attention import flex_attention, flex_block_mask, layout_token_mask
from rugpt_ray.config import ModelConfig, TrainConfig, deepspeed_engine_config, preset
from rugpt_ray.model import GPT
from rugpt_ray.sparse_config import XL_SPARSE_ATTENTION
from rugpt_ray.sparse_kernel import block_sparse_attention
from rugpt_ray.sparsity import layout_density, make_layout
from rugpt_ray.train import build_engine, flops_per_token, micro_step

REL_TOL = 2e-2
SECTIONS = ("ceilings", "attention", "model", "train")
# issue 13's bars for the kernel over dense causal flash SDPA, (forward, forward+backward), at the shorter and the
# longer sequence (2048 and 8192 on CUDA)
ATTENTION_BARS = ((0.8, 1.0), (0.3, 0.5))
SMALL_MFU_BAR = 0.45
XL_SPEEDUP_BAR = 1.75
NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], object], cuda: bool, reps: int) -> float:
    """Median ms of `fn` (CUDA: triton's do_bench, which flushes the L2 cache between runs)."""
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
    """||got - want|| / ||want||; refuses an all-zero reference, which any wrong result would match."""
    want = want.detach().float()
    if not want.abs().max() > 0:
        raise ValueError("the reference is all zeros: the check would prove nothing")
    return ((got.detach().float() - want).norm() / want.norm()).item()


def guarded(row: dict[str, Any], fn: Callable[[], None]) -> None:
    """Run one measurement; an exception marks its row failed (with the error) instead of ending the suite."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one broken path must not cost the other measurements of a GPU run
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        row["ok"] = False


# --------------------------------------------------------------------------------------------- 1. ceilings

def ceilings(device: str, toy: bool, reps: int) -> dict[str, float]:
    cuda = device == "cuda"
    x = torch.empty(2**22 if toy else 2**30, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    copy_ms = bench_ms(lambda: y.copy_(x), cuda, reps)
    n = 256 if toy else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = bench_ms(lambda: a @ b, cuda, reps)
    return {"copy_GBps": 2 * x.numel() * x.element_size() / (copy_ms / 1e3) / 1e9,
            "bf16_matmul_TFLOPs": 2 * n**3 / (matmul_ms / 1e3) / 1e12, "matmul_n": n}


# --------------------------------------------------------------------------------------------- 2. attention

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

        def measure(row=row, name=name, fn=fn, has_bwd=has_bwd):
            inputs = (q, k, v) if has_bwd else (q.detach(), k.detach(), v.detach())  # CPU flex: no requires_grad
            with torch.no_grad():
                row["fwd_ms"] = bench_ms(lambda: fn(*inputs), cuda, reps)
            out = fn(*inputs)
            if has_bwd:
                row["fwd_bwd_ms"] = bench_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), g), cuda, reps)
                grads = torch.autograd.grad(out, (q, k, v), g)
            if name != "sdpa_dense_causal":
                errs = {"out": rel_err(out, ref)}
                if has_bwd:
                    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", grads, ref_grads, strict=True)})
                row["rel_err"] = errs
                row["ok"] = all(e <= REL_TOL for e in errs.values())

        guarded(row, measure)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- 3. model

def model_check(device: str, toy: bool) -> list[dict]:
    """bf16 alternating sparse model (kernel, and reference for scale) vs the same weights in fp32 on the reference
    path: logits and all parameter gradients, relative error."""
    cfg = preset("tiny", **NO_DROPOUT) if toy else preset("xl", n_layer=2, **NO_DROPOUT)
    seq = 100 if toy else 2048  # toy: not a multiple of the block
    torch.manual_seed(0)
    with torch.device(device):
        ref = GPT(cfg, attn_impl="reference").train()
    gen = torch.Generator(device=device).manual_seed(13)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), device=device, generator=gen)
    x, targets = tokens[:, :-1], tokens[:, 1:]

    def run(model: GPT) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits, loss = model(x, targets=targets)
        loss.backward()
        return logits.detach(), [p.grad for p in model.parameters()]

    want_logits, want_grads = run(ref)
    rows = []
    for impl in ("triton", "reference"):
        row: dict[str, Any] = {"check": f"model bf16 {impl} vs fp32 reference", "impl": impl, "seq": seq,
                               "shape": f"{cfg.n_layer}x{cfg.n_embd}, {cfg.n_head} heads, {cfg.sparse_mode}"}

        def measure(row=row, impl=impl):
            model = copy.deepcopy(ref).to(torch.bfloat16)
            model.attn_impl = impl
            logits, grads = run(model)
            flat = torch.cat([g.float().flatten() for g in grads])
            per_param = {name: rel_err(g, w) for (name, _), g, w in zip(ref.named_parameters(), grads, want_grads,
                                                                          strict=True)}
            worst = max(per_param, key=per_param.get)
            row["rel_err"] = {"logits": rel_err(logits, want_logits),
                              "grads": rel_err(flat, torch.cat([g.flatten() for g in want_grads]))}
            row["worst_param"] = {"name": worst, "rel_err": per_param[worst]}
            row["ok"] = all(e <= REL_TOL for e in row["rel_err"].values())

        guarded(row, measure)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- 4. training

def _single_process_group(device: str) -> None:
    """The one-rank process group that Ray Train would have set up for the worker."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def _hf_gpt2(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_positions=cfg.n_positions,
                    vocab_size=cfg.vocab_size, activation_function="gelu_new", attn_implementation="sdpa")
    return GPT2LMHeadModel(hf)


TRAIN_ROLES = ("small", "hf_small", "xl_sparse", "hf_xl")


def train_models(toy: bool) -> list[tuple[str, str, ModelConfig, str | None, int]]:
    """(role, name, shape, our attn_impl or None for HF, micro-batch) per TRAIN_ROLES; toy: the kernel forced
    (auto on CPU is SDPA with the layout mask)."""
    if toy:
        dense, sparse = preset("tiny", sparse_mode="none", sparse_attention=None), preset("tiny")
        models = [("ours tiny dense", dense, "auto", 2), ("hf tiny dense", dense, None, 2),
                  ("ours tiny alternating sparse", sparse, "triton", 2), ("hf tiny dense (xl's role)", sparse, None, 2)]
    else:
        small, xl = preset("small"), preset("xl")
        models = [("ours small dense", small, "auto", 8), ("hf small dense", small, None, 8),
                  ("ours xl alternating sparse", xl, "auto", 4), ("hf xl dense", xl, None, 4)]
    return [(role, *model) for role, model in zip(TRAIN_ROLES, models, strict=True)]


def worker_step(engine, tokens: torch.Tensor, ours: bool) -> torch.Tensor:
    """The Ray Train worker's micro-step (rugpt_ray.train.micro_step); HF models take `labels`."""
    if ours:
        return micro_step(engine, tokens, pad_id=-1)  # -1: no token is padding
    loss = engine(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # HF shifts the labels itself
    engine.backward(loss)
    engine.step()
    return loss


def train_row(name: str, cfg: ModelConfig, attn_impl: str | None, micro_batch: int, seq: int, device: str,
              zero_stage: int, steps: int, warmup: int, ceiling_flops: float | None) -> dict[str, Any]:
    """tokens/s and MFU of `steps` timed optimizer steps of the worker's step, after `warmup` untimed ones."""
    row: dict[str, Any] = {"model": name, "shape": f"{cfg.n_layer}x{cfg.n_embd}", "seq": seq,
                           "micro_batch": micro_batch, "zero_stage": zero_stage}
    try:
        import deepspeed  # noqa: F401  (is it installed and importable?)
    except ImportError as e:
        row["skipped"] = "deepspeed not installed" if e.name == "deepspeed" else f"deepspeed not importable: {e}"
        return row
    cuda = device == "cuda"
    train_cfg = TrainConfig(precision="bf16", zero_stage=zero_stage, micro_batch=micro_batch, seq_len=seq,
                            use_gpu=cuda, max_steps=steps + warmup)
    _single_process_group(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg, attn_impl=attn_impl).train() if attn_impl else _hf_gpt2(cfg).train()
    params = sum(p.numel() for p in model.parameters())
    row["attention"] = model.attention_impl(torch.device(device)) if attn_impl else "hf sdpa"
    engine = build_engine(model, train_cfg, deepspeed_engine_config(train_cfg), steps + warmup)
    gen = torch.Generator(device=device).manual_seed(1)
    batches = (torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), device=device, generator=gen)
               for _ in range(warmup + steps))
    try:
        for _ in range(warmup):
            worker_step(engine, next(batches), ours=attn_impl is not None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = worker_step(engine, next(batches), ours=attn_impl is not None)
        sync(device)
        elapsed = time.perf_counter() - start
        tok_s = steps * micro_batch * seq / elapsed
        row.update(params=params, tokens_per_s=tok_s, loss=loss.item(), step_ms=elapsed / steps * 1e3)
        if ceiling_flops:
            row["mfu"] = tok_s * flops_per_token(cfg, params, seq) / ceiling_flops
        if cuda:
            row["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        row["ok"] = bool(torch.isfinite(torch.tensor(row["loss"])))
    finally:
        engine.destroy()
        del engine, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------- 5. targets

def targets(attention: list[dict], training: list[dict], seqs: list[int]) -> list[dict]:
    """The issue's targets from this run's numbers: value, bar, and met (None: not measured here)."""
    out = []

    def add(name: str, value: float | None, op: str, bar: float) -> None:
        met = None if value is None else (value <= bar if op == "<=" else value >= bar)
        out.append({"target": name, "value": value, "op": op, "bar": bar, "met": met})

    by_path = {(r["path"], r["seq"]): r for r in attention}
    for seq, (fwd_bar, fwd_bwd_bar) in zip(sorted(seqs), ATTENTION_BARS, strict=False):
        kernel, flash = by_path.get(("block_sparse_kernel", seq), {}), by_path.get(("sdpa_dense_causal", seq), {})
        for key, label, bar in (("fwd_ms", "fwd", fwd_bar), ("fwd_bwd_ms", "fwd+bwd", fwd_bwd_bar)):
            ratio = kernel[key] / flash[key] if key in kernel and key in flash else None
            add(f"kernel / dense flash {label}, seq {seq}", ratio, "<=", bar)
    by_role = {r["role"]: r for r in training}
    small, sparse, hf_xl = (by_role.get(role, {}) for role in ("small", "xl_sparse", "hf_xl"))
    add("small dense MFU (6N + attention FLOPs / measured matmul)", small.get("mfu"), ">=", SMALL_MFU_BAR)
    speedup = (sparse["tokens_per_s"] / hf_xl["tokens_per_s"]
               if "tokens_per_s" in sparse and "tokens_per_s" in hf_xl else None)
    add("xl alternating sparse tokens/s / hf xl dense tokens/s", speedup, ">=", XL_SPEEDUP_BAR)
    return out


# --------------------------------------------------------------------------------------------- tables

def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ok(row: dict) -> str:
    return {True: "yes", False: "NO"}.get(row.get("ok"), "-")


def _error(row: dict) -> str:
    return f"  {row['error']}" if "error" in row else ""


def tables(result: dict[str, Any]) -> str:
    out = [f"# {result['device']} ({result['mode']}), torch {result['torch']}, triton {result['triton']}"]
    c = result.get("ceilings")
    if c:
        out += ["", f"ceilings: copy {c['copy_GBps']:.4g} GB/s, bf16 matmul ({c['matmul_n']}^3) "
                    f"{c['bf16_matmul_TFLOPs']:.4g} TFLOP/s"]
    if result.get("rows"):
        head = f"{'attention path':<22}{'seq':>6}{'fwd ms':>10}{'fwd+bwd ms':>12}{'max rel err':>13}  ok"
        out += ["", head, "-" * len(head)]
        for r in result["rows"]:
            err = f"{max(r['rel_err'].values()):.2e}" if "rel_err" in r else "-"
            out.append(f"{r['path']:<22}{r['seq']:>6}{_f(r.get('fwd_ms'), '.4f'):>10}"
                       f"{_f(r.get('fwd_bwd_ms'), '.4f'):>12}{err:>13}  {_ok(r)}{_error(r)}")
    if result.get("model_check"):
        head = f"{'model check':<42}{'logits':>10}{'grads':>10}  worst parameter"
        out += ["", head, "-" * len(head)]
        for r in result["model_check"]:
            e = r.get("rel_err", {})
            worst = f"{r['worst_param']['name']} {r['worst_param']['rel_err']:.2e}" if "worst_param" in r else ""
            out.append(f"{r['check']:<42}{_f(e.get('logits'), '.2e'):>10}{_f(e.get('grads'), '.2e'):>10}  {worst}"
                       f"  ok: {_ok(r)}{_error(r)}")
    if result.get("training"):
        head = (f"{'training (bf16, DeepSpeed)':<30}{'attention':>10}{'mb x seq':>10}{'tokens/s':>11}{'MFU':>7}"
                f"{'GiB':>7}")
        out += ["", head, "-" * len(head)]
        for r in result["training"]:
            size = f"{r['micro_batch']}x{r['seq']}"
            if "tokens_per_s" not in r:
                out.append(f"{r['model']:<30}{'':>10}{size:>10}  {r.get('skipped') or r.get('error')}")
                continue
            out.append(f"{r['model']:<30}{r['attention']:>10}{size:>10}{r['tokens_per_s']:>11.0f}"
                       f"{_f(r.get('mfu'), '.3f'):>7}{_f(r.get('peak_memory_GiB'), '.1f'):>7}")
    if result.get("targets"):
        note = "  (toy sizes: met/missed means nothing)" if result["mode"] == "cpu-toy" else ""
        out += ["", f"targets{note}", "-" * 72]
        for t in result["targets"]:
            status = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            out.append(f"{t['target']:<56}{_f(t['value'], '.3f'):>8} {t['op']} {t['bar']:<5} {status}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here (after every section)")
    parser.add_argument("--cpu-toy", action="store_true", help="toy sizes on CPU (the default without CUDA)")
    parser.add_argument("--seq", type=int, nargs="+", default=None, help="attention lengths (default 2048 8192)")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--reps", type=int, default=1, help="CPU repetitions per timing (CUDA: do_bench)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--zero-stage", type=int, choices=(0, 1), default=0, help="DeepSpeed ZeRO stage (training)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed optimizer steps per model")
    args = parser.parse_args()

    toy = args.cpu_toy or not torch.cuda.is_available()
    if toy:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device, dtype, train_seq = "cpu", torch.float32, 64
        seqs, heads, dim = args.seq or [130, 300], args.heads or 2, args.dim or 32
    else:
        device, dtype, train_seq = "cuda", torch.bfloat16, 2048
        seqs, heads, dim = args.seq or [2048, 8192], args.heads or 16, args.dim or 128
    import triton

    block = XL_SPARSE_ATTENTION["block"]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "mode": "cpu-toy" if toy else "cuda",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "density": {s: layout_density(make_layout(XL_SPARSE_ATTENTION, heads, -(-s // block) * block)) for s in seqs},
    }

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    def log(msg: str) -> None:
        print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if "ceilings" in args.sections:
        log("ceilings")
        result["ceilings"] = ceilings(device, toy, args.reps)
        save()
    if "attention" in args.sections:
        result["rows"] = []
        for seq in seqs:
            log(f"attention, seq {seq}")
            result["rows"] += run_case(seq, heads, dim, dtype, device, args.reps)
            save()
    if "model" in args.sections:
        log("model gradients, bf16 vs fp32")
        result["model_check"] = model_check(device, toy)
        save()
    if "train" in args.sections:
        ceiling = result.get("ceilings", {}).get("bf16_matmul_TFLOPs")
        steps = args.train_steps or (2 if toy else 10)
        result["training"] = []
        for role, name, cfg, impl, micro_batch in train_models(toy):
            log(f"training {name}")
            row = {"role": role, "model": name, "seq": train_seq, "micro_batch": micro_batch}

            def measure(row=row, name=name, cfg=cfg, impl=impl, micro_batch=micro_batch):
                row.update(train_row(name, cfg, impl, micro_batch, train_seq, device, args.zero_stage, steps,
                                     1 if toy else 3, ceiling * 1e12 if ceiling else None))

            guarded(row, measure)
            result["training"].append(row)
            save()
    result["targets"] = targets(result.get("rows", []), result.get("training", []), seqs)
    save()
    print(tables(result))
    failed = [r.get("path") or r.get("check") or r.get("model") for key in ("rows", "model_check", "training")
              for r in result.get(key, []) if r.get("ok") is False]
    if failed:
        print(f"FAILED (error, or rel. error above {REL_TOL}):", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
