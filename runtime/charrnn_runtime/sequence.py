"""One generation, whoever drives it: a Generator (a fixed batch) or the Engine (continuous batching).

A Sequence holds its prompt ids, its settings, its noise stream, the characters
it generated and an explicit status. `accept` is the one place where a generated character is
judged: the length and the stop strings end a sequence there and nowhere else, so every driver
produces the same text for the same settings by construction. `readable` is the one place that
decides how much of the text may be shown while it is generated: a tail that could still become
a stop string is held back until decided (a stop string left out of the text is never shown).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence as Ids

import numpy as np

from .params import SamplingParams
from .sampling import GumbelNoise, log_softmax

# A character's log-probability and the most likely characters' ({character: log-probability},
# the character itself included), or None where there is nothing to condition on (the first of a prompt).
Logprob = tuple[float, dict[str, float]] | None


class Status(enum.Enum):
    WAITING = "waiting"  # queued
    PREFILL = "prefill"  # its prompt being fed (in one call, beside the batch)
    GENERATING = "generating"  # its state holds the prompt: sampling (or ready to, once it has a row)
    FINISHED = "finished"  # see finish_reason


class Sequence:
    """The state machine of one generation: WAITING → PREFILL → GENERATING → FINISHED."""

    def __init__(self, prompt_ids: Ids[int] | np.ndarray, params: SamplingParams, vocab: list[str],
                 noise: GumbelNoise | None = None) -> None:
        params.check_vocabulary(len(vocab))
        self.prompt_ids, self.params, self.vocab = prompt_ids, params, vocab
        self.noise = noise if noise is not None else GumbelNoise([params.seed], len(vocab))
        self.cached = 0  # prompt characters whose state came from a cache instead of the model
        self.chars: list[str] = []
        self.logprobs: list[Logprob] = []  # one per generated character, with params.logprobs
        self.prompt_logprobs: list[Logprob] = []  # one per prompt character, with params.prompt_logprobs
        self.status = Status.WAITING
        self.finished = False  # status is FINISHED (an attribute: the engine reads it per row and step)
        self.finish_reason: str | None = None  # "length", "stop", "timeout", "cancelled" or "error"
        self.stop_chars = 0  # the length of the stop string that ended it
        self._longest_stop = max(map(len, params.stop), default=0)

    @property
    def text(self) -> str:
        """The generated text: all of it, less the stop string that ended it unless include_stop."""
        end = len(self.chars) - (0 if self.params.include_stop else self.stop_chars)
        return "".join(self.chars[:end])

    def readable(self) -> int:
        """How many characters of `text` may be shown now: all once finished; before, all but a tail
        that could still turn out to be a stop string."""
        if self.finished:
            return len(self.chars) - (0 if self.params.include_stop else self.stop_chars)
        count = len(self.chars)
        if self.params.include_stop or not self._longest_stop:
            return count
        # the last longest-stop characters: a whole stop string is held too, for the moment between
        # a character joining `chars` and `accept` finishing the sequence (another thread may read then)
        tail = "".join(self.chars[max(0, count - self._longest_stop):count])
        held = next((k for k in range(len(tail), 0, -1) if any(s.startswith(tail[-k:]) for s in self.params.stop)), 0)
        return count - held

    def start_prefill(self) -> None:
        self.status = Status.PREFILL

    def prefilled(self, logits_before: np.ndarray | None = None, cached: int = 0) -> None:
        """Its prompt is in its state. `logits_before` [len(prompt), vocab]: the model's distribution
        before each prompt character, to record with prompt_logprobs (the first is None, as OpenAI's:
        there is nothing before it). A zero length then finishes it: a scorer."""
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] + [
                self._logprob(char_id, row, self.params.prompt_logprobs)
                for char_id, row in zip(self.prompt_ids[1:], log_softmax(logits_before[1:]))]
        self.cached = cached
        if self.params.length == 0:
            self.finish("length")
        else:
            self.status = Status.GENERATING

    def accept(self, char_id: int, logprobs: np.ndarray | None = None) -> bool:
        """Add a sampled character (`logprobs`: the distribution it was drawn from, to record with
        params.logprobs); True when that ends the sequence (its length or a stop string)."""
        if self.params.logprobs is not None:
            self.logprobs.append(self._logprob(char_id, logprobs, self.params.logprobs))
        self.chars.append(self.vocab[char_id])
        if len(self.chars) >= self.params.length:
            self.finish("length")
        elif self._longest_stop and (stop := self._ending_stop()):
            self.stop_chars = len(stop)
            self.finish("stop")
        return self.finished

    def accept_many(self, char_ids: np.ndarray, logprobs: np.ndarray | None = None) -> int:
        """Accept characters in order until the sequence ends (`logprobs`: one distribution per
        character, with params.logprobs); returns how many it took."""
        if not self._longest_stop and self.params.logprobs is None:  # only the length can end it
            taken = min(len(char_ids), self.params.length - len(self.chars))
            self.chars += [self.vocab[i] for i in char_ids[:taken]]
            if len(self.chars) >= self.params.length:
                self.finish("length")
            return taken
        rows = logprobs if logprobs is not None else [None] * len(char_ids)
        for used, (char_id, row) in enumerate(zip(char_ids, rows), start=1):
            if self.accept(char_id, row):
                return used
        return len(char_ids)

    def only_length_ends(self, after: int) -> bool:
        """Has it begun, and can only its length end it (no stop string; no log-probabilities to
        record), and not within the next `after` characters? Then it may accept them in one call."""
        return (bool(self.chars) and not self._longest_stop and self.params.logprobs is None
                and self.params.length - len(self.chars) > after)

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.status, self.finish_reason, self.finished = Status.FINISHED, reason, True

    def _ending_stop(self) -> str | None:
        tail = "".join(self.chars[-self._longest_stop:])
        return next((stop for stop in self.params.stop if tail.endswith(stop)), None)

    def _logprob(self, char_id: int, logprobs: np.ndarray, top: int) -> Logprob:
        best = np.argpartition(-logprobs, top - 1)[:top] if top else ()
        alternatives = {self.vocab[i]: float(logprobs[i]) for i in (*best, char_id)}
        return float(logprobs[char_id]), alternatives
