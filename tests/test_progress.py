"""The driver's progress output: one clean line per logged step, a bar on a terminal, nothing printed twice."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rugpt_ray.progress import ProgressPrinter, follow_progress, format_seconds, progress_line

ROW = {"step": 40, "loss": 6.1234, "ppl": 456.7, "lr": 0.0029, "grad_norm": 1.5, "tokens": 81920,
       "tokens_per_s": 2000.0}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_line_has_step_loss_ppl_lr_rate_and_eta():
    line = progress_line(ROW, steps=120, tokens_per_step=1000)
    # 80 steps left x 1000 tokens / 2000 tokens/s = 40 s; no reprs, no grad_norm/tokens noise
    assert line == "step 40/120 | loss 6.123 | ppl 456.7 | lr 0.0029 | 2,000 tokens/s | ETA 40s"
    evaluated = progress_line({**ROW, "valid_loss": 5.5, "valid_ppl": 244.7}, 120, 1000)
    assert evaluated.endswith("valid_loss 5.5 | valid_ppl 244.7 | 2,000 tokens/s | ETA 40s")
    assert [format_seconds(s) for s in (0.4, 59, 185, 7620)] == ["0s", "59s", "3m05s", "2h07m"]


def test_lines_when_not_a_terminal_each_row_once(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    printer = ProgressPrinter(str(metrics), steps=20, tokens_per_step=100, out=out)
    printer.poll()  # no file yet: nothing
    write_rows(metrics, [{**ROW, "step": 10}])
    printer.poll()
    write_rows(metrics, [{**ROW, "step": 10}, {**ROW, "step": 20, "valid_loss": 5.0}])
    printer.poll()
    printer.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 10/20", "step 20/20"]
    assert "\r" not in out.getvalue() and "valid_loss 5" in lines[1]


def test_a_bar_with_eta_on_a_terminal_and_evaluations_kept(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    out = Terminal()
    printer = ProgressPrinter(str(metrics), steps=40, tokens_per_step=100, out=out)
    write_rows(metrics, [{**ROW, "step": 10}, {**ROW, "step": 20, "valid_loss": 5.0}])
    printer.poll()
    printer.close()
    text = out.getvalue()
    assert "\r[######..................] step 10/40" in text  # 10 of 40 steps: a quarter of the bar
    assert "\r[############............] step 20/40" in text
    shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line]  # what the terminal keeps per line
    assert shown[0].startswith("step 20/40") and "valid_loss 5" in shown[0]  # the evaluation stays on screen
    assert shown[1].startswith("[############")  # and the bar goes on below it
    assert text.endswith("\n")  # the bar's line is ended: what follows starts on its own line


def test_follow_progress_prints_what_the_run_wrote_and_skips_a_resumed_runs_old_rows(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    write_rows(metrics, [{**ROW, "step": 10}])  # printed by the run before it was resumed
    with follow_progress(str(metrics), steps=30, tokens_per_step=100):
        write_rows(metrics, [{**ROW, "step": 10}, {**ROW, "step": 20}, {**ROW, "step": 30}])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 20/30", "step 30/30"]
    with follow_progress(str(metrics), steps=30, tokens_per_step=100, quiet=True):
        write_rows(metrics, [{**ROW, "step": 40}])
    assert capsys.readouterr().out == ""
