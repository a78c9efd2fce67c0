"""Shared fixtures: a tiny corpus, a tiny trained run and its exported bundle (seconds, not minutes)."""

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import charrnn_runtime
from charrnn_train.data import DEFAULT_CORPUS as CORPUS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
# The repository's models/shakespeare, or its runtime part packaged in an installed wheel (.ci/wheel
# runs these tests from a copy outside the checkout).
SHIPPED = charrnn_runtime.DEFAULT_MODEL
FULL_BUNDLE = (SHIPPED / "saved_model").is_dir()
SONNETS = ROOT / "train" / "data" / "sonnets.txt"
HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="needs the [train] extra (TensorFlow)")

TINY = dict(epochs=2, batch_size=8, seq_length=24, embedding_dim=8, units=32, seed=7)


def run_python(code, **kwargs):
    """Run code in a fresh interpreter; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, **kwargs)


def fake_run(path):
    """A directory that passes for a finished training run until its model.keras is loaded."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"config": {}, "corpus_sha256": ""}))
    (path / "vocab.json").write_text(json.dumps(["a", "b"]))
    (path / "history.json").write_text("[]")
    (path / "model.keras").write_bytes(b"")
    return path


def assert_one_line_error(result, *fragments):
    """A CLI's bad-input contract: exit code 2 and one line 'Error: …' naming the problem."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@contextlib.contextmanager
def charrnn_serve(*args, env=None):
    """A `charrnn-serve --port 0 ARGS` process (environment: this one's without CHARRNN_API_KEY, plus
    `env`); yields (process, base url) once /health answers, and kills it at the end if still running."""
    import httpx

    environment = {name: value for name, value in os.environ.items() if name != "CHARRNN_API_KEY"}
    server = subprocess.Popen([sys.executable, "-m", "charrnn_serve", "--port", "0", *args],
                              stderr=subprocess.PIPE, text=True, env={**environment, **(env or {})})
    try:
        said = []
        for line in server.stderr:
            said.append(line)
            if found := re.search(r"http://\S+:\d+", line):
                break
        else:
            raise AssertionError(f"charrnn-serve exited: {''.join(said)}")
        threading.Thread(target=server.stderr.read, daemon=True).start()  # the pipe never fills
        url = found.group(0)
        for _ in range(100):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.1)
        yield server, url
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_corpus):
    if not HAS_TF:
        pytest.skip("needs the [train] extra (TensorFlow)")
    from charrnn_train import train

    run = train.start(train.Config(corpus=str(tiny_corpus), validation_fraction=0.2, **TINY),
                      tmp_path_factory.mktemp("runs") / "tiny")
    train.train(run, log=lambda line: None)
    return run


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_run):
    from charrnn_export.export import Source, export

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export(Source(tiny_run.path), out, log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def tiny_stacked_lstm_bundle(tmp_path_factory, tiny_corpus):
    """A two-layer LSTM with dropout: four state tensors instead of one."""
    if not HAS_TF:
        pytest.skip("needs the [train] extra (TensorFlow)")
    from charrnn_export.export import Source, export
    from charrnn_train import train

    run = train.start(train.Config(corpus=str(tiny_corpus), validation_fraction=0.2, layers=2, cell="lstm",
                                   dropout=0.1, **TINY), tmp_path_factory.mktemp("runs") / "lstm")
    train.train(run, log=lambda line: None)
    out = tmp_path_factory.mktemp("bundles") / "lstm"
    export(Source(run.path), out, log=lambda line: None)
    return out


@pytest.fixture(scope="session", params=["gru", "stacked-lstm"])
def model_path(request):
    """The bundles runtime tests use: tiny exports (a GRU, a stacked LSTM) when TensorFlow is here,
    else the shipped model."""
    if HAS_TF:
        return request.getfixturevalue({"gru": "tiny_bundle", "stacked-lstm": "tiny_stacked_lstm_bundle"}[request.param])
    if request.param != "gru" or not (SHIPPED / "manifest.json").is_file():
        pytest.skip("no TensorFlow to export a tiny model; the shipped model runs once")
    return SHIPPED
