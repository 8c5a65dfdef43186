"""PNG plots: a run's metrics (`rugpt-ray plot RUN`) and a sweep's trials (trials.png)."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rugpt_ray.errors import UserError
from rugpt_ray.storage import read_text, write_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rugpt_ray.tuning.plan import SweepPlan

PANELS = (("loss", ("loss", "valid_loss")), ("perplexity", ("ppl", "valid_ppl")), ("learning rate", ("lr",)))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl, in a local folder or behind a URI (storage_path=s3://...)."""
    text = read_text(f"{str(run_dir).rstrip('/')}/metrics.jsonl")
    if text is None:
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a training run folder?)")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise UserError(f"{run_dir}/metrics.jsonl: no metrics logged yet")
    return rows


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Loss, perplexity and learning rate against step; written next to the metrics by default."""
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    tmp = out.with_name(out.name + ".tmp.png")
    tmp.write_bytes(_png(run_figure(read_metrics(run_dir), Path(run_dir).name)))
    os.replace(tmp, out)
    return out


def run_figure(rows: list[dict], title: str) -> Figure:
    """One panel per metric family of `PANELS`, each key a line against step."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (panel, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if key.startswith("valid") else None, label=key)
        ax.set_title(panel)
        ax.set_xlabel("step")
        if panel == "perplexity":
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sweep(plan: SweepPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """trials.png in the sweep folder (see `sweep_figure`)."""
    out = f"{plan.folder}/trials.png"
    write_file(out, _png(sweep_figure(plan, rows, best)))
    return out


def sweep_figure(plan: SweepPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> Figure:
    """Left: the metric against step, one line per trial (dashed: stopped early); after a PBT exploit (a row's
    `lineage`) the trial's line goes on from its donor's point, the jump drawn dotted in the donor's colour. Right:
    the first two searched keys (lr × weight decay) coloured by each trial's best metric, the best one starred."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    metric = plan.spec.metric
    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(12, 4.5))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {row["trial"]: cycle[i % len(cycle)] for i, row in enumerate(rows)}
    drawn = {row["trial"]: dict((m["step"], m[metric]) for m in read_metrics(f"{plan.runs}/{row['trial']}")
                                if metric in m) if row["steps"] else {} for row in rows}
    for row in rows:
        points = sorted(drawn[row["trial"]].items())
        style = {"marker": "o", "color": colour[row["trial"]],
                 "linestyle": "--" if row["status"] == "stopped early" else "-"}
        label = ", ".join(f"{k} {short_value(row[k])}" for k in plan.space)
        for start, end, exploit in _segments(row.get("lineage", [])):
            segment = [p for p in points if start < p[0] <= end]
            donor_point = drawn.get(exploit["donor"], {}).get(exploit["step"]) if exploit else None
            if donor_point is not None and segment:  # the copy goes on from the donor's point
                curves.plot([exploit["step"], segment[0][0]], [donor_point, segment[0][1]], linestyle=":",
                            color=colour[exploit["donor"]])
            if segment:
                curves.plot(*zip(*segment, strict=True), label=label, **style)
                label = "_nolegend_"
    curves.set_xlabel("step")
    curves.set_ylabel(metric)
    title = "dashed: stopped early" + ("\ndotted: a PBT exploit, in the donor's colour" if plan.mutations else "")
    curves.set_title(f"{metric} per trial ({title})", fontsize=10)
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=7)

    keys = list(plan.space)
    x_key, y_key = keys[0], keys[1] if len(keys) > 1 else f"best_{metric}"
    ranked = [r for r in rows if r.get(f"best_{metric}") is not None and _numeric(r[x_key]) and _numeric(r[y_key])]
    if ranked:
        dots = scatter.scatter([r[x_key] for r in ranked], [r[y_key] for r in ranked],
                               c=[r[f"best_{metric}"] for r in ranked], cmap="viridis_r", s=60)
        fig.colorbar(dots, ax=scatter, label=f"best {metric}")
    if best and _numeric(best[x_key]) and _numeric(best[y_key]):
        scatter.scatter([best[x_key]], [best[y_key]], marker="*", s=300, facecolors="none", edgecolors="red",
                        label="best")
        scatter.legend()
    for key, set_scale, axis in ((x_key, scatter.set_xscale, scatter.xaxis),
                                 (y_key, scatter.set_yscale, scatter.yaxis)):
        if plan.space.get(key, ("",))[0] == "loguniform":
            set_scale("log")
            axis.set_minor_formatter(NullFormatter())  # labels at decades only: minor ones overlap
    scatter.set_xlabel(x_key)
    scatter.set_ylabel(y_key)
    scatter.set_title(f"{x_key} × {y_key}")
    fig.suptitle(f"sweep {plan.spec.name}")
    fig.tight_layout()
    return fig


def _segments(lineage: list[dict[str, Any]]) -> list[tuple[float, float, dict[str, Any] | None]]:
    """A trial's steps split at its exploits: (after step, up to step, the exploit that began it or None)."""
    starts = [(-math.inf, None), *((event["step"], event) for event in lineage)]
    ends = [event["step"] for event in lineage] + [math.inf]
    return [(start, end, event) for (start, event), end in zip(starts, ends, strict=True)]


def _pyplot():
    """pyplot on the Agg backend: plots are files, never windows, and need no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Figure) -> bytes:
    """The figure as PNG bytes at 100 dpi, closed after."""
    plt = _pyplot()

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def short_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
