"""Continuous batching: concurrent requests share one batched step loop per model.

    engine = Engine(charrnn_runtime.load(variant="int8"), max_batch=64)
    completion = await engine.generate("ROMEO: ", 200, temperature=0.8, seed=1)   # asyncio
    async for chunk in engine.stream("JULIET:", 500): ...                        # inside a running loop
    request = engine.submit("ROMEO: ", 200); print(request.result().text)      # any thread

Every request is a row of one batch, stepped by one thread. A request joins at the next step and
feeds its prompt one character per step (prefill) while the other rows generate; it leaves at its
length, at its first stop string, or when its caller cancels, and its row is freed at once. Each
row samples with its own settings and draws its noise from its own seed, so a request's text is
the text `model.generate` gives with the same seed and settings, whatever else shares the batch
(exactly so for fp32, whose rows do not interact; the int8 variant quantizes each step's
activations with one scale for the whole batch, so there a neighbour can shift a near-tie).

Streaming consumers are woken at most every `flush_seconds` (20 ms) with everything their row
produced since, so many clients cost tens of wake-ups per second each, not one per character
(64 streaming HTTP clients on 2 cores kept 41% of the in-process rate at 5 ms, 56% at 20 ms).
The onnxruntime step releases the GIL, so an asyncio server keeps serving while the loop runs.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import numpy as np

from .errors import CharrnnError
from .model import Model, State, Stepper
from .sampling import GumbelNoise, SamplingParams, sample


class EngineBusy(CharrnnError):
    """The engine refuses new requests for now (queue full, draining or closed); retry later."""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "length", "stop" or "cancelled"
    seed: int
    prompt_chars: int
    generated_chars: int


class Request:
    """One submitted generation: its row's progress, and the handle its caller reads from."""

    def __init__(self, prompt_ids, max_chars, params, seed, stops, streaming, loop):
        self.prompt_ids, self.max_chars, self.params, self.seed = prompt_ids, max_chars, params, seed
        self.stops, self.streaming, self.loop = stops, streaming, loop
        self.prompt_chars = len(prompt_ids)
        self.longest_stop = max(map(len, stops), default=0)
        self.noise = None  # the Gumbel noise of its seed, set up when it joins the batch
        self.fed = 0  # prompt characters fed so far
        self.chars = []  # generated characters; appended by the engine thread only
        self.finish_reason = None
        self.error = None
        self.cancelled = False
        self.read = 0  # characters handed to the caller so far
        self.last_wake = 0.0
        self.wake = asyncio.Event() if loop else threading.Event()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating; the row is freed at the next step (no-op once finished)."""
        self.cancelled = True

    def take(self) -> tuple[str, bool]:
        """(new text since the last take, finished?); the finish flag is read first, so no text is lost."""
        done = self.done
        end = len(self.chars)
        chunk, self.read = "".join(self.chars[self.read:end]), end
        if done and self.error is not None:
            raise self.error
        return chunk, done

    def __iter__(self) -> Iterator[str]:
        """Chunks of generated text as they come (blocking; for threads)."""
        while True:
            self.wake.wait()
            self.wake.clear()
            chunk, done = self.take()
            if chunk:
                yield chunk
            if done:
                return

    async def __aiter__(self) -> AsyncIterator[str]:
        """Chunks of generated text as they come (asyncio); leaving the loop early cancels the request."""
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                chunk, done = self.take()
                if chunk:
                    yield chunk
                if done:
                    return
        finally:
            self.cancel()

    def result(self, timeout: float | None = None) -> Completion:
        """The Completion, once finished (blocking; for threads, not for asyncio)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if not self.wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                raise TimeoutError("generation did not finish in time")
            self.wake.clear()
        if self.error is not None:
            raise self.error
        return self.completion()

    def completion(self) -> Completion:
        return Completion("".join(self.chars), self.finish_reason, self.seed, self.prompt_chars, len(self.chars))


class Engine:
    """One thread steps all active requests of `model` as one batch (continuous batching)."""

    def __init__(self, model: Model, max_batch: int = 64, max_waiting: int = 256, max_chars: int = 4096,
                 flush_seconds: float = 0.02) -> None:
        for name, value in (("max_batch", max_batch), ("max_waiting", max_waiting), ("max_chars", max_chars)):
            if value < 1:
                raise CharrnnError(f"{name} must be >= 1, got {value}")
        self.model, self.max_batch, self.max_waiting, self.max_chars = model, max_batch, max_waiting, max_chars
        self.vocab = np.asarray(model.vocab)
        self.flush_seconds = flush_seconds
        self.waiting = collections.deque()
        self.rows = []  # the requests in the batch, in row order
        self.accepting = True
        self.running = True
        self.changed = threading.Condition()
        self.counters = collections.Counter(requests_rejected_total=0, prompt_chars_total=0, generated_chars_total=0,
                                            steps_total=0, batch_rows_sum=0, step_seconds_sum=0.0)
        self.finished = collections.Counter()  # by finish reason
        self.thread = threading.Thread(target=self._loop, name="charrnn-engine", daemon=True)
        self.thread.start()

    # -- callers ------------------------------------------------------------------------------------

    def submit(self, prompt: str, max_chars: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop: str | Iterable[str] = (),
               streaming: bool = False, loop: asyncio.AbstractEventLoop | None = None) -> Request:
        """Queue a request (validated here: a CharrnnError names what is wrong); returns its Request."""
        ids = self.model.encode(prompt)
        params = SamplingParams(temperature, top_k, top_p)
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or not 0 <= max_chars <= self.max_chars:
            raise CharrnnError(f"max_chars must be an integer in [0, {self.max_chars}], got {max_chars!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise CharrnnError("stop strings must be non-empty strings")
        if seed is None:
            seed = secrets.randbits(31)
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise CharrnnError(f"seed must be a non-negative integer, got {seed!r}")
        request = Request(ids, max_chars, params, seed, stops, streaming, loop)
        with self.changed:
            if not self.accepting:
                self.counters["requests_rejected_total"] += 1
                raise EngineBusy("the server is shutting down: not accepting new requests")
            if len(self.waiting) >= self.max_waiting:
                self.counters["requests_rejected_total"] += 1
                raise EngineBusy(f"busy: {len(self.waiting)} requests already waiting for a row")
            self.waiting.append(request)
            self.changed.notify()
        return request

    def stream(self, prompt: str, max_chars: int, **options: Any) -> Request:
        """Submit at once (errors raise here, before any await) a request to read with `async for`.

        Chunks come as the row produces them; afterwards `finish_reason` says why it ended. Leaving
        the loop early, or cancelling the reading task, cancels the request and frees its row."""
        return self.submit(prompt, max_chars, streaming=True, loop=asyncio.get_running_loop(), **options)

    async def generate(self, prompt: str, max_chars: int, **options: Any) -> Completion:
        """The whole completion; cancelling the awaiting task cancels the request."""
        request = self.submit(prompt, max_chars, loop=asyncio.get_running_loop(), **options)
        try:
            while not request.done:
                await request.wake.wait()
                request.wake.clear()
        finally:
            request.cancel()
        if request.error is not None:
            raise request.error
        return request.completion()

    def metrics(self) -> dict[str, Any]:
        """Counters since start (requests_total by finish reason, characters, steps, step seconds, rows
        stepped) and gauges (active rows, waiting requests)."""
        with self.changed:
            return {"requests_total": dict(self.finished), **self.counters, "active_rows": len(self.rows),
                    "waiting_requests": len(self.waiting), "max_batch": self.max_batch}

    def drain(self, timeout: float) -> bool:
        """Refuse new requests, let the ones in flight finish; cancel what remains after `timeout` s.

        True when everything finished in time."""
        deadline = time.monotonic() + timeout
        with self.changed:
            self.accepting = False
            while self.rows or self.waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    for request in (*self.rows, *self.waiting):
                        request.cancel()
                    self.changed.notify_all()
                    return False
                self.changed.wait(remaining)
        return True

    def close(self) -> None:
        """Stop the loop; whatever is still queued or running ends as cancelled."""
        with self.changed:
            self.accepting = self.running = False
            self.changed.notify_all()
        if threading.current_thread() is not self.thread:
            self.thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop -----------------------------------------------------------------------------------

    def _loop(self):
        stepper = None
        while True:
            with self.changed:
                leaving = [r for r in self.rows if r.done or r.cancelled or not self.running]
                joining = []
                while self.running and self.waiting and len(self.rows) - len(leaving) + len(joining) < self.max_batch:
                    request = self.waiting.popleft()
                    (leaving if request.cancelled else joining).append(request)  # cancelled while queued
                if not self.running:
                    leaving += list(self.waiting)
                    self.waiting.clear()
                if leaving or joining:
                    stepper = self._regroup(stepper, leaving, joining)
                    self.changed.notify_all()  # for drain()
                if not self.running:
                    return
                if not self.rows:
                    self.changed.wait()
                    continue
            try:
                self._step(stepper)
            except Exception as e:  # noqa: BLE001 - the callers get the error; the loop keeps serving
                for request in self.rows:
                    request.error = e if isinstance(e, CharrnnError) else CharrnnError(f"generation failed: {e}")
                    self._finish(request, "error")
                self._wake(self.rows, time.monotonic())

    def _regroup(self, stepper, leaving, joining):
        """New batch membership: drop finished/cancelled rows, add new ones with the initial state."""
        for request in leaving:
            self._finish(request, "cancelled")
        for request in joining:
            self.counters["prompt_chars_total"] += request.prompt_chars
            if request.max_chars == 0:
                self._finish(request, "length")
        started = [r for r in joining if not r.done]
        self._wake(leaving + [r for r in joining if r.done], time.monotonic())
        gone = {id(r) for r in leaving}
        kept = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        parts = [stepper.state().select(kept)] if stepper is not None and kept else []
        if started:
            parts.append(self.model.initial_state(len(started)))
        for request in started:
            request.noise = GumbelNoise([request.seed], len(self.model.vocab))
        self.rows = rows = [self.rows[i] for i in kept] + started
        self.all_rows = np.arange(len(rows))
        self.prefilling = sum(r.fed < r.prompt_chars for r in rows)
        groups = collections.defaultdict(list)
        for i, request in enumerate(rows):
            groups[request.params].append(i)
        self.groups = [(params, np.asarray(members)) for params, members in groups.items()]
        if not rows:
            return None
        return Stepper(self.model, State.concat(parts))

    def _finish(self, request, reason):
        if request.finish_reason is None:
            request.finish_reason = reason
            self.finished[reason] += 1

    def _step(self, stepper):
        """Sample for the rows past their prompt, then advance every row by one character."""
        started = time.perf_counter()
        rows = self.rows
        if self.prefilling:  # rows still feeding their prompt take its next character instead of a sample
            chars = np.empty(len(rows), np.int32)
            generating = np.ones(len(rows), bool)
            for i, request in enumerate(rows):
                if request.fed < request.prompt_chars:
                    chars[i] = request.prompt_ids[request.fed]
                    request.fed += 1
                    generating[i] = False
                    self.prefilling -= request.fed == request.prompt_chars
            sampled = np.flatnonzero(generating)
            chars[sampled] = self._sample(stepper.logits, sampled)
        else:
            sampled = self.all_rows
            chars = self._sample(stepper.logits, sampled)
        now = time.monotonic()
        woken = []
        for request, char in zip([rows[i] for i in sampled], self.vocab[chars[sampled]].tolist()):
            request.chars.append(char)
            if len(request.chars) >= request.max_chars:
                self._finish(request, "length")
            elif request.stops:
                text = "".join(request.chars[-request.longest_stop:])
                if any(text.endswith(s) for s in request.stops):
                    self._finish(request, "stop")
            if request.finish_reason or (request.streaming and now - request.last_wake >= self.flush_seconds):
                woken.append(request)
        stepper.step(chars)
        self._wake(woken, now)
        counters = self.counters
        counters["generated_chars_total"] += len(sampled)
        counters["steps_total"] += 1
        counters["batch_rows_sum"] += len(rows)
        counters["step_seconds_sum"] += time.perf_counter() - started

    def _sample(self, logits, rows):
        """Next characters of `rows` (indices), each with its own settings and its own seed's noise."""
        if not len(rows):
            return np.empty(0, np.int32)
        noise = np.concatenate([self.rows[i].noise.next() for i in rows])
        if len(self.groups) == 1:
            return sample(logits[rows], self.groups[0][0], noise)
        ids = np.empty(len(rows), np.int32)
        position = np.full(len(self.rows), -1)
        position[rows] = np.arange(len(rows))
        for params, members in self.groups:
            members = members[position[members] >= 0]
            ids[position[members]] = sample(logits[members], params, noise[position[members]])
        return ids

    def _wake(self, requests, now):
        """Wake the callers of `requests`: one event-loop call per loop, not one per request."""
        by_loop = collections.defaultdict(list)
        for request in requests:
            request.last_wake = now
            if request.loop is None:
                request.wake.set()
            else:
                by_loop[request.loop].append(request.wake)
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
                pass


def _set_all(events):
    for event in events:
        event.set()
