"""Structured outputs over real Ray Serve on 127.0.0.1: `response_format` and vLLM's `structured_outputs` on
/v1/completions, /v1/chat/completions and /generate give what the decoder's own constrained `generate` gives for the
same seed (JSON schemas, JSON objects, regexes, choices, grammars), streamed or not, with n, best_of and adapters;
bad specs and slow compiles are 400s naming the field; the OpenAI client's `parse` and LangChain's
`with_structured_output` get parsed objects back from a random-weight model."""

import asyncio
import dataclasses
import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from app_client import app_client
from pydantic import BaseModel, ConfigDict, Field
from schemas import SCHEMAS
from test_serving import DENSE, sse

from rugpt_ray.chat import DEFAULT_CHAT_TEMPLATE, chat_template_source, render_chat
from rugpt_ray.checkpoints import load_model, save_native
from rugpt_ray.constraints import COMPILE_TIME_LIMIT, compile_constraint
from rugpt_ray.generation import Completion, GenerationConfig, generate
from rugpt_ray.lora import apply_adapter, load_adapter
from rugpt_ray.serving import ServeConfig

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serving")]

BUILTIN = chat_template_source(DEFAULT_CHAT_TEMPLATE)
PROMPT = "Ответ в JSON:"
CHAT = [{"role": "user", "content": "Опиши город в JSON."}]
COMPILE_LIMIT_S = 0.5
"""The app's grammar_compile_timeout_s: a hundred times what the test schemas take to compile (milliseconds)."""
SLOW_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": ["string", "integer", "null"]} for i in range(7000)}}
"""About 3 s to compile on this machine (within llguidance's size limit, 350 KB of JSON): far past the limit."""
CHOICES = ["да", "нет", "может быть"]
REGEX = r"(да|нет), [a-z]{2,6}!"
GRAMMAR = 'root ::= word ", " word "."\nword ::= "да" | "нет" | [0-9]'
GRAMMAR_PATTERN = r"(да|нет|[0-9]), (да|нет|[0-9])\."


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, make_model, make_adapter) -> dict:
    """A base with a chat template and an adapter on it."""
    root = tmp_path_factory.mktemp("structured")
    base = save_native(make_model(DENSE, seed=2), root / "base", chat_template=BUILTIN)
    return {"base": base, "tuned": make_adapter(DENSE, 2, 31, root / "tuned", base_source=str(base))}


@pytest.fixture(scope="module")
def server(ray_local, checkpoints, data_dir):
    """The model server as its own ingress (`ingress: direct`), so that every test here goes that way too."""
    cfg = ServeConfig.from_dict({
        "models": {"base": str(checkpoints["base"])},
        "adapters": {"tuned": {"path": str(checkpoints["tuned"]), "base": "base"}},
        "tokenizer": str(data_dir / "tokenizer"), "max_new_tokens": 300, "max_n": 4,
        "grammar_compile_timeout_s": COMPILE_LIMIT_S, "ingress": "direct"})
    with app_client(cfg, "structured") as client:
        yield client


def test_a_direct_ingress_app_is_the_model_server_alone(server):
    from ray import serve

    assert set(serve.status().applications["structured"].deployments) == {"RuGPTServer"}
    assert server.get("/healthz").json() == {"status": "ok"}


@pytest.fixture(scope="module")
def models(checkpoints) -> dict:
    """What each served name runs, in this process."""
    return {"base": load_model(checkpoints["base"]),
            "tuned": apply_adapter(load_model(checkpoints["base"]), load_adapter(checkpoints["tuned"]))}


def decoded(model, tokenizer, prompt: str, cfg: GenerationConfig, kind: str, spec) -> list[Completion]:
    """The decoder's own constrained generation, without the server."""
    return generate(model, tokenizer, prompt, cfg, compile_constraint(kind, spec, tokenizer, model.config.vocab_size))


def sampled(max_new_tokens: int, seed: int, n: int = 1) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, num_return_sequences=n)


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def post(server, path: str, **body) -> dict:
    r = server.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def completion(server, **body) -> dict:
    return post(server, "/v1/completions", model="base", prompt=PROMPT, **body)


def chat(server, **body) -> dict:
    return post(server, "/v1/chat/completions", model="base", messages=CHAT, **body)


def endings(choices: list[dict]) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice of any endpoint."""
    return [(c["message"]["content"] if "message" in c else c["text"], c["finish_reason"]) for c in choices]


def test_the_default_compile_limit_is_the_librarys():
    assert ServeConfig.model_fields["grammar_compile_timeout_s"].default == COMPILE_TIME_LIMIT


def test_completions_follow_json_schemas_as_the_decoder_does(server, models, tokenizer):
    """Objects, nested objects, arrays, enums, bounded numbers, strings with lengths and `$defs` (even seeds)."""
    finished = []
    for seed, schema in enumerate(SCHEMAS[:4]):
        out = completion(server, response_format=json_schema(schema), n=3, max_tokens=150, temperature=1.0, seed=seed)
        want = decoded(models["base"], tokenizer, PROMPT, sampled(150, seed, 3), "json", schema)
        assert endings(out["choices"]) == [(c.text, c.finish_reason) for c in want]
        finished += [(text, schema) for text, reason in endings(out["choices"]) if reason == "stop"]
    for text, schema in finished:
        jsonschema.validate(json.loads(text), schema)
    assert len(finished) >= 9


def test_chat_follows_json_schemas_from_either_field(server, models, tokenizer):
    prompt = render_chat(BUILTIN, CHAT, add_generation_prompt=True)
    for seed, (field, schema) in enumerate([("response_format", SCHEMAS[4]), ("structured_outputs", SCHEMAS[5])]):
        spec = json_schema(schema) if field == "response_format" else {"json": schema}
        out = chat(server, **{field: spec}, n=2, max_completion_tokens=150, temperature=1.0, seed=seed)
        want = decoded(models["base"], tokenizer, prompt, sampled(150, seed, 2), "json", schema)
        assert endings(out["choices"]) == [(c.text, c.finish_reason) for c in want]
        finished = [text for text, reason in endings(out["choices"]) if reason == "stop"]
        assert finished
        for text in finished:
            jsonschema.validate(json.loads(text), schema)


def test_regex_choice_grammar_and_json_object_on_every_endpoint(server, models, tokenizer):
    """Any JSON object: closing tokens favoured by logit_bias (after the grammar's mask), as a random model's strings
    and numbers could otherwise fill the tokens."""
    chat_prompt = render_chat(BUILTIN, CHAT, add_generation_prompt=True)
    closing = {t: 6.0 for t in range(5, len(tokenizer)) if set(tokenizer.token_bytes(t)) <= set(b'"}]0123456789')}
    cases = [  # endpoint, the request's fields, the decoder's (prompt, kind, spec), what a finished output is
        ("/generate", {"prompt": PROMPT, "structured_outputs": {"regex": REGEX}}, (PROMPT, "regex", REGEX),
         lambda text: re.fullmatch(REGEX, text)),
        ("/v1/completions", {"prompt": PROMPT, "structured_outputs": {"choice": CHOICES}},
         (PROMPT, "choice", CHOICES), lambda text: text in CHOICES),
        ("/v1/completions", {"prompt": PROMPT, "structured_outputs": {"grammar": GRAMMAR}},
         (PROMPT, "grammar", GRAMMAR), lambda text: re.fullmatch(GRAMMAR_PATTERN, text)),
        ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}, "logit_bias": closing},
         (chat_prompt, "json_object", None), lambda text: isinstance(json.loads(text), dict)),
        ("/v1/chat/completions", {"messages": CHAT, "structured_outputs": {"json_object": True}, "logit_bias": closing},
         (chat_prompt, "json_object", None), lambda text: isinstance(json.loads(text), dict)),
    ]
    for seed, (path, fields, (prompt, kind, spec), valid) in enumerate(cases):
        length = {"/generate": "max_new_tokens", "/v1/completions": "max_tokens"}.get(path, "max_completion_tokens")
        count = "num_return_sequences" if path == "/generate" else "n"
        out = post(server, path, model="base", **fields, **{length: 150, count: 4}, temperature=1.0, seed=seed)
        got = endings(out.get("completions") or out["choices"])
        cfg = dataclasses.replace(sampled(150, seed, 4), logit_bias=fields.get("logit_bias", {}))
        assert got == [(c.text, c.finish_reason) for c in decoded(models["base"], tokenizer, prompt, cfg, kind, spec)]
        finished = [text for text, reason in got if reason == "stop"]
        assert finished and all(valid(text) for text in finished), got


def test_streamed_n_and_best_of(server, models, tokenizer):
    body = {"response_format": json_schema(SCHEMAS[6]), "n": 2, "max_tokens": 120, "temperature": 1.0, "seed": 7}
    whole = completion(server, **body)
    with server.stream("POST", "/v1/completions", json={"model": "base", "prompt": PROMPT, **body,
                                                        "stream": True}) as r:
        chunks = sse(r)[:-1]
    for index, (text, reason) in enumerate(endings(whole["choices"])):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert ("".join(c["text"] for c in mine), mine[-1]["finish_reason"]) == (text, reason)

    regex = {"structured_outputs": {"regex": REGEX}, "n": 2, "max_completion_tokens": 40, "seed": 8}
    answers = endings(chat(server, **regex)["choices"])
    with server.stream("POST", "/v1/chat/completions", json={"model": "base", "messages": CHAT, **regex,
                                                             "stream": True}) as r:
        deltas = [c["choices"][0] for c in sse(r)[:-1]]
    for index, (text, reason) in enumerate(answers):
        mine = [c for c in deltas if c["index"] == index]
        assert ("".join(c["delta"]["content"] for c in mine), mine[-1]["finish_reason"]) == (text, reason)
        assert re.fullmatch(REGEX, text)

    best = completion(server, structured_outputs={"choice": CHOICES}, best_of=3, max_tokens=10, seed=9)
    candidates = decoded(models["base"], tokenizer, PROMPT, sampled(10, 9, 3), "choice", CHOICES)
    (choice,) = best["choices"]
    assert (choice["text"], choice["finish_reason"]) in {(c.text, c.finish_reason) for c in candidates}
    assert choice["text"] in CHOICES and best["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in candidates)


def test_an_adapter_follows_a_constraint(server, models, tokenizer):
    regex = r"[а-я]{3,12}( [а-я]{2,8}){0,3}\."
    out = post(server, "/v1/completions", model="tuned", prompt=PROMPT, structured_outputs={"regex": regex}, n=3,
               max_tokens=50, temperature=1.0, seed=10)
    want = decoded(models["tuned"], tokenizer, PROMPT, sampled(50, 10, 3), "regex", regex)
    assert endings(out["choices"]) == [(c.text, c.finish_reason) for c in want]
    assert all(re.fullmatch(regex, text) and reason == "stop" for text, reason in endings(out["choices"]))
    base = decoded(models["base"], tokenizer, PROMPT, sampled(50, 10, 3), "regex", regex)
    assert [c.text for c in base] != [c.text for c in want]  # the adapter decided


def test_max_tokens_first_ends_with_length_and_the_partial_text(server, models, tokenizer):
    schema = {"type": "object", "properties": {"name": {"type": "string", "minLength": 30}}, "required": ["name"]}
    out = completion(server, response_format=json_schema(schema), max_tokens=6, temperature=1.0, seed=11)
    (want,) = decoded(models["base"], tokenizer, PROMPT, sampled(6, 11), "json", schema)
    assert endings(out["choices"]) == [(want.text, "length")] and out["usage"]["completion_tokens"] == 6
    assert want.text.lstrip().startswith("{")


ENDPOINTS = {"/v1/completions": {"prompt": PROMPT, "max_tokens": 4},
             "/v1/chat/completions": {"messages": CHAT, "max_completion_tokens": 4},
             "/generate": {"prompt": PROMPT, "max_new_tokens": 4}}
BAD = [
    ("/v1/completions", {"response_format": json_schema({"type": "strin"})}, "response_format", "Invalid type: strin"),
    ("/v1/chat/completions", {"response_format": json_schema({"type": "array", "uniqueItems": True})},
     "response_format", "Unimplemented keys"),
    ("/generate", {"response_format": json_schema({"type": "string", "format": "no-such-format"})},
     "response_format", "Unknown format"),
    ("/v1/completions", {"structured_outputs": {"json": {"$ref": "#/$defs/missing"}}}, "structured_outputs.json",
     "does not exist"),
    ("/v1/completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ("/generate", {"structured_outputs": {"regex": "(да|нет"}}, "structured_outputs.regex", "unclosed group"),
    ("/v1/chat/completions", {"structured_outputs": {"grammar": "start: undefined_rule"}},
     "structured_outputs.grammar", "unknown name"),
    ("/v1/completions", {"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty list"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "You can only use one kind of structured outputs constraint but multiple are specified: regex, choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs", "You can only use one kind of structured outputs constraint"),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
     "structured_outputs.whitespace_pattern", "not supported"),
    ("/v1/chat/completions", {"structured_outputs": {"json": {}, "disable_any_whitespace": True}},
     "structured_outputs.disable_any_whitespace", "not supported"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format",
     "When response_format type is 'json_schema', the 'json_schema' field must be provided."),
    ("/v1/chat/completions", {"response_format": {"type": "structural_tag"}}, "response_format",
     "type 'structural_tag' is not supported"),
    ("/v1/completions", {"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "ignore_eos",
     "a structured output ends at EOS"),
]


@pytest.mark.parametrize("path, fields, param, reason", BAD, ids=[f"{p}-{i}" for i, (_, _, p, _) in enumerate(BAD)])
def test_bad_specs_are_400s_naming_the_field_then_a_request_works(server, path, fields, param, reason):
    r = server.post(path, json={"model": "base", **ENDPOINTS[path], **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: ") and reason in error["message"]
    out = post(server, path, model="base", **ENDPOINTS[path], structured_outputs={"choice": CHOICES})
    assert all(text in CHOICES for text, _ in endings(out.get("completions") or out["choices"]))


def test_a_slow_compile_is_a_400_and_other_requests_go_on(server, models, tokenizer):
    """The slow schema compiles in a thread while the requests after it are answered; it is refused at the limit."""
    async def requests() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=120) as client:
            slow = asyncio.create_task(client.post("/v1/completions", json={
                "model": "base", "prompt": PROMPT, "response_format": json_schema(SLOW_SCHEMA)}))
            others = [await client.post("/v1/completions", json={
                "model": "base", "prompt": PROMPT, "max_tokens": 10, "seed": seed, "temperature": 1.0,
                "structured_outputs": {"choice": CHOICES}}) for seed in range(3)]
            return await slow, others

    slow, others = asyncio.run(requests())
    assert slow.status_code == 400 and slow.json()["error"] == {
        "message": f"response_format: the grammar did not compile within the time limit ({COMPILE_LIMIT_S:g} s)",
        "type": "invalid_request_error", "param": "response_format", "code": None}
    for seed, r in enumerate(others):
        (want,) = decoded(models["base"], tokenizer, PROMPT, sampled(10, seed), "choice", CHOICES)
        assert r.status_code == 200 and endings(r.json()["choices"]) == [(want.text, "stop")]


# ------------------------------------------------------------------ real clients (the `clients` test extra)

class Point(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as a strict schema says

    x: int = Field(ge=-9, le=9)
    y: int = Field(ge=0, le=99)


class Place(BaseModel):
    """Small enough that a random-weight model completes it within the token limit: strict schema, `$defs`."""

    name: str = Field(max_length=8)
    kind: Literal["город", "село"]
    point: Point
    tags: list[Literal["a", "b"]] = Field(max_length=2)


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{str(server.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0)


def test_openai_client_parses_chat_and_completions(server, models, tokenizer):
    client = openai_client(server)
    parsed = client.chat.completions.parse(model="base", messages=CHAT, response_format=Place,
                                           max_completion_tokens=300, temperature=1.0, seed=12)
    (choice,) = parsed.choices
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Place)
    assert choice.message.parsed == Place.model_validate_json(choice.message.content)

    schema = Point.model_json_schema()
    out = client.completions.create(model="base", prompt=PROMPT, max_tokens=300, temperature=1.0, seed=13,
                                    extra_body={"structured_outputs": {"json": schema}})
    (want,) = decoded(models["base"], tokenizer, PROMPT, sampled(300, 13), "json", schema)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (want.text, "stop")
    assert isinstance(Point.model_validate_json(out.choices[0].text), Point)


def test_langchain_with_structured_output_in_json_schema_and_json_mode(server, tokenizer):
    """json_mode asks for any JSON object: closing tokens favoured, as in the JSON-object test above."""
    from langchain_openai import ChatOpenAI

    settings = {"model": "base", "base_url": f"{str(server.base_url).rstrip('/')}/v1", "api_key": "unused",
                "max_tokens": 300, "temperature": 1.0, "seed": 14, "max_retries": 0}
    place = ChatOpenAI(**settings).with_structured_output(Place, method="json_schema").invoke("Опиши город.")
    assert isinstance(place, Place)
    closing = {t: 6 for t in range(5, len(tokenizer)) if set(tokenizer.token_bytes(t)) <= set(b'"}]0123456789')}
    json_mode = ChatOpenAI(**settings, logit_bias=closing).with_structured_output(None, method="json_mode",
                                                                                   include_raw=True)
    out = json_mode.invoke("Опиши город.")
    assert out["parsing_error"] is None and isinstance(out["parsed"], dict)
    assert out["parsed"] == json.loads(out["raw"].content)
