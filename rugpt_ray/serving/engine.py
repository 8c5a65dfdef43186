"""Continuous batching for one model: requests join the running batch between decode steps and leave when done.

The decoding itself is `generation.Decoder`, the same one `generation.stream` runs: each request's rows take
slots of its preallocated KV cache, are prefilled at the next step and then decode one token per step next
to the others; a finished or cancelled row gives its slot back and nothing else moves. Each row samples from
its own seeded generator, so a seeded request gives the same tokens alone or batched, streamed or not. This
module only serves: it queues and admits requests while slots are free, enforces deadlines, drops cancelled
requests and keeps counters (and, given an `EngineMetrics`, Prometheus metrics). Requests may name a LoRA
adapter of the engine's model: they decode in the same steps as the others (see generation.py); an adapter
is put into the model between steps by `hold_adapter` and stays while it is held or in use. A request may follow a
constraint (constraints.py; compiled by the caller, off the event loop): each of its rows gets its own matcher when
it joins the decoder. Model work runs on one worker thread per engine that steps back to back, so neither waits for
the other: the event loop accepts requests and streams tokens while a step computes.

Torch's OpenMP (libgomp) keeps a thread's team of helper threads until that thread ends, and once a process holds
more of them than it has cores, every team stops spin-waiting between parallel regions and sleeps instead: on 2
cores a decode step of ruGPT3Small took a quarter longer, one of the tiny model twice as long. The worker thread
ends when the engine is idle, its team with it, and other torch work in a server (loading weights, building the
engine) goes through `in_passing_thread`, never a pooled thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TypeVar

from rugpt_ray.constraints import Constraint
from rugpt_ray.generation import Decoder, GenerationConfig, TokenEvent
from rugpt_ray.lora import Adapter
from rugpt_ray.model import GPT
from rugpt_ray.tokenizer import RuGPTTokenizer

if TYPE_CHECKING:  # the metrics need Ray; the engine runs without it
    from rugpt_ray.serving.metrics import EngineMetrics

T = TypeVar("T")

STEP_PAUSE_ENV = "RUGPT_TEST_ENGINE_STEP_PAUSE_S"
"""A test seam, no setting: seconds the worker thread waits after each decode step (unset: none), read when an engine
starts. With it a test can send a request that cannot end before its timeout however fast the machine is (a
request of N tokens takes N steps, so at least N pauses); nothing in the package sets it."""


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
    """One request inside the engine: its prompts and settings, its decoder slots, its event queue."""

    def __init__(self, prompts: list[list[int]], cfg: GenerationConfig, loop: asyncio.AbstractEventLoop,
                 adapter: tuple[str, Adapter] | None, constraint: Constraint | None):
        self.prompts, self.cfg, self.adapter, self.constraint = prompts, cfg, adapter, constraint
        self.rows = len(prompts) * cfg.num_return_sequences
        self.slots: list[int] = []  # decoder slot of each sequence, set on admission
        self.live: set[int] = set()  # slots of the sequences still decoding
        self.cancelled = False
        self.deadline, self.timeout_s = float("inf"), None  # time.monotonic() after which the engine gives up
        self.arrived = time.monotonic()
        self.last_tokens_at: float | None = None  # when a step last gave this job events
        self.generated = 0  # output tokens so far
        self.loop = loop
        self.queue: asyncio.Queue[list[TokenEvent] | BaseException | None] = asyncio.Queue()


async def in_passing_thread(work: Callable[[], T]) -> T:
    """`work()` on a thread of its own that ends with it, off the event loop: the OpenMP team its torch ops start
    ends too, and leaves the engines' teams the machine's cores (see the module's docstring)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="rugpt-load")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, work)
    finally:
        pool.shutdown(wait=False)


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


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # its waiter was cancelled
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class BatchEngine:
    """Continuous batching over one model; `generate` is the only entry point and may be called concurrently.

    `max_batch_size` rows decode together at most: the decoder's KV cache holds that many full-context slots.
    """

    def __init__(self, model: GPT, tokenizer: RuGPTTokenizer, max_batch_size: int = 32,
                 metrics: EngineMetrics | None = None):
        self.model, self.tokenizer, self.max_batch_size = model.eval(), tokenizer, max_batch_size
        self.metrics = metrics
        self.decoder = Decoder(model, tokenizer, max_batch_size)  # touched by the worker thread only
        self.stats = EngineStats()
        self._lock = threading.Lock()  # guards _waiting and _worker, shared with the event loop(s)
        self._waiting: deque[_Job] = deque()
        self._kept: dict[str, int] = {}  # adapter name -> holders that want it to stay in the model
        self._arriving: list[tuple[str, Adapter, asyncio.Future]] = []  # adapters to put in at the next step
        self._worker: threading.Thread | None = None
        self._jobs: list[_Job] = []  # admitted, touched by the worker thread only
        self._step_pause_s = float(os.environ.get(STEP_PAUSE_ENV) or 0)

    @property
    def context(self) -> int:
        return self.decoder.capacity

    @property
    def rows(self) -> int:
        """The model's vocabulary rows, which a constraint is compiled for."""
        return self.decoder.rows

    def check(self, prompts: list[list[int]], cfg: GenerationConfig, constraint: Constraint | None = None) -> None:
        """Refuse what could never run (`RequestError` naming the field): too many rows, past the context, a
        constraint compiled for another model or with `ignore_eos`."""
        self.decoder.check(prompts, cfg, constraint)

    @property
    def kept_adapters(self) -> list[str]:
        with self._lock:
            return sorted(self._kept)

    async def hold_adapter(self, name: str, adapter: Adapter) -> None:
        """Put `adapter` into the model under `name` (at the next step boundary) and keep it there between its
        requests, until as many `release_adapter` calls."""
        arrived = asyncio.get_running_loop().create_future()
        with self._lock:
            self._kept[name] = self._kept.get(name, 0) + 1
            self._arriving.append((name, adapter, arrived))
            self._wake()
        await arrived

    def release_adapter(self, name: str) -> None:
        """The adapter leaves the model at the next step in which no row uses it."""
        with self._lock:
            if self._kept.get(name, 0) > 1:
                self._kept[name] -= 1
            else:
                self._kept.pop(name, None)

    async def generate(self, prompts: list[list[int]], cfg: GenerationConfig, timeout_s: float | None = None,
                       adapter: tuple[str, Adapter] | None = None,
                       constraint: Constraint | None = None) -> AsyncIterator[list[TokenEvent]]:
        """Yield each step's events for this request (steps that were ready together come as one list), decoded
        through `adapter` (a name and its weights) if given, every row following `constraint` if given.

        Leaving the iteration early (client gone, cancellation) drops the request's rows from the batch at
        the next step; so does `timeout_s`, checked between steps, which then raises TimeoutError here.
        """
        self.check(prompts, cfg, constraint)
        job = _Job(prompts, cfg, asyncio.get_running_loop(), adapter, constraint)
        if timeout_s is not None:
            job.deadline, job.timeout_s = time.monotonic() + timeout_s, timeout_s
        with self._lock:
            self._waiting.append(job)
            self._wake()
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

    def _wake(self) -> None:
        """Under the lock: start the worker thread unless it runs."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="rugpt-engine", daemon=True)
            self._worker.start()

    def _admit(self) -> list[_Job]:
        """Under the lock: waiting jobs that fit in the free slots, first come first served."""
        new, free = [], self.decoder.free_slots + sum(len(job.live) for job in self._jobs if job.cancelled)
        while self._waiting and (self._waiting[0].cancelled or self._waiting[0].rows <= free):
            job = self._waiting.popleft()
            if job.cancelled:
                self.stats.cancelled_requests += 1
            else:
                new.append(job)
                free -= job.rows
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
                kept, arriving, self._arriving = set(self._kept), self._arriving, []
                if not self._jobs and not new and not arriving:
                    self._worker = None
                    self.stats.active_requests = self.stats.active_rows = 0
                    if self.metrics:
                        self.metrics.requests(0, len(self._waiting))
                    return
            self._add_adapters(arriving)
            running = [*self._jobs, *new]
            if not running:
                continue
            try:
                self.decoder.prune_adapters(kept)
                results = self._step(new)
            except Exception as e:  # a failed step fails the jobs in it; the engine starts over empty
                _deliver([(job, e) for job in running if not job.cancelled])
                self._jobs = []
                self.decoder.clear()
                continue
            _deliver([(job, item) for job, events, done in results for item in ([events, None] if done else [events])])
            if self._step_pause_s:
                time.sleep(self._step_pause_s)

    def _add_adapters(self, arriving: list[tuple[str, Adapter, asyncio.Future]]) -> None:
        """Put arriving adapters into the model and tell their holders (or hand them the error)."""
        for name, adapter, arrived in arriving:
            try:
                self.decoder.add_adapter(name, adapter)
                outcome = None
            except Exception as e:
                outcome = e
            arrived.get_loop().call_soon_threadsafe(_settle, arrived, outcome)

    def _step(self, new: list[_Job]) -> list[tuple[_Job, list[TokenEvent], bool]]:
        """Drop cancelled jobs, add the new ones, and run one decoder step: each job's events and whether it is done."""
        for job in self._jobs:
            if job.cancelled:  # its client is gone: its slots go back before this step
                self.decoder.release(sorted(job.live))
                self.stats.cancelled_requests += 1
        self._jobs = [job for job in self._jobs if not job.cancelled]
        decoding_requests, decoding_rows = len(self._jobs), self.decoder.decoding_rows
        for job in new:
            try:
                job.slots = self.decoder.add(job.prompts, job.cfg, owner=job, adapter=job.adapter,
                                             constraint=job.constraint)
            except Exception as e:  # an adapter that does not fit fails its request only
                _deliver([(job, e)])
                continue
            job.live = set(job.slots)
            self._jobs.append(job)
        events: dict[int, list[TokenEvent]] = {id(job): [] for job in self._jobs}
        for job, event in self.decoder.step():
            events[id(job)].append(event)
            if event.finish_reason is not None:
                job.live.discard(job.slots[event.index])
        if decoding_rows:
            self.stats.decode_steps += 1
            self.stats.decoded_rows += decoding_rows
            self.stats.max_batch_rows = max(self.stats.max_batch_rows, decoding_rows)
            self.stats.max_batch_requests = max(self.stats.max_batch_requests, decoding_requests)
        results = [(job, events[id(job)], not job.live) for job in self._jobs]
        self._jobs = [job for job in self._jobs if job.live]
        self.stats.tokens += sum(len(e) for _, e, _ in results)
        self.stats.finished_requests += sum(done for _, _, done in results)
        self.stats.active_requests = len(self._jobs)
        self.stats.active_rows = sum(len(job.live) for job in self._jobs)
        if self.metrics:
            self._observe(results, decoding_rows)
        return results

    def _observe(self, results: list[tuple[_Job, list[TokenEvent], bool]], decoding_rows: int) -> None:
        """Latencies, token counts, queue sizes and batch rows of the step that just ended."""
        now = time.monotonic()
        for job, events, done in results:
            if not events:
                continue
            if job.last_tokens_at is None:
                self.metrics.first_token(now - job.arrived)
            else:
                self.metrics.inter_token(now - job.last_tokens_at)
            job.last_tokens_at = now
            job.generated += sum(e.token_id is not None for e in events)
            if done:
                self.metrics.finished(now - job.arrived, sum(map(len, job.prompts)), job.generated)
        if decoding_rows:
            self.metrics.decode_step(decoding_rows)
        self.metrics.requests(len(self._jobs), len(self._waiting))
