"""Continuous batching for one model: requests join the running batch between decode steps and leave when done.

Each request ("job") is prefilled into its own KV cache, exactly as `generation.stream` does for the same
prompts, then merged into the batch cache: the time axes are right-aligned and the shorter side is padded
with invalid slots (the model's masks follow each slot's `valid` flag and true position, so a row never sees
another row's padding). Finished and cancelled rows are dropped with the same copy that compacts columns no
row needs any more, so the cache never grows past the longest live sequence.

Sampling reuses `next_token_logits` and `SequenceState` (stop strings, EOS, streamed-text holdback), and each
job samples from its own `torch.Generator` over its own rows: a seeded request draws the same random numbers
whether it runs alone or next to others. Model work runs on one worker thread per engine that steps back to
back, so neither waits for the other: the event loop accepts requests and streams tokens while a step computes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from rugpt_ray.errors import UserError
from rugpt_ray.generation import Completion, GenerationConfig, SequenceState, TokenEvent, next_token_logits
from rugpt_ray.model import GPT, KVCache
from rugpt_ray.tokenizer import RuGPTTokenizer


class RequestError(UserError):
    """A request the engine (or the server in front of it) refuses; `param` names the offending field."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class EngineStats:
    """Counters since the engine started; `mean_batch_rows` is the batch size a decode step sees on average."""

    decode_steps: int = 0
    decoded_rows: int = 0
    max_batch_rows: int = 0
    max_batch_requests: int = 0
    tokens: int = 0
    finished_requests: int = 0
    cancelled_requests: int = 0
    active_requests: int = 0
    active_rows: int = 0
    waiting_requests: int = 0

    def as_dict(self) -> dict[str, float]:
        mean = self.decoded_rows / self.decode_steps if self.decode_steps else 0.0
        return {**asdict(self), "mean_batch_rows": round(mean, 3)}


class _Job:
    """One request inside the engine: its rows' prompts, sampling state, token history and event queue."""

    def __init__(self, prompts: list[list[int]], cfg: GenerationConfig, pad_id: int, device: torch.device,
                 loop: asyncio.AbstractEventLoop):
        rows = [ids for ids in prompts for _ in range(cfg.num_return_sequences)]
        self.cfg = cfg
        self.longest = max(len(ids) for ids in rows)
        self.ids = torch.full((len(rows), self.longest), pad_id, dtype=torch.long)
        self.mask = torch.zeros(len(rows), self.longest, dtype=torch.bool)
        for row, seq in enumerate(rows):
            self.ids[row, self.longest - len(seq):] = torch.tensor(seq)
            self.mask[row, self.longest - len(seq):] = True
        self.ids, self.mask = self.ids.to(device), self.mask.to(device)
        self.history = torch.cat([self.ids, torch.zeros(len(rows), cfg.max_new_tokens, dtype=torch.long,
                                                        device=device)], 1)
        self.history_valid = torch.cat([self.mask, torch.zeros(len(rows), cfg.max_new_tokens, dtype=torch.bool,
                                                               device=device)], 1)
        self.generator = torch.Generator(device=device)
        if cfg.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(cfg.seed)
        self.seqs = [SequenceState(i, cfg) for i in range(len(rows))]
        self.active = list(range(len(rows)))  # sequences still decoding, in batch-row order
        self.steps = 0
        self.cancelled = False
        self.deadline, self.timeout_s = float("inf"), None  # time.monotonic() after which the engine gives up
        self.loop = loop
        self.queue: asyncio.Queue[list[TokenEvent] | BaseException | None] = asyncio.Queue()

    @property
    def rows(self) -> int:
        return len(self.active)

    @property
    def remaining(self) -> int:
        return self.cfg.max_new_tokens - self.steps

    def advance(self, logits: Tensor, tokenizer: RuGPTTokenizer) -> tuple[list[TokenEvent], Tensor, list[int]]:
        """Sample the next token of every live row from its (rows, V) logits, as `generation.stream` does.

        Returns the events, the sampled tokens and the local rows that go on decoding.
        """
        scores = next_token_logits(logits, self.history, self.history_valid, self.cfg, len(tokenizer))
        if self.cfg.is_greedy:
            tokens = scores.argmax(-1)
        else:
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(1)
        col = self.longest + self.steps
        self.history[:, col], self.history_valid[:, col] = tokens, True
        self.steps += 1
        events, keep = [], []
        for row, token in enumerate(tokens.tolist()):
            seq = self.seqs[self.active[row]]
            events.append(seq.push(token, tokenizer))
            if seq.finish_reason is None:
                keep.append(row)
        if len(keep) < len(self.active):
            index = torch.tensor(keep, dtype=torch.long, device=tokens.device)
            self.history, self.history_valid = self.history[index], self.history_valid[index]
            self.active = [self.active[r] for r in keep]
        return events, tokens, keep


def _merge(parts: list[tuple[KVCache, Tensor]], capacity_after: int) -> KVCache:
    """One cache from the kept rows of several: columns right-aligned, columns no kept row uses dropped.

    Each part is (cache, rows to keep); the result holds `capacity_after` free slots after its length.
    """
    spans = []
    for cache, rows in parts:
        used = cache.valid[rows, :cache.length].any(0)
        spans.append(cache.length - int(used.long().argmax()))  # from the first column a kept row uses
    length = max(spans)
    first = parts[0][0]
    batch = sum(len(rows) for _, rows in parts)
    _, heads, _, dim = first.k[0].shape
    device, dtype = first.k[0].device, first.k[0].dtype
    capacity = length + capacity_after
    merged = KVCache(
        k=[torch.zeros(batch, heads, capacity, dim, device=device, dtype=dtype) for _ in first.k],
        v=[torch.zeros(batch, heads, capacity, dim, device=device, dtype=dtype) for _ in first.v],
        positions=torch.zeros(batch, capacity, dtype=torch.long, device=device),
        valid=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
        length=length,
    )
    row = 0
    for (cache, rows), span in zip(parts, spans, strict=True):
        src, dst, end = slice(cache.length - span, cache.length), slice(length - span, length), row + len(rows)
        for layer in range(len(first.k)):
            merged.k[layer][row:end, :, dst] = cache.k[layer][rows][:, :, src]
            merged.v[layer][row:end, :, dst] = cache.v[layer][rows][:, :, src]
        merged.positions[row:end, dst] = cache.positions[rows][:, src]
        merged.valid[row:end, dst] = cache.valid[rows][:, src]
        row = end
    return merged


def _deliver(items: list[tuple[_Job, list[TokenEvent] | BaseException | None]]) -> None:
    """Hand items to their jobs' queues from the worker thread: one thread-safe call per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, item in items:
        by_loop.setdefault(job.loop, []).append((job.queue, item))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, pairs)
        except RuntimeError:  # that loop is closed: nobody is listening any more
            pass


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in pairs:
        queue.put_nowait(item)


class BatchEngine:
    """Continuous batching over one model; `generate` is the only entry point and may be called concurrently."""

    def __init__(self, model: GPT, tokenizer: RuGPTTokenizer, max_batch_size: int = 32):
        self.model, self.tokenizer, self.max_batch_size = model.eval(), tokenizer, max_batch_size
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._lock = threading.Lock()  # guards _waiting and _worker, shared with the event loop(s)
        self._waiting: deque[_Job] = deque()
        self._worker: threading.Thread | None = None
        # Touched by the worker thread only:
        self._jobs: list[_Job] = []  # in batch-row order
        self._cache: KVCache | None = None
        self._tokens: Tensor | None = None  # each row's last token, fed to the next decode step

    @property
    def context(self) -> int:
        return self.model.config.n_positions

    def check(self, prompts: list[list[int]], cfg: GenerationConfig) -> None:
        """Refuse what could never run: too many rows for one batch, or prompt + new tokens past the context."""
        cfg.validate()
        if len(prompts) > self.max_batch_size:
            raise RequestError("prompt", f"{len(prompts)} prompts exceed the batch size limit ({self.max_batch_size})")
        rows = len(prompts) * cfg.num_return_sequences
        if rows > self.max_batch_size:
            raise RequestError("num_return_sequences", f"{len(prompts)} prompts x {cfg.num_return_sequences} "
                               f"sequences = {rows} rows exceed the batch size limit ({self.max_batch_size})")
        longest = max(len(ids) for ids in prompts)
        if longest + cfg.max_new_tokens > self.context:
            raise RequestError("max_new_tokens", f"prompt ({longest} tokens) + max_new_tokens "
                                                 f"({cfg.max_new_tokens}) exceeds the model's {self.context} positions")

    async def generate(self, prompts: list[list[int]], cfg: GenerationConfig,
                       timeout_s: float | None = None) -> AsyncIterator[list[TokenEvent]]:
        """Yield each step's events for this request (steps that were ready together come as one list).

        Leaving the iteration early (client gone, cancellation) drops the request's rows from the batch at
        the next step; so does `timeout_s`, checked between steps, which then raises TimeoutError here.
        """
        self.check(prompts, cfg)
        job = _Job(prompts, cfg, self.tokenizer.pad_id, self.device, asyncio.get_running_loop())
        if timeout_s is not None:
            job.deadline, job.timeout_s = time.monotonic() + timeout_s, timeout_s
        with self._lock:
            self._waiting.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="rugpt-engine", daemon=True)
                self._worker.start()
        finished = False
        try:
            while not finished:
                events, item = [], await job.queue.get()
                while True:  # everything that is ready goes out as one list
                    if item is None:
                        finished = True
                        break
                    if isinstance(item, BaseException):
                        raise item
                    events.extend(item)
                    if job.queue.empty():
                        break
                    item = job.queue.get_nowait()
                if events:
                    yield events
        finally:
            if not finished:
                job.cancelled = True

    def _admit(self) -> list[_Job]:
        """Under the lock: waiting jobs that fit next to the running ones, first come first served."""
        new, rows = [], sum(job.rows for job in self._jobs)
        while self._waiting and (self._waiting[0].cancelled or rows + self._waiting[0].rows <= self.max_batch_size):
            job = self._waiting.popleft()
            if job.cancelled:
                self.stats.cancelled_requests += 1
            else:
                new.append(job)
                rows += job.rows
        self.stats.waiting_requests = len(self._waiting)
        return new

    def _work(self) -> None:
        """The worker thread: steps back to back while there is work, then exits (a new request restarts it).

        Model work never waits for the event loop; results reach each job's loop with one call per step.
        """
        while True:
            with self._lock:
                now = time.monotonic()
                for job in [*self._jobs, *self._waiting]:
                    if job.deadline < now and not job.cancelled:
                        job.cancelled = True
                        _deliver([(job, TimeoutError(f"generation took longer than the request timeout "
                                                     f"({job.timeout_s} s)"))])
                new = self._admit()
                if not self._jobs and not new:
                    self._worker = None
                    self.stats.active_requests = self.stats.active_rows = 0
                    return
            running = [*self._jobs, *new]
            try:
                results = self._step(new)
            except Exception as e:  # a failed step fails the jobs in it; the engine starts over empty
                _deliver([(job, e) for job in running])
                self._jobs, self._cache, self._tokens = [], None, None
                continue
            _deliver([(job, item) for job, events, done in results for item in ([events, None] if done else [events])])

    @torch.inference_mode()
    def _step(self, new: list[_Job]) -> list[tuple[_Job, list[TokenEvent], bool]]:
        """Decode one token for every running row, prefill the new jobs, drop finished and cancelled rows."""
        results, parts, tokens = [], [], []
        jobs, self._jobs = self._jobs, []
        if jobs:
            logits, _ = self.model(self._tokens.unsqueeze(1), cache=self._cache)
            self.stats.decode_steps += 1
            self.stats.decoded_rows += len(self._tokens)
            self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(self._tokens))
            self.stats.max_batch_requests = max(self.stats.max_batch_requests, len(jobs))
            keep, row = [], 0
            for job in jobs:
                width = job.rows
                if job.cancelled:  # its client is gone: this step's rows are dropped unsampled
                    self.stats.cancelled_requests += 1
                    row += width
                    continue
                events, sampled, kept = job.advance(logits[row:row + width, -1], self.tokenizer)
                results.append((job, events, not kept))
                keep.extend(row + r for r in kept)
                tokens.append(sampled[kept])
                if kept:
                    self._jobs.append(job)
                row += width
            parts.append((self._cache, torch.tensor(keep, dtype=torch.long, device=self.device)))
        for job in new:
            cache = KVCache.allocate(self.model.config, job.rows, job.longest, self.device,
                                     self.model.lm_head.weight.dtype)
            logits, _ = self.model(job.ids, attention_mask=job.mask, cache=cache, last_only=True)
            events, sampled, kept = job.advance(logits[:, -1], self.tokenizer)
            results.append((job, events, not kept))
            if kept:
                parts.append((cache, torch.tensor(kept, dtype=torch.long, device=self.device)))
                tokens.append(sampled[kept])
                self._jobs.append(job)
        self.stats.tokens += sum(len(events) for _, events, _ in results)
        self.stats.finished_requests += sum(done for _, _, done in results)
        parts = [(cache, rows) for cache, rows in parts if len(rows)]
        changed = new or any(len(rows) < cache.valid.shape[0] for cache, rows in parts)
        if not self._jobs:
            self._cache, self._tokens = None, None
        elif changed:
            self._cache = _merge(parts, max(job.remaining for job in self._jobs))
            self._tokens = torch.cat(tokens)
        else:
            self._tokens = torch.cat(tokens)
        self.stats.active_requests = len(self._jobs)
        self.stats.active_rows = sum(job.rows for job in self._jobs)
        return results


class Transcript:
    """Collects a request's streamed events into `Completion`s: the streamed text is, by construction, the text."""

    def __init__(self, prompts: list[list[int]], n: int, eos_id: int):
        self.prompt_lengths, self.n, self.eos_id = [len(ids) for ids in prompts], n, eos_id
        self.texts = [""] * (len(prompts) * n)
        self.tokens: list[list[int]] = [[] for _ in self.texts]
        self.finish: list[str | None] = [None] * len(self.texts)

    def add(self, events: list[TokenEvent]) -> None:
        for e in events:
            self.texts[e.index] += e.text
            if e.token_id != self.eos_id:
                self.tokens[e.index].append(e.token_id)
            self.finish[e.index] = e.finish_reason

    def completions(self) -> list[Completion]:
        return [Completion(i, i // self.n, self.texts[i], self.tokens[i], self.finish[i] or "length",
                           self.prompt_lengths[i // self.n]) for i in range(len(self.texts))]

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = sum(self.prompt_lengths), sum(len(t) for t in self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
