"""Structured outputs: a grammar compiled once per (kind, spec, tokenizer, vocabulary rows), and one matcher per row.

A `Constraint` is what a request asks its output to be, compiled by llguidance against our tokenizer's token table:

- `json`: a JSON schema (a dict, or its JSON text), with JSON Schema's defaults: an object may have properties
  beyond the schema's unless it says `additionalProperties: false` (as OpenAI's strict schemas do).
- `json_object`: any JSON object (OpenAI's `json_object` mode; the spec is None).
- `regex`: the whole output matches the regex (Rust `regex` syntax).
- `choice`: the output is one of a list of strings.
- `grammar`: a context-free grammar, in Lark or GBNF (llama.cpp's EBNF) syntax.

The kinds are the keys of vLLM's `structured_outputs`, so a request field maps straight onto `compile_constraint`.
Runs of whitespace between JSON tokens are capped at `MAX_WHITESPACE` characters, so that a weak model cannot loop on
spaces until `max_new_tokens` (vLLM PR #12744); regex, choice and grammar outputs have exactly the whitespace their
spec allows.

The token table gives llguidance every token's bytes (`RuGPTTokenizer.token_bytes`) for the model's row count (50257
or 50264). The five special tokens are entered as special (llguidance's `\\xff`-prefixed names), which no grammar text
matches, and the rows past the tokenizer's vocabulary as nothing: so `<pad>`, `<s>`, `<unk>`, `<mask>` and the
padding rows are never allowed, and EOS (`</s>`) is allowed exactly when the grammar is complete.

`compile_constraint` is thread-safe and blocks: the serving engine runs it in a thread, off its event loop. Each
compile runs in a small pool; the caller waits at most `time_limit` seconds, past which it gets a `RequestError`
while the compile finishes in the background into the cache, its work bounded by llguidance's parser limits
(lexer fuel, grammar size). Compiled grammars, and the errors of bad specs, are cached (least recently used, at most
`CACHE_ENTRIES`), so a request repeating a spec pays nothing.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import llguidance
import numpy as np
import torch
from torch import Tensor

from rugpt_ray.generation_config import RequestError
from rugpt_ray.tokenizer import SPECIAL_TOKENS, RuGPTTokenizer

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_WHITESPACE = 8
"""Characters of whitespace allowed between two JSON tokens (enough for a newline and three levels of 2-space
indent)."""
COMPILE_TIME_LIMIT = 5.0
"""Seconds a request waits for its grammar by default (typical schemas compile in about a millisecond)."""
FEW_ALLOWED = 1 / 8
"""A constrained row that allows at most this share of the vocabulary draws among its allowed ids alone
(`allowed_tokens`); one that allows more has its logits masked (`mask_logits`)."""
CACHE_ENTRIES = 512
"""Compiled grammars kept (about 100 KiB each for the test schemas: benchmarks/structured_cpu.py)."""


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar, shared by every row that follows it; `matcher()` starts one row."""

    kind: str
    spec: str
    tokenizer_fingerprint: str
    vocab_rows: int
    _initial: llguidance.LLMatcher

    def matcher(self) -> Matcher:
        return Matcher(self._initial.deep_copy())


class Matcher:
    """Where one row stands in its grammar: which tokens may come next, and the tokens it took."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def fill(self, bitmask_row: np.ndarray) -> None:
        """Write the allowed next tokens into a C-contiguous uint32 row of `ceil(V / 32)` words (bit j of word w is
        token 32 w + j).

        Through the pointer, as `llguidance.torch.fill_next_token_bitmask` does: importing that module costs 3.6 s
        (it compiles its apply function with torch.compile, which we do not use)."""
        self._matcher.unsafe_compute_mask_ptr(bitmask_row.ctypes.data, bitmask_row.nbytes)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):  # only allowed tokens are ever drawn
            raise RuntimeError(f"grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def must_end(self) -> bool:
        """The grammar is complete and allows nothing but EOS."""
        return self._matcher.is_stopped()


def blocked_tokens(bitmask: np.ndarray, vocab_rows: int) -> Tensor:
    """The (n, vocab_rows) bool mask of the tokens a uint32 (n, ceil(vocab_rows / 32)) bitmask does not allow (the
    words' bytes in little-endian order, as on x86 and ARM)."""
    bits = np.unpackbits((~bitmask).view(np.uint8), axis=1, count=vocab_rows, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)


def allowed_tokens(bitmask: np.ndarray) -> list[np.ndarray]:
    """The ids (int64, ascending) each row of a uint32 bitmask allows: the set bits of its nonzero words only."""
    rows, words = bitmask.shape
    if not rows:
        return []
    flat = bitmask.reshape(-1)
    nonzero = np.flatnonzero(flat != 0)
    word, bit = np.nonzero(np.unpackbits(flat[nonzero].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little"))
    row, ids = np.divmod(nonzero[word] * 32 + bit, words * 32)
    return np.split(ids, np.searchsorted(row, np.arange(1, rows)))


def mask_logits(logits: np.ndarray, rows: list[int], bitmask: np.ndarray) -> None:
    """Set to -inf, in place, every logit of row `rows[j]` of (B, V) `logits` that row j of the bitmask does not
    allow."""
    blocked = blocked_tokens(bitmask, logits.shape[1]).numpy()
    for j, row in enumerate(rows):
        np.copyto(logits[row], -np.inf, where=blocked[j])


def compile_constraint(kind: str, spec: object, tokenizer: RuGPTTokenizer, vocab_rows: int,
                       time_limit: float = COMPILE_TIME_LIMIT) -> Constraint:
    """The constraint `kind` with `spec` for a model of `vocab_rows` rows, compiled once and cached; thread-safe.

    Raises `RequestError(kind, reason)` for a bad spec (invalid or unsupported schema, bad regex or grammar) and
    for a compile still running after `time_limit` seconds.
    """
    text = _spec_text(kind, spec)
    key = (kind, text, tokenizer.fingerprint, vocab_rows)
    with _lock:
        future = _cache.get(key)
        if future is None:
            future = _pool.submit(_compile, kind, text, tokenizer, vocab_rows)
            _cache[key] = future
            if len(_cache) > CACHE_ENTRIES:
                _cache.popitem(last=False)
        _cache.move_to_end(key)
    try:
        return future.result(timeout=time_limit)
    except FutureTimeout:
        raise RequestError(kind, f"the grammar did not compile within the time limit ({time_limit:g} s)") from None


_lock = threading.Lock()
_cache: OrderedDict[tuple, Future] = OrderedDict()
_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")


def _spec_text(kind: str, spec: object) -> str:
    """The spec as the text llguidance compiles (and the cache keys on); a malformed spec is a RequestError."""
    if kind not in KINDS:
        raise RequestError(None, f"unknown structured output kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "json_object":
        if spec is not None:
            raise RequestError(kind, "takes no spec")
        return json.dumps({"type": "object"})
    if kind == "json":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise RequestError(kind, f"the schema is not valid JSON: {e}") from None
        if not isinstance(spec, dict):
            raise RequestError(kind, f"the schema must be a JSON object, got {type(spec).__name__}")
        return json.dumps(spec, ensure_ascii=False)
    if kind == "choice":
        if not isinstance(spec, list | tuple) or not spec or not all(isinstance(s, str) and s for s in spec):
            raise RequestError(kind, f"must be a non-empty list of non-empty strings, got {spec!r}")
        return json.dumps(list(spec), ensure_ascii=False)
    if not isinstance(spec, str) or not spec:
        raise RequestError(kind, f"must be a non-empty string, got {spec!r}")
    return spec


def _compile(kind: str, text: str, tokenizer: RuGPTTokenizer, vocab_rows: int) -> Constraint:
    if kind in ("json", "json_object"):
        options = {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE}}}"}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=options)
    else:
        try:
            grammar = llguidance.grammar_from(kind, text)
        except ValueError as e:  # a grammar that is neither Lark nor GBNF
            raise RequestError(kind, str(e)) from None
    matcher = llguidance.LLMatcher(token_table(tokenizer, vocab_rows), grammar, log_level=0)
    if matcher.is_error():
        raise RequestError(kind, matcher.get_error().strip())
    return Constraint(kind, text, tokenizer.fingerprint, vocab_rows, matcher)


@functools.cache
def token_table(tokenizer: RuGPTTokenizer, vocab_rows: int) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer for a model of `vocab_rows` rows (rows past the vocabulary are padding)."""
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Tokens(tokenizer)), n_vocab=vocab_rows)


class _Tokens:
    """The tokenizer as llguidance's `TokenizerWrapper` reads one: bytes per id, special ids, EOS, and encoding."""

    def __init__(self, tokenizer: RuGPTTokenizer):
        special = {tokenizer.token_to_id(name): name for name in SPECIAL_TOKENS}
        self.tokens = [b"\xff" + special[i].encode() if i in special else tokenizer.token_bytes(i)
                       for i in range(len(tokenizer))]
        self.special_token_ids = sorted(special)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self._encode(text))

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one instance per tokenizer, kept by token_table's cache)
    def _encode(self, text: str) -> tuple[int, ...]:
        """llguidance tokenizes the text a grammar forces next while it fills masks (a key's rest: 'ame"'), the same
        few strings over and over: 20 us each through the tokenizer."""
        return tuple(self._tokenizer.encode(text))
