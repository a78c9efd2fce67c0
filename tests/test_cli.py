"""What the commands do before their heavy imports: --version, and bad arguments reported at once,
before TensorFlow is imported (which takes seconds). Runs without the [train] extra too."""

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import charrnn_runtime
from charrnn_runtime import install
from conftest import SONNETS, assert_one_line_error, fake_run, run_python

COMMANDS = {"charrnn-run": "charrnn_runtime.cli", "charrnn-train": "charrnn_train.cli",
            "charrnn-export": "charrnn_export.cli", "charrnn-serve": "charrnn_serve.cli"}


@pytest.mark.parametrize("command", COMMANDS)
def test_version(command):
    main = __import__(COMMANDS[command], fromlist=["main"]).main
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"{command}, version {charrnn_runtime.__version__}\n"


def test_argument_errors_come_before_tensorflow(tmp_path):
    run, taken, empty = fake_run(tmp_path / "run"), tmp_path / "taken", tmp_path / "empty"
    taken.mkdir()
    empty.mkdir()
    (taken / "file").touch()
    corpus = ["--corpus", str(SONNETS), "--batch-size", "1"]
    cases = [
        ("charrnn-train", ["--corpus", str(tmp_path / "missing.txt")], "corpus not found"),
        ("charrnn-train", [*corpus, "--epochs", "0"], "epochs must be positive"),
        ("charrnn-train", [*corpus, "--learning-rate", "nan"], "learning-rate"),
        ("charrnn-train", [*corpus, "--out", str(taken)], "output directory exists"),
        ("charrnn-train", [*corpus, "--out", str(empty)], "output directory exists"),
        ("charrnn-train", ["--resume", str(tmp_path / "missing")], "not a charrnn training run"),
        ("charrnn-export", [str(tmp_path / "missing")], "no such run or model"),
        ("charrnn-export", [str(tmp_path)], "not a charrnn training run"),
        ("charrnn-export", [str(run), str(taken)], "output exists"),
        ("charrnn-export", [str(run), "--tolerance", "-1"], "--tolerance"),
        ("charrnn-export", [str(run), "--validation-text", str(tmp_path / "missing.txt")], "does not exist"),
    ]
    code = f"""
import importlib, json, sys
from click.testing import CliRunner
commands = {COMMANDS!r}
results = []
for command, args, _ in {cases!r}:
    result = CliRunner().invoke(importlib.import_module(commands[command]).main, args)
    results.append((result.exit_code, result.output))
print(json.dumps({{"results": results, "tensorflow": "tensorflow" in sys.modules}}))
"""
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout)
    for (_, _, fragment), (exit_code, output) in zip(cases, outcome["results"], strict=True):
        assert_one_line_error(SimpleNamespace(exit_code=exit_code, output=output), fragment)
    assert not outcome["tensorflow"]


def test_install_hints_name_this_distribution_or_the_checkout(tmp_path, monkeypatch):
    """`charrnn` on PyPI is another project: a hint installs charrnn-onnx, or the checkout it runs from."""
    monkeypatch.setattr(install, "CHECKOUT", tmp_path)
    assert install.pip_install("serve") == "pip install 'charrnn-onnx[serve]'"
    (tmp_path / "pyproject.toml").touch()
    assert install.pip_install("serve") == f"pip install -e '{tmp_path}[serve]'"
    monkeypatch.chdir(tmp_path)
    assert install.pip_install("train-gpu,gpu") == "pip install -e '.[train-gpu,gpu]'"
