"""Next-character sampling: temperature-scaled categorical (the report's), greedy, top-k, top-p.

Sampling is Gumbel-max in float64: argmax(logits / T + G) with G = -log(-log(U)) is an exact draw
from softmax(logits / T), costs three array operations per step instead of a softmax and a CDF
search, and is the form a GPU graph can run with the noise passed in. top-k/top-p mask the
excluded characters to -inf first (top-p from a float64 softmax). Each row's noise comes from its
own seed, so a row's text does not depend on what else shares the batch. `params` is a
SamplingParams (params.py); only its temperature, top_k and top_p matter here.
"""

import numpy as np

from .errors import CharrnnError


def allowed_mask(logits, params):
    """False where top-k/top-p exclude a character; None when nothing is excluded."""
    vocab = logits.shape[1]
    mask = None
    if params.top_k is not None and params.top_k < vocab:
        mask = np.ones(logits.shape, bool)
        dropped = np.argpartition(logits, vocab - params.top_k, axis=1)[:, : vocab - params.top_k]
        np.put_along_axis(mask, dropped, False, axis=1)
    if params.top_p is not None and params.top_p < 1:
        z = np.asarray(logits, dtype=np.float64) / params.temperature
        p = np.exp(z - z.max(axis=1, keepdims=True))
        if mask is not None:
            p = np.where(mask, p, 0.0)
        order = np.argsort(-p, axis=1, kind="stable")
        ranked = np.take_along_axis(p, order, axis=1)
        mass_before = np.cumsum(ranked, axis=1) - ranked
        keep = mass_before < params.top_p * ranked.sum(axis=1, keepdims=True)
        keep[:, 0] = True  # the most likely character always stays
        mask = np.empty(logits.shape, bool)
        np.put_along_axis(mask, order, keep & (ranked > 0), axis=1)
    return mask


def check_finite(logits):
    if not np.isfinite(logits).all():
        raise CharrnnError("the model produced non-finite logits (NaN or inf): the model file is broken")


def log_softmax(logits):
    """Log-probabilities [n, vocab] (float64) of logits [n, vocab]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def sample(logits, params, noise):
    """Character ids [n] from logits [n, vocab] and Gumbel noise [n, vocab] (float64)."""
    check_finite(logits)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits = np.array(logits, dtype=np.float64)
        logits[:, list(ids)] += biases
    if params.temperature == 0:
        return np.argmax(logits, axis=1)  # the most likely character is inside any top-k/top-p set
    scores = np.multiply(logits, 1.0 / params.temperature, dtype=np.float64)
    scores += noise
    mask = allowed_mask(logits, params)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    return scores.argmax(axis=1)


def loop_inputs(params, noise):
    """(noise, 1/temperature) for the sampling-loop graph, which draws argmax(logits · 1/T + noise):
    the same draw as `sample` (greedy: no noise). top-k/top-p are not in the graph."""
    if params.temperature == 0:
        return np.zeros_like(noise), 1.0
    return noise, 1.0 / params.temperature


class GumbelNoise:
    """Gumbel noise [n, vocab] per step, row i from its own seed, drawn in blocks for speed.

    numpy's Generator.random((k, vocab)) continues the same sequence as k draws of (vocab,), so
    the block size never changes the text. Steps taken but not used can be put back.
    """

    BLOCK = 128

    def __init__(self, seeds, vocab, start=0):
        """start: steps already drawn (a continued stream): PCG64 skips them without drawing, as each
        step takes `vocab` 64-bit draws."""
        self.generators = [np.random.default_rng(seed) for seed in seeds]
        for generator in self.generators:
            generator.bit_generator.advance(start * vocab)
        self.vocab = vocab
        self.drawn = start  # steps handed out, counted from the seed's first
        self.block = np.empty((0, len(seeds), vocab))  # drawn steps; those from `cursor` on are unused
        self.cursor = 0

    def next(self):
        """The next step's noise [n, vocab]."""
        return self.take(1)[0]

    def take(self, steps):
        """Noise of the next `steps` steps: [steps, n, vocab]."""
        if len(self.block) - self.cursor < steps:
            self._draw(steps)
        taken = self.block[self.cursor:self.cursor + steps]
        self.cursor += steps
        self.drawn += steps
        return taken

    def put_back(self, steps):
        """Un-take the last `steps` steps taken: the next take starts with them."""
        if not 0 <= steps <= self.cursor:
            raise ValueError(f"cannot put back {steps} steps: {self.cursor} were taken from this block")
        self.cursor -= steps
        self.drawn -= steps

    def _draw(self, steps):
        """Draw blocks until `steps` unused steps are at hand, the unused ones first."""
        parts = [self.block[self.cursor:]]
        while sum(map(len, parts)) < steps:
            uniforms = np.stack([g.random((self.BLOCK, self.vocab)) for g in self.generators], axis=1)
            with np.errstate(divide="ignore"):  # U == 0 gives -inf: that character just cannot win
                parts.append(-np.log(-np.log(uniforms)))
        self.block, self.cursor = np.concatenate(parts), 0
