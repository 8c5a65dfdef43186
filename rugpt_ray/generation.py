"""Text generation with a KV cache: greedy or sampled, batched prompts of any lengths, streamed token by token.

Sampling follows HF's order (repetition penalty → temperature → top-k → top-p), so greedy output equals HF
`generate` for dense models. Streaming and non-streaming share one loop: `generate` is `stream` collected,
so streamed text always equals the returned text. Ids the tokenizer cannot decode (the seed's padding rows
50257–50263) are never produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rugpt_ray.errors import UserError
from rugpt_ray.model import GPT, KVCache
from rugpt_ray.tokenizer import RuGPTTokenizer


@dataclass
class GenerationConfig:
    """How to continue a prompt."""

    max_new_tokens: int = 64
    """Tokens to generate at most per sequence (prompt + this must fit in the model's positions)."""
    greedy: bool = False
    """Always take the most likely token (temperature, top_k and top_p are then ignored)."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 means greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = all."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches top_p; 1 = all."""
    repetition_penalty: float = 1.0
    """HF's CTRL-style penalty on tokens already in the prompt or output; 1 = none."""
    num_return_sequences: int = 1
    """Continuations per prompt."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sequence; the output is cut before the first one."""
    seed: int | None = None
    """Seed for sampling; the same seed gives the same text."""

    def validate(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("num_return_sequences", self.num_return_sequences >= 1, "must be >= 1"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"generation: {name}={getattr(self, name)!r} {rule}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class TokenEvent:
    """One step of one sequence: `text` is the new printable text (may be empty while it is held back)."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


@dataclass
class Completion:
    index: int
    prompt_index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def next_token_logits(logits: Tensor, history: Tensor, history_valid: Tensor, cfg: GenerationConfig,
                      vocab_limit: int) -> Tensor:
    """Apply the repetition penalty and the sampling filters to (B, V) float logits."""
    logits = logits.float()
    logits[:, vocab_limit:] = float("-inf")
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen.scatter_(1, history, history_valid)
        penalized = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if cfg.is_greedy:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


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
        if token == tokenizer.eos_id:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            self.text = tokenizer.decode(self.tokens)
            cut = min((i for i in (self.text.find(s) for s in self.cfg.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop"
            elif len(self.tokens) >= self.cfg.max_new_tokens:
                self.finish_reason = "length"
        end = len(self.text)
        if self.finish_reason is None:
            end = max(self.emitted, end - self.holdback)
            while end > self.emitted and self.text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
                end -= 1
        delta, self.emitted = self.text[self.emitted:end], end
        return TokenEvent(self.index, token, delta, self.finish_reason)


def encode_prompts(tokenizer: RuGPTTokenizer, prompts: str | list[str]) -> list[list[int]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("generation: no prompts given")
    encoded = tokenizer.encode_batch(prompts)
    for i, ids in enumerate(encoded):
        if not ids:
            raise UserError(f"generation: prompt {i} is empty")
    return encoded


@torch.inference_mode()
def stream(model: GPT, tokenizer: RuGPTTokenizer, prompts: str | list[str] | list[list[int]],
           cfg: GenerationConfig | None = None) -> Iterator[TokenEvent]:
    """Yield one TokenEvent per generated token of every sequence, in step order; finished sequences leave."""
    cfg = cfg or GenerationConfig()
    cfg.validate()
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], list):
        encoded = prompts
    else:
        encoded = encode_prompts(tokenizer, prompts)
    encoded = [ids for ids in encoded for _ in range(cfg.num_return_sequences)]
    longest = max(len(ids) for ids in encoded)
    limit = model.config.n_positions
    if longest + cfg.max_new_tokens > limit:
        raise UserError(f"generation: prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                        f"exceeds the model's {limit} positions")
    model.eval()
    device = next(model.parameters()).device
    batch = len(encoded)
    ids = torch.full((batch, longest), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(batch, longest, dtype=torch.bool)
    for row, seq in enumerate(encoded):
        ids[row, longest - len(seq):] = torch.tensor(seq)
        mask[row, longest - len(seq):] = True
    ids, mask = ids.to(device), mask.to(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    cache = KVCache.allocate(model.config, batch, longest + cfg.max_new_tokens, device, model.lm_head.weight.dtype)
    history = torch.cat([ids, torch.zeros(batch, cfg.max_new_tokens, dtype=torch.long, device=device)], 1)
    history_valid = torch.cat([mask, torch.zeros(batch, cfg.max_new_tokens, dtype=torch.bool, device=device)], 1)
    seqs = [SequenceState(i, cfg) for i in range(batch)]
    active = list(range(batch))

    logits, _ = model(ids, attention_mask=mask, cache=cache, last_only=True)
    for step in range(cfg.max_new_tokens):
        scores = next_token_logits(logits[:, -1], history, history_valid, cfg, len(tokenizer))
        if cfg.is_greedy:
            tokens = scores.argmax(-1)
        else:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        col = longest + step
        history[:, col], history_valid[:, col] = tokens, True
        keep = []
        for row, token in enumerate(tokens.tolist()):
            seq = seqs[active[row]]
            yield seq.push(token, tokenizer)
            if seq.finish_reason is None:
                keep.append(row)
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            tokens, history, history_valid = tokens[index], history[index], history_valid[index]
            active = [active[r] for r in keep]
        logits, _ = model(tokens.unsqueeze(1), cache=cache)


def generate(model: GPT, tokenizer: RuGPTTokenizer, prompts: str | list[str],
             cfg: GenerationConfig | None = None) -> list[Completion]:
    """Completions for every prompt (× num_return_sequences), ordered by prompt."""
    cfg = cfg or GenerationConfig()
    encoded = encode_prompts(tokenizer, prompts)
    seqs: dict[int, list[TokenEvent]] = {}
    for event in stream(model, tokenizer, encoded, cfg):
        seqs.setdefault(event.index, []).append(event)
    n = cfg.num_return_sequences
    out = []
    for index, events in sorted(seqs.items()):
        tokens = [e.token_id for e in events if e.token_id != tokenizer.eos_id]
        text = "".join(e.text for e in events)
        out.append(Completion(index, index // n, text, tokens, events[-1].finish_reason, len(encoded[index // n])))
    return out
