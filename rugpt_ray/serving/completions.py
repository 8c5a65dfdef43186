"""Text completions' responses: OpenAI's `/v1/completions` objects and chunks, and `/generate`'s, from a request's
`Transcript` (tested without HTTP).

`Choices` is how a sequence reads back (its text and logprobs, whole or a chunk at a time); chat completions reuse
it with their own logprobs format.
"""

from __future__ import annotations

import codecs
import time
import uuid
from typing import Any

from rugpt_ray.generation import Completion, TokenEvent, TokenLogprob, Transcript
from rugpt_ray.serving.streaming import DONE, sse
from rugpt_ray.tokenizer import RuGPTTokenizer


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
        return self.tokenizer.decode(prompt) + c.text, self.logprobs(prompt + c.token_ids, scored, 0)

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
        return text, self.logprobs(prompt + output, new, first)

    def logprobs(self, ids: list[int], scored: list[TokenLogprob], first: int) -> dict[str, Any] | None:
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


class CompletionResponses:
    """`/v1/completions`' answer to one request: a `text_completion` object, or its chunks then `[DONE]`."""

    def __init__(self, model: str, choices: Choices, n: int, include_usage: bool = False):
        self.choices, self.n, self.include_usage = choices, n, include_usage
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                     "model": model}

    def whole(self, transcript: Transcript) -> dict[str, Any]:
        return {**self.head, "choices": [_choice(c.index, *self.choices.whole(c), c.finish_reason)
                                         for c in transcript.best(self.n)], "usage": transcript.usage}

    def opening(self) -> list[str]:
        return []

    def chunk(self, transcript: Transcript, row: int, events: list[TokenEvent]) -> dict[str, Any]:
        return {**self.head, "choices": [_choice(row, *self.choices.chunk(transcript, row, events),
                                                 events[-1].finish_reason)]}

    def closing(self, transcript: Transcript) -> list[str]:
        usage = [sse({**self.head, "choices": [], "usage": transcript.usage})] if self.include_usage else []
        return [*usage, DONE]


def _choice(index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


class GenerateResponses:
    """`/generate`'s answer: the completions with their prompt index and length, or per-sequence chunks then the
    whole answer with `"done": true`."""

    def __init__(self, model: str, choices: Choices, n: int):
        self.model, self.choices, self.n = model, choices, n

    def whole(self, transcript: Transcript) -> dict[str, Any]:
        completions = []
        for c in transcript.best(self.n):
            text, logprobs = self.choices.whole(c)
            completions.append({"index": c.index, "prompt_index": c.prompt_index, "text": text,
                                "logprobs": logprobs, "finish_reason": c.finish_reason,
                                "completion_tokens": c.completion_tokens})
        return {"model": self.model, "completions": completions, "usage": transcript.usage}

    def opening(self) -> list[str]:
        return []

    def chunk(self, transcript: Transcript, row: int, events: list[TokenEvent]) -> dict[str, Any]:
        text, logprobs = self.choices.chunk(transcript, row, events)
        return {"index": row, "text": text, "logprobs": logprobs, "finish_reason": events[-1].finish_reason}

    def closing(self, transcript: Transcript) -> list[str]:
        return [sse({"done": True, **self.whole(transcript)})]
