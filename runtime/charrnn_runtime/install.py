"""The pip command that adds an extra, for the hints of errors a missing install causes.

The distribution is `charrnn-onnx`: `charrnn` on PyPI is an unrelated project (0.1.1, 2017; it
installs the package `charrnn` and the command `charrnn`, so our `charrnn_*` packages and
`charrnn-*` commands do not collide with it, but `pip install 'charrnn[...]'` would install it).
"""

from pathlib import Path

DISTRIBUTION = "charrnn-onnx"
CHECKOUT = Path(__file__).resolve().parents[2]  # runtime/charrnn_runtime/ in a source checkout


def pip_install(extras):
    """`pip install` of `extras` (e.g. "serve") for this installation: an editable install of the
    checkout this code runs from (`.` where the working directory holds its pyproject.toml), else
    the package."""
    project = CHECKOUT / "pyproject.toml"
    if not project.is_file():
        return f"pip install '{DISTRIBUTION}[{extras}]'"
    here = Path("pyproject.toml")
    where = "." if here.exists() and here.samefile(project) else str(CHECKOUT)
    return f"pip install -e '{where}[{extras}]'"
