"""An Engine in a process of its own (vLLM's engine core), with the same caller API.

    engine = EngineProcess(charrnn_runtime.load(variant="int8"), max_batch=256)
    completion = await engine.generate("ROMEO: ", 200, seed=1)   # or submit/stream, as with Engine

In one process, the batch thread's Python between its onnxruntime calls (sampling, accepting,
regrouping the batch) and an asyncio server's event loop take turns at the GIL, and the cores idle
while one waits for it: py-spy on charrnn-serve with 256 streaming clients found the batch thread
waiting for the GIL a fifth of the time. Here the Engine runs in a child process (a fresh
interpreter that loads the same model the same way and checks its sha256; the caller's copy of the
model stays for encoding and checks, so the model's memory is taken twice). The caller's process keeps a mirror of each
request, a Request like Engine's, that the engine's updates fill in (new characters, admission, the
finish, the continuation) and whose readers are woken as Engine wakes them; a cancel goes the
other way. Submissions are checked on the caller's side as Engine checks them, so a bad request or
a full queue (counted here) raises at submit as it does there; metrics, status and drain ask the
child. If the child dies, or a stage of its Engine does, every request in flight fails at once and
`status` says "failed".
"""

from __future__ import annotations

import itertools
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence as Listing
from multiprocessing.connection import Connection
from typing import Any

from .engine import Engine, EngineBusy, Submitting
from .errors import CharrnnError
from .params import SamplingParams
from .request import Request, wake
from .sequence import Sequence
from .state import Continuation

log = logging.getLogger(__name__)
NOISE_IN_ENGINE: Any = object()  # a mirror never samples: its Sequence's noise stream lives in the engine's process


class Call:
    """A question to the child, and its answer once it comes."""

    def __init__(self) -> None:
        self.answered = threading.Event()
        self.answer: Any = None

    def give(self, answer: Any) -> None:
        self.answer = answer
        self.answered.set()


class MirroredRequest(Request):
    """The caller's copy of a request that runs in the engine's process, filled in by its updates."""

    def __init__(self, engine: EngineProcess, key: int, sequence: Sequence, identity: tuple[str, str]) -> None:
        self._engine, self._key, self._streaming = engine, key, False
        self._continuation: Continuation | None = None
        super().__init__(sequence, identity)

    @property
    def streaming(self) -> bool:  # the engine's copy must know: it wakes streaming readers periodically
        return self._streaming

    @streaming.setter
    def streaming(self, value: bool) -> None:
        if value and not self._streaming and not self.done:
            self._engine._send(("stream", self._key))
        self._streaming = value

    def cancel(self) -> None:
        if not self.cancelled and not self.done:
            self._engine._send(("cancel", self._key))
        self.cancelled = True

    @property
    def continuation(self) -> Continuation | None:
        return self._continuation


class EngineProcess(Submitting):
    """Engine's API (submit, submit_all, stream, generate, metrics, drain, close, status) over an
    Engine of `model` in a child process; `options` are Engine's. Starting it loads the model there,
    as `model` was loaded, or with `threads` onnxruntime threads."""

    def __init__(self, model, max_waiting: int = 256, max_length: int = 4096, threads: int | None = None,
                 **options: Any) -> None:
        if "max_chars" in options:  # Engine's deprecated name: this side needs the value too
            raise TypeError("EngineProcess() takes max_length=, not max_chars=")
        self.model, self.max_waiting, self.max_length = model, max_waiting, max_length
        self.identity = model.sha256, model.variant
        self.accepting, self.failure = True, None
        self.gone = threading.Event()  # the child has exited
        self.requests: dict[int, MirroredRequest] = {}  # in flight, by key
        self.unadmitted: set[int] = set()  # keys waiting for their prefill or a row
        self.rejected = 0  # refused here (the child counts its own)
        self.keys = itertools.count()
        self.lock = threading.Lock()  # the tables above
        self.sending = threading.Lock()
        self.calls: dict[int, Call] = {}  # waiting for the child's answer, by key
        # A fresh interpreter (never a fork of one that runs onnxruntime threads, and unlike
        # multiprocessing's spawn it does not import the caller's __main__ again), its end of a socket pair.
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()])
        theirs.close()
        self.conn = Connection(ours.detach())
        arguments = model.arguments if threads is None else {**model.arguments, "threads": threads}
        self.conn.send((arguments, model.sha256, dict(max_waiting=max_waiting, max_length=max_length, **options)))
        try:
            started = self.conn.recv()
        except EOFError:
            raise CharrnnError(f"the engine's process exited while starting (exit code {self.process.wait()})")
        if started[0] == "failed":
            self.process.wait()
            raise started[1]
        self.last_metrics = started[1]  # the child's, until it answers again
        self.reader = threading.Thread(target=self._read, name="charrnn-engine-reader", daemon=True)
        self.reader.start()

    # -- callers (the rest is Submitting's) ---------------------------------------------------------

    def submit_all(self, prompt: str, params: Listing[SamplingParams],
                   continuation: Continuation | None = None) -> list[Request]:
        ids, _ = self._checked(prompt, params, continuation)
        with self.sending:  # checked and sent together: a drain or close is sent before or after, not between
            with self.lock:
                refusal = self._refusal(len(self.unadmitted), len(params))
                if refusal:
                    self.rejected += len(params)
                    raise EngineBusy(refusal)
                keys = [next(self.keys) for _ in params]
                mirrors = [MirroredRequest(self, key, Sequence(ids, p, self.model.vocab, NOISE_IN_ENGINE), self.identity)
                           for key, p in zip(keys, params)]
                self.requests.update(zip(keys, mirrors))
                self.unadmitted.update(keys)
            self._send_now(("submit", keys, prompt, list(params), continuation))
        return list(mirrors)

    @property
    def status(self) -> str:
        try:
            return self._call("status")
        except EngineBusy:  # it is gone: closed (then draining, as a closed Engine), or it died
            return "failed" if self.failure is not None else "draining"

    def metrics(self) -> dict[str, Any]:
        """Engine.metrics of the child (the last it gave, once it is gone), with the refusals counted here."""
        try:
            self.last_metrics = self._call("metrics")
        except EngineBusy:
            pass
        return {**self.last_metrics, "requests_rejected_total": self.last_metrics["requests_rejected_total"]
                + self.rejected}

    def drain(self, timeout: float) -> bool:
        """Engine.drain in the engine's process (this thread waits for it)."""
        self._stop_accepting()
        try:
            return self._call("drain", timeout)
        except EngineBusy:  # it is gone
            return False

    def close(self) -> None:
        self._stop_accepting()
        try:
            self.last_metrics = self._call("close", timeout=60)
        except EngineBusy:
            self.process.kill()  # gone already, or it hangs
        self.reader.join()
        self.conn.close()

    def in_flight(self) -> int:
        """Requests submitted and not finished (EnginePool sends the next submission to the engine with fewest)."""
        return len(self.requests)

    def waiting(self) -> int:
        """Requests waiting for their prefill or a row, as counted here (EnginePool bounds their sum)."""
        return len(self.unadmitted)

    def _stop_accepting(self) -> None:
        with self.sending:  # after any submit being sent now
            self.accepting = False

    # -- the pipe -----------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        with self.sending:
            self._send_now(message)

    def _send_now(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:  # the child is gone: the reader fails what is in flight
            pass

    def _call(self, *message: Any, timeout: float | None = None) -> Any:
        """Ask the child and wait for its answer (EngineBusy if it is gone, or silent past `timeout`)."""
        key, call = next(self.keys), Call()
        self.calls[key] = call
        if self.gone.is_set():  # (checked after registering: _lost ends every call it sees)
            call.answer = self.gone_error
        else:
            self._send(("call", key, *message))
            if not call.answered.wait(timeout):
                call.answer = EngineBusy(f"the engine's process did not answer within {timeout:g} s")
        del self.calls[key]
        if isinstance(call.answer, BaseException):
            raise call.answer
        return call.answer

    def _read(self) -> None:
        """The reader thread: apply the engine's updates and answers until its process ends."""
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "updates":
                    self._apply(*message[1:])
                elif message[1] in self.calls:  # ("answer", key, value), unless the caller stopped waiting
                    self.calls[message[1]].give(message[2])
        except (EOFError, OSError):
            pass
        except BaseException:  # a bug here must not leave every request waiting: the engine stops
            log.exception("reading the engine's process failed")
            self.process.kill()
        finally:
            self._lost()

    def _apply(self, updates: list[tuple], failure: str | None) -> None:
        """The requests' updates; `failure`: a stage of the engine died (its status says so from now on)."""
        now = time.monotonic()
        woken = []
        with self.lock:
            if failure is not None:
                self.failure, self.accepting = failure, False
            for key, chars, logprobs, admitted, prefilled, end in updates:
                request = self.requests[key]
                sequence = request.sequence
                sequence.logprobs += logprobs  # first, as Sequence.accept: a reader takes them with the characters
                sequence.chars += chars
                if prefilled is not None:
                    sequence.cached, sequence.prompt_logprobs = prefilled
                if admitted and request.admitted_at is None:
                    request.admitted_at = now
                    self.unadmitted.discard(key)
                if end is not None:
                    reason, sequence.stop_chars, request.error, request._continuation = end
                    sequence.finish(reason)
                    del self.requests[key]
                    self.unadmitted.discard(key)
                woken.append(request)
        wake(woken, now)

    def _lost(self) -> None:
        """The child is gone (closed, or died): whatever is in flight ends, and so do the calls waiting."""
        code = self.process.wait()
        with self.lock:
            if self.accepting or self.requests:
                self.failure = f"its process exited (exit code {code})"
            self.accepting = False
            left, self.requests = list(self.requests.values()), {}
            self.unadmitted.clear()
        error = self.gone_error = EngineBusy(f"the engine stopped: its process exited (exit code {code})")
        self.gone.set()
        for request in left:
            request.error = error
            request.sequence.finish("error")
        wake(left, time.monotonic())
        for call in list(self.calls.values()):
            call.give(error)


class PublishingEngine(Engine):
    """The Engine in the child: every change its readers would be woken for is sent to the caller's
    process instead, as one message per wake-up (what each request gained since its last update)."""

    def __init__(self, model, conn, **options: Any) -> None:
        self.conn, self.sending = conn, threading.Lock()
        self.published: dict[Request, list] = {}  # request → [key, characters sent, prefill sent]
        self.by_key: dict[int, Request] = {}
        super().__init__(model, **options)

    def _wake(self, requests: list[Request], now: float) -> None:
        updates = []
        for request in requests:
            request.done, request.last_wake = request.sequence.finished, now
            if request in self.published:
                updates.append(self._update(request))
        if updates:
            self._send(("updates", updates, None if self.failure is None else str(self.failure)))

    def _update(self, request: Request) -> tuple:
        published = self.published[request]
        key, sent, prefill_sent = published
        sequence = request.sequence
        published[1] = len(sequence.chars)
        prefilled = None
        if not prefill_sent and request.start_state is not None:
            published[2], prefilled = True, (sequence.cached, sequence.prompt_logprobs)
        end = None
        if request.done:
            end = sequence.finish_reason, sequence.stop_chars, request.error, request.continuation
            del self.published[request], self.by_key[key]
        return (key, sequence.chars[sent:], sequence.logprobs[sent:], request.admitted_at is not None, prefilled, end)

    def _send(self, message: tuple) -> None:
        with self.sending:
            self.conn.send(message)

    def serve(self) -> None:
        """Take the caller's messages until it closes the engine or goes away."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the caller's process is gone
                self.close()
                return
            kind = message[0]
            if kind == "submit":
                self._submit(*message[1:])
            elif kind != "call":  # stream or cancel (the request may have ended meanwhile)
                request = self.by_key.get(message[1])
                if request is not None and kind == "stream":
                    request.streaming = True
                elif request is not None:
                    request.cancel()
            elif message[2] == "drain":  # it waits for the requests in flight: the messages go on meanwhile
                threading.Thread(target=self._answer, args=(message[1], self.drain, message[3]), daemon=True).start()
            elif message[2] == "close":
                self._answer(message[1], self._close_and_count)
                return
            else:
                self._answer(message[1], {"status": lambda: self.status, "metrics": self.metrics}[message[2]])

    def _submit(self, keys: list[int], prompt: str, params: list[SamplingParams],
                continuation: Continuation | None) -> None:
        with self.changed:  # registered before any stage can wake them
            try:
                requests = self.submit_all(prompt, params, continuation)
            except CharrnnError as e:  # refused here though the caller's checks passed (its count of waiting
                # requests lags this one by the updates in flight, or a stage died)
                self._send(("updates", [(key, [], [], False, None, ("rejected", 0, e, None)) for key in keys], None))
                return
            for key, request in zip(keys, requests):
                self.published[request] = [key, 0, False]
                self.by_key[key] = request

    def _close_and_count(self) -> dict[str, Any]:
        """Close, and answer with the final metrics (the caller's, once this process is gone)."""
        self.close()
        return self.metrics()

    def _answer(self, key: int, call, *args: Any) -> None:
        try:
            answer = call(*args)
        except Exception as e:  # noqa: BLE001 - raised to the caller
            answer = e
        self._send(("answer", key, answer))


def _serve(conn: Connection) -> None:
    """The child process: load the model as the caller did, run its Engine, serve the pipe."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the caller drains and closes it: a Ctrl-C or a stop
        signal.signal(sig, signal.SIG_IGN)  # sent to the whole group must not end it first (it ends
    # when the caller closes it, or with the pipe if the caller dies)
    from charrnn_runtime.model import load
    arguments, sha256, options = conn.recv()
    try:
        model = load(**arguments)
        if model.sha256 != sha256:
            raise CharrnnError(f"the model at {model.path} changed while the engine started")
        engine = PublishingEngine(model, conn, **options)
    except BaseException as e:  # noqa: BLE001 - the caller raises it
        conn.send(("failed", e))
        return
    conn.send(("ready", engine.metrics()))
    engine.serve()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
