"""A loaded charrnn model: the single-step cell in onnxruntime, with the state kept outside.

    model = charrnn_runtime.load("models/shakespeare", provider="auto")
    text = model.generate("ROMEO: ", length=200, temperature=0.8, seed=1)

State is explicit (State: the model's declared state tensors, e.g. one hidden state per GRU layer
or hidden + cell per LSTM layer, and the logits for the next character; one row per stream):
start from `initial_state`, `feed` text, `fork` it, save it, continue it later. Loops (feed,
score, generation) run through a Stepper, whose onnxruntime IO binding is set up once: on CPU its
buffers share memory with numpy arrays, so a step copies nothing; on CUDA the state stays on the
GPU between steps and only the logits cross to the host for sampling. Where the bundle has a
sampling loop (int8 on CPU), one stream of plain temperature sampling runs BLOCK characters per
onnxruntime call, drawing the same characters as the step-by-step loop.
"""

from __future__ import annotations

import io
import math
import os
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnxruntime as ort

from . import bundle, files
from .errors import CharrnnError
from .providers import create_session
from .sampling import GumbelNoise, SamplingParams, check_finite, loop_inputs, sample

PathLike = str | os.PathLike[str]
Stop = str | Iterable[str] | None


class State:
    """The state tensors {name: [n, size]} and next-character logits [n, vocab] of n streams.

    Names are the model's state inputs (`model.state_spec`). The initial state's logits are zeros,
    i.e. a uniform first character when there is no prime.
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
        """Each stream repeated n times: prime once, then fan out into n continuations."""
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


class Stepper:
    """Steps n streams in place: IO binding set up once, each state tensor ping-pongs between two buffers.

    Two bindings (state A → B and B → A) are prepared up front, so a step is: write the chars,
    run, flip. The char and logits buffers are host numpy arrays the OrtValues share memory with.
    """

    def __init__(self, model, state):
        model.check(state)
        device = "cuda" if model.provider == "cuda" else "cpu"
        self.session, self.spec = model.session, model.state_spec
        self.chars = np.zeros(len(state), np.int32)
        self.logits = np.array(state.logits, dtype=np.float32, order="C")
        self.buffers = {t.input: [
            ort.OrtValue.ortvalue_from_numpy(np.array(state.arrays[t.input], np.float32, order="C"), device, 0),
            ort.OrtValue.ortvalue_from_shape_and_type(state.arrays[t.input].shape, np.float32, device, 0)]
            for t in self.spec}
        chars, logits = ort.OrtValue.ortvalue_from_numpy(self.chars), ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.bindings = []
        for source, target in ((0, 1), (1, 0)):
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(model.tensors["char"], chars)
            binding.bind_ortvalue_output(model.tensors["logits"], logits)
            for t in self.spec:
                binding.bind_ortvalue_input(t.input, self.buffers[t.input][source])
                binding.bind_ortvalue_output(t.output, self.buffers[t.input][target])
            self.bindings.append(binding)
        self.current = 0  # which buffer of each pair holds the state

    def step(self, chars):
        """Advance every stream by one character; self.logits then holds the next-character logits."""
        self.chars[:] = chars
        self.session.run_with_iobinding(self.bindings[self.current])
        self.current ^= 1

    def sample_block(self, loop, noise, inv_temperature):
        """Sample and feed len(noise) characters per stream in one call of the sampling loop; returns
        their ids [steps, n]. The state before the block stays in the other buffers (see `undo_block`)."""
        inputs, outputs = bundle.LOOP_INPUTS, bundle.LOOP_OUTPUTS
        chars = np.empty(noise.shape[:2], np.int32)
        self.before_block = (self.current, self.logits.copy())
        binding = loop.io_binding()
        binding.bind_cpu_input(inputs["steps"], np.array(len(noise), np.int64))
        binding.bind_cpu_input(inputs["logits"], self.before_block[1])
        binding.bind_cpu_input(inputs["noise"], np.ascontiguousarray(noise))
        binding.bind_cpu_input(inputs["inv_temperature"], np.array(inv_temperature, np.float64))
        binding.bind_ortvalue_output(outputs["chars"], ort.OrtValue.ortvalue_from_numpy(chars))
        binding.bind_ortvalue_output(outputs["logits"], ort.OrtValue.ortvalue_from_numpy(self.logits))
        for t in self.spec:
            binding.bind_ortvalue_input(t.input, self.buffers[t.input][self.current])
            binding.bind_ortvalue_output(t.output, self.buffers[t.input][self.current ^ 1])
        loop.run_with_iobinding(binding)
        self.current ^= 1
        return chars

    def undo_block(self):
        """Back to the state before the last `sample_block` (no step may have run since)."""
        self.current, logits = self.before_block
        self.logits[:] = logits

    def state(self):
        """A snapshot of the current state (copies: OrtValue.numpy() is a view of the bound buffer)."""
        return State({name: pair[self.current].numpy().copy() for name, pair in self.buffers.items()},
                     self.logits.copy())


class Model:
    def __init__(self, path: PathLike | None = None, provider: str = "auto", variant: str = "fp32",
                 threads: int | None = None, spinning: bool = True, sampling_loop: bool = True) -> None:
        located = bundle.find(path, variant)
        self.path, self.sha256 = located.path, bundle.verify(located.onnx, located.sha256)
        self.session, self.provider, self.cpu_reason = create_session(located.onnx, provider, threads, spinning)
        self.facts = bundle.read_facts(self.session, located.onnx)
        self.variant = self.facts.get("variant", variant)
        self.vocab = self.facts["vocab"]
        self.index = {ch: i for i, ch in enumerate(self.vocab)}
        self.tensors = self.facts["tensors"]
        self.state_spec = bundle.state_spec(self.facts)
        self._outputs = [self.tensors["logits"], *(t.output for t in self.state_spec)]
        # the sampling loop's session is made on first use: servers and scorers never need it
        self._loop_file = located.loop if sampling_loop and self.provider == "cpu" else None
        self._loop_options, self._loop_session = (threads, spinning), None

    @property
    def loop_session(self) -> ort.InferenceSession | None:
        """The bundle's sampling loop (K sampled characters per call) on CPU, or None."""
        if self._loop_session is None and self._loop_file is not None:
            loop_path, expected = self._loop_file
            bundle.verify(loop_path, expected)
            session, _, _ = create_session(loop_path, "cpu", *self._loop_options)
            bundle.check_loop(session, self.state_spec, loop_path)
            self._loop_session = session
        return self._loop_session

    # -- the network -------------------------------------------------------------------------------

    def encode(self, text: str) -> np.ndarray:
        unknown = [(i, ch) for i, ch in enumerate(text) if ch not in self.index]
        if unknown:
            shown = ", ".join(f"{ch!r} at {i}" for i, ch in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise CharrnnError(f"characters not in the model's vocabulary: {shown}{more}")
        return np.fromiter((self.index[ch] for ch in text), dtype=np.int32, count=len(text))

    def initial_state(self, n: int = 1) -> State:
        return State({t.input: np.zeros((n, t.size), np.float32) for t in self.state_spec},
                     np.zeros((n, len(self.vocab)), np.float32))

    def check(self, state: State) -> None:
        """A clear error for a state from another model (e.g. a saved state loaded for the wrong one)."""
        n = len(state)
        needed = {"logits": (n, len(self.vocab)), **{t.input: (n, t.size) for t in self.state_spec}}
        given = {"logits": state.logits.shape, **{name: a.shape for name, a in state.arrays.items()}}
        if given != needed:
            def shapes(d):
                return ", ".join(f"{name} {shape}" for name, shape in d.items())
            raise CharrnnError(f"state does not fit this model: it has {shapes(given)}; "
                               f"the model needs {shapes(needed)}")

    def step(self, state: State, chars: Iterable[int] | np.ndarray) -> State:
        """Advance every stream by one character (ids [n]); returns the new state."""
        self.check(state)
        chars = np.asarray(chars, dtype=np.int32).reshape(len(state))
        logits, *arrays = self.session.run(self._outputs, {self.tensors["char"]: chars, **state.arrays})
        return State({t.input: a for t, a in zip(self.state_spec, arrays, strict=True)}, logits)

    def feed(self, state: State, text: str) -> State:
        """Run `text` through every stream of `state` (teacher-forced); returns the new state."""
        ids = self.encode(text)
        if not len(ids):
            return state
        stepper = Stepper(self, state)
        for char in ids:
            stepper.step(char)
        return stepper.state()

    def score(self, text: str, window: int | None = None) -> dict[str, float]:
        """Mean loss (nats) and bits per character of text[1:] given the text before it.

        With `window`, the text is cut into windows of window + 1 characters (the remainder is
        dropped), each scored from the initial state with at most `window` characters of context, as
        a transformer with that block size is evaluated (nanoGPT); the windows run as one batch.
        """
        ids = self.encode(text)
        if len(ids) < 2:
            raise CharrnnError("scoring needs at least 2 characters")
        if window is None:
            rows = ids[None, :]
        elif window < 1 or len(ids) < window + 1:
            raise CharrnnError(f"scoring with window {window} needs at least {max(window, 1) + 1} characters")
        else:
            count = (len(ids) - 1) // window
            rows = np.stack([ids[i * window: i * window + window + 1] for i in range(count)])
        stepper, nll = Stepper(self, self.initial_state(len(rows))), 0.0
        for t in range(rows.shape[1] - 1):
            stepper.step(rows[:, t])
            z = stepper.logits.astype(np.float64)
            top = z.max(axis=1)
            nll += float((np.log(np.exp(z - top[:, None]).sum(axis=1)) + top
                          - z[np.arange(len(rows)), rows[:, t + 1]]).sum())
        chars = rows.size - len(rows)
        loss = nll / chars
        return {"loss": loss, "bits_per_char": loss / math.log(2), "chars": chars}

    # -- generation --------------------------------------------------------------------------------

    def generator(self, prime: str = "", num_samples: int = 1, seed: int | None = None,
                  state: State | None = None, **params: Any) -> Generator:
        """A Generator for num_samples streams from `prime` (fed once, then forked)."""
        state = self.feed(state if state is not None else self.initial_state(), prime)
        if num_samples > 1:
            if len(state) != 1:
                raise CharrnnError(f"num_samples={num_samples} forks one stream, but the state has {len(state)}")
            state = state.fork(num_samples)
        return Generator(self, state, SamplingParams(**params), seed)

    def stream(self, prime: str = "", length: int = 1000, stop: Stop = None, **options: Any) -> Iterator[str]:
        """Yield generated characters one at a time (the prime is not repeated)."""
        generator = self.generator(prime, **options)
        yield from generator.stream(length, stop)

    def generate(self, prime: str = "", length: int = 1000, stop: Stop = None, **options: Any) -> str:
        """Generated text after `prime`: temperature, top_k, top_p, seed, state as in `generator`."""
        return "".join(self.stream(prime, length, stop, **options))

    def generate_batch(self, prime: str = "", length: int = 1000, num_samples: int = 1, stop: Stop = None,
                       **options: Any) -> list[str]:
        """num_samples texts in one batched loop; row i uses seed + i, equal to generate(seed=seed + i)."""
        return self.generator(prime, num_samples=num_samples, **options).run(length, stop)


class Generator:
    """The sampling loop over a batch of streams, with its state exposed (onnxruntime-genai style).

    One stream with plain temperature sampling (no top-k/top-p) and a bundle's sampling loop draws
    BLOCK characters per onnxruntime call; `stream` and `run` hand them out one by one and, when they stop early (a
    stop string, a closed stream), set the state back to just after the last character used.
    """

    BLOCK = 64

    def __init__(self, model: Model, state: State, params: SamplingParams, seed: int | None = None) -> None:
        if seed is None:
            seed = secrets.randbits(31)
        self.model, self.params, self.seed, self.rows = model, params, seed, len(state)
        self.stepper = Stepper(model, state)
        self.noise = GumbelNoise([seed + row for row in range(len(state))], len(model.vocab))
        # one stream only: with 16-256 streams one session run per character measured faster
        plain = params.top_k is None and params.top_p is None and self.rows == 1
        self.loop = model.loop_session if plain else None
        self.block_size = self.BLOCK if self.loop is not None else 1

    @property
    def state(self) -> State:
        """A snapshot of the streams' state (to save, fork or continue elsewhere). While `stream` or
        `run` is being consumed it may be up to a block ahead; it is exact once they return or close."""
        return self.stepper.state()

    def next_ids(self) -> np.ndarray:
        """Sample one character per stream, advance the state, return the ids."""
        ids = sample(self.stepper.logits, self.params, self.noise.next())
        self.stepper.step(ids)
        return ids

    def next_block(self, steps: int) -> np.ndarray:
        """Sample `steps` characters per stream and advance the state: ids [steps, rows]."""
        if steps == 1:
            return self.next_ids()[None]
        if self.loop is None:
            return np.stack([self.next_ids() for _ in range(steps)])
        self.block_noise = self.noise.take(steps)
        ids = self.stepper.sample_block(self.loop, *loop_inputs(self.params, self.block_noise))
        check_finite(self.stepper.logits)  # non-finite logits anywhere in the block stay so to its end
        return ids

    def _keep(self, block: np.ndarray, used: int) -> None:
        """Keep only the first `used` characters of the last `next_block`: the state and the noise
        continue as if the rest had never been drawn."""
        if used == len(block):
            return
        self.stepper.undo_block()
        self.noise.put_back(self.block_noise)
        if used:
            self.next_block(used)

    def blocks(self, length: int) -> Iterator[np.ndarray]:
        """ids [steps, rows] blocks adding up to `length` steps."""
        remaining = _length(length)
        while remaining:
            block = self.next_block(min(self.block_size, remaining))
            remaining -= len(block)
            yield block

    def stream(self, length: int, stop: Stop = None) -> Iterator[str]:
        """Yield the characters of stream 0 until `length` characters or a stop string (included)."""
        if self.rows != 1:
            raise CharrnnError("stream() generates one stream; use run() for several")
        stops, text = _stops(stop), ""
        for block in self.blocks(length):
            used = 0
            try:
                for char_id in block[:, 0]:
                    char = self.model.vocab[char_id]
                    text += char
                    used += 1
                    yield char
                    if stops and any(text.endswith(s) for s in stops):
                        return
            finally:
                self._keep(block, used)

    def run(self, length: int, stop: Stop = None) -> list[str]:
        """Texts of all streams: each ends after `length` characters or its first stop string."""
        stops = _stops(stop)
        steps, texts, done = [], [""] * self.rows, np.zeros(self.rows, bool)
        for block in self.blocks(length):
            if not stops:
                steps.append(block)
                continue
            for used, ids in enumerate(block, start=1):
                for row in np.flatnonzero(~done):
                    texts[row] += self.model.vocab[ids[row]]
                    done[row] = any(texts[row].endswith(s) for s in stops)
                if done.all():
                    self._keep(block, used)
                    return texts
        if stops or not steps:
            return texts
        return ["".join(row) for row in np.asarray(self.model.vocab)[np.concatenate(steps).T]]


def _stops(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise CharrnnError("stop strings must not be empty")
    return stops


def _length(length):
    if length < 0:
        raise CharrnnError(f"length must be >= 0, got {length}")
    return length


def load(path: PathLike | None = None, provider: str = "auto", variant: str = "fp32",
         threads: int | None = None, spinning: bool = True, sampling_loop: bool = True) -> Model:
    """Load a bundle directory or bare model.onnx (default: the shipped Shakespeare model).

    threads: onnxruntime's intra-op threads (default: one per core); spinning=False lets idle
    onnxruntime threads sleep, for processes whose other threads need the cores (a server).
    sampling_loop=False: never use the bundle's sampling loop, always one session run per character
    (the same text; `Generator.state` then stays exact while a stream is being consumed)."""
    return Model(path, provider, variant, threads, spinning, sampling_loop)
