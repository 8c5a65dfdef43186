"""The cluster promise, tested on this machine: `ray job submit` against a `ray start` head runs the job
entrypoints, and training and serving survive losing a node (ray.cluster_utils.Cluster, in a child process so it
does not meet this session's Ray)."""

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from own_ray import RAY, own_ray_env, ray_start_head

from rugpt_ray.checkpoints import load_model
from rugpt_ray.evaluation import join_documents, perplexity

pytestmark = [pytest.mark.slow, pytest.mark.long]  # every test here starts Ray clusters and runs for minutes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster_env() -> Iterator[dict[str, str]]:
    """What a user's shell has after `make setup`: the venv first on PATH (the job's `python`), no auth token, and
    a Ray temp folder of its own (own_ray_env)."""
    with own_ray_env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                     PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}") as env:
        yield env


def submit(address: str, env: dict[str, str], *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python ...` from the repository root, waiting for the job to end."""
    return subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python",
                           *entrypoint], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_ray_job_submit_trains_then_evaluates(tmp_path, data_dir, tokenizer, cluster_env):
    train_file = data_dir / "corpus" / "train" / "gogol_nos.txt"
    valid_file = data_dir / "corpus" / "valid" / "chekhov_dama_s_sobachkoy.txt"
    storage = tmp_path / "runs"
    with ray_start_head(cluster_env) as head:
        trained = submit(head.dashboard, cluster_env, "jobs/train.py", "--config", "jobs/configs/tiny-cpu.yaml",
                         "name=job", f"storage_path={storage}", f"train_data={train_file}", f"valid_data={valid_file}",
                         "max_steps=10", "log_interval=5", "eval_interval=10", "save_interval=10", "eval_iters=2",
                         "num_workers=1")  # two workers' training is test_train's and the node-loss test's
        assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
        assert re.search(r"Job '\S+' succeeded", trained.stdout + trained.stderr), trained.stdout[-2000:]
        cli_line = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|SUCC|WARNING|ERROR) cli\.py")  # `ray job submit`'s own
        job_lines = [line for line in trained.stdout.splitlines() if line.strip() and not cli_line.match(line)]
        assert job_lines[-1] == str(storage / "job"), job_lines[-5:]  # the job's last line: its run folder
        progress = [line for line in job_lines if re.match(r"step \d+/10 \| loss ", line)]
        assert [line.split(" | ")[0] for line in progress] == ["step 5/10", "step 10/10"], job_lines
        assert "ETA" in progress[0] and "valid_loss" in progress[1]  # one clean line per log interval
        assert not [line for line in job_lines if "TrainingReport(" in line or "Reporting training result" in line]
        state = json.loads((storage / "job" / "step_0000010" / "train_state.json").read_text())
        assert state["step"] == 10 and state["metrics"]["valid_loss"] > 0

        evaluated = submit(head.dashboard, cluster_env, "jobs/evaluate.py", "--model", str(storage / "job"),
                           "--data", str(valid_file), "--seq-len", "128")
        assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    reported = float(re.search(r"perplexity ([\d.]+)", evaluated.stdout).group(1))
    model = load_model(storage / "job" / "step_0000010" / "model")
    tokens = join_documents([tokenizer.encode(valid_file.read_text(encoding="utf-8"))], tokenizer.eos_id)
    assert reported == pytest.approx(perplexity(model, tokens, 128, 4).ppl, rel=1e-3)  # the job's checkpoint


@pytest.mark.timeout(2400)  # 4-5 min alone, 10 beside the rest of the suite here, past 15 on CI's machine
def test_losing_a_node_training_resumes_and_serving_recovers(tmp_path, cluster_env):
    """Both scenarios in one child process with its own 3-node cluster (see cluster_scenarios.py)."""
    out, log = tmp_path / "result.json", tmp_path / "scenario.log"
    with log.open("w") as sink:
        child = subprocess.Popen([sys.executable, str(REPO / "tests" / "cluster_scenarios.py"), str(tmp_path),
                                  str(out)], cwd=REPO, env=cluster_env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            returncode = child.wait(timeout=2100)
        except subprocess.TimeoutExpired:
            child.kill()
            returncode = None
    lines = log.read_text(errors="replace").splitlines()
    phases = [line for line in lines if line.startswith("[")]
    assert returncode == 0 and out.is_file(), "\n".join(phases + ["..."] + lines[-60:])
    result = json.loads(out.read_text())
    # every log_interval (5) logged once up to the end: no gap, no restart from 0, no step twice
    assert result["train"]["logged_steps"] == list(range(5, result["train"]["max_steps"] + 1, 5))
    assert result["train"]["checkpoints_before_loss"]
    assert set(result["train"]["checkpoints_before_loss"]) <= set(result["train"]["checkpoints_after"])
    assert result["train"]["train_worker_actors"] == 4  # a second worker group: the run went through a failure
    assert result["train"]["final_step"] == result["train"]["max_steps"]
    assert result["serve"]["before"] == result["serve"]["after"]  # same greedy text from the new replica
    assert result["serve"]["replica_nodes_after"]
    assert result["serve"]["replica_node_before"] not in result["serve"]["replica_nodes_after"]
