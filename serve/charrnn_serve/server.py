"""uvicorn, with SIGTERM draining the engine before the server stops."""

import threading

import uvicorn


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT the engine drains first, while the socket stays open: requests in flight
    finish (up to drain_seconds), new ones get 503 with Retry-After (a load balancer retries them
    elsewhere); then uvicorn closes the socket and stops. A second signal stops at once.

    uvicorn's own handler would re-raise the signal after its shutdown (exit status 143); this one
    does not, so a drained server exits 0."""

    def __init__(self, config, engine, drain_seconds):
        super().__init__(config)
        self.engine, self.drain_seconds, self.draining = engine, drain_seconds, False

    def handle_exit(self, sig, frame):
        if self.draining:
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        threading.Thread(target=self.drain, name="charrnn-drain", daemon=True).start()

    def drain(self):
        self.engine.drain(self.drain_seconds)
        self.should_exit = True


def serve(app, engine, listening, drain_seconds):
    """Serve `app` on the listening socket until a signal has drained `engine`."""
    # Idle keep-alive connections live longer here (30 s) than in common clients (httpx, hence openai: 5 s),
    # so a client never sends a request on a connection the server is closing at that moment.
    config = uvicorn.Config(app, timeout_graceful_shutdown=drain_seconds, timeout_keep_alive=30, access_log=False,
                            log_level="warning")
    DrainingServer(config, engine, drain_seconds).run(sockets=[listening])
