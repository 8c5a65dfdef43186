"""Training progress as the user reads it: one clean line per log interval, or a bar with ETA on a terminal.

Printed by the driver, not by the workers: rank 0 writes metrics.jsonl (locally or behind a URI) and a thread here
follows the file. Workers' output reaches the driver through Ray's log forwarding, line by line and with a prefix,
so it can neither be a bar nor be known to go to a terminal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

from rugpt_ray.storage import read_text

POLL_S = 1.0
BAR_WIDTH = 24
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
"""Ray Train's switch for its PreemptionWatcher actor (read on the driver and passed to the run's controller)."""


def progress_line(row: dict[str, Any], steps: int, tokens_per_step: int) -> str:
    """`step 40/120 | loss 6.12 | ppl 455 | lr 0.0029 | 1,948 tokens/s | ETA 1m20s` (+ validation when it ran)."""
    parts = [f"step {row['step']}/{steps}"]
    for key in ("loss", "ppl", "lr", "valid_loss", "valid_ppl"):
        if key in row:
            parts.append(f"{key} {row[key]:.4g}")
    rate = row.get("tokens_per_s")
    if rate:
        parts.append(f"{rate:,.0f} tokens/s")
        parts.append(f"ETA {format_seconds((steps - row['step']) * tokens_per_step / rate)}")
    return " | ".join(parts)


def format_seconds(seconds: float) -> str:
    """`45s`, `3m05s`, `2h07m`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressPrinter:
    """Prints the rows of a metrics.jsonl not printed yet: lines, or on a terminal one bar redrawn in place (with a
    line kept for each evaluation)."""

    def __init__(self, metrics_file: str, steps: int, tokens_per_step: int, out: TextIO | None = None):
        self.metrics_file, self.steps, self.tokens_per_step = metrics_file, steps, tokens_per_step
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.last_step = -1
        self.bar_shown = False

    def skip_written(self) -> None:
        """Print nothing of what the file holds now (a resumed run printed those rows then)."""
        self.last_step = max((row["step"] for row in self._rows()), default=-1)

    def poll(self) -> None:
        for row in self._rows():
            if row["step"] > self.last_step:
                self.last_step = row["step"]
                self._show(row)

    def _rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (read_text(self.metrics_file) or "").splitlines() if line.strip()]

    def close(self) -> None:
        self.poll()
        if self.bar_shown:
            print(file=self.out, flush=True)
            self.bar_shown = False

    def _show(self, row: dict[str, Any]) -> None:
        line = progress_line(row, self.steps, self.tokens_per_step)
        if not self.tty:
            print(line, file=self.out, flush=True)
            return
        if "valid_loss" in row:
            print(f"\r{line}\033[K", file=self.out, flush=True)
        done = min(BAR_WIDTH, BAR_WIDTH * row["step"] // max(self.steps, 1))
        bar = "#" * done + "." * (BAR_WIDTH - done)
        print(f"\r[{bar}] {line}\033[K", end="", file=self.out, flush=True)
        self.bar_shown = True


@contextlib.contextmanager
def follow_progress(metrics_file: str, steps: int, tokens_per_step: int, *, quiet: bool = False) -> Iterator[None]:
    """Print the run's progress while the body runs (a training fit), and the rows that came last after it."""
    if quiet:
        yield
        return
    printer = ProgressPrinter(metrics_file, steps, tokens_per_step)
    printer.skip_written()
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(POLL_S):
            printer.poll()

    thread = threading.Thread(target=follow, name="rugpt-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        printer.close()


def quiet_ray(log_level: str) -> None:
    """Below `debug`, leave out on the driver what Ray prints that reads like a failure to a newcomer, at its source
    (Ray is connected): Ray Data's INFO lines, its bars (`read_parquet`'s "Parquet dataset sampling") and its note
    that bars are off; and on a one-node cluster Ray Train's PreemptionWatcher, whose creation logs a core_worker
    error in Ray 2.60 (ray#53727) and which watches for other nodes being drained, where there are none. A
    variable the user set wins. Warnings and errors of Ray's otherwise still show; `debug` keeps everything."""
    import ray
    import ray.data

    if log_level == "debug":
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if sum(node["Alive"] for node in ray.nodes()) == 1:
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
