"""The caller's side of an Engine request: one handle for threads and asyncio, and its Completion."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Iterator

from .sequence import Sequence
from .state import Continuation, State


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "length", "stop", "timeout", "cancelled", "rejected" or "error"
    seed: int
    prompt_chars: int
    generated_chars: int
    cached_chars: int = 0  # prompt characters whose state came from the prefix cache
    continuation: Continuation | None = dataclasses.field(default=None, compare=False)  # where it stopped


class Request:
    """The caller's handle on one submitted Sequence: read it from a thread or from asyncio alike.

    Iterate (`for` / `async for`) for chunks of text as they come, or wait for the whole
    Completion (`result()` / `await wait()`). `cancel()` stops it within the engine's window of steps.
    """

    def __init__(self, sequence: Sequence, model_identity: tuple[str, str]) -> None:
        self.sequence = sequence
        self.model_identity = model_identity  # (sha256, variant): what its continuation belongs to
        self.start_state: State | None = None  # its prompt fed: the row it joins the batch with
        self.final_state: State | None = None  # the row's state when it left the batch
        self.admitted_at: float | None = None  # when it got a row
        self.cancelled = False
        self.done = False  # finished, as its readers see it: set when the engine wakes them, all bookkeeping done
        self.streaming = False  # read chunk by chunk: woken every flush interval, not only at the end
        self.error: Exception | None = None
        self.submitted = time.monotonic()
        self.last_wake = 0.0
        self._read = 0  # characters handed to the reader so far
        self._changed = threading.Event()
        self._async_changed: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None


    @property
    def finish_reason(self) -> str | None:
        return self.sequence.finish_reason

    def cancel(self) -> None:
        """Stop generating at the engine's next step, or at its window's end (at most WINDOW steps) for a
        row that accepts its characters there (no-op once finished)."""
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

    @property
    def continuation(self) -> Continuation | None:
        """Where it stopped (state, seed, steps drawn), to continue it later exactly; None until
        finished, and for a request that never had its prompt fed."""
        if self.final_state is None:
            return None
        sequence = self.sequence
        return Continuation(self.final_state, sequence.params.seed, sequence.noise.drawn, *self.model_identity)

    def completion(self) -> Completion:
        sequence = self.sequence
        return Completion(sequence.text, sequence.finish_reason, sequence.params.seed, len(sequence.prompt_ids),
                          len(sequence.chars), sequence.cached, self.continuation)

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
        while self.admitted_at is None and not self.done:
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


def wake(requests, now: float) -> None:
    """Wake the readers of `requests`: one event-loop call per loop, not one per request. A finished
    request shows as done to its readers from here on: after all its bookkeeping (final state, counts)."""
    by_loop = collections.defaultdict(list)
    for request in requests:
        request.done = request.sequence.finished
        request._wake(now, by_loop)
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:  # the reader's event loop is closed: nobody is waiting any more
            pass


def _set_all(events) -> None:
    for event in events:
        event.set()
