"""Sweeps through real Ray Tune over real Ray Train + DeepSpeed on CPU: ASHA stops laggards, the results name the
best trial and its config trains, an interrupted sweep resumes without re-running finished trials and an unfinished
one continues from its checkpoint, PBT copies a better trial's checkpoint and perturbs its lr, Optuna's search is
seeded and resumes, bad specs fail before any trial starts."""

import csv
import dataclasses
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from own_ray import own_ray_env

from rugpt_ray.cli import main
from rugpt_ray.config import load_train_config
from rugpt_ray.errors import UserError
from rugpt_ray.train import lr_at, train
from rugpt_ray.tuning.plan import check_same_spec, load_sweep_config, plan_sweep
from rugpt_ray.tuning.trials import FAIL_ENV, param_space, run_sweep, search_algorithm

REPO = Path(__file__).resolve().parents[1]
CPU_ONLY = {"CPU": 2.0}  # the shared test Ray's CPUs, and no GPU whatever the host has


@pytest.fixture(scope="module")
def prepared(prepare_once, data_dir) -> str:
    """One short text each (Gogol's "The Nose", Chekhov's "The Lady with the Dog"): trials start faster."""
    corpus = data_dir / "corpus"
    return prepare_once("short-seq64", inputs=[str(corpus / "train" / "gogol_nos.txt")],
                        valid=[str(corpus / "valid" / "chekhov_dama_s_sobachkoy.txt")],
                        tokenizer=str(data_dir / "tokenizer"), seq_len=64)["out"]


def spec_file(tmp_path: Path, train_data: str, **overrides) -> str:
    """A small sweep: the dense tiny model, seq 64, 1 worker of 0.45 CPU per trial, so 2 trials fit on 2 CPUs."""
    values = dict(
        name="sweep", storage_path=str(tmp_path / "sweeps"),
        train=dict(preset="tiny", model={"sparse_mode": "none"}, train_data=train_data, seq_len=64, micro_batch=8,
                   lr=3e-3, min_lr=1e-5, warmup=2, log_interval=5, eval_interval=5, eval_iters=2, save_interval=5,
                   max_steps=20, num_to_keep=4, zero_stage=0),
        space={"lr": {"grid": [3e-3, 1e-5]}, "weight_decay": {"uniform": [0.0, 0.1]}},
        num_samples=2, scheduler="asha", grace_period=5, max_concurrent_trials=2,
        resources_per_trial={"num_workers": 1, "cpus_per_worker": 0.45})
    for key, value in overrides.items():
        if isinstance(value, dict) and key == "train":
            values["train"].update(value)
        else:
            values[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.slow
@pytest.mark.long
def test_asha_stops_laggards_and_the_best_config_trains(tmp_path, prepared, ray_local, capsys):
    # 3 trials (lr grid of two good values and a hopeless one), 2 at a time, ASHA rungs at steps 5 and 10: the
    # third (hopeless) one always meets the first two's results at step 5 and stops there
    space = {"lr": {"grid": [3e-3, 2e-3, 1e-5]}, "weight_decay": {"uniform": [0.0, 0.1]}}
    assert main(["tune", "--config", spec_file(tmp_path, prepared, space=space, num_samples=1)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    folder = Path(printed[-1])
    assert folder == tmp_path / "sweeps" / "sweep"

    with open(folder / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {float(r["lr"]) for r in rows} == {3e-3, 2e-3, 1e-5}
    assert {r["status"] for r in rows} <= {"finished", "stopped early"}
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(int(r["steps"]) < 20 for r in stopped)
    assert all(int(r["steps"]) == 20 for r in rows if r["status"] == "finished")
    good = [float(r["best_valid_loss"]) for r in rows if float(r["lr"]) > 1e-3]
    hopeless = [float(r["best_valid_loss"]) for r in rows if float(r["lr"]) == 1e-5]
    assert min(good) < min(hopeless) - 0.5  # lr 3e-3 learns in 20 steps, 1e-5 barely moves
    for r in rows:  # stopped trials keep their checkpoints too
        assert Path(r["checkpoint"]).is_dir() and Path(r["checkpoint"]).parent == folder / "runs" / r["trial"]

    # the reported best is the table's minimum, with its checkpoint at that evaluation
    best = min(rows, key=lambda r: float(r["best_valid_loss"]))
    assert f"best: {best['trial']} " in "\n".join(printed)
    assert f"best valid_loss {float(best['best_valid_loss']):.4g} at step {best['best_step']}" in "\n".join(printed)
    assert f"best checkpoint: {best['checkpoint']}" in printed
    state = json.loads((Path(best["checkpoint"]) / "train_state.json").read_text())
    assert state["step"] == int(best["best_step"]) and state["metrics"]["valid_loss"] == float(best["best_valid_loss"])
    assert (folder / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # best.yaml is a training recipe with the winning values; a short run from it trains
    cfg = load_train_config(str(folder / "best.yaml"), [f"storage_path={tmp_path / 'runs'}", "max_steps=5"])
    assert (cfg.lr, cfg.weight_decay) == (float(best["lr"]), float(best["weight_decay"]))
    assert (cfg.name, cfg.num_workers, cfg.seq_len) == ("sweep-best", 1, 64)
    trial = json.loads((folder / "runs" / best["trial"] / "trial.json").read_text())
    assert trial["config"]["threads_per_worker"] == 1  # 2 trials at once share the 2 cores
    assert cfg.threads_per_worker is None  # a run on its own uses them all
    handler = signal.getsignal(signal.SIGINT)
    result = train(cfg)
    assert signal.getsignal(signal.SIGINT) is handler  # not Ray's, which would keep the run's actors alive
    assert Path(result.checkpoint).name == "step_0000005"
    assert result.metrics["valid_loss"] < float(max(hopeless))


@pytest.mark.parametrize("overrides,message", [
    ({"space": {}}, "the search space is empty"),
    ({"space": {"lr": 0.001}}, "space.lr: expected one of {loguniform: ..., uniform: ..., choice: ..., grid: ...}"),
    ({"space": {"lr": {"loguniform": ["1e-4", "1e-2"]}}}, "YAML reads 1e-4 as text: write 1.0e-4"),
    ({"space": {"lr": {"loguniform": [0.0, 1e-2]}}}, "loguniform needs low < high and low > 0"),
    ({"space": {"lr": {"choice": []}}}, "choice needs a non-empty list"),
    ({"space": {"learning_rate": {"choice": [1e-3]}}}, "space.learning_rate: not a training config key"),
    ({"space": {"seq_len": {"choice": [32, 64]}}}, "space.seq_len: cannot be searched (the data is prepared once"),
    ({"space": {"lr": {"choice": [1e-6]}}}, "space.lr value 1e-06: train config: need lr > 0 and 0 <= min_lr <= lr"),
    ({"scheduler": "hyperband"}, "scheduler 'hyperband' is not one of asha, pbt, pb2, none"),
    ({"scheduler": "pb2", "grace_period": None, "perturbation_interval": 10,
      "mutations": {"weight_decay": {"choice": [0.0, 0.1]}}},
     "mutations.weight_decay: PB2 draws new values within a range: give {uniform: [low, high]}"),
    ({"search": "hyperopt"}, "search 'hyperopt' is not one of random, optuna"),
    ({"search": "optuna", "space": {"lr": {"grid": [1e-3, 2e-3]}}},
     "space.lr: grid is not for this sweep: search optuna draws each value from a range or list (use choice)"),
    ({"scheduler": "pbt", "perturbation_interval": 5, "mutations": {"lr": {"uniform": [1e-3, 2e-3]}}},
     "grace_period is ASHA's, not scheduler pbt's; remove it"),
    ({"scheduler": "asha", "perturbation_interval": 5, "quantile_fraction": 0.5},
     "perturbation_interval, quantile_fraction are PBT's, not scheduler asha's; remove them"),
    ({"scheduler": "pbt", "grace_period": None, "mutations": {"lr": {"uniform": [1e-3, 2e-3]}}},
     "scheduler pbt needs perturbation_interval"),
    ({"scheduler": "pbt", "grace_period": None, "perturbation_interval": 4,
      "mutations": {"lr": {"uniform": [1e-3, 2e-3]}}},
     "perturbation_interval 4 is shorter than the checkpoint interval (save_interval 5)"),
    ({"scheduler": "pbt", "grace_period": None, "perturbation_interval": 10},
     "scheduler pbt needs mutations, the keys it perturbs"),
    ({"scheduler": "pbt", "grace_period": None, "perturbation_interval": 10, "mutations": {"lr": {"grid": [0.1]}}},
     "mutations.lr: grid is not for this sweep: PBT perturbs values within a range or list"),
    ({"scheduler": "pbt", "grace_period": None, "perturbation_interval": 10, "search": "optuna",
      "space": {"lr": {"uniform": [1e-3, 2e-3]}}, "mutations": {"lr": {"uniform": [1e-3, 2e-3]}}},
     "search optuna cannot go with it"),
    ({"scheduler": "pbt", "grace_period": None, "perturbation_interval": 10, "train": {"eval_interval": 10},
      "mutations": {"lr": {"uniform": [1e-3, 2e-3]}}},
     "save_interval 5 must be a multiple of eval_interval 10"),
    ({"metric": "accuracy"}, "the trainer never reports metric 'accuracy'"),
    ({"train": {"valid_data": None}}, "metric valid_loss needs validation data"),
    ({"resources_per_trial": {"gpus": 1}}, "resources_per_trial: unknown keys ['gpus']"),
    ({"grace_period": 21}, "grace_period must be between 1 and the trials' 20 steps"),
])
def test_bad_spec_is_one_clear_error_before_any_trial(tmp_path, data_dir, overrides, message):
    corpus = data_dir / "corpus"
    spec = spec_file(tmp_path, str(corpus / "train"), **{"train": {"valid_data": str(corpus / "valid")}})
    values = yaml.safe_load(Path(spec).read_text())
    for key, value in overrides.items():
        if key == "train":
            values["train"].update(value)
        else:
            values[key] = value
    Path(spec).write_text(yaml.safe_dump(values))
    with pytest.raises(UserError) as error:
        run_sweep(load_sweep_config(spec))
    assert message in str(error.value)
    assert not (tmp_path / "sweeps").exists()  # nothing was started


def test_the_command_reports_bad_input_in_one_line(tmp_path, data_dir):
    corpus = data_dir / "corpus"
    spec = spec_file(tmp_path, str(corpus / "train"), space={}, train={"valid_data": str(corpus / "valid")})
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "tune.py"), "--config", spec, "metric=valid_loss"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "rugpt-ray tune: error: sweep spec: the search space is empty; "
        "e.g. space: {lr: {loguniform: [1.0e-4, 1.0e-2]}, weight_decay: {uniform: [0.0, 0.1]}}"], out.stderr


def test_a_sweep_folder_resumes_only_with_its_own_spec(tmp_path, data_dir):
    corpus = data_dir / "corpus"
    spec = spec_file(tmp_path, str(corpus / "train"), train={"valid_data": str(corpus / "valid")})
    folder = tmp_path / "sweeps" / "sweep"
    folder.mkdir(parents=True)
    started = {**dataclasses.asdict(load_sweep_config(spec)), "num_samples": 9}
    (folder / "sweep.yaml").write_text(yaml.safe_dump(started))
    with pytest.raises(UserError, match="holds a sweep started with other num_samples; run it with the spec in"):
        run_sweep(load_sweep_config(spec))
    older = {k: v for k, v in dataclasses.asdict(load_sweep_config(spec)).items()
             if k not in ("search", "perturbation_interval", "mutations", "quantile_fraction")}
    (folder / "sweep.yaml").write_text(yaml.safe_dump(older))  # saved before those keys existed: their defaults
    check_same_spec(plan_sweep(load_sweep_config(spec)))
    for spec_path in sorted((REPO / "tune").glob("*.yaml")):  # the shipped specs pass every check
        plan = plan_sweep(load_sweep_config(str(spec_path)))
        assert set(plan.space) in ({"lr", "weight_decay"}, {"lr", "lora.r"})
        assert plan.spec.scheduler in ("asha", "pbt") and plan.spec.search in ("random", "optuna")


def test_gpu_trials_on_a_cluster_without_gpus_wait_only_when_asked(tmp_path, data_dir, capsys):
    """An autoscaling cluster has no GPU node before the sweep asks for one: max_concurrent_trials is then taken
    as it is (the trials wait for nodes); without it the sweep cannot size itself and says why. The cluster's
    resources are given, not read from a Ray, so a GPU host runs the same test (issue 29)."""
    from rugpt_ray.tuning.trials import _concurrent_trials

    corpus = data_dir / "corpus"
    gpu = {"resources_per_trial": {"num_workers": 1, "use_gpu": True}, "train": {"valid_data": str(corpus / "valid")}}
    spec = spec_file(tmp_path, str(corpus / "train"), max_concurrent_trials=3, **gpu)
    assert _concurrent_trials(plan_sweep(load_sweep_config(spec)), CPU_ONLY) == 3
    assert "no room for a trial in the cluster yet; 3 at a time" in capsys.readouterr().out
    spec = spec_file(tmp_path, str(corpus / "train"), max_concurrent_trials=None, **gpu)
    with pytest.raises(UserError, match="one trial needs 0.51 CPUs and 1 GPUs plus a CPU for Ray Data; the cluster "
                                        "has 2 CPUs, 0 GPUs"):
        _concurrent_trials(plan_sweep(load_sweep_config(spec)), CPU_ONLY)
    assert _concurrent_trials(plan_sweep(load_sweep_config(spec)), {"CPU": 16.0, "GPU": 2.0}) == 2  # one per GPU


@pytest.mark.slow
@pytest.mark.long
def test_pbt_exploit_continues_the_donor_s_checkpoint_with_the_perturbed_lr_and_resumes(tmp_path, prepared):
    # 2 trials (a good lr and a hopeless one), synchronous PBT at step 5 of 8: the hopeless one copies the good one's
    # step-5 checkpoint and goes on with a perturbation of its lr; a training loss logged at every step; the sweep
    # folder behind a URI (as s3://bucket/sweeps on a cluster): the copy goes through pyarrow. The command is stopped
    # with Ctrl+C right after the exploit and run again, each time with a Ray of its own, not the shared test Ray:
    # - stopped on the shared one, it once left the restarted trial's placement group (0.45 CPU) behind, created
    #   0.7 s before Ray marked the command's job finished and never removed, so a later test's training on that
    #   Ray waited for a CPU that never came free (test_nan, 2026-12-06);
    # - resumed on it, after the earlier tests' sweeps, the trials' first reads once waited the same way: two trials
    #   at once need all of its 2 CPUs.
    spec = spec_file(tmp_path, prepared, scheduler="pbt", grace_period=None, num_samples=1, perturbation_interval=5,
                     storage_path=f"file://{tmp_path}/sweeps",
                     quantile_fraction=0.5, space={"lr": {"grid": [3e-3, 1e-5]}},
                     mutations={"lr": {"loguniform": [1e-4, 1e-2]}},
                     train={"max_steps": 8, "log_interval": 1, "eval_interval": 5, "save_interval": 5})
    command = [sys.executable, "-m", "rugpt_ray.cli", "tune", "--config", spec]
    with own_ray_env() as env:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:  # the trial's line (forwarded from its actor) once it has copied the donor's state
            lines.append(line)
            if " continues from " in line:
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=300)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted: run the same command again" in output, output[-3000:]

    with own_ray_env() as env:
        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming sweep" in resumed.stdout
    (best_trial,) = re.findall(r"^best: (\S+) ", resumed.stdout, re.MULTILINE)
    folder = tmp_path / "sweeps" / "sweep"
    with open(folder / "trials.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert sorted(r["exploits"] for r in rows.values()) == ["0", "1"] and all(r["steps"] == "8" for r in rows.values())
    (taker,) = [t for t, r in rows.items() if r["exploits"] == "1"]
    (donor,) = set(rows) - {taker}
    assert rows[taker]["donors"] == f"{donor}@5" and rows[donor]["donors"] == ""

    lineage = json.loads((folder / "runs" / taker / "lineage.json").read_text())
    (event,) = lineage["exploits"]
    assert (event["step"], event["donor"], event["old"]["lr"]) == (5, donor, 1e-5)
    assert event["donor_checkpoint"] == f"file://{folder}/runs/{donor}/step_0000005"
    assert lineage["initial"] == {"lr": 1e-5} and event["new"]["lr"] != 3e-3  # perturbed from the donor's
    assert float(rows[taker]["lr"]) == event["new"]["lr"]
    assert sorted(p.name for p in (folder / "runs" / taker).glob("step_*")) == ["step_0000005", "step_0000008"]

    def metrics(trial):
        return {m["step"]: m for m in map(json.loads, (folder / "runs" / trial / "metrics.jsonl").open())}

    took, gave = metrics(taker), metrics(donor)
    assert sorted(took) == list(range(1, 9))  # its own steps 1-5, then the copy's step count goes on
    assert took[5]["valid_loss"] > gave[5]["valid_loss"] + 0.3  # before: its own hopeless weights
    assert took[6]["loss"] == pytest.approx(gave[6]["loss"], rel=1e-5)  # the donor's weights, batch and RNG
    cfg = plan_sweep(load_sweep_config(spec)).base
    for step in (6, 7, 8):  # the schedule goes on at the copied step with the new peak
        assert took[step]["lr"] == pytest.approx(lr_at(step, dataclasses.replace(cfg, lr=event["new"]["lr"]), 8))
        assert gave[step]["lr"] == pytest.approx(lr_at(step, dataclasses.replace(cfg, lr=3e-3), 8))

    best = load_train_config(str(folder / "best.yaml"))
    schedule = [line for line in (folder / "best.yaml").read_text().splitlines() if line.startswith("#   from step")]
    if best_trial == taker:
        assert schedule == ["#   from step 0: lr 0.003", f"#   from step 5: lr {event['new']['lr']:.3g}"]
    else:
        assert schedule == ["#   from step 0: lr 0.003"]
    assert best.lr == float(rows[best_trial]["lr"])
    assert (folder / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.long
def test_a_resumed_sweep_continues_its_unfinished_trial_and_keeps_its_finished_one(tmp_path, prepared, ray_local,
                                                                                   monkeypatch):
    # Optuna's search, one trial at a time, the sweep folder behind a URI (as s3://bucket/sweeps on a cluster: every
    # file goes through pyarrow); the first trial fails right after its step-5 checkpoint (the test seam FAIL_ENV), as
    # an interrupted sweep leaves it, and the second finishes; the second run of the sweep resumes the first from step
    # 5, not from step 0, and leaves the finished one alone
    spec = spec_file(tmp_path, prepared, scheduler="none", search="optuna", num_samples=2, max_concurrent_trials=1,
                     storage_path=f"file://{tmp_path}/sweeps",
                     space={"lr": {"loguniform": [1e-3, 5e-3]}, "weight_decay": {"uniform": [0.0, 0.1]}},
                     train={"max_steps": 10, "eval_interval": 5, "save_interval": 5, "log_interval": 5})
    monkeypatch.setenv(FAIL_ENV, "5")
    first = run_sweep(load_sweep_config(spec))
    by_status = {r["status"]: r for r in first.rows}
    assert sorted(by_status) == ["failed", "finished"] and by_status["failed"]["steps"] == 5
    cut, done = by_status["failed"]["trial"], by_status["finished"]["trial"]
    folder = tmp_path / "sweeps" / "sweep"
    runs = folder / "runs"

    def files(trial: str) -> dict[str, int]:  # every file of a trial's run folder, with its mtime
        return {str(p.relative_to(runs)): p.stat().st_mtime_ns for p in (runs / trial).rglob("*") if p.is_file()}

    kept, step5 = files(done), (runs / cut / "step_0000005" / "train_state.json").stat().st_mtime_ns

    monkeypatch.delenv(FAIL_ENV)
    second = run_sweep(load_sweep_config(spec))
    assert not second.interrupted and [r["status"] for r in second.rows] == ["finished", "finished"]
    assert sorted((r["trial"], r["lr"], r["weight_decay"]) for r in second.rows) == sorted(
        (r["trial"], r["lr"], r["weight_decay"]) for r in first.rows)  # the same trials, values: no new draw
    assert files(done) == kept  # the finished trial did not train again
    assert (runs / cut / "step_0000005" / "train_state.json").stat().st_mtime_ns == step5  # not saved again
    assert (runs / cut / "step_0000010").is_dir()
    results = [json.loads(line) for line in next(folder.glob(f"*{cut}*/result.json")).open()]
    assert [r["step"] for r in results] == [5, 10]  # step 5 reported once: the second run began at step 6
    assert [json.loads(line)["step"] for line in (runs / cut / "metrics.jsonl").open()] == [5, 10]

    assert second.folder == f"file://{folder}"
    assert all(r["checkpoint"].startswith(f"file://{runs}/") for r in second.rows)
    assert (folder / "trials.png").is_file() and (folder / "best.yaml").is_file()
    with open(folder / "trials.csv") as f:
        assert sorted(r["trial"] for r in csv.DictReader(f)) == sorted([cut, done])


def test_optuna_search_is_seeded_and_resumes(tmp_path, data_dir):
    corpus = data_dir / "corpus"
    spec = spec_file(tmp_path, str(corpus / "train"), search="optuna", scheduler="none", grace_period=None,
                     space={"lr": {"loguniform": [1e-4, 1e-2]}, "weight_decay": {"choice": [0.0, 0.05, 0.1]}},
                     train={"valid_data": str(corpus / "valid")})
    plan = plan_sweep(load_sweep_config(spec))

    def searcher():
        algorithm = search_algorithm(plan, concurrent=2)
        algorithm.set_search_properties(plan.spec.metric, plan.spec.mode, param_space(plan))
        return algorithm

    one, two = searcher(), searcher()
    first = [one.suggest(f"t{i}") for i in range(2)]
    assert [two.suggest(f"t{i}") for i in range(2)] == first  # the same seed proposes the same values
    assert first[0] != first[1] and all(1e-4 <= s["lr"] <= 1e-2 for s in first)
    assert one.suggest("t2") is None  # 2 at a time
    for i, loss in enumerate([5.0, 4.0]):
        one.on_trial_complete(f"t{i}", {"valid_loss": loss, "step": 10})
    one.save(str(tmp_path / "searcher.pkl"))
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t2") == one.suggest("t2")  # a resumed sweep proposes what the first would have


def test_pb2_is_synchronous_pbt_within_the_mutations_ranges(tmp_path, data_dir):
    from ray.tune.schedulers.pb2 import PB2

    from rugpt_ray.tuning.trials import scheduler

    corpus = data_dir / "corpus"
    spec = spec_file(tmp_path, str(corpus / "train"), scheduler="pb2", grace_period=None, perturbation_interval=10,
                     mutations={"lr": {"loguniform": [1e-4, 1e-2]}, "weight_decay": {"uniform": [0.0, 0.2]}},
                     train={"valid_data": str(corpus / "valid")})
    pb2 = scheduler(plan_sweep(load_sweep_config(spec)))
    assert isinstance(pb2, PB2) and pb2._synch and pb2._perturbation_interval == 10
    assert pb2._hyperparam_bounds == {"lr": [1e-4, 1e-2], "weight_decay": [0.0, 0.2]}
