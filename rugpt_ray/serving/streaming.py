"""A request's token events, collected into a `Transcript` or streamed as server-sent events in an endpoint's shape."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from rugpt_ray.serving.protocol import ApiError

if TYPE_CHECKING:  # the router streams through here too, and needs no torch
    from rugpt_ray.generation import TokenEvent, Transcript

logger = logging.getLogger("ray.serve")
DONE = "data: [DONE]\n\n"
"""OpenAI's last event."""


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Responses(Protocol):
    """How an endpoint answers one request: whole, or streamed as events before the first token, a chunk per
    sequence with new text or an end, and events after the last."""

    def whole(self, transcript: Transcript) -> dict[str, Any]: ...

    def opening(self) -> list[str]: ...

    def chunk(self, transcript: Transcript, row: int, events: list[TokenEvent]) -> dict[str, Any]: ...

    def closing(self, transcript: Transcript) -> list[str]: ...


def timed_out(error: TimeoutError) -> ApiError:
    return ApiError(504, str(error), kind="timeout_error", code="request_timeout")


async def collect(events: AsyncIterator[list[TokenEvent]], transcript: Transcript) -> Transcript:
    """`transcript` with every event added; 504 when the request's time runs out."""
    try:
        async for step in events:
            transcript.add(step)
    except TimeoutError as e:
        raise timed_out(e) from None
    return transcript


async def stream(events: AsyncIterator[list[TokenEvent]], transcript: Transcript, interval_s: float,
                 responses: Responses, clock: Callable[[], float] | None = None) -> AsyncIterator[str]:
    """SSE text: `responses.opening()`, a chunk per sequence with new text or an end, then `responses.closing()`.

    Tokens go out as they come; those that arrive within `interval_s` of the last send (or together, when the
    client reads slower than the model writes) are merged into one chunk per sequence. Events whose text is still
    held back (a possible stop string, half a character) wait for the next chunk. A failure after the first byte
    ends the stream with an `{"error": ...}` event: the status line is gone. `clock` (seconds; the event loop's
    by default) is what `interval_s` is measured on.
    """
    clock, pending, sent = clock or asyncio.get_running_loop().time, {}, float("-inf")

    def flush() -> str:
        ready = [row for row, waiting in pending.items() if any(e.text or e.finish_reason for e in waiting)]
        return "".join(sse(responses.chunk(transcript, row, pending.pop(row))) for row in ready)

    for data in responses.opening():
        yield data
    try:
        async for step in events:
            transcript.add(step)
            for e in step:
                pending.setdefault(e.index, []).append(e)
            if clock() - sent >= interval_s and (text := flush()):
                yield text
                sent = clock()
        if text := flush():
            yield text
    except TimeoutError as e:
        yield sse(timed_out(e).body())
        return
    except Exception as e:
        logger.exception("generation failed mid-stream")
        yield sse(ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error").body())
        return
    for data in responses.closing(transcript):
        yield data
