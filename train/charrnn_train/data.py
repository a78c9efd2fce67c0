"""Corpus → vocabulary → (input, target) batches, in plain numpy.

Mirrors the report's tf.data pipeline without needing tf.data, so training runs on any Keras
backend: ids are cut into non-overlapping chunks of `seq_length + 1`, each chunk becomes
(chunk[:-1], chunk[1:]), chunks pass through a shuffle buffer (tf.data's algorithm) and are
batched with the remainder dropped.
"""

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charrnn_runtime.errors import CharrnnError

DEFAULT_CORPUS = (Path(__file__).parent / "corpora" / "tinyshakespeare.txt").resolve()  # corpora: a link to ../data


class CorpusError(CharrnnError):
    """The corpus cannot be used for training (missing, empty, not UTF-8, too short)."""


def read_corpus(path):
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"corpus not found: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"corpus is a directory, not a text file: {path}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus is not valid UTF-8 ({path}, byte {e.start})") from None
    if not text:
        raise CorpusError(f"corpus is empty: {path}")
    return text


def build_vocab(text):
    """The report's vocabulary: the sorted distinct characters of the corpus."""
    return sorted(set(text))


def encode(text, vocab):
    index = {ch: i for i, ch in enumerate(vocab)}
    return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))


def chunk(ids, seq_length):
    """Non-overlapping chunks of seq_length + 1 ids → inputs [n, seq_length], targets [n, seq_length]."""
    n = len(ids) // (seq_length + 1)
    chunks = ids[: n * (seq_length + 1)].reshape(n, seq_length + 1)
    return chunks[:, :-1], chunks[:, 1:]


def shuffle_buffer_order(n, buffer_size, rng):
    """The order in which tf.data.Dataset.shuffle(buffer_size) emits n elements."""
    buffer = list(range(min(buffer_size, n)))
    upcoming = len(buffer)
    order = []
    while buffer:
        i = int(rng.integers(len(buffer)))
        order.append(buffer[i])
        if upcoming < n:
            buffer[i] = upcoming
            upcoming += 1
        else:
            buffer[i] = buffer[-1]
            buffer.pop()
    return np.asarray(order, dtype=np.int64)


def check_length(chars, seq_length, batch_size, validation_fraction=0.0):
    """CorpusError unless `chars` characters hold one training batch (and one validation sequence)."""
    train_chars = batch_size * (seq_length + 1)
    needed = train_chars
    if validation_fraction > 0:  # the head must still hold the batch, the tail one sequence
        needed = max(math.ceil(train_chars / (1 - validation_fraction)),
                     math.ceil((seq_length + 1) / validation_fraction))
    if chars < needed:
        raise CorpusError(
            f"corpus too short: {chars:,} characters, need at least {needed:,} "
            f"for one batch of {batch_size} sequences of {seq_length}"
            + (f" plus a {validation_fraction:g} validation split" if validation_fraction > 0 else "")
        )


def held_out_start(chars, validation_fraction):
    """Where the held-out tail of a `chars`-character text begins (the validation split)."""
    return chars - int(chars * validation_fraction)


def fingerprint(text):
    """sha256 of the corpus (its UTF-8 bytes), recorded so a resumed run can tell if it changed."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Batches:
    """The training set of one run: chunks plus the shuffle/batch recipe, deterministic per epoch."""

    inputs: np.ndarray
    targets: np.ndarray
    batch_size: int
    buffer_size: int
    seed: int

    @property
    def steps_per_epoch(self):
        return len(self.inputs) // self.batch_size

    def epoch(self, epoch):
        """(inputs, targets) for one epoch: shuffled by (seed, epoch), remainder dropped.

        Seeding by epoch makes a resumed run see the same data as an uninterrupted one.
        """
        rng = np.random.default_rng([self.seed, epoch])
        order = shuffle_buffer_order(len(self.inputs), self.buffer_size, rng)
        order = order[: self.steps_per_epoch * self.batch_size]
        return self.inputs[order], self.targets[order]


def split(ids, seq_length, batch_size, buffer_size, seed, validation_fraction=0.0):
    """Training batches from the head of the text and validation chunks from its tail.

    The validation text is a contiguous tail, so no validation character is seen in training.
    """
    check_length(len(ids), seq_length, batch_size, validation_fraction)
    cut = held_out_start(len(ids), validation_fraction)
    train = Batches(*chunk(ids[:cut], seq_length), batch_size, buffer_size, seed)
    validation = chunk(ids[cut:], seq_length) if validation_fraction > 0 else None
    return train, validation
