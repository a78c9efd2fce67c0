"""A loaded charrnn model: the single-step cell in onnxruntime, with the state kept outside.

    model = charrnn_runtime.load("models/shakespeare", provider="auto")
    text = model.generate("ROMEO: ", length=200, temperature=0.8, seed=1)

State is explicit (state.py): start from `initial_state`, `feed` text, `fork` it, save it, continue
it later. Generation goes through a Generator (generator.py) whose rows are Sequences
(sequence.py), as the Engine's requests are.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnxruntime as ort

from . import bundle
from .errors import CharrnnError
from .generator import Generator
from .params import SamplingParams
from .providers import create_session
from .state import Continuation, State
from .stepper import Stepper

PathLike = str | os.PathLike[str]
Stop = str | Iterable[str] | None


class Model:
    def __init__(self, path: PathLike | None = None, provider: str = "auto", variant: str = "fp32",
                 threads: int | None = None, spinning: bool = True, sampling_loop: bool = True) -> None:
        located = bundle.find(path, variant)
        self.arguments = dict(path=path, provider=provider, variant=variant, threads=threads, spinning=spinning,
                              sampling_loop=sampling_loop)  # to load it again elsewhere (EngineProcess)
        self.path, self.sha256 = located.path, bundle.verify(located.onnx, located.sha256)
        self.session, self.provider, self.cpu_reason = create_session(located.onnx, provider, threads, spinning)
        self.facts = bundle.read_facts(self.session, located.onnx)
        self.variant = self.facts.get("variant", variant)
        self.vocab = self.facts["vocab"]
        self.index = {ch: i for i, ch in enumerate(self.vocab)}
        self.tensors = self.facts["tensors"]
        self.state_spec = bundle.state_spec(self.facts)
        self._outputs = [self.tensors["logits"], *(t.output for t in self.state_spec)]
        # The companion graphs' sessions are made on first use (a server never needs the sampling loop).
        # The prefill graph runs on one thread that sleeps when idle: its thousands of small sequential
        # steps lose more to syncing two threads than they gain, and in a server it runs beside the
        # batch's own threads (two sessions of two spinning threads on two cores: 4,000 characters took
        # 14 s instead of ~1 s under 63 busy rows).
        self._companions = {"loop": (located.loop if sampling_loop and self.provider == "cpu" else None, "cpu",
                                     (threads, spinning)),
                            "prefill": (located.prefill, self.provider, (1, False))}
        self._sessions = {}

    @property
    def loop_session(self) -> ort.InferenceSession | None:
        """The bundle's sampling loop (K sampled characters per call) on CPU, or None."""
        return self._companion("loop")

    @property
    def prefill_session(self) -> ort.InferenceSession | None:
        """The bundle's prefill graph (a whole text per call), or None (bundles before it)."""
        return self._companion("prefill")

    def _companion(self, kind):
        located, provider, options = self._companions[kind]
        if kind not in self._sessions and located is not None:
            path, expected = located
            bundle.verify(path, expected)
            session, _, _ = create_session(path, provider, *options)
            bundle.check_companion(kind, session, self.state_spec, path)
            self._sessions[kind] = session
        return self._sessions.get(kind)

    # -- the network -------------------------------------------------------------------------------

    def encode(self, text: str) -> np.ndarray:
        unknown = [(i, ch) for i, ch in enumerate(text) if ch not in self.index]
        if unknown:
            shown = ", ".join(f"{ch!r} at {i}" for i, ch in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise CharrnnError(f"characters not in the model's vocabulary: {shown}{more}", "prompt")
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
        return self.feed_ids(state, self.encode(text))[0]

    def feed_ids(self, state: State, ids: np.ndarray) -> tuple[State, np.ndarray]:
        """Run character ids through every stream of `state`: in one call of the bundle's prefill
        graph where it has one, else stepped. Returns the new state and the logits after each
        character, [streams, len(ids), vocab]."""
        self.check(state)
        if not len(ids):
            return state, np.zeros((len(state), 0, len(self.vocab)), np.float32)
        session = self.prefill_session
        if session is None:
            stepper, logits = Stepper(self, state), []
            for char in ids:
                stepper.step(char)
                logits.append(stepper.logits.copy())
            return stepper.state(), np.stack(logits, axis=1)
        chars = np.broadcast_to(np.asarray(ids, np.int32), (len(state), len(ids)))
        names = [t.output for t in self.state_spec] + [bundle.PREFILL_OUTPUTS["logits"]]
        *arrays, logits = session.run(names, {bundle.PREFILL_INPUTS["chars"]: np.ascontiguousarray(chars),
                                              **state.arrays})
        return (State({t.input: a.copy() for t, a in zip(self.state_spec, arrays, strict=True)}, logits[:, -1].copy()),
                logits)

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

    def trace(self, text: str, state: State | None = None) -> dict[str, np.ndarray]:
        """The state after each character of `text`, fed from `state` (default: the initial one), to
        look inside the network: {state tensor input name: [streams, len(text), size]}, where
        `state_spec` says each tensor's layer and role (hidden, or an LSTM's cell)."""
        ids, state = self.encode(text), state if state is not None else self.initial_state()
        traced = {t.input: np.empty((len(state), len(ids), t.size), np.float32) for t in self.state_spec}
        stepper = Stepper(self, state)
        for i, char in enumerate(ids):
            stepper.step(char)
            for name, array in stepper.state().arrays.items():
                traced[name][:, i] = array
        return traced

    # -- generation --------------------------------------------------------------------------------

    def generator(self, prompt: str = "", num_samples: int = 1, seed: int | None = None,
                  state: State | None = None, params: SamplingParams | None = None,
                  continuation: Continuation | None = None, **settings: Any) -> Generator:
        """A Generator for num_samples streams from `prompt` (fed once, then forked); `params` or the
        SamplingParams fields (temperature, top_k, top_p, stop, length, ...) as keywords. `state`: start
        from it instead of the initial state; `continuation`: go on exactly where a generation stopped
        (its state, and its noise stream when the seed is its own or not given)."""
        prompt = _renamed_prime(prompt, settings)
        if continuation is not None:
            if (continuation.sha256, continuation.variant) != (self.sha256, self.variant) or state is not None:
                raise CharrnnError("the continuation belongs to another model or variant (or a state is given "
                                   "too)", "state")
            state, seed = continuation.state, continuation.seed if seed is None else seed
        if params is None:
            params = SamplingParams(seed=seed, **settings)
        elif seed is not None or settings:
            raise CharrnnError("pass either params or its fields, not both")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise CharrnnError(f"num_samples must be an integer >= 1, got {num_samples!r}", "num_samples")
        state = self.feed(state if state is not None else self.initial_state(), prompt)
        if num_samples > 1:
            if len(state) != 1:
                raise CharrnnError(f"num_samples={num_samples} forks one stream, but the state has {len(state)}")
            state = state.fork(num_samples)
        resumed = continuation is not None and continuation.seed == params.seed
        return Generator(self, state, params, noise_start=continuation.position if resumed else 0)

    def stream(self, prompt: str = "", length: int = 1000, stop: Stop = None, **options: Any) -> Iterator[str]:
        """Yield generated characters one at a time (the prompt is not repeated)."""
        yield from self.generator(prompt, length=length, stop=stop, **options).stream()

    def generate(self, prompt: str = "", length: int = 1000, stop: Stop = None, **options: Any) -> str:
        """Generated text after `prompt`: temperature, top_k, top_p, seed, state as in `generator`."""
        return "".join(self.stream(prompt, length, stop, **options))

    def generate_batch(self, prompt: str = "", length: int = 1000, num_samples: int = 1, stop: Stop = None,
                       **options: Any) -> list[str]:
        """num_samples texts in one batched loop; row i uses seed + i, equal to generate(seed=seed + i)."""
        return self.generator(prompt, num_samples=num_samples, length=length, stop=stop, **options).run()


def _renamed_prime(prompt, options):
    """`prime=` is the old name of `prompt=` (still accepted, with a DeprecationWarning)."""
    if "prime" not in options:
        return prompt
    warnings.warn("prime= is deprecated: use prompt=", DeprecationWarning, stacklevel=4)
    return options.pop("prime")


def load(path: PathLike | None = None, provider: str = "auto", variant: str = "fp32",
         threads: int | None = None, spinning: bool = True, sampling_loop: bool = True) -> Model:
    """Load a bundle directory or bare model.onnx (default: the shipped Shakespeare model).

    threads: onnxruntime's intra-op threads (default: one per core); spinning=False lets idle
    onnxruntime threads sleep, for processes whose other threads need the cores (a server).
    sampling_loop=False: never use the bundle's sampling loop, always one session run per character
    (the same text; `Generator.state` then stays exact while a stream is being consumed)."""
    return Model(path, provider, variant, threads, spinning, sampling_loop)
