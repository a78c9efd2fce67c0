"""Prompts into states: one prefill call per prompt, beside the batch, and a prefix cache.

The whole context of a stream is its state, a few KB whatever the prompt's length, so the state
after a prompt can be kept and handed to the next request that starts with the same text: a hit
costs a copy, not a pass through the network. Prompts are cached at their end and every
`interval` characters along them, so a shared preamble followed by a new question feeds only the
new part.
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import NamedTuple

import numpy as np

from .state import State


class PrefixCache:
    """States after prompt prefixes, keyed by (model sha256, variant, text), least recently used
    out first, bounded in bytes (the states and their keys' text)."""

    INTERVAL = 256

    def __init__(self, max_bytes: int, interval: int = INTERVAL) -> None:
        self.max_bytes, self.interval = max_bytes, interval
        self.entries: collections.OrderedDict[tuple, tuple[State, int]] = collections.OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def lookup(self, model: tuple[str, str], text: str) -> tuple[int, State | None]:
        """The longest cached prefix of `text`: (its length, its state), or (0, None)."""
        lengths = [len(text), *range(len(text) - len(text) % self.interval, 0, -self.interval)]
        with self.lock:
            for length in lengths:
                found = self.entries.get((*model, text[:length]))
                if found is not None:
                    self.entries.move_to_end((*model, text[:length]))
                    return length, found[0]
        return 0, None

    def checkpoints(self, start: int, end: int) -> list[int]:
        """Where to stop feeding characters start..end to cache states on the way: each multiple of
        the interval, and the end."""
        return [*range(start - start % self.interval + self.interval, end, self.interval), end]

    def store(self, model: tuple[str, str], text: str, state: State) -> None:
        size = sum(a.nbytes for a in state.arrays.values()) + state.logits.nbytes + sys.getsizeof(text)
        if size > self.max_bytes:
            return
        with self.lock:
            key = (*model, text)
            if key in self.entries:
                self.entries.move_to_end(key)
                return
            self.entries[key] = state, size
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self.entries.popitem(last=False)
                self.bytes -= dropped


class Prefilled(NamedTuple):
    state: State  # after the prompt, one stream
    logits_before: np.ndarray | None  # [len(prompt), vocab]: before each prompt character (when asked)
    cached: int  # prompt characters restored from the cache
    fed: int  # prompt characters run through the network


def prefill(model, text: str, ids: np.ndarray, start: State | None = None, cache: PrefixCache | None = None,
            logits: bool = False) -> Prefilled:
    """The state after `text` (its ids), from `start` (default: the initial state). With `logits`,
    also the distribution before each character, so the cache (which has states, not logits) is
    not used for reading, only for storing; a continued stream (`start`) is never cached."""
    identity = (model.sha256, model.variant)
    cache = cache if start is None else None
    restored, state = cache.lookup(identity, text) if cache is not None and not logits else (0, None)
    if state is None:
        state = start if start is not None else model.initial_state(1)
    before, position = [state.logits], restored
    for end in cache.checkpoints(restored, len(ids)) if cache is not None else [len(ids)]:
        state, after = model.feed_ids(state, ids[position:end])
        before.append(after[0])
        if cache is not None:
            cache.store(identity, text[:end], state)
        position = end
    return Prefilled(state, np.concatenate(before)[:len(ids)] if logits else None, restored, len(ids) - restored)
