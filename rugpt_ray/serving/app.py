"""The Serve application: one FastAPI ingress deployment that owns the models and their batching engines.

Endpoints: `POST /generate` (our shape), `POST /v1/completions` and `GET /v1/models` (OpenAI's shape),
`GET /stats` (batching counters per loaded model), `GET /healthz`. Both POST endpoints stream server-sent
events with `"stream": true`.

Ingress and models live in one replica: a token goes engine -> SSE -> proxy with no extra actor hop, which
keeps Serve's time-to-first-token overhead small. Models are loaded through `serve.multiplexed` (LRU, at most
`max_models_per_replica` per replica) and picked by the body's `model` field; a client may also send the
`serve_multiplexed_model_id` header with the same name so the proxy prefers a replica that has it loaded.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with these codes:
400 malformed JSON or a limit broken (message and `param` name the field), 401 missing/wrong bearer token,
404 unknown model (the message lists the served ones), 413 body too large, 422 a field of the wrong type or
out of range, 503 overloaded (Serve's `max_queued_requests`), 504 the request timeout passed. A streamed
request that fails after its first byte ends with an `{"error": ...}` event instead.
"""
# No `from __future__ import annotations` here: FastAPI reads the route annotations at runtime.

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from ray.serve import Application

from rugpt_ray.checkpoints import load_model
from rugpt_ray.errors import UserError
from rugpt_ray.generation import GenerationConfig, RequestError, TokenEvent
from rugpt_ray.serving.config import ServeConfig
from rugpt_ray.serving.engine import BatchEngine, Transcript
from rugpt_ray.tokenizer import load_tokenizer

logger = logging.getLogger("ray.serve")
NonEmpty = Annotated[str, Field(min_length=1)]
OPENAI_PARAMS = {"max_new_tokens": "max_tokens", "num_return_sequences": "n"}
DEFAULT_MAX_NEW_TOKENS = 64


class ApiError(Exception):
    """An HTTP error in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Prompted(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | list[str]
    model: str | None = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: NonEmpty | list[NonEmpty] | None = None
    seed: int | None = None
    stream: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[str]) -> str | list[str]:
        if not prompt or (isinstance(prompt, list) and not all(prompt)):
            raise ValueError("must be a non-empty string or a non-empty list of non-empty strings")
        return prompt

    def generation(self, max_new_tokens: int, n: int) -> GenerationConfig:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                                num_return_sequences=n, stop=stop, seed=self.seed)


class GenerateRequest(_Prompted):
    """`POST /generate`: one prompt or a list, sampling settings as in `GenerationConfig`."""

    max_new_tokens: int | None = Field(None, ge=1)
    num_return_sequences: int = Field(1, ge=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CompletionRequest(_Prompted):
    """`POST /v1/completions` in OpenAI's shape (plus top_k and repetition_penalty, as vLLM accepts them)."""

    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1)
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used


app = FastAPI(title="rugpt-ray", description=__doc__)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@serve.deployment(name="RuGPTServer")
@serve.ingress(app)
class RuGPTServer:
    """FastAPI ingress plus one `BatchEngine` per loaded model."""

    async def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.api_key = None
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env)
            if not self.api_key:
                raise UserError(f"api_key_env={cfg.api_key_env}: that environment variable is not set in the replica")
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.created = int(time.time())
        self.engines: weakref.WeakValueDictionary[str, BatchEngine] = weakref.WeakValueDictionary()

        async def load(name: str) -> BatchEngine:
            model = await asyncio.to_thread(load_model, cfg.models[name], device=cfg.device,
                                            dtype=getattr(torch, cfg.dtype))
            engine = self.engines[name] = BatchEngine(model, self.tokenizer, cfg.max_batch_size)
            return engine

        self.engine = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(load)
        await self.engine(cfg.default_model)  # the replica reports ready with its default model loaded

    # ------------------------------------------------------------------------------------------- plumbing

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _read(self, request: Request, schema: type[_Prompted]) -> _Prompted:
        """Authorize, then read at most max_body_bytes and validate; errors name the field."""
        self._authorize(request)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.cfg.max_body_bytes:
                raise ApiError(413, f"body: larger than the limit of {self.cfg.max_body_bytes} bytes", "body")
        try:
            return schema.model_validate_json(bytes(body))
        except ValidationError as e:
            errors = e.errors()
            if errors[0]["type"] == "json_invalid":
                raise ApiError(400, f"body: {errors[0]['msg']}", "body") from None
            if not errors[0]["loc"]:
                raise ApiError(422, f"body: {errors[0]['msg']}", "body") from None
            param = str(errors[0]["loc"][0])
            messages = dict.fromkeys(err["msg"] for err in errors if err["loc"] and err["loc"][0] == param)
            raise ApiError(422, f"{param}: {'; '.join(messages)}", param) from None

    async def _prepare(self, body: _Prompted, max_new_tokens: int, n: int,
                       names: dict[str, str]) -> tuple[str, BatchEngine, list[list[int]], GenerationConfig]:
        """The model's engine, the encoded prompts and the generation settings, after every limit check."""
        name = body.model or self.cfg.default_model
        if name not in self.cfg.models:
            raise ApiError(404, f"model {name!r} is not served here; known: {', '.join(self.cfg.models)}", "model",
                           kind="not_found_error", code="model_not_found")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        cfg = body.generation(max_new_tokens, n)
        try:
            engine = await self.engine(name)
        except UserError as e:  # checked paths can still vanish, or a hub id be unreachable from the replica
            raise ApiError(500, f"model {name!r} could not be loaded: {e}", "model", kind="server_error") from None
        try:
            if max_new_tokens > self.cfg.max_new_tokens:
                raise RequestError("max_new_tokens", f"{max_new_tokens} is over the limit of {self.cfg.max_new_tokens}")
            if n > self.cfg.max_n:
                raise RequestError("num_return_sequences", f"{n} is over the limit of {self.cfg.max_n}")
            encoded = self.tokenizer.encode_batch(prompts)
            for i, ids in enumerate(encoded):
                if len(ids) > self.cfg.max_prompt_tokens:
                    raise RequestError("prompt", f"prompt {i} has {len(ids)} tokens; the limit is "
                                                 f"{self.cfg.max_prompt_tokens}")
            engine.check(encoded, cfg)
        except RequestError as e:
            param = names.get(e.param, e.param)
            raise ApiError(400, f"{param}: {e}", param) from None
        return name, engine, encoded, cfg

    async def _collect(self, engine: BatchEngine, encoded: list[list[int]], cfg: GenerationConfig) -> Transcript:
        transcript = Transcript(encoded, cfg.num_return_sequences, self.tokenizer.eos_id)
        try:
            async for events in engine.generate(encoded, cfg, self.cfg.request_timeout_s):
                transcript.add(events)
        except TimeoutError as e:
            raise ApiError(504, str(e), kind="timeout_error", code="request_timeout") from None
        return transcript

    async def _stream(self, engine: BatchEngine, encoded: list[list[int]], cfg: GenerationConfig,
                      chunk: Callable[[TokenEvent], dict[str, Any]],
                      final: Callable[[Transcript], list[str]]) -> AsyncIterator[str]:
        """SSE text: `chunk(event)` per sequence with new text or an end, then `final(transcript)`.

        Tokens go out as they come; those that arrive within `stream_interval_s` of the last send (or together,
        when the client reads slower than the model writes) are merged into one chunk per sequence.
        """
        transcript = Transcript(encoded, cfg.num_return_sequences, self.tokenizer.eos_id)
        loop, pending, sent = asyncio.get_running_loop(), {}, float("-inf")

        def flush() -> str:
            return "".join(_sse(chunk(e)) for e in pending.values() if e.text or e.finish_reason)

        try:
            async for events in engine.generate(encoded, cfg, self.cfg.request_timeout_s):
                transcript.add(events)
                for e in events:  # one chunk per sequence: the text since its last chunk
                    before = pending.get(e.index)
                    pending[e.index] = e if before is None else TokenEvent(e.index, e.token_id, before.text + e.text,
                                                                           e.finish_reason)
                if loop.time() - sent >= self.cfg.stream_interval_s and (text := flush()):
                    yield text
                    pending, sent = {}, loop.time()
            if text := flush():
                yield text
        except TimeoutError as e:
            yield _sse(ApiError(504, str(e), kind="timeout_error", code="request_timeout").body())
            return
        except Exception as e:  # the status line is gone: report in-band
            logger.exception("generation failed mid-stream")
            yield _sse(ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error").body())
            return
        for data in final(transcript):
            yield data

    # ------------------------------------------------------------------------------------------- routes

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Batching counters of the models loaded in the replica that answers (see `EngineStats`)."""
        self._authorize(request)
        return {"models": {name: engine.stats.as_dict() for name, engine in list(self.engines.items())}}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": "rugpt-ray"} for name in self.cfg.models]}

    @app.post("/generate", response_model=None)
    async def generate(self, request: Request) -> dict[str, Any] | StreamingResponse:
        body: GenerateRequest = await self._read(request, GenerateRequest)
        max_new = body.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, self.cfg.max_new_tokens)
        name, engine, encoded, cfg = await self._prepare(body, max_new, body.num_return_sequences, {})

        def result(transcript: Transcript) -> dict[str, Any]:
            completions = [{"index": c.index, "prompt_index": c.prompt_index, "text": c.text,
                            "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}
                           for c in transcript.completions()]
            return {"model": name, "completions": completions, "usage": transcript.usage}

        if not body.stream:
            return result(await self._collect(engine, encoded, cfg))
        return StreamingResponse(self._stream(
            engine, encoded, cfg,
            chunk=lambda e: {"index": e.index, "text": e.text, "finish_reason": e.finish_reason},
            final=lambda transcript: [_sse({"done": True, **result(transcript)})],
        ), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=None)
    async def completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        body: CompletionRequest = await self._read(request, CompletionRequest)
        name, engine, encoded, cfg = await self._prepare(body, body.max_tokens, body.n, OPENAI_PARAMS)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}

        def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

        if not body.stream:
            transcript = await self._collect(engine, encoded, cfg)
            return {**head, "choices": [choice(c.index, c.text, c.finish_reason) for c in transcript.completions()],
                    "usage": transcript.usage}

        def final(transcript: Transcript) -> list[str]:
            usage = [_sse({**head, "choices": [], "usage": transcript.usage})]
            return [*(usage if body.stream_options and body.stream_options.include_usage else []), "data: [DONE]\n\n"]

        return StreamingResponse(self._stream(
            engine, encoded, cfg,
            chunk=lambda e: {**head, "choices": [choice(e.index, e.text, e.finish_reason)]},
            final=final,
        ), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """Serve app builder: `import_path: rugpt_ray.serving:build_app`, `args:` = `ServeConfig`'s fields.

    Model paths are resolved here (env vars, globs), so every replica loads the same checkpoint.
    """
    cfg = (args if isinstance(args, ServeConfig) else ServeConfig.from_dict(args)).resolved()
    return RuGPTServer.options(max_ongoing_requests=cfg.max_ongoing_requests,
                               max_queued_requests=cfg.max_queued_requests).bind(cfg)
