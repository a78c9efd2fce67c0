"""Continuous batching: concurrent requests share one batched step loop per model.

    engine = Engine(charrnn_runtime.load(), max_batch=64)
    completion = await engine.generate("ROMEO: ", 200, temperature=0.8, seed=1)   # asyncio
    async for chunk in engine.stream("JULIET:", 500): ...                        # inside a running loop
    request = engine.submit("ROMEO: ", 200); print(request.result().text)      # any thread

Every request is a Sequence. Its prompt is fed in one call of the prefill stage (prefill.py:
the bundle's prefill graph, and a prefix cache), beside the batch, so a long prompt neither waits
one batched step per character nor stalls the rows that are generating; the n choices of one
submission share that one prefill. Then it takes a row: `step()` samples every row (one draw per
settings group), lets each Sequence accept its character, and steps the model once for the whole
batch. Rows are admitted and evicted once a window of WINDOW steps (or at once when no row is left
generating), and the window's noise is drawn then for all rows: the per-row Python of regrouping the
batch is paid once a window, not every step, at the cost of a finished row's place staying idle
until the window ends (a new request waits at most WINDOW steps for it). So is accepting: a row that
cannot end within the window (only its length ends it, and not yet) takes the window's characters
at its end in one call; only the others (stop strings, log-probabilities, a first or last character)
are judged at every step, and a cancelled row stops at the window's end. A lone row of plain
sampling runs LOOP_WINDOW steps in one call of the bundle's sampling loop, as `model.generate` does.
With `background=True` (the default) two threads run the stages; `background=False` leaves them
to the caller's `step()`, as onnxruntime-genai's Engine does; EngineProcess (engine_process.py) runs
them in a process of its own, with the same caller API (Submitting, below). Each row samples with its own
settings and noise and model.generate feeds prompts through the same prefill graph, so a request's
text is `model.generate`'s with the same settings whatever shares the batch, for every variant
whose rows do not interact (fp32; bundles' int8 before the fixed-scale quantization shared a scale
across the batch).

Streaming readers are woken at most every `flush_seconds` with everything their row produced
since, so many clients cost tens of wake-ups per second each, not one per character; with many
streams the interval grows (STREAM_WAKE_SECONDS per streaming row), so the readers' work (an HTTP
event each) stays a bounded share of the cores the batch needs. A reader's first text comes at once. The
onnxruntime calls release the GIL, so an asyncio server keeps serving while the stages run.

Limits: `queue_timeout` refuses (EngineBusy) a request that waited longer for a row;
`request_timeout` ends a request after that many seconds from its submission with the text it has
(finish reason "timeout"). If a stage itself dies, every request fails at once and `status` says
so, instead of requests hanging. A finished request hands back its Continuation (state, noise
position): submitting with it continues exactly where it stopped.
"""

from __future__ import annotations

import abc
import collections
import threading
import time
import warnings
from collections.abc import Sequence as Listing
from typing import Any, NamedTuple

import numpy as np

from .errors import CharrnnError
from .params import SamplingParams
from .prefill import PrefixCache, prefill
from .request import Completion, Request, wake
from .sampling import GumbelNoise, check_finite, log_softmax, loop_inputs, sample
from .sequence import Sequence
from .state import Continuation, State
from .stepper import SamplingLoop, Stepper

__all__ = ["Completion", "Engine", "EngineBusy", "Request"]


class EngineBusy(CharrnnError):
    """The engine refuses new requests for now (queue full, draining or closed); retry later."""


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


class Job(NamedTuple):
    """One submission waiting for its prompt to be fed: its requests share the prefill."""

    text: str
    ids: np.ndarray
    requests: list[Request]
    start: State | None  # a continued stream's state, else the initial state


STREAM_WAKE_SECONDS = 0.001  # a streaming row's share of the wake interval: 256 streams → every 256 ms
LOOP_WINDOW = 64  # the window of a lone row of plain sampling: one call of the bundle's sampling loop
WINDOW = 4  # steps between admissions and evictions while rows generate: the per-row work of
# regrouping the batch and drawing its noise is done once a window, not every step


class Submitting(abc.ABC):
    """The caller's API over `submit_all`, and the checks a submission passes before it is queued:
    Engine's, and EngineProcess's (its engine in another process)."""

    model: Any
    max_length: int
    max_waiting: int
    identity: tuple[str, str]
    accepting: bool
    failure: BaseException | str | None

    @abc.abstractmethod
    def submit_all(self, prompt: str, params: Listing[SamplingParams],
                   continuation: Continuation | None = None) -> list[Request]:
        """Queue one request per SamplingParams, all from `prompt`, fed once (n choices): all are
        queued, or none (a CharrnnError or EngineBusy)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop; whatever is still queued or running ends as cancelled."""

    @property
    def status(self) -> str:
        """"ok", "draining" (new requests refused, those in flight finishing) or "failed" (a stage died)."""
        return "failed" if self.failure is not None else "ok" if self.accepting else "draining"

    @property
    def max_chars(self) -> int:
        """Deprecated name of max_length."""
        return self.max_length

    # -- callers ------------------------------------------------------------------------------------

    def submit(self, prompt: str, length: int | None = None, *, params: SamplingParams | None = None,
               continuation: Continuation | None = None, **settings: Any) -> Request:
        """Queue a request (validated here: a CharrnnError names the field, `.param`); returns its handle.

        `params`, or its fields as keywords (temperature, top_k, top_p, seed, stop, ...); `length`
        is the most characters to generate; `continuation`: go on from where a request stopped."""
        if "max_chars" in settings:
            warnings.warn("submit(max_chars=) is deprecated: use length=", DeprecationWarning, stacklevel=2)
            length = settings.pop("max_chars")
        if params is None:
            params = SamplingParams(length=length, **settings) if length is not None else SamplingParams(**settings)
        elif length is not None or settings:
            raise CharrnnError("pass either params or its fields, not both")
        return self.submit_all(prompt, [params], continuation)[0]

    def stream(self, prompt: str, length: int | None = None, **options: Any) -> Request:
        """Submit at once (errors raise here, before any await) a request to read with `async for`."""
        request = self.submit(prompt, length, **options)
        request.streaming = True
        return request

    async def generate(self, prompt: str, length: int | None = None, **options: Any) -> Completion:
        """The whole completion; cancelling the awaiting task cancels the request."""
        return await self.submit(prompt, length, **options).wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _checked(self, prompt: str, params: Listing[SamplingParams],
                 continuation: Continuation | None) -> tuple[np.ndarray, State | None]:
        """The prompt's ids and the continued state, once the submission passes every check."""
        if len(prompt) > self.max_length:
            raise CharrnnError(f"prompt is longer than {self.max_length} characters", "prompt")
        for p in params:
            if p.length > self.max_length:
                raise CharrnnError(f"length must be an integer in [0, {self.max_length}], got {p.length}", "length")
        return self.model.encode(prompt), self._check_continuation(continuation)

    def _refusal(self, waiting: int, count: int) -> str | None:
        """Why `count` more requests are refused now (EngineBusy), with `waiting` queued; None: they are not."""
        return (f"the engine stopped: {self.failure}" if self.failure is not None
                else "the server is shutting down: not accepting new requests" if not self.accepting
                else f"busy: {waiting} requests already waiting for a row" if waiting + count > self.max_waiting
                else None)

    def _check_continuation(self, continuation: Continuation | None) -> State | None:
        if continuation is None:
            return None
        if (continuation.sha256, continuation.variant) != self.identity:
            raise CharrnnError("the state belongs to another model or variant", "state")
        if len(continuation.state) != 1:
            raise CharrnnError("a continuation holds one stream", "state")
        self.model.check(continuation.state)
        return continuation.state


class Engine(Submitting):
    """Prefills and steps all active requests of `model` (continuous batching).

    max_batch: rows stepped together; max_waiting: requests queued (for their prefill or a row)
    before new ones are refused (EngineBusy); max_length: the longest prompt and the longest
    generation a request may ask for; queue_timeout / request_timeout: seconds (None: no limit);
    prefix_cache_bytes: the prefix cache's bound (0: no cache); background: run the stages in
    threads of the engine's own (else call `step()`)."""

    def __init__(self, model, max_batch: int = 64, max_waiting: int = 256, max_length: int = 4096,
                 flush_seconds: float = 0.02, queue_timeout: float | None = None,
                 request_timeout: float | None = None, prefix_cache_bytes: int = 64 << 20, background: bool = True,
                 **renamed: Any) -> None:
        if "max_chars" in renamed:
            warnings.warn("Engine(max_chars=) is deprecated: use max_length=", DeprecationWarning, stacklevel=2)
            max_length = renamed.pop("max_chars")
        if renamed:
            raise TypeError(f"Engine() got unexpected keyword arguments {sorted(renamed)}")
        for name, value in (("max_batch", max_batch), ("max_waiting", max_waiting), ("max_length", max_length)):
            if value < 1:
                raise CharrnnError(f"{name} must be >= 1, got {value}", name)
        self.model, self.max_batch, self.max_waiting, self.max_length = model, max_batch, max_waiting, max_length
        self.identity = model.sha256, model.variant
        self.flush_seconds, self.queue_timeout, self.request_timeout = flush_seconds, queue_timeout, request_timeout
        self.cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self.jobs: collections.deque[Job] = collections.deque()  # waiting for their prompt to be fed
        self.feeding: Job | None = None  # the job whose prompt is being fed now (outside the lock)
        self.ready: collections.deque[Request] = collections.deque()  # prompt fed, waiting for a row
        self.rows: list[Request] = []  # the requests in the batch, in row order
        self.stepper: Stepper | None = None  # the batch's state, one row per request
        self.groups: list[tuple[SamplingParams, np.ndarray]] = []  # rows sampled together, by sampler
        self.logprobs_wanted = False  # does a row record log-probabilities (then each step computes them)
        self.live = 0  # rows still generating (the others wait for the window's end to leave)
        self.window_noise: np.ndarray | None = None  # [window, rows, vocab]: every row's noise of this window
        self.window = WINDOW  # its steps: LOOP_WINDOW when `loop` runs them
        self.window_step = 0  # steps of the window taken
        self.judged: list[int] = []  # rows whose characters are judged at every step of the window
        self.deferred: list[int] = []  # rows that cannot end within the window: they accept its characters at its end
        self.deferred_chars: list[np.ndarray] = []  # the window's characters the deferred rows have not accepted yet
        self.loop: SamplingLoop | None = None  # the sampling loop, for a window of a lone plain row
        self.accepting = True
        self.failure: BaseException | None = None  # what killed a stage
        self.running = True
        self.changed = threading.Condition()
        self.counters = collections.Counter(
            requests_rejected_total=0, prompt_chars_total=0, prefix_cache_hits_total=0, prefix_cache_chars_total=0,
            generated_chars_total=0, steps_total=0, batch_rows_sum=0, step_seconds_sum=0.0)
        self.finished = collections.Counter()  # by finish reason
        self.histograms = {name: Histogram() for name in (
            "request_queue_time_seconds", "time_to_first_char_seconds", "e2e_request_latency_seconds")}
        self.threads = [threading.Thread(target=self._run, args=(stage,), name=f"charrnn-{name}", daemon=True)
                        for name, stage in (("prefill", self._prefill_next), ("batch", self.step))] \
            if background else []
        for thread in self.threads:
            thread.start()

    def submit_all(self, prompt: str, params: Listing[SamplingParams],
                   continuation: Continuation | None = None) -> list[Request]:
        ids, start = self._checked(prompt, params, continuation)
        requests = [Request(Sequence(ids, p, self.model.vocab, self._noise(p, continuation)), self.identity)
                    for p in params]
        with self.changed:
            refusal = self._refusal(self._waiting(), len(requests))
            if refusal:
                self.counters["requests_rejected_total"] += len(requests)
                raise EngineBusy(refusal)
            self.jobs.append(Job(prompt, ids, requests, start))
            self.changed.notify_all()
        return requests

    def metrics(self) -> dict[str, Any]:
        """Counters since start (requests_total by finish reason, characters, prefix cache hits, steps,
        step seconds, rows stepped), gauges (active rows, waiting requests, cache bytes) and histograms."""
        with self.changed:
            return {"requests_total": dict(self.finished), **self.counters, "active_rows": self.live,
                    "waiting_requests": self._waiting(), "max_batch": self.max_batch, "engines": 1,
                    "prefix_cache_bytes": self.cache.bytes if self.cache else 0,
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
            if not self.threads:
                self.step()
            else:
                with self.changed:
                    if self._busy():
                        self.changed.wait(remaining)
        return True

    def close(self) -> None:
        with self.changed:
            self.accepting = self.running = False
            self.changed.notify_all()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join()
        self._cancel_all()

    # -- the stages ---------------------------------------------------------------------------------

    def step(self) -> int:
        """Without threads, feed the queued prompts first. Then one batched step: admit/evict rows if
        the window is over, sample a character for every row, let each Sequence accept it, and step the
        model. Returns the rows stepped (0: nothing to do).

        A failing model step fails the requests in the batch (their readers get the error), not the engine."""
        if not self.threads:
            while self._prefill_next():
                pass
        with self.changed:
            if self.window_step == self.window or not self.live:
                self._schedule()
        if not self.rows:
            return 0
        started = time.perf_counter()
        try:
            if self.loop is not None and self.window_step == 0 and not self.rows[0].cancelled:
                steps, ended = self._sample_in_loop()
            else:
                chars, ended = self._sample_and_accept()
                self.stepper.step(chars)
                steps = 1
        except Exception as e:  # noqa: BLE001 - the requests' readers get it; the engine serves on
            self._accept_deferred()
            self._fail([r for r in self.rows if not r.sequence.finished],
                       e if isinstance(e, CharrnnError) else CharrnnError(f"generation failed: {e}"))
            self.live = 0
            return len(self.rows)
        self._keep_final_states(ended)
        self.window_step += steps
        window_ended = self.window_step == self.window
        if window_ended:
            self._accept_deferred()
        counters = self.counters  # counted before the readers wake: what they read next includes this step
        counters["generated_chars_total"] += (self.live + len(ended)) * steps  # the rows that took characters
        counters["steps_total"] += steps
        counters["batch_rows_sum"] += len(self.rows) * steps
        counters["step_seconds_sum"] += time.perf_counter() - started
        now = time.monotonic()
        rows = self.rows
        woken = [rows[i] for i in ended] + [  # and a stream's first text, at once
            rows[i] for i in self.judged
            if rows[i].streaming and not rows[i].sequence.finished and len(rows[i].sequence.chars) == steps]
        if window_ended:  # the streams due (their text is all in now)
            interval = max(self.flush_seconds, STREAM_WAKE_SECONDS * sum(r.streaming for r in rows))
            woken += [r for r in rows if r.streaming and not r.sequence.finished and now - r.last_wake >= interval]
        self._wake(woken, now)
        return len(rows)

    def _prefill_next(self) -> bool:
        """Feed the prompt of the oldest queued submission (outside the lock) and hand its requests
        to the batch: each to `ready`, or finished at once (a scorer). False when nothing is queued."""
        with self.changed:
            if not self.jobs:
                return False
            job = self.feeding = self.jobs.popleft()
            now = time.monotonic()
            self._expire(job.requests, now)
            live = [r for r in job.requests if not (r.cancelled or r.sequence.finished)]
            for request in live:
                request.sequence.start_prefill()
        if live:
            logits = any(r.sequence.params.prompt_logprobs is not None for r in live)
            try:
                fed = prefill(self.model, job.text, job.ids, job.start, self.cache, logits)
            except Exception as e:  # noqa: BLE001 - the requests' readers get it; the engine serves on
                with self.changed:
                    self.feeding = None
                    self._fail(live, e if isinstance(e, CharrnnError) else CharrnnError(f"prefill failed: {e}"))
                return True
        with self.changed:
            self.feeding = None
            if live:
                self.counters["prompt_chars_total"] += fed.fed
                self.counters["prefix_cache_hits_total"] += fed.cached > 0
                self.counters["prefix_cache_chars_total"] += fed.cached
            now = time.monotonic()
            for request in job.requests:
                if request.cancelled:
                    self._finish(request, "cancelled")
                elif not request.sequence.finished:
                    request.start_state = fed.state
                    request.sequence.prefilled(fed.logits_before, fed.cached)
                    if request.sequence.finished:  # nothing to generate
                        request.final_state = fed.state
                        self._finished(request, now)
                    else:
                        self.ready.append(request)
            self._wake([r for r in job.requests if r.sequence.finished], now)
            self.changed.notify_all()
        return True

    def _run(self, stage) -> None:
        """A stage's thread: run it while it has work, sleep while it has none. If the stage itself
        breaks (not the model: the stages survive that), every request fails at once."""
        try:
            while True:
                with self.changed:
                    while self.running and not self._has_work(stage):
                        self.changed.wait()
                    if not self.running:
                        return
                stage()
        except BaseException as e:
            with self.changed:
                self.failure, self.accepting, self.running = e, False, False
                failed = [*self.rows, *self.ready, *self._queued()]
                self.rows, self.stepper, self.ready = [], None, collections.deque()
                self.jobs.clear()
                self._fail(failed, EngineBusy(f"the engine stopped: {e}"))
                self.changed.notify_all()
            raise

    def _has_work(self, stage) -> bool:
        return bool(self.jobs) if stage == self._prefill_next else bool(self.rows or self.ready)

    def _schedule(self, evict_all: bool = False) -> None:
        """Evict finished and cancelled rows (keeping their final state), admit ready requests into free
        rows (under the lock); evict_all: also take every ready request off the queue (all are cancelled)."""
        now = time.monotonic()
        self._accept_deferred()
        unused = self.window - self.window_step if self.window_noise is not None else 0
        if unused:  # the rows still generating give back the noise of the window they did not use
            for request in self.rows:
                if not request.sequence.finished:
                    request.sequence.noise.put_back(unused)
        self._expire(self.ready, now)
        self._expire(self.rows, now)
        leaving = [r for r in self.rows if r.sequence.finished or r.cancelled]
        joining = []
        while self.ready and (evict_all or len(self.rows) - len(leaving) + len(joining) < self.max_batch):
            request = self.ready.popleft()
            if request.cancelled or request.sequence.finished:
                leaving.append(request)
            else:
                request.admitted_at = now
                self.histograms["request_queue_time_seconds"].observe(now - request.submitted)
                joining.append(request)
        if not leaving and not joining:
            self._start_window()
            return
        self._keep_final_states([i for i, r in enumerate(self.rows) if r.cancelled or r.sequence.finished])
        for request in leaving:
            self._finish(request, "cancelled")  # no-op for those that finished by themselves
        kept = [i for i, r in enumerate(self.rows) if not (r.sequence.finished or r.cancelled)]
        parts = ([self.stepper.state(kept)] if kept else []) + [r.start_state for r in joining]
        self.rows = [self.rows[i] for i in kept] + joining
        self.stepper = Stepper(self.model, State.concat(parts)) if self.rows else None
        groups = collections.defaultdict(list)
        for i, request in enumerate(self.rows):
            groups[request.sequence.params.sampler].append(i)
        self.groups = [(self.rows[members[0]].sequence.params, np.asarray(members)) for members in groups.values()]
        self.logprobs_wanted = any(r.sequence.params.logprobs is not None for r in self.rows)
        self._start_window()
        self._wake(leaving + joining, now)  # joining: for readers waiting for their row
        self.changed.notify_all()  # for drain()

    def _start_window(self) -> None:
        """Draw every row's noise for the window's steps (a row that ends early puts the rest back).
        A lone row of plain sampling (no stop string) takes LOOP_WINDOW steps in one call of the
        bundle's sampling loop, as `model.generate` does; a newcomer then waits at most that long."""
        self.live, self.window_step = len(self.rows), 0
        params = self.rows[0].sequence.params if len(self.rows) == 1 else None
        session = self.model.loop_session if params is not None and params.plain and not params.stop else None
        self.loop = SamplingLoop(session) if session is not None else None
        self.window = LOOP_WINDOW if self.loop is not None else WINDOW
        self.judged, self.deferred = [], []
        for i, request in enumerate(self.rows):
            deferred = self.loop is None and request.sequence.only_length_ends(after=self.window)
            (self.deferred if deferred else self.judged).append(i)
        self.window_noise = np.concatenate([r.sequence.noise.take(self.window) for r in self.rows], axis=1) \
            if self.rows else None

    def _accept_deferred(self) -> None:
        """The deferred rows accept the characters of the steps taken since they last did."""
        if self.deferred_chars:
            columns = np.stack(self.deferred_chars, axis=1)[self.deferred].tolist()
            self.deferred_chars = []
            for i, chars in zip(self.deferred, columns):
                if not self.rows[i].sequence.finished:  # (a failed step finished them all)
                    self.rows[i].sequence.accept_many(chars)

    def _keep_final_states(self, rows: list[int]) -> None:
        """The state of rows that end, for their continuations (taken once, right after their last step)."""
        rows = [i for i in rows if self.rows[i].final_state is None]
        if rows:
            final = self.stepper.state(rows)
            for k, i in enumerate(rows):
                self.rows[i].final_state = final.select([k])

    def _expire(self, requests, now: float) -> None:
        """The timeouts: past request_timeout a request ends with the text it has; waiting past
        queue_timeout without a row, it is refused (EngineBusy). A request with a row is woken once it
        leaves the batch (its final state kept); one without, here."""
        if self.request_timeout is None and self.queue_timeout is None:
            return
        for request in requests:
            if request.sequence.finished:
                continue
            waited = now - request.submitted
            if self.request_timeout is not None and waited > self.request_timeout:
                self._finish(request, "timeout")
            elif self.queue_timeout is not None and request.admitted_at is None and waited > self.queue_timeout:
                request.error = EngineBusy(f"busy: no row free within the queue timeout ({self.queue_timeout:g} s)")
                self._finish(request, "rejected")
            else:
                continue
            if request.admitted_at is None:
                request.final_state = request.start_state  # its prompt's, if it was fed
                self._wake([request], now)

    def _sample_and_accept(self) -> tuple[np.ndarray, list[int]]:
        """Every row's next character, sampled with its settings and noise, and accepted by its Sequence
        if it is judged at every step, else kept for the window's end (rows that ended earlier in the
        window are stepped, their characters dropped). Returns the
        characters and the rows that ended at this step: a cancelled row ends before it (its text and
        its final state without this character), a finished one after it."""
        rows = self.rows
        logprobs = log_softmax(self.stepper.logits) if self.logprobs_wanted else None
        chars = self._sample()
        if self.deferred:
            self.deferred_chars.append(chars)
        now = time.monotonic()
        finished = []
        for i, char in zip(self.judged, chars[self.judged].tolist()):
            request = rows[i]
            sequence = request.sequence
            if sequence.finished:
                continue
            if request.cancelled:
                self._keep_final_states([i])
                sequence.noise.put_back(self.window - self.window_step)
                self._finish(request, "cancelled")
                self.live -= 1
                continue
            if sequence.accept(char, None if logprobs is None else logprobs[i]):
                sequence.noise.put_back(self.window - self.window_step - 1)
                self._finished(request, now)
                self.live -= 1
                finished.append(i)
            if len(sequence.chars) == 1:
                self.histograms["time_to_first_char_seconds"].observe(now - request.submitted)
        return chars, finished

    def _sample_in_loop(self) -> tuple[int, list[int]]:
        """The lone row's window in one call of the sampling loop, up to its length (only the length
        can end plain sampling). Returns the steps taken and the rows that ended."""
        request = self.rows[0]
        sequence = request.sequence
        steps = min(self.window, sequence.params.length - len(sequence.chars))
        chars = self.loop.draw(self.stepper, *loop_inputs(sequence.params, self.window_noise[:steps]))
        check_finite(self.stepper.logits)
        now = time.monotonic()
        first = not sequence.chars
        sequence.accept_many(chars[:, 0])
        if first:
            self.histograms["time_to_first_char_seconds"].observe(now - request.submitted)
        if not sequence.finished:
            return steps, []
        sequence.noise.put_back(self.window - steps)
        self._finished(request, now)
        self.live -= 1
        return steps, [0]

    def _sample(self) -> np.ndarray:
        """Next characters of all rows, each with its own settings and its own seed's noise."""
        logits = self.stepper.logits
        noise = self.window_noise[self.window_step]
        if len(self.groups) == 1:
            return sample(logits, self.groups[0][0], noise).astype(np.int32)
        ids = np.empty(len(self.rows), np.int32)
        for params, members in self.groups:
            ids[members] = sample(logits[members], params, noise[members])
        return ids

    # -- bookkeeping --------------------------------------------------------------------------------

    def _noise(self, params: SamplingParams, continuation: Continuation | None) -> GumbelNoise:
        """The request's noise stream: a continuation's goes on where it stopped (same seed)."""
        start = continuation.position if continuation is not None and continuation.seed == params.seed else 0
        return GumbelNoise([params.seed], len(self.model.vocab), start)

    def _waiting(self) -> int:
        return len(self._queued()) + len(self.ready)

    def _queued(self) -> list[Request]:
        """The requests waiting for their prompt to be fed, or being fed now."""
        jobs = self.jobs if self.feeding is None else [self.feeding, *self.jobs]
        return [request for job in jobs for request in job.requests]

    def _finish(self, request: Request, reason: str) -> None:
        """End a request from outside its Sequence (cancelled, timed out, failed, refused)."""
        if not request.sequence.finished:
            request.sequence.finish(reason)
            self._finished(request, time.monotonic())

    def _finished(self, request: Request, now: float) -> None:
        """Count a request that has just finished, whatever ended it."""
        self.finished[request.finish_reason] += 1
        self.histograms["e2e_request_latency_seconds"].observe(now - request.submitted)

    def _fail(self, requests: list[Request], error: CharrnnError) -> None:
        for request in requests:
            request.error = error
            self._finish(request, "error")
        self._wake(requests, time.monotonic())

    def _busy(self) -> bool:
        with self.changed:
            return bool(self.rows or self.ready or self.jobs or self.feeding)

    def _cancel_all(self) -> None:
        """End everything queued or running as cancelled (the engine closes or a drain timed out).
        While threads run they evict them at their next step (they may be stepping them now)."""
        with self.changed:
            for request in (*self.rows, *self.ready, *self._queued()):
                request.cancel()
            if not any(thread.is_alive() for thread in self.threads):
                for job in self.jobs:
                    for request in job.requests:
                        self._finish(request, "cancelled")
                    self._wake(job.requests, time.monotonic())
                self.jobs.clear()
                self._schedule(evict_all=True)
            self.changed.notify_all()

    def _wake(self, requests: list[Request], now: float) -> None:
        """Every change a reader may see goes through here (EngineProcess's engine sends it on)."""
        wake(requests, now)
