"""A fixed batch of streams sampled together, with its state exposed (onnxruntime-genai's Generator).

    generator = model.generator("ROMEO: ", num_samples=4, seed=1, temperature=0.8, length=200)
    texts = generator.run()               # or, for one stream: for char in generator.stream(): ...
    generator.state                       # save it, fork it, continue it later

Each row is a Sequence (row i draws from seed + i), so what ends a row and when is decided where
the Engine decides it too. With one stream of plain temperature sampling and a bundle's sampling
loop, BLOCK characters are drawn per onnxruntime call; otherwise one session run per character.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from .errors import CharrnnError
from .params import SamplingParams
from .sampling import GumbelNoise, check_finite, log_softmax, loop_inputs, sample
from .sequence import Sequence
from .state import Continuation, State
from .stepper import SamplingLoop, Stepper


class Generator:
    """Samples len(state) streams with `params`; `run` and `stream` may be called again to continue.

    When a stream ends inside a block of the sampling loop (a stop string, a closed stream), the
    state and the noise are set back to just after the last character used, so continuing gives
    what one longer run would have.
    """

    BLOCK = 64

    def __init__(self, model, state: State, params: SamplingParams, seed: int | None = None,
                 noise_start: int = 0) -> None:
        if seed is not None:
            params = params.replace(seed=seed)
        self.model, self.params, self.rows = model, params, len(state)
        self.stepper = Stepper(model, state)
        self.sequences = [Sequence((), params.row(i), model.vocab,
                                   GumbelNoise([params.row(i).seed], len(model.vocab), noise_start))
                          for i in range(self.rows)]
        if params.prompt_logprobs is not None:
            raise CharrnnError("a Generator starts after its prompt: for the prompt's log-probabilities use "
                               "model.score or the Engine", "prompt_logprobs")
        plain = params.plain and self.rows == 1  # with 16-256 streams one run per character measured faster
        session = model.loop_session if plain else None
        self.loop = SamplingLoop(session) if session is not None else None
        self.block_size = self.BLOCK if self.loop is not None else 1
        self.block_noise = self.block_logprobs = None  # the last block's noise, and distributions (with logprobs)

    @property
    def seed(self) -> int:
        """Row 0's seed; row i's is seed + i."""
        return self.params.seed

    def continuation(self, row: int = 0) -> Continuation:
        """Where stream `row` stands (exact once `run`/`stream` returned): generate(continuation=...)
        or an Engine request goes on from it as one longer run would have."""
        return Continuation(self.stepper.state().select([row]), self.params.row(row).seed,
                            self.sequences[row].noise.drawn, self.model.sha256, self.model.variant)

    @property
    def state(self) -> State:
        """A snapshot of the streams' state (to save, fork or continue elsewhere). While `stream` is
        being consumed it may be up to a block ahead; it is exact once `stream` or `run` returns or closes."""
        return self.stepper.state()

    def stream(self, length: int | None = None, stop: str | Iterable[str] | None = None) -> Iterator[str]:
        """Yield the characters of the one stream as they become readable (Sequence.readable), until
        its length or a stop string. length/stop: this call's, instead of the generator's settings."""
        if self.rows != 1:
            raise CharrnnError("stream() generates one stream; use run() for several")
        sequence, = self._begin(length, stop)
        shown = 0
        while not sequence.finished:
            block = self.next_block(min(self.block_size, sequence.params.length - len(sequence.chars)))
            logprobs = self.block_logprobs
            used = 0
            try:
                for char_id in block[:, 0]:
                    sequence.accept(char_id, None if logprobs is None else logprobs[used, 0])
                    used += 1
                    readable = sequence.readable()
                    yield from sequence.chars[shown:readable]
                    shown = max(shown, readable)
                    if sequence.finished:
                        return
            finally:
                self._keep(block, used)

    def run(self, length: int | None = None, stop: str | Iterable[str] | None = None) -> list[str]:
        """The texts of all streams, each ending at its length or its first stop string (included)."""
        sequences = self._begin(length, stop)
        # without stop strings every row ends at the length: draw BLOCK steps between looks at the texts
        block_size = self.block_size if sequences[0].params.stop else self.BLOCK
        while unfinished := [(row, s) for row, s in enumerate(sequences) if not s.finished]:
            block = self.next_block(min(block_size, max(s.params.length - len(s.chars) for _, s in unfinished)))
            logprobs = self.block_logprobs
            used = max(s.accept_many(block[:, row], None if logprobs is None else logprobs[:, row])
                       for row, s in unfinished)
            if all(s.finished for s in sequences):
                self._keep(block, used)
        return [s.text for s in sequences]

    def next_ids(self) -> np.ndarray:
        """Sample one character per stream, advance the state, return the ids."""
        return self.next_block(1)[0]

    def next_block(self, steps: int) -> np.ndarray:
        """Sample `steps` characters per stream and advance the state: ids [steps, rows]."""
        noise = self._noise(steps)
        self.block_noise = noise
        self.block_logprobs = [] if self.params.logprobs is not None else None
        if self.loop is None or steps == 1:
            ids = [self._sample_and_step(step_noise) for step_noise in noise]
            if self.block_logprobs is not None:
                self.block_logprobs = np.stack(self.block_logprobs)
            return ids[0][None] if steps == 1 else np.stack(ids)  # one step: no np.stack (8 µs a character)
        ids = self.loop.draw(self.stepper, *loop_inputs(self.params, noise))
        check_finite(self.stepper.logits)  # non-finite logits anywhere in the block stay so to its end
        return ids

    def _begin(self, length, stop) -> list[Sequence]:
        """Fresh sequences for a call of run/stream, continuing each row's noise stream."""
        changes = {key: value for key, value in (("length", length), ("stop", stop)) if value is not None}
        params = self.params.replace(**changes) if changes else self.params
        self.sequences = [Sequence((), params.row(row), self.model.vocab, noise=previous.noise)
                          for row, previous in enumerate(self.sequences)]
        for sequence in self.sequences:
            sequence.prefilled()
        return self.sequences

    def _noise(self, steps: int) -> np.ndarray:
        """The rows' next `steps` steps of noise, [steps, rows, vocab]."""
        parts = [sequence.noise.take(steps) for sequence in self.sequences]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def _sample_and_step(self, noise: np.ndarray) -> np.ndarray:
        if self.block_logprobs is not None:
            self.block_logprobs.append(log_softmax(self.stepper.logits))
        ids = sample(self.stepper.logits, self.params, noise)
        self.stepper.step(ids)
        return ids

    def _keep(self, block: np.ndarray, used: int) -> None:
        """Keep only the first `used` characters of the last block (of the sampling loop, the only
        one that can end early): the state and the noise continue as if the rest had never been drawn."""
        if used == len(block):
            return
        self.stepper.undo()
        self.sequences[0].noise.put_back(len(self.block_noise))
        if used:
            self.next_block(used)
