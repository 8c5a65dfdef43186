"""Concurrent requests over real Ray Serve, on an engine slowed by a fixed pause after every decode step (the
engine's test seam): a long request then outlives the short ones started beside it by a margin that no machine's
speed can close, so what is asserted is the batching and the admission rules, never a race."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from app_client import app_client
from polling import poll

from rugpt_ray.checkpoints import save_native
from rugpt_ray.config import ModelConfig
from rugpt_ray.serving import ServeConfig
from rugpt_ray.serving.engine import STEP_PAUSE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serving")]

PROMPTS = ["Мороз и солнце; день чудесный!", "Все счастливые семьи"]
DENSE = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=50257)
STEP_PAUSE_S = 0.005  # a 1000-token request lasts at least 5 s; a 64-token one, 0.3 s plus its compute


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory, make_model, data_dir):
    """One model, four requests at a time in the replica and four queued in front of it."""
    path = save_native(make_model(DENSE, seed=2), tmp_path_factory.mktemp("concurrency") / "dense")
    cfg = ServeConfig(models={"dense": str(path)}, tokenizer=str(data_dir / "tokenizer"), max_new_tokens=1000,
                      max_ongoing_requests=4, max_queued_requests=4)
    with app_client(cfg, "concurrency",
                    ray_actor_options={"runtime_env": {"env_vars": {STEP_PAUSE_ENV: str(STEP_PAUSE_S)}}}) as client:
        yield client


def stats(client: httpx.Client) -> dict:
    return client.get("/stats").json()["models"]["dense"]


def settled(client: httpx.Client) -> dict:
    """The stats once no request is left in the engine."""
    return poll(lambda: (now := stats(client))["active_requests"] == 0 and now, 60, "the engine to be idle")


@contextlib.asynccontextmanager
async def long_request(client: httpx.AsyncClient, seed: int) -> AsyncIterator[None]:
    """A streamed 1000-step request, decoding from when the block starts (its first event came) until the block
    ends, which disconnects and so cancels it. Short requests started in the block end first, since every step
    advances it by one token only."""
    async with client.stream("POST", "/generate", json={"prompt": "Привет", "max_new_tokens": 1000, "stream": True,
                                                        "ignore_eos": True, "seed": seed}) as response:
        lines = response.aiter_lines()  # held until the end: a line iterator dropped half-read disconnects
        async for line in lines:
            if line.startswith("data:"):
                break
        else:
            raise AssertionError(f"the stream ended before its first event ({response.status_code})")
        yield


def test_concurrent_requests_are_batched_and_seeded_text_does_not_change(server):
    bodies = [{"prompt": PROMPTS[i % 2], "max_new_tokens": 8 + 4 * i, "seed": i} for i in range(3)]
    alone = [server.post("/generate", json=b).json()["completions"][0] for b in bodies]

    async def beside_a_long_request():
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=120) as client:
            async with long_request(client, seed=0):
                before = stats(server)
                responses = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
            return before, responses  # leaving the stream cancels the long request

    before, responses = asyncio.run(beside_a_long_request())
    after = settled(server)
    assert [r.json()["completions"][0] for r in responses] == alone
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1  # it decoded to the end of the window
    # every step in the window decoded the long request's row, and each short request's row joined the steps after
    # its first token (its prefill's): the steps' extra rows are exactly those tokens, so every one was batched
    steps, rows = after["decode_steps"] - before["decode_steps"], after["decoded_rows"] - before["decoded_rows"]
    assert rows - steps == sum(c["completion_tokens"] - 1 for c in alone), (steps, rows)
    assert after["max_batch_requests"] >= 2


def test_overload_is_refused_with_503_then_the_service_recovers(server):
    """Four long requests fill the replica until the test lets them go, so the eight short ones sent then can only
    queue (four at most) or be refused."""
    short = {"prompt": "Привет", "max_new_tokens": 20, "ignore_eos": True}

    async def flood():
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=120) as client:
            async with contextlib.AsyncExitStack() as running:
                for seed in range(4):
                    await running.enter_async_context(long_request(client, seed))
                waiting = [asyncio.create_task(client.post("/generate", json={**short, "seed": i})) for i in range(8)]
                first = await next(asyncio.as_completed(waiting))
                assert first.status_code == 503, first.text  # nothing can finish before the long ones go
            return await asyncio.gather(*waiting)  # the long ones are cancelled: the queued ones run

    before = stats(server)
    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503}, codes
    assert all(r.json()["usage"]["completion_tokens"] == 20 for r in responses if r.status_code == 200)
    assert settled(server)["cancelled_requests"] == before["cancelled_requests"] + 4
    r = server.post("/generate", json={**short, "seed": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
