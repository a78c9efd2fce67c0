"""charrnn-serve: the OpenAI-compatible completions server, in one process or on Ray Serve."""

import ipaddress
import os
import re
import secrets
import socket

import click

from charrnn_runtime import __version__
from charrnn_runtime.bundle import MODEL_ENV
from charrnn_runtime.command import BadInput, Command, cli_errors, require_extra, require_onnxruntime

from .security import MIB, SecurityOptions, is_loopback, origin

SECRET_ENV = "CHARRNN_STATE_SECRET"

EPILOG = ("Concurrent requests share batched step loops (--engines, up to --max-batch rows in all). Routes: "
          "POST /v1/completions (OpenAI's; max_tokens and usage count characters, default max_tokens 256), "
          "POST /tokenize and /detokenize (vLLM's), GET /v1/models, /health (503 while draining or failed), "
          "/metrics (Prometheus). SIGTERM or Ctrl-C drains: requests in flight "
          "finish (up to --drain-seconds), new ones get 503, then the server exits with code 0. With --ray "
          "the same app runs as a Ray Serve deployment of --replicas replicas, each with its own batch. "
          "Security: see the README's Security section (keys, browsers, limits; TLS needs a reverse proxy).")


def keys(ctx, param, values):
    """API keys are printable ASCII without spaces: what an Authorization header can carry."""
    for key in values:
        if not re.fullmatch(r"[!-~]+", key):
            raise click.BadParameter("an API key is printable ASCII without spaces")
    return tuple(values)


def key_file(ctx, param, path):
    """The keys in a file, one a line; blank lines and # comments are skipped."""
    if path is None:
        return ()
    try:
        with open(path, encoding="utf-8") as file:
            lines = [line.strip() for line in file]
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise click.BadParameter(f"{path} has no keys (one a line; # starts a comment)")
    return keys(ctx, param, found)


def secret_file(path):
    """The bytes of a secret file (surrounding whitespace dropped): at least 16 of them."""
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            secret = file.read().strip()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}") from None
    if len(secret) < 16:
        raise click.BadParameter(f"{path}: a secret of at least 16 bytes, please (e.g. openssl rand -hex 32)")
    return secret


def hosts(ctx, param, values):
    """Host names or addresses, lowercase, without a port (the Host header's port is not compared)."""
    names = tuple(value.lower().strip("[]") for value in values)
    for name in names:
        try:
            if ":" in name:  # an IPv6 address, or a port
                ipaddress.IPv6Address(name)
        except ValueError:
            raise click.BadParameter(f"{name!r}: a host name or address, without a port") from None
    return names


def origins(ctx, param, values):
    try:
        return tuple(origin(value) for value in values)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command(cls=Command, help="Serve a charrnn model over HTTP (OpenAI-compatible completions).", epilog=EPILOG)
@click.version_option(__version__, prog_name="charrnn-serve")
@click.option("--model", "model_path", type=click.Path(), default=None,
              help=f"Bundle directory or model.onnx; its name is the API's model name.  "
                   f"[default: ${MODEL_ENV}, else the packaged Shakespeare model]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one (printed).")
@click.option("--variant", type=click.Choice(["fp32", "int8"]), default="int8", show_default=True,
              help="Model weights: int8 (2-3x fp32's speed on CPU) or fp32; either way a request's text is "
                   "exactly model.generate's with its seed, whatever shares its batch.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime provider: cuda fails if CUDA cannot be used (with --ray: one GPU per replica).")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Rows stepped together; more requests wait for a free row.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime threads per step on CPU (per engine); fewer than the cores leaves the rest to the "
                   "HTTP side (with --engine-process).  [default: the cores shared among the engines]")
@click.option("--spin/--no-spin", default=True, show_default=True,
              help="Let idle onnxruntime threads spin (faster on an idle machine) or sleep (--no-spin: better "
                   "when other processes need the cores).")
@click.option("--stream-interval", type=click.FloatRange(min=0), default=0.02, show_default=True,
              help="Seconds between a streaming client's events (at least 1 ms per stream being served; the "
                   "first comes at once): each carries what its row produced since.")
@click.option("--drain-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM, how long requests in flight may take to finish before they are cancelled.")
@click.option("--max-waiting", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests that may wait for a free row; more get 503 with Retry-After.")
@click.option("--queue-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds a request may wait for a free row; then 503 with Retry-After.  [default: no limit]")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds a request may take from its arrival; then it ends with the text it has, "
                   "finish_reason \"timeout\".  [default: no limit]")
@click.option("--api-key", "api_keys", metavar="KEY", multiple=True, callback=keys, envvar="CHARRNN_API_KEY",
              show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but /health (repeatable; "
                   "$CHARRNN_API_KEY when not given).")
@click.option("--api-key-file", type=click.Path(dir_okay=False), callback=key_file,
              help="More keys, one a line (blank lines and # comments skipped).")
@click.option("--allowed-origins", metavar="ORIGIN", multiple=True, callback=origins,
              help="Web origins (scheme://host[:port], or *) whose pages may call the API (CORS); a request "
                   "from another page is refused, 403 (repeatable).")
@click.option("--allowed-hosts", metavar="HOST", multiple=True, callback=hosts,
              help="Host names accepted besides loopback ones (repeatable; * for any). Bound to loopback, "
                   "another Host is refused, 403 (DNS rebinding); bound elsewhere, giving this turns that on.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=MIB, show_default=True,
              help="Larger request bodies get 413, read no further.")
@click.option("--prefix-cache-mb", type=click.FloatRange(min=0), default=64, show_default=True,
              help="Memory for states after prompts (a few KB each, whatever the prompt's length): a prompt "
                   "that starts like an earlier one is fed only past their shared prefix. 0: off.")
@click.option("--state-secret-file", type=click.Path(dir_okay=False), callback=lambda c, p, v: secret_file(v),
              help="The key continuation tokens (\"return_state\") are signed with, shared by every replica and "
                   "restart that should accept them; else $CHARRNN_STATE_SECRET.  [default: random per start]")
@click.option("--engines", type=click.IntRange(min=1), default=None,
              help="Engines, each a process with its share of the cores (unless --threads) and of --max-batch; "
                   "a request goes to the least busy. On CPU one engine's Python overlaps "
                   "another's model step: more characters/s under load, a lone stream slower (one engine's "
                   "cores).  [default: 2 on a CPU of 2 cores or more, else 1]")
@click.option("--engine-process/--engine-in-process", default=True, show_default=True,
              help="Run the batch loop in a process of its own, so that it never waits for the HTTP side's GIL: "
                   "a gain where the cores outnumber onnxruntime's threads (see --threads), or on a GPU "
                   "(--engine-in-process: one process, its threads taking turns).")
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Serve (needs the [ray] extra).")
@click.option("--address", default=None,
              help="With --ray: the Ray cluster to join (e.g. 10.0.0.1:6379).  [default: start a local Ray]")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: replicas, each a process with its own model and batch.")
def main(model_path, host, port, variant, provider, max_batch, threads, spin, stream_interval, drain_seconds,
         max_waiting, queue_timeout, request_timeout, api_keys, api_key_file, allowed_origins, allowed_hosts,
         max_body_bytes, prefix_cache_mb, state_secret_file, engines, engine_process, use_ray, address, replicas):
    if not use_ray and (address or replicas != 1):
        raise BadInput("--address and --replicas need --ray")
    load_options = dict(provider=provider, variant=variant, threads=threads, spinning=spin)
    engine_options = dict(max_batch=max_batch, max_waiting=max_waiting, flush_seconds=stream_interval,
                          queue_timeout=queue_timeout, request_timeout=request_timeout,
                          prefix_cache_bytes=int(prefix_cache_mb * MIB))
    secret = state_secret_file or os.environ.get(SECRET_ENV, "").encode()
    random_secret = not secret  # said once the server is up: a bad flag is one line
    security = SecurityOptions(api_keys=api_keys + api_key_file, allowed_origins=allowed_origins,
                               allowed_hosts=allowed_hosts, bind_host=host,
                               max_body_bytes=max_body_bytes, state_secret=secret or secrets.token_bytes(32))
    if not security.api_keys and not is_loopback(host):
        click.echo(f"note: listening on {host} without --api-key: whoever reaches the port can generate", err=True)
    if use_ray:
        try:
            from .ray_app import run
        except ImportError:
            require_extra("ray", "charrnn-serve --ray")
        with cli_errors():
            run(model_path, host, port, load_options, engine_options, drain_seconds, address, replicas, security,
                engines, engine_process, note_random_secret if random_secret else None)
        return
    try:
        from .engines import start_engine
    except ImportError as e:
        require_onnxruntime("charrnn-serve", e)
    try:
        from .app import create_app
        from .server import serve
    except ImportError:
        require_extra("serve", "charrnn-serve")
    with cli_errors():
        listening = listen(host, port)
        engine = start_engine(model_path, load_options, engine_options, engines, engine_process)
    model = engine.model
    if model.cpu_reason:
        click.echo(f"note: running on CPU: {model.cpu_reason}", err=True)
    if random_secret:
        note_random_secret()
    app = create_app(engine, drain_seconds=drain_seconds, security=security)
    host, port = listening.getsockname()[:2]
    engines = engine.metrics()["engines"]
    pool = f", {engines} engines" if engines > 1 else ""
    click.echo(f"charrnn-serve: {model.path.name} ({model.variant} on {model.provider}, max batch {max_batch}{pool}) "
               f"at http://{host}:{port}/v1{' (API key required)' if security.api_keys else ''}", err=True)
    serve(app, engine, listening, drain_seconds)


def note_random_secret():
    click.echo(f"note: no --state-secret-file or ${SECRET_ENV}: continuation tokens are signed with a random key, "
               "so they survive neither a restart nor another server", err=True)


def listen(host, port):
    """The listening socket, bound here so that a busy port is a one-line error (and port 0 works)."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None

