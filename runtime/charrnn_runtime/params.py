"""What one generation asks for, validated once where it enters (the Python API, the CLI, HTTP).

Every refusal is a CharrnnError whose `.param` names the field (the Python API's name), so the
HTTP layer maps fields to its own names and never reads messages.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable
from numbers import Integral, Real

from .errors import CharrnnError

MAX_SEED = 2**64 - 1


def _integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The settings of one generation (vLLM's SamplingParams, for characters).

    temperature: softmax temperature, 0 = greedy; top_k / top_p: sample only from the k most likely
    characters / the smallest set holding this much probability; seed: the noise stream's seed (None:
    a random one, drawn here, so it can be reported and the run repeated); stop: strings that end the
    generation (kept in the text); length: the most characters to generate.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | Iterable[str] | None = ()
    length: int = 1000

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, Real) and not isinstance(self.temperature, bool)
                and math.isfinite(self.temperature) and self.temperature >= 0):
            raise CharrnnError(f"temperature must be a finite number >= 0, got {self.temperature!r}", "temperature")
        if self.top_k is not None and not (_integer(self.top_k) and self.top_k >= 1):
            raise CharrnnError(f"top-k must be an integer >= 1, got {self.top_k!r}", "top_k")
        if self.top_p is not None and not (isinstance(self.top_p, Real) and not isinstance(self.top_p, bool)
                                           and 0 < self.top_p <= 1):
            raise CharrnnError(f"top-p must be in (0, 1], got {self.top_p!r}", "top_p")
        if self.seed is None:
            object.__setattr__(self, "seed", secrets.randbits(31))
        elif not (_integer(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise CharrnnError(f"seed must be an integer in [0, 2**64), got {self.seed!r}", "seed")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise CharrnnError("stop strings must be non-empty strings", "stop")
        object.__setattr__(self, "stop", stop)
        if not (_integer(self.length) and self.length >= 0):
            raise CharrnnError(f"length must be an integer >= 0, got {self.length!r}", "length")

    @property
    def sampler(self) -> tuple[float, int | None, float | None]:
        """What the draw itself depends on: rows with equal samplers are sampled together."""
        return self.temperature, self.top_k, self.top_p

    def replace(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def row(self, i: int) -> SamplingParams:
        """The settings of sample i of a batch: seed + i, so sample i equals a solo run with that seed."""
        return self if i == 0 else self.replace(seed=self.seed + i)
