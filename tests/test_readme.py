"""README.md as a new user meets it: every console and Python block runs, and prints what it shows.

A block that cannot run here says why, visibly, on the line right before it:
`<!-- not run: REASON -->` (a GPU, the 50-minute training run, several machines).

Blocks run in a scratch directory that looks like the checkout (its entries linked, `.venv` this
interpreter's), so the README's paths resolve and nothing is written into the checkout. A console
block's `$ ` commands run in one bash, in order (a server started with `&` serves the next
commands); a Python block runs as a script. What a block shows under a command is compared with
what the command prints, stdout and stderr in the order written, as a terminal shows them:
- `…` stands for any text within a line, and a line of only `…` for any lines;
- durations and speeds (`0.13 s`, `2,379 chars/s`) are not compared;
- JSON is compared as JSON, with `seconds`, `chars_per_second` and `created` numbers of any value;
- trailing spaces and blank lines are not compared.
A command shown without output must exit 0, and so must a Python block. Port 8000 in a block is
replaced by a free port: its own server's if the block starts `charrnn-serve`, else that of a
`charrnn-serve` of the shipped model started for it (as `make serve` runs it).

docs/cli.md is every command's --help; `python tests/test_readme.py` writes it anew.
"""

import difflib
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from conftest import charrnn_serve

from charrnn_runtime.install import DISTRIBUTION

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_REFERENCE = ROOT / "docs" / "cli.md"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNNABLE = ("console", "python")
VOLATILE_TEXT = [(re.compile(r"\d[\d,]*(\.\d+)? s\b"), "_ s"), (re.compile(r"\d[\d,]*(\.\d+)? chars/s"), "_ chars/s"),
                 (re.compile(r"\b\d\.\d+e-(0[5-9]|[1-9]\d)\b"), "_")]  # float noise under 1e-4: it varies with the CPU
VOLATILE_KEYS = {"seconds", "chars_per_second", "created", "cached_tokens"}  # cached_tokens: what ran before
OTHER_TOOLS_OPTIONS = {"--data-binary", "--retry", "--retry-connrefused",  # curl
                       "--dry-run", "--upgrade", "--head", "--repeats",  # pip, ray start, benchmarks/benchmark.py
                       "--pythonpath",  # benchmarks/prefill_benchmark.py
                       "--clients", "--burst",  # benchmarks/serve_benchmark.py
                       "--shapes", "--steps",  # benchmarks/train_speed.py
                       "--native", "--idle"}  # py-spy


@dataclass
class Block:
    line: int  # of the opening fence in README.md
    language: str
    code: str
    not_run: str | None  # the marker's reason

    def needs_a_server(self):
        """Does it talk to port 8000 without starting a server there itself?"""
        return "8000" in self.code and "charrnn-serve" not in self.code


def readme_blocks():
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, start = [], None
    for number, line in enumerate(lines):
        if start is None and (fence := re.fullmatch(r"```(\w*)", line)):
            start, language = number, fence.group(1)
        elif start is not None and line == "```":
            marker = re.fullmatch(r"<!-- not run: (.+) -->", lines[start - 1])
            blocks.append(Block(start + 1, language, "\n".join(lines[start + 1:number]) + "\n",
                                marker and marker.group(1)))
            start = None
    return blocks


RUNNABLE_BLOCKS = [block for block in readme_blocks() if block.language in RUNNABLE]


@pytest.fixture
def workdir(tmp_path):
    """A directory that looks like the checkout: README paths resolve, written files stay here."""
    work = tmp_path / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".venv", "runs", "build", "dist"}:
            (work / entry.name).symlink_to(entry)
    venv = work / ".venv"
    venv.mkdir()
    (venv / "bin").symlink_to(Path(sys.executable).parent)
    for stamp in (".runtime", ".dev", ".serve"):  # the Makefile's "installed" marks: never install here
        (venv / stamp).touch()
    return work


def environment():
    """This interpreter's commands first; no model or API key chosen by the caller's environment."""
    env = {name: value for name, value in os.environ.items() if name not in {"CHARRNN_MODEL", "CHARRNN_API_KEY"}}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_steps(code):
    """[(command, what the README shows it printing)]: `$ ` lines, `\\` continuations, then output."""
    steps = []
    for line in code.splitlines():
        if line.startswith("$ "):
            steps.append([line[2:], []])
        elif steps and steps[-1][0].endswith("\\") and not steps[-1][1]:
            steps[-1][0] += "\n" + line
        else:
            assert steps, f"a console block starts with a `$ ` command, not {line!r}"
            steps[-1][1].append(line)
    return [(command, "\n".join(shown)) for command, shown in steps]


def run_console(code, workdir, outputs):
    """[(command, shown, exit code, printed)], the commands run in one bash in `workdir`."""
    steps = console_steps(code)
    script = [f"{{ {command}\n}} > {outputs}/{i}.out 2>&1; echo $? > {outputs}/{i}.rc"
              for i, (command, _) in enumerate(steps)]
    script.append("wait")  # for a server the block stopped to finish draining
    env = {**environment(), "PYTHONUNBUFFERED": "1"}  # stdout and stderr interleaved as written
    with subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=workdir, env=env, start_new_session=True) as shell:
        try:
            shell.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            raise AssertionError("still running after 300 s: does a server it starts with `&` lack its `kill %1`?")
    return [(command, shown, int((outputs / f"{i}.rc").read_text()), (outputs / f"{i}.out").read_text())
            for i, (command, shown) in enumerate(steps)]


def normalized(text):
    text = "\n".join(line.rstrip() for line in text.rstrip().split("\n"))
    for pattern, replacement in VOLATILE_TEXT:
        text = pattern.sub(replacement, text)
    return text


def within_line(shown):
    """A regex for one shown line (or JSON string): `…` is any text."""
    return ".*?".join(map(re.escape, shown.split("…")))


def wildcard(shown):
    """A regex for shown lines: `…` is any text within a line, a line of only `…` any lines."""
    return "".join(r"(?:[^\n]*\n)*?" if line == "…" else within_line(line) + r"\n" for line in shown.split("\n"))


def same_json(shown, printed):
    if isinstance(shown, dict):
        return isinstance(printed, dict) and shown.keys() == printed.keys() and all(
            isinstance(printed[key], (int, float)) if key in VOLATILE_KEYS else same_json(value, printed[key])
            for key, value in shown.items())
    if isinstance(shown, list):
        return isinstance(printed, list) and len(shown) == len(printed) and all(map(same_json, shown, printed))
    if isinstance(shown, str):
        return isinstance(printed, str) and re.fullmatch(within_line(shown), printed, re.S) is not None
    return shown == printed


def difference(shown, printed):
    """A diff of shown and printed lines, where a printed line that a shown line's `…` matches is equal."""
    shown_lines = shown.splitlines()
    patterns = {line: re.compile(within_line(line)) for line in shown_lines if "…" in line and line != "…"}

    def as_shown(line):
        return next((shown_line for shown_line, pattern in patterns.items() if pattern.fullmatch(line)), line)

    return difflib.unified_diff(shown_lines, [as_shown(line) for line in printed.splitlines()], "README", "printed",
                                lineterm="")


def prints_what_it_shows(shown, printed):
    if shown.startswith("{"):
        try:
            return same_json(json.loads(shown), json.loads(printed))
        except json.JSONDecodeError:
            return False
    return re.fullmatch(wildcard(normalized(shown)), normalized(printed) + "\n") is not None


@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=[f"line{block.line}" for block in RUNNABLE_BLOCKS])
def test_readme_block(block, workdir, tmp_path):
    if block.not_run:
        pytest.skip(f"README.md:{block.line} not run: {block.not_run}")
    if block.needs_a_server():
        with charrnn_serve() as (_, url):
            run_block(block, int(url.rsplit(":", 1)[1]), workdir, tmp_path)
    else:
        run_block(block, free_port(), workdir, tmp_path)


def run_block(block, port, workdir, tmp_path):
    code = re.sub(r"\b8000\b", str(port), block.code)
    where = f"README.md:{block.line} ({block.language} block)"
    if block.language == "python":
        script = tmp_path / "block.py"
        script.write_text(code, encoding="utf-8")
        result = subprocess.run([sys.executable, script], cwd=workdir, env=environment(), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"{where} fails:\n{result.stderr[-3000:]}"
    else:
        (tmp_path / "outputs").mkdir()
        for command, shown, exit_code, printed in run_console(code, workdir, tmp_path / "outputs"):
            if not shown:
                assert exit_code == 0, f"{where}: `{command}` exited {exit_code}:\n{printed[-3000:]}"
            elif not prints_what_it_shows(shown, printed):
                pytest.fail(f"{where}: `{command}` prints other than the README shows (exit code {exit_code}; "
                            "timings and float noise under 1e-4, shown as `_`, are not compared; what a line of `…` "
                            "stands for shows as added):\n" + "\n".join(difference(normalized(shown), normalized(printed))))


def test_not_run_markers_sit_on_runnable_blocks():
    """A marker on a block that is not run anyway (text, output) would say nothing."""
    marked = [block for block in readme_blocks() if block.not_run and block.language not in RUNNABLE]
    assert not marked, [f"README.md:{block.line}" for block in marked]


def commands():
    """{name: click command} of every command pyproject.toml declares."""
    found = {}
    for name, entry in PROJECT["scripts"].items():
        module, function = entry.split(":")
        found[name] = getattr(importlib.import_module(module), function)
    return found


def cli_reference():
    """docs/cli.md: every command's --help, at 100 columns."""
    sections = ["# Command-line reference\n\nEvery option of every command with its default: each command's "
                "`--help`, written by `python tests/test_readme.py` (the test suite checks it is current).\n"]
    for name, command in commands().items():
        context = click.Context(command, info_name=name, terminal_width=100, max_content_width=100)
        sections.append(f"## {name}\n\n```text\n{command.get_help(context)}\n```\n")
    return "\n".join(sections)


def test_the_cli_reference_is_every_commands_help():
    assert CLI_REFERENCE.read_text(encoding="utf-8") == cli_reference(), \
        "docs/cli.md differs from the commands' --help: `python tests/test_readme.py` writes it anew"


def test_the_readme_names_only_options_that_exist():
    options = {"--help"} | {option for command in commands().values() for param in command.params
                            for option in param.opts + param.secondary_opts}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README.read_text(encoding="utf-8")))
    assert named - options <= OTHER_TOOLS_OPTIONS, f"not an option of any charrnn command: {named - options}"


def test_installs_name_this_distribution():
    """`charrnn` on PyPI is another project: no extra, install or wheel name may point to it."""
    assert PROJECT["name"] == DISTRIBUTION
    requirements = " ".join(r for extra in PROJECT["optional-dependencies"].values() for r in extra)
    readme = README.read_text(encoding="utf-8")
    assert not re.findall(r"(?<![\w.-])charrnn(?:\[|-\d)", requirements + readme)


if __name__ == "__main__":
    CLI_REFERENCE.parent.mkdir(exist_ok=True)
    CLI_REFERENCE.write_text(cli_reference(), encoding="utf-8")


def test_the_round_2_curves_and_figures_come_from_committed_records(tmp_path):
    """The command under the round-2 plot runs from a checkout and prints the figures the README
    quotes, and the README quotes every committed run's held-out scores (round 2's, round 3's): the
    records are in git, runs/ is not."""
    pytest.importorskip("matplotlib")
    plot = tmp_path / "curves.png"
    round2 = ROOT / "benchmarks" / "round2"
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "curves.py"),
                            str(ROOT / "benchmarks" / "round1" / "shakespeare-gru2x512"),
                            str(round2 / "shakespeare-gru2x512-awd"), str(round2 / "shakespeare-gru2x512-awd-no-weight-drop"),
                            "--out", str(plot)], capture_output=True, text=True, check=True).stdout
    assert plot.stat().st_size > 10_000
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "1.4515" in rows["21"] and "1.4484" in rows["28"] and "1.4598" in rows["17"]
    quoted = set(re.findall(r"\d\.\d{4}", README.read_text(encoding="utf-8")))
    for record in (ROOT / "benchmarks").glob("round*/*/quality.json"):
        for result in json.loads(record.read_text())["results"]:
            assert {f"{result['windowed_loss']:.4f}", f"{result['full_context_loss']:.4f}"} <= quoted, record
