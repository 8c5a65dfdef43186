"""What a sweep leaves: one row per trial (trials.csv and the printed table), trials.png, and best.yaml."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

import yaml

from rugpt_ray.errors import UserError
from rugpt_ray.plotting import plot_sweep, read_metrics, short_value
from rugpt_ray.storage import read_text, subfolders, write_file
from rugpt_ray.train import STATE_FILE
from rugpt_ray.tuning.pbt import read_lineage, schedule
from rugpt_ray.tuning.plan import TRIAL_FILE, SweepPlan


@dataclass
class SweepResult:
    """What a sweep left: its rows (as in trials.csv), the best one, and whether it still has trials to run."""

    plan: SweepPlan
    rows: list[dict[str, Any]]
    """One per trial, as in trials.csv."""
    best: dict[str, Any] | None
    """The best row by the metric (scope: every evaluation of every trial), None if no trial reported it."""
    interrupted: bool
    """Some trials did not end or start (the sweep was stopped); running it again resumes it."""

    @property
    def folder(self) -> str:
        return self.plan.folder


def trial_rows(plan: SweepPlan, status: dict[str, str]) -> list[dict[str, Any]]:
    """One row per trial from its run folder: values, steps run, final and best loss/ppl, status, checkpoint."""
    loss, ppl = plan.metric_pair()
    better = min if plan.spec.mode == "min" else max
    rows = []
    for name in subfolders(plan.runs):
        run_dir, text = f"{plan.runs}/{name}", read_text(f"{plan.runs}/{name}/{TRIAL_FILE}")
        if text is None:
            continue
        trial = json.loads(text)
        try:
            metrics = read_metrics(run_dir)
        except UserError:
            metrics = []
        evals = [m for m in metrics if plan.spec.metric in m]
        row = {"trial": trial["trial_id"], **trial["params"], "steps": metrics[-1]["step"] if metrics else 0}
        final = evals[-1] if evals else {}
        top = better(evals, key=lambda m: m[plan.spec.metric]) if evals else {}
        row.update({f"final_{loss}": final.get(loss), f"best_{loss}": top.get(loss),
                    f"final_{ppl}": final.get(ppl), f"best_{ppl}": top.get(ppl), "best_step": top.get("step")})
        state = status.get(trial["trial_id"], "unfinished")
        if state == "done":
            state = "finished" if row["steps"] >= plan.steps else "stopped early"
        row["status"] = "failed" if state != "unfinished" and not evals else state
        row["checkpoint"] = _best_checkpoint(run_dir, plan.spec.metric, better)
        if plan.spec.population_based:
            exploits = (read_lineage(run_dir) or {"exploits": []})["exploits"]
            row.update(lineage=exploits, exploits=len(exploits),
                       donors=" ".join(f"{e['donor']}@{e['step']}" for e in exploits))
        rows.append(row)
    return rows


def _best_checkpoint(run_dir: str, metric: str, better) -> str:
    """The kept checkpoint with the best metric (checkpoints at evaluation steps carry it), else the newest."""
    scored = []
    for name in subfolders(run_dir, "step_*"):
        state = read_text(f"{run_dir}/{name}/{STATE_FILE}")
        if state is not None:
            scored.append((f"{run_dir}/{name}", json.loads(state).get("metrics", {}).get(metric)))
    with_metric = [(f, v) for f, v in scored if v is not None]
    if with_metric:
        return better(with_metric, key=lambda fv: fv[1])[0]
    return scored[-1][0] if scored else ""


def best_row(rows: list[dict[str, Any]], plan: SweepPlan) -> dict[str, Any] | None:
    key = f"best_{plan.spec.metric}"
    ranked = [r for r in rows if r.get(key) is not None]
    if not ranked:
        return None
    return (min if plan.spec.mode == "min" else max)(ranked, key=lambda r: r[key])


def table_columns(plan: SweepPlan) -> list[str]:
    loss, ppl = plan.metric_pair()
    lineage = ["exploits", "donors"] if plan.spec.population_based else []
    return ["trial", *plan.space, *(k for k in plan.mutations if k not in plan.space), "steps", f"final_{loss}",
            f"best_{loss}", f"final_{ppl}", f"best_{ppl}", "best_step", *lineage, "status"]


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A fixed-width text table (4 significant digits)."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def write_results(plan: SweepPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """trials.csv, trials.png and (with a best trial) best.yaml in the sweep folder."""
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[*table_columns(plan), "checkpoint"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    write_file(f"{plan.folder}/trials.csv", table.getvalue())
    plot_sweep(plan, rows, best)
    if best:
        _write_best_config(plan, best)


def _write_best_config(plan: SweepPlan, best: dict[str, Any]) -> str:
    """best.yaml: the best trial's config under a new run name in the recipe's storage, for `rugpt-ray train`."""
    trial = json.loads(read_text(f"{plan.runs}/{best['trial']}/{TRIAL_FILE}"))
    params = trial["params"]
    values = {**trial["config"], "name": f"{plan.spec.name}-best", "storage_path": plan.base.storage_path,
              "threads_per_worker": plan.base.threads_per_worker}  # a run on its own: not shared with other trials
    metric = plan.spec.metric
    header = (f"# The best trial of sweep {plan.folder}: {best['trial']}, best {metric} "
              f"{best[f'best_{metric}']:.4g} at step {best['best_step']}\n"
              f"# ({', '.join(f'{k} {params[k]!r}' for k in params)}). Its checkpoint: {best['checkpoint']}\n"
              f"# train_data is the prepared data the sweep trained on. Train: rugpt-ray train --config THIS_FILE\n")
    if plan.spec.population_based:
        header += _schedule_comment(plan, best["trial"])
    out = f"{plan.folder}/best.yaml"
    write_file(out, header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    return out


def _schedule_comment(plan: SweepPlan, trial: str) -> str:
    """PBT's winning schedule: the values the best trial's weights were trained with, from which step (through its
    donors); the recipe below holds the last ones, and its checkpoint resumes with them."""
    lines = [f"#   from step {step}: " + ", ".join(f"{k} {short_value(v)}" for k, v in values.items())
             for step, values in schedule(plan.runs, trial)]
    return ("# PBT schedule (the values over time, through the donors whose checkpoints it continued):\n"
            + "\n".join(lines) + "\n")


def describe(result: SweepResult) -> str:
    """What the command prints: the table, the best trial, its checkpoint and the files."""
    plan, best, metric = result.plan, result.best, result.plan.spec.metric
    lines = [format_table(result.rows, table_columns(plan)), ""]
    if best:
        lines.append(f"best: {best['trial']} ({', '.join(f'{k} {short_value(best[k])}' for k in plan.space)}), "
                     f"best {metric} {best[f'best_{metric}']:.4g} at step {best['best_step']}")
        lines.append(f"best checkpoint: {best['checkpoint']}")
        lines.append(f"best config: {result.folder}/best.yaml")
    lines.append(f"table: {result.folder}/trials.csv")
    lines.append(f"plot: {result.folder}/trials.png")
    if result.interrupted:
        lines.append("interrupted: run the same command again to resume (finished trials are kept)")
    return "\n".join(lines)
