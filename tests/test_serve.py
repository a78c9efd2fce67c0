"""charrnn-serve: the OpenAI client against a real server on loopback, bad requests, disconnects, drain."""

import asyncio
import contextlib
import json
import random
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import HAS_TF, SHIPPED, assert_one_line_error, charrnn_serve, run_python  # noqa: E402
from test_engine import random_requests  # noqa: E402

import charrnn_runtime  # noqa: E402
from charrnn_runtime.engine import Engine  # noqa: E402
from charrnn_runtime.engine_pool import cores  # noqa: E402
from charrnn_runtime.install import pip_install  # noqa: E402
from charrnn_serve import cli  # noqa: E402
from charrnn_serve.app import create_app  # noqa: E402


@contextlib.contextmanager
def serving(model, engine_type=Engine, **engine_options):
    """create_app over a fresh Engine (or EngineProcess), served by uvicorn in a thread; yields (base url, engine)."""
    engine = engine_type(model, **engine_options)
    listening = cli.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]})
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join()


@pytest.fixture(scope="module")
def model(request):
    """The tiny GRU (fast) when TensorFlow can export it, else the shipped model."""
    return charrnn_runtime.load(request.getfixturevalue("tiny_bundle") if HAS_TF else SHIPPED, "cpu")


@pytest.fixture(scope="module")
def server(model):
    with serving(model, max_length=1000) as running:
        yield running


@pytest.fixture(scope="module")
def shipped():
    """The shipped model: slow enough (~thousands of chars/s) to catch a request mid-flight."""
    return charrnn_runtime.load(SHIPPED, "cpu")


def wait_until_idle(engine, timeout=10):
    deadline = time.monotonic() + timeout
    while engine.metrics()["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return engine.metrics()


def test_openai_client_completions_and_streams_equal_solo_runs(server, model):
    url, engine = server
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    name = model.path.name
    requests = random_requests(model, 32, seed=5)

    async def one(i, prompt, length, settings):
        kwargs = dict(model=name, prompt=prompt, max_tokens=length, temperature=settings["temperature"],
                      top_p=settings["top_p"], seed=settings["seed"], stop=list(settings["stop"]) or None,
                      n=1 + i % 2, extra_body={"top_k": settings["top_k"]})
        if i % 4 < 2:
            return await client.completions.create(**kwargs)
        texts, reasons = {}, {}
        async for chunk in await client.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
        return texts, reasons

    async def all_at_once():
        async with client:
            return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))

    answers = asyncio.run(all_at_once())
    for i, (answer, (prompt, length, settings)) in enumerate(zip(answers, requests, strict=True)):
        generated = 0
        for index in range(1 + i % 2):
            solo = model.generate(prompt, length, **{**settings, "seed": settings["seed"] + index})
            expected = model.generate(prompt, length, **{**settings, "seed": settings["seed"] + index},
                                      include_stop=False)  # OpenAI's: the stop string left out
            generated += len(solo)
            reason = "length" if len(solo) == length and expected == solo else "stop"
            if i % 4 < 2:
                choice = answer.choices[index]
                assert (choice.text, choice.finish_reason, choice.index) == (expected, reason, index)
            else:
                assert (answer[0][index], answer[1][index]) == (expected, reason)
        if i % 4 < 2:
            assert answer.model == name and answer.object == "text_completion"
            assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), generated)
    assert wait_until_idle(engine)["active_rows"] == 0


def test_models_health_and_prometheus_metrics(server, model):
    url, engine = server
    models = openai.OpenAI(base_url=f"{url}/v1", api_key="none").models.list()
    assert [m.id for m in models.data] == [model.path.name]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    body = {"prompt": "", "max_tokens": 5, "seed": 1, "stop": "a longer stop string"}
    assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
    text = httpx.get(f"{url}/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(samples['charrnn_requests_total{finish_reason="length"}']) >= 1
    assert float(samples["charrnn_generated_chars_total"]) >= 5
    assert samples["charrnn_active_rows"] == "0" and samples["charrnn_max_batch"] == "64"
    assert float(samples["charrnn_step_seconds_count"]) >= 5 and float(samples["charrnn_batch_rows_sum"]) >= 5


BAD = [  # (body fields, the param the error must name, status)
    ({"prompt": "\u20ac"}, "prompt", 400), ({"prompt": 5}, "prompt", 400), ({"prompt": ["a", "b"]}, "prompt", 400),
    ({"prompt": [1, 2]}, "prompt", 400), ({"temperature": -1}, "temperature", 400),
    ({"temperature": "hot"}, "temperature", 400), ({"temperature": True}, "temperature", 400),
    ({"top_p": 0}, "top_p", 400), ({"top_p": 1.5}, "top_p", 400), ({"top_p": []}, "top_p", 400),
    ({"top_k": 0}, "top_k", 400), ({"top_k": 2.5}, "top_k", 400), ({"n": 0}, "n", 400), ({"n": "2"}, "n", 400),
    ({"n": 10_000}, "n", 400), ({"max_tokens": -1}, "max_tokens", 400), ({"max_tokens": 10**6}, "max_tokens", 400),
    ({"max_tokens": "5"}, "max_tokens", 400), ({"model": "gpt-4"}, "model", 404), ({"model": 3}, "model", 400),
    ({"stop": ""}, "stop", 400), ({"stop": ["a"] * 5}, "stop", 400), ({"stop": [1]}, "stop", 400),
    ({"seed": -3}, "seed", 400), ({"seed": "x"}, "seed", 400), ({"stream": "yes"}, "stream", 400),
]
RAW = [b"{", b"not json", b"[1, 2]", b'"a string"', b"", b'{"prompt": "a",}', b"\xff\xfe"]
NAN = [(b'{"temperature": NaN}', "temperature"), (b'{"top_p": Infinity}', "top_p")]


def test_a_storm_of_bad_requests_gets_4xx_json_errors_and_the_server_lives(server, model):
    url, engine = server
    rng = random.Random(0)
    with httpx.Client(base_url=url) as client:
        for _ in range(300):
            kind = rng.random()
            if kind < 0.7:
                fields, param, status = rng.choice(BAD)
                body = {"prompt": "", "max_tokens": 5, "stream": rng.random() < 0.5, **fields}
                response = client.post("/v1/completions", json=body)
            elif kind < 0.9:
                content, param, status = rng.choice(RAW), None, 400
                response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            else:
                (content, param), status = rng.choice(NAN), 400
                response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            assert response.status_code == status, (fields if kind < 0.7 else content, response.text)
            error = response.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
        good = client.post("/v1/completions", json={"prompt": "", "max_tokens": 20, "seed": 3}).json()
    assert good["choices"][0]["text"] == model.generate("", 20, seed=3)
    assert wait_until_idle(engine)["active_rows"] == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_row(shipped, stream):
    with serving(shipped) as (url, engine), httpx.Client(base_url=url) as client:
        body = {"prompt": "ROMEO: ", "max_tokens": 4000, "stream": stream}
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as response:
                next(response.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body, timeout=0.5)
        metrics = wait_until_idle(engine)
        assert metrics["active_rows"] == 0 and metrics["requests_total"] == {"cancelled": 1}


def test_a_client_that_goes_away_while_queued_never_gets_a_row(shipped):
    """One row, taken by a long stream; a second request waits for it, and its client leaves: once
    the row is free, the queued request ends cancelled without being generated."""
    with serving(shipped, max_batch=1, max_length=10**6) as (url, engine), httpx.Client(base_url=url) as client:
        long = {"prompt": "", "max_tokens": 10**6, "stream": True}
        with client.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # held: a dropped iterator closes the response
            next(lines)
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json={"prompt": "ROMEO: ", "max_tokens": 5}, timeout=0.5)
            assert engine.metrics()["waiting_requests"] == 1
        metrics = wait_until_idle(engine)
        assert metrics["active_rows"] == 0 and metrics["requests_total"] == {"cancelled": 2}


def test_engine_busy_is_503_with_retry_after(shipped):
    with serving(shipped, max_batch=1, max_waiting=1) as (url, engine), httpx.Client(base_url=url) as client:
        body = {"prompt": "", "max_tokens": 4000, "n": 3}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "waiting" in response.json()["error"]["message"]
        assert wait_until_idle(engine)["active_rows"] == 0


@pytest.mark.parametrize("engines", [None, "1"], ids=["default-engines", "one-engine"])
def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(engines):
    """Through every engine the server drains (by default two on a CPU of two cores or more)."""
    with charrnn_serve("--drain-seconds", "60", *(["--engines", engines] if engines else [])) as (server, url):
        with httpx.Client(base_url=url, timeout=60) as client:
            expected = int(engines or (2 if cores() >= 2 else 1))
            assert f"charrnn_engines {expected}\n" in client.get("/metrics").text
            body = {"prompt": "ROMEO: ", "max_tokens": 1500, "stream": True, "seed": 2}
            with client.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                events = [next(lines)]
                server.send_signal(signal.SIGTERM)
                time.sleep(0.2)
                try:
                    refused = httpx.post(f"{url}/v1/completions", json={"max_tokens": 5}, timeout=10)
                    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    pass  # the listening socket closed (before or while it connected, a reset): refused as well
                events += list(lines)
        assert server.wait(timeout=60) == 0
    events = [e for e in events if e]
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert events[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["text"]) for c in chunks) == 1500


def test_cli_bad_input_is_one_line_and_exit_code_2():
    runner = CliRunner()
    assert_one_line_error(runner.invoke(cli.main, ["--model", "nowhere"]), "model not found: nowhere")
    assert_one_line_error(runner.invoke(cli.main, ["--replicas", "2"]), "need --ray")
    assert_one_line_error(runner.invoke(cli.main, ["--max-batch", "0"]), "--max-batch")
    assert_one_line_error(runner.invoke(cli.main, ["--engines", "2", "--engine-in-process", "--port", "0"]),
                          "more than one engine needs --engine-process")
    assert_one_line_error(runner.invoke(cli.main, ["--engines", "4", "--max-batch", "2", "--port", "0"]),
                          "max_batch must be >= engines")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert_one_line_error(runner.invoke(cli.main, ["--port", port]), f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("missing, args, extra", [("ray", ["--ray"], "ray"), ("fastapi", [], "serve"),
                                                 ("onnxruntime", [], "cpu")])
def test_a_missing_extra_is_named(missing, args, extra):
    code = f"import sys; sys.modules[{missing!r}] = None; from charrnn_serve.cli import main; main({args!r})"
    result = run_python(code)
    assert result.returncode == 2 and pip_install(extra) in result.stderr, result.stderr


def test_the_runtime_never_imports_the_web_stack():
    code = f"""
import sys
import charrnn_runtime
from charrnn_runtime.engine import Engine
with Engine(charrnn_runtime.load({str(SHIPPED)!r}, provider="cpu")) as engine:
    engine.submit("", 5, seed=0).result()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("fastapi", "starlette", "uvicorn", "ray", "charrnn_serve")))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
