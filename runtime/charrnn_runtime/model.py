"""A loaded charrnn model: the single-step cell in onnxruntime, with the state kept outside.

    model = charrnn_runtime.load("models/shakespeare", provider="auto")
    text = model.generate("ROMEO: ", length=200, temperature=0.8, seed=1)

State is explicit (State: hidden + the logits for the next character, one row per stream): start
from `initial_state`, `feed` text, `fork` it, save it, continue it later. On CUDA the hidden state
stays on the GPU between steps; only the logits cross to the host for sampling.
"""

import io
import math
import secrets
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import bundle, files
from .errors import CharrnnError
from .providers import create_session
from .sampling import GumbelNoise, SamplingParams, sample


class State:
    """Hidden state and next-character logits for a batch of streams.

    `hidden` is a numpy array, or an onnxruntime OrtValue when it lives on the GPU. The initial
    state's logits are zeros, i.e. a uniform first character when there is no prime.
    """

    def __init__(self, hidden, logits):
        self._hidden, self.logits = hidden, logits

    def __len__(self):
        return len(self.logits)

    @property
    def hidden(self):
        """Hidden state [n, units] as a numpy array (copied from the GPU if it lives there)."""
        return self._hidden.numpy() if isinstance(self._hidden, ort.OrtValue) else self._hidden

    def select(self, rows):
        """A new state of the given rows (repeat a row to fork it)."""
        rows = np.asarray(rows, dtype=np.int64)
        return State(self.hidden[rows], self.logits[rows])

    def fork(self, n):
        """Each stream repeated n times: prime once, then fan out into n continuations."""
        return self.select(np.repeat(np.arange(len(self)), n))

    def copy(self):
        return self.select(np.arange(len(self)))

    def save(self, path):
        buffer = io.BytesIO()
        np.savez(buffer, hidden=self.hidden, logits=self.logits)
        with files.atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path):
        try:
            with np.load(path) as saved:
                return cls(saved["hidden"].astype(np.float32), saved["logits"].astype(np.float32))
        except (OSError, ValueError, KeyError) as e:
            raise CharrnnError(f"not a saved charrnn state: {path} ({e})") from None


class Model:
    def __init__(self, path=None, provider="auto", variant="fp32", threads=None):
        self.path = Path(path or bundle.DEFAULT_MODEL)
        onnx_path, expected = bundle.locate(self.path, variant)
        self.sha256 = bundle.verify(onnx_path, expected)
        self.session, self.provider, self.cpu_reason = create_session(onnx_path, provider, threads)
        self.facts = bundle.read_facts(self.session, onnx_path)
        self.variant = self.facts.get("variant", variant)
        self.vocab = self.facts["vocab"]
        self.units = int(self.facts["units"])
        self.index = {ch: i for i, ch in enumerate(self.vocab)}
        self.tensors = self.facts["tensors"]
        self._outputs = [self.tensors["logits"], self.tensors["next_hidden"]]

    # -- the network -------------------------------------------------------------------------------

    def encode(self, text):
        unknown = [(i, ch) for i, ch in enumerate(text) if ch not in self.index]
        if unknown:
            shown = ", ".join(f"{ch!r} at {i}" for i, ch in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise CharrnnError(f"characters not in the model's vocabulary: {shown}{more}")
        return np.fromiter((self.index[ch] for ch in text), dtype=np.int32, count=len(text))

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def initial_state(self, n=1):
        return State(np.zeros((n, self.units), np.float32), np.zeros((n, len(self.vocab)), np.float32))

    def step(self, state, chars):
        """Advance every stream by one character (ids [n]); returns the new state."""
        chars = np.asarray(chars, dtype=np.int32).reshape(len(state))
        if self.provider == "cuda":
            return self._step_on_device(state, chars)
        logits, hidden = self.session.run(self._outputs, {self.tensors["char"]: chars,
                                                          self.tensors["hidden"]: state.hidden})
        return State(hidden, logits)

    def _step_on_device(self, state, chars):
        """CUDA: hidden in and out as GPU OrtValues; only the logits are copied to the host."""
        hidden = state._hidden
        if not isinstance(hidden, ort.OrtValue):
            hidden = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(hidden), "cuda", 0)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.tensors["char"], chars)
        binding.bind_ortvalue_input(self.tensors["hidden"], hidden)
        binding.bind_output(self.tensors["logits"], "cpu")
        binding.bind_output(self.tensors["next_hidden"], "cuda", 0)
        self.session.run_with_iobinding(binding)
        logits, next_hidden = binding.get_outputs()
        return State(next_hidden, logits.numpy())

    def feed(self, state, text):
        """Run `text` through every stream of `state` (teacher-forced); returns the new state."""
        for char in self.encode(text):
            state = self.step(state, np.full(len(state), char, np.int32))
        return state

    def score(self, text):
        """Mean loss (nats) and bits per character of text[1:] given the text before it."""
        ids = self.encode(text)
        if len(ids) < 2:
            raise CharrnnError("scoring needs at least 2 characters")
        state, nll = self.initial_state(), 0.0
        for current, target in zip(ids[:-1], ids[1:]):
            state = self.step(state, [current])
            z = state.logits[0].astype(np.float64)
            nll += np.log(np.exp(z - z.max()).sum()) + z.max() - z[target]
        loss = nll / (len(ids) - 1)
        return {"loss": loss, "bits_per_char": loss / math.log(2), "chars": len(ids) - 1}

    # -- generation --------------------------------------------------------------------------------

    def generator(self, prime="", num_samples=1, seed=None, state=None, **params):
        """A Generator for num_samples streams from `prime` (fed once, then forked)."""
        state = self.feed(state if state is not None else self.initial_state(), prime)
        if len(state) == 1 and num_samples > 1:
            state = state.fork(num_samples)
        return Generator(self, state, SamplingParams(**params), seed)

    def stream(self, prime="", length=1000, stop=None, **options):
        """Yield generated characters one at a time (the prime is not repeated)."""
        generator = self.generator(prime, **options)
        yield from generator.stream(length, stop)

    def generate(self, prime="", length=1000, stop=None, **options):
        """Generated text after `prime`: temperature, top_k, top_p, seed, state as in `generator`."""
        return "".join(self.stream(prime, length, stop, **options))

    def generate_batch(self, prime="", length=1000, num_samples=1, stop=None, **options):
        """num_samples texts in one batched loop; row i uses seed + i, equal to generate(seed=seed + i)."""
        return self.generator(prime, num_samples=num_samples, **options).run(length, stop)


class Generator:
    """The sampling loop over a batch of streams, with its state exposed (onnxruntime-genai style)."""

    def __init__(self, model, state, params, seed=None):
        if seed is None:
            seed = secrets.randbits(31)
        self.model, self.state, self.params, self.seed = model, state, params, seed
        self.noise = GumbelNoise([seed + row for row in range(len(state))], len(model.vocab))

    def next_ids(self):
        """Sample one character per stream, advance the state, return the ids."""
        ids = sample(self.state.logits, self.params, self.noise.next())
        self.state = self.model.step(self.state, ids)
        return ids

    def stream(self, length, stop=None):
        """Yield the characters of stream 0 until `length` characters or a stop string (included)."""
        if len(self.state) != 1:
            raise CharrnnError("stream() generates one stream; use run() for several")
        stops, text = _stops(stop), ""
        for _ in range(_length(length)):
            char = self.model.vocab[self.next_ids()[0]]
            text += char
            yield char
            if stops and any(text.endswith(s) for s in stops):
                return

    def run(self, length, stop=None):
        """Texts of all streams: each ends after `length` characters or its first stop string."""
        stops, rows = _stops(stop), len(self.state)
        steps, texts, done = [], [""] * rows, np.zeros(rows, bool)
        for _ in range(_length(length)):
            ids = self.next_ids()
            if not stops:
                steps.append(ids)
                continue
            for row in np.flatnonzero(~done):
                texts[row] += self.model.vocab[ids[row]]
                done[row] = any(texts[row].endswith(s) for s in stops)
            if done.all():
                break
        if stops or not steps:
            return texts
        return ["".join(row) for row in np.asarray(self.model.vocab)[np.stack(steps, axis=1)]]


def _stops(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise CharrnnError("stop strings must not be empty")
    return stops


def _length(length):
    if length < 0:
        raise CharrnnError(f"length must be >= 0, got {length}")
    return length


def load(path=None, provider="auto", variant="fp32", threads=None):
    """Load a bundle directory or bare model.onnx (default: the shipped Shakespeare model)."""
    return Model(path, provider, variant, threads)
