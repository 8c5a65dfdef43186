"""S3 over the wire: moto's S3 server (a subprocess on 127.0.0.1, IAM authentication on, so wrong credentials are
refused) and the CLI as a user runs it on a cluster (a `ray start` head whose processes carry the key, which every
command joins): prepare-data into a bucket, a training run stopped and resumed from a bucket, a sweep whose
trials.csv and best.yaml land there, load_model from it, and one clear line for a bucket that does not exist and
for wrong credentials."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from own_ray import own_ray_env, ray_start_head
from polling import poll
from ports import free_port

from rugpt_ray.checkpoints import checkpoint_problem, load_model, read_chat_template
from rugpt_ray.storage import read_text

REPO = Path(__file__).resolve().parents[1]
BUCKET = "rugpt"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's server; a user with an s3:* policy and its key (the first 4 requests are not authenticated: they
    create them and the bucket). Yields (query, env): the URI options for 127.0.0.1 and an environment with the
    key whose RAY_ADDRESS is a `ray start` head of its own, started with that key (so that no other cluster on the
    machine is joined, and the commands share one Ray instead of starting one each)."""
    import boto3

    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}, stdout=log,
                              stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    plain = dict(endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                 region_name="us-east-1")
    iam = boto3.client("iam", **plain)
    poll(lambda: _answers(iam), 60, "moto's server to answer")  # the first request: counts as one of the 4
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    boto3.client("s3", **plain).create_bucket(Bucket=BUCKET)
    with (own_ray_env(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"]) as env,
          ray_start_head(env, dashboard=False) as head):
        yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1", {**env, "RAY_ADDRESS": head.gcs}
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _answers(iam) -> bool:
    try:
        iam.create_user(UserName="trainer")
    except Exception as e:  # connection refused while it starts
        return "EntityAlreadyExists" in str(e)
    return True


def cli(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rugpt_ray.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(out.stderr.strip().splitlines()) == 1 and all(w in out.stderr for w in words), out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.long
def test_prepare_train_resume_sweep_and_load_through_s3(s3, tmp_path, data_dir, monkeypatch):
    query, env = s3
    corpus, tokenizer = data_dir / "corpus", str(data_dir / "tokenizer")
    prepare = ["prepare-data", "--inputs", str(corpus / "train" / "gogol_nos.txt"), "--valid",
               str(corpus / "valid" / "chekhov_dama_s_sobachkoy.txt"), "--tokenizer", tokenizer, "--seq-len", "64"]

    # before any work: a bucket that does not exist, credentials the store refuses
    one_line_error(cli(env, *prepare, "--out", f"s3://no-such-bucket/data?{query}"),
                   f"--out s3://no-such-bucket/data?{query}", "bucket 'no-such-bucket' does not exist")
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    train_args = ["train", "--config", str(REPO / "jobs" / "configs" / "tiny-cpu.yaml"), "name=run",
                  f"storage_path=s3://{BUCKET}/runs?{query}", "seq_len=64", "num_workers=1", "zero_stage=0",
                  "valid_data=null", "log_interval=2", "save_interval=2", "eval_interval=100"]
    one_line_error(cli(wrong, *train_args, f"train_data={corpus / 'train'}", "max_steps=2"),
                   f"storage_path s3://{BUCKET}/runs/run?{query}: not writable", "ACCESS_DENIED")

    # prepare-data into the bucket (multipart uploads: moto >= 5.2.2), then a local copy to train from
    data_uri = f"s3://{BUCKET}/data?{query}"
    out = cli(env, *prepare, "--out", data_uri)
    assert out.returncode == 0, out.stderr[-3000:]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
    meta = json.loads(read_text(f"s3://{BUCKET}/data/meta.json?{query}"))
    assert meta["seq_len"] == 64 and set(meta["splits"]) == {"train", "valid"}
    import pyarrow.fs as pafs

    from rugpt_ray.storage import filesystem

    fs, inner = filesystem(data_uri)
    pafs.copy_files(inner, str(tmp_path / "data"), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())

    # a run stopped at step 2 and resumed from the bucket to step 4
    for steps in (2, 4):
        out = cli(env, *train_args, f"train_data={tmp_path / 'data'}", f"max_steps={steps}")
        assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 2" in out.stdout + out.stderr
    run_uri = f"s3://{BUCKET}/runs/run?{query}"
    metrics = [json.loads(line) for line in read_text(f"s3://{BUCKET}/runs/run/metrics.jsonl?{query}").splitlines()]
    assert [row["step"] for row in metrics] == [2, 4]
    assert all(checkpoint_problem(f"s3://{BUCKET}/runs/run/step_{s:07d}?{query}") is None for s in (2, 4))

    # load_model (what serving calls) from the bucket: the newest complete checkpoint's weights
    newest = load_model(run_uri)
    step4 = load_model(f"s3://{BUCKET}/runs/run/step_0000004?{query}")
    assert torch.equal(newest.transformer.wte.weight, step4.transformer.wte.weight)
    assert read_chat_template(run_uri) is None  # text data: no chat template
    assert not torch.equal(newest.transformer.wte.weight,
                           load_model(f"s3://{BUCKET}/runs/run/step_0000002?{query}").transformer.wte.weight)

    # a sweep stored in the bucket: its trials.csv and best.yaml
    spec = dict(name="sweep", storage_path=f"s3://{BUCKET}/sweeps?{query}",
                train=dict(preset="tiny", model={"sparse_mode": "none"}, train_data=str(tmp_path / "data"),
                           seq_len=64, micro_batch=8, lr=3e-3, min_lr=1e-5, warmup=1, log_interval=2,
                           eval_interval=2, eval_iters=1, save_interval=2, max_steps=2, zero_stage=0),
                space={"lr": {"grid": [3e-3]}}, num_samples=1, max_concurrent_trials=1,
                resources_per_trial={"num_workers": 1, "cpus_per_worker": 0.45})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    out = cli(env, "tune", "--config", str(tmp_path / "sweep.yaml"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_text(f"s3://{BUCKET}/sweeps/sweep/trials.csv?{query}").splitlines()
    assert len(rows) == 2 and "lr" in rows[0]
    best = yaml.safe_load(read_text(f"s3://{BUCKET}/sweeps/sweep/best.yaml?{query}"))
    assert best["lr"] == pytest.approx(3e-3)
