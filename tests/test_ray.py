"""charrnn on Ray Serve: a local Ray, 2 replicas on loopback that need an API key, one killed and replaced."""

import asyncio
import json
import os
import socket
import time
import warnings

import pytest

ray = pytest.importorskip("ray", reason="needs the [ray] extra")
import httpx  # noqa: E402
from conftest import HAS_TF, SHIPPED  # noqa: E402

with warnings.catch_warnings():  # Ray Serve's own use of deprecated pydantic features, at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray import serve

    from charrnn_serve.ray_app import NAME, deployment
    from charrnn_serve.security import SecurityOptions

KEY = {"authorization": "Bearer ray-key"}
SECRET = b"the secret every replica shares"


@pytest.fixture(scope="module")
def url(request, tmp_path_factory):
    """serve.run of the charrnn deployment with 2 replicas; Ray shut down afterwards."""
    model = request.getfixturevalue("tiny_bundle") if HAS_TF else SHIPPED
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(model, engine_options={"max_batch": 16}, replicas=2,
                             security=SecurityOptions(api_keys=("ray-key",), state_secret=SECRET)),
                  name=NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def replicas_answering(url, requests=32, headers=KEY, status=200):
    """The replica ids (X-Replica) that answered `requests` concurrent completions, all with `status`."""
    async def all_at_once():
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 200,
                                                                               "seed": i}) for i in range(requests)))
    responses = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [status] * requests
    assert status != 200 or all(len(r.json()["choices"][0]["text"]) == 200 for r in responses)
    return {r.headers["x-replica"] for r in responses}


def both_replicas(url, **options):
    """The replicas that answered rounds of replicas_answering(url, **options), until both have (5 at most)."""
    seen = set()
    for _ in range(5):
        seen |= replicas_answering(url, **options)
        if len(seen) == 2:
            break
    return seen


def test_a_continuation_token_goes_on_on_another_replica(url):
    """The state travels in the token: a replica that never saw the request continues it exactly.
    (Before the kill test: while a replica is being replaced, requests may fail.)"""
    def complete(**fields):
        response = httpx.post(f"{url}/v1/completions", headers=KEY, timeout=60,
                              json={"max_tokens": 40, "seed": 3, "temperature": 0.8, **fields})
        return response.json()["choices"][0], response.headers["x-replica"]

    whole, _ = complete(prompt="a", max_tokens=80)
    for _ in range(40):  # until the continuation lands on another replica than the first half
        first, where = complete(prompt="a", return_state=True)
        second, there = complete(prompt="", state=first["state"])
        assert first["text"] + second["text"] == whole["text"]
        if there != where:
            return
    pytest.fail("every continuation landed on the replica of its first half")


def test_two_replicas_answer_and_a_killed_one_is_replaced(url):
    seen = both_replicas(url)
    assert len(seen) == 2
    victim = sorted(seen)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while True:  # Ray notices the dead replica and starts another; requests meanwhile may go to either
        try:
            now = replicas_answering(url, 8)
        except (AssertionError, httpx.HTTPError):
            now = set()
        if len(now | seen) > 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"no replacement for {victim}: {now}"
        time.sleep(1)
    assert len(replicas_answering(url)) >= 1
    events = httpx.post(f"{url}/v1/completions", json={"max_tokens": 300, "stream": True}, headers=KEY, timeout=60).text
    chunks = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: {")]
    assert events.rstrip().endswith("data: [DONE]") and sum(len(c["choices"][0]["text"]) for c in chunks) == 300


def test_every_replica_refuses_a_request_without_the_key(url):
    """The keys travel with the deployment into each replica's app (the replacement's too)."""
    assert len(both_replicas(url, requests=16, headers={}, status=401)) == 2
    refused = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer guess"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200
