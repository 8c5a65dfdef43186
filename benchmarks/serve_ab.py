"""`rugpt-ray serve` from two checkouts, A against B, under the same HTTP load on the same weights, alternated.

Each pair starts one server from each checkout anew (its `rugpt_ray` package first on the path: the server's
working directory and `PYTHONPATH`), in the other order every other pair, on 127.0.0.1, and measures 16 closed-loop
streaming greedy clients (benchmarks/serve_load.py's requests):

- `fixed`: every request 32 new tokens, as benchmarks/peers_cpu.py's HTTP rows (the clients stay in step: their
  requests start together);
- `varied`: each client's requests want 16-48 new tokens (seeded per client), so they end and start at different
  steps, as real traffic does.

The model is ruGPT3Small-shaped with random weights (benchmarks/peers_cpu.py's), fp32, `--num-cpus` the threads.

    .venv/bin/python benchmarks/serve_ab.py A_CHECKOUT B_CHECKOUT [--pairs 4] [--duration 12] [--ingress direct]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_cpu import CORES, SERVED, SMALL, request_body, running_server, warm_up  # noqa: E402
from serve_load import load, summary  # noqa: E402

from rugpt_ray.checkpoints import save_native  # noqa: E402
from rugpt_ray.config import data_root  # noqa: E402
from rugpt_ray.model import GPT  # noqa: E402

CLIENTS = 16
LOADS = {"fixed": (32, 32), "varied": (16, 48)}


async def tokens_per_s(url: str, duration: float, budget: tuple[int, int]) -> float:
    """CLIENTS closed-loop clients for `duration` seconds, each request wanting a seeded number of new tokens in
    `budget` (serve_load.load): aggregate tokens/s."""
    results, elapsed = await load(url, CLIENTS, duration, request_body(SERVED, budget[1], False), budget)
    return summary(CLIENTS, results, elapsed)["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="checkout A (its rugpt_ray/ is served)")
    parser.add_argument("b", type=Path, help="checkout B")
    parser.add_argument("--pairs", type=int, default=4, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per load and server")
    parser.add_argument("--ingress", choices=("router", "direct"), default="direct")
    parser.add_argument("--threads", type=int, default=CORES, choices=range(1, CORES + 1), metavar=f"1..{CORES}")
    args = parser.parse_args()
    checkouts = {"A": args.a.resolve(), "B": args.b.resolve()}
    for name, path in checkouts.items():
        if not (path / "rugpt_ray" / "__init__.py").is_file():
            raise SystemExit(f"serve_ab: checkout {name} ({path}) has no rugpt_ray package")
    scratch = Path(tempfile.mkdtemp(prefix="serve-ab-"))
    torch.manual_seed(0)
    native = save_native(GPT(SMALL).eval(), scratch / "native")
    command = [sys.executable, "-m", "rugpt_ray.cli", "serve", "--model", f"{SERVED}={native}", "--tokenizer",
               str((data_root() / "tokenizer").resolve()), "--max-batch-size", str(2 * CLIENTS), "--num-cpus",
               str(args.threads),
               *(["--ingress", "direct"] if args.ingress == "direct" else []), "--port"]
    print(f"{CORES} cores, {args.threads} threads, {args.ingress} ingress; A = {checkouts['A']}, B = {checkouts['B']}")
    for pair in range(args.pairs):
        for name in ("A", "B") if pair % 2 == 0 else ("B", "A"):
            os.environ["PYTHONPATH"] = str(checkouts[name])
            os.chdir(checkouts[name])  # `python -m` puts the working directory first on the path
            with running_server(name, command, "/healthz", scratch / f"{name}.log", args.threads) as url:
                asyncio.run(warm_up(url, SERVED, 32))
                rates = {load: asyncio.run(tokens_per_s(url, args.duration, budget)) for load, budget in LOADS.items()}
            print(f"pair {pair} {name}: " + ", ".join(f"{load} {rate:.0f} tokens/s" for load, rate in rates.items())
                  + f" (load average {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
