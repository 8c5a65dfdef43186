"""cluster.yaml: valid for the installed Ray's cluster launcher, and consistent with what the project relies on.

Offline and without AWS credentials: the file is checked against ray/autoscaler/ray-schema.json as written, then
through `prepare_config` + `validate_config`, the steps `ray up` runs on it before it talks to AWS (AWS defaults
merged, node types' min/max filled, schema and head-node checks). No Ray cluster is started.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "rayproject/ray:2.60.0-py311-gpu"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does to the file before any AWS call (commands._bootstrap_config); raises on a bad config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def docker_env(cluster: dict) -> dict[str, str]:
    """--env/-e KEY=VALUE pairs from docker.run_options."""
    words = shlex.split(" ".join(cluster["docker"].get("run_options", [])))
    pairs = [words[i + 1] for i, w in enumerate(words) if w in ("--env", "-e")]
    return dict(p.split("=", 1) for p in pairs)


def container_mounts(cluster: dict) -> list[str]:
    """Container paths of the -v/--volume bind mounts in docker.run_options."""
    words = shlex.split(" ".join(cluster["docker"].get("run_options", [])))
    return [words[i + 1].split(":")[1] for i, w in enumerate(words) if w in ("-v", "--volume")]


def gpu_worker_types(cluster: dict) -> dict[str, dict]:
    return {name: t for name, t in cluster["available_node_types"].items()
            if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) > 0}


def test_schema_accepts_the_file_as_written(cluster, schema):
    jsonschema.validate(cluster, schema)


def test_ray_up_validation_passes(cluster):
    prepared = ray_up_checks(cluster)
    assert prepared["available_node_types"].keys() == cluster["available_node_types"].keys()  # defaults replaced
    assert prepared["setup_commands"] == cluster["setup_commands"]  # not Ray's default `pip install ray` nightly


@pytest.mark.parametrize("path, typo", [
    ((), ("available_node_types", "available_node_type")),
    (("available_node_types", "gpu_8x"), ("min_workers", "min_worker")),
    (("docker",), ("run_options", "run_option")),
])
def test_a_misspelled_key_fails_validation(cluster, schema, path, typo):
    good, bad = typo
    config = copy.deepcopy(cluster)
    section = config
    for key in path:
        section = section[key]
    section[bad] = section.pop(good)
    with pytest.raises(jsonschema.ValidationError, match=f"'{bad}' was unexpected"):
        jsonschema.validate(config, schema)
    with pytest.raises(jsonschema.ValidationError, match=f"'{bad}' was unexpected"):
        ray_up_checks(config)


def test_image_is_the_pinned_ray_release(cluster):
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", d.replace(" ", "")) for d in pyproject["project"]["dependencies"]]
    ray_pin = next(m.group(2) for m in pins if m)
    assert cluster["docker"]["image"] == IMAGE
    tag = cluster["docker"]["image"].split(":", 1)[1]
    assert tag.split("-")[0] == ray_pin, f"image {tag} runs another Ray than pyproject's ray=={ray_pin}"
    for name, node_type in cluster["available_node_types"].items():  # no node type swaps in another image
        assert "worker_image" not in node_type.get("docker", {}), name
    assert not {"head_image", "worker_image"} & cluster["docker"].keys()


def test_head_does_no_work_and_gpu_workers_scale(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "tasks and actors would land on the head"
    gpus = gpu_worker_types(cluster)
    assert len(gpus) == 2, f"expected an 8-GPU and a small GPU worker type, got {sorted(gpus)}"
    assert sorted(t["resources"]["GPU"] for t in gpus.values()) == [1, 8]
    for name, t in gpus.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["resources"]["CPU"] >= 4 * t["resources"]["GPU"], f"{name}: recipes ask 4 CPUs per GPU worker"
    assert sum(t["min_workers"] for t in gpus.values()) <= cluster["max_workers"]


def test_every_node_sets_its_ami(cluster):
    """Ray's default AMI is an Ubuntu 18.04 DLAMI with a CUDA 11.2-era driver."""
    for name, node_type in cluster["available_node_types"].items():
        assert node_type["node_config"].get("ImageId"), name


def test_setup_installs_this_project(cluster):
    repo = [remote for remote, local in cluster["file_mounts"].items() if local in (".", "./")]
    assert repo, "file_mounts copies no repository"
    installs = [c for c in cluster["setup_commands"] if re.search(rf"pip install .*-e {re.escape(repo[0])}/?$", c)]
    assert installs, f"setup_commands never pip installs {repo[0]}"
    assert ".gitignore" in cluster.get("rsync_filter", []), "the laptop's .venv and runs/ would be copied"


def test_checkpoint_storage_is_s3_and_shared_paths_are_mounted(cluster):
    assert docker_env(cluster)["RUGPT_STORAGE"].startswith("s3://")
    mounts = container_mounts(cluster)

    def mounted(path: str) -> bool:
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)

    assert mounted(docker_env(cluster)["RUGPT_DATA"])
    for recipe in ("small", "medium", "large", "xl"):  # the GPU recipes' storage and data
        cfg = yaml.safe_load((ROOT / "jobs" / "configs" / f"{recipe}.yaml").read_text())
        for key in ("storage_path", "train_data"):
            assert mounted(cfg[key]), f"jobs/configs/{recipe}.yaml {key} {cfg[key]} is on no shared mount"
    serve = yaml.safe_load((ROOT / "serve_configs" / "gpu.yaml").read_text())
    for app in serve["applications"]:
        for name, model in app["args"]["models"].items():
            path = model["path"] if isinstance(model, dict) else model  # `name: path` or `name: {path, chat_template}`
            assert not path.startswith("/") or mounted(path), f"serve_configs/gpu.yaml model {name}: {path}"


def test_auth_and_dashboard(cluster):
    """Token auth on every node with the laptop's token; the dashboard only behind the SSH tunnel."""
    assert docker_env(cluster)["RAY_AUTH_MODE"] == "token"
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert cluster["head_start_ray_commands"][0] == cluster["worker_start_ray_commands"][0] == "ray stop"


def test_start_commands_load_the_secrets_serving_needs(cluster):
    """serve_configs/gpu.yaml's replicas read the API key from their environment, which they inherit from `ray
    start`: both start commands load the env file that file_mounts copies to every node."""
    serve = yaml.safe_load((ROOT / "serve_configs" / "gpu.yaml").read_text())
    assert {app["args"].get("api_key_env") for app in serve["applications"]} == {"RUGPT_API_KEY"}
    assert "~/.rugpt-ray" in cluster["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster[key] if "ray start" in c)
        assert ". ~/.rugpt-ray/env" in start.split("ray start")[0], key
