"""rugpt-ray against llama.cpp and vLLM on the same weights, on this machine's CPU: the engines, then the HTTP
servers.

A ruGPT3Small-shaped model (12 x 768, 50264 rows; random weights, so every run decodes the whole budget) is saved,
exported to HF and converted to GGUF (f32 and bf16) with llama.cpp's converter (benchmarks/to_gguf.py). Then, each
part alternated `--rounds` times so that background load hits every side alike:

- engines, greedy, `--engine-tokens` new tokens after an 8-token prompt, on `--threads` threads: ours
  (`generate` on the weights as `rugpt-ray serve` lays them out: `prepack`, fp32 and bf16, 1 and 16 sequences)
  against `llama-bench` (1 sequence), `llama-batched-bench` (16 sequences) and vLLM's `LLM.generate`,
  aggregate tokens/s;
- the batch-1 floor, in each round: the bytes of weights a decode step reads over this machine's read bandwidth
  (a sum over 1 GiB, best of 5), the fastest any engine could decode one sequence;
- HTTP servers, one at a time on 127.0.0.1 (an idle one's background loops would fall on the one measured),
  started anew each round: `rugpt-ray serve` (Ray Serve, fp32, `--num-cpus` the threads), through its router and
  with `--ingress direct`, `llama-server` (f32 GGUF, 16 slots) and vLLM's OpenAI server (fp32); streamed greedy
  and sampled `/v1/completions` of `--max-tokens` tokens from 1 and from `--clients` closed-loop clients
  (benchmarks/serve_load.py's load, on raw asyncio streams: it shares the cores): requests/s, tokens/s, time to
  first token, and the cores the load generator (this process) took;
- the Serve path's share: just before each of our servers starts and just after it stops, with no server up, our
  engine in this process does the greedy requests' work (1 and `--clients` sequences of `--max-tokens` tokens,
  prefill included); that server's greedy tokens/s are given over the mean of the two, round by round (the host's
  speed drifts, so the baseline is taken as close to the server's run as it can be without a server up).

Peers come from benchmarks/peers_setup.sh's PEERS_DIR/peers.env; a peer that is not there (or does not start) is
reported as not measured, and the rest still runs. vLLM's CPU build runs in its own venv: its offline engine
through benchmarks/vllm_engine.py (fp32 and bf16, kept up across rounds), its OpenAI server on the HF folder
(fp32).

`--threads` is every core by default. Fewer leave the servers' other processes (Ray Serve's router, the
load generator) a core of their own: the Serve path's cost apart from contention for the engine's cores.

    .venv/bin/python benchmarks/peers_cpu.py PEERS_DIR [--rounds 2] [--duration 8] [--threads N] [--out result.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, load, one_request, summary  # noqa: E402
from to_gguf import peers_env  # noqa: E402

from rugpt_ray.checkpoints import export_hf, save_native  # noqa: E402
from rugpt_ray.config import ModelConfig, data_root  # noqa: E402
from rugpt_ray.generation import GenerationConfig, generate  # noqa: E402
from rugpt_ray.model import GPT  # noqa: E402
from rugpt_ray.quantization import prepack, with_dtype  # noqa: E402
from rugpt_ray.tokenizer import load_tokenizer  # noqa: E402

SMALL = ModelConfig(n_layer=12, n_embd=768, n_head=12, n_positions=2048, vocab_size=50264)
PROMPT = "Александр Сергеевич Пушкин родился в"
SERVED = "small"
"""The model's name on every server, which the requests name."""
OURS = ("rugpt-ray serve", "rugpt-ray serve --ingress direct")
"""Our servers' names in the results: through the router, and the model server as its own ingress."""
CORES = os.cpu_count() or 1
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
"""vLLM's CPU KV cache, in GiB (its default, 4, is more than these runs use)."""


def vllm_env(threads: int) -> dict[str, str]:
    """vLLM's settings: its cache, and its OpenMP threads bound to the first `threads` cores."""
    return {**VLLM_ENV, **({"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"} if threads < CORES else {})}


def ours_engine(model: GPT, tokenizer, rows: int, tokens: int) -> float:
    """Aggregate tokens/s of `rows` greedy sequences of `tokens` new tokens each, in this process."""
    cfg = GenerationConfig(max_new_tokens=tokens, greedy=True, ignore_eos=True)
    start = time.perf_counter()
    completions = generate(model, tokenizer, [PROMPT] * rows, cfg)
    return sum(len(c.token_ids) for c in completions) / (time.perf_counter() - start)


def llama_engine(binary: Path, gguf: Path, rows: int, tokens: int, threads: int) -> float:
    """Aggregate generation tokens/s from llama-bench (1 sequence) or llama-batched-bench (several)."""
    if rows == 1:
        out = subprocess.run([str(binary / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(tokens),
                              "-t", str(threads), "-r", "1", "-o", "jsonl"], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["avg_ts"]
    out = subprocess.run([str(binary / "llama-batched-bench"), "-m", str(gguf), "-c", str(rows * (tokens + 16)),
                          "-npp", "8", "-ntg", str(tokens), "-npl", str(rows), "-t", str(threads),
                          "--output-format", "jsonl"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["speed_tg"]


class VllmEngine:
    """vLLM's offline engine in `dtype`, in its own venv's Python (benchmarks/vllm_engine.py), kept up across
    rounds so that each measurement pays no start."""

    def __init__(self, python: str, hf: Path, dtype: str, log: Path, threads: int):
        script = Path(__file__).with_name("vllm_engine.py")
        with log.open("w") as stderr:
            self.process = subprocess.Popen([python, str(script), str(hf), dtype, PROMPT], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                                            env={**os.environ, **vllm_env(threads)})
        if self._line() != "ready":
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"vLLM ({dtype}) did not start: exit {self.process.poll()}: {' '.join(tail)}")

    def tokens_per_s(self, rows: int, tokens: int) -> float:
        self.process.stdin.write(f"{rows} {tokens}\n")
        self.process.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)

    def _line(self) -> str:
        while line := self.process.stdout.readline():  # vLLM's own prints come first
            if line.strip() == "ready" or line.strip().replace(".", "", 1).isdigit():
                return line.strip()
        return ""


def wait_for(url: str, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")


def request_body(model: str, tokens: int, sampled: bool) -> dict:
    return {"model": model, "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True, **({"temperature": 1.0, "top_p": 0.9} if sampled else {"temperature": 0.0})}


async def http_round(url: str, model: str, clients: int, duration: float, tokens: int, sampled: bool) -> dict:
    """`clients` closed-loop streaming clients for `duration` seconds (serve_load.load), and the cores this process,
    the load generator, took meanwhile."""
    cpu_before, start = time.process_time(), time.perf_counter()
    results, elapsed = await load(url, clients, duration, request_body(model, tokens, sampled))
    load_generator_cores = (time.process_time() - cpu_before) / (time.perf_counter() - start)
    return {**summary(clients, results, elapsed), "load_generator_cores": load_generator_cores}


async def warm_up(url: str, model: str, tokens: int) -> None:
    await one_request(url, {**request_body(model, tokens, False), "prompt": PROMPT})


def save_models(scratch: Path, tokenizer_dir: Path, llama: Path | None,
                peers: Path) -> tuple[GPT, Path, Path, dict]:
    """The random model, its native and HF folders, and its GGUF files per dtype (none without llama.cpp)."""
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    native = save_native(model, scratch / "native")
    hf = export_hf(model, scratch / "hf", tokenizer_folder=tokenizer_dir)
    ggufs = {}
    for dtype in ("f32", "bf16") if llama else ():
        ggufs[dtype] = scratch / f"small-{dtype}.gguf"
        subprocess.run([sys.executable, str(Path(__file__).with_name("to_gguf.py")), str(peers), str(hf),
                        str(ggufs[dtype]), dtype], check=True, capture_output=True)
    return model, native, hf, ggufs


def read_bandwidth() -> float:
    """Bytes per second this machine reads from memory on every thread: a sum over 1 GiB of float32, far past any
    cache, best of 5."""
    data, best = torch.ones(1 << 28), 0.0
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = max(best, data.numel() * data.element_size() / (time.perf_counter() - start))
    return best


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes of weights one decode step reads: every block's, the last LayerNorm's and the output layer's (the
    embeddings are looked up, one row per token)."""
    read = [*model.transformer.h.parameters(), *model.transformer.ln_f.parameters(), model.lm_head.weight]
    return sum(t.numel() * t.element_size() for t in read)


def served_models(model: GPT) -> tuple[dict[str, int], dict[str, GPT]]:
    """`model` (fp32) in fp32 and bf16: the bytes of weights a decode step reads in each, and a copy of each laid out
    as `rugpt-ray serve` lays it out (`prepack`)."""
    plain = {"fp32": model, "bf16": with_dtype(copy.deepcopy(model), "bfloat16")}
    weights = {dtype: weight_bytes_per_token(m) for dtype, m in plain.items()}
    return weights, {dtype: prepack(copy.deepcopy(m)) for dtype, m in plain.items()}


def measure_engines(model: GPT, tokenizer, llama: Path | None, ggufs: dict, vllm: dict[str, VllmEngine], args,
                    loads: list) -> dict:
    """Aggregate tokens/s per engine, dtype and sequence count, and the batch-1 floor per dtype, one figure per
    round."""
    weights, models = served_models(model)
    engine: dict[str, list[float]] = {}
    ours_engine(models["fp32"], tokenizer, 1, 8)  # warm-up
    for _ in range(args.rounds):
        bandwidth = read_bandwidth()
        for dtype, size in weights.items():
            engine.setdefault(f"floor {dtype}, 1 seq", []).append(bandwidth / size)
        for rows in (1, args.clients):
            for dtype, gguf in (("fp32", "f32"), ("bf16", "bf16")):
                engine.setdefault(f"rugpt-ray {dtype}, {rows} seq", []).append(
                    ours_engine(models[dtype], tokenizer, rows, args.engine_tokens))
                if llama:
                    engine.setdefault(f"llama.cpp {dtype}, {rows} seq", []).append(
                        llama_engine(llama, ggufs[gguf], rows, args.engine_tokens, args.threads))
                if dtype in vllm:
                    engine.setdefault(f"vLLM {dtype}, {rows} seq", []).append(
                        vllm[dtype].tokens_per_s(rows, args.engine_tokens))
        loads.append(os.getloadavg()[0])
    return engine


def server_commands(native: Path, hf: Path, tokenizer_dir: Path, llama: Path | None, ggufs: dict,
                    vllm_python: str | None, clients: int, threads: int) -> dict[str, tuple[list[str], str]]:
    """Each server's command line (its port goes last) and health path."""
    ours = [sys.executable, "-m", "rugpt_ray.cli", "serve", "--model", f"{SERVED}={native}", "--tokenizer",
            str(tokenizer_dir), "--max-batch-size", str(2 * clients), "--num-cpus", str(threads)]
    commands = {OURS[0]: ([*ours, "--port"], "/healthz"),
                OURS[1]: ([*ours, "--ingress", "direct", "--port"], "/healthz")}
    if llama:
        commands["llama-server"] = ([str(llama / "llama-server"), "-m", str(ggufs["f32"]), "--host", "127.0.0.1",
                                     "-t", str(threads), "-np", str(clients), "-c", str(clients * 256), "--port"],
                                    "/health")
    if vllm_python:
        commands["vLLM serve"] = ([vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf),
                                   "--served-model-name", SERVED, "--host", "127.0.0.1", "--dtype", "float32",
                                   "--max-model-len", "512", "--port"], "/health")
    return commands


@contextlib.contextmanager
def running_server(name: str, command: list[str], health: str, log: Path, threads: int) -> Iterator[str]:
    """The server on 127.0.0.1, answering its health path: its URL; stopped after."""
    port = free_port()
    with log.open("a") as out:
        process = subprocess.Popen([*command, str(port)], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **vllm_env(threads)})
    try:
        wait_for(f"http://127.0.0.1:{port}{health}", process, name)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


def same_work(model: GPT, tokenizer, args) -> dict[int, float]:
    """Our engine in this process doing the greedy requests' work: tokens/s of 1 and `--clients` sequences of
    `--max-tokens` tokens, prefill included."""
    return {rows: ours_engine(model, tokenizer, rows, args.max_tokens) for rows in (1, args.clients)}


def measure_servers(commands: dict[str, tuple[list[str], str]], scratch: Path, model: GPT, tokenizer, args,
                    loads: list) -> tuple[dict[str, list[dict]], dict[str, dict[int, list[float]]]]:
    """Requests/s, tokens/s and TTFT per server, sampling and client count, one summary per round, each server up
    alone (an idle `rugpt-ray serve` takes 0.12 of a core for Ray and Serve's background loops, which then falls on
    whichever server is measured), in the other order every other round; and for each of our servers, the mean of
    `same_work` just before it starts and just after it stops: the baseline its share is taken against."""
    http: dict[str, list[dict]] = {}
    baselines: dict[str, dict[int, list[float]]] = {}
    for round_ in range(args.rounds):
        for name in list(commands)[::-1 if round_ % 2 else 1]:
            command, health = commands[name]
            before = same_work(model, tokenizer, args) if name in OURS else None
            with running_server(name, command, health, scratch / f"{name}.log", args.threads) as url:
                asyncio.run(warm_up(url, SERVED, args.max_tokens))
                for sampled in (False, True):
                    for clients in (1, args.clients):
                        key = f"{name}, {'sampled' if sampled else 'greedy'}, {clients} client(s)"
                        http.setdefault(key, []).append(
                            asyncio.run(http_round(url, SERVED, clients, args.duration, args.max_tokens, sampled)))
            if before is not None:
                after = same_work(model, tokenizer, args)
                for rows, speed in before.items():
                    baselines.setdefault(name, {}).setdefault(rows, []).append((speed + after[rows]) / 2)
        loads.append(os.getloadavg()[0])
    return http, baselines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peers", type=Path, help="the folder benchmarks/peers_setup.sh set up")
    parser.add_argument("--rounds", type=int, default=2, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--engine-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per HTTP request")
    parser.add_argument("--clients", type=int, default=16, choices=range(2, 65), metavar="2..64")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per HTTP phase and round")
    parser.add_argument("--threads", type=int, default=CORES, choices=range(1, CORES + 1), metavar=f"1..{CORES}",
                        help="threads each engine and server decodes on (default: every core); fewer leave the "
                             "servers' other processes a core")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    env = peers_env(args.peers)
    llama = Path(env["LLAMA_BIN"]) if "LLAMA_BIN" in env else None
    vllm_python = env.get("VLLM_PYTHON")
    skipped = {} if llama else {"llama.cpp": f"{args.peers / 'peers.env'} names no LLAMA_BIN"}
    if not vllm_python:
        skipped["vLLM"] = f"{args.peers / 'peers.env'} names no VLLM_PYTHON"
    tokenizer_dir = data_root() / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.set_num_threads(args.threads)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="peers-cpu-") as tmp:
        scratch = Path(tmp)
        model, native, hf, ggufs = save_models(scratch, tokenizer_dir, llama, args.peers)
        vllm: dict[str, VllmEngine] = {}
        try:
            for dtype, name in (("fp32", "float32"), ("bf16", "bfloat16")) if vllm_python else ():
                try:
                    vllm[dtype] = VllmEngine(vllm_python, hf, name, scratch / f"vllm-{dtype}.log", args.threads)
                except RuntimeError as e:
                    skipped[f"vLLM engine {dtype}"] = str(e)
            engine = measure_engines(model, tokenizer, llama, ggufs, vllm, args, loads)
        finally:
            for running in vllm.values():
                running.close()
        commands = server_commands(native, hf, tokenizer_dir, llama, ggufs, vllm_python, args.clients, args.threads)
        http, baselines = measure_servers(commands, scratch, prepack(copy.deepcopy(model)), tokenizer, args, loads)

    print(f"\n{platform.processor() or platform.machine()}, {CORES} cores, {args.threads} threads each; "
          f"load average {min(loads):.1f}-{max(loads):.1f}; {args.rounds} alternating rounds (ranges over rounds)")
    for name, why in skipped.items():
        print(f"not measured: {name}: {why}")
    print(f"engines, greedy, {args.engine_tokens} new tokens (aggregate tokens/s):")
    for key, values in engine.items():
        print(f"  {key}: {min(values):.1f}-{max(values):.1f}")
    for dtype in ("fp32", "bf16"):  # per round: a side's batch-1 speed over that round's floor
        floor = engine[f"floor {dtype}, 1 seq"]
        for side in ("rugpt-ray", "llama.cpp", "vLLM"):
            if got := engine.get(f"{side} {dtype}, 1 seq"):
                ratios = ", ".join(f"{g / f:.2f}" for g, f in zip(got, floor, strict=True))
                print(f"  {side} {dtype}, 1 seq / floor, per round: {ratios}")
    print(f"HTTP, streamed /v1/completions of {args.max_tokens} tokens (requests/s, tokens/s, TTFT p50):")
    for key, runs in http.items():
        print(f"  {key}: {min(r['requests_per_s'] for r in runs):.2f}-{max(r['requests_per_s'] for r in runs):.2f} "
              f"req/s, {statistics.median(r['tokens_per_s'] for r in runs):.0f} tokens/s, TTFT "
              f"{statistics.median(r['ttft_p50_ms'] for r in runs):.0f} ms; load generator "
              f"{statistics.median(r['load_generator_cores'] for r in runs):.3f} cores")
    print(f"the Serve path's share of our engine doing the same greedy work in this process ({args.max_tokens} "
          "tokens per sequence, prefill included; the mean of just before the server and just after), per round:")
    for name, per_rows in baselines.items():
        for clients, baseline in per_rows.items():
            got = [r["tokens_per_s"] for r in http[f"{name}, greedy, {clients} client(s)"]]
            shares = ", ".join(f"{g / b:.2f}" for g, b in zip(got, baseline, strict=True))
            print(f"  {name}, {clients} client(s): {shares} (engine {', '.join(f'{b:.1f}' for b in baseline)})")
    if args.out:
        Path(args.out).write_text(json.dumps({"engine": engine, "http": http, "same_work": baselines,
                                              "skipped": skipped,
                                              "load_average": [min(loads), max(loads)]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
