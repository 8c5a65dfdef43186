"""Text generation: one decoder over a slot KV cache for `stream`/`generate` and the serving engine.

A `Decoder` holds up to `slots` sequences ("rows"); rows join (`add`) and leave (finished, or `release`)
between steps, each with its own sampling settings, stop strings, seeded generator and token history. Its
KV cache is preallocated (slots x context): a row writes only its own slot at its own length, so joining or
leaving copies nothing of the other rows. `stream` runs one decoder over one batch of prompts; the engine
(serving/engine.py) keeps one per model and only queues, admits, times out and cancels requests around it.

Each step's logits go through the decoder's `processors` in order (vLLM's logits processors: batched, each touching
only the rows that ask for it): undecodable ids, the grammar mask of constrained rows, OpenAI's logit_bias, HF's
repetition penalty, OpenAI's presence/frequency penalties, `min_new_tokens`. Then temperature → top-k → top-p and
the draw, so the order is HF's and greedy output equals HF `generate` for dense models. Rows
are batched with per-row settings, and every random number comes from the row's own generator, so a row's
tokens do not depend on which rows share its batch. A uniform draw u maps to a token by inverse CDF in
token-id order: the first id whose running sum of kept probability exceeds u x the kept total. A top-k row
accumulates only its k candidates. A top-p row without top-k never sorts the vocabulary: it draws from the
whole tempered distribution and keeps the token when the tokens likelier than it hold less than top_p,
else draws again (rejection: exactly the top-p distribution, at most 1 / top_p draws on average); a row still
rejected after `TOP_P_REJECTIONS` draws (a tiny top_p on a flat distribution) draws once more from its nucleus,
sorted out (the same distribution, without a draw per vocabulary entry). Ids the
tokenizer cannot decode (the seed's padding rows 50257–50263) are never produced.

A row may run through a LoRA adapter of the decoder's base model (`add(..., adapter=(name, Adapter))`): the
adapter is added to the model under its name when a row first needs it and stays until `prune_adapters`;
rows of different adapters and of the base share every step, each LoRA layer grouping the rows by adapter.

A row may follow a grammar (`add(..., constraint=compile_constraint(kind, spec, tokenizer, rows))`: a JSON schema,
any JSON object, a regex, a choice or a Lark/GBNF grammar; see constraints.py): it draws only the tokens its grammar
allows next (among those alone when they are few: `GrammarMask`), and EOS only once the grammar is complete, so a
completed output ends with "stop" and one cut by `max_new_tokens` with "length" (the partial text is returned). A
grammar that allows nothing but EOS ends the row even before `min_new_tokens`: the grammar wins. Constrained and
unconstrained rows share every step.

A row ends at EOS (unless `ignore_eos`), at one of its `stop_token_ids` or stop strings (neither is kept in
the output unless `include_stop_str_in_output`), or after `max_new_tokens`; before `min_new_tokens` its ending
tokens are masked out and its stop strings are not looked for (vLLM's rules). Log-probabilities are always the
raw model's log-softmax over the decodable vocabulary, before every adjustment above, so scoring a text through
the decoder (`prompt_logprobs`, with `max_new_tokens=0` to score only) equals scoring the checkpoint directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rugpt_ray.constraints import FEW_ALLOWED, Constraint, Matcher, allowed_tokens, blocked_tokens, mask_logits
from rugpt_ray.errors import UserError
from rugpt_ray.generation_config import GenerationConfig, RequestError
from rugpt_ray.lora import NO_ADAPTER, Adapter, adapter_per_row, apply_adapter, remove_adapter
from rugpt_ray.model import GPT, Decoding, KVCache, Prefilling
from rugpt_ray.tokenizer import RuGPTTokenizer

BLOCK = 256
"""Inverse-CDF draws over a wide row first pick one of its blocks of this many columns by their sums."""
TOP_P_REJECTIONS = 32
"""Draws a top-p row rejects before it draws from its sorted nucleus (1 / top_p draws on average)."""


@dataclass
class TokenLogprob:
    """A token's raw log-probability and the `top` most likely (id, log-probability) pairs where it stands,
    most likely first; both None for a prompt's first token (nothing predicts it)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class TokenEvent:
    """One step of one sequence: `text` is the new printable text (may be empty while it is held back).

    `token_id` is the token this step added to the output, None when it added none (a sequence ends at EOS or
    a stop token that is not kept, or a `max_new_tokens=0` row was scored). With `GenerationConfig.logprobs`
    set, `logprob` is the sampled token's raw log-probability and `top_logprobs` the most likely (id,
    log-probability) pairs at this step, most likely first. A row's first event carries `prompt_logprobs`
    (one per prompt token) when `GenerationConfig.prompt_logprobs` is set.
    """

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None  # "stop" (EOS, a stop token or a stop string) or "length"
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    index: int
    prompt_index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    """One per token of `token_ids` (with `GenerationConfig.logprobs`)."""
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


# ------------------------------------------------------------------------------------------- logits processors


class LogitsProcessor:
    """One batched step between the model's logits and the draw; the decoder applies its list in order (as vLLM
    applies its logits processors).

    `apply` changes a step's (B, V) float logits in place, logits row i being `rows[i]`, and touches only the rows
    that ask for it; `accept` then sees the token each row drew, for a processor that keeps state per row.
    """

    def apply(self, logits: Tensor, rows: list[Row]) -> None:
        raise NotImplementedError

    def accept(self, rows: list[Row], tokens: list[int]) -> None:
        pass


class UndecodableIds(LogitsProcessor):
    """Ids the tokenizer cannot decode (the seed's padding rows 50257-50263) are never drawn."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def apply(self, logits: Tensor, rows: list[Row]) -> None:
        logits[:, self.vocab:] = float("-inf")


class GrammarMask(LogitsProcessor):
    """A constrained row draws only what its grammar allows next (before bias, penalties and temperature, as in
    vLLM); the masks are filled for constrained rows only, so the others pay nothing.

    A row whose grammar allows few tokens (at most `FEW_ALLOWED` of the vocabulary: a key, a comma, a digit) keeps its
    logits and gets its allowed ids (`Row.allowed`), among which alone it then draws: the same distribution as
    masking every other logit to -inf (the later processors change each logit on its own), without a pass over the
    vocabulary. A row that allows more (text inside a string) has its logits masked."""

    def apply(self, logits: Tensor, rows: list[Row]) -> None:
        constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
        if not constrained:
            return
        bitmask = np.empty((len(constrained), (logits.shape[1] + 31) // 32), dtype=np.uint32)
        for j, i in enumerate(constrained):
            rows[i].matcher.fill(bitmask[j])
        counts = np.bitwise_count(bitmask).sum(1)
        few = (counts > 0) & (counts <= logits.shape[1] * FEW_ALLOWED)
        for j, ids in zip(np.flatnonzero(few), allowed_tokens(bitmask[few]), strict=True):
            rows[constrained[j]].allowed = ids
        many = np.flatnonzero(~few)
        for j in many:
            rows[constrained[j]].allowed = None
        if not len(many):
            return
        masked = [constrained[j] for j in many]
        if logits.device.type == "cpu":
            mask_logits(logits.numpy(), masked, bitmask[many])
        else:
            blocked = blocked_tokens(bitmask[many], logits.shape[1]).to(logits.device)
            never = logits.new_tensor(-np.inf)
            for j, i in enumerate(masked):
                torch.where(blocked[j], never, logits[i], out=logits[i])

    def accept(self, rows: list[Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            if row.matcher is not None:
                row.matcher.accept(token)


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: a value added to a token's logit."""

    def apply(self, logits: Tensor, rows: list[Row]) -> None:
        biased = [(r, token, value) for r, row in enumerate(rows) for token, value in row.cfg.logit_bias.items()]
        if biased:
            index, tokens, values = zip(*biased, strict=True)
            device = logits.device
            logits.index_put_((torch.tensor(index, device=device), torch.tensor(tokens, device=device)),
                              torch.tensor(values, device=device, dtype=logits.dtype), accumulate=True)


class RepetitionPenalty(LogitsProcessor):
    """HF's CTRL-style penalty on every token of the prompt and output so far."""

    def apply(self, logits: Tensor, rows: list[Row]) -> None:
        penalized = [r for r, row in enumerate(rows) if row.cfg.repetition_penalty != 1.0]
        if penalized:  # gather the seen tokens' logits, penalize, scatter back (a row's first token pads it)
            seen = _padded([rows[r].tokens for r in penalized])
            index = torch.tensor(penalized, device=logits.device)
            penalty = torch.tensor([rows[r].cfg.repetition_penalty for r in penalized],
                                   device=logits.device).unsqueeze(1)
            values = logits[index].gather(1, seen)
            logits[index] = logits[index].scatter(1, seen, torch.where(values > 0, values / penalty,
                                                                       values * penalty))


class OutputPenalties(LogitsProcessor):
    """OpenAI's presence penalty (once per token in the output) and frequency penalty (per occurrence)."""

    def apply(self, logits: Tensor, rows: list[Row]) -> None:
        penalized = [r for r, row in enumerate(rows) if row.cfg.presence_penalty or row.cfg.frequency_penalty]
        if penalized:
            device = logits.device
            counts = torch.zeros(len(penalized), logits.shape[1], device=device)
            for i, r in enumerate(penalized):
                output = rows[r].tokens[len(rows[r].prompt):]
                counts[i].index_add_(0, output, torch.ones(len(output), device=device))
            index = torch.tensor(penalized, device=device)
            presence = torch.tensor([rows[r].cfg.presence_penalty for r in penalized], device=device).unsqueeze(1)
            frequency = torch.tensor([rows[r].cfg.frequency_penalty for r in penalized], device=device).unsqueeze(1)
            logits[index] -= counts * frequency + (counts > 0) * presence


class MinNewTokens(LogitsProcessor):
    """Rows still short of `min_new_tokens` cannot draw a token that would end them (EOS, stop_token_ids), except a
    row whose grammar is complete and allows nothing but EOS: the grammar wins and the row ends short."""

    def __init__(self, eos_id: int):
        self.eos_id = eos_id

    def apply(self, logits: Tensor, rows: list[Row]) -> None:
        masked = [(r, token) for r, row in enumerate(rows)
                  if len(row.seq.tokens) < row.cfg.min_new_tokens and not (row.matcher and row.matcher.must_end)
                  for token in [*row.cfg.stop_token_ids, *([] if row.cfg.ignore_eos else [self.eos_id])]]
        if masked:
            index, tokens = zip(*masked, strict=True)
            logits[list(index), list(tokens)] = float("-inf")


def _padded(histories: list[Tensor]) -> Tensor:
    width = max(len(h) for h in histories)
    return torch.stack([torch.cat([h, h[:1].expand(width - len(h))]) for h in histories])


# ----------------------------------------------------------------------------------------------- sampling


def choose_tokens(scores: Tensor, cfgs: list[GenerationConfig], draw: Callable[[list[int]], Tensor],
                  allowed: list[np.ndarray | None] | None = None) -> Tensor:
    """The next token of each row of (B, V) adjusted logits: argmax for greedy rows, else sampled.

    `draw(rows)` returns a fresh uniform number in [0, 1) (float64) for each listed row, from that row's own
    generator. Temperature, top-k and top-p are per row; the module docstring says how a draw maps to a token. A row
    with `allowed` ids (ascending) chooses among those alone, as if its other logits were -inf.
    """
    tokens = torch.empty(len(cfgs), dtype=torch.long, device=scores.device)
    narrowed = [r for r, ids in enumerate(allowed or ()) if ids is not None]
    if narrowed:
        tokens[narrowed] = _choose_among(scores, narrowed, [allowed[r] for r in narrowed], [cfgs[r] for r in narrowed],
                                         lambda rows: draw([narrowed[i] for i in rows]))
    wide = [r for r in range(len(cfgs)) if not allowed or allowed[r] is None]
    greedy = [r for r in wide if cfgs[r].is_greedy]
    if greedy:
        tokens[greedy] = scores[greedy].argmax(-1)
    ranked = [r for r in wide if not cfgs[r].is_greedy and cfgs[r].top_k]
    if ranked:
        tokens[ranked] = _top_k_tokens(_tempered(scores, cfgs, ranked), [cfgs[r] for r in ranked], draw(ranked))
    full = [r for r in wide if not cfgs[r].is_greedy and not cfgs[r].top_k]
    if full:
        probs = _tempered(scores, cfgs, full).softmax(-1)
        chosen = _inverse_cdf(probs, draw(full))
        nucleus = [i for i, r in enumerate(full) if cfgs[r].top_p < 1]
        if nucleus:
            top_p = torch.tensor([cfgs[r].top_p for r in full], dtype=torch.float64, device=scores.device)
            _keep_within_top_p(probs, chosen, top_p, torch.tensor(nucleus, device=scores.device),
                               lambda rows: draw([full[i] for i in rows]))
        tokens[full] = chosen
    return tokens


def _keep_within_top_p(probs: Tensor, chosen: Tensor, top_p: Tensor, pending: Tensor,
                       draw: Callable[[list[int]], Tensor]) -> None:
    """Draw each `pending` row's token of `chosen` again, in place, while the tokens likelier than it hold top_p or
    more (rejection: exactly the top-p distribution); after `TOP_P_REJECTIONS` tries, from its sorted nucleus."""
    for tries in range(1, TOP_P_REJECTIONS + 1):
        p = probs if len(pending) == len(probs) else probs[pending]
        # 1 where a token is likelier than the chosen one, 0 elsewhere: the same sum as p * (p > chosen), 2.5x faster
        above = (p - p.gather(1, chosen[pending].unsqueeze(1))).sign_().clamp_(min=0)
        likelier = above.mul_(p).sum(-1)
        pending = pending[likelier >= top_p[pending]]
        if not len(pending):
            return
        candidates = probs[pending] if tries < TOP_P_REJECTIONS else _nucleus(probs[pending], top_p[pending])
        chosen[pending] = _inverse_cdf(candidates, draw(pending.tolist()))


def _choose_among(scores: Tensor, rows: list[int], ids: list[np.ndarray], cfgs: list[GenerationConfig],
                  draw: Callable[[list[int]], Tensor]) -> Tensor:
    """The token of each of `rows` chosen among its `ids` alone: `choose_tokens` over their gathered logits, in id
    order (a shorter row padded with -inf), so a draw lands on the token it would over the masked vocabulary."""
    lengths = np.array([len(i) for i in ids])
    kept = np.arange(lengths.max()) < lengths[:, None]
    padded = np.zeros(kept.shape, dtype=np.int64)
    padded[kept] = np.concatenate(ids)
    padded = torch.from_numpy(padded).to(scores.device)
    gathered = scores[torch.tensor(rows, device=scores.device).unsqueeze(1), padded]
    gathered.masked_fill_(torch.from_numpy(~kept).to(scores.device), float("-inf"))
    return padded.gather(1, choose_tokens(gathered, cfgs, draw).unsqueeze(1)).squeeze(1)


def _tempered(scores: Tensor, cfgs: list[GenerationConfig], rows: list[int]) -> Tensor:
    scores = scores if len(rows) == len(scores) else scores[rows]
    if all(cfgs[r].temperature == 1 for r in rows):
        return scores
    temperature = torch.tensor([cfgs[r].temperature for r in rows], device=scores.device, dtype=scores.dtype)
    return scores / temperature.unsqueeze(1)


def _top_k_tokens(logits: Tensor, cfgs: list[GenerationConfig], draws: Tensor) -> Tensor:
    """Top-k (then top-p among those k) rows: one inverse-CDF draw over the kept candidates in token-id order."""
    width = min(logits.shape[1], max(cfg.top_k for cfg in cfgs))
    values, ids = logits.topk(width, sorted=True)
    k = torch.tensor([cfg.top_k for cfg in cfgs], device=logits.device).unsqueeze(1)
    top_p = torch.tensor([cfg.top_p for cfg in cfgs], device=logits.device, dtype=logits.dtype).unsqueeze(1)
    probs = values.masked_fill(torch.arange(width, device=logits.device) >= k, float("-inf")).softmax(-1)
    mass = probs.cumsum(-1)
    kept = probs * ((mass - probs < top_p) | (top_p >= 1))  # the token that crosses top_p stays
    order = ids.argsort(-1)  # the same draw as over the whole vocabulary with the other ids at 0
    return ids.gather(1, order).gather(1, _inverse_cdf(kept.gather(1, order), draws).unsqueeze(1)).squeeze(1)


def _nucleus(probs: Tensor, top_p: Tensor) -> Tensor:
    """`probs` with every token whose likelier tokens hold top_p or more at 0: the tokens at least as likely as the
    last one of the descending order that starts before the running sum reaches top_p (ties kept together)."""
    values = probs.sort(-1, descending=True).values
    before = values.cumsum(-1, dtype=torch.float64) - values
    last = (before < top_p.unsqueeze(1)).sum(-1, keepdim=True) - 1
    return probs * (probs >= values.gather(1, last))


def _inverse_cdf(probs: Tensor, draws: Tensor) -> Tensor:
    """Per row, the first column whose running sum of `probs` exceeds draw x total (never a zero column).

    Wide rows go in blocks of `BLOCK` columns: block sums find the block, then only that block is accumulated,
    so no sequential scan runs over the whole vocabulary.
    """
    rows, width = probs.shape
    if width <= 4 * BLOCK:
        cdf = probs.cumsum(-1, dtype=torch.float64)
        return _search(cdf, draws.to(cdf).unsqueeze(1) * cdf[:, -1:]).squeeze(1)
    full = width // BLOCK * BLOCK
    sums = probs[:, :full].reshape(rows, -1, BLOCK).sum(-1)
    if full < width:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], 1)
    sums = sums.cumsum(-1, dtype=torch.float64)
    goal = draws.to(sums).unsqueeze(1) * sums[:, -1:]
    block = _search(sums, goal)
    before = torch.where(block > 0, sums.gather(1, (block - 1).clamp(min=0)), 0.0)
    columns = block * BLOCK + torch.arange(BLOCK, device=probs.device)
    inner = probs.gather(1, columns.clamp(max=width - 1)).masked_fill(columns >= width, 0)
    return (block * BLOCK + _search(inner.cumsum(-1, dtype=torch.float64), goal - before)).squeeze(1)


def _search(cdf: Tensor, goal: Tensor) -> Tensor:
    """(rows, 1) first index with cdf > goal, at most where cdf reaches its total (rounding can push past)."""
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)
    return torch.minimum(torch.searchsorted(cdf, goal, right=True), last)


# ----------------------------------------------------------------------------------------------- decoding


class SequenceState:
    """Decoding state of one output sequence: its tokens, its text, what was already streamed."""

    def __init__(self, index: int, cfg: GenerationConfig):
        self.index, self.cfg = index, cfg
        self.tokens: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.holdback = max((len(s) for s in cfg.stop), default=1) - 1

    def push(self, token: int, tokenizer: RuGPTTokenizer) -> TokenEvent:
        cfg, kept = self.cfg, token
        ends = token in cfg.stop_token_ids or (token == tokenizer.eos_id and not cfg.ignore_eos)
        if ends:
            self.finish_reason = "stop"
            if not (cfg.include_stop_str_in_output and token in cfg.stop_token_ids):
                kept = None
        if kept is not None:
            self.tokens.append(token)
            self.text = tokenizer.decode(self.tokens)
            stop = self._first_stop() if len(self.tokens) >= cfg.min_new_tokens and not ends else None
            if stop is not None:
                cut, s = stop
                self.text, self.finish_reason = self.text[:cut + len(s) * cfg.include_stop_str_in_output], "stop"
            elif not ends and len(self.tokens) >= cfg.max_new_tokens:
                self.finish_reason = "length"
        end = len(self.text)
        if self.finish_reason is None:
            end = max(self.emitted, end - self.holdback)
            while end > self.emitted and self.text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
        delta, self.emitted = self.text[self.emitted:end], end
        return TokenEvent(self.index, kept, delta, self.finish_reason)

    def _first_stop(self) -> tuple[int, str] | None:
        """Where the earliest stop string starts in the text, and which one."""
        found = [(i, s) for s in self.cfg.stop if (i := self.text.find(s)) >= 0]
        return min(found, default=None)


@dataclass
class Row:
    """One sequence in a decoder slot: the first `length` tokens of `history` (its slot's row of the decoder's
    history: prompt, then output) are in the cache, `next_token` is not yet."""

    owner: object
    cfg: GenerationConfig
    seq: SequenceState
    prompt: list[int]
    generator: torch.Generator | None
    history: Tensor
    length: int = 0
    next_token: int | None = None  # None until prefilled
    adapter: str = NO_ADAPTER
    matcher: Matcher | None = None  # where a constrained row stands in its grammar
    allowed: np.ndarray | None = None  # the ids this step's draw is narrowed to (GrammarMask), when few

    @property
    def tokens(self) -> Tensor:
        """The prompt and the output so far."""
        return self.history[:self.length]


class Decoder:
    """Up to `slots` sequences decoded together over one preallocated slot KV cache; see the module docstring.

    `step` prefills the rows added since the last step and decodes one token for the others, in one pass of the
    model (its weights are read once for both, as vLLM and llama.cpp's server batch prompts with decoding). With
    `static_shapes`, every step decodes all slots over the whole capacity (fixed shapes, for CUDA graphs) and
    prompts go in a pass of their own; otherwise it decodes slots up to the highest live one and attends up to the
    longest live row.
    """

    def __init__(self, model: GPT, tokenizer: RuGPTTokenizer, slots: int, capacity: int | None = None,
                 static_shapes: bool = False):
        self.model, self.tokenizer, self.static_shapes = model.eval(), tokenizer, static_shapes
        self.capacity = min(capacity or model.config.n_positions, model.config.n_positions)
        self.device = next(model.parameters()).device
        activations = model.transformer.wte.weight.dtype  # an int8 model's output layer is int8, its embedding not
        self.cache = KVCache.allocate(model.config, slots, self.capacity, self.device, activations)
        self.history = torch.zeros(slots, self.capacity, dtype=torch.long, device=self.device)
        self._rows: list[Row | None] = [None] * slots
        self.adapters: dict[str, Adapter] = {}  # the LoRA adapters added to the model, by name
        self.processors: list[LogitsProcessor] = [UndecodableIds(len(tokenizer)), GrammarMask(), LogitBias(),
                                                  RepetitionPenalty(), OutputPenalties(),
                                                  MinNewTokens(tokenizer.eos_id)]  # in this order

    @property
    def rows(self) -> int:
        """The model's vocabulary rows (a constraint must be compiled for as many)."""
        return self.model.config.vocab_size

    @property
    def free_slots(self) -> int:
        return self._rows.count(None)

    @property
    def decoding_rows(self) -> int:
        """Rows the next step decodes (already prefilled)."""
        return sum(row is not None and row.next_token is not None for row in self._rows)

    def __bool__(self) -> bool:
        return any(row is not None for row in self._rows)

    def check(self, prompts: list[list[int]], cfg: GenerationConfig, constraint: Constraint | None = None) -> None:
        """Refuse what could never run here, naming the field: too many rows, too long, unknown ids, a constraint
        compiled for another tokenizer or row count, or one that could never end (`ignore_eos`)."""
        if not prompts or not all(prompts):
            raise RequestError("prompt", "every prompt needs at least one token")
        slots = len(self._rows)
        if len(prompts) > slots:
            raise RequestError("prompt", f"{len(prompts)} prompts exceed the batch size limit ({slots})")
        rows = len(prompts) * cfg.num_return_sequences
        if rows > slots:
            raise RequestError("num_return_sequences", f"{len(prompts)} prompts x {cfg.num_return_sequences} "
                               f"sequences = {rows} rows exceed the batch size limit ({slots})")
        longest = max(map(len, prompts))
        if longest + cfg.max_new_tokens > self.capacity:
            raise RequestError("max_new_tokens", f"prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                               f"exceeds the model's {self.capacity} positions")
        vocab = len(self.tokenizer)
        for i, ids in enumerate(prompts):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError("prompt", f"token id {bad} (prompt {i}) is not in the vocabulary (0..{vocab - 1})")
        if any(token >= vocab for token in cfg.logit_bias):
            raise RequestError("logit_bias", f"names ids past the vocabulary ({vocab})")
        if any(token >= vocab for token in cfg.stop_token_ids):
            raise RequestError("stop_token_ids", f"names ids past the vocabulary ({vocab})")
        if constraint is None:
            return
        if (constraint.tokenizer_fingerprint, constraint.vocab_rows) != (self.tokenizer.fingerprint, self.rows):
            raise RequestError(constraint.kind, f"compiled for tokenizer {constraint.tokenizer_fingerprint} and "
                               f"{constraint.vocab_rows} rows, not {self.tokenizer.fingerprint} and {self.rows}")
        if cfg.ignore_eos:
            raise RequestError("ignore_eos", "a structured output ends at EOS once its grammar is complete")

    def add(self, prompts: list[list[int]], cfg: GenerationConfig, owner: object = None,
            adapter: tuple[str, Adapter] | None = None, constraint: Constraint | None = None) -> list[int]:
        """Take a free slot for each prompt x num_return_sequences (sequence index = position in that list),
        decoded through `adapter` (its name and weights; added to the model if it is not there yet), each row
        following `constraint` (from `constraints.compile_constraint`) from its first token.

        Returns the slots; the rows are prefilled at the next step.
        """
        self.check(prompts, cfg, constraint)
        rows = [ids for ids in prompts for _ in range(cfg.num_return_sequences)]
        if len(rows) > self.free_slots:
            raise UserError(f"generation: {len(rows)} sequences but only {self.free_slots} free decoder slots")
        adapter_name = NO_ADAPTER
        if adapter is not None:
            adapter_name = adapter[0]
            self.add_adapter(*adapter)
        slots = [slot for slot, row in enumerate(self._rows) if row is None][:len(rows)]
        for index, (slot, ids) in enumerate(zip(slots, rows, strict=True)):
            generator = None
            if not cfg.is_greedy:
                generator = torch.Generator()
                if cfg.seed is None:
                    generator.seed()
                else:  # each sequence of a seeded request has its own stream of draws
                    generator.manual_seed(hash((cfg.seed, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            self._rows[slot] = Row(owner, cfg, SequenceState(index, cfg), ids, generator, self.history[slot],
                                   adapter=adapter_name, matcher=None if constraint is None else constraint.matcher())
            self.history[slot, :len(ids)] = torch.tensor(ids)
        return slots

    def release(self, slots: list[int]) -> None:
        """Give slots back (a cancelled request); their rows produce nothing more."""
        for slot in slots:
            self._rows[slot] = None

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        """Put `adapter` into the model under `name`, unless it is there already."""
        if name not in self.adapters:
            apply_adapter(self.model, adapter, name)
            self.adapters[name] = adapter

    def prune_adapters(self, keep: set[str]) -> None:
        """Take out of the model the adapters that no row uses and that are not in `keep`."""
        in_use = {row.adapter for row in self._rows if row is not None}
        for name in set(self.adapters) - keep - in_use:
            remove_adapter(self.model, name)
            del self.adapters[name]

    def _through_adapters(self, rows: list[Row | None]) -> AbstractContextManager:
        """Each token of the next forward (the model's batch rows) through its row's adapter (nothing to do while the
        model has none)."""
        if not self.adapters:
            return nullcontext()
        return adapter_per_row(self.model, [NO_ADAPTER if row is None else row.adapter for row in rows])

    def clear(self) -> None:
        self._rows = [None] * len(self._rows)

    @torch.inference_mode()
    def step(self) -> list[tuple[object, TokenEvent]]:
        """Decode one token of every prefilled row and prefill the new ones: (owner, event) for each row.

        A row whose event finishes it has given its slot back already.
        """
        running = [s for s, row in enumerate(self._rows) if row is not None and row.next_token is not None]
        pending = [s for s, row in enumerate(self._rows) if row is not None and row.next_token is None]
        scored = [s for s in pending if self._rows[s].cfg.prompt_logprobs is not None]
        plain = [s for s in pending if self._rows[s].cfg.prompt_logprobs is None]
        if self.static_shapes and running and plain:  # the decode step's shapes stay fixed: prompts go on their own
            logits = [self._forward(running, [])[0], self._forward([], plain)[1]]
        else:
            logits = [out for out in self._forward(running, plain) if out is not None] if running or plain else []
        prompt_logprobs = {}
        if scored:
            last, prompt_logprobs = self._prefill_scored(scored)
            logits.append(last)
        scored_only = [s for s in scored if not self._rows[s].cfg.max_new_tokens]
        slots = running + plain + [s for s in scored if s not in scored_only]
        out = self._sample(slots, torch.cat(logits)) if slots else []
        for s in scored_only:  # nothing to generate: the row ends here
            out.append((self._rows[s].owner, TokenEvent(self._rows[s].seq.index, None, "", "length")))
            self._rows[s] = None
        for s, (_, event) in zip(slots + scored_only, out, strict=True):  # new rows' events carry their prompts'
            event.prompt_logprobs = prompt_logprobs.get(s)
        return out

    def _forward(self, running: list[int], prompted: list[int],
                 every_position: bool = False) -> tuple[Tensor | None, Tensor | None]:
        """One pass of the model (`GPT.infer`) that decodes the `running` slots and prefills the `prompted` ones: the
        logits of each (None for an empty list), in slot order, and every row's length moved on."""
        decoding = prefilling = None
        token_rows: list[Row | None] = []  # the row of each token of the pass, for its adapter
        if running:
            n = len(self._rows) if self.static_shapes else running[-1] + 1
            live = [row if row is not None and row.next_token is not None else None for row in self._rows[:n]]
            lengths = [0 if row is None else row.length for row in live]
            tokens = [0 if row is None else row.next_token for row in live]
            every = self.static_shapes or len(running) == n  # the logits of all n rows (static: fixed shapes)
            decoding = Decoding(torch.tensor(tokens, device=self.device), torch.tensor(lengths, device=self.device),
                                self.capacity if self.static_shapes else max(lengths) + 1,
                                None if every else torch.tensor(running, device=self.device))
            token_rows += live
        if prompted:
            prompts = [self._rows[s].prompt for s in prompted]
            width = max(map(len, prompts))
            prefilling = Prefilling(torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device),
                                    torch.tensor([len(p) for p in prompts], device=self.device),
                                    torch.tensor(prompted, device=self.device), every_position)
            token_rows += [self._rows[s] for s in prompted for _ in range(width)]
        with self._through_adapters(token_rows):
            decoded, prefilled = self.model.infer(self.cache, decoding, prefilling)
        if self.static_shapes and decoded is not None and len(running) < len(decoded):
            decoded = decoded[running]
        for s in running:
            self._rows[s].length += 1
        for s in prompted:
            self._rows[s].length = len(self._rows[s].prompt)
        return decoded, prefilled

    def _prefill_scored(self, slots: list[int]) -> tuple[Tensor, dict[int, list[TokenLogprob]]]:
        """Prefill the rows that report their prompt's log-probabilities (every position's logits, for these rows
        only): the last position's logits of those that go on to generate, and each row's prompt log-probs."""
        every = self._forward([], slots, every_position=True)[1]
        scores = {s: self._prompt_logprobs(every[j], self._rows[s]) for j, s in enumerate(slots)}
        going = [j for j, s in enumerate(slots) if self._rows[s].cfg.max_new_tokens]
        return every[going, [len(self._rows[slots[j]].prompt) - 1 for j in going]], scores

    def _prompt_logprobs(self, logits: Tensor, row: Row) -> list[TokenLogprob]:
        """Each prompt token's raw log-probability given the tokens before it, from (S, V) prefill logits."""
        prompt, k = row.prompt, row.cfg.prompt_logprobs
        logprobs = self._log_softmax(logits[:len(prompt) - 1])
        chosen = logprobs.gather(1, torch.tensor(prompt[1:], device=self.device).unsqueeze(1)).squeeze(1).tolist()
        top = logprobs.topk(k) if k else None
        out = [TokenLogprob(prompt[0], None, None)]
        for i, (token, value) in enumerate(zip(prompt[1:], chosen, strict=True)):
            pairs = [] if top is None else list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True))
            out.append(TokenLogprob(token, value, pairs))
        return out

    def _log_softmax(self, logits: Tensor) -> Tensor:
        """The raw model's log-probabilities over the ids the tokenizer can decode."""
        logits = logits.float()
        logits[..., len(self.tokenizer):] = float("-inf")
        return logits.log_softmax(-1)

    def _sample(self, slots: list[int], logits: Tensor) -> list[tuple[object, TokenEvent]]:
        """Draw each row's next token from its logits through the processors, and advance the rows."""
        rows = [self._rows[s] for s in slots]
        logits = logits.float()
        asked = [i for i, row in enumerate(rows) if row.cfg.logprobs is not None]
        logprobs = self._log_softmax(logits[asked]) if asked else None  # the raw model's, before any processor
        for processor in self.processors:
            processor.apply(logits, rows)

        def draw(indices: list[int]) -> Tensor:
            return torch.tensor([torch.rand(1, generator=rows[i].generator, dtype=torch.float64).item()
                                 for i in indices], dtype=torch.float64, device=self.device)

        tokens = choose_tokens(logits, [row.cfg for row in rows], draw, [row.allowed for row in rows])
        token_list = tokens.tolist()
        for processor in self.processors:
            processor.accept(rows, token_list)
        reported = {}
        if asked:
            chosen = logprobs.gather(1, tokens[asked].unsqueeze(1)).squeeze(1).tolist()
            width = max(rows[i].cfg.logprobs for i in asked)
            top = logprobs.topk(width) if width else None
            for j, i in enumerate(asked):
                pairs = [] if top is None else list(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True))
                reported[i] = chosen[j], pairs[:rows[i].cfg.logprobs]
        return self._advance(slots, token_list, reported)

    def _advance(self, slots: list[int], tokens: list[int],
                 reported: dict[int, tuple[float, list[tuple[int, float]]]]) -> list[tuple[object, TokenEvent]]:
        """Push each row's token (with its `reported` log-probabilities) into its sequence: the rows that go on keep
        it for the next step and in their history, the finished ones give their slot back."""
        out, going, going_tokens = [], [], []
        for i, (slot, token) in enumerate(zip(slots, tokens, strict=True)):
            row = self._rows[slot]
            event = row.seq.push(token, self.tokenizer)
            if i in reported:
                event.logprob, event.top_logprobs = reported[i]
            out.append((row.owner, event))
            if event.finish_reason is None:
                row.next_token = token
                going.append(slot)
                going_tokens.append(token)
            else:
                self._rows[slot] = None
        if going:
            index = torch.tensor(going, device=self.device)
            lengths = torch.tensor([self._rows[s].length for s in going], device=self.device)
            self.history[index, lengths] = torch.tensor(going_tokens, device=self.device)
        return out


def encode_prompts(tokenizer: RuGPTTokenizer, prompts: str | list[str]) -> list[list[int]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("generation: no prompts given")
    encoded = tokenizer.encode_batch(prompts)
    for i, ids in enumerate(encoded):
        if not ids:
            raise UserError(f"generation: prompt {i} is empty")
    return encoded


def stream(model: GPT, tokenizer: RuGPTTokenizer, prompts: str | list[str] | list[list[int]],
           cfg: GenerationConfig | None = None, constraint: Constraint | None = None) -> Iterator[TokenEvent]:
    """Yield one TokenEvent per generated token of every sequence, in step order; finished sequences leave.
    Every sequence follows `constraint` when one is given."""
    cfg = cfg or GenerationConfig()
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], list):
        encoded = prompts
    else:
        encoded = encode_prompts(tokenizer, prompts)
    longest = max(len(ids) for ids in encoded)
    decoder = Decoder(model, tokenizer, len(encoded) * cfg.num_return_sequences, longest + cfg.max_new_tokens)
    decoder.add(encoded, cfg, constraint=constraint)
    while decoder:
        for _, event in decoder.step():
            yield event


def generate(model: GPT, tokenizer: RuGPTTokenizer, prompts: str | list[str],
             cfg: GenerationConfig | None = None, constraint: Constraint | None = None) -> list[Completion]:
    """Completions for every prompt (× num_return_sequences), ordered by prompt, each following `constraint`."""
    cfg = cfg or GenerationConfig()
    encoded = encode_prompts(tokenizer, prompts)
    transcript = Transcript(encoded, cfg.num_return_sequences)
    for event in stream(model, tokenizer, encoded, cfg, constraint):
        transcript.add([event])
    return transcript.completions()


class Transcript:
    """Collects a request's events into `Completion`s: the streamed text is, by construction, the text."""

    def __init__(self, prompts: list[list[int]], n: int):
        self.prompts, self.n = prompts, n
        rows = range(len(prompts) * n)
        self.texts = ["" for _ in rows]
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in rows]
        self.prompt_logprobs: list[list[TokenLogprob] | None] = [None for _ in rows]
        self.sampled: list[list[float]] = [[] for _ in rows]  # every sampled token's logprob, endings too
        self.finish: list[str | None] = [None for _ in rows]

    def add(self, events: list[TokenEvent]) -> None:
        for e in events:
            self.texts[e.index] += e.text
            self.finish[e.index] = e.finish_reason
            if e.prompt_logprobs is not None:
                self.prompt_logprobs[e.index] = e.prompt_logprobs
            if e.logprob is not None:
                self.sampled[e.index].append(e.logprob)
            if e.token_id is not None:
                self.tokens[e.index].append(e.token_id)
                if e.logprob is not None:
                    self.logprobs[e.index].append(TokenLogprob(e.token_id, e.logprob, e.top_logprobs))

    def completion(self, row: int, index: int | None = None) -> Completion:
        return Completion(row if index is None else index, row // self.n, self.texts[row], self.tokens[row],
                          self.finish[row] or "length", len(self.prompts[row // self.n]), self.logprobs[row],
                          self.prompt_logprobs[row])

    def completions(self) -> list[Completion]:
        return [self.completion(row) for row in range(len(self.texts))]

    def best(self, n: int) -> list[Completion]:
        """Per prompt, the `n` of its sequences with the highest mean log-probability per sampled token (OpenAI's
        `best_of`; ties keep the earlier sequence), numbered 0.. in that order; all of them, in order, when
        `n` is every sequence. Ranking needs `logprobs` set."""
        if n == self.n:
            return self.completions()
        out = []
        for p in range(len(self.prompts)):
            rows = range(p * self.n, (p + 1) * self.n)
            ranked = sorted(rows, key=lambda r: -sum(self.sampled[r]) / max(len(self.sampled[r]), 1))
            out += [self.completion(row, p * n + j) for j, row in enumerate(ranked[:n])]
        return out

    @property
    def usage(self) -> dict[str, int]:
        """Tokens of the prompts (once each) and of every generated sequence (best_of's discarded ones too)."""
        prompt, completion = sum(map(len, self.prompts)), sum(map(len, self.tokens))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
