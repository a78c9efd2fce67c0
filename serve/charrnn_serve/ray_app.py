"""The same FastAPI app as a Ray Serve deployment: N replicas, each one Engine with its own batch.

    serve.run(deployment(replicas=2), route_prefix="/")

Ray's proxy spreads requests over the replicas. Its default of 5 requests at once per replica
would cap each engine's batch at 5, so max_ongoing_requests is raised to twice the batch: a full
batch stepping and as many requests ready to take a row the moment one frees.
"""

import signal
import threading

from ray import serve

from charrnn_runtime import bundle

from .app import create_app
from .engines import start_engine

NAME = "charrnn"


def deployment(model=None, load_options=None, engine_options=None, drain_seconds=30.0, replicas=1, security=None,
               engines=None, engine_process=True):
    """The bound Ray Serve application (pass it to serve.run); `model`: a path every node has, or None
    for each replica's packaged model; the options go to charrnn_runtime.load and Engine, and `security`
    (SecurityOptions, keys included) to each replica's create_app. engines, engine_process: each
    replica's engines, as charrnn-serve's (engines.py)."""
    load_options, engine_options = load_options or {}, engine_options or {}

    def build_app():  # runs in each replica's process
        replica = serve.get_replica_context().replica_id.to_full_id_str()  # its actor name
        engine = start_engine(model, load_options, engine_options, engines, engine_process)
        return create_app(engine, replica, drain_seconds, security)

    ingress = serve.deployment(
        serve.ingress(build_app)(), name=NAME, num_replicas=replicas,
        max_ongoing_requests=2 * engine_options.get("max_batch", 64), graceful_shutdown_timeout_s=drain_seconds,
        ray_actor_options={"num_gpus": 1} if load_options.get("provider") == "cuda" else {})
    return ingress.bind()


def run(model, host, port, load_options, engine_options, drain_seconds, address, replicas, security, engines,
        engine_process, note=None):
    """charrnn-serve --ray: deploy, print where, serve until SIGTERM/SIGINT, then shut Serve down.
    `note`: called once the model is found (the CLI's warnings)."""
    import ray

    path = bundle.find(model, load_options.get("variant", "fp32")).path  # fails here, not in every replica
    if note is not None:
        note()
    ray.init(address=address)
    try:
        serve.start(http_options={"host": host, "port": port})
        # replicas may run on other machines: the same absolute path must hold the model there
        serve.run(deployment(str(path.resolve()), load_options, engine_options, drain_seconds, replicas, security,
                             engines, engine_process), name=NAME, route_prefix="/")
        print(f"charrnn-serve: {replicas} replica(s) on Ray at http://{host}:{port}/v1"
              f"{' (API key required)' if security.api_keys else ''}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()  # replicas drain (graceful_shutdown_timeout_s) and close their engines
    finally:
        ray.shutdown()
