"""PNG plots of a run's metrics (`rugpt-ray plot RUN`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rugpt_ray.errors import UserError

PANELS = (("loss", ("loss", "valid_loss")), ("perplexity", ("ppl", "valid_ppl")), ("learning rate", ("lr",)))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl, in a local folder or behind a URI (storage_path=s3://...)."""
    from rugpt_ray.data.inputs import read_text

    text = read_text(f"{str(run_dir).rstrip('/')}/metrics.jsonl")
    if text is None:
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a training run folder?)")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise UserError(f"{run_dir}/metrics.jsonl: no metrics logged yet")
    return rows


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Loss, perplexity and learning rate against step; written next to the metrics by default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if key.startswith("valid") else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title == "perplexity":
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
