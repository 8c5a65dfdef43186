"""Hyperparameter sweeps: Ray Tune over the trainer (`rugpt-ray tune --config tune/lr_wd.yaml`).

- `plan`: the sweep spec (`SweepConfig`) and every check before Ray starts (`plan_sweep`);
- `trials`: running the trials under Tune (`run_sweep`: random or Optuna search; ASHA, PBT or no scheduler) and the
  command;
- `pbt`: population-based training over Train runs (pointer checkpoints, exploits that copy a donor's checkpoint,
  lineage);
- `results`: trials.csv, the printed table, best.yaml (the plot is in `rugpt_ray.plotting`).

A sweep folder (`storage_path/name`, or `--out`) holds:
    data/            the training data, prepared once for every trial
    runs/TRIAL/      each trial's training run: metrics.jsonl, checkpoints step_*, trial.json (its values),
                     lineage.json (PBT: its first values and exploits)
    sweep.yaml       the spec it was started with (re-running the same spec resumes the sweep)
    trials.csv, trials.png, best.yaml      the results
and Tune's own state. Re-running resumes: finished trials are kept, unfinished ones continue from their last
training checkpoint. The folder may be a URI (s3://bucket/sweeps/NAME): every file goes through pyarrow.
"""

