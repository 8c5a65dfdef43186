"""What the Serve app builder takes: `ServeConfig` is the `args:` block of a Serve config YAML (or the CLI's flags)."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rugpt_ray.chat import BUILTIN_FOLDER, chat_template_source
from rugpt_ray.config import DTYPES, close_matches
from rugpt_ray.errors import UserError
from rugpt_ray.generation_config import GenerationConfig, RequestError
from rugpt_ray.serving.protocol import MAX_TOP_LOGPROBS
from rugpt_ray.storage import is_uri

_COMPARISONS = (("greater than or equal to", ">="), ("less than or equal to", "<="), ("greater than", ">"),
                ("less than", "<"))
_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


class ModelSpec(BaseModel):
    """A served model: its checkpoint, and the chat template to use when the checkpoint has none of its own."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str = Field(min_length=1)
    """Checkpoint folder/file or HF hub id. It may use `${VAR}` / `${VAR:-default}` and a glob (its newest match is
    taken: the demo writes `runs/demo-<time>/model`); both are resolved where the app is built."""
    chat_template: str | None = Field(None, min_length=1)
    """For `/v1/chat/completions` when the checkpoint has no `chat_template.jinja`: a built-in template's name
    (`rugpt3-chat`) or a .jinja file. A request's own `chat_template` wins over both."""


class AdapterSpec(BaseModel):
    """A LoRA adapter served under its own name on one of the served models."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str
    """The adapter: its folder, a step_* checkpoint of a LoRA run, or the run folder (its newest checkpoint);
    `${VAR:-default}` and globs work as for models."""
    base: str | None = None
    """The served model (a name in `models`) it runs on; the first model when not given. Its weights must be the
    ones the adapter was trained on (checked by fingerprint when the adapter is loaded)."""


class ServeConfig(BaseModel):
    """Models, tokenizer, limits and access control of one rugpt-ray Serve application."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    models: dict[str, ModelSpec] = Field(min_length=1)
    """Served name -> checkpoint (`path`, see `ModelSpec`), or `{path, chat_template}`; the first is the default
    when a request names none."""
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)
    """Served name -> LoRA adapter on one of `models`: `{path: runs/lora-support, base: large}`. Requests name an
    adapter in `model` like any model; adapters of one base share its weights and its decode steps."""
    tokenizer: str
    """Tokenizer folder (vocab.json + merges.txt) or hub id, shared by every model; `${VAR:-default}` works."""
    device: str = "cpu"
    """Torch device of the models in a replica ("cuda" on GPU replicas)."""
    dtype: Literal[DTYPES] = "float32"
    """Weight dtype of the models: a float dtype, or int8 (weight-only, CPU; see `rugpt_ray.quantization`)."""
    max_new_tokens: int = Field(256, ge=1)
    """Most tokens one request may ask for per sequence (max_new_tokens / max_tokens)."""
    max_prompt_tokens: int = Field(1024, ge=1)
    """Longest prompt accepted, in tokens; prompt + max_new_tokens must also fit the model's positions."""
    max_n: int = Field(4, ge=1)
    """Most sequences per prompt (num_return_sequences / n)."""
    max_batch_size: int = Field(32, ge=1)
    """Most sequences decoded together per model; requests beyond it wait for rows to free up."""
    max_models_per_replica: int = Field(2, ge=1)
    """Served names (models and adapters) kept loaded per replica; the least recently used one is unloaded
    beyond this. A base stays loaded while an adapter on it is."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests a replica works on at once (decoding or waiting for a batch slot); the same setting in a Serve
    config's `deployments:` entry wins."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests queued in front of busy replicas; more are refused with 503 (-1: no limit); the same setting in
    a Serve config's `deployments:` entry wins."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A generation still running after this long is stopped: 504, or an error event when streaming."""
    stream_interval_s: float = Field(0.0, ge=0)
    """Streamed chunks go out at most this often; tokens in between are merged into one chunk (the first one and
    the end are never held). 0 = a chunk per token. Each chunk costs Serve a message, so some tens of ms save
    much CPU when many fast streams share a small machine."""
    grammar_compile_timeout_s: float = Field(5.0, gt=0)
    """Seconds a request's structured output (a JSON schema, regex, choice or grammar) may take to compile to a
    grammar, in a thread off the event loop and before the request queues; past it the request is a 400 naming the
    field. Typical schemas compile in milliseconds. The compile goes on in the background into the cache, its work
    bounded by llguidance's limits. The default is `rugpt_ray.constraints.COMPILE_TIME_LIMIT`."""
    max_body_bytes: int = Field(1 << 20, ge=1)
    """Largest request body accepted (413 beyond)."""
    max_prompts: int = Field(32, ge=1)
    """Most prompts in one completion request (a list of texts or of token id lists); 400 naming `prompt` beyond."""
    max_stop_strings: int = Field(8, ge=0)
    """Most stop strings in one request (`stop`); 400 naming it beyond."""
    max_stop_chars: int = Field(256, ge=1)
    """Longest stop string, in characters; 400 naming `stop` beyond."""
    max_logit_bias: int = Field(300, ge=0)
    """Most `logit_bias` entries in one request (OpenAI's limit); 400 naming it beyond."""
    max_top_logprobs: int = Field(MAX_TOP_LOGPROBS, ge=0, le=MAX_TOP_LOGPROBS)
    """Most alternatives per token (`logprobs` of completions, `top_logprobs` of chats); 400 naming the field
    beyond. Past the API's own limit of 20 a request is a 422."""
    max_total_tokens: int = Field(1 << 16, ge=1)
    """Most tokens one request may make the engine hold: the sum over its prompts of rows per prompt (n, or
    best_of) x (prompt tokens + max new tokens); 400 naming the length field beyond."""
    api_key_env: str | None = None
    """Name of an environment variable holding the API key; when set, every endpoint but /healthz, /openapi.json
    and /docs needs `Authorization: Bearer <key>`. The key is read in the replica and never travels in the
    config."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins (`https://app.example.com`, or `*`) whose browser pages may call the API; none by default (CORS
    off)."""
    retry_after_s: int = Field(1, ge=0)
    """`Retry-After` (seconds) of a 503: queues full, or the server stopping."""
    shutdown_grace_s: float = Field(30.0, gt=0)
    """On SIGTERM or Ctrl-C, `rugpt-ray serve` answers new requests 503 and waits this long at most for the ones in
    flight to finish, then stops."""
    ingress: Literal["router", "direct"] = "router"
    """What takes HTTP requests: `router`, a `RuGPTRouter` in front of the server replicas (it routes each request
    to a replica holding its model, and when a replica dies it retries a request that has sent nothing yet and ends
    a started stream with an error event); or `direct`, the model server replica itself, one actor hop less per
    request and per streamed chunk (8-17 % more tokens/s for one client and 20-32 % for 16 here: README,
    Performance), for one replica: a replica lost mid-stream is then cut by Serve's proxy without an
    error event (ray#47219), and requests are not routed by model."""

    @field_validator("models", mode="before")
    @classmethod
    def _paths_are_specs(cls, models: Any) -> Any:
        """`name: path` is `name: {path: path}`."""
        if isinstance(models, dict):
            return {name: {"path": spec} if isinstance(spec, str) else spec for name, spec in models.items()}
        return models

    @field_validator("models")
    @classmethod
    def _names(cls, models: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if "" in models:
            raise ValueError("model names must be non-empty")
        return models

    @model_validator(mode="after")
    def _int8_on_cpu(self) -> ServeConfig:
        if self.dtype == "int8" and self.device != "cpu":
            raise ValueError(f"dtype int8 runs on the CPU only; device is {self.device!r}")
        return self

    @model_validator(mode="after")
    def _adapter_bases(self) -> ServeConfig:
        for name, spec in self.adapters.items():
            if name in self.models:
                raise ValueError(f"adapter {name!r}: the name is already a model's")
            if spec.base is None:
                spec.base = self.default_model
            elif spec.base not in self.models:
                raise ValueError(f"adapter {name!r}: base {spec.base!r} is not in models ({', '.join(self.models)})")
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "serve config") -> ServeConfig:
        """Checked like every other config: one line `WHERE: KEY must be ..., got VALUE` (pydantic checks)."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise UserError(f"{where}: unknown keys {unknown}{close_matches(unknown, cls.model_fields)}")
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            error = e.errors()[0]
            rule = error["msg"].replace("Input should be", "must be").replace("Value error, ", "")
            for words, sign in _COMPARISONS:
                rule = rule.replace(words, sign)
            if not error["loc"]:  # a rule across fields: its message names them
                raise UserError(f"{where}: {rule}") from None
            raise UserError(f"{where}: {'.'.join(map(str, error['loc']))} {rule}, got {error['input']!r}") from None

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    def check_prompts(self, prompts: list[list[int]]) -> None:
        """Refuse (`RequestError` naming `prompt`) more prompts, or a longer one, than the server takes."""
        if len(prompts) > self.max_prompts:
            raise RequestError("prompt", f"{len(prompts)} prompts; the limit is {self.max_prompts}")
        for i, ids in enumerate(prompts):
            if len(ids) > self.max_prompt_tokens:
                raise RequestError("prompt", f"prompt {i} has {len(ids)} tokens; the limit is "
                                             f"{self.max_prompt_tokens}")

    def check_generation(self, prompts: list[list[int]], gen: GenerationConfig) -> None:
        """Refuse (`RequestError` naming `GenerationConfig`'s field) settings past the server's limits, as TGI
        caps every request parameter: a request's size is bounded before it takes a slot."""
        if gen.max_new_tokens > self.max_new_tokens:
            raise RequestError("max_new_tokens", f"{gen.max_new_tokens} is over the limit of {self.max_new_tokens}")
        if gen.num_return_sequences > self.max_n:
            raise RequestError("num_return_sequences", f"{gen.num_return_sequences} is over the limit of "
                                                       f"{self.max_n}")
        if len(gen.stop) > self.max_stop_strings:
            raise RequestError("stop", f"{len(gen.stop)} stop strings; the limit is {self.max_stop_strings}")
        long = next((i for i, stop in enumerate(gen.stop) if len(stop) > self.max_stop_chars), None)
        if long is not None:
            raise RequestError("stop", f"stop string {long} has {len(gen.stop[long])} characters; the limit is "
                                       f"{self.max_stop_chars}")
        if len(gen.logit_bias) > self.max_logit_bias:
            raise RequestError("logit_bias", f"{len(gen.logit_bias)} entries; the limit is {self.max_logit_bias}")
        alternatives = max(gen.logprobs or 0, gen.prompt_logprobs or 0)
        if alternatives > self.max_top_logprobs:
            raise RequestError("logprobs", f"{alternatives} alternatives per token; the limit is "
                                           f"{self.max_top_logprobs}")
        total = sum(gen.num_return_sequences * (len(ids) + gen.max_new_tokens) for ids in prompts)
        if total > self.max_total_tokens:
            raise RequestError("max_new_tokens", f"the request holds {total} tokens (prompts x "
                                                 f"{gen.num_return_sequences} rows x (prompt + "
                                                 f"{gen.max_new_tokens} new)); the limit is {self.max_total_tokens}")

    def resolved(self) -> ServeConfig:
        """A copy whose paths are expanded and checked, so every replica loads the same files."""
        models = {name: ModelSpec(path=resolve_path(f"model {name}", spec.path),
                                  chat_template=spec.chat_template and resolve_chat_template(f"model {name}",
                                                                                             spec.chat_template))
                  for name, spec in self.models.items()}
        adapters = {name: spec.model_copy(update={"path": resolve_path(f"adapter {name}", spec.path)})
                    for name, spec in self.adapters.items()}
        return self.model_copy(update={"models": models, "adapters": adapters,
                                       "tokenizer": resolve_path("tokenizer", self.tokenizer)})


def resolve_path(what: str, value: str) -> str:
    """`${VAR:-default}` expanded, a glob replaced by its newest match, a local path made absolute.

    Anything that is not a local path must look like a hub id ('org/name').
    """
    expanded = _ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if glob.has_magic(expanded):
        matches = sorted(glob.glob(os.path.expanduser(expanded)), key=os.path.getmtime)
        if not matches:
            raise UserError(f"{what}: nothing matches {expanded!r} (from {value!r}; run `make demo` or set "
                            f"the variable it names)")
        expanded = matches[-1]
    if is_uri(expanded):
        return expanded  # object storage (s3://...): the replica's load_model fetches it
    path = Path(expanded).expanduser()
    if path.exists():
        return str(path.resolve())
    if expanded.count("/") == 1 and not expanded.startswith((".", "/", "~")):
        return expanded  # an HF hub id, fetched by the replica
    raise UserError(f"{what}: {expanded!r} is neither a local path nor a hub id like 'org/name'")


def resolve_chat_template(what: str, spec: str) -> str:
    """A built-in template's name as it is, a template file as an absolute path; either checked to compile."""
    try:
        chat_template_source(spec)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    if "/" not in spec and (BUILTIN_FOLDER / f"{spec}.jinja").is_file():
        return spec
    return str(Path(spec).expanduser().resolve())
