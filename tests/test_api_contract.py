"""The served API as a contract, against one real Serve app on 127.0.0.1 with a key, CORS for one origin and small
limits: the OpenAPI document describes it, Schemathesis fuzzes it from that document and finds no 5xx or
undocumented answer, every model-touching endpoint needs the key (decided on the routed path, whatever the Host
header says), and each request limit is a 400 naming the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from app_client import app_client

from rugpt_ray.checkpoints import save_native
from rugpt_ray.config import preset
from rugpt_ray.serving import ServeConfig

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("api_contract")]

REPO = Path(__file__).resolve().parents[1]
KEY_ENV, KEY = "RUGPT_TEST_CONTRACT_KEY", "contract-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example.com"
FUZZ_EXAMPLES = 10
"""Schemathesis cases per operation in the suite, of its fuzzing phase only (its coverage phase sends ~1500 boundary
cases, minutes here); `benchmarks/fuzz_api.py` runs every phase, with many more."""
MODEL_ENDPOINTS = [("GET", "/stats"), ("GET", "/v1/models"), ("GET", "/tokenizer_info"), ("POST", "/tokenize"),
                   ("POST", "/detokenize"), ("POST", "/generate"), ("POST", "/v1/completions"),
                   ("POST", "/v1/chat/completions")]
OPEN_ENDPOINTS = ["/healthz", "/openapi.json", "/docs"]


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory, make_model, data_dir):
    model = save_native(make_model(preset("tiny"), seed=1), tmp_path_factory.mktemp("contract") / "tiny")
    cfg = ServeConfig(models={"tiny": {"path": str(model), "chat_template": "rugpt3-chat"}},
                      tokenizer=str(data_dir / "tokenizer"), max_new_tokens=16, max_prompt_tokens=64, max_n=2,
                      max_batch_size=8, max_prompts=4, max_stop_strings=2, max_stop_chars=8, max_logit_bias=3,
                      max_top_logprobs=3, max_total_tokens=100, max_body_bytes=16 * 1024, api_key_env=KEY_ENV,
                      cors_origins=[ORIGIN], grammar_compile_timeout_s=1.0)
    with app_client(cfg, "contract", ray_actor_options={"runtime_env": {"env_vars": {KEY_ENV: KEY}}}) as client:
        client.timeout = httpx.Timeout(60)
        yield client


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ------------------------------------------------------------------ the document


def test_the_document_declares_bodies_answers_streams_and_security(server):
    document = server.get("/openapi.json").json()
    paths = document["paths"]
    completions = paths["/v1/completions"]["post"]
    assert completions["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CompletionRequest"}
    request = document["components"]["schemas"]["CompletionRequest"]
    assert request["required"] == ["prompt"] and request["additionalProperties"] is False
    assert {"max_tokens", "n", "best_of", "logit_bias", "stop", "stream"} <= set(request["properties"])
    answers = completions["responses"]
    assert set(answers) == {"200", "400", "401", "404", "413", "422", "503", "504"}
    assert set(answers["200"]["content"]) == {"application/json", "text/event-stream"}
    assert answers["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert answers["503"]["headers"]["Retry-After"]["required"] is True
    assert completions["security"] == [{"bearer": []}]
    assert "security" not in paths["/healthz"]["get"] and "401" not in paths["/healthz"]["get"]["responses"]
    assert set(paths) >= {path for _, path in MODEL_ENDPOINTS} | {"/healthz"}
    assert all(op.get("security") == [{"bearer": []}] for method, path in MODEL_ENDPOINTS
               for op in [paths[path][method.lower()]])
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["properties"]["messages"]["minItems"] == 1
    docs = server.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(server, tmp_path):
    """Every default check plus not_a_server_error, on every operation, fixed seed, bounded examples; the server
    is healthy after. schemathesis.toml (the repository's) says which statuses count as accepting valid data."""
    report = tmp_path / "report.json"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "--config-file", str(REPO / "schemathesis.toml"), "run",
         str(server.base_url.join("/openapi.json")),
         "--phases", "fuzzing", "--seed", "7", "--max-examples", str(FUZZ_EXAMPLES), "--generation-deterministic",
         "--workers", "1", "--request-timeout", "60", "-H", f"Authorization: Bearer {KEY}",
         "--report", "json", "--report-json-path", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = json.loads(report.read_text())
    print(json.dumps(summary.get("summary", summary), indent=1)[:2000])
    server.get("/healthz").raise_for_status()
    r = server.post("/v1/completions", json={"prompt": "Привет", "max_tokens": 4}, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text


# ------------------------------------------------------------------ auth and CORS


@pytest.mark.parametrize("method, path", MODEL_ENDPOINTS)
def test_every_model_endpoint_needs_the_key(server, method, path):
    body = {"messages": [{"role": "user", "content": "x"}]} if "chat" in path else \
        {"tokens": [5]} if path == "/detokenize" else {"prompt": "x"}
    kwargs = {"json": body} if method == "POST" else {}
    missing = server.request(method, path, **kwargs)
    assert error_of(missing, 401)["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = server.request(method, path, headers={"Authorization": f"Bearer {KEY}x"}, **kwargs)
    assert wrong.status_code == 401
    assert server.request(method, path, headers=AUTH, **kwargs).status_code == 200


def test_a_forged_host_header_does_not_skip_auth(server):
    """vLLM's CVE-2026-48746: its /v1 check read the URL rebuilt from `Host`; ours is the routed handler's."""
    for host in ("x/v2?", "x/healthz?", "x/openapi.json#"):
        r = server.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"Host": host})
        assert r.status_code == 401, (host, r.status_code, r.text)


def test_health_and_docs_stay_open(server):
    for path in OPEN_ENDPOINTS:
        assert server.get(path).status_code == 200, path


def test_cors_answers_the_configured_origin_only(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = server.options("/v1/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = server.options("/v1/completions", headers={"Origin": "https://evil.example.com", **preflight})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    simple = server.get("/healthz", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in simple.headers


# ------------------------------------------------------------------ limits


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": ["a", "b", "c", "d", "e"]}, "prompt", "5 prompts; the limit is 4"),
    ("/v1/completions", {"prompt": "x", "n": 3}, "n", "3 is over the limit of 2"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of", "3 is over the limit of 2"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c"]}, "stop", "3 stop strings; the limit is 2"),
    ("/v1/completions", {"prompt": "x", "stop": "abcdefghi"}, "stop", "stop string 0 has 9 characters"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 1, "2": 1, "3": 1, "4": 1}}, "logit_bias",
     "4 entries; the limit is 3"),
    ("/v1/completions", {"prompt": "x", "logprobs": 4}, "logprobs", "4 alternatives per token; the limit is 3"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 4},
     "top_logprobs", "4 alternatives per token"),
    ("/v1/completions", {"prompt": [[5] * 50] * 2, "max_tokens": 16}, "max_tokens", "holds 132 tokens"),
    ("/generate", {"prompt": "x", "max_new_tokens": 17}, "max_new_tokens", "17 is over the limit of 16"),
    ("/v1/completions", {"prompt": "x" * (17 * 1024)}, "body", "larger than the limit of 16384 bytes"),
])
def test_each_request_limit_is_a_4xx_naming_the_field(server, path, body, param, words):
    r = server.post(path, json=body, headers=AUTH)
    error = error_of(r, 413 if param == "body" else 400)
    assert error["param"] == param and error["message"].startswith(f"{param}: ") and words in error["message"], error
