"""Stepping n streams in place, and the bundle's sampling loop that steps K characters per call.

The Stepper's onnxruntime IO binding is set up once: on CPU its buffers share memory with numpy
arrays, so a step copies nothing; on CUDA the state stays on the GPU between steps and only the
logits cross to the host for sampling.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from . import bundle
from .state import State


class Stepper:
    """Steps n streams in place: IO binding set up once, each state tensor ping-pongs between two buffers.

    Two bindings (state A → B and B → A) are prepared up front, so a step is: write the chars,
    run, flip. The char and logits buffers are host numpy arrays the OrtValues share memory with.
    """

    def __init__(self, model, state: State) -> None:
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
        for source in (0, 1):
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(model.tensors["char"], chars)
            binding.bind_ortvalue_output(model.tensors["logits"], logits)
            self.bind_state(binding, source)
            self.bindings.append(binding)
        self.current = 0  # which buffer of each pair holds the state
        self.marked = None

    def bind_state(self, binding, source: int) -> None:
        """Bind the state tensors of `binding`: read buffer `source` of each pair, write the other."""
        for t in self.spec:
            binding.bind_ortvalue_input(t.input, self.buffers[t.input][source])
            binding.bind_ortvalue_output(t.output, self.buffers[t.input][source ^ 1])

    def step(self, chars) -> None:
        """Advance every stream by one character; self.logits then holds the next-character logits."""
        self.chars[:] = chars
        self.session.run_with_iobinding(self.bindings[self.current])
        self.current ^= 1

    def mark(self) -> None:
        """Remember the state now, to `undo` one run (a step or a sampling-loop block) that follows."""
        self.marked = self.current, self.logits.copy()

    def undo(self) -> None:
        """Back to the marked state: its tensors are still in the other buffer of each pair."""
        self.current, logits = self.marked
        self.logits[:] = logits

    def state(self, rows: list[int] | None = None) -> State:
        """A snapshot of the current state, of all streams or of `rows` (copies: OrtValue.numpy() is a
        view of the bound buffer)."""
        if rows is None:
            return State({name: pair[self.current].numpy().copy() for name, pair in self.buffers.items()},
                         self.logits.copy())
        return State({name: pair[self.current].numpy()[rows] for name, pair in self.buffers.items()}, self.logits[rows])


class SamplingLoop:
    """The bundle's sampling loop: the cell inside an ONNX Loop that draws argmax(logits/T + noise),
    feeds it back and repeats, for len(noise) characters per onnxruntime call (CPU only)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session

    def draw(self, stepper: Stepper, noise: np.ndarray, inv_temperature: float) -> np.ndarray:
        """Sample and feed len(noise) characters per stream of `stepper`: their ids [steps, n].
        The stepper is marked first, so `stepper.undo()` returns to the state before the block."""
        inputs, outputs = bundle.LOOP_INPUTS, bundle.LOOP_OUTPUTS
        chars = np.empty(noise.shape[:2], np.int32)
        stepper.mark()
        binding = self.session.io_binding()
        binding.bind_cpu_input(inputs["steps"], np.array(len(noise), np.int64))
        binding.bind_cpu_input(inputs["logits"], stepper.marked[1])
        binding.bind_cpu_input(inputs["noise"], np.ascontiguousarray(noise))
        binding.bind_cpu_input(inputs["inv_temperature"], np.array(inv_temperature, np.float64))
        binding.bind_ortvalue_output(outputs["chars"], ort.OrtValue.ortvalue_from_numpy(chars))
        binding.bind_ortvalue_output(outputs["logits"], ort.OrtValue.ortvalue_from_numpy(stepper.logits))
        stepper.bind_state(binding, stepper.current)
        self.session.run_with_iobinding(binding)
        stepper.current ^= 1
        return chars
