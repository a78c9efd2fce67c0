"""One generation, whoever drives it: a Generator (a fixed batch) or the Engine (continuous batching).

A Sequence holds its prompt ids and prefill cursor, its settings, its noise stream, the characters
it generated and an explicit status. `accept` is the one place where a generated character is
judged: the length and the stop strings end a sequence there and nowhere else, so every driver
produces the same text for the same settings by construction.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence as Ids

import numpy as np

from .params import SamplingParams
from .sampling import GumbelNoise


class Status(enum.Enum):
    WAITING = "waiting"  # queued for a row
    PREFILL = "prefill"  # feeding its prompt
    GENERATING = "generating"
    FINISHED = "finished"  # see finish_reason


class Sequence:
    """The state machine of one generation: WAITING → (PREFILL →) GENERATING → FINISHED."""

    def __init__(self, prompt_ids: Ids[int] | np.ndarray, params: SamplingParams, vocab: list[str],
                 noise: GumbelNoise | None = None) -> None:
        self.prompt_ids, self.params, self.vocab = prompt_ids, params, vocab
        self.noise = noise if noise is not None else GumbelNoise([params.seed], len(vocab))
        self.fed = 0  # prompt characters fed so far
        self.chars: list[str] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None  # "length", "stop", "cancelled" or "error"
        self._longest_stop = max(map(len, params.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def text(self) -> str:
        return "".join(self.chars)

    def start(self) -> None:
        """It has a row: feed the prompt next, or generate (a zero length finishes at once)."""
        if self.params.length == 0:
            self.finish("length")
        else:
            self.status = Status.PREFILL if self.fed < len(self.prompt_ids) else Status.GENERATING

    def next_prompt_id(self) -> int:
        """The prompt's next character, to feed; the last one turns the sequence to GENERATING."""
        char_id = self.prompt_ids[self.fed]
        self.fed += 1
        if self.fed == len(self.prompt_ids):
            self.status = Status.GENERATING
        return char_id

    def accept(self, char_id: int) -> bool:
        """Add a sampled character; True when that ends the sequence (its length or a stop string)."""
        self.chars.append(self.vocab[char_id])
        if len(self.chars) >= self.params.length:
            self.finish("length")
        elif self._longest_stop and self._ends_with_stop():
            self.finish("stop")
        return self.finished

    def accept_many(self, char_ids: np.ndarray) -> int:
        """Accept characters in order until the sequence ends; returns how many it took."""
        if not self._longest_stop:  # only the length can end it: no need to look at each character
            taken = min(len(char_ids), self.params.length - len(self.chars))
            self.chars += [self.vocab[i] for i in char_ids[:taken]]
            if len(self.chars) >= self.params.length:
                self.finish("length")
            return taken
        for used, char_id in enumerate(char_ids, start=1):
            if self.accept(char_id):
                return used
        return len(char_ids)

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.status, self.finish_reason = Status.FINISHED, reason

    def _ends_with_stop(self) -> bool:
        tail = "".join(self.chars[-self._longest_stop:])
        return any(tail.endswith(stop) for stop in self.params.stop)
