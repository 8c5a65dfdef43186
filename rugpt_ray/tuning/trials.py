"""Running a sweep: each trial is a Tune function that trains the base recipe with its sampled values.

Ray 2.60 runs Train V2, where `Tuner(trainer)` fails; each trial is therefore a Tune function that builds its
TrainConfig (the base recipe plus the trial's sampled values) and runs `train()` in a thread, whose TorchTrainer
forwards every report that carries the sweep's metric (each evaluation) to the function, which reports it to Tune
(with a pointer to the Train checkpoint, `pbt.pointer_checkpoint`, where the report has one): ASHA stops bad
trials at its rungs, Optuna learns from the results, PBT exploits through the pointers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import threading
import time
from typing import Any

import ray
import ray.tune
import yaml
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.queue import Queue

from rugpt_ray.config import TrainConfig, default_tokenizer
from rugpt_ray.errors import UserError
from rugpt_ray.ray_start import ray_connection, start_ray
from rugpt_ray.storage import query_last, read_text, write_file
from rugpt_ray.train import prepare_training_data, train
from rugpt_ray.tuning.pbt import exploit, pointer_checkpoint, read_pointer, start_lineage
from rugpt_ray.tuning.plan import (
    METRICS,
    SPEC_FILE,
    TRIAL_DRIVER,
    TRIAL_FILE,
    SweepConfig,
    SweepPlan,
    check_same_spec,
    load_sweep_config,
    plan_sweep,
    trial_values,
)
from rugpt_ray.tuning.results import SweepResult, best_row, describe, trial_rows, write_results

FAIL_ENV = "RUGPT_SWEEP_FAIL_AT"
"""Test-only: a step. The sweep's first trial to report its checkpoint at that step or later fails there, once (the
runs folder keeps a marker, so no other trial fails and that trial's next run goes on), as an interrupted sweep
leaves a trial. Unset (always, for users): nothing happens."""
FAILED_ONCE = "injected_failure"


class _ForwardReports(UserCallback):
    """Train's reports that carry the metric (Tune refuses results without it), to the trial function through a
    queue; with `checkpoints_only`, only those with a checkpoint too (PBT compares trials where they can be copied)."""

    def __init__(self, queue: Queue, metric: str, checkpoints_only: bool):
        self.queue, self.metric, self.checkpoints_only = queue, metric, checkpoints_only

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric in metrics[0] and (checkpoint is not None or not self.checkpoints_only):
            self.queue.put((metrics[0], checkpoint.path if checkpoint is not None else None))


def _run_trial(params: dict[str, Any], *, base: dict[str, Any], runs: str, metric: str, pbt: bool,
               fail_at: int | None) -> None:
    """One trial, in Tune's trial actor: its training run is runs/TRIAL_ID (a restarted trial resumes it, an
    exploited one starts it again from a copy of the donor's checkpoint)."""
    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = f"{runs}/{trial_id}"
    cfg = TrainConfig.from_dict({**trial_values(base, params), "name": trial_id, "storage_path": runs})
    pointer, start_from = read_pointer(ray.tune.get_checkpoint()), None
    if pbt:
        start_lineage(run_dir, params)
    if pointer is not None and pointer["trial"] != trial_id:  # PBT exploits another trial's checkpoint
        old = json.loads(read_text(f"{run_dir}/{TRIAL_FILE}"))["params"]
        start_from = exploit(run_dir, pointer, old, params)
        print(f"trial {trial_id} continues from {start_from} (trial {pointer['trial']}): "
              + ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in params.items() if old.get(k) != v), flush=True)
    write_file(f"{run_dir}/{TRIAL_FILE}", json.dumps({"trial_id": trial_id, "params": params,
                                                      "config": cfg.to_dict()}, indent=2))
    reports, failure = Queue(actor_options={"num_cpus": 0}), []

    def fit() -> None:
        try:
            train(cfg, callbacks=[_ForwardReports(reports, metric, checkpoints_only=pbt)], start_from=start_from)
        except BaseException as e:  # raised again in the trial's thread, where Tune sees it
            failure.append(e)
        finally:
            reports.put(None)

    threading.Thread(target=fit, name=f"train-{trial_id}", daemon=True).start()
    while (report := reports.get()) is not None:
        metrics, checkpoint = report
        with tempfile.TemporaryDirectory(prefix="rugpt-pointer-") as folder:
            ray.tune.report(metrics, checkpoint=pointer_checkpoint(folder, trial_id, run_dir, checkpoint)
                            if checkpoint else None)
        if fail_at is not None and checkpoint and metrics["step"] >= fail_at:
            _fail_once(runs, metrics["step"])
    if failure:
        raise failure[0]


def _fail_once(runs: str, step: int) -> None:
    """FAIL_ENV's failure: the sweep's first only."""
    if read_text(f"{runs}/{FAILED_ONCE}") is None:
        write_file(f"{runs}/{FAILED_ONCE}", str(step))
        raise RuntimeError(f"{FAIL_ENV}: injected failure after the checkpoint at step {step}")


def _release_orphaned_placement_groups(wait_s: float = 0.0) -> int:
    """Remove this job's placement groups whose creator actor is dead; returns how many are left in use.

    Works around Ray 2.60 (Train V2 under Tune): Tune stops a trial (ASHA, or the last report racing the run's own
    shutdown) by ending its actor, which takes the trial's Train controller with it before the controller frees its
    workers' placement group. Ray keeps such a group until the job ends, and Train's own cleaner is left out
    (train.without_placement_group_cleaner says why): left, they hold the CPUs (or GPUs) the next trials and Ray
    Data's reads need, and the sweep stalls. It reads the GCS's placement-group table through Ray's
    private state API. It can go when a killed Train controller's placement group is freed by Ray itself (test:
    tests/test_tuning.py's ASHA sweep finishes without it). With `wait_s`, waits that long for the live
    controllers' groups to go too (after the sweep).
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

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
    make = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](values) for key, (kind, values) in space.items()}


def param_space(plan: SweepPlan) -> dict[str, Any]:
    """The space, and PBT's mutated keys that are not in it (their first values drawn as they mutate)."""
    return _tune_space({**plan.mutations, **plan.space})


def search_algorithm(plan: SweepPlan, concurrent: int):
    """random: Tune's random draws and grids; optuna: Optuna's TPE seeded with the spec's seed, `concurrent` trials
    at a time (each new one learns from the results so far)."""
    spec = plan.spec
    if spec.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=spec.seed), metric=spec.metric,
                                               mode=spec.mode), max_concurrent=concurrent)
    return BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.seed)


def scheduler(plan: SweepPlan):
    """ASHA, PBT or PB2 (synchronous: every trial reaches the interval before the worst copy the best), or none.
    PB2 fits a Gaussian process to the results within the mutations' ranges (linear, even for loguniform ones)."""
    spec = plan.spec
    if spec.scheduler == "asha":
        return ASHAScheduler(time_attr="step", max_t=plan.steps, reduction_factor=spec.reduction_factor or 2.0,
                             grace_period=spec.grace_period or min(plan.base.eval_interval, plan.steps))
    if spec.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="step", perturbation_interval=spec.perturbation_interval,
                                       hyperparam_mutations=_tune_space(plan.mutations),
                                       quantile_fraction=spec.quantile_fraction or 0.25, synch=True)
    if spec.scheduler == "pb2":
        from ray.tune.schedulers.pb2 import PB2  # imports scikit-learn

        return PB2(time_attr="step", perturbation_interval=spec.perturbation_interval,
                   hyperparam_bounds={key: values for key, (_, values) in plan.mutations.items()},
                   quantile_fraction=spec.quantile_fraction or 0.25, synch=True)
    return None


def _concurrent_trials(plan: SweepPlan, resources: dict[str, float]) -> int:
    """The spec's max_concurrent_trials, at most the trials the cluster's `resources` hold with one CPU left for
    Ray Data (see data.train_ingest). A cluster with no room for one trial yet (an autoscaling one before its GPU
    nodes start) runs max_concurrent_trials when the spec gives it: the trials wait for the nodes."""
    base = plan.base
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

def run_sweep(spec: SweepConfig) -> SweepResult:
    """Check, prepare the data once, run (or resume) the Tune experiment, write the results."""
    plan = plan_sweep(spec)
    check_same_spec(plan)
    start_ray()
    base = plan.base
    prepared = prepare_training_data(base, plan.folder, base.tokenizer or default_tokenizer())
    concurrent = _concurrent_trials(plan, ray.cluster_resources())
    threads = base.threads_per_worker
    if threads is None and not base.use_gpu:  # oversubscribed cores run torch several times slower
        threads = max(1, (os.cpu_count() or 1) // (concurrent * base.num_workers))
    trial_base = {**base.to_dict(), "train_data": prepared.path, "valid_data": None, "threads_per_worker": threads}
    fail_at = int(os.environ[FAIL_ENV]) if os.environ.get(FAIL_ENV) else None
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=trial_base, runs=plan.runs, metric=spec.metric,
                             pbt=spec.population_based, fail_at=fail_at), TRIAL_DRIVER)
    write_file(f"{plan.folder}/{SPEC_FILE}", yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))

    if tune.Tuner.can_restore(query_last(plan.folder)):
        print(f"resuming sweep {plan.folder}", flush=True)
        tuner = tune.Tuner.restore(query_last(plan.folder), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(plan),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, scheduler=scheduler(plan), num_samples=spec.num_samples,
                search_alg=search_algorithm(plan, concurrent)),
            # stop at the last step before a scheduler sees it: PBT would exploit there, a restart with nothing to train
            run_config=tune.RunConfig(name=spec.name, storage_path=plan.folder.rpartition("/")[0], verbose=1,
                                      callbacks=[_sweep_callback()], stop={"step": plan.steps}),
        )
    tuner.fit()
    _release_orphaned_placement_groups(wait_s=30)  # the last trials' groups: free for whatever runs next
    trials = tune.ExperimentAnalysis(query_last(plan.folder)).trials  # as saved: what a re-run resumes from
    status = {t.trial_id: {"TERMINATED": "done", "ERROR": "failed"}.get(t.status, "unfinished") for t in trials}
    rows = trial_rows(plan, status)
    best = best_row(rows, plan)
    write_results(plan, rows, best)
    interrupted = len(trials) < plan.num_trials or any(r["status"] == "unfinished" for r in rows)
    return SweepResult(plan, rows, best, interrupted)


def cmd_tune(args: argparse.Namespace) -> int:
    """`rugpt-ray tune`: the table, the best trial and, last, the sweep folder; 130 when interrupted."""
    spec = load_sweep_config(args.config, args.overrides, out=args.out)
    with ray_connection():
        result = run_sweep(spec)
    print(describe(result))
    print(result.folder)
    return 130 if result.interrupted else 0
