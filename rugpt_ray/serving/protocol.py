"""The serving API's requests and errors, apart from the server: no torch, Ray or FastAPI, so they are tested alone.

Each generating request converts itself to a `GenerationConfig` and takes its fields' ranges from it (widened or
narrowed only where the API's differ), so a value the decoder would refuse is a 422 naming the field, never a 500.
Its structured-output fields (OpenAI's `response_format`, vLLM's `structured_outputs`) become one `ConstraintSpec`,
the (kind, spec) pair that `constraints.compile_constraint` takes: the server compiles it, off its event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator
from starlette.responses import JSONResponse

from rugpt_ray.chat import ROLES
from rugpt_ray.config import close_matches
from rugpt_ray.generation_config import MAX_LOGIT_BIAS, GenerationConfig, RequestError

NonEmpty = Annotated[str, Field(min_length=1)]
Prompt = str | list[str] | list[int] | list[list[int]]
PROMPT_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                           {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                           {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                           {"type": "array", "minItems": 1,
                            "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}}]}
"""`Prompt` with the rule of `PromptedRequest._not_empty`, for the OpenAPI document."""
TOKEN_ID_KEYS = {"pattern": "^-?[0-9]+$"}
"""`logit_bias` keys: token ids as JSON object keys, for the OpenAPI document."""
DEFAULT_MAX_NEW_TOKENS = 64
"""`/generate`'s max_new_tokens when a request gives none (the server's limit when that is lower)."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives per token a request may ask for (OpenAI's limit)."""
GREEDY_BELOW = 1e-5
"""A temperature below this decodes greedily, as in vLLM (its _SAMPLING_EPS): dividing float32 logits by a tinier
one overflows them to infinities, whose softmax is NaN."""
MIN_REPETITION_PENALTY = 0.01
"""The smallest repetition_penalty taken: a tinier one overflows a seen token's logit to infinity (Schemathesis
sent 5e-324; the NaNs then let a grammar-masked token be drawn: a 500)."""
"""Most alternatives per token a request may ask for (OpenAI's limit)."""
ONE_KIND = "You can only use one kind of structured outputs constraint but multiple are specified"
"""vLLM's words for a request with more than one constraint."""


class ApiError(Exception):
    """An HTTP error in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


async def read_body(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A request body, refused with 413 as soon as it passes `limit` bytes."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body: larger than the limit of {limit} bytes", "body")
    return bytes(body)


def ranged(field: str, default: Any = None, **api_range: float) -> Any:
    """A request field with the range of `GenerationConfig`'s `field`; `api_range` (ge, gt, le) replaces a bound
    where the API's differs."""
    (rule,) = (f.metadata for f in dataclasses.fields(GenerationConfig) if f.name == field)
    bounds = {key: value for key, value in {**rule, **api_range}.items() if key in ("ge", "gt", "le")}
    return Field(default, **bounds)


class Body(BaseModel):
    """A request body: unknown fields are refused, types are strict, and `null` means the field's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, body: Any) -> Any:
        """`null` is the field's default; a whole number written as a float (`2.0`) is that integer, as JSON
        Schema counts it (integer fields are strict otherwise: "2" stays a type error)."""
        if not isinstance(body, dict):
            return body
        return {k: _whole_numbers(v) for k, v in body.items() if v is not None}

    @classmethod
    def parse(cls, body: bytes) -> Body:
        """The request from JSON: 400 for bad JSON or an unknown field, 422 for a wrong type or range; the message
        and `param` name the field."""
        try:
            return cls.model_validate_json(body)
        except ValidationError as e:
            errors = e.errors()
        if errors[0]["type"] == "json_invalid":
            raise ApiError(400, f"body: {errors[0]['msg']}", "body")
        unknown = next((err["loc"] for err in errors if err["type"] == "extra_forbidden"), None)
        if unknown:  # a field we do not know (at the top, or inside an object such as stream_options)
            param, inner = str(unknown[0]), ".".join(map(str, unknown[1:]))
            what = (f"has no field {inner!r}" if inner else
                    f"not a field of this endpoint{close_matches([param], cls.model_fields)}")
            raise ApiError(400, f"{param}: {what}", param)
        if not errors[0]["loc"]:
            raise ApiError(422, f"body: {errors[0]['msg']}", "body")
        param = str(errors[0]["loc"][0])
        nested = cls._holds_objects(param)
        messages = dict.fromkeys(f"{'.'.join(map(str, err['loc'][1:]))}: {err['msg']}" if nested and err["loc"][1:]
                                 else err["msg"] for err in errors if err["loc"] and err["loc"][0] == param)
        raise ApiError(422, f"{param}: {'; '.join(messages)}", param)

    @classmethod
    def _holds_objects(cls, name: str) -> bool:
        """Whether field `name` holds request objects (`response_format`, `messages`): its errors then say where
        inside it they are."""
        field = cls.model_fields.get(name)
        kinds = (field.annotation, *get_args(field.annotation)) if field else ()
        return any(isinstance(kind, type) and issubclass(kind, Body) for kind in kinds)


def _whole_numbers(value: Any) -> Any:
    """`value` with each float that is a whole number, alone or in (nested) lists, made an int; a float field takes
    it back as the same float."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return [_whole_numbers(v) for v in value] if isinstance(value, list) else value


class StreamOptions(Body):
    include_usage: bool = False


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request's output must follow, as `constraints.compile_constraint` takes it (`kind`, `spec`), and the
    request field it came from, which a refusal names (`response_format`, `structured_outputs.regex`)."""

    kind: str
    spec: Any
    field: str


class JsonSchemaFormat(Body):
    """`response_format.json_schema`, as OpenAI's `parse` and LangChain send it. `strict` is accepted and changes
    nothing, as in vLLM: the output always follows the schema as written (a strict schema itself says
    `additionalProperties: false`)."""

    name: NonEmpty
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool = False


class ResponseFormat(Body):
    """OpenAI's `response_format`: free text, any JSON object, or JSON following a schema."""

    TYPES: ClassVar[tuple[str, ...]] = ("text", "json_object", "json_schema")

    type: str
    json_schema: JsonSchemaFormat | None = None

    def constraint_spec(self) -> ConstraintSpec | None:
        if self.type not in self.TYPES:
            raise RequestError("response_format", f"type {self.type!r} is not supported; one of "
                                                  f"{', '.join(map(repr, self.TYPES))}")
        if self.type != "json_schema":
            if self.json_schema is not None:
                raise RequestError("response_format", f"json_schema is for type 'json_schema', not {self.type!r}")
            return None if self.type == "text" else ConstraintSpec("json_object", None, "response_format")
        if self.json_schema is None:
            raise RequestError("response_format", "When response_format type is 'json_schema', the 'json_schema' "
                                                  "field must be provided.")
        return ConstraintSpec("json", self.json_schema.schema_, "response_format")


class StructuredOutputs(Body):
    """vLLM's `structured_outputs`: exactly one of `json` (a JSON schema, or its text), `regex`, `choice`, `grammar`
    (Lark or GBNF) and `json_object: true`. vLLM's other keys are refused by name unless they say what this server
    does anyway (null, or false): whitespace between JSON tokens is capped by the server, and a schema's own
    `additionalProperties` holds."""

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("disable_any_whitespace", "disable_additional_properties",
                                              "whitespace_pattern", "structural_tag")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: Any = None

    def constraint_spec(self) -> ConstraintSpec:
        refused = next((name for name in self.UNSUPPORTED if getattr(self, name) not in (None, False)), None)
        if refused:
            raise RequestError(f"structured_outputs.{refused}", "not supported by this server")
        given = {kind: spec for kind, spec in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                               ("grammar", self.grammar)) if spec is not None}
        if self.json_object:
            given["json_object"] = None
        if len(given) != 1:
            raise RequestError("structured_outputs", f"{ONE_KIND}: {', '.join(given)}" if given else
                               "You must use one kind of structured outputs constraint but none are specified "
                               "(json, regex, choice, grammar or json_object)")
        ((kind, spec),) = given.items()
        return ConstraintSpec(kind, spec, f"structured_outputs.{kind}")


class SamplingRequest(Body):
    """What every generating endpoint takes besides its input and its length: `GenerationConfig`'s sampling and
    stopping fields (OpenAI's and vLLM's names are the same), and what the output must follow (`response_format`,
    `structured_outputs`)."""

    API_NAMES: ClassVar[dict[str, str]] = {}
    """`GenerationConfig`'s field -> this endpoint's name for it, where they differ."""

    model: str | None = None
    temperature: float = ranged("temperature", 1.0)
    top_k: int = ranged("top_k", 0, ge=-1)  # vLLM's -1 and 0 both mean all tokens
    top_p: float = ranged("top_p", 1.0)
    repetition_penalty: float = ranged("repetition_penalty", 1.0, ge=MIN_REPETITION_PENALTY)
    presence_penalty: float = ranged("presence_penalty", 0.0)
    frequency_penalty: float = ranged("frequency_penalty", 0.0)
    logit_bias: dict[Annotated[int, Field(strict=False)],
                     Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] = Field(
        default_factory=dict, json_schema_extra={"propertyNames": TOKEN_ID_KEYS})  # "50256" is id 50256
    stop: NonEmpty | list[NonEmpty] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    stream: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def param(self, field: str | None) -> str | None:
        """This endpoint's name for `GenerationConfig`'s `field` (errors name what the client sent)."""
        return self.API_NAMES.get(field, field)

    def refusal(self, error: RequestError) -> ApiError:
        """The 400 for a request that could never run, naming the field as this endpoint does."""
        param = self.param(error.param)
        return ApiError(400, f"{param}: {error.detail}", param)

    def constraint_spec(self) -> ConstraintSpec | None:
        """What the output must follow (`response_format`'s or `structured_outputs`'), or None; `RequestError` for
        more than one constraint or an option this server does not have."""
        formatted = self.response_format.constraint_spec() if self.response_format else None
        structured = self.structured_outputs.constraint_spec() if self.structured_outputs else None
        if formatted and structured:
            raise RequestError("structured_outputs", f"{ONE_KIND}: response_format ({formatted.kind}) and "
                                                     f"{structured.field}")
        return formatted or structured

    def generation_config(self, limit: int, room: int) -> GenerationConfig:
        """The decoder's settings: `RequestError` (GenerationConfig's field names) for a request that could never
        run. `limit` is the server's most new tokens, `room` the model's positions left after the longest prompt:
        what a request that gives no length generates."""
        raise NotImplementedError

    def _config(self, **fields: Any) -> GenerationConfig:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature = self.temperature if self.temperature >= GREEDY_BELOW else 0.0
        return GenerationConfig(temperature=temperature, top_k=max(self.top_k, 0), top_p=self.top_p,
                                repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                                frequency_penalty=self.frequency_penalty, logit_bias=dict(self.logit_bias),
                                stop=stop, stop_token_ids=list(self.stop_token_ids),
                                include_stop_str_in_output=self.include_stop_str_in_output,
                                ignore_eos=self.ignore_eos, seed=self.seed, **fields)


class PromptedRequest(SamplingRequest):
    """A text completion: prompts as text or token ids, OpenAI's `logprobs`, `echo` and `best_of`."""

    prompt: Annotated[Prompt, WithJsonSchema(PROMPT_SCHEMA)]
    logprobs: int | None = ranged("logprobs", le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = ranged("num_return_sequences")

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: Prompt) -> Prompt:
        if not prompt or (isinstance(prompt, list) and any(isinstance(p, str | list) and not p for p in prompt)):
            raise ValueError("must be a non-empty text or list of token ids, or a non-empty list of those")
        return prompt

    def param(self, field: str | None) -> str | None:
        if field == "num_return_sequences" and self.best_of is not None and self.best_of > self.sequences:
            return "best_of"  # the decoder's rows are best_of's
        return super().param(field)

    @property
    def sequences(self) -> int:
        """Sequences returned per prompt."""
        raise NotImplementedError

    def _prompted_config(self, max_new_tokens: int, min_new_tokens: int) -> GenerationConfig:
        """best_of's extra sequences are ranked by their log-probabilities, so they report them; a length of 0
        runs as prompt scoring."""
        n, rows = self.sequences, self.best_of or self.sequences
        if max_new_tokens == 0 and not self.echo:
            raise RequestError("max_new_tokens", "0 generates nothing; it is for scoring the prompt, with echo")
        if rows < n:
            raise RequestError("best_of", f"{self.best_of} is below n ({n})")
        if rows > n and self.stream:
            raise RequestError("best_of", f"{self.best_of} sequences ranked to return {n} cannot be streamed; "
                                          f"stream with best_of equal to n")
        logprobs = 0 if self.logprobs is None and rows > n else self.logprobs
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        if max_new_tokens == 0 and prompt_logprobs is None:
            prompt_logprobs = 0
        return self._config(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs, num_return_sequences=rows)


class GenerateRequest(PromptedRequest):
    """`POST /generate`: one prompt or a list, sampling settings as in `GenerationConfig`."""

    max_new_tokens: int | None = ranged("max_new_tokens")
    min_new_tokens: int = ranged("min_new_tokens", 0)
    num_return_sequences: int = ranged("num_return_sequences", 1)

    @property
    def sequences(self) -> int:
        return self.num_return_sequences

    def generation_config(self, limit: int, room: int) -> GenerationConfig:
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, limit) if self.max_new_tokens is None else self.max_new_tokens
        return self._prompted_config(max_new_tokens, self.min_new_tokens)


class CompletionRequest(PromptedRequest):
    """`POST /v1/completions` in OpenAI's shape, plus vLLM's extras (top_k, repetition_penalty, min_tokens,
    stop_token_ids, include_stop_str_in_output, ignore_eos)."""

    API_NAMES: ClassVar[dict[str, str]] = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                                           "num_return_sequences": "n"}

    max_tokens: int = ranged("max_new_tokens", 16)
    min_tokens: int = ranged("min_new_tokens", 0)
    n: int = ranged("num_return_sequences", 1)
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})  # refused when given: left to right only
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used

    @property
    def sequences(self) -> int:
        return self.n

    def generation_config(self, limit: int, room: int) -> GenerationConfig:
        if self.suffix:
            raise RequestError("suffix", "not supported (text is only completed left to right)")
        return self._prompted_config(self.max_tokens, self.min_tokens)


class ContentPart(Body):
    """A part of a message's content: only text parts are served (others are refused by name, not as unknown
    fields)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(Body):
    role: str = Field(json_schema_extra={"enum": list(ROLES)})  # checked by `conversation`: a 400 naming the message
    content: str | list[ContentPart]

    def text(self, index: int) -> str:
        """The content as one text, text parts joined by newlines as vLLM joins them; `index` is the message's."""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise RequestError("messages", f"message {index} has content of type {part.type!r}; only text "
                                               f"parts are supported")
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions` in OpenAI's shape, plus vLLM's extras: its sampling fields (as in completions),
    `add_generation_prompt`, `continue_final_message`, `echo`, `chat_template` (Jinja text) and
    `chat_template_kwargs`."""

    API_NAMES: ClassVar[dict[str, str]] = {"prompt": "messages", "min_new_tokens": "min_tokens",
                                           "num_return_sequences": "n", "logprobs": "top_logprobs"}
    RESERVED_TEMPLATE_KWARGS: ClassVar[tuple[str, ...]] = ("template", "messages")
    """Names `render_chat` takes itself: a template variable cannot have them."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = ranged("max_new_tokens")
    max_tokens: int | None = ranged("max_new_tokens")  # OpenAI's deprecated name; max_completion_tokens wins
    min_tokens: int = ranged("min_new_tokens", 0)
    n: int = ranged("num_return_sequences", 1)
    logprobs: bool = False
    top_logprobs: int | None = ranged("logprobs", le=MAX_TOP_LOGPROBS)
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    # refused when given (no function calling); the OpenAPI document says so
    tools: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})
    functions: list[Any] | None = Field(None, json_schema_extra={"maxItems": 0})

    def param(self, field: str | None) -> str | None:
        if field == "max_new_tokens":
            return "max_tokens" if self.max_completion_tokens is None and self.max_tokens is not None \
                else "max_completion_tokens"
        return super().param(field)

    def conversation(self) -> list[dict[str, str]]:
        """The messages as a template reads them; `RequestError` for what no template here can render."""
        for field in ("tools", "functions"):
            if getattr(self, field):
                raise RequestError(field, "not supported: this server does no function calling")
        if self.add_generation_prompt and self.continue_final_message:
            raise RequestError("continue_final_message", "cannot be true with add_generation_prompt (the default): "
                                                         "set add_generation_prompt to false to continue a message")
        for i, message in enumerate(self.messages):
            if message.role not in ROLES:
                raise RequestError("messages", f"message {i} has the unknown role {message.role!r} "
                                               f"(one of {', '.join(ROLES)})")
        return [{"role": message.role, "content": message.text(i)} for i, message in enumerate(self.messages)]

    def template_options(self) -> dict[str, Any]:
        """`render_chat`'s keywords: the flags, then `chat_template_kwargs` (which may override them, as in vLLM)."""
        reserved = [key for key in self.RESERVED_TEMPLATE_KWARGS if key in self.chat_template_kwargs]
        if reserved:
            raise RequestError("chat_template_kwargs", f"{reserved[0]!r} is reserved")
        return {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message, **self.chat_template_kwargs}

    @property
    def alternatives(self) -> int | None:
        """Likeliest tokens to report at each step, or None for no logprobs at all."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def echoed(self) -> str:
        """What `echo` puts before each answer: the last message when it is the assistant's (vLLM's rule)."""
        last = self.messages[-1]
        return last.text(len(self.messages) - 1) if self.echo and last.role == "assistant" else ""

    def generation_config(self, limit: int, room: int) -> GenerationConfig:
        """Without a length the answer may fill the server's limit or the model's context, whichever is less."""
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs", "needs logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options", "only with stream: true")
        if room <= 0:
            raise RequestError("prompt", "the conversation fills the model's context: there is no room to answer")
        max_new_tokens = next((n for n in (self.max_completion_tokens, self.max_tokens) if n is not None),
                              min(limit, room))
        if max_new_tokens == 0:
            raise RequestError("max_new_tokens", "0 generates nothing")
        return self._config(max_new_tokens=max_new_tokens, min_new_tokens=self.min_tokens,
                            logprobs=self.alternatives, num_return_sequences=self.n)


class TokenizeRequest(Body):
    """`POST /tokenize` in vLLM's shape; `add_special_tokens` changes nothing (ruGPT3 adds none)."""

    prompt: str
    model: str | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Body):
    """`POST /detokenize` in vLLM's shape."""

    tokens: list[int]
    model: str | None = None
