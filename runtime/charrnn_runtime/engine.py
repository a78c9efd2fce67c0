"""Continuous batching: concurrent requests share one batched step loop per model.

    engine = Engine(charrnn_runtime.load(), max_batch=64)
    completion = await engine.generate("ROMEO: ", 200, temperature=0.8, seed=1)   # asyncio
    async for chunk in engine.stream("JULIET:", 500): ...                        # inside a running loop
    request = engine.submit("ROMEO: ", 200); print(request.result().text)      # any thread

Every request is a Sequence in a row of one batch. `step()` admits and evicts rows, feeds each
prefilling row its prompt's next character and samples the others (one draw per settings group),
lets each Sequence accept its character, and steps the model once for the whole batch. A thread
calls it in a loop (`background=True`, the default); `background=False` leaves stepping to the
caller, as onnxruntime-genai's Engine does. Each row samples with its own settings and noise, so a
request's text is `model.generate`'s with the same settings whatever shares the batch (exactly so
for fp32, whose rows do not interact; the int8 variant quantizes each step's activations with one
scale for the whole batch, so there a neighbour can shift a near-tie).

Streaming readers are woken at most every `flush_seconds` with everything their row produced
since, so many clients cost tens of wake-ups per second each, not one per character. The
onnxruntime step releases the GIL, so an asyncio server keeps serving while the loop runs.

Limits: `queue_timeout` refuses (EngineBusy) a request that waited longer for a row;
`request_timeout` ends a request after that many seconds from its submission with the text it has
(finish reason "timeout"). If the loop itself dies, every request fails at once and `status`
says so, instead of requests hanging.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from .errors import CharrnnError
from .params import SamplingParams
from .sampling import log_softmax, sample
from .sequence import Sequence, Status
from .state import State
from .stepper import Stepper


class EngineBusy(CharrnnError):
    """The engine refuses new requests for now (queue full, draining or closed); retry later."""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "length", "stop", "timeout", "cancelled" or "error"
    seed: int
    prompt_chars: int
    generated_chars: int


class Histogram:
    """A Prometheus histogram: counts per upper bound (cumulative when read), sum and count."""

    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, bound in enumerate(self.BOUNDS) if value <= bound), len(self.BOUNDS))] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """{"buckets": [(upper bound, cumulative count)...], "sum", "count"}; the last bound is inf."""
        cumulative = np.cumsum(self.counts).tolist()
        return {"buckets": list(zip((*self.BOUNDS, float("inf")), cumulative)), "sum": self.sum,
                "count": cumulative[-1]}


class Request:
    """The caller's handle on one submitted Sequence: read it from a thread or from asyncio alike.

    Iterate (`for` / `async for`) for chunks of text as they come, or wait for the whole
    Completion (`result()` / `await wait()`). `cancel()` frees the row at the next step.
    """

    def __init__(self, sequence: Sequence) -> None:
        self.sequence = sequence
        self.cancelled = False
        self.streaming = False  # read chunk by chunk: woken every flush interval, not only at the end
        self.error: Exception | None = None
        self.submitted = time.monotonic()
        self.last_wake = 0.0
        self._read = 0  # characters handed to the reader so far
        self._changed = threading.Event()
        self._async_changed: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    @property
    def done(self) -> bool:
        return self.sequence.finished

    @property
    def finish_reason(self) -> str | None:
        return self.sequence.finish_reason

    def cancel(self) -> None:
        """Stop generating; the row is freed at the next step (no-op once finished)."""
        self.cancelled = True

    def take(self) -> tuple[str, bool]:
        """(new readable text since the last take, finished?); the finish flag is read first, so no
        text is lost. A tail that could still become a stop string waits (Sequence.readable)."""
        done = self.done
        end = self.sequence.readable()
        chunk, self._read = "".join(self.sequence.chars[self._read:end]), end
        if done and self.error is not None:
            raise self.error
        return chunk, done

    def completion(self) -> Completion:
        sequence = self.sequence
        return Completion(sequence.text, sequence.finish_reason, sequence.params.seed, len(sequence.prompt_ids),
                          len(sequence.chars))

    def __iter__(self) -> Iterator[str]:
        """Chunks of generated text as they come (blocking)."""
        self.streaming, done = True, False
        while not done:
            chunk, done = self.take()
            if chunk:
                yield chunk
            elif not done:
                self._changed.wait()
                self._changed.clear()

    async def __aiter__(self) -> AsyncIterator[str]:
        """Chunks of generated text as they come; leaving the loop early cancels the request."""
        self.streaming, done = True, False
        changed = self._asyncio_event()
        try:
            while not done:
                chunk, done = self.take()
                if chunk:
                    yield chunk
                elif not done:
                    await changed.wait()
                    changed.clear()
        finally:
            self.cancel()

    def result(self, timeout: float | None = None) -> Completion:
        """The Completion, once finished (blocking)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if not self._changed.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                raise TimeoutError("generation did not finish in time")
            self._changed.clear()
        return self._completed()

    async def wait(self) -> Completion:
        """The Completion, once finished; cancelling the awaiting task cancels the request."""
        changed = self._asyncio_event()
        try:
            while not self.done:
                await changed.wait()
                changed.clear()
        finally:
            self.cancel()
        return self._completed()

    async def admitted(self) -> None:
        """Wait until the request has a row (or ended without one); a refusal raises here."""
        changed = self._asyncio_event()
        while self.sequence.status is Status.WAITING:
            await changed.wait()
            changed.clear()
        if self.error is not None:
            raise self.error

    def _completed(self) -> Completion:
        if self.error is not None:
            raise self.error
        return self.completion()

    def _asyncio_event(self) -> asyncio.Event:
        """An event of the running loop that the engine sets (registered before the caller looks)."""
        loop = asyncio.get_running_loop()
        if self._async_changed is None or self._async_changed[0] is not loop:
            self._async_changed = loop, asyncio.Event()
        return self._async_changed[1]

    def _wake(self, now: float, by_loop: dict) -> None:
        self.last_wake = now
        self._changed.set()
        if self._async_changed is not None:
            loop, event = self._async_changed
            by_loop[loop].append(event)


class Engine:
    """Steps all active requests of `model` as one batch (continuous batching).

    max_batch: rows stepped together; max_waiting: requests queued for a row before new ones are
    refused (EngineBusy); max_length: the longest prompt and the longest generation a request may
    ask for; queue_timeout / request_timeout: seconds (None: no limit, see above); background:
    step in a thread of the engine's own (else call `step()`)."""

    def __init__(self, model, max_batch: int = 64, max_waiting: int = 256, max_length: int = 4096,
                 flush_seconds: float = 0.02, queue_timeout: float | None = None,
                 request_timeout: float | None = None, background: bool = True, **renamed: Any) -> None:
        if "max_chars" in renamed:
            warnings.warn("Engine(max_chars=) is deprecated: use max_length=", DeprecationWarning, stacklevel=2)
            max_length = renamed.pop("max_chars")
        if renamed:
            raise TypeError(f"Engine() got unexpected keyword arguments {sorted(renamed)}")
        for name, value in (("max_batch", max_batch), ("max_waiting", max_waiting), ("max_length", max_length)):
            if value < 1:
                raise CharrnnError(f"{name} must be >= 1, got {value}", name)
        self.model, self.max_batch, self.max_waiting, self.max_length = model, max_batch, max_waiting, max_length
        self.flush_seconds, self.queue_timeout, self.request_timeout = flush_seconds, queue_timeout, request_timeout
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Request] = []  # the requests in the batch, in row order
        self.stepper: Stepper | None = None  # the batch's state, one row per request
        self.groups: list[tuple[SamplingParams, np.ndarray]] = []  # rows sampled together, by sampler
        self.logprobs_wanted = False  # does a row record log-probabilities (then each step computes them)
        self.accepting = True
        self.failure: BaseException | None = None  # what killed the loop
        self.running = True
        self.changed = threading.Condition()
        self.counters = collections.Counter(requests_rejected_total=0, prompt_chars_total=0, generated_chars_total=0,
                                            steps_total=0, batch_rows_sum=0, step_seconds_sum=0.0)
        self.finished = collections.Counter()  # by finish reason
        self.histograms = {name: Histogram() for name in (
            "request_queue_time_seconds", "time_to_first_char_seconds", "e2e_request_latency_seconds")}
        self.thread = threading.Thread(target=self._run, name="charrnn-engine", daemon=True) if background else None
        if self.thread is not None:
            self.thread.start()

    @property
    def status(self) -> str:
        """"ok", "draining" (new requests refused, those in flight finishing) or "failed" (the loop died)."""
        return "failed" if self.failure is not None else "ok" if self.accepting else "draining"

    @property
    def max_chars(self) -> int:
        """Deprecated name of max_length."""
        return self.max_length

    # -- callers ------------------------------------------------------------------------------------

    def submit(self, prompt: str, length: int | None = None, *, params: SamplingParams | None = None,
               **settings: Any) -> Request:
        """Queue a request (validated here: a CharrnnError names the field, `.param`); returns its handle.

        `params`, or its fields as keywords (temperature, top_k, top_p, seed, stop); `length` is the
        most characters to generate."""
        if "max_chars" in settings:
            warnings.warn("submit(max_chars=) is deprecated: use length=", DeprecationWarning, stacklevel=2)
            length = settings.pop("max_chars")
        if params is None:
            params = SamplingParams(length=length, **settings) if length is not None else SamplingParams(**settings)
        elif length is not None or settings:
            raise CharrnnError("pass either params or its fields, not both")
        if params.length > self.max_length:
            raise CharrnnError(f"length must be an integer in [0, {self.max_length}], got {params.length}", "length")
        if len(prompt) > self.max_length:
            raise CharrnnError(f"prompt is longer than {self.max_length} characters", "prompt")
        request = Request(Sequence(self.model.encode(prompt), params, self.model.vocab))
        with self.changed:
            if self.failure is not None:
                self.counters["requests_rejected_total"] += 1
                raise EngineBusy(f"the engine stopped: {self.failure}")
            if not self.accepting:
                self.counters["requests_rejected_total"] += 1
                raise EngineBusy("the server is shutting down: not accepting new requests")
            if len(self.waiting) >= self.max_waiting:
                self.counters["requests_rejected_total"] += 1
                raise EngineBusy(f"busy: {len(self.waiting)} requests already waiting for a row")
            self.waiting.append(request)
            self.changed.notify()
        return request

    def stream(self, prompt: str, length: int | None = None, **options: Any) -> Request:
        """Submit at once (errors raise here, before any await) a request to read with `async for`."""
        request = self.submit(prompt, length, **options)
        request.streaming = True
        return request

    async def generate(self, prompt: str, length: int | None = None, **options: Any) -> Completion:
        """The whole completion; cancelling the awaiting task cancels the request."""
        return await self.submit(prompt, length, **options).wait()

    def metrics(self) -> dict[str, Any]:
        """Counters since start (requests_total by finish reason, characters, steps, step seconds, rows
        stepped) and gauges (active rows, waiting requests)."""
        with self.changed:
            return {"requests_total": dict(self.finished), **self.counters, "active_rows": len(self.rows),
                    "waiting_requests": len(self.waiting), "max_batch": self.max_batch,
                    **{name: histogram.snapshot() for name, histogram in self.histograms.items()}}

    def drain(self, timeout: float) -> bool:
        """Refuse new requests, let the ones in flight finish; cancel what remains after `timeout` s.

        True when everything finished in time."""
        deadline = time.monotonic() + timeout
        with self.changed:
            self.accepting = False
        while self._busy():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._cancel_all()
                return False
            if self.thread is None:
                self.step()
            else:
                with self.changed:
                    if self.rows or self.waiting:
                        self.changed.wait(remaining)
        return True

    def close(self) -> None:
        """Stop stepping; whatever is still queued or running ends as cancelled."""
        with self.changed:
            self.accepting = self.running = False
            self.changed.notify_all()
        if self.thread is None:
            self._cancel_all()
        elif threading.current_thread() is not self.thread:
            self.thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop -----------------------------------------------------------------------------------

    def step(self) -> int:
        """One batched step: admit/evict rows, then feed or sample a character for every row, let each
        Sequence accept it, and step the model. Returns the rows stepped (0: nothing to do).

        A failing step fails the requests in the batch (their readers get the error), not the engine."""
        with self.changed:
            self._schedule()
        if not self.rows:
            return 0
        started = time.perf_counter()
        try:
            chars, sampled = self._next_chars()
            self.stepper.step(chars)
        except Exception as e:  # noqa: BLE001 - the requests' readers get it; the engine serves on
            self._fail_batch(e if isinstance(e, CharrnnError) else CharrnnError(f"generation failed: {e}"))
            return len(self.rows)
        now = time.monotonic()
        self._wake([r for r in self.rows if r.done or (r.streaming and now - r.last_wake >= self.flush_seconds)], now)
        counters = self.counters
        counters["generated_chars_total"] += sampled
        counters["steps_total"] += 1
        counters["batch_rows_sum"] += len(self.rows)
        counters["step_seconds_sum"] += time.perf_counter() - started
        return len(self.rows)

    def _run(self) -> None:
        """The background thread: step while there is work, sleep while there is none. If stepping
        itself breaks (not the model: step() survives that), every request fails at once."""
        try:
            while True:
                with self.changed:
                    while self.running and not self.rows and not self.waiting:
                        self.changed.wait()
                    if not self.running:
                        break
                self.step()
        except BaseException as e:
            with self.changed:
                self.failure, self.accepting = e, False
                failed = [*self.rows, *self.waiting]
                self.rows, self.stepper = [], None
                self.waiting.clear()
                for request in failed:
                    request.error = EngineBusy(f"the engine stopped: {e}")
                    self._finish(request, "error")
                self._wake(failed, time.monotonic())
                self.changed.notify_all()
            raise
        self._cancel_all()

    def _schedule(self, evict_all: bool = False) -> None:
        """Evict finished and cancelled rows, admit waiting requests into free rows (under the lock);
        evict_all: take every waiting request off the queue at once (all are cancelled)."""
        now = time.monotonic()
        expired = self._expire(now)
        leaving = [r for r in self.rows if r.done or r.cancelled]
        joining = []
        while self.waiting and (evict_all or len(self.rows) - len(leaving) + len(joining) < self.max_batch):
            request = self.waiting.popleft()
            if not request.cancelled:
                self.histograms["request_queue_time_seconds"].observe(now - request.submitted)
                request.sequence.start()
                self.counters["prompt_chars_total"] += len(request.sequence.prompt_ids)
                if request.done:  # nothing to generate
                    self._finished(request, now)
            (leaving if request.cancelled or request.done else joining).append(request)
        if expired:
            self._wake(expired, now)
        if not leaving and not joining:
            return
        for request in leaving:
            self._finish(request, "cancelled")  # no-op for those that finished by themselves
        gone = {id(r) for r in leaving}
        kept = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        parts = [self.stepper.state().select(kept)] if kept else []
        if joining:
            parts.append(self.model.initial_state(len(joining)))
        self.rows = [self.rows[i] for i in kept] + joining
        self.stepper = Stepper(self.model, State.concat(parts)) if self.rows else None
        groups = collections.defaultdict(list)
        for i, request in enumerate(self.rows):
            groups[request.sequence.params.sampler].append(i)
        self.groups = [(self.rows[members[0]].sequence.params, np.asarray(members)) for members in groups.values()]
        self.logprobs_wanted = any(r.sequence.params.logprobs is not None or r.sequence.params.prompt_logprobs
                                   is not None for r in self.rows)
        self._wake(leaving + joining, now)  # joining: for readers waiting for admission
        self.changed.notify_all()  # for drain()

    def _expire(self, now: float) -> list[Request]:
        """Apply the timeouts: a request waiting too long is refused (or ends, past request_timeout),
        a row past request_timeout ends with its text. Returns the refused and ended waiting requests."""
        expired = []
        while self.waiting and not self.waiting[0].cancelled:
            waited = now - self.waiting[0].submitted
            if self.request_timeout is not None and waited > self.request_timeout:
                request = self.waiting.popleft()
                self._finish(request, "timeout")
            elif self.queue_timeout is not None and waited > self.queue_timeout:
                request = self.waiting.popleft()
                request.error = EngineBusy(f"busy: no row free within the queue timeout ({self.queue_timeout:g} s)")
                self._finish(request, "rejected")
            else:
                break
            expired.append(request)
        if self.request_timeout is not None:
            for request in self.rows:
                if now - request.submitted > self.request_timeout:
                    self._finish(request, "timeout")
        return expired

    def _next_chars(self) -> tuple[np.ndarray, int]:
        """Each row's next character: its prompt's while prefilling, else a sample it accepts.
        Returns the characters and how many were sampled."""
        rows = self.rows
        logprobs = log_softmax(self.stepper.logits) if self.logprobs_wanted else [None] * len(rows)
        generating = np.fromiter((r.sequence.status is Status.GENERATING for r in rows), bool, len(rows))
        chars = np.empty(len(rows), np.int32)
        now = time.monotonic()
        for i in np.flatnonzero(~generating):
            chars[i] = rows[i].sequence.next_prompt_id(logprobs[i])
            if rows[i].done:  # a scorer (length 0): done once its prompt is fed
                self._finished(rows[i], now)
        sampled = np.flatnonzero(generating)
        chars[sampled] = self._sample(sampled)
        for i, char in zip(sampled.tolist(), chars[sampled].tolist()):
            request = rows[i]
            if request.sequence.accept(char, logprobs[i]):
                self._finished(request, now)
            if len(request.sequence.chars) == 1:
                self.histograms["time_to_first_char_seconds"].observe(now - request.submitted)
        return chars, len(sampled)

    def _sample(self, rows: np.ndarray) -> np.ndarray:
        """Next characters of `rows` (indices), each with its own settings and its own seed's noise."""
        if not len(rows):
            return np.empty(0, np.int32)
        logits = self.stepper.logits
        noise = np.concatenate([self.rows[i].sequence.noise.next() for i in rows])
        if len(self.groups) == 1:
            return sample(logits[rows], self.groups[0][0], noise)
        ids = np.empty(len(rows), np.int32)
        position = np.full(len(self.rows), -1)
        position[rows] = np.arange(len(rows))
        for params, members in self.groups:
            members = members[position[members] >= 0]
            ids[position[members]] = sample(logits[members], params, noise[position[members]])
        return ids

    def _finish(self, request: Request, reason: str) -> None:
        """End a request from outside its Sequence (cancelled, timed out, failed, refused)."""
        if not request.done:
            request.sequence.finish(reason)
            self._finished(request, time.monotonic())

    def _finished(self, request: Request, now: float) -> None:
        """Count a request that has just finished, whatever ended it."""
        self.finished[request.finish_reason] += 1
        self.histograms["e2e_request_latency_seconds"].observe(now - request.submitted)

    def _fail_batch(self, error: CharrnnError) -> None:
        for request in self.rows:
            request.error = error
            self._finish(request, "error")
        self._wake(self.rows, time.monotonic())

    def _busy(self) -> bool:
        with self.changed:
            return bool(self.rows or self.waiting)

    def _cancel_all(self) -> None:
        """End everything queued or running as cancelled (the engine closes or a drain timed out).
        With a thread, the thread evicts them at its next step (it may be stepping them now)."""
        with self.changed:
            for request in (*self.rows, *self.waiting):
                request.cancel()
            if self.thread is None or threading.current_thread() is self.thread:
                self._schedule(evict_all=True)
            self.changed.notify_all()

    def _wake(self, requests: list[Request], now: float) -> None:
        """Wake the readers of `requests`: one event-loop call per loop, not one per request."""
        by_loop = collections.defaultdict(list)
        for request in requests:
            request._wake(now, by_loop)
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # the reader's event loop is closed: nobody is waiting any more
                pass


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()
