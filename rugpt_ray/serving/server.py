"""The model server: a Serve deployment whose FastAPI routes stay thin. Each one reads its request (protocol.py),
prepares it against the server's limits and the model (compiling its structured output in a thread), and hands the
events to its endpoint's shaping (completions.py, chat_completions.py) and to streaming.py; the model work is the
`BatchEngine`'s (engine.py)."""
# No `from __future__ import annotations` here: FastAPI reads the route annotations at runtime.

import asyncio
import hmac
import os
import time
import weakref
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any, ClassVar

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from rugpt_ray.chat import ChatTemplateError, chat_template_source, render_chat
from rugpt_ray.checkpoints import load_model, read_chat_template
from rugpt_ray.constraints import Constraint, compile_constraint, token_table
from rugpt_ray.errors import UserError
from rugpt_ray.generation import GenerationConfig, RequestError, Transcript
from rugpt_ray.lora import Adapter, base_fingerprint, check_base, load_adapter
from rugpt_ray.quantization import prepack, with_dtype
from rugpt_ray.serving import playground
from rugpt_ray.serving.chat_completions import ChatChoices, ChatResponses
from rugpt_ray.serving.completions import Choices, CompletionResponses, GenerateResponses
from rugpt_ray.serving.config import ServeConfig
from rugpt_ray.serving.direct_ingress import listen_as_the_proxy_does
from rugpt_ray.serving.engine import BatchEngine, in_passing_thread
from rugpt_ray.serving.metrics import EngineMetrics, model_loaded
from rugpt_ray.serving.openapi import openapi_document
from rugpt_ray.serving.protocol import (
    ApiError,
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    ConstraintSpec,
    DetokenizeRequest,
    GenerateRequest,
    Prompt,
    SamplingRequest,
    TokenizeRequest,
    read_body,
)
from rugpt_ray.serving.streaming import Responses, collect, stream
from rugpt_ray.tokenizer import load_tokenizer

NO_CHAT_TEMPLATE = ("As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
                    "template if the tokenizer does not define one. Give the model a `chat_template` in its `models:` "
                    "entry of the Serve config (a built-in name such as 'rugpt3-chat', or a .jinja file), save one "
                    "with its checkpoint (chat_template.jinja), or send `chat_template` with the request.")
"""vLLM's words for a chat without a template, then where ours come from."""


class ServedModel:
    """What a served name runs on, as Serve's per-replica LRU holds it: a base's engine, and for an adapter its
    name and weights; and the chat template it answers chats with, if any. An adapter entry keeps its base loaded
    and its adapter in the base's model."""

    def __init__(self, engine: BatchEngine, chat_template: str | None, adapter: tuple[str, Adapter] | None = None):
        """For an adapter, after `engine.hold_adapter`."""
        self.engine, self.chat_template, self.adapter = engine, chat_template, adapter
        self._released = adapter is None

    def __del__(self) -> None:
        """Serve calls it when the LRU drops the entry (Python calls it again when the object goes): the adapter
        may leave the model once no request uses it; requests that hold this entry keep theirs."""
        if not self._released:
            self._released = True
            self.engine.release_adapter(self.adapter[0])


app = FastAPI(title="rugpt-ray", version=version("rugpt-ray"), openapi_url=None, docs_url=None, redoc_url=None)
"""Its OpenAPI document and /docs are the replica's routes: they depend on its config (a key or none)."""


class CorsWhenConfigured:
    """CORS for the origins in the replica's `ServeConfig.cors_origins`, none by default (CORS off). Serve runs a
    frozen copy of `app`, so the replica sets `origins` here instead of adding middleware to it."""

    origins: ClassVar[list[str]] = []

    def __init__(self, app: ASGIApp):
        self.app, self.cors = app, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.origins:
            return await self.app(scope, receive, send)
        if self.cors is None:
            self.cors = CORSMiddleware(self.app, allow_origins=self.origins, allow_methods=["GET", "POST"],
                                       allow_headers=["Authorization", "Content-Type"])
        await self.cors(scope, receive, send)


app.add_middleware(CorsWhenConfigured)


@app.exception_handler(ApiError)
async def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error.response()


class StopGate:
    """Counts the replica's requests in flight and, once it stops (`RuGPTServer.drain`), answers new ones 503 with
    `Retry-After` while those finish. Class state: Serve runs a frozen copy of `app`, one replica per process."""

    draining: ClassVar[bool] = False
    in_flight: ClassVar[int] = 0
    retry_after_s: ClassVar[int] = 1

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if StopGate.draining:
            refusal = ApiError(503, "the server is stopping; retry later", kind="server_error", code="stopping",
                               headers={"Retry-After": str(StopGate.retry_after_s)})
            return await refusal.response()(scope, receive, send)
        StopGate.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            StopGate.in_flight -= 1


app.add_middleware(StopGate)


app.include_router(playground.router)  # the page at / (playground.py)


def reserved_threads() -> int:
    """The torch threads of this replica: the CPUs it reserves (Ray's `num_cpus`), at least one."""
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0)))


@serve.deployment(name="RuGPTServer")
@serve.ingress(app)
class RuGPTServer(playground.PlaygroundRoutes):
    """The endpoints, one `BatchEngine` per loaded base and the adapters on it; reached through `RuGPTRouter`."""

    async def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        torch.set_num_threads(reserved_threads())
        listen_as_the_proxy_does()
        self.api_key = None
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env)
            if not self.api_key:
                raise UserError(f"api_key_env={cfg.api_key_env}: that environment variable is not set in the replica")
        CorsWhenConfigured.origins = list(cfg.cors_origins)
        StopGate.retry_after_s = cfg.retry_after_s
        self.openapi = openapi_document(app.routes, app.title, app.version, secured=self.api_key is not None)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.created = int(time.time())
        self.engines: weakref.WeakValueDictionary[str, BatchEngine] = weakref.WeakValueDictionary()  # by base
        self.fingerprints: dict[str, str] = {}  # of the bases that adapters run on

        async def load(name: str) -> ServedModel:
            spec = cfg.adapters.get(name)
            if spec is None:
                served = ServedModel(await self._base(name), await asyncio.to_thread(self._chat_template, name))
            else:
                engine = await self._base(spec.base)
                adapter = await asyncio.to_thread(load_adapter, spec.path)
                try:
                    check_base(adapter, self.fingerprints[spec.base], f"model {spec.base!r}")
                except UserError as e:
                    raise ApiError(400, f"model {name!r}: {e}", "model") from None
                await engine.hold_adapter(name, adapter)
                template = adapter.chat_template or await asyncio.to_thread(self._chat_template, spec.base)
                served = ServedModel(engine, template, (name, adapter))
            model_loaded(name)
            return served

        self.served = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(load)
        await self.served(cfg.default_model)  # the replica reports ready with its default model loaded

    async def _base(self, name: str) -> BatchEngine:
        """The engine of base model `name`, shared by its own entry and its adapters' (Serve runs one load at a
        time, so it is loaded once)."""
        engine = self.engines.get(name)
        if engine is None:
            metrics = EngineMetrics(name)
            engine = self.engines[name] = await in_passing_thread(  # the weights, and the zeroed KV cache
                lambda: BatchEngine(self._load_weights(name), self.tokenizer, self.cfg.max_batch_size, metrics))
            # the grammar compiler's view of the vocabulary, built once here rather than within the first
            # structured request's compile time limit
            await asyncio.to_thread(token_table, self.tokenizer, engine.rows)
        return engine

    def _load_weights(self, name: str) -> torch.nn.Module:
        """A base as configured; one that adapters run on is fingerprinted first, as loaded in training."""
        model = load_model(self.cfg.models[name].path, device=self.cfg.device)
        if any(spec.base == name for spec in self.cfg.adapters.values()):
            self.fingerprints[name] = base_fingerprint(model)
        return prepack(with_dtype(model, self.cfg.dtype))

    def _chat_template(self, name: str) -> str | None:
        """Base model `name`'s chat template: its checkpoint's own, else its `models:` entry's."""
        spec = self.cfg.models[name]
        own = read_chat_template(spec.path)
        return own if own is not None or spec.chat_template is None else chat_template_source(spec.chat_template)

    # ------------------------------------------------------------------------------------------- plumbing

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _read(self, request: Request, schema: type[Body]) -> Body:
        """Authorize, then read at most max_body_bytes and validate; errors name the field."""
        self._authorize(request)
        return schema.parse(await read_body(request.stream(), self.cfg.max_body_bytes))

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

    async def _prepare(self, body: SamplingRequest, served: ServedModel,
                       prompt: Prompt) -> tuple[list[list[int]], GenerationConfig, Constraint | None]:
        """The encoded prompts, the generation settings and the compiled constraint, after every limit check (400
        naming the field), before the request takes a slot."""
        try:
            encoded = self._encode(prompt)
            self.cfg.check_prompts(encoded)
            cfg = body.generation_config(self.cfg.max_new_tokens, served.engine.context - max(map(len, encoded)))
            self.cfg.check_generation(encoded, cfg)
            spec = body.constraint_spec()
            constraint = None if spec is None else await self._compile(spec, served.engine)
            served.engine.check(encoded, cfg, constraint)
        except RequestError as e:
            raise body.refusal(e) from None
        return encoded, cfg, constraint

    async def _compile(self, spec: ConstraintSpec, engine: BatchEngine) -> Constraint:
        """The constraint compiled for `engine`'s model in a thread, so that a slow compile stalls no other request;
        a bad spec or a compile past `grammar_compile_timeout_s` is a 400 naming the request field it came from."""
        try:
            return await asyncio.to_thread(compile_constraint, spec.kind, spec.spec, self.tokenizer, engine.rows,
                                           self.cfg.grammar_compile_timeout_s)
        except RequestError as e:
            raise ApiError(400, f"{spec.field}: {e.detail}", spec.field) from None

    def _chat_prompt(self, body: ChatCompletionRequest, name: str, served: ServedModel) -> str:
        """The conversation rendered by the request's template, else by the model's."""
        template = body.chat_template or served.chat_template
        if template is None:
            raise ApiError(400, f"chat_template: model {name!r} has none. {NO_CHAT_TEMPLATE}", "chat_template")
        try:
            return render_chat(template, body.conversation(), **body.template_options())
        except RequestError as e:
            raise body.refusal(e) from None
        except ChatTemplateError as e:  # a request's template that does not compile, or messages a template refuses
            param = "chat_template" if body.chat_template else "messages"
            raise ApiError(400, f"{param}: {e}", param) from None

    async def _respond(self, served: ServedModel, encoded: list[list[int]], cfg: GenerationConfig,
                       constraint: Constraint | None, streamed: bool,
                       responses: Responses) -> dict[str, Any] | StreamingResponse:
        """Generate, then answer in `responses`' shape: whole, or as server-sent events while it generates."""
        events = served.engine.generate(encoded, cfg, self.cfg.request_timeout_s, served.adapter, constraint)
        transcript = Transcript(encoded, cfg.num_return_sequences)
        if not streamed:
            return responses.whole(await collect(events, transcript))
        return StreamingResponse(stream(events, transcript, self.cfg.stream_interval_s, responses),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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

    async def drain(self) -> int:
        """`rugpt-ray serve` stopping: from now on new requests get 503; returns the requests still in flight."""
        StopGate.draining = True
        return StopGate.in_flight

    async def in_flight(self) -> int:
        return StopGate.in_flight

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self) -> dict[str, Any]:
        """The API's document (openapi.py), open like /healthz: it holds no key and no model."""
        return self.openapi

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        """Swagger UI over /openapi.json; "Authorize" takes the key when the server has one."""
        return get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json",
                                   title=f"{app.title} API")

    @app.get("/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Batching counters of the bases loaded in the replica that answers (see `EngineStats`), with the
        adapters it keeps on each, and the torch threads it decodes on."""
        self._authorize(request)
        return {"models": {name: {**engine.stats.as_dict(), "adapters": engine.kept_adapters}
                           for name, engine in list(self.engines.items())},
                "torch_threads": torch.get_num_threads()}

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
        name, served = await self._served(body.model)
        encoded, cfg, constraint = await self._prepare(body, served, body.prompt)
        choices = Choices(self.tokenizer, encoded, cfg.num_return_sequences, body.echo, body.logprobs)
        responses = GenerateResponses(name, choices, body.num_return_sequences)
        return await self._respond(served, encoded, cfg, constraint, body.stream, responses)

    @app.post("/v1/completions", response_model=None)
    async def completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        body: CompletionRequest = await self._read(request, CompletionRequest)
        name, served = await self._served(body.model)
        encoded, cfg, constraint = await self._prepare(body, served, body.prompt)
        choices = Choices(self.tokenizer, encoded, cfg.num_return_sequences, body.echo, body.logprobs)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        responses = CompletionResponses(name, choices, body.n, include_usage)
        return await self._respond(served, encoded, cfg, constraint, body.stream, responses)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        body: ChatCompletionRequest = await self._read(request, ChatCompletionRequest)
        name, served = await self._served(body.model)
        encoded, cfg, constraint = await self._prepare(body, served, self._chat_prompt(body, name, served))
        choices = ChatChoices(self.tokenizer, encoded[0], body.n, body.alternatives)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        responses = ChatResponses(name, choices, body.n, body.echoed, include_usage)
        return await self._respond(served, encoded, cfg, constraint, body.stream, responses)
