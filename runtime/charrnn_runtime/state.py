"""The whole context of n streams: the model's state tensors and the next character's logits.

A state is a few KB per stream whatever the text behind it, so it can be saved, forked, batched
and sent elsewhere; a Stepper advances it in place.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterable

import numpy as np

from . import files
from .errors import CharrnnError

PathLike = str | os.PathLike[str]


class State:
    """The state tensors {name: [n, size]} and next-character logits [n, vocab] of n streams.

    Names are the model's state inputs (`model.state_spec`). The initial state's logits are zeros,
    i.e. a uniform first character when there is no prompt.
    """

    def __init__(self, arrays: dict[str, np.ndarray], logits: np.ndarray) -> None:
        self.arrays, self.logits = dict(arrays), logits

    def __len__(self) -> int:
        return len(self.logits)

    def select(self, rows: Iterable[int] | np.ndarray) -> State:
        """A new state of the given rows (repeat a row to fork it)."""
        rows = np.asarray(rows, dtype=np.int64)
        return State({name: array[rows] for name, array in self.arrays.items()}, self.logits[rows])

    def fork(self, n: int) -> State:
        """Each stream repeated n times: feed a prompt once, then fan out into n continuations."""
        return self.select(np.repeat(np.arange(len(self)), n))

    def copy(self) -> State:
        return self.select(np.arange(len(self)))

    @classmethod
    def concat(cls, states: Iterable[State]) -> State:
        """One state holding the streams of `states` in order (states of the same model)."""
        states = list(states)
        names = list(states[0].arrays)
        if any(list(state.arrays) != names for state in states):
            raise CharrnnError("cannot concatenate states of different models")
        return cls({name: np.concatenate([state.arrays[name] for state in states]) for name in names},
                   np.concatenate([state.logits for state in states]))

    def save(self, path: PathLike) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, logits=self.logits, **self.arrays)
        with files.atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: PathLike) -> State:
        try:
            with np.load(path) as saved:
                arrays = {name: saved[name].astype(np.float32) for name in saved.files if name != "logits"}
                return cls(arrays, saved["logits"].astype(np.float32))
        except (OSError, ValueError, KeyError) as e:
            raise CharrnnError(f"not a saved charrnn state: {path} ({e})") from None


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Where a generation stopped, to go on from it exactly: the state of its one stream, its noise
    stream (seed, and steps drawn from it) and the model it belongs to (sha256, variant)."""

    state: State
    seed: int
    position: int
    sha256: str
    variant: str
