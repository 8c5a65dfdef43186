"""Hyperparameter sweeps: Ray Tune over the trainer (`rugpt-ray tune --config tune/lr_wd.yaml`).

Ray 2.60 runs Train V2, where `Tuner(trainer)` fails; each trial is therefore a Tune function that builds its
TrainConfig (the base recipe plus the trial's sampled values) and calls `train()`, whose TorchTrainer forwards
every report that carries the sweep's metric (each evaluation) to Tune, so ASHA can stop bad trials at its rungs.

A sweep folder (`storage_path/name`, or `--out`) holds:
    data/            the training data, prepared once for every trial
    runs/TRIAL/      each trial's training run: metrics.jsonl, checkpoints step_*, trial.json (its values)
    sweep.yaml       the spec it was started with (re-running the same spec resumes the sweep)
    trials.csv, trials.png, best.yaml      the results
and Tune's own state. Re-running resumes: finished trials are kept, unfinished ones continue from their last
training checkpoint. The folder may be a URI (s3://bucket/sweeps/NAME): every file goes through pyarrow.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rugpt_ray.config import (
    TrainConfig,
    checked_dataclass,
    data_root,
    expand_data_vars,
    load_train_config,
    read_config_values,
)
from rugpt_ray.data.inputs import is_uri, read_text, subfolders, write_file
from rugpt_ray.errors import UserError

KINDS = ("loguniform", "uniform", "choice", "grid")
SCHEDULERS = ("asha", "none")
METRICS = ("valid_loss", "valid_ppl", "loss", "ppl")
"""What the trainer reports that a sweep can rank by: validation loss/perplexity (every eval_interval) or the
training ones (every log_interval)."""
RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "threads_per_worker", "use_gpu")
FIXED_KEYS = {
    "name": "each trial's run is named after the trial",
    "storage_path": "trials run in the sweep folder",
    "train_data": "the data is prepared once for the whole sweep",
    "valid_data": "the data is prepared once for the whole sweep",
    "tokenizer": "the data is prepared once for the whole sweep",
    "seq_len": "the data is prepared once for the whole sweep",
    "max_steps": "it is the scheduler's time budget",
    "max_tokens": "it is the scheduler's time budget",
    "eval_interval": "the scheduler compares trials at the same evaluation steps",
    **{key: "set it in resources_per_trial" for key in RESOURCE_KEYS},
}
"""TrainConfig keys a search space may not vary, and why."""
TRIAL_DRIVER = {"CPU": 0.01}
"""Tune's share for each trial's function (it only drives the trial's TorchTrainer, whose workers hold the CPUs and
GPUs); 0 is refused by Ray."""
TRIAL_FILE = "trial.json"
SPEC_FILE = "sweep.yaml"


@dataclass
class SweepConfig:
    """One sweep. YAML specs (tune/*.yaml) and `key=value` overrides use these names (`train.max_steps=100`)."""

    name: str = "sweep"
    """Sweep name; the sweep folder is storage_path/name, and re-running the same name resumes it."""
    storage_path: str = "runs/tune"
    """Where sweeps live."""
    recipe: str | None = None
    """Training recipe every trial starts from (a TrainConfig YAML such as jobs/configs/tiny-cpu.yaml)."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig keys over the recipe, the same in every trial (e.g. {max_steps: 60, eval_interval: 15})."""
    space: dict[str, Any] = field(default_factory=dict)
    """TrainConfig keys to search, each {loguniform: [low, high]}, {uniform: [low, high]}, {choice: [values]}
    (one drawn per trial) or {grid: [values]} (every value, num_samples times each)."""
    num_samples: int = 8
    """Trials drawn from the space (times the grid's size when it has grid keys)."""
    scheduler: str = "asha"
    """asha (stop trials that fall behind at each rung of evaluations) or none (every trial runs to the end)."""
    metric: str = "valid_loss"
    """What trials are ranked by: valid_loss, valid_ppl (need validation data), loss or ppl."""
    mode: str = "min"
    """min or max of the metric is best."""
    grace_period: int | None = None
    """ASHA: training steps before a trial can be stopped (default: the first evaluation, eval_interval)."""
    reduction_factor: float = 2.0
    """ASHA: at each rung only the best 1/reduction_factor of the trials that reached it go on."""
    max_concurrent_trials: int | None = None
    """Trials running at once; at most (and by default) as many as the cluster fits with one CPU left for Ray Data's
    reads (more would starve them: the trials' training would wait forever). Give it on an autoscaling cluster
    whose GPU nodes are not up yet: it is then taken as it is."""
    resources_per_trial: dict[str, Any] = field(default_factory=dict)
    """Each trial's Ray Train workers: num_workers, cpus_per_worker, threads_per_worker, use_gpu (over the recipe's
    values). CPU workers' threads default to the node's cores shared among all the trials' workers running at once."""
    seed: int = 0
    """Seed of the search (which values are drawn); every trial trains with the recipe's seed."""

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "sweep spec") -> SweepConfig:
        return checked_dataclass(cls, values, where, list_known=True)


def load_sweep_config(path: str, overrides: list[str] | None = None, out: str | None = None) -> SweepConfig:
    """A YAML spec plus `key=value` overrides (`train.x=...`, `space.lr=...` set one entry); `out` is the folder."""
    values = read_config_values(path, overrides)
    if out:
        parent, _, name = (out if is_uri(out) else str(Path(out).resolve())).rstrip("/").rpartition("/")
        values.update(name=name, storage_path=parent)
    return SweepConfig.from_dict(values, where=path)


# --------------------------------------------------------------------------------------------- checks

@dataclass
class SweepPlan:
    """A checked spec: the trials' base config, the Tune search space, and where everything goes."""

    spec: SweepConfig
    base: TrainConfig
    space: dict[str, tuple[str, list]]
    steps: int
    folder: str
    """The sweep folder: an absolute local path or a URI."""

    @property
    def runs(self) -> str:
        return f"{self.folder}/runs"

    @property
    def num_trials(self) -> int:
        return self.spec.num_samples * math.prod(len(v) for kind, v in self.space.values() if kind == "grid")

    def metric_pair(self) -> tuple[str, str]:
        """The loss and perplexity the table shows: validation ones or training ones, as the metric."""
        return ("valid_loss", "valid_ppl") if self.spec.metric.startswith("valid_") else ("loss", "ppl")


def plan_sweep(spec: SweepConfig) -> SweepPlan:
    """Every check that can fail before Ray starts: one UserError naming the key."""
    from rugpt_ray.data.cache import read_meta
    from rugpt_ray.data.inputs import resolve_inputs
    from rugpt_ray.train import check_config, total_steps

    if spec.scheduler not in SCHEDULERS:
        hint = (" (PBT needs a resumed run to take new lr/weight_decay values, which the trainer does not do yet)"
                if spec.scheduler == "pbt" else "")
        raise UserError(f"sweep spec: scheduler {spec.scheduler!r} is not one of {', '.join(SCHEDULERS)}{hint}")
    if spec.metric not in METRICS:
        raise UserError(f"sweep spec: the trainer never reports metric {spec.metric!r}; "
                        f"rank trials by one of {', '.join(METRICS)}")
    if spec.mode not in ("min", "max"):
        raise UserError(f"sweep spec: mode must be min or max, got {spec.mode!r}")
    if spec.num_samples < 1:
        raise UserError(f"sweep spec: num_samples must be >= 1, got {spec.num_samples}")
    if spec.max_concurrent_trials is not None and spec.max_concurrent_trials < 1:
        raise UserError(f"sweep spec: max_concurrent_trials must be >= 1, got {spec.max_concurrent_trials}")
    if spec.reduction_factor <= 1:
        raise UserError(f"sweep spec: reduction_factor must be > 1, got {spec.reduction_factor}")
    base = _base_config(spec)
    check_config(TrainConfig.from_dict(base.to_dict()))
    prepared = read_meta(base.train_data) if isinstance(base.train_data, str) else None
    if prepared is None:
        for inputs in (base.train_data, base.valid_data):
            if inputs:
                resolve_inputs(inputs)  # every missing path in one error
    if spec.metric.startswith("valid_"):
        if not (base.valid_data or (prepared and "valid" in prepared["splits"])):
            raise UserError(f"sweep spec: metric {spec.metric} needs validation data (valid_data, or a prepared "
                            "train_data folder with a valid split); without it rank by loss")
    space = _check_space(spec.space, base)
    steps = total_steps(base)
    if spec.grace_period is not None and not 1 <= spec.grace_period <= steps:
        raise UserError(f"sweep spec: grace_period must be between 1 and the trials' {steps} steps, "
                        f"got {spec.grace_period}")
    storage = spec.storage_path.rstrip("/") if is_uri(spec.storage_path) else str(Path(spec.storage_path).resolve())
    return SweepPlan(spec, base, space, steps, f"{storage}/{spec.name}")


def _base_config(spec: SweepConfig) -> TrainConfig:
    """Recipe, then `train`, then `resources_per_trial`; local paths made absolute (trials run in their folders)."""
    bad = sorted(set(spec.resources_per_trial) - set(RESOURCE_KEYS))
    if bad:
        raise UserError(f"sweep spec: resources_per_trial: unknown keys {bad}; known: {list(RESOURCE_KEYS)}")
    twice = sorted(set(spec.resources_per_trial) & set(spec.train))
    if twice:
        raise UserError(f"sweep spec: {twice} given in both train and resources_per_trial; keep one")
    values = load_train_config(spec.recipe).to_dict()
    train = {k: expand_data_vars(v) for k, v in spec.train.items()}
    if isinstance(train.get("model"), dict):
        train["model"] = {**values["model"], **train["model"]}
    values.update(train, **spec.resources_per_trial)
    for key in ("tokenizer", "init_from", "deepspeed_config"):
        if isinstance(values[key], str) and Path(values[key]).exists():
            values[key] = str(Path(values[key]).resolve())
    return TrainConfig.from_dict(values, where="sweep spec: recipe + train + resources_per_trial")


def _check_space(space: Any, base: TrainConfig) -> dict[str, tuple[str, list]]:
    """{key: (kind, values)}; every bound and every listed value must make a config that passes check_config."""
    from rugpt_ray.train import check_config

    example = "e.g. space: {lr: {loguniform: [1.0e-4, 1.0e-2]}, weight_decay: {uniform: [0.0, 0.1]}}"
    if not isinstance(space, dict) or not space:
        raise UserError(f"sweep spec: the search space is empty; {example}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, entry in space.items():
        where = f"sweep spec: space.{key}"
        if key not in known:
            raise UserError(f"{where}: not a training config key")
        if key in FIXED_KEYS:
            raise UserError(f"{where}: cannot be searched ({FIXED_KEYS[key]})")
        if not (isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in KINDS):
            raise UserError(f"{where}: expected one of {{{': ..., '.join(KINDS)}: ...}}, got {entry!r}; {example}")
        kind, values = next(iter(entry.items()))
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: {kind} needs a non-empty list, got {values!r}")
        if kind in ("loguniform", "uniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if any(isinstance(v, str) for v in values) else ""
                raise UserError(f"{where}: {kind} needs [low, high] numbers, got {values!r}{hint}")
            low, high = values
            if not (low < high and (kind == "uniform" or low > 0)):
                raise UserError(f"{where}: {kind} needs low < high{' and low > 0' if kind == 'loguniform' else ''}, "
                                f"got {values!r}")
        for value in values:
            trial = TrainConfig.from_dict({**base.to_dict(), key: value}, where=f"{where} value {value!r}")
            try:
                check_config(trial)
            except UserError as e:
                raise UserError(f"{where} value {value!r}: {e}") from e
        out[key] = (kind, values)
    return out


# --------------------------------------------------------------------------------------------- trials

def _report_callback(metric: str):
    """Tune's report callback for Train, keeping only reports with the metric (Tune refuses results without it)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportEvaluations(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ReportEvaluations()


def _run_trial(params: dict[str, Any], *, base: dict[str, Any], runs: str, metric: str) -> None:
    """One trial, in Tune's trial actor: its training run is runs/TRIAL_ID (a restarted trial resumes it)."""
    import ray.tune

    from rugpt_ray.train import train

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = TrainConfig.from_dict({**base, **params, "name": trial_id, "storage_path": runs})
    trial = {"trial_id": trial_id, "params": params, "config": cfg.to_dict()}
    write_file(f"{runs}/{trial_id}/{TRIAL_FILE}", json.dumps(trial, indent=2))
    train(cfg, callbacks=[_report_callback(metric)])


def _release_orphaned_placement_groups(wait_s: float = 0.0) -> int:
    """Remove this job's placement groups whose creator actor is dead; returns how many are left in use.

    Tune stops a trial (ASHA, or the last report racing the run's own shutdown) by ending its actor, which takes the
    trial's Train controller with it before the controller frees its workers' placement group. Ray keeps such a
    group until the job ends, and Train's own cleaner needs the dashboard's State API (and did not free them here
    even with it): left, they hold the CPUs (or GPUs) the next trials and Ray Data's reads need, and the sweep
    stalls. With `wait_s`, waits that long for the live controllers' groups to go too (after the sweep).
    """
    import time

    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job, nil = ray.JobID.from_hex(ray.get_runtime_context().get_job_id()).binary(), ray.ActorID.nil().binary()
    deadline = time.monotonic() + wait_s
    while True:
        in_use = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            group = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if (group.creator_job_id != job or group.creator_actor_id == nil or group.is_detached
                    or group.state == gcs_pb2.PlacementGroupTableData.REMOVED):
                continue
            if group.creator_actor_dead:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(group.placement_group_id)))
            else:
                in_use += 1
        if not in_use or time.monotonic() >= deadline:
            return in_use
        time.sleep(1.0)


def _sweep_callback(every_s: float = 5.0):
    """Frees orphaned placement groups as trials end, and prints a line per ended trial (for people and tests)."""
    import time

    import ray.tune

    class SweepCallback(ray.tune.Callback):
        def __init__(self):
            self.last = 0.0

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self.last > every_s:
                _release_orphaned_placement_groups()
                self.last = time.monotonic()

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result
            print(f"trial {trial.trial_id} ended at step {result.get('step')}: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k in METRICS), flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {trial.trial_id} failed: {trial.error_file}", flush=True)

    return SweepCallback()


def _tune_space(space: dict[str, tuple[str, list]]) -> dict[str, Any]:
    from ray import tune

    make = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](values) for key, (kind, values) in space.items()}


def _concurrent_trials(plan: SweepPlan) -> int:
    """The spec's max_concurrent_trials, at most the trials the cluster holds with one CPU left for Ray Data (see
    data.train_ingest). A cluster with no room for one trial yet (an autoscaling one before its GPU nodes start)
    runs max_concurrent_trials when the spec gives it: the trials wait for the nodes."""
    import ray

    base, resources = plan.base, ray.cluster_resources()
    per_worker = base.cpus_per_worker if base.use_gpu else min(base.cpus_per_worker, 1.0)  # as train() asks
    cpus = base.num_workers * per_worker + TRIAL_DRIVER["CPU"]
    fits = math.floor((resources.get("CPU", 0) - 1) / cpus + 1e-9)
    if base.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / base.num_workers))
    if fits < 1 and plan.spec.max_concurrent_trials:
        print(f"no room for a trial in the cluster yet; {plan.spec.max_concurrent_trials} at a time "
              "(max_concurrent_trials) once the autoscaler adds nodes", flush=True)
        return plan.spec.max_concurrent_trials
    if fits < 1:
        gpus = f" and {base.num_workers} GPUs" if base.use_gpu else ""
        raise UserError(f"one trial needs {cpus:g} CPUs{gpus} plus a CPU for Ray Data; the cluster has "
                        f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs "
                        "(lower resources_per_trial)")
    return min(fits, plan.spec.max_concurrent_trials or fits)


# --------------------------------------------------------------------------------------------- the sweep

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


def run_sweep(spec: SweepConfig) -> SweepResult:
    """Check, prepare the data once, run (or resume) the Tune experiment, write the results."""
    import yaml
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from rugpt_ray.train import prepare_training_data, ray_init

    plan = plan_sweep(spec)
    _check_same_spec(plan)
    ray_init()
    base = plan.base
    tokenizer = base.tokenizer or str(data_root() / "tokenizer")
    prepared = prepare_training_data(base, plan.folder, tokenizer)
    concurrent = _concurrent_trials(plan)
    threads = base.threads_per_worker
    if threads is None and not base.use_gpu:  # oversubscribed cores run torch several times slower
        threads = max(1, (os.cpu_count() or 1) // (concurrent * base.num_workers))
    trial_base = {**base.to_dict(), "train_data": prepared.path, "valid_data": None, "threads_per_worker": threads}
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=trial_base, runs=plan.runs, metric=spec.metric), TRIAL_DRIVER)
    write_file(f"{plan.folder}/{SPEC_FILE}", yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))

    if tune.Tuner.can_restore(plan.folder):
        print(f"resuming sweep {plan.folder}", flush=True)
        tuner = tune.Tuner.restore(plan.folder, trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if spec.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="step", max_t=plan.steps, reduction_factor=spec.reduction_factor,
                                      grace_period=spec.grace_period or min(base.eval_interval, plan.steps))
        tuner = tune.Tuner(
            trainable,
            param_space=_tune_space(plan.space),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, scheduler=scheduler, num_samples=spec.num_samples,
                search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.seed)),
            run_config=tune.RunConfig(name=spec.name, storage_path=plan.folder.rpartition("/")[0], verbose=1,
                                      callbacks=[_sweep_callback()]),
        )
    tuner.fit()
    _release_orphaned_placement_groups(wait_s=30)  # the last trials' groups: free for whatever runs next
    trials = tune.ExperimentAnalysis(plan.folder).trials  # as saved: what a re-run resumes from
    status = {t.trial_id: {"TERMINATED": "done", "ERROR": "failed"}.get(t.status, "unfinished") for t in trials}
    rows = _trial_rows(plan, status)
    best = _best(rows, plan)
    _write_results(plan, rows, best)
    interrupted = len(trials) < plan.num_trials or any(r["status"] == "unfinished" for r in rows)
    return SweepResult(plan, rows, best, interrupted)


def _check_same_spec(plan: SweepPlan) -> None:
    """Resuming needs the spec the sweep started with (its place aside: the folder may have moved)."""
    import yaml

    saved_file = f"{plan.folder}/{SPEC_FILE}"
    text = read_text(saved_file)
    if text is None:
        return
    saved = yaml.safe_load(text)
    now = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(plan.spec)))
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in ("name", "storage_path") and saved.get(k) != now.get(k))
    if changed:
        raise UserError(f"{plan.folder} holds a sweep started with other {', '.join(changed)}; run it with the spec "
                        f"in {saved_file} to resume it, or give another name or --out")


# --------------------------------------------------------------------------------------------- results

def _trial_rows(plan: SweepPlan, status: dict[str, str]) -> list[dict[str, Any]]:
    """One row per trial from its run folder: values, steps run, final and best loss/ppl, status, checkpoint."""
    from rugpt_ray.plotting import read_metrics

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
        rows.append(row)
    return rows


def _best_checkpoint(run_dir: str, metric: str, better) -> str:
    """The kept checkpoint with the best metric (checkpoints at evaluation steps carry it), else the newest."""
    from rugpt_ray.train import STATE_FILE

    scored = []
    for name in subfolders(run_dir, "step_*"):
        state = read_text(f"{run_dir}/{name}/{STATE_FILE}")
        if state is not None:
            scored.append((f"{run_dir}/{name}", json.loads(state).get("metrics", {}).get(metric)))
    with_metric = [(f, v) for f, v in scored if v is not None]
    if with_metric:
        return better(with_metric, key=lambda fv: fv[1])[0]
    return scored[-1][0] if scored else ""


def _best(rows: list[dict[str, Any]], plan: SweepPlan) -> dict[str, Any] | None:
    key = f"best_{plan.spec.metric}"
    ranked = [r for r in rows if r.get(key) is not None]
    if not ranked:
        return None
    return (min if plan.spec.mode == "min" else max)(ranked, key=lambda r: r[key])


def _columns(plan: SweepPlan) -> list[str]:
    loss, ppl = plan.metric_pair()
    return ["trial", *plan.space, "steps", f"final_{loss}", f"best_{loss}", f"final_{ppl}", f"best_{ppl}",
            "best_step", "status"]


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A fixed-width text table (4 significant digits)."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def _write_results(plan: SweepPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """trials.csv, trials.png and (with a best trial) best.yaml in the sweep folder."""
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[*_columns(plan), "checkpoint"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    write_file(f"{plan.folder}/trials.csv", table.getvalue())
    plot_sweep(plan, rows, best)
    if best:
        _write_best_config(plan, best)


def plot_sweep(plan: SweepPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """Left: the metric against step, one line per trial (dashed: stopped early). Right: the first two searched
    keys (lr × weight decay) coloured by each trial's best metric, the best one starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from rugpt_ray.plotting import read_metrics

    metric = plan.spec.metric
    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        run_dir = f"{plan.runs}/{row['trial']}"
        points = [(m["step"], m[metric]) for m in read_metrics(run_dir) if metric in m] if row["steps"] else []
        if points:
            label = ", ".join(f"{k} {_short(row[k])}" for k in plan.space)
            curves.plot(*zip(*points, strict=True), marker="o", linestyle="--" if row["status"] == "stopped early"
                        else "-", label=label)
    curves.set_xlabel("step")
    curves.set_ylabel(metric)
    curves.set_title(f"{metric} per trial (dashed: stopped early)")
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    out = f"{plan.folder}/trials.png"
    write_file(out, png.getvalue())
    return out


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _write_best_config(plan: SweepPlan, best: dict[str, Any]) -> str:
    """best.yaml: the best trial's config under a new run name in the recipe's storage, for `rugpt-ray train`."""
    import yaml

    trial = json.loads(read_text(f"{plan.runs}/{best['trial']}/{TRIAL_FILE}"))
    params = trial["params"]
    values = {**trial["config"], "name": f"{plan.spec.name}-best", "storage_path": plan.base.storage_path,
              "threads_per_worker": plan.base.threads_per_worker}  # a run on its own: not shared with other trials
    metric = plan.spec.metric
    header = (f"# The best trial of sweep {plan.folder}: {best['trial']}, best {metric} "
              f"{best[f'best_{metric}']:.4g} at step {best['best_step']}\n"
              f"# ({', '.join(f'{k} {params[k]!r}' for k in plan.space)}). Its checkpoint: {best['checkpoint']}\n"
              f"# train_data is the prepared data the sweep trained on. Train: rugpt-ray train --config THIS_FILE\n")
    out = f"{plan.folder}/best.yaml"
    write_file(out, header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    return out


def describe(result: SweepResult) -> str:
    """What the command prints: the table, the best trial, its checkpoint and the files."""
    plan, best, metric = result.plan, result.best, result.plan.spec.metric
    lines = [format_table(result.rows, _columns(plan)), ""]
    if best:
        lines.append(f"best: {best['trial']} ({', '.join(f'{k} {_short(best[k])}' for k in plan.space)}), "
                     f"best {metric} {best[f'best_{metric}']:.4g} at step {best['best_step']}")
        lines.append(f"best checkpoint: {best['checkpoint']}")
        lines.append(f"best config: {result.folder}/best.yaml")
    lines.append(f"table: {result.folder}/trials.csv")
    lines.append(f"plot: {result.folder}/trials.png")
    if result.interrupted:
        lines.append("interrupted: run the same command again to resume (finished trials are kept)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- command line

def _tune_command(args: argparse.Namespace) -> int:
    from rugpt_ray.train import ray_connection

    spec = load_sweep_config(args.config, args.overrides, out=args.out)
    with ray_connection():
        result = run_sweep(spec)
    print(describe(result))
    print(result.folder)
    return 130 if result.interrupted else 0


def add_tune_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `tune` on an argparse subparsers object; `args.func(args)` returns the exit code."""
    p = subparsers.add_parser(
        "tune", help="sweep hyperparameters with Ray Tune (resumes a sweep of the same name)",
        description="Run a Ray Tune sweep over the trainer: every trial trains the spec's recipe with values drawn "
                    "from its space; ASHA stops trials that fall behind. Prints the trials table, the best trial "
                    "and its checkpoint, and, last, the sweep folder (trials.csv, trials.png, best.yaml).")
    p.add_argument("--config", required=True, help="sweep spec YAML, e.g. tune/lr_wd.yaml")
    p.add_argument("--out", help="sweep folder (default: the spec's storage_path/name)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override spec keys (train.max_steps=100, space.lr=..., num_samples=4)")
    p.set_defaults(func=_tune_command)
    return p
