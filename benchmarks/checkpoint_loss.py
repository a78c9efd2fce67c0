"""Validation loss of a run's last checkpoint, as training measures it: the trained weights, not averaged.

    python benchmarks/checkpoint_loss.py runs/shakespeare-gru2x512-awd

For runs with weight averaging made before history.json recorded `trained_val_loss`: the checkpoint
(epoch-NNNN.keras) holds the trained weights, the averaged ones are what the run validated and exports.
"""

import argparse
import json

import keras

from charrnn_train import data, train  # noqa: F401 - train registers the training layers for loading
from charrnn_train.config import Run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    run = Run.open(parser.parse_args().run)
    config, epoch = run.config, len(run.history)
    _, validation = data.split(data.encode(data.read_corpus(config.corpus), run.vocab), config.seq_length,
                               config.batch_size, config.buffer_size, config.seed, config.validation_fraction)
    model = keras.models.load_model(run.checkpoint(epoch))
    loss = model.evaluate(*validation, batch_size=config.batch_size, verbose=0)
    print(json.dumps({"run": str(run.path), "epoch": epoch, "trained_val_loss": round(loss, 4),
                      "val_loss": round(run.history[-1]["val_loss"], 4)}))


if __name__ == "__main__":
    main()
