"""charrnn-serve: the OpenAI-compatible completions server, in one process or on Ray Serve."""

import socket

import click

from charrnn_runtime import __version__
from charrnn_runtime.bundle import MODEL_ENV
from charrnn_runtime.command import BadInput, Command, cli_errors, require_extra, require_onnxruntime

EPILOG = ("Concurrent requests share one batched step loop (up to --max-batch rows). Routes: POST "
          "/v1/completions (OpenAI's; max_tokens and usage count characters, default max_tokens 256), "
          "GET /v1/models, /health, /metrics (Prometheus). SIGTERM or Ctrl-C drains: requests in flight "
          "finish (up to --drain-seconds), new ones get 503, then the server exits with code 0. With --ray "
          "the same app runs as a Ray Serve deployment of --replicas replicas, each with its own batch.")


@click.command(cls=Command, help="Serve a charrnn model over HTTP (OpenAI-compatible completions).", epilog=EPILOG)
@click.version_option(__version__, prog_name="charrnn-serve")
@click.option("--model", "model_path", type=click.Path(), default=None,
              help=f"Bundle directory or model.onnx; its name is the API's model name.  "
                   f"[default: ${MODEL_ENV}, else the packaged Shakespeare model]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on; 0 picks a free one (printed).")
@click.option("--variant", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Model weights: fp32 (a request's text is exactly model.generate's with its seed), or int8 "
                   "(faster on CPU; rows share quantization scales, so a neighbour can flip a near-tie).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime provider: cuda fails if CUDA cannot be used (with --ray: one GPU per replica).")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Rows stepped together; more requests wait for a free row.")
@click.option("--spin/--no-spin", default=True, show_default=True,
              help="Let idle onnxruntime threads spin (faster on an idle machine) or sleep (--no-spin: better "
                   "when other processes need the cores).")
@click.option("--stream-interval", type=click.FloatRange(min=0), default=0.02, show_default=True,
              help="Seconds between a streaming client's events: each carries what its row produced since.")
@click.option("--drain-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM, how long requests in flight may take to finish before they are cancelled.")
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Serve (needs the [ray] extra).")
@click.option("--address", default=None,
              help="With --ray: the Ray cluster to join (e.g. 10.0.0.1:6379).  [default: start a local Ray]")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: replicas, each a process with its own model and batch.")
def main(model_path, host, port, variant, provider, max_batch, spin, stream_interval, drain_seconds, use_ray, address,
         replicas):
    if not use_ray and (address or replicas != 1):
        raise BadInput("--address and --replicas need --ray")
    load_options = dict(provider=provider, variant=variant, spinning=spin)
    engine_options = dict(max_batch=max_batch, flush_seconds=stream_interval)
    if use_ray:
        try:
            from .ray_app import run
        except ImportError:
            require_extra("ray", "charrnn-serve --ray")
        with cli_errors():
            run(model_path, host, port, load_options, engine_options, drain_seconds, address, replicas)
        return
    try:
        from charrnn_runtime import load
        from charrnn_runtime.engine import Engine
    except ImportError as e:
        require_onnxruntime("charrnn-serve", e)
    try:
        from .app import create_app
        from .server import serve
    except ImportError:
        require_extra("serve", "charrnn-serve")
    with cli_errors():
        model = load(model_path, **load_options)
        listening = listen(host, port)
    if model.cpu_reason:
        click.echo(f"note: running on CPU: {model.cpu_reason}", err=True)
    engine = Engine(model, **engine_options)
    app = create_app(engine, drain_seconds=drain_seconds)
    host, port = listening.getsockname()[:2]
    click.echo(f"charrnn-serve: {model.path.name} ({model.variant} on {model.provider}, max batch {max_batch}) "
               f"at http://{host}:{port}/v1", err=True)
    serve(app, engine, listening, drain_seconds)


def listen(host, port):
    """The listening socket, bound here so that a busy port is a one-line error (and port 0 works)."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None

