"""Losing a node, on a `ray.cluster_utils.Cluster` of three 1-CPU nodes on this machine (a head and two workers).
Run by tests/test_cluster.py in a child process, which owns the cluster; writes what happened as JSON:

    python tests/cluster_scenarios.py SCRATCH_DIR OUT_JSON

Training: two workers of one CPU each, so they sit on two nodes (the third CPU is left for Ray Data); once the
step-10 checkpoint is complete, a worker node that hosts a training worker is removed and a fresh node added; the
run restarts from its last checkpoint (FailureConfig) and finishes. Serving: the replica is kept off the head,
answers a request, loses its node, and Serve replaces it on the other worker node.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import ray
from ports import free_port
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rugpt_ray.checkpoints import save_native
from rugpt_ray.config import TrainConfig, data_root, preset
from rugpt_ray.data import DataConfig, prepare_data
from rugpt_ray.model import GPT
from rugpt_ray.plotting import read_metrics
from rugpt_ray.train import STATE_FILE, train

MAX_STEPS = 20
STARTED = time.monotonic()


def log(what: str) -> None:
    """A timestamped phase line on stderr: the parent test shows the tail when the scenario fails or hangs."""
    print(f"[{time.monotonic() - STARTED:6.1f} s] {what}", file=sys.stderr, flush=True)


def actor_nodes(class_prefix: str) -> dict[str, str]:
    """Live actors whose class name starts with class_prefix: actor id -> node id (from the GCS actor table)."""
    return {actor_id: info["Address"]["NodeID"] for actor_id, info in ray._private.state.actors().items()
            if info["ActorClassName"].startswith(class_prefix) and info["State"] == "ALIVE"}


def worker_node_with(cluster: Cluster, class_prefix: str, timeout_s: float = 120):
    """A worker node (never the head) that hosts a live actor of that class."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hosting = set(actor_nodes(class_prefix).values())
        for node in cluster.worker_nodes:
            if node.node_id in hosting:
                return node
        time.sleep(0.5)
    raise TimeoutError(f"no worker node hosts a {class_prefix} actor")


def add_worker_node(cluster: Cluster) -> None:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()


def training_scenario(cluster: Cluster, scratch: Path) -> dict:
    corpus = data_root() / "corpus"
    prepared = prepare_data(DataConfig(inputs=[str(corpus / "train" / "gogol_nos.txt")],
                                       valid=[str(corpus / "valid" / "chekhov_dama_s_sobachkoy.txt")],
                                       tokenizer=str(data_root() / "tokenizer"), seq_len=64,
                                       out=str(scratch / "data")), progress=False)["out"]
    cfg = TrainConfig(name="node-loss", storage_path=str(scratch / "runs"), preset="tiny", train_data=prepared,
                      seq_len=64, micro_batch=8, lr=3e-3, warmup=2, max_steps=MAX_STEPS, log_interval=5,
                      eval_interval=10, eval_iters=2, save_interval=10, num_to_keep=5, zero_stage=2,
                      num_workers=2, cpus_per_worker=1.0, threads_per_worker=1, max_failures=2)
    run_dir = scratch / "runs" / "node-loss"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train(cfg)), daemon=True)
    thread.start()
    log("training started")

    first = run_dir / "step_0000010" / STATE_FILE
    deadline = time.monotonic() + 600
    while not first.is_file() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_file(), "the run never completed its step-10 checkpoint"
    before = sorted(p.name for p in run_dir.glob("step_*") if (p / STATE_FILE).is_file())
    log(f"checkpoints {before}; removing a training worker's node")
    cluster.remove_node(worker_node_with(cluster, "RayTrainWorker"))
    add_worker_node(cluster)
    log("fresh node added")
    thread.join(timeout=600)
    log("training ended")
    assert "result" in outcome, "training did not finish after the node loss"

    return {
        "max_steps": MAX_STEPS,
        "logged_steps": [m["step"] for m in read_metrics(run_dir)],
        "checkpoints_before_loss": before,
        "checkpoints_after": sorted(p.name for p in run_dir.glob("step_*") if (p / STATE_FILE).is_file()),
        "train_worker_actors": sum(a["ActorClassName"] == "RayTrainWorker"
                                   for a in ray._private.state.actors().values()),
        "final_step": json.loads((Path(outcome["result"].checkpoint) / STATE_FILE).read_text())["step"],
    }


def serving_scenario(cluster: Cluster, scratch: Path) -> dict:
    from ray import serve

    from rugpt_ray.serving.app import build_app
    from rugpt_ray.serving.config import ServeConfig

    head_id = cluster.head_node.node_id

    @ray.remote(num_cpus=1)
    class HoldCPU:  # keeps the head's CPU taken: the replica must go to a worker node
        def ready(self) -> bool:
            return True

    hold = HoldCPU.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote()
    ray.get(hold.ready.remote())

    model_dir = save_native(GPT(preset("tiny")).eval(), scratch / "serve-model")
    port = int(os.environ.get("SCENARIO_SERVE_PORT", "0")) or free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeConfig(models={"tiny": str(model_dir)}, tokenizer=str(data_root() / "tokenizer"))),
              name="main", route_prefix="/")
    body = {"prompt": "Пушкин родился в", "max_new_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        before = client.post("/generate", json=body)
        assert before.status_code == 200, before.text
        log("served; removing the replica's node")
        victim = worker_node_with(cluster, "ServeReplica:main:RuGPTServer")
        cluster.remove_node(victim)
        log("node removed")
        after, deadline = None, time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                after = client.post("/generate", json=body)
                if after.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert after is not None and after.status_code == 200, "no answer after the replica's node was lost"
        log("served again")
    replica_nodes = set(actor_nodes("ServeReplica:main:RuGPTServer").values())
    serve.shutdown()
    return {"before": before.json()["completions"][0]["text"], "after": after.json()["completions"][0]["text"],
            "replica_node_before": victim.node_id, "replica_nodes_after": sorted(replica_nodes)}


def main(scratch: Path, out: Path) -> None:
    # Nodes take the machine's address, not 127.0.0.1: Ray turns a loopback address into it when connecting.
    temp_dir = tempfile.mkdtemp(prefix="rugpt-ray-")  # short: Ray's socket paths must fit in 107 bytes
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": False})
    try:
        for _ in range(2):
            add_worker_node(cluster)
        cluster.wait_for_nodes()
        log("cluster up")
        result = {"train": training_scenario(cluster, scratch)}
        result["serve"] = serving_scenario(cluster, scratch)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
