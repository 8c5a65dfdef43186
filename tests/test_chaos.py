"""Model server replicas killed under load, over real Ray Serve: two replicas on the shared Ray, eight clients (half
streaming) in closed loops, and a replica actor killed with `ray.kill` several times. The engine is slowed by a
fixed pause after every decode step (its test seam), so every request is still decoding when a kill lands however
fast the machine is. Every request's outcome is counted with benchmarks/soak.py's classifier, the one the longer
run of the README's table uses."""

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from app_client import app_client
from polling import poll

from rugpt_ray.checkpoints import save_native
from rugpt_ray.config import ModelConfig
from rugpt_ray.serving import ServeConfig
from rugpt_ray.serving.engine import STEP_PAUSE_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the soak run's client and kills
from soak import kill_replica, replica_actors, request_outcome, running_replicas  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serving")]

APP = "chaos"
DENSE = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=50257)
STEP_PAUSE_S = 0.02  # a 48-token request decodes for 0.96 s at least
REQUEST_TIMEOUT_S = 60.0
HANG_AFTER_S = REQUEST_TIMEOUT_S + 30  # the proxy's and the router's time on top, on a loaded machine
CLIENTS = 8
KILLS, MAX_KILLS = 3, 6  # more kills only while a kind of outcome the test needs has not happened yet
SEEDED = {"prompt": "Мороз и солнце; день чудесный!", "max_tokens": 16, "temperature": 1.0, "seed": 7}


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory, make_model, data_dir):
    """Two replicas of one model (half a CPU each: the shared Ray has two, and a replacement must fit while a
    killed one goes); Serve's health check every second, so that a dead replica is replaced soon."""
    path = save_native(make_model(DENSE, seed=3), tmp_path_factory.mktemp("chaos") / "dense")
    cfg = ServeConfig(models={"dense": str(path)}, tokenizer=str(data_dir / "tokenizer"), max_new_tokens=64,
                      max_ongoing_requests=16, max_queued_requests=-1, request_timeout_s=REQUEST_TIMEOUT_S,
                      stream_interval_s=0.1)
    with app_client(cfg, APP, num_replicas=2, health_check_period_s=1,
                    ray_actor_options={"num_cpus": 0.5,
                                       "runtime_env": {"env_vars": {STEP_PAUSE_ENV: str(STEP_PAUSE_S)}}}) as client:
        yield client


def restored(victim: str) -> bool:
    """Serve runs two replicas again, the killed one not among them."""
    names = replica_actors(APP)
    return len(names) == 2 and victim not in names and running_replicas(APP) == 2


async def load_with_kills(url: str) -> tuple[Counter, int]:
    """Outcomes by (streamed, kind) of every request the clients made while replicas were killed, and the kills."""
    outcomes: Counter = Counter()
    stop = asyncio.Event()

    sent: dict[int, float] = {}  # when each client sent the request it is waiting for

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not stop.is_set():
            body = {"prompt": f"Клиент {i}, запрос {n}:", "max_tokens": 48, "ignore_eos": True, "seed": n,
                    "stream": i % 2 == 0}
            sent[i] = time.monotonic()
            outcomes[body["stream"], await request_outcome(client, body, HANG_AFTER_S)] += 1
            n += 1

    def all_decoding(target: int) -> bool:
        """`target` requests have ended, and every client's current one was sent a third of its least decoding
        time ago: past routing, most likely on a replica and mid-decode (a kill that still finds one queued only
        sends it elsewhere, and the loop below kills again until each kind of loss has been seen)."""
        now = time.monotonic()
        return outcomes.total() >= target and len(sent) == CLIENTS and min(now - t for t in sent.values()) > 0.3

    def seen(streamed: bool, kind: str) -> bool:
        return outcomes[streamed, kind] > 0

    kills = 0
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        clients = [asyncio.create_task(client_loop(client, i)) for i in range(CLIENTS)]
        while kills < KILLS or (kills < MAX_KILLS and not (seen(True, "error_ended") and seen(False, "retried"))):
            target = outcomes.total() + CLIENTS  # the replacement replica has had its share of requests
            await asyncio.to_thread(poll, lambda target=target: all_decoding(target), HANG_AFTER_S,
                                    "every client's request to be decoding", 0.05)
            victim = replica_actors(APP)[kills % 2]
            await asyncio.to_thread(kill_replica, victim)
            kills += 1
            await asyncio.to_thread(poll, lambda victim=victim: restored(victim), 120, f"Serve to replace {victim}")
        stop.set()
        await asyncio.gather(*clients)
    return outcomes, kills


def test_replicas_killed_under_load_end_every_request_visibly_and_are_restored(server):
    before = server.post("/v1/completions", json=SEEDED)
    assert before.status_code == 200, before.text
    text = before.json()["choices"][0]["text"]

    outcomes, kills = asyncio.run(load_with_kills(str(server.base_url)))
    print(f"{kills} kills; outcomes by (streamed, kind): {dict(outcomes)}")
    kinds = Counter({kind: n for (_, kind), n in outcomes.items()})
    assert kinds["silent_cut"] == 0 and kinds["hang"] == 0, outcomes
    assert kinds["failed"] == 0, outcomes  # a retry on the other replica answered every request lost before a byte
    assert outcomes[True, "error_ended"] >= 1, outcomes  # a stream lost mid-way said so, then [DONE]
    assert outcomes[False, "retried"] >= 1, outcomes  # a whole response lost before it was sent came from a retry
    assert outcomes[False, "error_ended"] == 0, outcomes

    # Serve restored the replica (waited for after each kill), and the seeded request's text is the same as before
    assert running_replicas(APP) == 2
    for _ in range(4):
        again = server.post("/v1/completions", json=SEEDED)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == text, again.text
