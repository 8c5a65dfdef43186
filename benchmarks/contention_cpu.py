"""What other work on the engine's cores costs it: our engine alone, against beside a process, or a thread of its
own process, that takes a share of one core.

`rugpt-ray serve` on a machine with as many cores as engine threads shares them with Ray's and Serve's processes
(about 0.09 of a core under load here), the replica's event loops (0.06) and, in a benchmark, the load generator
(0.02). This measures what such work costs the engine, with nothing of Serve in it: a busy loop that spins for
`share` x `--period-ms` and sleeps for the rest, in another process (as Ray's are) or in a thread of the engine's
process (as the event loops are: it also holds the interpreter's lock while it spins).

A ruGPT3Small-shaped random model (benchmarks/peers_cpu.py's) in `--dtype`, laid out as the server lays it out,
decodes `--tokens` greedy tokens for each row count of `--rows`, on `--threads` threads. Each round runs every
case once, alone first, and each case's tokens/s is given over that round's alone. Printed per case: tokens/s and
that ratio per round, and the cores the busy loop took (from /proc, or the thread's own clock).

    .venv/bin/python benchmarks/contention_cpu.py [--dtype float32] [--rows 1,16] [--shares 0.05,0.1,0.2]
        [--period-ms 2] [--rounds 3] [--tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_cpu import CORES, SMALL, ours_engine  # noqa: E402

from rugpt_ray.config import data_root  # noqa: E402
from rugpt_ray.model import GPT  # noqa: E402
from rugpt_ray.quantization import prepack, with_dtype  # noqa: E402
from rugpt_ray.tokenizer import load_tokenizer  # noqa: E402


def spin(share: float, period: float, running: Callable[[], bool]) -> None:
    """Busy for `share` of every `period` seconds, asleep for the rest, while `running()`."""
    busy = share * period
    while running():
        end = time.perf_counter() + busy
        while time.perf_counter() < end:
            pass
        time.sleep(period - busy)


SPIN_PROCESS = ("from __future__ import annotations\nimport sys, time\n" + inspect.getsource(spin)
                + "spin(float(sys.argv[1]), float(sys.argv[2]), lambda: True)\n")
"""The same loop in a bare interpreter (no torch to import)."""


def process_cores(pid: int) -> float:
    """CPU seconds process `pid` has taken (user + system, from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def beside_process(work: Callable[[], float], share: float, period: float) -> tuple[float, float]:
    """`work()`'s result while another process spins `share` of a core, and the cores that process took."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN_PROCESS, str(share), str(period)])
    try:
        time.sleep(0.3)  # its interpreter started
        cpu, start = process_cores(spinner.pid), time.perf_counter()
        result = work()
        return result, (process_cores(spinner.pid) - cpu) / (time.perf_counter() - start)
    finally:
        spinner.kill()
        spinner.wait()


def beside_thread(work: Callable[[], float], share: float, period: float) -> tuple[float, float]:
    """`work()`'s result while a thread of this process spins `share` of a core, and the cores it took."""
    done, taken = threading.Event(), []

    def spinner() -> None:
        cpu, start = time.thread_time(), time.perf_counter()
        spin(share, period, lambda: not done.is_set())
        taken.append((time.thread_time() - cpu) / (time.perf_counter() - start))

    thread = threading.Thread(target=spinner)
    thread.start()
    try:
        result = work()
    finally:
        done.set()
        thread.join()
    return result, taken[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default="float32")
    parser.add_argument("--rows", default="1,16", help="comma-separated sequence counts")
    parser.add_argument("--shares", default="0.05,0.1,0.2", help="comma-separated shares of a core, each < 1")
    parser.add_argument("--period-ms", type=float, default=2.0, help="the busy loop's period")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per sequence")
    parser.add_argument("--threads", type=int, default=CORES, choices=range(1, CORES + 1), metavar=f"1..{CORES}")
    args = parser.parse_args()
    rows = [int(n) for n in args.rows.split(",")]
    shares = [float(s) for s in args.shares.split(",")]
    if not all(0 < s < 1 for s in shares):
        parser.error(f"--shares {args.shares}: each must be between 0 and 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(data_root() / "tokenizer")
    model = prepack(with_dtype(GPT(SMALL).eval(), args.dtype))
    ours_engine(model, tokenizer, 1, 8)  # warm-up
    cases = [("alone", 0.0)] + [(kind, share) for share in shares for kind in ("process", "thread")]
    beside = {"process": beside_process, "thread": beside_thread}
    results: dict[tuple[int, str, float], list[tuple[float, float]]] = {}
    period = args.period_ms / 1000
    for _ in range(args.rounds):
        for n in rows:
            def work(n: int = n) -> float:
                return ours_engine(model, tokenizer, n, args.tokens)

            for kind, share in cases:
                measured = (work(), 0.0) if kind == "alone" else beside[kind](work, share, period)
                results.setdefault((n, kind, share), []).append(measured)
    print(f"{args.dtype}, {args.threads} threads, {args.tokens} tokens a sequence, a busy loop of {args.period_ms} ms")
    for (n, kind, share), runs in results.items():
        alone = [tps for tps, _ in results[(n, "alone", 0.0)]]
        print(f"{n:3d} sequences, {kind:7s} {share:.2f}: tokens/s {', '.join(f'{tps:.1f}' for tps, _ in runs)}; "
              f"over alone {', '.join(f'{tps / a:.3f}' for (tps, _), a in zip(runs, alone, strict=True))}; "
              f"the loop took {', '.join(f'{cores:.3f}' for _, cores in runs)} of a core")


if __name__ == "__main__":
    main()
