"""Chat completions' responses: OpenAI's `chat.completion` objects and chunks, from a request's `Transcript`.

A chat request generates like a one-prompt completion (its conversation rendered by a template), so only the shape
differs: messages and deltas instead of text, and chat's logprobs format. Streams follow vLLM's order: a role delta
per choice (then the echoed text), content deltas, each choice's finish reason, usage when asked, `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from rugpt_ray.generation import TokenEvent, TokenLogprob, Transcript
from rugpt_ray.serving.completions import Choices
from rugpt_ray.serving.streaming import DONE, sse
from rugpt_ray.tokenizer import RuGPTTokenizer

ROLE = "assistant"


class ChatChoices(Choices):
    """A chat choice's content and logprobs: `{"content": [{token, logprob, bytes, top_logprobs}]}`, where
    `top_logprobs` holds the k likeliest tokens (the chosen one only when it is among them, as in vLLM) and `bytes`
    are a token's own bytes (a character split over tokens is in no token's `token` text, but in their bytes)."""

    def __init__(self, tokenizer: RuGPTTokenizer, prompt: list[int], n: int, top_logprobs: int | None):
        super().__init__(tokenizer, [prompt], n, echo=False, logprobs=top_logprobs)

    def logprobs(self, ids: list[int], scored: list[TokenLogprob], first: int) -> dict[str, Any] | None:
        if self.k is None:
            return None
        return {"content": [{**self._token(t.token_id, t.logprob),
                             "top_logprobs": [self._token(token, logprob) for token, logprob in t.top or []]}
                            for t in scored]}

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.tokenizer.decode([token_id]), "logprob": logprob,
                "bytes": list(self.tokenizer.token_bytes(token_id))}


class ChatResponses:
    """`/v1/chat/completions`' answer to one request: a `chat.completion` object, or its chunks then `[DONE]`.
    `echoed` is put before each answer (vLLM's `echo`)."""

    def __init__(self, model: str, choices: ChatChoices, n: int, echoed: str = "", include_usage: bool = False):
        self.choices, self.n, self.echoed, self.include_usage = choices, n, echoed, include_usage
        self.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                     "model": model}

    def whole(self, transcript: Transcript) -> dict[str, Any]:
        choices = []
        for c in transcript.best(self.n):
            text, logprobs = self.choices.whole(c)
            choices.append({"index": c.index, "message": {"role": ROLE, "content": self.echoed + text},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**self.head, "choices": choices, "usage": transcript.usage}

    def opening(self) -> list[str]:
        deltas = [{"role": ROLE, "content": ""}, *([{"content": self.echoed}] if self.echoed else [])]
        return [sse(self._chunk(index, delta)) for delta in deltas for index in range(self.n)]

    def chunk(self, transcript: Transcript, row: int, events: list[TokenEvent]) -> dict[str, Any]:
        text, logprobs = self.choices.chunk(transcript, row, events)
        return self._chunk(row, {"content": text}, logprobs, events[-1].finish_reason)

    def closing(self, transcript: Transcript) -> list[str]:
        usage = sse({**self.head, "object": "chat.completion.chunk", "choices": [], "usage": transcript.usage})
        return [usage, DONE] if self.include_usage else [DONE]

    def _chunk(self, index: int, delta: dict[str, str], logprobs: dict[str, Any] | None = None,
               finish_reason: str | None = None) -> dict[str, Any]:
        return {**self.head, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
