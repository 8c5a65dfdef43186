"""The server's request limits (`ServeConfig.check_prompts`, `check_generation`), CORS off unless configured, and
the stop gate's 503, without Ray: each limit is a `RequestError` naming the field, before any work starts."""

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from rugpt_ray.generation_config import GenerationConfig, RequestError
from rugpt_ray.serving.config import ServeConfig

CFG = ServeConfig(models={"m": "p"}, tokenizer="t", max_new_tokens=16, max_prompt_tokens=10, max_n=2, max_prompts=3,
                  max_stop_strings=2, max_stop_chars=4, max_logit_bias=2, max_top_logprobs=3, max_total_tokens=60)


def test_defaults_are_bounded():
    cfg = ServeConfig(models={"m": "p"}, tokenizer="t")
    assert (cfg.max_prompts, cfg.max_stop_strings, cfg.max_stop_chars, cfg.max_logit_bias, cfg.max_top_logprobs,
            cfg.max_total_tokens, cfg.cors_origins, cfg.retry_after_s) == (32, 8, 256, 300, 20, 65536, [], 1)


@pytest.mark.parametrize("prompts, param, words", [
    ([[1]] * 4, "prompt", "4 prompts; the limit is 3"),
    ([[1], [1] * 11], "prompt", "prompt 1 has 11 tokens; the limit is 10"),
])
def test_prompts_past_the_limits_are_refused(prompts, param, words):
    with pytest.raises(RequestError) as e:
        CFG.check_prompts(prompts)
    assert e.value.param == param and words in e.value.detail


@pytest.mark.parametrize("fields, prompts, param, words", [
    ({"max_new_tokens": 17}, [[1]], "max_new_tokens", "17 is over the limit of 16"),
    ({"num_return_sequences": 3}, [[1]], "num_return_sequences", "3 is over the limit of 2"),
    ({"stop": ["a", "b", "c"]}, [[1]], "stop", "3 stop strings; the limit is 2"),
    ({"stop": ["a", "abcde"]}, [[1]], "stop", "stop string 1 has 5 characters; the limit is 4"),
    ({"logit_bias": {1: 1.0, 2: 1.0, 3: 1.0}}, [[1]], "logit_bias", "3 entries; the limit is 2"),
    ({"logprobs": 4}, [[1]], "logprobs", "4 alternatives per token; the limit is 3"),
    ({"prompt_logprobs": 4, "max_new_tokens": 0}, [[1]], "logprobs", "4 alternatives"),
    ({"max_new_tokens": 16, "num_return_sequences": 2}, [[1] * 10, [1] * 5], "max_new_tokens",
     "holds 94 tokens (prompts x 2 rows x (prompt + 16 new)); the limit is 60"),
])
def test_settings_past_the_limits_are_refused_naming_the_field(fields, prompts, param, words):
    with pytest.raises(RequestError) as e:
        CFG.check_generation(prompts, GenerationConfig(**{"max_new_tokens": 8, **fields}))
    assert e.value.param == param and words in e.value.detail, e.value.detail


def test_settings_at_the_limits_pass():
    CFG.check_prompts([[1] * 10] * 3)
    CFG.check_generation([[1] * 10], GenerationConfig(max_new_tokens=16, num_return_sequences=2, stop=["ab", "abcd"],
                                                      logit_bias={1: 1.0, 2: -1.0}, logprobs=3))


def _app() -> Starlette:
    return Starlette(routes=[Route("/x", lambda request: PlainTextResponse("ok"), methods=["GET", "POST"])])


def test_cors_is_off_unless_origins_are_configured(monkeypatch):
    from rugpt_ray.serving.server import CorsWhenConfigured

    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    client = TestClient(CorsWhenConfigured(_app()))
    assert "access-control-allow-origin" not in client.get("/x", headers={"Origin": "https://a.example"}).headers
    assert client.options("/x", headers=preflight).status_code == 405  # no CORS: the route knows no OPTIONS
    monkeypatch.setattr(CorsWhenConfigured, "origins", ["https://a.example"])
    client = TestClient(CorsWhenConfigured(_app()))
    assert client.options("/x", headers=preflight).headers["access-control-allow-origin"] == "https://a.example"


def test_the_stop_gate_counts_requests_and_refuses_new_ones_while_stopping(monkeypatch):
    from rugpt_ray.serving.server import StopGate

    seen = []

    async def app(scope, receive, send):
        seen.append(StopGate.in_flight)
        await PlainTextResponse("ok")(scope, receive, send)

    client = TestClient(StopGate(app))
    assert client.get("/x").text == "ok" and seen == [1] and StopGate.in_flight == 0
    monkeypatch.setattr(StopGate, "draining", True)
    monkeypatch.setattr(StopGate, "retry_after_s", 5)
    r = client.get("/x")
    assert r.status_code == 503 and r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "stopping"
    assert seen == [1]
