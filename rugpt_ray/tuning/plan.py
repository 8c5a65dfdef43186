"""The sweep spec and every check of it that can fail before Ray starts (`plan_sweep`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from rugpt_ray.config import (
    Config,
    TrainConfig,
    check_train_config,
    expand_data_vars,
    load_train_config,
    option,
    read_config_values,
)
from rugpt_ray.data.cache import read_meta
from rugpt_ray.data.inputs import resolve_inputs
from rugpt_ray.errors import UserError
from rugpt_ray.storage import is_uri, read_text

KINDS = ("loguniform", "uniform", "choice", "grid")
SCHEDULERS = ("asha", "pbt", "pb2", "none")
SEARCHES = ("random", "optuna")
ASHA_KEYS = ("grace_period", "reduction_factor")
PBT_KEYS = ("perturbation_interval", "mutations", "quantile_fraction")
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
DICT_KEYS = ("lora", "model")
"""TrainConfig mappings whose entries a search space may vary one by one (`lora.r`, `model.resid_pdrop`)."""
TRIAL_DRIVER = {"CPU": 0.01}
"""Tune's share for each trial's function (it only drives the trial's TorchTrainer, whose workers hold the CPUs and
GPUs); 0 is refused by Ray."""
TRIAL_FILE = "trial.json"
SPEC_FILE = "sweep.yaml"


@dataclass
class SweepConfig(Config):
    """One sweep. YAML specs (tune/*.yaml) and `key=value` overrides use these names (`train.max_steps=100`)."""

    where: ClassVar[str] = "sweep spec"

    name: str = "sweep"
    """Sweep name; the sweep folder is storage_path/name, and re-running the same name resumes it."""
    storage_path: str = "runs/tune"
    """Where sweeps live."""
    recipe: str | None = None
    """Training recipe every trial starts from (a TrainConfig YAML such as jobs/configs/tiny-cpu.yaml)."""
    train: dict[str, Any] = option(factory=dict)
    """TrainConfig keys over the recipe, the same in every trial (e.g. {max_steps: 60, eval_interval: 15})."""
    space: dict[str, Any] = option(factory=dict)
    """TrainConfig keys to search, each {loguniform: [low, high]}, {uniform: [low, high]}, {choice: [values]}
    (one drawn per trial) or {grid: [values]} (every value, num_samples times each)."""
    num_samples: int = option(8, ge=1)
    """Trials drawn from the space (times the grid's size when it has grid keys)."""
    search: str = option("random", choices=SEARCHES)
    """How each trial's values are drawn: random (and every grid value) or optuna (Optuna's TPE, seeded: each new
    trial's values come from what the finished ones showed; no grid keys)."""
    scheduler: str = option("asha", choices=SCHEDULERS)
    """asha (stop trials that fall behind at each rung of evaluations), pbt (population-based training: at every
    perturbation_interval the worst trials continue from a copy of a better one's checkpoint with perturbed values)
    pb2 (PBT whose new values come from a Gaussian-process bandit over the results, within the mutations' ranges)
    or none (every trial runs to the end)."""
    metric: str = "valid_loss"
    """What trials are ranked by: valid_loss, valid_ppl (need validation data), loss or ppl."""
    mode: str = option("min", choices=("min", "max"))
    """min or max of the metric is best."""
    grace_period: int | None = option(None, ge=1)
    """ASHA: training steps before a trial can be stopped (default: the first evaluation, eval_interval)."""
    reduction_factor: float | None = option(None, gt=1)
    """ASHA: at each rung only the best 1/reduction_factor of the trials that reached it go on (default 2)."""
    perturbation_interval: int | None = option(None, ge=1)
    """PBT: training steps between exploits; at least the recipe's save_interval (a trial continues from a
    checkpoint)."""
    mutations: dict[str, Any] = option(factory=dict)
    """PBT: the keys it perturbs, in the space's form ({loguniform: [low, high]}, {uniform: ...}, {choice: ...});
    a key not in `space` draws its first value from here."""
    quantile_fraction: float | None = option(None, gt=0, le=0.5)
    """PBT: the worst fraction of the trials copy one of the best fraction at each exploit (default 0.25)."""
    max_concurrent_trials: int | None = option(None, ge=1)
    """Trials running at once; at most (and by default) as many as the cluster fits with one CPU left for Ray Data's
    reads (more would starve them: the trials' training would wait forever). Give it on an autoscaling cluster
    whose GPU nodes are not up yet: it is then taken as it is."""
    resources_per_trial: dict[str, Any] = option(factory=dict)
    """Each trial's Ray Train workers: num_workers, cpus_per_worker, threads_per_worker, use_gpu (over the recipe's
    values). CPU workers' threads default to the node's cores shared among all the trials' workers running at once."""
    seed: int = 0
    """Seed of the search (which values are drawn); every trial trains with the recipe's seed."""

    def check(self) -> None:
        if self.metric not in METRICS:
            raise UserError(f"{self.where}: the trainer never reports metric {self.metric!r}; "
                            f"rank trials by one of {', '.join(METRICS)}")
        others = ASHA_KEYS if self.population_based else PBT_KEYS
        mixed = [key for key in others if getattr(self, key) not in (None, {})]
        if mixed:
            owner = "ASHA's" if self.population_based else "PBT's"
            raise UserError(f"{self.where}: {', '.join(mixed)} {'is' if len(mixed) == 1 else 'are'} {owner}, not "
                            f"scheduler {self.scheduler}'s; remove {'it' if len(mixed) == 1 else 'them'}")
        if self.population_based and self.search != "random":
            raise UserError(f"{self.where}: scheduler {self.scheduler} draws its first values at random and then "
                            f"perturbs them; search {self.search} cannot go with it (use search: random)")

    @property
    def population_based(self) -> bool:
        """PBT or PB2: trials exploit each other's checkpoints (`tuning.pbt`)."""
        return self.scheduler in ("pbt", "pb2")


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
    mutations: dict[str, tuple[str, list]] = dataclasses.field(default_factory=dict)
    """PBT's perturbed keys, checked as `space` is."""

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
    base = _base_config(spec)
    steps = check_train_config(base).config.total_steps()
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
    if spec.search == "optuna":
        _refuse_grid(space, "search optuna draws each value from a range or list (use choice)")
    if spec.grace_period is not None and not 1 <= spec.grace_period <= steps:
        raise UserError(f"sweep spec: grace_period must be between 1 and the trials' {steps} steps, "
                        f"got {spec.grace_period}")
    mutations = _check_pbt(spec, base, steps) if spec.population_based else {}
    storage = spec.storage_path.rstrip("/") if is_uri(spec.storage_path) else str(Path(spec.storage_path).resolve())
    return SweepPlan(spec, base, space, steps, f"{storage}/{spec.name}", mutations)


def _check_pbt(spec: SweepConfig, base: TrainConfig, steps: int) -> dict[str, tuple[str, list]]:
    """PBT's keys: an interval that falls on checkpoints that carry the metric, and mutations as a space (ranges
    only for PB2, which draws within them)."""
    interval, scheduler = spec.perturbation_interval, spec.scheduler
    if interval is None:
        raise UserError(f"sweep spec: scheduler {scheduler} needs perturbation_interval (training steps between "
                        "exploits)")
    if interval < base.save_interval:
        raise UserError(f"sweep spec: perturbation_interval {interval} is shorter than the checkpoint interval "
                        f"(save_interval {base.save_interval}): a trial continues from a checkpoint")
    if interval > steps:
        raise UserError(f"sweep spec: perturbation_interval {interval} is past the trials' {steps} steps")
    every, name = ((base.eval_interval, "eval_interval") if spec.metric.startswith("valid_")
                   else (base.log_interval, "log_interval"))
    if base.save_interval % every:
        raise UserError(f"sweep spec: scheduler {scheduler} compares trials at their checkpoints: save_interval "
                        f"{base.save_interval} must be a multiple of {name} {every} ({spec.metric} is reported then)")
    if not spec.mutations:
        raise UserError(f"sweep spec: scheduler {scheduler} needs mutations, the keys it perturbs; "
                        "e.g. mutations: {lr: {loguniform: [1.0e-4, 1.0e-2]}}")
    mutations = _check_space(spec.mutations, base, "mutations")
    _refuse_grid(mutations, "PBT perturbs values within a range or list (use choice)", "mutations")
    listed = [key for key, (kind, _) in mutations.items() if kind == "choice"]
    if scheduler == "pb2" and listed:
        raise UserError(f"sweep spec: mutations.{listed[0]}: PB2 draws new values within a range: give "
                        "{uniform: [low, high]} or {loguniform: [low, high]}")
    return mutations


def _refuse_grid(space: dict[str, tuple[str, list]], why: str, name: str = "space") -> None:
    grid = [key for key, (kind, _) in space.items() if kind == "grid"]
    if grid:
        raise UserError(f"sweep spec: {name}.{grid[0]}: grid is not for this sweep: {why}")


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


def _check_space(space: Any, base: TrainConfig, name: str = "space") -> dict[str, tuple[str, list]]:
    """{key: (kind, values)}; every bound and every listed value must make a config that passes every check."""
    example = "e.g. space: {lr: {loguniform: [1.0e-4, 1.0e-2]}, weight_decay: {uniform: [0.0, 0.1]}}"
    if not isinstance(space, dict) or not space:
        raise UserError(f"sweep spec: the search space is empty; {example}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, entry in space.items():
        where = f"sweep spec: {name}.{key}"
        field, dot, _ = key.partition(".")
        if field not in known or (dot and field not in DICT_KEYS):
            raise UserError(f"{where}: not a training config key (nor {' or '.join(DICT_KEYS)}.KEY)")
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
            try:
                check_train_config(TrainConfig.from_dict(trial_values(base.to_dict(), {key: value})))
            except UserError as e:
                raise UserError(f"{where} value {value!r}: {e}") from e
        out[key] = (kind, values)
    return out


def trial_values(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's TrainConfig values: the base with its drawn values; `lora.r` sets one entry of `lora`."""
    values = dict(base)
    for key, value in params.items():
        field, dot, entry = key.partition(".")
        values[field] = {**(values.get(field) or {}), entry: value} if dot else value
    return values


def check_same_spec(plan: SweepPlan) -> None:
    """Resuming needs the spec the sweep started with (its place aside: the folder may have moved). A key the saved
    spec lacks (one added to SweepConfig since) counts as its default."""
    saved_file = f"{plan.folder}/{SPEC_FILE}"
    text = read_text(saved_file)
    if text is None:
        return
    defaults = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(SweepConfig())))
    saved = {**defaults, **yaml.safe_load(text)}
    now = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(plan.spec)))
    changed = sorted(k for k in set(saved) | set(now)
                     if k not in ("name", "storage_path") and saved.get(k) != now.get(k))
    if changed:
        raise UserError(f"{plan.folder} holds a sweep started with other {', '.join(changed)}; run it with the spec "
                        f"in {saved_file} to resume it, or give another name or --out")
