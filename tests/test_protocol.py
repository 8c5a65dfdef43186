"""The serving protocol alone (no torch, Ray or HTTP): field ranges shared with GenerationConfig, null as the default,
unknown fields, and each request's conversion to a GenerationConfig."""

import asyncio
import dataclasses
import json
import subprocess
import sys

import pytest

from rugpt_ray.generation_config import GenerationConfig, RequestError
from rugpt_ray.serving.protocol import (
    MAX_TOP_LOGPROBS,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ConstraintSpec,
    GenerateRequest,
    read_body,
)

# request field -> the GenerationConfig field whose range it takes, per endpoint
RANGED = {
    CompletionRequest: {"temperature": "temperature", "top_p": "top_p", "repetition_penalty": "repetition_penalty",
                        "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                        "max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "n": "num_return_sequences",
                        "best_of": "num_return_sequences", "logprobs": "logprobs", "top_k": "top_k"},
    GenerateRequest: {"temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_new_tokens",
                      "min_new_tokens": "min_new_tokens", "num_return_sequences": "num_return_sequences"},
    ChatCompletionRequest: {"temperature": "temperature", "top_k": "top_k", "presence_penalty": "presence_penalty",
                            "max_completion_tokens": "max_new_tokens", "max_tokens": "max_new_tokens",
                            "min_tokens": "min_new_tokens", "n": "num_return_sequences", "top_logprobs": "logprobs"},
}
API_BOUNDS = {"top_k": {"ge": -1}, "logprobs": {"le": MAX_TOP_LOGPROBS},  # where the API's range is not the config's
              "top_logprobs": {"le": MAX_TOP_LOGPROBS}}
MESSAGES = [{"role": "user", "content": "x"}]


def parse(schema, **fields):
    least = {"messages": MESSAGES} if schema is ChatCompletionRequest else {"prompt": "x"}
    return schema.parse(json.dumps({**least, **fields}).encode())


def refused(schema, **fields) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(schema, **fields)
    return e.value


def bound_cases():
    """(schema, field, value, accepted) at and just past each bound of each ranged field."""
    rules = {f.name: (f.metadata, f.type) for f in dataclasses.fields(GenerationConfig)}
    for schema, fields in RANGED.items():
        for field, config_field in fields.items():
            rule, kind = rules[config_field]
            rule = {**{k: v for k, v in rule.items() if k in ("ge", "gt", "le")}, **API_BOUNDS.get(field, {})}
            step = 1 if "int" in kind else 0.01
            assert rule, field
            if "ge" in rule:
                yield schema, field, rule["ge"], True
                yield schema, field, rule["ge"] - step, False
            if "gt" in rule:
                yield schema, field, rule["gt"], False
                yield schema, field, rule["gt"] + step, True
            if "le" in rule:
                yield schema, field, rule["le"], True
                yield schema, field, rule["le"] + step, False


@pytest.mark.parametrize("schema, field, value, accepted", list(bound_cases()))
def test_ranges_are_generation_configs_and_an_accepted_value_never_fails_the_conversion(schema, field, value,
                                                                                        accepted):
    if not accepted:
        error = refused(schema, **{field: value})
        assert (error.status, error.param) == (422, field) and error.message.startswith(f"{field}:")
        return
    body = parse(schema, **{field: value})
    try:
        cfg = body.generation_config(limit=1000, room=1000)
    except RequestError as e:  # a rule across fields (min over max, 0 tokens without echo): a 400, never a 500
        assert body.refusal(e).status == 400
        return
    assert isinstance(cfg, GenerationConfig)


def test_logit_bias_range_and_keys():
    assert parse(CompletionRequest, logit_bias={"5": 100, "7": -100}).logit_bias == {5: 100.0, 7: -100.0}
    for bias in ({"5": 100.5}, {"5": -101}, {"five": 1}):
        assert refused(CompletionRequest, logit_bias=bias).param == "logit_bias"
    negative = parse(CompletionRequest, logit_bias={"-5": 1})  # a JSON key is any string: the config refuses it
    with pytest.raises(RequestError) as e:
        negative.generation_config(1000, 1000)
    assert negative.refusal(e.value).message.startswith("logit_bias: must map token ids >= 0")


def test_null_is_the_default():
    """What LangChain's OpenAI LLM sends: every field, most of them null."""
    nulls = {name: None for name in CompletionRequest.model_fields if name != "prompt"}
    assert parse(CompletionRequest, **nulls) == parse(CompletionRequest)
    assert parse(CompletionRequest, **nulls).generation_config(1000, 1000) == GenerationConfig(max_new_tokens=16)


@pytest.mark.parametrize("body, status, param, message", [
    (b'{"prompt": "x",', 400, "body", "body: Invalid JSON"),
    (b'[1, 2]', 422, "body", "body: "),
    (b'{"prompt": "x", "temprature": 1}', 400, "temprature",
     "temprature: not a field of this endpoint (did you mean 'temperature'?)"),
    (b'{"prompt": "x", "max_new_tokens": 5}', 400, "max_new_tokens", "max_new_tokens: not a field of this endpoint"),
    (b'{"prompt": "x", "stream_options": {"continuous_usage_stats": true}}', 400, "stream_options",
     "stream_options: has no field 'continuous_usage_stats'"),
    (b'{"prompt": "x", "temperature": "hot"}', 422, "temperature", "temperature: Input should be a valid number"),
    (b'{"prompt": "x", "echo": 1}', 422, "echo", "echo: Input should be a valid boolean"),
    (b'{"prompt": [5, "x"]}', 422, "prompt", "prompt: "),
    (b'{"prompt": ["a", ""]}', 422, "prompt", "prompt: Value error, must be a non-empty text"),
    (b'{"max_tokens": 4}', 422, "prompt", "prompt: Field required"),
])
def test_bad_bodies_name_the_field(body, status, param, message):
    with pytest.raises(ApiError) as e:
        CompletionRequest.parse(body)
    assert (e.value.status, e.value.param) == (status, param)
    assert e.value.message.startswith(message), e.value.message
    assert e.value.body() == {"error": {"message": e.value.message, "type": "invalid_request_error",
                                        "param": param, "code": None}}


def test_completion_conversion():
    cfg = parse(CompletionRequest, prompt=[[1, 2]], max_tokens=7, min_tokens=2, n=2, best_of=3, temperature=0.5,
                top_k=-1, stop="\n", seed=3).generation_config(1000, 1000)
    assert (cfg.max_new_tokens, cfg.min_new_tokens, cfg.num_return_sequences) == (7, 2, 3)
    assert (cfg.top_k, cfg.stop, cfg.seed, cfg.temperature) == (0, ["\n"], 3, 0.5)
    assert (cfg.logprobs, cfg.prompt_logprobs) == (0, None)  # best_of ranks by logprobs
    scoring = parse(CompletionRequest, max_tokens=0, echo=True).generation_config(1000, 1000)
    assert (scoring.max_new_tokens, scoring.prompt_logprobs) == (0, 0)
    echoed = parse(CompletionRequest, echo=True, logprobs=3).generation_config(1000, 1000)
    assert (echoed.logprobs, echoed.prompt_logprobs) == (3, 3)


@pytest.mark.parametrize("fields, param, detail", [
    ({"max_tokens": 0}, "max_tokens", "0 generates nothing"),
    ({"n": 2, "best_of": 1}, "best_of", "1 is below n (2)"),
    ({"best_of": 2, "stream": True}, "best_of", "2 sequences ranked to return 1 cannot be streamed"),
    ({"min_tokens": 20}, "min_tokens", "20 is over the most tokens to generate (16)"),
    ({"suffix": "end"}, "suffix", "not supported"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "must be token ids >= 0"),
])
def test_completion_refusals_name_the_field_as_sent(fields, param, detail):
    body = parse(CompletionRequest, **fields)
    with pytest.raises(RequestError) as e:
        body.generation_config(1000, 1000)
    error = body.refusal(e.value)
    assert (error.status, error.param) == (400, param) and error.message.startswith(f"{param}: {detail}")


def test_names_of_config_fields_per_endpoint():
    assert parse(CompletionRequest, n=2).param("num_return_sequences") == "n"
    assert parse(CompletionRequest, n=2, best_of=3).param("num_return_sequences") == "best_of"  # best_of's rows
    assert parse(CompletionRequest).param("max_new_tokens") == "max_tokens"
    assert parse(GenerateRequest).param("max_new_tokens") == "max_new_tokens"


def test_generate_length_defaults_to_64_within_the_servers_limit():
    assert parse(GenerateRequest).generation_config(limit=1000, room=1000).max_new_tokens == 64
    assert parse(GenerateRequest).generation_config(limit=10, room=1000).max_new_tokens == 10
    assert parse(GenerateRequest, max_new_tokens=100).generation_config(10, 1000).max_new_tokens == 100  # server: 400


def test_read_body_stops_at_the_limit():
    async def chunks(n: int):
        for _ in range(n):
            yield b"x" * 10

    assert asyncio.run(read_body(chunks(3), 30)) == b"x" * 30
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(chunks(4), 30))
    assert (e.value.status, e.value.param) == (413, "body")


def test_protocol_imports_neither_torch_nor_ray():
    code = "import sys, rugpt_ray.serving.protocol; print(sorted({'torch', 'ray', 'fastapi'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def chat(**fields) -> ChatCompletionRequest:
    return parse(ChatCompletionRequest, **fields)


def refusal(make) -> RequestError:
    """What `make()` refuses the request for."""
    with pytest.raises(RequestError) as e:
        make()
    return e.value


def test_chat_conversation():
    body = chat(messages=[{"role": "system", "content": "s"},
                          {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                tools=[])
    assert body.conversation() == [{"role": "system", "content": "s"}, {"role": "user", "content": "a\nb"}]
    for fields, param, detail in [
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "message 0 has the unknown role 'bot' "
                                                                      "(one of system, user, assistant)"),
        ({"messages": [*MESSAGES, {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages",
         "message 1 has content of type 'image_url'; only text parts are supported"),
        ({"tools": [{"type": "function"}]}, "tools", "not supported: this server does no function calling"),
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"continue_final_message": True}, "continue_final_message", "cannot be true with add_generation_prompt"),
    ]:
        body = chat(**fields)
        error = body.refusal(refusal(body.conversation))
        assert (error.status, error.param) == (400, param) and error.message.startswith(f"{param}: {detail}")


def test_chat_template_options_and_echo():
    assert chat().template_options() == {"add_generation_prompt": True, "continue_final_message": False}
    assert chat(chat_template_kwargs={"add_generation_prompt": False, "lang": "ru"}).template_options() == {
        "add_generation_prompt": False, "continue_final_message": False, "lang": "ru"}  # as vLLM lets them
    body = chat(chat_template_kwargs={"template": "x"})
    assert body.refusal(refusal(body.template_options)).message == "chat_template_kwargs: 'template' is reserved"
    started = [*MESSAGES, {"role": "assistant", "content": "Да"}]
    assert (chat(messages=started, echo=True).echoed, chat(messages=started).echoed) == ("Да", "")
    assert chat(messages=MESSAGES, echo=True).echoed == ""  # only an assistant's message is echoed


def test_chat_conversion():
    cfg = chat(max_completion_tokens=7, max_tokens=3, n=2, seed=1, logprobs=True, top_logprobs=4, stop=["\n"],
               min_tokens=1).generation_config(limit=100, room=100)
    assert (cfg.max_new_tokens, cfg.num_return_sequences, cfg.logprobs, cfg.min_new_tokens) == (7, 2, 4, 1)
    assert (cfg.seed, cfg.stop, cfg.prompt_logprobs) == (1, ["\n"], None)
    assert chat(max_tokens=3).generation_config(100, 100).max_new_tokens == 3
    assert chat(logprobs=True).generation_config(100, 100).logprobs == 0
    assert chat().generation_config(100, 100).logprobs is None
    assert chat().generation_config(limit=100, room=30).max_new_tokens == 30  # no length: what fits
    assert chat().generation_config(limit=20, room=30).max_new_tokens == 20
    assert chat(stream=True, stream_options={"include_usage": True}).generation_config(100, 100).max_new_tokens == 100


@pytest.mark.parametrize("fields, room, param, detail", [
    ({"top_logprobs": 2}, 100, "top_logprobs", "needs logprobs: true"),
    ({"stream_options": {"include_usage": True}}, 100, "stream_options", "only with stream: true"),
    ({}, 0, "messages", "the conversation fills the model's context"),
    ({"max_completion_tokens": 0}, 100, "max_completion_tokens", "0 generates nothing"),
    ({"max_tokens": 0}, 100, "max_tokens", "0 generates nothing"),
    ({"max_tokens": 5, "min_tokens": 6}, 100, "min_tokens", "6 is over the most tokens to generate (5)"),
])
def test_chat_refusals_name_the_field_as_sent(fields, room, param, detail):
    body = chat(**fields)
    error = body.refusal(refusal(lambda: body.generation_config(100, room)))
    assert (error.status, error.param) == (400, param) and error.message.startswith(f"{param}: {detail}")
    assert body.param("num_return_sequences") == "n" and body.param("logprobs") == "top_logprobs"


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}


@pytest.mark.parametrize("fields, kind, spec, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "A", "schema": SCHEMA, "strict": True}}},
     "json", SCHEMA, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "A", "description": "d", "schema": SCHEMA,
                                                                 "strict": None}}}, "json", SCHEMA, "response_format"),
    ({"response_format": {"type": "json_object"}}, "json_object", None, "response_format"),
    ({"structured_outputs": {"json": SCHEMA}}, "json", SCHEMA, "structured_outputs.json"),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, "json", json.dumps(SCHEMA), "structured_outputs.json"),
    ({"structured_outputs": {"regex": "[0-9]+", "disable_any_whitespace": False, "whitespace_pattern": None}},
     "regex", "[0-9]+", "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["да", "нет"]}}, "choice", ["да", "нет"], "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": "start: \"a\""}}, "grammar", "start: \"a\"", "structured_outputs.grammar"),
    ({"structured_outputs": {"json_object": True, "json": None}}, "json_object", None,
     "structured_outputs.json_object"),
    ({"response_format": {"type": "text"}, "structured_outputs": {"regex": "a"}}, "regex", "a",
     "structured_outputs.regex"),
])
@pytest.mark.parametrize("schema", [CompletionRequest, ChatCompletionRequest, GenerateRequest])
def test_structured_output_fields_become_one_constraint_spec(schema, fields, kind, spec, field):
    assert parse(schema, **fields).constraint_spec() == ConstraintSpec(kind, spec, field)


def test_no_structured_output_field_is_no_constraint():
    assert parse(CompletionRequest).constraint_spec() is None
    assert parse(CompletionRequest, response_format={"type": "text"}).constraint_spec() is None
    assert parse(CompletionRequest, response_format=None, structured_outputs=None).constraint_spec() is None


ONE_KIND = "You can only use one kind of structured outputs constraint but multiple are specified: "


@pytest.mark.parametrize("fields, param, detail", [
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", ONE_KIND + "regex, choice"),
    ({"structured_outputs": {"json": {}, "json_object": True}}, "structured_outputs", ONE_KIND + "json, json_object"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     ONE_KIND + "response_format (json_object) and structured_outputs.regex"),
    ({"structured_outputs": {}}, "structured_outputs", "You must use one kind of structured outputs constraint but "
                                                       "none are specified"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs", "You must use one kind"),
    ({"structured_outputs": {"json": {}, "disable_any_whitespace": True}}, "structured_outputs.disable_any_whitespace",
     "not supported"),
    ({"structured_outputs": {"json": {}, "disable_additional_properties": True}},
     "structured_outputs.disable_additional_properties", "not supported"),
    ({"structured_outputs": {"json": {}, "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern",
     "not supported"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format",
     "When response_format type is 'json_schema', the 'json_schema' field must be provided."),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "A", "schema": {}}}}, "response_format",
     "json_schema is for type 'json_schema', not 'json_object'"),
    ({"response_format": {"type": "structural_tag"}}, "response_format",
     "type 'structural_tag' is not supported; one of 'text', 'json_object', 'json_schema'"),
])
def test_structured_output_refusals_name_the_field(fields, param, detail):
    body = parse(ChatCompletionRequest, **fields)
    error = body.refusal(refusal(body.constraint_spec))
    assert (error.status, error.param) == (400, param) and error.message.startswith(f"{param}: {detail}")


@pytest.mark.parametrize("fields, status, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "A"}}}, 422, "response_format",
     "response_format: json_schema.schema: Field required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "A", "schema": []}}}, 422, "response_format",
     "response_format: json_schema.schema: Input should be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "name": ""}}}, 422, "response_format",
     "response_format: json_schema.name: String should have at least 1 character"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "A", "schema": {}, "shema": {}}}}, 400,
     "response_format", "response_format: has no field 'json_schema.shema'"),
    ({"structured_outputs": {"choice": "да"}}, 422, "structured_outputs", "structured_outputs: choice: Input should be "
                                                                          "a valid array"),
    ({"structured_outputs": {"guided_json": {}}}, 400, "structured_outputs",
     "structured_outputs: has no field 'guided_json'"),
    ({"guided_json": {}}, 400, "guided_json", "guided_json: not a field of this endpoint"),
])
def test_malformed_structured_output_fields_say_where(fields, status, param, message):
    error = refused(CompletionRequest, **fields)
    assert (error.status, error.param) == (status, param) and error.message.startswith(message), error.message
