"""Shared fixtures: the shared data folder, the real tokenizer, and one local Ray for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from polling import bare_sleeps
from ports import free_port

from rugpt_ray.tokenizer import RuGPTTokenizer, load_tokenizer

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 0.5 s (train.CONTROLLER_POLL_S; Ray's own default is 2 s), and a
# worker's next report waits for that poll: the tests' runs take a fraction of a second per step, so they poll faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# `make test` runs three Ray tests at once on 2 cores: a worker group can take longer than Ray Train's default 60 s
# to start, which would count as a failure (one more restart than a test expects).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
# The suite runs more compute threads than the machine has cores (two pytest workers, each with its Ray runs or
# servers): OpenMP's waiting threads then spin on cores the other side needs. Sleeping instead, two training runs
# at once here took 10-12 % less CPU (122-128 against 139-142 CPU-seconds) and 8-12 % less time. Set before torch
# is imported here, and inherited by every Ray process and command the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Serving tests wait for states, not for time: a sleep in these modules must be inside a `while` (polling.poll).
POLLING_ONLY = ("test_serving*.py", "test_chat_serving.py", "test_engine.py")


@pytest.hookimpl(trylast=True)  # after xdist's own, which adds each test's xdist_group to its id
def pytest_collection_modifyitems(config, items) -> None:
    """`make test-fast` (-m "not slow") must start no Ray: a test that uses the shared Ray is marked slow.
    Long tests run first, then the other slow ones, so that under xdist (`make test`) the long ones overlap instead
    of ending the run alone. Under `--dist loadgroup`, a test whose xdist_group did not reach its id would start
    its group's server again on another worker: that is refused (pytest 9.2 breaks it, pytest-xdist#1386).
    A sleep outside a `while` loop in a serving test module (POLLING_ONLY) is refused: wait with `polling.poll`."""
    modules = {item.path for item in items if any(item.path.match(pattern) for pattern in POLLING_ONLY)}
    sleeps = [place for path in sorted(modules) for place in bare_sleeps(path)]
    if sleeps:
        raise pytest.UsageError(f"a fixed sleep in a serving test ({', '.join(sleeps)}): its assertion would depend on "
                                "the machine's speed; wait for the state with polling.poll(predicate, timeout, what)")
    unmarked = [item.nodeid for item in items
                if "ray_local" in item.fixturenames and not item.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError(f"these tests start Ray but are not marked slow: {', '.join(unmarked)}")
    if hasattr(config, "workerinput") and config.getoption("dist") == "loadgroup":  # an xdist worker
        ungrouped = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"xdist_group did not reach the ids of {ungrouped[0]} and {len(ungrouped) - 1} "
                                    "more (pytest-xdist#1386): install the pytest that pyproject.toml pins")
    items.sort(key=lambda item: (item.get_closest_marker("long") is None, item.get_closest_marker("slow") is None))


@pytest.fixture(autouse=True)
def functional_linear_kept():
    """Each test finds `torch.nn.functional.linear` as torch has it: a ZeRO-3 DeepSpeed engine replaces it with its
    own for the rest of the process ("This will persist unless manually reset"), whose bf16 rounding differs."""
    import torch.nn.functional as F

    linear = F.linear
    yield
    F.linear = linear


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("RUGPT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    assert (path / "tokenizer" / "vocab.json").is_file(), f"RUGPT_DATA={path} has no tokenizer/vocab.json"
    return path


@pytest.fixture(scope="session")
def tokenizer(data_dir: Path) -> RuGPTTokenizer:
    return load_tokenizer(data_dir / "tokenizer")


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """The port of the shared Ray's Prometheus endpoint (`http://127.0.0.1:PORT/metrics`)."""
    return free_port()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory, ray_metrics_port):
    """One real local Ray (2 CPUs, loopback only) shared by every test that needs it; metrics are exported on
    `ray_metrics_port` at Ray's default interval (10 s: every second cost a Ray this busy 10% of a core).
    Up to 8 idle worker processes are kept instead of 2 (Ray's default, one per CPU): each training run starts
    a dozen tasks and actors, and a kept worker spares the next one a process start (a CPU-second or more)."""
    import ray

    ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=ray_metrics_port,
        _system_config={"num_workers_soft_limit": 8},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepare_once(tmp_path_factory, worker_id, ray_local):
    """`prepare_once(name, **DataConfig fields)`: the meta of a prepared cache made once per test run and shared by
    every test and every xdist worker that asks for the same name (a file lock keeps the others waiting while one
    writes it)."""
    from filelock import FileLock

    from rugpt_ray.data import DataConfig, prepare_data

    root = tmp_path_factory.getbasetemp()
    shared = root if worker_id == "master" else root.parent  # xdist: the run's folder above each worker's
    made: dict[str, dict] = {}

    def prepare(name: str, **fields) -> dict:
        if name not in made:
            out = shared / "prepared" / name
            out.parent.mkdir(exist_ok=True)
            with FileLock(f"{out}.lock"):  # a cache made by another worker is reused (same inputs and settings)
                made[name] = prepare_data(DataConfig(out=str(out), **fields), progress=False)
        return made[name]

    return prepare


@pytest.fixture(scope="session")
def make_model():
    """Factory for a random model whose greedy output is varied (plain 0.02 init makes near-ties everywhere)."""
    import torch

    from rugpt_ray.model import GPT

    def make(cfg, seed: int = 0):
        torch.manual_seed(seed)
        model = GPT(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.1 if "wte" in name else 0.3)
                else:
                    p.normal_(1.0 if "ln" in name and name.endswith("weight") else 0.0, 0.1)
        return model

    return make


@pytest.fixture(scope="session")
def make_adapted(make_model):
    """Factory: `(base, model)`, where model is `make_model(cfg, base_seed)` with a random `lora` adapter drawn from
    `adapter_seed` (B != 0, so it changes the output)."""
    import torch

    from rugpt_ray.lora import add_lora

    def make(cfg, base_seed: int, adapter_seed: int, lora):
        base, model = make_model(cfg, seed=base_seed), make_model(cfg, seed=base_seed)
        torch.manual_seed(adapter_seed)
        add_lora(model, lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
        return base, model

    return make


@pytest.fixture(scope="session")
def make_adapter(make_adapted):
    """Factory: a `make_adapted` adapter (rank 4) written to `folder` with its base's reference (recorded as
    `base_source`); returns the folder."""
    from rugpt_ray.config import LoraConfig
    from rugpt_ray.lora import base_reference, save_adapter

    def make(cfg, base_seed: int, seed: int, folder: Path, targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc"),
             base_source: str = "base") -> Path:
        lora = LoraConfig(r=4, alpha=8, dropout=0.0, targets=list(targets))
        base, model = make_adapted(cfg, base_seed, seed, lora)
        return save_adapter(model, lora, base_reference(base, base_source, {}), folder)

    return make
