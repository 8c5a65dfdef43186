"""The API's OpenAPI document. The routes read their raw body (protocol.py validates it, so that an error names the
field as OpenAI's does), so FastAPI sees no request body: this module declares each endpoint's body (the protocol
models' JSON schemas), its answers (the success shape, OpenAI's error shape per status, `text/event-stream` for a
stream) and, when the server has a key, its bearer security. Fuzzers (Schemathesis) and client generators read it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from fastapi.openapi.utils import get_openapi

from rugpt_ray.serving.protocol import (
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
)

REF = "#/components/schemas/{model}"
NULLABLE_STRING = {"type": ["string", "null"]}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": NULLABLE_STRING,
                   "code": NULLABLE_STRING}}}}
"""OpenAI's error object: `param` names the request field at fault."""
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
         "properties": {key: {"type": "integer"} for key in ("prompt_tokens", "completion_tokens", "total_tokens")}}
LOGPROBS = {"type": ["object", "null"]}
FINISH = NULLABLE_STRING
COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "usage": USAGE, "choices": {"type": "array", "items": {
        "type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
        "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": LOGPROBS,
                       "finish_reason": FINISH}}}}}
GENERATED = {"type": "object", "required": ["model", "completions", "usage"], "properties": {
    "model": {"type": "string"}, "usage": USAGE, "completions": {"type": "array", "items": {
        "type": "object", "required": ["index", "prompt_index", "text", "logprobs", "finish_reason",
                                       "completion_tokens"],
        "properties": {"index": {"type": "integer"}, "prompt_index": {"type": "integer"}, "text": {"type": "string"},
                       "logprobs": LOGPROBS, "finish_reason": FINISH, "completion_tokens": {"type": "integer"}}}}}}
CHAT = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "usage": USAGE, "choices": {"type": "array", "items": {
        "type": "object", "required": ["index", "message", "logprobs", "finish_reason"],
        "properties": {"index": {"type": "integer"}, "logprobs": LOGPROBS, "finish_reason": FINISH,
                       "message": {"type": "object", "required": ["role", "content"],
                                   "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}}}}}}
EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "A chunk of the answer as JSON; an `{\"error\": ...}` object when the "
                                     "generation fails after the first byte; `[DONE]` last (OpenAI's endpoints)"}}}
"""A server-sent event as Schemathesis reads one (OpenAPI 3.1: the schema describes each event)."""
MODELS = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object", "created", "owned_by", "parent"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}, "parent": NULLABLE_STRING}}}}}
TOKENS = {"type": "object", "required": ["tokens", "count", "max_model_len"], "properties": {
    "tokens": {"type": "array", "items": {"type": "integer"}}, "count": {"type": "integer"},
    "max_model_len": {"type": "integer"}}}
OBJECT = {"type": "object"}

STATUS_WORDS = {400: "The request could never run (bad JSON, an unknown field, a value past a server limit or the "
                     "model's context); `param` names the field",
                401: "Missing or wrong API key (`Authorization: Bearer <key>`)",
                404: "The model is not served here",
                413: "The body is larger than the server's `max_body_bytes`",
                422: "A field has the wrong type or is out of range; `param` names it",
                503: "The model servers' queues are full, or the server is stopping; retry after `Retry-After` "
                     "seconds",
                504: "The generation ran past the server's `request_timeout_s`"}


@dataclass(frozen=True)
class Operation:
    """What the document says of one route: its body (a protocol model), its success shape, whether it streams
    (`stream: true`), the error statuses it answers besides 401 and 503, and whether it needs the key."""

    body: type[Body] | None
    success: dict[str, Any]
    streams: bool = False
    errors: tuple[int, ...] = ()
    secured: bool = True


BODY_ERRORS = (400, 404, 413, 422)
GENERATING = (*BODY_ERRORS, 504)
OPERATIONS = {
    ("/healthz", "get"): Operation(None, {"type": "object", "required": ["status"],
                                          "properties": {"status": {"const": "ok"}}}, secured=False),
    ("/stats", "get"): Operation(None, {"type": "object", "required": ["models", "torch_threads"],
                                        "properties": {"models": OBJECT, "torch_threads": {"type": "integer"}}}),
    ("/v1/models", "get"): Operation(None, MODELS),
    ("/tokenizer_info", "get"): Operation(None, OBJECT, errors=(404,)),
    ("/tokenize", "post"): Operation(TokenizeRequest, TOKENS, errors=BODY_ERRORS),
    ("/detokenize", "post"): Operation(DetokenizeRequest, {"type": "object", "required": ["prompt"],
                                                           "properties": {"prompt": {"type": "string"}}},
                                       errors=BODY_ERRORS),
    ("/generate", "post"): Operation(GenerateRequest, GENERATED, streams=True, errors=GENERATING),
    ("/v1/completions", "post"): Operation(CompletionRequest, COMPLETION, streams=True, errors=GENERATING),
    ("/v1/chat/completions", "post"): Operation(ChatCompletionRequest, CHAT, streams=True, errors=GENERATING),
}
"""Every API route of the server's app; another route (a page such as the playground) is left as FastAPI
describes it."""


def openapi_document(routes: list[Any], title: str, version: str, secured: bool) -> dict[str, Any]:
    """The document of `routes` (FastAPI's paths and parameters) with each operation's body and answers
    declared; `secured`: the server has a key, so the operations that need it say so (and answer 401)."""
    document = get_openapi(title=title, version=version, routes=routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR
    if secured:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            spec = OPERATIONS.get((path, method))
            if spec is None:
                continue  # a page (the playground), not an API operation
            if spec.body is not None:
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": REF.format(model=spec.body.__name__)}}}}
                schemas.update(body_schemas(spec.body))
            needs_key = secured and spec.secured
            if needs_key:
                operation["security"] = [{"bearer": []}]
            operation["responses"] = responses(spec, needs_key)
    if REF.format(model="HTTPValidationError") not in json.dumps(document["paths"]):
        schemas.pop("HTTPValidationError", None)  # FastAPI's 422 shape: our operations answer OpenAI's instead
        schemas.pop("ValidationError", None)
    return document


def responses(spec: Operation, needs_key: bool) -> dict[str, Any]:
    """The success answer (JSON, or events when streamed), then an `Error` per status."""
    content = {"application/json": {"schema": spec.success}}
    if spec.streams:
        content["text/event-stream"] = {"schema": EVENT}
    answers: dict[str, Any] = {"200": {"description": "The answer, or with `stream: true` its server-sent events"
                                       if spec.streams else "The answer", "content": content}}
    retry_after = {"Retry-After": {"required": True, "description": "Seconds to wait before retrying",
                                   "schema": {"type": "integer", "minimum": 0}}}
    for status in sorted({*spec.errors, *((401,) if needs_key else ()), 503}):
        answers[str(status)] = {"description": STATUS_WORDS[status],
                                "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}},
                                **({"headers": retry_after} if status == 503 else {})}
    return answers


def body_schemas(model: type[Body]) -> dict[str, Any]:
    """`model`'s JSON schema and those it refers to, by name, as the server reads them: a field the request may
    leave out may also be `null` (it then takes its default)."""
    schema = model.model_json_schema(by_alias=True, ref_template=REF)
    found = {name: nullable_optionals(part) for name, part in schema.pop("$defs", {}).items()}
    found[model.__name__] = nullable_optionals(schema)
    return found


def nullable_optionals(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with each property that is not required also allowing `null` (`Body` reads null as the default)."""
    schema = copy.deepcopy(schema)
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        if name not in required and not allows_null(prop):
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}]}
    return schema


def allows_null(schema: dict[str, Any]) -> bool:
    kinds = schema.get("type")
    return kinds == "null" or (isinstance(kinds, list) and "null" in kinds) or any(
        allows_null(part) for part in schema.get("anyOf", []))
