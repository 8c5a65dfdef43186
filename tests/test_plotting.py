"""PNG plots of a run and of a sweep: written whole, one panel per metric family, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
from matplotlib.colors import to_hex

from rugpt_ray.config import TrainConfig
from rugpt_ray.errors import UserError
from rugpt_ray.plotting import plot_run, plot_sweep, read_metrics, run_figure, sweep_figure
from rugpt_ray.tuning.plan import SweepConfig, SweepPlan


def write_run(run_dir: Path, steps: list[int], valid_every: int = 20) -> None:
    run_dir.mkdir(parents=True)
    rows = [{"step": s, "loss": 8.0 / s, "ppl": 3000.0 / s, "lr": 1e-3,
             **({"valid_loss": 9.0 / s, "valid_ppl": 4000.0 / s} if s % valid_every == 0 else {})} for s in steps]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_run_writes_one_png_with_three_panels(tmp_path):
    write_run(tmp_path / "run", [10, 20, 30, 40])
    out = plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / "metrics.png"
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (1500, 360)  # 3 panels of 5 x 3.6 inches at 100 dpi
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "metrics.png"]  # no temp file
    assert plot_run(tmp_path / "run", tmp_path / "elsewhere.png") == tmp_path / "elsewhere.png"


def test_run_figure_draws_each_metric_s_points(tmp_path):
    write_run(tmp_path / "run", [10, 20, 30, 40])
    rows = read_metrics(tmp_path / "run")
    fig = run_figure(rows, "run")
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata(), strict=True))
             for ax in fig.axes for line in ax.get_lines()}
    assert drawn == {key: [(r["step"], r[key]) for r in rows if key in r]
                     for key in ("loss", "valid_loss", "ppl", "valid_ppl", "lr")}
    assert [ax.get_title() for ax in fig.axes] == ["loss", "perplexity", "learning rate"]


def test_read_metrics_says_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl .is it a training run folder"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no metrics logged yet"):
        read_metrics(tmp_path)
    write_run(tmp_path / "run", [5, 10])
    assert [r["step"] for r in read_metrics(f"file://{tmp_path}/run")] == [5, 10]  # behind a URI too


def test_plot_sweep_draws_every_trial_and_the_best(tmp_path):
    spec = SweepConfig(name="demo", space={"lr": {"loguniform": [1e-4, 1e-2]}, "weight_decay": {"choice": [0.0]}})
    plan = SweepPlan(spec, TrainConfig(), {"lr": ("loguniform", [1e-4, 1e-2]), "weight_decay": ("choice", [0.0])},
                     steps=40, folder=str(tmp_path))
    rows = []
    for i, (lr, steps) in enumerate([(1e-3, [10, 20, 30, 40]), (3e-3, [10, 20]), (5e-4, [])]):
        trial = f"t{i}"
        if steps:
            write_run(tmp_path / "runs" / trial, steps)
        best = min((9.0 / s for s in steps if s % 20 == 0), default=None)
        rows.append({"trial": trial, "lr": lr, "weight_decay": 0.0, "steps": steps[-1] if steps else 0,
                     "best_valid_loss": best, "status": "finished" if len(steps) == 4 else "stopped early"})
    out = plot_sweep(plan, rows, best=rows[0])
    assert out == f"{tmp_path}/trials.png"
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (1200, 450)

    curves, scatter = sweep_figure(plan, rows, best=rows[0]).axes[:2]
    lines = curves.get_lines()  # one per trial with metrics, its points the trial's valid_loss per step
    assert [list(zip(line.get_xdata(), line.get_ydata(), strict=True)) for line in lines] == [
        [(20, 9.0 / 20), (40, 9.0 / 40)], [(20, 9.0 / 20)]]
    assert [line.get_linestyle() for line in lines] == ["-", "--"]  # the stopped trial is dashed
    assert [line.get_label() for line in lines] == ["lr 0.001, weight_decay 0", "lr 0.003, weight_decay 0"]
    dots, star = scatter.collections  # the trials with a best loss at (lr, weight decay), coloured by it; the best
    assert dots.get_offsets().tolist() == [[1e-3, 0.0], [3e-3, 0.0]]
    assert dots.get_array().tolist() == [rows[0]["best_valid_loss"], rows[1]["best_valid_loss"]]
    assert star.get_offsets().tolist() == [[1e-3, 0.0]]


def test_sweep_figure_draws_a_pbt_exploit_from_the_donor_s_point(tmp_path):
    spec = SweepConfig(name="pbt", scheduler="pbt", grace_period=None, perturbation_interval=20,
                       space={"lr": {"loguniform": [1e-4, 1e-2]}}, mutations={"lr": {"loguniform": [1e-4, 1e-2]}})
    plan = SweepPlan(spec, TrainConfig(), {"lr": ("loguniform", [1e-4, 1e-2])}, steps=60, folder=str(tmp_path),
                     mutations={"lr": ("loguniform", [1e-4, 1e-2])})
    write_run(tmp_path / "runs" / "good", [20, 40, 60])
    (tmp_path / "runs" / "taker").mkdir(parents=True)
    taken = [{"step": 20, "valid_loss": 3.0}, {"step": 40, "valid_loss": 0.4}, {"step": 60, "valid_loss": 0.3}]
    (tmp_path / "runs" / "taker" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in taken))
    exploit = {"step": 20, "donor": "good", "old": {"lr": 1e-5}, "new": {"lr": 3.6e-3}}
    rows = [{"trial": "good", "lr": 3e-3, "steps": 60, "best_valid_loss": 0.15, "status": "finished", "lineage": []},
            {"trial": "taker", "lr": 3.6e-3, "steps": 60, "best_valid_loss": 0.3, "status": "finished",
             "lineage": [exploit]}]
    curves = sweep_figure(plan, rows, best=rows[0]).axes[0]
    lines = [(list(zip(line.get_xdata(), line.get_ydata(), strict=True)), to_hex(line.get_color()),
              line.get_linestyle()) for line in curves.get_lines()]
    good, taker = "#1f77b4", "#ff7f0e"  # the first two colours of the cycle
    assert lines == [
        ([(20, 9.0 / 20), (40, 9.0 / 40), (60, 9.0 / 60)], good, "-"),
        ([(20, 3.0)], taker, "-"),  # its own points up to the exploit
        ([(20, 9.0 / 20), (40, 0.4)], good, ":"),  # the jump from the donor's point, in the donor's colour
        ([(40, 0.4), (60, 0.3)], taker, "-"),  # then its own line again
    ]
    assert [line.get_label() for line in curves.get_lines()][:2] == ["lr 0.003", "lr 0.0036"]
    assert "dotted: a PBT exploit, in the donor's colour" in curves.get_title()
