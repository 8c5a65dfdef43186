"""The Serve application: one FastAPI ingress deployment that owns the models and their batching engines.

Endpoints: `POST /generate` (our shape), `POST /v1/completions` and `GET /v1/models` (OpenAI's shape),
`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` (vLLM's shapes, which lm-evaluation-harness
uses instead of a local tokenizer), `GET /stats` (batching counters per loaded model), `GET /healthz`. Both
generating endpoints stream server-sent events with `"stream": true`. Latency, token and batch metrics go to
Ray's Prometheus endpoint (serving/metrics.py).

The completions API takes every field of OpenAI's (a `null` is the default) and vLLM's usual extras: a prompt
may be text, a list of texts, a list of token ids or a list of such lists. `logprobs` (0..20) are the raw
model's log-softmax, before temperature, penalties and filters, so scoring through the server equals scoring
the checkpoint; `top_logprobs` hold the chosen token besides the k likeliest (as OpenAI's and vLLM's do), and
`text_offset` counts characters of the returned text. `echo` puts the prompt first in the text and in the
logprobs (its first token's logprob is null); `max_tokens: 0` with `echo` only scores the prompt. `best_of`
generates that many sequences per prompt and returns the `n` with the highest mean log-probability per
sampled token; it cannot be streamed when over `n`, and usage counts every generated token. `n > 1` streams
the sequences' chunks interleaved, each with its `index`. `suffix` is refused.

With more than one served name the app is two deployments: `RuGPTRouter`, the HTTP ingress, reads a request's
body (or `?model=` of a GET) and hands the request to a `RuGPTServer` replica through Serve's model
multiplexing, so that a request goes to a replica that has its model loaded (or to the one with the fewest) by
the body's `model` alone; clients send no header. The server replica runs the endpoints below on the forwarded
request and streams the response back through the router. With one name, `RuGPTServer` is the ingress itself
(every replica holds the model; one actor hop less per request and per streamed chunk).

A served name is a model (its weights) or a LoRA adapter of one of them (`adapters:`); each replica keeps at
most `max_models_per_replica` names loaded (LRU, Serve's `serve.multiplexed`). Adapters of one base share its
weights and its batching engine: their requests decode in the same steps, each row through its own adapter, and
loading or dropping an adapter never reloads the base. An adapter whose base fingerprint is not the served
base's is refused with 400 naming both.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with these codes:
400 malformed JSON, an unknown field, an unsupported value or a limit broken (message and `param` name the
field), or an adapter made for another base, 401 missing/wrong bearer token, 404 unknown model (the message
lists the served ones), 413 body too large, 422 a field of the wrong type or out of range, 503 overloaded (the
server deployment's `max_queued_requests`), 504 the request timeout passed. A streamed request that fails after
its first byte ends with an `{"error": ...}` event.
"""
# No `from __future__ import annotations` here: FastAPI reads the route annotations at runtime.

import asyncio
import codecs
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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from rugpt_ray.checkpoints import load_model
from rugpt_ray.config import close_matches
from rugpt_ray.errors import UserError
from rugpt_ray.generation import Completion, GenerationConfig, RequestError, TokenEvent, TokenLogprob, Transcript
from rugpt_ray.lora import Adapter, base_fingerprint, check_base, load_adapter
from rugpt_ray.serving.config import ServeConfig
from rugpt_ray.serving.engine import BatchEngine
from rugpt_ray.serving.metrics import EngineMetrics, model_loaded
from rugpt_ray.tokenizer import RuGPTTokenizer, load_tokenizer

logger = logging.getLogger("ray.serve")
NonEmpty = Annotated[str, Field(min_length=1)]
Prompt = str | list[str] | list[int] | list[list[int]]
OPENAI_PARAMS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "num_return_sequences": "n"}
DEFAULT_MAX_NEW_TOKENS = 64
FORWARDED_SCOPE = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string",
                   "root_path", "headers", "client", "server")  # what the server's app needs of the router's
ROUTER_MAX_ONGOING = 4096  # the router only relays: the server deployment's limits are the ones that bite


class ApiError(Exception):
    """An HTTP error in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    """A request body: unknown fields are refused, types are strict, and `null` means the field's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, body: Any) -> Any:
        return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body


class _Prompted(_Body):
    prompt: Prompt
    model: str | None = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(0, ge=-1)  # vLLM's -1 and 0 both mean all tokens
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[Annotated[int, Field(strict=False)], Annotated[float, Field(ge=-100, le=100)]] = Field(
        default_factory=dict)  # JSON keys are strings: "50256" is id 50256
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    stop: NonEmpty | list[NonEmpty] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    stream: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Prompt) -> Prompt:
        if not prompt or (isinstance(prompt, list) and any(isinstance(p, str | list) and not p for p in prompt)):
            raise ValueError("must be a non-empty text or list of token ids, or a non-empty list of those")
        return prompt

    def generation(self, max_new_tokens: int, min_new_tokens: int, n: int) -> GenerationConfig:
        """The decoder's settings. best_of's extra sequences are ranked by their log-probabilities, so they
        report them; `max_tokens: 0` runs as prompt scoring."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        rows = self.best_of or n
        logprobs = 0 if self.logprobs is None and rows > n else self.logprobs
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        if max_new_tokens == 0 and prompt_logprobs is None:
            prompt_logprobs = 0
        return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                temperature=self.temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
                                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                                frequency_penalty=self.frequency_penalty, logit_bias=dict(self.logit_bias),
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs, num_return_sequences=rows,
                                stop=stop, stop_token_ids=list(self.stop_token_ids),
                                include_stop_str_in_output=self.include_stop_str_in_output,
                                ignore_eos=self.ignore_eos, seed=self.seed)


class GenerateRequest(_Prompted):
    """`POST /generate`: one prompt or a list, sampling settings as in `GenerationConfig`."""

    max_new_tokens: int | None = Field(None, ge=0)
    min_new_tokens: int = Field(0, ge=0)
    num_return_sequences: int = Field(1, ge=1)


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Prompted):
    """`POST /v1/completions` in OpenAI's shape, plus vLLM's extras (top_k, repetition_penalty, min_tokens,
    stop_token_ids, include_stop_str_in_output, ignore_eos)."""

    max_tokens: int = Field(16, ge=0)
    min_tokens: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    suffix: str | None = None  # refused with 400 when given: text is only completed left to right
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used


class TokenizeRequest(_Body):
    """`POST /tokenize` in vLLM's shape; `add_special_tokens` changes nothing (ruGPT3 adds none)."""

    prompt: str
    model: str | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    """`POST /detokenize` in vLLM's shape."""

    tokens: list[int]
    model: str | None = None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body: larger than the limit of {limit} bytes", "body")
    return bytes(body)


def requested_model(request: Request, body: bytes) -> str | None:
    """The `model` a request names: its JSON body's field, or `?model=` of a GET."""
    if request.method == "GET":
        return request.query_params.get("model")
    try:
        fields = json.loads(body)
    except ValueError:
        return None  # the server answers 400 for it
    model = fields.get("model") if isinstance(fields, dict) else None
    return model if isinstance(model, str) else None


class ServedModel:
    """What a served name runs on, as Serve's per-replica LRU holds it: a base's engine, and for an adapter its
    name and weights. An adapter entry keeps its base loaded and its adapter in the base's model."""

    def __init__(self, engine: BatchEngine, adapter: tuple[str, Adapter] | None = None):
        """For an adapter, after `engine.hold_adapter`."""
        self.engine, self.adapter = engine, adapter
        self._released = adapter is None

    def __del__(self) -> None:
        """Serve calls it when the LRU drops the entry (Python calls it again when the object goes): the adapter
        may leave the model once no request uses it; requests that hold this entry keep theirs."""
        if not self._released:
            self._released = True
            self.engine.release_adapter(self.adapter[0])


app = FastAPI(title="rugpt-ray", description=__doc__)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Choices:
    """How one request's sequences read back: with `echo` the prompt comes first in the text and in the
    logprobs; with `logprobs` (the k asked for, else None) each choice has OpenAI's `logprobs` object."""

    def __init__(self, tokenizer: RuGPTTokenizer, prompts: list[list[int]], rows_per_prompt: int, echo: bool,
                 logprobs: int | None):
        self.tokenizer, self.prompts, self.rows_per_prompt = tokenizer, prompts, rows_per_prompt
        self.echo, self.k = echo, logprobs
        self.started: set[int] = set()  # streamed sequences whose first chunk went out

    def whole(self, c: Completion) -> tuple[str, dict[str, Any] | None]:
        """The text and logprobs of a finished sequence."""
        prompt = self.prompts[c.prompt_index] if self.echo else []
        scored = ((c.prompt_logprobs or []) if self.echo else []) + (c.logprobs or [])
        return self.tokenizer.decode(prompt) + c.text, self._logprobs(prompt + c.token_ids, scored, 0)

    def chunk(self, transcript: Transcript, row: int, events: list[TokenEvent]) -> tuple[str, dict[str, Any] | None]:
        """The text and logprobs of a streamed sequence's events since its last chunk (already in `transcript`)."""
        text = "".join(e.text for e in events)
        new = [TokenLogprob(e.token_id, e.logprob, e.top_logprobs) for e in events
               if e.token_id is not None and e.logprob is not None]
        prompt = self.prompts[row // self.rows_per_prompt] if self.echo else []
        output = transcript.tokens[row]
        first = len(prompt) + len(output) - len(new)
        if self.echo and row not in self.started:
            text, new, first = self.tokenizer.decode(prompt) + text, (transcript.prompt_logprobs[row] or []) + new, 0
        self.started.add(row)
        return text, self._logprobs(prompt + output, new, first)

    def _logprobs(self, ids: list[int], scored: list[TokenLogprob], first: int) -> dict[str, Any] | None:
        """OpenAI's object for `scored`, the tokens at `first`.. of `ids` (the ids of the text returned so far):
        `text_offset` is the length of that text before each token (a character split over tokens counts
        at the token that completes it)."""
        if self.k is None:
            return None
        utf8, offsets, chars = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], 0
        for token in ids[:first + len(scored)]:
            offsets.append(chars)
            chars += len(utf8.decode(self.tokenizer.token_bytes(token)))
        return {"tokens": [self.tokenizer.decode([t.token_id]) for t in scored],
                "token_logprobs": [t.logprob for t in scored],
                "top_logprobs": [self._top(t) for t in scored],
                "text_offset": offsets[first:]}

    def _top(self, scored: TokenLogprob) -> dict[str, float] | None:
        """The k likeliest tokens and the chosen one; a text two ids share keeps the likelier one's value."""
        if scored.top is None:
            return None
        top = {}
        for token, logprob in scored.top:
            top.setdefault(self.tokenizer.decode([token]), logprob)
        top.setdefault(self.tokenizer.decode([scored.token_id]), scored.logprob)
        return top


@serve.deployment(name="RuGPTServer")
@serve.ingress(app)
class RuGPTServer:
    """The endpoints, one `BatchEngine` per loaded base and the adapters on it; reached through `RuGPTRouter`."""

    async def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.api_key = None
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env)
            if not self.api_key:
                raise UserError(f"api_key_env={cfg.api_key_env}: that environment variable is not set in the replica")
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.created = int(time.time())
        self.engines: weakref.WeakValueDictionary[str, BatchEngine] = weakref.WeakValueDictionary()  # by base
        self.fingerprints: dict[str, str] = {}  # of the bases that adapters run on

        async def load(name: str) -> ServedModel:
            spec = cfg.adapters.get(name)
            if spec is None:
                served = ServedModel(await self._base(name))
            else:
                engine = await self._base(spec.base)
                adapter = await asyncio.to_thread(load_adapter, spec.path)
                try:
                    check_base(adapter, self.fingerprints[spec.base], f"model {spec.base!r}")
                except UserError as e:
                    raise ApiError(400, f"model {name!r}: {e}", "model") from None
                await engine.hold_adapter(name, adapter)
                served = ServedModel(engine, (name, adapter))
            model_loaded(name)
            return served

        self.served = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(load)
        await self.served(cfg.default_model)  # the replica reports ready with its default model loaded

    async def _base(self, name: str) -> BatchEngine:
        """The engine of base model `name`, shared by its own entry and its adapters' (Serve runs one load at a
        time, so it is loaded once)."""
        engine = self.engines.get(name)
        if engine is None:
            model = await asyncio.to_thread(self._load_weights, name)
            engine = self.engines[name] = BatchEngine(model, self.tokenizer, self.cfg.max_batch_size,
                                                      EngineMetrics(name))
        return engine

    def _load_weights(self, name: str) -> torch.nn.Module:
        """A base as configured; one that adapters run on is fingerprinted first, as loaded in training."""
        device, dtype = self.cfg.device, getattr(torch, self.cfg.dtype)
        if not any(spec.base == name for spec in self.cfg.adapters.values()):
            return load_model(self.cfg.models[name], device=device, dtype=dtype)
        model = load_model(self.cfg.models[name])
        self.fingerprints[name] = base_fingerprint(model)
        return model.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------- plumbing

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _read(self, request: Request, schema: type[_Body]) -> _Body:
        """Authorize, then read at most max_body_bytes and validate; errors name the field."""
        self._authorize(request)
        body = await read_body(request, self.cfg.max_body_bytes)
        try:
            return schema.model_validate_json(body)
        except ValidationError as e:
            errors = e.errors()
            if errors[0]["type"] == "json_invalid":
                raise ApiError(400, f"body: {errors[0]['msg']}", "body") from None
            unknown = next((err["loc"] for err in errors if err["type"] == "extra_forbidden"), None)
            if unknown:  # a field we do not know (at the top, or inside an object such as stream_options)
                param, inner = str(unknown[0]), ".".join(map(str, unknown[1:]))
                what = (f"has no field {inner!r}" if inner else
                        f"not a field of this endpoint{close_matches([param], schema.model_fields)}")
                raise ApiError(400, f"{param}: {what}", param) from None
            if not errors[0]["loc"]:
                raise ApiError(422, f"body: {errors[0]['msg']}", "body") from None
            param = str(errors[0]["loc"][0])
            messages = dict.fromkeys(err["msg"] for err in errors if err["loc"] and err["loc"][0] == param)
            raise ApiError(422, f"{param}: {'; '.join(messages)}", param) from None

    async def _served(self, name: str | None) -> tuple[str, ServedModel]:
        """The named (or default) model or adapter, loaded on demand."""
        name = name or self.cfg.default_model
        if name not in self.cfg.models and name not in self.cfg.adapters:
            known = ", ".join([*self.cfg.models, *self.cfg.adapters])
            raise ApiError(404, f"model {name!r} is not served here; known: {known}", "model",
                           kind="not_found_error", code="model_not_found")
        try:
            return name, await self.served(name)
        except UserError as e:  # checked paths can still vanish, or a hub id be unreachable from the replica
            raise ApiError(500, f"model {name!r} could not be loaded: {e}", "model", kind="server_error") from None

    def _encode(self, prompt: Prompt) -> list[list[int]]:
        """Token ids of each prompt: texts are encoded, ids taken as they are (the decoder checks them)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            return [prompt]
        return self.tokenizer.encode_batch(prompt) if isinstance(prompt[0], str) else prompt

    async def _prepare(self, body: _Prompted, max_new_tokens: int, min_new_tokens: int, n: int,
                       names: dict[str, str]) -> tuple[str, ServedModel, list[list[int]], GenerationConfig]:
        """The served model, the encoded prompts and the generation settings, after every limit check."""
        name, served = await self._served(body.model)
        rows = body.best_of or n
        if rows > n:  # the decoder's rows are best_of's
            names = {**names, "num_return_sequences": "best_of"}
        try:
            if max_new_tokens > self.cfg.max_new_tokens:
                raise RequestError("max_new_tokens", f"{max_new_tokens} is over the limit of {self.cfg.max_new_tokens}")
            if max_new_tokens == 0 and not body.echo:
                raise RequestError("max_new_tokens", "0 generates nothing; it is for scoring the prompt, with echo")
            if rows < n:
                raise RequestError("best_of", f"{body.best_of} is below n ({n})")
            if rows > n and body.stream:
                raise RequestError("best_of", f"{body.best_of} sequences ranked to return {n} cannot be streamed; "
                                              f"stream with best_of equal to n")
            if rows > self.cfg.max_n:
                raise RequestError("num_return_sequences", f"{rows} is over the limit of {self.cfg.max_n}")
            cfg = body.generation(max_new_tokens, min_new_tokens, n)
            encoded = self._encode(body.prompt)
            for i, ids in enumerate(encoded):
                if len(ids) > self.cfg.max_prompt_tokens:
                    raise RequestError("prompt", f"prompt {i} has {len(ids)} tokens; the limit is "
                                                 f"{self.cfg.max_prompt_tokens}")
            served.engine.check(encoded, cfg)
        except RequestError as e:
            param = names.get(e.param, e.param)
            raise ApiError(400, f"{param}: {e.detail}", param) from None
        return name, served, encoded, cfg

    async def _collect(self, served: ServedModel, encoded: list[list[int]], cfg: GenerationConfig) -> Transcript:
        transcript = Transcript(encoded, cfg.num_return_sequences)
        try:
            async for events in served.engine.generate(encoded, cfg, self.cfg.request_timeout_s, served.adapter):
                transcript.add(events)
        except TimeoutError as e:
            raise ApiError(504, str(e), kind="timeout_error", code="request_timeout") from None
        return transcript

    async def _stream(self, served: ServedModel, encoded: list[list[int]], cfg: GenerationConfig,
                      chunk: Callable[[Transcript, int, list[TokenEvent]], dict[str, Any]],
                      final: Callable[[Transcript], list[str]]) -> AsyncIterator[str]:
        """SSE text: `chunk(transcript, row, events)` per sequence with new text or an end, then `final(transcript)`.

        Tokens go out as they come; those that arrive within `stream_interval_s` of the last send (or together,
        when the client reads slower than the model writes) are merged into one chunk per sequence. Events
        whose text is still held back (a possible stop string, half a character) wait for the next chunk.
        """
        transcript = Transcript(encoded, cfg.num_return_sequences)
        loop, pending, sent = asyncio.get_running_loop(), {}, float("-inf")

        def flush() -> str:
            ready = [row for row, events in pending.items() if any(e.text or e.finish_reason for e in events)]
            return "".join(_sse(chunk(transcript, row, pending.pop(row))) for row in ready)

        try:
            async for events in served.engine.generate(encoded, cfg, self.cfg.request_timeout_s, served.adapter):
                transcript.add(events)
                for e in events:
                    pending.setdefault(e.index, []).append(e)
                if loop.time() - sent >= self.cfg.stream_interval_s and (text := flush()):
                    yield text
                    sent = loop.time()
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

    async def forward(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any] | bytes]:
        """`RuGPTRouter`'s call: run this replica's endpoints on a request the router has read; yield the
        response's start (`{"status", "headers"}`), then its body as it comes. Cancelling the call (the client
        left) cancels the endpoint, which drops the request's rows from the batch."""
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        unread = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if unread:
                return unread.pop()
            await asyncio.Event().wait()  # a disconnect arrives as this call's cancellation instead
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            messages.put_nowait(message)

        endpoint = asyncio.create_task(app(dict(scope), receive, send))
        endpoint.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "headers": [tuple(h) for h in message.get("headers", [])]}
                elif message.get("body"):
                    yield message["body"]
        finally:
            endpoint.cancel()

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Batching counters of the bases loaded in the replica that answers (see `EngineStats`), with the
        adapters it keeps on each."""
        self._authorize(request)
        return {"models": {name: {**engine.stats.as_dict(), "adapters": engine.kept_adapters}
                           for name, engine in list(self.engines.items())}}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        """Models, then adapters; `parent` is an adapter's base (as vLLM lists LoRA adapters)."""
        self._authorize(request)
        parents = {**dict.fromkeys(self.cfg.models), **{name: a.base for name, a in self.cfg.adapters.items()}}
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": "rugpt-ray", "parent": parent}
                                           for name, parent in parents.items()]}

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> dict[str, Any]:
        body: TokenizeRequest = await self._read(request, TokenizeRequest)
        _, served = await self._served(body.model)
        tokens = self.tokenizer.encode(body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.engine.context}

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> dict[str, str]:
        body: DetokenizeRequest = await self._read(request, DetokenizeRequest)
        await self._served(body.model)
        vocab = len(self.tokenizer)
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"tokens: token id {bad} is not in the vocabulary (0..{vocab - 1})", "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request, model: str | None = None) -> dict[str, Any]:
        """What a client needs to tokenize as the server does (vLLM's shape); `?model=` picks the context."""
        self._authorize(request)
        _, served = await self._served(model)
        tok, context = self.tokenizer, served.engine.context
        special = {"eos": tok.eos_id, "bos": tok.bos_id, "pad": tok.pad_id}
        return {"tokenizer_class": "GPT2TokenizerFast", "vocab_size": len(tok), "model_max_length": context,
                "max_model_len": context, "add_bos_token": False, "add_eos_token": False,
                **{f"{kind}_token": tok.decode([token]) for kind, token in special.items()},
                **{f"{kind}_token_id": token for kind, token in special.items()}}

    @app.post("/generate", response_model=None)
    async def generate(self, request: Request) -> dict[str, Any] | StreamingResponse:
        body: GenerateRequest = await self._read(request, GenerateRequest)
        max_new = body.max_new_tokens
        if max_new is None:
            max_new = min(DEFAULT_MAX_NEW_TOKENS, self.cfg.max_new_tokens)
        n = body.num_return_sequences
        name, served, encoded, cfg = await self._prepare(body, max_new, body.min_new_tokens, n, {})
        choices = Choices(self.tokenizer, encoded, cfg.num_return_sequences, body.echo, body.logprobs)

        def result(transcript: Transcript) -> dict[str, Any]:
            completions = []
            for c in transcript.best(n):
                text, logprobs = choices.whole(c)
                completions.append({"index": c.index, "prompt_index": c.prompt_index, "text": text,
                                    "logprobs": logprobs, "finish_reason": c.finish_reason,
                                    "completion_tokens": c.completion_tokens})
            return {"model": name, "completions": completions, "usage": transcript.usage}

        def chunk(transcript: Transcript, row: int, events: list[TokenEvent]) -> dict[str, Any]:
            text, logprobs = choices.chunk(transcript, row, events)
            return {"index": row, "text": text, "logprobs": logprobs, "finish_reason": events[-1].finish_reason}

        if not body.stream:
            return result(await self._collect(served, encoded, cfg))
        return StreamingResponse(self._stream(
            served, encoded, cfg, chunk, final=lambda transcript: [_sse({"done": True, **result(transcript)})],
        ), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=None)
    async def completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        body: CompletionRequest = await self._read(request, CompletionRequest)
        if body.suffix:
            raise ApiError(400, "suffix: not supported (text is only completed left to right)", "suffix")
        name, served, encoded, cfg = await self._prepare(body, body.max_tokens, body.min_tokens, body.n,
                                                         OPENAI_PARAMS)
        choices = Choices(self.tokenizer, encoded, cfg.num_return_sequences, body.echo, body.logprobs)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}

        def choice(index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

        if not body.stream:
            transcript = await self._collect(served, encoded, cfg)
            return {**head, "choices": [choice(c.index, *choices.whole(c), c.finish_reason)
                                        for c in transcript.best(body.n)], "usage": transcript.usage}

        def chunk(transcript: Transcript, row: int, events: list[TokenEvent]) -> dict[str, Any]:
            return {**head, "choices": [choice(row, *choices.chunk(transcript, row, events),
                                               events[-1].finish_reason)]}

        def final(transcript: Transcript) -> list[str]:
            usage = [_sse({**head, "choices": [], "usage": transcript.usage})]
            return [*(usage if body.stream_options and body.stream_options.include_usage else []), "data: [DONE]\n\n"]

        return StreamingResponse(self._stream(served, encoded, cfg, chunk, final), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


@serve.deployment(name="RuGPTRouter", max_ongoing_requests=ROUTER_MAX_ONGOING, ray_actor_options={"num_cpus": 0})
class RuGPTRouter:
    """The HTTP ingress: sends each request to a `RuGPTServer` replica chosen by the model it names (Serve's
    multiplexed routing) and relays the response as it streams. It reads the body to find the model and
    answers only what the servers cannot: a body over the limit (413) and no room in their queues (503)."""

    def __init__(self, server: DeploymentHandle, cfg: ServeConfig):
        self.server, self.cfg = server.options(stream=True), cfg

    async def __call__(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.cfg.max_body_bytes)
        except ApiError as e:
            return await _api_error(request, e)
        model = requested_model(request, body) or self.cfg.default_model
        scope = {key: request.scope[key] for key in FORWARDED_SCOPE if key in request.scope}
        call = self.server.options(multiplexed_model_id=model).forward.remote(scope, body)
        try:
            start = await call.__anext__()
        except BackPressureError:
            return await _api_error(request, ApiError(503, "overloaded: every model server's queue is full; retry "
                                                           "later", kind="server_error", code="overloaded"))

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in call:
                    yield chunk
            finally:
                call.cancel()  # the client left: the server stops generating

        response = StreamingResponse(rest(), status_code=start["status"])
        response.raw_headers = [tuple(h) for h in start["headers"]]
        return response


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """Serve app builder: `import_path: rugpt_ray.serving:build_app`, `args:` = `ServeConfig`'s fields."""
    return serve_app(args if isinstance(args, ServeConfig) else ServeConfig.from_dict(args))


def serve_app(cfg: ServeConfig, **server_options: Any) -> Application:
    """The router in front of the model servers. Model paths are resolved here (env vars, globs), so every
    replica loads the same checkpoint. `server_options` are Serve deployment options of `RuGPTServer`, as a Serve
    config's `deployments:` entry for it sets them, for apps built in Python."""
    cfg = cfg.resolved()
    server = RuGPTServer.options(**{"max_ongoing_requests": cfg.max_ongoing_requests,
                                    "max_queued_requests": cfg.max_queued_requests, **server_options}).bind(cfg)
    if len(cfg.models) + len(cfg.adapters) == 1:
        return server  # every replica holds the one model: nothing to route, the server is the ingress
    return RuGPTRouter.bind(server, cfg)
