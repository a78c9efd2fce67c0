"""What one generation asks for, validated once where it enters (the Python API, the CLI, HTTP).

Every refusal is a CharrnnError whose `.param` names the field (the Python API's name), so the
HTTP layer maps fields to its own names and never reads messages.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import secrets
from collections.abc import Iterable, Mapping
from numbers import Integral, Real

from .errors import CharrnnError

MAX_SEED = 2**64 - 1


def _integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The settings of one generation (vLLM's SamplingParams, for characters).

    temperature: softmax temperature, 0 = greedy; top_k / top_p: sample only from the k most likely
    characters / the smallest set holding this much probability; seed: the noise stream's seed (None:
    a random one, drawn here, so it can be reported and the run repeated); stop: strings that end the
    generation; include_stop: keep the stop string that ended it at the end of the text (vLLM's
    include_stop_str_in_output; True here, False over HTTP as OpenAI); length: the most characters
    to generate; logprobs: record each generated character's log-probability and the `logprobs`
    most likely alternatives, from the model's raw distribution (before temperature and bias);
    prompt_logprobs: the same for each prompt character after the first (the Engine feeds the
    prompt, so only it records them); logit_bias: {character id: bias in [-100, 100]} added to
    the logits before sampling.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | Iterable[str] | None = ()
    length: int = 1000
    include_stop: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: Mapping[int, float] | Iterable[tuple[int, float]] | None = ()

    def __post_init__(self) -> None:
        if not (_number(self.temperature) and self.temperature >= 0):
            raise CharrnnError(f"temperature must be a finite number >= 0, got {self.temperature!r}", "temperature")
        if self.top_k is not None and not (_integer(self.top_k) and self.top_k >= 1):
            raise CharrnnError(f"top-k must be an integer >= 1, got {self.top_k!r}", "top_k")
        if self.top_p is not None and not (_number(self.top_p) and 0 < self.top_p <= 1):
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
        if not isinstance(self.include_stop, bool):
            raise CharrnnError(f"include_stop must be true or false, got {self.include_stop!r}", "include_stop")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_integer(value) and value >= 0):
                raise CharrnnError(f"{name} must be an integer >= 0, got {value!r}", name)
        bias = dict(self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias or ())
        if not all(_integer(i) and i >= 0 and _number(b) and -100 <= b <= 100 for i, b in bias.items()):
            raise CharrnnError("logit_bias maps character ids (integers >= 0) to biases in [-100, 100]",
                               "logit_bias")
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))

    def check_vocabulary(self, size: int) -> None:
        """The checks that need the model: character ids and counts within its vocabulary."""
        if any(i >= size for i, _ in self.logit_bias):
            raise CharrnnError(f"logit_bias: character ids must be below the vocabulary size {size}", "logit_bias")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) > size:
                raise CharrnnError(f"{name} must be at most the vocabulary size {size}", name)

    @functools.cached_property
    def sampler(self) -> tuple:
        """What the draw itself depends on: rows with equal samplers are sampled together."""
        return self.temperature, self.top_k, self.top_p, self.logit_bias

    @property
    def plain(self) -> bool:
        """Plain temperature sampling, nothing recorded: what the bundle's sampling loop can run."""
        return (self.top_k is None and self.top_p is None and not self.logit_bias and self.logprobs is None)

    def replace(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def row(self, i: int) -> SamplingParams:
        """The settings of sample i of a batch: seed + i, so sample i equals a solo run with that seed."""
        return self if i == 0 else self.replace(seed=self.seed + i)
